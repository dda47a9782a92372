//! The booking lifecycle end to end over real HTTP: hold, confirm, cancel with refund,
//! declines ending in `payment_failed`, and the response shape of SPEC §4.
#![allow(clippy::unwrap_used)]

mod common;

use common::TestApp;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn hold_confirm_cancel_a_seat() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 2, 48).await;
    let customer = t.customer("c1@test.allot").await;
    // Read (and kept by the server) before the hold: every later read must show each change.
    let (status, map) = t.get(None, &format!("/events/{event}/seats")).await;
    assert_eq!(status, StatusCode::OK, "{map}");
    assert!(map["seats"].as_array().unwrap().iter().all(|s| s["status"] == "available"), "{map}");

    let (status, booking) =
        t.post(Some(&customer), "/bookings", json!({"items": [{"resource_id": seats[1], "event_id": event}]})).await;
    assert_eq!(status, StatusCode::CREATED, "{booking}");
    assert_eq!(booking["status"], "held");
    assert_eq!(booking["items"][0]["unit_price"], 1800, "premium seat priced from the event");
    assert_eq!(booking["total"], 1800);
    assert_eq!(booking["currency"], "EUR");
    let expires_at = booking["expires_at"].as_str().unwrap();
    assert!(!expires_at.contains('.'), "expiry is a whole second, as in the claims: {expires_at}");
    for field in ["id", "customer_id", "venue_id", "created_at", "items", "subtotal", "discount", "payment", "refund"] {
        assert!(booking.get(field).is_some(), "missing {field}");
    }
    let id = booking["id"].as_str().unwrap();

    let (_, map) = t.get(None, &format!("/events/{event}/seats")).await;
    let seat = map["seats"].as_array().unwrap().iter().find(|s| s["resource_id"] == seats[1].as_str()).unwrap();
    assert_eq!(seat["status"], "held");

    let (status, confirmed) = t
        .post(
            Some(&customer),
            &format!("/bookings/{id}/confirm"),
            json!({"payment": {"method": "card", "token": "tok_visa"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(confirmed["status"], "confirmed");
    assert_eq!(confirmed["payment"]["amount"], 1800);

    let (_, map) = t.get(None, &format!("/events/{event}/seats")).await;
    let seat = map["seats"].as_array().unwrap().iter().find(|s| s["resource_id"] == seats[1].as_str()).unwrap();
    assert_eq!(seat["status"], "booked");

    let (status, cancelled) =
        t.post(Some(&customer), &format!("/bookings/{id}/cancel"), json!({"reason": "ill"})).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["refund"]["amount"], 1800, "48 h ahead: full refund");

    let (status, again) =
        t.post(Some(&customer), "/bookings", json!({"items": [{"resource_id": seats[1], "event_id": event}]})).await;
    assert_eq!(status, StatusCode::CREATED, "cancelled seat is free again: {again}");
}

#[tokio::test]
async fn three_declines_end_as_payment_failed_and_free_the_seat() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 1, 24).await;
    let customer = t.customer("c2@test.allot").await;
    let (_, booking) =
        t.post(Some(&customer), "/bookings", json!({"items": [{"resource_id": seats[0], "event_id": event}]})).await;
    let id = booking["id"].as_str().unwrap();
    let declined = json!({"payment": {"method": "card", "token": "tok_chargeDeclined"}});
    for attempt in 1..=3 {
        let (status, body) = t.post(Some(&customer), &format!("/bookings/{id}/confirm"), declined.clone()).await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "attempt {attempt}: {body}");
        assert_eq!(body["error"]["code"], "payment_declined");
        let (_, b) = t.get(Some(&customer), &format!("/bookings/{id}")).await;
        let expected = if attempt < 3 { "held" } else { "payment_failed" };
        assert_eq!(b["status"], expected, "after attempt {attempt}");
    }
    let (status, _) =
        t.post(Some(&customer), "/bookings", json!({"items": [{"resource_id": seats[0], "event_id": event}]})).await;
    assert_eq!(status, StatusCode::CREATED, "capacity is back after payment_failed");
}

#[tokio::test]
async fn late_cancellation_refunds_per_policy_and_provider_failure_is_503() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    // The show starts in 12 h: inside the 24 h window, so the default policy refunds 50 %.
    let (seats, event) = t.seats_and_event(&admin, &venue, 2, 12).await;
    let customer = t.customer("c3@test.allot").await;
    let (_, booking) =
        t.post(Some(&customer), "/bookings", json!({"items": [{"resource_id": seats[0], "event_id": event}]})).await;
    let id = booking["id"].as_str().unwrap();

    let failing = json!({"payment": {"method": "card", "token": "tok_processing_error"}});
    let response = t
        .client
        .post(t.url(&format!("/bookings/{id}/confirm")))
        .bearer_auth(&customer)
        .json(&failing)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().get("retry-after").is_some());
    let (_, body) = common::read(response).await;
    assert_eq!(body["error"]["code"], "payment_provider_unavailable");
    let (_, still) = t.get(Some(&customer), &format!("/bookings/{id}")).await;
    assert_eq!(still["status"], "held", "a provider failure leaves the hold");
    assert_eq!(still["payment_attempts"], 0, "a provider failure is not a decline");

    let (status, confirmed) = t
        .post(
            Some(&customer),
            &format!("/bookings/{id}/confirm"),
            json!({"payment": {"method": "card", "token": "tok_visa"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    let (status, cancelled) = t.post(Some(&customer), &format!("/bookings/{id}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["refund"]["amount"], 600, "50 % of 1200");
    assert!(cancelled["refund"]["reference"].is_string());
    // What the cancel answered is what is stored: a later read shows the refund's reference.
    let (_, stored) = t.get(Some(&customer), &format!("/bookings/{id}")).await;
    assert_eq!(stored["refund"], cancelled["refund"]);

    let (status, again) = t.post(Some(&customer), &format!("/bookings/{id}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "cancelling twice: {again}");
    assert_eq!(again["error"]["code"], "conflict");
}

#[tokio::test]
async fn async_payment_holds_capacity_until_the_hold_would_expire() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 1, 24).await;
    let customer = t.customer("c4@test.allot").await;
    let (_, booking) =
        t.post(Some(&customer), "/bookings", json!({"items": [{"resource_id": seats[0], "event_id": event}]})).await;
    let id = booking["id"].as_str().unwrap();
    let (status, pending) = t
        .post(
            Some(&customer),
            &format!("/bookings/{id}/confirm"),
            json!({"payment": {"method": "card", "token": "tok_async"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{pending}");
    assert_eq!(pending["status"], "pending_payment");
    assert_eq!(pending["expires_at"], booking["expires_at"], "still bounded by the hold's expiry");
    let other = t.customer("c5@test.allot").await;
    let seat = json!({"items": [{"resource_id": seats[0], "event_id": event}]});
    let (status, body) = t.post(Some(&other), "/bookings", seat.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // The provider never reported back: at expires_at the capacity is released.
    t.clock.advance(jiff::SignedDuration::from_secs(601));
    let (status, body) = t.post(Some(&other), "/bookings", seat).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let (_, b) = t.get(Some(&t.login("c4@test.allot").await), &format!("/bookings/{id}")).await;
        if b["status"] == "expired" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "pending booking not expired: {b}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn health_and_readiness() {
    let t = TestApp::spawn().await;
    let ok = t.client.get(format!("http://{}/healthz", t.addr)).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let ready = t.client.get(format!("http://{}/readyz", t.addr)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let (status, body) = common::read(t.client.get(format!("http://{}/nope", t.addr)).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = common::read(t.client.put(t.url("/venues")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["error"]["code"], "method_not_allowed");
}
