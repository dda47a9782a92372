//! `/payments/webhooks/{provider}`: the payment provider's signed events (Stripe's shape and
//! `Stripe-Signature` scheme). The signature is checked over the raw body before anything is
//! read from it; then the event is read into an `allot_app::webhooks::PaymentEvent`.

use std::collections::BTreeMap;
use std::sync::Arc;

use allot_app::App;
use allot_app::webhooks::{PaymentEvent, PaymentReport, Received, Settled};
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
/// payment the confirm of a booking started. Other types, and payments no confirm of this
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
    #[serde(default)]
    pub object: ProviderObject,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ProviderObject {
    /// The payment's reference, as the confirm recorded it (`payment.reference`).
    pub id: Option<String>,
    /// What the confirm sent with the payment: `booking_id`, the booking it pays for.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// What the payment took, in the currency's smallest unit; required by a succeeded event
    /// (`amount` is read when it is absent). A payment is kept only for the sum its booking
    /// asked: another is refunded whole.
    #[schema(example = 1200)]
    pub amount_received: Option<i64>,
    #[schema(example = 1200)]
    pub amount: Option<i64>,
    /// ISO 4217, any case (Stripe's are lower-case); required by a succeeded event.
    #[schema(example = "eur")]
    pub currency: Option<String>,
    /// The payment's status at the provider; a succeeded event's, when given, is `succeeded`.
    #[schema(example = "succeeded")]
    pub status: Option<String>,
}

/// The answer to an event: any 2xx tells the provider to stop sending it.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAck {
    pub received: bool,
    /// `applied` (the booking as the event left it, or as an earlier delivery of it did),
    /// `refund_queued` (money taken for a booking that can no longer keep it, refunded whole),
    /// or `ignored`.
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
    let object = &event.data.object;
    let payment_reference = object.id.clone().unwrap_or_default();
    if payment_reference.is_empty() || payment_reference.len() > PAYMENT_REFERENCE_BYTES_MAX {
        let message = format!("1 to {PAYMENT_REFERENCE_BYTES_MAX} bytes");
        return Err(ApiError::bad_request(FieldErrors::single("data.object.id", message)));
    }
    let booking = object.metadata.get("booking_id").and_then(serde_json::Value::as_str);
    let Some(booking_id) = booking.and_then(|id| id.parse().ok()) else {
        tracing::warn!(event = ?event.id, payment = payment_reference, "a payment event names no booking of ours; ignored");
        return Ok(None);
    };
    let report = if succeeded { PaymentReport::Succeeded(received(object)?) } else { PaymentReport::Failed };
    Ok(Some(PaymentEvent { booking_id, payment_reference, report }))
}

/// The money a succeeded payment took, as its event reports it.
fn received(object: &ProviderObject) -> Result<Received, ApiError> {
    let mut errors = FieldErrors::new();
    let amount = object.amount_received.or(object.amount);
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
