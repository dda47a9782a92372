//! The Stripe payment provider: Stripe's PaymentIntents and Refunds API behind the same
//! `PaymentProvider` port as the built-in test provider (`allot serve --stripe-secret-key`).
//!
//! A charge is two calls: `POST /v1/payment_intents` creates the booking attempt's payment
//! (no money moves; the booking's id in `metadata[booking_id]`, which Stripe's events send back
//! to `routes::payments`), then `POST /v1/payment_intents/{id}/confirm` pays it with the card
//! token (cards only and `error_on_requires_action`, so no redirect or 3-D Secure page is ever
//! asked for). A PaymentIntent succeeds at most once, so confirming it again can never charge
//! twice; a confirm whose outcome is unknown is settled by reading the PaymentIntent. A refund
//! is one `POST /v1/refunds` on the payment, marked `metadata[allot_key]`.
//!
//! Idempotency: every call sends a key derived from its operation's (`Idempotency-Key`), so a
//! retried call, by this node or another, is answered with the first one's result; a confirm's
//! key also names a digest of the card token, so a customer who retries with another card is
//! not refused for reusing a key with other parameters. Stripe keeps the first answer to a key
//! for a day, a 500 included, so a key whose saved answer is a 5xx (`Idempotent-Replayed`) is
//! followed by the next key of the operation's chain ([`chain_key`], at most
//! [`STRIPE_KEY_CHAIN_MAX`]), walked in the same order by every retry. Before that: a confirm
//! reads the PaymentIntent (paid already: that is the answer; so does a replayed refusal, which
//! may be older than a payment another card made since; a payment method the failed confirm
//! made of the card token and left attached is what the next key pays with, a token being
//! usable once), and a refund looks through the
//! payment's refunds for its own, before its first call and after each replayed 5xx (a replay
//! proves the earlier call has finished), so a refund made under an unknown outcome is found
//! instead of made again.
//!
//! A call Stripe answers 409 `idempotency_key_in_use` (another request with its key still
//! running: a double click) is sent again a little later, and gets that request's answer.
//!
//! Stripe's answers map onto the port: a payment `succeeded` or `processing` (reported later by
//! its event: pending), a card error (402) declined with Stripe's decline code, a token Stripe
//! does not know `InvalidToken`, a request Stripe will not carry out as asked (an amount under
//! its minimum, a currency it does not take, a refund larger than what is left) `Rejected`, and
//! a card's `processing_error` `Retryable` (no decline: tried again, along the chain, but not
//! counted by the circuit breaker, being one card's), and everything else (no answer in time,
//! 409, 429, 5xx, a key refused) `Unavailable`, which the circuit breaker counts.

use std::time::Duration;

use allot_app::payments::{ChargeOutcome, ChargeRequest, PaymentProvider, PaymentStatus, ProviderError, RefundRequest};
use allot_app::webhooks::Received;
use allot_core::inventory::Currency;
use async_trait::async_trait;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Where Stripe's API is.
pub const STRIPE_API_BASE: &str = "https://api.stripe.com";
/// How long a connection to Stripe may take.
const STRIPE_CONNECT_TIMEOUT_SECONDS: u64 = 5;
/// How long one request may take: a charge's two (create, confirm) fit within the breaker's
/// bound on a provider call (`allot_app::breaker::PROVIDER_CALL_TIMEOUT_SECONDS`, 20 s), so
/// they fail as Stripe's, not as the breaker's.
const STRIPE_REQUEST_TIMEOUT_SECONDS: u64 = 9;
/// Largest answer read from Stripe (a PaymentIntent is a few KB).
const STRIPE_ANSWER_BYTES_MAX: usize = 1024 * 1024;
/// Keys one operation may use, each after the previous one's saved answer was a 5xx. A retry
/// walks the keys its predecessors used (replays are quick) and uses at most one new one, so
/// this is about how many failed calls an operation survives within Stripe's day.
pub const STRIPE_KEY_CHAIN_MAX: u32 = 64;
/// Sends of one call while Stripe answers that another request with its key is still running
/// (409 `idempotency_key_in_use`: a double click reaching Stripe twice at once), waiting
/// [`STRIPE_KEY_IN_USE_WAIT_MS`] and doubling in between; the last answer is then read as
/// any other 409.
const STRIPE_KEY_IN_USE_SENDS_MAX: u32 = 5;
const STRIPE_KEY_IN_USE_WAIT_MS: u64 = 100;
/// The refund field naming its booking, which the version before this one did not send.
const REFUND_BOOKING_FIELD: &str = "metadata[booking_id]";
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

/// The operation key of a charge's confirm: the booking's attempt, and a digest of its token.
fn confirm_key(request: &ChargeRequest) -> String {
    let digest = Sha256::digest(request.token.as_bytes());
    format!("{}_{}", request.idempotency_key, hex::encode(&digest[..6]))
}

/// Whether `base` is an API root this provider may send its secret key to: https, or http to
/// a loopback address (a stand-in for tests); no user, path, query or fragment.
fn is_api_root(base: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(base) else { return false };
    let bare = url.username().is_empty()
        && url.password().is_none()
        && url.path() == "/"
        && url.query().is_none()
        && url.fragment().is_none()
        && !base.ends_with('/');
    let loopback = match url.host_str() {
        Some("localhost") => true,
        Some(host) => {
            let ip = host.trim_start_matches('[').trim_end_matches(']');
            ip.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    };
    bare && url.host_str().is_some() && (url.scheme() == "https" || (url.scheme() == "http" && loopback))
}

/// One answer from Stripe.
struct Answer {
    status: u16,
    /// Stripe's `Idempotent-Replayed: true`: the answer saved for the key, not a new one.
    replayed: bool,
    body: Vec<u8>,
}

impl Answer {
    /// A failure saved for the key, which the key will answer for a day: a 5xx (the
    /// operation's outcome unknown), or a card's processing error (try again).
    fn stale_failure(&self) -> bool {
        self.replayed && (self.status >= 500 || StripeError::read(&self.body).processing_error())
    }

    /// Stripe's 400 to a key first used with other parameters (a refund asked for by the older
    /// version of this server, which sent fewer).
    fn key_used_otherwise(&self) -> bool {
        let error = StripeError::read(&self.body);
        self.status == 400
            && error.kind == "idempotency_error"
            && error.code.as_deref() != Some("idempotency_key_in_use")
    }

    /// Stripe's 409 to a key whose first request is still running; nothing is saved for it.
    fn key_in_use(&self) -> bool {
        self.status == 409 && StripeError::read(&self.body).code.as_deref() == Some("idempotency_key_in_use")
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

    /// POSTs `form` to `path` under idempotency key `key`; again, a little later, while another
    /// request with the key is still running (its answer is then replayed).
    async fn post(&self, path: &str, key: &str, form: &[(&str, String)]) -> Result<Answer, ProviderError> {
        let mut sends = 0;
        loop {
            sends += 1;
            let request = self.client.post(format!("{}{path}", self.base)).header("Idempotency-Key", key).form(form);
            let answer = self.send(request).await?;
            if !answer.key_in_use() || sends >= STRIPE_KEY_IN_USE_SENDS_MAX {
                return Ok(answer);
            }
            tracing::info!(path, key, sends, "stripe is still running a request with this key: sending it again soon");
            tokio::time::sleep(Duration::from_millis(STRIPE_KEY_IN_USE_WAIT_MS << (sends - 1))).await;
        }
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

    /// POSTs `form` under each key of `key`'s chain until one answers anything but a saved 5xx.
    async fn post_chained(&self, path: &str, key: &str, form: &[(&str, String)]) -> Result<Answer, ProviderError> {
        for n in 0..STRIPE_KEY_CHAIN_MAX {
            let answer = self.post(path, &chain_key(key, n), form).await?;
            if !answer.stale_failure() {
                return Ok(answer);
            }
            tracing::warn!(path, key, n, "stripe replays a 5xx for this key: trying the next key of its chain");
        }
        Err(ProviderError::Unavailable(format!("stripe: all {STRIPE_KEY_CHAIN_MAX} keys of this operation failed")))
    }

    /// Creates the PaymentIntent of a booking's attempt (no money moves): its id.
    async fn create_intent(&self, request: &ChargeRequest) -> Result<String, ProviderError> {
        let form = [
            ("amount", request.amount.to_string()),
            ("currency", request.currency.as_str().to_ascii_lowercase()),
            ("payment_method_types[]", "card".into()),
            ("metadata[booking_id]", request.booking_id.to_string()),
        ];
        let answer = self.post_chained("/v1/payment_intents", &request.idempotency_key, &form).await?;
        if answer.status == 200 {
            return Ok(read::<Intent>(&answer.body, "PaymentIntent")?.id);
        }
        let error = StripeError::read(&answer.body);
        match error.rejected(answer.status) {
            Some(reason) => Err(ProviderError::Rejected(reason)),
            None => Err(unavailable("payment", answer.status, &error)),
        }
    }

    /// The PaymentIntent `id` as Stripe has it now (one it created: any failure to read it is
    /// Stripe's).
    async fn intent(&self, id: &str) -> Result<Intent, ProviderError> {
        self.lookup_intent(id)
            .await?
            .map_err(|missing| unavailable("payment lookup", missing.status, &StripeError::read(&missing.body)))
    }

    /// The PaymentIntent `id` as Stripe has it now; inside, Stripe's 404 when it has none of
    /// that id.
    async fn lookup_intent(&self, id: &str) -> Result<Result<Intent, Answer>, ProviderError> {
        let answer = self.send(self.client.get(format!("{}/v1/payment_intents/{id}", self.base))).await?;
        match answer.status {
            200 => read::<Intent>(&answer.body, "PaymentIntent").map(Ok),
            404 => Ok(Err(answer)),
            status => Err(unavailable("payment lookup", status, &StripeError::read(&answer.body))),
        }
    }

    /// Pays PaymentIntent `id` with `request`'s token.
    async fn confirm_intent(&self, id: &str, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
        let mut form = vec![
            ("payment_method_data[type]", "card".into()),
            ("payment_method_data[card][token]", request.token.clone()),
            ("error_on_requires_action", "true".into()),
        ];
        let path = format!("/v1/payment_intents/{id}/confirm");
        let key = confirm_key(request);
        for n in 0..STRIPE_KEY_CHAIN_MAX {
            let answer = self.post(&path, &chain_key(&key, n), &form).await?;
            if !answer.stale_failure() {
                return self.confirmed(id, &answer).await;
            }
            // A confirm with an unknown outcome: paid then, or to be confirmed again (a
            // PaymentIntent succeeds at most once).
            let intent = self.intent(id).await?;
            // A card token is used once: the payment method the failed confirm made of it,
            // still on the PaymentIntent, is what the next confirm pays with (every retry
            // reads the PaymentIntent here, and so sends what this one sends).
            if let Some(method) = intent.confirmable_with() {
                form = vec![("payment_method", method.to_owned()), ("error_on_requires_action", "true".into())];
            }
            if let Some(paid) = paid(intent) {
                return Ok(paid);
            }
            tracing::warn!(
                payment = id,
                n,
                "stripe replays a failure for this confirm: trying the next key of its chain"
            );
        }
        Err(ProviderError::Unavailable(format!("stripe: all {STRIPE_KEY_CHAIN_MAX} keys of this confirm failed")))
    }

    /// What a confirm's answer means.
    async fn confirmed(&self, id: &str, answer: &Answer) -> Result<ChargeOutcome, ProviderError> {
        if answer.status == 200 {
            return charge_outcome(read::<Intent>(&answer.body, "PaymentIntent")?);
        }
        // A saved refusal (this card declined, say) may be older than a payment another card
        // made since: the PaymentIntent as it is now decides.
        if answer.replayed
            && let Some(paid) = paid(self.intent(id).await?)
        {
            return Ok(paid);
        }
        let error = StripeError::read(&answer.body);
        // Not the card's holder's doing, and not one of their attempts: tried again (under the
        // next key of the chain, which the saved error sends the retry on to), then 503.
        if error.processing_error() {
            return Err(ProviderError::Retryable("stripe: the card could not be processed (try again)".into()));
        }
        if let Some(reason) = error.decline_reason() {
            return Ok(ChargeOutcome::Declined { reason });
        }
        if error.unknown_token() {
            return Err(ProviderError::InvalidToken);
        }
        // Paid already: by an earlier confirm whose answer was lost (another card, perhaps).
        if error.code.as_deref() == Some("payment_intent_unexpected_state")
            && let Some(paid) = paid(self.intent(id).await?)
        {
            return Ok(paid);
        }
        match error.rejected(answer.status) {
            Some(reason) => Err(ProviderError::Rejected(reason)),
            None => Err(unavailable("charge", answer.status, &error)),
        }
    }

    /// POSTs a refund under each key of `key`'s chain until one answers anything but a saved
    /// 5xx; after each such replay, the refund that call may have made is looked for first (a
    /// replay proves the earlier request has finished): `Err` with it when found.
    async fn refund_chained(
        &self,
        payment: &str,
        key: &str,
        form: &[(&str, String)],
    ) -> Result<Result<Answer, String>, ProviderError> {
        for n in 0..STRIPE_KEY_CHAIN_MAX {
            let mut answer = self.post("/v1/refunds", &chain_key(key, n), form).await?;
            if answer.key_used_otherwise() {
                // First used by the version before refunds named their booking: asked again as
                // it asked, so Stripe answers what it answered then (still refused otherwise:
                // unavailable, retried, left to an operator at the last; never a second refund).
                let older: Vec<_> = form.iter().filter(|(name, _)| *name != REFUND_BOOKING_FIELD).cloned().collect();
                answer = self.post("/v1/refunds", &chain_key(key, n), &older).await?;
            }
            if !answer.stale_failure() {
                return Ok(Ok(answer));
            }
            if let Some(made) = self.refund_made(payment, key).await? {
                return Ok(Err(made));
            }
            tracing::warn!(payment, n, "stripe replays a 5xx for this refund: trying the next key of its chain");
        }
        Err(ProviderError::Unavailable(format!("stripe: all {STRIPE_KEY_CHAIN_MAX} keys of this refund failed")))
    }

    /// The refund of `payment` made under operation key `key` earlier (and not failed since), if
    /// Stripe has one.
    async fn refund_made(&self, payment: &str, key: &str) -> Result<Option<String>, ProviderError> {
        let query = [("payment_intent", payment.to_owned()), ("limit", STRIPE_REFUNDS_LISTED_MAX.to_string())];
        let url = reqwest::Url::parse_with_params(&format!("{}/v1/refunds", self.base), &query)
            .map_err(|e| ProviderError::Unavailable(format!("stripe: a refund lookup's address: {e}")))?;
        let answer = self.send(self.client.get(url)).await?;
        if answer.status != 200 {
            return Err(unavailable("refund lookup", answer.status, &StripeError::read(&answer.body)));
        }
        let list = read::<RefundList>(&answer.body, "refund list")?;
        let standing = |r: &Refund| !matches!(r.status.as_deref(), Some("failed" | "canceled"));
        let made = list.data.into_iter().find(|r| r.metadata.allot_key.as_deref() == Some(key) && standing(r));
        Ok(made.map(|r| r.id))
    }
}

/// Reads Stripe's answer as a `what`.
fn read<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ProviderError> {
    serde_json::from_slice(body).map_err(|e| ProviderError::Unavailable(format!("stripe: a {what} unread: {e}")))
}

/// A PaymentIntent paid (or being paid): the charge's outcome.
fn paid(intent: Intent) -> Option<ChargeOutcome> {
    match intent.status.as_str() {
        "succeeded" => Some(ChargeOutcome::Succeeded { reference: intent.id }),
        "processing" => Some(ChargeOutcome::Pending { reference: intent.id }),
        _ => None,
    }
}

/// A PaymentIntent, as far as it is read.
#[derive(Debug, Deserialize)]
struct Intent {
    id: String,
    status: String,
    /// The payment method attached (its id), if any.
    #[serde(default)]
    payment_method: Option<String>,
    /// What a succeeded one took, in the currency's smallest unit.
    #[serde(default)]
    amount_received: Option<i64>,
    /// ISO 4217, lower-case.
    #[serde(default)]
    currency: Option<String>,
}

impl Intent {
    /// What this PaymentIntent says of its payment, to a booking waiting for it.
    fn payment_status(&self) -> Result<PaymentStatus, ProviderError> {
        match self.status.as_str() {
            "succeeded" => {
                let currency = self.currency.as_deref().map(str::to_ascii_uppercase).map(Currency::try_from);
                match (self.amount_received, currency) {
                    (Some(amount), Some(Ok(currency))) => Ok(PaymentStatus::Succeeded(Received { amount, currency })),
                    _ => Err(ProviderError::Rejected(format!("stripe: payment {} paid, but not how much", self.id))),
                }
            }
            // It failed and waits for another card, or it was cancelled: not paid.
            "requires_payment_method" | "canceled" => Ok(PaymentStatus::Failed),
            _ => Ok(PaymentStatus::Pending),
        }
    }

    /// The payment method a confirm left attached and awaiting confirmation: the card's,
    /// made of a token that cannot be used again.
    fn confirmable_with(&self) -> Option<&str> {
        (self.status == "requires_confirmation").then_some(self.payment_method.as_deref()).flatten()
    }
}

#[derive(Debug, Deserialize)]
struct Refund {
    id: String,
    status: Option<String>,
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

    /// A card error that is no decline: Stripe failed to process the card, and asks for the
    /// payment to be tried again.
    fn processing_error(&self) -> bool {
        self.kind == "card_error" && self.code.as_deref() == Some("processing_error")
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
        let intent = self.create_intent(request).await?;
        self.confirm_intent(&intent, request).await
    }

    async fn payment_status(&self, reference: &str) -> Result<PaymentStatus, ProviderError> {
        let valid = !reference.is_empty() && reference.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(ProviderError::Rejected(format!("not a PaymentIntent id: {reference}")));
        }
        match self.lookup_intent(reference).await? {
            Ok(intent) => intent.payment_status(),
            // Not Stripe's (or not this account's): no sign of an outage.
            Err(_) => Err(ProviderError::Rejected(format!("no such PaymentIntent: {reference}"))),
        }
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        let key = &request.idempotency_key;
        let payment = &request.payment_reference;
        // Made already, perhaps by a call whose outcome was unknown, or under a key Stripe has
        // forgotten since: found, not made again.
        if let Some(made) = self.refund_made(payment, key).await? {
            return Ok(made);
        }
        let form = [
            ("payment_intent", payment.clone()),
            ("amount", request.amount.to_string()),
            ("metadata[allot_key]", key.clone()),
            // For its events (a refund that fails later: `routes::payments`).
            (REFUND_BOOKING_FIELD, request.booking_id.to_string()),
        ];
        let answer = self.refund_chained(payment, key, &form).await?;
        let answer = match answer {
            Ok(answer) => answer,
            Err(made) => return Ok(made),
        };
        if answer.status == 200 {
            return Ok(read::<Refund>(&answer.body, "Refund")?.id);
        }
        let error = StripeError::read(&answer.body);
        // Given back already, by hand in Stripe's dashboard: nothing is owed any more.
        if error.code.as_deref() == Some("charge_already_refunded") {
            tracing::warn!(payment = request.payment_reference, "stripe says this payment was refunded already");
            return Ok(format!("already_refunded_{}", request.payment_reference));
        }
        match error.rejected(answer.status) {
            Some(reason) => Err(ProviderError::Rejected(reason)),
            None => Err(unavailable("refund", answer.status, &error)),
        }
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
        assert!(StripeProvider::new("http://[::1]:12111", "sk_test_123456").is_ok());
        let remote = [
            "http://api.stripe.com",
            "http://127.0.0.1.evil.example",
            "http://127.0.0.1@evil.example",
            "http://localhost:1@evil.example",
            "https://user:pw@api.stripe.com",
            "https://api.stripe.com?x=1",
        ];
        for base in ["api.stripe.com", "https://", "https://api.stripe.com/v1", "ftp://x"].into_iter().chain(remote) {
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
        assert_eq!(confirm_key(&request("tok_visa")), confirm_key(&request("tok_visa")), "a retry: the same key");
        assert_ne!(confirm_key(&request("tok_visa")), confirm_key(&request("tok_mastercard")), "another card");
        assert!(confirm_key(&request("tok_visa")).starts_with("b_0_"));
    }
}
