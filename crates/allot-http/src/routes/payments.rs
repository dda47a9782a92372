//! `/payments/webhooks/{provider}`: the payment provider's signed events (Stripe's shape and
//! `Stripe-Signature` scheme). The signature is checked over the raw body before anything is
//! read from it; then the event is read into an `allot_app::webhooks::PaymentEvent`.

use std::collections::BTreeMap;
use std::sync::Arc;

use allot_app::App;
use allot_app::webhooks::{PaymentEvent, PaymentReport, Received, RefundFailure, Settled};
use allot_core::FieldErrors;
use allot_core::inventory::Currency;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::dto::{BookingView, booking_json};
use crate::error::{ApiError, ApiResult};
use crate::extract::parse_json;
use crate::openapi::{BadRequest, NotFound, ProviderUnavailable, Unauthenticated};

/// The header carrying the provider's signature.
pub const SIGNATURE_HEADER: &str = "stripe-signature";

/// Where the provider's events arrive, one path per provider.
pub const EVENTS_PATH_PREFIX: &str = "/api/v1/payments/webhooks/";

/// A provider event: a `payment_intent.succeeded` or `payment_intent.payment_failed` about a
/// payment the confirm of a booking started, or a `refund.failed` (or a `refund.updated` or
/// `charge.refund.updated` to `failed`) about a refund of one. Other types, and payments no confirm of this
/// server started (no `metadata.booking_id`), are acknowledged and ignored, so the provider
/// stops sending them; fields not named here are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ProviderEventBody {
    /// The event's id at the provider.
    #[schema(example = "evt_1")]
    pub id: Option<String>,
    #[serde(rename = "type")]
    #[schema(example = "payment_intent.succeeded")]
    pub kind: String,
    #[serde(default)]
    pub data: ProviderEventData,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ProviderEventData {
    /// Read as a [`ProviderObject`] for a payment intent's events and as a
    /// [`ProviderRefundObject`] for a refund's: other types' objects have shapes of their own,
    /// and are acknowledged whatever they are.
    #[serde(default)]
    #[schema(value_type = ProviderObject)]
    pub object: serde_json::Value,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ProviderObject {
    /// The payment's reference, as the confirm recorded it (`payment.reference`).
    pub id: Option<String>,
    /// What the confirm sent with the payment: `booking_id`, the booking it pays for.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// What the payment took, in the currency's smallest unit; required by a succeeded event.
    /// A payment is kept only for the sum its booking asked: another is refunded whole.
    #[schema(example = 1200)]
    pub amount_received: Option<i64>,
    /// ISO 4217, any case (Stripe's are lower-case); required by a succeeded event.
    #[schema(example = "eur")]
    pub currency: Option<String>,
    /// The payment's status at the provider; a succeeded event's, when given, is `succeeded`.
    #[schema(example = "succeeded")]
    pub status: Option<String>,
}

/// The object of a refund event (`refund.failed`, or `refund.updated` and
/// `charge.refund.updated` with the status `failed`): a refund the provider made and reports
/// failed afterwards.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ProviderRefundObject {
    /// The refund's reference, as the booking records it (`refund.reference`).
    #[schema(example = "re_1")]
    pub id: Option<String>,
    /// The payment refunded (`payment.reference`).
    #[schema(example = "pi_1")]
    pub payment_intent: Option<String>,
    /// What the refund sent: `booking_id`, the booking of the payment.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: BTreeMap<String, serde_json::Value>,
    #[schema(example = "failed")]
    pub status: Option<String>,
    /// Why it failed, in the provider's words.
    #[schema(example = "expired_or_canceled_card")]
    pub failure_reason: Option<String>,
}

/// The answer to an event: any 2xx tells the provider to stop sending it.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAck {
    pub received: bool,
    /// `applied` (the booking as the event left it, or as an earlier delivery of it did),
    /// `refund_queued` (money taken for a booking that can no longer keep it, refunded whole),
    /// `refund_failed` (a refund made and reported failed since: owed again, left to an
    /// operator), or `ignored`.
    #[schema(value_type = String, example = "applied")]
    pub outcome: &'static str,
    #[schema(required = true)]
    pub booking: Option<BookingView>,
}

/// Receives a payment provider's event (`tok_async` payments are settled so).
#[utoipa::path(post, path = "/api/v1/payments/webhooks/{provider}", tag = "payments",
    request_body = ProviderEventBody,
    params(
        ("provider" = String, Path, description = "The payment provider, e.g. `test`"),
        ("Stripe-Signature" = String, Header,
            description = "`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, \"<t>.<body>\")>`"),
    ),
    responses((status = 200, description = "Read; what it did", body = WebhookAck),
        BadRequest, Unauthenticated, NotFound, ProviderUnavailable))]
pub async fn webhook(
    State(app): State<Arc<App>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    if provider != app.payments.name() {
        return Err(ApiError::not_found("payment provider"));
    }
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    app.verify_payment_event(signature, &body)
        .await
        .map_err(|e| ApiError { message: format!("the event's signature: {e}"), ..ApiError::unauthenticated() })?;
    allot_app::audit::set_actor(&provider, "provider");
    let event: ProviderEventBody = parse_json(&body)?;
    if let Some(failure) = refund_failure(&event)? {
        let booking = match app.refund_failed(&provider, failure).await? {
            Settled::Booking(b) | Settled::Refunding(b) => Some(booking_json(&b)),
            Settled::Ignored => None,
        };
        let outcome = if booking.is_some() { "refund_failed" } else { "ignored" };
        return Ok(axum::Json(WebhookAck { received: true, outcome, booking }));
    }
    let Some(event) = payment_event(&event)? else {
        return Ok(axum::Json(WebhookAck { received: true, outcome: "ignored", booking: None }));
    };
    let ack = match app.payment_event(&provider, event).await? {
        Settled::Booking(b) => WebhookAck { received: true, outcome: "applied", booking: Some(booking_json(&b)) },
        Settled::Refunding(b) => {
            WebhookAck { received: true, outcome: "refund_queued", booking: Some(booking_json(&b)) }
        }
        Settled::Ignored => WebhookAck { received: true, outcome: "ignored", booking: None },
    };
    Ok(axum::Json(ack))
}

/// The payment event an event body reports; `None` for one this server does not act on: a
/// type it does not handle, or a payment no confirm of its own started (logged).
fn payment_event(event: &ProviderEventBody) -> Result<Option<PaymentEvent>, ApiError> {
    let succeeded = match event.kind.as_str() {
        "payment_intent.succeeded" => true,
        "payment_intent.payment_failed" => false,
        _ => return Ok(None),
    };
    let object: ProviderObject = serde_json::from_value(event.data.object.clone())
        .map_err(|e| ApiError::bad_request(FieldErrors::single("data.object", format!("not a payment intent: {e}"))))?;
    let object = &object;
    let mut errors = FieldErrors::new();
    let payment_reference = reference_field("data.object.id", object.id.as_deref(), &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::bad_request(errors));
    }
    let booking = object.metadata.get("booking_id").and_then(serde_json::Value::as_str);
    let Some(booking_id) = booking.and_then(|id| id.parse().ok()) else {
        tracing::warn!(event = ?event.id, payment = payment_reference, "a payment event names no booking of ours; ignored");
        return Ok(None);
    };
    let report = if succeeded { PaymentReport::Succeeded(received(object)?) } else { PaymentReport::Failed };
    Ok(Some(PaymentEvent { booking_id, payment_reference, report }))
}

/// The refund failure an event body reports, if it reports one about a refund this server
/// made (its `metadata.booking_id`): `refund.failed`, or an update of a refund to `failed`.
fn refund_failure(event: &ProviderEventBody) -> Result<Option<RefundFailure>, ApiError> {
    let failed_only = match event.kind.as_str() {
        "refund.failed" => false,
        "refund.updated" | "charge.refund.updated" => true,
        _ => return Ok(None),
    };
    let object: ProviderRefundObject = serde_json::from_value(event.data.object.clone())
        .map_err(|e| ApiError::bad_request(FieldErrors::single("data.object", format!("not a refund: {e}"))))?;
    let status = object.status.as_deref();
    if failed_only && status != Some("failed") {
        return Ok(None);
    }
    // Another integration's refund on the same account (no booking of ours): acknowledged,
    // whatever else it lacks, so the provider stops sending it.
    let booking = object.metadata.get("booking_id").and_then(serde_json::Value::as_str);
    let Some(booking_id) = booking.and_then(|id| id.parse().ok()) else {
        tracing::error!(event = ?event.id, refund = ?object.id, payment = ?object.payment_intent, reason = ?object.failure_reason,
            "a refund reported failed names no booking of ours (made before refunds named theirs, or not by this server): give the money back by other means");
        return Ok(None);
    };
    let mut errors = FieldErrors::new();
    let refund_reference = reference_field("data.object.id", object.id.as_deref(), &mut errors);
    let payment_reference =
        reference_field("data.object.payment_intent", object.payment_intent.as_deref(), &mut errors);
    if status.is_some_and(|s| s != "failed") {
        errors.add("data.object.status", "a failed refund's status is `failed`");
    }
    let reason = object.failure_reason.unwrap_or_else(|| "unknown".into());
    if reason.len() > FAILURE_REASON_BYTES_MAX {
        errors.add("data.object.failure_reason", format!("at most {FAILURE_REASON_BYTES_MAX} bytes"));
    }
    if !errors.is_empty() {
        return Err(ApiError::bad_request(errors));
    }
    Ok(Some(RefundFailure { booking_id, payment_reference, refund_reference, reason }))
}

/// A provider's reference read from `field` of an event (1 to [`PAYMENT_REFERENCE_BYTES_MAX`]
/// bytes; what is wrong added to `errors`).
fn reference_field(field: &str, value: Option<&str>, errors: &mut FieldErrors) -> String {
    let value = value.unwrap_or_default();
    if value.is_empty() || value.len() > PAYMENT_REFERENCE_BYTES_MAX {
        errors.add(field, format!("1 to {PAYMENT_REFERENCE_BYTES_MAX} bytes"));
    }
    value.to_owned()
}

/// Longest reason for a failed refund read from an event.
const FAILURE_REASON_BYTES_MAX: usize = 255;

/// The money a succeeded payment took, as its event reports it.
fn received(object: &ProviderObject) -> Result<Received, ApiError> {
    let mut errors = FieldErrors::new();
    let amount = object.amount_received;
    if amount.is_none_or(|a| a < 0) {
        errors.add("data.object.amount_received", "required: the sum the payment took, 0 or more");
    }
    let currency = object.currency.as_deref().map(str::to_ascii_uppercase).map(Currency::try_from);
    if !matches!(currency, Some(Ok(_))) {
        errors.add("data.object.currency", "required: an ISO 4217 code");
    }
    if object.status.as_deref().is_some_and(|s| s != "succeeded") {
        errors.add("data.object.status", "a succeeded payment's status is `succeeded`");
    }
    match (amount, currency) {
        (Some(amount), Some(Ok(currency))) if errors.is_empty() => Ok(Received { amount, currency }),
        _ => Err(ApiError::bad_request(errors)),
    }
}

/// Longest payment reference read from an event.
pub const PAYMENT_REFERENCE_BYTES_MAX: usize = 255;

/// How long the test provider waits for this server to answer one of its events.
const TEST_REPORT_TIMEOUT_SECONDS: u64 = 10;
/// Sends of one report at most, a second apart and doubling, as a provider retries.
const TEST_REPORT_SENDS_MAX: u32 = 5;
/// Bytes of an answer read at most (its status line is all that is used).
const TEST_REPORT_ANSWER_BYTES_MAX: u64 = 64 * 1024;

/// Reports being sent at once at most; the others wait in the provider's queue.
const TEST_REPORT_SENDERS_MAX: usize = 16;

/// The built-in test provider's side of `tok_async` (`ReportingTestProvider`): each payment it
/// reported is sent, once due, as a signed `payment_intent.succeeded` event to this server's own
/// endpoint at `addr` over real HTTP, as Stripe's test mode sends its events, and sent again
/// while it is not answered 2xx (at most [`TEST_REPORT_SENDS_MAX`] times); at most
/// [`TEST_REPORT_SENDERS_MAX`] at once. Runs until the provider or the app is gone.
pub async fn send_test_reports(
    app: std::sync::Weak<App>,
    addr: std::net::SocketAddr,
    mut reports: tokio::sync::mpsc::Receiver<allot_app::payments::TestReport>,
) {
    let addr = reachable(addr);
    let senders = Arc::new(tokio::sync::Semaphore::new(TEST_REPORT_SENDERS_MAX));
    while let Some(report) = reports.recv().await {
        let Ok(sender) = senders.clone().acquire_owned().await else { return };
        let app = app.clone();
        tokio::spawn(async move {
            send_test_report(&app, addr, &report).await;
            drop(sender);
        });
    }
}

async fn send_test_report(
    app: &std::sync::Weak<App>,
    addr: std::net::SocketAddr,
    report: &allot_app::payments::TestReport,
) {
    tokio::time::sleep_until(report.due.into()).await;
    let body = test_report_body(report);
    let mut wait = std::time::Duration::from_secs(1);
    for send in 1..=TEST_REPORT_SENDS_MAX {
        let Some(app) = app.upgrade() else { return };
        let signature = allot_app::webhooks::sign(app.webhook_secret().as_bytes(), &body, app.clock.now());
        let provider = app.payments.name();
        drop(app);
        match post_event(addr, provider, &body, &signature).await {
            Ok(status) if (200..300).contains(&status) => return,
            answer => {
                tracing::warn!(booking_id = %report.booking_id, send, ?answer, "the test provider's event was not taken")
            }
        }
        if send < TEST_REPORT_SENDS_MAX {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
}

/// Where to reach a server listening on `addr` (an unspecified address: over loopback).
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => (std::net::Ipv4Addr::LOCALHOST, addr.port()).into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => (std::net::Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// The event reporting `report`'s payment paid, in Stripe's shape.
fn test_report_body(report: &allot_app::payments::TestReport) -> Vec<u8> {
    let object = serde_json::json!({
        "id": report.reference,
        "object": "payment_intent",
        "amount": report.amount,
        "amount_received": report.amount,
        "currency": report.currency.as_str().to_ascii_lowercase(),
        "status": "succeeded",
        "metadata": {"booking_id": report.booking_id.to_string()},
    });
    let event = serde_json::json!({
        "id": format!("evt_{}", report.reference),
        "object": "event",
        "type": "payment_intent.succeeded",
        "data": {"object": object},
    });
    event.to_string().into_bytes()
}

/// POSTs an event to the provider's endpoint at `addr` (HTTP/1.1, one connection): the
/// answer's status code.
async fn post_event(addr: std::net::SocketAddr, provider: &str, body: &[u8], signature: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "POST {EVENTS_PATH_PREFIX}{provider} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             {SIGNATURE_HEADER}: {signature}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut answer = Vec::new();
        stream.take(TEST_REPORT_ANSWER_BYTES_MAX).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let timeout = std::time::Duration::from_secs(TEST_REPORT_TIMEOUT_SECONDS);
    let answer = tokio::time::timeout(timeout, exchange).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
    // `HTTP/1.1 200 OK`
    let status = answer.get(9..12).and_then(|code| std::str::from_utf8(code).ok()).and_then(|code| code.parse().ok());
    status.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP status line"))
}
