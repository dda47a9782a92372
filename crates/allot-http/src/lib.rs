//! Allot's HTTP API v1 (SPEC §4) on axum. Handlers parse input into domain types, call one use
//! case of [`allot_app::App`], and map the result; [`error::ApiError`] maps every failure to a
//! status and stable code. This is the only crate that speaks JSON on the wire.

pub mod audit;
pub mod dto;
pub mod error;
pub mod extract;
mod idempotency;
pub mod openapi;
pub mod ops;
pub mod ratelimit;
pub mod routes;
pub mod stripe;

use std::future::Future;
use std::sync::Arc;

use allot_app::App;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;
use tokio_util::task::TaskTracker;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
pub use crate::ops::{OpsOptions, RequestId};

/// Largest request body accepted, in bytes.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// How the HTTP layer runs, beyond the app itself: set by the binary from its configuration,
/// and by tests. `Default` is what `allot serve` does with no configuration.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// Request rate limits (SPEC §5); on, in memory, by default.
    pub rate_limits: ratelimit::RateLimits,
    /// Request timeout, CORS, HSTS.
    pub ops: OpsOptions,
}

pub fn router(app: Arc<App>, options: &HttpOptions) -> Router {
    router_tracking(app, options, TaskTracker::new())
}

/// [`router`], its detached requests tracked by `detached` ([`serve`] waits for them).
fn router_tracking(app: Arc<App>, options: &HttpOptions, detached: TaskTracker) -> Router {
    ops::metrics_handle();
    let limiter = Arc::new(ratelimit::Limiter::new(app.clone(), options.rate_limits.clone()));
    let guarded = Guard { limiter, detached };
    let (routes, spec) = documented_routes().split_for_parts();
    // One `layer` call for every layer: axum boxes each route's service once per call, and
    // every middleware clones the service inside it per request, so ten separate calls cost
    // ten boxed services per route and ~50 allocations per request. The first layer here is
    // the outermost.
    let layers = tower::ServiceBuilder::new()
        // Outside CORS, so that every answer (preflights, panics, timeouts, 404s) gets the
        // request id and the security headers, and is counted.
        .layer(axum::middleware::from_fn_with_state(Arc::new(ops::Envelope::new(&options.ops)), ops::envelope))
        .option_layer(ops::cors(&options.ops))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(guarded, guard));
    routes
        // Inside routing, so that the route template is known; after every route.
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), audit::layer))
        .merge(openapi::swagger_ui(finish(spec)))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(layers)
        .with_state(app)
}

/// Rate limits, then the `Idempotency-Key`: one `from_fn` layer rather than two, for the
/// reason the envelope is one ([`ops::envelope`]).
async fn guard(
    axum::extract::State(guard): axum::extract::State<Guard>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let app = guard.limiter.app().clone();
    let detached = guard.detached.clone();
    ratelimit::limit(&guard.limiter, request, |request| idempotency::keyed(app, request, next, detached)).await
}

/// What [`guard`] needs: the rate limiter, and the tracker of the requests that run detached.
#[derive(Clone)]
struct Guard {
    limiter: Arc<ratelimit::Limiter>,
    detached: TaskTracker,
}

/// Every route with its OpenAPI entry (`routes!` takes both from the handler's
/// `#[utoipa::path]`). Register routes here or in [`routes::api`], never with a plain `route`:
/// `tests/openapi.rs` fails on any route the document lacks.
fn documented_routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(routes::api())
        .routes(routes!(healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
}

/// The OpenAPI 3.1 document of every route, as served at `/api-docs/openapi.json`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    finish(documented_routes().split_for_parts().1)
}

fn finish(mut spec: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    openapi::add_shared(&mut spec);
    spec
}

/// Connections the kernel may hold completed but not yet accepted (capped by
/// `net.core.somaxconn`). `TcpListener::bind` asks for 128: a flash sale's 1 000 customers
/// connecting at once overflowed it, and every dropped SYN waited a second to be retried.
pub const LISTEN_BACKLOG_MAX: u32 = 4096;

/// Binds `addr` (`host:port`; port 0 picks a free port) with a backlog of
/// [`LISTEN_BACKLOG_MAX`], trying each address the host resolves to.
pub async fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        // As std's bind does: a restarted server can take its port back at once.
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(LISTEN_BACKLOG_MAX)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error
        .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "address resolves to nothing")))
}

/// Serves until `shutdown` completes, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    options: &HttpOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let detached = TaskTracker::new();
    let service =
        router_tracking(app, options, detached.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = axum::serve(listener, service).with_graceful_shutdown(shutdown).await;
    // Requests whose clients are gone still run: a charge taken must be recorded, a write's
    // idempotency key completed, before the process goes.
    detached.close();
    let drain = std::time::Duration::from_secs(SHUTDOWN_DRAIN_SECONDS_MAX);
    if tokio::time::timeout(drain, detached.wait()).await.is_err() {
        tracing::error!(running = detached.len(), "shut down with requests still running");
    }
    served
}

/// Longest [`serve`] waits at shutdown for requests still running detached from their clients.
pub const SHUTDOWN_DRAIN_SECONDS_MAX: u64 = 30;

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Up", body = dto::StatusView)))]
async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// A bug must still answer in the API's error format, and say nothing about itself.
fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    tracing::error!("a request handler panicked");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal server error").into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns: every request's middleware future is allocated and
    /// copied whole, whichever of its paths the request takes.
    fn future_bytes<F, A, B, C, R>(_: &F) -> usize
    where
        F: Fn(A, B, C) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// The middleware's rare paths (a keyed request, a detached task) are boxed or spawned when
    /// called, not nested in every request's future: nested, `guard`'s was 34 KiB, copied per
    /// request, a fifth of a hold's request-thread time (docs/benchmarks-history.md).
    #[test]
    fn every_request_s_middleware_future_stays_small() {
        let limits = [
            ("guard", future_bytes(&guard), 4 * 1024),
            ("audit::layer", future_bytes(&audit::layer), 4 * 1024),
            ("ops::envelope", future_bytes(&ops::envelope), 4 * 1024),
        ];
        for (name, bytes, bytes_max) in limits {
            assert!(bytes <= bytes_max, "{name}'s future is {bytes} bytes, more than {bytes_max}");
        }
    }
}
