//! Time as an injected dependency, so expiry can be tested without sleeping.
//!
//! Two readings: [`Clock::now`], the wall clock, for what is stored and compared across
//! nodes; and [`Clock::elapsed`], monotonic, for a node's own waits (the payment breaker),
//! which a wall clock stepped back by NTP would otherwise stretch.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::sync::watch;

pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
    /// Time since an origin of this clock's own, never going back.
    fn elapsed(&self) -> Duration;
    /// Completes once `now() >= deadline`.
    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
    fn elapsed(&self) -> Duration {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed()
    }
    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_> {
        Box::pin(async move {
            let wait = deadline.duration_since(Timestamp::now());
            if let Ok(wait) = std::time::Duration::try_from(wait) {
                tokio::time::sleep(wait).await;
            }
        })
    }
}

/// A clock that moves only when told to; sleepers wake when it passes their deadline.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Timestamp>,
    /// What [`Clock::elapsed`] reads: the sum of the steps forward.
    elapsed: Mutex<Duration>,
    ticks: watch::Sender<Timestamp>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self { now: Mutex::new(start), elapsed: Mutex::new(Duration::ZERO), ticks: watch::Sender::new(start) }
    }

    pub fn advance(&self, by: jiff::SignedDuration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = now.checked_add(by).unwrap_or(*now);
        self.ticks.send_replace(*now);
        if let Ok(forward) = Duration::try_from(by) {
            let mut elapsed = self.elapsed.lock().unwrap_or_else(|e| e.into_inner());
            *elapsed = elapsed.saturating_add(forward);
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// The steps forward only: a test stepping the wall clock back moves no monotonic time.
    fn elapsed(&self) -> Duration {
        *self.elapsed.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn sleep_until(&self, deadline: Timestamp) -> Sleep<'_> {
        let mut rx = self.ticks.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|now| *now >= deadline).await;
        })
    }
}
