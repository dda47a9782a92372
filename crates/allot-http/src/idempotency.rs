//! The `Idempotency-Key` layer (I4) for every POST: the first response to a key is stored and
//! replayed to the same principal for the same body; a different body gets 422, a concurrent
//! duplicate 409. Server errors are not stored, so they can be retried.

use std::net::SocketAddr;
use std::sync::Arc;

use allot_app::idempotency::Admission;
use allot_app::store::IdempotencyKey;
use allot_app::{App, AppError};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::BODY_BYTES_MAX;
use crate::error::ApiError;
use crate::extract::bearer;

pub const HEADER: &str = "idempotency-key";
/// The hold's path, run inline unless keyed ([`detached_if_writing`]).
const HOLD_PATH: &str = "/api/v1/bookings";
/// Largest response body stored for replay.
const RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Responses that carry live credentials are never stored: a replayed login would hand out a
/// token kept in plain text, and each login is a new session anyway. A new API key likewise
/// exists in plain text only in its one response.
pub(crate) const UNSTORED_PATHS: [&str; 3] = ["/api/v1/auth/login", "/api/v1/auth/refresh", "/api/v1/api-keys"];

/// The middleware's idempotency half, inside the rate limits (see [`crate::guard`]). Every
/// request that may change something runs detached from its connection, keyed or not.
/// `detached` tracks those tasks, so that shutdown can wait for them ([`crate::serve`]).
pub async fn keyed(app: Arc<App>, request: Request, next: Next, detached: TaskTracker) -> Response {
    if request.method() != Method::POST || UNSTORED_PATHS.contains(&request.uri().path()) {
        return detached_if_writing(&detached, next, request).await;
    }
    let Some(key) = request.headers().get(HEADER).map(|v| v.to_str().map(str::to_owned)) else {
        return detached_if_writing(&detached, next, request).await;
    };
    let (mut parts, body) = request.into_parts();
    let Ok(key) = key else {
        return refused(&app, &parts, ApiError::field(StatusCode::BAD_REQUEST, "Idempotency-Key", "must be ASCII"))
            .await;
    };
    let Ok(bytes) = axum::body::to_bytes(body, BODY_BYTES_MAX).await else {
        let too_large = ApiError::field(StatusCode::PAYLOAD_TOO_LARGE, "body", "request body too large");
        return refused(&app, &parts, too_large).await;
    };
    // Keys are scoped to the verified principal (anonymous callers to their address, as the
    // rate limits see it behind a trusted proxy); a bad token goes through unkeyed and gets
    // its 401.
    let principal = match bearer(&parts) {
        None => {
            let client = parts.extensions.get::<crate::ratelimit::ClientAddr>().map(|a| a.0);
            let peer = client.or_else(|| parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()));
            format!("anonymous:{}", peer.map(|ip| ip.to_string()).unwrap_or_default())
        }
        Some(token) => match app.authenticate(token).await {
            Ok(p) => {
                let user = p.user_id.to_string();
                // The handler's `Auth` extractor takes it from here instead of verifying again.
                parts.extensions.insert(p);
                user
            }
            Err(AppError::Unauthenticated) => {
                return detached_if_writing(&detached, next, Request::from_parts(parts, Body::from(bytes))).await;
            }
            // The store could not tell (busy, overloaded): running it unkeyed would drop I4.
            Err(e) => return refused(&app, &parts, ApiError::from(e)).await,
        },
    };
    let mut hasher = Sha256::new();
    hasher.update(parts.method.as_str());
    hasher.update(b" ");
    hasher.update(parts.uri.path());
    hasher.update(b"\n");
    hasher.update(&bytes);
    let id = IdempotencyKey { principal, key, request_hash: hex::encode(hasher.finalize()) };
    match app.idempotency_admit(&id).await {
        Err(e) => refused(&app, &parts, ApiError::from(e)).await,
        Ok(Admission::Replay { status, body }) => replay(status, body),
        Ok(Admission::Run) => {
            // Detached, and the outcome stored in the same task: a client that hangs up must
            // not leave the key locked with its outcome unrecorded.
            let request = Request::from_parts(parts, Body::from(bytes));
            let (task_app, task_id) = (app.clone(), id.clone());
            let task = run_detached(&detached, async move {
                let response = next.run(request).await;
                run_and_store(&task_app, &task_id, response).await
            });
            match task.await {
                Ok(response) => response,
                Err(e) => {
                    // A 5xx is never stored, so the key is free to retry.
                    let _ = app.idempotency_abandon(&id).await;
                    panicked(&e)
                }
            }
        }
    }
}

/// [`run_detached`] for a request that may change something (any method but GET, HEAD and
/// OPTIONS), but a hold: its one effect is its write, which the writer does not make once the
/// request is dropped (`Writer::hold`), and a task per hold cost ~5 % of the holds per second.
async fn detached_if_writing(tracker: &TaskTracker, next: Next, request: Request) -> Response {
    let hold = request.method() == Method::POST && request.uri().path() == HOLD_PATH;
    if hold || matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(request).await;
    }
    run_detached(tracker, next.run(request)).await.unwrap_or_else(|e| panicked(&e))
}

/// Runs a request that may change something as a task of its own. A client that hangs up, or
/// the request timeout, then drops only the wait for the answer, never the request half-way:
/// a card charged and the booking not confirmed, a cancellation without its refund, a write
/// that commits while its audit event says it timed out. `Err` when it panicked.
async fn run_detached(
    tracker: &TaskTracker,
    request: impl Future<Output = Response> + Send + 'static,
) -> Result<Response, tokio::task::JoinError> {
    // Detached, it still logs under the request's span (its request id).
    tracker.spawn(request.in_current_span()).await
}

/// The answer to a request whose task panicked (its audit layer has recorded the attempt).
fn panicked(e: &tokio::task::JoinError) -> Response {
    tracing::error!(error = %e, "a request failed to complete");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error").into_response()
}

/// A keyed request refused here never reaches the audit layer: record the attempt now.
async fn refused(app: &App, parts: &axum::http::request::Parts, error: ApiError) -> Response {
    crate::audit::record_refused(app, parts, error.code, &[]).await;
    error.into_response()
}

fn replay(status: u16, body: Vec<u8>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

async fn run_and_store(app: &App, id: &IdempotencyKey, response: Response) -> Response {
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, RESPONSE_BYTES_MAX).await else {
        let _ = app.idempotency_abandon(id).await;
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error").into_response();
    };
    let outcome = if parts.status.is_server_error() {
        app.idempotency_abandon(id).await
    } else {
        app.idempotency_finish(id, parts.status.as_u16(), &bytes).await
    };
    if let Err(e) = outcome {
        tracing::error!(error = %e, "storing the idempotent response failed");
    }
    Response::from_parts(parts, Body::from(bytes))
}
