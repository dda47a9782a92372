//! The payment provider's signing secret: made at the first start and printed by `allot
//! payments webhook-secret` (which makes none), or set by `allot serve --payment-webhook-secret`
//! for every node; a secret too short to be one is refused at start. And the built-in test
//! provider of a real server reporting a `tok_async` payment by itself: a signed event to the
//! server's own endpoint confirms the booking a moment later. And `--stripe-secret-key`: payments
//! go to Stripe's API (here an address where nothing listens) and its events are taken at
//! `/payments/webhooks/stripe`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use allot_app::demo::{ADMIN_EMAIL, CUSTOMER_EMAIL, DEMO_PASSWORD};
use common::{Node, demo_catalogue, get, http_client, login, now_nanos, post, run_command, scratch_dir, start_node};
use reqwest::StatusCode;
use serde_json::json;

fn secret(db_url: &str) -> (i32, String) {
    run_command(&["payments", "webhook-secret"], db_url)
}

/// `allot serve` with `flags` exits with an error whose message names `expected`.
fn serve_refused(db_url: &str, flags: &[&str], expected: &str) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", db_url])
        .args(flags)
        .env("ALLOT_LOG", "warn")
        .output()
        .unwrap();
    assert!(!output.status.success(), "{flags:?} refused");
    assert!(String::from_utf8_lossy(&output.stderr).contains(expected), "{output:?}");
}

#[test]
fn the_webhook_secret_is_made_once_and_can_be_set_at_start() {
    let dir = scratch_dir("payments-cli", now_nanos());
    let db_url = format!("sqlite://{}/allot.db", dir.display());
    let (code, none) = secret(&db_url);
    assert_eq!(code, 1, "none before the first start: {none}");
    assert!(none.contains("no payment webhook secret yet"), "{none}");
    let mut node = Node::start_with("first", &db_url, &[], dir.join("first.log"), 4096);
    node.kill();
    let (code, made) = secret(&db_url);
    assert_eq!(code, 0, "{made}");
    assert!(made.starts_with("whsec_") && made.trim().len() > 20, "{made}");
    let mut node = Node::start_with("second", &db_url, &[], dir.join("second.log"), 4096);
    node.kill();
    assert_eq!(secret(&db_url), (0, made.clone()), "made once, kept");

    let configured = "whsec_configured_by_the_operator";
    let flags = ["--payment-webhook-secret", configured];
    let mut node = Node::start_with("configured", &db_url, &flags, dir.join("serve.log"), 4096);
    node.kill();
    assert_eq!(secret(&db_url), (0, format!("{configured}\n")), "stored for every node");

    serve_refused(&db_url, &["--payment-webhook-secret", "short"], "16 to 256 bytes");
    assert_eq!(secret(&db_url), (0, format!("{configured}\n")), "unchanged");
}

#[tokio::test]
async fn the_test_provider_reports_an_async_payment_and_the_booking_is_confirmed() {
    let dir = scratch_dir("test-provider", now_nanos());
    let db_url = format!("sqlite://{}/allot.db", dir.display());
    let mut node = start_node("demo", &db_url, true, dir.join("serve.log"), 8192).await;
    let client = http_client(Duration::from_secs(10), None);
    let demo = demo_catalogue(&client, &node, 1).await;
    let token = login(&client, &node, CUSTOMER_EMAIL, DEMO_PASSWORD).await;
    let show = &demo.shows[0];
    let item = json!({"resource_id": show.seats[0], "event_id": show.id});
    let (status, held) = post(&client, &node, Some(&token), "/bookings", json!({"items": [item]})).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    let booking = held["id"].as_str().unwrap().to_owned();
    let confirm = json!({"payment": {"method": "card", "token": "tok_async"}});
    let (status, pending) = post(&client, &node, Some(&token), &format!("/bookings/{booking}/confirm"), confirm).await;
    assert_eq!((status, pending["status"].as_str()), (StatusCode::OK, Some("pending_payment")), "{pending}");

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let confirmed = loop {
        let (status, now) = get(&client, &node, Some(&token), &format!("/bookings/{booking}")).await;
        assert_eq!(status, StatusCode::OK, "{now}");
        if now["status"] != "pending_payment" {
            break now;
        }
        assert!(std::time::Instant::now() < deadline, "not reported in 30 s: {}", node.stderr_tail());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(confirmed["status"], "confirmed", "{confirmed}");
    assert_eq!(confirmed["payment"]["status"], "succeeded", "{confirmed}");
    assert_eq!(confirmed["payment"]["reference"], pending["payment"]["reference"], "the same payment");
    let admin = login(&client, &node, ADMIN_EMAIL, DEMO_PASSWORD).await;
    let (_, events) = get(&client, &node, Some(&admin), "/audit?action=payment.event").await;
    let event = &events["data"][0];
    assert_eq!(
        (event["actor_role"].as_str(), event["outcome"].as_str()),
        (Some("provider"), Some("success")),
        "{events}"
    );
    node.kill();
}

#[tokio::test]
async fn with_a_stripe_key_payments_go_to_stripe() {
    let dir = scratch_dir("stripe", now_nanos());
    let db_url = format!("sqlite://{}/allot.db", dir.display());
    serve_refused(&db_url, &["--stripe-secret-key", "pk_test_public"], "--stripe-secret-key");

    let flags = ["--demo", "--stripe-secret-key", "sk_test_allot", "--stripe-api-base", "http://127.0.0.1:9"];
    let mut node = Node::start_with("stripe", &db_url, &flags, dir.join("serve.log"), 8192);
    let client = http_client(Duration::from_secs(30), None);
    let demo = demo_catalogue(&client, &node, 1).await;
    let token = login(&client, &node, CUSTOMER_EMAIL, DEMO_PASSWORD).await;
    let item = json!({"resource_id": demo.shows[0].seats[0], "event_id": demo.shows[0].id});
    let (_, held) = post(&client, &node, Some(&token), "/bookings", json!({"items": [item]})).await;
    let booking = held["id"].as_str().unwrap();
    let card = json!({"payment": {"method": "card", "token": "tok_visa"}});
    let (status, error) = post(&client, &node, Some(&token), &format!("/bookings/{booking}/confirm"), card).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "Stripe cannot be reached: {error}");
    assert_eq!(error["error"]["code"], "payment_provider_unavailable");
    let (status, _) = post(&client, &node, None, "/payments/webhooks/stripe", json!({})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "Stripe's events are taken, signed");
    let (status, _) = post(&client, &node, None, "/payments/webhooks/test", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the test provider is not in use");
    node.kill();
}
