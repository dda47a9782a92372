//! Capacity reads: seat maps of events and the claims listing.

use std::collections::HashMap;

use allot_app::store::{SeatState, SeatStates};
use allot_core::capacity::Claim;
use allot_core::ids::ResourceId;
use allot_core::inventory::Resource;

use crate::{Backend, HOUR, MINUTE, World, at, event, seat, span};

pub async fn seat_states_held_vs_booked(b: &Backend) {
    let w = World::new(b).await;
    let seats: Vec<Resource> = (1..=5).map(|i| seat(w.venue.id, &format!("A{i}"))).collect();
    for s in &seats {
        w.store.insert_resource(s).await.unwrap();
    }
    let id = |i: usize| seats[i].id;
    let e = event(w.venue.id, 10 * HOUR, 12 * HOUR, &[id(0), id(1), id(2), id(3)]);
    w.store.insert_event(&e).await.unwrap();
    let window = span(10 * HOUR, 12 * HOUR);
    assert_eq!(w.store.seat_states(&e, at(0)).await.unwrap(), SeatStates::default(), "a fresh event is all free");

    w.held(&[(id(0), window, 1)], at(0), 600).await;
    let booked = w.held(&[(id(1), window, 1)], at(0), 600).await;
    w.confirm(booked.id, at(1)).await;
    let gone = w.held(&[(id(2), window, 1)], at(1), 600).await;
    w.cancel(gone.id, at(2)).await;
    w.held(&[(id(3), window, 1)], at(2), 60).await;
    w.held(&[(id(4), window, 1)], at(2), 600).await; // not a seat of this event

    let want = HashMap::from([(id(0), SeatState::Held), (id(1), SeatState::Booked), (id(3), SeatState::Held)]);
    let read = w.store.seat_states(&e, at(30)).await.unwrap();
    assert_eq!(read.states, want);
    assert_eq!(read.until, Some(at(62)), "seat 3's hold is the first to lapse");
    // Seat 3's hold expired: free again, before any sweep.
    let want = HashMap::from([(id(0), SeatState::Held), (id(1), SeatState::Booked)]);
    let read = w.store.seat_states(&e, at(62)).await.unwrap();
    assert_eq!(read.states, want);
    assert_eq!(read.until, Some(at(600)));

    // Claims outside the window do not show; partly overlapping ones do.
    let later = w.held(&[(id(3), span(12 * HOUR, 13 * HOUR), 1)], at(62), 600).await;
    w.confirm(later.id, at(63)).await;
    w.held(&[(id(2), span(11 * HOUR + 30 * MINUTE, 12 * HOUR + 30 * MINUTE), 1)], at(63), 600).await;
    let want = HashMap::from([(id(0), SeatState::Held), (id(1), SeatState::Booked), (id(2), SeatState::Held)]);
    assert_eq!(w.store.seat_states(&e, at(64)).await.unwrap().states, want);
    // The expiry sweep does not change what a read at the same instant sees.
    w.store.expire_due(at(64), 100).await.unwrap();
    assert_eq!(w.store.seat_states(&e, at(64)).await.unwrap().states, want);

    // A large event: the seat list is not a per-query limit.
    let many: Vec<Resource> = (0..1200).map(|i| seat(w.venue.id, &format!("M{i}"))).collect();
    // Inserted concurrently so the writes share transactions.
    futures::future::try_join_all(many.iter().map(|s| w.store.insert_resource(s))).await.unwrap();
    let ids: Vec<ResourceId> = many.iter().map(|s| s.id).collect();
    let big = event(w.venue.id, 20 * HOUR, 22 * HOUR, &ids);
    w.store.insert_event(&big).await.unwrap();
    let last = w.held(&[(ids[1100], span(20 * HOUR, 22 * HOUR), 1)], at(65), 600).await;
    w.held(&[(ids[3], span(20 * HOUR, 22 * HOUR), 1)], at(65), 600).await;
    w.confirm(last.id, at(66)).await;
    let want = HashMap::from([(ids[3], SeatState::Held), (ids[1100], SeatState::Booked)]);
    assert_eq!(w.store.seat_states(&big, at(66)).await.unwrap().states, want);
}

/// Where a store versions seats, every committed write that changes what a seat's claims
/// count moves the version of any set holding it, and nothing else does.
pub async fn seat_versions_move_with_each_committed_write(b: &Backend) {
    let w = World::new(b).await;
    let seats: Vec<Resource> = (1..=3).map(|i| seat(w.venue.id, &format!("V{i}"))).collect();
    for s in &seats {
        w.store.insert_resource(s).await.unwrap();
    }
    let (all, third) = ([seats[0].id, seats[1].id], [seats[2].id]);
    let Some(before) = w.store.seat_version(&all) else { return }; // this store keeps no versions
    let window = span(10 * HOUR, 12 * HOUR);
    let other = w.store.seat_version(&third);
    assert_eq!(w.store.seat_version(&all), Some(before), "nothing written");

    let held = w.held(&[(seats[0].id, window, 1)], at(0), 60).await;
    let after_hold = w.store.seat_version(&all);
    assert_ne!(after_hold, Some(before), "a hold");
    assert_eq!(w.store.seat_version(&third), other, "a seat not held");
    w.confirm(held.id, at(1)).await;
    let after_confirm = w.store.seat_version(&all);
    assert_ne!(after_confirm, after_hold, "a confirm");
    w.held(&[(seats[1].id, window, 1)], at(2), 60).await;
    let after_second = w.store.seat_version(&all);
    assert_eq!(w.store.expire_due(at(62), 100).await.unwrap().len(), 1);
    // The lapsed hold stopped counting at its expiry; releasing it later changes nothing a
    // read at any time shows, and a seat map that showed it was kept only until that expiry.
    assert_eq!(w.store.seat_version(&all), after_second, "an expiry moves no version");
    let mut renamed = seats[2].clone();
    renamed.name = "V3b".into();
    w.replace_resource(&renamed).await;
    assert_ne!(w.store.seat_version(&third), other, "a catalogue change");
}

fn sorted(mut claims: Vec<Claim>) -> Vec<(i64, i64, u32)> {
    claims.sort_by_key(|c| (c.span, c.quantity));
    claims.into_iter().map(|c| (c.span.start, c.span.end, c.quantity)).collect()
}

pub async fn claims_lists_live_overlapping_claims_of_one_resource(b: &Backend) {
    let w = World::new(b).await;
    let (r, other) = (w.resource(5).await, w.resource(5).await);
    let c1 = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    w.confirm(c1.id, at(1)).await;
    w.held(&[(r.id, span(2 * HOUR, 3 * HOUR), 2)], at(1), 100).await;
    w.held(&[(r.id, span(30 * MINUTE, 4 * HOUR), 1)], at(1), 1000).await;
    w.held(&[(other.id, span(HOUR, 2 * HOUR), 4)], at(1), 1000).await;
    let (t1, t2, t3) =
        ((abs(HOUR), abs(2 * HOUR), 1), (abs(2 * HOUR), abs(3 * HOUR), 2), (abs(30 * MINUTE), abs(4 * HOUR), 1));

    let claims = |from: i64, to: i64, now: i64| {
        let store = w.store.clone();
        let id = r.id;
        async move { sorted(store.claims(id, span(from, to), at(now)).await.unwrap()) }
    };
    assert_eq!(claims(HOUR, 2 * HOUR, 10).await, vec![t3, t1], "touching at 2h is not overlapping");
    assert_eq!(claims(2 * HOUR, 2 * HOUR + 1, 10).await, vec![t3, t2]);
    assert_eq!(claims(0, 10 * HOUR, 10).await, vec![t3, t1, t2]);
    assert_eq!(claims(0, 10 * HOUR, 101).await, vec![t3, t1], "the short hold expired at 101");
    assert_eq!(claims(0, 10 * HOUR, 5000).await, vec![t1], "only the confirmed one lasts");
    assert!(claims(4 * HOUR, 10 * HOUR, 10).await.is_empty());
    assert!(claims(0, 30 * MINUTE, 10).await.is_empty());
    assert!(w.store.claims(ResourceId::new(), span(0, 10 * HOUR), at(10)).await.unwrap().is_empty());
}

fn abs(offset: i64) -> i64 {
    crate::T0 + offset
}
