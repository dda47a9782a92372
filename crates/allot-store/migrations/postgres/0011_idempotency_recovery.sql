-- Which attempt holds a key (only it renews, completes or releases it), and what the key's
-- request changed, written in the transaction of that change: a retry after its holder died
-- answers from that instead of running the request a second time.
ALTER TABLE idempotency_keys ADD COLUMN owner TEXT;
ALTER TABLE idempotency_keys ADD COLUMN committed_target TEXT;
