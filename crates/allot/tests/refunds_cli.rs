//! `allot refunds list` and `allot refunds retry` over a database holding refunds owed: one
//! left to an operator is listed as such and re-armed for the reconciler; retrying a payment
//! with nothing queued exits 1 and changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use allot_app::refunds::{PARKED_AT, QUEUED_LIST_MAX, REFUND_ATTEMPTS_MAX};
use allot_app::store::{RefundDue, RefundKind, Store};
use allot_core::ids::BookingId;
use allot_store::SqliteStore;
use common::{now_nanos, run_command, scratch_dir};
use futures::StreamExt;
use jiff::Timestamp;

fn refunds(db_url: &str, args: &[&str]) -> (i32, String) {
    run_command(&[&["refunds"], args].concat(), db_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_left_to_an_operator_is_listed_and_re_armed_for_the_reconciler() {
    let dir = scratch_dir("refunds-cli", now_nanos());
    let db_url = format!("sqlite://{}/allot.db", dir.display());
    let store = SqliteStore::open(&db_url).await.unwrap();
    let booking = BookingId::new();
    let parked = RefundDue {
        kind: RefundKind::Cancellation,
        payment_reference: "pi_parked".into(),
        booking_id: booking,
        amount: 600,
        attempts: REFUND_ATTEMPTS_MAX,
        next_at: Timestamp::from_second(1_000).unwrap(),
    };
    store.queue_refund(&parked).await.unwrap();
    let waiting = RefundDue {
        kind: RefundKind::Unrecorded,
        payment_reference: "pi_waiting".into(),
        attempts: 0,
        ..parked.clone()
    };
    store.queue_refund(&waiting).await.unwrap();
    let never = RefundDue { payment_reference: "pi_never".into(), next_at: PARKED_AT, ..parked.clone() };
    store.queue_refund(&never).await.unwrap();

    let (code, out) = refunds(&db_url, &["list"]);
    assert_eq!(code, 0, "{out}");
    let line = |reference: &str| out.lines().find(|l| l.contains(reference)).unwrap_or_default().to_owned();
    assert!(line("pi_parked").ends_with("left to an operator"), "{out}");
    assert!(line("pi_parked").contains(&format!("booking {booking} amount 600")), "{out}");
    assert!(line("pi_waiting").ends_with(": queued"), "{out}");
    assert!(line("pi_never").ends_with("next never (parked): left to an operator"), "{out}");
    assert!(out.ends_with("refunds owed: 3\n"), "{out}");

    let before = Timestamp::now();
    let (code, out) = refunds(&db_url, &["retry", "pi_parked"]);
    assert_eq!(code, 0, "{out}");
    let rearmed = store.refunds_due(Timestamp::now(), REFUND_ATTEMPTS_MAX, 10).await.unwrap();
    let rearmed = rearmed.iter().find(|due| due.payment_reference == "pi_parked").expect("due again");
    assert_eq!(rearmed.attempts, 0);
    assert!(rearmed.next_at >= before.checked_sub(jiff::SignedDuration::from_secs(1)).unwrap(), "due now");

    // A parked refund behind more than a listing's worth of others: shown as parked, and
    // found by its payment for a retry.
    let backlog =
        (0..QUEUED_LIST_MAX).map(|n| RefundDue { payment_reference: format!("pi_backlog_{n}"), ..waiting.clone() });
    let queued = futures::stream::iter(backlog).map(|due| {
        let store = &store;
        async move { store.queue_refund(&due).await }
    });
    let queued: Vec<_> = queued.buffer_unordered(256).collect().await;
    assert!(queued.iter().all(Result::is_ok));
    let deep = RefundDue { payment_reference: "pi_deep".into(), next_at: PARKED_AT, ..parked.clone() };
    store.queue_refund(&deep).await.unwrap();
    let (code, out) = refunds(&db_url, &["list"]);
    assert_eq!(code, 0);
    assert!(!out.contains("pi_deep"), "parked last, past the listing's end");
    assert!(
        out.contains(&format!("the first {QUEUED_LIST_MAX} of more")),
        "{}",
        out.lines().last().unwrap_or_default()
    );
    let (code, out) = refunds(&db_url, &["retry", "pi_deep"]);
    assert_eq!((code, out.trim()), (0, "1 refund(s) of payment pi_deep re-armed: the next sweep makes them"));
    let deep = store.refunds_of_payment("pi_deep").await.unwrap();
    assert!(deep.iter().all(|due| due.attempts == 0 && due.next_at < PARKED_AT) && deep.len() == 1, "{deep:?}");
    store.drop_refund(RefundKind::Cancellation, "pi_deep").await.unwrap();
    let (code, out) = refunds(&db_url, &["retry", "pi_nothing"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no refund queued for payment pi_nothing"), "{out}");
    assert_eq!(refunds(&db_url, &["list"]).1.lines().last(), Some("refunds owed: the first 10000 of more"));
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}
