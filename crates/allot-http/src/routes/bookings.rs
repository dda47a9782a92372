//! `/bookings`: hold, list, get, confirm, cancel.

use std::sync::Arc;

use allot_app::App;
use allot_app::bookings::HoldRequest;
use allot_app::store::BookingFilter;
use allot_core::FieldErrors;
use allot_core::booking::BookingStatus;
use allot_core::inventory::ItemRequest;
use allot_core::time_model::ClaimRequest;
use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::dto::{BookingView, CancelBody, ConfirmBody, HoldBody, HoldItemBody, PageView, booking_json, page_json};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, Json, PageQuery, Query, path_id};
use crate::idempotency::{self, HoldUnderKey};
use crate::openapi::{
    BadRequest, Conflict, Forbidden, Gone, NotFound, PaymentDeclined, ProviderUnavailable, Unauthenticated,
    Unprocessable,
};

/// Tells the three item shapes apart; a mix of shapes is an error naming the fields.
fn item_request(i: usize, item: &HoldItemBody, errors: &mut FieldErrors) -> Option<ItemRequest> {
    let at = |f: &str| format!("items[{i}].{f}");
    let interval = item.start.is_some() || item.end.is_some();
    let stay = item.check_in.is_some() || item.check_out.is_some();
    let seat = item.event_id.is_some();
    let claim = match (interval, stay, seat) {
        (true, false, false) => match (item.start, item.end) {
            (Some(start), Some(end)) => Some(ClaimRequest::Interval { start, end }),
            (None, _) => {
                errors.add(at("start"), "required with end");
                None
            }
            (_, None) => {
                errors.add(at("end"), "required with start");
                None
            }
        },
        (false, true, false) => match (item.check_in, item.check_out) {
            (Some(check_in), Some(check_out)) => Some(ClaimRequest::Stay { check_in, check_out }),
            (None, _) => {
                errors.add(at("check_in"), "required with check_out");
                None
            }
            (_, None) => {
                errors.add(at("check_out"), "required with check_in");
                None
            }
        },
        // The event decides the window; the placeholder is replaced by the core.
        (false, false, true) => {
            Some(ClaimRequest::EventWindow { start: jiff::Timestamp::UNIX_EPOCH, end: jiff::Timestamp::UNIX_EPOCH })
        }
        (false, false, false) => {
            errors.add(at("start"), "give start and end, check_in and check_out, or event_id");
            None
        }
        _ => {
            errors.add(at("event_id"), "give only one of: start/end, check_in/check_out, event_id");
            None
        }
    };
    Some(ItemRequest {
        resource_id: item.resource_id,
        event_id: item.event_id,
        claim: claim?,
        quantity: item.quantity.unwrap_or(1),
    })
}

/// Holds capacity for every item, or for none (409 `unavailable` names the item).
#[utoipa::path(post, path = "/api/v1/bookings", tag = "bookings", security(("bearer" = [])), request_body = HoldBody,
    responses((status = 201, description = "The booking, `held` until `expires_at`", body = BookingView), BadRequest,
        Unauthenticated, Forbidden, NotFound, Conflict, Unprocessable))]
pub async fn hold(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    keyed: Option<Extension<HoldUnderKey>>,
    Json(body): Json<HoldBody>,
) -> ApiResult<Response> {
    let mut errors = FieldErrors::new();
    let items: Vec<ItemRequest> =
        body.items.iter().enumerate().filter_map(|(i, item)| item_request(i, item, &mut errors)).collect();
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let request = HoldRequest { items, coupon_code: body.coupon_code };
    if let Some(Extension(HoldUnderKey(key))) = keyed {
        let outcome = app.hold_keyed(&principal, request, key, idempotency::render_hold).await?;
        return Ok(idempotency::keyed_hold_response(outcome));
    }
    let booking = app.hold(&principal, request).await?;
    Ok((StatusCode::CREATED, axum::Json(booking_json(&booking))).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only bookings in this state.
    #[param(value_type = Option<crate::dto::BookingStatusJson>)]
    status: Option<String>,
    /// Only bookings at this venue.
    #[param(value_type = Option<uuid::Uuid>)]
    venue_id: Option<String>,
    /// Items per page, default 20.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<uuid::Uuid>)]
    cursor: Option<String>,
}

/// Bookings the principal may see: their own, their venues' (managers), all (admins).
#[utoipa::path(get, path = "/api/v1/bookings", tag = "bookings", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, description = "A page of bookings", body = PageView<BookingView>), BadRequest,
        Unauthenticated, Forbidden))]
pub async fn list(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Query(q): Query<ListQuery>,
) -> ApiResult<impl IntoResponse> {
    let page = PageQuery { limit: q.limit, cursor: q.cursor }.parse()?;
    let mut errors = FieldErrors::new();
    let status = q.status.as_deref().filter(|s| !s.is_empty()).and_then(|s| {
        BookingStatus::parse(s).or_else(|| {
            errors.add("status", "not a booking status");
            None
        })
    });
    let venue_id = q.venue_id.as_deref().filter(|s| !s.is_empty()).and_then(|s| {
        s.parse().ok().or_else(|| {
            errors.add("venue_id", "not a venue id");
            None
        })
    });
    if !errors.is_empty() {
        return Err(ApiError::bad_request(errors));
    }
    let filter = BookingFilter { status, venue_id, ..BookingFilter::default() };
    let bookings = app.list_bookings(&principal, filter, page).await?;
    Ok(axum::Json(page_json(&bookings, booking_json)))
}

#[utoipa::path(get, path = "/api/v1/bookings/{id}", tag = "bookings", security(("bearer" = [])),
    params(("id" = String, Path, description = "Booking id")),
    responses((status = 200, description = "The booking", body = BookingView), Unauthenticated, Forbidden, NotFound))]
pub async fn get(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let booking = app.booking_for(&principal, path_id(&id, "booking")?).await?;
    Ok(axum::Json(booking_json(&booking)))
}

/// Pays for a held booking (its customer).
#[utoipa::path(post, path = "/api/v1/bookings/{id}/confirm", tag = "bookings", security(("bearer" = [])),
    request_body = ConfirmBody, params(("id" = String, Path, description = "Booking id")),
    responses((status = 200, description = "The booking, `confirmed` or `pending_payment`", body = BookingView),
        BadRequest, Unauthenticated, PaymentDeclined, Forbidden, NotFound, Conflict, Gone, Unprocessable,
        ProviderUnavailable))]
pub async fn confirm(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    Json(body): Json<ConfirmBody>,
) -> ApiResult<impl IntoResponse> {
    if body.payment.method != "card" {
        return Err(ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "payment.method", "only 'card' is supported"));
    }
    let booking = app.confirm(&principal, path_id(&id, "booking")?, &body.payment.token).await?;
    Ok(axum::Json(booking_json(&booking)))
}

/// Cancels a booking (its customer, its venue's managers, admins), refunding by the venue's policy.
#[utoipa::path(post, path = "/api/v1/bookings/{id}/cancel", tag = "bookings", security(("bearer" = [])),
    request_body = CancelBody, params(("id" = String, Path, description = "Booking id")),
    responses((status = 200, description = "The booking, `cancelled`, with its `refund`", body = BookingView),
        BadRequest, Unauthenticated, Forbidden, NotFound, Conflict, Unprocessable))]
pub async fn cancel(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    Json(body): Json<CancelBody>,
) -> ApiResult<impl IntoResponse> {
    let booking = app.cancel(&principal, path_id(&id, "booking")?, body.reason).await?;
    Ok(axum::Json(booking_json(&booking)))
}
