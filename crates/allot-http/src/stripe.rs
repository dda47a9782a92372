//! The Stripe payment provider: Stripe's PaymentIntents and Refunds API behind the same
//! `PaymentProvider` port as the built-in test provider (`allot serve --stripe-secret-key`).
//!
//! A charge is one `POST /v1/payment_intents` that creates and confirms the payment with the
//! card token (`confirm=true`, cards only, so no redirect is ever asked for), carrying the
//! booking's id in `metadata[booking_id]`, which Stripe's events send back (`routes::payments`).
//! A refund is one `POST /v1/refunds` on the payment. Every call sends its operation's
//! idempotency key as Stripe's `Idempotency-Key`: a retried call, by this node or another, is
//! answered with the first one's result and never charges or refunds twice.
//!
//! Stripe's answers map onto the port: a payment `succeeded` or `processing` (reported later by
//! its event: pending), a card error (402) declined with Stripe's decline code, a token Stripe
//! does not know `InvalidToken`, and everything else (no answer in time, 429, 5xx, a key
//! refused, a request Stripe calls invalid) `Unavailable`, which the circuit breaker counts.

use std::time::Duration;

use allot_app::payments::{ChargeOutcome, ChargeRequest, PaymentProvider, ProviderError, RefundRequest};
use async_trait::async_trait;
use serde::Deserialize;

/// Where Stripe's API is.
pub const STRIPE_API_BASE: &str = "https://api.stripe.com";
/// How long a connection to Stripe may take.
const STRIPE_CONNECT_TIMEOUT_SECONDS: u64 = 5;
/// How long one call may take: below the breaker's bound on a provider call
/// (`allot_app::breaker::PROVIDER_CALL_TIMEOUT_SECONDS`), so it fails as Stripe's, not as the
/// breaker's.
const STRIPE_REQUEST_TIMEOUT_SECONDS: u64 = 15;
/// Largest answer read from Stripe (a PaymentIntent is a few KB).
const STRIPE_ANSWER_BYTES_MAX: usize = 1024 * 1024;

/// Stripe's payment provider, as every node calls it.
pub struct StripeProvider {
    client: reqwest::Client,
    base: String,
    secret_key: String,
}

impl std::fmt::Debug for StripeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeProvider").field("base", &self.base).finish_non_exhaustive()
    }
}

/// What a configuration gets wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeConfigError {
    #[error("a Stripe secret key starts with `sk_` or `rk_` (a restricted key)")]
    NotASecretKey,
    #[error("the Stripe API base must be an http(s) URL without a path, e.g. {STRIPE_API_BASE}")]
    Base,
    #[error("the HTTP client could not be built: {0}")]
    Client(String),
}

impl StripeProvider {
    /// The provider calling Stripe at `base` ([`STRIPE_API_BASE`], or a stand-in for tests)
    /// with `secret_key`.
    pub fn new(base: &str, secret_key: &str) -> Result<StripeProvider, StripeConfigError> {
        if !(secret_key.starts_with("sk_") || secret_key.starts_with("rk_")) || secret_key.len() < 8 {
            return Err(StripeConfigError::NotASecretKey);
        }
        let base = base.trim_end_matches('/');
        let after_scheme = base.strip_prefix("https://").or_else(|| base.strip_prefix("http://"));
        if after_scheme.is_none_or(|host| host.is_empty() || host.contains('/')) {
            return Err(StripeConfigError::Base);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(STRIPE_CONNECT_TIMEOUT_SECONDS))
            .timeout(Duration::from_secs(STRIPE_REQUEST_TIMEOUT_SECONDS))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StripeConfigError::Client(e.to_string()))?;
        Ok(StripeProvider { client, base: base.to_owned(), secret_key: secret_key.to_owned() })
    }

    /// POSTs `form` to `path` under idempotency key `key`: the answer's status and body.
    async fn post(&self, path: &str, key: &str, form: &[(&str, String)]) -> Result<(u16, Vec<u8>), ProviderError> {
        let unavailable = |e: reqwest::Error| ProviderError::Unavailable(format!("stripe: {}", e.without_url()));
        let answer = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.secret_key)
            .header("Idempotency-Key", key)
            .form(form)
            .send()
            .await
            .map_err(unavailable)?;
        let status = answer.status().as_u16();
        if answer.content_length().is_some_and(|n| n > STRIPE_ANSWER_BYTES_MAX as u64) {
            return Err(ProviderError::Unavailable(format!("stripe: an answer over {STRIPE_ANSWER_BYTES_MAX} bytes")));
        }
        let body = answer.bytes().await.map_err(unavailable)?;
        if body.len() > STRIPE_ANSWER_BYTES_MAX {
            return Err(ProviderError::Unavailable(format!("stripe: an answer over {STRIPE_ANSWER_BYTES_MAX} bytes")));
        }
        Ok((status, body.to_vec()))
    }
}

/// A PaymentIntent, as far as it is read.
#[derive(Debug, Deserialize)]
struct Intent {
    id: String,
    status: String,
}

#[derive(Debug, Deserialize)]
struct Refund {
    id: String,
}

/// Stripe's error answer: `{"error": {...}}`.
#[derive(Debug, Deserialize)]
struct ErrorAnswer {
    error: StripeError,
}

#[derive(Debug, Default, Deserialize)]
struct StripeError {
    #[serde(rename = "type", default)]
    kind: String,
    code: Option<String>,
    decline_code: Option<String>,
    param: Option<String>,
    message: Option<String>,
}

impl StripeError {
    fn read(body: &[u8]) -> StripeError {
        serde_json::from_slice::<ErrorAnswer>(body).map(|a| a.error).unwrap_or_default()
    }

    /// A card Stripe declined: why, in Stripe's words (`insufficient_funds`, `card_declined`…).
    fn decline_reason(&self) -> Option<String> {
        (self.kind == "card_error")
            .then(|| self.decline_code.clone().or_else(|| self.code.clone()).unwrap_or_else(|| "card_declined".into()))
    }

    /// A token or payment method Stripe does not know: the client's mistake.
    fn unknown_token(&self) -> bool {
        self.code.as_deref() == Some("resource_missing")
            && self.param.as_deref().is_some_and(|p| p.starts_with("payment_method"))
    }
}

/// Anything but a decision: the provider is unavailable to this server (and counted by the
/// breaker). A key or request Stripe refuses is this server's fault, logged as an error.
fn unavailable(operation: &str, status: u16, error: &StripeError) -> ProviderError {
    let message = error.message.as_deref().unwrap_or("");
    if matches!(status, 400 | 401 | 403 | 404) {
        tracing::error!(operation, status, kind = error.kind, code = ?error.code, message, "stripe refused the request");
    }
    ProviderError::Unavailable(format!("stripe answered {status} to a {operation}: {message}"))
}

/// What a PaymentIntent's status means for its booking.
fn charge_outcome(intent: Intent) -> Result<ChargeOutcome, ProviderError> {
    match intent.status.as_str() {
        "succeeded" => Ok(ChargeOutcome::Succeeded { reference: intent.id }),
        "processing" => Ok(ChargeOutcome::Pending { reference: intent.id }),
        // The card wants its holder to authenticate (3-D Secure): not possible without a
        // browser, so the customer is asked for another card.
        "requires_action" => Ok(ChargeOutcome::Declined { reason: "authentication_required".into() }),
        "requires_payment_method" => Ok(ChargeOutcome::Declined { reason: "card_declined".into() }),
        other => Err(ProviderError::Unavailable(format!("stripe: a payment confirmed as `{other}`"))),
    }
}

#[async_trait]
impl PaymentProvider for StripeProvider {
    fn name(&self) -> &'static str {
        "stripe"
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
        let form = [
            ("amount", request.amount.to_string()),
            ("currency", request.currency.as_str().to_ascii_lowercase()),
            ("confirm", "true".into()),
            ("payment_method_types[]", "card".into()),
            ("payment_method_data[type]", "card".into()),
            ("payment_method_data[card][token]", request.token.clone()),
            ("metadata[booking_id]", request.booking_id.to_string()),
        ];
        let (status, body) = self.post("/v1/payment_intents", &request.idempotency_key, &form).await?;
        if status == 200 {
            let intent = serde_json::from_slice::<Intent>(&body)
                .map_err(|e| ProviderError::Unavailable(format!("stripe: a PaymentIntent unread: {e}")))?;
            return charge_outcome(intent);
        }
        let error = StripeError::read(&body);
        if let Some(reason) = error.decline_reason() {
            return Ok(ChargeOutcome::Declined { reason });
        }
        if error.unknown_token() {
            return Err(ProviderError::InvalidToken);
        }
        Err(unavailable("charge", status, &error))
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        let form = [("payment_intent", request.payment_reference.clone()), ("amount", request.amount.to_string())];
        let (status, body) = self.post("/v1/refunds", &request.idempotency_key, &form).await?;
        if status == 200 {
            let refund = serde_json::from_slice::<Refund>(&body)
                .map_err(|e| ProviderError::Unavailable(format!("stripe: a Refund unread: {e}")))?;
            return Ok(refund.id);
        }
        let error = StripeError::read(&body);
        // Given back already, by hand in Stripe's dashboard: nothing is owed any more.
        if error.code.as_deref() == Some("charge_already_refunded") {
            tracing::warn!(payment = request.payment_reference, "stripe says this payment was refunded already");
            return Ok(format!("already_refunded_{}", request.payment_reference));
        }
        Err(unavailable("refund", status, &error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_names_a_secret_key_and_an_api_root() {
        assert!(StripeProvider::new(STRIPE_API_BASE, "sk_test_123456").is_ok());
        assert!(StripeProvider::new("http://127.0.0.1:9/", "rk_live_123456").is_ok());
        assert_eq!(
            StripeProvider::new(STRIPE_API_BASE, "pk_test_123456").err(),
            Some(StripeConfigError::NotASecretKey)
        );
        assert_eq!(StripeProvider::new(STRIPE_API_BASE, "sk_").err(), Some(StripeConfigError::NotASecretKey));
        for base in ["api.stripe.com", "https://", "https://api.stripe.com/v1", "ftp://x"] {
            assert_eq!(StripeProvider::new(base, "sk_test_123456").err(), Some(StripeConfigError::Base), "{base}");
        }
    }

    #[test]
    fn stripe_errors_read_as_declines_unknown_tokens_or_neither() {
        let decline = br#"{"error":{"type":"card_error","code":"card_declined","decline_code":"insufficient_funds"}}"#;
        assert_eq!(StripeError::read(decline).decline_reason().as_deref(), Some("insufficient_funds"));
        let missing = br#"{"error":{"type":"invalid_request_error","code":"resource_missing","param":"payment_method_data[card][token]"}}"#;
        assert!(StripeError::read(missing).unknown_token());
        let other = br#"{"error":{"type":"invalid_request_error","code":"parameter_unknown","param":"amount"}}"#;
        let other = StripeError::read(other);
        assert!(other.decline_reason().is_none() && !other.unknown_token());
        let unread = StripeError::read(b"<html>");
        assert!(unread.decline_reason().is_none() && !unread.unknown_token());
    }
}
