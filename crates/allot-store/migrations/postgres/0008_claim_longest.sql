-- The longest block any claim on a resource has ever had, kept by triggers with every claim.
-- A read of the claims overlapping a span can then start its index range at `span start -
-- longest` instead of `span start - CLAIM_SECONDS_MAX` (400 days): a seat sold for a thousand
-- performances read every earlier performance's totals for each new hold, a cost growing with
-- the bookings. It only ever grows (deleting a claim keeps it), so no overlapping claim is missed.
-- Written under the resource's `resource_clocks` lock, like the claims themselves.
CREATE TABLE claim_longest (
    resource_id TEXT PRIMARY KEY,
    seconds     BIGINT NOT NULL CHECK (seconds > 0)
);

INSERT INTO claim_longest (resource_id, seconds)
SELECT resource_id, MAX(block_end - block_start) FROM claims GROUP BY 1;

-- Per statement on insert (a batch of holds is one statement), and only for resources whose
-- longest claim grows: an upsert that changes nothing still locks (and so writes) the row.
CREATE FUNCTION claim_longest_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO claim_longest (resource_id, seconds)
    SELECT i.resource_id, MAX(i.block_end - i.block_start) FROM inserted i GROUP BY 1
    HAVING MAX(i.block_end - i.block_start)
           > COALESCE((SELECT l.seconds FROM claim_longest l WHERE l.resource_id = i.resource_id), 0)
    ON CONFLICT (resource_id) DO UPDATE SET seconds = EXCLUDED.seconds
    WHERE claim_longest.seconds < EXCLUDED.seconds;
    RETURN NULL;
END
$$;

CREATE TRIGGER claim_longest_insert
AFTER INSERT ON claims
REFERENCING NEW TABLE AS inserted
FOR EACH STATEMENT EXECUTE FUNCTION claim_longest_insert();

CREATE FUNCTION claim_longest_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO claim_longest (resource_id, seconds) VALUES (NEW.resource_id, NEW.block_end - NEW.block_start)
    ON CONFLICT (resource_id) DO UPDATE SET seconds = EXCLUDED.seconds
    WHERE claim_longest.seconds < EXCLUDED.seconds;
    RETURN NULL;
END
$$;

CREATE TRIGGER claim_longest_update
AFTER UPDATE OF resource_id, block_start, block_end ON claims
FOR EACH ROW EXECUTE FUNCTION claim_longest_update();
