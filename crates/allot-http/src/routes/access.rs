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
use utoipa::IntoParams;

use crate::dto::{
    ApiKeyBody, ApiKeyView, CreatedApiKeyView, PageView, RoleBody, UserView, api_key_json, created_api_key_json,
    page_json, parse_scopes, user_json,
};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Auth, Json, PageQuery, Query, path_id};
use crate::openapi::{BadRequest, Conflict, Forbidden, NotFound, Unauthenticated, Unprocessable};

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

/// A user account with its roles (admins).
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "access", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")),
    responses((status = 200, description = "The user", body = UserView), Unauthenticated, Forbidden, NotFound))]
pub async fn get_user(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let user = app.user(&principal, path_id(&id, "user")?).await?;
    Ok(axum::Json(user_json(&user)))
}

/// Grants a role (admins); a manager's role is for one venue at a time.
#[utoipa::path(post, path = "/api/v1/users/{id}/roles", tag = "access", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id")), request_body = RoleBody,
    responses((status = 200, description = "The user with the role", body = UserView), BadRequest, Unauthenticated,
        Forbidden, NotFound, Unprocessable))]
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

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RevokeQuery {
    /// For `manager`: the one venue no longer managed (all of them when left out).
    #[param(value_type = Option<uuid::Uuid>)]
    venue_id: Option<String>,
}

/// Revokes a role (admins); the last admin keeps theirs (409).
#[utoipa::path(delete, path = "/api/v1/users/{id}/roles/{role}", tag = "access", security(("bearer" = [])),
    params(("id" = String, Path, description = "User id"),
        ("role" = String, Path, description = "`customer`, `manager` or `admin`"), RevokeQuery),
    responses((status = 200, description = "The user without the role", body = UserView), BadRequest,
        Unauthenticated, Forbidden, NotFound, Conflict, Unprocessable))]
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

/// Creates a partner API key (admins): the key is in this response only.
#[utoipa::path(post, path = "/api/v1/api-keys", tag = "access", security(("bearer" = [])), request_body = ApiKeyBody,
    responses((status = 201, description = "The key, shown once", body = CreatedApiKeyView), BadRequest,
        Unauthenticated, Forbidden, Unprocessable))]
pub async fn create_api_key(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Json(body): Json<ApiKeyBody>,
) -> ApiResult<impl IntoResponse> {
    let scopes = parse_scopes(&body.scopes)?;
    let created = app.create_api_key(&principal, &body.name, scopes).await?;
    Ok((StatusCode::CREATED, axum::Json(created_api_key_json(&created))))
}

/// Partner API keys, revoked ones too (admins); never the keys themselves.
#[utoipa::path(get, path = "/api/v1/api-keys", tag = "access", security(("bearer" = [])), params(PageQuery),
    responses((status = 200, description = "A page of keys", body = PageView<ApiKeyView>), BadRequest,
        Unauthenticated, Forbidden))]
pub async fn list_api_keys(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Query(q): Query<PageQuery>,
) -> ApiResult<impl IntoResponse> {
    let keys = app.api_keys(&principal, q.parse()?).await?;
    Ok(axum::Json(page_json(&keys, api_key_json)))
}

/// Revokes a partner API key (admins): it stops working at once.
#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", tag = "access", security(("bearer" = [])),
    params(("id" = String, Path, description = "API key id")),
    responses((status = 204, description = "Revoked"), Unauthenticated, Forbidden, NotFound))]
pub async fn revoke_api_key(
    State(app): State<Arc<App>>,
    Auth(principal): Auth,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    app.revoke_api_key(&principal, path_id(&id, "API key")?).await?;
    Ok(StatusCode::NO_CONTENT)
}
