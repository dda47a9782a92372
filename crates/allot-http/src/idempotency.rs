//! The `Idempotency-Key` layer (I4) for every POST: the first response to a key is stored and
//! replayed to the same principal for the same body; a different body gets 422, a concurrent
//! duplicate 409. Server errors are not stored, so they can be retried, unless the request's
//! change committed: then a retry is answered from what it changed ([`recover`]), never run
//! again. A running request renews its hold on the key ([`renewing`]).

use std::net::SocketAddr;
use std::sync::Arc;

use allot_app::bookings::KeyedHold;
use allot_app::idempotency::{Admission, Changed, ChangedKind, RENEW_AFTER_SECONDS, check_key};
use allot_app::store::{IdempotencyKey, StoredAnswer};
use allot_app::{App, AppError};
use allot_core::booking::Booking;
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
use crate::routes::payments::EVENTS_PATH_PREFIX;

pub const HEADER: &str = "idempotency-key";
/// The hold's path: an unkeyed hold runs inline ([`detached_if_writing`]), a keyed one as one
/// write ([`keyed_hold`]).
const HOLD_PATH: &str = "/api/v1/bookings";
/// Largest response body stored for replay.
const RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// How often a running keyed request checks whether its lease is due for renewal.
const LEASE_CHECK_MILLISECONDS: u64 = 1000;

/// A keyed request's attempt, for the audit layer: its scope marks the key when the request's
/// change is kept ([`allot_app::audit::AuditScope::with_idempotency_key`]).
#[derive(Debug, Clone)]
pub(crate) struct Keyed(pub IdempotencyKey);

/// Responses that carry live credentials (tokens, a new API key): stored sealed
/// (`App::idempotency_finish_sealed`), never readable in the replay table.
pub(crate) const SEALED_PATHS: [&str; 3] = ["/api/v1/auth/login", "/api/v1/auth/refresh", "/api/v1/api-keys"];
/// The one that creates something whose secret is shown only in its answer.
const API_KEYS_PATH: &str = "/api/v1/api-keys";
/// Those that open a session.
const SESSION_PATHS: [&str; 2] = ["/api/v1/auth/login", "/api/v1/auth/refresh"];

/// The middleware's idempotency half, inside the rate limits (see [`crate::guard`]). Every
/// request that may change something runs detached from its connection, keyed or not, except
/// an unkeyed hold ([`detached_if_writing`]).
/// `detached` tracks those tasks, so that shutdown can wait for them ([`crate::serve`]).
pub async fn keyed(app: Arc<App>, request: Request, next: Next, detached: TaskTracker) -> Response {
    // The payment provider's events are idempotent by themselves (an event is applied once, by
    // its payment and booking, and the provider sends it again until answered): a key sent
    // with one is accepted and not used, its answer not stored nor its change marked.
    if request.method() != Method::POST || request.uri().path().starts_with(EVENTS_PATH_PREFIX) {
        return detached_if_writing(&detached, next, request).await;
    }
    let Some(key) = request.headers().get(HEADER).map(|v| v.to_str().map(str::to_owned)) else {
        return detached_if_writing(&detached, next, request).await;
    };
    // Boxed: its state is several times an unkeyed request's, and would otherwise be in every
    // request's (moved and copied with it, docs/benchmarks-history.md).
    Box::pin(keyed_request(app, key, request, next, detached)).await
}

/// [`keyed`] for a request that names its key (`Err` when the header is not ASCII).
async fn keyed_request(
    app: Arc<App>,
    key: Result<String, axum::http::header::ToStrError>,
    request: Request,
    next: Next,
    detached: TaskTracker,
) -> Response {
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
    let mut verified = false;
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
                verified = true;
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
    let owner = uuid::Uuid::now_v7().simple().to_string();
    let id = IdempotencyKey { principal, key, request_hash: hex::encode(hasher.finalize()), owner };
    if verified && parts.uri.path() == HOLD_PATH && check_key(&id).is_ok() {
        return keyed_hold(&app, id, parts, bytes, next, &detached).await;
    }
    let admission = app.idempotency_admit(&id).await.map_err(ApiError::from);
    if let Some(answer) = answer_unless_run(&app, &id, &parts, admission, &detached).await {
        return answer;
    }
    parts.extensions.insert(Keyed(id.clone()));
    let request = Request::from_parts(parts, Body::from(bytes));
    let sealed = SEALED_PATHS.contains(&request.uri().path());
    let (task_app, task_id) = (app.clone(), id.clone());
    let run = async move { renewing(&task_app, &task_id, next.run(request)).await };
    run_keyed(&app, &id, &detached, sealed, run).await
}

/// The answer to attempt `id` whose key `admission` says is not to run: the stored answer, a
/// recovery, or a refusal of the key (recorded as such); `None` when it is to run.
async fn answer_unless_run(
    app: &Arc<App>,
    id: &IdempotencyKey,
    parts: &axum::http::request::Parts,
    admission: Result<Admission, ApiError>,
    detached: &TaskTracker,
) -> Option<Response> {
    Some(match admission {
        Ok(Admission::Run) => return None,
        Ok(Admission::Replay { status, body }) => replay(status, body),
        Ok(Admission::Recover { target }) => recover(app, id, parts, &target, detached).await,
        Err(e) => refused(app, parts, e).await,
    })
}

/// A keyed hold, the hot path: its key is taken, the hold decided and its answer stored in one
/// transaction (`App::hold_keyed`), not three. Its handler leaves on the response what became
/// of the key: answered ([`KeyAnswered`]), or not free ([`KeyNotFree`]: answered here as an
/// admission would have been). Neither when the hold never reached its write (invalid,
/// forbidden, its write failed): the key is settled then as if it had been taken first
/// ([`settle_after`]). Detached like any keyed request: once its key is taken, the hold is
/// made and its answer stored, and the request is recorded as what it did, whether or not
/// the client still waits.
async fn keyed_hold(
    app: &Arc<App>,
    id: IdempotencyKey,
    parts: axum::http::request::Parts,
    bytes: axum::body::Bytes,
    next: Next,
    detached: &TaskTracker,
) -> Response {
    let (task_app, task_id, task_detached) = (app.clone(), id.clone(), detached.clone());
    let run = async move { held_under_key(&task_app, task_id, parts, bytes, next, &task_detached).await };
    // A key its hold answered stays answered; one `settle_after` took is released.
    detached_releasing(app, &id, detached, run).await
}

/// [`keyed_hold`]'s task.
async fn held_under_key(
    app: &Arc<App>,
    id: IdempotencyKey,
    mut parts: axum::http::request::Parts,
    bytes: axum::body::Bytes,
    next: Next,
    detached: &TaskTracker,
) -> Response {
    let kept = parts.clone();
    parts.extensions.insert(HoldUnderKey(id.clone()));
    let mut response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    if response.extensions_mut().remove::<KeyAnswered>().is_some() {
        return response;
    }
    if let Some(KeyNotFree(admission)) = response.extensions_mut().remove::<KeyNotFree>() {
        if let Some(answer) = answer_unless_run(app, &id, &kept, admission, detached).await {
            return answer;
        }
        let cause = "a keyed hold that did not run was admitted".into();
        return refused(app, &kept, ApiError::from(AppError::Internal(cause))).await;
    }
    settle_after(app, &id, &kept, response, detached).await
}

/// Settles key `id` for a keyed hold answered `response` without its write having taken the
/// key (refused before it, or the write failed, which changed nothing or, its outcome unknown,
/// committed with its answer), as if the key had been taken first: if it is free, `response`
/// is stored as its answer (a 5xx releases it) and its audit event, which the audit layer
/// left on it, recorded; if not, the request is answered as an admission says (the stored
/// answer, a recovery, or a refusal of the key, recorded as such).
async fn settle_after(
    app: &Arc<App>,
    id: &IdempotencyKey,
    parts: &axum::http::request::Parts,
    mut response: Response,
    detached: &TaskTracker,
) -> Response {
    let deferred = response.extensions_mut().remove::<crate::audit::DeferredAudit>();
    let admission = app.idempotency_admit(id).await.map_err(ApiError::from);
    if let Some(answer) = answer_unless_run(app, id, parts, admission, detached).await {
        return answer;
    }
    if let Some(crate::audit::DeferredAudit(event)) = deferred {
        app.append_audit(event).await;
    }
    run_and_store(app, id, response, false).await
}

/// A keyed hold's request, for its handler (take the key in the hold's own transaction) and
/// the audit layer (leave the event of a hold that never reached its write to
/// [`settle_after`]): [`keyed_hold`].
#[derive(Debug, Clone)]
pub struct HoldUnderKey(pub IdempotencyKey);

/// Left by a keyed hold's handler on its response: the hold ran, and this response was stored
/// as its key's answer in the same transaction.
#[derive(Debug, Clone, Copy)]
struct KeyAnswered;

/// Left by a keyed hold's handler on its response: the hold did not run, its key not free;
/// answer as this admission says instead.
#[derive(Debug, Clone)]
struct KeyNotFree(Result<Admission, ApiError>);

/// A keyed hold's answer, as stored for replay (`App::hold_keyed`).
pub(crate) fn render_hold(decided: Result<&Booking, AppError>) -> StoredAnswer {
    match decided {
        Ok(booking) => StoredAnswer {
            status: StatusCode::CREATED.as_u16(),
            // Serializing a booking's view cannot fail.
            body: serde_json::to_vec(&crate::dto::booking_json(booking)).unwrap_or_default(),
        },
        Err(e) => {
            let error = ApiError::from(e);
            StoredAnswer { status: error.status.as_u16(), body: error.body() }
        }
    }
}

/// The response of a keyed hold's handler ([`keyed_hold`]): a hold that ran is answered with
/// what was stored for it, byte for byte.
pub(crate) fn keyed_hold_response(outcome: KeyedHold) -> Response {
    match outcome {
        KeyedHold::Ran { result, answer } => {
            let mut response = stored_response(answer.status, answer.body);
            if let Err(e) = result {
                response.extensions_mut().insert(crate::audit::ErrorCode(ApiError::from(e).code));
            }
            response.extensions_mut().insert(KeyAnswered);
            response
        }
        KeyedHold::NotRun(admission) => {
            // The body is never sent: the idempotency layer answers in its place.
            let mut response = StatusCode::CONFLICT.into_response();
            response.extensions_mut().insert(KeyNotFree(admission.map_err(ApiError::from)));
            response
        }
    }
}

/// Runs attempt `id`'s `request` as a task of its own and stores its outcome (sealed when it
/// carries credentials) in the same task: a client that hangs up must not leave the key
/// locked with its outcome unrecorded. Spawned when called ([`detached_releasing`]).
fn run_keyed<'a>(
    app: &'a Arc<App>,
    id: &'a IdempotencyKey,
    detached: &TaskTracker,
    sealed: bool,
    request: impl Future<Output = Response> + Send + 'static,
) -> impl Future<Output = Response> + Send + 'a {
    let (task_app, task_id) = (app.clone(), id.clone());
    let task = async move {
        let response = request.await;
        run_and_store(&task_app, &task_id, response, sealed).await
    };
    detached_releasing(app, id, detached, task)
}

/// Runs `task`, attempt `id`'s, detached ([`run_detached`]); if it panics, the key is released
/// for a retry (a 5xx is never stored) and the request answered 500.
/// Spawned when called, not when first polled: a task's future passed into an `async fn` is
/// kept in its state, and in every caller's, until spawned, and moved (copied) at each level
/// (docs/benchmarks-history.md, "Every request copied a 34 KiB future").
fn detached_releasing<'a>(
    app: &'a App,
    id: &'a IdempotencyKey,
    detached: &TaskTracker,
    task: impl Future<Output = Response> + Send + 'static,
) -> impl Future<Output = Response> + Send + 'a {
    let running = run_detached(detached, task);
    async move {
        match running.await {
            Ok(response) => response,
            Err(e) => {
                let _ = app.idempotency_abandon(id).await;
                panicked(&e)
            }
        }
    }
}

/// Runs `request` while renewing its lease on key `id` ([`RENEW_AFTER_SECONDS`]): a request
/// still running (a slow payment provider) must not have a retry take its key over and run a
/// second time. Only a dead attempt stops renewing.
async fn renewing(app: &App, id: &IdempotencyKey, request: impl Future<Output = Response>) -> Response {
    let mut request = std::pin::pin!(request);
    let mut renewed_at = app.clock.now();
    loop {
        tokio::select! {
            biased;
            response = &mut request => return response,
            () = tokio::time::sleep(std::time::Duration::from_millis(LEASE_CHECK_MILLISECONDS)) => {}
        }
        let now = app.clock.now();
        if now.duration_since(renewed_at).as_secs() < RENEW_AFTER_SECONDS {
            continue;
        }
        match app.idempotency_renew(id).await {
            Ok(true) => renewed_at = now,
            Ok(false) => {
                // Its lease ran out before a renewal got through (a store down that long): the
                // outcome this attempt stores will not be kept, its holder's will.
                tracing::warn!("a running request's idempotency key was taken over");
                return request.await;
            }
            Err(e) => tracing::warn!(error = %e, "renewing an idempotency key's lease failed; retrying"),
        }
    }
}

/// How a retry of a POST to `path` is answered once its key is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// With what it changed (`ChangedKind`) as it now is, in this status.
    Answer(ChangedKind, StatusCode),
    /// It created an API key, whose secret exists only in the lost answer: 409, naming the key
    /// to revoke. Never a second key.
    SecretShownOnce,
    /// It opened a session (a login, a refresh), whose secrets existed only in the lost
    /// answer: a fresh one in its place ([`reissued`]). Run again, a refresh would present
    /// a token already rotated, and be taken for a stolen copy.
    Session,
}

/// `None`: the route marks nothing (a logout has no target), so a retry after its attempt
/// died runs it again.
fn recovery_of(path: &str) -> Option<Recovery> {
    if path == API_KEYS_PATH {
        return Some(Recovery::SecretShownOnce);
    }
    if SESSION_PATHS.contains(&path) {
        return Some(Recovery::Session);
    }
    let segments: Vec<&str> = path.trim_start_matches("/api/v1/").split('/').collect();
    let (kind, status) = match segments.as_slice() {
        ["bookings"] => (ChangedKind::Booking, StatusCode::CREATED),
        ["bookings", _, "confirm" | "cancel"] => (ChangedKind::Booking, StatusCode::OK),
        ["venues"] => (ChangedKind::Venue, StatusCode::CREATED),
        ["venues", _, "resources"] => (ChangedKind::Resource, StatusCode::CREATED),
        ["venues", _, "events"] => (ChangedKind::Event, StatusCode::CREATED),
        ["auth", "register"] => (ChangedKind::User, StatusCode::CREATED),
        ["users", _, "roles"] => (ChangedKind::User, StatusCode::OK),
        _ => return None,
    };
    Some(Recovery::Answer(kind, status))
}

/// Answers a retry whose earlier attempt changed `target` and died before its answer was
/// stored: with `target` as it now is (see [`Recovery`]), in the route's success status, stored as the key's
/// answer from then on.
async fn recover(
    app: &Arc<App>,
    id: &IdempotencyKey,
    parts: &axum::http::request::Parts,
    target: &str,
    detached: &TaskTracker,
) -> Response {
    let path = parts.uri.path();
    let recovered = match recovery_of(path) {
        Some(Recovery::Answer(kind, status)) => app.idempotency_recover(kind, target).await.map(|c| (status, c)),
        Some(Recovery::SecretShownOnce) => return secret_lost(app, id, target).await,
        Some(Recovery::Session) => return reissued(app, id, parts, target, detached).await,
        None => Err(AppError::Internal(format!("{path} marked {target} but cannot be recovered"))),
    };
    let (status, changed) = match recovered {
        Ok(found) => found,
        Err(e) => {
            // Unlocked, still marked: the next retry tries again; it never runs the request.
            let _ = app.idempotency_abandon(id).await;
            return ApiError::from(e).into_response();
        }
    };
    let body = match changed {
        Changed::Booking(b) => serde_json::to_vec(&crate::dto::booking_json(&b)),
        Changed::Venue(v) => serde_json::to_vec(&crate::dto::venue_json(&v)),
        Changed::Resource(r) => serde_json::to_vec(&crate::dto::resource_json(&r)),
        Changed::Event(e) => serde_json::to_vec(&crate::dto::event_json(&e)),
        Changed::User(u) => serde_json::to_vec(&crate::dto::user_json(&u)),
    };
    tracing::info!(target_id = target, "a keyed request whose answer was lost is answered from what it changed");
    recovered_answer(app, id, status, body.unwrap_or_default()).await
}

/// Stores a recovered answer as `id`'s answer from now on, and sends it as a replay.
async fn recovered_answer(app: &App, id: &IdempotencyKey, status: StatusCode, body: Vec<u8>) -> Response {
    if let Err(e) = app.idempotency_finish(id, status.as_u16(), &body).await {
        tracing::error!(error = %e, "storing the recovered idempotent response failed");
    }
    replay(status.as_u16(), body)
}

/// [`recover`] for a new API key: its secret was in the lost answer only (the store keeps its
/// digest), so the retry learns which key to revoke, stored as the key's answer.
async fn secret_lost(app: &App, id: &IdempotencyKey, api_key_id: &str) -> Response {
    let message = format!(
        "this request created API key {api_key_id}, but its answer was lost and the key is shown only once: \
         revoke it and create another"
    );
    let details = serde_json::json!({ "api_key_id": api_key_id });
    let error = ApiError { details, ..ApiError::new(StatusCode::CONFLICT, "conflict", message) };
    let body = axum::body::to_bytes(error.into_response().into_body(), RESPONSE_BYTES_MAX).await;
    recovered_answer(app, id, StatusCode::CONFLICT, body.map(|b| b.to_vec()).unwrap_or_default()).await
}

/// [`recover`] for a login or refresh that opened the session of refresh token `lost` (its
/// digest): that session is replaced by a fresh one, the answer stored sealed. An attempt of
/// its own, audited, whose change marks the key afresh: if this answer is lost too, the next
/// retry replaces the session this one opened. A conflict, stored, if the lost session is no
/// longer live (refreshed since: its answer did reach someone). Detached like any write, so
/// that a client hanging up cannot leave the new session made and its answer unstored.
async fn reissued(
    app: &Arc<App>,
    id: &IdempotencyKey,
    parts: &axum::http::request::Parts,
    lost: &str,
    detached: &TaskTracker,
) -> Response {
    let (task_app, task_id, task_parts, lost) = (app.clone(), id.clone(), parts.clone(), lost.to_owned());
    let run = async move {
        let reissue = async {
            match task_app.reissue_session(&lost).await {
                Ok(session) => axum::Json(crate::dto::session_json(session)).into_response(),
                Err(e) => ApiError::from(e).into_response(),
            }
        };
        crate::audit::recovery(&task_app, &task_parts, task_id, reissue).await
    };
    let mut response = run_keyed(app, id, detached, true, run).await;
    if !response.status().is_server_error() {
        tracing::info!("a keyed login or refresh whose answer was lost is answered with a fresh session");
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
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
/// that commits while its audit event says it timed out. Its answer is `Err` when it panicked.
/// Spawned when called, as [`detached_releasing`] is.
fn run_detached(
    tracker: &TaskTracker,
    request: impl Future<Output = Response> + Send + 'static,
) -> tokio::task::JoinHandle<Response> {
    // Detached, it still logs under the request's span (its request id).
    tracker.spawn(request.in_current_span())
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
    let mut response = stored_response(status, body);
    response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

/// A stored answer (JSON or empty) as a response.
fn stored_response(status: u16, body: Vec<u8>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Stores `response` as the answer to `id` (sealed when it carries credentials), or releases
/// the key for a 5xx.
async fn run_and_store(app: &App, id: &IdempotencyKey, response: Response, sealed: bool) -> Response {
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, RESPONSE_BYTES_MAX).await else {
        let _ = app.idempotency_abandon(id).await;
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error").into_response();
    };
    let outcome = if parts.status.is_server_error() {
        app.idempotency_abandon(id).await
    } else if sealed {
        app.idempotency_finish_sealed(id, parts.status.as_u16(), &bytes).await
    } else {
        app.idempotency_finish(id, parts.status.as_u16(), &bytes).await
    };
    if let Err(e) = outcome {
        tracing::error!(error = %e, "storing the idempotent response failed");
    }
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// POSTs whose change names no target, so that nothing marks their key: run again, they
    /// repeat no harm (a revoked token stays revoked).
    const UNMARKED_PATHS: [&str; 1] = ["/api/v1/auth/logout"];

    fn future_bytes<F, A, B, C, D, E, R>(_: &F) -> usize
    where
        F: Fn(A, B, C, D, E) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// A keyed request's future (boxed once, [`keyed`]) holds no detached task's future: each
    /// is spawned when called. Held by value at each level, it was 32 KiB.
    #[test]
    fn a_keyed_request_s_future_holds_no_detached_task() {
        let bytes = future_bytes(&keyed_request);
        assert!(bytes <= 8 * 1024, "keyed_request's future is {bytes} bytes, more than 8 KiB");
    }

    #[test]
    fn every_stored_post_that_changes_something_can_be_answered_from_what_it_changed() {
        let document = crate::openapi_document();
        for (path, item) in &document.paths.paths {
            let Some(post) = &item.post else { continue };
            if UNMARKED_PATHS.contains(&path.as_str()) || path.starts_with(EVENTS_PATH_PREFIX) {
                continue;
            }
            let concrete = path.replace("{id}", "0190a5e0-0000-7000-8000-000000000000");
            let status = match recovery_of(&concrete) {
                Some(Recovery::Answer(_, status)) => status,
                Some(Recovery::SecretShownOnce) => StatusCode::CONFLICT,
                Some(Recovery::Session) => StatusCode::OK,
                None => panic!("{path}: no way to recover its answer"),
            };
            let documented = post.responses.responses.contains_key(status.as_str());
            assert!(documented, "{path}: recovered as {status}, which it does not answer");
        }
        assert_eq!(recovery_of("/api/v1/bookings/x/refund"), None);
        assert_eq!(recovery_of("/api/v1/auth/logout"), None);
    }
}
