//! Allot's use cases. [`App`] is the one entry point the HTTP layer and the binary call: it
//! owns the store (a [`store::Store`]), the injected [`clock::Clock`], the payment provider
//! and the background jobs (hold expiry, idempotency clean-up, refunds owed), and applies the
//! provider's payment events (`webhooks`).

pub mod access;
pub mod audit;
pub mod auth;
pub mod bookings;
pub mod breaker;
pub mod catalog;
pub mod clock;
pub mod demo;
pub mod error;
pub mod expiry;
pub mod idempotency;
pub mod payments;
pub mod pending;
pub mod refunds;
pub mod seat_maps;
pub mod store;
pub mod telemetry;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

pub use error::{AppError, AppResult, StoreError};

use crate::auth::TokenKeys;
use crate::clock::Clock;
use crate::expiry::ExpiryHandle;
use crate::payments::PaymentProvider;
use crate::store::Store;

/// How often expired idempotency keys are deleted.
pub const IDEMPOTENCY_CLEANUP_INTERVAL_SECONDS: u64 = 3600;

pub struct App {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub payments: Arc<dyn PaymentProvider>,
    keys: TokenKeys,
    replay_seal: idempotency::ReplaySeal,
    /// Verified against when a login names an unknown account (constant work either way).
    dummy_hash: String,
    expiry: ExpiryHandle,
    seat_maps: seat_maps::SeatMapCache,
    /// The payment provider's signing secret as last read (`webhooks`).
    webhook_secret: std::sync::Mutex<String>,
}

impl App {
    /// Builds the app and starts its background jobs on the current Tokio runtime.
    pub async fn start(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        payments: Arc<dyn PaymentProvider>,
    ) -> AppResult<Arc<App>> {
        // The signing secret lives in the database so tokens survive restarts and are shared by
        // every node of a cluster.
        let secret = store.setting_or_insert("token_secret", &auth::random_token()).await?;
        let keys = TokenKeys::from_secret(secret.as_bytes());
        let replay_seal = idempotency::ReplaySeal::from_secret(secret.as_bytes());
        // Every use case calls the provider through its circuit breaker and call timeout.
        let payments: Arc<dyn PaymentProvider> = Arc::new(breaker::Guarded::new(payments, clock.clone()));
        let webhook_secret =
            store.setting_or_insert(webhooks::WEBHOOK_SECRET_SETTING, &webhooks::new_webhook_secret()).await?;
        let dummy_hash = auth::hash_password(auth::random_token()).await?;
        let (expiry, expiry_rx) = ExpiryHandle::channel();
        let seat_maps = seat_maps::SeatMapCache::default();
        let webhook_secret = std::sync::Mutex::new(webhook_secret);
        let app =
            Arc::new(App { store, clock, payments, keys, replay_seal, dummy_hash, expiry, seat_maps, webhook_secret });
        tokio::spawn(expiry::run(app.clone(), expiry_rx));
        tokio::spawn(cleanup_loop(Arc::downgrade(&app)));
        tokio::spawn(refunds::run(Arc::downgrade(&app)));
        tokio::spawn(pending::run(Arc::downgrade(&app)));
        Ok(app)
    }
}

/// Runs `job` every `period`, the first time one period after start, until the app is dropped.
pub(crate) async fn every<F, Fut>(app: std::sync::Weak<App>, period: Duration, job: F)
where
    F: Fn(Arc<App>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        job(app).await;
    }
}

async fn cleanup_loop(app: std::sync::Weak<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(IDEMPOTENCY_CLEANUP_INTERVAL_SECONDS));
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        match app.idempotency_cleanup().await {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "expired idempotency keys deleted"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "idempotency clean-up failed"),
        }
    }
}
