-- What the capacity rule reads: per resource, the quantity of live claims summed over claims
-- with the same block and the same expiry. A hold on a resource with a million claims on one
-- event then reads a handful of rows (one per expiry second still live) instead of a million.
-- Kept by a trigger in the same transaction as every change to `claims`, so it cannot drift;
-- writers already hold the resource's `resource_clocks` lock, so its rows see no contention
-- between nodes. `expires_at` is the claims' `hold_expires_at`, or i64::MAX for never.
CREATE TABLE claim_totals (
    resource_id TEXT NOT NULL,
    block_start BIGINT NOT NULL,
    block_end   BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    quantity    BIGINT NOT NULL CHECK (quantity >= 0),
    PRIMARY KEY (resource_id, block_start, block_end, expires_at)
);

INSERT INTO claim_totals (resource_id, block_start, block_end, expires_at, quantity)
SELECT resource_id, block_start, block_end, COALESCE(hold_expires_at, 9223372036854775807), SUM(quantity)
FROM claims GROUP BY 1, 2, 3, 4;

CREATE FUNCTION claim_totals_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE claim_totals SET quantity = quantity - OLD.quantity
        WHERE resource_id = OLD.resource_id AND block_start = OLD.block_start AND block_end = OLD.block_end
          AND expires_at = COALESCE(OLD.hold_expires_at, 9223372036854775807);
        DELETE FROM claim_totals
        WHERE resource_id = OLD.resource_id AND block_start = OLD.block_start AND block_end = OLD.block_end
          AND expires_at = COALESCE(OLD.hold_expires_at, 9223372036854775807) AND quantity = 0;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO claim_totals (resource_id, block_start, block_end, expires_at, quantity)
        VALUES (NEW.resource_id, NEW.block_start, NEW.block_end, COALESCE(NEW.hold_expires_at, 9223372036854775807),
                NEW.quantity)
        ON CONFLICT (resource_id, block_start, block_end, expires_at)
        DO UPDATE SET quantity = claim_totals.quantity + EXCLUDED.quantity;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER claim_totals_apply
AFTER INSERT OR DELETE OR UPDATE OF resource_id, block_start, block_end, quantity, hold_expires_at ON claims
FOR EACH ROW EXECUTE FUNCTION claim_totals_apply();
