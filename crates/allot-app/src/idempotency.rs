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
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;

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

/// What starts a stored answer that is sealed ([`ReplaySeal`]); a plain one is JSON or empty.
const SEALED_PREFIX: &[u8] = b"allot-sealed-v1\0";

/// Seals stored answers that carry live credentials (a login's tokens, a new API key), so
/// that the replay table alone (a partial dump, a log of its rows) gives none away:
/// ChaCha20-Poly1305 under a key derived from the token secret, bound to its key's principal
/// and name. Someone who can read the token secret could mint tokens anyway.
pub struct ReplaySeal(LessSafeKey);

impl std::fmt::Debug for ReplaySeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplaySeal")
    }
}

impl ReplaySeal {
    pub fn from_secret(secret: &[u8]) -> ReplaySeal {
        let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), b"allot idempotent replay seal v1");
        let key = UnboundKey::new(&CHACHA20_POLY1305, derived.as_ref()).expect("an HMAC-SHA256 tag is a 32-byte key");
        ReplaySeal(LessSafeKey::new(key))
    }

    fn aad(key: &IdempotencyKey) -> Aad<Vec<u8>> {
        Aad::from([key.principal.as_bytes(), b"\n", key.key.as_bytes()].concat())
    }

    fn seal(&self, key: &IdempotencyKey, body: &[u8]) -> AppResult<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let mut sealed = body.to_vec();
        self.0
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Self::aad(key), &mut sealed)
            .map_err(|_| AppError::Internal("sealing a stored answer failed".into()))?;
        Ok([SEALED_PREFIX, &nonce, &sealed].concat())
    }

    /// The stored answer as sent: opened if sealed.
    fn open(&self, key: &IdempotencyKey, stored: Vec<u8>) -> AppResult<Vec<u8>> {
        let Some(rest) = stored.strip_prefix(SEALED_PREFIX) else { return Ok(stored) };
        let unreadable = || AppError::Internal("a sealed stored answer cannot be opened".into());
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN).ok_or_else(unreadable)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| unreadable())?;
        let mut opened = sealed.to_vec();
        let body = self.0.open_in_place(nonce, Self::aad(key), &mut opened).map_err(|_| unreadable())?;
        Ok(body.to_vec())
    }
}

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
        check_key(key)?;
        let begun = self.store.idempotency_begin(key, self.clock.now(), LOCK_SECONDS).await?;
        self.admission(key, begun)
    }

    /// What to do with attempt `key`, given what taking its key found.
    pub(crate) fn admission(&self, key: &IdempotencyKey, begun: IdempotencyBegin) -> AppResult<Admission> {
        match begun {
            IdempotencyBegin::Started => Ok(Admission::Run),
            IdempotencyBegin::InProgress => Err(AppError::IdempotencyKeyInUse),
            IdempotencyBegin::Mismatch => Err(AppError::IdempotencyKeyReused),
            IdempotencyBegin::Completed { request_hash, .. } | IdempotencyBegin::Recover { request_hash, .. }
                if request_hash != key.request_hash =>
            {
                Err(AppError::IdempotencyKeyReused)
            }
            IdempotencyBegin::Completed { status, body, .. } => {
                Ok(Admission::Replay { status, body: self.replay_seal.open(key, body)? })
            }
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

    /// [`App::idempotency_finish`] for an answer that carries live credentials: stored sealed
    /// ([`ReplaySeal`]), replayed as sent.
    pub async fn idempotency_finish_sealed(&self, key: &IdempotencyKey, status: u16, body: &[u8]) -> AppResult<()> {
        let sealed = self.replay_seal.seal(key, body)?;
        self.idempotency_finish(key, status, &sealed).await
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

/// Refuses a key no store keeps: empty, longer than [`KEY_LEN_MAX`], or not ASCII.
pub fn check_key(key: &IdempotencyKey) -> AppResult<()> {
    if key.key.is_empty() || key.key.len() > KEY_LEN_MAX || !key.key.is_ascii() {
        let message = format!("must be 1 to {KEY_LEN_MAX} ASCII characters");
        return Err(allot_core::ValidationError::field("Idempotency-Key", message).into());
    }
    Ok(())
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
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn key(principal: &str, name: &str) -> IdempotencyKey {
        IdempotencyKey { principal: principal.into(), key: name.into(), request_hash: "h".into(), owner: "o".into() }
    }

    #[test]
    fn a_sealed_answer_opens_only_under_its_own_key_and_secret() {
        let seal = ReplaySeal::from_secret(&[7; 32]);
        let body = br#"{"access_token":"eyJ.secret","refresh_token":"r"}"#;
        let mine = key("anonymous:127.0.0.1", "login-1");
        let sealed = seal.seal(&mine, body).unwrap();
        assert!(sealed.starts_with(SEALED_PREFIX));
        assert!(!sealed.windows(10).any(|w| w == b"eyJ.secret"), "the credentials are not stored readable");
        assert_ne!(seal.seal(&mine, body).unwrap(), sealed, "a fresh nonce each time");
        assert_eq!(seal.open(&mine, sealed.clone()).unwrap(), body);
        // Moved to another key's row, or read under another secret, it does not open.
        assert!(seal.open(&key("anonymous:127.0.0.1", "login-2"), sealed.clone()).is_err());
        assert!(seal.open(&key("user:1", "login-1"), sealed.clone()).is_err());
        assert!(ReplaySeal::from_secret(&[8; 32]).open(&mine, sealed.clone()).is_err());
        let mut tampered = sealed;
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(seal.open(&mine, tampered).is_err());
        // Plain answers pass through; a cut-off sealed one is refused, not panicked on.
        assert_eq!(seal.open(&mine, b"{}".to_vec()).unwrap(), b"{}");
        assert!(seal.open(&mine, [SEALED_PREFIX, b"short"].concat()).is_err());
    }

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
