-- Events are read through `outbox_events` on both backends. On SQLite an event announcing a
-- final status may leave its payload to the booking's document (migration 0009 there); here
-- every row carries its payload, so the view is the table.
CREATE VIEW outbox_events AS SELECT seq, topic, aggregate_id, payload, created_at FROM outbox;
