//! Roles and partner API keys over real HTTP: an admin grants and revokes roles (effective on
//! the next request, the last admin kept), creates keys shown once and stored hashed, and
//! revokes them; a partner acts only within its scopes and only on its own bookings.
#![allow(clippy::unwrap_used)]

mod common;

use allot_app::auth::sha256_hex;
use allot_app::store::Role;
use common::TestApp;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, want_code: &str, what: &str) {
    assert_eq!(status, want_status, "{what}: {body}");
    assert_eq!(body["error"]["code"], want_code, "{what}: {body}");
}

fn night(room: &str, day: u32) -> Value {
    json!({"items": [{"resource_id": room, "check_in": format!("2026-12-{day:02}"), "check_out": format!("2026-12-{:02}", day + 1)}]})
}

#[tokio::test]
async fn an_admin_grants_and_revokes_roles_effective_on_the_next_request() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let (_, me) = t.get(Some(&admin), "/me").await;
    let admin_id = me["id"].as_str().unwrap().to_owned();
    let v = t.venue(&admin, "cinema").await;
    let w = t.venue(&admin, "theatre").await;
    let staff = t.customer("staff@test.allot").await;
    let (_, me) = t.get(Some(&staff), "/me").await;
    let id = me["id"].as_str().unwrap().to_owned();

    let (status, user) = t.get(Some(&admin), &format!("/users/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["roles"], json!(["customer"]));
    assert_eq!(user["email"], "staff@test.allot");
    assert!(user.get("password_hash").is_none(), "{user}");
    let (status, body) = t.patch(Some(&staff), &format!("/venues/{v}"), json!({"address": "mine"})).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "a customer patches V");

    // Manager of V: the same access token may manage V on its very next request, W still not.
    let (status, user) =
        t.post(Some(&admin), &format!("/users/{id}/roles"), json!({"role": "manager", "venue_id": v})).await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["roles"], json!(["customer", "manager"]));
    assert_eq!(user["managed_venue_ids"], json!([v]));
    let (status, body) = t.patch(Some(&staff), &format!("/venues/{v}"), json!({"address": "1 V Street"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = t.patch(Some(&staff), &format!("/venues/{w}"), json!({"address": "mine"})).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "the manager of V patches W");

    // Bad grants.
    let bad: [(Value, StatusCode, &str); 6] = [
        (json!({"role": "manager"}), StatusCode::UNPROCESSABLE_ENTITY, "venue_id"),
        (json!({"role": "admin", "venue_id": v}), StatusCode::UNPROCESSABLE_ENTITY, "venue_id"),
        (json!({"role": "customer", "venue_id": v}), StatusCode::UNPROCESSABLE_ENTITY, "venue_id"),
        (json!({"role": "owner"}), StatusCode::BAD_REQUEST, "role"),
        (json!({"role": "manager", "venue_id": "nope"}), StatusCode::BAD_REQUEST, "venue_id"),
        (json!({"role": "admin", "extra": 1}), StatusCode::BAD_REQUEST, "extra"),
    ];
    for (body, want, field) in bad {
        let (status, answer) = t.post(Some(&admin), &format!("/users/{id}/roles"), body.clone()).await;
        assert_error(status, &answer, want, "invalid_request", &format!("grant {body}"));
        assert!(answer["error"]["details"]["fields"][field].is_string(), "{body}: {answer}");
    }
    let (status, body) = t
        .post(Some(&admin), &format!("/users/{id}/roles"), json!({"role": "manager", "venue_id": uuid::Uuid::now_v7()}))
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "a venue that does not exist");
    let nobody = uuid::Uuid::now_v7();
    let (status, body) = t.post(Some(&admin), &format!("/users/{nobody}/roles"), json!({"role": "admin"})).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "a user that does not exist");
    let (status, body) = t.get(Some(&admin), &format!("/users/{nobody}")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "GET a user that does not exist");
    let (status, body) = t.delete(Some(&admin), &format!("/users/{id}/roles/owner")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "revoke an unknown role");
    let (status, body) = t.delete(Some(&admin), &format!("/users/{id}/roles/customer?venue_id={v}")).await;
    assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "venue_id for a customer");
    // A manager (of V) cannot grant anything, not even on V.
    let (status, body) =
        t.post(Some(&staff), &format!("/users/{id}/roles"), json!({"role": "manager", "venue_id": w})).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "a manager grants a role");

    // Manager of V and W; revoking V leaves W; revoking W (the last venue) ends the manager role.
    t.post(Some(&admin), &format!("/users/{id}/roles"), json!({"role": "manager", "venue_id": w})).await;
    let (status, user) = t.delete(Some(&admin), &format!("/users/{id}/roles/manager?venue_id={v}")).await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["managed_venue_ids"], json!([w]));
    let (status, body) = t.patch(Some(&staff), &format!("/venues/{v}"), json!({"address": "again"})).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "after losing V");
    let (status, user) = t.delete(Some(&admin), &format!("/users/{id}/roles/manager?venue_id={w}")).await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["roles"], json!(["customer"]));
    assert_eq!(user["managed_venue_ids"], json!([]));

    // The last admin cannot step down; with a second admin they can, and lose access at once.
    let (status, body) = t.delete(Some(&admin), &format!("/users/{admin_id}/roles/admin")).await;
    assert_error(status, &body, StatusCode::CONFLICT, "conflict", "the last admin steps down");
    let (status, user) = t.post(Some(&admin), &format!("/users/{id}/roles"), json!({"role": "admin"})).await;
    assert_eq!(status, StatusCode::OK, "{user}");
    let (status, user) = t.delete(Some(&admin), &format!("/users/{admin_id}/roles/admin")).await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["roles"], json!([]));
    let (status, body) = t.get(Some(&admin), &format!("/users/{id}")).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "a former admin");
    let (status, body) = t.get(Some(&staff), &format!("/users/{admin_id}")).await;
    assert_eq!(status, StatusCode::OK, "the new admin: {body}");
    let (status, body) = t.delete(Some(&staff), &format!("/users/{id}/roles/admin")).await;
    assert_error(status, &body, StatusCode::CONFLICT, "conflict", "the new last admin steps down");
}

#[tokio::test]
async fn api_keys_are_shown_once_stored_hashed_and_revocable() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;

    let (status, created) = t
        .post(Some(&admin), "/api-keys", json!({"name": " OTA ", "scopes": ["bookings:write", "bookings:read"]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap();
    let secret = key.strip_prefix("allot_pk_").expect("allot_pk_ prefix");
    // 32 random bytes, base64url without padding.
    assert_eq!(secret.len(), 43, "{key}");
    assert!(secret.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{key}");
    assert_eq!(created["name"], "OTA");
    assert_eq!(created["scopes"], json!(["bookings:read", "bookings:write"]));
    assert!(created["created_at"].is_string() && created["revoked_at"].is_null(), "{created}");
    let id = created["id"].as_str().unwrap();
    // Only the digest is stored.
    let stored = t.store.count("api_keys", &format!("key_hash = '{}'", sha256_hex(key.as_bytes()))).await.unwrap();
    assert_eq!(stored, 1);
    assert_eq!(t.store.count("api_keys", &format!("key_hash = '{key}' OR name = '{key}'")).await.unwrap(), 0);

    let (status, list) = t.get(Some(&admin), "/api-keys").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let listed = &list["data"][0];
    assert_eq!(listed["id"], id);
    let text = list.to_string();
    assert!(!text.contains(secret) && !text.contains(&sha256_hex(key.as_bytes())), "no key nor digest: {list}");
    assert!(listed.get("key").is_none() && listed.get("key_hash").is_none(), "{listed}");

    // Bad requests name the field.
    let (status, body) =
        t.post(Some(&admin), "/api-keys", json!({"name": "x", "scopes": ["bookings:read", "bookings:delete"]})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request", "an unknown scope");
    assert!(body["error"]["details"]["fields"]["scopes[1]"].is_string(), "{body}");
    let (status, body) = t.post(Some(&admin), "/api-keys", json!({"name": "  ", "scopes": []})).await;
    assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", "no name, no scopes");
    assert!(body["error"]["details"]["fields"]["name"].is_string(), "{body}");
    assert!(body["error"]["details"]["fields"]["scopes"].is_string(), "{body}");

    // A retry under the same Idempotency-Key gets the same key back (one key is made); the
    // stored answer holds no readable secret.
    let mut answers = Vec::new();
    for _ in 0..2 {
        let response = t
            .client
            .post(t.url("/api-keys"))
            .bearer_auth(&admin)
            .header("Idempotency-Key", "same-key")
            .json(&json!({"name": "retry", "scopes": ["inventory:read"]}))
            .send()
            .await
            .unwrap();
        let replayed = response.headers().get("idempotent-replayed").is_some();
        let (status, body) = common::read(response).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        answers.push((replayed, body));
    }
    assert_eq!((answers[0].0, answers[1].0), (false, true));
    assert_eq!(answers[0].1, answers[1].1);
    let retried = answers[0].1["key"].as_str().unwrap();
    let secret_part = retried.trim_start_matches("allot_pk_");
    assert_eq!(stored_answers_containing(&t, secret_part).await, 0, "stored sealed");
    // (The same look-up finds what a plain stored answer holds.)
    let venue = json!({"name": "Plainly Stored", "category": "cinema", "location": {"lat": 52.5, "lon": 13.4},
                       "timezone": "Europe/Berlin", "currency": "EUR"});
    let response =
        t.client.post(t.url("/venues")).bearer_auth(&admin).header("Idempotency-Key", "plain").json(&venue).send();
    assert_eq!(response.await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(stored_answers_containing(&t, "Plainly Stored").await, 1);
    let (_, list) = t.get(Some(&admin), "/api-keys?limit=100").await;
    let made = list["data"].as_array().unwrap().iter().filter(|k| k["name"] == "retry").count();
    assert_eq!(made, 1, "{list}");

    // The key works until revoked, then it is 401 like any bad token.
    let (status, body) = t.get(Some(key), "/bookings").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = t.get(Some("allot_pk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"), "/bookings").await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated", "an unknown key");
    let (status, body) = t.delete(Some(&admin), &format!("/api-keys/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = t.get(Some(key), "/bookings").await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated", "a revoked key");
    let (_, list) = t.get(Some(&admin), "/api-keys").await;
    assert!(list["data"][0]["revoked_at"].is_string(), "revoked keys stay listed: {list}");
    let (status, body) = t.delete(Some(&admin), &format!("/api-keys/{}", uuid::Uuid::now_v7())).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "an unknown key id");
}

/// A new key with `scopes`: (id, key).
async fn partner(t: &TestApp, admin: &str, scopes: Value) -> (String, String) {
    let (status, body) = t.post(Some(admin), "/api-keys", json!({"name": "partner", "scopes": scopes})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    (body["id"].as_str().unwrap().to_owned(), body["key"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_partner_books_within_its_scopes_and_sees_only_its_own_bookings() {
    let t = TestApp::spawn().await;
    let admin = t.admin().await;
    let manager = t.user_with_role("m@test.allot", Role::Manager).await;
    let venue = t.venue(&manager, "hotel").await;
    let room = t.room_type(&manager, &venue, 10, 0).await;
    let customer = t.customer("c@test.allot").await;
    let (ota_id, ota) = partner(&t, &admin, json!(["bookings:read", "bookings:write"])).await;
    let (_, reader) = partner(&t, &admin, json!(["bookings:read", "inventory:read"])).await;
    let (_, writer) = partner(&t, &admin, json!(["bookings:write"])).await;

    let (status, theirs) = t.post(Some(&customer), "/bookings", night(&room, 1)).await;
    assert_eq!(status, StatusCode::CREATED, "{theirs}");
    let theirs = theirs["id"].as_str().unwrap().to_owned();

    // Held by the partner: the key's id is the customer.
    let (status, held) = t.post(Some(&ota), "/bookings", night(&room, 2)).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    assert_eq!(held["customer_id"], ota_id);
    let mine = held["id"].as_str().unwrap().to_owned();
    let (status, list) = t.get(Some(&ota), "/bookings").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![mine.as_str()], "only its own bookings");
    let (status, body) = t.get(Some(&ota), &format!("/bookings/{theirs}")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "a customer's booking");
    let (status, body) = t.post(Some(&ota), &format!("/bookings/{theirs}/cancel"), json!({})).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "cancel a customer's booking");
    let (status, confirmed) = t
        .post(
            Some(&ota),
            &format!("/bookings/{mine}/confirm"),
            json!({"payment": {"method": "card", "token": "tok_visa"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(confirmed["status"], "confirmed");
    // The venue's manager sees it like any booking at the venue; the customer does not.
    let (status, body) = t.get(Some(&manager), &format!("/bookings/{mine}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = t.get(Some(&customer), &format!("/bookings/{mine}")).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found", "a customer reads a partner's booking");

    // Scopes: reading without bookings:write, writing without bookings:read.
    let (status, body) = t.post(Some(&reader), "/bookings", night(&room, 3)).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "hold without bookings:write");
    assert!(body["error"]["message"].as_str().unwrap().contains("bookings:write"), "{body}");
    let (status, body) = t.get(Some(&reader), "/bookings").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, held) = t.post(Some(&writer), "/bookings", night(&room, 3)).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    let (status, body) = t.get(Some(&writer), &format!("/bookings/{}", held["id"].as_str().unwrap())).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "read without bookings:read");
    let (status, body) =
        t.post(Some(&writer), &format!("/bookings/{}/cancel", held["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Never a user: no /me, no management, no admin, whatever the scopes.
    let (status, body) = t.get(Some(&ota), "/me").await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "/me for a partner");
    let (status, body) = t.patch(Some(&ota), &format!("/venues/{venue}"), json!({"name": "ota"})).await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "a partner patches a venue");
    let (status, body) = t.get(Some(&ota), "/api-keys").await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden", "a partner lists keys");
    // Public catalogue reads need no scope.
    let (status, body) =
        t.get(Some(&writer), &format!("/resources/{room}/availability?from=2026-12-01&to=2026-12-03")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// How many stored idempotent answers contain `text` as it would be readable in the table.
async fn stored_answers_containing(t: &TestApp, text: &str) -> i64 {
    let readable = if t.db_url.starts_with("postgres") { "encode(body, 'escape')" } else { "CAST(body AS TEXT)" };
    t.store.count("idempotency_keys", &format!("{readable} LIKE '%{text}%'")).await.unwrap()
}
