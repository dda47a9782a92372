//! The `allot` binary: `allot serve [--demo]` runs the booking engine over SQLite (one
//! process) or PostgreSQL (any number of stateless nodes sharing one database); `allot audit
//! verify`, `allot refunds list|retry` and `allot payments webhook-secret` are an operator's
//! tools over the same database.

mod config;

use std::sync::Arc;

use allot_app::App;
use allot_app::clock::SystemClock;
use allot_app::payments::{PaymentProvider, ReportingTestProvider, TestReport};
use allot_app::store::Store;
use allot_store::{PgStore, SqliteStore};
use clap::Parser;

use crate::config::{AuditCommand, Cli, Command, PaymentsCommand, RefundsCommand};
use allot_app::audit::Verdict;

/// mimalloc: the request path allocates small short-lived buffers on every thread, where
/// glibc's malloc spent ~12% of the request threads' CPU under load. With the `override`
/// feature it also serves C's `malloc` and `free`, i.e. the bundled SQLite's allocations on the
/// writer thread, where glibc's malloc was ~9% of the writer's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ALLOT_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let secrets = Secrets {
                webhook: args.payment_webhook_secret.clone().map(|s| s.0),
                stripe: args.stripe_secret_key.clone().map(|key| (args.stripe_api_base.clone(), key.0)),
            };
            serve(args.resolve()?, secrets).await
        }
        Command::Audit(AuditCommand::Verify { database_url }) => audit_verify(&database_url).await,
        Command::Refunds(RefundsCommand::List { database_url }) => refunds_list(&database_url).await,
        Command::Refunds(RefundsCommand::Retry { payment_reference, database_url }) => {
            refunds_retry(&database_url, &payment_reference).await
        }
        Command::Payments(PaymentsCommand::WebhookSecret { database_url }) => print_webhook_secret(&database_url).await,
    }
}

/// Shortest and longest payment webhook secret accepted (Stripe's are ~38 bytes).
const WEBHOOK_SECRET_BYTES: std::ops::RangeInclusive<usize> = 16..=256;

/// Stores `secret`, the payment provider's signing secret given at start, for every node
/// (the others take it up at the first event they cannot verify with the one they had).
async fn configure_webhook_secret(store: &dyn Store, secret: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        WEBHOOK_SECRET_BYTES.contains(&secret.len()),
        "--payment-webhook-secret must be {} to {} bytes",
        WEBHOOK_SECRET_BYTES.start(),
        WEBHOOK_SECRET_BYTES.end()
    );
    let key = allot_app::webhooks::WEBHOOK_SECRET_SETTING;
    if store.setting(key).await?.is_some_and(|stored| stored != secret) {
        tracing::warn!("--payment-webhook-secret replaces the stored payment webhook secret");
    }
    store.set_setting(key, secret).await?;
    Ok(())
}

/// `allot payments webhook-secret`: prints the stored secret; none yet is status 1.
async fn print_webhook_secret(database_url: &str) -> anyhow::Result<()> {
    let store = open_store(database_url).await?;
    match store.setting(allot_app::webhooks::WEBHOOK_SECRET_SETTING).await? {
        Some(secret) => println!("{secret}"),
        None => {
            println!("no payment webhook secret yet: one is made at the server's first start");
            std::process::exit(1);
        }
    }
    Ok(())
}

async fn open_store(database_url: &str) -> anyhow::Result<Arc<dyn Store>> {
    Ok(if is_postgres(database_url) {
        Arc::new(PgStore::open(database_url).await?)
    } else {
        Arc::new(SqliteStore::open(database_url).await?)
    })
}

/// `allot audit verify`: prints what it found; a broken chain is exit status 1.
async fn audit_verify(database_url: &str) -> anyhow::Result<()> {
    let store = open_store(database_url).await?;
    match allot_app::audit::verify(store.as_ref()).await? {
        Verdict::Intact { events } => {
            // The head to keep outside the database: a consistent rewrite no longer leads to it.
            let (_, head) = store.audit_head().await?;
            println!("audit chain intact: {events} events; head {head}");
            Ok(())
        }
        Verdict::Broken { seq, id, problem } => {
            let id = id.map(|id| format!(" (id {id})")).unwrap_or_default();
            println!("audit chain broken at event {seq}{id}: {problem}");
            std::process::exit(1);
        }
    }
}

/// `allot refunds list`: one line per refund queued, then a count.
async fn refunds_list(database_url: &str) -> anyhow::Result<()> {
    let store = open_store(database_url).await?;
    let (queued, more) = allot_app::refunds::queued(store.as_ref()).await?;
    for due in &queued {
        let state = if allot_app::refunds::left_to_operator(due.attempts) { "left to an operator" } else { "queued" };
        let next = if due.next_at == allot_app::refunds::PARKED_AT {
            "never (parked)".to_owned()
        } else {
            due.next_at.to_string()
        };
        println!(
            "{} {} booking {} amount {} attempts {} next {next}: {state}",
            due.kind.as_str(),
            due.payment_reference,
            due.booking_id,
            due.amount,
            due.attempts,
        );
    }
    if more {
        // Parked refunds sort last: `refunds retry` finds any by its payment all the same.
        println!("refunds owed: the first {} of more", queued.len());
    } else {
        println!("refunds owed: {}", queued.len());
    }
    Ok(())
}

/// `allot refunds retry REFERENCE`: re-arms it for the reconciler; none queued is status 1.
async fn refunds_retry(database_url: &str, payment_reference: &str) -> anyhow::Result<()> {
    let store = open_store(database_url).await?;
    let rearmed = allot_app::refunds::rearm(store.as_ref(), payment_reference, jiff::Timestamp::now()).await?;
    if rearmed == 0 {
        println!("no refund queued for payment {payment_reference}");
        std::process::exit(1);
    }
    println!("{rearmed} refund(s) of payment {payment_reference} re-armed: the next sweep makes them");
    Ok(())
}

/// What `serve` is given only by flags and the environment, never by the config file.
struct Secrets {
    /// The payment provider's signing secret for its events.
    webhook: Option<String>,
    /// Stripe's API base and secret key, when payments go through Stripe.
    stripe: Option<(String, String)>,
}

/// The test provider's `tok_async` reports, to send once the server listens.
type TestReports = tokio::sync::mpsc::Receiver<TestReport>;

/// The payment provider `serve` runs: Stripe when it has a key, else the built-in test
/// provider and its reports.
fn payment_provider(
    stripe: Option<(String, String)>,
) -> anyhow::Result<(Arc<dyn PaymentProvider>, Option<TestReports>)> {
    if let Some((base, key)) = stripe {
        let provider = allot_http::stripe::StripeProvider::new(&base, &key)
            .map_err(|e| anyhow::anyhow!("--stripe-secret-key / --stripe-api-base: {e}"))?;
        tracing::info!(api = base, "payments go through Stripe");
        return Ok((Arc::new(provider), None));
    }
    let (provider, reports) = ReportingTestProvider::new();
    Ok((Arc::new(provider), Some(reports)))
}

async fn serve(settings: config::Settings, secrets: Secrets) -> anyhow::Result<()> {
    let webhook_secret_configured = secrets.webhook;
    if settings.nats_url.is_some() {
        tracing::warn!(flag = "--nats-url", "accepted but not used yet by this version");
    }
    let store = open_store(&settings.database_url).await?;
    // Before the app starts, which reads it.
    if let Some(secret) = &webhook_secret_configured {
        configure_webhook_secret(store.as_ref(), secret).await?;
    }
    // Before the app starts, so that start-up work (expiring holds) is counted too.
    allot_http::ops::metrics_handle();
    let (provider, test_reports) = payment_provider(secrets.stripe)?;
    let app = App::start(store, Arc::new(SystemClock), provider).await?;
    if settings.demo {
        let summary = allot_app::demo::load(&app).await?;
        println!("{summary}");
        // `tok_async` payments are reported by the provider's events, signed with this (README,
        // Payments), for anyone sending one by hand.
        if webhook_secret_configured.is_none() {
            let path = format!("/api/v1/payments/webhooks/{}", app.payments.name());
            println!("payment events (POST {path}) are signed with {}", app.webhook_secret());
        }
    }
    let listener = allot_http::listen(&settings.listen).await?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to find the port when listening on port 0.
    println!("allot listening on http://{addr}");
    if let Some(reports) = test_reports {
        tokio::spawn(allot_http::routes::payments::send_test_reports(Arc::downgrade(&app), addr, reports));
    }
    let limits = &settings.rate_limits;
    let shared = limits.redis_url.is_some();
    tracing::info!(%addr, database_url = %settings.database_url, rate_limits = limits.enabled, rate_limits_shared = shared, "serving");
    allot_http::serve(listener, app, &settings.http_options(), shutdown_signal()).await?;
    tracing::info!("shut down cleanly");
    Ok(())
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
