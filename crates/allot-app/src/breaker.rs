//! The circuit breaker around the payment provider (SPEC §5, Commerce). [`Guarded`] wraps the
//! provider every use case calls: each call is bounded by [`PROVIDER_CALL_TIMEOUT_SECONDS`];
//! after [`BREAKER_FAILURES_MAX`] failures in a row (the provider unavailable, or silent) the
//! circuit opens, and for [`BREAKER_OPEN_SECONDS`] every call fails at once with
//! [`ProviderError::CircuitOpen`] instead of waiting on a provider that is down (a confirm
//! answers 503 at once; a refund is left to the reconciler). Then one call is let through as a
//! trial: its success closes the circuit, its failure opens it again.
//!
//! Failures count per operation, by its idempotency key: the retries of one charge or one
//! refund are one failure, so one customer retrying one card cannot open the circuit for
//! everyone. A declined card, a refused token or request, or a card the provider could not
//! process (`ProviderError::Retryable`) is the provider answering: a success. Each
//! node has its own breaker, on the app's monotonic clock ([`Clock::elapsed`]): a wall clock
//! stepped back cannot keep it open.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::Clock;
use crate::payments::{ChargeOutcome, ChargeRequest, PaymentProvider, PaymentStatus, ProviderError, RefundRequest};
use crate::telemetry;

/// Failures in a row that open the circuit.
pub const BREAKER_FAILURES_MAX: u32 = 5;
/// How long an open circuit refuses calls before it lets one through as a trial.
pub const BREAKER_OPEN_SECONDS: i64 = 30;
/// How long one call to the provider may take before it counts as failed.
pub const PROVIDER_CALL_TIMEOUT_SECONDS: u64 = 20;

/// A reading of the monotonic clock ([`Clock::elapsed`]).
type Tick = Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed {
        failures: u32,
    },
    Open {
        until: Tick,
    },
    /// One call let through; the others are refused until it ends, or until `until` if it
    /// never reports (its caller dropped it).
    Trial {
        until: Tick,
    },
}

impl Circuit {
    /// Whether a call may go to the provider at `now`.
    fn admit(&mut self, now: Tick) -> bool {
        match *self {
            Circuit::Closed { .. } => true,
            Circuit::Open { until } | Circuit::Trial { until } if now >= until => {
                *self =
                    Circuit::Trial { until: now.saturating_add(Duration::from_secs(PROVIDER_CALL_TIMEOUT_SECONDS)) };
                true
            }
            Circuit::Open { .. } | Circuit::Trial { .. } => false,
        }
    }

    /// Records how an admitted call ended; whether that opened the circuit.
    fn record(&mut self, failed: bool, now: Tick) -> bool {
        let next = match (*self, failed) {
            // A call admitted before the circuit opened, ending well late: only a trial closes it.
            (Circuit::Open { until }, false) => Circuit::Open { until },
            (_, false) => Circuit::Closed { failures: 0 },
            (Circuit::Closed { failures }, true) if failures + 1 < BREAKER_FAILURES_MAX => {
                Circuit::Closed { failures: failures + 1 }
            }
            // Already open: a call admitted before it opened ended late.
            (Circuit::Open { until }, true) => Circuit::Open { until },
            (Circuit::Closed { .. } | Circuit::Trial { .. }, true) => {
                Circuit::Open { until: now.saturating_add(Duration::from_secs(BREAKER_OPEN_SECONDS.unsigned_abs())) }
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
    state: Mutex<State>,
}

struct State {
    circuit: Circuit,
    /// The idempotency key of the last failed call: its retries are not failures of their own.
    last_failed: Option<String>,
}

impl Guarded {
    pub fn new(inner: Arc<dyn PaymentProvider>, clock: Arc<dyn Clock>) -> Guarded {
        let state = State { circuit: Circuit::Closed { failures: 0 }, last_failed: None };
        Guarded { inner, clock, state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `call`, the operation of idempotency key `key`, through the circuit and timeout.
    async fn call<T, F>(&self, key: &str, call: F) -> Result<T, ProviderError>
    where
        F: std::future::Future<Output = Result<T, ProviderError>>,
    {
        if !self.state().circuit.admit(self.clock.elapsed()) {
            return Err(ProviderError::CircuitOpen);
        }
        let timeout = Duration::from_secs(PROVIDER_CALL_TIMEOUT_SECONDS);
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::Unavailable(format!("no answer in {PROVIDER_CALL_TIMEOUT_SECONDS} s"))),
        };
        let failed = matches!(result, Err(ProviderError::Unavailable(_)));
        let opened = {
            let mut state = self.state();
            let retry = failed && state.last_failed.as_deref() == Some(key);
            state.last_failed = failed.then(|| key.to_owned());
            // A retry that failed again leaves the count as it was (unless it was the trial).
            !(retry && matches!(state.circuit, Circuit::Closed { .. }))
                && state.circuit.record(failed, self.clock.elapsed())
        };
        if opened {
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
        self.call(&request.idempotency_key, self.inner.charge(request)).await
    }

    async fn refund(&self, request: &RefundRequest) -> Result<String, ProviderError> {
        self.call(&request.idempotency_key, self.inner.refund(request)).await
    }

    async fn payment_status(&self, reference: &str) -> Result<PaymentStatus, ProviderError> {
        self.call(&format!("status_{reference}"), self.inner.payment_status(reference)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allot_core::ids::BookingId;

    fn at(second: i64) -> Tick {
        Duration::from_secs(second.unsigned_abs())
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
    fn a_late_success_of_a_call_admitted_before_it_opened_does_not_close_it() {
        let mut c = Circuit::Open { until: at(30) };
        assert!(!c.record(false, at(5)));
        assert_eq!(c, Circuit::Open { until: at(30) }, "only the trial closes it");
    }

    /// A provider that answers every call with the same error.
    struct Failing(ProviderError);

    #[async_trait]
    impl PaymentProvider for Failing {
        fn name(&self) -> &'static str {
            "failing"
        }
        async fn charge(&self, _: &ChargeRequest) -> Result<ChargeOutcome, ProviderError> {
            Err(self.0.clone())
        }
        async fn refund(&self, _: &RefundRequest) -> Result<String, ProviderError> {
            Err(self.0.clone())
        }
    }

    #[tokio::test]
    async fn the_open_time_is_monotonic_whatever_the_wall_clock_does() {
        let clock = Arc::new(crate::clock::ManualClock::new(jiff::Timestamp::UNIX_EPOCH));
        let guarded = Guarded::new(Arc::new(Failing(ProviderError::Unavailable("down".into()))), clock.clone());
        for n in 0..BREAKER_FAILURES_MAX {
            let refund = RefundRequest::of(BookingId::new(), &format!("pi_{n}"), 100);
            assert!(matches!(guarded.refund(&refund).await, Err(ProviderError::Unavailable(_))));
        }
        let next = RefundRequest::of(BookingId::new(), "pi_next", 100);
        assert_eq!(guarded.refund(&next).await, Err(ProviderError::CircuitOpen));
        clock.advance(jiff::SignedDuration::from_hours(-1));
        clock.advance(jiff::SignedDuration::from_secs(BREAKER_OPEN_SECONDS - 1));
        assert_eq!(guarded.refund(&next).await, Err(ProviderError::CircuitOpen), "not yet: one second short");
        clock.advance(jiff::SignedDuration::from_secs(1));
        let trial = guarded.refund(&next).await;
        assert!(
            matches!(trial, Err(ProviderError::Unavailable(_))),
            "the trial went to the provider, an hour back or not"
        );
    }

    #[tokio::test]
    async fn requests_the_provider_refuses_or_could_not_process_are_answers_and_never_open_the_circuit() {
        // Every request refused as asked (an amount under the provider's minimum, say), or one
        // card the provider could not process, tried on several bookings in turn.
        for answer in [ProviderError::Rejected("amount_too_large".into()), ProviderError::Retryable("card".into())] {
            let clock = Arc::new(crate::clock::ManualClock::new(jiff::Timestamp::UNIX_EPOCH));
            let guarded = Guarded::new(Arc::new(Failing(answer.clone())), clock);
            for n in 0..BREAKER_FAILURES_MAX * 2 {
                let refund = RefundRequest::of(BookingId::new(), &format!("pi_{n}"), 100);
                assert_eq!(guarded.refund(&refund).await, Err(answer.clone()), "{n}");
            }
        }
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
