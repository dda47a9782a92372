//! The circuit breaker around the payment provider (SPEC §5, Commerce). [`Guarded`] wraps the
//! provider every use case calls: each call is bounded by [`PROVIDER_CALL_TIMEOUT_SECONDS`];
//! after [`BREAKER_FAILURES_MAX`] failures in a row (the provider unavailable, or silent) the
//! circuit opens, and for [`BREAKER_OPEN_SECONDS`] every call fails at once with
//! [`ProviderError::CircuitOpen`] instead of waiting on a provider that is down (a confirm
//! answers 503 at once; a refund is left to the reconciler). Then one call is let through as a
//! trial: its success closes the circuit, its failure opens it again.
//!
//! A declined card or a refused token is the provider answering: it counts as a success. Each
//! node has its own breaker, on the app's clock.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use jiff::{SignedDuration, Timestamp};

use crate::clock::Clock;
use crate::payments::{ChargeOutcome, ChargeRequest, PaymentProvider, ProviderError, RefundRequest};
use crate::telemetry;

/// Failures in a row that open the circuit.
pub const BREAKER_FAILURES_MAX: u32 = 5;
/// How long an open circuit refuses calls before it lets one through as a trial.
pub const BREAKER_OPEN_SECONDS: i64 = 30;
/// How long one call to the provider may take before it counts as failed.
pub const PROVIDER_CALL_TIMEOUT_SECONDS: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed {
        failures: u32,
    },
    Open {
        until: Timestamp,
    },
    /// One call let through; the others are refused until it ends, or until `until` if it
    /// never reports (its caller dropped it).
    Trial {
        until: Timestamp,
    },
}

impl Circuit {
    /// Whether a call may go to the provider at `now`.
    fn admit(&mut self, now: Timestamp) -> bool {
        match *self {
            Circuit::Closed { .. } => true,
            Circuit::Open { until } | Circuit::Trial { until } if now >= until => {
                let timeout = SignedDuration::from_secs(PROVIDER_CALL_TIMEOUT_SECONDS.cast_signed());
                *self = Circuit::Trial { until: now.saturating_add(timeout).unwrap_or(now) };
                true
            }
            Circuit::Open { .. } | Circuit::Trial { .. } => false,
        }
    }

    /// Records how an admitted call ended; whether that opened the circuit.
    fn record(&mut self, failed: bool, now: Timestamp) -> bool {
        let next = match (*self, failed) {
            (_, false) => Circuit::Closed { failures: 0 },
            (Circuit::Closed { failures }, true) if failures + 1 < BREAKER_FAILURES_MAX => {
                Circuit::Closed { failures: failures + 1 }
            }
            // Already open: a call admitted before it opened ended late.
            (Circuit::Open { until }, true) => Circuit::Open { until },
            (Circuit::Closed { .. } | Circuit::Trial { .. }, true) => {
                let open = SignedDuration::from_secs(BREAKER_OPEN_SECONDS);
                Circuit::Open { until: now.saturating_add(open).unwrap_or(now) }
            }
        };
        let opened = matches!(next, Circuit::Open { .. }) && !matches!(*self, Circuit::Open { .. });
        *self = next;
        opened
    }
}

/// The provider behind its circuit breaker and call timeout.
pub struct Guarded {
    inner: Arc<dyn PaymentProvider>,
    clock: Arc<dyn Clock>,
    circuit: Mutex<Circuit>,
}

impl Guarded {
    pub fn new(inner: Arc<dyn PaymentProvider>, clock: Arc<dyn Clock>) -> Guarded {
        Guarded { inner, clock, circuit: Mutex::new(Circuit::Closed { failures: 0 }) }
    }

    fn circuit(&self) -> std::sync::MutexGuard<'_, Circuit> {
        self.circuit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn call<T, F>(&self, call: F) -> Result<T, ProviderError>
    where
        F: std::future::Future<Output = Result<T, ProviderError>>,
    {
        if !self.circuit().admit(self.clock.now()) {
            return Err(ProviderError::CircuitOpen);
        }
        let timeout = Duration::from_secs(PROVIDER_CALL_TIMEOUT_SECONDS);
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::Unavailable(format!("no answer in {PROVIDER_CALL_TIMEOUT_SECONDS} s"))),
        };
        let failed = matches!(result, Err(ProviderError::Unavailable(_)));
        if self.circuit().record(failed, self.clock.now()) {
            metrics::counter!(telemetry::PAYMENT_CIRCUIT_OPENED).increment(1);
            tracing::error!(
                failures = BREAKER_FAILURES_MAX,
                open_seconds = BREAKER_OPEN_SECONDS,
                "the payment provider keeps failing: circuit open"
            );
        }
        result
    }
}

#[async_trait]
impl PaymentProvider for Guarded {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn charge(&self, request: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
        self.call(self.inner.charge(request)).await
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        self.call(self.inner.refund(request)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("ts")
    }

    #[test]
    fn failures_in_a_row_open_the_circuit_and_a_trial_closes_it() {
        let mut c = Circuit::Closed { failures: 0 };
        for _ in 1..BREAKER_FAILURES_MAX {
            assert!(c.admit(at(0)));
            assert!(!c.record(true, at(0)));
        }
        assert!(c.admit(at(0)));
        assert!(c.record(true, at(0)), "the last failure in a row opens it");
        assert!(!c.admit(at(BREAKER_OPEN_SECONDS - 1)), "open: refused");
        assert!(c.admit(at(BREAKER_OPEN_SECONDS)), "the trial");
        assert!(!c.admit(at(BREAKER_OPEN_SECONDS)), "one trial at a time");
        assert!(!c.record(false, at(BREAKER_OPEN_SECONDS + 1)));
        assert_eq!(c, Circuit::Closed { failures: 0 }, "a trial that succeeds closes it");
    }

    #[test]
    fn a_success_resets_the_count_and_a_failed_trial_opens_it_again() {
        let mut c = Circuit::Closed { failures: BREAKER_FAILURES_MAX - 1 };
        c.record(false, at(0));
        assert_eq!(c, Circuit::Closed { failures: 0 }, "in a row, not in all");
        let mut c = Circuit::Open { until: at(30) };
        assert!(c.admit(at(30)));
        assert!(c.record(true, at(31)), "opened again");
        assert_eq!(c, Circuit::Open { until: at(31 + BREAKER_OPEN_SECONDS) });
    }

    #[test]
    fn a_trial_whose_caller_went_away_is_not_waited_for_forever() {
        let mut c = Circuit::Open { until: at(30) };
        assert!(c.admit(at(30)), "the trial, never reported");
        let timeout = PROVIDER_CALL_TIMEOUT_SECONDS.cast_signed();
        assert!(!c.admit(at(30 + timeout - 1)));
        assert!(c.admit(at(30 + timeout)), "another trial once the first could no longer be running");
    }
}
