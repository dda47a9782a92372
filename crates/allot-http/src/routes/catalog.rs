//! Venues, resources, events, seat maps and availability.

use std::sync::Arc;

use allot_app::App;
use allot_app::catalog::Bound;
use allot_core::FieldErrors;
use allot_core::ids::{EventId, ResourceId, VenueId};
use allot_core::inventory::{Event, Resource, Venue, VenuePolicies};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::dto::{
    AvailabilityView, EventBody, EventView, PageView, ResourceBody, ResourcePatch, ResourceView, SeatMapView,
    VenueBody, VenuePatch, VenueView, apply_policies, availability_json, event_json, page_json, parse_time_model,
    price_category, resource_json, seat_map_json, venue_json,
};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, Json, PageQuery, Query, path_id};
use crate::openapi::{BadRequest, Conflict, Forbidden, NotFound, Unauthenticated, Unprocessable};

/// The catalogue of venues.
#[utoipa::path(get, path = "/api/v1/venues", tag = "catalogue", params(PageQuery),
    responses((status = 200, description = "A page of venues", body = PageView<VenueView>), BadRequest))]
pub async fn list_venues(State(app): State<Arc<App>>, Query(q): Query<PageQuery>) -> ApiResult<impl IntoResponse> {
    let page = app.venues(q.parse()?).await?;
    Ok(axum::Json(page_json(&page, venue_json)))
}

#[utoipa::path(get, path = "/api/v1/venues/{id}", tag = "catalogue", params(("id" = String, Path, description = "Venue id")),
    responses((status = 200, description = "The venue", body = VenueView), NotFound))]
pub async fn get_venue(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    let venue = app.venue(path_id(&id, "venue")?).await?;
    Ok(axum::Json(venue_json(&venue)))
}

/// Creates a venue (admins, managers; a manager then manages it).
#[utoipa::path(post, path = "/api/v1/venues", tag = "catalogue", security(("bearer" = [])), request_body = VenueBody,
    responses((status = 201, description = "The new venue", body = VenueView), BadRequest, Unauthenticated, Forbidden,
        Unprocessable))]
pub async fn create_venue(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Json(body): Json<VenueBody>,
) -> ApiResult<impl IntoResponse> {
    let mut policies = VenuePolicies::default();
    if let Some(p) = body.policies {
        apply_policies(&mut policies, p);
    }
    let venue = Venue {
        id: VenueId::new(),
        name: body.name,
        category: body.category,
        location: body.location,
        address: body.address,
        timezone: body.timezone,
        currency: body.currency,
        rating: body.rating,
        amenities: body.amenities,
        policies,
        managers: vec![],
    };
    let venue = app.create_venue(&principal, venue).await?;
    Ok((StatusCode::CREATED, axum::Json(venue_json(&venue))))
}

/// Changes the given fields of a venue (its managers, admins).
#[utoipa::path(patch, path = "/api/v1/venues/{id}", tag = "catalogue", security(("bearer" = [])), request_body = VenuePatch,
    params(("id" = String, Path, description = "Venue id")),
    responses((status = 200, description = "The changed venue", body = VenueView), BadRequest, Unauthenticated,
        Forbidden, NotFound, Conflict, Unprocessable))]
pub async fn update_venue(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    Json(patch): Json<VenuePatch>,
) -> ApiResult<impl IntoResponse> {
    let venue = app.update_venue(&principal, path_id(&id, "venue")?, Box::new(move |v| patch.clone().apply(v))).await?;
    Ok(axum::Json(venue_json(&venue)))
}

/// Deletes a venue without current or future bookings.
#[utoipa::path(delete, path = "/api/v1/venues/{id}", tag = "catalogue", security(("bearer" = [])),
    params(("id" = String, Path, description = "Venue id")),
    responses((status = 204, description = "Deleted"), Unauthenticated, Forbidden, NotFound, Conflict))]
pub async fn delete_venue(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    app.delete_venue(&principal, path_id(&id, "venue")?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/venues/{id}/resources", tag = "catalogue",
    params(("id" = String, Path, description = "Venue id"), PageQuery),
    responses((status = 200, description = "A page of the venue's resources", body = PageView<ResourceView>),
        BadRequest, NotFound))]
pub async fn list_resources(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<impl IntoResponse> {
    let page = app.resources(path_id(&id, "venue")?, q.parse()?).await?;
    Ok(axum::Json(page_json(&page, resource_json)))
}

/// Adds a resource (room type, seat, doctor, charger, …) to a venue (its managers, admins).
#[utoipa::path(post, path = "/api/v1/venues/{id}/resources", tag = "catalogue", security(("bearer" = [])),
    request_body = ResourceBody, params(("id" = String, Path, description = "Venue id")),
    responses((status = 201, description = "The new resource", body = ResourceView), BadRequest, Unauthenticated,
        Forbidden, NotFound, Conflict, Unprocessable))]
pub async fn create_resource(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    Json(body): Json<ResourceBody>,
) -> ApiResult<impl IntoResponse> {
    let attributes = body.attributes.unwrap_or_default();
    let time_model = parse_time_model(body.time_model)?;
    let resource = Resource {
        id: ResourceId::new(),
        venue_id: path_id(&id, "venue")?,
        name: body.name,
        capacity: body.capacity,
        unit_price: body.unit_price,
        price_category: price_category(body.price_category, &attributes),
        attributes: serde_json::Value::Object(attributes).to_string(),
        time_model,
        rules: body.rules,
    };
    let resource = app.create_resource(&principal, resource).await?;
    Ok((StatusCode::CREATED, axum::Json(resource_json(&resource))))
}

#[utoipa::path(get, path = "/api/v1/resources/{id}", tag = "catalogue", params(("id" = String, Path, description = "Resource id")),
    responses((status = 200, description = "The resource", body = ResourceView), NotFound))]
pub async fn get_resource(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    let resource = app.resource(path_id(&id, "resource")?).await?;
    Ok(axum::Json(resource_json(&resource)))
}

/// Changes the given fields of a resource (its venue's managers, admins).
#[utoipa::path(patch, path = "/api/v1/resources/{id}", tag = "catalogue", security(("bearer" = [])),
    request_body = ResourcePatch, params(("id" = String, Path, description = "Resource id")),
    responses((status = 200, description = "The changed resource", body = ResourceView), BadRequest, Unauthenticated,
        Forbidden, NotFound, Conflict, Unprocessable))]
pub async fn update_resource(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    Json(mut patch): Json<ResourcePatch>,
) -> ApiResult<impl IntoResponse> {
    let time_model = patch.parsed_time_model()?;
    let resource = app
        .update_resource(
            &principal,
            path_id(&id, "resource")?,
            Box::new(move |r| patch.clone().apply(r, time_model.clone())),
        )
        .await?;
    Ok(axum::Json(resource_json(&resource)))
}

/// Deletes a resource without current or future bookings.
#[utoipa::path(delete, path = "/api/v1/resources/{id}", tag = "catalogue", security(("bearer" = [])),
    params(("id" = String, Path, description = "Resource id")),
    responses((status = 204, description = "Deleted"), Unauthenticated, Forbidden, NotFound, Conflict))]
pub async fn delete_resource(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    app.delete_resource(&principal, path_id(&id, "resource")?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/venues/{id}/events", tag = "catalogue",
    params(("id" = String, Path, description = "Venue id"), PageQuery),
    responses((status = 200, description = "A page of the venue's events", body = PageView<EventView>), BadRequest,
        NotFound))]
pub async fn list_events(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<impl IntoResponse> {
    let page = app.events(path_id(&id, "venue")?, q.parse()?).await?;
    Ok(axum::Json(page_json(&page, event_json)))
}

/// Adds an event (show, flight) over seats of the venue.
#[utoipa::path(post, path = "/api/v1/venues/{id}/events", tag = "catalogue", security(("bearer" = [])),
    request_body = EventBody, params(("id" = String, Path, description = "Venue id")),
    responses((status = 201, description = "The new event", body = EventView), BadRequest, Unauthenticated, Forbidden,
        NotFound, Conflict, Unprocessable))]
pub async fn create_event(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    Json(body): Json<EventBody>,
) -> ApiResult<impl IntoResponse> {
    let event = Event {
        id: EventId::new(),
        venue_id: path_id(&id, "venue")?,
        name: body.name,
        start: body.start,
        end: body.end,
        seat_ids: body.seat_ids,
        price_categories: body.price_categories,
    };
    let event = app.create_event(&principal, event).await?;
    Ok((StatusCode::CREATED, axum::Json(event_json(&event))))
}

#[utoipa::path(get, path = "/api/v1/events/{id}", tag = "catalogue", params(("id" = String, Path, description = "Event id")),
    responses((status = 200, description = "The event", body = EventView), NotFound))]
pub async fn get_event(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    let event = app.event(path_id(&id, "event")?).await?;
    Ok(axum::Json(event_json(&event)))
}

/// Every seat of the event with its price and status.
#[utoipa::path(get, path = "/api/v1/events/{id}/seats", tag = "catalogue", params(("id" = String, Path, description = "Event id")),
    responses((status = 200, description = "The seat map", body = SeatMapView), NotFound))]
pub async fn seat_map(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    let render = |event: &_, seats: &[_]| serde_json::to_vec(&seat_map_json(event, seats)).map_err(|e| e.to_string());
    let body = app.seat_map(path_id(&id, "event")?, render).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], axum::body::Bytes::from_owner(body)))
}

/// Read as text and validated by hand, so a bad value gets a field error.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AvailabilityQuery {
    /// Start: a date `YYYY-MM-DD` (in the venue's zone) or an RFC 3339 time; default now.
    #[param(schema_with = crate::openapi::date_or_time)]
    from: Option<String>,
    /// End, as `from`; default a few days after `from`, at most 62 days after it.
    #[param(schema_with = crate::openapi::date_or_time)]
    to: Option<String>,
    /// Units wanted (default 1): only windows with at least this many remaining.
    #[param(value_type = Option<u32>, minimum = 1)]
    quantity: Option<String>,
}

fn parse_bound(raw: Option<&str>, field: &str, errors: &mut FieldErrors) -> Option<Bound> {
    let raw = raw.filter(|s| !s.is_empty())?;
    if raw.len() == 10 {
        return match allot_core::schedule::parse_date(raw) {
            Ok(d) => Some(Bound::Date(d)),
            Err(e) => {
                errors.add(field, e);
                None
            }
        };
    }
    match raw.parse::<jiff::Timestamp>() {
        Ok(t) => Some(Bound::Instant(t)),
        Err(_) => {
            errors.add(field, "must be a date YYYY-MM-DD or an RFC 3339 time");
            None
        }
    }
}

/// Free slots, nights or intervals of a resource, with remaining capacity and price.
#[utoipa::path(get, path = "/api/v1/resources/{id}/availability", tag = "catalogue",
    params(("id" = String, Path, description = "Resource id"), AvailabilityQuery),
    responses((status = 200, description = "Windows with remaining capacity", body = AvailabilityView), BadRequest,
        NotFound, Unprocessable))]
pub async fn availability(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<AvailabilityQuery>,
) -> ApiResult<impl IntoResponse> {
    let id = path_id(&id, "resource")?;
    let mut errors = FieldErrors::new();
    let from = parse_bound(q.from.as_deref(), "from", &mut errors);
    let to = parse_bound(q.to.as_deref(), "to", &mut errors);
    let quantity = match q.quantity.as_deref() {
        None | Some("") => 1,
        Some(raw) => raw.parse::<u32>().unwrap_or_else(|_| {
            errors.add("quantity", "must be a positive integer");
            0
        }),
    };
    if !errors.is_empty() {
        return Err(ApiError::bad_request(errors));
    }
    let (resource, windows) = app.availability(id, from, to, quantity).await?;
    Ok(axum::Json(availability_json(&resource, &windows)))
}
