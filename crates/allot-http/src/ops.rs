//! Operating the HTTP service: request ids (`X-Request-Id`, a tracing span per request),
//! Prometheus metrics (`/metrics`), readiness (`/readyz`), and hardening — request timeout,
//! security headers, CORS. Every layer here answers in the API's error format.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use allot_app::App;
use allot_app::telemetry;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

use crate::error::ApiError;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Longest client-supplied request id kept; a longer (or non-visible-ASCII) one is replaced.
pub const REQUEST_ID_BYTES_MAX: usize = 128;
pub const REQUEST_TIMEOUT_SECONDS_DEFAULT: u64 = 30;
/// How long browsers may cache a CORS preflight answer.
pub const CORS_MAX_AGE_SECONDS: u64 = 600;
/// How often histograms are folded in between scrapes, so they do not grow unscraped.
const METRICS_UPKEEP_SECONDS: u64 = 5;

/// Nothing but JSON is served from the API: no scripts, frames or sub-resources at all.
const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";
/// Swagger UI (under `/api-docs`) loads its own scripts, styles and images, and sets inline
/// styles; everything still from this origin only.
const DOCS_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                        img-src 'self' data:; frame-ancestors 'none'";
const DOCS_PREFIX: &str = "/api-docs";

/// Latency buckets, in seconds: 1 ms to the default request timeout.
const SECONDS_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Batch-size buckets, in requests: powers of two up to the writer's batch limit.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The operational part of [`crate::HttpOptions`].
#[derive(Debug, Clone)]
pub struct OpsOptions {
    /// A request still unanswered after this long gets 503 `timeout`.
    pub request_timeout_seconds: u64,
    /// Origins allowed by CORS; empty sends no CORS headers, `*` allows any origin.
    pub cors_origins: Vec<String>,
    /// `Strict-Transport-Security: max-age=…`, only when set (behind TLS).
    pub hsts_max_age_seconds: Option<u64>,
}

impl Default for OpsOptions {
    fn default() -> Self {
        Self {
            request_timeout_seconds: REQUEST_TIMEOUT_SECONDS_DEFAULT,
            cors_origins: Vec::new(),
            hsts_max_age_seconds: None,
        }
    }
}

/// The request's id, in the request extensions of every handler (and echoed as `X-Request-Id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// What the [`envelope`] layer needs, fixed at start-up from [`OpsOptions`].
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The `Strict-Transport-Security` value, only when configured.
    hsts: Option<HeaderValue>,
    timeout: Duration,
}

impl Envelope {
    pub fn new(options: &OpsOptions) -> Self {
        let hsts = options.hsts_max_age_seconds.and_then(|s| HeaderValue::from_str(&format!("max-age={s}")).ok());
        Self { hsts, timeout: Duration::from_secs(options.request_timeout_seconds) }
    }
}

/// The outermost layer, four jobs in one: the request id (the client's `X-Request-Id` if sane,
/// else a UUIDv7; a span carrying it around the request; echoed on the answer), the request
/// counted and timed by route, the timeout, and the security headers on whatever answer comes
/// back. One layer rather than four because each `from_fn` layer boxes the service inside it
/// and its future on every request (profiled: ~3 allocations and a copy of the stack's futures
/// per layer per request).
pub async fn envelope(State(envelope): State<Arc<Envelope>>, mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned);
    let id_header = HeaderValue::from_str(&id).ok();
    request.extensions_mut().insert(RequestId(id.clone()));
    let csp = if request.uri().path().starts_with(DOCS_PREFIX) { DOCS_CSP } else { API_CSP };
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = method_label(request.method());
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let span = tracing::info_span!("request", request_id = %id);
    let answered = async {
        let response = timeout(envelope.timeout, next.run(request)).await;
        log_answer(method, route, response.status(), started);
        response
    };
    let mut response = answered.instrument(span).await;
    record_metrics(method, route, response.status(), started);
    let headers = response.headers_mut();
    if let Some(value) = id_header {
        headers.insert(REQUEST_ID_HEADER, value);
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.entry(header::CONTENT_SECURITY_POLICY).or_insert(HeaderValue::from_static(csp));
    if let Some(value) = &envelope.hsts {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, value.clone());
    }
    response
}

/// Logs the answer in the request's span: a server error always (its cause is logged where
/// it happened; this says which request it ended), every answer at `debug`. (tower-http's
/// `TraceLayer` did this with a span and a layer of its own per request, ~3 % of the request
/// threads under load.)
fn log_answer(method: &str, route: &str, status: StatusCode, started: Instant) {
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    if status.is_server_error() {
        tracing::error!(method, route, status = status.as_u16(), latency_ms, "request failed");
    } else {
        tracing::debug!(method, route, status = status.as_u16(), latency_ms, "answered");
    }
}

/// 1 to [`REQUEST_ID_BYTES_MAX`] visible ASCII characters: safe to log and to echo.
pub fn valid_request_id(id: &str) -> bool {
    (1..=REQUEST_ID_BYTES_MAX).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Counts the request by route template (never the raw path: ids would explode the series).
fn record_metrics(method: &'static str, route: &str, status: StatusCode, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    let status = status.as_u16();
    let handles = route_metrics();
    let known = {
        let by_route = handles.read().unwrap_or_else(PoisonError::into_inner);
        by_route.get(route).and_then(|all| all.iter().find(|h| h.method == method && h.status == status).cloned())
    };
    let handle = known.unwrap_or_else(|| {
        let handle = RouteMetrics::register(method, route, status);
        let mut by_route = handles.write().unwrap_or_else(PoisonError::into_inner);
        if by_route.values().map(Vec::len).sum::<usize>() >= ROUTE_METRICS_MAX {
            by_route.clear();
        }
        by_route.entry(route.into()).or_default().push(handle.clone());
        handle
    });
    handle.requests.increment(1);
    handle.duration.record(seconds);
}

/// Past this many (route, method, status) handles kept, the map is emptied rather than grown
/// (routes are templates and methods and statuses few: a few hundred at most in practice).
const ROUTE_METRICS_MAX: usize = 4096;

/// The registered series of one (route, method, status), kept so that counting a request
/// builds no labels and hashes no key into the registry (each labelled `counter!` did both).
#[derive(Clone)]
struct RouteMetrics {
    method: &'static str,
    status: u16,
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

impl RouteMetrics {
    fn register(method: &'static str, route: &str, status: u16) -> Self {
        let route = route.to_owned();
        let requests = metrics::counter!(
            telemetry::HTTP_REQUESTS, "method" => method, "route" => route.clone(), "status" => status.to_string()
        );
        let duration = metrics::histogram!(telemetry::HTTP_REQUEST_DURATION, "method" => method, "route" => route);
        Self { method, status, requests, duration }
    }
}

/// Process-wide, as the recorder is.
fn route_metrics() -> &'static RwLock<HashMap<Box<str>, Vec<RouteMetrics>>> {
    static HANDLES: OnceLock<RwLock<HashMap<Box<str>, Vec<RouteMetrics>>>> = OnceLock::new();
    HANDLES.get_or_init(RwLock::default)
}

/// Standard methods by name; anything else one label, so clients cannot mint series.
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [Method; 7] =
        [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::HEAD, Method::OPTIONS];
    KNOWN.iter().find(|m| *m == method).map_or("other", Method::as_str)
}

/// Answers 503 `timeout` when the handler takes longer than the limit. A write still runs to
/// its end after that (every write runs detached and records its outcome): clients retry with
/// the same `Idempotency-Key`, or read what they changed.
async fn timeout(limit: Duration, response: impl Future<Output = Response>) -> Response {
    match tokio::time::timeout(limit, response).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(limit_seconds = limit.as_secs(), "request timed out");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "the request took too long; a write may still complete: retry with the same \
                 Idempotency-Key, or read before retrying without one",
            )
            .into_response()
        }
    }
}

/// The CORS layer for the configured origins; `None` (no CORS headers at all) when there are none.
pub fn cors(options: &OpsOptions) -> Option<CorsLayer> {
    if options.cors_origins.is_empty() {
        return None;
    }
    let origin = if options.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(options.cors_origins.iter().filter_map(|o| parse_origin(o)))
    };
    let layer = CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static(crate::idempotency::HEADER),
            REQUEST_ID_HEADER,
        ])
        .expose_headers([
            REQUEST_ID_HEADER,
            header::RETRY_AFTER,
            HeaderName::from_static("ratelimit-limit"),
            HeaderName::from_static("ratelimit-remaining"),
            HeaderName::from_static("ratelimit-reset"),
        ])
        .max_age(Duration::from_secs(CORS_MAX_AGE_SECONDS));
    Some(layer)
}

fn parse_origin(origin: &str) -> Option<HeaderValue> {
    let parsed = HeaderValue::from_str(origin.trim_end_matches('/')).ok();
    if parsed.is_none() {
        tracing::warn!(origin, "ignoring a CORS origin that is not a valid header value");
    }
    parsed
}

/// The process-wide Prometheus handle. The recorder is global to the process, so it is
/// installed once, whatever number of apps (tests) start; if another recorder got there
/// first, `/metrics` stays empty and says so in the log.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(install_recorder)
}

fn install_recorder() -> PrometheusHandle {
    let recorder = prometheus_builder().build_recorder();
    let handle = recorder.handle();
    if let Err(e) = metrics::set_global_recorder(recorder) {
        tracing::warn!(error = %e, "another metrics recorder is installed; /metrics will be empty");
    }
    telemetry::describe();
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(METRICS_UPKEEP_SECONDS));
            upkeep.run_upkeep();
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep thread not started; histograms fold in at each scrape");
    }
    handle
}

/// Histograms with buckets (not summaries), so they aggregate across nodes.
fn prometheus_builder() -> PrometheusBuilder {
    let with_buckets = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(telemetry::STORE_BATCH_SIZE.into()), &BATCH_BUCKETS));
    with_buckets.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "metric buckets refused; histograms render as summaries");
        PrometheusBuilder::new()
    })
}

/// `GET /metrics`: Prometheus text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String)))]
pub async fn metrics() -> Response {
    let body = metrics_handle().render();
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"))], body)
        .into_response()
}

/// `GET /readyz`: ready when the database answers and has every migration of this build.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready: the database answers and every migration is applied", body = crate::dto::StatusView),
    (status = 503, description = "`not_ready`", body = crate::error::ErrorBody)))]
pub async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.store.ready().await {
        Ok(()) => axum::Json(json!({ "status": "ready" })).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "readiness check failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the database is unreachable or not migrated for this version",
            )
            .into_response()
        }
    }
}
