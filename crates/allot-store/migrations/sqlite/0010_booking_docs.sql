-- A booking's document moves out of its row (docs/benchmarks.md, expiry).
--
-- Releasing a lapsed hold changes its status and `updated_at`, nothing else, yet with the
-- document in the row it rewrote ~800 bytes per booking: in a storm of 100 000 lapsed holds
-- that was over 100 MB of WAL to write, checksum and checkpoint. The row now holds only what
-- is searched or changed by a release (~150 bytes); the document is in `booking_docs`, keyed by
-- the row's `seq` (an INTEGER PRIMARY KEY, so no VACUUM renumbers it).
--
-- The row's `status` and `updated_at` are the booking's; the document's copies of those two
-- may be older (a release writes only the row) and every read takes the row's.
CREATE TABLE bookings_split (
    seq         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    venue_id    TEXT NOT NULL,
    status      TEXT NOT NULL,
    expires_at  INTEGER,
    -- The timestamp as the document writes it (RFC 3339), so a read can put it back as is.
    updated_at  TEXT NOT NULL
);
CREATE TABLE booking_docs (
    seq INTEGER PRIMARY KEY,
    doc TEXT NOT NULL
);
INSERT INTO bookings_split (seq, id, customer_id, venue_id, status, expires_at, updated_at)
SELECT rowid, id, customer_id, venue_id, status, expires_at, json_extract(doc, '$.updated_at') FROM bookings;
INSERT INTO booking_docs (seq, doc) SELECT rowid, doc FROM bookings;

DROP VIEW outbox_events;
DROP TABLE bookings;
ALTER TABLE bookings_split RENAME TO bookings;
CREATE INDEX bookings_customer ON bookings (customer_id, id);
CREATE INDEX bookings_venue ON bookings (venue_id, id);
CREATE INDEX bookings_expiry ON bookings (expires_at) WHERE status IN ('held', 'pending_payment');

-- An event with a NULL payload announces a final status: its payload is the booking as it is
-- now, the document with the row's status and `updated_at`.
CREATE VIEW outbox_events AS
SELECT o.seq, o.topic, o.aggregate_id,
       COALESCE(o.payload, json_set(d.doc, '$.status', b.status, '$.updated_at', b.updated_at)) AS payload,
       o.created_at
FROM outbox AS o
LEFT JOIN bookings AS b ON o.payload IS NULL AND b.id = o.aggregate_id
LEFT JOIN booking_docs AS d ON d.seq = b.seq;
