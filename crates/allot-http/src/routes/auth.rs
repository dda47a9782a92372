//! `/auth/*` and `/me`.

use std::sync::Arc;

use allot_app::App;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use crate::dto::{LoginBody, RefreshBody, RegisterBody, user_json};
use crate::error::ApiResult;
use crate::extract::{Auth, Json};

pub async fn register(State(app): State<Arc<App>>, Json(body): Json<RegisterBody>) -> ApiResult<impl IntoResponse> {
    let user = app.register(&body.email, &body.password, &body.name).await?;
    Ok((StatusCode::CREATED, axum::Json(user_json(&user))))
}

pub async fn login(State(app): State<Arc<App>>, Json(body): Json<LoginBody>) -> ApiResult<impl IntoResponse> {
    let session = app.login(&body.email, &body.password).await?;
    Ok(axum::Json(json!({
        "access_token": session.access_token, "token_type": "Bearer",
        "expires_in": session.expires_in, "refresh_token": session.refresh_token,
    })))
}

pub async fn refresh(State(app): State<Arc<App>>, Json(body): Json<RefreshBody>) -> ApiResult<impl IntoResponse> {
    let session = app.refresh(&body.refresh_token).await?;
    Ok(axum::Json(json!({
        "access_token": session.access_token, "token_type": "Bearer",
        "expires_in": session.expires_in, "refresh_token": session.refresh_token,
    })))
}

pub async fn logout(State(app): State<Arc<App>>, Json(body): Json<RefreshBody>) -> ApiResult<impl IntoResponse> {
    app.logout(&body.refresh_token).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn me(State(app): State<Arc<App>>, Auth(principal): Auth) -> ApiResult<impl IntoResponse> {
    let user = app.me(&principal).await?;
    Ok(axum::Json(user_json(&user)))
}
