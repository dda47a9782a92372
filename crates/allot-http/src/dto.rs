//! Wire shapes of API v1 (SPEC §4): request bodies and the JSON of each response.

use std::collections::BTreeMap;

use allot_app::access::{ApiKey, CreatedApiKey, Scope};
use allot_app::catalog::AvailabilityWindow;
use allot_app::store::{Page, SeatState, User};
use allot_core::booking::Booking;
use allot_core::ids::{EventId, ResourceId};
use allot_core::inventory::{CancellationPolicy, Event, Location, Resource, ResourceRules, Venue};
use allot_core::time_model::TimeModel;
use jiff::Timestamp;
use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::error::ApiError;
use allot_core::FieldErrors;

// No `Debug`: it carries a secret that must never reach a log.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub email: String,
    pub password: String,
    pub name: String,
}

// No `Debug`: it carries a secret that must never reach a log.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    pub email: String,
    pub password: String,
}

// No `Debug`: it carries a secret that must never reach a log.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    pub refresh_token: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoliciesBody {
    pub hold_ttl_seconds: Option<u32>,
    #[schema(value_type = Option<CancellationJson>)]
    pub cancellation: Option<CancellationPolicy>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VenueBody {
    pub name: String,
    pub category: String,
    #[schema(value_type = LocationJson)]
    pub location: Location,
    #[serde(default)]
    pub address: String,
    pub timezone: String,
    /// ISO 4217.
    #[schema(value_type = String, pattern = "^[A-Z]{3}$", example = "EUR")]
    pub currency: allot_core::inventory::Currency,
    #[serde(default)]
    pub rating: f64,
    #[serde(default)]
    pub amenities: Vec<String>,
    pub policies: Option<PoliciesBody>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VenuePatch {
    pub name: Option<String>,
    pub category: Option<String>,
    #[schema(value_type = Option<LocationJson>)]
    pub location: Option<Location>,
    pub address: Option<String>,
    pub timezone: Option<String>,
    #[schema(value_type = Option<String>, pattern = "^[A-Z]{3}$", example = "EUR")]
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

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceBody {
    pub name: String,
    pub capacity: u32,
    pub unit_price: i64,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<serde_json::Map<String, Value>>,
    pub price_category: Option<String>,
    /// Parsed by [`parse_time_model`], so errors name the inner field.
    #[schema(value_type = TimeModelJson)]
    pub time_model: Value,
    #[serde(default)]
    #[schema(value_type = RulesJson)]
    pub rules: ResourceRules,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourcePatch {
    pub name: Option<String>,
    pub capacity: Option<u32>,
    pub unit_price: Option<i64>,
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<serde_json::Map<String, Value>>,
    pub price_category: Option<String>,
    #[schema(value_type = Option<TimeModelJson>)]
    pub time_model: Option<Value>,
    #[schema(value_type = Option<RulesJson>)]
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

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventBody {
    pub name: String,
    pub start: Timestamp,
    pub end: Timestamp,
    #[schema(value_type = Vec<uuid::Uuid>, min_items = 1, max_items = 2000)]
    pub seat_ids: Vec<ResourceId>,
    #[serde(default)]
    pub price_categories: BTreeMap<String, i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldBody {
    #[schema(min_items = 1, max_items = 20)]
    pub items: Vec<HoldItemBody>,
    pub coupon_code: Option<String>,
}

/// One of three shapes, told apart by which fields are present.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldItemBody {
    #[schema(value_type = uuid::Uuid)]
    pub resource_id: ResourceId,
    pub start: Option<Timestamp>,
    pub end: Option<Timestamp>,
    #[serde(default, deserialize_with = "allot_core::schedule::strict_date::option::deserialize")]
    pub check_in: Option<Date>,
    #[serde(default, deserialize_with = "allot_core::schedule::strict_date::option::deserialize")]
    pub check_out: Option<Date>,
    #[schema(value_type = Option<uuid::Uuid>)]
    pub event_id: Option<EventId>,
    /// Default 1.
    pub quantity: Option<u32>,
}

// No `Debug`: it carries a secret that must never reach a log.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmBody {
    pub payment: PaymentBody,
}

// No `Debug`: it carries a secret that must never reach a log.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentBody {
    /// Only `card`.
    #[schema(pattern = "^card$", example = "card")]
    pub method: String,
    pub token: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    pub reason: Option<String>,
}

// Responses. Each is built from the domain value by its `*_json` function; the same struct is
// what the OpenAPI document shows, so the document cannot drift from what is sent. An `Option`
// field is always sent (`null` when absent), so the document marks it required.

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = User)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub name: String,
    #[schema(example = json!(["customer"]))]
    pub roles: Vec<&'static str>,
    pub managed_venue_ids: Vec<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
}

pub fn user_json(u: &User) -> UserView {
    UserView {
        id: u.id.to_string(),
        email: u.email.clone(),
        name: u.name.clone(),
        roles: u.roles.iter().map(|r| r.as_str()).collect(),
        managed_venue_ids: u.venues.iter().map(ToString::to_string).collect(),
        created_at: u.created_at.to_string(),
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Session)]
pub struct SessionView {
    pub access_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    pub refresh_token: String,
}

pub fn session_json(s: allot_app::auth::Session) -> SessionView {
    SessionView {
        access_token: s.access_token,
        token_type: "Bearer",
        expires_in: s.expires_in,
        refresh_token: s.refresh_token,
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Location)]
pub struct LocationJson {
    #[schema(minimum = -90, maximum = 90)]
    pub lat: f64,
    #[schema(minimum = -180, maximum = 180)]
    pub lon: f64,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = CancellationPolicy)]
pub struct CancellationJson {
    pub free_until_hours_before: u32,
    pub late_refund_percent: u32,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = VenuePolicies)]
pub struct PoliciesJson {
    pub hold_ttl_seconds: u32,
    pub cancellation: CancellationJson,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Venue)]
pub struct VenueView {
    pub id: String,
    pub name: String,
    pub category: String,
    pub location: LocationJson,
    pub address: String,
    pub timezone: String,
    pub currency: String,
    pub rating: f64,
    pub amenities: Vec<String>,
    pub policies: PoliciesJson,
}

pub fn venue_json(v: &Venue) -> VenueView {
    let c = &v.policies.cancellation;
    VenueView {
        id: v.id.to_string(),
        name: v.name.clone(),
        category: v.category.clone(),
        location: LocationJson { lat: v.location.lat, lon: v.location.lon },
        address: v.address.clone(),
        timezone: v.timezone.clone(),
        currency: v.currency.as_str().to_owned(),
        rating: v.rating,
        amenities: v.amenities.clone(),
        policies: PoliciesJson {
            hold_ttl_seconds: v.policies.hold_ttl_seconds,
            cancellation: CancellationJson {
                free_until_hours_before: c.free_until_hours_before,
                late_refund_percent: c.late_refund_percent,
            },
        },
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Resource)]
pub struct ResourceView {
    pub id: String,
    pub venue_id: String,
    pub name: String,
    pub capacity: u32,
    pub unit_price: i64,
    #[schema(value_type = Object)]
    pub attributes: Value,
    #[schema(required = true)]
    pub price_category: Option<String>,
    #[schema(value_type = TimeModelJson)]
    pub time_model: Value,
    #[schema(value_type = RulesJson)]
    pub rules: Value,
}

pub fn resource_json(r: &Resource) -> ResourceView {
    ResourceView {
        id: r.id.to_string(),
        venue_id: r.venue_id.to_string(),
        name: r.name.clone(),
        capacity: r.capacity,
        unit_price: r.unit_price,
        attributes: serde_json::from_str(&r.attributes).unwrap_or_else(|_| json!({})),
        price_category: r.price_category.clone(),
        time_model: serde_json::to_value(&r.time_model).unwrap_or(Value::Null),
        rules: serde_json::to_value(&r.rules).unwrap_or(Value::Null),
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Event)]
pub struct EventView {
    pub id: String,
    pub venue_id: String,
    pub name: String,
    #[schema(format = DateTime)]
    pub start: String,
    #[schema(format = DateTime)]
    pub end: String,
    pub seat_ids: Vec<String>,
    /// Price of each seat category, in minor units.
    pub price_categories: BTreeMap<String, i64>,
}

pub fn event_json(e: &Event) -> EventView {
    EventView {
        id: e.id.to_string(),
        venue_id: e.venue_id.to_string(),
        name: e.name.clone(),
        start: e.start.to_string(),
        end: e.end.to_string(),
        seat_ids: e.seat_ids.iter().map(ToString::to_string).collect(),
        price_categories: e.price_categories.clone(),
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SeatStatus {
    Available,
    Held,
    Booked,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Seat)]
pub struct SeatView {
    pub resource_id: String,
    pub name: String,
    /// As stored (always a JSON object): a seat map repeats it for every seat, so it is
    /// written out without being parsed.
    #[schema(value_type = Object)]
    pub attributes: Box<serde_json::value::RawValue>,
    #[schema(required = true)]
    pub price_category: Option<String>,
    pub price: i64,
    pub status: SeatStatus,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = SeatMap)]
pub struct SeatMapView {
    pub event_id: String,
    #[schema(format = DateTime)]
    pub start: String,
    #[schema(format = DateTime)]
    pub end: String,
    pub seats: Vec<SeatView>,
}

/// `text` as raw JSON if it is valid JSON, else `{}`.
fn raw_object(text: &str) -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string(text.to_owned())
        .unwrap_or_else(|_| serde_json::value::RawValue::from_string("{}".to_owned()).unwrap_or_default())
}

pub fn seat_map_json(event: &Event, seats: &[allot_app::catalog::SeatView]) -> SeatMapView {
    let seats = seats
        .iter()
        .map(|s| SeatView {
            resource_id: s.resource.id.to_string(),
            name: s.resource.name.clone(),
            attributes: raw_object(&s.resource.attributes),
            price_category: s.resource.price_category.clone(),
            price: s.price,
            status: match s.state {
                None => SeatStatus::Available,
                Some(SeatState::Held) => SeatStatus::Held,
                Some(SeatState::Booked) => SeatStatus::Booked,
            },
        })
        .collect();
    SeatMapView { event_id: event.id.to_string(), start: event.start.to_string(), end: event.end.to_string(), seats }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = AvailabilityWindow)]
pub struct WindowView {
    #[schema(format = DateTime)]
    pub start: String,
    #[schema(format = DateTime)]
    pub end: String,
    pub remaining: u32,
    pub price: i64,
    /// For `nights`: the night's date.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Date)]
    pub date: Option<String>,
    /// For `events`: the event this window is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Availability)]
pub struct AvailabilityView {
    pub resource_id: String,
    /// The resource's time model kind.
    #[schema(example = "slots")]
    pub time_model: &'static str,
    pub windows: Vec<WindowView>,
}

pub fn availability_json(r: &Resource, windows: &[AvailabilityWindow]) -> AvailabilityView {
    let windows = windows
        .iter()
        .map(|w| WindowView {
            start: w.start.to_string(),
            end: w.end.to_string(),
            remaining: w.remaining,
            price: w.price,
            date: w.date.map(|d| d.to_string()),
            event_id: w.event_id.map(|e| e.to_string()),
        })
        .collect();
    AvailabilityView { resource_id: r.id.to_string(), time_model: r.time_model.kind(), windows }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = BookingItem)]
pub struct BookingItemView {
    pub id: String,
    pub resource_id: String,
    #[schema(required = true)]
    pub event_id: Option<String>,
    #[schema(format = DateTime)]
    pub start: String,
    #[schema(format = DateTime)]
    pub end: String,
    pub quantity: u32,
    pub unit_price: i64,
    pub price: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Payment)]
pub struct PaymentView {
    pub provider: String,
    pub reference: String,
    pub amount: i64,
    pub status: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Refund)]
pub struct RefundView {
    pub amount: i64,
    /// The provider's refund, once made (`null` while owed).
    #[schema(required = true)]
    pub reference: Option<String>,
    /// Set when the provider reported the refund `reference` failed after it was made (the
    /// card closed since, say): the money did not go back, and the refund is owed again, left
    /// to an operator. `null` otherwise.
    #[schema(required = true, example = json!(null))]
    pub failure: Option<String>,
}

/// The states of SPEC §3 (schema only: the view sends `BookingStatus::as_str`).
#[derive(ToSchema)]
#[schema(as = BookingStatus, rename_all = "snake_case")]
#[allow(dead_code)]
pub enum BookingStatusJson {
    Held,
    PendingPayment,
    Confirmed,
    Cancelled,
    Expired,
    PaymentFailed,
    Completed,
    NoShow,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Booking)]
pub struct BookingView {
    pub id: String,
    #[schema(value_type = BookingStatusJson)]
    pub status: &'static str,
    pub customer_id: String,
    pub venue_id: String,
    /// When a `held` or `pending_payment` booking lapses.
    #[schema(required = true, format = DateTime)]
    pub expires_at: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    pub items: Vec<BookingItemView>,
    pub currency: String,
    pub subtotal: i64,
    pub discount: i64,
    pub total: i64,
    pub payment_attempts: u32,
    #[schema(required = true)]
    pub payment: Option<PaymentView>,
    #[schema(required = true)]
    pub refund: Option<RefundView>,
    #[schema(required = true)]
    pub cancel_reason: Option<String>,
}

pub fn booking_json(b: &Booking) -> BookingView {
    let items = b
        .items
        .iter()
        .map(|i| BookingItemView {
            id: i.id.to_string(),
            resource_id: i.resource_id.to_string(),
            event_id: i.event_id.map(|e| e.to_string()),
            start: i.start.to_string(),
            end: i.end.to_string(),
            quantity: i.quantity,
            unit_price: i.unit_price,
            price: i.price,
        })
        .collect();
    BookingView {
        id: b.id.to_string(),
        status: b.status.as_str(),
        customer_id: b.customer_id.to_string(),
        venue_id: b.venue_id.to_string(),
        expires_at: b.expires_at.map(|t| t.to_string()),
        created_at: b.created_at.to_string(),
        updated_at: b.updated_at.to_string(),
        items,
        currency: b.currency.as_str().to_owned(),
        subtotal: b.subtotal,
        discount: b.discount,
        total: b.total,
        payment_attempts: b.payment_attempts,
        payment: b.payment.as_ref().map(|p| PaymentView {
            provider: p.provider.clone(),
            reference: p.reference.clone(),
            amount: p.amount,
            status: p.status.clone(),
        }),
        refund: b.refund.as_ref().map(|r| RefundView {
            amount: r.amount,
            reference: r.reference.clone(),
            failure: r.failure.clone(),
        }),
        cancel_reason: b.cancel_reason.clone(),
    }
}

/// A page of a list: `next_cursor` is `null` on the last page.
#[derive(Debug, Serialize, ToSchema)]
pub struct PageView<T> {
    pub data: Vec<T>,
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

pub fn page_json<T, V>(page: &Page<T>, render: impl Fn(&T) -> V) -> PageView<V> {
    PageView { data: page.items.iter().map(render).collect(), next_cursor: page.next_after.map(|u| u.to_string()) }
}

/// `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Status)]
pub struct StatusView {
    #[schema(example = "ok")]
    pub status: &'static str,
}

// Schema-only wire shapes of domain values the handlers read or send through serde: the
// domain crates know no OpenAPI, so their JSON is described here. `#[serde(default)]` marks
// what may be left out (but not sent as `null`).

/// A resource's time model; `kind` says which of the shapes it is.
#[derive(Serialize, ToSchema)]
#[schema(as = TimeModel)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[allow(dead_code)]
pub enum TimeModelJson {
    /// Fixed slots of `slot_minutes` inside opening hours (appointments).
    Slots(SlotsJson),
    /// Nights between check-in and check-out dates (rooms).
    Nights(NightsJson),
    /// Any interval on a `step_minutes` grid (chargers, studios).
    Free(FreeJson),
    /// Seats of events (cinema, flights).
    Events,
}

#[derive(Serialize, ToSchema)]
#[schema(as = SlotsModel)]
#[allow(dead_code)]
pub struct SlotsJson {
    pub slot_minutes: u32,
    pub schedule: ScheduleJson,
    #[serde(default)]
    pub max_slots: u32,
}

#[derive(Serialize, ToSchema)]
#[schema(as = NightsModel)]
#[allow(dead_code)]
pub struct NightsJson {
    /// `HH:MM` in the venue's zone.
    #[schema(example = "15:00", pattern = "^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")]
    #[serde(default)]
    pub check_in_time: String,
    #[schema(example = "11:00", pattern = "^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")]
    #[serde(default)]
    pub check_out_time: String,
    #[serde(default)]
    pub min_nights: u32,
    #[serde(default)]
    pub max_nights: u32,
}

#[derive(Serialize, ToSchema)]
#[schema(as = FreeModel)]
#[allow(dead_code)]
pub struct FreeJson {
    pub step_minutes: u32,
    pub min_minutes: u32,
    pub max_minutes: u32,
    pub schedule: Option<ScheduleJson>,
}

/// Weekly opening hours plus dated exceptions, in the venue's zone.
#[derive(Serialize, ToSchema)]
#[schema(as = WeeklySchedule)]
#[allow(dead_code)]
pub struct ScheduleJson {
    pub weekly: Vec<WeeklyHoursJson>,
    #[serde(default)]
    pub exceptions: Vec<ScheduleExceptionJson>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = WeeklyHours)]
#[allow(dead_code)]
pub struct WeeklyHoursJson {
    pub days: Vec<DayJson>,
    #[schema(example = "09:00", pattern = "^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")]
    pub open: String,
    #[schema(example = "17:00", pattern = "^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")]
    pub close: String,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Day, rename_all = "lowercase")]
#[allow(dead_code)]
pub enum DayJson {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// A date whose hours replace the weekly ones; no hours means closed.
#[derive(Serialize, ToSchema)]
#[schema(as = ScheduleException)]
#[allow(dead_code)]
pub struct ScheduleExceptionJson {
    #[schema(format = Date)]
    pub date: String,
    #[serde(default)]
    pub hours: Vec<HoursJson>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Hours)]
#[allow(dead_code)]
pub struct HoursJson {
    #[schema(pattern = "^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")]
    pub open: String,
    #[schema(pattern = "^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$")]
    pub close: String,
}

/// Booking rules of a resource; every field is optional on input.
#[derive(Serialize, ToSchema)]
#[schema(as = ResourceRules)]
#[allow(dead_code)]
pub struct RulesJson {
    #[serde(default)]
    pub buffer_before_minutes: u32,
    #[serde(default)]
    pub buffer_after_minutes: u32,
    #[serde(default)]
    pub min_notice_minutes: u32,
    #[serde(default)]
    pub max_advance_days: u32,
    #[serde(default)]
    pub overbooking_percent: u32,
    #[serde(default)]
    pub capacity_overrides: Vec<CapacityOverrideJson>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = CapacityOverride)]
#[allow(dead_code)]
pub struct CapacityOverrideJson {
    #[schema(format = Date)]
    pub from: String,
    #[schema(format = Date)]
    pub to: String,
    pub capacity: u32,
}

// Roles and partner API keys.

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleBody {
    /// `customer`, `manager` or `admin`.
    #[schema(example = "manager")]
    pub role: String,
    /// Required for `manager` (the venue managed), refused for the other roles.
    #[schema(value_type = Option<uuid::Uuid>)]
    pub venue_id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyBody {
    #[schema(example = "Channel manager")]
    pub name: String,
    /// Any of `inventory:read`, `bookings:read`, `bookings:write`.
    #[schema(example = json!(["bookings:read", "bookings:write"]))]
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

/// A partner API key as listed: never the key itself, nor its digest.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ApiKey)]
pub struct ApiKeyView {
    pub id: String,
    pub name: String,
    pub scopes: Vec<&'static str>,
    pub created_by: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(required = true, format = DateTime)]
    pub revoked_at: Option<String>,
}

pub fn api_key_json(k: &ApiKey) -> ApiKeyView {
    ApiKeyView {
        id: k.id.to_string(),
        name: k.name.clone(),
        scopes: k.scopes.iter().map(|s| s.as_str()).collect(),
        created_by: k.created_by.to_string(),
        created_at: k.created_at.to_string(),
        revoked_at: k.revoked_at.map(|t| t.to_string()),
    }
}

/// A key just created, with the key itself (`allot_pk_…`): shown this once, stored only as
/// its SHA-256.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = CreatedApiKey)]
pub struct CreatedApiKeyView {
    #[serde(flatten)]
    pub listed: ApiKeyView,
    pub key: String,
}

pub fn created_api_key_json(created: &CreatedApiKey) -> CreatedApiKeyView {
    CreatedApiKeyView { listed: api_key_json(&created.key), key: created.secret.clone() }
}
