//! Holds: claims and booking inserted together, capacity decided in the transaction (I1),
//! all items or none (I3), stale resources refused.

use allot_app::store::HoldRefused;
use allot_core::booking::BookingStatus;
use allot_core::capacity::{Claim, Span};
use allot_core::inventory::{CapacityOverride, local_midnight};
use allot_core::schedule::add_days;

use crate::{Backend, HOUR, MINUTE, World, at, everything, peak, span};

#[track_caller]
fn assert_unavailable(result: Result<allot_core::booking::Booking, HoldRefused>, item: usize, left: u32) {
    match result {
        Err(HoldRefused::Unavailable { item_index, remaining }) => {
            assert_eq!((item_index, remaining), (item, left), "Unavailable {{ item_index, remaining }}")
        }
        other => panic!("expected Unavailable {{ item_index: {item}, remaining: {left} }}, got {other:?}"),
    }
}

pub async fn hold_inserts_claims_booking_and_outbox(b: &Backend) {
    let w = World::new(b).await;
    let (r, other) = (w.resource(2).await, w.resource(5).await);
    let command = w.command(&[(r.id, span(HOUR, 2 * HOUR), 2), (other.id, span(3 * HOUR, 5 * HOUR), 3)], at(0), 600);
    let sent = command.booking.clone();
    let booking = w.store.hold(command).await.unwrap();

    assert_eq!(booking.id, sent.id);
    assert_eq!(booking.status, BookingStatus::Held);
    assert_eq!(booking.expires_at, Some(at(600)));
    assert_eq!(booking.created_at, at(0));
    assert_eq!(booking.items, sent.items);
    assert_eq!(w.store.booking(booking.id).await.unwrap().as_ref(), Some(&booking), "stored as returned");

    let id = booking.id;
    assert_eq!(b.count("bookings", &format!("id = '{id}' AND status = 'held'")).await, 1);
    assert_eq!(b.count("claims", &format!("booking_id = '{id}'")).await, 2);
    assert_eq!(b.count("claims", &format!("booking_id = '{id}' AND hold_expires_at IS NOT NULL")).await, 2);
    assert_eq!(b.count("outbox", &format!("topic = 'booking.held' AND aggregate_id = '{id}'")).await, 1);
    assert_eq!(b.count("outbox", "1=1").await, 1, "one event per hold");

    assert_eq!(
        w.store.claims(r.id, everything(), at(1)).await.unwrap(),
        vec![Claim { span: span(HOUR, 2 * HOUR), quantity: 2 }]
    );
    assert_eq!(
        w.store.claims(other.id, everything(), at(1)).await.unwrap(),
        vec![Claim { span: span(3 * HOUR, 5 * HOUR), quantity: 3 }]
    );
    assert!(w.store.claims(w.resource(1).await.id, everything(), at(1)).await.unwrap().is_empty());
}

pub async fn overlapping_hold_on_capacity_one_is_unavailable(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    assert_unavailable(w.hold(&[(r.id, span(HOUR + 30 * MINUTE, 3 * HOUR), 1)], at(1), 600).await, 0, 0);
    assert_unavailable(w.hold(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(2), 600).await, 0, 0);
    assert_unavailable(w.hold(&[(r.id, span(0, 4 * HOUR), 1)], at(3), 600).await, 0, 0);
    assert_unavailable(w.hold(&[(r.id, span(2 * HOUR - 1, 2 * HOUR), 1)], at(4), 600).await, 0, 0);
    // Touching on either side is free.
    w.held(&[(r.id, span(2 * HOUR, 3 * HOUR), 1)], at(5), 600).await;
    w.held(&[(r.id, span(0, HOUR), 1)], at(6), 600).await;
    assert_eq!(b.count("bookings", "1=1").await, 3, "refused holds leave no booking");
    assert_eq!(b.count("claims", "1=1").await, 3);
    assert_eq!(b.count("outbox", "1=1").await, 3, "refused holds leave no event");
    let claims = w.store.claims(r.id, everything(), at(7)).await.unwrap();
    assert_eq!(claims.len(), 3);
    assert_eq!(peak(&claims), 1);
}

pub async fn multi_item_hold_is_all_or_nothing(b: &Backend) {
    let w = World::new(b).await;
    let (a, bb, c) = (w.resource(1).await, w.resource(1).await, w.resource(2).await);
    w.held(&[(bb.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    let attempt = [(a.id, span(HOUR, 2 * HOUR), 1), (c.id, span(HOUR, 2 * HOUR), 1), (bb.id, span(HOUR, 2 * HOUR), 1)];
    assert_unavailable(w.hold(&attempt, at(1), 600).await, 2, 0);
    assert!(w.store.claims(a.id, everything(), at(1)).await.unwrap().is_empty(), "I3: item 0 not claimed");
    assert!(w.store.claims(c.id, everything(), at(1)).await.unwrap().is_empty(), "I3: item 1 not claimed");
    assert_eq!(b.count("bookings", "1=1").await, 1);
    assert_eq!(b.count("claims", "1=1").await, 1);
    assert_eq!(b.count("outbox", "1=1").await, 1);
    // Without the unavailable item it goes through, every item claimed.
    let booking = w.held(&attempt[..2], at(2), 600).await;
    assert_eq!(b.count("claims", &format!("booking_id = '{}'", booking.id)).await, 2);
    assert_eq!(w.claimed(a.id, at(2)).await, 1);
    assert_eq!(w.claimed(c.id, at(2)).await, 1);
}

pub async fn items_of_one_hold_count_against_each_other(b: &Backend) {
    let w = World::new(b).await;
    let (a, c) = (w.resource(1).await, w.resource(3).await);
    assert_unavailable(
        w.hold(&[(a.id, span(HOUR, 2 * HOUR), 1), (a.id, span(HOUR + 30 * MINUTE, 3 * HOUR), 1)], at(0), 600).await,
        1,
        0,
    );
    assert_unavailable(w.hold(&[(c.id, span(0, HOUR), 2), (c.id, span(0, HOUR), 2)], at(1), 600).await, 1, 1);
    assert_eq!(b.count("claims", "1=1").await, 0);
    assert_eq!(b.count("bookings", "1=1").await, 0);
    // Consecutive items on one resource do not overlap.
    w.held(&[(a.id, span(HOUR, 2 * HOUR), 1), (a.id, span(2 * HOUR, 3 * HOUR), 1)], at(2), 600).await;
    w.held(&[(c.id, span(0, HOUR), 2), (c.id, span(0, HOUR), 1)], at(3), 600).await;
    assert_eq!(peak(&w.store.claims(c.id, everything(), at(3)).await.unwrap()), 3);
}

/// A hold decided at a later time than its request's (the decision clock never goes back, and
/// on PostgreSQL follows the latest clock any node used on the resource) still gets its whole
/// time to live: it does not start lapsed, so its claim counts and the same unit cannot be
/// held again (I1, I2).
pub async fn a_hold_decided_late_keeps_its_whole_time_to_live(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    w.held(&[(r.id, span(3 * HOUR, 4 * HOUR), 1)], at(1_200), 600).await;
    let first = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    assert!(first.created_at >= at(1_200), "decided on the resource's clock: {first:?}");
    let expires_at = first.expires_at.expect("a hold expires");
    assert_eq!(expires_at.as_second(), first.created_at.as_second() + 600, "{first:?}");
    assert_unavailable(w.hold(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(1), 600).await, 0, 0);
}

/// A store may keep resources between holds; every change to one (or its venue) applies to
/// the very next hold.
pub async fn holds_see_catalogue_changes_at_once(b: &Backend) {
    let w = World::new(b).await;
    let mut r = w.resource(1).await;
    w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    assert_unavailable(w.hold(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(1), 600).await, 0, 0);
    r.capacity = 2;
    w.replace_resource(&r).await;
    w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(2), 600).await;
    r.capacity = 1;
    w.replace_resource(&r).await;
    assert_unavailable(w.hold(&[(r.id, span(3 * HOUR, 4 * HOUR), 2)], at(3), 600).await, 0, 1);

    let gone = w.resource(1).await;
    w.held(&[(gone.id, span(HOUR, 2 * HOUR), 1)], at(4), 600).await;
    w.store.delete_resource(gone.id, at(3 * HOUR)).await.unwrap();
    match w.hold(&[(gone.id, span(4 * HOUR, 5 * HOUR), 1)], at(3 * HOUR + 1), 600).await {
        Err(HoldRefused::Stale { item_index: 0 }) => {}
        other => panic!("hold on a resource deleted after an earlier hold: expected Stale, got {other:?}"),
    }
    let other = w.resource(3).await;
    w.held(&[(other.id, span(4 * HOUR, 5 * HOUR), 1)], at(3 * HOUR + 2), 600).await;
    w.store.delete_venue(w.venue.id, at(6 * HOUR)).await.unwrap();
    match w.hold(&[(other.id, span(7 * HOUR, 8 * HOUR), 1)], at(6 * HOUR + 1), 600).await {
        Err(HoldRefused::Stale { item_index: 0 }) => {}
        other => panic!("hold at a deleted venue: expected Stale, got {other:?}"),
    }
}

pub async fn hold_on_deleted_or_foreign_resource_is_stale(b: &Backend) {
    let w = World::new(b).await;
    let (live, gone) = (w.resource(1).await, w.resource(1).await);
    w.store.delete_resource(gone.id, at(0)).await.unwrap();
    match w.hold(&[(live.id, span(HOUR, 2 * HOUR), 1), (gone.id, span(HOUR, 2 * HOUR), 1)], at(1), 600).await {
        Err(HoldRefused::Stale { item_index: 1 }) => {}
        other => panic!("hold on a deleted resource: expected Stale {{ item_index: 1 }}, got {other:?}"),
    }
    match w.hold(&[(allot_core::ids::ResourceId::new(), span(HOUR, 2 * HOUR), 1)], at(2), 600).await {
        Err(HoldRefused::Stale { item_index: 0 }) => {}
        other => panic!("hold on an unknown resource: expected Stale {{ item_index: 0 }}, got {other:?}"),
    }
    // A resource of another venue than the booking's.
    let elsewhere = World::new(b).await;
    let foreign = elsewhere.resource(1).await;
    match w.hold(&[(live.id, span(HOUR, 2 * HOUR), 1), (foreign.id, span(HOUR, 2 * HOUR), 1)], at(3), 600).await {
        Err(HoldRefused::Stale { item_index: 1 }) => {}
        other => panic!("hold on another venue's resource: expected Stale {{ item_index: 1 }}, got {other:?}"),
    }
    assert_eq!(b.count("claims", "1=1").await, 0, "a stale hold claims nothing");
    assert_eq!(b.count("bookings", "1=1").await, 0);
    assert_eq!(b.count("outbox", "1=1").await, 0);
    w.held(&[(live.id, span(HOUR, 2 * HOUR), 1)], at(4), 600).await;
}

pub async fn capacity_n_takes_exactly_n_in_quantity(b: &Backend) {
    let w = World::new(b).await;
    let mut r = w.resource(5).await;
    let s = span(HOUR, 2 * HOUR);
    w.held(&[(r.id, s, 3)], at(0), 600).await;
    assert_unavailable(w.hold(&[(r.id, s, 3)], at(1), 600).await, 0, 2);
    w.held(&[(r.id, s, 2)], at(2), 600).await;
    assert_unavailable(w.hold(&[(r.id, s, 1)], at(3), 600).await, 0, 0);
    assert_eq!(w.claimed(r.id, at(3)).await, 5);
    // The capacity read inside the transaction is the current one.
    r.capacity = 6;
    w.replace_resource(&r).await;
    w.held(&[(r.id, s, 1)], at(4), 600).await;
    assert_unavailable(w.hold(&[(r.id, s, 1)], at(5), 600).await, 0, 0);
    // Lowering the capacity evicts nobody but admits nothing more.
    r.capacity = 3;
    w.replace_resource(&r).await;
    assert_unavailable(w.hold(&[(r.id, span(HOUR + 10 * MINUTE, HOUR + 20 * MINUTE), 1)], at(6), 600).await, 0, 0);
    assert_eq!(w.claimed(r.id, at(6)).await, 6);
    // Outside the busy span the (new) capacity is all there.
    w.held(&[(r.id, span(2 * HOUR, 3 * HOUR), 3)], at(7), 600).await;
    assert_unavailable(w.hold(&[(r.id, span(2 * HOUR, 3 * HOUR), 1)], at(8), 600).await, 0, 0);
}

pub async fn adjacent_spans_do_not_conflict_buffers_do(b: &Backend) {
    let w = World::new(b).await;
    let mut r = crate::free_resource(w.venue.id, 1);
    r.rules.buffer_before_minutes = 10;
    r.rules.buffer_after_minutes = 15;
    w.store.insert_resource(&r).await.unwrap();
    let blocked = |start: i64, end: i64| r.blocked_span(at(start), at(end));
    assert_eq!(blocked(10 * HOUR, 11 * HOUR), span(10 * HOUR - 10 * MINUTE, 11 * HOUR + 15 * MINUTE));

    w.held(&[(r.id, blocked(10 * HOUR, 11 * HOUR), 1)], at(0), 600).await;
    // Back to back without room for both buffers: refused on either side.
    assert_unavailable(w.hold(&[(r.id, blocked(11 * HOUR, 12 * HOUR), 1)], at(1), 600).await, 0, 0);
    assert_unavailable(w.hold(&[(r.id, blocked(9 * HOUR, 10 * HOUR), 1)], at(2), 600).await, 0, 0);
    // Buffers touching buffers is fine: half-open spans.
    w.held(&[(r.id, blocked(11 * HOUR + 25 * MINUTE, 12 * HOUR), 1)], at(3), 600).await;
    w.held(&[(r.id, blocked(8 * HOUR, 9 * HOUR + 35 * MINUTE), 1)], at(4), 600).await;
    let claims = w.store.claims(r.id, everything(), at(5)).await.unwrap();
    assert_eq!(claims.len(), 3);
    assert_eq!(peak(&claims), 1);
    assert!(claims.contains(&Claim { span: blocked(10 * HOUR, 11 * HOUR), quantity: 1 }), "claims keep the buffers");

    // Without buffers, one second apart or touching.
    let plain = w.resource(1).await;
    w.held(&[(plain.id, span(0, 100), 1)], at(6), 600).await;
    w.held(&[(plain.id, span(100, 200), 1)], at(7), 600).await;
    assert_unavailable(w.hold(&[(plain.id, span(99, 101), 1)], at(8), 600).await, 0, 0);
    w.held(&[(plain.id, span(-50, 0), 1)], at(9), 600).await;
}

pub async fn overbooking_and_capacity_overrides_in_the_venue_zone(b: &Backend) {
    let w = World::in_zone(b, "Europe/Berlin").await;
    let tz = w.venue.tz();

    let mut hotel = crate::free_resource(w.venue.id, 5);
    hotel.rules.overbooking_percent = 20;
    w.store.insert_resource(&hotel).await.unwrap();
    for i in 0..6 {
        w.held(&[(hotel.id, span(HOUR, 2 * HOUR), 1)], at(i), 600).await;
    }
    assert_unavailable(w.hold(&[(hotel.id, span(HOUR, 2 * HOUR), 1)], at(6), 600).await, 0, 0);

    // Local dates of the venue: closed all of day+1, four units on day+2.
    let today = at(0).to_zoned(tz.clone()).date();
    let (d1, d2, d3) = (add_days(today, 1), add_days(today, 2), add_days(today, 3));
    let mut room = crate::free_resource(w.venue.id, 2);
    room.rules.capacity_overrides =
        vec![CapacityOverride { from: d1, to: d2, capacity: 0 }, CapacityOverride { from: d2, to: d3, capacity: 4 }];
    w.store.insert_resource(&room).await.unwrap();
    let local = |date, minutes: i64| local_midnight(date, &tz) + minutes * MINUTE;
    let s = |from: i64, to: i64| Span::new(from, to);

    // Half past midnight local on the closed day: in UTC that is still the day before, so a
    // store that ignored the venue's zone would accept it.
    assert_unavailable(w.hold(&[(room.id, s(local(d1, 30), local(d1, 60)), 1)], at(10), 600).await, 0, 0);
    assert_unavailable(w.hold(&[(room.id, s(local(d1, 600), local(d1, 660)), 1)], at(11), 600).await, 0, 0);
    // Spanning into the closed day fails at its midnight.
    assert_unavailable(w.hold(&[(room.id, s(local(today, 23 * 60), local(d1, 60)), 1)], at(12), 600).await, 0, 0);
    // The day before is normal: two units, then none.
    w.held(&[(room.id, s(local(today, 22 * 60), local(d1, 0)), 2)], at(13), 600).await;
    assert_unavailable(w.hold(&[(room.id, s(local(today, 22 * 60), local(d1, 0)), 1)], at(14), 600).await, 0, 0);
    // Day+2 has four.
    w.held(&[(room.id, s(local(d2, 600), local(d2, 660)), 4)], at(15), 600).await;
    assert_unavailable(w.hold(&[(room.id, s(local(d2, 630), local(d2, 640)), 1)], at(16), 600).await, 0, 0);
}

pub async fn capacity_changes_between_one_and_more(b: &Backend) {
    // Capacity one and capacity above one may be guarded differently (PostgreSQL adds an
    // exclusion constraint for the former): claims made under either must count under both.
    let w = World::new(b).await;
    let mut r = w.resource(1).await;
    let s = span(HOUR, 2 * HOUR);
    let a = w.held(&[(r.id, s, 1)], at(0), 600).await;
    w.confirm(a.id, at(1)).await;
    r.capacity = 2;
    w.replace_resource(&r).await;
    let bb = w.held(&[(r.id, s, 1)], at(2), 600).await;
    assert_unavailable(w.hold(&[(r.id, s, 1)], at(3), 600).await, 0, 0);
    r.capacity = 1;
    w.replace_resource(&r).await;
    w.held(&[(r.id, span(3 * HOUR, 4 * HOUR), 1)], at(4), 600).await;
    assert_unavailable(w.hold(&[(r.id, s, 1)], at(5), 600).await, 0, 0);
    w.cancel(a.id, at(6)).await;
    assert_unavailable(w.hold(&[(r.id, s, 1)], at(7), 600).await, 0, 0);
    w.cancel(bb.id, at(8)).await;
    let e = w.held(&[(r.id, s, 1)], at(9), 600).await;
    r.capacity = 2;
    w.replace_resource(&r).await;
    w.held(&[(r.id, s, 1)], at(10), 600).await;
    assert_unavailable(w.hold(&[(r.id, s, 1)], at(11), 600).await, 0, 0);
    assert_eq!(peak(&w.store.claims(r.id, s, at(11)).await.unwrap()), 2);
    w.cancel(e.id, at(12)).await;

    // A lapsed capacity-one hold, then more capacity, then back to one.
    let x = w.held(&[(r.id, span(5 * HOUR, 6 * HOUR), 1)], at(12), 60).await; // capacity 2 now
    r.capacity = 1;
    w.replace_resource(&r).await;
    let x1 = w.held(&[(r.id, span(7 * HOUR, 8 * HOUR), 1)], at(13), 60).await; // capacity 1
    r.capacity = 2;
    w.replace_resource(&r).await;
    let y = w.held(&[(r.id, span(7 * HOUR, 8 * HOUR), 2)], at(73), 600).await; // x1 lapsed at 73
    r.capacity = 1;
    w.replace_resource(&r).await;
    assert_unavailable(w.hold(&[(r.id, span(7 * HOUR, 8 * HOUR), 1)], at(74), 600).await, 0, 0);
    w.cancel(y.id, at(75)).await;
    w.held(&[(r.id, span(7 * HOUR, 8 * HOUR), 1)], at(76), 600).await;
    w.held(&[(r.id, span(5 * HOUR, 6 * HOUR), 1)], at(77), 600).await; // x lapsed at 72
    for lapsed in [x.id, x1.id] {
        match w.store.booking(lapsed).await.unwrap().unwrap().status {
            BookingStatus::Held => assert_eq!(b.count("outbox", &format!("aggregate_id = '{lapsed}'")).await, 1),
            BookingStatus::Expired => {
                assert_eq!(
                    b.count("outbox", &format!("aggregate_id = '{lapsed}' AND topic = 'booking.expired'")).await,
                    1
                )
            }
            other => panic!("a lapsed hold became {other:?}"),
        }
    }
    assert_eq!(peak(&w.store.claims(r.id, everything(), at(78)).await.unwrap()), 1);

    // Overbooking lifts capacity one above one.
    let mut double = crate::free_resource(w.venue.id, 1);
    double.rules.overbooking_percent = 100;
    w.store.insert_resource(&double).await.unwrap();
    w.held(&[(double.id, s, 1)], at(79), 600).await;
    w.held(&[(double.id, s, 1)], at(80), 600).await;
    assert_unavailable(w.hold(&[(double.id, s, 1)], at(81), 600).await, 0, 0);
}
