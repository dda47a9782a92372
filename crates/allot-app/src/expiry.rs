//! Hold expiry (I2): a timer on the nearest `expires_at`, fed by every new hold, with a periodic
//! sweep as a safety net and a catch-up pass at start-up for holds that expired while down.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use allot_core::ids::BookingId;
use jiff::Timestamp;
use tokio::sync::mpsc;

use crate::App;

/// Pending expiries kept in memory; beyond this the sweep finds the rest.
pub const HEAP_ENTRIES_MAX: usize = 1_000_000;
/// I2 allows a lapsed hold one second: the timer serves the holds this node scheduled, the
/// sweep every other one (another node's, one past the heap or the start-up read, one whose
/// request was dropped between its commit and `schedule`). A sweep with nothing due is one
/// indexed read in a write job.
pub const SWEEP_INTERVAL_SECONDS: u64 = 1;
const RELOAD_BATCH: u32 = 10_000;
/// New holds taken from the channel per wake-up (one turn of the loop, and one new timer, per
/// batch of holds rather than per hold).
const RECEIVE_BATCH_MAX: usize = 1_024;

/// Tells the scheduler about new holds. Cheap to clone; never blocks the request path.
#[derive(Debug, Clone)]
pub struct ExpiryHandle {
    tx: mpsc::UnboundedSender<(Timestamp, BookingId)>,
}

impl ExpiryHandle {
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<(Timestamp, BookingId)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    pub fn schedule(&self, id: BookingId, expires_at: Timestamp) {
        // A closed channel means shutdown; the start-up pass of the next run handles the hold.
        let _ = self.tx.send((expires_at, id));
    }
}

/// Runs until the app is dropped and the channel closes.
pub async fn run(app: Arc<App>, mut rx: mpsc::UnboundedReceiver<(Timestamp, BookingId)>) {
    let mut heap: BinaryHeap<Reverse<(Timestamp, BookingId)>> = BinaryHeap::new();
    release_due(&app).await;
    reload(&app, &mut heap).await;
    let mut arrived = Vec::with_capacity(RECEIVE_BATCH_MAX);
    let mut sweep = tokio::time::interval(Duration::from_secs(SWEEP_INTERVAL_SECONDS));
    sweep.tick().await;
    loop {
        let next = heap.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            received = rx.recv_many(&mut arrived, RECEIVE_BATCH_MAX) => {
                if received == 0 {
                    return;
                }
                let room = HEAP_ENTRIES_MAX.saturating_sub(heap.len());
                heap.extend(arrived.drain(..).take(room).map(Reverse));
            }
            () = sleep_until(&app, next) => {
                let now = app.clock.now();
                while heap.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                    heap.pop();
                }
                release_due(&app).await;
            }
            _ = sweep.tick() => {
                release_due(&app).await;
                if heap.is_empty() {
                    reload(&app, &mut heap).await;
                }
            }
        }
    }
}

async fn sleep_until(app: &App, deadline: Option<Timestamp>) {
    match deadline {
        Some(at) => app.clock.sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn release_due(app: &App) {
    let released = app.expire_due().await;
    let outcome = if released.is_ok() { "ok" } else { "error" };
    metrics::counter!(crate::telemetry::EXPIRY_RUNS, "outcome" => outcome).increment(1);
    match released {
        Ok(0) => {}
        Ok(n) => tracing::info!(released = n, "expired holds released"),
        Err(e) => tracing::error!(error = %e, "releasing expired holds failed; the sweep will retry"),
    }
}

async fn reload(app: &App, heap: &mut BinaryHeap<Reverse<(Timestamp, BookingId)>>) {
    match app.store.upcoming_expiries(RELOAD_BATCH).await {
        Ok(entries) => heap.extend(entries.into_iter().map(|(id, at)| Reverse((at, id)))),
        Err(e) => tracing::error!(error = %e, "loading upcoming expiries failed"),
    }
}
