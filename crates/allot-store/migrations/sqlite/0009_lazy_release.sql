-- Releasing a storm of lapsed holds writes less per hold (docs/benchmarks.md, expiry).
--
-- 1. A released hold's claims stay until the writer has nothing more urgent: from their
--    `hold_expires_at` they count for nothing already (every read of `claim_totals` asks for
--    `expires_at` after now). The release queues the booking here; a later purge deletes its
--    claims and, whole, the totals rows they were summed into (every claim in such a row has
--    lapsed, since the row's `expires_at` is theirs), so the per-claim trigger skips them.
CREATE TABLE released_claims (
    booking_id TEXT PRIMARY KEY
) WITHOUT ROWID;

DROP TRIGGER claim_totals_delete;
CREATE TRIGGER claim_totals_delete AFTER DELETE ON claims
WHEN OLD.hold_expires_at IS NULL
  OR NOT EXISTS (SELECT 1 FROM released_claims WHERE booking_id = OLD.booking_id)
BEGIN
    UPDATE claim_totals SET quantity = quantity - OLD.quantity
    WHERE resource_id = OLD.resource_id AND block_start = OLD.block_start AND block_end = OLD.block_end
      AND expires_at = COALESCE(OLD.hold_expires_at, 9223372036854775807);
    DELETE FROM claim_totals
    WHERE resource_id = OLD.resource_id AND block_start = OLD.block_start AND block_end = OLD.block_end
      AND expires_at = COALESCE(OLD.hold_expires_at, 9223372036854775807) AND quantity = 0;
END;

-- 2. An event announcing a final status (`booking.expired`) may leave its payload NULL: the
--    booking's document, which no transition changes any more, is its payload. Copying it was
--    an eighth of what a release wrote. Events are read through `outbox_events`.
CREATE TABLE outbox_nullable (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    topic        TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    payload      TEXT,
    created_at   INTEGER NOT NULL
);
INSERT INTO outbox_nullable (seq, topic, aggregate_id, payload, created_at)
SELECT seq, topic, aggregate_id, payload, created_at FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_nullable RENAME TO outbox;

CREATE VIEW outbox_events AS
SELECT o.seq, o.topic, o.aggregate_id, COALESCE(o.payload, b.doc) AS payload, o.created_at
FROM outbox AS o LEFT JOIN bookings AS b ON o.payload IS NULL AND b.id = o.aggregate_id;
