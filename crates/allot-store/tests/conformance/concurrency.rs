//! Concurrent writers: no oversell (I1), each update applied once.

use allot_app::store::{HoldRefused, UpdateRefused};
use allot_core::booking::{BookingStatus, Transition};

use allot_app::store::Role;

use crate::{Backend, HOUR, MINUTE, Want, World, at, decide, everything, peak, span, user};

/// Spawns one hold per entry of `wants`, all at once; returns (accepted, unavailable).
async fn race(w: &World, wants: Vec<Vec<Want>>) -> (usize, usize) {
    let tasks: Vec<_> = wants
        .into_iter()
        .enumerate()
        .map(|(i, want)| {
            let store = w.store.clone();
            let command = w.command(&want, at(i as i64 % 3), 600);
            tokio::spawn(async move { store.hold(command).await })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(HoldRefused::Unavailable { .. }) => refused += 1,
            Err(other) => panic!("concurrent hold failed: {other:?}"),
        }
    }
    (ok, refused)
}

pub async fn fifty_concurrent_holds_on_capacity_one_one_wins(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    // Different but overlapping spans, all covering 10:30–10:45.
    let wants = (0..50).map(|i| vec![(r.id, span(10 * HOUR + (i % 5) * 6 * MINUTE, 11 * HOUR), 1)]).collect();
    assert_eq!(race(&w, wants).await, (1, 49));
    assert_eq!(b.count("bookings", "1=1").await, 1);
    assert_eq!(b.count("claims", "1=1").await, 1);
    assert_eq!(b.count("outbox", "topic = 'booking.held'").await, 1);
    assert_eq!(peak(&w.store.claims(r.id, everything(), at(3)).await.unwrap()), 1);
}

pub async fn sixty_concurrent_holds_on_capacity_seven_seven_win(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(7).await;
    let wants = (0..60).map(|_| vec![(r.id, span(HOUR, 2 * HOUR), 1)]).collect();
    assert_eq!(race(&w, wants).await, (7, 53));
    assert_eq!(b.count("bookings", "1=1").await, 7);
    assert_eq!(w.claimed(r.id, at(3)).await, 7);
    assert_eq!(peak(&w.store.claims(r.id, everything(), at(3)).await.unwrap()), 7);
}

pub async fn concurrent_multi_item_holds_in_opposite_orders(b: &Backend) {
    // Holds taking two resources in opposite orders must neither deadlock nor oversell.
    let w = World::new(b).await;
    let (x, y) = (w.resource(5).await, w.resource(5).await);
    let s = span(HOUR, 2 * HOUR);
    let wants = (0..40)
        .map(|i| if i % 2 == 0 { vec![(x.id, s, 1), (y.id, s, 1)] } else { vec![(y.id, s, 1), (x.id, s, 1)] })
        .collect();
    let result = tokio::time::timeout(std::time::Duration::from_secs(30), race(&w, wants)).await;
    assert_eq!(result.expect("no deadlock"), (5, 35));
    assert_eq!(w.claimed(x.id, at(3)).await, 5);
    assert_eq!(w.claimed(y.id, at(3)).await, 5);
    assert_eq!(b.count("claims", "1=1").await, 10);
}

pub async fn holds_kept_in_a_batch_survive_a_refused_neighbour(b: &Backend) {
    // Holds are decided together in their batch; a request queued among them that is refused
    // (a second user with one e-mail) rolls back only its own savepoint, never the holds.
    let w = World::new(b).await;
    let mut resources = Vec::new();
    for _ in 0..60 {
        resources.push(w.resource(1).await);
    }
    let (mut holds, mut twins) = (Vec::new(), Vec::new());
    for r in &resources {
        let store = w.store.clone();
        let command = w.command(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600);
        holds.push(tokio::spawn(async move { store.hold(command).await }));
        let store = w.store.clone();
        let twin = user("twin@customers.test", vec![Role::Customer]);
        twins.push(tokio::spawn(async move { store.insert_user(&twin).await }));
    }
    for t in holds {
        t.await.unwrap().unwrap();
    }
    let mut kept = 0;
    for t in twins {
        match t.await.unwrap() {
            Ok(()) => kept += 1,
            Err(allot_app::StoreError::Conflict(_)) => {}
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(kept, 1, "one user per e-mail");
    assert_eq!(b.count("bookings", "1=1").await, 60);
    assert_eq!(b.count("claims", "1=1").await, 60);
    assert_eq!(b.count("outbox", "topic = 'booking.held'").await, 60);
}

pub async fn a_hold_that_breaks_its_batch_undoes_the_batch_and_the_writer_goes_on(b: &Backend) {
    // A claim of quantity 0 trips the core's assertion inside the batch: the whole batch is
    // rolled back, each of its requests fails (none is acknowledged and then lost), and the
    // next batch works.
    let w = World::new(b).await;
    let mut resources = Vec::new();
    for _ in 0..40 {
        resources.push(w.resource(1).await);
    }
    let broken = w.command(&[(resources[0].id, span(HOUR, 2 * HOUR), 1)], at(0), 600);
    let broken = allot_app::store::HoldCommand {
        claims: vec![allot_core::capacity::Claim { quantity: 0, ..broken.claims[0] }],
        ..broken
    };
    let mut tasks = vec![tokio::spawn({
        let store = w.store.clone();
        async move { store.hold(broken).await }
    })];
    for r in &resources[1..] {
        let store = w.store.clone();
        let command = w.command(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600);
        tasks.push(tokio::spawn(async move { store.hold(command).await }));
    }
    let mut kept = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(booking) => kept.push(booking.id),
            Err(HoldRefused::Store(_)) => failed += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(failed >= 1, "the broken hold failed");
    assert_eq!(b.count("bookings", "1=1").await, kept.len() as i64, "only acknowledged holds are stored");
    assert_eq!(b.count("claims", "1=1").await, kept.len() as i64);
    for id in kept {
        assert!(w.store.booking(id).await.unwrap().is_some());
    }
    w.held(&[(resources[0].id, span(HOUR, 2 * HOUR), 1)], at(1), 600).await;
}

pub async fn concurrent_cancels_apply_once(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    let booking = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = w.store.clone();
            tokio::spawn(async move { store.update_booking(booking.id, at(1), decide(Transition::Cancel)).await })
        })
        .collect();
    let (mut ok, mut rejected) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(b) => {
                assert_eq!(b.status, BookingStatus::Cancelled);
                ok += 1;
            }
            Err(UpdateRefused::Rejected(_)) => rejected += 1,
            Err(other) => panic!("concurrent cancel failed: {other:?}"),
        }
    }
    assert_eq!((ok, rejected), (1, 19), "each decision sees the one before it");
    let id = booking.id;
    assert_eq!(b.count("outbox", &format!("aggregate_id = '{id}' AND topic = 'booking.cancelled'")).await, 1);
    assert_eq!(b.count("claims", "1=1").await, 0);
    assert_eq!(w.store.booking(id).await.unwrap().unwrap().status, BookingStatus::Cancelled);
    // The capacity is back.
    w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(2), 600).await;
}

pub async fn confirm_racing_expiry_is_decided_once(b: &Backend) {
    // Confirms stamped one second before the holds expire race sweeps stamped at the expiry:
    // each booking ends either confirmed (and never expired) or expired (and the confirm
    // refused), never both, whatever order the store applies them in.
    let w = World::new(b).await;
    let r = w.resource(100).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 100).await.id);
    }
    let mut confirms = Vec::new();
    let mut sweeps = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let store = w.store.clone();
        let id = *id;
        confirms.push(tokio::spawn(async move {
            (id, store.update_booking(id, at(99), decide(Transition::Confirm)).await)
        }));
        if i % 7 == 3 {
            let store = w.store.clone();
            sweeps.push(tokio::spawn(async move { store.expire_due(at(100), 1000).await.unwrap() }));
        }
    }
    let mut confirmed = std::collections::HashSet::new();
    for t in confirms {
        match t.await.unwrap() {
            (id, Ok(b)) => {
                assert_eq!(b.status, BookingStatus::Confirmed);
                confirmed.insert(id);
            }
            (_, Err(UpdateRefused::Rejected(_))) => {}
            (_, Err(other)) => panic!("confirm failed: {other:?}"),
        }
    }
    let mut expired = std::collections::HashSet::new();
    for t in sweeps {
        for id in t.await.unwrap() {
            assert!(expired.insert(id), "{id} expired twice");
        }
    }
    for id in w.store.expire_due(at(100), 1000).await.unwrap() {
        assert!(expired.insert(id), "{id} expired twice");
    }
    assert!(confirmed.is_disjoint(&expired), "confirmed and expired");
    assert_eq!(confirmed.len() + expired.len(), ids.len(), "every booking decided one way");
    for id in &ids {
        let status = w.store.booking(*id).await.unwrap().unwrap().status;
        let (want, topic) = if confirmed.contains(id) {
            (BookingStatus::Confirmed, "booking.confirmed")
        } else {
            (BookingStatus::Expired, "booking.expired")
        };
        assert_eq!(status, want);
        assert_eq!(b.count("outbox", &format!("aggregate_id = '{id}'")).await, 2, "held + {topic}");
        assert_eq!(b.count("outbox", &format!("aggregate_id = '{id}' AND topic = '{topic}'")).await, 1);
    }
    assert_eq!(w.claimed(r.id, at(100)).await as usize, confirmed.len());
    b.purge_released(at(100)).await;
    assert_eq!(b.count("claims", "1=1").await as usize, confirmed.len());
}
