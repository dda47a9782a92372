//! Model-based property test: random sequences of hold / confirm / await-payment / cancel /
//! advance-clock / expire_due (with purges of released claims) over two or three small resources, checked step by step against
//! a naive reference (a list of bookings, usage counted minute by minute).
//!
//! After every step:
//! * the store's accept/refuse of a hold agrees with the reference, including the refused
//!   item's index and the units left at its first failing minute;
//! * confirm / await-payment / cancel succeed exactly when the reference's state machine allows
//!   them, and `expire_due` flips only due bookings, the soonest first, at most `limit`;
//! * `store.claims(resource, everything, now)` is exactly the reference's live claims (summed per
//!   block: a store may merge claims of the same block), and their
//!   sum never exceeds the capacity at any instant (I1).
//!
//! A store may expire a lapsed hold before `expire_due` does (PostgreSQL does so when a new
//! hold re-takes its place on a capacity-one resource); the reference then follows the store
//! for lapsed bookings only, and checks they became `expired` and nothing else.
//!
//! At the end of each case every booking's stored status, its outbox rows (one per status
//! change) and its claim rows (kept only while it claims capacity) are checked too.
//!
//! One store per test; each case gets its own venue and resources and a time base well after
//! the previous case's (the stores' transaction clock never goes back), and first sweeps any
//! holds earlier cases left behind.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use allot_app::store::{HoldRefused, UpdateRefused};
use allot_core::booking::{BookingStatus, Transition};
use allot_core::capacity::Span;
use allot_core::ids::BookingId;
use jiff::Timestamp;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

use crate::{Backend, DAY, T0, World, decide, free_resource, hold_command, used_at};

const CASES: u32 = 48;
/// Spans are whole minutes on a grid from the case's base.
const UNIT: i64 = 60;
const CASE_SPACING: i64 = 1_000_000;

#[derive(Debug, Clone, Copy)]
struct Item {
    resource: usize,
    start: i64,
    len: i64,
    quantity: u32,
}

#[derive(Debug, Clone)]
enum Op {
    Hold { items: Vec<Item>, ttl: i64 },
    Confirm(Index),
    AwaitPayment(Index),
    Cancel(Index),
    Advance(i64),
    Expire(u32),
}

#[derive(Debug, Clone)]
struct Case {
    capacities: Vec<u32>,
    ops: Vec<Op>,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let item = (0usize..3, 0i64..12, 1i64..5, 1u32..=2).prop_map(|(resource, start, len, quantity)| Item {
        resource,
        start,
        len,
        quantity,
    });
    let op = prop_oneof![
        6 => (vec(item, 1..=3), 30i64..=180).prop_map(|(items, ttl)| Op::Hold { items, ttl }),
        2 => any::<Index>().prop_map(Op::Confirm),
        1 => any::<Index>().prop_map(Op::AwaitPayment),
        2 => any::<Index>().prop_map(Op::Cancel),
        3 => (1i64..=150).prop_map(Op::Advance),
        2 => (1u32..=3).prop_map(Op::Expire),
    ];
    (vec(1u32..=3, 2..=3), vec(op, 5..30)).prop_map(|(capacities, ops)| Case { capacities, ops })
}

#[derive(Debug)]
struct Booked {
    id: BookingId,
    status: BookingStatus,
    expires_at: i64,
    /// (resource index, blocked span, quantity)
    items: Vec<(usize, Span, u32)>,
    /// Outbox rows expected: one per status change, the hold included.
    events: i64,
}

struct Reference {
    capacities: Vec<u32>,
    bookings: Vec<Booked>,
    now: i64,
}

impl Reference {
    fn counts(&self, b: &Booked) -> bool {
        match b.status {
            BookingStatus::Confirmed => true,
            BookingStatus::Held | BookingStatus::PendingPayment => self.now < b.expires_at,
            _ => false,
        }
    }

    fn live(&self, resource: usize) -> Vec<(Span, u32)> {
        self.bookings
            .iter()
            .filter(|b| self.counts(b))
            .flat_map(|b| b.items.iter().filter(|i| i.0 == resource).map(|i| (i.1, i.2)))
            .collect()
    }

    /// `Err((item_index, remaining))` at the first minute of the first item that does not fit.
    fn check_hold(&self, items: &[(usize, Span, u32)]) -> Result<(), (usize, u32)> {
        let mut taken: Vec<(usize, Span, u32)> = Vec::new();
        for (i, &(r, span, quantity)) in items.iter().enumerate() {
            let cap = self.capacities[r];
            let live = self.live(r);
            let mut minute = span.start;
            while minute < span.end {
                let used: u32 = live.iter().filter(|(s, _)| s.contains(minute)).map(|(_, q)| q).sum::<u32>()
                    + taken.iter().filter(|(tr, s, _)| *tr == r && s.contains(minute)).map(|(_, _, q)| q).sum::<u32>();
                if used + quantity > cap {
                    return Err((i, cap.saturating_sub(used)));
                }
                minute += UNIT;
            }
            taken.push((r, span, quantity));
        }
        Ok(())
    }

    /// The reference state machine: the status after `t`, or `None` when refused.
    fn next(&self, b: &Booked, t: Transition) -> Option<BookingStatus> {
        use BookingStatus as S;
        let unexpired = self.now < b.expires_at;
        match (b.status, t) {
            (S::Held | S::PendingPayment, Transition::Confirm) if unexpired => Some(S::Confirmed),
            (S::Held, Transition::AwaitPayment) if unexpired => Some(S::PendingPayment),
            (S::Held | S::PendingPayment | S::Confirmed, Transition::Cancel) => Some(S::Cancelled),
            _ => None,
        }
    }
}

/// How often each outcome happened over the whole run, so the property cannot go vacuous.
#[derive(Default)]
struct Tally {
    accepted: AtomicU32,
    refused: AtomicU32,
    transitions: AtomicU32,
    rejected: AtomicU32,
    swept: AtomicU32,
    stopped_counting: AtomicU32,
    /// Lapsed holds the store expired before a sweep (allowed, not required).
    expired_early: AtomicU32,
}

fn ts(seconds: i64) -> Timestamp {
    Timestamp::from_second(seconds).unwrap()
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

async fn run_case(b: &Backend, case: &Case, base: i64, tally: &Tally) -> Result<(), TestCaseError> {
    let store = b.store();
    // Holds of earlier cases are all due by now: sweep them so `limit` below sees only ours.
    while !store.expire_due(ts(base), 1000).await.unwrap().is_empty() {}

    let w = World::new(b).await;
    let mut resources = Vec::new();
    for &cap in &case.capacities {
        let r = free_resource(w.venue.id, cap);
        store.insert_resource(&r).await.unwrap();
        resources.push(r);
    }
    let n = resources.len();
    let mut reference = Reference { capacities: case.capacities.clone(), bookings: Vec::new(), now: base };

    for (step, op) in case.ops.iter().enumerate() {
        let now = reference.now;
        match op {
            Op::Hold { items, ttl } => {
                let wanted: Vec<(usize, Span, u32)> = items
                    .iter()
                    .map(|it| {
                        let r = it.resource % n;
                        (r, Span::new(base + it.start * UNIT, base + (it.start + it.len) * UNIT), it.quantity)
                    })
                    .collect();
                let wants: Vec<_> = wanted.iter().map(|&(r, s, q)| (resources[r].id, s, q)).collect();
                let expected = reference.check_hold(&wanted);
                let got = store.hold(hold_command(w.venue.id, w.customer, &wants, ts(now), *ttl)).await;
                match (expected, got) {
                    (Ok(()), Ok(booking)) => {
                        prop_assert_eq!(booking.status, BookingStatus::Held);
                        prop_assert_eq!(booking.expires_at, Some(ts(now + ttl)));
                        tally.accepted.fetch_add(1, Ordering::Relaxed);
                        reference.bookings.push(Booked {
                            id: booking.id,
                            status: BookingStatus::Held,
                            expires_at: now + ttl,
                            items: wanted,
                            events: 1,
                        });
                    }
                    (Err((item, left)), Err(HoldRefused::Unavailable { item_index, remaining })) => {
                        prop_assert_eq!((item_index, remaining), (item, left), "step {}: refusal details", step);
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    (expected, got) => {
                        return Err(fail(format!(
                            "step {step}: hold {wanted:?} at {now}: reference {expected:?}, store {got:?}"
                        )));
                    }
                }
            }
            Op::Confirm(pick) | Op::AwaitPayment(pick) | Op::Cancel(pick) => {
                if reference.bookings.is_empty() {
                    continue;
                }
                let t = match op {
                    Op::Confirm(_) => Transition::Confirm,
                    Op::AwaitPayment(_) => Transition::AwaitPayment,
                    _ => Transition::Cancel,
                };
                let i = pick.index(reference.bookings.len());
                let expected = reference.next(&reference.bookings[i], t);
                let id = reference.bookings[i].id;
                let got = store.update_booking(id, ts(now), decide(t)).await;
                match (expected, got) {
                    (Some(status), Ok(booking)) => {
                        prop_assert_eq!(booking.status, status, "step {}: {:?}", step, t);
                        let b = &mut reference.bookings[i];
                        b.status = status;
                        b.events += 1;
                        tally.transitions.fetch_add(1, Ordering::Relaxed);
                    }
                    (None, Err(UpdateRefused::Rejected(_))) => {
                        tally.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    (expected, got) => {
                        let b = &reference.bookings[i];
                        return Err(fail(format!(
                            "step {step}: {t:?} of {:?} (expires {}) at {now}: reference {expected:?}, store {got:?}",
                            b.status, b.expires_at
                        )));
                    }
                }
            }
            Op::Advance(seconds) => {
                let before: usize = (0..n).map(|r| reference.live(r).len()).sum();
                reference.now += seconds;
                let after: usize = (0..n).map(|r| reference.live(r).len()).sum();
                if after < before {
                    tally.stopped_counting.fetch_add(1, Ordering::Relaxed);
                }
            }
            Op::Expire(limit) => {
                let due: Vec<(BookingId, i64)> = reference
                    .bookings
                    .iter()
                    .filter(|b| b.status.expires() && b.expires_at <= now)
                    .map(|b| (b.id, b.expires_at))
                    .collect();
                let got = store.expire_due(ts(now), *limit).await.unwrap();
                prop_assert_eq!(got.len(), due.len().min(*limit as usize), "step {}: expire_due count", step);
                let mut seen = std::collections::HashSet::new();
                for id in &got {
                    prop_assert!(seen.insert(*id), "step {}: {} expired twice in one sweep", step, id);
                    prop_assert!(due.iter().any(|(d, _)| d == id), "step {}: {} was not due", step, id);
                }
                let latest_taken = due.iter().filter(|(d, _)| seen.contains(d)).map(|(_, e)| *e).max();
                let earliest_left = due.iter().filter(|(d, _)| !seen.contains(d)).map(|(_, e)| *e).min();
                if let (Some(taken), Some(left)) = (latest_taken, earliest_left) {
                    prop_assert!(taken <= left, "step {}: the soonest expiries go first", step);
                }
                for b in reference.bookings.iter_mut().filter(|b| seen.contains(&b.id)) {
                    b.status = BookingStatus::Expired;
                    b.events += 1;
                }
                tally.swept.fetch_add(got.len() as u32, Ordering::Relaxed);
                // Purges interleaved with later holds on the same blocks: the live claims
                // checked below must not lose what a purge of lapsed ones deletes.
                if limit % 2 == 1 {
                    store.purge_released_claims(ts(now), *limit).await.unwrap();
                }
            }
        }

        // A store may expire a lapsed hold before the sweep, in the transaction that re-takes
        // its place (PostgreSQL does on capacity-one resources). Only lapsed bookings may
        // differ from the reference, and only by having become expired.
        let now = reference.now;
        for booked in reference.bookings.iter_mut().filter(|b| b.status.expires() && b.expires_at <= now) {
            let stored = store.booking(booked.id).await.unwrap().unwrap().status;
            if stored == BookingStatus::Expired {
                booked.status = BookingStatus::Expired;
                booked.events += 1;
                tally.expired_early.fetch_add(1, Ordering::Relaxed);
            } else {
                prop_assert_eq!(stored, booked.status, "step {}: a lapsed booking changed", step);
            }
        }

        // The store's live claims are the reference's, and never over capacity (I1).
        for (ri, r) in resources.iter().enumerate() {
            let claims = store.claims(r.id, Span::new(base - DAY, base + DAY), ts(now)).await.unwrap();
            // Stores may sum claims of the same block (all the capacity rule needs): compare
            // the quantity per block.
            let got = per_block(claims.iter().map(|c| (c.span.start, c.span.end, c.quantity)));
            let want = per_block(reference.live(ri).iter().map(|(s, q)| (s.start, s.end, *q)));
            prop_assert_eq!(&got, &want, "step {} ({:?}): live claims of resource {} at {}", step, op, ri, now);
            for c in &claims {
                let used = used_at(&claims, c.span.start);
                prop_assert!(
                    used <= case.capacities[ri],
                    "I1: {} used of {} at {}",
                    used,
                    case.capacities[ri],
                    c.span.start
                );
            }
        }
    }

    // Stored state, events and claim rows of every booking (released holds' claims purged).
    b.purge_released(ts(reference.now)).await;
    for booked in &reference.bookings {
        let stored = store.booking(booked.id).await.unwrap().unwrap();
        prop_assert_eq!(stored.status, booked.status, "stored status of {}", booked.id);
        let id = booked.id;
        prop_assert_eq!(
            b.count("outbox", &format!("aggregate_id = '{id}'")).await,
            booked.events,
            "outbox rows of {}",
            id
        );
        let rows = if booked.status.claims_capacity() { booked.items.len() as i64 } else { 0 };
        prop_assert_eq!(b.count("claims", &format!("booking_id = '{id}'")).await, rows, "claim rows of {}", id);
    }
    // The totals the capacity rule reads are exactly the sums of the claim rows (kept by
    // triggers: per row on SQLite, per statement for inserts on PostgreSQL). Only where they
    // have not lapsed: a purge deletes a lapsed row whole, other lapsed claims summed into it
    // included (they count for nothing either way).
    let drift =
        format!("a.quantity IS DISTINCT FROM t.quantity AND COALESCE(a.expires_at, t.expires_at) > {}", reference.now);
    prop_assert_eq!(b.count(TOTALS_DRIFT, &drift).await, 0, "claim_totals drift");
    Ok(())
}

/// Claim sums per totals key next to the stored totals (a row with quantity 0 counts as none).
const TOTALS_DRIFT: &str = "(SELECT resource_id, block_start, block_end,
         COALESCE(hold_expires_at, 9223372036854775807) AS expires_at, SUM(quantity) AS quantity
       FROM claims GROUP BY 1, 2, 3, 4) a
     FULL JOIN (SELECT * FROM claim_totals WHERE quantity > 0) t
       ON t.resource_id = a.resource_id AND t.block_start = a.block_start AND t.block_end = a.block_end
          AND t.expires_at = a.expires_at";

pub async fn random_operations_agree_with_reference_model(b: &Backend) {
    let handle = tokio::runtime::Handle::current();
    let config = Config { cases: CASES, max_shrink_iters: 200, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let case_no = AtomicI64::new(1);
    let tally = Tally::default();
    let result = tokio::task::block_in_place(|| {
        runner.run(&case_strategy(), |case| {
            let base = T0 + case_no.fetch_add(1, Ordering::Relaxed) * CASE_SPACING;
            handle.block_on(run_case(b, &case, base, &tally))
        })
    });
    if let Err(e) = result {
        panic!("{}: {e}", b.name());
    }
    let get = |a: &AtomicU32| a.load(Ordering::Relaxed);
    let counts = [
        ("accepted holds", get(&tally.accepted)),
        ("refused holds", get(&tally.refused)),
        ("transitions", get(&tally.transitions)),
        ("rejected transitions", get(&tally.rejected)),
        ("swept holds", get(&tally.swept)),
        ("holds that stopped counting", get(&tally.stopped_counting)),
    ];
    eprintln!("{}: {counts:?}, expired before a sweep: {}", b.name(), get(&tally.expired_early));
    for (what, n) in counts {
        assert!(n >= 10, "the generator produced only {n} {what}");
    }
}

/// Quantity per `(start, end)` block, in block order.
fn per_block(claims: impl Iterator<Item = (i64, i64, u32)>) -> std::collections::BTreeMap<(i64, i64), u32> {
    let mut out = std::collections::BTreeMap::new();
    for (start, end, quantity) in claims {
        *out.entry((start, end)).or_default() += quantity;
    }
    out
}
