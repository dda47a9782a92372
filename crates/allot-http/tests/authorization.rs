//! Authorization (I7) over real HTTP: customers see and change only their own bookings (404 for
//! others', so ids do not leak), managers only their venues, admins everything; anonymous
//! callers read the catalogue and nothing else; refresh tokens rotate with reuse detection.
#![allow(clippy::unwrap_used)]

mod common;

use allot_app::store::Role;
use common::TestApp;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn seat(resource: &str, event: &str) -> Value {
    json!({"items": [{"resource_id": resource, "event_id": event}]})
}

async fn hold(t: &TestApp, token: &str, resource: &str, event: &str) -> Value {
    let (status, booking) = t.post(Some(token), "/bookings", seat(resource, event)).await;
    assert_eq!(status, StatusCode::CREATED, "{booking}");
    booking
}

fn ids(list: &Value) -> Vec<String> {
    list["data"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_owned()).collect()
}

fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, want_code: &str, what: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    assert_eq!(body["error"]["code"], want_code, "{what}: {body}");
}

fn seat_body(name: &str) -> Value {
    json!({"name": name, "capacity": 1, "unit_price": 1000, "attributes": {"row": "Z", "number": 1, "category": "standard"},
           "time_model": {"kind": "events"}})
}

fn event_body(t: &TestApp, seat_ids: &[String]) -> Value {
    let start = t.clock_now().checked_add(jiff::SignedDuration::from_hours(72)).unwrap();
    let end = start.checked_add(jiff::SignedDuration::from_hours(2)).unwrap();
    json!({"name": "Late show", "start": start.to_string(), "end": end.to_string(), "seat_ids": seat_ids,
           "price_categories": {"standard": 1200}})
}

#[tokio::test]
async fn customers_cannot_see_or_change_each_others_bookings() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 2, 48).await;
    let a = t.customer("a@test.allot").await;
    let b = t.customer("b@test.allot").await;

    let booking = hold(&t, &a, &seats[0], &event).await;
    let id = booking["id"].as_str().unwrap();
    let own = hold(&t, &b, &seats[1], &event).await;

    let (status, body) = t.get(Some(&b), &format!("/bookings/{id}")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "B reads A's booking");
    // Indistinguishable from a booking that does not exist.
    let (status, missing) = t.get(Some(&b), &format!("/bookings/{}", uuid::Uuid::now_v7())).await;
    assert_error(status, &missing, StatusCode::NOT_FOUND, "not_found", "B reads a missing booking");
    assert_eq!(body, missing, "the same answer for someone else's booking and no booking");

    let (status, body) = t.post(Some(&b), &format!("/bookings/{id}/cancel"), json!({"reason": "mine now"})).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "B cancels A's booking");
    let (status, body) = t
        .post(Some(&b), &format!("/bookings/{id}/confirm"), json!({"payment": {"method": "card", "token": "tok_visa"}}))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "B confirms A's booking");

    let (status, list) = t.get(Some(&b), "/bookings").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(ids(&list), vec![own["id"].as_str().unwrap().to_owned()], "B lists only B's booking");
    let (status, list) = t.get(Some(&b), &format!("/bookings?venue_id={venue}")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert!(!ids(&list).contains(&id.to_owned()), "a venue filter does not widen a customer's view");

    // A's booking is exactly as it was, and A can still pay for it.
    let (status, after) = t.get(Some(&a), &format!("/bookings/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after, booking, "A's booking unchanged");
    let (status, confirmed) = t
        .post(Some(&a), &format!("/bookings/{id}/confirm"), json!({"payment": {"method": "card", "token": "tok_visa"}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(confirmed["status"], "confirmed");
    assert_eq!(confirmed["payment_attempts"], 0);

    // And a confirmed booking is just as invisible to B.
    let (status, body) = t.post(Some(&b), &format!("/bookings/{id}/cancel"), json!({})).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "B cancels A's confirmed booking");
    let (_, after) = t.get(Some(&a), &format!("/bookings/{id}")).await;
    assert_eq!(after["status"], "confirmed");
}

#[tokio::test]
async fn a_manager_runs_their_own_venue_and_no_other() {
    let t = TestApp::spawn().await;
    let mx = t.user_with_role("mx@test.allot", Role::Manager).await;
    let my = t.user_with_role("my@test.allot", Role::Manager).await;
    let x = t.venue(&mx, "cinema").await;
    let y = t.venue(&my, "theatre").await;
    let (status, me) = t.get(Some(&mx), "/me").await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["managed_venue_ids"], json!([x]), "creating X made mx its manager");

    // mx creates resources and an event in X.
    let (x_seats, x_event) = t.seats_and_event(&mx, &x, 2, 48).await;
    let (y_seats, y_event) = t.seats_and_event(&my, &y, 2, 48).await;
    let customer = t.customer("cust@test.allot").await;
    let at_x = hold(&t, &customer, &x_seats[0], &x_event).await;
    let at_y = hold(&t, &customer, &y_seats[0], &y_event).await;
    let (x_id, y_id) = (at_x["id"].as_str().unwrap(), at_y["id"].as_str().unwrap());

    // Bookings: X's readable and listable, Y's invisible.
    let (status, read) = t.get(Some(&mx), &format!("/bookings/{x_id}")).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["id"], x_id);
    let (status, body) = t.get(Some(&mx), &format!("/bookings/{y_id}")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "mx reads a booking at Y");
    let (status, list) = t.get(Some(&mx), "/bookings").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(ids(&list), vec![x_id.to_owned()], "mx lists X's bookings only");
    let (status, list) = t.get(Some(&mx), &format!("/bookings?venue_id={y}")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert!(ids(&list).is_empty(), "filtering by Y does not reveal Y's bookings: {list}");

    // Only the customer pays; a manager may not confirm (403, the booking is visible to them).
    let (status, body) = t
        .post(
            Some(&mx),
            &format!("/bookings/{x_id}/confirm"),
            json!({"payment": {"method": "card", "token": "tok_visa"}}),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "mx confirms a customer's booking");

    // Cancel: at X yes, at Y no (and Y's booking is untouched).
    let (status, body) = t.post(Some(&mx), &format!("/bookings/{y_id}/cancel"), json!({"reason": "no"})).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "mx cancels a booking at Y");
    let (_, after) = t.get(Some(&customer), &format!("/bookings/{y_id}")).await;
    assert_eq!(after, at_y, "Y's booking unchanged");
    let (status, cancelled) =
        t.post(Some(&mx), &format!("/bookings/{x_id}/cancel"), json!({"reason": "show moved"})).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");

    // Venue X: patch and create.
    let (status, patched) = t.patch(Some(&mx), &format!("/venues/{x}"), json!({"name": "X renamed"})).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["name"], "X renamed");
    let extra = t.resource(&mx, &x, seat_body("X extra")).await;
    let (status, ev) =
        t.post(Some(&mx), &format!("/venues/{x}/events"), event_body(&t, std::slice::from_ref(&extra))).await;
    assert_eq!(status, StatusCode::CREATED, "{ev}");
    let (status, r) = t.patch(Some(&mx), &format!("/resources/{extra}"), json!({"unit_price": 1500})).await;
    assert_eq!(status, StatusCode::OK, "{r}");

    // Venue Y: nothing.
    let (_, y_before) = t.get(None, &format!("/venues/{y}")).await;
    let (_, y_resources_before) = t.get(None, &format!("/venues/{y}/resources?limit=100")).await;
    let (_, y_events_before) = t.get(None, &format!("/venues/{y}/events?limit=100")).await;
    let (_, y_seat_before) = t.get(None, &format!("/resources/{}", y_seats[1])).await;

    let (status, body) = t.patch(Some(&mx), &format!("/venues/{y}"), json!({"name": "mine now"})).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "mx patches Y");
    let (status, body) = t.post(Some(&mx), &format!("/venues/{y}/resources"), seat_body("intruder")).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "mx creates a resource in Y");
    let (status, body) = t.post(Some(&mx), &format!("/venues/{y}/events"), event_body(&t, &y_seats)).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "mx creates an event in Y");
    let (status, body) = t.patch(Some(&mx), &format!("/resources/{}", y_seats[1]), json!({"unit_price": 1})).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "mx patches a resource of Y");
    let (status, body) = t.delete(Some(&mx), &format!("/resources/{}", y_seats[1])).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "mx deletes a resource of Y");
    let (status, body) = t.delete(Some(&mx), &format!("/venues/{y}")).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "mx deletes Y");
    // Y's seats cannot be pulled into an event at X either.
    let (status, body) = t.post(Some(&mx), &format!("/venues/{x}/events"), event_body(&t, &y_seats)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "an event at X over Y's seats: {body}");
    assert_eq!(body["error"]["code"], "invalid_request");

    let (status, y_after) = t.get(None, &format!("/venues/{y}")).await;
    assert_eq!(status, StatusCode::OK, "Y still exists: {y_after}");
    assert_eq!(y_after, y_before, "Y unchanged");
    let (_, y_resources_after) = t.get(None, &format!("/venues/{y}/resources?limit=100")).await;
    assert_eq!(y_resources_after, y_resources_before, "Y's resources unchanged");
    let (_, y_events_after) = t.get(None, &format!("/venues/{y}/events?limit=100")).await;
    assert_eq!(y_events_after, y_events_before, "Y's events unchanged");
    let (_, y_seat_after) = t.get(None, &format!("/resources/{}", y_seats[1])).await;
    assert_eq!(y_seat_after, y_seat_before, "Y's seat unchanged");

    // Y's own manager still can.
    let (status, body) = t.patch(Some(&my), &format!("/venues/{y}"), json!({"address": "1 Y Street"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn customers_cannot_manage_and_anonymous_callers_only_read() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 1, 48).await;
    let customer = t.customer("plain@test.allot").await;
    let venue_body = json!({"name": "Mine", "category": "cinema", "location": {"lat": 52.5, "lon": 13.4},
                            "timezone": "Europe/Berlin", "currency": "EUR"});

    let (status, body) = t.post(Some(&customer), "/venues", venue_body.clone()).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "a customer creates a venue");
    let (status, body) = t.patch(Some(&customer), &format!("/venues/{venue}"), json!({"name": "mine"})).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "a customer patches a venue");
    let (status, body) = t.delete(Some(&customer), &format!("/venues/{venue}")).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "a customer deletes a venue");
    let (status, body) = t.post(Some(&customer), &format!("/venues/{venue}/resources"), seat_body("mine")).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "a customer creates a resource");
    let (status, body) = t.post(Some(&customer), &format!("/venues/{venue}/events"), event_body(&t, &seats)).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "a customer creates an event");
    let (status, body) = t.patch(Some(&customer), &format!("/resources/{}", seats[0]), json!({"unit_price": 1})).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "a customer patches a resource");

    // Anonymous writes: 401.
    let anonymous_writes: Vec<(&str, String, Value)> = vec![
        ("POST", "/venues".into(), venue_body.clone()),
        ("PATCH", format!("/venues/{venue}"), json!({"name": "anon"})),
        ("DELETE", format!("/venues/{venue}"), Value::Null),
        ("POST", format!("/venues/{venue}/resources"), seat_body("anon")),
        ("POST", format!("/venues/{venue}/events"), event_body(&t, &seats)),
        ("PATCH", format!("/resources/{}", seats[0]), json!({"unit_price": 1})),
        ("DELETE", format!("/resources/{}", seats[0]), Value::Null),
        ("POST", "/bookings".into(), seat(&seats[0], &event)),
    ];
    for (method, path, body) in anonymous_writes {
        let (status, resp) = match method {
            "POST" => t.post(None, &path, body).await,
            "PATCH" => t.patch(None, &path, body).await,
            _ => t.delete(None, &path).await,
        };
        assert_error(status, &resp, StatusCode::UNAUTHORIZED, "unauthenticated", &format!("anonymous {method} {path}"));
    }
    // A garbage token is no better than none.
    let (status, resp) = t.post(Some("not-a-token"), "/bookings", seat(&seats[0], &event)).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "unauthenticated", "a bad token");
    for path in ["/bookings".to_owned(), "/me".to_owned(), format!("/bookings/{}", uuid::Uuid::now_v7())] {
        let (status, resp) = t.get(None, &path).await;
        assert_error(status, &resp, StatusCode::UNAUTHORIZED, "unauthenticated", &format!("anonymous GET {path}"));
    }

    // Anonymous reads of the catalogue work.
    let (status, list) = t.get(None, "/venues").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(ids(&list), vec![venue.clone()]);
    for path in [format!("/venues/{venue}"), format!("/venues/{venue}/resources"), format!("/events/{event}/seats")] {
        let (status, body) = t.get(None, &path).await;
        assert_eq!(status, StatusCode::OK, "anonymous GET {path}: {body}");
    }

    // Nothing changed.
    let (_, v) = t.get(None, &format!("/venues/{venue}")).await;
    assert_eq!(v["name"], "Test cinema");
    let (_, map) = t.get(None, &format!("/events/{event}/seats")).await;
    assert_eq!(map["seats"][0]["status"], "available");
    let (_, r) = t.get(None, &format!("/resources/{}", seats[0])).await;
    assert_eq!(r["unit_price"], 1000);
}

#[tokio::test]
async fn an_admin_can_do_everything() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let manager = t.user_with_role("m@test.allot", Role::Manager).await;
    let y = t.venue(&manager, "cinema").await;
    let (seats, event) = t.seats_and_event(&manager, &y, 2, 48).await;
    let a = t.customer("a@test.allot").await;
    let b = t.customer("b@test.allot").await;
    let booking_a = hold(&t, &a, &seats[0], &event).await;
    let booking_b = hold(&t, &b, &seats[1], &event).await;
    let (ida, idb) = (booking_a["id"].as_str().unwrap(), booking_b["id"].as_str().unwrap());

    let (status, read) = t.get(Some(&admin), &format!("/bookings/{ida}")).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    let (status, list) = t.get(Some(&admin), "/bookings").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let listed = ids(&list);
    assert!(listed.contains(&ida.to_owned()) && listed.contains(&idb.to_owned()), "{list}");
    let (status, cancelled) =
        t.post(Some(&admin), &format!("/bookings/{ida}/cancel"), json!({"reason": "admin"})).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");

    let (status, patched) = t.patch(Some(&admin), &format!("/venues/{y}"), json!({"name": "Admin's now"})).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    let extra = t.resource(&admin, &y, seat_body("admin seat")).await;
    let (status, ev) =
        t.post(Some(&admin), &format!("/venues/{y}/events"), event_body(&t, std::slice::from_ref(&extra))).await;
    assert_eq!(status, StatusCode::CREATED, "{ev}");
    let (status, r) = t.patch(Some(&admin), &format!("/resources/{extra}"), json!({"unit_price": 999})).await;
    assert_eq!(status, StatusCode::OK, "{r}");

    // A venue nobody booked can be deleted by an admin.
    let spare = t.venue(&manager, "studio").await;
    let (status, body) = t.delete(Some(&admin), &format!("/venues/{spare}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = t.get(None, &format!("/venues/{spare}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "deleted venue is gone: {body}");
    // ... and the manager of another venue still cannot touch Y.
    let other = t.user_with_role("other@test.allot", Role::Manager).await;
    let (status, body) = t.delete(Some(&other), &format!("/venues/{y}")).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "another manager deletes Y");
}

async fn login_full(t: &TestApp, email: &str) -> Value {
    let (status, body) = t.post(None, "/auth/login", json!({"email": email, "password": "password-123"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    body
}

async fn refresh(t: &TestApp, token: &Value) -> (StatusCode, Value) {
    t.post(None, "/auth/refresh", json!({"refresh_token": token})).await
}

#[tokio::test]
async fn refresh_tokens_rotate_and_reuse_revokes_the_family() {
    let t = TestApp::spawn().await;
    t.customer("rot@test.allot").await;
    let session = login_full(&t, "rot@test.allot").await;
    let r1 = session["refresh_token"].clone();

    let (status, rotated) = refresh(&t, &r1).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let r2 = rotated["refresh_token"].clone();
    assert!(r2.is_string() && r2 != r1, "a new refresh token: {rotated}");
    assert!(rotated["access_token"].is_string());
    assert!(rotated["expires_in"].as_i64().unwrap() > 0);
    let (status, me) = t.get(Some(rotated["access_token"].as_str().unwrap()), "/me").await;
    assert_eq!(status, StatusCode::OK, "the new access token works: {me}");
    assert_eq!(me["email"], "rot@test.allot");

    // The old refresh token again: 401, and the whole family is revoked (r2 too).
    let (status, body) = refresh(&t, &r1).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated", "reused refresh token");
    let (status, body) = refresh(&t, &r2).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated", "descendant of a reused token");

    // Another login is another family and is unaffected.
    let other = login_full(&t, "rot@test.allot").await;
    let (status, body) = refresh(&t, &other["refresh_token"]).await;
    assert_eq!(status, StatusCode::OK, "an independent session still rotates: {body}");

    // Garbage is just 401.
    let (status, body) = refresh(&t, &json!("not-a-refresh-token")).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated", "unknown refresh token");
}

#[tokio::test]
async fn logout_revokes_the_refresh_token_and_its_rotations() {
    let t = TestApp::spawn().await;
    t.customer("out@test.allot").await;

    let session = login_full(&t, "out@test.allot").await;
    let (status, body) = t.post(None, "/auth/logout", json!({"refresh_token": session["refresh_token"]})).await;
    assert!(status.is_success(), "{status}: {body}");
    let (status, body) = refresh(&t, &session["refresh_token"]).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated", "refresh after logout");

    // Logging out with the newest token of a rotated family ends the whole family.
    let session = login_full(&t, "out@test.allot").await;
    let (status, rotated) = refresh(&t, &session["refresh_token"]).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let (status, body) = t.post(None, "/auth/logout", json!({"refresh_token": rotated["refresh_token"]})).await;
    assert!(status.is_success(), "{status}: {body}");
    let (status, body) = refresh(&t, &rotated["refresh_token"]).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated", "refresh of a logged-out rotation");
}

/// An access token works, many times, until its expiry by the app's clock, and never after:
/// the process remembers tokens it verified, never past their expiry.
#[tokio::test]
async fn an_access_token_is_refused_from_its_expiry_on_however_often_it_was_used() {
    let t = TestApp::spawn().await;
    t.customer("exp@test.allot").await;
    let session = login_full(&t, "exp@test.allot").await;
    let token = session["access_token"].as_str().unwrap();
    for _ in 0..3 {
        let (status, me) = t.get(Some(token), "/me").await;
        assert_eq!(status, StatusCode::OK, "{me}");
    }
    t.clock.advance(jiff::SignedDuration::from_secs(allot_app::auth::ACCESS_TOKEN_TTL_SECONDS - 1));
    let (status, me) = t.get(Some(token), "/me").await;
    assert_eq!(status, StatusCode::OK, "a second before its expiry: {me}");
    t.clock.advance(jiff::SignedDuration::from_secs(1));
    let (status, body) = t.get(Some(token), "/me").await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated", "an expired access token");
    let (status, body) = t.get(Some(&format!("{token}x")), "/me").await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated", "a tampered access token");
}
