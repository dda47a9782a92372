//! The use-case layer's error: every outcome a caller must tell apart, nothing about HTTP.

use allot_core::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("authentication required")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{message}")]
    Unavailable { item_index: usize, message: String },
    #[error("the hold expired")]
    HoldExpired,
    #[error("the payment was declined")]
    PaymentDeclined { attempts_left: u32 },
    #[error("the payment provider is unavailable")]
    PaymentProviderUnavailable,
    #[error("{0}")]
    Conflict(String),
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being processed")]
    IdempotencyKeyInUse,
    #[error("the server is overloaded; retry shortly")]
    Overloaded,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => AppError::Conflict(m),
            StoreError::Changed(what) => {
                AppError::Conflict(format!("the {what} was changed by another request meanwhile; try again"))
            }
            StoreError::NotFound(what) => AppError::NotFound(what),
            StoreError::Forbidden(why) => AppError::Forbidden(why),
            StoreError::Overloaded | StoreError::Busy(_) => AppError::Overloaded,
            other => AppError::Internal(other.to_string()),
        }
    }
}

/// What a store can report about itself. Business outcomes travel in their own types.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Conflict(String),
    /// A compare-and-set write found the document no longer as read: another change came
    /// first. Read it again and reapply.
    #[error("the {0} changed since it was read")]
    Changed(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The write's caller lost, since its request was authorized, the right it needs.
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("storage overloaded: write queue full")]
    Overloaded,
    #[error("storage is shutting down")]
    Closed,
    /// A transient clash with another writer (a lock wait timed out, a deadlock); retry.
    #[error("storage busy: {0}")]
    Busy(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

pub type AppResult<T> = Result<T, AppError>;
