//! Idempotent POSTs (I4): the first response to a key is stored and replayed for 24 h.

use jiff::SignedDuration;

use crate::App;
use crate::error::{AppError, AppResult};
use crate::store::{IdempotencyBegin, IdempotencyKey};

pub const KEY_LEN_MAX: usize = 255;
pub const RETENTION_SECONDS: i64 = 24 * 3600;
/// A request that held a key this long without finishing (its node died) releases it.
pub const LOCK_SECONDS: u32 = 60;
pub const CLEANUP_BATCH_MAX: u32 = 1000;

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

    pub async fn idempotency_finish(&self, key: &IdempotencyKey, status: u16, body: &[u8]) -> AppResult<()> {
        Ok(self.store.idempotency_complete(key, status, body).await?)
    }

    pub async fn idempotency_abandon(&self, key: &IdempotencyKey) -> AppResult<()> {
        Ok(self.store.idempotency_abandon(key).await?)
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
