//! `/auth/*` and `/me`.

use std::sync::Arc;

use allot_app::App;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use crate::dto::{LoginBody, RefreshBody, RegisterBody, SessionView, UserView, session_json, user_json};
use crate::error::ApiResult;
use crate::extract::{Auth, Json};
use crate::openapi::{BadRequest, Conflict, Unauthenticated, Unprocessable};

/// Creates a customer account.
#[utoipa::path(post, path = "/api/v1/auth/register", tag = "auth", request_body = RegisterBody,
    responses((status = 201, description = "The new user", body = UserView), BadRequest, Conflict, Unprocessable))]
pub async fn register(State(app): State<Arc<App>>, Json(body): Json<RegisterBody>) -> ApiResult<impl IntoResponse> {
    let user = app.register(&body.email, &body.password, &body.name).await?;
    Ok((StatusCode::CREATED, axum::Json(user_json(&user))))
}

/// Starts a session: a 15-minute access token and a refresh token.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginBody,
    responses((status = 200, description = "A new session", body = SessionView), BadRequest, Unauthenticated))]
pub async fn login(State(app): State<Arc<App>>, Json(body): Json<LoginBody>) -> ApiResult<impl IntoResponse> {
    let session = app.login(&body.email, &body.password).await?;
    Ok(axum::Json(session_json(session)))
}

/// Rotates a refresh token; a reused one revokes its whole family.
#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshBody,
    responses((status = 200, description = "The rotated session", body = SessionView), BadRequest, Unauthenticated))]
pub async fn refresh(State(app): State<Arc<App>>, Json(body): Json<RefreshBody>) -> ApiResult<impl IntoResponse> {
    let session = app.refresh(&body.refresh_token).await?;
    Ok(axum::Json(session_json(session)))
}

/// Revokes a refresh token and its family.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", request_body = RefreshBody,
    responses((status = 204, description = "Revoked (also when it was unknown)"), BadRequest))]
pub async fn logout(State(app): State<Arc<App>>, Json(body): Json<RefreshBody>) -> ApiResult<impl IntoResponse> {
    app.logout(&body.refresh_token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The current user.
#[utoipa::path(get, path = "/api/v1/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "The authenticated user", body = UserView), Unauthenticated))]
pub async fn me(State(app): State<Arc<App>>, Auth(principal): Auth) -> ApiResult<impl IntoResponse> {
    let user = app.me(&principal).await?;
    Ok(axum::Json(user_json(&user)))
}
