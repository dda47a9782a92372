-- `claim_totals` kept per statement on insert: a batch of holds inserts hundreds of claims in
-- one statement, and the row trigger ran a PL/pgSQL upsert for each of them (a tenth of the
-- write session's time under load). One set-based upsert of the statement's new rows, summed
-- per key, keeps the same totals. Updates and deletes (status changes, a claim at a time) keep
-- the row trigger.
CREATE FUNCTION claim_totals_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO claim_totals (resource_id, block_start, block_end, expires_at, quantity)
    SELECT resource_id, block_start, block_end, COALESCE(hold_expires_at, 9223372036854775807), SUM(quantity)
    FROM inserted
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (resource_id, block_start, block_end, expires_at)
    DO UPDATE SET quantity = claim_totals.quantity + EXCLUDED.quantity;
    RETURN NULL;
END
$$;

DROP TRIGGER claim_totals_apply ON claims;

CREATE TRIGGER claim_totals_apply
AFTER DELETE OR UPDATE OF resource_id, block_start, block_end, quantity, hold_expires_at ON claims
FOR EACH ROW EXECUTE FUNCTION claim_totals_apply();

CREATE TRIGGER claim_totals_insert
AFTER INSERT ON claims
REFERENCING NEW TABLE AS inserted
FOR EACH STATEMENT EXECUTE FUNCTION claim_totals_insert();
