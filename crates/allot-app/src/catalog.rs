//! Catalogue use cases: venues, resources and events (read by anyone, written by the venue's
//! managers and admins), availability and seat maps.

use std::collections::HashMap;
use std::sync::Arc;

use allot_core::capacity::{self, Claim, Span};
use allot_core::ids::{EventId, ResourceId, VenueId};
use allot_core::inventory::{Event, Resource, Venue};
use allot_core::time_model::{FreeModel, NightsModel, SlotsModel, TimeModel};
use allot_core::{FieldErrors, ValidationError};
use jiff::Timestamp;
use jiff::civil::Date;

use crate::auth::Principal;
use crate::error::{AppError, AppResult, StoreError};
use crate::store::{Page, PageRequest, Role, SeatState, SeatVersion};
use crate::{App, audit};

/// Longest availability range one request may ask for.
pub const AVAILABILITY_DAYS_MAX: i64 = 62;
pub const AVAILABILITY_DAYS_DEFAULT: i64 = 7;
pub const AVAILABILITY_WINDOWS_MAX: usize = 5_000;

/// An edit of a catalogue document. It is applied to the stored document and written only if
/// that is still what is stored; when another change came first it is applied again to the
/// new version (up to [`EDIT_ATTEMPTS_MAX`] times), so it must not consume what it applies.
pub type Patch<T> = Box<dyn Fn(&mut T) + Send + Sync>;

/// Reads, edits and compare-and-set writes of one document before a concurrent change is
/// reported as a conflict: each lost race means another edit was written, so this bounds only
/// a burst of edits to one document.
pub const EDIT_ATTEMPTS_MAX: u32 = 3;

/// One end of an availability range as given: a local date or an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Date(Date),
    Instant(Timestamp),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvailabilityWindow {
    pub start: Timestamp,
    pub end: Timestamp,
    /// For `nights`: the night's date.
    pub date: Option<Date>,
    pub event_id: Option<EventId>,
    pub remaining: u32,
    pub price: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SeatView {
    pub resource: Resource,
    pub price: i64,
    pub state: Option<SeatState>,
}

impl App {
    /// A manager who creates a venue manages it, from the same transaction on.
    pub async fn create_venue(&self, principal: &Principal, mut venue: Venue) -> AppResult<Venue> {
        if !principal.is_admin() && !principal.roles.contains(&Role::Manager) {
            return Err(AppError::Forbidden("only managers and admins create venues"));
        }
        venue.validate().into_result()?;
        audit::set_target(venue.id);
        audit::set_venue(venue.id);
        if !principal.is_admin() {
            venue.managers = vec![principal.user_id];
        }
        self.store.insert_venue(&venue).await?;
        Ok(venue)
    }

    pub async fn venue(&self, id: VenueId) -> AppResult<Arc<Venue>> {
        self.store.venue(id).await?.ok_or(AppError::NotFound("venue"))
    }

    pub async fn venues(&self, page: PageRequest) -> AppResult<Page<Venue>> {
        Ok(self.store.venues(page).await?)
    }

    pub async fn update_venue(&self, principal: &Principal, id: VenueId, patch: Patch<Venue>) -> AppResult<Venue> {
        audit::set_venue(id);
        let mut attempt = 1;
        loop {
            let before = self.venue(id).await?;
            self.require_manager(principal, id)?;
            let mut venue = (*before).clone();
            patch(&mut venue);
            assert_eq!(venue.id, id, "a patch cannot change the id");
            venue.validate().into_result()?;
            match self.store.update_venue(&before, &venue).await {
                Err(StoreError::Changed(_)) if attempt < EDIT_ATTEMPTS_MAX => attempt += 1,
                written => return written.map(|()| venue).map_err(AppError::from),
            }
        }
    }

    pub async fn delete_venue(&self, principal: &Principal, id: VenueId) -> AppResult<()> {
        audit::set_venue(id);
        self.venue(id).await?;
        self.require_manager(principal, id)?;
        Ok(self.store.delete_venue(id, self.clock.now()).await?)
    }

    fn require_manager(&self, principal: &Principal, venue: VenueId) -> AppResult<()> {
        if principal.manages(venue) { Ok(()) } else { Err(AppError::Forbidden("you do not manage this venue")) }
    }

    pub async fn create_resource(&self, principal: &Principal, resource: Resource) -> AppResult<Resource> {
        audit::set_target(resource.id);
        audit::set_venue(resource.venue_id);
        self.venue(resource.venue_id).await?;
        self.require_manager(principal, resource.venue_id)?;
        resource.validate().into_result()?;
        self.store.insert_resource(&resource).await?;
        Ok(resource)
    }

    pub async fn resource(&self, id: ResourceId) -> AppResult<Arc<Resource>> {
        self.store.resource(id).await?.ok_or(AppError::NotFound("resource"))
    }

    pub async fn resources(&self, venue: VenueId, page: PageRequest) -> AppResult<Page<Resource>> {
        self.venue(venue).await?;
        Ok(self.store.resources(venue, page).await?)
    }

    /// Changes apply to new claims only: existing bookings are never evicted by a lower capacity.
    pub async fn update_resource(
        &self,
        principal: &Principal,
        id: ResourceId,
        patch: Patch<Resource>,
    ) -> AppResult<Resource> {
        let mut attempt = 1;
        loop {
            let before = self.resource(id).await?;
            audit::set_venue(before.venue_id);
            self.require_manager(principal, before.venue_id)?;
            let mut resource = (*before).clone();
            patch(&mut resource);
            assert_eq!(resource.id, id, "a patch cannot change the id");
            if (before.time_model.kind() == "events") != (resource.time_model.kind() == "events") {
                return Err(ValidationError::field("time_model.kind", "a seat cannot become a non-seat or back").into());
            }
            resource.validate().into_result()?;
            match self.store.update_resource(&before, &resource).await {
                Err(StoreError::Changed(_)) if attempt < EDIT_ATTEMPTS_MAX => attempt += 1,
                written => return written.map(|()| resource).map_err(AppError::from),
            }
        }
    }

    pub async fn delete_resource(&self, principal: &Principal, id: ResourceId) -> AppResult<()> {
        let resource = self.resource(id).await?;
        audit::set_venue(resource.venue_id);
        self.require_manager(principal, resource.venue_id)?;
        Ok(self.store.delete_resource(id, self.clock.now()).await?)
    }

    pub async fn create_event(&self, principal: &Principal, event: Event) -> AppResult<Event> {
        audit::set_target(event.id);
        audit::set_venue(event.venue_id);
        self.venue(event.venue_id).await?;
        self.require_manager(principal, event.venue_id)?;
        let mut errors = event.validate();
        if errors.is_empty() {
            let seats = self.store.resources_by_ids(&event.seat_ids).await?;
            for (i, id) in event.seat_ids.iter().enumerate() {
                match seats.iter().find(|s| s.id == *id) {
                    None => errors.add(format!("seat_ids[{i}]"), "no such resource"),
                    Some(s) if s.venue_id != event.venue_id => {
                        errors.add(format!("seat_ids[{i}]"), "belongs to another venue")
                    }
                    Some(s) if !matches!(s.time_model, TimeModel::Events) => {
                        errors.add(format!("seat_ids[{i}]"), "is not a seat (time model 'events')")
                    }
                    Some(_) => {}
                }
            }
        }
        errors.into_result()?;
        self.store.insert_event(&event).await?;
        Ok(event)
    }

    pub async fn event(&self, id: EventId) -> AppResult<Arc<Event>> {
        self.store.event(id).await?.ok_or(AppError::NotFound("event"))
    }

    pub async fn events(&self, venue: VenueId, page: PageRequest) -> AppResult<Page<Event>> {
        self.venue(venue).await?;
        Ok(self.store.events(venue, page).await?)
    }

    /// Every seat of the event with its price and whether it is held or booked now, as
    /// `render` writes it; a body rendered earlier is served again while nothing it shows can
    /// have changed ([`crate::seat_maps`]).
    pub async fn seat_map(
        &self,
        id: EventId,
        render: impl FnOnce(&Event, &[SeatView]) -> Result<Vec<u8>, String>,
    ) -> AppResult<Arc<[u8]>> {
        // Read before the version: an event is never changed, only deleted, and a deleted one
        // is not found here, so no body of one is served.
        let event = self.event(id).await?;
        let now = self.clock.now();
        let Some(seen) = self.store.seat_version(&event.seat_ids) else {
            return self.render_seat_map(&event, now, None, render).await;
        };
        if let Some(body) = self.seat_maps.get(id, seen, now) {
            return Ok(body);
        }
        let _turn = self.seat_maps.render_turn(id).await;
        // Whoever rendered while this request waited read a version at least as new as `seen`.
        if let Some(body) = self.seat_maps.get(id, seen, now) {
            return Ok(body);
        }
        let version = self.store.seat_version(&event.seat_ids);
        self.render_seat_map(&event, now, version, render).await
    }

    /// Reads the seats and their states and renders them; keeps the body when `version` (read
    /// before the states) is known.
    async fn render_seat_map(
        &self,
        event: &Event,
        now: Timestamp,
        version: Option<SeatVersion>,
        render: impl FnOnce(&Event, &[SeatView]) -> Result<Vec<u8>, String>,
    ) -> AppResult<Arc<[u8]>> {
        let seats = self.store.resources_by_ids(&event.seat_ids).await?;
        let states = self.store.seat_states(event, now).await?;
        let rendered = render(event, &seat_views(event, &seats, &states.states)).map_err(AppError::Internal)?;
        let body: Arc<[u8]> = Arc::from(rendered);
        if let Some(v) = version {
            self.seat_maps.put(event.id, v, states.until, body.clone());
        }
        Ok(body)
    }

    /// Claimable windows of a resource in `[from, to)` with at least `quantity` units left.
    pub async fn availability(
        &self,
        id: ResourceId,
        from: Option<Bound>,
        to: Option<Bound>,
        quantity: u32,
    ) -> AppResult<(Arc<Resource>, Vec<AvailabilityWindow>)> {
        let resource = self.resource(id).await?;
        let venue = self.venue(resource.venue_id).await?;
        let tz = venue.tz();
        let now = self.clock.now();
        let (from, to) = resolve_range(from, to, now, &tz)?;
        if quantity == 0 || quantity > resource.quantity_max() {
            return Err(ValidationError::field(
                "quantity",
                format!("must be between 1 and {}", resource.quantity_max()),
            )
            .into());
        }
        let wide = resource.blocked_span(from.0, to.0);
        let claims = self.store.claims(id, wide, now).await?;
        let rules = resource.capacity_rules(&tz);
        let remaining =
            |start: Timestamp, end: Timestamp| capacity::remaining(&rules, &claims, resource.blocked_span(start, end));
        let earliest = now.as_second() + i64::from(resource.rules.min_notice_minutes) * 60;
        let mut out = Vec::new();
        match &resource.time_model {
            TimeModel::Slots(SlotsModel { slot_minutes, schedule, .. }) => {
                let step = i64::from(*slot_minutes) * 60;
                for w in schedule.windows_between(from.0, to.0, &tz) {
                    let mut s = w.start.as_second();
                    while s + step <= w.end.as_second() && out.len() < AVAILABILITY_WINDOWS_MAX {
                        let (start, end) = (ts(s), ts(s + step));
                        if start >= from.0 && end <= to.0 && s >= earliest {
                            let left = remaining(start, end);
                            push_if(
                                &mut out,
                                AvailabilityWindow {
                                    start,
                                    end,
                                    date: None,
                                    event_id: None,
                                    remaining: left,
                                    price: resource.unit_price,
                                },
                                quantity,
                            );
                        }
                        s += step;
                    }
                }
            }
            TimeModel::Nights(NightsModel { .. }) => {
                for (date, start, end) in resource.time_model.nights_between(from.1, to.1, &tz) {
                    if start.as_second() >= earliest {
                        let left = remaining(start, end);
                        push_if(
                            &mut out,
                            AvailabilityWindow {
                                start,
                                end,
                                date: Some(date),
                                event_id: None,
                                remaining: left,
                                price: resource.unit_price,
                            },
                            quantity,
                        );
                    }
                }
            }
            TimeModel::Free(FreeModel { schedule, .. }) => {
                let open = match schedule {
                    Some(s) => s.windows_between(from.0, to.0, &tz),
                    None => vec![allot_core::schedule::Window { start: from.0, end: to.0 }],
                };
                for w in open {
                    let start = w.start.max(from.0).as_second().max(earliest);
                    let end = w.end.min(to.0).as_second();
                    if start < end {
                        let window = Span::new(start, end);
                        free_pieces(&mut out, &rules, &claims, &resource, window, quantity);
                    }
                }
            }
            TimeModel::Events => {
                let events = self
                    .store
                    .events_of_seat(
                        id,
                        Span::new(from.0.as_second(), to.0.as_second()),
                        AVAILABILITY_WINDOWS_MAX as u32,
                    )
                    .await?;
                for event in events.iter().filter(|e| e.start.as_second() >= earliest) {
                    let left = remaining(event.start, event.end);
                    push_if(
                        &mut out,
                        AvailabilityWindow {
                            start: event.start,
                            end: event.end,
                            date: None,
                            event_id: Some(event.id),
                            remaining: left,
                            price: event.seat_price(&resource),
                        },
                        quantity,
                    );
                }
            }
        }
        Ok((resource, out))
    }
}

/// The seat map of `event` from what the store read (no I/O): each of the event's seats found
/// among `seats`, in the event's order, with its price and its state in `states` (none: free).
pub fn seat_views(event: &Event, seats: &[Resource], states: &HashMap<ResourceId, SeatState>) -> Vec<SeatView> {
    let by_id: HashMap<ResourceId, &Resource> = seats.iter().map(|s| (s.id, s)).collect();
    event
        .seat_ids
        .iter()
        .filter_map(|id| by_id.get(id).copied())
        .map(|seat| SeatView {
            price: event.seat_price(seat),
            state: states.get(&seat.id).copied(),
            resource: seat.clone(),
        })
        .collect()
}

fn push_if(out: &mut Vec<AvailabilityWindow>, w: AvailabilityWindow, quantity: u32) {
    if w.remaining >= quantity && out.len() < AVAILABILITY_WINDOWS_MAX {
        out.push(w);
    }
}

/// Maximal bookable intervals of `window` with at least `quantity` left anywhere inside
/// (`remaining` is the least left in the interval). Capacity is tracked on the blocked
/// timeline (buffers included), so a run `[a, b)` of it is bookable as
/// `[a + buffer_before, b - buffer_after)`.
fn free_pieces(
    out: &mut Vec<AvailabilityWindow>,
    rules: &capacity::CapacityRules,
    claims: &[Claim],
    resource: &Resource,
    window: Span,
    quantity: u32,
) {
    let before = i64::from(resource.rules.buffer_before_minutes) * 60;
    let after = i64::from(resource.rules.buffer_after_minutes) * 60;
    let blocked = Span::new(window.start - before, window.end + after);
    let mut pieces: Vec<(i64, i64, u32)> = Vec::new();
    capacity::for_each_segment(rules, claims, blocked, |at, used, cap| {
        if let Some(last) = pieces.last_mut() {
            last.1 = at;
        }
        pieces.push((at, blocked.end, cap.saturating_sub(used)));
    });
    let mut joined: Vec<(i64, i64, u32)> = Vec::new();
    for (a, b, left) in pieces.into_iter().filter(|p| p.2 >= quantity) {
        match joined.last_mut() {
            Some(prev) if prev.1 == a => {
                prev.1 = b;
                prev.2 = prev.2.min(left);
            }
            _ => joined.push((a, b, left)),
        }
    }
    for (a, b, left) in joined {
        let (start, end) = ((a + before).max(window.start), (b - after).min(window.end));
        if start < end && out.len() < AVAILABILITY_WINDOWS_MAX {
            out.push(AvailabilityWindow {
                start: ts(start),
                end: ts(end),
                date: None,
                event_id: None,
                remaining: left,
                price: resource.unit_price,
            });
        }
    }
}

fn ts(seconds: i64) -> Timestamp {
    Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Turns the requested bounds into instants and local dates; defaults to the next 7 days.
fn resolve_range(
    from: Option<Bound>,
    to: Option<Bound>,
    now: Timestamp,
    tz: &jiff::tz::TimeZone,
) -> AppResult<((Timestamp, Date), (Timestamp, Date))> {
    // Whole seconds, like every claim: a fraction of a second has nothing to show.
    let resolve = |b: Bound| match b {
        Bound::Date(d) => (Timestamp::from_second(allot_core::inventory::local_midnight(d, tz)).unwrap_or(now), d),
        Bound::Instant(t) => (Timestamp::from_second(t.as_second()).unwrap_or(t), t.to_zoned(tz.clone()).date()),
    };
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let from = from.map_or_else(|| (now, now.to_zoned(tz.clone()).date()), resolve);
    let to = to.map_or_else(
        || {
            let d = allot_core::schedule::add_days(from.1, AVAILABILITY_DAYS_DEFAULT);
            (Timestamp::from_second(allot_core::inventory::local_midnight(d, tz)).unwrap_or(now), d)
        },
        resolve,
    );
    let mut errors = FieldErrors::new();
    if to.0 <= from.0 {
        errors.add("to", "must be after from");
    } else if to.0.as_second() - from.0.as_second() > AVAILABILITY_DAYS_MAX * 86_400 {
        errors.add("to", format!("the range is at most {AVAILABILITY_DAYS_MAX} days"));
    }
    errors.into_result()?;
    Ok((from, to))
}
