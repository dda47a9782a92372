-- Refunds left to an operator (12 attempts or more, `allot_app::refunds::REFUND_ATTEMPTS_MAX`)
-- are due at the end of time (`PARKED_AT`, 9999-12-30T22:00:00Z), so the reconciler's scan of
-- `refunds_due_next` stops at the due ones instead of reading every parked row each sweep.
UPDATE refunds_due SET next_at = 253402207200 WHERE attempts >= 12;
