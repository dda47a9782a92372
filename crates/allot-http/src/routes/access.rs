//! `/users/{id}` with its roles, and `/api-keys`: admins decide who may do what.

use std::sync::Arc;

use allot_app::App;
use allot_app::AppError;
use allot_app::access::{RoleGrant, RoleRevoke};
use allot_app::store::Role;
use allot_core::ids::VenueId;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;

use crate::dto::{ApiKeyBody, RoleBody, api_key_json, created_api_key_json, page_json, parse_scopes, user_json};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, Json, PageQuery, Query, path_id};

fn parse_role(raw: &str) -> ApiResult<Role> {
    Role::parse(raw).ok_or_else(|| {
        ApiError::field(StatusCode::BAD_REQUEST, "role", "unknown role; known roles: customer, manager, admin")
    })
}

fn parse_venue(raw: Option<&str>) -> ApiResult<Option<VenueId>> {
    raw.filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| ApiError::field(StatusCode::BAD_REQUEST, "venue_id", "not a venue id")))
        .transpose()
}

pub async fn get_user(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let user = app.user(&principal, path_id(&id, "user")?).await?;
    Ok(axum::Json(user_json(&user)))
}

pub async fn grant_role(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
    Json(body): Json<RoleBody>,
) -> ApiResult<impl IntoResponse> {
    let id = path_id(&id, "user")?;
    let grant =
        RoleGrant::new(parse_role(&body.role)?, parse_venue(body.venue_id.as_deref())?).map_err(AppError::from)?;
    let user = app.grant_role(&principal, id, grant).await?;
    Ok(axum::Json(user_json(&user)))
}

#[derive(Debug, Deserialize)]
pub struct RevokeQuery {
    venue_id: Option<String>,
}

pub async fn revoke_role(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path((id, role)): Path<(String, String)>,
    Query(q): Query<RevokeQuery>,
) -> ApiResult<impl IntoResponse> {
    let id = path_id(&id, "user")?;
    // The role is part of the path: one that does not exist is not found.
    let role = Role::parse(&role).ok_or_else(|| ApiError::not_found("role"))?;
    let revoke = RoleRevoke::new(role, parse_venue(q.venue_id.as_deref())?).map_err(AppError::from)?;
    let user = app.revoke_role(&principal, id, revoke).await?;
    Ok(axum::Json(user_json(&user)))
}

pub async fn create_api_key(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Json(body): Json<ApiKeyBody>,
) -> ApiResult<impl IntoResponse> {
    let scopes = parse_scopes(&body.scopes)?;
    let created = app.create_api_key(&principal, &body.name, scopes).await?;
    Ok((StatusCode::CREATED, axum::Json(created_api_key_json(&created))))
}

pub async fn list_api_keys(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Query(q): Query<PageQuery>,
) -> ApiResult<impl IntoResponse> {
    let keys = app.api_keys(&principal, q.parse()?).await?;
    Ok(axum::Json(page_json(&keys, api_key_json)))
}

pub async fn revoke_api_key(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    app.revoke_api_key(&principal, path_id(&id, "API key")?).await?;
    Ok(StatusCode::NO_CONTENT)
}
