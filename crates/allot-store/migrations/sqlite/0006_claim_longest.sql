-- The longest block any claim on a resource has ever had, kept by triggers with every claim.
-- A read of the claims overlapping a span can then start its index range at `span start -
-- longest` instead of `span start - CLAIM_SECONDS_MAX` (400 days): a seat sold for a thousand
-- performances read every earlier performance's totals for each new hold, a cost growing with
-- the bookings. It only ever grows (deleting a claim keeps it), so no overlapping claim is missed.
CREATE TABLE claim_longest (
    resource_id TEXT PRIMARY KEY,
    seconds     INTEGER NOT NULL CHECK (seconds > 0)
) WITHOUT ROWID;

INSERT INTO claim_longest (resource_id, seconds)
SELECT resource_id, MAX(block_end - block_start) FROM claims GROUP BY 1;

CREATE TRIGGER claim_longest_insert AFTER INSERT ON claims BEGIN
    INSERT INTO claim_longest (resource_id, seconds) VALUES (NEW.resource_id, NEW.block_end - NEW.block_start)
    ON CONFLICT (resource_id) DO UPDATE SET seconds = excluded.seconds WHERE excluded.seconds > seconds;
END;

CREATE TRIGGER claim_longest_update AFTER UPDATE OF resource_id, block_start, block_end ON claims BEGIN
    INSERT INTO claim_longest (resource_id, seconds) VALUES (NEW.resource_id, NEW.block_end - NEW.block_start)
    ON CONFLICT (resource_id) DO UPDATE SET seconds = excluded.seconds WHERE excluded.seconds > seconds;
END;
