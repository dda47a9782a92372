//! The payment provider's signing secret: made at the first start and printed by `allot
//! payments webhook-secret` (which makes none), or set by `allot serve --payment-webhook-secret`
//! for every node; a secret too short to be one is refused at start.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Node, now_nanos, run_command, scratch_dir};

fn secret(db_url: &str) -> (i32, String) {
    run_command(&["payments", "webhook-secret"], db_url)
}

#[test]
fn the_webhook_secret_is_made_once_and_can_be_set_at_start() {
    let dir = scratch_dir("payments-cli", now_nanos());
    let db_url = format!("sqlite://{}/allot.db", dir.display());
    let (code, none) = secret(&db_url);
    assert_eq!(code, 1, "none before the first start: {none}");
    assert!(none.contains("no payment webhook secret yet"), "{none}");
    let mut node = Node::start_with("first", &db_url, &[], dir.join("first.log"), 4096);
    node.kill();
    let (code, made) = secret(&db_url);
    assert_eq!(code, 0, "{made}");
    assert!(made.starts_with("whsec_") && made.trim().len() > 20, "{made}");
    let mut node = Node::start_with("second", &db_url, &[], dir.join("second.log"), 4096);
    node.kill();
    assert_eq!(secret(&db_url), (0, made.clone()), "made once, kept");

    let configured = "whsec_configured_by_the_operator";
    let flags = ["--payment-webhook-secret", configured];
    let mut node = Node::start_with("configured", &db_url, &flags, dir.join("serve.log"), 4096);
    node.kill();
    assert_eq!(secret(&db_url), (0, format!("{configured}\n")), "stored for every node");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &db_url, "--payment-webhook-secret", "short"])
        .env("ALLOT_LOG", "warn")
        .output()
        .unwrap();
    assert!(!output.status.success(), "a secret of 5 bytes is refused");
    assert!(String::from_utf8_lossy(&output.stderr).contains("16 to 256 bytes"), "{output:?}");
    assert_eq!(secret(&db_url), (0, format!("{configured}\n")), "unchanged");
}
