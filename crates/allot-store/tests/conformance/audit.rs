//! The audit trail (I6): one hash chain appended in commit order, filtered lists, events
//! recorded in the transaction of the change they describe (or on their own when nothing
//! changed), append-only rows, and tampering found by `verify` at the right event.

use allot_app::audit::{self, AuditEvent, AuditFilter, AuditPage, AuditScope, GENESIS_HASH, Outcome, Verdict};
use allot_app::store::HoldRefused;
use allot_core::ids::VenueId;

use crate::{Backend, HOUR, World, at, span};

fn event(action: &str, actor: &str, seconds: i64) -> AuditEvent {
    let mut e = AuditEvent::new(action, "customer", at(seconds));
    e.actor_id = Some(actor.to_owned());
    e.ip = Some("127.0.0.1".into());
    e.request_id = Some(format!("req-{seconds}"));
    e
}

fn failed(mut e: AuditEvent, reason: &str) -> AuditEvent {
    e.outcome = Outcome::Failure;
    e.reason = Some(reason.to_owned());
    e
}

async fn verdict(b: &Backend) -> Verdict {
    audit::verify(b.store().as_ref()).await.unwrap()
}

pub async fn chain_appends_in_order_and_verifies(b: &Backend) {
    let s = b.store();
    assert_eq!(s.audit_head().await.unwrap(), (0, GENESIS_HASH.to_owned()));
    assert_eq!(verdict(b).await, Verdict::Intact { events: 0 });
    let mut sent = Vec::new();
    for i in 0..5 {
        let mut e = event("booking.hold", "alice", i);
        e.details.insert("n".into(), i.to_string());
        e.target_id = Some(format!("target-{i}"));
        sent.push(e.clone());
        s.append_audit(e).await.unwrap();
    }
    let stored = s.audit_range(0, 100).await.unwrap();
    assert_eq!(stored.len(), 5);
    let mut prev = GENESIS_HASH.to_owned();
    for (i, (got, want)) in stored.iter().zip(&sent).enumerate() {
        assert_eq!(got.seq, i as u64 + 1);
        assert_eq!(got.prev_hash, prev);
        assert_eq!(got.hash, got.computed_hash());
        assert_eq!(
            (&got.id, &got.details, &got.target_id, got.at),
            (&want.id, &want.details, &want.target_id, want.at)
        );
        prev = got.hash.clone();
    }
    assert_eq!(s.audit_head().await.unwrap(), (5, prev));
    let middle: Vec<u64> = s.audit_range(2, 2).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(middle, vec![3, 4]);
    assert_eq!(verdict(b).await, Verdict::Intact { events: 5 });
}

pub async fn list_filters_and_pages_newest_first(b: &Backend) {
    let s = b.store();
    let (v1, v2) = (VenueId::new(), VenueId::new());
    let mut events = vec![
        event("auth.login", "alice", 0),
        failed(event("auth.login", "bob", 10), "unauthenticated"),
        event("booking.hold", "alice", 20),
        failed(event("booking.hold", "bob", 30), "unavailable"),
        event("venue.update", "carol", 40),
    ];
    events[2].venue_id = Some(v1);
    events[2].target_id = Some("b-1".into());
    events[3].venue_id = Some(v1);
    events[4].venue_id = Some(v2);
    for e in events {
        s.append_audit(e).await.unwrap();
    }
    let seqs = |list: Vec<AuditEvent>| list.iter().map(|e| e.seq).collect::<Vec<_>>();
    let all = AuditPage { before: None, limit: 100 };
    let list = |f: AuditFilter, p: AuditPage| {
        let s = s.clone();
        async move { seqs(s.audit_events(&f, p).await.unwrap()) }
    };
    assert_eq!(list(AuditFilter::default(), all).await, vec![5, 4, 3, 2, 1]);
    let by_actor = AuditFilter { actor_id: Some("alice".into()), ..AuditFilter::default() };
    assert_eq!(list(by_actor, all).await, vec![3, 1]);
    let by_action = AuditFilter { action: Some("booking.hold".into()), ..AuditFilter::default() };
    assert_eq!(list(by_action, all).await, vec![4, 3]);
    let failures = AuditFilter { outcome: Some(Outcome::Failure), ..AuditFilter::default() };
    assert_eq!(list(failures, all).await, vec![4, 2]);
    let by_target = AuditFilter { target_id: Some("b-1".into()), ..AuditFilter::default() };
    assert_eq!(list(by_target, all).await, vec![3]);
    let window = AuditFilter { from: Some(at(10)), to: Some(at(40)), ..AuditFilter::default() };
    assert_eq!(list(window, all).await, vec![4, 3, 2], "from inclusive, to exclusive");
    let venue = AuditFilter { venue_ids: Some(vec![v1]), ..AuditFilter::default() };
    assert_eq!(list(venue, all).await, vec![4, 3]);
    let both = AuditFilter { venue_ids: Some(vec![v1, v2]), ..AuditFilter::default() };
    assert_eq!(list(both, all).await, vec![5, 4, 3]);
    let none = AuditFilter { venue_ids: Some(vec![]), ..AuditFilter::default() };
    assert_eq!(list(none, all).await, Vec::<u64>::new(), "a manager of no venue sees nothing");
    let combined = AuditFilter { actor_id: Some("bob".into()), outcome: Some(Outcome::Failure), ..Default::default() };
    assert_eq!(list(combined, all).await, vec![4, 2]);
    // Pages: newest first, `before` continues where the last page ended.
    assert_eq!(list(AuditFilter::default(), AuditPage { before: None, limit: 2 }).await, vec![5, 4]);
    assert_eq!(list(AuditFilter::default(), AuditPage { before: Some(4), limit: 2 }).await, vec![3, 2]);
    assert_eq!(list(AuditFilter::default(), AuditPage { before: Some(2), limit: 2 }).await, vec![1]);
}

pub async fn an_attempt_is_recorded_in_the_transaction_of_its_change_or_on_its_own(b: &Backend) {
    let w = World::new(b).await;
    let seat = w.resource(1).await;
    let morning = span(HOUR, 2 * HOUR);

    // A kept write records the scope's event in its own transaction, at the batch clock.
    let scope = AuditScope::new(event("booking.hold", "alice", 0));
    let held = scope.clone().run(w.store.hold(w.command(&[(seat.id, morning, 1)], at(5), 600))).await.unwrap();
    assert!(scope.finish(true, None, at(6)).is_none(), "already recorded with the hold");
    let recorded = w.store.audit_range(0, 10).await.unwrap();
    assert_eq!(recorded.len(), 1);
    assert_eq!(
        (recorded[0].action.as_str(), recorded[0].outcome, recorded[0].at),
        ("booking.hold", Outcome::Success, at(5))
    );
    assert_eq!(b.count("bookings", &format!("id = '{}'", held.id)).await, 1);

    // A refused hold changes nothing but records the failed attempt in the transaction that
    // refused it, with the code it is answered with: the answer waits for no second one.
    let refused_scope = AuditScope::new(event("booking.hold", "bob", 7));
    let refused = refused_scope.clone().run(w.store.hold(w.command(&[(seat.id, morning, 1)], at(7), 600))).await;
    assert!(matches!(refused, Err(HoldRefused::Unavailable { .. })), "{refused:?}");
    let recorded = w.store.audit_range(0, 10).await.unwrap();
    assert_eq!(recorded.len(), 2);
    assert_eq!(
        (recorded[1].outcome, recorded[1].reason.as_deref(), recorded[1].at),
        (Outcome::Failure, Some("unavailable"), at(7))
    );
    assert!(refused_scope.finish(false, Some("unavailable"), at(8)).is_none(), "already recorded");
    assert_eq!(b.count("bookings", "true").await, 1, "the refusal wrote no booking");

    // Two writes of one request: one event.
    let twice = AuditScope::new(event("booking.hold", "carol", 9));
    let other = w.resource(1).await;
    twice
        .clone()
        .run(async {
            w.store.hold(w.command(&[(other.id, morning, 1)], at(9), 600)).await.unwrap();
            w.store.hold(w.command(&[(other.id, span(3 * HOUR, 4 * HOUR), 1)], at(9), 600)).await.unwrap();
        })
        .await;
    let all = w.store.audit_range(0, 10).await.unwrap();
    let summary: Vec<(Option<&str>, Outcome, Option<&str>)> =
        all.iter().map(|e| (e.actor_id.as_deref(), e.outcome, e.reason.as_deref())).collect();
    assert_eq!(
        summary,
        vec![
            (Some("alice"), Outcome::Success, None),
            (Some("bob"), Outcome::Failure, Some("unavailable")),
            (Some("carol"), Outcome::Success, None),
        ]
    );
    assert_eq!(verdict(b).await, Verdict::Intact { events: 3 });
}

pub async fn concurrent_appends_form_one_chain(b: &Backend) {
    let w = World::new(b).await;
    let seat = w.resource(1).await;
    let mut tasks = Vec::new();
    for i in 0..40_i64 {
        let store = w.store.clone();
        let command = w.command(&[(seat.id, span(HOUR, 2 * HOUR), 1)], at(1), 600);
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                store.append_audit(event("auth.login", "anyone", i)).await.unwrap();
                return;
            }
            // Contended holds: one wins (recorded with its change), the others record refusals.
            let scope = AuditScope::new(event("booking.hold", &format!("c{i}"), i));
            let outcome = scope.clone().run(store.hold(command)).await;
            if let Some(e) = scope.finish(outcome.is_ok(), Some("unavailable"), at(2)) {
                store.append_audit(e).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(verdict(b).await, Verdict::Intact { events: 40 });
    let holds = AuditFilter { action: Some("booking.hold".into()), ..AuditFilter::default() };
    let events = b.store().audit_events(&holds, AuditPage { before: None, limit: 100 }).await.unwrap();
    assert_eq!(events.len(), 20);
    assert_eq!(events.iter().filter(|e| e.outcome == Outcome::Success).count(), 1, "one seat, one winner");
}

/// Hundreds of appends queued at once: the writer takes them in large batches, which SQLite
/// writes as INSERTs of 64, 8 and 1 rows; every event lands once, in its place in the chain.
pub async fn a_burst_of_appends_lands_whole_in_one_chain(b: &Backend) {
    const EVENTS: i64 = 300;
    let store = b.store();
    let tasks: Vec<_> = (0..EVENTS)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.append_audit(event("auth.login", &format!("user{i}"), i)).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(verdict(b).await, Verdict::Intact { events: EVENTS as u64 });
    let mut actors = Vec::new();
    let mut before = None;
    loop {
        let page = store.audit_events(&AuditFilter::default(), AuditPage { before, limit: 100 }).await.unwrap();
        let Some(last) = page.last() else { break };
        before = Some(last.seq);
        actors.extend(page.iter().map(|e| e.actor_id.clone().unwrap_or_default()));
    }
    actors.sort();
    let mut sent: Vec<String> = (0..EVENTS).map(|i| format!("user{i}")).collect();
    sent.sort();
    assert_eq!(actors, sent, "each event stored once");
}

pub async fn events_are_append_only(b: &Backend) {
    let s = b.store();
    s.append_audit(event("auth.login", "alice", 0)).await.unwrap();
    assert!(b.raw("UPDATE audit_events SET reason = 'nothing to see' WHERE seq = 1").await.is_err());
    assert!(b.raw("DELETE FROM audit_events WHERE seq = 1").await.is_err());
    assert_eq!(verdict(b).await, Verdict::Intact { events: 1 });
}

/// Drops the append-only guard, as someone with full database access could.
async fn disable_guard(b: &Backend) {
    let sql = match b.name() {
        "sqlite" => "DROP TRIGGER audit_events_no_update; DROP TRIGGER audit_events_no_delete;",
        _ => "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
    };
    b.raw(sql).await.unwrap();
}

pub async fn an_edited_event_breaks_the_chain_there(b: &Backend) {
    let s = b.store();
    for i in 0..4 {
        s.append_audit(failed(event("auth.login", "mallory", i), "unauthenticated")).await.unwrap();
    }
    disable_guard(b).await;
    b.raw("UPDATE audit_events SET outcome = 'success', reason = NULL WHERE seq = 3").await.unwrap();
    let id = s.audit_range(2, 1).await.unwrap()[0].id.clone();
    match verdict(b).await {
        Verdict::Broken { seq: 3, id: Some(found), .. } => assert_eq!(found, id),
        other => panic!("expected the chain broken at event 3, got {other:?}"),
    }
}

pub async fn removed_events_break_the_chain(b: &Backend) {
    let s = b.store();
    for i in 0..5 {
        s.append_audit(event("auth.login", "alice", i)).await.unwrap();
    }
    disable_guard(b).await;
    // The last event: only the recorded head still knows it existed.
    b.raw("DELETE FROM audit_events WHERE seq = 5").await.unwrap();
    assert!(matches!(verdict(b).await, Verdict::Broken { seq: 5, id: None, .. }), "{:?}", verdict(b).await);
    // One in the middle.
    b.raw("DELETE FROM audit_events WHERE seq = 2").await.unwrap();
    assert!(matches!(verdict(b).await, Verdict::Broken { seq: 3, .. }), "{:?}", verdict(b).await);
}

const FORGED: &str = "INSERT INTO audit_events (seq, id, at, actor_role, action, outcome, details, prev_hash, hash)
     VALUES ({seq}, 'forged-{seq}', 0, 'admin', 'user.role_grant', 'success', '{}', 'x', 'y')";

pub async fn rows_outside_the_chain_break_it(b: &Backend) {
    let s = b.store();
    for i in 0..2 {
        s.append_audit(event("auth.login", "alice", i)).await.unwrap();
    }
    // Beyond the head: appended without moving it.
    b.raw(&FORGED.replace("{seq}", "3")).await.unwrap();
    assert!(matches!(verdict(b).await, Verdict::Broken { seq: 3, .. }), "{:?}", verdict(b).await);
    // Before the first event: no valid hash needed to be listed, so verify must see it too.
    b.raw(&FORGED.replace("{seq}", "0")).await.unwrap();
    assert!(matches!(verdict(b).await, Verdict::Broken { seq: 0, .. }), "{:?}", verdict(b).await);
    b.raw(&FORGED.replace("{seq}", "-1")).await.unwrap();
    assert!(matches!(verdict(b).await, Verdict::Broken { .. }), "{:?}", verdict(b).await);
}

pub async fn verifying_a_live_chain_is_not_fooled_by_appends(b: &Backend) {
    let s = b.store();
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                s.append_audit(event("auth.login", "busy", i)).await.unwrap();
            }
        })
    };
    let mut verdicts = Vec::new();
    while !writer.is_finished() {
        verdicts.push(verdict(b).await);
    }
    writer.await.unwrap();
    assert!(verdicts.iter().all(|v| matches!(v, Verdict::Intact { .. })), "{verdicts:?}");
    assert_eq!(verdict(b).await, Verdict::Intact { events: 300 });
}
