//! Idempotent POSTs (I4): the first response to a key is stored and replayed for 24 h.

use jiff::SignedDuration;

use crate::App;
use crate::error::{AppError, AppResult, StoreError};
use crate::store::{IdempotencyBegin, IdempotencyKey};

pub const KEY_LEN_MAX: usize = 255;
pub const RETENTION_SECONDS: i64 = 24 * 3600;
/// A request that held a key this long without finishing (its node died) releases it.
pub const LOCK_SECONDS: u32 = 60;
pub const CLEANUP_BATCH_MAX: u32 = 1000;
/// Attempts at storing a request's outcome (or releasing its key) while the store is busy or
/// overloaded, and the backoff before the second.
pub const STORE_ATTEMPTS_MAX: u32 = 4;
pub const STORE_BACKOFF_MS: u64 = 50;

/// What to do with a request that carries a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Run it; then call `finish` (or `abandon` if it failed in a way worth retrying).
    Run,
    /// Answer with the stored response.
    Replay { status: u16, body: Vec<u8> },
}

impl App {
    pub async fn idempotency_admit(&self, key: &IdempotencyKey) -> AppResult<Admission> {
        if key.key.is_empty() || key.key.len() > KEY_LEN_MAX || !key.key.is_ascii() {
            return Err(allot_core::ValidationError::field(
                "Idempotency-Key",
                format!("must be 1 to {KEY_LEN_MAX} ASCII characters"),
            )
            .into());
        }
        match self.store.idempotency_begin(key, self.clock.now(), LOCK_SECONDS).await? {
            IdempotencyBegin::Started => Ok(Admission::Run),
            IdempotencyBegin::InProgress => Err(AppError::IdempotencyKeyInUse),
            IdempotencyBegin::Mismatch => Err(AppError::IdempotencyKeyReused),
            IdempotencyBegin::Completed { request_hash, status, body } => {
                if request_hash == key.request_hash {
                    Ok(Admission::Replay { status, body })
                } else {
                    Err(AppError::IdempotencyKeyReused)
                }
            }
        }
    }

    /// Stores the response to `key`'s request, retrying a busy or overloaded store: an outcome
    /// not stored leaves the key locked for [`LOCK_SECONDS`], after which a retry runs the
    /// request again.
    pub async fn idempotency_finish(&self, key: &IdempotencyKey, status: u16, body: &[u8]) -> AppResult<()> {
        Ok(with_retries(|| self.store.idempotency_complete(key, status, body)).await?)
    }

    /// Releases `key` for a retry (its request failed in a way worth retrying), retrying a busy
    /// or overloaded store.
    pub async fn idempotency_abandon(&self, key: &IdempotencyKey) -> AppResult<()> {
        Ok(with_retries(|| self.store.idempotency_abandon(key)).await?)
    }

    /// Deletes keys older than the retention period; returns how many went.
    pub async fn idempotency_cleanup(&self) -> AppResult<u64> {
        let before = self.clock.now().checked_sub(SignedDuration::from_secs(RETENTION_SECONDS)).unwrap_or_default();
        let mut total = 0;
        loop {
            let n = self.store.idempotency_cleanup(before, CLEANUP_BATCH_MAX).await?;
            total += n;
            if n < u64::from(CLEANUP_BATCH_MAX) {
                return Ok(total);
            }
        }
    }
}

/// Runs `write` until it succeeds, fails for good, or has been busy or overloaded
/// [`STORE_ATTEMPTS_MAX`] times.
async fn with_retries<F, Fut>(mut write: F) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match write().await {
            Err(StoreError::Busy(_) | StoreError::Overloaded) if attempt < STORE_ATTEMPTS_MAX => {
                tokio::time::sleep(std::time::Duration::from_millis(STORE_BACKOFF_MS << attempt)).await;
            }
            done => return done,
        }
    }
}
