-- A booking's document is stored once per version (docs/benchmarks.md, "What was tuned").
--
-- Every hold wrote its document twice: into `booking_docs` and, as the `booking.held` event's
-- payload, into the outbox (~700 bytes each, a quarter of what a hold adds to the database).
-- Documents are now versions: a change appends one (never rewrites it), the booking row names
-- its current version (`doc_seq`), and an event that announces a version names it too, with no
-- payload of its own. A version is never changed or deleted, so an event's payload stays the
-- booking as it was when the event was written, whatever happens to the booking afterwards.
--
-- Until now a document's `seq` was its booking's; those rows keep their numbers. New versions
-- are numbered by SQLite (the largest `seq` + 1): since no version is ever deleted, no number
-- is ever given twice.
ALTER TABLE bookings ADD COLUMN doc_seq INTEGER NOT NULL DEFAULT 0;
UPDATE bookings SET doc_seq = seq;

ALTER TABLE outbox ADD COLUMN doc_seq INTEGER;

-- An event's payload: its own (older rows), else the version it names, else (an event
-- announcing a final status, `release`) the booking as it is now: its current version with the
-- row's status and `updated_at`.
DROP VIEW outbox_events;
CREATE VIEW outbox_events AS
SELECT o.seq, o.topic, o.aggregate_id,
       COALESCE(o.payload, v.doc, json_set(d.doc, '$.status', b.status, '$.updated_at', b.updated_at)) AS payload,
       o.created_at
FROM outbox AS o
LEFT JOIN booking_docs AS v ON v.seq = o.doc_seq
LEFT JOIN bookings AS b ON o.payload IS NULL AND o.doc_seq IS NULL AND b.id = o.aggregate_id
LEFT JOIN booking_docs AS d ON d.seq = b.doc_seq;
