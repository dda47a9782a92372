-- What the capacity rule reads: per resource, the quantity of live claims summed over claims
-- with the same block and the same expiry. A hold on a resource with a million claims on one
-- event then reads a handful of rows (one per expiry second still live) instead of a million.
-- Kept by triggers in the same transaction as every change to `claims`, so it cannot drift.
-- `expires_at` is the claims' `hold_expires_at`, or i64::MAX for claims that never lapse.
CREATE TABLE claim_totals (
    resource_id TEXT NOT NULL,
    block_start INTEGER NOT NULL,
    block_end   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    quantity    INTEGER NOT NULL CHECK (quantity >= 0),
    PRIMARY KEY (resource_id, block_start, block_end, expires_at)
) WITHOUT ROWID;

INSERT INTO claim_totals (resource_id, block_start, block_end, expires_at, quantity)
SELECT resource_id, block_start, block_end, COALESCE(hold_expires_at, 9223372036854775807), SUM(quantity)
FROM claims GROUP BY 1, 2, 3, 4;

CREATE TRIGGER claim_totals_insert AFTER INSERT ON claims BEGIN
    INSERT INTO claim_totals (resource_id, block_start, block_end, expires_at, quantity)
    VALUES (NEW.resource_id, NEW.block_start, NEW.block_end, COALESCE(NEW.hold_expires_at, 9223372036854775807),
            NEW.quantity)
    ON CONFLICT (resource_id, block_start, block_end, expires_at) DO UPDATE SET quantity = quantity + excluded.quantity;
END;

CREATE TRIGGER claim_totals_delete AFTER DELETE ON claims BEGIN
    UPDATE claim_totals SET quantity = quantity - OLD.quantity
    WHERE resource_id = OLD.resource_id AND block_start = OLD.block_start AND block_end = OLD.block_end
      AND expires_at = COALESCE(OLD.hold_expires_at, 9223372036854775807);
    DELETE FROM claim_totals
    WHERE resource_id = OLD.resource_id AND block_start = OLD.block_start AND block_end = OLD.block_end
      AND expires_at = COALESCE(OLD.hold_expires_at, 9223372036854775807) AND quantity = 0;
END;

CREATE TRIGGER claim_totals_update
AFTER UPDATE OF resource_id, block_start, block_end, quantity, hold_expires_at ON claims BEGIN
    UPDATE claim_totals SET quantity = quantity - OLD.quantity
    WHERE resource_id = OLD.resource_id AND block_start = OLD.block_start AND block_end = OLD.block_end
      AND expires_at = COALESCE(OLD.hold_expires_at, 9223372036854775807);
    DELETE FROM claim_totals
    WHERE resource_id = OLD.resource_id AND block_start = OLD.block_start AND block_end = OLD.block_end
      AND expires_at = COALESCE(OLD.hold_expires_at, 9223372036854775807) AND quantity = 0;
    INSERT INTO claim_totals (resource_id, block_start, block_end, expires_at, quantity)
    VALUES (NEW.resource_id, NEW.block_start, NEW.block_end, COALESCE(NEW.hold_expires_at, 9223372036854775807),
            NEW.quantity)
    ON CONFLICT (resource_id, block_start, block_end, expires_at) DO UPDATE SET quantity = quantity + excluded.quantity;
END;
