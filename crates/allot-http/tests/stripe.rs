//! The Stripe payment provider against a local stand-in that speaks Stripe's API
//! (`common::fake_stripe`): what each call sends, how each answer is read, the idempotency
//! keys that make retries safe; then the whole booking lifecycle paid through it over real
//! HTTP, with Stripe's events at `/payments/webhooks/stripe`.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use allot_app::clock::Clock;
use allot_app::payments::{ChargeOutcome, ChargeRequest, PaymentProvider, PaymentStatus, ProviderError, RefundRequest};
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
async fn a_charge_creates_the_attempt_s_payment_intent_and_confirms_it_with_the_card() {
    let (fake, stripe) = stripe().await;
    let request = charge("tok_visa", "booking_1_0");
    let Ok(ChargeOutcome::Succeeded { reference }) = stripe.charge(&request).await else { panic!("succeeded") };
    assert!(reference.starts_with("pi_"), "{reference}");
    let calls = fake.calls();
    let (create, confirm) = (&calls[0], &calls[1]);
    assert_eq!((create.path.as_str(), create.idempotency_key.as_deref()), ("/v1/payment_intents", Some("booking_1_0")));
    let sent = |field: &str| create.form.get(field).map(String::as_str);
    assert_eq!((sent("amount"), sent("currency")), (Some("1250"), Some("eur")));
    assert_eq!(sent("payment_method_types[]"), Some("card"), "cards only: no redirect is ever asked for");
    assert_eq!(sent("metadata[booking_id]"), Some(request.booking_id.to_string().as_str()), "for its events");
    assert_eq!(create.form.get("payment_method_data[card][token]"), None, "no money moves at creation");
    assert_eq!(confirm.path, format!("/v1/payment_intents/{reference}/confirm"));
    let key = confirm.idempotency_key.clone().unwrap();
    assert!(
        key.starts_with("booking_1_0_") && key.len() > "booking_1_0_".len(),
        "the attempt's key and its card's: {key}"
    );
    let sent = |field: &str| confirm.form.get(field).map(String::as_str);
    assert_eq!(sent("payment_method_data[card][token]"), Some("tok_visa"));
    assert_eq!(sent("error_on_requires_action"), Some("true"), "no 3-D Secure page to show");

    let again = stripe.charge(&request).await;
    assert_eq!(again, Ok(ChargeOutcome::Succeeded { reference: reference.clone() }), "a retry replays the charge");
    let other_card = ChargeRequest { token: "tok_mastercard".into(), ..request };
    let paid = stripe.charge(&other_card).await;
    assert_eq!(paid, Ok(ChargeOutcome::Succeeded { reference: reference.clone() }), "paid already: not again");
    assert_eq!((fake.created(), fake.intents()), (1, 1), "one payment, charged once");
    assert_eq!(fake.intent(&reference), Some((1250, 0)));
}

#[tokio::test]
async fn stripes_answers_read_as_declines_pending_payments_unknown_tokens_or_an_unavailable_provider() {
    let (_fake, stripe) = stripe().await;
    let outcome = |token: &'static str| {
        let stripe = &stripe;
        async move { stripe.charge(&charge(token, &format!("key_{token}"))).await }
    };
    assert_eq!(outcome("tok_chargeDeclined").await, Ok(ChargeOutcome::Declined { reason: "generic_decline".into() }));
    let poor = outcome("tok_chargeDeclinedInsufficientFunds").await;
    assert_eq!(poor, Ok(ChargeOutcome::Declined { reason: "insufficient_funds".into() }));
    let three_ds = outcome("tok_threeDSecure2Required").await;
    // (With `error_on_requires_action`, Stripe answers a card that needs 3-D Secure as a card error.)
    assert_eq!(three_ds, Ok(ChargeOutcome::Declined { reason: "authentication_required".into() }));
    assert!(
        matches!(outcome("tok_processing").await, Ok(ChargeOutcome::Pending { reference }) if reference.starts_with("pi_"))
    );
    assert_eq!(outcome("tok_nonsense").await, Err(ProviderError::InvalidToken));

    let small = ChargeRequest { amount: 10, ..charge("tok_visa", "small") };
    assert_eq!(stripe.charge(&small).await, Err(ProviderError::Rejected("amount_too_small".into())), "not an outage");
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
    let request = RefundRequest::of(BookingId::new(), &reference, 600);
    let refund = stripe.refund(&request).await.unwrap();
    assert!(refund.starts_with("re_"), "{refund}");
    let call = fake.calls().into_iter().find(|c| c.path == "/v1/refunds").unwrap();
    assert_eq!(call.idempotency_key.as_deref(), Some(request.idempotency_key.as_str()));
    assert_eq!((call.form["payment_intent"].as_str(), call.form["amount"].as_str()), (reference.as_str(), "600"));
    assert_eq!(stripe.refund(&request).await.unwrap(), refund, "a retry replays the refund");
    assert_eq!(fake.intent(&reference), Some((1250, 600)), "refunded once");

    let rest =
        RefundRequest { idempotency_key: "by_hand".into(), ..RefundRequest::of(BookingId::new(), &reference, 650) };
    stripe.refund(&rest).await.unwrap();
    let after =
        RefundRequest { idempotency_key: "later".into(), ..RefundRequest::of(BookingId::new(), &reference, 100) };
    assert_eq!(stripe.refund(&after).await.unwrap(), format!("already_refunded_{reference}"));
    let unknown = stripe.refund(&RefundRequest::of(BookingId::new(), "pi_unknown", 100)).await;
    assert_eq!(unknown, Err(ProviderError::Rejected("resource_missing".into())));
}

/// Stripe keeps a key's first answer for a day, a 500 included: a retry whose key answers a
/// saved 500 goes on with the next key of its chain, as every later retry does, so retries do
/// not stay stuck on the 500; a confirm whose outcome is unknown is settled by reading the
/// PaymentIntent, which succeeds at most once, so nothing is charged twice.
#[tokio::test]
async fn a_retry_after_a_stripe_failure_goes_on_with_the_next_key_and_never_charges_twice() {
    let (fake, stripe) = stripe().await;
    let request = charge("tok_visa", "booking_2_0");
    fake.fail_next(1);
    assert!(matches!(stripe.charge(&request).await, Err(ProviderError::Unavailable(why)) if why.contains("500")));
    let Ok(ChargeOutcome::Succeeded { reference }) = stripe.charge(&request).await else { panic!("the retry") };
    let again = stripe.charge(&request).await;
    assert_eq!(again, Ok(ChargeOutcome::Succeeded { reference: reference.clone() }), "a later retry finds it");
    let keys: Vec<String> = fake.calls().iter().filter_map(|c| c.idempotency_key.clone()).collect();
    let (create, confirm) = (&keys[0], &keys[3]);
    let chained = format!("{create}~1");
    assert_eq!(keys, [create, create, &chained, confirm, create, &chained, confirm].map(String::clone));
    assert_eq!((fake.created(), fake.intents()), (1, 1));

    // The confirm charged, and answered 500: the retry reads the PaymentIntent, paid.
    let request = charge("tok_visa", "booking_3_0");
    fake.fail_after_next_confirm(1);
    assert!(stripe.charge(&request).await.is_err());
    let Ok(ChargeOutcome::Succeeded { reference }) = stripe.charge(&request).await else { panic!("found paid") };
    assert_eq!(fake.intent(&reference), Some((1250, 0)));
    // The confirm did nothing, and answered 500: the retry confirms again, under the next key.
    let request = charge("tok_visa", "booking_4_0");
    fake.fail_next_confirm(1);
    assert!(stripe.charge(&request).await.is_err());
    assert!(matches!(stripe.charge(&request).await, Ok(ChargeOutcome::Succeeded { .. })));
    assert_eq!((fake.created(), fake.intents()), (3, 3), "each booking charged once");

    // A customer who mistyped the token retries with their card: the same payment, paid.
    let typo = charge("tok_typo", "booking_5_0");
    assert_eq!(stripe.charge(&typo).await, Err(ProviderError::InvalidToken));
    let card = ChargeRequest { token: "tok_visa".into(), ..typo };
    assert!(matches!(stripe.charge(&card).await, Ok(ChargeOutcome::Succeeded { .. })));
    assert_eq!((fake.created(), fake.intents()), (4, 4));

    // A card declined, then another that paid but whose answer was lost; the customer retries
    // with the first: its saved decline is older than the payment, which decides.
    let declined = charge("tok_chargeDeclined", "booking_6_0");
    assert!(matches!(stripe.charge(&declined).await, Ok(ChargeOutcome::Declined { .. })));
    let paid = ChargeRequest { token: "tok_visa".into(), ..declined.clone() };
    fake.fail_after_next_confirm(1);
    assert!(stripe.charge(&paid).await.is_err());
    let Ok(ChargeOutcome::Succeeded { reference }) = stripe.charge(&declined).await else { panic!("found paid") };
    assert_eq!((fake.intent(&reference), fake.created(), fake.intents()), (Some((1250, 0)), 5, 5));
}

/// A card Stripe could not process is no decline: the provider is unavailable for that try, and
/// the retry (which the saved error would answer for a day) confirms again under the next key
/// of the chain. A call whose key another request is still running under is sent again a
/// little later, and gets that request's answer, not an outage.
#[tokio::test]
async fn a_card_stripe_could_not_process_is_tried_again_and_a_key_in_use_is_waited_for() {
    let (fake, stripe) = stripe().await;
    let request = charge("tok_visa", "booking_7_0");
    fake.processing_error_next_confirm(1);
    let first = stripe.charge(&request).await;
    assert!(matches!(&first, Err(ProviderError::Retryable(why)) if why.contains("processed")), "{first:?}");
    let Ok(ChargeOutcome::Succeeded { reference }) = stripe.charge(&request).await else { panic!("the retry") };
    let confirms: Vec<String> = fake
        .calls()
        .iter()
        .filter(|c| c.path.ends_with("/confirm"))
        .filter_map(|c| c.idempotency_key.clone())
        .collect();
    assert_eq!(confirms.len(), 3, "the first, its replay, the next key: {confirms:?}");
    assert_eq!((&confirms[1], &confirms[2]), (&confirms[0], &format!("{}~1", confirms[0])));
    assert_eq!(fake.intent(&reference), Some((1250, 0)), "charged once");
    let never = stripe.charge(&charge("tok_chargeDeclinedProcessingError", "booking_8_0")).await;
    assert!(matches!(never, Err(ProviderError::Retryable(_))), "not a decline, nor an outage: {never:?}");

    fake.key_in_use_next(2);
    let busy = charge("tok_visa", "booking_9_0");
    assert!(matches!(stripe.charge(&busy).await, Ok(ChargeOutcome::Succeeded { .. })), "waited for, then made");
    let creates = fake.calls().iter().filter(|c| c.idempotency_key.as_deref() == Some("booking_9_0")).count();
    assert_eq!(creates, 3, "two 409s, then the call itself");
    fake.key_in_use_next(10);
    let stuck = stripe.charge(&charge("tok_visa", "booking_10_0")).await;
    assert!(matches!(stuck, Err(ProviderError::Unavailable(why)) if why.contains("409")), "a key in use too long");
}

/// A card token is used once: a confirm that made the token into a payment method on the
/// PaymentIntent and then failed (500) leaves it there, and the retry pays with that payment
/// method instead of sending the used token again.
#[tokio::test]
async fn a_retry_pays_with_the_payment_method_a_failed_confirm_left_not_the_used_token() {
    let (fake, stripe) = stripe().await;
    let request = charge("tok_visa", "booking_11_0");
    fake.attach_then_fail_next_confirm(1);
    assert!(matches!(stripe.charge(&request).await, Err(ProviderError::Unavailable(why)) if why.contains("500")));
    let Ok(ChargeOutcome::Succeeded { reference }) = stripe.charge(&request).await else { panic!("the retry") };
    let confirms: Vec<_> = fake.calls().into_iter().filter(|c| c.path.ends_with("/confirm")).collect();
    let last = confirms.last().unwrap();
    assert!(last.form.get("payment_method").is_some_and(|m| m.starts_with("pm_")), "{last:?}");
    assert_eq!(last.form.get("payment_method_data[card][token]"), None, "not the used token");
    assert_eq!(fake.intent(&reference), Some((1250, 0)), "charged once");
    let again = stripe.charge(&request).await;
    assert_eq!(again, Ok(ChargeOutcome::Succeeded { reference }), "a later retry finds it paid");
}

/// A payment left pending is asked about by reading its PaymentIntent: processing is pending,
/// succeeded is paid (what it took, in its currency), a PaymentIntent waiting for another card
/// failed; an id that is no PaymentIntent's is refused before anything is sent.
#[tokio::test]
async fn a_payment_s_status_is_read_from_its_payment_intent() {
    let (fake, stripe) = stripe().await;
    let eur = Currency::try_from("EUR".to_owned()).unwrap();
    for paid in [true, false] {
        let request = charge("tok_processing", &format!("booking_status_{paid}"));
        let Ok(ChargeOutcome::Pending { reference }) = stripe.charge(&request).await else { panic!("processing") };
        assert_eq!(stripe.payment_status(&reference).await, Ok(PaymentStatus::Pending));
        fake.settle_intent(&reference, paid);
        let expected = if paid {
            PaymentStatus::Succeeded(allot_app::webhooks::Received { amount: 1250, currency: eur })
        } else {
            PaymentStatus::Failed
        };
        assert_eq!(stripe.payment_status(&reference).await, Ok(expected));
    }
    assert!(matches!(stripe.payment_status("pi_../refunds").await, Err(ProviderError::Rejected(_))));
    assert!(matches!(stripe.payment_status("pi_unknown").await, Err(ProviderError::Rejected(_))), "no outage");
}

/// A refund whose answer was a 500 may have been made: before each try, the payment's refunds
/// are looked through for the one made under this operation's key.
#[tokio::test]
async fn a_refund_with_an_unknown_outcome_is_looked_for_before_another_is_asked_for() {
    let (fake, base) = FakeStripe::start().await;
    let stripe = StripeProvider::new(&base, FAKE_STRIPE_KEY).unwrap();
    let Ok(ChargeOutcome::Succeeded { reference }) = stripe.charge(&charge("tok_visa", "k_r")).await else {
        panic!("charged")
    };
    let request = RefundRequest::of(BookingId::new(), &reference, 600);
    fake.fail_after_next(1);
    assert!(matches!(stripe.refund(&request).await, Err(ProviderError::Unavailable(_))), "made, answered 500");
    let made = fake.refunds()[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(stripe.refund(&request).await, Ok(made), "found, not made again");
    assert_eq!((fake.refunds().len(), fake.intent(&reference)), (1, Some((1250, 600))));

    // The lookup before the call missed a refund still being made (its call answered 500
    // later): the replayed 500 proves that call finished, and the lookup after it finds it.
    let late =
        RefundRequest { idempotency_key: "refund_late".into(), ..RefundRequest::of(BookingId::new(), &reference, 50) };
    fake.fail_after_next(1);
    assert!(stripe.refund(&late).await.is_err(), "made, answered 500");
    fake.lag_next_list(1);
    let made = fake.refunds()[1]["id"].as_str().unwrap().to_owned();
    assert_eq!(stripe.refund(&late).await, Ok(made), "found after the replay, not made again");
    assert_eq!((fake.refunds().len(), fake.intent(&reference)), (2, Some((1250, 650))));

    // A key the older version used with fewer parameters (its answer a 500): asked again as
    // it asked, Stripe replays the 500, and the key is passed, once its refund is looked for.
    let older =
        RefundRequest { idempotency_key: "refund_older".into(), ..RefundRequest::of(BookingId::new(), &reference, 20) };
    let form = [
        ("payment_intent", reference.clone()),
        ("amount", "20".to_owned()),
        ("metadata[allot_key]", "refund_older".to_owned()),
    ];
    fake.fail_next(1);
    let sent = reqwest::Client::new()
        .post(format!("{base}/v1/refunds"))
        .bearer_auth(FAKE_STRIPE_KEY)
        .header("Idempotency-Key", "refund_older")
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 500);
    let made = stripe.refund(&older).await.unwrap();
    assert_eq!(
        (fake.refunds().len(), fake.intent(&reference)),
        (3, Some((1250, 670))),
        "{made}: made once, under the next key"
    );

    let other = RefundRequest::of(BookingId::new(), &reference, 100);
    let other = RefundRequest { idempotency_key: "refund_other".into(), ..other };
    fake.fail_next(1);
    assert!(stripe.refund(&other).await.is_err(), "nothing made, answered 500");
    let made = stripe.refund(&other).await.unwrap();
    assert_eq!((fake.refunds().len(), fake.intent(&reference)), (4, Some((1250, 770))), "{made}: made once, now");
}

/// A customer books a seat and pays through Stripe; a second pays with a card that is still
/// processing, which Stripe's signed event confirms; the first cancels and is refunded by Stripe.
/// A refund the older version made (it did not name the booking) and whose reference was not
/// recorded: retried by this version, its key is asked again as the older version asked, and
/// Stripe's answer is that refund, not a second one.
#[tokio::test]
async fn a_refund_the_older_version_made_is_answered_not_made_again() {
    let (fake, base) = FakeStripe::start().await;
    let stripe = StripeProvider::new(&base, FAKE_STRIPE_KEY).unwrap();
    let Ok(ChargeOutcome::Succeeded { reference }) = stripe.charge(&charge("tok_visa", "k_old")).await else {
        panic!("charged")
    };
    let send = |key: String, form: Vec<(&'static str, String)>| {
        let url = format!("{base}/v1/refunds");
        async move {
            let sent = reqwest::Client::new().post(url).bearer_auth(FAKE_STRIPE_KEY).header("Idempotency-Key", key);
            sent.form(&form).send().await.unwrap().status()
        }
    };
    // As the older version asked (no booking named), the lookup missing it (still being made).
    let request = RefundRequest::of(BookingId::new(), &reference, 600);
    let key = request.idempotency_key.clone();
    let old_form =
        vec![("payment_intent", reference.clone()), ("amount", "600".into()), ("metadata[allot_key]", key.clone())];
    assert_eq!(send(key, old_form).await, 200);
    let made = fake.refunds()[0]["id"].as_str().unwrap().to_owned();
    fake.lag_next_list(1);
    assert_eq!(stripe.refund(&request).await, Ok(made), "the older request's answer");
    assert_eq!((fake.refunds().len(), fake.intent(&reference)), (1, Some((1250, 600))), "refunded once");

    // A key used with parameters neither version sends: refused, never a second refund.
    let odd =
        RefundRequest { idempotency_key: "refund_odd".into(), ..RefundRequest::of(BookingId::new(), &reference, 100) };
    assert_eq!(
        send("refund_odd".into(), vec![("payment_intent", reference.clone()), ("amount", "100".into())]).await,
        200
    );
    assert!(matches!(stripe.refund(&odd).await, Err(ProviderError::Unavailable(_))));
    assert_eq!((fake.refunds().len(), fake.intent(&reference)), (2, Some((1250, 700))), "the odd one alone");
}

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
    // A card Stripe could not process: 503 after the retries, not one of the three attempts.
    let unprocessed = json!({"payment": {"method": "card", "token": "tok_chargeDeclinedProcessingError"}});
    let (status, error) = t.post(Some(&customer), &format!("/bookings/{other}/confirm"), unprocessed).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert_eq!(error["error"]["code"], "payment_provider_unavailable");
    let (_, still) = t.get(Some(&customer), &format!("/bookings/{other}")).await;
    assert_eq!((still["status"].as_str(), still["payment_attempts"].as_i64()), (Some("held"), Some(1)), "{still}");
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

    // A free show: confirmed without a charge (Stripe would refuse an amount under its minimum).
    let start = t.clock_now().checked_add(jiff::SignedDuration::from_hours(96)).unwrap();
    let end = start.checked_add(jiff::SignedDuration::from_hours(2)).unwrap();
    let free = json!({"name": "Preview", "start": start.to_string(), "end": end.to_string(), "seat_ids": [seats[0]],
        "price_categories": {"standard": 0, "premium": 0}});
    let (status, free) = t.post(Some(&manager), &format!("/venues/{venue}/events"), free).await;
    assert_eq!(status, StatusCode::CREATED, "{free}");
    let item = json!({"items": [{"resource_id": seats[0], "event_id": free["id"]}]});
    let (_, held_free) = t.post(Some(&customer), "/bookings", item).await;
    assert_eq!(held_free["total"], 0, "{held_free}");
    let calls = fake.calls().len();
    let card = json!({"payment": {"method": "card", "token": "tok_visa"}});
    let url = format!("/bookings/{}/confirm", held_free["id"].as_str().unwrap());
    let (status, confirmed_free) = t.post(Some(&customer), &url, card).await;
    assert_eq!((status, confirmed_free["status"].as_str()), (StatusCode::OK, Some("confirmed")), "{confirmed_free}");
    assert_eq!((&confirmed_free["payment"], fake.calls().len()), (&serde_json::Value::Null, calls), "no charge");

    // A show priced under Stripe's minimum: refused by Stripe, answered 422, not an outage.
    let cheap = json!({"name": "Cheap", "start": start.to_string(), "end": end.to_string(), "seat_ids": [seats[1]],
        "price_categories": {"standard": 10, "premium": 10}});
    let (_, cheap) = t.post(Some(&manager), &format!("/venues/{venue}/events"), cheap).await;
    let item = json!({"items": [{"resource_id": seats[1], "event_id": cheap["id"]}]});
    let (_, held_cheap) = t.post(Some(&customer), "/bookings", item).await;
    let url = format!("/bookings/{}/confirm", held_cheap["id"].as_str().unwrap());
    for _ in 0..allot_app::breaker::BREAKER_FAILURES_MAX {
        let card = json!({"payment": {"method": "card", "token": "tok_visa"}});
        let (status, refused) = t.post(Some(&customer), &url, card).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
        assert!(refused["error"]["details"]["fields"]["payment"].as_str().unwrap().contains("amount_too_small"));
    }

    let (status, cancelled) = t.post(Some(&customer), &format!("/bookings/{id}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    let refunded = cancelled["refund"]["amount"].as_i64().unwrap();
    assert!(refunded > 0, "{cancelled}");
    assert!(cancelled["refund"]["reference"].as_str().unwrap().starts_with("re_"), "{cancelled}");
    assert_eq!(fake.intent(&reference), Some((total, refunded)), "Stripe gave back what the policy owes");

    // The card does not take the refund: Stripe turns it failed and says so; an operator's
    // retry makes another refund, under a key of its own, and it is recorded.
    let failed = cancelled["refund"]["reference"].as_str().unwrap().to_owned();
    fake.fail_refund(&failed);
    let made = fake.refunds().into_iter().find(|r| r["id"] == failed.as_str()).unwrap();
    assert_eq!(made["metadata"]["booking_id"].as_str(), Some(id.as_str()), "the refund names its booking");
    let body = json!({"id": "evt_2", "type": "refund.failed", "data": {"object": made}}).to_string();
    let signature = allot_app::webhooks::sign(t.app.webhook_secret().as_bytes(), body.as_bytes(), t.clock.now());
    let sent = t.client.post(t.url("/payments/webhooks/stripe")).header("Stripe-Signature", signature).body(body);
    let (status, ack) = common::read(sent.send().await.unwrap()).await;
    assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("refund_failed")), "{ack}");
    assert_eq!(ack["booking"]["refund"]["failure"], "expired_or_canceled_card");
    assert_eq!(allot_app::refunds::rearm(t.app.store.as_ref(), &reference, t.clock.now()).await.unwrap(), 1);
    let sweep = t.app.settle_refunds().await.unwrap();
    assert_eq!(sweep.refunded, 1, "{sweep:?}");
    assert_eq!(fake.intent(&reference), Some((total, refunded)), "given back again, once");
    let (_, stored) = t.get(Some(&customer), &format!("/bookings/{id}")).await;
    let again = stored["refund"]["reference"].as_str().unwrap();
    assert!(again.starts_with("re_") && again != failed, "{stored}");
    assert_eq!(stored["refund"]["failure"], serde_json::Value::Null);
}
