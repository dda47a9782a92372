//! Payment providers behind one interface. The built-in `test` provider understands
//! Stripe-style test tokens so the whole lifecycle can be exercised offline; as
//! [`ReportingTestProvider`] (what `allot serve` runs) it also reports its `tok_async` payments
//! by itself a moment later, as Stripe's test mode sends its events.

use allot_core::ids::BookingId;
use allot_core::inventory::Currency;
use async_trait::async_trait;
use tokio::sync::mpsc;

/// A payment's status as its booking records it: charged, or waiting for the provider's event
/// (`webhooks`).
pub const PAYMENT_SUCCEEDED: &str = "succeeded";
pub const PAYMENT_PENDING: &str = "pending";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    pub booking_id: BookingId,
    pub amount: i64,
    pub currency: Currency,
    pub token: String,
    /// Stable per booking and attempt, so a retried call never charges twice.
    pub idempotency_key: String,
}

/// Money given back on a payment, in part or whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    /// The booking the payment was for (the provider sends it back with the refund's events).
    pub booking_id: BookingId,
    pub payment_reference: String,
    pub amount: i64,
    /// Stable per payment ([`RefundRequest::of`]), so the refund made when a booking is
    /// cancelled, its retries and the reconciler's ([`crate::refunds`]) are one refund.
    pub idempotency_key: String,
}

impl RefundRequest {
    /// The refund of `amount` on payment `payment_reference` of booking `booking_id`. A payment
    /// is refunded at most once (a cancellation's refund, or whole when its booking does not
    /// record it), but for a refund the provider reported failed ([`RefundRequest::replacing`]).
    pub fn of(booking_id: BookingId, payment_reference: &str, amount: i64) -> RefundRequest {
        RefundRequest {
            booking_id,
            payment_reference: payment_reference.to_owned(),
            amount,
            idempotency_key: format!("refund_{payment_reference}"),
        }
    }

    /// This refund made again in place of the provider's refund `failed`, which it reported
    /// failed after it was made: under a key of its own, since the first refund's key would be
    /// answered with that refund.
    pub fn replacing(self, failed: &str) -> RefundRequest {
        let idempotency_key = format!("refund_{}_after_{failed}", self.payment_reference);
        RefundRequest { idempotency_key, ..self }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Succeeded {
        reference: String,
    },
    Declined {
        reason: String,
    },
    /// The provider will report the result later, by an event (`webhooks`).
    Pending {
        reference: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("the provider did not accept the token")]
    InvalidToken,
    /// The provider answered, and will not make this payment or refund as asked (an amount
    /// below its minimum, a currency it does not take, a token used already, a refund larger
    /// than what is left): not an outage, so the breaker does not count it.
    #[error("the provider refused: {0}")]
    Rejected(String),
    #[error("the provider is unavailable: {0}")]
    Unavailable(String),
    /// The provider answered that it could not process this payment just now, and asks for it
    /// to be tried again (Stripe's card `processing_error`): retried, then 503, as when it is
    /// unavailable, but no sign of an outage, so the breaker does not count it (one customer's
    /// card cannot open the circuit for everyone).
    #[error("the provider could not process it: {0}")]
    Retryable(String),
    /// Not asked: the provider failed too often in a row just now (`breaker`).
    #[error("the provider is not asked: it kept failing (circuit open)")]
    CircuitOpen,
}

/// A payment as the provider has it when asked (`crate::pending`): what a payment's events
/// would report, for a payment whose event is late, lost, or came before its confirm recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Paid: what it took.
    Succeeded(crate::webhooks::Received),
    /// It will not be paid (the card failed after all, or the payment was cancelled).
    Failed,
    /// Still being paid, or the provider cannot say.
    Pending,
}

#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError>;
    /// Returns the refund's reference; the same for a request with the same idempotency key.
    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError>;
    /// Payment `reference` as the provider has it now. A provider that cannot say (the test
    /// provider keeps nothing) answers pending: its events settle the payment.
    async fn payment_status(&self, _reference: &str) -> Result<PaymentStatus, ProviderError> {
        Ok(PaymentStatus::Pending)
    }
}

/// The default provider: `tok_visa` succeeds, `tok_chargeDeclined` is declined,
/// `tok_processing_error` fails at the provider, `tok_async` is pending until the provider's
/// event reports it (signed with the app's webhook secret, sent to `/payments/webhooks/test`).
#[derive(Debug, Default, Clone, Copy)]
pub struct TestProvider;

#[async_trait]
impl PaymentProvider for TestProvider {
    fn name(&self) -> &'static str {
        "test"
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
        let reference = format!("pi_test_{}", request.idempotency_key);
        match request.token.as_str() {
            "tok_visa" => Ok(ChargeOutcome::Succeeded { reference }),
            "tok_chargeDeclined" => Ok(ChargeOutcome::Declined { reason: "card_declined".into() }),
            "tok_processing_error" => Err(ProviderError::Unavailable("processing_error".into())),
            "tok_async" => Ok(ChargeOutcome::Pending { reference }),
            _ => Err(ProviderError::InvalidToken),
        }
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        // One reference per refund (per key), as a provider's: `re_<payment>` for the first.
        let key = &request.idempotency_key;
        Ok(format!("re_{}", key.strip_prefix("refund_").unwrap_or(key)))
    }
}

/// How long after its charge the test provider reports a `tok_async` payment paid.
pub const TEST_REPORT_DELAY_MILLISECONDS: u64 = 2_000;
/// Reports of the test provider waiting to be sent at most; past it a `tok_async` payment is
/// not reported (it waits for an event sent by hand, or its hold lapses).
pub const TEST_REPORTS_QUEUED_MAX: usize = 1_024;

/// A `tok_async` payment the test provider will report paid: the money its charge asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestReport {
    pub booking_id: BookingId,
    pub reference: String,
    pub amount: i64,
    pub currency: Currency,
    /// When to send it ([`TEST_REPORT_DELAY_MILLISECONDS`] after the charge).
    pub due: std::time::Instant,
}

/// The [`TestProvider`], reporting its `tok_async` payments as paid on a queue, from which
/// the HTTP layer sends each one as the provider's signed event to this server's endpoint.
#[derive(Debug, Clone)]
pub struct ReportingTestProvider {
    reports: mpsc::Sender<TestReport>,
}

impl ReportingTestProvider {
    /// The provider, and the queue of its reports (at most [`TEST_REPORTS_QUEUED_MAX`]).
    pub fn new() -> (ReportingTestProvider, mpsc::Receiver<TestReport>) {
        let (reports, queue) = mpsc::channel(TEST_REPORTS_QUEUED_MAX);
        (ReportingTestProvider { reports }, queue)
    }
}

#[async_trait]
impl PaymentProvider for ReportingTestProvider {
    fn name(&self) -> &'static str {
        TestProvider.name()
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
        let outcome = TestProvider.charge(request).await;
        if let Ok(ChargeOutcome::Pending { reference }) = &outcome {
            let delay = std::time::Duration::from_millis(TEST_REPORT_DELAY_MILLISECONDS);
            let report = TestReport {
                booking_id: request.booking_id,
                reference: reference.clone(),
                amount: request.amount,
                currency: request.currency,
                due: std::time::Instant::now() + delay,
            };
            if self.reports.try_send(report).is_err() {
                tracing::warn!(booking_id = %request.booking_id, "the test provider's report queue is full: this payment is not reported");
            }
        }
        outcome
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        TestProvider.refund(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(token: &str) -> ChargeRequest {
        ChargeRequest {
            booking_id: BookingId::new(),
            amount: 1200,
            currency: Currency::try_from("EUR".to_owned()).expect("currency"),
            token: token.into(),
            idempotency_key: "k_1".into(),
        }
    }

    #[tokio::test]
    async fn the_reporting_provider_reports_its_async_payments_only() {
        let (provider, mut reports) = ReportingTestProvider::new();
        for token in ["tok_visa", "tok_chargeDeclined", "tok_processing_error", "nope"] {
            let _ = provider.charge(&charge(token)).await;
        }
        assert!(reports.try_recv().is_err(), "nothing to report");
        let request = charge("tok_async");
        let Ok(ChargeOutcome::Pending { reference }) = provider.charge(&request).await else { panic!("pending") };
        let report = reports.try_recv().expect("reported");
        assert_eq!((report.booking_id, report.reference, report.amount), (request.booking_id, reference, 1200));
        assert!(report.due > std::time::Instant::now(), "a moment later");
    }
}
