//! Allot's HTTP API v1 (SPEC §4) on axum. Handlers parse input into domain types, call one use
//! case of [`allot_app::App`], and map the result; [`error::ApiError`] maps every failure to a
//! status and stable code. This is the only crate that speaks JSON on the wire.

pub mod dto;
pub mod error;
pub mod extract;
mod idempotency;
pub mod routes;

use std::future::Future;
use std::sync::Arc;

use allot_app::App;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use serde_json::json;

use crate::error::ApiError;
use crate::routes::{access, auth, bookings, catalog};

/// Largest request body accepted, in bytes.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// How the HTTP layer runs, beyond the app itself: set by the binary from its configuration,
/// and by tests. `Default` is what `allot serve` does with no configuration.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {}

/// Every route [`router`] serves, as `(method, path template)`. The authorization matrix test
/// gives each one an expected answer for every kind of caller; a unit test below checks this
/// list against the router's own source, so a route cannot be added without it.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/refresh"),
    ("POST", "/api/v1/auth/logout"),
    ("GET", "/api/v1/me"),
    ("GET", "/api/v1/venues"),
    ("POST", "/api/v1/venues"),
    ("GET", "/api/v1/venues/{id}"),
    ("PATCH", "/api/v1/venues/{id}"),
    ("DELETE", "/api/v1/venues/{id}"),
    ("GET", "/api/v1/venues/{id}/resources"),
    ("POST", "/api/v1/venues/{id}/resources"),
    ("GET", "/api/v1/venues/{id}/events"),
    ("POST", "/api/v1/venues/{id}/events"),
    ("GET", "/api/v1/resources/{id}"),
    ("PATCH", "/api/v1/resources/{id}"),
    ("DELETE", "/api/v1/resources/{id}"),
    ("GET", "/api/v1/resources/{id}/availability"),
    ("GET", "/api/v1/events/{id}"),
    ("GET", "/api/v1/events/{id}/seats"),
    ("GET", "/api/v1/bookings"),
    ("POST", "/api/v1/bookings"),
    ("GET", "/api/v1/bookings/{id}"),
    ("POST", "/api/v1/bookings/{id}/confirm"),
    ("POST", "/api/v1/bookings/{id}/cancel"),
    ("GET", "/api/v1/users/{id}"),
    ("POST", "/api/v1/users/{id}/roles"),
    ("DELETE", "/api/v1/users/{id}/roles/{role}"),
    ("GET", "/api/v1/api-keys"),
    ("POST", "/api/v1/api-keys"),
    ("DELETE", "/api/v1/api-keys/{id}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
];

pub fn router(app: Arc<App>, options: &HttpOptions) -> Router {
    let _ = options;
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
        .route("/users/{id}", get(access::get_user))
        .route("/users/{id}/roles", post(access::grant_role))
        .route("/users/{id}/roles/{role}", delete(access::revoke_role))
        .route("/api-keys", get(access::list_api_keys).post(access::create_api_key))
        .route("/api-keys/{id}", delete(access::revoke_api_key));
    Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(app.clone(), idempotency::layer))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(tower_http::trace::TraceLayer::new_for_http())
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

async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    let page = allot_app::store::PageRequest { after: None, limit: 1 };
    match app.store.venues(page).await {
        Ok(_) => (StatusCode::OK, axum::Json(json!({ "status": "ready" }))).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "status": "unavailable" }))).into_response()
        }
    }
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
    use std::collections::BTreeSet;

    /// The `(METHOD, path)` pairs `router` registers, read from its source: each
    /// `.route("<path>", get(..).post(..))`, prefixed `/api/v1` before the `nest`.
    fn registered() -> BTreeSet<(String, String)> {
        let source = include_str!("lib.rs");
        let body = source.split("pub fn router(").nth(1).and_then(|s| s.split("\n}\n").next()).unwrap_or_default();
        let (api, root) = body.split_once(".nest(\"/api/v1\", api)").unwrap_or_default();
        let mut routes = BTreeSet::new();
        for (prefix, part) in [("/api/v1", api), ("", root)] {
            for call in part.split(".route(").skip(1) {
                let path = call.split('"').nth(1).unwrap_or_default();
                let args = call_arguments(call);
                for method in ["get", "post", "put", "patch", "delete"] {
                    let called = args
                        .match_indices(&format!("{method}("))
                        .any(|(i, _)| !args[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':'));
                    if called {
                        routes.insert((method.to_uppercase(), format!("{prefix}{path}")));
                    }
                }
            }
        }
        routes
    }

    /// The text of a call's arguments, up to its closing parenthesis.
    fn call_arguments(after_open: &str) -> &str {
        let mut depth = 1;
        for (i, c) in after_open.char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 1 => return &after_open[..i],
                ')' => depth -= 1,
                _ => {}
            }
        }
        after_open
    }

    #[test]
    fn routes_lists_exactly_what_the_router_serves() {
        let listed: BTreeSet<(String, String)> =
            super::ROUTES.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
        assert_eq!(listed.len(), super::ROUTES.len(), "ROUTES has duplicates");
        let registered = registered();
        assert!(registered.len() > 20, "the router's source was read: {registered:?}");
        assert_eq!(listed, registered, "ROUTES and router() disagree");
    }
}
