//! The audit trail over real HTTP (I6): a scripted session of successes, conflicts, declines,
//! denials, bad input and failed logins leaves exactly one event per state-changing attempt;
//! the chain verifies, and editing one row in the database breaks it at that row. Reading the
//! trail: admins everything, managers their venues, nobody else.
#![allow(clippy::unwrap_used)]

mod common;

use allot_app::audit::Verdict;
use allot_app::store::Role;
use common::TestApp;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// `(action, outcome, reason)` of the events after `after_seq`, oldest first.
async fn events_after(t: &TestApp, admin: &str, after_seq: u64) -> Vec<Value> {
    let (status, page) = t.get(Some(admin), "/audit?limit=100").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let mut events: Vec<Value> =
        page["data"].as_array().unwrap().iter().filter(|e| e["seq"].as_u64().unwrap() > after_seq).cloned().collect();
    events.reverse();
    events
}

fn summary(events: &[Value]) -> Vec<(String, String, Option<String>)> {
    events
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
                e["reason"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

async fn head(t: &TestApp) -> u64 {
    t.store.audit_head().await.unwrap().0
}

fn s(action: &str, outcome: &str, reason: Option<&str>) -> (String, String, Option<String>) {
    (action.to_owned(), outcome.to_owned(), reason.map(str::to_owned))
}

#[tokio::test]
async fn a_scripted_session_leaves_one_event_per_attempt_and_a_chain_that_verifies() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 2, 48).await;
    let start = head(&t).await;

    // 1. register, 2. a failed login, 3. a login
    let (status, user) = t
        .post(None, "/auth/register", json!({"email": "ann@test.allot", "password": "password-123", "name": "Ann"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    let (status, _) =
        t.post(None, "/auth/login", json!({"email": "ann@test.allot", "password": "wrong-password"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let ann = t.login("ann@test.allot").await;
    let bob = t.customer("bob@test.allot").await; // 4. register, 5. login
    // 6. a hold, 7. the same seat again: unavailable
    let seat = json!({"items": [{"resource_id": seats[0], "event_id": event}]});
    let (status, held) = t.post(Some(&ann), "/bookings", seat.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    let (status, _) = t.post(Some(&bob), "/bookings", seat).await;
    assert_eq!(status, StatusCode::CONFLICT);
    // 8. a declined payment (recorded: it counts), 9. a confirm
    let booking = held["id"].as_str().unwrap();
    let pay = |token: &str| json!({"payment": {"method": "card", "token": token}});
    let (status, _) = t.post(Some(&ann), &format!("/bookings/{booking}/confirm"), pay("tok_chargeDeclined")).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    let (status, _) = t.post(Some(&ann), &format!("/bookings/{booking}/confirm"), pay("tok_visa")).await;
    assert_eq!(status, StatusCode::OK);
    // 10. a customer creating a venue: denied, 11. bad input, 12. no token at all
    let venue_body = json!({"name": "Mine", "category": "studio", "location": {"lat": 52.5, "lon": 13.4},
                            "timezone": "Europe/Berlin", "currency": "EUR"});
    let (status, _) = t.post(Some(&bob), "/venues", venue_body).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = t.post(Some(&bob), "/bookings", json!({"items": "three"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = t.post(None, &format!("/bookings/{booking}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Reads are not audited.
    let (status, _) = t.get(Some(&ann), &format!("/bookings/{booking}")).await;
    assert_eq!(status, StatusCode::OK);

    let events = events_after(&t, &admin, start).await;
    assert_eq!(
        summary(&events),
        vec![
            s("auth.register", "success", None),
            s("auth.login", "failure", Some("unauthenticated")),
            s("auth.login", "success", None),
            s("auth.register", "success", None),
            s("auth.login", "success", None),
            s("booking.hold", "success", None),
            s("booking.hold", "failure", Some("unavailable")),
            s("booking.confirm", "failure", Some("payment_declined")),
            s("booking.confirm", "success", None),
            s("venue.create", "failure", Some("forbidden")),
            s("booking.hold", "failure", Some("invalid_request")),
            s("booking.cancel", "failure", Some("unauthenticated")),
        ]
    );
    let ann_id = user["id"].as_str().unwrap();
    assert_eq!(events[0]["target_id"], ann_id, "register names the new account");
    assert_eq!(events[1]["details"]["email"], "ann@test.allot", "a failed login names the e-mail tried");
    assert_eq!(events[1]["actor_role"], "anonymous");
    assert_eq!((&events[2]["actor_id"], &events[2]["actor_role"]), (&json!(ann_id), &json!("customer")));
    assert_eq!((&events[5]["target_id"], &events[5]["venue_id"]), (&json!(booking), &json!(venue)));
    assert_eq!(events[7]["target_id"], booking);
    assert_eq!(events[11]["actor_id"], Value::Null);
    for e in &events {
        assert_eq!(e["ip"], "127.0.0.1", "{e}");
        assert!(e["request_id"].as_str().is_some_and(|id| !id.is_empty()), "every request has an id: {e}");
        assert_eq!(e["hash"].as_str().unwrap().len(), 64);
    }
    assert!(matches!(t.app.audit_verify().await.unwrap(), Verdict::Intact { .. }));

    // Someone with database access rewrites history: the declined attempt "succeeded".
    let tampered = events[7]["seq"].as_u64().unwrap();
    let unguard = if t.db_url.starts_with("postgres") {
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"
    } else {
        "DROP TRIGGER audit_events_no_update"
    };
    t.raw_sql(unguard).await;
    t.raw_sql(&format!("UPDATE audit_events SET outcome = 'success', reason = NULL WHERE seq = {tampered}")).await;
    match t.app.audit_verify().await.unwrap() {
        Verdict::Broken { seq, id, .. } => {
            assert_eq!(seq, tampered);
            assert_eq!(id.as_deref(), events[7]["id"].as_str());
        }
        other => panic!("tampering went unnoticed: {other:?}"),
    }
}

/// The audit event of a failed login sent with one extra `header`, as an admin reads it.
async fn failed_login_event(t: &TestApp, (name, value): (&str, &str)) -> Value {
    let admin = t.admin().await;
    let response = t
        .client
        .post(t.url("/auth/login"))
        .header(name, value)
        .json(&json!({"email": "nobody@test.allot", "password": "password-123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let (_, page) = t.get(Some(&admin), "/audit?action=auth.login&outcome=failure").await;
    page["data"][0].clone()
}

#[tokio::test]
async fn the_request_id_is_recorded() {
    let t = TestApp::spawn().await;
    let event = failed_login_event(&t, ("x-request-id", "trace-123")).await;
    assert_eq!(event["request_id"], "trace-123", "{event}");
}

#[tokio::test]
async fn admins_read_everything_managers_their_venues_others_nothing() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let manager = t.user_with_role("m@test.allot", Role::Manager).await;
    let other_manager = t.user_with_role("m2@test.allot", Role::Manager).await;
    let mine = t.venue(&manager, "studio").await;
    let theirs = t.venue(&other_manager, "studio").await;
    let customer = t.customer("c@test.allot").await;

    let (status, page) = t.get(Some(&manager), "/audit").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let venues: Vec<&Value> = page["data"].as_array().unwrap().iter().map(|e| &e["venue_id"]).collect();
    assert!(!venues.is_empty() && venues.iter().all(|v| **v == json!(mine)), "{page}");
    let (status, _) = t.get(Some(&manager), &format!("/audit?venue_id={theirs}")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, page) = t.get(Some(&manager), &format!("/audit?venue_id={mine}")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    for who in [Some(customer.as_str()), None] {
        let (status, _) = t.get(who, "/audit").await;
        assert!(status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED, "{status}");
    }

    let (status, page) = t.get(Some(&admin), "/audit?limit=2").await;
    assert_eq!(status, StatusCode::OK);
    let first: Vec<u64> = page["data"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, next) = t.get(Some(&admin), &format!("/audit?limit=2&cursor={cursor}")).await;
    let second: Vec<u64> = next["data"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(first[0] > first[1] && first[1] > second[0], "newest first, no overlap: {first:?} {second:?}");

    for bad in ["outcome=maybe", "from=yesterday", "limit=0", "cursor=abc", "venue_id=nope"] {
        let (status, body) = t.get(Some(&admin), &format!("/audit?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["error"]["details"]["fields"].is_object(), "{body}");
    }
}

#[tokio::test]
async fn access_changes_and_partners_are_audited_by_name() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 1, 48).await;
    let (_, ann) = t
        .post(None, "/auth/register", json!({"email": "ann@test.allot", "password": "password-123", "name": "Ann"}))
        .await;
    let ann = ann["id"].as_str().unwrap().to_owned();
    let (status, _) =
        t.post(Some(&admin), &format!("/users/{ann}/roles"), json!({"role": "manager", "venue_id": venue})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, key) = t.post(Some(&admin), "/api-keys", json!({"name": "OTA", "scopes": ["bookings:write"]})).await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let secret = key["key"].as_str().unwrap();
    let body = json!({"items": [{"resource_id": seats[0], "event_id": event}]});
    let (status, held) = t.post(Some(secret), "/bookings", body).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");

    let (_, page) = t.get(Some(&admin), "/audit?limit=3").await;
    let events = page["data"].as_array().unwrap();
    let hold = &events[0];
    assert_eq!(
        (&hold["action"], &hold["actor_role"], &hold["actor_id"]),
        (&json!("booking.hold"), &json!("partner"), &key["id"])
    );
    let created = &events[1];
    assert_eq!((&created["action"], &created["target_id"]), (&json!("api_key.create"), &key["id"]));
    assert_eq!(created["details"]["scopes"], "bookings:write");
    assert!(!created.to_string().contains(secret), "the key itself is never recorded");
    let granted = &events[2];
    assert_eq!(
        (&granted["action"], &granted["target_id"], &granted["venue_id"]),
        (&json!("user.role_grant"), &json!(ann), &json!(venue))
    );
    assert!(granted["details"]["role"].as_str().unwrap().starts_with("Manager"), "{granted}");
}

#[tokio::test]
async fn refused_refreshes_are_failures_and_a_reuse_says_so() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    t.customer("ann@test.allot").await;
    let (_, session) =
        t.post(None, "/auth/login", json!({"email": "ann@test.allot", "password": "password-123"})).await;
    let first = session["refresh_token"].as_str().unwrap().to_owned();
    let start = head(&t).await;
    let (status, _) = t.post(None, "/auth/refresh", json!({"refresh_token": "garbage"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = t.post(None, "/auth/refresh", json!({"refresh_token": first})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = t.post(None, "/auth/refresh", json!({"refresh_token": first})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a reused token is refused");
    let events = events_after(&t, &admin, start).await;
    assert_eq!(
        summary(&events),
        vec![
            s("auth.refresh", "failure", Some("unauthenticated")),
            s("auth.refresh", "success", None),
            s("auth.refresh", "failure", Some("refresh_token_reused")),
        ]
    );
}

#[tokio::test]
async fn refusals_of_the_idempotency_layer_are_recorded() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 2, 48).await;
    let ann = t.customer("ann@test.allot").await;
    let start = head(&t).await;
    let hold = |seat: &str| json!({"items": [{"resource_id": seat, "event_id": event}]});
    let post =
        |body: Value| t.client.post(t.url("/bookings")).bearer_auth(&ann).header("idempotency-key", "k-1").json(&body);
    assert_eq!(post(hold(&seats[0])).send().await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(post(hold(&seats[0])).send().await.unwrap().status(), StatusCode::CREATED, "a replay");
    assert_eq!(post(hold(&seats[1])).send().await.unwrap().status(), StatusCode::UNPROCESSABLE_ENTITY, "key reused");
    let events = events_after(&t, &admin, start).await;
    assert_eq!(
        summary(&events),
        vec![s("booking.hold", "success", None), s("booking.hold", "failure", Some("idempotency_key_reused"))],
        "the replay is the same attempt, recorded once"
    );
}

#[tokio::test]
async fn a_keyed_hold_refused_before_its_write_is_recorded_once_as_its_key_says() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let venue = t.venue(&admin, "cinema").await;
    let (seats, event) = t.seats_and_event(&admin, &venue, 1, 48).await;
    let ann = t.customer("ann@test.allot").await;
    let start = head(&t).await;
    let post = |key: &str, body: &str| {
        let request = t.client.post(t.url("/bookings")).bearer_auth(&ann).header("idempotency-key", key);
        request.header("content-type", "application/json").body(body.to_owned()).send()
    };
    let hold = json!({"items": [{"resource_id": seats[0], "event_id": event}]}).to_string();
    assert_eq!(post("k-1", &hold).await.unwrap().status(), StatusCode::CREATED);
    // Invalid, under a key another request answered: refused as a reuse, and only that.
    assert_eq!(post("k-1", r#"{"items": []}"#).await.unwrap().status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Invalid under a new key: recorded; its retry is a replay, not another attempt.
    for _ in 0..2 {
        assert_eq!(post("k-2", r#"{"items": []}"#).await.unwrap().status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
    // Not even JSON: the same.
    for _ in 0..2 {
        assert_eq!(post("k-3", "{not json").await.unwrap().status(), StatusCode::BAD_REQUEST);
    }
    let events = events_after(&t, &admin, start).await;
    assert_eq!(
        summary(&events),
        vec![
            s("booking.hold", "success", None),
            s("booking.hold", "failure", Some("idempotency_key_reused")),
            s("booking.hold", "failure", Some("invalid_request")),
            s("booking.hold", "failure", Some("invalid_request")),
        ],
        "each attempt once, as its answer says"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_client_address_is_recorded() {
    let limits = allot_http::ratelimit::RateLimits {
        enabled: false,
        trusted_proxies: vec!["127.0.0.1/32".into()],
        ..allot_http::ratelimit::RateLimits::default()
    };
    let t = TestApp::spawn_with(allot_http::HttpOptions::default().with_rate_limits(limits)).await;
    let event = failed_login_event(&t, ("x-forwarded-for", "203.0.113.9")).await;
    assert_eq!(event["ip"], "203.0.113.9", "{event}");
}
