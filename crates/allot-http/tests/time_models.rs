//! The four time models of SPEC §2 over real HTTP — slots, nights, free intervals and event
//! seats: what a hold claims, what it costs, what conflicts, and what availability shows.
//!
//! The test clock is Monday 2026-11-23 09:00 in Berlin (08:00Z); Berlin is UTC+1 in
//! November/December, so 10:00 local is 09:00Z.
#![allow(clippy::unwrap_used)]

mod common;

use common::TestApp;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A doctor seeing `capacity` patients per 30-min slot, Mon–Fri 09:00–17:00, closed on
/// Christmas Eve, bookable at least `min_notice` minutes ahead; 5000 per slot.
fn doctor(capacity: u32, min_notice: u32) -> Value {
    json!({"name": "Dr Slot", "capacity": capacity, "unit_price": 5000, "attributes": {"specialty": "gp"},
           "time_model": {"kind": "slots", "slot_minutes": 30,
                          "schedule": {"weekly": [{"days": ["mon", "tue", "wed", "thu", "fri"], "open": "09:00", "close": "17:00"}],
                                       "exceptions": [{"date": "2026-12-24", "hours": []}]},
                          "max_slots": 4},
           "rules": {"min_notice_minutes": min_notice}})
}

/// An EV charger: 15..240 min in 15-min steps, 24/7, 1200 per hour, 15 min buffer after.
fn charger(buffer_after: u32) -> Value {
    json!({"name": "CCS 1", "capacity": 1, "unit_price": 1200, "attributes": {"connector": "ccs"},
           "time_model": {"kind": "free", "step_minutes": 15, "min_minutes": 15, "max_minutes": 240},
           "rules": {"buffer_after_minutes": buffer_after}})
}

fn interval(resource: &str, start: &str, end: &str, quantity: u32) -> Value {
    json!({"items": [{"resource_id": resource, "start": start, "end": end, "quantity": quantity}]})
}

fn stay(resource: &str, check_in: &str, check_out: &str, quantity: u32) -> Value {
    json!({"items": [{"resource_id": resource, "check_in": check_in, "check_out": check_out, "quantity": quantity}]})
}

async fn hold(t: &TestApp, token: &str, body: Value) -> (StatusCode, Value) {
    t.post(Some(token), "/bookings", body).await
}

/// Asserts a 201 hold and returns the booking.
async fn held(t: &TestApp, token: &str, body: Value) -> Value {
    let (status, booking) = hold(t, token, body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "hold {body}: {booking}");
    assert_eq!(booking["status"], "held");
    booking
}

/// Asserts a 409 `unavailable` naming item 0.
async fn refused(t: &TestApp, token: &str, body: Value) {
    let (status, response) = hold(t, token, body.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "hold {body} should conflict: {response}");
    assert_eq!(response["error"]["code"], "unavailable", "{response}");
    assert_eq!(response["error"]["details"]["item_index"], 0, "{response}");
}

async fn windows(t: &TestApp, resource: &str, query: &str) -> Vec<Value> {
    let (status, body) = t.get(None, &format!("/resources/{resource}/availability?{query}")).await;
    assert_eq!(status, StatusCode::OK, "availability {query}: {body}");
    assert_eq!(body["resource_id"], resource);
    body["windows"].as_array().unwrap().clone()
}

fn starts(windows: &[Value]) -> Vec<&str> {
    windows.iter().map(|w| w["start"].as_str().unwrap()).collect()
}

fn find<'a>(windows: &'a [Value], start: &str) -> Option<&'a Value> {
    windows.iter().find(|w| w["start"] == start)
}

async fn claims(t: &TestApp) -> i64 {
    t.store.count("claims", "1=1").await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// slots
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn slots_two_consecutive_slots_cost_two_unit_prices() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "clinic").await;
    let dr = t.resource(&admin, &venue, doctor(2, 0)).await;
    let customer = t.customer("slots@test.allot").await;

    // Tuesday 10:00–11:00 local: two 30-min slots.
    let booking = held(&t, &customer, interval(&dr, "2026-11-24T09:00:00Z", "2026-11-24T10:00:00Z", 1)).await;
    let item = &booking["items"][0];
    assert_eq!(item["start"], "2026-11-24T09:00:00Z");
    assert_eq!(item["end"], "2026-11-24T10:00:00Z");
    assert_eq!(item["quantity"], 1);
    assert_eq!(item["unit_price"], 2 * 5000, "two slots at 5000: {booking}");
    assert_eq!(item["price"], 2 * 5000);
    assert_eq!(booking["subtotal"], 10_000);
    assert_eq!(booking["total"], 10_000);
    assert_eq!(booking["currency"], "EUR");

    // Two patients for the same two slots: quantity multiplies the price.
    let booking = held(&t, &customer, interval(&dr, "2026-11-24T10:00:00Z", "2026-11-24T11:00:00Z", 2)).await;
    assert_eq!(booking["items"][0]["unit_price"], 10_000);
    assert_eq!(booking["items"][0]["price"], 20_000);
    assert_eq!(booking["total"], 20_000);

    // A single slot at the end of the day (16:30–17:00 local) is inside the hours.
    let booking = held(&t, &customer, interval(&dr, "2026-11-24T15:30:00Z", "2026-11-24T16:00:00Z", 1)).await;
    assert_eq!(booking["total"], 5000);
}

#[tokio::test]
async fn slots_a_doctor_seeing_two_patients_takes_two_holds_of_a_slot_then_409() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "clinic").await;
    let dr = t.resource(&admin, &venue, doctor(2, 0)).await;
    let a = t.customer("a@test.allot").await;
    let b = t.customer("b@test.allot").await;
    let c = t.customer("c@test.allot").await;
    let slot = interval(&dr, "2026-11-25T13:00:00Z", "2026-11-25T13:30:00Z", 1);

    held(&t, &a, slot.clone()).await;
    held(&t, &b, slot.clone()).await;
    let before = claims(&t).await;
    refused(&t, &c, slot.clone()).await;
    // A longer claim overlapping the full slot is refused too; nothing is claimed by refusals.
    refused(&t, &c, interval(&dr, "2026-11-25T12:30:00Z", "2026-11-25T13:30:00Z", 1)).await;
    assert_eq!(claims(&t).await, before, "a refused hold claimed something");
    // The neighbouring slots are unaffected.
    held(&t, &c, interval(&dr, "2026-11-25T12:30:00Z", "2026-11-25T13:00:00Z", 1)).await;
    held(&t, &c, interval(&dr, "2026-11-25T13:30:00Z", "2026-11-25T14:00:00Z", 2)).await;
}

#[tokio::test]
async fn slots_minimum_notice_is_respected() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "clinic").await;
    let dr = t.resource(&admin, &venue, doctor(1, 120)).await;
    let customer = t.customer("notice@test.allot").await;

    // Now is 09:00 local; with 120 min notice 10:00 and 10:30 are too soon, 11:00 is fine.
    for (start, end) in
        [("2026-11-23T09:00:00Z", "2026-11-23T09:30:00Z"), ("2026-11-23T09:30:00Z", "2026-11-23T10:00:00Z")]
    {
        let (status, body) = hold(&t, &customer, interval(&dr, start, end, 1)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{start}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request");
        assert!(body["error"]["details"]["fields"]["items[0].start"].is_string(), "{body}");
    }
    held(&t, &customer, interval(&dr, "2026-11-23T10:00:00Z", "2026-11-23T10:30:00Z", 1)).await;
    // Tomorrow's first slot is far enough ahead.
    held(&t, &customer, interval(&dr, "2026-11-24T08:00:00Z", "2026-11-24T08:30:00Z", 1)).await;
}

#[tokio::test]
async fn slots_availability_lists_opening_hours_only_and_tracks_holds() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "clinic").await;
    let dr = t.resource(&admin, &venue, doctor(2, 120)).await;
    let customer = t.customer("avail-slots@test.allot").await;

    // Tuesday: 09:00–17:00 local = 08:00Z–16:00Z, sixteen 30-min slots, 2 left each.
    let tuesday = windows(&t, &dr, "from=2026-11-24&to=2026-11-25").await;
    assert_eq!(tuesday.len(), 16, "{tuesday:?}");
    assert_eq!(tuesday[0]["start"], "2026-11-24T08:00:00Z");
    assert_eq!(tuesday[0]["end"], "2026-11-24T08:30:00Z");
    assert_eq!(tuesday[15]["start"], "2026-11-24T15:30:00Z");
    assert_eq!(tuesday[15]["end"], "2026-11-24T16:00:00Z");
    for w in &tuesday {
        assert_eq!(w["remaining"], 2, "{w}");
        assert_eq!(w["price"], 5000, "{w}");
        let start = w["start"].as_str().unwrap();
        assert!(("2026-11-24T08:00:00Z".."2026-11-24T16:00:00Z").contains(&start), "outside hours: {w}");
    }

    // Today: now is 09:00 local and notice is 2 h, so the first slot is 11:00 local.
    let today = windows(&t, &dr, "from=2026-11-23&to=2026-11-24").await;
    assert_eq!(today.first().map(|w| w["start"].clone()), Some(json!("2026-11-23T10:00:00Z")), "{today:?}");
    assert_eq!(today.len(), 12);

    // Closed days: the weekend and the Christmas Eve exception; the day before is open.
    assert!(windows(&t, &dr, "from=2026-11-28&to=2026-11-30").await.is_empty(), "weekend has no slots");
    assert!(windows(&t, &dr, "from=2026-12-24&to=2026-12-25").await.is_empty(), "exception date has no slots");
    assert_eq!(windows(&t, &dr, "from=2026-12-23&to=2026-12-24").await.len(), 16);
    // A whole week: five open days, minus what notice removes from today.
    assert_eq!(windows(&t, &dr, "from=2026-11-23&to=2026-11-30").await.len(), 12 + 4 * 16);
    // A range given as instants cuts the day.
    let cut = windows(&t, &dr, "from=2026-11-24T09:00:00Z&to=2026-11-24T10:00:00Z").await;
    assert_eq!(starts(&cut), vec!["2026-11-24T09:00:00Z", "2026-11-24T09:30:00Z"]);

    // One hold: that slot has 1 left, and no longer qualifies for quantity=2.
    held(&t, &customer, interval(&dr, "2026-11-24T09:00:00Z", "2026-11-24T09:30:00Z", 1)).await;
    let after_one = windows(&t, &dr, "from=2026-11-24&to=2026-11-25").await;
    assert_eq!(after_one.len(), 16);
    assert_eq!(find(&after_one, "2026-11-24T09:00:00Z").unwrap()["remaining"], 1);
    assert_eq!(find(&after_one, "2026-11-24T09:30:00Z").unwrap()["remaining"], 2);
    let pairs = windows(&t, &dr, "from=2026-11-24&to=2026-11-25&quantity=2").await;
    assert_eq!(pairs.len(), 15);
    assert!(find(&pairs, "2026-11-24T09:00:00Z").is_none());

    // Fully booked: the slot disappears.
    held(&t, &customer, interval(&dr, "2026-11-24T09:00:00Z", "2026-11-24T09:30:00Z", 1)).await;
    let full = windows(&t, &dr, "from=2026-11-24&to=2026-11-25").await;
    assert_eq!(full.len(), 15, "{full:?}");
    assert!(find(&full, "2026-11-24T09:00:00Z").is_none(), "a full slot is still listed");
}

// ---------------------------------------------------------------------------------------------
// nights
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn nights_a_two_night_stay_costs_two_nights() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "hotel").await;
    let room = t.room_type(&admin, &venue, 3, 0).await;
    let customer = t.customer("nights@test.allot").await;

    let booking = held(&t, &customer, stay(&room, "2026-12-10", "2026-12-12", 1)).await;
    let item = &booking["items"][0];
    // Default check-in 15:00 and check-out 11:00 local (UTC+1).
    assert_eq!(item["start"], "2026-12-10T14:00:00Z");
    assert_eq!(item["end"], "2026-12-12T10:00:00Z");
    assert_eq!(item["unit_price"], 2 * 10_000, "{booking}");
    assert_eq!(item["price"], 2 * 10_000);
    assert_eq!(booking["total"], 20_000);

    // Two rooms for the same two nights.
    let booking = held(&t, &customer, stay(&room, "2026-12-10", "2026-12-12", 2)).await;
    assert_eq!(booking["items"][0]["unit_price"], 20_000);
    assert_eq!(booking["items"][0]["price"], 40_000);
    assert_eq!(booking["total"], 40_000);

    // One night.
    let booking = held(&t, &customer, stay(&room, "2026-12-20", "2026-12-21", 1)).await;
    assert_eq!(booking["total"], 10_000);
}

#[tokio::test]
async fn nights_consecutive_stays_do_not_conflict() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "hotel").await;
    let room = t.room_type(&admin, &venue, 1, 0).await;
    let a = t.customer("first@test.allot").await;
    let b = t.customer("second@test.allot").await;

    held(&t, &a, stay(&room, "2026-12-10", "2026-12-12", 1)).await;
    // Check-out day of one stay is the check-in day of the next, before and after.
    held(&t, &b, stay(&room, "2026-12-12", "2026-12-14", 1)).await;
    held(&t, &b, stay(&room, "2026-12-08", "2026-12-10", 1)).await;
    // Overlapping stays are refused.
    refused(&t, &b, stay(&room, "2026-12-11", "2026-12-13", 1)).await;
    refused(&t, &b, stay(&room, "2026-12-09", "2026-12-10", 1)).await;
    refused(&t, &b, stay(&room, "2026-12-05", "2026-12-20", 1)).await;
}

#[tokio::test]
async fn nights_a_capacity_override_of_zero_refuses_stays_in_its_dates() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "hotel").await;
    let room = t
        .resource(
            &admin,
            &venue,
            json!({"name": "Double", "capacity": 2, "unit_price": 10000, "time_model": {"kind": "nights"},
               "rules": {"capacity_overrides": [{"from": "2026-12-20", "to": "2026-12-22", "capacity": 0}]}}),
        )
        .await;
    let customer = t.customer("closed@test.allot").await;

    // Nights of the 20th and 21st are closed: any stay including one of them is refused.
    refused(&t, &customer, stay(&room, "2026-12-20", "2026-12-21", 1)).await;
    refused(&t, &customer, stay(&room, "2026-12-21", "2026-12-22", 1)).await;
    refused(&t, &customer, stay(&room, "2026-12-19", "2026-12-21", 1)).await;
    refused(&t, &customer, stay(&room, "2026-12-21", "2026-12-23", 1)).await;
    refused(&t, &customer, stay(&room, "2026-12-15", "2026-12-25", 1)).await;
    assert_eq!(claims(&t).await, 0);
    // Stays clear of the range are fine, including checking in on the day it ends.
    held(&t, &customer, stay(&room, "2026-12-16", "2026-12-18", 2)).await;
    held(&t, &customer, stay(&room, "2026-12-22", "2026-12-24", 2)).await;

    let nights = windows(&t, &room, "from=2026-12-20&to=2026-12-22").await;
    assert!(nights.is_empty(), "closed nights are listed: {nights:?}");
}

/// A room type whose capacity is overridden to `capacity` for the dates 2026-12-20..2026-12-22.
async fn overridden_room(t: &TestApp, admin: &str, venue: &str, base: u32, capacity: u32) -> String {
    t.resource(
        admin,
        venue,
        json!({"name": "Double", "capacity": base, "unit_price": 10000, "time_model": {"kind": "nights"},
               "rules": {"capacity_overrides": [{"from": "2026-12-20", "to": "2026-12-22", "capacity": capacity}]}}),
    )
    .await
}

/// An override for the dates `[from, to)` is about the *nights* of those dates: closing the
/// 20th and 21st does not close the night of the 19th, whose guests check out on the 20th.
#[tokio::test]
async fn nights_a_closure_leaves_the_night_before_it_open() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "hotel").await;
    let room = overridden_room(&t, &admin, &venue, 1, 0).await;
    let customer = t.customer("closure@test.allot").await;

    let night = windows(&t, &room, "from=2026-12-19&to=2026-12-20").await;
    assert_eq!(night.len(), 1, "the night of the 19th (check-out on the 20th, 11:00) is not closed: {night:?}");
    held(&t, &customer, stay(&room, "2026-12-18", "2026-12-20", 1)).await;
}

/// Extra rooms for the dates `[from, to)` are sellable on every one of those nights, including
/// the last (check-out on `to`).
#[tokio::test]
async fn nights_extra_rooms_cover_the_last_night_of_the_override() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "hotel").await;
    let room = overridden_room(&t, &admin, &venue, 1, 2).await;
    let customer = t.customer("extra@test.allot").await;

    let nights = windows(&t, &room, "from=2026-12-20&to=2026-12-22").await;
    let remaining: Vec<(&str, u64)> =
        nights.iter().map(|w| (w["date"].as_str().unwrap(), w["remaining"].as_u64().unwrap())).collect();
    assert_eq!(remaining, vec![("2026-12-20", 2), ("2026-12-21", 2)], "both nights have the extra room: {nights:?}");
    held(&t, &customer, stay(&room, "2026-12-21", "2026-12-22", 2)).await;
}

#[tokio::test]
async fn nights_availability_has_one_window_per_night_with_overbooking() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "hotel").await;
    // 2 rooms with 50 % overbooking: 3 sellable per night.
    let room = t.room_type(&admin, &venue, 2, 50).await;
    let customer = t.customer("avail-nights@test.allot").await;

    let nights = windows(&t, &room, "from=2026-12-10&to=2026-12-13").await;
    assert_eq!(nights.len(), 3, "{nights:?}");
    for (w, (date, start, end)) in nights.iter().zip([
        ("2026-12-10", "2026-12-10T14:00:00Z", "2026-12-11T10:00:00Z"),
        ("2026-12-11", "2026-12-11T14:00:00Z", "2026-12-12T10:00:00Z"),
        ("2026-12-12", "2026-12-12T14:00:00Z", "2026-12-13T10:00:00Z"),
    ]) {
        assert_eq!(w["date"], date, "{w}");
        assert_eq!(w["start"], start, "{w}");
        assert_eq!(w["end"], end, "{w}");
        assert_eq!(w["remaining"], 3, "overbooking adds 50 %: {w}");
        assert_eq!(w["price"], 10_000, "{w}");
    }

    held(&t, &customer, stay(&room, "2026-12-10", "2026-12-12", 2)).await;
    let nights = windows(&t, &room, "from=2026-12-10&to=2026-12-13").await;
    let remaining: Vec<(&str, u64)> =
        nights.iter().map(|w| (w["date"].as_str().unwrap(), w["remaining"].as_u64().unwrap())).collect();
    assert_eq!(remaining, vec![("2026-12-10", 1), ("2026-12-11", 1), ("2026-12-12", 3)]);
    let pairs = windows(&t, &room, "from=2026-12-10&to=2026-12-13&quantity=2").await;
    assert_eq!(pairs.iter().map(|w| w["date"].as_str().unwrap()).collect::<Vec<_>>(), vec!["2026-12-12"]);

    // The third (overbooked) room of the 10th; then that night is gone, and a 4th is refused.
    held(&t, &customer, stay(&room, "2026-12-10", "2026-12-11", 1)).await;
    let nights = windows(&t, &room, "from=2026-12-10&to=2026-12-13").await;
    assert_eq!(
        nights.iter().map(|w| w["date"].as_str().unwrap()).collect::<Vec<_>>(),
        vec!["2026-12-11", "2026-12-12"]
    );
    refused(&t, &customer, stay(&room, "2026-12-10", "2026-12-11", 1)).await;
    // The whole overbooked capacity in one item is a valid quantity.
    held(&t, &customer, stay(&room, "2026-12-12", "2026-12-13", 3)).await;
}

// ---------------------------------------------------------------------------------------------
// free
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn free_durations_in_steps_between_min_and_max_priced_per_hour() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "charging").await;
    let ev = t.resource(&admin, &venue, charger(0)).await;
    let customer = t.customer("free@test.allot").await;

    // (start, end, expected status, expected price at 1200/h)
    let cases = [
        ("2026-11-24T09:00:00Z", "2026-11-24T09:15:00Z", StatusCode::CREATED, Some(300)),
        ("2026-11-24T10:00:00Z", "2026-11-24T11:30:00Z", StatusCode::CREATED, Some(1800)),
        ("2026-11-24T12:00:00Z", "2026-11-24T16:00:00Z", StatusCode::CREATED, Some(4800)),
        // Across local midnight: the charger is open 24/7.
        ("2026-11-24T22:00:00Z", "2026-11-25T00:30:00Z", StatusCode::CREATED, Some(3000)),
        ("2026-11-26T09:00:00Z", "2026-11-26T13:15:00Z", StatusCode::UNPROCESSABLE_ENTITY, None),
        ("2026-11-26T09:00:00Z", "2026-11-26T09:10:00Z", StatusCode::UNPROCESSABLE_ENTITY, None),
        ("2026-11-26T09:00:00Z", "2026-11-26T09:50:00Z", StatusCode::UNPROCESSABLE_ENTITY, None),
        ("2026-11-26T09:05:00Z", "2026-11-26T09:35:00Z", StatusCode::UNPROCESSABLE_ENTITY, None),
    ];
    for (start, end, expected, price) in cases {
        let (status, booking) = hold(&t, &customer, interval(&ev, start, end, 1)).await;
        assert_eq!(status, expected, "{start}..{end}: {booking}");
        if let Some(price) = price {
            assert_eq!(booking["items"][0]["start"], start);
            assert_eq!(booking["items"][0]["end"], end);
            assert_eq!(booking["items"][0]["price"], price, "{start}..{end}: {booking}");
            assert_eq!(booking["total"], price);
        } else {
            assert_eq!(booking["error"]["code"], "invalid_request", "{booking}");
            let fields = booking["error"]["details"]["fields"].as_object().unwrap();
            assert!(fields.contains_key("items[0].end") || fields.contains_key("items[0].start"), "{booking}");
        }
    }
}

#[tokio::test]
async fn free_buffer_after_blocks_the_next_15_minutes() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "charging").await;
    let ev = t.resource(&admin, &venue, charger(15)).await;
    let a = t.customer("first-car@test.allot").await;
    let b = t.customer("second-car@test.allot").await;

    // 10:00–11:00 local; the charger is then blocked until 11:15.
    held(&t, &a, interval(&ev, "2026-11-24T09:00:00Z", "2026-11-24T10:00:00Z", 1)).await;
    refused(&t, &b, interval(&ev, "2026-11-24T10:00:00Z", "2026-11-24T10:30:00Z", 1)).await;
    let booking = held(&t, &b, interval(&ev, "2026-11-24T10:15:00Z", "2026-11-24T10:45:00Z", 1)).await;
    assert_eq!(booking["total"], 600, "30 min at 1200/h; the buffer is not charged");
    // Before it: a session ending at 10:00 would need its buffer over 10:00–10:15.
    refused(&t, &b, interval(&ev, "2026-11-24T08:30:00Z", "2026-11-24T09:00:00Z", 1)).await;
    held(&t, &b, interval(&ev, "2026-11-24T08:15:00Z", "2026-11-24T08:45:00Z", 1)).await;
}

#[tokio::test]
async fn free_availability_excludes_the_held_interval() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "charging").await;
    let ev = t.resource(&admin, &venue, charger(0)).await;
    let customer = t.customer("avail-free@test.allot").await;

    // Tuesday local day = 2026-11-23T23:00Z .. 2026-11-24T23:00Z, all free.
    let day = windows(&t, &ev, "from=2026-11-24&to=2026-11-25").await;
    assert_eq!(day.len(), 1, "{day:?}");
    assert_eq!(day[0]["start"], "2026-11-23T23:00:00Z");
    assert_eq!(day[0]["end"], "2026-11-24T23:00:00Z");
    assert_eq!(day[0]["remaining"], 1);

    held(&t, &customer, interval(&ev, "2026-11-24T09:00:00Z", "2026-11-24T10:00:00Z", 1)).await;
    let day = windows(&t, &ev, "from=2026-11-24&to=2026-11-25").await;
    let spans: Vec<(&str, &str)> =
        day.iter().map(|w| (w["start"].as_str().unwrap(), w["end"].as_str().unwrap())).collect();
    assert_eq!(
        spans,
        vec![("2026-11-23T23:00:00Z", "2026-11-24T09:00:00Z"), ("2026-11-24T10:00:00Z", "2026-11-24T23:00:00Z")],
        "{day:?}"
    );
    for w in &day {
        assert!(w["remaining"].as_u64().unwrap() >= 1);
    }
    // Default range starts now (08:00Z Monday) and ignores the past.
    let default = windows(&t, &ev, "").await;
    assert_eq!(default.first().map(|w| w["start"].clone()), Some(json!("2026-11-23T08:00:00Z")), "{default:?}");
}

/// Every free window must be holdable: with a 15-min buffer after each session, the time just
/// before an existing session cannot be held up to its very start, so windows must stop short.
#[tokio::test]
async fn free_availability_windows_account_for_buffers() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "charging").await;
    let ev = t.resource(&admin, &venue, charger(15)).await;
    let customer = t.customer("avail-buffer@test.allot").await;

    held(&t, &customer, interval(&ev, "2026-11-24T09:00:00Z", "2026-11-24T10:00:00Z", 1)).await;
    let day = windows(&t, &ev, "from=2026-11-24&to=2026-11-25").await;
    // Nothing may be listed over the held hour or its buffer.
    for w in &day {
        let (start, end) = (w["start"].as_str().unwrap(), w["end"].as_str().unwrap());
        assert!(end <= "2026-11-24T09:00:00Z" || start >= "2026-11-24T10:15:00Z", "window over the held time: {w}");
    }
    // The last 15 minutes of each listed window can really be held.
    for w in &day {
        let end: jiff::Timestamp = w["end"].as_str().unwrap().parse().unwrap();
        let start = end.checked_sub(jiff::SignedDuration::from_mins(15)).unwrap();
        let (status, body) = hold(&t, &customer, interval(&ev, &start.to_string(), &end.to_string(), 1)).await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "window {w} is listed but its end {start}..{end} cannot be held: {body}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// events
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn events_a_seat_is_priced_by_its_event_category() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 2, 48).await;
    // A seat in a category the event has no price for falls back to its own unit price.
    let vip = t
        .resource(
            &admin,
            &venue,
            json!({"name": "V1", "capacity": 1, "unit_price": 2500, "attributes": {"row": "V", "number": 1, "category": "vip"},
                   "time_model": {"kind": "events"}}),
        )
        .await;
    let start = "2026-11-26T19:00:00Z";
    let (status, second) = t
        .post(
            Some(&admin),
            &format!("/venues/{venue}/events"),
            json!({"name": "Late show", "start": start, "end": "2026-11-26T21:00:00Z", "seat_ids": [seats[0], seats[1], vip],
                   "price_categories": {"standard": 900, "premium": 1500}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let second = second["id"].as_str().unwrap().to_owned();
    let customer = t.customer("events@test.allot").await;

    let seat = |resource: &str, event: &str| json!({"resource_id": resource, "event_id": event});
    let b = held(&t, &customer, json!({"items": [seat(&seats[0], &event)]})).await;
    assert_eq!(b["items"][0]["unit_price"], 1200, "standard at the first show: {b}");
    assert_eq!(b["items"][0]["event_id"], event.as_str());
    assert_eq!(
        b["items"][0]["start"],
        t.clock_now().checked_add(jiff::SignedDuration::from_hours(48)).unwrap().to_string()
    );
    let b = held(&t, &customer, json!({"items": [seat(&seats[1], &event)]})).await;
    assert_eq!(b["items"][0]["unit_price"], 1800, "premium at the first show: {b}");

    // Same seats at the second show: its own prices; a multi-seat booking sums them.
    let b = held(
        &t,
        &customer,
        json!({"items": [seat(&seats[0], &second), seat(&seats[1], &second), seat(&vip, &second)]}),
    )
    .await;
    let prices: Vec<i64> = b["items"].as_array().unwrap().iter().map(|i| i["price"].as_i64().unwrap()).collect();
    assert_eq!(prices, vec![900, 1500, 2500], "{b}");
    assert_eq!(b["total"], 900 + 1500 + 2500);
    assert_eq!(b["items"][0]["start"], start);

    // A taken seat is refused.
    refused(&t, &customer, json!({"items": [seat(&seats[0], &event)]})).await;
}

#[tokio::test]
async fn events_availability_lists_the_seats_events_with_remaining() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, first) = t.seats_and_event(&admin, &venue, 2, 48).await;
    let (status, second) = t
        .post(
            Some(&admin),
            &format!("/venues/{venue}/events"),
            json!({"name": "Matinee", "start": "2026-11-27T13:00:00Z", "end": "2026-11-27T15:00:00Z", "seat_ids": seats,
                   "price_categories": {"standard": 800, "premium": 1100}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let second = second["id"].as_str().unwrap().to_owned();
    let customer = t.customer("avail-events@test.allot").await;

    let listed = windows(&t, &seats[0], "").await;
    let events: Vec<(&str, u64, i64)> = listed
        .iter()
        .map(|w| (w["event_id"].as_str().unwrap(), w["remaining"].as_u64().unwrap(), w["price"].as_i64().unwrap()))
        .collect();
    assert_eq!(events, vec![(first.as_str(), 1, 1200), (second.as_str(), 1, 800)], "{listed:?}");
    assert_eq!(listed[0]["end"], t.clock_now().checked_add(jiff::SignedDuration::from_hours(50)).unwrap().to_string());

    held(&t, &customer, json!({"items": [{"resource_id": seats[0], "event_id": first}]})).await;
    let listed = windows(&t, &seats[0], "").await;
    // The held show is gone (or shows 0 left); the other one still has the seat.
    let first_left = listed.iter().find(|w| w["event_id"] == first.as_str()).map(|w| w["remaining"].clone());
    assert!(first_left.is_none() || first_left == Some(json!(0)), "{listed:?}");
    let second_left = listed.iter().find(|w| w["event_id"] == second.as_str()).map(|w| w["remaining"].clone());
    assert_eq!(second_left, Some(json!(1)), "{listed:?}");
    // The other seat is untouched.
    assert_eq!(windows(&t, &seats[1], "").await.len(), 2);
    // A range that only covers the second show.
    let later = windows(&t, &seats[0], "from=2026-11-27&to=2026-11-28").await;
    assert_eq!(later.len(), 1);
    assert_eq!(later[0]["event_id"], second.as_str());
}

/// An availability bound written as a time with an offset is that instant, not its date.
#[tokio::test]
async fn availability_bounds_with_an_offset_are_instants() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "clinic").await;
    let dr = t.resource(&admin, &venue, doctor(1, 0)).await;

    let utc = windows(&t, &dr, "from=2026-11-24T12:00:00Z&to=2026-11-24T14:00:00Z").await;
    assert_eq!(
        starts(&utc),
        vec!["2026-11-24T12:00:00Z", "2026-11-24T12:30:00Z", "2026-11-24T13:00:00Z", "2026-11-24T13:30:00Z"]
    );
    // The same instants written in Berlin time (+01:00, URL-encoded).
    let offset = windows(&t, &dr, "from=2026-11-24T13:00:00%2B01:00&to=2026-11-24T15:00:00%2B01:00").await;
    assert_eq!(starts(&offset), starts(&utc), "{offset:?}");
}
