//! Idempotent POSTs (I4): the first response to a key is stored and replayed for 24 h.
//!
//! An attempt holds its key on a lease ([`LOCK_SECONDS`]) that it renews while it runs
//! ([`App::idempotency_renew`]), so only a dead attempt loses it. Its first kept change marks
//! the key in the same transaction (`IdempotencyMark`): if its answer is then never stored,
//! the retry that takes the key over answers from what was changed ([`Admission::Recover`])
//! instead of changing it a second time.

use std::sync::Arc;

use allot_core::booking::Booking;
use allot_core::inventory::{Event, Resource, Venue};
use jiff::SignedDuration;

use crate::App;
use crate::error::{AppError, AppResult, StoreError};
use crate::store::{IdempotencyBegin, IdempotencyKey, User};

pub const KEY_LEN_MAX: usize = 255;
pub const RETENTION_SECONDS: i64 = 24 * 3600;
/// A request that held a key this long without finishing or renewing it (its node died)
/// releases it.
pub const LOCK_SECONDS: u32 = 60;
/// A running request renews its lease once this much of it has passed.
pub const RENEW_AFTER_SECONDS: i64 = LOCK_SECONDS as i64 / 3;
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
    /// Do not run it: an earlier attempt changed `target` and its answer was lost. Answer from
    /// `target` as it now is, then call `finish` (or `abandon` if that cannot be done now).
    Recover { target: String },
}

/// What a keyed request changes, by its route: where a retry finds it ([`Admission::Recover`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangedKind {
    Booking,
    Venue,
    Resource,
    Event,
    User,
}

/// What a keyed request changed, as it now is.
#[derive(Debug, Clone)]
pub enum Changed {
    Booking(Booking),
    Venue(Arc<Venue>),
    Resource(Arc<Resource>),
    Event(Arc<Event>),
    User(User),
}

impl App {
    /// The `target` (a [`ChangedKind`]) that an earlier attempt under the caller's key changed,
    /// as it now is: the answer to [`Admission::Recover`]. No access check: the key is the
    /// caller's own, and the caller's request made the change.
    pub async fn idempotency_recover(&self, kind: ChangedKind, target: &str) -> AppResult<Changed> {
        fn id<T: std::str::FromStr>(kind: ChangedKind, target: &str) -> AppResult<T> {
            target.parse().map_err(|_| AppError::Internal(format!("an idempotency mark names no {kind:?}: {target}")))
        }
        Ok(match kind {
            ChangedKind::Booking => {
                let booking = self.store.booking(id(kind, target)?).await?;
                Changed::Booking(booking.ok_or(AppError::NotFound("booking"))?)
            }
            ChangedKind::Venue => Changed::Venue(self.venue(id(kind, target)?).await?),
            ChangedKind::Resource => Changed::Resource(self.resource(id(kind, target)?).await?),
            ChangedKind::Event => Changed::Event(self.event(id(kind, target)?).await?),
            ChangedKind::User => {
                let user = self.store.user_by_id(id(kind, target)?).await?;
                Changed::User(user.ok_or(AppError::NotFound("user"))?)
            }
        })
    }

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
            IdempotencyBegin::Completed { request_hash, .. } | IdempotencyBegin::Recover { request_hash, .. }
                if request_hash != key.request_hash =>
            {
                Err(AppError::IdempotencyKeyReused)
            }
            IdempotencyBegin::Completed { status, body, .. } => Ok(Admission::Replay { status, body }),
            IdempotencyBegin::Recover { target, .. } => Ok(Admission::Recover { target }),
        }
    }

    /// Extends the lease of the attempt `key.owner` on `key` by [`LOCK_SECONDS`] from now;
    /// false when the attempt no longer holds the key (its lease ran out and a retry took it).
    pub async fn idempotency_renew(&self, key: &IdempotencyKey) -> AppResult<bool> {
        let until = self.clock.now().checked_add(SignedDuration::from_secs(i64::from(LOCK_SECONDS)));
        let until = until.map_err(|e| AppError::Internal(e.to_string()))?;
        Ok(self.store.idempotency_renew(key, until).await?)
    }

    /// Stores the response to `key`'s request, retrying a busy or overloaded store: an outcome
    /// not stored leaves the key locked for [`LOCK_SECONDS`], after which a retry runs the
    /// request again.
    pub async fn idempotency_finish(&self, key: &IdempotencyKey, status: u16, body: &[u8]) -> AppResult<()> {
        Ok(with_retries(STORE_BACKOFF_MS, || self.store.idempotency_complete(key, status, body)).await?)
    }

    /// Releases `key` for a retry (its request failed in a way worth retrying), retrying a busy
    /// or overloaded store.
    pub async fn idempotency_abandon(&self, key: &IdempotencyKey) -> AppResult<()> {
        Ok(with_retries(STORE_BACKOFF_MS, || self.store.idempotency_abandon(key)).await?)
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
/// [`STORE_ATTEMPTS_MAX`] times, waiting `backoff_ms` doubled before each retry.
async fn with_retries<F, Fut>(backoff_ms: u64, mut write: F) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match write().await {
            Err(StoreError::Busy(_) | StoreError::Overloaded) if attempt < STORE_ATTEMPTS_MAX => {
                tokio::time::sleep(std::time::Duration::from_millis(backoff_ms << attempt)).await;
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// `with_retries` over a store that answers `failures` busy/overloaded, then succeeds:
    /// (result, attempts made).
    async fn attempts_against(failures: u32, error: StoreError) -> (Result<(), StoreError>, u32) {
        let calls = AtomicU32::new(0);
        let result = with_retries(0, || {
            let call = calls.fetch_add(1, Ordering::Relaxed) + 1;
            let answer = if call <= failures { Err(error.clone()) } else { Ok(()) };
            std::future::ready(answer)
        })
        .await;
        (result, calls.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn a_busy_or_overloaded_store_is_retried_up_to_the_limit_and_no_further() {
        let busy = StoreError::Busy("lock timeout".into());
        for (failures, error, attempts) in [
            (0, busy.clone(), 1),
            (3, busy.clone(), STORE_ATTEMPTS_MAX),
            (3, StoreError::Overloaded, STORE_ATTEMPTS_MAX),
        ] {
            let (result, made) = attempts_against(failures, error).await;
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(made, attempts);
        }
        let (result, attempts) = attempts_against(STORE_ATTEMPTS_MAX, busy).await;
        assert!(matches!(result, Err(StoreError::Busy(_))), "{result:?}");
        assert_eq!(attempts, STORE_ATTEMPTS_MAX);
        // Any other failure is final at once.
        let (result, attempts) = attempts_against(1, StoreError::Database("broken".into())).await;
        assert!(matches!(result, Err(StoreError::Database(_))), "{result:?}");
        assert_eq!(attempts, 1);
    }
}
