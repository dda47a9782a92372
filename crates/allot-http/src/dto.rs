//! Wire shapes of API v1 (SPEC §4): request bodies and the JSON of each response.

use std::collections::BTreeMap;

use allot_app::access::{ApiKey, CreatedApiKey, Scope};
use allot_app::catalog::{AvailabilityWindow, SeatView};
use allot_app::store::{Page, SeatState, User};
use allot_core::booking::Booking;
use allot_core::ids::{EventId, ResourceId};
use allot_core::inventory::{CancellationPolicy, Event, Location, Resource, ResourceRules, Venue};
use allot_core::time_model::TimeModel;
use jiff::Timestamp;
use jiff::civil::Date;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;
use allot_core::FieldErrors;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub email: String,
    pub password: String,
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    pub refresh_token: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesBody {
    pub hold_ttl_seconds: Option<u32>,
    pub cancellation: Option<CancellationPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VenueBody {
    pub name: String,
    pub category: String,
    pub location: Location,
    #[serde(default)]
    pub address: String,
    pub timezone: String,
    pub currency: allot_core::inventory::Currency,
    #[serde(default)]
    pub rating: f64,
    #[serde(default)]
    pub amenities: Vec<String>,
    pub policies: Option<PoliciesBody>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VenuePatch {
    pub name: Option<String>,
    pub category: Option<String>,
    pub location: Option<Location>,
    pub address: Option<String>,
    pub timezone: Option<String>,
    pub currency: Option<allot_core::inventory::Currency>,
    pub rating: Option<f64>,
    pub amenities: Option<Vec<String>>,
    pub policies: Option<PoliciesBody>,
}

impl VenuePatch {
    pub fn apply(self, v: &mut Venue) {
        if let Some(x) = self.name {
            v.name = x;
        }
        if let Some(x) = self.category {
            v.category = x;
        }
        if let Some(x) = self.location {
            v.location = x;
        }
        if let Some(x) = self.address {
            v.address = x;
        }
        if let Some(x) = self.timezone {
            v.timezone = x;
        }
        if let Some(x) = self.currency {
            v.currency = x;
        }
        if let Some(x) = self.rating {
            v.rating = x;
        }
        if let Some(x) = self.amenities {
            v.amenities = x;
        }
        if let Some(p) = self.policies {
            apply_policies(&mut v.policies, p);
        }
    }
}

pub fn apply_policies(policies: &mut allot_core::inventory::VenuePolicies, p: PoliciesBody) {
    if let Some(ttl) = p.hold_ttl_seconds {
        policies.hold_ttl_seconds = ttl;
    }
    if let Some(c) = p.cancellation {
        policies.cancellation = c;
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceBody {
    pub name: String,
    pub capacity: u32,
    pub unit_price: i64,
    #[serde(default)]
    pub attributes: Option<serde_json::Map<String, Value>>,
    pub price_category: Option<String>,
    /// Parsed by [`parse_time_model`], so errors name the inner field.
    pub time_model: Value,
    #[serde(default)]
    pub rules: ResourceRules,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcePatch {
    pub name: Option<String>,
    pub capacity: Option<u32>,
    pub unit_price: Option<i64>,
    pub attributes: Option<serde_json::Map<String, Value>>,
    pub price_category: Option<String>,
    pub time_model: Option<Value>,
    pub rules: Option<ResourceRules>,
}

/// Reads a time model from its wire form. serde's tagged enums lose the path of a failing
/// field, so the tag is read here and the rest goes to the model's own struct.
pub fn parse_time_model(value: Value) -> Result<TimeModel, ApiError> {
    let fail = |field: String, message: String| ApiError::bad_request(FieldErrors::single(field, message));
    let Value::Object(mut fields) = value else {
        return Err(fail("time_model".into(), "must be an object with a `kind`".into()));
    };
    let kind = match fields.remove("kind") {
        Some(Value::String(kind)) => kind,
        _ => return Err(fail("time_model.kind".into(), "must be one of slots, nights, free, events".into())),
    };
    fn inner<T: serde::de::DeserializeOwned>(fields: serde_json::Map<String, Value>) -> Result<T, ApiError> {
        serde_path_to_error::deserialize(Value::Object(fields)).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "time_model".to_owned() } else { format!("time_model.{path}") };
            ApiError::bad_request(FieldErrors::single(field, e.inner().to_string()))
        })
    }
    match kind.as_str() {
        "slots" => inner(fields).map(TimeModel::Slots),
        "nights" => inner(fields).map(TimeModel::Nights),
        "free" => inner(fields).map(TimeModel::Free),
        "events" if fields.is_empty() => Ok(TimeModel::Events),
        "events" => Err(fail("time_model".into(), "kind 'events' takes no other fields".into())),
        _ => Err(fail("time_model.kind".into(), "must be one of slots, nights, free, events".into())),
    }
}

impl ResourcePatch {
    /// Parses what needs parsing before the patch is applied.
    pub fn parsed_time_model(&mut self) -> Result<Option<TimeModel>, ApiError> {
        self.time_model.take().map(parse_time_model).transpose()
    }

    pub fn apply(self, r: &mut Resource, time_model: Option<TimeModel>) {
        if let Some(x) = self.name {
            r.name = x;
        }
        if let Some(x) = self.capacity {
            r.capacity = x;
        }
        if let Some(x) = self.unit_price {
            r.unit_price = x;
        }
        if let Some(x) = self.attributes {
            r.attributes = Value::Object(x).to_string();
        }
        if let Some(x) = self.price_category {
            r.price_category = Some(x);
        }
        if let Some(x) = time_model {
            r.time_model = x;
        }
        if let Some(x) = self.rules {
            r.rules = x;
        }
    }
}

/// The seat's price category: explicit, or the `category` attribute.
pub fn price_category(explicit: Option<String>, attributes: &serde_json::Map<String, Value>) -> Option<String> {
    explicit.or_else(|| attributes.get("category").and_then(Value::as_str).map(str::to_owned))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBody {
    pub name: String,
    pub start: Timestamp,
    pub end: Timestamp,
    pub seat_ids: Vec<ResourceId>,
    #[serde(default)]
    pub price_categories: BTreeMap<String, i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldBody {
    pub items: Vec<HoldItemBody>,
    pub coupon_code: Option<String>,
}

/// One of three shapes, told apart by which fields are present.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldItemBody {
    pub resource_id: ResourceId,
    pub start: Option<Timestamp>,
    pub end: Option<Timestamp>,
    #[serde(default, deserialize_with = "allot_core::schedule::strict_date::option::deserialize")]
    pub check_in: Option<Date>,
    #[serde(default, deserialize_with = "allot_core::schedule::strict_date::option::deserialize")]
    pub check_out: Option<Date>,
    pub event_id: Option<EventId>,
    pub quantity: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmBody {
    pub payment: PaymentBody,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentBody {
    pub method: String,
    pub token: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    pub reason: Option<String>,
}

pub fn user_json(u: &User) -> Value {
    let roles: Vec<&str> = u.roles.iter().map(|r| r.as_str()).collect();
    let venues: Vec<String> = u.venues.iter().map(ToString::to_string).collect();
    json!({ "id": u.id.to_string(), "email": u.email, "name": u.name, "roles": roles, "managed_venue_ids": venues,
            "created_at": u.created_at.to_string() })
}

pub fn venue_json(v: &Venue) -> Value {
    json!({
        "id": v.id.to_string(), "name": v.name, "category": v.category,
        "location": { "lat": v.location.lat, "lon": v.location.lon },
        "address": v.address, "timezone": v.timezone, "currency": v.currency.as_str(),
        "rating": v.rating, "amenities": v.amenities,
        "policies": {
            "hold_ttl_seconds": v.policies.hold_ttl_seconds,
            "cancellation": {
                "free_until_hours_before": v.policies.cancellation.free_until_hours_before,
                "late_refund_percent": v.policies.cancellation.late_refund_percent,
            },
        },
    })
}

pub fn resource_json(r: &Resource) -> Value {
    let attributes: Value = serde_json::from_str(&r.attributes).unwrap_or_else(|_| json!({}));
    json!({
        "id": r.id.to_string(), "venue_id": r.venue_id.to_string(), "name": r.name,
        "capacity": r.capacity, "unit_price": r.unit_price, "attributes": attributes,
        "price_category": r.price_category,
        "time_model": serde_json::to_value(&r.time_model).unwrap_or(Value::Null),
        "rules": serde_json::to_value(&r.rules).unwrap_or(Value::Null),
    })
}

pub fn event_json(e: &Event) -> Value {
    let seats: Vec<String> = e.seat_ids.iter().map(ToString::to_string).collect();
    json!({
        "id": e.id.to_string(), "venue_id": e.venue_id.to_string(), "name": e.name,
        "start": e.start.to_string(), "end": e.end.to_string(),
        "seat_ids": seats, "price_categories": e.price_categories,
    })
}

pub fn seat_map_json(event: &Event, seats: &[SeatView]) -> Value {
    let seats: Vec<Value> = seats
        .iter()
        .map(|s| {
            let attributes: Value = serde_json::from_str(&s.resource.attributes).unwrap_or_else(|_| json!({}));
            let status = match s.state {
                None => "available",
                Some(SeatState::Held) => "held",
                Some(SeatState::Booked) => "booked",
            };
            json!({ "resource_id": s.resource.id.to_string(), "name": s.resource.name, "attributes": attributes,
                    "price_category": s.resource.price_category, "price": s.price, "status": status })
        })
        .collect();
    json!({ "event_id": event.id.to_string(), "start": event.start.to_string(), "end": event.end.to_string(), "seats": seats })
}

pub fn availability_json(r: &Resource, windows: &[AvailabilityWindow]) -> Value {
    let windows: Vec<Value> = windows
        .iter()
        .map(|w| {
            let mut v = json!({ "start": w.start.to_string(), "end": w.end.to_string(), "remaining": w.remaining, "price": w.price });
            if let Some(d) = w.date {
                v["date"] = json!(d.to_string());
            }
            if let Some(e) = w.event_id {
                v["event_id"] = json!(e.to_string());
            }
            v
        })
        .collect();
    json!({ "resource_id": r.id.to_string(), "time_model": r.time_model.kind(), "windows": windows })
}

pub fn booking_json(b: &Booking) -> Value {
    let items: Vec<Value> = b
        .items
        .iter()
        .map(|i| {
            json!({
                "id": i.id.to_string(), "resource_id": i.resource_id.to_string(),
                "event_id": i.event_id.map(|e| e.to_string()),
                "start": i.start.to_string(), "end": i.end.to_string(),
                "quantity": i.quantity, "unit_price": i.unit_price, "price": i.price,
            })
        })
        .collect();
    json!({
        "id": b.id.to_string(), "status": b.status.as_str(), "customer_id": b.customer_id.to_string(),
        "venue_id": b.venue_id.to_string(), "expires_at": b.expires_at.map(|t| t.to_string()),
        "created_at": b.created_at.to_string(), "updated_at": b.updated_at.to_string(), "items": items,
        "currency": b.currency.as_str(), "subtotal": b.subtotal, "discount": b.discount, "total": b.total,
        "payment_attempts": b.payment_attempts,
        "payment": b.payment.as_ref().map(|p| json!({ "provider": p.provider, "reference": p.reference, "amount": p.amount, "status": p.status })),
        "refund": b.refund.as_ref().map(|r| json!({ "amount": r.amount, "reference": r.reference })),
        "cancel_reason": b.cancel_reason,
    })
}

pub fn page_json<T>(page: &Page<T>, render: impl Fn(&T) -> Value) -> Value {
    let data: Vec<Value> = page.items.iter().map(render).collect();
    json!({ "data": data, "next_cursor": page.next_after.map(|u| u.to_string()) })
}

// Roles and partner API keys.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleBody {
    pub role: String,
    pub venue_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyBody {
    pub name: String,
    pub scopes: Vec<String>,
}

/// Scope names to scopes; each unknown one is a 400 naming its position (`scopes[1]`).
pub fn parse_scopes(raw: &[String]) -> Result<std::collections::BTreeSet<Scope>, ApiError> {
    let mut errors = FieldErrors::new();
    let scopes = raw
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            Scope::try_from(s.as_str()).map_err(|e| errors.add(format!("scopes[{i}]"), e.to_string())).ok()
        })
        .collect();
    if errors.is_empty() { Ok(scopes) } else { Err(ApiError::bad_request(errors)) }
}

/// A key as listed: never the key itself, nor its digest.
pub fn api_key_json(k: &ApiKey) -> Value {
    let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str()).collect();
    json!({ "id": k.id.to_string(), "name": k.name, "scopes": scopes, "created_by": k.created_by.to_string(),
            "created_at": k.created_at.to_string(), "revoked_at": k.revoked_at.map(|t| t.to_string()) })
}

/// A key just created, with the key itself: shown this once.
pub fn created_api_key_json(created: &CreatedApiKey) -> Value {
    let mut body = api_key_json(&created.key);
    body["key"] = Value::String(created.secret.clone());
    body
}
