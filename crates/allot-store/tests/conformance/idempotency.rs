//! Idempotency keys (I4): lock, replay, mismatch, lease take-over and renewal, the holder's
//! rights, marks written with a keyed request's change and recovery, abandon, clean-up.

use allot_app::StoreError;
use allot_app::audit::{self, AuditEvent, AuditScope};
use allot_app::store::{HoldKey, HoldRefused, IdempotencyBegin, IdempotencyKey, KeyedHoldOutcome, Role, StoredAnswer};
use allot_core::booking::Booking;
use futures::future::join_all;
use jiff::Timestamp;

use crate::{Backend, HOUR, World, at, span, user};

/// An attempt at `key` with request `hash`; attempts with one hash share an owner here, the
/// tests of ownership use [`attempt`].
fn key(principal: &str, key: &str, hash: &str) -> IdempotencyKey {
    attempt(principal, key, hash, &format!("owner-{hash}"))
}

fn attempt(principal: &str, key: &str, hash: &str, owner: &str) -> IdempotencyKey {
    IdempotencyKey { principal: principal.into(), key: key.into(), request_hash: hash.into(), owner: owner.into() }
}

/// The audit scope of a request carrying `key`, its event naming `target`.
fn keyed_scope(key: &IdempotencyKey, target: Option<String>) -> AuditScope {
    let mut event = AuditEvent::new("booking.hold", "customer", at(0));
    event.target_id = target;
    AuditScope::new(event).with_idempotency_key(key.clone())
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

pub async fn only_the_attempt_holding_a_key_renews_completes_or_releases_it(b: &Backend) {
    let s = b.store();
    let first = attempt("user:1", "slow", "h1", "first");
    let retry = attempt("user:1", "slow", "h1", "retry");
    assert_eq!(s.idempotency_begin(&first, at(0), 30).await.unwrap(), IdempotencyBegin::Started);
    // A renewed lease keeps a retry out past the first lease's end.
    assert!(s.idempotency_renew(&first, at(40)).await.unwrap());
    assert_eq!(s.idempotency_begin(&retry, at(35), 30).await.unwrap(), IdempotencyBegin::InProgress);
    // Not renewed again, it lapses: the retry takes the key over.
    assert_eq!(s.idempotency_begin(&retry, at(40), 30).await.unwrap(), IdempotencyBegin::Started);
    // The first attempt, still running after all, can no longer touch the key.
    assert!(!s.idempotency_renew(&first, at(100)).await.unwrap());
    s.idempotency_complete(&first, 500, b"stale").await.unwrap();
    s.idempotency_abandon(&first).await.unwrap();
    assert_eq!(
        s.idempotency_begin(&key("user:1", "slow", "h1"), at(41), 30).await.unwrap(),
        IdempotencyBegin::InProgress
    );
    // The holder's answer is the one kept.
    s.idempotency_complete(&retry, 201, b"fresh").await.unwrap();
    assert_eq!(s.idempotency_begin(&first, at(42), 30).await.unwrap(), completed("h1", 201, b"fresh"));
    // Nothing renews a completed key.
    assert!(!s.idempotency_renew(&retry, at(500)).await.unwrap());
}

pub async fn a_kept_change_marks_its_key_and_a_retry_recovers_it_instead_of_running(b: &Backend) {
    let w = World::new(b).await;
    let s = w.store.clone();
    let seat = w.resource(1).await;
    let first = attempt("user:1", "hold-1", "h1", "first");
    assert_eq!(s.idempotency_begin(&first, at(0), 30).await.unwrap(), IdempotencyBegin::Started);
    let command = w.command(&[(seat.id, span(HOUR, 2 * HOUR), 1)], at(1), 600);
    let target = command.booking.id.to_string();
    let held = keyed_scope(&first, Some(target.clone())).run(s.hold(command)).await.unwrap();
    // The attempt dies here: its answer is never stored.
    assert_eq!(
        s.idempotency_begin(&key("user:1", "hold-1", "h1"), at(29), 30).await.unwrap(),
        IdempotencyBegin::InProgress
    );
    let retry = attempt("user:1", "hold-1", "h1", "retry");
    let recover = IdempotencyBegin::Recover { request_hash: "h1".into(), target: held.id.to_string() };
    assert_eq!(s.idempotency_begin(&retry, at(30), 30).await.unwrap(), recover);
    // The recovering attempt holds the key; another body under it is refused.
    assert_eq!(
        s.idempotency_begin(&key("user:1", "hold-1", "h1"), at(31), 30).await.unwrap(),
        IdempotencyBegin::InProgress
    );
    assert_eq!(
        s.idempotency_begin(&key("user:1", "hold-1", "h2"), at(60), 30).await.unwrap(),
        IdempotencyBegin::Mismatch
    );
    // Released (it could not answer now), the key stays marked: the next retry recovers too.
    s.idempotency_abandon(&retry).await.unwrap();
    let again = attempt("user:1", "hold-1", "h1", "again");
    assert_eq!(s.idempotency_begin(&again, at(61), 30).await.unwrap(), recover);
    s.idempotency_complete(&again, 201, b"recovered").await.unwrap();
    assert_eq!(s.idempotency_begin(&first, at(62), 30).await.unwrap(), completed("h1", 201, b"recovered"));
    assert_eq!(b.count("bookings", "true").await, 1);

    // A write outside a hold (a user) marks its key too.
    let signup = attempt("anonymous:1", "signup", "hs", "first");
    assert_eq!(s.idempotency_begin(&signup, at(70), 30).await.unwrap(), IdempotencyBegin::Started);
    let new_user = user("keyed@test.allot", vec![Role::Customer]);
    keyed_scope(&signup, Some(new_user.id.to_string())).run(s.insert_user(&new_user)).await.unwrap();
    let recovered = s.idempotency_begin(&attempt("anonymous:1", "signup", "hs", "retry"), at(100), 30).await.unwrap();
    assert_eq!(recovered, IdempotencyBegin::Recover { request_hash: "hs".into(), target: new_user.id.to_string() });
}

pub async fn a_refused_failed_or_unkeyed_attempt_marks_nothing(b: &Backend) {
    let w = World::new(b).await;
    let s = w.store.clone();
    let seat = w.resource(1).await;
    let morning = span(HOUR, 2 * HOUR);
    let taken = w.command(&[(seat.id, morning, 1)], at(1), 600);
    let target = Some(taken.booking.id.to_string());
    let unkeyed = AuditScope::new(AuditEvent::new("booking.hold", "customer", at(0)));
    unkeyed.run(s.hold(taken)).await.unwrap();

    // Refused: the seat is taken.
    let refused = attempt("user:1", "refused", "h1", "first");
    assert_eq!(s.idempotency_begin(&refused, at(2), 30).await.unwrap(), IdempotencyBegin::Started);
    let command = w.command(&[(seat.id, morning, 1)], at(3), 600);
    let outcome = keyed_scope(&refused, Some(command.booking.id.to_string())).run(s.hold(command)).await;
    assert!(matches!(outcome, Err(HoldRefused::Unavailable { .. })), "{outcome:?}");
    // Kept but failed (a declined payment is written, yet the attempt failed).
    let failed = attempt("user:1", "failed", "h1", "first");
    assert_eq!(s.idempotency_begin(&failed, at(4), 30).await.unwrap(), IdempotencyBegin::Started);
    let scope = keyed_scope(&failed, target.clone());
    audit::fail_scope(&scope, "payment_declined");
    let other = w.command(&[(seat.id, span(3 * HOUR, 4 * HOUR), 1)], at(5), 600);
    scope.run(s.hold(other)).await.unwrap();
    // Kept, without a target to answer from.
    let untargeted = attempt("user:1", "untargeted", "h1", "first");
    assert_eq!(s.idempotency_begin(&untargeted, at(6), 30).await.unwrap(), IdempotencyBegin::Started);
    let third = w.command(&[(seat.id, span(5 * HOUR, 6 * HOUR), 1)], at(7), 600);
    keyed_scope(&untargeted, None).run(s.hold(third)).await.unwrap();

    // Each, once its attempt died, runs again, and an abandoned one is deleted.
    for k in [&refused, &failed, &untargeted] {
        let retry = attempt("user:1", &k.key, "h1", "retry");
        assert_eq!(s.idempotency_begin(&retry, at(100), 30).await.unwrap(), IdempotencyBegin::Started, "{}", k.key);
        s.idempotency_abandon(&retry).await.unwrap();
    }
    assert_eq!(b.count("idempotency_keys", "1=1").await, 0);
}

/// An attempt that stalled past its lease and was taken over (a retry ran the request) cannot
/// commit its change as well: its batch fails as busy and keeps nothing, before and after the
/// attempt that took over answered.
pub async fn an_attempt_whose_key_was_taken_over_commits_nothing(b: &Backend) {
    let w = World::new(b).await;
    let s = w.store.clone();
    let seat = w.resource(1).await;
    let stale = attempt("user:1", "hold-1", "h1", "stale");
    assert_eq!(s.idempotency_begin(&stale, at(0), 30).await.unwrap(), IdempotencyBegin::Started);
    let retry = attempt("user:1", "hold-1", "h1", "retry");
    assert_eq!(s.idempotency_begin(&retry, at(31), 30).await.unwrap(), IdempotencyBegin::Started);

    let late = w.command(&[(seat.id, span(HOUR, 2 * HOUR), 1)], at(32), 600);
    let outcome = keyed_scope(&stale, Some(late.booking.id.to_string())).run(s.hold(late)).await;
    assert!(matches!(outcome, Err(HoldRefused::Store(StoreError::Busy(_)))), "{outcome:?}");
    assert_eq!(b.count("bookings", "true").await, 0, "the stale attempt's hold was rolled back");

    let command = w.command(&[(seat.id, span(HOUR, 2 * HOUR), 1)], at(33), 600);
    let target = command.booking.id.to_string();
    keyed_scope(&retry, Some(target.clone())).run(s.hold(command)).await.unwrap();
    s.idempotency_complete(&retry, 201, b"held").await.unwrap();
    // After the answer is stored too, and for a write other than a hold.
    let new_user = user("stale@test.allot", vec![Role::Customer]);
    let outcome = keyed_scope(&stale, Some(new_user.id.to_string())).run(s.insert_user(&new_user)).await;
    assert!(matches!(outcome, Err(StoreError::Busy(_))), "{outcome:?}");
    assert_eq!(b.count("users", &format!("id = '{}'", new_user.id)).await, 0);
    assert_eq!(b.count("bookings", "true").await, 1, "the hold of the attempt that took over");
    assert_eq!(s.idempotency_begin(&stale, at(40), 30).await.unwrap(), completed("h1", 201, b"held"));
}

/// Keys asked for and answered at the same moment (one batch: the writer takes them together)
/// come out as they would one by one: of twenty attempts at one key one takes it, and twenty
/// keys each get their own answer back.
pub async fn keys_begun_and_answered_together_come_out_as_one_by_one(b: &Backend) {
    let s = World::new(b).await.store;
    let shared: Vec<IdempotencyKey> = (0..20).map(|i| attempt("user:1", "shared", "h1", &format!("a{i}"))).collect();
    let begun = join_all(shared.iter().map(|k| s.idempotency_begin(k, at(0), 30))).await;
    let started = begun.iter().filter(|r| matches!(r, Ok(IdempotencyBegin::Started))).count();
    let in_flight = begun.iter().filter(|r| matches!(r, Ok(IdempotencyBegin::InProgress))).count();
    assert_eq!((started, in_flight), (1, 19), "{begun:?}");

    let keys: Vec<IdempotencyKey> = (0..20).map(|i| attempt("user:1", &format!("k{i}"), "h1", "first")).collect();
    for begun in join_all(keys.iter().map(|k| s.idempotency_begin(k, at(1), 30))).await {
        assert_eq!(begun.unwrap(), IdempotencyBegin::Started);
    }
    let answers: Vec<Vec<u8>> = (0..20).map(|i| format!("answer {i}").into_bytes()).collect();
    let stored = join_all(keys.iter().zip(&answers).map(|(k, body)| s.idempotency_complete(k, 201, body))).await;
    assert!(stored.iter().all(Result::is_ok), "{stored:?}");
    for (k, body) in keys.iter().zip(&answers) {
        let replay = s.idempotency_begin(&attempt("user:1", &k.key, "h1", "retry"), at(2), 30).await.unwrap();
        assert_eq!(replay, completed("h1", 201, body));
    }
}

/// The answer a keyed hold stores in these tests: 201 and the booking's id, or 409.
fn answer_of(decided: Result<&Booking, &HoldRefused>) -> StoredAnswer {
    match decided {
        Ok(booking) => StoredAnswer { status: 201, body: booking.id.to_string().into_bytes() },
        Err(refused) => StoredAnswer { status: 409, body: format!("{refused:?}").into_bytes() },
    }
}

fn hold_key(key: &IdempotencyKey, now: Timestamp) -> HoldKey {
    HoldKey { key: key.clone(), now, lock_seconds: 30, answer: Box::new(answer_of) }
}

pub async fn a_keyed_hold_takes_its_key_and_stores_its_answer_with_it(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    let want = [(r.id, span(0, HOUR), 1)];
    let principal = w.customer.to_string();
    let first = attempt(&principal, "hold-1", "h1", "a1");
    let ran = w.store.hold_keyed(w.command(&want, at(0), 600), hold_key(&first, at(0))).await.unwrap();
    let KeyedHoldOutcome::Ran { result: Ok(booking), answer } = ran else { panic!("{ran:?}") };
    assert_eq!(answer, answer_of(Ok(&booking)));
    // Its answer is the key's, with the hold: a retry is a replay, never a second hold.
    let retry = attempt(&principal, "hold-1", "h1", "a2");
    assert_eq!(w.store.idempotency_begin(&retry, at(1), 30).await.unwrap(), completed("h1", 201, &answer.body));
    let again = w.store.hold_keyed(w.command(&want, at(1), 600), hold_key(&retry, at(1))).await.unwrap();
    assert!(matches!(&again, KeyedHoldOutcome::NotRun(found) if *found == completed("h1", 201, &answer.body)));
    assert_eq!(w.claimed(r.id, at(1)).await, 1);

    // A refusal is stored as the key's answer too.
    let rival = attempt(&principal, "hold-2", "h2", "b1");
    let ran = w.store.hold_keyed(w.command(&want, at(2), 600), hold_key(&rival, at(2))).await.unwrap();
    let KeyedHoldOutcome::Ran { result: Err(HoldRefused::Unavailable { .. }), answer } = ran else { panic!("{ran:?}") };
    assert_eq!(answer.status, 409);
    let replay = w.store.idempotency_begin(&attempt(&principal, "hold-2", "h2", "b2"), at(3), 30).await.unwrap();
    assert_eq!(replay, completed("h2", 409, &answer.body));

    // A key another attempt holds: nothing is held, nothing stored.
    let other = w.resource(1).await;
    let running = attempt(&principal, "hold-3", "h3", "c1");
    assert_eq!(w.store.idempotency_begin(&running, at(4), 30).await.unwrap(), IdempotencyBegin::Started);
    let late = attempt(&principal, "hold-3", "h3", "c2");
    let other_want = [(other.id, span(0, HOUR), 1)];
    let refused = w.store.hold_keyed(w.command(&other_want, at(5), 600), hold_key(&late, at(5))).await.unwrap();
    assert!(matches!(refused, KeyedHoldOutcome::NotRun(IdempotencyBegin::InProgress)), "{refused:?}");
    assert_eq!(w.claimed(other.id, at(5)).await, 0);
}

pub async fn a_keyed_hold_sent_many_times_at_once_is_made_once(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(100).await;
    let want = [(r.id, span(0, HOUR), 1)];
    let principal = w.customer.to_string();
    let attempts: Vec<IdempotencyKey> = (0..16).map(|i| attempt(&principal, "burst", "h1", &format!("a{i}"))).collect();
    let outcomes =
        join_all(attempts.iter().map(|k| w.store.hold_keyed(w.command(&want, at(0), 600), hold_key(k, at(0))))).await;
    let ran: Vec<&StoredAnswer> = outcomes
        .iter()
        .filter_map(|o| match o {
            Ok(KeyedHoldOutcome::Ran { result: Ok(_), answer }) => Some(answer),
            _ => None,
        })
        .collect();
    assert_eq!(ran.len(), 1, "{outcomes:?}");
    for outcome in &outcomes {
        match outcome {
            Ok(KeyedHoldOutcome::Ran { .. } | KeyedHoldOutcome::NotRun(IdempotencyBegin::InProgress)) => {}
            Ok(KeyedHoldOutcome::NotRun(found)) => assert_eq!(*found, completed("h1", 201, &ran[0].body)),
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(w.claimed(r.id, at(0)).await, 1, "held once");
}
