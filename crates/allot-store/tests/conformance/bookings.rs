//! `update_booking` (decisions inside the transaction, claims kept in step, one outbox row per
//! status change, decline or refund made, a cancellation's refund queued while owed), the booking list, and the queue
//! of refunds owed.

use std::collections::BTreeSet;

use allot_app::AppError;
use allot_app::store::{
    BookingFilter, Decide, HoldRefused, REFUND_GRACE_SECONDS, RefundDue, RefundKind, UpdateRefused,
};
use allot_core::booking::{
    Booking, BookingStatus, PAYMENT_DECLINED_TOPIC, Payment, REFUND_FAILED_TOPIC, Refund, Transition,
};
use allot_core::ids::{BookingId, UserId, VenueId};

use crate::{Backend, HOUR, World, all_pages, at, span, user};

async fn outbox_of(b: &Backend, id: BookingId, topic: &str) -> i64 {
    b.count("outbox", &format!("aggregate_id = '{id}' AND topic = '{topic}'")).await
}

pub async fn confirm_keeps_claims_and_clears_hold_expiry(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    let held = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    let confirmed = w.confirm(held.id, at(10)).await;
    assert_eq!(confirmed.status, BookingStatus::Confirmed);
    assert_eq!(confirmed.expires_at, None);
    assert_eq!(confirmed.updated_at, at(10), "updated_at is the transaction's now");
    assert_eq!(confirmed.created_at, at(0));
    assert_eq!(w.store.booking(held.id).await.unwrap().as_ref(), Some(&confirmed));

    let id = held.id;
    assert_eq!(b.count("bookings", &format!("id = '{id}' AND status = 'confirmed' AND expires_at IS NULL")).await, 1);
    assert_eq!(b.count("claims", &format!("booking_id = '{id}' AND hold_expires_at IS NULL")).await, 1);
    assert_eq!(outbox_of(b, id, "booking.held").await, 1);
    assert_eq!(outbox_of(b, id, "booking.confirmed").await, 1);

    // Long past the old hold expiry the claim still counts.
    assert_eq!(w.claimed(r.id, at(5000)).await, 1);
    match w.hold(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(5000), 600).await {
        Err(HoldRefused::Unavailable { item_index: 0, remaining: 0 }) => {}
        other => panic!("a confirmed claim does not expire: got {other:?}"),
    }
    assert!(w.store.expire_due(at(6000), 100).await.unwrap().is_empty());
    assert!(w.store.upcoming_expiries(100).await.unwrap().is_empty());
    assert_eq!(w.store.booking(id).await.unwrap().unwrap().status, BookingStatus::Confirmed);
}

pub async fn cancel_releases_capacity(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    let s = span(HOUR, 2 * HOUR);

    let held = w.held(&[(r.id, s, 1)], at(0), 600).await;
    let cancelled = w.cancel(held.id, at(5)).await;
    assert_eq!(cancelled.status, BookingStatus::Cancelled);
    assert_eq!(b.count("claims", "1=1").await, 0, "cancelling deletes the claims");
    assert_eq!(b.count("bookings", &format!("id = '{}' AND status = 'cancelled'", held.id)).await, 1);
    assert_eq!(outbox_of(b, held.id, "booking.cancelled").await, 1);
    assert!(w.store.upcoming_expiries(10).await.unwrap().is_empty(), "a cancelled hold does not expire");

    // A confirmed booking, cancelled, gives its capacity back too.
    let second = w.held(&[(r.id, s, 1)], at(6), 600).await;
    w.confirm(second.id, at(7)).await;
    assert_eq!(w.claimed(r.id, at(8)).await, 1);
    w.cancel(second.id, at(8)).await;
    assert_eq!(w.claimed(r.id, at(8)).await, 0);
    assert_eq!(outbox_of(b, second.id, "booking.confirmed").await, 1);
    assert_eq!(outbox_of(b, second.id, "booking.cancelled").await, 1);
    w.held(&[(r.id, s, 1)], at(9), 600).await;

    // Cancelled is final.
    assert!(matches!(w.apply(held.id, Transition::Cancel, at(10)).await, Err(UpdateRefused::Rejected(_))));
    assert!(matches!(w.apply(held.id, Transition::Confirm, at(10)).await, Err(UpdateRefused::Rejected(_))));
    assert_eq!(b.count("outbox", "1=1").await, 3 + 3, "3 holds, 1 confirm, 2 cancels");
}

pub async fn rejected_decision_changes_nothing(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    let held = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    let refuse: Decide = Box::new(|b: &Booking, _now| {
        assert_eq!(b.status, BookingStatus::Held, "the decision sees the stored booking");
        Err(AppError::Conflict("not now".into()))
    });
    match w.store.update_booking(held.id, at(5), refuse).await {
        Err(UpdateRefused::Rejected(AppError::Conflict(m))) => assert_eq!(m, "not now"),
        other => panic!("expected Rejected(Conflict), got {other:?}"),
    }
    assert_eq!(w.store.booking(held.id).await.unwrap().as_ref(), Some(&held), "booking unchanged");
    assert_eq!(b.count("claims", &format!("booking_id = '{}' AND hold_expires_at IS NOT NULL", held.id)).await, 1);
    assert_eq!(b.count("outbox", "1=1").await, 1);
    assert_eq!(w.claimed(r.id, at(5)).await, 1);
}

pub async fn update_of_unknown_booking_is_not_found(b: &Backend) {
    let w = World::new(b).await;
    let never: Decide = Box::new(|_: &Booking, _| panic!("no booking to decide on"));
    assert!(matches!(w.store.update_booking(BookingId::new(), at(0), never).await, Err(UpdateRefused::NotFound)));
    assert_eq!(w.store.booking(BookingId::new()).await.unwrap(), None);
    assert_eq!(b.count("outbox", "1=1").await, 0);
}

pub async fn a_decline_announces_itself_and_other_updates_nothing(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    let held = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    let decline = || -> Decide {
        Box::new(|b: &Booking, now| {
            let mut next = b.clone();
            next.status =
                b.next_status(Transition::PaymentDeclined, now).map_err(|e| AppError::Conflict(e.to_string()))?;
            next.payment_attempts += 1;
            Ok(next)
        })
    };
    let once = w.store.update_booking(held.id, at(5), decline()).await.unwrap();
    assert_eq!((once.status, once.payment_attempts, once.updated_at), (BookingStatus::Held, 1, at(5)));
    assert_eq!(w.store.booking(held.id).await.unwrap().as_ref(), Some(&once), "the new document is stored");
    assert_eq!(outbox_of(b, held.id, PAYMENT_DECLINED_TOPIC).await, 1, "a decline is announced, not a new hold");
    assert_eq!(outbox_of(b, held.id, "booking.held").await, 1);
    assert_eq!(b.count("claims", &format!("booking_id = '{}' AND hold_expires_at IS NOT NULL", held.id)).await, 1);
    let touch: Decide = Box::new(|b: &Booking, _| Ok(b.clone()));
    w.store.update_booking(held.id, at(5), touch).await.unwrap();
    assert_eq!(b.count("outbox", "1=1").await, 2, "no status change and no decline: no event");

    w.store.update_booking(held.id, at(6), decline()).await.unwrap();
    let failed = w.store.update_booking(held.id, at(7), decline()).await.unwrap();
    assert_eq!((failed.status, failed.payment_attempts), (BookingStatus::PaymentFailed, 3));
    assert_eq!(outbox_of(b, held.id, "booking.payment_failed").await, 1);
    assert_eq!(outbox_of(b, held.id, PAYMENT_DECLINED_TOPIC).await, 2);
    assert_eq!(b.count("outbox", "1=1").await, 4);
    assert_eq!(b.count("claims", "1=1").await, 0, "a failed payment releases the claims");
    assert!(w.store.upcoming_expiries(10).await.unwrap().is_empty());
}

pub async fn confirm_at_or_after_expiry_is_rejected(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(2).await;
    let s = span(HOUR, 2 * HOUR);
    let a = w.held(&[(r.id, s, 1)], at(0), 600).await;
    let c = w.held(&[(r.id, s, 1)], at(0), 600).await;
    w.confirm(c.id, at(599)).await;
    assert!(matches!(
        w.apply(a.id, Transition::Confirm, at(600)).await,
        Err(UpdateRefused::Rejected(AppError::HoldExpired))
    ));
    let stored = w.store.booking(a.id).await.unwrap().unwrap();
    assert_eq!(stored.status, BookingStatus::Held, "a refused confirm changes nothing; the sweep expires it");

    // The store's clock never goes back: once a later write let someone else take the unit,
    // a confirm carrying an earlier `now` is decided at the later time and refused.
    let d = w.held(&[(r.id, s, 1)], at(700), 600).await;
    let e = w.held(&[(r.id, s, 1)], at(1400), 600).await;
    assert_eq!(w.claimed(r.id, at(1400)).await, 2, "c (confirmed) and e; d stopped counting at 1300");
    match w.apply(d.id, Transition::Confirm, at(1000)).await {
        Err(UpdateRefused::Rejected(AppError::HoldExpired)) => {}
        other => panic!("a confirm with a stale now after the unit was re-taken: expected HoldExpired, got {other:?}"),
    }
    w.confirm(e.id, at(1500)).await;
    assert_eq!(w.claimed(r.id, at(1500)).await, 2);
}

/// (booking, venue, customer, status) of a booking made by the test.
type Made = (BookingId, VenueId, UserId, BookingStatus);

pub async fn bookings_filter_and_paging(b: &Backend) {
    let w1 = World::new(b).await;
    let w2 = World::new(b).await;
    let c2 = user("second@customers.test", vec![allot_app::store::Role::Customer]);
    w1.store.insert_user(&c2).await.unwrap();
    let w1c2 = World { store: w1.store.clone(), venue: w1.venue.clone(), customer: c2.id };
    let (r1, r2) = (w1.resource(100).await, w2.resource(100).await);

    // (venue, customer, status) of every booking made.
    let mut made: Vec<Made> = Vec::new();
    let mut t = 0;
    for (world, r, n) in [(&w1, &r1, 5), (&w1c2, &r1, 3), (&w2, &r2, 4)] {
        for i in 0..n {
            t += 1;
            let booking = world.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(t), 600).await;
            let status = match i % 3 {
                0 => BookingStatus::Held,
                1 => world.confirm(booking.id, at(t)).await.status,
                _ => world.cancel(booking.id, at(t)).await.status,
            };
            made.push((booking.id, world.venue.id, world.customer, status));
        }
    }
    let store = w1.store.clone();
    let list = |filter: BookingFilter, limit: u32| {
        let store = store.clone();
        async move {
            let got = all_pages(
                limit,
                |b: &Booking| b.id.as_uuid(),
                |page| {
                    let (store, filter) = (store.clone(), filter.clone());
                    async move { store.bookings(&filter, page).await.unwrap() }
                },
            )
            .await;
            let ids: Vec<BookingId> = got.iter().map(|b| b.id).collect();
            let mut sorted = ids.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(ids, sorted, "{filter:?}: in id order, no duplicates");
            ids.into_iter().collect::<BTreeSet<_>>()
        }
    };
    let want = |keep: &dyn Fn(&Made) -> bool| made.iter().filter(|m| keep(m)).map(|m| m.0).collect::<BTreeSet<_>>();

    assert_eq!(list(BookingFilter::default(), 5).await, want(&|_| true));
    assert_eq!(list(BookingFilter::default(), 12).await.len(), 12);
    let by_customer = BookingFilter { customer_id: Some(w1.customer), ..Default::default() };
    assert_eq!(list(by_customer.clone(), 2).await, want(&|m| m.2 == w1.customer));
    assert_eq!(list(by_customer, 1).await.len(), 5);
    let by_venue = BookingFilter { venue_id: Some(w1.venue.id), ..Default::default() };
    assert_eq!(list(by_venue, 3).await, want(&|m| m.1 == w1.venue.id));
    let by_venues = BookingFilter { venue_ids: Some(vec![w2.venue.id]), ..Default::default() };
    assert_eq!(list(by_venues, 3).await, want(&|m| m.1 == w2.venue.id));
    let both = BookingFilter { venue_ids: Some(vec![w1.venue.id, w2.venue.id]), ..Default::default() };
    assert_eq!(list(both, 7).await.len(), 12);
    let none = BookingFilter { venue_ids: Some(vec![]), ..Default::default() };
    assert!(list(none, 7).await.is_empty(), "an empty venue list matches nothing");
    for status in [BookingStatus::Held, BookingStatus::Confirmed, BookingStatus::Cancelled, BookingStatus::Expired] {
        let f = BookingFilter { status: Some(status), ..Default::default() };
        assert_eq!(list(f, 2).await, want(&|m| m.3 == status), "status {status:?}");
    }
    let combined = BookingFilter {
        customer_id: Some(c2.id),
        venue_id: Some(w1.venue.id),
        status: Some(BookingStatus::Confirmed),
        venue_ids: Some(vec![w1.venue.id]),
    };
    assert_eq!(
        list(combined, 1).await,
        want(&|m| m.2 == c2.id && m.1 == w1.venue.id && m.3 == BookingStatus::Confirmed)
    );
    let nobody = BookingFilter { customer_id: Some(UserId::new()), ..Default::default() };
    assert!(list(nobody, 5).await.is_empty());
    // The records are whole.
    let everything = allot_app::store::PageRequest { after: None, limit: 100 };
    for booking in w1.store.bookings(&BookingFilter::default(), everything).await.unwrap().items {
        assert_eq!(w1.store.booking(booking.id).await.unwrap(), Some(booking));
    }
}

/// A decision that records `payment` (a confirm with the card charged).
fn paid(reference: &'static str) -> Decide {
    Box::new(move |b: &Booking, now| {
        let mut next = b.clone();
        next.status = b.next_status(Transition::Confirm, now).map_err(|e| AppError::Conflict(e.to_string()))?;
        next.expires_at = None;
        next.payment = Some(Payment {
            provider: "test".into(),
            reference: reference.into(),
            amount: b.total,
            status: "succeeded".into(),
        });
        Ok(next)
    })
}

/// Bookings waiting for an asynchronous payment are listed, soonest to lapse first; holds,
/// confirmed and ended bookings are not.
pub async fn pending_payments_are_listed_soonest_to_lapse_first(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(10).await;
    let s = span(HOUR, 2 * HOUR);
    let late = w.held(&[(r.id, s, 1)], at(0), 900).await;
    let soon = w.held(&[(r.id, s, 1)], at(0), 600).await;
    let held = w.held(&[(r.id, s, 1)], at(0), 300).await;
    let confirmed = w.held(&[(r.id, s, 1)], at(0), 300).await;
    for booking in [&late, &soon] {
        w.apply(booking.id, Transition::AwaitPayment, at(1)).await.unwrap();
    }
    w.confirm(confirmed.id, at(1)).await;
    assert_eq!(w.store.pending_payments(10).await.unwrap(), vec![soon.id, late.id]);
    assert_eq!(w.store.pending_payments(1).await.unwrap(), vec![soon.id], "at most `limit`");
    w.apply(soon.id, Transition::Confirm, at(2)).await.unwrap();
    assert_eq!(w.store.pending_payments(10).await.unwrap(), vec![late.id], "paid: no longer pending");
    w.apply(late.id, Transition::Expire, at(1_000)).await.unwrap();
    assert_eq!(w.store.pending_payments(10).await.unwrap(), vec![], "lapsed: no longer pending");
    assert_eq!(w.store.booking(held.id).await.unwrap().map(|b| b.status), Some(BookingStatus::Held), "never listed");
}

/// A decision that cancels, owing `amount` back.
fn cancelled_owing(amount: i64) -> Decide {
    Box::new(move |b: &Booking, now| {
        let mut next = b.clone();
        next.status = b.next_status(Transition::Cancel, now).map_err(|e| AppError::Conflict(e.to_string()))?;
        next.refund = Some(Refund::owed(amount));
        Ok(next)
    })
}

/// A decision that records the refund made.
fn refunded(reference: &'static str) -> Decide {
    Box::new(move |b: &Booking, _now| {
        let mut next = b.clone();
        next.refund.as_mut().expect("a refund owed").reference = Some(reference.into());
        Ok(next)
    })
}

pub async fn a_cancellations_refund_is_queued_until_its_reference_is_recorded(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(2).await;
    let s = span(HOUR, 2 * HOUR);
    let owing = w.held(&[(r.id, s, 1)], at(0), 600).await;
    w.store.update_booking(owing.id, at(1), paid("pi_owing")).await.unwrap();
    w.store.update_booking(owing.id, at(2), cancelled_owing(600)).await.unwrap();
    let free = w.held(&[(r.id, s, 1)], at(3), 600).await;
    w.store.update_booking(free.id, at(4), paid("pi_free")).await.unwrap();
    w.store.update_booking(free.id, at(5), cancelled_owing(0)).await.unwrap();

    let grace = REFUND_GRACE_SECONDS;
    assert_eq!(w.store.refunds_due(at(1 + grace), 10, 10).await.unwrap(), vec![], "the request's own try first");
    let queued = RefundDue {
        kind: RefundKind::Cancellation,
        payment_reference: "pi_owing".into(),
        booking_id: owing.id,
        amount: 600,
        attempts: 0,
        next_at: at(2 + grace),
    };
    assert_eq!(w.store.refunds_due(at(10_000), 10, 10).await.unwrap(), vec![queued], "a refund of nothing is not owed");

    assert_eq!(outbox_of(b, owing.id, "booking.refunded").await, 0, "owed, not made");
    w.store.update_booking(owing.id, at(6), refunded("re_owing")).await.unwrap();
    assert_eq!(w.store.refunds_due(at(10_000), 10, 10).await.unwrap(), vec![], "recorded made, dropped with it");
    assert_eq!(b.count("refunds_due", "1=1").await, 0);
    let reference = match b.name() {
        "sqlite" => "json_extract(payload, '$.refund.reference')",
        _ => "payload->'refund'->>'reference'",
    };
    let announced =
        format!("aggregate_id = '{}' AND topic = 'booking.refunded' AND {reference} = 're_owing'", owing.id);
    assert_eq!(b.count("outbox_events", &announced).await, 1, "the refund made is announced, with its reference");
    assert_eq!(outbox_of(b, free.id, "booking.refunded").await, 0, "a refund of nothing is not made");
}

/// A decision that records the refund made as failed, for `reason`.
fn refund_failed(reason: &'static str) -> Decide {
    Box::new(move |b: &Booking, _now| {
        let mut next = b.clone();
        next.refund.as_mut().expect("a refund made").failure = Some(reason.into());
        Ok(next)
    })
}

/// A decision that records a refund made in place of one that failed.
fn refunded_again(reference: &'static str) -> Decide {
    Box::new(move |b: &Booking, _now| {
        let mut next = b.clone();
        let refund = next.refund.as_mut().expect("a refund owed");
        *refund = refund.settled_as(reference);
        Ok(next)
    })
}

/// A refund made and reported failed afterwards is announced, and queued again parked (left to
/// an operator); one made in its place drops it and is announced as made.
pub async fn a_refund_reported_failed_is_announced_and_parked_until_made_again(b: &Backend) {
    let w = World::new(b).await;
    let r = w.resource(1).await;
    let owing = w.held(&[(r.id, span(HOUR, 2 * HOUR), 1)], at(0), 600).await;
    w.store.update_booking(owing.id, at(1), paid("pi_failing")).await.unwrap();
    w.store.update_booking(owing.id, at(2), cancelled_owing(600)).await.unwrap();
    w.store.update_booking(owing.id, at(3), refunded("re_first")).await.unwrap();
    assert_eq!(b.count("refunds_due", "1=1").await, 0);

    let failed = w.store.update_booking(owing.id, at(4), refund_failed("expired_or_canceled_card")).await.unwrap();
    assert_eq!(failed.failed_refund(), Some("re_first"));
    assert_eq!(w.store.booking(owing.id).await.unwrap().unwrap(), failed, "stored");
    assert_eq!(outbox_of(b, owing.id, REFUND_FAILED_TOPIC).await, 1);
    let parked = RefundDue {
        kind: RefundKind::Cancellation,
        payment_reference: "pi_failing".into(),
        booking_id: owing.id,
        amount: 600,
        attempts: allot_app::refunds::REFUND_ATTEMPTS_MAX,
        next_at: allot_app::refunds::PARKED_AT,
    };
    assert_eq!(w.store.refunds_of_payment("pi_failing").await.unwrap(), vec![parked]);
    assert_eq!(w.store.refunds_due(at(1_000_000_000), 100, 10).await.unwrap(), vec![], "not for the reconciler");

    w.store.update_booking(owing.id, at(5), refunded_again("re_second")).await.unwrap();
    assert_eq!(b.count("refunds_due", "1=1").await, 0, "made again: dropped");
    assert_eq!(outbox_of(b, owing.id, "booking.refunded").await, 2, "each refund made announced");
}

pub async fn queued_refunds_are_listed_when_due_rescheduled_and_dropped(b: &Backend) {
    let w = World::new(b).await;
    let due = |reference: &str, next_at: i64| RefundDue {
        kind: RefundKind::Unrecorded,
        payment_reference: reference.into(),
        booking_id: BookingId::new(),
        amount: 1200,
        attempts: 0,
        next_at: at(next_at),
    };
    let (late, soon) = (due("pi_late", 200), due("pi_soon", 100));
    w.store.queue_refund(&late).await.unwrap();
    w.store.queue_refund(&soon).await.unwrap();
    w.store.queue_refund(&RefundDue { amount: 1, ..soon.clone() }).await.unwrap();
    assert_eq!(b.count("refunds_due", "1=1").await, 2, "one per payment and kind: the first kept");

    assert_eq!(w.store.refunds_due(at(99), 10, 10).await.unwrap(), vec![]);
    assert_eq!(w.store.refunds_due(at(100), 10, 10).await.unwrap(), vec![soon.clone()]);
    assert_eq!(w.store.refunds_due(at(300), 10, 10).await.unwrap(), vec![soon.clone(), late.clone()], "soonest first");
    assert_eq!(w.store.refunds_due(at(300), 10, 1).await.unwrap(), vec![soon.clone()], "at most `limit`");

    w.store.reschedule_refund(RefundKind::Unrecorded, "pi_soon", 3, at(400), None).await.unwrap();
    let rescheduled = RefundDue { attempts: 3, next_at: at(400), ..soon.clone() };
    assert_eq!(w.store.refunds_due(at(300), 10, 10).await.unwrap(), vec![late.clone()]);
    assert_eq!(w.store.refunds_due(at(400), 10, 10).await.unwrap(), vec![late.clone(), rescheduled]);
    assert_eq!(w.store.refunds_due(at(400), 3, 10).await.unwrap(), vec![late.clone()], "out of attempts");

    // Found by its payment wherever it is in the queue: parked (due never) and of both kinds.
    let parked = RefundDue { attempts: 12, next_at: allot_app::refunds::PARKED_AT, ..late.clone() };
    w.store.reschedule_refund(RefundKind::Unrecorded, "pi_late", 12, parked.next_at, None).await.unwrap();
    let cancellation = RefundDue { kind: RefundKind::Cancellation, ..soon.clone() };
    w.store.queue_refund(&cancellation).await.unwrap();
    assert_eq!(w.store.refunds_of_payment("pi_late").await.unwrap(), vec![parked.clone()]);
    let both = w.store.refunds_of_payment("pi_soon").await.unwrap();
    assert_eq!(both.iter().map(|r| r.kind).collect::<Vec<_>>(), [RefundKind::Cancellation, RefundKind::Unrecorded]);
    assert_eq!(w.store.refunds_of_payment("pi_none").await.unwrap(), vec![]);
    w.store.drop_refund(RefundKind::Cancellation, "pi_soon").await.unwrap();

    w.store.drop_refund(RefundKind::Cancellation, "pi_late").await.unwrap();
    assert_eq!(b.count("refunds_due", "1=1").await, 2, "another kind is another refund");
    w.store.drop_refund(RefundKind::Unrecorded, "pi_late").await.unwrap();
    w.store.drop_refund(RefundKind::Unrecorded, "pi_soon").await.unwrap();
    assert_eq!(b.count("refunds_due", "1=1").await, 0);
}

/// `claim_refunds_due`: two sweeps at once take disjoint refunds, each leased (its `next_at`
/// moved to the lease's end) until the lease runs out, then due again for any sweep.
pub async fn due_refunds_are_leased_to_one_sweep_at_a_time(b: &Backend) {
    let w = World::new(b).await;
    let due = |reference: &str, next_at: i64, attempts: u32| RefundDue {
        kind: RefundKind::Unrecorded,
        payment_reference: reference.into(),
        booking_id: BookingId::new(),
        amount: 1200,
        attempts,
        next_at: at(next_at),
    };
    let queued = [due("pi_a", 100, 0), due("pi_b", 100, 2), due("pi_c", 200, 0), due("pi_spent", 100, 5)];
    for refund in &queued {
        w.store.queue_refund(refund).await.unwrap();
    }
    let lease_until = at(900);
    let (first, second) = tokio::join!(
        w.store.claim_refunds_due(at(300), lease_until, 5, 2),
        w.store.claim_refunds_due(at(300), lease_until, 5, 2)
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    let mut taken: Vec<RefundDue> = first.iter().chain(&second).cloned().collect();
    taken.sort_by(|x, y| x.payment_reference.cmp(&y.payment_reference));
    let leased: Vec<RefundDue> = queued[..3].iter().map(|r| RefundDue { next_at: lease_until, ..r.clone() }).collect();
    assert_eq!(taken, leased, "each due refund taken once, leased, the one out of attempts left: {first:?} {second:?}");
    assert!(first.len() <= 2 && second.len() <= 2, "at most `limit` each");
    assert_eq!(w.store.refunds_due(at(899), 10, 10).await.unwrap(), vec![queued[3].clone()], "the lease, stored");
    assert_eq!(w.store.claim_refunds_due(at(899), at(2000), 5, 10).await.unwrap(), vec![], "none while leased");

    // A sweep reschedules under its lease; one that outlived it (another took the refund since,
    // with a lease of its own) changes nothing.
    w.store.reschedule_refund(RefundKind::Unrecorded, "pi_b", 3, at(950), Some(lease_until)).await.unwrap();
    w.store.reschedule_refund(RefundKind::Unrecorded, "pi_b", 9, at(100), Some(at(899))).await.unwrap();
    let b = w.store.refunds_due(at(10_000), 10, 10).await.unwrap().into_iter().find(|r| r.payment_reference == "pi_b");
    assert_eq!(b.map(|r| (r.attempts, r.next_at)), Some((3, at(950))), "only under the lease");
    let again = w.store.claim_refunds_due(at(900), at(1500), 5, 10).await.unwrap();
    let mut refs: Vec<&str> = again.iter().map(|r| r.payment_reference.as_str()).collect();
    refs.sort_unstable();
    assert_eq!(refs, ["pi_a", "pi_c"], "due again once the lease ran out (a sweep that died)");
    assert!(again.iter().all(|r| r.next_at == at(1500)));
}
