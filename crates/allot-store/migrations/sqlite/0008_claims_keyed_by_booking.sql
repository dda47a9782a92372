-- Claims are written and released a booking at a time (a hold inserts its claims, an expiry,
-- cancel or confirm deletes or re-stamps them by booking id) and read by resource only through
-- `claim_totals`. As a rowid table with an `item_id` key and an index on `booking_id`, every
-- claim was written into three b-trees, each dirtying its own page per commit; keyed by
-- (booking_id, item_id) without a rowid it is one b-tree, appended to in booking-id (UUIDv7)
-- order, and a booking's claims are one range of it.
CREATE TABLE claims_by_booking (
    booking_id      TEXT NOT NULL,
    item_id         TEXT NOT NULL,
    resource_id     TEXT NOT NULL,
    block_start     INTEGER NOT NULL,
    block_end       INTEGER NOT NULL,
    quantity        INTEGER NOT NULL CHECK (quantity > 0),
    hold_expires_at INTEGER,
    PRIMARY KEY (booking_id, item_id)
) WITHOUT ROWID;

INSERT INTO claims_by_booking (booking_id, item_id, resource_id, block_start, block_end, quantity, hold_expires_at)
SELECT booking_id, item_id, resource_id, block_start, block_end, quantity, hold_expires_at FROM claims;

-- Dropping the table drops its triggers first, so the copy above leaves the totals as they are.
DROP TABLE claims;
ALTER TABLE claims_by_booking RENAME TO claims;

-- The triggers of migrations 0005 and 0006, unchanged, on the new table.
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

CREATE TRIGGER claim_longest_insert AFTER INSERT ON claims BEGIN
    INSERT INTO claim_longest (resource_id, seconds) VALUES (NEW.resource_id, NEW.block_end - NEW.block_start)
    ON CONFLICT (resource_id) DO UPDATE SET seconds = excluded.seconds WHERE excluded.seconds > seconds;
END;

CREATE TRIGGER claim_longest_update AFTER UPDATE OF resource_id, block_start, block_end ON claims BEGIN
    INSERT INTO claim_longest (resource_id, seconds) VALUES (NEW.resource_id, NEW.block_end - NEW.block_start)
    ON CONFLICT (resource_id) DO UPDATE SET seconds = excluded.seconds WHERE excluded.seconds > seconds;
END;
