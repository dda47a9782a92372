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

use crate::dto::{
    EventBody, ResourceBody, ResourcePatch, VenueBody, VenuePatch, apply_policies, availability_json, event_json,
    page_json, parse_time_model, price_category, resource_json, seat_map_json, venue_json,
};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, Json, PageQuery, Query, path_id};

pub async fn list_venues(State(app): State<Arc<App>>, Query(q): Query<PageQuery>) -> ApiResult<impl IntoResponse> {
    let page = app.venues(q.parse()?).await?;
    Ok(axum::Json(page_json(&page, venue_json)))
}

pub async fn get_venue(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    let venue = app.venue(path_id(&id, "venue")?).await?;
    Ok(axum::Json(venue_json(&venue)))
}

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

pub async fn update_venue(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    Json(patch): Json<VenuePatch>,
) -> ApiResult<impl IntoResponse> {
    let venue = app.update_venue(&principal, path_id(&id, "venue")?, Box::new(|v| patch.apply(v))).await?;
    Ok(axum::Json(venue_json(&venue)))
}

pub async fn delete_venue(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    app.delete_venue(&principal, path_id(&id, "venue")?).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_resources(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<impl IntoResponse> {
    let page = app.resources(path_id(&id, "venue")?, q.parse()?).await?;
    Ok(axum::Json(page_json(&page, resource_json)))
}

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

pub async fn get_resource(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    let resource = app.resource(path_id(&id, "resource")?).await?;
    Ok(axum::Json(resource_json(&resource)))
}

pub async fn update_resource(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    Json(mut patch): Json<ResourcePatch>,
) -> ApiResult<impl IntoResponse> {
    let time_model = patch.parsed_time_model()?;
    let resource =
        app.update_resource(&principal, path_id(&id, "resource")?, Box::new(|r| patch.apply(r, time_model))).await?;
    Ok(axum::Json(resource_json(&resource)))
}

pub async fn delete_resource(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    app.delete_resource(&principal, path_id(&id, "resource")?).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_events(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> ApiResult<impl IntoResponse> {
    let page = app.events(path_id(&id, "venue")?, q.parse()?).await?;
    Ok(axum::Json(page_json(&page, event_json)))
}

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

pub async fn get_event(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    let event = app.event(path_id(&id, "event")?).await?;
    Ok(axum::Json(event_json(&event)))
}

pub async fn seat_map(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    let (event, seats) = app.seat_map(path_id(&id, "event")?).await?;
    Ok(axum::Json(seat_map_json(&event, &seats)))
}

#[derive(Debug, Deserialize)]
pub struct AvailabilityQuery {
    from: Option<String>,
    to: Option<String>,
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
