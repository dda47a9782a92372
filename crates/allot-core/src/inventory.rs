//! Venues, resources and events: what can be booked, where, under which rules, at what price.

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::booking::BookingItem;
use crate::capacity::{CapacityRules, Claim, OverrideSpan, Span};
use crate::error::{FieldErrors, ValidationError};
use crate::ids::{EventId, ItemId, ResourceId, UserId, VenueId};
use crate::time_model::{ClaimRequest, FreeModel, NightsModel, TimeModel};

pub const HOLD_TTL_SECONDS_MIN: u32 = 30;
pub const HOLD_TTL_SECONDS_DEFAULT: u32 = 600;
pub const HOLD_TTL_SECONDS_MAX: u32 = 24 * 3600;
pub const CAPACITY_MAX: u32 = 10_000_000;
pub const PRICE_MAX: i64 = 100_000_000_000;
/// The most one item may cost (minor units); keeps totals and refunds far from overflow.
pub const ITEM_PRICE_MAX: i64 = 1_000_000_000_000_000;
pub const OVERRIDES_MAX: usize = 100;
pub const EVENT_SEATS_MAX: usize = 2_000;
pub const NAME_LEN_MAX: usize = 200;
pub const EVENT_SECONDS_MAX: i64 = 31 * 86_400;

/// ISO 4217 currency code: three upper-case ASCII letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl TryFrom<String> for Currency {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.as_bytes() {
            [a, b, c] if s.bytes().all(|b| b.is_ascii_uppercase()) => Ok(Currency([*a, *b, *c])),
            _ => Err(format!("'{s}' is not an ISO 4217 code (three upper-case letters)")),
        }
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> Self {
        c.as_str().to_owned()
    }
}

/// Refunds when a confirmed booking is cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancellationPolicy {
    /// Full refund while at least this many hours remain before the start.
    pub free_until_hours_before: u32,
    /// Refund percent after that, until the start; none once started.
    pub late_refund_percent: u32,
}

impl Default for CancellationPolicy {
    fn default() -> Self {
        Self { free_until_hours_before: 24, late_refund_percent: 50 }
    }
}

impl CancellationPolicy {
    /// Refund in minor units for cancelling a booking of `total` starting at `start`, at `now`.
    pub fn refund(&self, total: i64, start: Timestamp, now: Timestamp) -> i64 {
        let seconds_left = start.as_second() - now.as_second();
        if seconds_left >= i64::from(self.free_until_hours_before) * 3600 {
            total
        } else if seconds_left > 0 {
            total * i64::from(self.late_refund_percent.min(100)) / 100
        } else {
            0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VenuePolicies {
    pub hold_ttl_seconds: u32,
    #[serde(default)]
    pub cancellation: CancellationPolicy,
}

impl Default for VenuePolicies {
    fn default() -> Self {
        Self { hold_ttl_seconds: HOLD_TTL_SECONDS_DEFAULT, cancellation: CancellationPolicy::default() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Location {
    pub lat: f64,
    pub lon: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Venue {
    pub id: VenueId,
    pub name: String,
    pub category: String,
    pub location: Location,
    pub address: String,
    /// IANA name; always one `jiff` knows (checked by [`Venue::validate`]).
    pub timezone: String,
    pub currency: Currency,
    pub rating: f64,
    pub amenities: Vec<String>,
    pub policies: VenuePolicies,
    pub managers: Vec<UserId>,
}

impl Venue {
    pub fn tz(&self) -> TimeZone {
        TimeZone::get(&self.timezone).unwrap_or(TimeZone::UTC)
    }

    pub fn validate(&self) -> FieldErrors {
        let mut e = FieldErrors::new();
        check_name(&mut e, "name", &self.name);
        check_name(&mut e, "category", &self.category);
        if self.address.len() > 500 {
            e.add("address", "at most 500 characters");
        }
        if !(-90.0..=90.0).contains(&self.location.lat) {
            e.add("location.lat", "must be between -90 and 90");
        }
        if !(-180.0..=180.0).contains(&self.location.lon) {
            e.add("location.lon", "must be between -180 and 180");
        }
        if TimeZone::get(&self.timezone).is_err() {
            e.add("timezone", format!("'{}' is not an IANA time zone", self.timezone));
        }
        if !(0.0..=5.0).contains(&self.rating) {
            e.add("rating", "must be between 0 and 5");
        }
        if self.amenities.len() > 50 || self.amenities.iter().any(|a| a.is_empty() || a.len() > 50) {
            e.add("amenities", "at most 50 amenities of 1 to 50 characters");
        }
        let ttl = self.policies.hold_ttl_seconds;
        if !(HOLD_TTL_SECONDS_MIN..=HOLD_TTL_SECONDS_MAX).contains(&ttl) {
            e.add(
                "policies.hold_ttl_seconds",
                format!("must be between {HOLD_TTL_SECONDS_MIN} and {HOLD_TTL_SECONDS_MAX}"),
            );
        }
        if self.policies.cancellation.late_refund_percent > 100 {
            e.add("policies.cancellation.late_refund_percent", "must be at most 100");
        }
        e
    }
}

fn check_name(e: &mut FieldErrors, field: &str, value: &str) {
    if value.trim().is_empty() || value.len() > NAME_LEN_MAX {
        e.add(field, format!("must be 1 to {NAME_LEN_MAX} characters"));
    }
}

/// A capacity that replaces the base one on local dates `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityOverride {
    #[serde(with = "crate::schedule::strict_date")]
    pub from: Date,
    #[serde(with = "crate::schedule::strict_date")]
    pub to: Date,
    pub capacity: u32,
}

/// Rules that apply to every claim on a resource, whatever its time model.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceRules {
    pub buffer_before_minutes: u32,
    pub buffer_after_minutes: u32,
    pub min_notice_minutes: u32,
    /// 0 means no limit.
    pub max_advance_days: u32,
    pub overbooking_percent: u32,
    pub capacity_overrides: Vec<CapacityOverride>,
}

impl ResourceRules {
    pub fn validate(&self) -> FieldErrors {
        let mut e = FieldErrors::new();
        if self.buffer_before_minutes > 24 * 60 || self.buffer_after_minutes > 24 * 60 {
            e.add("buffer_before_minutes", "buffers are at most 1440 minutes");
        }
        if self.min_notice_minutes > 366 * 24 * 60 {
            e.add("min_notice_minutes", "at most a year");
        }
        if self.max_advance_days > 5 * 366 {
            e.add("max_advance_days", "at most 1830 days");
        }
        if self.overbooking_percent > 100 {
            e.add("overbooking_percent", "must be between 0 and 100");
        }
        if self.capacity_overrides.len() > OVERRIDES_MAX {
            e.add("capacity_overrides", format!("at most {OVERRIDES_MAX} overrides"));
        }
        for (i, o) in self.capacity_overrides.iter().enumerate() {
            if o.from >= o.to {
                e.add(format!("capacity_overrides[{i}].to"), "must be after from");
            }
            if o.capacity > CAPACITY_MAX {
                e.add(format!("capacity_overrides[{i}].capacity"), format!("at most {CAPACITY_MAX}"));
            }
        }
        e
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub id: ResourceId,
    pub venue_id: VenueId,
    pub name: String,
    pub capacity: u32,
    /// Minor units per slot, per night, per hour (`free`) or per seat (`events`).
    pub unit_price: i64,
    /// Free-form document chosen by the client (seat row/number, room type, …), kept as text.
    pub attributes: String,
    /// Which of an event's price categories a seat falls in.
    pub price_category: Option<String>,
    pub time_model: TimeModel,
    pub rules: ResourceRules,
}

impl Resource {
    pub fn validate(&self) -> FieldErrors {
        let mut e = FieldErrors::new();
        check_name(&mut e, "name", &self.name);
        if self.capacity == 0 || self.capacity > CAPACITY_MAX {
            e.add("capacity", format!("must be between 1 and {CAPACITY_MAX}"));
        }
        if !(0..=PRICE_MAX).contains(&self.unit_price) {
            e.add("unit_price", format!("must be between 0 and {PRICE_MAX}"));
        }
        if self.attributes.len() > 16 * 1024 {
            e.add("attributes", "at most 16 KiB");
        }
        e.merge(self.time_model.validate().prefixed("time_model"));
        e.merge(self.rules.validate().prefixed("rules"));
        e
    }

    /// The inputs of the I1 rule for this resource, overrides turned into instants in `tz`.
    ///
    /// An override of dates `[from, to)` covers those whole local days, except for `nights`,
    /// where it covers the nights of those dates: check-in time on `from` to check-out on `to`.
    pub fn capacity_rules(&self, tz: &TimeZone) -> CapacityRules {
        let span_of = |o: &CapacityOverride| {
            let (start, end) = match &self.time_model {
                TimeModel::Nights(NightsModel { check_in_time, check_out_time, .. }) => {
                    (check_in_time.on(o.from, tz).as_second(), check_out_time.on(o.to, tz).as_second())
                }
                _ => (local_midnight(o.from, tz), local_midnight(o.to, tz)),
            };
            Span::new(start, end.max(start + 1))
        };
        let overrides = self
            .rules
            .capacity_overrides
            .iter()
            .filter(|o| o.from < o.to)
            .map(|o| OverrideSpan { span: span_of(o), capacity: o.capacity })
            .collect();
        CapacityRules { capacity: self.capacity, overbooking_percent: self.rules.overbooking_percent, overrides }
    }

    /// The most units one item may ever ask for (quantity above this is bad input, not a conflict).
    pub fn quantity_max(&self) -> u32 {
        let peak = self.rules.capacity_overrides.iter().map(|o| o.capacity).fold(self.capacity, u32::max);
        CapacityRules { capacity: peak, overbooking_percent: self.rules.overbooking_percent, overrides: vec![] }
            .effective_at(0)
    }

    /// The span blocked by a claim `[start, end)`: the buffers are added on both sides.
    pub fn blocked_span(&self, start: Timestamp, end: Timestamp) -> Span {
        Span::new(
            start.as_second() - i64::from(self.rules.buffer_before_minutes) * 60,
            end.as_second() + i64::from(self.rules.buffer_after_minutes) * 60,
        )
    }
}

/// Seconds since the epoch of local midnight starting `date` in `tz`.
pub fn local_midnight(date: Date, tz: &TimeZone) -> i64 {
    date.to_zoned(tz.clone()).map(|z| z.timestamp().as_second()).unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: EventId,
    pub venue_id: VenueId,
    pub name: String,
    pub start: Timestamp,
    pub end: Timestamp,
    pub seat_ids: Vec<ResourceId>,
    /// Category name → price in minor units per seat.
    pub price_categories: BTreeMap<String, i64>,
}

impl Event {
    pub fn validate(&self) -> FieldErrors {
        let mut e = FieldErrors::new();
        check_name(&mut e, "name", &self.name);
        if self.start.subsec_nanosecond() != 0 {
            e.add("start", "must be a whole second");
        }
        if self.end.subsec_nanosecond() != 0 {
            e.add("end", "must be a whole second");
        }
        if self.start >= self.end {
            e.add("end", "must be after start");
        } else if self.end.as_second() - self.start.as_second() > EVENT_SECONDS_MAX {
            e.add("end", "an event lasts at most 31 days");
        }
        if self.seat_ids.is_empty() || self.seat_ids.len() > EVENT_SEATS_MAX {
            e.add("seat_ids", format!("must list 1 to {EVENT_SEATS_MAX} seats"));
        }
        let mut sorted = self.seat_ids.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.seat_ids.len() {
            e.add("seat_ids", "must not repeat a seat");
        }
        for (name, price) in &self.price_categories {
            if name.is_empty() || name.len() > 50 {
                e.add("price_categories", "category names are 1 to 50 characters");
            }
            if !(0..=PRICE_MAX).contains(price) {
                e.add(format!("price_categories.{name}"), format!("must be between 0 and {PRICE_MAX}"));
            }
        }
        e
    }

    pub fn seat_price(&self, seat: &Resource) -> i64 {
        seat.price_category.as_ref().and_then(|c| self.price_categories.get(c)).copied().unwrap_or(seat.unit_price)
    }
}

/// One item of a hold request, after the edge parsed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemRequest {
    pub resource_id: ResourceId,
    pub event_id: Option<EventId>,
    pub claim: ClaimRequest,
    pub quantity: u32,
}

/// An item checked against its resource's rules: interval, blocked span and price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedItem {
    pub resource_id: ResourceId,
    pub event_id: Option<EventId>,
    pub start: Timestamp,
    pub end: Timestamp,
    pub quantity: u32,
    /// Price of one unit of quantity for the whole interval.
    pub unit_price: i64,
    pub price: i64,
    pub claim: Claim,
}

impl PricedItem {
    /// The booking item this priced request becomes, with a new id.
    pub fn to_booking_item(&self) -> BookingItem {
        BookingItem {
            id: ItemId::new(),
            resource_id: self.resource_id,
            event_id: self.event_id,
            start: self.start,
            end: self.end,
            quantity: self.quantity,
            unit_price: self.unit_price,
            price: self.price,
        }
    }
}

/// Checks one item against its resource (and event) at `now` and fixes its price.
///
/// Everything except capacity is checked here; capacity is the store's job, inside its
/// transaction, with [`crate::capacity::check_claim`].
pub fn price_item(
    venue: &Venue,
    resource: &Resource,
    event: Option<&Event>,
    request: ItemRequest,
    now: Timestamp,
) -> Result<PricedItem, ValidationError> {
    assert_eq!(resource.id, request.resource_id, "caller looks up the requested resource");
    assert_eq!(resource.venue_id, venue.id, "a resource belongs to its venue");
    let tz = venue.tz();
    let max = resource.quantity_max();
    if request.quantity == 0 || request.quantity > max {
        return Err(ValidationError::field("quantity", format!("must be between 1 and {max}")));
    }
    let claim = match (event, request.claim) {
        (Some(event), _) => {
            if !event.seat_ids.contains(&resource.id) {
                return Err(ValidationError::field("resource_id", "is not a seat of this event"));
            }
            if request.quantity != 1 {
                return Err(ValidationError::field("quantity", "a seat is booked one at a time"));
            }
            ClaimRequest::EventWindow { start: event.start, end: event.end }
        }
        (None, claim) => claim,
    };
    let resolved = resource.time_model.resolve(claim, &tz)?;
    let start_field = if matches!(claim, ClaimRequest::Stay { .. }) { "check_in" } else { "start" };
    check_notice(resource, resolved.start, now).map_err(|e| ValidationError::field(start_field, e))?;
    let units = i64::from(resolved.units);
    let unit_price = match (&resource.time_model, event) {
        (_, Some(event)) => Some(event.seat_price(resource)),
        (TimeModel::Free(FreeModel { .. }), None) => resource.unit_price.checked_mul(units).map(|p| (p + 30) / 60),
        _ => resource.unit_price.checked_mul(units),
    };
    let price = unit_price.and_then(|p| p.checked_mul(i64::from(request.quantity)));
    let (Some(unit_price), Some(price)) = (unit_price, price.filter(|p| *p <= ITEM_PRICE_MAX)) else {
        return Err(ValidationError::field("quantity", "the price of this item is too large"));
    };
    if resolved.start >= resolved.end {
        return Err(ValidationError::field("end", "must be after start"));
    }
    let blocked = resource.blocked_span(resolved.start, resolved.end);
    if blocked.end - blocked.start > crate::capacity::CLAIM_SECONDS_MAX {
        return Err(ValidationError::field("end", "the claim is too long"));
    }
    Ok(PricedItem {
        resource_id: resource.id,
        event_id: event.map(|e| e.id),
        start: resolved.start,
        end: resolved.end,
        quantity: request.quantity,
        unit_price,
        price,
        claim: Claim { span: blocked, quantity: request.quantity },
    })
}

fn check_notice(resource: &Resource, start: Timestamp, now: Timestamp) -> Result<(), String> {
    let lead_seconds = start.as_second() - now.as_second();
    let notice = i64::from(resource.rules.min_notice_minutes) * 60;
    if lead_seconds < notice {
        let message = if notice == 0 {
            "must not be in the past".to_owned()
        } else {
            format!("must be at least {} minutes from now", resource.rules.min_notice_minutes)
        };
        return Err(message);
    }
    let advance = i64::from(resource.rules.max_advance_days) * 86_400;
    if advance > 0 && lead_seconds > advance {
        return Err(format!("must be at most {} days ahead", resource.rules.max_advance_days));
    }
    Ok(())
}
