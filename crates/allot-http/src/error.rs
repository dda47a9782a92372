//! `ApiError`: the one place where outcomes become HTTP statuses and stable error codes.
//! A 500 logs its cause and tells the client nothing more than `internal`.

use allot_app::AppError;
use allot_core::FieldErrors;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), details: json!({}) }
    }

    /// Unparseable input (bad JSON, wrong types, bad ids in the query): 400.
    pub fn bad_request(fields: FieldErrors) -> Self {
        Self::fields(StatusCode::BAD_REQUEST, fields)
    }

    /// Well-formed input that breaks a rule: 422.
    pub fn invalid(fields: FieldErrors) -> Self {
        Self::fields(StatusCode::UNPROCESSABLE_ENTITY, fields)
    }

    fn fields(status: StatusCode, fields: FieldErrors) -> Self {
        let message = fields.iter().next().map_or_else(|| "invalid request".to_owned(), |(f, m)| format!("{f}: {m}"));
        let map: serde_json::Map<String, Value> =
            fields.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        Self { status, code: "invalid_request", message, details: json!({ "fields": map }) }
    }

    pub fn field(status: StatusCode, field: &str, message: &str) -> Self {
        Self::fields(status, FieldErrors::single(field, message))
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }

    pub fn unauthenticated() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", "a valid access token is required")
    }

    /// Over a rate limit: 429. The caller adds `Retry-After` and the `RateLimit-*` headers.
    pub fn rate_limited(retry_after_seconds: u64, details: Value) -> Self {
        let message = format!("too many requests; retry in {retry_after_seconds} s");
        Self { details, ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message) }
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        use StatusCode as S;
        match e {
            AppError::Invalid(v) => ApiError::invalid(v.fields),
            AppError::Unauthenticated => {
                ApiError::new(S::UNAUTHORIZED, "unauthenticated", "invalid credentials or token")
            }
            AppError::Forbidden(m) => ApiError::new(S::FORBIDDEN, "forbidden", m),
            AppError::NotFound(what) => ApiError::not_found(what),
            AppError::Unavailable { item_index, message } => ApiError {
                details: json!({ "item_index": item_index }),
                ..ApiError::new(S::CONFLICT, "unavailable", message)
            },
            AppError::HoldExpired => ApiError::new(S::GONE, "hold_expired", "the hold expired; hold again"),
            AppError::PaymentDeclined { attempts_left } => ApiError {
                details: json!({ "attempts_left": attempts_left }),
                ..ApiError::new(S::PAYMENT_REQUIRED, "payment_declined", "the card was declined")
            },
            AppError::PaymentProviderUnavailable => ApiError::new(
                S::SERVICE_UNAVAILABLE,
                "payment_provider_unavailable",
                "the payment provider is unavailable; try again",
            ),
            AppError::Conflict(m) => ApiError::new(S::CONFLICT, "conflict", m),
            AppError::IdempotencyKeyReused => ApiError::new(
                S::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request",
            ),
            AppError::IdempotencyKeyInUse => ApiError::new(
                S::CONFLICT,
                "idempotency_key_in_use",
                "a request with this Idempotency-Key is still in progress",
            ),
            AppError::Overloaded => {
                ApiError::new(S::SERVICE_UNAVAILABLE, "overloaded", "the server is overloaded; retry shortly")
            }
            AppError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                ApiError::new(S::INTERNAL_SERVER_ERROR, "internal", "internal server error")
            }
        }
    }
}

/// The body of every error response (SPEC §4).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code: `invalid_request`, `unauthenticated`, `forbidden`, `not_found`,
    /// `unavailable`, `hold_expired`, `payment_declined`, `idempotency_key_reused`,
    /// `idempotency_key_in_use`, `rate_limited`, `conflict`, `payment_provider_unavailable`,
    /// `overloaded`, `internal`.
    #[schema(example = "unavailable")]
    pub code: &'static str,
    pub message: String,
    /// `fields` (field path → message) for `invalid_request`, `item_index` for `unavailable`,
    /// `attempts_left` for `payment_declined`; otherwise empty.
    #[schema(value_type = Object)]
    pub details: Value,
}

impl ApiError {
    /// The response's JSON body (SPEC §4).
    pub fn body(&self) -> Vec<u8> {
        let detail = ErrorDetail { code: self.code, message: self.message.clone(), details: self.details.clone() };
        // Serializing plain strings and a JSON value cannot fail.
        serde_json::to_vec(&ErrorBody { error: detail }).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let json = HeaderValue::from_static("application/json");
        let mut response = (self.status, [(header::CONTENT_TYPE, json)], body).into_response();
        response.extensions_mut().insert(crate::audit::ErrorCode(self.code));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
