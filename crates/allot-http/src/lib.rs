//! Allot's HTTP API v1 (SPEC §4) on axum. Handlers parse input into domain types, call one use
//! case of [`allot_app::App`], and map the result; [`error::ApiError`] maps every failure to a
//! status and stable code. This is the only crate that speaks JSON on the wire.

pub mod audit;
pub mod dto;
pub mod error;
pub mod extract;
mod idempotency;
pub mod ops;
pub mod ratelimit;
pub mod routes;

use std::future::Future;
use std::sync::Arc;

use allot_app::App;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::json;

use crate::error::ApiError;
pub use crate::ops::{OpsOptions, RequestId};
use crate::routes::{auth, bookings, catalog};

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
    ops::metrics_handle();
    let limiter = Arc::new(ratelimit::Limiter::new(app.clone(), options.rate_limits.clone()));
    let timeout = std::time::Duration::from_secs(options.ops.request_timeout_seconds);
    let api = Router::new()
        .route("/auth/register", post(auth::register))
        .route("/auth/login", post(auth::login))
        .route("/auth/refresh", post(auth::refresh))
        .route("/auth/logout", post(auth::logout))
        .route("/me", get(auth::me))
        .route("/venues", get(catalog::list_venues).post(catalog::create_venue))
        .route("/venues/{id}", get(catalog::get_venue).patch(catalog::update_venue).delete(catalog::delete_venue))
        .route("/venues/{id}/resources", get(catalog::list_resources).post(catalog::create_resource))
        .route("/venues/{id}/events", get(catalog::list_events).post(catalog::create_event))
        .route(
            "/resources/{id}",
            get(catalog::get_resource).patch(catalog::update_resource).delete(catalog::delete_resource),
        )
        .route("/resources/{id}/availability", get(catalog::availability))
        .route("/events/{id}", get(catalog::get_event))
        .route("/events/{id}/seats", get(catalog::seat_map))
        .route("/bookings", get(bookings::list).post(bookings::hold))
        .route("/bookings/{id}", get(bookings::get))
        .route("/bookings/{id}/confirm", post(bookings::confirm))
        .route("/bookings/{id}/cancel", post(bookings::cancel))
        .route("/audit", get(routes::audit::list))
        // Inside routing, so that the route template is known; after every route.
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), audit::layer));
    let router = Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(app.clone(), idempotency::layer))
        .layer(axum::middleware::from_fn_with_state(limiter, ratelimit::layer))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(axum::middleware::from_fn_with_state(timeout, ops::timeout))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(axum::middleware::from_fn(ops::record_metrics));
    // Outermost, so that every answer (preflights, panics, timeouts, 404s) gets them.
    let router = match ops::cors(&options.ops) {
        Some(cors) => router.layer(cors),
        None => router,
    };
    router
        .layer(axum::middleware::from_fn_with_state(ops::hsts_value(&options.ops), ops::security_headers))
        .layer(axum::middleware::from_fn(ops::request_id))
        .with_state(app)
}

/// Serves until `shutdown` completes, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    options: &HttpOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = router(app, options).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, service).with_graceful_shutdown(shutdown).await
}

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
