-- Bookings waiting for an asynchronous payment, soonest lapse first: what the pending-payment
-- check (`allot_app::pending`) asks the provider about. Holds never enter it.
CREATE INDEX bookings_pending ON bookings (expires_at) WHERE status = 'pending_payment';
