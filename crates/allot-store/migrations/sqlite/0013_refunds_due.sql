-- Refunds that may be owed (`allot_app::store::RefundDue`), kept until the reconciler makes
-- them or finds them not owed: a cancellation's refund the provider failed to make, a charge
-- its booking may not record.
CREATE TABLE refunds_due (
    payment_reference TEXT NOT NULL,
    kind              TEXT NOT NULL,
    booking_id        TEXT NOT NULL,
    amount            INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_at           INTEGER NOT NULL,
    PRIMARY KEY (payment_reference, kind)
) WITHOUT ROWID;
CREATE INDEX refunds_due_next ON refunds_due (next_at);

-- Cancellations whose refund was never made (before this migration nothing made it later),
-- queued parked: 1 000 attempts, above any attempt limit, so the reconciler leaves them to an
-- operator. Refunds were asked for without an idempotency key until now, so one whose answer
-- was lost may have been made, and some may have been made by hand since their error log.
INSERT INTO refunds_due (payment_reference, kind, booking_id, amount, attempts, next_at)
SELECT json_extract(d.doc, '$.payment.reference'), 'cancellation', b.id, json_extract(d.doc, '$.refund.amount'), 1000, 0
FROM bookings AS b JOIN booking_docs AS d ON d.seq = b.doc_seq
WHERE b.status = 'cancelled'
  AND json_extract(d.doc, '$.payment.reference') IS NOT NULL
  AND json_extract(d.doc, '$.refund.amount') > 0
  AND json_extract(d.doc, '$.refund.reference') IS NULL
ON CONFLICT DO NOTHING;
