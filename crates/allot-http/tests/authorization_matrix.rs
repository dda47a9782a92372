//! The authorization matrix (I7): every route of the OpenAPI document × every kind of caller →
//! the one status it must answer, over real HTTP. A route without a row fails the test.
//!
//! Each cell sends a request that would succeed for an allowed caller (fresh fixtures where the
//! request uses something up: a venue to delete, a hold to confirm), so the status says only
//! whether the caller may. `tests/authorization.rs` checks that refused requests change nothing.
//!
//! "Partner +" holds a key with exactly the scope the row needs (`bookings:read` or
//! `bookings:write`; all scopes where none is needed); "partner −" holds every scope but that one
//! (only `inventory:read` where none is needed). The customer's booking belongs to "customer";
//! "manager" manages its venue, "other manager" another venue.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use allot_app::store::Role;
use common::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Anonymous,
    Customer,
    OtherCustomer,
    Manager,
    OtherManager,
    PartnerWith,
    PartnerWithout,
    Admin,
}

const WHO: [Who; 8] = [
    Who::Anonymous,
    Who::Customer,
    Who::OtherCustomer,
    Who::Manager,
    Who::OtherManager,
    Who::PartnerWith,
    Who::PartnerWithout,
    Who::Admin,
];

/// The scope a row's partner columns are about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Nothing,
    Read,
    Write,
}
use Needs::{Nothing as ANY, Read as READ, Write as WRITE};

struct Row {
    method: &'static str,
    path: &'static str,
    needs: Needs,
    expect: [u16; 8],
}

const fn row(method: &'static str, path: &'static str, needs: Needs, expect: [u16; 8]) -> Row {
    Row { method, path, needs, expect }
}

#[rustfmt::skip]
const MATRIX: &[Row] = &[
    //   method    path                                       needs   anon cust othr mgr  omgr pk+  pk-  admin
    row("POST",   "/api/v1/auth/register",                    ANY,   [201, 201, 201, 201, 201, 201, 201, 201]),
    row("POST",   "/api/v1/auth/login",                       ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("POST",   "/api/v1/auth/refresh",                     ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("POST",   "/api/v1/auth/logout",                      ANY,   [204, 204, 204, 204, 204, 204, 204, 204]),
    row("GET",    "/api/v1/me",                               ANY,   [401, 200, 200, 200, 200, 403, 403, 200]),
    row("GET",    "/api/v1/venues",                           ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("POST",   "/api/v1/venues",                           ANY,   [401, 403, 403, 201, 201, 403, 403, 201]),
    row("GET",    "/api/v1/venues/{id}",                      ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("PATCH",  "/api/v1/venues/{id}",                      ANY,   [401, 403, 403, 200, 403, 403, 403, 200]),
    row("DELETE", "/api/v1/venues/{id}",                      ANY,   [401, 403, 403, 204, 403, 403, 403, 204]),
    row("GET",    "/api/v1/venues/{id}/resources",            ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("POST",   "/api/v1/venues/{id}/resources",            ANY,   [401, 403, 403, 201, 403, 403, 403, 201]),
    row("GET",    "/api/v1/venues/{id}/events",               ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("POST",   "/api/v1/venues/{id}/events",               ANY,   [401, 403, 403, 201, 403, 403, 403, 201]),
    row("GET",    "/api/v1/resources/{id}",                   ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("PATCH",  "/api/v1/resources/{id}",                   ANY,   [401, 403, 403, 200, 403, 403, 403, 200]),
    row("DELETE", "/api/v1/resources/{id}",                   ANY,   [401, 403, 403, 204, 403, 403, 403, 204]),
    row("GET",    "/api/v1/resources/{id}/availability",      ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("GET",    "/api/v1/events/{id}",                      ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("GET",    "/api/v1/events/{id}/seats",                ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("GET",    "/api/v1/bookings",                         READ,  [401, 200, 200, 200, 200, 200, 403, 200]),
    row("POST",   "/api/v1/bookings",                         WRITE, [401, 201, 201, 201, 201, 201, 403, 201]),
    row("GET",    "/api/v1/bookings/{id}",                    READ,  [401, 200, 404, 200, 404, 404, 403, 200]),
    row("POST",   "/api/v1/bookings/{id}/confirm",            WRITE, [401, 200, 404, 403, 404, 404, 403, 403]),
    row("POST",   "/api/v1/bookings/{id}/cancel",             WRITE, [401, 200, 404, 200, 404, 404, 403, 200]),
    // The provider's events are authenticated by its signature alone, which no caller's token
    // replaces (signed events: tests/payment_webhooks.rs).
    row("POST",   "/api/v1/payments/webhooks/{provider}",     ANY,   [401, 401, 401, 401, 401, 401, 401, 401]),
    row("GET",    "/api/v1/users/{id}",                       ANY,   [401, 403, 403, 403, 403, 403, 403, 200]),
    row("POST",   "/api/v1/users/{id}/roles",                 ANY,   [401, 403, 403, 403, 403, 403, 403, 200]),
    row("DELETE", "/api/v1/users/{id}/roles/{role}",          ANY,   [401, 403, 403, 403, 403, 403, 403, 200]),
    row("GET",    "/api/v1/api-keys",                         ANY,   [401, 403, 403, 403, 403, 403, 403, 200]),
    row("POST",   "/api/v1/api-keys",                         ANY,   [401, 403, 403, 403, 403, 403, 403, 201]),
    row("DELETE", "/api/v1/api-keys/{id}",                    ANY,   [401, 403, 403, 403, 403, 403, 403, 204]),
    row("GET",    "/api/v1/audit",                            ANY,   [401, 403, 403, 200, 200, 403, 403, 200]),
    row("GET",    "/healthz",                                 ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("GET",    "/readyz",                                  ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
    row("GET",    "/metrics",                                 ANY,   [200, 200, 200, 200, 200, 200, 200, 200]),
];

const PASSWORD: &str = "password-123";
const CUSTOMER_EMAIL: &str = "customer@matrix.test";

/// Everything the rows refer to, made through the API.
struct World {
    t: TestApp,
    customer: String,
    other_customer: String,
    manager: String,
    other_manager: String,
    admin: String,
    /// Partner keys by scope set: exactly read, exactly write, all, and the complements.
    key_read: String,
    key_write: String,
    key_all: String,
    key_not_read: String,
    key_not_write: String,
    key_inventory: String,
    venue: String,
    seat: String,
    room: String,
    event: String,
    booking: String,
    bystander: String,
}

async fn key(t: &TestApp, admin: &str, scopes: &[&str]) -> String {
    let (status, body) = t.post(Some(admin), "/api-keys", json!({"name": "matrix partner", "scopes": scopes})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["key"].as_str().unwrap().to_owned()
}

fn seat_body(name: &str) -> Value {
    json!({"name": name, "capacity": 1, "unit_price": 1000, "attributes": {"row": "M", "number": 1, "category": "standard"},
           "time_model": {"kind": "events"}})
}

fn venue_body() -> Value {
    json!({"name": "Matrix", "category": "cinema", "location": {"lat": 52.5, "lon": 13.4},
           "timezone": "Europe/Berlin", "currency": "EUR"})
}

fn night(room: &str) -> Value {
    json!({"items": [{"resource_id": room, "check_in": "2026-12-01", "check_out": "2026-12-02"}]})
}

impl World {
    async fn new() -> World {
        let t = TestApp::spawn().await;
        let admin = t.admin().await;
        let customer = t.customer(CUSTOMER_EMAIL).await;
        let other_customer = t.customer("other@matrix.test").await;
        let manager = t.user_with_role("manager@matrix.test", Role::Manager).await;
        let other_manager = t.user_with_role("other-manager@matrix.test", Role::Manager).await;
        let venue = t.venue(&manager, "cinema").await;
        t.venue(&other_manager, "theatre").await;
        let (seats, event) = t.seats_and_event(&manager, &venue, 1, 48).await;
        let room = t.room_type(&manager, &venue, 1000, 0).await;
        let (status, held) = t.post(Some(&customer), "/bookings", night(&room)).await;
        assert_eq!(status, StatusCode::CREATED, "{held}");
        let (status, bystander) = t
            .post(None, "/auth/register", json!({"email": "bystander@matrix.test", "password": PASSWORD, "name": "B"}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{bystander}");
        World {
            key_read: key(&t, &admin, &["bookings:read"]).await,
            key_write: key(&t, &admin, &["bookings:write"]).await,
            key_all: key(&t, &admin, &["inventory:read", "bookings:read", "bookings:write"]).await,
            key_not_read: key(&t, &admin, &["inventory:read", "bookings:write"]).await,
            key_not_write: key(&t, &admin, &["inventory:read", "bookings:read"]).await,
            key_inventory: key(&t, &admin, &["inventory:read"]).await,
            booking: held["id"].as_str().unwrap().to_owned(),
            seat: seats[0].clone(),
            bystander: bystander["id"].as_str().unwrap().to_owned(),
            t,
            customer,
            other_customer,
            manager,
            other_manager,
            admin,
            venue,
            room,
            event,
        }
    }

    fn token(&self, who: Who, needs: Needs) -> Option<&str> {
        let token = match (who, needs) {
            (Who::Anonymous, _) => return None,
            (Who::Customer, _) => &self.customer,
            (Who::OtherCustomer, _) => &self.other_customer,
            (Who::Manager, _) => &self.manager,
            (Who::OtherManager, _) => &self.other_manager,
            (Who::Admin, _) => &self.admin,
            (Who::PartnerWith, Needs::Nothing) => &self.key_all,
            (Who::PartnerWith, Needs::Read) => &self.key_read,
            (Who::PartnerWith, Needs::Write) => &self.key_write,
            (Who::PartnerWithout, Needs::Nothing) => &self.key_inventory,
            (Who::PartnerWithout, Needs::Read) => &self.key_not_read,
            (Who::PartnerWithout, Needs::Write) => &self.key_not_write,
        };
        Some(token)
    }

    /// A booking of the customer's, held just now.
    async fn fresh_hold(&self) -> String {
        let (status, held) = self.t.post(Some(&self.customer), "/bookings", night(&self.room)).await;
        assert_eq!(status, StatusCode::CREATED, "{held}");
        held["id"].as_str().unwrap().to_owned()
    }

    async fn login_body(&self) -> Value {
        let (status, body) =
            self.t.post(None, "/auth/login", json!({"email": CUSTOMER_EMAIL, "password": PASSWORD})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        json!({"refresh_token": body["refresh_token"]})
    }

    /// The concrete path and body of a request that succeeds for a caller allowed to make it.
    async fn request(&self, row: &Row, cell: usize) -> (String, Option<Value>) {
        let t = &self.t;
        let (v, r, e, b) = (&self.venue, &self.room, &self.event, &self.booking);
        match (row.method, row.path) {
            ("POST", "/api/v1/auth/register") => (
                row.path.into(),
                Some(json!({"email": format!("new-{}@matrix.test", uuid::Uuid::now_v7().as_simple()),
                            "password": PASSWORD, "name": "New"})),
            ),
            ("POST", "/api/v1/auth/login") => {
                (row.path.into(), Some(json!({"email": CUSTOMER_EMAIL, "password": PASSWORD})))
            }
            ("POST", "/api/v1/auth/refresh" | "/api/v1/auth/logout") => {
                (row.path.into(), Some(self.login_body().await))
            }
            (
                "GET",
                "/api/v1/me" | "/api/v1/venues" | "/api/v1/bookings" | "/api/v1/api-keys" | "/api/v1/audit"
                | "/healthz" | "/readyz" | "/metrics",
            ) => (row.path.into(), None),
            ("POST", "/api/v1/venues") => (row.path.into(), Some(venue_body())),
            ("GET", "/api/v1/venues/{id}") => (format!("/api/v1/venues/{v}"), None),
            ("PATCH", "/api/v1/venues/{id}") => {
                (format!("/api/v1/venues/{v}"), Some(json!({"address": "1 Matrix Way"})))
            }
            ("DELETE", "/api/v1/venues/{id}") => {
                let spare = t.venue(&self.manager, "studio").await;
                (format!("/api/v1/venues/{spare}"), None)
            }
            ("GET", "/api/v1/venues/{id}/resources") => (format!("/api/v1/venues/{v}/resources"), None),
            ("POST", "/api/v1/venues/{id}/resources") => {
                (format!("/api/v1/venues/{v}/resources"), Some(seat_body(&format!("M{cell}"))))
            }
            ("GET", "/api/v1/venues/{id}/events") => (format!("/api/v1/venues/{v}/events"), None),
            ("POST", "/api/v1/venues/{id}/events") => {
                let start = t.clock_now().checked_add(jiff::SignedDuration::from_hours(100 + cell as i64 * 3)).unwrap();
                let end = start.checked_add(jiff::SignedDuration::from_hours(2)).unwrap();
                let body = json!({"name": "Matrix show", "start": start.to_string(), "end": end.to_string(),
                                  "seat_ids": [self.seat], "price_categories": {"standard": 1200}});
                (format!("/api/v1/venues/{v}/events"), Some(body))
            }
            ("GET", "/api/v1/resources/{id}") => (format!("/api/v1/resources/{r}"), None),
            ("PATCH", "/api/v1/resources/{id}") => {
                (format!("/api/v1/resources/{r}"), Some(json!({"unit_price": 10000})))
            }
            ("DELETE", "/api/v1/resources/{id}") => {
                let spare = t.resource(&self.manager, v, seat_body(&format!("spare {cell}"))).await;
                (format!("/api/v1/resources/{spare}"), None)
            }
            ("GET", "/api/v1/resources/{id}/availability") => {
                (format!("/api/v1/resources/{r}/availability?from=2026-12-01&to=2026-12-03"), None)
            }
            ("GET", "/api/v1/events/{id}") => (format!("/api/v1/events/{e}"), None),
            ("GET", "/api/v1/events/{id}/seats") => (format!("/api/v1/events/{e}/seats"), None),
            ("POST", "/api/v1/bookings") => (row.path.into(), Some(night(r))),
            ("GET", "/api/v1/bookings/{id}") => (format!("/api/v1/bookings/{b}"), None),
            ("POST", "/api/v1/bookings/{id}/confirm") => (
                format!("/api/v1/bookings/{}/confirm", self.fresh_hold().await),
                Some(json!({"payment": {"method": "card", "token": "tok_visa"}})),
            ),
            ("POST", "/api/v1/bookings/{id}/cancel") => {
                (format!("/api/v1/bookings/{}/cancel", self.fresh_hold().await), Some(json!({"reason": "matrix"})))
            }
            ("POST", "/api/v1/payments/webhooks/{provider}") => {
                let object = json!({"id": "pi_matrix", "metadata": {"booking_id": b}});
                let event = json!({"id": "evt_matrix", "type": "payment_intent.succeeded", "data": {"object": object}});
                ("/api/v1/payments/webhooks/test".into(), Some(event))
            }
            ("GET", "/api/v1/users/{id}") => (format!("/api/v1/users/{}", self.bystander), None),
            ("POST", "/api/v1/users/{id}/roles") => {
                (format!("/api/v1/users/{}/roles", self.bystander), Some(json!({"role": "manager", "venue_id": v})))
            }
            ("DELETE", "/api/v1/users/{id}/roles/{role}") => {
                (format!("/api/v1/users/{}/roles/manager?venue_id={v}", self.bystander), None)
            }
            ("POST", "/api/v1/api-keys") => {
                (row.path.into(), Some(json!({"name": "matrix", "scopes": ["inventory:read"]})))
            }
            ("DELETE", "/api/v1/api-keys/{id}") => {
                let (status, created) =
                    t.post(Some(&self.admin), "/api-keys", json!({"name": "spare", "scopes": ["bookings:read"]})).await;
                assert_eq!(status, StatusCode::CREATED, "{created}");
                (format!("/api/v1/api-keys/{}", created["id"].as_str().unwrap()), None)
            }
            (method, path) => panic!("the matrix has no request for {method} {path}"),
        }
    }

    async fn send(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.t.client.request(method, format!("http://{}{path}", self.t.addr));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        common::read(request.send().await.unwrap()).await
    }
}

/// The error code every refusal of this status must carry.
fn code_of(status: u16) -> Option<&'static str> {
    match status {
        401 => Some("unauthenticated"),
        403 => Some("forbidden"),
        404 => Some("not_found"),
        _ => None,
    }
}

#[test]
fn the_matrix_has_one_row_per_route() {
    let rows: Vec<(&str, &str)> = MATRIX.iter().map(|r| (r.method, r.path)).collect();
    let unique: BTreeSet<(&str, &str)> = rows.iter().copied().collect();
    assert_eq!(unique.len(), rows.len(), "a route has two rows");
    // Every route is in the OpenAPI document (tests/openapi.rs proves it against the router).
    let document = allot_http::openapi_document();
    let mut operations = BTreeSet::new();
    for (path, item) in &document.paths.paths {
        let methods = [
            ("GET", item.get.is_some()),
            ("POST", item.post.is_some()),
            ("PUT", item.put.is_some()),
            ("PATCH", item.patch.is_some()),
            ("DELETE", item.delete.is_some()),
        ];
        operations.extend(methods.iter().filter(|(_, has)| *has).map(|(m, _)| (*m, path.as_str())));
    }
    assert!(operations.contains(&("POST", "/api/v1/bookings")), "{operations:?}");
    let missing: Vec<_> = operations.difference(&unique).collect();
    let extra: Vec<_> = unique.difference(&operations).collect();
    assert!(missing.is_empty(), "routes without a row in the authorization matrix: {missing:?}");
    assert!(extra.is_empty(), "rows for routes the router does not serve: {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_every_caller_as_the_matrix_says() {
    let w = World::new().await;
    // Roles are re-read on every request, so the cells cannot leak into each other: the only
    // role change (the bystander's) touches nobody who makes requests.
    let mut wrong = Vec::new();
    for row in MATRIX {
        for (cell, (who, want)) in WHO.iter().zip(row.expect).enumerate() {
            let (path, body) = w.request(row, cell).await;
            let (status, answer) = w.send(row.method, &path, w.token(*who, row.needs), body).await;
            let code_ok = code_of(want).is_none_or(|code| answer["error"]["code"] == code);
            if status.as_u16() != want || !code_ok {
                wrong.push(format!("{} {} as {who:?}: want {want}, got {status} {answer}", row.method, row.path));
            }
        }
    }
    assert!(wrong.is_empty(), "{} cells differ from the matrix:\n{}", wrong.len(), wrong.join("\n"));
}
