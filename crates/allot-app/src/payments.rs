//! Payment providers behind one interface. The built-in `test` provider understands
//! Stripe-style test tokens so the whole lifecycle can be exercised offline.

use allot_core::ids::BookingId;
use allot_core::inventory::Currency;
use async_trait::async_trait;

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
    pub payment_reference: String,
    pub amount: i64,
    /// Stable per payment ([`RefundRequest::of`]), so the refund made when a booking is
    /// cancelled, its retries and the reconciler's ([`crate::refunds`]) are one refund.
    pub idempotency_key: String,
}

impl RefundRequest {
    /// The refund of `amount` on payment `payment_reference`. A payment is refunded at most
    /// once (a cancellation's refund, or whole when its booking does not record it).
    pub fn of(payment_reference: &str, amount: i64) -> RefundRequest {
        RefundRequest {
            payment_reference: payment_reference.to_owned(),
            amount,
            idempotency_key: format!("refund_{payment_reference}"),
        }
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
    #[error("the provider is unavailable: {0}")]
    Unavailable(String),
    /// Not asked: the provider failed too often in a row just now (`breaker`).
    #[error("the provider is not asked: it kept failing (circuit open)")]
    CircuitOpen,
}

#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError>;
    /// Returns the refund's reference; the same for a request with the same idempotency key.
    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError>;
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
        Ok(format!("re_{}", request.payment_reference))
    }
}
