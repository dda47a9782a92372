//! Payments left pending (SPEC §5, Commerce: reconciliation of payments left pending). A
//! booking waits in `pending_payment` for its provider's event (`webhooks`); an event may be
//! late, lost (an endpoint misconfigured or down), or may have come before the confirm that
//! made the payment recorded it (a failure then changes nothing). Every
//! [`PENDING_SWEEP_INTERVAL_SECONDS`], each node asks the provider about the bookings pending
//! longer than [`PENDING_CHECK_AFTER_SECONDS`] (at most [`PENDING_CHECKS_MAX`], soonest to lapse
//! first) and applies what it says as its event would: paid confirms (or, for another sum,
//! refunds whole and holds again), failed holds again for another attempt, pending waits.
//! Applying is idempotent, so two nodes asking at once, or an event arriving too, settle the
//! booking once. Each change is audited as the server's own (`payment.reconcile`).

use std::sync::{Arc, Weak};
use std::time::Duration;

use allot_core::booking::{Booking, BookingStatus};
use jiff::{SignedDuration, Timestamp};

use crate::audit::{self, AuditEvent, AuditScope};
use crate::payments::{PAYMENT_PENDING, PaymentStatus, ProviderError};
use crate::webhooks::Settled;
use crate::{App, AppResult, telemetry};

/// The audit action of a pending payment settled by asking the provider.
pub const RECONCILE_ACTION: &str = "payment.reconcile";
/// How often each node asks about the payments left pending.
pub const PENDING_SWEEP_INTERVAL_SECONDS: u64 = 30;
/// How long a payment is left to its event before the provider is asked.
pub const PENDING_CHECK_AFTER_SECONDS: i64 = 60;
/// Bookings asked about per sweep; the rest wait for the next.
pub const PENDING_CHECKS_MAX: u32 = 100;

/// What a sweep found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PendingSweep {
    /// Paid: confirmed (or refunded whole, for another sum).
    pub paid: u32,
    /// Failed: held again, or ended as `payment_failed` at the last attempt.
    pub failed: u32,
    /// Still pending at the provider, or too recent to ask about.
    pub waiting: u32,
    /// Settled meanwhile, by its event or another node's sweep: nothing left to do.
    pub settled_meanwhile: u32,
}

impl App {
    /// Asks the provider about the payments left pending and settles their bookings
    /// (module docs). Stops at the first sign of a provider unavailable: the rest wait for
    /// the next sweep. A payment it cannot say anything of, or whose booking's write fails,
    /// is passed over until the next.
    pub async fn settle_pending_payments(&self) -> AppResult<PendingSweep> {
        let mut sweep = PendingSweep::default();
        for id in self.store.pending_payments(PENDING_CHECKS_MAX).await? {
            let Some(booking) = self.store.booking(id).await? else { continue };
            let Some(reference) = pending_reference(&booking, self.payments.name(), self.clock.now()) else {
                sweep.waiting += 1;
                continue;
            };
            let status = match self.payments.payment_status(&reference).await {
                Ok(status) => status,
                Err(e @ (ProviderError::Unavailable(_) | ProviderError::CircuitOpen)) => {
                    tracing::warn!(error = %e, "the payment provider could not be asked about pending payments");
                    break;
                }
                Err(e) => {
                    tracing::warn!(booking_id = %id, payment = reference, error = %e, "a pending payment could not be asked about");
                    continue;
                }
            };
            let tally = match status {
                PaymentStatus::Pending => {
                    sweep.waiting += 1;
                    continue;
                }
                PaymentStatus::Succeeded(_) => &mut sweep.paid,
                PaymentStatus::Failed => &mut sweep.failed,
            };
            match self.reconcile(booking, reference, status).await {
                Ok(true) => *tally += 1,
                Ok(false) => sweep.settled_meanwhile += 1,
                // This booking's write failed (a store busy for a moment): the next sweep asks
                // again; the others go on.
                Err(e) => tracing::warn!(booking_id = %id, error = %e, "a payment left pending could not be settled"),
            }
        }
        Ok(sweep)
    }

    /// Applies `status` of payment `reference` to `booking`, as its event would, audited as
    /// the server's own attempt: whether this changed anything (not when its event or another
    /// node settled the payment between the read and the write, which audited it already).
    async fn reconcile(&self, booking: Booking, reference: String, status: PaymentStatus) -> AppResult<bool> {
        let mut event = AuditEvent::new(RECONCILE_ACTION, audit::SYSTEM_ROLE, self.clock.now());
        event.target_id = Some(booking.id.to_string());
        event.venue_id = Some(booking.venue_id);
        event.add_detail("payment", &reference);
        let scope = AuditScope::new(event);
        let applied = scope
            .clone()
            .run(async {
                match status {
                    PaymentStatus::Succeeded(received) => {
                        audit::detail("report", "succeeded");
                        self.payment_succeeded(booking, reference, received).await
                    }
                    _ => {
                        audit::detail("report", "failed");
                        self.payment_failed(booking, reference).await
                    }
                }
            })
            .await;
        let reason = applied.as_ref().err().map(telemetry::failure);
        // Still to append: no write of this sweep recorded it, so it changed no booking.
        let unwritten = scope.finish(applied.is_ok(), reason, self.clock.now());
        let meanwhile = matches!((&applied, &unwritten), (Ok(Settled::Booking(_) | Settled::Ignored), Some(_)));
        let label = match &applied {
            _ if meanwhile => "settled_meanwhile",
            Ok(Settled::Booking(_)) => "applied",
            Ok(Settled::Refunding(_)) => "refund_queued",
            Ok(Settled::Ignored) => "ignored",
            Err(e) => telemetry::failure(e),
        };
        telemetry::count_outcome(telemetry::PENDING_CHECKS, label);
        if let Some(event) = unwritten.filter(|_| !meanwhile) {
            self.append_audit(event).await;
        }
        applied.map(|_| !meanwhile)
    }
}

/// The pending payment of `booking` to ask `provider` about at `now`: one of its own (a payment
/// another provider took, before the server changed providers, is left to that one's events)
/// that has waited for [`PENDING_CHECK_AFTER_SECONDS`].
fn pending_reference(booking: &Booking, provider: &str, now: Timestamp) -> Option<String> {
    let payment = booking.payment.as_ref().filter(|p| p.status == PAYMENT_PENDING && p.provider == provider)?;
    let waited = now.duration_since(booking.updated_at) >= SignedDuration::from_secs(PENDING_CHECK_AFTER_SECONDS);
    (booking.status == BookingStatus::PendingPayment && waited).then(|| payment.reference.clone())
}

/// Runs [`App::settle_pending_payments`] every [`PENDING_SWEEP_INTERVAL_SECONDS`] until the app
/// is dropped.
pub async fn run(app: Weak<App>) {
    crate::every(app, Duration::from_secs(PENDING_SWEEP_INTERVAL_SECONDS), sweep_once).await;
}

async fn sweep_once(app: Arc<App>) {
    match app.settle_pending_payments().await {
        Ok(sweep) if sweep.paid + sweep.failed > 0 => tracing::info!(?sweep, "payments left pending settled"),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "settling payments left pending failed; the next sweep retries"),
    }
}

#[cfg(test)]
mod tests {
    use allot_core::booking::Payment;
    use allot_core::ids::{UserId, VenueId};
    use allot_core::inventory::Currency;

    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("ts")
    }

    #[test]
    fn a_payment_is_asked_about_once_it_has_waited() {
        let currency = Currency::try_from("EUR".to_owned()).expect("currency");
        let mut b = Booking::new_hold(UserId::new(), VenueId::new(), currency, Vec::new(), at(0), at(600));
        b.status = BookingStatus::PendingPayment;
        b.updated_at = at(10);
        b.payment =
            Some(Payment { provider: "test".into(), reference: "pi_1".into(), amount: 1200, status: "pending".into() });
        assert_eq!(pending_reference(&b, "test", at(69)), None, "its event has time yet");
        assert_eq!(pending_reference(&b, "test", at(70)).as_deref(), Some("pi_1"));
        assert_eq!(pending_reference(&b, "stripe", at(70)), None, "another provider's");
        let mut paid = b.clone();
        paid.payment.as_mut().expect("payment").status = "succeeded".into();
        assert_eq!(pending_reference(&paid, "test", at(70)), None);
        let mut held = b.clone();
        held.status = BookingStatus::Held;
        assert_eq!(pending_reference(&held, "test", at(70)), None);
    }
}
