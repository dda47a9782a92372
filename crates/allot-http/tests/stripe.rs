//! The Stripe payment provider against a local stand-in that speaks Stripe's API
//! (`common::fake_stripe`): what each call sends, how each answer is read, the idempotency
//! keys that make retries safe; then the whole booking lifecycle paid through it over real
//! HTTP, with Stripe's events at `/payments/webhooks/stripe`.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use allot_app::clock::Clock;
use allot_app::payments::{ChargeOutcome, ChargeRequest, PaymentProvider, ProviderError, RefundRequest};
use allot_app::store::Role;
use allot_core::ids::BookingId;
use allot_core::inventory::Currency;
use allot_http::stripe::StripeProvider;
use common::TestApp;
use common::fake_stripe::{FAKE_STRIPE_KEY, FakeStripe};
use reqwest::StatusCode;
use serde_json::json;

fn charge(token: &str, key: &str) -> ChargeRequest {
    ChargeRequest {
        booking_id: BookingId::new(),
        amount: 1250,
        currency: Currency::try_from("EUR".to_owned()).unwrap(),
        token: token.into(),
        idempotency_key: key.into(),
    }
}

async fn stripe() -> (Arc<FakeStripe>, StripeProvider) {
    let (fake, base) = FakeStripe::start().await;
    (fake, StripeProvider::new(&base, FAKE_STRIPE_KEY).unwrap())
}

#[tokio::test]
async fn a_charge_is_one_confirmed_payment_intent_sent_with_its_idempotency_key() {
    let (fake, stripe) = stripe().await;
    let request = charge("tok_visa", "booking_1_0");
    let Ok(ChargeOutcome::Succeeded { reference }) = stripe.charge(&request).await else { panic!("succeeded") };
    assert!(reference.starts_with("pi_"), "{reference}");
    let call = &fake.calls()[0];
    assert_eq!((call.path.as_str(), call.idempotency_key.as_deref()), ("/v1/payment_intents", Some("booking_1_0")));
    let sent = |field: &str| call.form.get(field).map(String::as_str);
    assert_eq!((sent("amount"), sent("currency"), sent("confirm")), (Some("1250"), Some("eur"), Some("true")));
    assert_eq!(sent("payment_method_data[card][token]"), Some("tok_visa"));
    assert_eq!(sent("payment_method_types[]"), Some("card"), "cards only: no redirect is ever asked for");
    assert_eq!(sent("metadata[booking_id]"), Some(request.booking_id.to_string().as_str()), "for its events");

    let again = stripe.charge(&request).await;
    assert_eq!(again, Ok(ChargeOutcome::Succeeded { reference: reference.clone() }), "a retry replays the charge");
    assert_eq!(fake.intents(), 1, "charged once");
    assert_eq!(fake.intent(&reference), Some((1250, 0)));
}

#[tokio::test]
async fn stripes_answers_read_as_declines_pending_payments_unknown_tokens_or_an_unavailable_provider() {
    let (fake, stripe) = stripe().await;
    let outcome = |token: &'static str| {
        let stripe = &stripe;
        async move { stripe.charge(&charge(token, &format!("key_{token}"))).await }
    };
    assert_eq!(outcome("tok_chargeDeclined").await, Ok(ChargeOutcome::Declined { reason: "generic_decline".into() }));
    let poor = outcome("tok_chargeDeclinedInsufficientFunds").await;
    assert_eq!(poor, Ok(ChargeOutcome::Declined { reason: "insufficient_funds".into() }));
    let three_ds = outcome("tok_threeDSecure2Required").await;
    assert_eq!(three_ds, Ok(ChargeOutcome::Declined { reason: "authentication_required".into() }));
    assert!(
        matches!(outcome("tok_processing").await, Ok(ChargeOutcome::Pending { reference }) if reference.starts_with("pi_"))
    );
    assert_eq!(outcome("tok_nonsense").await, Err(ProviderError::InvalidToken));

    fake.fail_next(1);
    assert!(matches!(outcome("tok_visa").await, Err(ProviderError::Unavailable(why)) if why.contains("500")));
    assert!(matches!(outcome("tok_visa").await, Ok(ChargeOutcome::Succeeded { .. })), "the retry, once Stripe is back");
    let (_, base) = FakeStripe::start().await;
    let wrong_key = StripeProvider::new(&base, "sk_test_not_this_one").unwrap();
    let refused = wrong_key.charge(&charge("tok_visa", "k")).await;
    assert!(matches!(refused, Err(ProviderError::Unavailable(why)) if why.contains("401")), "a key refused");
    let nowhere = StripeProvider::new("http://127.0.0.1:9", FAKE_STRIPE_KEY).unwrap();
    assert!(matches!(nowhere.charge(&charge("tok_visa", "k")).await, Err(ProviderError::Unavailable(_))));
}

#[tokio::test]
async fn a_refund_is_made_once_per_key_and_a_payment_refunded_already_owes_nothing() {
    let (fake, stripe) = stripe().await;
    let Ok(ChargeOutcome::Succeeded { reference }) = stripe.charge(&charge("tok_visa", "k_1")).await else {
        panic!("charged")
    };
    let request = RefundRequest::of(&reference, 600);
    let refund = stripe.refund(&request).await.unwrap();
    assert!(refund.starts_with("re_"), "{refund}");
    let call = fake.calls().into_iter().find(|c| c.path == "/v1/refunds").unwrap();
    assert_eq!(call.idempotency_key.as_deref(), Some(request.idempotency_key.as_str()));
    assert_eq!((call.form["payment_intent"].as_str(), call.form["amount"].as_str()), (reference.as_str(), "600"));
    assert_eq!(stripe.refund(&request).await.unwrap(), refund, "a retry replays the refund");
    assert_eq!(fake.intent(&reference), Some((1250, 600)), "refunded once");

    let rest = RefundRequest { idempotency_key: "by_hand".into(), ..RefundRequest::of(&reference, 650) };
    stripe.refund(&rest).await.unwrap();
    let after = RefundRequest { idempotency_key: "later".into(), ..RefundRequest::of(&reference, 100) };
    assert_eq!(stripe.refund(&after).await.unwrap(), format!("already_refunded_{reference}"));
    let unknown = stripe.refund(&RefundRequest::of("pi_unknown", 100)).await;
    assert!(matches!(unknown, Err(ProviderError::Unavailable(_))), "{unknown:?}");
}

/// A customer books a seat and pays through Stripe; a second pays with a card that is still
/// processing, which Stripe's signed event confirms; the first cancels and is refunded by Stripe.
#[tokio::test]
async fn a_booking_paid_through_stripe_end_to_end() {
    let (fake, base) = FakeStripe::start().await;
    let provider = Arc::new(StripeProvider::new(&base, FAKE_STRIPE_KEY).unwrap());
    let options = allot_http::HttpOptions::default().with_rate_limits(allot_http::ratelimit::RateLimits::off());
    let t = TestApp::spawn_paying(options, |store| store, provider).await;
    let manager = t.user_with_role("manager@test.allot", Role::Manager).await;
    let venue = t.venue(&manager, "cinema").await;
    let (seats, event) = t.seats_and_event(&manager, &venue, 2, 72).await;
    let customer = t.customer("stripe@test.allot").await;
    let hold = |seat: &str| json!({"items": [{"resource_id": seat, "event_id": event}]});

    let (_, held) = t.post(Some(&customer), "/bookings", hold(&seats[0])).await;
    let id = held["id"].as_str().unwrap().to_owned();
    let card = json!({"payment": {"method": "card", "token": "tok_visa"}});
    let (status, paid) = t.post(Some(&customer), &format!("/bookings/{id}/confirm"), card).await;
    assert_eq!((status, paid["status"].as_str()), (StatusCode::OK, Some("confirmed")), "{paid}");
    assert_eq!(paid["payment"]["provider"], "stripe");
    let reference = paid["payment"]["reference"].as_str().unwrap().to_owned();
    let total = paid["total"].as_i64().unwrap();
    assert_eq!(fake.intent(&reference), Some((total, 0)), "Stripe took the booking's total");

    let declined = json!({"payment": {"method": "card", "token": "tok_chargeDeclined"}});
    let (_, other) = t.post(Some(&customer), "/bookings", hold(&seats[1])).await;
    let other = other["id"].as_str().unwrap().to_owned();
    let (status, error) = t.post(Some(&customer), &format!("/bookings/{other}/confirm"), declined).await;
    assert_eq!((status, error["error"]["code"].as_str()), (StatusCode::PAYMENT_REQUIRED, Some("payment_declined")));
    let processing = json!({"payment": {"method": "card", "token": "tok_processing"}});
    let (status, pending) = t.post(Some(&customer), &format!("/bookings/{other}/confirm"), processing).await;
    assert_eq!((status, pending["status"].as_str()), (StatusCode::OK, Some("pending_payment")), "{pending}");
    let payment = pending["payment"]["reference"].as_str().unwrap();
    let object = json!({"id": payment, "object": "payment_intent", "amount_received": pending["total"],
        "currency": "eur", "status": "succeeded", "metadata": {"booking_id": other}});
    let body = json!({"id": "evt_1", "type": "payment_intent.succeeded", "data": {"object": object}}).to_string();
    let signature = allot_app::webhooks::sign(t.app.webhook_secret().as_bytes(), body.as_bytes(), t.clock.now());
    let sent = t.client.post(t.url("/payments/webhooks/stripe")).header("Stripe-Signature", signature).body(body);
    let (status, ack) = common::read(sent.send().await.unwrap()).await;
    assert_eq!((status, ack["booking"]["status"].as_str()), (StatusCode::OK, Some("confirmed")), "{ack}");
    let (status, _) = common::read(t.client.post(t.url("/payments/webhooks/test")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "only the provider in use has an endpoint");

    let (status, cancelled) = t.post(Some(&customer), &format!("/bookings/{id}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    let refunded = cancelled["refund"]["amount"].as_i64().unwrap();
    assert!(refunded > 0, "{cancelled}");
    assert!(cancelled["refund"]["reference"].as_str().unwrap().starts_with("re_"), "{cancelled}");
    assert_eq!(fake.intent(&reference), Some((total, refunded)), "Stripe gave back what the policy owes");
}
