//! Rendered seat maps, kept per event while nothing they show can have changed.
//!
//! A seat map is the hottest read of a sale (every client re-reads it after a refused hold),
//! and most of its cost is reading and rendering a few hundred seats that did not change. A
//! body is kept with the store's [`SeatVersion`] of the event's seats, read before the seats
//! and their states were, and with the earliest expiry among the holds it shows: it is served
//! again only while the version is unchanged and that expiry has not come. Stores that cannot
//! know every write (PostgreSQL, several nodes) give no version, and nothing is kept.
//!
//! During a sale the version moves with every hold, and every reader that missed used to
//! render the same map at once (a flash sale's 900 re-reads took a p50 of 300 ms on two cores).
//! Renders of one event now take turns ([`SeatMapCache::render_turn`]), and a reader waiting
//! its turn is served any body rendered at or after the version it saw when it arrived: that
//! body shows every write acknowledged before the request, so it is as fresh as one of its own.
//!
//! The app keeps the body as opaque bytes; only the HTTP layer knows what they say.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use allot_core::ids::EventId;
use jiff::Timestamp;

use crate::store::SeatVersion;

/// Bytes of rendered seat maps kept at most; past it the cache is emptied rather than grown.
pub const SEAT_MAP_CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Locks that events' renders take turns on (an event always uses the same one; two events
/// sharing one wait for each other, which is rare and short).
const RENDER_TURNS: usize = 64;

struct Entry {
    version: SeatVersion,
    until: Option<Timestamp>,
    body: Arc<[u8]>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<EventId, Entry>,
    bytes: usize,
}

pub struct SeatMapCache {
    inner: Mutex<Inner>,
    turns: Box<[tokio::sync::Mutex<()>]>,
}

impl Default for SeatMapCache {
    fn default() -> Self {
        let turns = (0..RENDER_TURNS).map(|_| tokio::sync::Mutex::new(())).collect();
        SeatMapCache { inner: Mutex::default(), turns }
    }
}

/// Both parts of a version only grow: a body rendered at `rendered` shows every write that
/// `seen` counts.
fn not_older(rendered: SeatVersion, seen: SeatVersion) -> bool {
    rendered.0 >= seen.0 && rendered.1 >= seen.1
}

impl SeatMapCache {
    /// The body kept for `event` if it was rendered at `seen` or later and no hold it shows
    /// has expired by `now`.
    pub fn get(&self, event: EventId, seen: SeatVersion, now: Timestamp) -> Option<Arc<[u8]>> {
        let inner = self.lock();
        let entry = inner.entries.get(&event)?;
        let current = not_older(entry.version, seen) && entry.until.is_none_or(|until| now < until);
        current.then(|| entry.body.clone())
    }

    /// Held while rendering `event`, so that readers who missed together render once.
    pub async fn render_turn(&self, event: EventId) -> tokio::sync::MutexGuard<'_, ()> {
        let stripe = (event.as_uuid().as_u128() % RENDER_TURNS as u128) as usize;
        self.turns[stripe].lock().await
    }

    pub fn put(&self, event: EventId, version: SeatVersion, until: Option<Timestamp>, body: Arc<[u8]>) {
        if body.len() > SEAT_MAP_CACHE_BYTES_MAX / 16 {
            return; // one huge venue must not push every other seat map out
        }
        let mut inner = self.lock();
        if inner.bytes + body.len() > SEAT_MAP_CACHE_BYTES_MAX {
            inner.entries.clear();
            inner.bytes = 0;
        }
        inner.bytes += body.len();
        if let Some(old) = inner.entries.insert(event, Entry { version, until, body }) {
            inner.bytes -= old.body.len();
        }
        assert!(inner.bytes <= SEAT_MAP_CACHE_BYTES_MAX, "the seat map cache stays within its limit");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn a_body_is_served_only_at_its_version_and_before_its_first_hold_expires() {
        let cache = SeatMapCache::default();
        let event = EventId::new();
        let body: Arc<[u8]> = Arc::from(&b"map"[..]);
        cache.put(event, (1, 7), Some(at(100)), body.clone());
        assert_eq!(cache.get(event, (1, 7), at(99)).as_deref(), Some(&b"map"[..]));
        assert!(cache.get(event, (1, 6), at(99)).is_some(), "rendered after the reader arrived");
        assert!(cache.get(event, (0, 7), at(99)).is_some(), "rendered after the reader arrived");
        assert!(cache.get(event, (1, 7), at(100)).is_none(), "a hold it shows has expired");
        assert!(cache.get(event, (1, 8), at(0)).is_none(), "a write touched a seat");
        assert!(cache.get(event, (2, 7), at(0)).is_none(), "the catalogue changed");
        assert!(cache.get(EventId::new(), (1, 7), at(0)).is_none());
        cache.put(event, (1, 8), None, body);
        assert!(cache.get(event, (1, 8), at(i64::from(i32::MAX))).is_some(), "no hold: no expiry");
    }

    #[test]
    fn the_cache_stays_within_its_byte_limit() {
        let cache = SeatMapCache::default();
        let body: Arc<[u8]> = Arc::from(vec![0_u8; SEAT_MAP_CACHE_BYTES_MAX / 16]);
        for _ in 0..40 {
            cache.put(EventId::new(), (0, 0), None, body.clone());
        }
        assert!(cache.lock().bytes <= SEAT_MAP_CACHE_BYTES_MAX);
        let too_big: Arc<[u8]> = Arc::from(vec![0_u8; SEAT_MAP_CACHE_BYTES_MAX / 16 + 1]);
        let event = EventId::new();
        cache.put(event, (0, 0), None, too_big);
        assert!(cache.get(event, (0, 0), at(0)).is_none());
    }
}
