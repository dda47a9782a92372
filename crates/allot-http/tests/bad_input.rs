//! Invariant I8 over real HTTP: every malformed or invalid input gets a 4xx (never a 5xx) with
//! `error.code == "invalid_request"` and `error.details.fields` naming the field, and changes
//! nothing (no booking, claim, venue, resource or event appears; patched rows stay as they were).
//!
//! Most tests are tables: every case runs, failures are collected and reported together.
#![allow(clippy::unwrap_used)]

mod common;

use allot_app::store::Role;
use common::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};

const BAD: StatusCode = StatusCode::BAD_REQUEST;
const INVALID: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Sends `body` verbatim as a JSON request body.
async fn raw(
    t: &TestApp,
    method: Method,
    token: Option<&str>,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let mut req = t.client.request(method, t.url(path)).header("content-type", "application/json").body(body);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    common::read(req.send().await.unwrap()).await
}

/// Whether `fields` names `want`:
/// - `""`: any field at all;
/// - `"items[0]*"`: any field under that prefix;
/// - otherwise the exact path, or (for missing/unknown fields, which serde reports at the
///   enclosing object) the parent path whose message quotes the field's name.
fn names_field(fields: &Map<String, Value>, want: &str) -> bool {
    if want.is_empty() {
        return !fields.is_empty();
    }
    if let Some(prefix) = want.strip_suffix('*') {
        return fields.keys().any(|k| k.starts_with(prefix));
    }
    if fields.contains_key(want) {
        return true;
    }
    let (parent, leaf) = match want.rsplit_once('.') {
        Some((parent, leaf)) => (parent, leaf),
        None => ("body", want),
    };
    fields.get(parent).and_then(Value::as_str).is_some_and(|m| m.contains(&format!("`{leaf}`")))
}

/// `None` if the response is a proper I8 rejection, else a description of what is wrong.
fn rejection_problem(status: StatusCode, body: &Value, expected: StatusCode, field: &str) -> Option<String> {
    let mut problems = Vec::new();
    if status.is_server_error() {
        problems.push(format!("server error {status}"));
    } else if status != expected {
        problems.push(format!("status {status}, expected {expected}"));
    }
    if let Some(p) = error_shape_problem(body) {
        problems.push(p);
    }
    if body["error"]["code"] != "invalid_request" {
        problems.push(format!("code {}, expected invalid_request", body["error"]["code"]));
    }
    match body["error"]["details"]["fields"].as_object() {
        Some(fields) if fields.is_empty() => problems.push("details.fields is empty".to_owned()),
        Some(fields) if !names_field(fields, field) => problems.push(format!("details.fields does not name `{field}`")),
        Some(_) => {}
        None => problems.push("details.fields missing".to_owned()),
    }
    (!problems.is_empty()).then(|| format!("{}; body: {body}", problems.join(", ")))
}

/// `None` if `body` is `{"error": {"code": "...", "message": "...", "details": {...}}}`.
fn error_shape_problem(body: &Value) -> Option<String> {
    let e = &body["error"];
    if e["code"].as_str().is_none_or(str::is_empty) {
        return Some("error.code missing".to_owned());
    }
    if e["message"].as_str().is_none_or(str::is_empty) {
        return Some("error.message missing".to_owned());
    }
    if !e["details"].is_object() {
        return Some("error.details is not an object".to_owned());
    }
    None
}

fn assert_no_failures(what: &str, failures: &[String]) {
    assert!(failures.is_empty(), "{what}: {} case(s) failed:\n  {}", failures.len(), failures.join("\n  "));
}

async fn count(t: &TestApp, table: &str) -> i64 {
    t.store.count(table, "1=1").await.unwrap()
}

/// Counts of every table a bad request could write to.
async fn snapshot(t: &TestApp) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for table in ["users", "venues", "resources", "events", "event_seats", "bookings", "claims"] {
        out.push((table, count(t, table).await));
    }
    out
}

fn doctor_json() -> Value {
    json!({"name": "Dr Slot", "capacity": 2, "unit_price": 5000, "attributes": {"specialty": "gp"},
           "time_model": {"kind": "slots", "slot_minutes": 30,
                          "schedule": {"weekly": [{"days": ["mon", "tue", "wed", "thu", "fri"], "open": "09:00", "close": "17:00"}],
                                       "exceptions": [{"date": "2026-12-24", "hours": []}]},
                          "max_slots": 4},
           "rules": {"min_notice_minutes": 120, "max_advance_days": 90}})
}

fn charger_json() -> Value {
    json!({"name": "CCS 1", "capacity": 1, "unit_price": 1200, "attributes": {"connector": "ccs"},
           "time_model": {"kind": "free", "step_minutes": 15, "min_minutes": 15, "max_minutes": 240},
           "rules": {"buffer_after_minutes": 15}})
}

/// Everything the tests refer to: a venue with a doctor (slots), a room type (nights), a
/// charger (free), two seats with an event, and a second event over other seats.
struct World {
    t: TestApp,
    admin: String,
    customer: String,
    venue: String,
    doctor: String,
    room: String,
    charger: String,
    seats: Vec<String>,
    event: String,
    other_event: String,
    /// A resource at another venue.
    elsewhere: String,
}

async fn world() -> World {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "mixed").await;
    let doctor = t.resource(&admin, &venue, doctor_json()).await;
    let room = t.room_type(&admin, &venue, 2, 0).await;
    let charger = t.resource(&admin, &venue, charger_json()).await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 2, 48).await;
    let (_, other_event) = t.seats_and_event(&admin, &venue, 1, 96).await;
    let venue2 = t.venue(&admin, "other").await;
    let elsewhere = t.room_type(&admin, &venue2, 1, 0).await;
    let customer = t.customer("bad-input@test.allot").await;
    World { t, admin, customer, venue, doctor, room, charger, seats, event, other_event, elsewhere }
}

// ---------------------------------------------------------------------------------------------
// Holds
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_holds_are_refused_with_field_details_and_change_nothing() {
    let w = world().await;
    let t = &w.t;
    let (doctor, room, charger, seat, event, other_event) = (
        w.doctor.as_str(),
        w.room.as_str(),
        w.charger.as_str(),
        w.seats[0].as_str(),
        w.event.as_str(),
        w.other_event.as_str(),
    );
    let missing_id = uuid::Uuid::now_v7().as_simple().to_string();
    // Tuesday 2026-11-24, 10:00–10:30 Berlin: a valid slot for the doctor.
    let slot = |start: &str, end: &str| json!({"resource_id": doctor, "start": start, "end": end});
    let stay =
        |check_in: &str, check_out: &str| json!({"resource_id": room, "check_in": check_in, "check_out": check_out});
    let valid_slot = slot("2026-11-24T09:00:00Z", "2026-11-24T09:30:00Z");
    let many: Vec<Value> = (0..21).map(|_| valid_slot.clone()).collect();

    let json_cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        // Missing, null or mistyped top-level fields.
        ("missing items", json!({}), BAD, "items"),
        ("items null", json!({"items": null}), BAD, "items"),
        ("items a string", json!({"items": "x"}), BAD, "items"),
        ("items an object", json!({"items": {"resource_id": doctor}}), BAD, "items"),
        ("empty items", json!({"items": []}), INVALID, "items"),
        ("21 items", json!({"items": many}), INVALID, "items"),
        ("unknown top-level field", json!({"items": [valid_slot], "foo": 1}), BAD, "foo"),
        ("coupon_code a number", json!({"items": [valid_slot], "coupon_code": 5}), BAD, "coupon_code"),
        ("unknown coupon", json!({"items": [valid_slot], "coupon_code": "NOPE"}), INVALID, "coupon_code"),
        // Item fields of the wrong type or missing.
        ("item an empty object", json!({"items": [{}]}), BAD, "items[0].resource_id"),
        ("item a number", json!({"items": [7]}), BAD, "items[0]"),
        (
            "resource_id a number",
            json!({"items": [{"resource_id": 42, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z"}]}),
            BAD,
            "items[0].resource_id",
        ),
        (
            "resource_id malformed",
            json!({"items": [{"resource_id": "not-an-id", "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z"}]}),
            BAD,
            "items[0].resource_id",
        ),
        ("event_id malformed", json!({"items": [{"resource_id": seat, "event_id": "nope"}]}), BAD, "items[0].event_id"),
        (
            "quantity a word",
            json!({"items": [{"resource_id": doctor, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z", "quantity": "two"}]}),
            BAD,
            "items[0].quantity",
        ),
        (
            "quantity negative",
            json!({"items": [{"resource_id": doctor, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z", "quantity": -1}]}),
            BAD,
            "items[0].quantity",
        ),
        (
            "quantity fractional",
            json!({"items": [{"resource_id": doctor, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z", "quantity": 1.5}]}),
            BAD,
            "items[0].quantity",
        ),
        (
            "quantity huge",
            json!({"items": [{"resource_id": doctor, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z", "quantity": 99_999_999_999_u64}]}),
            BAD,
            "items[0].quantity",
        ),
        ("start not a time", json!({"items": [slot("tomorrow", "2026-11-24T09:30:00Z")]}), BAD, "items[0].start"),
        (
            "start without zone",
            json!({"items": [slot("2026-11-24T09:00:00", "2026-11-24T09:30:00Z")]}),
            BAD,
            "items[0].start",
        ),
        ("check_in not a date", json!({"items": [stay("2026-02-30", "2026-03-02")]}), BAD, "items[0].check_in"),
        (
            "check_in with a time",
            json!({"items": [stay("2026-12-10T15:00:00", "2026-12-12")]}),
            BAD,
            "items[0].check_in",
        ),
        (
            "check_in with a time and offset",
            json!({"items": [stay("2026-12-10T23:30:00-05:00", "2026-12-12")]}),
            BAD,
            "items[0].check_in",
        ),
        (
            "check_out a number",
            json!({"items": [{"resource_id": room, "check_in": "2026-12-10", "check_out": 20261212}]}),
            BAD,
            "items[0].check_out",
        ),
        (
            "unknown item field",
            json!({"items": [{"resource_id": doctor, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z", "seat": "A1"}]}),
            BAD,
            "items[0].seat",
        ),
        // Shapes.
        ("no shape at all", json!({"items": [{"resource_id": doctor}]}), INVALID, "items[0].start"),
        (
            "start without end",
            json!({"items": [{"resource_id": doctor, "start": "2026-11-24T09:00:00Z"}]}),
            INVALID,
            "items[0].end",
        ),
        (
            "end without start",
            json!({"items": [{"resource_id": doctor, "end": "2026-11-24T09:30:00Z"}]}),
            INVALID,
            "items[0].start",
        ),
        (
            "check_in without check_out",
            json!({"items": [{"resource_id": room, "check_in": "2026-12-10"}]}),
            INVALID,
            "items[0].check_out",
        ),
        (
            "mixed start and check_in",
            json!({"items": [{"resource_id": doctor, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z", "check_in": "2026-12-10", "check_out": "2026-12-12"}]}),
            INVALID,
            "items[0]*",
        ),
        (
            "mixed check_in and event_id",
            json!({"items": [{"resource_id": seat, "event_id": event, "check_in": "2026-12-10", "check_out": "2026-12-12"}]}),
            INVALID,
            "items[0]*",
        ),
        (
            "stay on a slots resource",
            json!({"items": [{"resource_id": doctor, "check_in": "2026-12-10", "check_out": "2026-12-12"}]}),
            INVALID,
            "items[0].resource_id",
        ),
        (
            "interval on a nights resource",
            json!({"items": [{"resource_id": room, "start": "2026-12-10T14:00:00Z", "end": "2026-12-11T10:00:00Z"}]}),
            INVALID,
            "items[0].resource_id",
        ),
        (
            "interval on a seat",
            json!({"items": [{"resource_id": seat, "start": "2026-11-25T08:00:00Z", "end": "2026-11-25T10:00:00Z"}]}),
            INVALID,
            "items[0].resource_id",
        ),
        // Unknown ids (well-formed).
        (
            "unknown resource",
            json!({"items": [{"resource_id": missing_id, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z"}]}),
            INVALID,
            "items[0].resource_id",
        ),
        (
            "unknown event",
            json!({"items": [{"resource_id": seat, "event_id": missing_id}]}),
            INVALID,
            "items[0].event_id",
        ),
        (
            "unknown resource in 2nd item",
            json!({"items": [valid_slot, {"resource_id": missing_id, "check_in": "2026-12-10", "check_out": "2026-12-12"}]}),
            INVALID,
            "items[1].resource_id",
        ),
        // Seats and events.
        (
            "seat not in the event",
            json!({"items": [{"resource_id": seat, "event_id": other_event}]}),
            INVALID,
            "items[0].resource_id",
        ),
        (
            "a non-seat with an event",
            json!({"items": [{"resource_id": doctor, "event_id": event}]}),
            INVALID,
            "items[0].resource_id",
        ),
        (
            "seat quantity 2",
            json!({"items": [{"resource_id": seat, "event_id": event, "quantity": 2}]}),
            INVALID,
            "items[0].quantity",
        ),
        // Slots: grid, schedule, notice, advance.
        (
            "start after end",
            json!({"items": [slot("2026-11-24T09:30:00Z", "2026-11-24T09:00:00Z")]}),
            INVALID,
            "items[0].end",
        ),
        (
            "start equals end",
            json!({"items": [slot("2026-11-24T09:00:00Z", "2026-11-24T09:00:00Z")]}),
            INVALID,
            "items[0].end",
        ),
        (
            "misaligned 09:10 local",
            json!({"items": [slot("2026-11-24T08:10:00Z", "2026-11-24T08:40:00Z")]}),
            INVALID,
            "items[0].start",
        ),
        (
            "not whole slots (45 min)",
            json!({"items": [slot("2026-11-24T09:00:00Z", "2026-11-24T09:45:00Z")]}),
            INVALID,
            "items[0].end",
        ),
        (
            "more than max_slots",
            json!({"items": [slot("2026-11-24T09:00:00Z", "2026-11-24T11:30:00Z")]}),
            INVALID,
            "items[0].end",
        ),
        (
            "Sunday (closed day)",
            json!({"items": [slot("2026-11-29T09:00:00Z", "2026-11-29T09:30:00Z")]}),
            INVALID,
            "items[0].start",
        ),
        (
            "exception date 2026-12-24",
            json!({"items": [slot("2026-12-24T09:00:00Z", "2026-12-24T09:30:00Z")]}),
            INVALID,
            "items[0].start",
        ),
        (
            "before opening (08:30 local)",
            json!({"items": [slot("2026-11-24T07:30:00Z", "2026-11-24T08:00:00Z")]}),
            INVALID,
            "items[0].start",
        ),
        (
            "after closing (17:00 local)",
            json!({"items": [slot("2026-11-24T16:00:00Z", "2026-11-24T16:30:00Z")]}),
            INVALID,
            "items[0].start",
        ),
        (
            "across closing (16:30-17:30 local)",
            json!({"items": [slot("2026-11-24T15:30:00Z", "2026-11-24T16:30:00Z")]}),
            INVALID,
            "items[0].start",
        ),
        (
            "in the past",
            json!({"items": [slot("2026-11-16T09:00:00Z", "2026-11-16T09:30:00Z")]}),
            INVALID,
            "items[0].start",
        ),
        (
            "inside min notice (today 10:00 local)",
            json!({"items": [slot("2026-11-23T09:00:00Z", "2026-11-23T09:30:00Z")]}),
            INVALID,
            "items[0].start",
        ),
        (
            "beyond max_advance_days",
            json!({"items": [slot("2027-06-01T09:00:00Z", "2027-06-01T09:30:00Z")]}),
            INVALID,
            "items[0].start",
        ),
        (
            "quantity 0",
            json!({"items": [{"resource_id": doctor, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z", "quantity": 0}]}),
            INVALID,
            "items[0].quantity",
        ),
        (
            "quantity above capacity",
            json!({"items": [{"resource_id": doctor, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z", "quantity": 3}]}),
            INVALID,
            "items[0].quantity",
        ),
        // Nights.
        (
            "check_out equals check_in",
            json!({"items": [stay("2026-12-10", "2026-12-10")]}),
            INVALID,
            "items[0].check_out",
        ),
        (
            "check_out before check_in",
            json!({"items": [stay("2026-12-12", "2026-12-10")]}),
            INVALID,
            "items[0].check_out",
        ),
        (
            "stay longer than max_nights",
            json!({"items": [stay("2026-12-01", "2027-01-15")]}),
            INVALID,
            "items[0].check_out",
        ),
        ("stay in the past", json!({"items": [stay("2026-11-01", "2026-11-03")]}), INVALID, "items[0].check_in"),
        (
            "room quantity above capacity",
            json!({"items": [{"resource_id": room, "check_in": "2026-12-10", "check_out": "2026-12-12", "quantity": 3}]}),
            INVALID,
            "items[0].quantity",
        ),
        // Free.
        (
            "charge shorter than min",
            json!({"items": [{"resource_id": charger, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:05:00Z"}]}),
            INVALID,
            "items[0].end",
        ),
        (
            "charge longer than max",
            json!({"items": [{"resource_id": charger, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T13:15:00Z"}]}),
            INVALID,
            "items[0].end",
        ),
        (
            "charge misaligned",
            json!({"items": [{"resource_id": charger, "start": "2026-11-24T09:05:00Z", "end": "2026-11-24T09:20:00Z"}]}),
            INVALID,
            "items[0].start",
        ),
        // All or nothing: a valid first item is not claimed when the second is bad.
        (
            "valid item then bad stay",
            json!({"items": [valid_slot, stay("2026-12-12", "2026-12-10")]}),
            INVALID,
            "items[1].check_out",
        ),
        (
            "items at two venues",
            json!({"items": [stay("2026-12-10", "2026-12-12"), {"resource_id": w.elsewhere, "check_in": "2026-12-10", "check_out": "2026-12-12"}]}),
            INVALID,
            "items[1].resource_id",
        ),
    ];
    let raw_cases: Vec<(&str, &str, StatusCode, &str)> = vec![
        ("truncated JSON", r#"{"items": ["#, BAD, ""),
        ("unquoted key", r#"{items: []}"#, BAD, ""),
        ("trailing comma", r#"{"items": [],}"#, BAD, ""),
        ("not JSON", "hold please", BAD, ""),
        ("duplicate key", r#"{"items": [], "items": []}"#, BAD, "items"),
    ];

    let mut failures = Vec::new();
    for (name, body, expected, field) in &json_cases {
        let (status, response) = t.post(Some(&w.customer), "/bookings", body.clone()).await;
        if let Some(p) = rejection_problem(status, &response, *expected, field) {
            failures.push(format!("[{name}] {p}"));
        }
    }
    for (name, body, expected, field) in &raw_cases {
        let (status, response) = raw(t, Method::POST, Some(&w.customer), "/bookings", body.to_string()).await;
        if let Some(p) = rejection_problem(status, &response, *expected, field) {
            failures.push(format!("[{name}] {p}"));
        }
    }
    // A valid hold followed by garbage or by a second document is not a valid body.
    // (Each on its own slot, so that an accepted one does not hide the next.)
    let valid =
        |start: &str, end: &str| json!({"items": [{"resource_id": charger, "start": start, "end": end}]}).to_string();
    let a = valid("2026-11-24T09:00:00Z", "2026-11-24T09:15:00Z");
    let b = valid("2026-11-24T11:00:00Z", "2026-11-24T11:15:00Z");
    let c = valid("2026-11-24T13:00:00Z", "2026-11-24T13:15:00Z");
    for (name, body) in
        [("trailing garbage", format!("{a} x")), ("two documents", format!("{b}{b}")), ("trailing ]", format!("{c}]"))]
    {
        let (status, response) = raw(t, Method::POST, Some(&w.customer), "/bookings", body).await;
        if let Some(p) = rejection_problem(status, &response, BAD, "") {
            failures.push(format!("[{name} after a valid hold] {p}"));
        }
    }
    // Real invalid UTF-8 bytes inside a string.
    let (status, response) = raw(
        t,
        Method::POST,
        Some(&w.customer),
        "/bookings",
        b"{\"items\": [{\"resource_id\": \"\xff\xfe\"}]}".to_vec(),
    )
    .await;
    if let Some(p) = rejection_problem(status, &response, BAD, "") {
        failures.push(format!("[invalid UTF-8 bytes] {p}"));
    }
    for table in ["bookings", "claims"] {
        let n = count(t, table).await;
        if n != 0 {
            failures.push(format!("bad holds left {n} row(s) in {table}"));
        }
    }
    assert_no_failures("bad holds", &failures);

    // Still fully bookable afterwards: nothing was half-claimed.
    let (status, held) = t
        .post(Some(&w.customer), "/bookings", json!({"items": [{"resource_id": doctor, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z", "quantity": 2}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
}

#[tokio::test]
async fn oversized_bodies_get_413_and_change_nothing() {
    let w = world().await;
    let t = &w.t;
    let before = snapshot(t).await;
    let padding = "x".repeat(70 * 1024);
    let hold = json!({"items": [{"resource_id": w.doctor, "start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:30:00Z"}], "coupon_code": padding}).to_string();
    let venue = json!({"name": "Big", "category": "cinema", "location": {"lat": 1.0, "lon": 1.0}, "address": padding,
                       "timezone": "Europe/Berlin", "currency": "EUR"})
    .to_string();
    let cases: Vec<(&str, Method, String, Option<&str>, String)> = vec![
        ("hold", Method::POST, "/bookings".to_owned(), None, hold.clone()),
        ("hold with Idempotency-Key", Method::POST, "/bookings".to_owned(), Some("big-1"), hold.clone()),
        ("venue", Method::POST, "/venues".to_owned(), None, venue.clone()),
        ("venue patch", Method::PATCH, format!("/venues/{}", w.venue), None, json!({"address": padding}).to_string()),
        (
            "resource",
            Method::POST,
            format!("/venues/{}/resources", w.venue),
            None,
            json!({"name": padding}).to_string(),
        ),
        (
            "register",
            Method::POST,
            "/auth/register".to_owned(),
            None,
            json!({"email": "big@test.allot", "password": padding, "name": "Big"}).to_string(),
        ),
        ("256 KiB", Method::POST, "/bookings".to_owned(), None, "[".repeat(256 * 1024)),
    ];
    let mut failures = Vec::new();
    for (name, method, path, key, body) in cases {
        let token =
            if name == "hold" || name.starts_with("hold ") || name == "256 KiB" { &w.customer } else { &w.admin };
        let mut req = t
            .client
            .request(method, t.url(&path))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        match req.send().await {
            Ok(response) => {
                let (status, response) = common::read(response).await;
                if let Some(p) = rejection_problem(status, &response, StatusCode::PAYLOAD_TOO_LARGE, "body") {
                    failures.push(format!("[{name}] {p}"));
                }
            }
            // The server may answer 413 and close before the client finished sending.
            Err(e) => failures.push(format!("[{name}] no response: {e}")),
        }
    }
    assert_eq!(snapshot(t).await, before, "an oversized body changed something");
    assert_no_failures("oversized bodies", &failures);
}

// ---------------------------------------------------------------------------------------------
// Ids in paths and query parameters
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_or_unknown_ids_in_paths_are_404() {
    let w = world().await;
    let t = &w.t;
    let before = snapshot(t).await;
    let missing = uuid::Uuid::now_v7().as_simple().to_string();
    let mut failures = Vec::new();
    for id in ["nope", "123", "00000000-0000-0000-0000-00000000000g", "%20", missing.as_str()] {
        let cases: Vec<(Method, String, Option<&str>, Option<Value>)> = vec![
            (Method::GET, format!("/venues/{id}"), None, None),
            (Method::GET, format!("/venues/{id}/resources"), None, None),
            (Method::GET, format!("/venues/{id}/events"), None, None),
            (Method::GET, format!("/resources/{id}"), None, None),
            (Method::GET, format!("/resources/{id}/availability"), None, None),
            (Method::GET, format!("/events/{id}"), None, None),
            (Method::GET, format!("/events/{id}/seats"), None, None),
            (Method::GET, format!("/bookings/{id}"), Some(&w.customer), None),
            (
                Method::POST,
                format!("/bookings/{id}/confirm"),
                Some(&w.customer),
                Some(json!({"payment": {"method": "card", "token": "tok_visa"}})),
            ),
            (Method::POST, format!("/bookings/{id}/cancel"), Some(&w.customer), Some(json!({"reason": "x"}))),
            (Method::PATCH, format!("/venues/{id}"), Some(&w.admin), Some(json!({"name": "Renamed"}))),
            (Method::PATCH, format!("/resources/{id}"), Some(&w.admin), Some(json!({"name": "Renamed"}))),
            (Method::POST, format!("/venues/{id}/resources"), Some(&w.admin), Some(doctor_json())),
            (
                Method::POST,
                format!("/venues/{id}/events"),
                Some(&w.admin),
                Some(
                    json!({"name": "Show", "start": "2026-12-01T18:00:00Z", "end": "2026-12-01T20:00:00Z", "seat_ids": [w.seats[0]]}),
                ),
            ),
            (Method::DELETE, format!("/venues/{id}"), Some(&w.admin), None),
            (Method::DELETE, format!("/resources/{id}"), Some(&w.admin), None),
        ];
        for (method, path, token, body) in cases {
            let mut req = t.client.request(method.clone(), t.url(&path));
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            if let Some(body) = body {
                req = req.json(&body);
            }
            let (status, response) = common::read(req.send().await.unwrap()).await;
            if status != StatusCode::NOT_FOUND
                || response["error"]["code"] != "not_found"
                || error_shape_problem(&response).is_some()
            {
                failures.push(format!("[{method} {path}] status {status}, body {response}"));
            }
        }
    }
    assert_eq!(snapshot(t).await, before, "a request to a missing id changed something");
    assert_no_failures("ids in paths", &failures);
}

#[tokio::test]
async fn bad_query_parameters_are_refused_with_field_details() {
    let w = world().await;
    let t = &w.t;
    let (v, d, r) = (&w.venue, &w.doctor, &w.room);
    let cases: Vec<(String, Option<&str>, StatusCode, &str)> = vec![
        ("/venues?limit=0".to_owned(), None, BAD, "limit"),
        ("/venues?limit=101".to_owned(), None, BAD, "limit"),
        ("/venues?limit=-1".to_owned(), None, BAD, "limit"),
        ("/venues?limit=ten".to_owned(), None, BAD, "limit"),
        ("/venues?limit=1.5".to_owned(), None, BAD, "limit"),
        ("/venues?limit=99999999999999999999".to_owned(), None, BAD, "limit"),
        ("/venues?cursor=garbage".to_owned(), None, BAD, "cursor"),
        ("/venues?limit=0&cursor=garbage".to_owned(), None, BAD, "cursor"),
        (format!("/venues/{v}/resources?limit=0"), None, BAD, "limit"),
        (format!("/venues/{v}/resources?cursor=%00%01"), None, BAD, "cursor"),
        (format!("/venues/{v}/events?limit=101"), None, BAD, "limit"),
        (format!("/venues/{v}/events?cursor=garbage"), None, BAD, "cursor"),
        ("/bookings?limit=0".to_owned(), Some(&w.customer), BAD, "limit"),
        ("/bookings?cursor=garbage".to_owned(), Some(&w.customer), BAD, "cursor"),
        ("/bookings?status=bogus".to_owned(), Some(&w.customer), BAD, "status"),
        ("/bookings?venue_id=nope".to_owned(), Some(&w.customer), BAD, "venue_id"),
        (format!("/resources/{d}/availability?from=garbage"), None, BAD, "from"),
        (format!("/resources/{d}/availability?to=garbage"), None, BAD, "to"),
        (format!("/resources/{d}/availability?from=2026-13-01"), None, BAD, "from"),
        (format!("/resources/{d}/availability?from=2026-11-24T09:00:00"), None, BAD, "from"),
        (format!("/resources/{d}/availability?from=2026-12-05&to=2026-12-01"), None, INVALID, "to"),
        (format!("/resources/{d}/availability?from=2026-12-05&to=2026-12-05"), None, INVALID, "to"),
        (format!("/resources/{d}/availability?from=2026-12-05T10:00:00Z&to=2026-12-05T09:00:00Z"), None, INVALID, "to"),
        (format!("/resources/{d}/availability?from=2026-12-01&to=2027-12-01"), None, INVALID, "to"),
        (format!("/resources/{d}/availability?quantity=0"), None, INVALID, "quantity"),
        (format!("/resources/{d}/availability?quantity=-1"), None, BAD, "quantity"),
        (format!("/resources/{d}/availability?quantity=two"), None, BAD, "quantity"),
        (format!("/resources/{d}/availability?quantity=3"), None, INVALID, "quantity"),
        (format!("/resources/{r}/availability?from=2026-12-10&to=2026-12-01"), None, INVALID, "to"),
    ];
    let mut failures = Vec::new();
    for (path, token, expected, field) in &cases {
        let (status, body) = t.get(*token, path).await;
        if let Some(p) = rejection_problem(status, &body, *expected, field) {
            failures.push(format!("[GET {path}] {p}"));
        }
    }
    assert_no_failures("bad query parameters", &failures);
}

// ---------------------------------------------------------------------------------------------
// Catalogue writes
// ---------------------------------------------------------------------------------------------

fn venue_body() -> Value {
    json!({"name": "Valid", "category": "cinema", "location": {"lat": 52.52, "lon": 13.40},
           "timezone": "Europe/Berlin", "currency": "EUR", "policies": {"hold_ttl_seconds": 600}})
}

/// `base` with `patch` merged in at the top level (a `null` value removes the key).
fn with(base: Value, patch: Value) -> Value {
    let mut out = base;
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            out.as_object_mut().unwrap().remove(k);
        } else {
            out[k] = v.clone();
        }
    }
    out
}

fn venue_cases() -> Vec<(&'static str, Value, StatusCode, &'static str)> {
    vec![
        ("timezone Mars/Base", json!({"timezone": "Mars/Base"}), INVALID, "timezone"),
        ("timezone a number", json!({"timezone": 1}), BAD, "timezone"),
        ("currency euro", json!({"currency": "euro"}), BAD, "currency"),
        ("currency EU", json!({"currency": "EU"}), BAD, "currency"),
        ("lat 100", json!({"location": {"lat": 100.0, "lon": 13.4}}), INVALID, "location.lat"),
        ("lon -181", json!({"location": {"lat": 52.5, "lon": -181.0}}), INVALID, "location.lon"),
        ("lat a string", json!({"location": {"lat": "north", "lon": 13.4}}), BAD, "location.lat"),
        ("location without lon", json!({"location": {"lat": 52.5}}), BAD, "location.lon"),
        ("hold_ttl_seconds 5", json!({"policies": {"hold_ttl_seconds": 5}}), INVALID, "policies.hold_ttl_seconds"),
        (
            "hold_ttl_seconds 2 days",
            json!({"policies": {"hold_ttl_seconds": 172_800}}),
            INVALID,
            "policies.hold_ttl_seconds",
        ),
        ("hold_ttl_seconds -1", json!({"policies": {"hold_ttl_seconds": -1}}), BAD, "policies.hold_ttl_seconds"),
        (
            "late refund 150%",
            json!({"policies": {"cancellation": {"free_until_hours_before": 24, "late_refund_percent": 150}}}),
            INVALID,
            "policies.cancellation.late_refund_percent",
        ),
        ("unknown policy", json!({"policies": {"hold_ttl_seconds": 600, "overbook": true}}), BAD, "policies.overbook"),
        ("name empty", json!({"name": "  "}), INVALID, "name"),
        ("category too long", json!({"category": "c".repeat(201)}), INVALID, "category"),
        ("rating 7", json!({"rating": 7.0}), INVALID, "rating"),
        ("amenities not a list", json!({"amenities": "wifi"}), BAD, "amenities"),
        ("empty amenity", json!({"amenities": [""]}), INVALID, "amenities"),
        ("unknown field", json!({"stars": 5}), BAD, "stars"),
    ]
}

#[tokio::test]
async fn invalid_venues_are_refused_and_not_created() {
    let w = world().await;
    let t = &w.t;
    let before = snapshot(t).await;
    let mut cases: Vec<(&str, Value, StatusCode, &str)> = venue_cases()
        .into_iter()
        .map(|(name, patch, status, field)| (name, with(venue_body(), patch), status, field))
        .collect();
    cases.push(("missing timezone", with(venue_body(), json!({"timezone": null})), BAD, "timezone"));
    cases.push(("missing name", with(venue_body(), json!({"name": null})), BAD, "name"));
    cases.push(("missing location", with(venue_body(), json!({"location": null})), BAD, "location"));
    let mut failures = Vec::new();
    for (name, body, expected, field) in &cases {
        let (status, response) = t.post(Some(&w.admin), "/venues", body.clone()).await;
        if let Some(p) = rejection_problem(status, &response, *expected, field) {
            failures.push(format!("[{name}] {p}"));
        }
    }
    assert_eq!(snapshot(t).await, before, "an invalid venue was stored");
    assert_no_failures("invalid venues", &failures);
}

#[tokio::test]
async fn invalid_venue_patches_leave_the_venue_unchanged() {
    let w = world().await;
    let t = &w.t;
    let path = format!("/venues/{}", w.venue);
    let (_, before) = t.get(None, &path).await;
    let mut failures = Vec::new();
    for (name, patch, expected, field) in venue_cases() {
        // A valid change next to the bad one must not be applied either.
        let patch = with(patch, json!({"address": "Changed 1"}));
        let (status, response) = t.patch(Some(&w.admin), &path, patch).await;
        if let Some(p) = rejection_problem(status, &response, expected, field) {
            failures.push(format!("[{name}] {p}"));
        }
        let (_, after) = t.get(None, &path).await;
        if after != before {
            failures.push(format!("[{name}] venue changed: {before} -> {after}"));
        }
    }
    assert_no_failures("invalid venue patches", &failures);
}

fn resource_cases() -> Vec<(&'static str, Value, StatusCode, &'static str)> {
    let slots = |extra: Value| {
        let mut tm = json!({"kind": "slots", "slot_minutes": 30,
                            "schedule": {"weekly": [{"days": ["mon", "tue"], "open": "09:00", "close": "17:00"}],
                                         "exceptions": [{"date": "2026-12-24", "hours": []}]},
                            "max_slots": 4});
        for (k, v) in extra.as_object().unwrap() {
            tm[k] = v.clone();
        }
        json!({"time_model": tm})
    };
    let free = |step: i64, min: i64, max: i64| json!({"time_model": {"kind": "free", "step_minutes": step, "min_minutes": min, "max_minutes": max}});
    let schedule = |weekly: Value| slots(json!({"schedule": {"weekly": weekly}}));
    vec![
        ("capacity -1", json!({"capacity": -1}), BAD, "capacity"),
        ("capacity 0", json!({"capacity": 0}), INVALID, "capacity"),
        ("capacity a word", json!({"capacity": "two"}), BAD, "capacity"),
        ("capacity 1.5", json!({"capacity": 1.5}), BAD, "capacity"),
        ("capacity too large", json!({"capacity": 4_000_000_000_u64}), INVALID, "capacity"),
        ("unit_price negative", json!({"unit_price": -5}), INVALID, "unit_price"),
        ("unit_price a string", json!({"unit_price": "5"}), BAD, "unit_price"),
        ("name empty", json!({"name": ""}), INVALID, "name"),
        ("attributes a list", json!({"attributes": [1, 2]}), BAD, "attributes"),
        ("unknown field", json!({"colour": "red"}), BAD, "colour"),
        ("slot_minutes 0", slots(json!({"slot_minutes": 0})), INVALID, "time_model.slot_minutes"),
        ("slot_minutes a word", slots(json!({"slot_minutes": "half an hour"})), BAD, "time_model*"),
        ("max_slots 0", slots(json!({"max_slots": 0})), INVALID, "time_model.max_slots"),
        (
            "close before open",
            schedule(json!([{"days": ["mon"], "open": "17:00", "close": "09:00"}])),
            INVALID,
            "time_model.schedule.weekly[0].close",
        ),
        ("open 25:00", schedule(json!([{"days": ["mon"], "open": "25:00", "close": "17:00"}])), BAD, "time_model*"),
        (
            "no days",
            schedule(json!([{"days": [], "open": "09:00", "close": "17:00"}])),
            INVALID,
            "time_model.schedule.weekly[0].days",
        ),
        ("day funday", schedule(json!([{"days": ["funday"], "open": "09:00", "close": "17:00"}])), BAD, "time_model*"),
        (
            "exception date invalid",
            slots(json!({"schedule": {"weekly": [], "exceptions": [{"date": "2026-02-30"}]}})),
            BAD,
            "time_model*",
        ),
        ("slots without schedule", json!({"time_model": {"kind": "slots", "slot_minutes": 30}}), BAD, "time_model*"),
        ("unknown kind", json!({"time_model": {"kind": "hourly"}}), BAD, "time_model*"),
        ("kind missing", json!({"time_model": {"slot_minutes": 30}}), BAD, "time_model*"),
        ("unknown time model field", slots(json!({"colour": "red"})), BAD, "time_model*"),
        ("free min > max", free(15, 60, 30), INVALID, "time_model.max_minutes"),
        ("free step 0", free(0, 15, 60), INVALID, "time_model.step_minutes"),
        ("free min not a step multiple", free(15, 20, 60), INVALID, "time_model.min_minutes"),
        ("free min 0", free(15, 0, 60), INVALID, "time_model.max_minutes"),
        (
            "nights check-out after check-in",
            json!({"time_model": {"kind": "nights", "check_in_time": "10:00", "check_out_time": "12:00"}}),
            INVALID,
            "time_model.check_out_time",
        ),
        (
            "nights min > max",
            json!({"time_model": {"kind": "nights", "min_nights": 5, "max_nights": 2}}),
            INVALID,
            "time_model.max_nights",
        ),
        ("overbooking 150%", json!({"rules": {"overbooking_percent": 150}}), INVALID, "rules.overbooking_percent"),
        ("buffer negative", json!({"rules": {"buffer_after_minutes": -15}}), BAD, "rules.buffer_after_minutes"),
        ("buffer 2 days", json!({"rules": {"buffer_before_minutes": 2880}}), INVALID, "rules.buffer_before_minutes"),
        (
            "override to before from",
            json!({"rules": {"capacity_overrides": [{"from": "2026-12-03", "to": "2026-12-01", "capacity": 0}]}}),
            INVALID,
            "rules.capacity_overrides[0].to",
        ),
        (
            "override bad date",
            json!({"rules": {"capacity_overrides": [{"from": "2026-12-32", "to": "2027-01-03", "capacity": 0}]}}),
            BAD,
            "rules.capacity_overrides[0].from",
        ),
        (
            "override without capacity",
            json!({"rules": {"capacity_overrides": [{"from": "2026-12-01", "to": "2026-12-03"}]}}),
            BAD,
            "rules.capacity_overrides[0].capacity",
        ),
        ("unknown rule", json!({"rules": {"overbook": 10}}), BAD, "rules.overbook"),
    ]
}

#[tokio::test]
async fn invalid_resources_are_refused_and_not_created() {
    let w = world().await;
    let t = &w.t;
    let before = snapshot(t).await;
    let path = format!("/venues/{}/resources", w.venue);
    let mut cases: Vec<(&str, Value, StatusCode, &str)> = resource_cases()
        .into_iter()
        .map(|(name, patch, status, field)| (name, with(doctor_json(), patch), status, field))
        .collect();
    cases.push(("missing capacity", with(doctor_json(), json!({"capacity": null})), BAD, "capacity"));
    cases.push(("missing time_model", with(doctor_json(), json!({"time_model": null})), BAD, "time_model"));
    cases.push(("missing unit_price", with(doctor_json(), json!({"unit_price": null})), BAD, "unit_price"));
    let mut failures = Vec::new();
    for (name, body, expected, field) in &cases {
        let (status, response) = t.post(Some(&w.admin), &path, body.clone()).await;
        if let Some(p) = rejection_problem(status, &response, *expected, field) {
            failures.push(format!("[{name}] {p}"));
        }
    }
    assert_eq!(snapshot(t).await, before, "an invalid resource was stored");
    assert_no_failures("invalid resources", &failures);
}

#[tokio::test]
async fn a_manager_patching_a_resource_with_bad_values_changes_nothing() {
    let w = world().await;
    let t = &w.t;
    let manager = t.user_with_role("manager@test.allot", Role::Manager).await;
    let venue = t.venue(&manager, "clinic").await;
    let doctor = t.resource(&manager, &venue, doctor_json()).await;
    let (seats, _) = t.seats_and_event(&manager, &venue, 1, 24).await;
    let mut failures = Vec::new();
    let mut cases: Vec<(&str, String, Value, StatusCode, &str)> = resource_cases()
        .into_iter()
        .map(|(name, patch, status, field)| {
            (name, doctor.clone(), with(patch, json!({"unit_price": 1})), status, field)
        })
        .filter(|(name, ..)| !name.starts_with("unit_price"))
        .collect();
    cases.push((
        "a seat becoming a slot",
        seats[0].clone(),
        json!({"time_model": doctor_json()["time_model"]}),
        INVALID,
        "time_model.kind",
    ));
    cases.push((
        "a slot becoming a seat",
        doctor.clone(),
        json!({"time_model": {"kind": "events"}}),
        INVALID,
        "time_model.kind",
    ));
    cases.push(("patch a list", doctor.clone(), json!([{"capacity": 3}]), BAD, ""));
    for (name, id, patch, expected, field) in cases {
        let path = format!("/resources/{id}");
        let (_, before) = t.get(None, &path).await;
        let (status, response) = t.patch(Some(&manager), &path, patch).await;
        if let Some(p) = rejection_problem(status, &response, expected, field) {
            failures.push(format!("[{name}] {p}"));
        }
        let (_, after) = t.get(None, &path).await;
        if after != before {
            failures.push(format!("[{name}] resource changed: {before} -> {after}"));
        }
    }
    assert_no_failures("bad resource patches", &failures);
    // The manager can still make a valid change.
    let (status, patched) = t.patch(Some(&manager), &format!("/resources/{doctor}"), json!({"capacity": 3})).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["capacity"], 3);
}

#[tokio::test]
async fn invalid_events_are_refused_and_not_created() {
    let w = world().await;
    let t = &w.t;
    let before = snapshot(t).await;
    let path = format!("/venues/{}/events", w.venue);
    let seat = &w.seats[0];
    let base = json!({"name": "Show", "start": "2026-12-01T18:00:00Z", "end": "2026-12-01T20:00:00Z",
                      "seat_ids": [seat], "price_categories": {"standard": 1200}});
    let missing = uuid::Uuid::now_v7().as_simple().to_string();
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        ("end before start", json!({"end": "2026-12-01T17:00:00Z"}), INVALID, "end"),
        ("start not a time", json!({"start": "tonight"}), BAD, "start"),
        ("no seats", json!({"seat_ids": []}), INVALID, "seat_ids"),
        ("seat twice", json!({"seat_ids": [seat, seat]}), INVALID, "seat_ids"),
        ("unknown seat", json!({"seat_ids": [missing]}), INVALID, "seat_ids[0]"),
        ("malformed seat id", json!({"seat_ids": ["nope"]}), BAD, "seat_ids[0]"),
        ("not a seat", json!({"seat_ids": [w.doctor]}), INVALID, "seat_ids[0]"),
        ("seat of another venue", json!({"seat_ids": [w.elsewhere]}), INVALID, "seat_ids[0]"),
        ("negative price", json!({"price_categories": {"standard": -1}}), INVALID, "price_categories.standard"),
        ("price a string", json!({"price_categories": {"standard": "cheap"}}), BAD, "price_categories.standard"),
        ("missing name", json!({"name": null}), BAD, "name"),
        ("unknown field", json!({"hall": 3}), BAD, "hall"),
    ];
    let mut failures = Vec::new();
    for (name, patch, expected, field) in cases {
        let (status, response) = t.post(Some(&w.admin), &path, with(base.clone(), patch)).await;
        if let Some(p) = rejection_problem(status, &response, expected, field) {
            failures.push(format!("[{name}] {p}"));
        }
    }
    assert_eq!(snapshot(t).await, before, "an invalid event was stored");
    assert_no_failures("invalid events", &failures);
}

// ---------------------------------------------------------------------------------------------
// Bookings and auth
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn invalid_confirm_and_cancel_leave_the_booking_held() {
    let w = world().await;
    let t = &w.t;
    let (status, booking) = t
        .post(Some(&w.customer), "/bookings", json!({"items": [{"resource_id": w.seats[0], "event_id": w.event}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{booking}");
    let id = booking["id"].as_str().unwrap();
    let cases: Vec<(&str, &str, Value, StatusCode, &str)> = vec![
        (
            "confirm",
            "method cash",
            json!({"payment": {"method": "cash", "token": "tok_visa"}}),
            INVALID,
            "payment.method",
        ),
        (
            "confirm",
            "unknown token",
            json!({"payment": {"method": "card", "token": "tok_bogus"}}),
            INVALID,
            "payment.token",
        ),
        ("confirm", "missing payment", json!({}), BAD, "payment"),
        ("confirm", "missing token", json!({"payment": {"method": "card"}}), BAD, "payment.token"),
        ("confirm", "token a number", json!({"payment": {"method": "card", "token": 4242}}), BAD, "payment.token"),
        (
            "confirm",
            "unknown field",
            json!({"payment": {"method": "card", "token": "tok_visa"}, "tip": 100}),
            BAD,
            "tip",
        ),
        ("cancel", "reason too long", json!({"reason": "r".repeat(501)}), INVALID, "reason"),
        ("cancel", "reason a number", json!({"reason": 5}), BAD, "reason"),
        ("cancel", "unknown field", json!({"reason": "ill", "refund": 100}), BAD, "refund"),
    ];
    let mut failures = Vec::new();
    for (action, name, body, expected, field) in cases {
        let (status, response) = t.post(Some(&w.customer), &format!("/bookings/{id}/{action}"), body).await;
        if let Some(p) = rejection_problem(status, &response, expected, field) {
            failures.push(format!("[{action}: {name}] {p}"));
        }
        let (_, now) = t.get(Some(&w.customer), &format!("/bookings/{id}")).await;
        if now != booking {
            failures.push(format!("[{action}: {name}] booking changed: {booking} -> {now}"));
        }
    }
    assert_no_failures("invalid confirm/cancel", &failures);
}

#[tokio::test]
async fn invalid_auth_bodies_are_refused() {
    let t = TestApp::spawn().await;
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        ("/auth/register", json!({"email": "nope", "password": "password-123", "name": "N"}), INVALID, "email"),
        ("/auth/register", json!({"email": "n@test.allot", "password": "x", "name": "N"}), INVALID, "password"),
        ("/auth/register", json!({"email": "n@test.allot", "password": "password-123", "name": " "}), INVALID, "name"),
        ("/auth/register", json!({"email": "n@test.allot", "password": "password-123"}), BAD, "name"),
        ("/auth/register", json!({"email": 5, "password": "password-123", "name": "N"}), BAD, "email"),
        (
            "/auth/register",
            json!({"email": "n@test.allot", "password": "password-123", "name": "N", "roles": ["admin"]}),
            BAD,
            "roles",
        ),
        ("/auth/login", json!({"email": "n@test.allot"}), BAD, "password"),
        ("/auth/refresh", json!({"refresh_token": 1}), BAD, "refresh_token"),
        ("/auth/logout", json!({}), BAD, "refresh_token"),
    ];
    let mut failures = Vec::new();
    for (path, body, expected, field) in cases {
        let (status, response) = t.post(None, path, body.clone()).await;
        if let Some(p) = rejection_problem(status, &response, expected, field) {
            failures.push(format!("[{path} {body}] {p}"));
        }
    }
    assert_eq!(count(&t, "users").await, 0, "an invalid registration created a user");
    assert_no_failures("invalid auth bodies", &failures);
}

// ---------------------------------------------------------------------------------------------
// Generic sweep: every POST/PATCH endpoint against bodies that are not the right object
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_write_endpoint_refuses_bodies_of_the_wrong_shape() {
    let w = world().await;
    let t = &w.t;
    let (status, booking) = t
        .post(Some(&w.customer), "/bookings", json!({"items": [{"resource_id": w.seats[0], "event_id": w.event}]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{booking}");
    let booking = booking["id"].as_str().unwrap().to_owned();
    let before = snapshot(t).await;

    // (method, path, token, whether `{}` is a valid body: all-optional patches and cancel)
    let endpoints: Vec<(Method, String, Option<&str>, bool)> = vec![
        (Method::POST, "/auth/register".to_owned(), None, false),
        (Method::POST, "/auth/login".to_owned(), None, false),
        (Method::POST, "/auth/refresh".to_owned(), None, false),
        (Method::POST, "/auth/logout".to_owned(), None, false),
        (Method::POST, "/venues".to_owned(), Some(&w.admin), false),
        (Method::PATCH, format!("/venues/{}", w.venue), Some(&w.admin), true),
        (Method::POST, format!("/venues/{}/resources", w.venue), Some(&w.admin), false),
        (Method::POST, format!("/venues/{}/events", w.venue), Some(&w.admin), false),
        (Method::PATCH, format!("/resources/{}", w.doctor), Some(&w.admin), true),
        (Method::POST, "/bookings".to_owned(), Some(&w.customer), false),
        (Method::POST, format!("/bookings/{booking}/confirm"), Some(&w.customer), false),
        // Last: `{}` cancels the booking.
        (Method::POST, format!("/bookings/{booking}/cancel"), Some(&w.customer), true),
    ];
    let mut failures = Vec::new();
    for (method, path, token, empty_ok) in &endpoints {
        for body in ["[]", "\"x\"", "null", "1", "true", "[{}]", "{}"] {
            let (status, response) = raw(t, method.clone(), *token, path, body).await;
            let case = format!("[{method} {path} with {body}]");
            if body == "{}" && *empty_ok {
                if !status.is_success() {
                    failures.push(format!("{case} status {status}, expected 2xx: {response}"));
                }
                continue;
            }
            if let Some(p) = rejection_problem(status, &response, BAD, "") {
                failures.push(format!("{case} {p}"));
            }
        }
    }
    assert_no_failures("wrong-shape bodies", &failures);
    // Only the final `{}` to cancel changed anything: the booking is cancelled (its claim freed).
    let rows = |s: Vec<(&'static str, i64)>| s.into_iter().filter(|(table, _)| *table != "claims").collect::<Vec<_>>();
    assert_eq!(rows(snapshot(t).await), rows(before), "a wrong-shape body created or deleted rows");
    let (_, b) = t.get(Some(&w.customer), &format!("/bookings/{booking}")).await;
    assert_eq!(b["status"], "cancelled", "{b}");
    assert_eq!(b["payment_attempts"], 0, "no wrong-shape confirm reached the provider: {b}");
}

/// JSON arrays are not objects: a positional array must not be read as a request body
/// (serde accepts `["a@b.c", "pw"]` for a struct with two fields unless told otherwise).
#[tokio::test]
async fn positional_arrays_are_not_accepted_as_objects() {
    let w = world().await;
    let t = &w.t;
    let cases: Vec<(Method, String, Option<&str>, String)> = vec![
        (Method::POST, "/auth/login".to_owned(), None, json!(["bad-input@test.allot", "password-123"]).to_string()),
        (
            Method::POST,
            "/auth/register".to_owned(),
            None,
            json!(["array@test.allot", "password-123", "Array"]).to_string(),
        ),
        (
            Method::POST,
            "/bookings".to_owned(),
            Some(&w.customer),
            json!([[[w.seats[0], null, null, null, null, w.event, null]], null]).to_string(),
        ),
        (
            Method::PATCH,
            format!("/resources/{}", w.doctor),
            Some(&w.admin),
            json!(["Renamed", 7, null, null, null, null, null]).to_string(),
        ),
    ];
    let before = snapshot(t).await;
    let (_, doctor_before) = t.get(None, &format!("/resources/{}", w.doctor)).await;
    let mut failures = Vec::new();
    for (method, path, token, body) in cases {
        let (status, response) = raw(t, method.clone(), token, &path, body.clone()).await;
        if let Some(p) = rejection_problem(status, &response, BAD, "body") {
            failures.push(format!("[{method} {path} with {body}] {p}"));
        }
    }
    let (_, doctor_after) = t.get(None, &format!("/resources/{}", w.doctor)).await;
    if doctor_after != doctor_before {
        failures.push(format!("the array PATCH changed the resource: {doctor_before} -> {doctor_after}"));
    }
    let after = snapshot(t).await;
    if after != before {
        failures.push(format!("array bodies created rows: {before:?} -> {after:?}"));
    }
    assert_no_failures("positional arrays", &failures);
}

/// Errors inside a time model name the inner field (`time_model.slot_minutes`), not just
/// `time_model`: a client must be able to tell which input to fix.
#[tokio::test]
async fn time_model_errors_name_the_inner_field() {
    let w = world().await;
    let t = &w.t;
    let path = format!("/venues/{}/resources", w.venue);
    let slots = |extra: Value| {
        let mut body = doctor_json();
        for (k, v) in extra.as_object().unwrap() {
            body["time_model"][k] = v.clone();
        }
        body
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        ("slot_minutes a word", slots(json!({"slot_minutes": "half an hour"})), "time_model.slot_minutes"),
        ("slot_minutes negative", slots(json!({"slot_minutes": -30})), "time_model.slot_minutes"),
        (
            "open 25:00",
            slots(json!({"schedule": {"weekly": [{"days": ["mon"], "open": "25:00", "close": "17:00"}]}})),
            "time_model.schedule.weekly[0].open",
        ),
        (
            "day funday",
            slots(json!({"schedule": {"weekly": [{"days": ["funday"], "open": "09:00", "close": "17:00"}]}})),
            "time_model.schedule.weekly[0].days[0]",
        ),
        ("unknown field", slots(json!({"colour": "red"})), "time_model.colour"),
        (
            "free max a word",
            with(
                doctor_json(),
                json!({"time_model": {"kind": "free", "step_minutes": 15, "min_minutes": 15, "max_minutes": "long"}}),
            ),
            "time_model.max_minutes",
        ),
    ];
    let mut failures = Vec::new();
    for (name, body, field) in cases {
        let (status, response) = t.post(Some(&w.admin), &path, body).await;
        if let Some(p) = rejection_problem(status, &response, BAD, field) {
            failures.push(format!("[{name}] {p}"));
        }
    }
    assert_no_failures("time model field paths", &failures);
}

#[tokio::test]
async fn extreme_numbers_and_ranges_are_refused_not_crashed() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "hall").await;
    let customer = t.customer("extreme@test.allot").await;
    // A price times a quantity beyond i64 must be refused, not overflow.
    let hall = t
        .resource(
            &admin,
            &venue,
            json!({"name": "Hall", "capacity": 10_000_000, "unit_price": 100_000_000_000i64,
                   "time_model": {"kind": "nights", "max_nights": 365}}),
        )
        .await;
    let (status, body) = t
        .post(
            Some(&customer),
            "/bookings",
            json!({"items": [{"resource_id": hall, "check_in": "2026-12-01", "check_out": "2027-11-30", "quantity": 10_000_000}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request");
    // A slot request spanning centuries is refused by its length, before any schedule work.
    let doctor = t
        .resource(
            &admin,
            &venue,
            json!({"name": "Doc", "capacity": 1, "unit_price": 100,
                   "time_model": {"kind": "slots", "slot_minutes": 30,
                                  "schedule": {"weekly": [{"days": ["mon"], "open": "09:00", "close": "17:00"}]}}}),
        )
        .await;
    let started = std::time::Instant::now();
    let (status, body) = t
        .post(
            Some(&customer),
            "/bookings",
            json!({"items": [{"resource_id": doctor, "start": "2026-11-30T08:00:00Z", "end": "9999-01-01T00:00:00Z"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
    // Fractions of a second would be cut from capacity spans: refused, never a panic.
    let (status, body) = t
        .post(
            Some(&customer),
            "/bookings",
            json!({"items": [{"resource_id": doctor, "start": "2026-11-30T08:00:00Z", "end": "2026-11-30T08:00:00.5Z"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = t
        .get(None, &format!("/resources/{doctor}/availability?from=2026-11-30T08:00:00.2Z&to=2026-11-30T08:00:00.7Z"))
        .await;
    assert!(status.is_client_error(), "{status} {body}");
    // Stays at the end of the calendar.
    let room = t.room_type(&admin, &venue, 1, 0).await;
    let (status, body) = t
        .post(
            Some(&customer),
            "/bookings",
            json!({"items": [{"resource_id": room, "check_in": "9999-12-30", "check_out": "9999-12-31"}]}),
        )
        .await;
    assert!(status.is_client_error() || status == StatusCode::CREATED, "{status} {body}");
    let (status, body) = t.get(None, &format!("/resources/{room}/availability?from=9999-12-01&to=9999-12-31")).await;
    assert!(status.is_client_error() || status == StatusCode::OK, "{status} {body}");
}

/// PostgreSQL cannot store NUL in text: a NUL anywhere in a body or a query string is a 400
/// naming where, on both backends, before it reaches a store.
#[tokio::test]
async fn nul_characters_are_refused_at_the_edge() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let register = json!({"email": "n@test.allot", "password": "password-123", "name": "a\u{0}b"});
    let (status, body) = t.post(None, "/auth/register", register).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["details"]["fields"]["body"].as_str().unwrap().contains("NUL"), "{body}");
    // An escaped backslash followed by the text u0000 is not a NUL.
    let register = json!({"email": "n@test.allot", "password": "password-123", "name": "a\\u0000b"});
    let (status, body) = t.post(None, "/auth/register", register).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = t.get(Some(&admin), "/audit?actor_id=%00").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["details"]["fields"]["actor_id"].is_string(), "names the parameter: {body}");
    // A NUL in a path is no id: not found, and the audit trail still records the attempt.
    let (status, _) = t.patch(Some(&admin), "/venues/%00", json!({"address": "x"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, page) = t.get(Some(&admin), "/audit?action=venue.update").await;
    assert_eq!(page["data"][0]["target_id"], "\u{fffd}", "{page}");
}
