//! The payment provider's events (`POST /payments/webhooks/{provider}`) over real HTTP and the
//! real store: a `tok_async` payment settled by a signed event, paid or failed; what an
//! unsigned, stale or malformed event gets; an event delivered twice, or after its booking
//! ended, or for another sum than its booking asked (the money it reports taken is refunded
//! whole).
#![allow(clippy::unwrap_used)]

mod common;

use allot_app::clock::Clock;
use allot_app::refunds::RefundSweep;
use allot_app::store::{REFUND_GRACE_SECONDS, Role};
use allot_app::webhooks::sign;
use allot_core::booking::PAYMENT_ATTEMPTS_MAX;
use common::TestApp;
use jiff::SignedDuration;
use reqwest::StatusCode;
use serde_json::{Value, json};

const PAID: &str = "payment_intent.succeeded";
const FAILED: &str = "payment_intent.payment_failed";

/// A customer's booking of one seat, confirmed with `tok_async`: `pending_payment`.
struct Pending {
    t: TestApp,
    customer: String,
    booking: String,
    payment: String,
    /// What the booking asks: its total, and its currency as Stripe writes it (lower-case).
    total: i64,
    currency: String,
}

async fn pending() -> Pending {
    let t = TestApp::spawn().await;
    let manager = t.user_with_role("manager@test.allot", Role::Manager).await;
    let venue = t.venue(&manager, "cinema").await;
    let (seats, event) = t.seats_and_event(&manager, &venue, 1, 48).await;
    let customer = t.customer("async@test.allot").await;
    let (status, held) =
        t.post(Some(&customer), "/bookings", json!({"items": [{"resource_id": seats[0], "event_id": event}]})).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    let booking = held["id"].as_str().unwrap().to_owned();
    let (total, currency) = asked(&held);
    let mut p = Pending { t, customer, booking, payment: String::new(), total, currency };
    p.payment = p.confirm_async().await;
    p
}

/// A booking's total and currency, as a provider's event reports them.
fn asked(booking: &Value) -> (i64, String) {
    (booking["total"].as_i64().unwrap(), booking["currency"].as_str().unwrap().to_ascii_lowercase())
}

impl Pending {
    /// Confirms with `tok_async`: the payment's reference.
    async fn confirm_async(&self) -> String {
        let body = json!({"payment": {"method": "card", "token": "tok_async"}});
        let (status, confirmed) =
            self.t.post(Some(&self.customer), &format!("/bookings/{}/confirm", self.booking), body).await;
        assert_eq!(status, StatusCode::OK, "{confirmed}");
        assert_eq!(confirmed["status"], "pending_payment");
        assert_eq!(confirmed["payment"]["status"], "pending");
        confirmed["payment"]["reference"].as_str().unwrap().to_owned()
    }

    fn event(&self, kind: &str) -> Vec<u8> {
        self.event_of(kind, self.total, &self.currency)
    }

    /// An event reporting the payment took `amount` of `currency`.
    fn event_of(&self, kind: &str, amount: i64, currency: &str) -> Vec<u8> {
        let object = json!({"id": self.payment, "object": "payment_intent", "metadata": {"booking_id": self.booking},
            "amount": self.total, "amount_received": amount, "currency": currency, "status": "succeeded"});
        json!({"id": "evt_1", "type": kind, "data": {"object": object}}).to_string().into_bytes()
    }

    async fn send(&self, provider: &str, body: Vec<u8>, signature: Option<String>) -> (StatusCode, Value) {
        let url = self.t.url(&format!("/payments/webhooks/{provider}"));
        let mut request = self.t.client.post(url).header("content-type", "application/json").body(body);
        if let Some(signature) = signature {
            request = request.header("Stripe-Signature", signature);
        }
        common::read(request.send().await.unwrap()).await
    }

    fn signed(&self, body: &[u8]) -> String {
        sign(self.t.app.webhook_secret().as_bytes(), body, self.t.clock.now())
    }

    /// Sends `body` signed as the test provider does.
    async fn deliver_body(&self, body: Vec<u8>) -> (StatusCode, Value) {
        let signature = self.signed(&body);
        self.send("test", body, Some(signature)).await
    }

    async fn deliver(&self, kind: &str) -> (StatusCode, Value) {
        self.deliver_body(self.event(kind)).await
    }

    async fn stored(&self) -> Value {
        let customer = self.t.login("async@test.allot").await;
        let (status, body) = self.t.get(Some(&customer), &format!("/bookings/{}", self.booking)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn events(&self, topic: &str) -> i64 {
        self.t.store.count("outbox", &format!("aggregate_id = '{}' AND topic = '{topic}'", self.booking)).await.unwrap()
    }
}

#[tokio::test]
async fn a_pending_payment_reported_paid_confirms_its_booking_once() {
    let p = pending().await;
    let (status, ack) = p.deliver(PAID).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!((ack["received"].as_bool(), ack["outcome"].as_str()), (Some(true), Some("applied")));
    let confirmed = ack["booking"].clone();
    assert_eq!(confirmed["status"], "confirmed");
    assert_eq!(confirmed["payment"]["status"], "succeeded");
    assert_eq!(confirmed["payment"]["reference"], p.payment.as_str());
    assert_eq!(confirmed["expires_at"], Value::Null);
    assert_eq!(p.stored().await, confirmed, "stored as answered");
    assert_eq!(p.events("booking.confirmed").await, 1);

    let (status, again) = p.deliver(PAID).await;
    assert_eq!(status, StatusCode::OK, "delivered twice: {again}");
    assert_eq!(again, ack, "answered as the first");
    assert_eq!(p.events("booking.confirmed").await, 1, "applied once");

    // An `Idempotency-Key` sent with events is not used: the same key with another event runs
    // that event (no 422 `idempotency_key_reused`), and no answer is stored.
    for kind in [FAILED, PAID] {
        let body = p.event(kind);
        let signature = p.signed(&body);
        let url = p.t.url("/payments/webhooks/test");
        let keyed =
            p.t.client.post(url).header("Stripe-Signature", signature).header("Idempotency-Key", "k1").body(body);
        let (status, answer) = common::read(keyed.send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{kind} under one key: {answer}");
    }
    assert_eq!(p.t.store.count("idempotency_keys", "1=1").await.unwrap(), 0, "no answer stored");
    assert_eq!(p.stored().await, confirmed, "a failure reported after the payment succeeded changes nothing");

    let metrics = p.t.client.get(format!("http://{}/metrics", p.t.addr)).send().await.unwrap().text().await.unwrap();
    let applied = metrics.lines().find_map(|l| l.strip_prefix(r#"allot_payment_events_total{outcome="applied"} "#));
    assert!(applied.and_then(|n| n.parse::<f64>().ok()) >= Some(2.0), "counted: {metrics}");

    // The seat stays sold past the hold's old expiry.
    p.t.clock.advance(SignedDuration::from_secs(3600));
    p.t.app.expire_due().await.unwrap();
    assert_eq!(p.stored().await["status"], "confirmed");

    let admin = p.t.admin().await;
    let (_, audit) = p.t.get(Some(&admin), "/audit?action=payment.event").await;
    let events = audit["data"].as_array().unwrap();
    assert_eq!(events.len(), 4, "{audit}");
    for event in events {
        assert_eq!((event["actor_role"].as_str(), event["actor_id"].as_str()), (Some("provider"), Some("test")));
        assert_eq!(
            (event["outcome"].as_str(), event["target_id"].as_str()),
            (Some("success"), Some(p.booking.as_str()))
        );
    }
    let reports: Vec<&str> = events.iter().rev().map(|e| e["details"]["report"].as_str().unwrap()).collect();
    assert_eq!(reports, ["succeeded", "succeeded", "failed", "succeeded"]);
}

#[tokio::test]
async fn only_events_signed_with_the_current_secret_are_applied() {
    let p = pending().await;
    let body = p.event(PAID);
    let signed_earlier = sign(
        p.t.app.webhook_secret().as_bytes(),
        &body,
        p.t.clock.now() - SignedDuration::from_secs(allot_app::webhooks::SIGNATURE_TOLERANCE_SECONDS + 1),
    );
    let mut altered = body.clone();
    let swap = altered.iter().position(|b| *b == b'1').unwrap();
    altered[swap] = b'2';
    let refused = [
        (None, body.clone(), "no signature"),
        (Some(sign(b"whsec_another", &body, p.t.clock.now())), body.clone(), "another secret"),
        (Some(signed_earlier), body.clone(), "signed too long ago: a replay"),
        (Some(p.signed(&body)), altered, "the body changed after signing"),
        (Some("t=1,v1".to_owned()), body.clone(), "malformed"),
    ];
    for (signature, body, why) in refused {
        let (status, error) = p.send("test", body, signature).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{why}: {error}");
        assert_eq!(error["error"]["code"], "unauthenticated", "{why}");
    }
    // The secret replaced by another node (its start with `--payment-webhook-secret`): this
    // node takes the new one up at the first event signed with it, and the old one is refused.
    let old_secret = p.t.app.webhook_secret();
    let rotated = "whsec_rotated_on_another_node";
    p.t.app.store.set_setting(allot_app::webhooks::WEBHOOK_SECRET_SETTING, rotated).await.unwrap();
    let (status, ack) =
        p.send("test", p.event(FAILED), Some(sign(rotated.as_bytes(), &p.event(FAILED), p.t.clock.now()))).await;
    assert_eq!(status, StatusCode::OK, "signed with the new secret: {ack}");
    let (status, _) = p.send("test", body.clone(), Some(sign(old_secret.as_bytes(), &body, p.t.clock.now()))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "signed with the old one");
    assert_eq!(p.t.app.webhook_secret(), rotated);

    let (status, error) = p.send("stripe", body.clone(), Some(p.signed(&body))).await;
    assert_eq!((status, error["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{error}");
    assert_eq!(p.stored().await["status"], "held", "only the event signed with the new secret was applied");
    assert_eq!(p.events("booking.confirmed").await, 0);
}

#[tokio::test]
async fn a_malformed_event_is_refused_with_its_fields_and_other_events_are_ignored() {
    let p = pending().await;
    let (status, error) = p.deliver_body(b"not json".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert!(error["error"]["details"]["fields"]["body"].is_string(), "{error}");

    let no_type = json!({"id": "evt_4", "data": {"object": {"id": p.payment}}});
    let (status, error) = p.deliver_body(no_type.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["error"]["details"]["fields"]["body"], "missing field `type`");
    let no_payment = json!({"id": "evt_6", "type": PAID, "data": {"object": {"metadata": {"booking_id": p.booking}}}});
    let (status, error) = p.deliver_body(no_payment.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert!(error["error"]["details"]["fields"]["data.object.id"].is_string(), "{error}");
    // A succeeded payment says what it took, in what currency.
    let object = json!({"id": p.payment, "metadata": {"booking_id": p.booking}, "amount_received": -1,
        "currency": "euro", "status": "processing"});
    let unpriced = json!({"id": "evt_8", "type": PAID, "data": {"object": object}});
    let (status, error) = p.deliver_body(unpriced.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    let fields = &error["error"]["details"]["fields"];
    for field in ["data.object.amount_received", "data.object.currency", "data.object.status"] {
        assert!(fields[field].is_string(), "{field}: {error}");
    }
    let bare = json!({"id": "evt_9", "type": PAID, "data": {"object": {"id": p.payment, "metadata": {"booking_id": p.booking}}}});
    let (status, error) = p.deliver_body(bare.to_string().into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert!(error["error"]["details"]["fields"]["data.object.amount_received"].is_string(), "{error}");
    assert_eq!(p.stored().await["status"], "pending_payment", "nothing changed");

    // Acknowledged, so that the provider stops sending them: payments no confirm of ours
    // started (no booking named, or not one of our ids), and types not acted on, whatever
    // their shape.
    let not_ours = [
        json!({"id": "evt_2", "type": PAID, "data": {"object": {"id": "pi_link"}}}),
        json!({"id": "evt_3", "type": PAID, "data": {"object": {"id": p.payment, "metadata": {"booking_id": "x"}}}}),
        json!({"id": "evt_7", "type": "balance.available", "data": {"object": {"object": "balance"}}}),
        json!({"type": "account.updated"}),
        json!({"id": "evt_10", "type": "charge.refunded", "data": {"object": {"amount": "x", "status": {"of": "its own"}}}}),
    ];
    for event in not_ours {
        let (status, ack) = p.deliver_body(event.to_string().into_bytes()).await;
        assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("ignored")), "{event}: {ack}");
    }
    let (status, ack) = p.deliver("charge.dispute.created").await;
    assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("ignored")), "a type not acted on: {ack}");
    let unknown = json!({"id": "evt_5", "type": PAID,
        "data": {"object": {"id": "pi_elsewhere", "amount_received": 100, "currency": "eur",
            "metadata": {"booking_id": allot_core::ids::BookingId::new().to_string()}}}});
    let (status, ack) = p.deliver_body(unknown.to_string().into_bytes()).await;
    assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("ignored")), "not a booking of ours: {ack}");
    assert_eq!(p.stored().await["status"], "pending_payment", "nothing changed");
}

#[tokio::test]
async fn a_pending_payment_reported_failed_is_held_again_until_the_last_attempt() {
    let mut p = pending().await;
    let (status, ack) = p.deliver(FAILED).await;
    assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("applied")), "{ack}");
    assert_eq!(ack["booking"]["status"], "held", "the customer may try again");
    assert_eq!(ack["booking"]["payment"], Value::Null);
    assert_eq!(p.events("booking.held").await, 1, "held once");
    assert_eq!(p.events("booking.payment_declined").await, 1, "then its payment declined, held again");
    let (status, again) = p.deliver(FAILED).await;
    assert_eq!((status, again["outcome"].as_str()), (StatusCode::OK, Some("ignored")), "reported twice: {again}");

    for _ in 1..PAYMENT_ATTEMPTS_MAX {
        p.payment = p.confirm_async().await;
        let (status, ack) = p.deliver(FAILED).await;
        assert_eq!(status, StatusCode::OK, "{ack}");
    }
    let ended = p.stored().await;
    assert_eq!(ended["status"], "payment_failed", "the last attempt ends it: {ended}");
    let (status, paid_late) = p.deliver(PAID).await;
    assert_eq!((status, paid_late["outcome"].as_str()), (StatusCode::OK, Some("refund_queued")), "{paid_late}");
}

#[tokio::test]
async fn a_held_booking_whose_async_payment_failed_can_be_paid_by_card() {
    let p = pending().await;
    p.deliver(FAILED).await;
    let body = json!({"payment": {"method": "card", "token": "tok_visa"}});
    let (status, confirmed) = p.t.post(Some(&p.customer), &format!("/bookings/{}/confirm", p.booking), body).await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(confirmed["status"], "confirmed");
    assert_ne!(confirmed["payment"]["reference"], p.payment.as_str(), "a payment of its own");
}

/// The payment succeeded only after the booking lapsed (or was cancelled) while pending: the
/// booking stays as it is, and the money is refunded whole by the reconciler.
#[tokio::test]
async fn a_payment_reported_paid_after_its_booking_ended_is_refunded_whole() {
    for end in ["lapsed", "cancelled"] {
        let p = pending().await;
        if end == "lapsed" {
            p.t.clock.advance(SignedDuration::from_secs(600));
            p.t.app.expire_due().await.unwrap();
        } else {
            let url = format!("/bookings/{}/cancel", p.booking);
            let (status, cancelled) = p.t.post(Some(&p.customer), &url, json!({})).await;
            assert_eq!((status, cancelled["refund"].clone()), (StatusCode::OK, Value::Null), "{cancelled}");
        }
        let before = p.stored().await;
        let (status, ack) = p.deliver(PAID).await;
        assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("refund_queued")), "{end}: {ack}");
        assert_eq!(p.stored().await, before, "{end}: the booking stays as it ended");
        assert_eq!(p.events("booking.confirmed").await, 0);
        let queued = format!("kind = 'unrecorded' AND payment_reference = '{}'", p.payment);
        assert_eq!(p.t.store.count("refunds_due", &queued).await.unwrap(), 1, "{end}");

        p.t.clock.advance(SignedDuration::from_secs(REFUND_GRACE_SECONDS));
        let sweep = p.t.app.settle_refunds().await.unwrap();
        assert_eq!(sweep, RefundSweep { refunded: 1, ..RefundSweep::default() }, "{end}");
        assert_eq!(p.t.store.count("refunds_due", "1=1").await.unwrap(), 0, "{end}: refunded");
        let admin = p.t.admin().await;
        let (_, audit) = p.t.get(Some(&admin), "/audit?action=booking.refund").await;
        let refund = &audit["data"][0];
        assert_eq!((refund["outcome"].as_str(), refund["details"]["amount"].as_str()), (Some("success"), Some("1200")));
        assert_eq!(refund["details"]["payment"], p.payment.as_str(), "{end}: the whole payment");
    }
}

/// A card charged whose confirm never recorded it (the process died between the charge and its
/// record), or whose event beat the confirm's write: the provider's event for it is refused
/// (409, so the provider sends it again) while the booking is held and may still record it; a
/// retried confirm records it (and the event then applies), or, once the hold lapsed unrecorded,
/// the event has it refunded whole.
#[tokio::test]
async fn a_charge_reported_paid_before_its_booking_recorded_it_waits_for_the_record_or_the_lapse() {
    for retried in [false, true] {
        let t = TestApp::spawn().await;
        let manager = t.user_with_role("manager@test.allot", Role::Manager).await;
        let venue = t.venue(&manager, "cinema").await;
        let (seats, event) = t.seats_and_event(&manager, &venue, 1, 48).await;
        let customer = t.customer("crash@test.allot").await;
        let body = json!({"items": [{"resource_id": seats[0], "event_id": event}]});
        let (_, held) = t.post(Some(&customer), "/bookings", body).await;
        let booking = held["id"].as_str().unwrap().to_owned();
        // The test provider's reference for the confirm's first charge (`pi_test_<key>`).
        let charge = format!("pi_test_{booking}_0");
        let (total, currency) = asked(&held);
        let p = Pending { t, customer, booking, payment: charge.clone(), total, currency };
        let (status, refused) = p.deliver(PAID).await;
        assert_eq!((status, refused["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{refused}");
        let (_, stored) = p.t.get(Some(&p.customer), &format!("/bookings/{}", p.booking)).await;
        assert_eq!(stored["status"], "held", "unchanged: a retried confirm may still record it");
        assert_eq!(p.t.store.count("refunds_due", "1=1").await.unwrap(), 0, "nothing queued yet");
        if retried {
            // The retry sends the same idempotency key: the provider replays the same charge.
            let body = json!({"payment": {"method": "card", "token": "tok_visa"}});
            let (status, paid) = p.t.post(Some(&p.customer), &format!("/bookings/{}/confirm", p.booking), body).await;
            assert_eq!((status, paid["payment"]["reference"].as_str()), (StatusCode::OK, Some(charge.as_str())));
            let (status, again) = p.deliver(PAID).await;
            assert_eq!((status, again["outcome"].as_str()), (StatusCode::OK, Some("applied")), "{again}");
            assert_eq!(again["booking"]["status"], "confirmed");
            assert_eq!(p.t.store.count("refunds_due", "1=1").await.unwrap(), 0, "kept");
            continue;
        }
        p.t.clock.advance(SignedDuration::from_secs(600));
        p.t.app.expire_due().await.unwrap();
        let (status, again) = p.deliver(PAID).await;
        assert_eq!((status, again["outcome"].as_str()), (StatusCode::OK, Some("refund_queued")), "{again}");
        p.t.clock.advance(SignedDuration::from_secs(REFUND_GRACE_SECONDS));
        let sweep = p.t.app.settle_refunds().await.unwrap();
        assert_eq!(sweep, RefundSweep { refunded: 1, ..RefundSweep::default() });
        assert_eq!(p.t.store.count("refunds_due", "1=1").await.unwrap(), 0);
    }
}

/// The provider reports the payment took another sum than the booking asked, or the same sum in
/// another currency: it is not kept. What it took is refunded whole, and the booking is held
/// again for another attempt, as after a failed payment.
#[tokio::test]
async fn a_payment_of_another_sum_is_refunded_whole_and_its_booking_held_again() {
    for (name, extra, currency) in [("more", 500, None), ("less", -700, None), ("another currency", 0, Some("usd"))] {
        let p = pending().await;
        let received = p.total + extra;
        let body = p.event_of(PAID, received, currency.unwrap_or(&p.currency));
        let (status, ack) = p.deliver_body(body.clone()).await;
        assert_eq!((status, ack["outcome"].as_str()), (StatusCode::OK, Some("refund_queued")), "{name}: {ack}");
        assert_eq!(
            (ack["booking"]["status"].as_str(), &ack["booking"]["payment"]),
            (Some("held"), &Value::Null),
            "{name}"
        );
        assert_eq!(p.events("booking.confirmed").await, 0, "{name}");
        assert_eq!(p.events("booking.payment_declined").await, 1, "{name}");
        let (status, again) = p.deliver_body(body).await;
        assert_eq!((status, again["outcome"].as_str()), (StatusCode::OK, Some("refund_queued")), "{name}: {again}");
        let queued = format!("kind = 'unrecorded' AND payment_reference = '{}' AND amount = {received}", p.payment);
        assert_eq!(p.t.store.count("refunds_due", &queued).await.unwrap(), 1, "{name}: what it took, once");

        // Refunded once the booking can no longer record it: here, paid by card instead.
        let card = json!({"payment": {"method": "card", "token": "tok_visa"}});
        let (status, paid) = p.t.post(Some(&p.customer), &format!("/bookings/{}/confirm", p.booking), card).await;
        assert_eq!((status, paid["status"].as_str()), (StatusCode::OK, Some("confirmed")), "{name}: {paid}");
        p.t.clock.advance(SignedDuration::from_secs(REFUND_GRACE_SECONDS));
        let sweep = p.t.app.settle_refunds().await.unwrap();
        assert_eq!(sweep, RefundSweep { refunded: 1, ..RefundSweep::default() }, "{name}");
        let admin = p.t.admin().await;
        let (_, audit) = p.t.get(Some(&admin), "/audit?action=booking.refund").await;
        let refund = &audit["data"][0];
        assert_eq!(refund["details"]["amount"].as_str(), Some(received.to_string().as_str()), "{name}: {refund}");
        assert_eq!(refund["details"]["payment"], p.payment.as_str(), "{name}");
        let (_, events) = p.t.get(Some(&admin), "/audit?action=payment.event").await;
        let asked = format!("{} {}", p.total, p.currency.to_ascii_uppercase());
        let first = events["data"].as_array().unwrap().last().unwrap();
        assert_eq!(first["details"]["asked"].as_str(), Some(asked.as_str()), "{name}: {events}");
    }
}
