//! The payment provider's signing secret: made once and printed by `allot payments
//! webhook-secret`, or set by `allot serve --payment-webhook-secret` for every node; a secret
//! too short to be one is refused at start.
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
    let (code, made) = secret(&db_url);
    assert_eq!(code, 0, "{made}");
    assert!(made.starts_with("whsec_") && made.trim().len() > 20, "{made}");
    assert_eq!(secret(&db_url), (0, made.clone()), "made once, then the same");

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
