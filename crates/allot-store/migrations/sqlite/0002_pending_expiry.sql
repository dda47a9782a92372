-- A booking waiting for an asynchronous payment expires like a hold: index both for the
-- expiry job, replacing the held-only index.
DROP INDEX bookings_held_expiry;
CREATE INDEX bookings_expiry ON bookings (expires_at) WHERE status IN ('held', 'pending_payment');
