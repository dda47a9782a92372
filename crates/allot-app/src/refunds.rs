//! Refunds owed and not yet made, made later (the reconciler): a cancelled booking's refund
//! the provider failed to make when it was cancelled, and a charge its booking may not record
//! (the write that records it failed, or the hold ended first and the refund made then
//! failed). Each waits in the store as a [`RefundDue`] and is retried, with backoff, until it
//! is made or found not owed. The provider's idempotency key, one per payment
//! ([`RefundRequest::of`]), makes the request's own attempt, a retry and two nodes
//! reconciling at once one refund.

use std::sync::{Arc, Weak};
use std::time::Duration;

use allot_core::booking::{Booking, BookingStatus};
use allot_core::ids::BookingId;
use jiff::{SignedDuration, Timestamp};
use tracing::Instrument;

use crate::audit::{self, AuditEvent, AuditScope};
use crate::breaker::BREAKER_OPEN_SECONDS;
use crate::payments::{ProviderError, RefundRequest};
use crate::store::{REFUND_GRACE_SECONDS, RefundDue, RefundKind};
use crate::{App, AppError, AppResult, StoreError, telemetry};

/// The audit action of a refund owed, made later.
pub const REFUND_ACTION: &str = "booking.refund";
/// How often the reconciler looks for refunds whose time has come.
pub const REFUND_SWEEP_INTERVAL_SECONDS: u64 = 30;
/// How long a sweep holds the refunds it took before another node's sweep may take them (if
/// this one died).
pub const REFUND_LEASE_SECONDS: i64 = 600;
/// How long a sweep goes on taking up refunds: those left when it runs out go back to the
/// queue. A refund begun just before it ends is done, one provider call (at most
/// `breaker::PROVIDER_CALL_TIMEOUT_SECONDS`) and a few writes later, well inside
/// [`REFUND_LEASE_SECONDS`].
pub const REFUND_SWEEP_BUDGET_SECONDS: u64 = 300;
/// Refunds tried per sweep; the rest wait for the next.
pub const REFUND_BATCH_MAX: u32 = 100;
/// Failed attempts after which a refund is left to an operator (logged at error level and
/// counted in `allot_refunds_abandoned_total`; the row stays). The refunds owed before the
/// reconciler existed are queued parked above it (the migrations' backfill, at 1 000).
pub const REFUND_ATTEMPTS_MAX: u32 = 12;
/// When a refund left to an operator is due: past every sweep's `now`, so the due index's scan
/// never reads it again (an operator's retry, [`rearm`], makes it due at once). The migrations
/// moved the rows parked before this existed here (`0014` on SQLite, `0013` on PostgreSQL).
/// A whole second (the stores keep seconds), so a refund read back parked equals it.
pub const PARKED_AT: Timestamp = Timestamp::constant(253_402_207_200, 0);
/// The longest wait between two attempts (doubling from [`REFUND_GRACE_SECONDS`]).
pub const REFUND_BACKOFF_SECONDS_MAX: i64 = 3600;
/// How long a payment provider keeps an idempotency key (Stripe: 24 h). Every attempt at one
/// refund must fall inside it: a late retry of an attempt whose answer was lost, after the key
/// is gone, would refund a second time.
pub const PROVIDER_KEY_RETENTION_SECONDS: i64 = 24 * 3600;
/// Tries at queueing an unrecorded charge (the first in the request, the rest from a task of
/// their own, 2 s apart and doubling): the write that failed to record the charge may
/// have failed for the same reason, a store busy or overloaded for a moment.
pub const QUEUE_ATTEMPTS_MAX: u32 = 8;

/// What a sweep did with the refunds whose time had come.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RefundSweep {
    /// Made at the provider (and recorded, for a cancellation).
    pub refunded: u32,
    /// Dropped: made already, or the booking records the payment.
    pub not_owed: u32,
    /// Left for later: the booking may still record the charge (its hold is live).
    pub waiting: u32,
    /// Failed at the provider or the store; tried again later.
    pub failed: u32,
}

/// Whether a queued refund is owed, decided on the booking as stored now.
#[derive(Debug, PartialEq, Eq)]
enum Owed {
    /// This much, now.
    Now(i64),
    /// Perhaps later: the booking is held, and a retried confirm may still record the charge.
    NotYet,
    No,
}

fn owed(due: &RefundDue, booking: Option<&Booking>) -> Owed {
    match due.kind {
        RefundKind::Cancellation => match booking.and_then(Booking::refund_owed) {
            Some((reference, amount)) if reference == due.payment_reference => Owed::Now(amount),
            _ => Owed::No,
        },
        RefundKind::Unrecorded => {
            let Some(booking) = booking else { return Owed::Now(due.amount) };
            let records = booking.payment.as_ref().is_some_and(|p| p.reference == due.payment_reference);
            match booking.status {
                // A retried confirm may still record it.
                BookingStatus::Held => Owed::NotYet,
                // Its provider's event may still confirm the booking with it (`webhooks`).
                BookingStatus::PendingPayment if records => Owed::NotYet,
                // Kept: the booking was confirmed with it (a cancellation owes a refund of its
                // own, and decides it: a cancelled one records that refund, of nothing or more).
                BookingStatus::Confirmed | BookingStatus::Completed | BookingStatus::NoShow if records => Owed::No,
                BookingStatus::Cancelled if records && booking.refund.is_some() => Owed::No,
                // Not recorded, or recorded pending by a booking that ended before its provider
                // reported it paid: the booking cannot keep it.
                _ => Owed::Now(due.amount),
            }
        }
    }
}

/// The audit event of an attempt at a refund owed: the server's own (`system`), on the
/// booking, seen by its venue's managers.
fn refund_event(due: &RefundDue, booking: Option<&Booking>, amount: i64, now: Timestamp) -> AuditEvent {
    let mut event = AuditEvent::new(REFUND_ACTION, audit::SYSTEM_ROLE, now);
    event.target_id = Some(due.booking_id.to_string());
    event.venue_id = booking.map(|b| b.venue_id);
    event.add_detail("kind", due.kind.as_str());
    event.add_detail("payment", &due.payment_reference);
    event.add_detail("amount", &amount.to_string());
    event.add_detail("attempt", &due.attempts.saturating_add(1).to_string());
    event
}

/// How long after `attempts` failed attempts the next one waits: doubling from the grace,
/// at most [`REFUND_BACKOFF_SECONDS_MAX`].
fn backoff_seconds(attempts: u32) -> i64 {
    let doubled = 1_i64.checked_shl(attempts).and_then(|factor| REFUND_GRACE_SECONDS.checked_mul(factor));
    doubled.filter(|wait| *wait > 0).map_or(REFUND_BACKOFF_SECONDS_MAX, |wait| wait.min(REFUND_BACKOFF_SECONDS_MAX))
}

/// When attempt `attempts + 1` is made, after `attempts` failed ones: never ([`PARKED_AT`]) for
/// one left to an operator.
fn next_attempt_at(now: Timestamp, attempts: u32) -> Timestamp {
    if left_to_operator(attempts) { PARKED_AT } else { seconds_after(now, backoff_seconds(attempts)) }
}

/// `seconds` after `now` (`now` itself past the end of time).
fn seconds_after(now: Timestamp, seconds: i64) -> Timestamp {
    now.saturating_add(SignedDuration::from_secs(seconds)).unwrap_or(now)
}

impl App {
    /// Makes, or drops as not owed, every queued refund whose time has come (at most
    /// [`REFUND_BATCH_MAX`]). Safe to run on several nodes at once: each refund is leased to
    /// one sweep ([`REFUND_LEASE_SECONDS`]), so one node decides it and counts its attempt, and
    /// one refund per payment at the provider holds even if a lease runs out mid-sweep.
    pub async fn settle_refunds(&self) -> AppResult<RefundSweep> {
        self.settle_refunds_within(Duration::from_secs(REFUND_SWEEP_BUDGET_SECONDS)).await
    }

    /// [`App::settle_refunds`] taking up refunds for `budget`: those left when it runs out go
    /// back to the queue, due at once, their attempts as they were.
    pub async fn settle_refunds_within(&self, budget: Duration) -> AppResult<RefundSweep> {
        let now = self.clock.now();
        let lease_until = seconds_after(now, REFUND_LEASE_SECONDS);
        let due = self.store.claim_refunds_due(now, lease_until, REFUND_ATTEMPTS_MAX, REFUND_BATCH_MAX).await?;
        let mut sweep = RefundSweep::default();
        let started = std::time::Instant::now();
        // When the provider's circuit is open (`breaker`): the refunds left wait for it, and
        // no attempt of theirs is counted, since none was made.
        let mut provider_left_alone = false;
        let circuit_tried_again_at = seconds_after(now, BREAKER_OPEN_SECONDS);
        for refund in &due {
            if provider_left_alone {
                self.release_refund(refund, circuit_tried_again_at).await;
                sweep.waiting += 1;
                continue;
            }
            if started.elapsed() >= budget {
                // The rest back to the queue, due now, well before this sweep's lease ends.
                self.release_refund(refund, now).await;
                continue;
            }
            let tally = match self.settle_refund(refund, now).await {
                Ok(Owed::Now(_)) => &mut sweep.refunded,
                Ok(Owed::NotYet) => &mut sweep.waiting,
                Ok(Owed::No) => &mut sweep.not_owed,
                Err(AppError::PaymentProviderUnavailable) => {
                    provider_left_alone = true;
                    self.release_refund(refund, circuit_tried_again_at).await;
                    &mut sweep.waiting
                }
                Err(e) => {
                    self.retry_refund_later(refund, now, &e).await;
                    &mut sweep.failed
                }
            };
            *tally += 1;
        }
        Ok(sweep)
    }

    /// Gives `due` back to the queue, due at `at`, its attempts as they were (no attempt made).
    async fn release_refund(&self, due: &RefundDue, at: Timestamp) {
        if let Err(e) = self.reschedule_leased(due, due.attempts, at).await {
            tracing::warn!(booking_id = %due.booking_id, error = %e, "a leased refund could not be released; taken again when its lease ends");
        }
    }

    /// Sets `due`'s attempts and next time while this sweep's lease on it stands (`due.next_at`
    /// is the lease's end, as claimed).
    async fn reschedule_leased(&self, due: &RefundDue, attempts: u32, at: Timestamp) -> Result<(), StoreError> {
        self.store.reschedule_refund(due.kind, &due.payment_reference, attempts, at, Some(due.next_at)).await
    }

    /// Decides `due` on its booking and acts on it: what was owed, once done. The provider left
    /// alone (its circuit open) is `AppError::PaymentProviderUnavailable`, with nothing audited:
    /// no attempt was made.
    async fn settle_refund(&self, due: &RefundDue, now: Timestamp) -> AppResult<Owed> {
        let booking = self.store.booking(due.booking_id).await?;
        let decided = owed(due, booking.as_ref());
        match decided {
            Owed::No => self.store.drop_refund(due.kind, &due.payment_reference).await?,
            Owed::NotYet => {
                self.reschedule_leased(due, due.attempts, seconds_after(now, REFUND_GRACE_SECONDS)).await?;
            }
            Owed::Now(amount) => {
                // Money moves: recorded in the audit trail (I6) as the server's own attempt, in
                // the transaction that records the refund, or on its own when none does.
                let scope = AuditScope::new(refund_event(due, booking.as_ref(), amount, now));
                let failed = booking.as_ref().and_then(Booking::failed_refund).map(str::to_owned);
                let made = scope.clone().run(self.make_refund(due, amount, failed)).await;
                if matches!(made, Err(AppError::PaymentProviderUnavailable)) {
                    scope.discard();
                }
                if let Some(event) = scope.finish(made.is_ok(), Some("internal"), self.clock.now()) {
                    self.append_audit(event).await;
                }
                made?;
                tracing::info!(booking_id = %due.booking_id, kind = due.kind.as_str(), amount, "a refund owed was made");
            }
        }
        Ok(decided)
    }

    /// Makes the refund `due` owes (`amount`) at the provider, in place of the refund `failed`
    /// if the provider reported that one failed, and records it: a cancellation's reference on
    /// its booking, an unrecorded charge's queue row dropped.
    async fn make_refund(&self, due: &RefundDue, amount: i64, failed: Option<String>) -> AppResult<()> {
        let request = RefundRequest::of(due.booking_id, &due.payment_reference, amount);
        let request = match failed {
            Some(failed) if due.kind == RefundKind::Cancellation => request.replacing(&failed),
            _ => request,
        };
        // Bounded by the provider's call timeout (`breaker`).
        let refunded = self.payments.refund(&request).await;
        if matches!(refunded, Err(ProviderError::CircuitOpen)) {
            return Err(AppError::PaymentProviderUnavailable);
        }
        telemetry::count_refund(&refunded);
        let reference = refunded.map_err(|e| {
            audit::fail("payment_provider_unavailable");
            AppError::Internal(format!("refund: {e}"))
        })?;
        audit::detail("refund", &reference);
        match due.kind {
            // Recording the reference drops the queued refund in the same write.
            RefundKind::Cancellation => {
                if self.record_refund(due.booking_id, reference).await.is_none() {
                    // Another node may have recorded the same refund first: the booking as
                    // stored decides whether it is still owed.
                    let stored = self.store.booking(due.booking_id).await?;
                    if owed(due, stored.as_ref()) != Owed::No {
                        return Err(AppError::Internal("the refund's reference was not recorded".into()));
                    }
                }
            }
            RefundKind::Unrecorded => self.store.drop_refund(due.kind, &due.payment_reference).await?,
        }
        Ok(())
    }

    async fn retry_refund_later(&self, due: &RefundDue, now: Timestamp, error: &AppError) {
        let attempts = due.attempts.saturating_add(1);
        let kind = due.kind.as_str();
        if left_to_operator(attempts) {
            metrics::counter!(telemetry::REFUNDS_ABANDONED).increment(1);
            tracing::error!(booking_id = %due.booking_id, kind, attempts, %error, "a refund owed failed every attempt; left to an operator");
        } else {
            tracing::warn!(booking_id = %due.booking_id, kind, attempts, %error, "a refund owed failed; tried again later");
        }
        if let Err(e) = self.reschedule_leased(due, attempts, next_attempt_at(now, attempts)).await {
            tracing::error!(booking_id = %due.booking_id, error = %e, "a failed refund could not be rescheduled");
        }
    }

    /// Queues the refund of `reference`, a charge of `amount` for booking `booking_id` that
    /// its booking may not record ([`RefundKind::Unrecorded`]): whether the first try did (the
    /// others go on from a task of their own, then an error log when all failed).
    pub(crate) async fn queue_unrecorded(&self, booking_id: BookingId, reference: &str, amount: i64) -> bool {
        let due = RefundDue {
            kind: RefundKind::Unrecorded,
            payment_reference: reference.to_owned(),
            booking_id,
            amount,
            attempts: 0,
            next_at: next_attempt_at(self.clock.now(), 0),
        };
        // From a task of its own, outside the request's audit scope: this write is not the
        // request's change, so it must neither carry the request's audit event nor mark its
        // idempotency key (a retry with the key must run the confirm again, not answer from it).
        // The request waits for the first try only; the others run after it has answered.
        let store = self.store.clone();
        let first = tokio::spawn(queue_once(store.clone(), due.clone()).in_current_span()).await;
        let queued = matches!(first, Ok(true));
        if !queued {
            tokio::spawn(queue_retrying(store, due).in_current_span());
        }
        queued
    }
}

/// Refunds an operator command lists at most.
pub const QUEUED_LIST_MAX: u32 = 10_000;

/// The refunds queued, soonest first (parked ones last), whatever their attempts: at most
/// [`QUEUED_LIST_MAX`], and whether more are queued.
pub async fn queued(store: &dyn crate::store::Store) -> AppResult<(Vec<RefundDue>, bool)> {
    let mut queued = store.refunds_due(Timestamp::MAX, u32::MAX, QUEUED_LIST_MAX + 1).await?;
    let more = queued.len() > QUEUED_LIST_MAX as usize;
    queued.truncate(QUEUED_LIST_MAX as usize);
    Ok((queued, more))
}

/// Whether a refund with `attempts` failed ones is left to an operator.
pub fn left_to_operator(attempts: u32) -> bool {
    attempts >= REFUND_ATTEMPTS_MAX
}

/// Re-arms the refunds queued for `payment_reference` (an operator's retry): no attempts, due
/// at `now`. How many there were.
pub async fn rearm(store: &dyn crate::store::Store, payment_reference: &str, now: Timestamp) -> AppResult<usize> {
    // Looked up by the payment, not among the first of the queue: parked refunds sort last.
    let found = store.refunds_of_payment(payment_reference).await?;
    for due in &found {
        store.reschedule_refund(due.kind, &due.payment_reference, 0, now, None).await?;
    }
    Ok(found.len())
}

/// One try at queueing `due`: whether it is queued.
async fn queue_once(store: Arc<dyn crate::store::Store>, due: RefundDue) -> bool {
    match store.queue_refund(&due).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(booking_id = %due.booking_id, payment = due.payment_reference, error = %e, "queueing an unrecorded charge failed");
            false
        }
    }
}

/// The tries after the first, 2 s apart and doubling (4 min in all); an error log when all
/// failed.
async fn queue_retrying(store: Arc<dyn crate::store::Store>, due: RefundDue) {
    for attempt in 1..QUEUE_ATTEMPTS_MAX {
        tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
        if queue_once(store.clone(), due.clone()).await {
            return;
        }
    }
    tracing::error!(booking_id = %due.booking_id, payment = due.payment_reference, amount = due.amount, "a charge that may be unrecorded could not be queued for refund: refund it by hand unless the booking records it");
}

/// Runs [`App::settle_refunds`] every [`REFUND_SWEEP_INTERVAL_SECONDS`] until the app is dropped.
pub async fn run(app: Weak<App>) {
    // The first sweep one interval after start, not at once: nothing queued is due sooner than
    // the grace, and a test that drives `settle_refunds` by hand has that long to itself.
    crate::every(app, Duration::from_secs(REFUND_SWEEP_INTERVAL_SECONDS), sweep_once).await;
}

async fn sweep_once(app: Arc<App>) {
    match app.settle_refunds().await {
        Ok(sweep) if sweep != RefundSweep::default() => tracing::info!(?sweep, "refunds owed reconciled"),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "reconciling refunds owed failed; the next sweep retries"),
    }
}

#[cfg(test)]
mod tests {
    use allot_core::booking::{Payment, Refund};
    use allot_core::ids::{UserId, VenueId};
    use allot_core::inventory::Currency;

    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("ts")
    }

    fn booking(status: BookingStatus, paid: Option<&str>) -> Booking {
        let currency = Currency::try_from("EUR".to_owned()).expect("currency");
        let mut b = Booking::new_hold(UserId::new(), VenueId::new(), currency, Vec::new(), at(0), at(600));
        b.status = status;
        b.total = 1200;
        b.payment = paid.map(|reference| Payment {
            provider: "test".into(),
            reference: reference.into(),
            amount: 1200,
            status: "succeeded".into(),
        });
        b
    }

    fn due(kind: RefundKind, b: &Booking) -> RefundDue {
        RefundDue {
            kind,
            payment_reference: "pi_1".into(),
            booking_id: b.id,
            amount: 1200,
            attempts: 0,
            next_at: at(0),
        }
    }

    #[test]
    fn a_cancellations_refund_is_owed_while_the_booking_owes_it() {
        let mut b = booking(BookingStatus::Cancelled, Some("pi_1"));
        b.refund = Some(Refund::owed(600));
        let due = due(RefundKind::Cancellation, &b);
        assert_eq!(owed(&due, Some(&b)), Owed::Now(600), "the policy's amount, not the payment's");
        b.refund = Some(Refund::made(600, "re_pi_1"));
        assert_eq!(owed(&due, Some(&b)), Owed::No, "made");
        assert_eq!(owed(&due, None), Owed::No, "no booking, nothing recorded to refund");
    }

    #[test]
    fn an_unrecorded_charge_is_owed_whole_once_its_booking_cannot_record_it() {
        let held = booking(BookingStatus::Held, None);
        let due = due(RefundKind::Unrecorded, &held);
        assert_eq!(owed(&due, Some(&held)), Owed::NotYet, "a retried confirm may still record it");
        assert_eq!(owed(&due, Some(&booking(BookingStatus::Confirmed, Some("pi_1")))), Owed::No);
        let mut cancelled = booking(BookingStatus::Cancelled, Some("pi_1"));
        cancelled.refund = Some(Refund::owed(0));
        assert_eq!(owed(&due, Some(&cancelled)), Owed::No, "the cancellation's refund decides, even of nothing");
        assert_eq!(owed(&due, Some(&booking(BookingStatus::Expired, None))), Owed::Now(1200));
        assert_eq!(owed(&due, Some(&booking(BookingStatus::Confirmed, Some("pi_2")))), Owed::Now(1200), "another paid");
        assert_eq!(owed(&due, Some(&booking(BookingStatus::PendingPayment, Some("pi_2")))), Owed::Now(1200));
        assert_eq!(owed(&due, None), Owed::Now(1200));
    }

    #[test]
    fn a_pending_charge_reported_paid_is_owed_whole_once_its_booking_ended_without_it() {
        let pending = booking(BookingStatus::PendingPayment, Some("pi_1"));
        let due = due(RefundKind::Unrecorded, &pending);
        assert_eq!(owed(&due, Some(&pending)), Owed::NotYet, "its provider's event may still confirm it");
        for ended in [BookingStatus::Expired, BookingStatus::Cancelled, BookingStatus::PaymentFailed] {
            assert_eq!(owed(&due, Some(&booking(ended, Some("pi_1")))), Owed::Now(1200), "{ended:?}");
        }
    }

    #[test]
    fn attempts_back_off_doubling_up_to_the_cap() {
        assert_eq!(next_attempt_at(at(0), 0), at(REFUND_GRACE_SECONDS));
        assert_eq!(next_attempt_at(at(0), 1), at(2 * REFUND_GRACE_SECONDS));
        assert_eq!(next_attempt_at(at(0), 3), at(8 * REFUND_GRACE_SECONDS));
        for attempts in [REFUND_ATTEMPTS_MAX - 1, 62, 63, 64, u32::MAX] {
            assert_eq!(backoff_seconds(attempts), REFUND_BACKOFF_SECONDS_MAX, "{attempts}");
        }
        assert_eq!(next_attempt_at(at(0), REFUND_ATTEMPTS_MAX - 1), at(REFUND_BACKOFF_SECONDS_MAX));
    }

    #[test]
    fn a_refund_left_to_an_operator_is_parked_where_the_migrations_put_them() {
        for attempts in [REFUND_ATTEMPTS_MAX, 1_000, u32::MAX] {
            assert_eq!(next_attempt_at(at(0), attempts), PARKED_AT, "{attempts}");
        }
        // `0014_refunds_parked.sql` (SQLite), `0013_refunds_parked.sql` (PostgreSQL).
        assert_eq!((PARKED_AT.as_second(), REFUND_ATTEMPTS_MAX), (253_402_207_200, 12), "the migrations' values");
        assert_eq!(PARKED_AT.as_second(), Timestamp::MAX.as_second(), "past every time");
        assert_eq!(PARKED_AT.subsec_nanosecond(), 0, "a whole second, as the stores keep it");
    }

    /// From the request's own attempt (when the refund is queued) to the last retry, each
    /// retry up to a sweep late: inside the provider's idempotency key, so no retry of an
    /// attempt whose answer was lost refunds twice.
    #[test]
    fn the_retry_schedule_ends_while_the_providers_key_is_kept() {
        let late = i64::try_from(REFUND_SWEEP_INTERVAL_SECONDS).expect("small");
        let last: i64 = (0..REFUND_ATTEMPTS_MAX).map(|failed| backoff_seconds(failed) + late).sum();
        assert!(last < PROVIDER_KEY_RETENTION_SECONDS / 2, "{last} s");
    }
}
