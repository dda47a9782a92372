//! Hold expiry (I2): claims stop counting at `expires_at`, the sweep releases each hold once.

use std::collections::HashSet;

use allot_app::store::{BookingFilter, HoldRefused, PageRequest, UpdateRefused};
use allot_core::booking::{BookingStatus, Transition};
use allot_core::ids::BookingId;

use crate::{Backend, HOUR, World, at, span};

async fn expired_events(b: &Backend, id: BookingId) -> i64 {
    b.count("outbox", &format!("aggregate_id = '{id}' AND topic = 'booking.expired'")).await
}

fn set(ids: &[BookingId]) -> HashSet<BookingId> {
    ids.iter().copied().collect()
}

/// What the sweep stores is what the domain's transition makes of the hold: the booking read
/// back whole, and its `booking.expired` event carrying the same status and time.
pub async fn a_swept_hold_is_stored_and_announced_as_the_transition_makes_it(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    let hold = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 60).await;
    assert_eq!(w.store.expire_due(at(75), 100).await.unwrap(), vec![hold.id]);

    let mut want = hold.clone();
    want.status = hold.next_status(Transition::Expire, at(75)).unwrap();
    want.updated_at = at(75);
    assert_eq!(w.store.booking(hold.id).await.unwrap().unwrap(), want);
    let expired = BookingFilter { status: Some(BookingStatus::Expired), ..Default::default() };
    let listed = w.store.bookings(&expired, PageRequest { after: None, limit: 10 }).await.unwrap();
    assert_eq!(listed.items, vec![want.clone()], "listed as read");
    let updated_at = want.updated_at.to_string();
    let payload = match b.name() {
        "sqlite" => {
            format!(
                "json_extract(payload, '$.status') = 'expired' AND json_extract(payload, '$.updated_at') = '{updated_at}'"
            )
        }
        _ => format!("payload->>'status' = 'expired' AND payload->>'updated_at' = '{updated_at}'"),
    };
    let announced = format!("aggregate_id = '{}' AND topic = 'booking.expired' AND {payload}", hold.id);
    assert_eq!(b.count("outbox_events", &announced).await, 1);
    b.purge_released(at(75)).await;
    assert_eq!(b.count("claims", "1=1").await, 0, "its claim is gone once purged");
}

pub async fn expired_hold_stops_counting_before_the_sweep(b: &Backend) {
    let w = World::new(b).await;
    let s = span(HOUR, 2 * HOUR);

    // Capacity 2, taken whole by one hold.
    let r = w.resource(2).await;
    let a = w.held(&[(r.id, s, 2)], at(0), 60).await;
    assert_eq!(w.claimed(r.id, at(59)).await, 2);
    assert_eq!(w.claimed(r.id, at(60)).await, 0, "a hold stops counting at expires_at");
    match w.hold(&[(r.id, s, 1)], at(59), 60).await {
        Err(HoldRefused::Unavailable { item_index: 0, remaining: 0 }) => {}
        other => panic!("before expiry the units are taken: got {other:?}"),
    }
    let c = w.held(&[(r.id, s, 2)], at(60), 600).await;
    assert_eq!(w.store.booking(a.id).await.unwrap().unwrap().status, BookingStatus::Held, "nothing swept yet");
    assert_eq!(b.count("claims", "1=1").await, 2);

    assert_eq!(w.store.expire_due(at(60), 100).await.unwrap(), vec![a.id]);
    assert_eq!(w.store.booking(a.id).await.unwrap().unwrap().status, BookingStatus::Expired);
    b.purge_released(at(60)).await;
    assert_eq!(b.count("claims", &format!("booking_id = '{}'", a.id)).await, 0, "released, then purged");
    assert_eq!(b.count("claims", &format!("booking_id = '{}'", c.id)).await, 1);
    assert_eq!(expired_events(b, a.id).await, 1);
    assert!(matches!(w.apply(a.id, Transition::Confirm, at(61)).await, Err(UpdateRefused::Rejected(_))));
    assert_eq!(w.claimed(r.id, at(61)).await, 2);

    // Capacity 1. A store may expire the lapsed hold in the transaction that re-takes its
    // place (PostgreSQL does, for its exclusion constraint) or leave it to the sweep (SQLite);
    // either way it ends expired exactly once, with its claims gone.
    let one = w.resource(1).await;
    let d = w.held(&[(one.id, s, 1)], at(61), 60).await;
    match w.hold(&[(one.id, s, 1)], at(120), 60).await {
        Err(HoldRefused::Unavailable { item_index: 0, remaining: 0 }) => {}
        other => panic!("before expiry the unit is taken: got {other:?}"),
    }
    let e = w.held(&[(one.id, s, 1)], at(121), 60).await;
    let swept = w.store.expire_due(at(121), 100).await.unwrap();
    match w.store.booking(d.id).await.unwrap().unwrap().status {
        BookingStatus::Expired => {}
        other => panic!("a lapsed hold after the sweep: {other:?}"),
    }
    assert!(swept.iter().all(|id| *id == d.id), "only the lapsed hold is swept: {swept:?}");
    assert!(w.store.expire_due(at(121), 100).await.unwrap().is_empty());
    assert_eq!(expired_events(b, d.id).await, 1, "expired once, whoever expired it");
    b.purge_released(at(121)).await;
    assert_eq!(b.count("claims", &format!("booking_id = '{}'", d.id)).await, 0);
    assert_eq!(w.store.booking(e.id).await.unwrap().unwrap().status, BookingStatus::Held);
    assert_eq!(w.claimed(one.id, at(121)).await, 1);
    assert_eq!(b.count("outbox", "topic = 'booking.expired'").await, 2);
}

pub async fn expire_due_flips_only_due_holds_in_order_and_respects_limit(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(10).await;
    let s = span(HOUR, 2 * HOUR);
    let h10 = w.held(&[(r.id, s, 1)], at(0), 10).await;
    let h20 = w.held(&[(r.id, s, 1)], at(0), 20).await;
    let h40 = w.held(&[(r.id, s, 1)], at(0), 40).await;
    let h30 = w.held(&[(r.id, s, 1)], at(0), 30).await;
    let confirmed = w.held(&[(r.id, s, 1)], at(0), 15).await;
    let pending = w.held(&[(r.id, s, 1)], at(0), 35).await;
    let cancelled = w.held(&[(r.id, s, 1)], at(0), 5).await;
    w.confirm(confirmed.id, at(1)).await;
    w.apply(pending.id, Transition::AwaitPayment, at(1)).await.unwrap();
    w.cancel(cancelled.id, at(1)).await;

    assert!(w.store.expire_due(at(9), 100).await.unwrap().is_empty(), "nothing due yet");
    assert_eq!(w.store.expire_due(at(10), 100).await.unwrap(), vec![h10.id], "due at expires_at exactly");
    assert_eq!(set(&w.store.expire_due(at(25), 100).await.unwrap()), set(&[h20.id]));
    assert!(w.store.expire_due(at(25), 100).await.unwrap().is_empty(), "a second run finds nothing");
    // With a limit, the soonest expiries go first.
    assert_eq!(w.store.expire_due(at(100), 1).await.unwrap(), vec![h30.id]);
    assert_eq!(w.store.expire_due(at(100), 1).await.unwrap(), vec![pending.id], "pending payments expire too");
    assert_eq!(w.store.expire_due(at(100), 1).await.unwrap(), vec![h40.id]);
    assert!(w.store.expire_due(at(100), 1).await.unwrap().is_empty());

    for h in [&h10, &h20, &h30, &h40, &pending] {
        assert_eq!(w.store.booking(h.id).await.unwrap().unwrap().status, BookingStatus::Expired);
        assert_eq!(expired_events(b, h.id).await, 1);
        assert_eq!(b.count("bookings", &format!("id = '{}' AND status = 'expired'", h.id)).await, 1);
    }
    assert_eq!(w.store.booking(confirmed.id).await.unwrap().unwrap().status, BookingStatus::Confirmed);
    assert_eq!(w.store.booking(cancelled.id).await.unwrap().unwrap().status, BookingStatus::Cancelled);
    assert_eq!(b.count("outbox", "topic = 'booking.expired'").await, 5);
    b.purge_released(at(100)).await;
    assert_eq!(b.count("claims", "1=1").await, 1, "only the confirmed booking still claims");
    assert_eq!(w.claimed(r.id, at(100)).await, 1);
}

pub async fn expire_due_concurrently_releases_each_hold_once(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(100).await;
    let mut holds = Vec::new();
    for i in 0..30 {
        holds.push(w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 10 + i).await.id);
    }
    let keep = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 1000).await;
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let store = w.store.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = store.expire_due(at(100), 7).await.unwrap();
                    if batch.is_empty() {
                        return mine;
                    }
                    mine.extend(batch);
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 30, "each hold released exactly once across the sweepers");
    assert_eq!(set(&all), set(&holds));
    assert!(w.store.expire_due(at(100), 100).await.unwrap().is_empty());
    assert_eq!(b.count("outbox", "topic = 'booking.expired'").await, 30);
    for id in &holds {
        assert_eq!(expired_events(b, *id).await, 1, "one booking.expired per booking");
    }
    b.purge_released(at(100)).await;
    assert_eq!(b.count("claims", "1=1").await, 1);
    assert_eq!(w.store.booking(keep.id).await.unwrap().unwrap().status, BookingStatus::Held);
}

pub async fn pending_payment_counts_and_expires_like_a_hold(b: &Backend) {
    let w = World::new(b).await;
    // Capacity 2 taken whole: no store expires these holds before the sweep.
    let r = w.resource(2).await;
    let s = span(HOUR, 2 * HOUR);
    let p = w.held(&[(r.id, s, 2)], at(0), 100).await;
    let pending = w.apply(p.id, Transition::AwaitPayment, at(10)).await.unwrap();
    assert_eq!((pending.status, pending.expires_at), (BookingStatus::PendingPayment, Some(at(100))));
    assert_eq!(b.count("claims", &format!("booking_id = '{}' AND hold_expires_at IS NOT NULL", p.id)).await, 1);
    assert_eq!(b.count("outbox", &format!("aggregate_id = '{}' AND topic = 'booking.pending_payment'", p.id)).await, 1);
    assert!(matches!(w.hold(&[(r.id, s, 1)], at(50), 100).await, Err(HoldRefused::Unavailable { .. })));
    assert_eq!(w.store.upcoming_expiries(10).await.unwrap(), vec![(p.id, at(100))]);
    assert_eq!(w.claimed(r.id, at(100)).await, 0, "stops counting at expires_at");
    let q = w.held(&[(r.id, s, 2)], at(100), 100).await;
    assert_eq!(w.store.expire_due(at(100), 10).await.unwrap(), vec![p.id]);
    assert_eq!(w.store.booking(p.id).await.unwrap().unwrap().status, BookingStatus::Expired);

    // A pending payment that completes in time is confirmed for good.
    w.apply(q.id, Transition::AwaitPayment, at(110)).await.unwrap();
    let done = w.confirm(q.id, at(150)).await;
    assert_eq!((done.status, done.expires_at), (BookingStatus::Confirmed, None));
    assert_eq!(b.count("claims", &format!("booking_id = '{}' AND hold_expires_at IS NULL", q.id)).await, 1);
    assert_eq!(w.claimed(r.id, at(10_000)).await, 2);
}

pub async fn upcoming_expiries_are_ordered_and_only_expiring(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(10).await;
    let s = span(HOUR, 2 * HOUR);
    let mut by_ttl = std::collections::BTreeMap::new();
    for ttl in [50, 10, 30, 20, 40, 25] {
        by_ttl.insert(ttl, w.held(&[(r.id, s, 1)], at(0), ttl).await.id);
    }
    w.confirm(by_ttl[&30], at(1)).await;
    w.cancel(by_ttl[&40], at(1)).await;
    w.apply(by_ttl[&25], Transition::AwaitPayment, at(1)).await.unwrap();

    let want: Vec<(BookingId, jiff::Timestamp)> = [10, 20, 25, 50].iter().map(|t| (by_ttl[t], at(*t))).collect();
    assert_eq!(w.store.upcoming_expiries(100).await.unwrap(), want);
    assert_eq!(w.store.upcoming_expiries(2).await.unwrap(), want[..2].to_vec());
    assert_eq!(w.store.expire_due(at(15), 100).await.unwrap(), vec![by_ttl[&10]]);
    assert_eq!(w.store.upcoming_expiries(100).await.unwrap(), want[1..].to_vec());
}

/// Many lapsed holds at once: a store may release them over several calls (SQLite slices a
/// storm so holds are not kept waiting), in chunks; each is released exactly once, with its
/// claims and one event, and asking again until nothing is returned releases them all.
pub async fn a_storm_of_lapsed_holds_is_released_each_once_over_repeated_calls(b: &Backend) {
    const LAPSING: usize = 450;
    let w = World::new(b).await;
    let r = w.resource(1000).await;
    let s = span(HOUR, 2 * HOUR);
    let mut lapsing = HashSet::new();
    for i in 0..LAPSING {
        let expires_in = 10 + i64::try_from(i % 3).unwrap();
        lapsing.insert(w.held(&[(r.id, s, 1)], at(0), expires_in).await.id);
    }
    let keep = w.held(&[(r.id, s, 2)], at(0), 1000).await;
    let released = expire_until_none_left(&w, LAPSING).await;
    assert_eq!(released.len(), LAPSING, "every lapsed hold released, none twice");
    assert_eq!(set(&released), lapsing);
    assert_eq!(b.count("outbox", "topic = 'booking.expired'").await, i64::try_from(LAPSING).unwrap());
    assert_eq!(b.count("bookings", "status = 'expired'").await, i64::try_from(LAPSING).unwrap());
    b.purge_released(at(100)).await;
    assert_eq!(b.count("claims", "1=1").await, 1, "only the kept hold still claims");
    assert_eq!(w.store.booking(keep.id).await.unwrap().unwrap().status, BookingStatus::Held);
    assert_eq!(w.claimed(r.id, at(100)).await, 2);
}

/// `lapsing` holds lapse at once: the first `expire_due` releases `first_call` of them (what one
/// expiry job gets through), the calls after it the rest, each hold once.
pub async fn one_expiry_job_releases(b: &Backend, lapsing: usize, first_call: usize) {
    let w = World::new(b).await;
    let r = w.resource(u32::try_from(lapsing).unwrap() + 10).await;
    let s = span(HOUR, 2 * HOUR);
    let mut held = HashSet::new();
    for _ in 0..lapsing {
        held.insert(w.held(&[(r.id, s, 1)], at(0), 10).await.id);
    }
    let mut released = w.store.expire_due(at(100), 2000).await.unwrap();
    assert_eq!(released.len(), first_call, "released by the first expiry job");
    released.extend(expire_until_none_left(&w, lapsing).await);
    assert_eq!(released.len(), lapsing, "every lapsed hold released, none twice");
    assert_eq!(set(&released), held);
    assert_eq!(b.count("outbox", "topic = 'booking.expired'").await, i64::try_from(lapsing).unwrap());
    assert_eq!(w.claimed(r.id, at(100)).await, 0);
}

/// Calls `expire_due` at `at(100)` until it releases nothing (at most `calls_max` times, so a
/// store that keeps answering cannot hang the test): everything released, in order.
async fn expire_until_none_left(w: &World, calls_max: usize) -> Vec<BookingId> {
    let mut released = Vec::new();
    for _ in 0..calls_max {
        let batch = w.store.expire_due(at(100), 2000).await.unwrap();
        if batch.is_empty() {
            break;
        }
        released.extend(batch);
    }
    released
}
