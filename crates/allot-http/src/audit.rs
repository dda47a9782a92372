//! The audit layer: every state-changing request (POST, PUT, PATCH, DELETE on a route) runs
//! inside an [`AuditScope`] naming who (principal and role), from where (peer address), which
//! request (`X-Request-Id`), what (the action of the route) and on what (the path's id). A
//! write the request makes records the event in its own transaction; a request that changed
//! nothing (refused, invalid, denied, rate-limited, a failed login) is recorded here once its
//! response is known, with the response's error code as the reason.
//!
//! A replayed idempotent response never reaches this layer: it is the same attempt, already
//! recorded when it first ran. A keyed hold does (its key is taken in its own write): its
//! write records it, or the writer drops its event when its key was not free; when it never
//! reached its write, its event is handed back on the response ([`DeferredAudit`]) for the
//! idempotency layer, which records it only if the request was not a replay or a refusal of
//! its key.

use std::net::SocketAddr;
use std::sync::Arc;

use allot_app::App;
use allot_app::audit::{AuditEvent, AuditScope};
use allot_app::auth::Principal;
use allot_app::store::IdempotencyKey;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::Method;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;

use crate::extract::bearer;

/// The stable error code of a response, left by [`crate::error::ApiError`] for this layer.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// The event of a keyed hold that never reached its write, left on its response for the
/// idempotency layer to record, or not ([`crate::idempotency`]).
#[derive(Debug, Clone)]
pub(crate) struct DeferredAudit(pub AuditEvent);

/// Audit names of the state-changing routes, by method and route template.
const ACTIONS: &[(&str, &str, &str)] = &[
    ("POST", "/api/v1/auth/register", "auth.register"),
    ("POST", "/api/v1/auth/login", "auth.login"),
    ("POST", "/api/v1/auth/refresh", "auth.refresh"),
    ("POST", "/api/v1/auth/logout", "auth.logout"),
    ("POST", "/api/v1/venues", "venue.create"),
    ("PATCH", "/api/v1/venues/{id}", "venue.update"),
    ("DELETE", "/api/v1/venues/{id}", "venue.delete"),
    ("POST", "/api/v1/venues/{id}/resources", "resource.create"),
    ("POST", "/api/v1/venues/{id}/events", "event.create"),
    ("PATCH", "/api/v1/resources/{id}", "resource.update"),
    ("DELETE", "/api/v1/resources/{id}", "resource.delete"),
    ("POST", "/api/v1/bookings", "booking.hold"),
    ("POST", "/api/v1/bookings/{id}/confirm", "booking.confirm"),
    ("POST", "/api/v1/bookings/{id}/cancel", "booking.cancel"),
    ("POST", "/api/v1/payments/webhooks/{provider}", "payment.event"),
    ("POST", "/api/v1/users/{id}/roles", "user.role_grant"),
    ("DELETE", "/api/v1/users/{id}/roles/{role}", "user.role_revoke"),
    ("POST", "/api/v1/api-keys", "api_key.create"),
    ("DELETE", "/api/v1/api-keys/{id}", "api_key.revoke"),
];

/// The audit name of a route: from [`ACTIONS`], else `METHOD template` (never a raw path).
pub fn action_of(method: &Method, template: &str) -> String {
    ACTIONS
        .iter()
        .find(|(m, t, _)| *m == method.as_str() && *t == template)
        .map_or_else(|| format!("{method} {template}"), |(_, _, action)| (*action).to_owned())
}

fn changes_state(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

fn role_of(principal: Option<&Principal>) -> &'static str {
    match principal {
        None => "anonymous",
        Some(p) if p.is_partner() => "partner",
        Some(p) => allot_app::audit::role_name(&p.roles),
    }
}

pub async fn layer(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if !changes_state(request.method()) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let template = parts.extensions.get::<MatchedPath>().map(|m| m.as_str().to_owned());
    let action = action_of(&parts.method, template.as_deref().unwrap_or("unmatched"));
    let target = match <RawPathParams as FromRequestParts<()>>::from_request_parts(&mut parts, &()).await {
        Ok(params) => params.iter().next().map(|(_, v)| v.to_owned()),
        Err(_) => None,
    };
    let (event, principal) = draft(&app, &parts, action, target).await;
    if let Some(p) = principal {
        // The handler's `Auth` extractor takes it from here instead of verifying again.
        parts.extensions.insert(p);
    }
    let scope = match parts.extensions.get::<crate::idempotency::Keyed>() {
        Some(keyed) => AuditScope::new(event).with_idempotency_key(keyed.0.clone()),
        None => AuditScope::new(event),
    };
    let deferred = parts.extensions.get::<crate::idempotency::HoldUnderKey>().is_some();
    let mut response = run_in(&app, scope.clone(), next.run(Request::from_parts(parts, body)), deferred).await;
    if deferred && let Some(event) = finish(&app, &scope, &response) {
        response.extensions_mut().insert(DeferredAudit(event));
    }
    response
}

/// A keyed request answered by recovering what its lost attempt did, when that changes
/// something (`crate::idempotency`): an attempt of its route like any other, though no
/// handler runs, recorded as a recovery. Its kept change marks `key` like the handler's would.
pub(crate) async fn recovery(
    app: &Arc<App>,
    parts: &Parts,
    key: IdempotencyKey,
    recover: impl Future<Output = Response>,
) -> Response {
    let (action, target) = match_path(&parts.method, parts.uri.path())
        .unwrap_or_else(|| (action_of(&parts.method, parts.uri.path()), None));
    let (mut event, _) = draft(app, parts, action, target).await;
    event.details.insert("recovery".to_owned(), "answer_lost".to_owned());
    run_in(app, AuditScope::new(event).with_idempotency_key(key), recover, false).await
}

/// Runs `request` inside `scope`, then records its event unless a write it made already did,
/// or, `deferred`, leaves that to the caller ([`DeferredAudit`]).
async fn run_in(
    app: &Arc<App>,
    scope: AuditScope,
    request: impl Future<Output = Response>,
    deferred: bool,
) -> Response {
    let mut unfinished = Unfinished { app: app.clone(), scope: Some(scope.clone()) };
    let response = scope.clone().run(request).await;
    unfinished.scope = None;
    if !deferred && let Some(event) = finish(app, &scope, &response) {
        app.append_audit(event).await;
    }
    response
}

/// The event of `scope`'s request, answered `response`, still to append on its own (no write
/// recorded it).
fn finish(app: &App, scope: &AuditScope, response: &Response) -> Option<AuditEvent> {
    let status = response.status();
    let code = response.extensions().get::<ErrorCode>().map(|c| c.0);
    let succeeded = status.is_success() || status.is_redirection();
    scope.finish(succeeded, code.or(Some("error")), app.clock.now())
}

/// The event of a request, before its outcome: who, from where, which request, what, on what.
async fn draft(app: &App, parts: &Parts, action: String, target: Option<String>) -> (AuditEvent, Option<Principal>) {
    let principal = match parts.extensions.get::<Principal>() {
        Some(p) => Some(p.clone()),
        None => match bearer(parts) {
            Some(token) => app.authenticate(token).await.ok(),
            None => None,
        },
    };
    let mut event = AuditEvent::new(action, role_of(principal.as_ref()), app.clock.now());
    event.actor_id = principal.as_ref().map(|p| p.user_id.to_string());
    event.ip = client_addr(parts);
    event.request_id = request_id(parts);
    event.target_id = target;
    (event, principal)
}

/// Records a state-changing request refused before routing (rate limits, the
/// `Idempotency-Key` layer): the action and target come from matching its path against the
/// audited routes; a path of no route is not an attempt at anything and is not recorded. The
/// caller is named from the token's signature alone: refusals must stay cheap (a flood of
/// them costs one grouped append each, never a database read).
pub async fn record_refused(app: &App, parts: &Parts, reason: &str, details: &[(&str, String)]) {
    if !changes_state(&parts.method) {
        return;
    }
    let Some((action, target)) = match_path(&parts.method, parts.uri.path()) else { return };
    let (role, actor) = match (parts.extensions.get::<Principal>(), bearer(parts)) {
        (Some(p), _) => (role_of(Some(p)), Some(p.user_id.to_string())),
        (None, Some(token)) => ("unverified", app.token_subject(token).map(|u| u.to_string())),
        (None, None) => ("anonymous", None),
    };
    let mut event = AuditEvent::new(action, role, app.clock.now());
    event.actor_id = actor;
    event.ip = client_addr(parts);
    event.request_id = request_id(parts);
    event.target_id = target;
    event.outcome = allot_app::audit::Outcome::Failure;
    event.reason = Some(reason.to_owned());
    for (key, value) in details {
        event.details.insert((*key).to_owned(), value.clone());
    }
    app.append_audit(event).await;
}

/// The action of the audited route `path` matches, and the value of its first parameter.
fn match_path(method: &Method, path: &str) -> Option<(String, Option<String>)> {
    let segments: Vec<&str> = path.split('/').collect();
    for (m, template, action) in ACTIONS {
        if *m != method.as_str() {
            continue;
        }
        let pattern: Vec<&str> = template.split('/').collect();
        if pattern.len() != segments.len() {
            continue;
        }
        let fits = pattern.iter().zip(&segments).all(|(p, s)| p.starts_with('{') || p == s);
        if fits {
            let param = pattern.iter().zip(&segments).find(|(p, _)| p.starts_with('{')).map(|(_, s)| (*s).to_owned());
            return Some(((*action).to_owned(), param));
        }
    }
    None
}

/// The client's address: as the rate limits identify it (behind a trusted proxy, from
/// `X-Forwarded-For`), else the connection's peer.
fn client_addr(parts: &Parts) -> Option<String> {
    if let Some(addr) = parts.extensions.get::<crate::ratelimit::ClientAddr>() {
        return Some(addr.0.to_string());
    }
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_string())
}

/// Records the attempt when its request never finishes here: a timeout drops it, a panic
/// unwinds through it. `Drop` cannot wait, so the append runs as a task of its own.
struct Unfinished {
    app: Arc<App>,
    scope: Option<AuditScope>,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(scope) = self.scope.take() else { return };
        let reason = if std::thread::panicking() { "internal" } else { "timeout" };
        let Some(event) = scope.finish(false, Some(reason), self.app.clock.now()) else { return };
        let app = self.app.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { app.append_audit(event).await });
        }
    }
}

/// The request's id as the ops layer settled it (the client's `X-Request-Id` or a new one).
fn request_id(parts: &Parts) -> Option<String> {
    parts.extensions.get::<crate::RequestId>().map(|id| id.0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_have_stable_action_names() {
        assert_eq!(action_of(&Method::POST, "/api/v1/bookings"), "booking.hold");
        assert_eq!(action_of(&Method::DELETE, "/api/v1/venues/{id}"), "venue.delete");
        assert_eq!(action_of(&Method::PUT, "/api/v1/other/{id}"), "PUT /api/v1/other/{id}");
    }

    #[test]
    fn paths_refused_before_routing_find_their_action() {
        let on = |m: Method, p: &str| match_path(&m, p);
        assert_eq!(on(Method::POST, "/api/v1/bookings"), Some(("booking.hold".into(), None)));
        let confirm = on(Method::POST, "/api/v1/bookings/b1/confirm");
        assert_eq!(confirm, Some(("booking.confirm".into(), Some("b1".into()))));
        assert_eq!(on(Method::DELETE, "/api/v1/venues/v1"), Some(("venue.delete".into(), Some("v1".into()))));
        assert_eq!(on(Method::POST, "/api/v1/nothing/here"), None);
        assert_eq!(on(Method::GET, "/api/v1/bookings"), None);
    }
}
