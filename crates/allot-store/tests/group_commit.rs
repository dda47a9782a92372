//! The single writer with group commit: concurrent writes share transactions, each gets its
//! own result, a refused request undoes only its own changes, and everything acknowledged is
//! readable (from a fresh connection) afterwards.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use allot_app::store::Store;
use allot_store::SqliteStore;

async fn fresh() -> (Arc<SqliteStore>, String) {
    let dir = std::env::temp_dir().join(format!("allot-store-{}", uuid::Uuid::now_v7().as_simple()));
    let url = format!("sqlite://{}/allot.db", dir.display());
    (Arc::new(SqliteStore::open(&url).await.unwrap()), url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_transactions_and_all_land() {
    let (store, url) = fresh().await;
    let n = 400;
    let (tx_before, req_before) = store.write_stats();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.set_setting(&format!("k{i}"), &format!("v{i}")).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let (tx_after, req_after) = store.write_stats();
    let (transactions, requests) = (tx_after - tx_before, req_after - req_before);
    assert_eq!(requests, n);
    assert!(transactions < n / 4, "{requests} requests took {transactions} transactions: no group commit");
    drop(store);
    let reopened = SqliteStore::open(&url).await.unwrap();
    for i in 0..n {
        assert_eq!(reopened.setting_or_insert(&format!("k{i}"), "missing").await.unwrap(), format!("v{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_request_does_not_undo_its_batch_neighbours() {
    let (store, _) = fresh().await;
    let user = |i: usize, email: &str| allot_app::store::User {
        id: allot_core::ids::UserId::new(),
        email: email.to_owned(),
        name: format!("u{i}"),
        password_hash: "x".into(),
        roles: vec![allot_app::store::Role::Customer],
        venues: vec![],
        created_at: jiff::Timestamp::now(),
    };
    // Every other request reuses one e-mail: exactly one of those may win.
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let store = store.clone();
            let email = if i % 2 == 0 { "same@test.allot".to_owned() } else { format!("u{i}@test.allot") };
            let u = user(i, &email);
            tokio::spawn(async move { store.insert_user(&u).await })
        })
        .collect();
    let mut ok = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(allot_app::StoreError::Conflict(_)) => conflicts += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((ok, conflicts), (51, 49));
    assert_eq!(store.count("users", "1=1").await.unwrap(), 51);
}
