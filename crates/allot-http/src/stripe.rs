//! The Stripe payment provider: Stripe's PaymentIntents and Refunds API behind the same
//! `PaymentProvider` port as the built-in test provider (`allot serve --stripe-secret-key`).
//!
//! A charge is one `POST /v1/payment_intents` that creates and confirms the payment with the
//! card token (`confirm=true`, cards only and `error_on_requires_action`, so no redirect or
//! 3-D Secure page is ever asked for), carrying the booking's id in `metadata[booking_id]`,
//! which Stripe's events send back (`routes::payments`). A refund is one `POST /v1/refunds` on
//! the payment.
//!
//! Idempotency: every call sends a key derived from its operation's (`Idempotency-Key`), so a
//! retried call, by this node or another, is answered with the first one's result. A charge's
//! key also names a digest of the card token: a customer who retries with another card after a
//! refused token gets a new payment, not Stripe's refusal of changed parameters. Stripe keeps
//! the first answer to a key for a day, a 500 included, so a key whose saved answer is a 5xx
//! (`Idempotent-Replayed`) is followed by the next key of the operation's chain ([`chain_key`],
//! at most [`STRIPE_KEY_CHAIN_MAX`]), walked in the same order by every retry, so a retry
//! always finds the answer a previous one got. The 5xx left its outcome unknown: a charge made
//! under it anyway is reported by Stripe's event and refunded as a charge its booking does not
//! record (`allot_app::refunds`); a refund is looked for among the payment's refunds (by its
//! `metadata[allot_key]`) before another is asked for.
//!
//! Stripe's answers map onto the port: a payment `succeeded` or `processing` (reported later by
//! its event: pending), a card error (402) declined with Stripe's decline code, a token Stripe
//! does not know `InvalidToken`, a request Stripe will not carry out as asked (an amount under
//! its minimum, a currency it does not take, a refund larger than what is left) `Rejected`, and
//! everything else (no answer in time, 409, 429, 5xx, a key refused) `Unavailable`, which the
//! circuit breaker counts.

use std::time::Duration;

use allot_app::payments::{ChargeOutcome, ChargeRequest, PaymentProvider, ProviderError, RefundRequest};
use async_trait::async_trait;
use serde::Deserialize;
use sha2::{Digest, Sha256};

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
/// Keys one operation may use, each after the previous one's saved answer was a 5xx.
pub const STRIPE_KEY_CHAIN_MAX: u32 = 8;
/// Refunds of one payment read when looking for one made under an unknown outcome.
const STRIPE_REFUNDS_LISTED_MAX: u32 = 100;

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
    #[error(
        "the Stripe API base must be an https URL without a path, e.g. {STRIPE_API_BASE} (http only to a loopback address)"
    )]
    Base,
    #[error("the HTTP client could not be built: {0}")]
    Client(String),
}

/// The `n`th key (from 0) of the chain of the operation keyed `key`.
pub fn chain_key(key: &str, n: u32) -> String {
    if n == 0 { key.to_owned() } else { format!("{key}~{n}") }
}

/// The operation key of a charge: the booking's attempt, and a digest of its card token.
fn charge_key(request: &ChargeRequest) -> String {
    let digest = Sha256::digest(request.token.as_bytes());
    format!("{}_{}", request.idempotency_key, hex::encode(&digest[..6]))
}

/// Whether `base` is an API root this provider may send its secret key to: https, or http to
/// a loopback host (a stand-in for tests); no path.
fn is_api_root(base: &str) -> bool {
    let (host, plain) = match (base.strip_prefix("https://"), base.strip_prefix("http://")) {
        (Some(host), _) => (host, false),
        (None, Some(host)) => (host, true),
        (None, None) => return false,
    };
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    let loopback = name == "localhost" || name.starts_with("127.") || name == "[::1]";
    !host.is_empty() && !host.contains('/') && (!plain || loopback)
}

/// One answer from Stripe.
struct Answer {
    status: u16,
    /// Stripe's `Idempotent-Replayed: true`: the answer saved for the key, not a new one.
    replayed: bool,
    body: Vec<u8>,
}

impl Answer {
    /// A 5xx saved for the key: its operation's outcome is unknown, and the key will answer it
    /// for a day.
    fn stale_failure(&self) -> bool {
        self.replayed && self.status >= 500
    }
}

impl StripeProvider {
    /// The provider calling Stripe at `base` ([`STRIPE_API_BASE`], or a stand-in for tests)
    /// with `secret_key`.
    pub fn new(base: &str, secret_key: &str) -> Result<StripeProvider, StripeConfigError> {
        if !(secret_key.starts_with("sk_") || secret_key.starts_with("rk_")) || secret_key.len() < 8 {
            return Err(StripeConfigError::NotASecretKey);
        }
        let base = base.trim_end_matches('/');
        if !is_api_root(base) {
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

    /// POSTs `form` to `path` under idempotency key `key`.
    async fn post(&self, path: &str, key: &str, form: &[(&str, String)]) -> Result<Answer, ProviderError> {
        let request = self.client.post(format!("{}{path}", self.base)).header("Idempotency-Key", key).form(form);
        self.send(request).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, ProviderError> {
        let unavailable = |e: reqwest::Error| ProviderError::Unavailable(format!("stripe: {}", e.without_url()));
        let answer = request.bearer_auth(&self.secret_key).send().await.map_err(unavailable)?;
        let status = answer.status().as_u16();
        let replayed = answer.headers().get("idempotent-replayed").is_some_and(|v| v.as_bytes() == b"true");
        let too_large =
            || ProviderError::Unavailable(format!("stripe: an answer over {STRIPE_ANSWER_BYTES_MAX} bytes"));
        if answer.content_length().is_some_and(|n| n > STRIPE_ANSWER_BYTES_MAX as u64) {
            return Err(too_large());
        }
        let body = answer.bytes().await.map_err(unavailable)?;
        if body.len() > STRIPE_ANSWER_BYTES_MAX {
            return Err(too_large());
        }
        Ok(Answer { status, replayed, body: body.to_vec() })
    }

    /// POSTs `form` under each key of `key`'s chain until one answers anything but a saved 5xx
    /// (`before_next` may settle the operation first, from what Stripe has).
    async fn post_chained<F, Fut>(
        &self,
        path: &str,
        key: &str,
        form: &[(&str, String)],
        before_next: F,
    ) -> Result<Chained, ProviderError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<String>, ProviderError>>,
    {
        for n in 0..STRIPE_KEY_CHAIN_MAX {
            if n > 0
                && let Some(settled) = before_next().await?
            {
                return Ok(Chained::Settled(settled));
            }
            let answer = self.post(path, &chain_key(key, n), form).await?;
            if !answer.stale_failure() {
                return Ok(Chained::Answer(answer));
            }
            tracing::warn!(path, key, n, "stripe replays a 5xx for this key: trying the next key of its chain");
        }
        Err(ProviderError::Unavailable(format!("stripe: all {STRIPE_KEY_CHAIN_MAX} keys of this operation failed")))
    }

    /// The refund of `payment` made under operation key `key` earlier, if Stripe has one.
    async fn refund_made(&self, payment: &str, key: &str) -> Result<Option<String>, ProviderError> {
        let query = [("payment_intent", payment.to_owned()), ("limit", STRIPE_REFUNDS_LISTED_MAX.to_string())];
        let url = reqwest::Url::parse_with_params(&format!("{}/v1/refunds", self.base), &query)
            .map_err(|e| ProviderError::Unavailable(format!("stripe: a refund lookup's address: {e}")))?;
        let answer = self.send(self.client.get(url)).await?;
        if answer.status != 200 {
            return Err(unavailable("refund lookup", answer.status, &StripeError::read(&answer.body)));
        }
        let list = serde_json::from_slice::<RefundList>(&answer.body)
            .map_err(|e| ProviderError::Unavailable(format!("stripe: a refund list unread: {e}")))?;
        let made = list.data.into_iter().find(|r| r.metadata.allot_key.as_deref() == Some(key));
        Ok(made.map(|r| r.id))
    }
}

/// What a chain of keys came to.
enum Chained {
    Answer(Answer),
    /// Found made already (a refund under an unknown outcome): its reference.
    Settled(String),
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
    #[serde(default)]
    metadata: RefundMetadata,
}

#[derive(Debug, Default, Deserialize)]
struct RefundMetadata {
    allot_key: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RefundList {
    data: Vec<Refund>,
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

    /// A request Stripe read and will not carry out as asked (400 `invalid_request_error`),
    /// other than a key reused with other parameters, which is this server's fault.
    fn rejected(&self, status: u16) -> Option<String> {
        let reason = || self.code.clone().or_else(|| self.message.clone()).unwrap_or_else(|| "invalid_request".into());
        (status == 400 && self.kind == "invalid_request_error").then(reason)
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
        // The card wants its holder to authenticate (3-D Secure; `error_on_requires_action`
        // makes Stripe answer that as a card error): not possible without a browser.
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
            ("error_on_requires_action", "true".into()),
            ("payment_method_types[]", "card".into()),
            ("payment_method_data[type]", "card".into()),
            ("payment_method_data[card][token]", request.token.clone()),
            ("metadata[booking_id]", request.booking_id.to_string()),
        ];
        let no_lookup = || async { Ok(None) };
        let chained = self.post_chained("/v1/payment_intents", &charge_key(request), &form, no_lookup).await?;
        let Chained::Answer(answer) = chained else {
            return Err(ProviderError::Unavailable("stripe: a charge settled without an answer".into()));
        };
        if answer.status == 200 {
            let intent = serde_json::from_slice::<Intent>(&answer.body)
                .map_err(|e| ProviderError::Unavailable(format!("stripe: a PaymentIntent unread: {e}")))?;
            return charge_outcome(intent);
        }
        let error = StripeError::read(&answer.body);
        if let Some(reason) = error.decline_reason() {
            return Ok(ChargeOutcome::Declined { reason });
        }
        if error.unknown_token() {
            return Err(ProviderError::InvalidToken);
        }
        if let Some(reason) = error.rejected(answer.status) {
            return Err(ProviderError::Rejected(reason));
        }
        Err(unavailable("charge", answer.status, &error))
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        let key = &request.idempotency_key;
        let payment = &request.payment_reference;
        let form = [
            ("payment_intent", payment.clone()),
            ("amount", request.amount.to_string()),
            ("metadata[allot_key]", key.clone()),
        ];
        let lookup = || self.refund_made(payment, key);
        let answer = match self.post_chained("/v1/refunds", key, &form, lookup).await? {
            Chained::Settled(reference) => return Ok(reference),
            Chained::Answer(answer) => answer,
        };
        if answer.status == 200 {
            let refund = serde_json::from_slice::<Refund>(&answer.body)
                .map_err(|e| ProviderError::Unavailable(format!("stripe: a Refund unread: {e}")))?;
            return Ok(refund.id);
        }
        let error = StripeError::read(&answer.body);
        // Given back already, by hand in Stripe's dashboard: nothing is owed any more.
        if error.code.as_deref() == Some("charge_already_refunded") {
            tracing::warn!(payment = request.payment_reference, "stripe says this payment was refunded already");
            return Ok(format!("already_refunded_{}", request.payment_reference));
        }
        if let Some(reason) = error.rejected(answer.status) {
            return Err(ProviderError::Rejected(reason));
        }
        Err(unavailable("refund", answer.status, &error))
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
        assert!(StripeProvider::new("http://localhost:12111", "sk_test_123456").is_ok());
        for base in ["api.stripe.com", "https://", "https://api.stripe.com/v1", "ftp://x", "http://api.stripe.com"] {
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
        assert_eq!(other.rejected(400).as_deref(), Some("parameter_unknown"), "the request, not an outage");
        assert_eq!(other.rejected(404), None);
        let unread = StripeError::read(b"<html>");
        assert!(unread.decline_reason().is_none() && !unread.unknown_token() && unread.rejected(400).is_none());
    }

    #[test]
    fn a_chain_of_keys_starts_with_the_operation_s_and_a_charge_s_names_its_token() {
        assert_eq!((chain_key("k", 0), chain_key("k", 2)), ("k".to_owned(), "k~2".to_owned()));
        let request = |token: &str| ChargeRequest {
            booking_id: allot_core::ids::BookingId::new(),
            amount: 100,
            currency: allot_core::inventory::Currency::try_from("EUR".to_owned()).expect("currency"),
            token: token.into(),
            idempotency_key: "b_0".into(),
        };
        assert_eq!(charge_key(&request("tok_visa")), charge_key(&request("tok_visa")), "a retry: the same key");
        assert_ne!(charge_key(&request("tok_visa")), charge_key(&request("tok_mastercard")), "another card");
        assert!(charge_key(&request("tok_visa")).starts_with("b_0_"));
    }
}
