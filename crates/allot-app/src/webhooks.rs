//! The payment provider's events (its webhooks). A payment the provider reports after the
//! confirm that started it (`tok_async`: the booking `pending_payment`) settles its booking:
//! paid confirms it, failed holds it again for another attempt (or ends it as
//! `payment_failed` at the last). Money reported taken for a booking that can no longer keep
//! it (it expired or was cancelled while the payment was pending) is queued to be refunded
//! whole (`refunds`). An event is authenticated by the provider's signature, Stripe's scheme
//! ([`verify_signature`]); the HTTP layer reads the event's JSON into a [`PaymentEvent`].
//!
//! Providers send an event again until it is answered 2xx, and may send it late or twice:
//! every event is applied once, a repeat answers what the first did, and one arriving after
//! its booking ended changes nothing but the money owed back.
//!
//! A refund the provider reports failed after it made it (the card closed since) is recorded on
//! its booking, owed again and left to an operator ([`App::refund_failed`]).
//!
//! A payment is kept only for the sum its booking asked, in the booking's currency: one the
//! provider reports for another sum is refunded whole (what it reports taken), and the booking
//! held again as if the payment had failed.

use allot_core::booking::{Booking, BookingStatus, Transition};
use allot_core::ids::BookingId;
use allot_core::inventory::Currency;
use hmac::{Hmac, Mac};
use jiff::Timestamp;
use sha2::Sha256;

use crate::bookings::{transition_error, update_error};
use crate::payments::{PAYMENT_PENDING, PAYMENT_SUCCEEDED};
use crate::store::UpdateRefused;
use crate::{App, AppError, AppResult, audit, telemetry};

/// How far an event's signed time may lie from now, either way (Stripe's default): an event
/// captured and sent again later is refused.
pub const SIGNATURE_TOLERANCE_SECONDS: i64 = 300;
/// Signatures (`v1=`) read from one header: a provider rolling its secret sends two.
pub const SIGNATURES_MAX: usize = 8;
/// The settings key of the secret the provider signs its events with (made at first start,
/// shared by every node through the database).
pub const WEBHOOK_SECRET_SETTING: &str = "payment_webhook_secret";

/// A fresh signing secret, in Stripe's form (`whsec_…`).
pub fn new_webhook_secret() -> String {
    format!("whsec_{}", crate::auth::random_token())
}

/// Money the provider reports a payment took, in the currency's smallest unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub amount: i64,
    pub currency: Currency,
}

/// What the provider reports of a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentReport {
    Succeeded(Received),
    Failed,
}

impl PaymentReport {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentReport::Succeeded(_) => "succeeded",
            PaymentReport::Failed => "failed",
        }
    }
}

/// One provider event about one payment of one booking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentEvent {
    pub booking_id: BookingId,
    pub payment_reference: String,
    pub report: PaymentReport,
}

/// The provider's report that a refund it made failed afterwards (Stripe's `refund.failed`):
/// the money did not go back (a card closed since, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundFailure {
    pub booking_id: BookingId,
    pub payment_reference: String,
    /// The provider's refund that failed.
    pub refund_reference: String,
    /// Why, in the provider's words.
    pub reason: String,
}

/// What an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The booking as the event left it (confirmed, held again, `payment_failed`), or as an
    /// earlier delivery of the same event left it.
    Booking(Booking),
    /// Money taken for a booking that can no longer keep it, or for another sum than it asked:
    /// queued to be refunded whole.
    Refunding(Booking),
    /// Nothing to do: a booking this server does not know, or a failure reported once its
    /// booking no longer waited for the payment.
    Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is not `t=<unix seconds>,v1=<hex>`")]
    Malformed,
    #[error("the event was signed more than {SIGNATURE_TOLERANCE_SECONDS} s from now")]
    Stale,
    #[error("no signature matches the event")]
    Mismatch,
}

/// Checks `header` (`t=<unix seconds>,v1=<hex>[,v1=<hex>…]`, Stripe's `Stripe-Signature`)
/// over `body`: one `v1` must be the HMAC-SHA256, with `secret`, of `"<t>.<body>"`, and `t`
/// within [`SIGNATURE_TOLERANCE_SECONDS`] of `now`. Compared in constant time.
pub fn verify_signature(secret: &[u8], header: &str, body: &[u8], now: Timestamp) -> Result<(), SignatureError> {
    let mut signed_at = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => signed_at = Some(t.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", tag)) if signatures.len() < SIGNATURES_MAX => {
                signatures.push(hex::decode(tag).map_err(|_| SignatureError::Malformed)?);
            }
            // Other schemes (`v0`), and signatures past the limit.
            Some(_) => {}
            None => return Err(SignatureError::Malformed),
        }
    }
    let signed_at = signed_at.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if now.as_second().abs_diff(signed_at) > SIGNATURE_TOLERANCE_SECONDS.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let mac = signer(secret, signed_at, body);
    if signatures.iter().any(|tag| mac.clone().verify_slice(tag).is_ok()) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The signature header a provider sends with `body` signed at `at` (for tests and for
/// sending the built-in test provider's events by hand).
pub fn sign(secret: &[u8], body: &[u8], at: Timestamp) -> String {
    let tag = signer(secret, at.as_second(), body).finalize().into_bytes();
    format!("t={},v1={}", at.as_second(), hex::encode(tag))
}

fn signer(secret: &[u8], signed_at: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(signed_at.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Whether `booking` records payment `reference` with `status`.
fn records(booking: &Booking, reference: &str, status: &str) -> bool {
    booking.payment.as_ref().is_some_and(|p| p.reference == reference && p.status == status)
}

/// Whether `booking` records the refund `failure` reports, made on its payment and not reported
/// failed yet.
fn refund_made(booking: &Booking, failure: &RefundFailure) -> bool {
    let on_payment = booking.payment.as_ref().is_some_and(|p| p.reference == failure.payment_reference);
    let made = booking
        .refund
        .as_ref()
        .is_some_and(|r| r.failure.is_none() && r.reference.as_deref() == Some(failure.refund_reference.as_str()));
    on_payment && made
}

/// Whether `booking` records the refund `failure` reports as failed already.
fn refund_failed(booking: &Booking, failure: &RefundFailure) -> bool {
    booking.failed_refund() == Some(failure.refund_reference.as_str())
}

/// Whether `booking` may still record a payment of `received` that its confirm made (the event
/// came first): it is held, its hold has not lapsed, it records no payment yet, and `received`
/// is what it would ask. A confirm whose process died after the charge never records it; its
/// events are refused until the hold lapses, and then refunded.
fn records_it_soon(booking: &Booking, received: Received, now: Timestamp) -> bool {
    booking.status == BookingStatus::Held
        && !booking.is_expired_at(now)
        && booking.payment.is_none()
        && (booking.total, booking.currency) == (received.amount, received.currency)
}

/// Whether `received` is the sum `booking`'s payment asked for, in its currency.
fn as_asked(booking: &Booking, received: Received) -> bool {
    booking.currency == received.currency && booking.payment.as_ref().is_some_and(|p| p.amount == received.amount)
}

impl App {
    /// The secret the payment provider signs its events with, as this node last read it.
    pub fn webhook_secret(&self) -> String {
        self.webhook_secret.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Checks an event's signature ([`verify_signature`]) with the provider's secret. One that
    /// does not match re-reads the stored secret once: another node may have replaced it since
    /// this one started (`allot serve --payment-webhook-secret`).
    pub async fn verify_payment_event(&self, header: &str, body: &[u8]) -> Result<(), SignatureError> {
        let now = self.clock.now();
        let known = self.webhook_secret();
        match verify_signature(known.as_bytes(), header, body, now) {
            Err(SignatureError::Mismatch) => {}
            verdict => return verdict,
        }
        let stored = match self.store.setting(WEBHOOK_SECRET_SETTING).await {
            Ok(Some(stored)) if stored != known => stored,
            Ok(_) => return Err(SignatureError::Mismatch),
            Err(e) => {
                tracing::warn!(error = %e, "the stored payment webhook secret could not be read");
                return Err(SignatureError::Mismatch);
            }
        };
        verify_signature(stored.as_bytes(), header, body, now)?;
        tracing::info!("the payment webhook secret was replaced; this node now verifies with the new one");
        *self.webhook_secret.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = stored;
        Ok(())
    }

    /// Applies the provider's event (its signature checked by the caller) to its booking.
    pub async fn payment_event(&self, provider: &str, event: PaymentEvent) -> AppResult<Settled> {
        let settled = self.apply_payment_event(provider, event).await;
        let outcome = match &settled {
            Ok(Settled::Booking(_)) => "applied",
            Ok(Settled::Refunding(_)) => "refund_queued",
            Ok(Settled::Ignored) => "ignored",
            Err(e) => telemetry::failure(e),
        };
        telemetry::count_outcome(telemetry::PAYMENT_EVENTS, outcome);
        settled
    }

    async fn apply_payment_event(&self, provider: &str, event: PaymentEvent) -> AppResult<Settled> {
        if provider != self.payments.name() {
            return Err(AppError::NotFound("payment provider"));
        }
        audit::set_target(event.booking_id);
        audit::detail("payment", &event.payment_reference);
        audit::detail("report", event.report.as_str());
        let Some(booking) = self.store.booking(event.booking_id).await? else { return Ok(Settled::Ignored) };
        audit::set_venue(booking.venue_id);
        match event.report {
            PaymentReport::Succeeded(received) => {
                self.payment_succeeded(booking, event.payment_reference, received).await
            }
            PaymentReport::Failed => self.payment_failed(booking, event.payment_reference).await,
        }
    }

    /// Records on its booking that the provider's refund failed: the refund is owed again, and
    /// left to an operator (`allot refunds list`, `allot refunds retry`, which makes it anew in
    /// place of the failed one), since the card it went to did not take it. A failure of a
    /// refund the booking owes and has not recorded yet is refused (409: sent again, it finds
    /// the refund recorded); one of a refund made again since changes nothing; one the booking
    /// does not record at all (an unrecorded charge's refund) is logged for an operator to give
    /// back by other means, and changes nothing.
    pub async fn refund_failed(&self, provider: &str, failure: RefundFailure) -> AppResult<Settled> {
        let settled = self.apply_refund_failure(provider, failure).await;
        let outcome = match &settled {
            Ok(Settled::Booking(_) | Settled::Refunding(_)) => "refund_failed",
            Ok(Settled::Ignored) => "ignored",
            Err(e) => telemetry::failure(e),
        };
        telemetry::count_outcome(telemetry::PAYMENT_EVENTS, outcome);
        settled
    }

    async fn apply_refund_failure(&self, provider: &str, failure: RefundFailure) -> AppResult<Settled> {
        if provider != self.payments.name() {
            return Err(AppError::NotFound("payment provider"));
        }
        audit::set_target(failure.booking_id);
        audit::detail("payment", &failure.payment_reference);
        audit::detail("report", "refund_failed");
        audit::detail("refund", &failure.refund_reference);
        audit::detail("reason", &failure.reason);
        let Some(booking) = self.store.booking(failure.booking_id).await? else { return Ok(Settled::Ignored) };
        audit::set_venue(booking.venue_id);
        if refund_failed(&booking, &failure) {
            return Ok(Settled::Booking(booking));
        }
        if booking.refund.as_ref().is_some_and(|r| r.replaced.contains(&failure.refund_reference)) {
            tracing::info!(booking_id = %booking.id, refund = failure.refund_reference,
                "a refund reported failed was made again since: nothing owed");
            return Ok(Settled::Ignored);
        }
        if !refund_made(&booking, &failure) {
            // The booking owes its refund on this payment and has not recorded this one yet (the
            // record of a refund just made is on its way, or failed and is retried): sent again,
            // the event finds it recorded, instead of the refund being recorded made after this.
            if booking.refund_owed().is_some_and(|(payment, _)| payment == failure.payment_reference) {
                return Err(AppError::Conflict(
                    "the booking has not recorded this refund yet: send the event again".into(),
                ));
            }
            tracing::error!(booking_id = %booking.id, payment = failure.payment_reference,
                refund = failure.refund_reference, reason = failure.reason,
                "the provider reports a refund failed that its booking does not record (an unrecorded charge's): give the money back by other means");
            return Ok(Settled::Ignored);
        }
        let reported = failure.clone();
        let decide = Box::new(move |b: &Booking, _now| {
            if !refund_made(b, &reported) {
                return Err(AppError::Conflict("the booking does not record this refund as made".into()));
            }
            let mut next = b.clone();
            if let Some(refund) = next.refund.as_mut() {
                refund.failure = Some(reported.reason);
            }
            Ok(next)
        });
        match self.store.update_booking(booking.id, self.clock.now(), decide).await {
            Ok(failed) => {
                tracing::error!(booking_id = %failed.id, payment = failure.payment_reference,
                    refund = failure.refund_reference, reason = failure.reason,
                    "a refund failed at the provider: left to an operator (allot refunds list / retry)");
                Ok(Settled::Booking(failed))
            }
            Err(UpdateRefused::Rejected(_)) => {
                // Recorded meanwhile by another delivery of the same event, or settled since.
                let current = self.store.booking(booking.id).await?.unwrap_or(booking);
                Ok(if refund_failed(&current, &failure) { Settled::Booking(current) } else { Settled::Ignored })
            }
            Err(e) => Err(update_error(e)),
        }
    }

    /// Confirms the booking waiting for this payment, if it took the sum asked; a booking that
    /// no longer can keep it (ended, or waiting for another payment) has it queued to be
    /// refunded whole. An event that arrives before the confirm that made its payment has
    /// recorded it is refused (409), so the provider sends it again.
    pub(crate) async fn payment_succeeded(
        &self,
        booking: Booking,
        reference: String,
        received: Received,
    ) -> AppResult<Settled> {
        if records(&booking, &reference, PAYMENT_SUCCEEDED) {
            return Ok(Settled::Booking(booking));
        }
        let expected = reference.clone();
        let decide = Box::new(move |b: &Booking, now| {
            // Both checked on the booking as stored (the confirm's write may have landed since
            // the read above); another sum is refused here and handled on the re-read below.
            if !records(b, &expected, PAYMENT_PENDING) || !as_asked(b, received) {
                return Err(AppError::Conflict("the booking does not wait for this payment".into()));
            }
            let mut next = b.clone();
            next.status = b.next_status(Transition::Confirm, now).map_err(transition_error)?;
            next.expires_at = None;
            if let Some(payment) = next.payment.as_mut() {
                PAYMENT_SUCCEEDED.clone_into(&mut payment.status);
            }
            Ok(next)
        });
        match self.store.update_booking(booking.id, self.clock.now(), decide).await {
            Ok(confirmed) => Ok(Settled::Booking(confirmed)),
            Err(UpdateRefused::Rejected(_)) => {
                let current = self.store.booking(booking.id).await?.unwrap_or(booking);
                // Applied meanwhile by a delivery of the same event.
                if records(&current, &reference, PAYMENT_SUCCEEDED) {
                    return Ok(Settled::Booking(current));
                }
                if records(&current, &reference, PAYMENT_PENDING) && !as_asked(&current, received) {
                    return self.another_sum(current, reference, received).await;
                }
                let now = self.clock.now();
                // The confirm recorded it between this update's decision and the read: the
                // next delivery confirms it.
                let recorded_meanwhile = current.status == BookingStatus::PendingPayment
                    && records(&current, &reference, PAYMENT_PENDING)
                    && !current.is_expired_at(now);
                if recorded_meanwhile || records_it_soon(&current, received, now) {
                    return Err(AppError::Conflict(
                        "the booking has not recorded this payment yet: send the event again".into(),
                    ));
                }
                // It lapsed or was cancelled while the payment was pending, or waits for
                // another payment: it cannot keep this money.
                self.refund_received(&current, &reference, received).await?;
                Ok(Settled::Refunding(current))
            }
            Err(e) => Err(update_error(e)),
        }
    }

    /// A payment for another sum than its booking asked, or in another currency (the price
    /// cannot change while it is pending, so the provider and this server disagree): not kept.
    /// What it took is refunded whole, and the booking held again as if it had failed.
    async fn another_sum(&self, booking: Booking, reference: String, received: Received) -> AppResult<Settled> {
        let asked = booking.payment.as_ref().map_or(0, |p| p.amount);
        tracing::error!(booking_id = %booking.id, payment = reference, asked, currency = booking.currency.as_str(),
            received = received.amount, received_currency = received.currency.as_str(),
            "a payment reported for another sum than its booking asked; refunded whole");
        audit::detail("asked", &format!("{asked} {}", booking.currency.as_str()));
        self.refund_received(&booking, &reference, received).await?;
        let id = booking.id;
        match self.payment_failed(booking, reference).await? {
            Settled::Booking(held) => Ok(Settled::Refunding(held)),
            _ => Ok(Settled::Refunding(self.store.booking(id).await?.ok_or(AppError::NotFound("booking"))?)),
        }
    }

    /// Queues the refund of everything `received` by payment `reference` of `booking`.
    async fn refund_received(&self, booking: &Booking, reference: &str, received: Received) -> AppResult<()> {
        audit::detail("received", &format!("{} {}", received.amount, received.currency.as_str()));
        audit::detail("refund", "queued");
        if self.queue_unrecorded(booking.id, reference, received.amount).await {
            Ok(())
        } else {
            // Not answered 2xx: the provider sends the event again.
            Err(AppError::Overloaded)
        }
    }

    /// Holds the booking again for another attempt (or ends it as `payment_failed` at the
    /// last), if it still waits for this payment.
    pub(crate) async fn payment_failed(&self, booking: Booking, reference: String) -> AppResult<Settled> {
        if !records(&booking, &reference, PAYMENT_PENDING) {
            return Ok(Settled::Ignored);
        }
        let decide = Box::new(move |b: &Booking, now| {
            if b.status != BookingStatus::PendingPayment || !records(b, &reference, PAYMENT_PENDING) {
                return Err(AppError::Conflict("the booking does not wait for this payment".into()));
            }
            let mut next = b.clone();
            next.status = b.next_status(Transition::PaymentDeclined, now).map_err(transition_error)?;
            next.payment_attempts += 1;
            next.payment = None;
            Ok(next)
        });
        match self.store.update_booking(booking.id, self.clock.now(), decide).await {
            Ok(held) => Ok(Settled::Booking(held)),
            // Reported again, or after the hold lapsed: nothing was taken, nothing to undo.
            Err(UpdateRefused::Rejected(_)) => Ok(Settled::Ignored),
            Err(e) => Err(update_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("ts")
    }

    #[test]
    fn a_signature_made_with_the_secret_over_the_body_verifies() {
        let (secret, body) = (b"whsec_1".as_slice(), br#"{"id":"evt_1"}"#.as_slice());
        let header = sign(secret, body, at(1_000));
        assert_eq!(verify_signature(secret, &header, body, at(1_000)), Ok(()));
        assert_eq!(verify_signature(secret, &header, body, at(1_300)), Ok(()), "within the tolerance");
        assert_eq!(verify_signature(secret, &header, body, at(1_301)), Err(SignatureError::Stale));
        assert_eq!(verify_signature(secret, &header, body, at(699)), Err(SignatureError::Stale), "ahead, too");
        assert_eq!(verify_signature(b"whsec_2", &header, body, at(1_000)), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(secret, &header, b"{}", at(1_000)), Err(SignatureError::Mismatch));
        let moved = header.replace("t=1000", "t=1001");
        assert_eq!(verify_signature(secret, &moved, body, at(1_000)), Err(SignatureError::Mismatch), "time signed");
    }

    #[test]
    fn a_header_may_carry_several_signatures_and_other_schemes() {
        let (secret, body) = (b"whsec_1".as_slice(), b"{}".as_slice());
        let good = sign(secret, body, at(50));
        let tag = good.split_once(",v1=").expect("v1").1;
        let rolled = format!("t=50,v1={},v0=abc,v1={tag}", "00".repeat(32));
        assert_eq!(verify_signature(secret, &rolled, body, at(50)), Ok(()));
        for malformed in ["", "t=50", "v1=00", "t=x,v1=00", "t=50,v1=zz", "t=50,v1"] {
            assert_eq!(
                verify_signature(secret, malformed, body, at(50)),
                Err(SignatureError::Malformed),
                "{malformed}"
            );
        }
    }
}
