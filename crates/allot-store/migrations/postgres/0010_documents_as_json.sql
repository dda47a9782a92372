-- Documents as `json` (the text, validated) instead of `jsonb`. Nothing queries inside them:
-- they are written whole and read whole (`doc::text`), so `jsonb` only cost a parse into its
-- binary form on every write (sorting each object's keys) and a conversion back to text on
-- every read (a batch of holds reads its resources' and venues' documents): ~5 % of the
-- write sessions' CPU under load.
DROP VIEW outbox_events;
ALTER TABLE outbox ALTER COLUMN payload TYPE json USING payload::json;
CREATE VIEW outbox_events AS SELECT seq, topic, aggregate_id, payload, created_at FROM outbox;
ALTER TABLE bookings ALTER COLUMN doc TYPE json USING doc::json;
ALTER TABLE resources ALTER COLUMN doc TYPE json USING doc::json;
ALTER TABLE venues ALTER COLUMN doc TYPE json USING doc::json;
ALTER TABLE events ALTER COLUMN doc TYPE json USING doc::json;
