//! The metrics Allot records, named once: Prometheus conventions (the unit in the name, counters
//! end in `_total`, labels with few values — never ids or raw paths). Recorded through the
//! `metrics` facade wherever the outcome is known; the HTTP layer installs the Prometheus
//! recorder, calls [`describe`] and renders `/metrics`.

use metrics::{Unit, describe_counter, describe_histogram};

use crate::error::{AppError, AppResult};
use crate::payments::ChargeOutcome;

/// Labels `method`, `route` (the route template, `unmatched` for none), `status`.
pub const HTTP_REQUESTS: &str = "allot_http_requests_total";
/// Labels `method`, `route`.
pub const HTTP_REQUEST_DURATION: &str = "allot_http_request_duration_seconds";
/// Label `outcome`: `ok` or the error code of the refusal (see [`outcome`]).
pub const HOLDS: &str = "allot_holds_total";
pub const CONFIRMS: &str = "allot_confirms_total";
pub const CANCELS: &str = "allot_cancels_total";
/// Holds released because their `expires_at` passed.
pub const HOLDS_EXPIRED: &str = "allot_holds_expired_total";
/// Label `outcome`: `ok` or `error` (the sweep retries).
pub const EXPIRY_RUNS: &str = "allot_expiry_runs_total";
/// Label `outcome`: `succeeded`, `pending`, `declined`, `provider_unavailable`, `invalid_token`.
pub const PAYMENTS: &str = "allot_payments_total";
/// Label `outcome`: `succeeded`, `failed` (queued for the reconciler, `refunds`).
pub const REFUNDS: &str = "allot_refunds_total";
/// Refunds owed that failed their last attempt and are left to an operator (`refunds`).
pub const REFUNDS_ABANDONED: &str = "allot_refunds_abandoned_total";
/// Label `outcome`: `applied`, `refund_queued`, `ignored`, or the error code (the provider's
/// events about a booking, `webhooks`).
pub const PAYMENT_EVENTS: &str = "allot_payment_events_total";
/// Payments left pending that the provider was asked about and that changed their booking
/// (`pending`), by what they did.
pub const PENDING_CHECKS: &str = "allot_pending_payments_settled_total";
/// Times the circuit breaker around the payment provider opened (`breaker`).
pub const PAYMENT_CIRCUIT_OPENED: &str = "allot_payment_circuit_opened_total";
/// Requests answered 429 by the rate limiter.
pub const RATE_LIMITED_REQUESTS: &str = "allot_rate_limited_requests_total";
/// Requests per group-commit transaction.
pub const STORE_BATCH_SIZE: &str = "allot_store_batch_size";
/// Time of a batch's COMMIT (the fsync every request of the batch waits for).
pub const STORE_COMMIT_DURATION: &str = "allot_store_commit_duration_seconds";

/// Registers help texts with the installed recorder (call once, after installing it).
pub fn describe() {
    describe_counter!(HTTP_REQUESTS, Unit::Count, "HTTP requests answered, by method, route template and status");
    describe_histogram!(HTTP_REQUEST_DURATION, Unit::Seconds, "HTTP request latency, by method and route template");
    describe_counter!(HOLDS, Unit::Count, "Hold attempts, by outcome");
    describe_counter!(CONFIRMS, Unit::Count, "Confirm attempts, by outcome");
    describe_counter!(CANCELS, Unit::Count, "Cancel attempts, by outcome");
    describe_counter!(HOLDS_EXPIRED, Unit::Count, "Holds released because they expired");
    describe_counter!(EXPIRY_RUNS, Unit::Count, "Runs of the hold-expiry job, by outcome");
    describe_counter!(PAYMENTS, Unit::Count, "Charges at the payment provider, by outcome");
    describe_counter!(REFUNDS, Unit::Count, "Refunds at the payment provider, by outcome");
    describe_counter!(REFUNDS_ABANDONED, Unit::Count, "Refunds owed left to an operator after their last attempt");
    describe_counter!(PAYMENT_EVENTS, Unit::Count, "Payment provider events about a booking, by what they did");
    describe_counter!(
        PENDING_CHECKS,
        Unit::Count,
        "Payments left pending settled by asking the provider, by what they did to their booking"
    );
    describe_counter!(
        PAYMENT_CIRCUIT_OPENED,
        Unit::Count,
        "Times the payment provider failed enough in a row to be left alone"
    );
    describe_counter!(RATE_LIMITED_REQUESTS, Unit::Count, "Requests refused with 429 by the rate limiter");
    describe_histogram!(STORE_BATCH_SIZE, Unit::Count, "Write requests per group-commit transaction");
    describe_histogram!(STORE_COMMIT_DURATION, Unit::Seconds, "Time to commit one group-commit transaction");
    // Shown (at zero) before the first refusal: an absent series cannot be told from a broken one.
    metrics::counter!(RATE_LIMITED_REQUESTS).increment(0);
}

/// Counts one use-case call under `name`, labelled with its outcome.
pub fn count<T>(name: &'static str, result: &AppResult<T>) {
    count_outcome(name, outcome(result));
}

/// Counts one use-case call under `name` whose outcome label is already known.
pub fn count_outcome(name: &'static str, label: &'static str) {
    metrics::counter!(name, "outcome" => label).increment(1);
}

/// `ok`, or a stable code for the kind of failure (a bounded label set).
pub fn outcome<T>(result: &AppResult<T>) -> &'static str {
    result.as_ref().err().map_or("ok", failure)
}

/// The stable code of a failure, as [`outcome`] labels it.
pub fn failure(e: &AppError) -> &'static str {
    match e {
        AppError::Invalid(_) => "invalid",
        AppError::Unauthenticated => "unauthenticated",
        AppError::Forbidden(_) => "forbidden",
        AppError::NotFound(_) => "not_found",
        AppError::Unavailable { .. } => "unavailable",
        AppError::HoldExpired => "hold_expired",
        AppError::PaymentDeclined { .. } => "payment_declined",
        AppError::PaymentProviderUnavailable => "payment_provider_unavailable",
        AppError::Conflict(_) => "conflict",
        AppError::IdempotencyKeyReused => "idempotency_key_reused",
        AppError::IdempotencyKeyInUse => "idempotency_key_in_use",
        AppError::Overloaded => "overloaded",
        AppError::Internal(_) => "internal",
    }
}

/// Counts one charge by what the provider answered.
pub fn count_payment(result: &AppResult<ChargeOutcome>) {
    let outcome = match result {
        Ok(ChargeOutcome::Succeeded { .. }) => "succeeded",
        Ok(ChargeOutcome::Pending { .. }) => "pending",
        Ok(ChargeOutcome::Declined { .. }) => "declined",
        Err(AppError::PaymentProviderUnavailable) => "provider_unavailable",
        Err(_) => "invalid_token",
    };
    metrics::counter!(PAYMENTS, "outcome" => outcome).increment(1);
}

pub fn count_refund<T, E>(result: &Result<T, E>) {
    let outcome = if result.is_ok() { "succeeded" } else { "failed" };
    metrics::counter!(REFUNDS, "outcome" => outcome).increment(1);
}
