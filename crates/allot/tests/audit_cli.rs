//! `allot audit verify` on a database a real server wrote: intact after a session, and after
//! one row is edited directly it fails (exit status 1) naming that event.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{http_client, login, now_nanos, register, run_command, scratch_dir, start_node};
use sqlx::{Connection, Executor};

fn verify(db_url: &str) -> (i32, String) {
    run_command(&["audit", "verify"], db_url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_passes_then_names_the_edited_event() {
    let dir = scratch_dir("audit-cli", now_nanos());
    let db_url = format!("sqlite://{}/allot.db", dir.display());
    let mut node = start_node("audit-node", &db_url, false, dir.join("node.log"), 4000).await;
    let client = http_client(Duration::from_secs(10), None);
    register(&client, &node, "ann@test.allot", "password-123", "Ann").await;
    login(&client, &node, "ann@test.allot", "password-123").await;
    let wrong = client
        .post(node.url("/auth/login"))
        .json(&serde_json::json!({"email": "ann@test.allot", "password": "not-her-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), reqwest::StatusCode::UNAUTHORIZED);
    node.kill();

    let (code, out) = verify(&db_url);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("audit chain intact: 3 events; head "), "{out}");

    let mut conn = sqlx::SqliteConnection::connect(&db_url).await.unwrap();
    conn.execute("DROP TRIGGER audit_events_no_update").await.unwrap();
    conn.execute("UPDATE audit_events SET ip = '10.9.8.7' WHERE seq = 2").await.unwrap();
    let id: String =
        sqlx::query_scalar("SELECT id FROM audit_events WHERE seq = 2").fetch_one(&mut conn).await.unwrap();
    drop(conn);
    let (code, out) = verify(&db_url);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("broken at event 2") && out.contains(&id), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}
