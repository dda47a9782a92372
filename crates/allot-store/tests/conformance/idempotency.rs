//! Idempotency keys (I4): lock, replay, mismatch, lease take-over, abandon, clean-up.

use allot_app::store::{IdempotencyBegin, IdempotencyKey};

use crate::{Backend, at};

fn key(principal: &str, key: &str, hash: &str) -> IdempotencyKey {
    IdempotencyKey { principal: principal.into(), key: key.into(), request_hash: hash.into() }
}

fn completed(hash: &str, status: u16, body: &[u8]) -> IdempotencyBegin {
    IdempotencyBegin::Completed { request_hash: hash.into(), status, body: body.to_vec() }
}

pub async fn idempotency_begin_complete_replay(b: &Backend) {
    let s = b.store();
    let k = key("user:1", "abc", "h1");
    assert_eq!(s.idempotency_begin(&k, at(0), 30).await.unwrap(), IdempotencyBegin::Started);
    assert_eq!(s.idempotency_begin(&k, at(1), 30).await.unwrap(), IdempotencyBegin::InProgress);
    // Keys are per principal.
    assert_eq!(s.idempotency_begin(&key("user:2", "abc", "h1"), at(1), 30).await.unwrap(), IdempotencyBegin::Started);
    assert_eq!(s.idempotency_begin(&key("user:1", "abd", "h1"), at(1), 30).await.unwrap(), IdempotencyBegin::Started);

    let body = br#"{"id":"0190","status":"held"}"#;
    s.idempotency_complete(&k, 201, body).await.unwrap();
    assert_eq!(s.idempotency_begin(&k, at(2), 30).await.unwrap(), completed("h1", 201, body));
    assert_eq!(s.idempotency_begin(&k, at(3), 30).await.unwrap(), completed("h1", 201, body), "replay is stable");
    assert_eq!(s.idempotency_begin(&k, at(500), 30).await.unwrap(), completed("h1", 201, body), "no lease on results");

    // Bodies are bytes, not text; empty bodies survive.
    let binary = [0u8, 159, 146, 150, 255, b'\n'];
    let kb = key("user:1", "binary", "hb");
    assert_eq!(s.idempotency_begin(&kb, at(501), 30).await.unwrap(), IdempotencyBegin::Started);
    s.idempotency_complete(&kb, 409, &binary).await.unwrap();
    assert_eq!(s.idempotency_begin(&kb, at(502), 30).await.unwrap(), completed("hb", 409, &binary));
    let ke = key("user:1", "empty", "he");
    assert_eq!(s.idempotency_begin(&ke, at(503), 30).await.unwrap(), IdempotencyBegin::Started);
    s.idempotency_complete(&ke, 204, b"").await.unwrap();
    assert_eq!(s.idempotency_begin(&ke, at(504), 30).await.unwrap(), completed("he", 204, b""));
}

pub async fn idempotency_different_request_is_refused(b: &Backend) {
    let s = b.store();
    // A completed key asked with another request: either reported as Mismatch, or as the
    // stored completion whose hash differs (the app compares). Never a replay for h2.
    let k1 = key("user:1", "k", "h1");
    let k2 = key("user:1", "k", "h2");
    assert_eq!(s.idempotency_begin(&k1, at(0), 30).await.unwrap(), IdempotencyBegin::Started);
    s.idempotency_complete(&k1, 200, b"first").await.unwrap();
    match s.idempotency_begin(&k2, at(1), 30).await.unwrap() {
        IdempotencyBegin::Mismatch => {}
        IdempotencyBegin::Completed { request_hash, .. } => assert_eq!(request_hash, "h1"),
        other => panic!("a different request on a completed key: got {other:?}"),
    }
    // The original is still replayed.
    assert_eq!(s.idempotency_begin(&k1, at(2), 30).await.unwrap(), completed("h1", 200, b"first"));

    // While the first still runs, another request with the key is refused, not started.
    let r1 = key("user:1", "running", "h1");
    let r2 = key("user:1", "running", "h2");
    assert_eq!(s.idempotency_begin(&r1, at(3), 30).await.unwrap(), IdempotencyBegin::Started);
    let second = s.idempotency_begin(&r2, at(4), 30).await.unwrap();
    assert!(
        matches!(second, IdempotencyBegin::InProgress | IdempotencyBegin::Mismatch),
        "a different request on a running key: got {second:?}"
    );
    // Completing under the other request's hash does not complete the first one's key.
    s.idempotency_complete(&r2, 500, b"wrong").await.unwrap();
    assert_eq!(s.idempotency_begin(&r1, at(5), 30).await.unwrap(), IdempotencyBegin::InProgress);
    s.idempotency_complete(&r1, 201, b"right").await.unwrap();
    assert_eq!(s.idempotency_begin(&r1, at(6), 30).await.unwrap(), completed("h1", 201, b"right"));
}

pub async fn idempotency_lock_lease_expiry_allows_takeover(b: &Backend) {
    let s = b.store();
    let k = key("user:1", "lease", "h1");
    assert_eq!(s.idempotency_begin(&k, at(0), 30).await.unwrap(), IdempotencyBegin::Started);
    assert_eq!(s.idempotency_begin(&k, at(29), 30).await.unwrap(), IdempotencyBegin::InProgress);
    // The first request died without finishing: after its lease a retry takes over.
    assert_eq!(s.idempotency_begin(&k, at(30), 30).await.unwrap(), IdempotencyBegin::Started);
    // The take-over holds a fresh lease.
    assert_eq!(s.idempotency_begin(&k, at(31), 30).await.unwrap(), IdempotencyBegin::InProgress);
    assert_eq!(s.idempotency_begin(&k, at(59), 30).await.unwrap(), IdempotencyBegin::InProgress);
    assert_eq!(s.idempotency_begin(&k, at(60), 30).await.unwrap(), IdempotencyBegin::Started);
    s.idempotency_complete(&k, 201, b"done").await.unwrap();
    assert_eq!(s.idempotency_begin(&k, at(1000), 30).await.unwrap(), completed("h1", 201, b"done"));
    assert_eq!(b.count("idempotency_keys", "1=1").await, 1);

    // Concurrent first requests: exactly one starts.
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.idempotency_begin(&key("user:9", "race", "hr"), at(1001), 30).await })
        })
        .collect();
    let mut started = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            IdempotencyBegin::Started => started += 1,
            IdempotencyBegin::InProgress => {}
            other => panic!("concurrent begin: got {other:?}"),
        }
    }
    assert_eq!(started, 1);
}

pub async fn idempotency_abandon_releases_only_unfinished_keys(b: &Backend) {
    let s = b.store();
    let k = key("user:1", "abandon", "h1");
    assert_eq!(s.idempotency_begin(&k, at(0), 30).await.unwrap(), IdempotencyBegin::Started);
    s.idempotency_abandon(&k).await.unwrap();
    assert_eq!(b.count("idempotency_keys", "1=1").await, 0);
    // Free again at once, without waiting for the lease.
    assert_eq!(s.idempotency_begin(&k, at(1), 30).await.unwrap(), IdempotencyBegin::Started);
    s.idempotency_complete(&k, 200, b"kept").await.unwrap();
    // A completed key is not abandoned.
    s.idempotency_abandon(&k).await.unwrap();
    assert_eq!(s.idempotency_begin(&k, at(2), 30).await.unwrap(), completed("h1", 200, b"kept"));
    // Unknown keys: nothing to do.
    s.idempotency_abandon(&key("user:1", "never", "hx")).await.unwrap();
    // Another principal's key of the same name is untouched.
    let mine = key("user:2", "abandon", "h1");
    assert_eq!(s.idempotency_begin(&mine, at(3), 30).await.unwrap(), IdempotencyBegin::Started);
    s.idempotency_abandon(&key("user:3", "abandon", "h1")).await.unwrap();
    assert_eq!(s.idempotency_begin(&mine, at(4), 30).await.unwrap(), IdempotencyBegin::InProgress);
}

pub async fn idempotency_cleanup_deletes_old_keys_only(b: &Backend) {
    let s = b.store();
    let (ka, kb, kc, kd) = (key("p", "a", "h"), key("p", "b", "h"), key("p", "c", "h"), key("p", "d", "h"));
    s.idempotency_begin(&ka, at(0), 30).await.unwrap();
    s.idempotency_complete(&ka, 200, b"a").await.unwrap();
    s.idempotency_begin(&kb, at(10), 30).await.unwrap();
    s.idempotency_begin(&kc, at(20), 30).await.unwrap();
    s.idempotency_begin(&kd, at(100), 30).await.unwrap();

    assert_eq!(s.idempotency_cleanup(at(15), 100).await.unwrap(), 2, "a (completed) and b (running)");
    assert_eq!(b.count("idempotency_keys", "1=1").await, 2);
    assert_eq!(s.idempotency_cleanup(at(15), 100).await.unwrap(), 0);
    // Within the limit, a few at a time.
    assert_eq!(s.idempotency_cleanup(at(150), 1).await.unwrap(), 1);
    assert_eq!(s.idempotency_cleanup(at(150), 1).await.unwrap(), 1);
    assert_eq!(s.idempotency_cleanup(at(150), 1).await.unwrap(), 0);
    assert_eq!(b.count("idempotency_keys", "1=1").await, 0);

    for i in 0..5 {
        s.idempotency_begin(&key("p", &format!("e{i}"), "h"), at(200 + i), 30).await.unwrap();
    }
    // Strictly before: the key created at 203 stays.
    assert_eq!(s.idempotency_cleanup(at(203), 100).await.unwrap(), 3);
    assert_eq!(b.count("idempotency_keys", "1=1").await, 2);
    assert_eq!(s.idempotency_begin(&key("p", "e3", "h"), at(210), 30).await.unwrap(), IdempotencyBegin::InProgress);
    // A deleted key is new again.
    assert_eq!(s.idempotency_begin(&ka, at(211), 30).await.unwrap(), IdempotencyBegin::Started);
}
