//! A local stand-in for Stripe's API (we cannot reach Stripe from tests): `POST
//! /v1/payment_intents`, `POST /v1/payment_intents/{id}/confirm` (a PaymentIntent succeeds at
//! most once: confirming one that did is 400 `payment_intent_unexpected_state`), `GET
//! /v1/payment_intents/{id}`, `POST /v1/refunds` and `GET /v1/refunds?payment_intent=`, form-encoded, with Stripe's bearer authentication, its
//! `Idempotency-Key` replays (the first answer to a key, a 500 included, is answered again with
//! `Idempotent-Replayed: true`; with other parameters, 400 `idempotency_error`), and its error
//! shapes.
//!
//! Cards: `tok_visa` succeeds; `tok_chargeDeclined` and `tok_chargeDeclinedInsufficientFunds`
//! are card errors (402); `tok_threeDSecure2Required` needs authentication (with
//! `error_on_requires_action`, a 402 `authentication_required`); `tok_processing` stays
//! `processing` (reported later by an event); any other token is unknown (400
//! `resource_missing`). An amount under 50 is refused (400 `amount_too_small`).
//! `fail_next(n)` answers the next `n` calls 500 without doing anything; `fail_after_next(n)`
//! does what the next `n` ask and then answers 500 (an outcome the caller cannot know);
//! `fail_next_confirm` and `fail_after_next_confirm` do the same to confirms only;
//! `lag_next_list(n)` lists no refunds in the next `n` lookups; `key_in_use_next(n)` answers the
//! next `n` calls 409 `idempotency_key_in_use` (as Stripe answers a call whose key another
//! request is still running under; nothing saved); `processing_error_next_confirm(n)` answers
//! the next `n` confirms with a card's `processing_error` (402, saved), as
//! `tok_chargeDeclinedProcessingError` always is; `attach_then_fail_next_confirm(n)` makes the
//! next `n` confirms' tokens into payment methods attached to their PaymentIntents
//! (`requires_confirmation`), using the tokens up (`token_already_used` after), and answers them
//! 500; a confirm may pay with such a `payment_method` instead of a token.
#![allow(dead_code, clippy::unwrap_used, clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// The only secret key the stand-in accepts.
pub const FAKE_STRIPE_KEY: &str = "sk_test_allot_fake";

/// One call as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    pub idempotency_key: Option<String>,
    pub form: HashMap<String, String>,
}

#[derive(Default)]
struct Books {
    calls: Vec<Call>,
    /// Answers by idempotency key: the form they answered, and the answer.
    replays: HashMap<String, (HashMap<String, String>, StatusCode, Value)>,
    /// Every PaymentIntent created, as it is now.
    created: HashMap<String, Value>,
    /// Payments that took money: amount taken, amount refunded.
    intents: HashMap<String, (i64, i64)>,
    /// Refunds made, in order.
    refunds: Vec<Value>,
    /// Payment methods made of card tokens: the token each was made of.
    methods: HashMap<String, String>,
    /// Tokens used up (each made into a payment method; a token is used once).
    used_tokens: std::collections::HashSet<String>,
    next_id: u32,
}

#[derive(Default)]
pub struct FakeStripe {
    books: Mutex<Books>,
    failing: AtomicU32,
    failing_after: AtomicU32,
    confirms_failing: AtomicU32,
    confirms_failing_after: AtomicU32,
    lists_lagging: AtomicU32,
    keys_in_use: AtomicU32,
    confirms_attaching_then_failing: AtomicU32,
    confirms_processing_error: AtomicU32,
}

impl FakeStripe {
    /// Starts the stand-in on a free loopback port: it and its API base URL.
    pub async fn start() -> (Arc<FakeStripe>, String) {
        let fake = Arc::new(FakeStripe::default());
        let router = Router::new()
            .route("/v1/payment_intents", post(payment_intents))
            .route("/v1/payment_intents/{id}", get(payment_intent))
            .route("/v1/payment_intents/{id}/confirm", post(confirm))
            .route("/v1/refunds", post(refunds).get(list_refunds))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        (fake, format!("http://{addr}"))
    }

    /// Answers the next `n` calls 500 (`api_error`), doing nothing.
    pub fn fail_next(&self, n: u32) {
        self.failing.store(n, Ordering::SeqCst);
    }

    /// Does what the next `n` calls ask, then answers them 500 (`api_error`).
    pub fn fail_after_next(&self, n: u32) {
        self.failing_after.store(n, Ordering::SeqCst);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.books.lock().unwrap().calls.clone()
    }

    /// PaymentIntents created (whether paid or not).
    pub fn created(&self) -> usize {
        self.books.lock().unwrap().created.len()
    }

    /// How much of payment `id` was taken and refunded.
    pub fn intent(&self, id: &str) -> Option<(i64, i64)> {
        self.books.lock().unwrap().intents.get(id).copied()
    }

    /// Payments that took money.
    pub fn intents(&self) -> usize {
        self.books.lock().unwrap().intents.len()
    }

    /// Answers the next `n` confirms 500, doing nothing.
    pub fn fail_next_confirm(&self, n: u32) {
        self.confirms_failing.store(n, Ordering::SeqCst);
    }

    /// Does what the next `n` confirms ask, then answers them 500.
    pub fn fail_after_next_confirm(&self, n: u32) {
        self.confirms_failing_after.store(n, Ordering::SeqCst);
    }

    /// Lists no refunds in the next `n` lookups (a refund still being made when it looked).
    pub fn lag_next_list(&self, n: u32) {
        self.lists_lagging.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` confirms' tokens into payment methods, attached to their
    /// PaymentIntents (`requires_confirmation`; the tokens used up), and answers them 500
    /// without charging.
    pub fn attach_then_fail_next_confirm(&self, n: u32) {
        self.confirms_attaching_then_failing.store(n, Ordering::SeqCst);
    }

    /// Settles a `processing` PaymentIntent as Stripe does later: `succeeded` (taking its
    /// amount) or `requires_payment_method` (failed).
    pub fn settle_intent(&self, id: &str, paid: bool) {
        let mut books = self.books.lock().unwrap();
        let intent = books.created.get_mut(id).expect("a PaymentIntent");
        let amount = intent["amount"].as_i64().unwrap();
        if paid {
            (intent["status"], intent["amount_received"]) = (json!("succeeded"), json!(amount));
        } else {
            intent["status"] = json!("requires_payment_method");
        }
        if paid {
            books.intents.insert(id.to_owned(), (amount, 0));
        } else {
            books.intents.remove(id);
        }
    }

    /// Answers the next `n` calls 409 `idempotency_key_in_use`, saving nothing.
    pub fn key_in_use_next(&self, n: u32) {
        self.keys_in_use.store(n, Ordering::SeqCst);
    }

    /// Answers the next `n` confirms with a card's `processing_error` (saved for their keys).
    pub fn processing_error_next_confirm(&self, n: u32) {
        self.confirms_processing_error.store(n, Ordering::SeqCst);
    }

    /// Turns refund `id` `failed`, as Stripe does when the card does not take it (the money
    /// back on the account): its payment counts it refunded no more.
    pub fn fail_refund(&self, id: &str) {
        let mut books = self.books.lock().unwrap();
        let refund = books.refunds.iter_mut().find(|r| r["id"] == id).expect("a refund made");
        refund["status"] = json!("failed");
        refund["failure_reason"] = json!("expired_or_canceled_card");
        let (payment, amount) =
            (refund["payment_intent"].as_str().unwrap().to_owned(), refund["amount"].as_i64().unwrap());
        let taken = books.intents.get_mut(&payment).expect("its payment");
        taken.1 -= amount;
    }

    /// The refunds made.
    pub fn refunds(&self) -> Vec<Value> {
        self.books.lock().unwrap().refunds.clone()
    }

    /// Checks the key and the replay of a call; `Err` is the answer to send at once.
    fn admit(&self, path: &str, headers: &HeaderMap, body: &Bytes) -> Result<Call, Response> {
        let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
        let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let call = Call { path: path.to_owned(), idempotency_key: key.clone(), form: form.clone() };
        let mut books = self.books.lock().unwrap();
        books.calls.push(call.clone());
        authenticated(headers)?;
        if take_one(&self.keys_in_use) {
            let e = json!({"type": "idempotency_error", "code": "idempotency_key_in_use",
                "message": "There is currently another in-progress request using this Stripe token."});
            return Err(error(StatusCode::CONFLICT, e));
        }
        if let Some((first, status, answer)) = key.as_ref().and_then(|k| books.replays.get(k)) {
            if *first != form {
                let e = json!({"type": "idempotency_error",
                    "message": "Keys for idempotent requests can only be used with the same parameters they were first used with."});
                return Err(error(StatusCode::BAD_REQUEST, e));
            }
            return Err((*status, [("idempotent-replayed", "true")], axum::Json(answer.clone())).into_response());
        }
        drop(books);
        if take_one(&self.failing) {
            return Err(self.answer(&call, StatusCode::INTERNAL_SERVER_ERROR, server_error()));
        }
        Ok(call)
    }

    /// Keeps `answer` for replays of `call`'s key and sends it, or a 500 in its place after
    /// [`FakeStripe::fail_after_next`].
    fn answer(&self, call: &Call, status: StatusCode, answer: Value) -> Response {
        let (status, answer) = if take_one(&self.failing_after) {
            (StatusCode::INTERNAL_SERVER_ERROR, server_error())
        } else {
            (status, answer)
        };
        if let Some(key) = &call.idempotency_key {
            self.books.lock().unwrap().replays.insert(key.clone(), (call.form.clone(), status, answer.clone()));
        }
        (status, axum::Json(answer)).into_response()
    }

    fn new_id(&self, prefix: &str) -> String {
        let mut books = self.books.lock().unwrap();
        books.next_id += 1;
        format!("{prefix}_fake{}", books.next_id)
    }
}

fn authenticated(headers: &HeaderMap) -> Result<(), Response> {
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok());
    if bearer == Some(&format!("Bearer {FAKE_STRIPE_KEY}")) {
        return Ok(());
    }
    Err(error(
        StatusCode::UNAUTHORIZED,
        json!({"type": "invalid_request_error", "message": "Invalid API Key provided"}),
    ))
}

/// Takes one from `counter` if it is above 0.
fn take_one(counter: &AtomicU32) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

fn server_error() -> Value {
    json!({"error": {"type": "api_error", "message": "An unknown error occurred"}})
}

fn error(status: StatusCode, error: Value) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}

fn invalid(code: &str, param: &str, message: String) -> Value {
    json!({"error": {"type": "invalid_request_error", "code": code, "param": param, "message": message}})
}

async fn payment_intents(State(fake): State<Arc<FakeStripe>>, headers: HeaderMap, body: Bytes) -> Response {
    let call = match fake.admit("/v1/payment_intents", &headers, &body) {
        Ok(call) => call,
        Err(answer) => return answer,
    };
    let f = &call.form;
    let amount: i64 = f.get("amount").and_then(|a| a.parse().ok()).unwrap_or(-1);
    if amount < 0 || f.get("currency").is_none_or(|c| c.len() != 3 || c.to_lowercase() != *c) {
        let e = invalid("parameter_invalid_integer", "amount", "Invalid amount or currency".into());
        return fake.answer(&call, StatusCode::BAD_REQUEST, e);
    }
    if amount < 50 {
        let e = invalid("amount_too_small", "amount", "Amount must be at least 0.50 eur".into());
        return fake.answer(&call, StatusCode::BAD_REQUEST, e);
    }
    let id = fake.new_id("pi");
    let intent = json!({"id": id, "object": "payment_intent", "amount": amount, "currency": f["currency"],
        "status": "requires_payment_method", "metadata": {"booking_id": f.get("metadata[booking_id]")}});
    fake.books.lock().unwrap().created.insert(id, intent.clone());
    fake.answer(&call, StatusCode::OK, intent)
}

/// `GET /v1/payment_intents/{id}`: the PaymentIntent as it is now.
async fn payment_intent(State(fake): State<Arc<FakeStripe>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(refused) = authenticated(&headers) {
        return refused;
    }
    match fake.books.lock().unwrap().created.get(&id) {
        Some(intent) => axum::Json(intent.clone()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            invalid("resource_missing", "intent", format!("No such payment_intent: '{id}'"))["error"].clone(),
        ),
    }
}

/// `POST /v1/payment_intents/{id}/confirm`: pays it with the card token; a PaymentIntent
/// succeeds at most once.
async fn confirm(
    State(fake): State<Arc<FakeStripe>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let call = match fake.admit(&format!("/v1/payment_intents/{id}/confirm"), &headers, &body) {
        Ok(call) => call,
        Err(answer) => return answer,
    };
    if take_one(&fake.confirms_failing) {
        return fake.answer(&call, StatusCode::INTERNAL_SERVER_ERROR, server_error());
    }
    let Some(intent) = fake.books.lock().unwrap().created.get(&id).cloned() else {
        let e = invalid("resource_missing", "intent", format!("No such payment_intent: '{id}'"));
        return fake.answer(&call, StatusCode::NOT_FOUND, e);
    };
    if !matches!(intent["status"].as_str(), Some("requires_payment_method" | "requires_confirmation")) {
        let e = invalid(
            "payment_intent_unexpected_state",
            "intent",
            format!("This PaymentIntent's status is {}", intent["status"]),
        );
        return fake.answer(&call, StatusCode::BAD_REQUEST, e);
    }
    let f = &call.form;
    let with_status = |status: &str| {
        let mut next = intent.clone();
        next["status"] = json!(status);
        next
    };
    let card_error = |code: &str, decline_code: Option<&str>| {
        json!({"error": {"type": "card_error", "code": code, "decline_code": decline_code,
            "message": "Your card was declined.", "payment_intent": intent}})
    };
    let token = f.get("payment_method_data[card][token]").map_or("", String::as_str);
    if fake.books.lock().unwrap().used_tokens.contains(token) {
        let e = invalid(
            "token_already_used",
            "payment_method_data[card][token]",
            "You cannot use a Stripe token more than once".into(),
        );
        return fake.answer(&call, StatusCode::BAD_REQUEST, e);
    }
    let method = f.get("payment_method").cloned();
    let made_of = method.as_ref().and_then(|m| fake.books.lock().unwrap().methods.get(m).cloned());
    let token = match (&method, &made_of) {
        (Some(_), Some(made_of)) => made_of.as_str(),
        (Some(m), None) => {
            let e = invalid("resource_missing", "payment_method", format!("No such PaymentMethod: '{m}'"));
            return fake.answer(&call, StatusCode::BAD_REQUEST, e);
        }
        (None, _) => token,
    };
    if take_one(&fake.confirms_attaching_then_failing) {
        let method = fake.new_id("pm");
        let mut books = fake.books.lock().unwrap();
        books.methods.insert(method.clone(), token.to_owned());
        books.used_tokens.insert(token.to_owned());
        let mut attached = intent.clone();
        (attached["status"], attached["payment_method"]) = (json!("requires_confirmation"), json!(method));
        books.created.insert(id.clone(), attached);
        drop(books);
        return fake.answer(&call, StatusCode::INTERNAL_SERVER_ERROR, server_error());
    }
    let token = if take_one(&fake.confirms_processing_error) { "tok_chargeDeclinedProcessingError" } else { token };
    let no_action = f.get("error_on_requires_action").is_some_and(|v| v == "true");
    let (status, answer) = match token {
        "tok_visa" => (StatusCode::OK, with_status("succeeded")),
        "tok_processing" => (StatusCode::OK, with_status("processing")),
        "tok_threeDSecure2Required" if no_action => {
            (StatusCode::PAYMENT_REQUIRED, card_error("authentication_required", None))
        }
        "tok_threeDSecure2Required" => (StatusCode::OK, with_status("requires_action")),
        "tok_chargeDeclined" => (StatusCode::PAYMENT_REQUIRED, card_error("card_declined", Some("generic_decline"))),
        "tok_chargeDeclinedProcessingError" => (StatusCode::PAYMENT_REQUIRED, card_error("processing_error", None)),
        "tok_chargeDeclinedInsufficientFunds" => {
            (StatusCode::PAYMENT_REQUIRED, card_error("card_declined", Some("insufficient_funds")))
        }
        _ => {
            let e =
                invalid("resource_missing", "payment_method_data[card][token]", format!("No such token: '{token}'"));
            (StatusCode::BAD_REQUEST, e)
        }
    };
    if status == StatusCode::OK {
        let mut books = fake.books.lock().unwrap();
        books.created.insert(id.clone(), answer.clone());
        if matches!(token, "tok_visa" | "tok_processing") {
            let amount = answer["amount"].as_i64().unwrap();
            books.intents.insert(id.clone(), (amount, 0));
        }
    }
    if take_one(&fake.confirms_failing_after) {
        return fake.answer(&call, StatusCode::INTERNAL_SERVER_ERROR, server_error());
    }
    fake.answer(&call, status, answer)
}

async fn refunds(State(fake): State<Arc<FakeStripe>>, headers: HeaderMap, body: Bytes) -> Response {
    let call = match fake.admit("/v1/refunds", &headers, &body) {
        Ok(call) => call,
        Err(answer) => return answer,
    };
    let payment = call.form.get("payment_intent").cloned().unwrap_or_default();
    let taken = fake.books.lock().unwrap().intents.get(&payment).copied();
    let Some((amount, refunded)) = taken else {
        let e = invalid("resource_missing", "payment_intent", format!("No such payment_intent: '{payment}'"));
        return fake.answer(&call, StatusCode::BAD_REQUEST, e);
    };
    let asked: i64 = call.form.get("amount").and_then(|a| a.parse().ok()).unwrap_or(amount - refunded);
    if refunded >= amount {
        let e = invalid(
            "charge_already_refunded",
            "payment_intent",
            format!("Charge for {payment} has already been refunded."),
        );
        return fake.answer(&call, StatusCode::BAD_REQUEST, e);
    }
    if asked <= 0 || refunded + asked > amount {
        let e =
            invalid("amount_too_large", "amount", "Refund amount is greater than unrefunded amount on charge".into());
        return fake.answer(&call, StatusCode::BAD_REQUEST, e);
    }
    let id = fake.new_id("re");
    let metadata =
        json!({"allot_key": call.form.get("metadata[allot_key]"), "booking_id": call.form.get("metadata[booking_id]")});
    let answer = json!({"id": id, "object": "refund", "amount": asked, "payment_intent": payment,
        "status": "succeeded", "metadata": metadata});
    let mut books = fake.books.lock().unwrap();
    books.intents.insert(payment.clone(), (amount, refunded + asked));
    books.refunds.push(answer.clone());
    drop(books);
    fake.answer(&call, StatusCode::OK, answer)
}

/// `GET /v1/refunds?payment_intent=…`: the payment's refunds, newest first.
async fn list_refunds(State(fake): State<Arc<FakeStripe>>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    if let Err(refused) = authenticated(&headers) {
        return refused;
    }
    let query: HashMap<String, String> =
        form_urlencoded::parse(query.unwrap_or_default().as_bytes()).into_owned().collect();
    let payment = query.get("payment_intent").cloned().unwrap_or_default();
    if take_one(&fake.lists_lagging) {
        return axum::Json(json!({"object": "list", "data": [], "has_more": false})).into_response();
    }
    let data: Vec<Value> =
        fake.refunds().into_iter().filter(|r| r["payment_intent"] == payment.as_str()).rev().collect();
    axum::Json(json!({"object": "list", "data": data, "has_more": false})).into_response()
}
