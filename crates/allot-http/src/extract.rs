//! Extractors that turn raw requests into parsed values or a 4xx `ApiError`: JSON bodies (with
//! the path of the failing field), bearer authentication, ids in paths, query strings.

use std::sync::Arc;

use allot_app::App;
use allot_app::auth::Principal;
use allot_app::store::{PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX, PageRequest};
use allot_core::FieldErrors;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body. Errors name the field: `{"fields": {"items[0].quantity": "invalid type …"}}`.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::field(StatusCode::PAYLOAD_TOO_LARGE, "body", "request body too large")
            } else {
                ApiError::field(StatusCode::BAD_REQUEST, "body", &e.body_text())
            }
        })?;
        parse_json(&bytes).map(Json)
    }
}

/// Parses JSON; an empty body is read as `{}` so all-optional bodies may be left out.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { bytes };
    // serde would also read a struct from a positional array; the API only takes objects.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(FieldErrors::single("body", "must be a JSON object")));
    }
    if has_escaped_nul(bytes) {
        return Err(ApiError::bad_request(FieldErrors::single(
            "body",
            "text may not contain NUL characters (\\u0000)",
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() { "body".to_owned() } else { path };
        let message = e.inner().to_string();
        // serde appends " at line 1 column 9"; the field path already says where.
        let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
        ApiError::bad_request(FieldErrors::single(field, message))
    })?;
    de.end()
        .map_err(|_| ApiError::bad_request(FieldErrors::single("body", "unexpected data after the JSON object")))?;
    Ok(value)
}

/// True when a JSON text holds the escape `\u0000` (raw control characters are not valid JSON):
/// no stored text may contain NUL, which PostgreSQL refuses outright.
fn has_escaped_nul(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes[i + 1..].starts_with(b"u0000") {
                return true;
            }
            i += 2; // the escaped character, so `\\u0000` (a backslash, then text) is not NUL
        } else {
            i += 1;
        }
    }
    false
}

/// The authenticated user; 401 without a valid bearer token.
pub struct Auth(pub Principal);

impl FromRequestParts<Arc<App>> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        if let Some(principal) = parts.extensions.remove::<Principal>() {
            return Ok(Auth(principal));
        }
        let token = bearer(parts).ok_or_else(ApiError::unauthenticated)?;
        app.authenticate(token).await.map(Auth).map_err(|_| ApiError::unauthenticated())
    }
}

pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim()).filter(|t| !t.is_empty())
}

/// Parses an id from a path segment; a malformed id is simply not found.
pub fn path_id<T: std::str::FromStr>(raw: &str, what: &str) -> Result<T, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found(what))
}

/// `?limit=&cursor=` of every list.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, default 20.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<uuid::Uuid>)]
    pub cursor: Option<String>,
}

impl PageQuery {
    pub fn parse(&self) -> Result<PageRequest, ApiError> {
        let mut errors = FieldErrors::new();
        let limit = match self.limit.as_deref() {
            None => PAGE_LIMIT_DEFAULT,
            Some(raw) => match raw.parse::<u32>() {
                Ok(n) if (1..=PAGE_LIMIT_MAX).contains(&n) => n,
                _ => {
                    errors.add("limit", format!("must be an integer from 1 to {PAGE_LIMIT_MAX}"));
                    0
                }
            },
        };
        let after = match self.cursor.as_deref().filter(|c| !c.is_empty()) {
            None => None,
            Some(raw) => match uuid::Uuid::parse_str(raw) {
                Ok(u) => Some(u),
                Err(_) => {
                    errors.add("cursor", "not a cursor from a previous page");
                    None
                }
            },
        };
        if !errors.is_empty() {
            return Err(ApiError::bad_request(errors));
        }
        Ok(PageRequest { after, limit })
    }
}

/// Query strings are parsed leniently (all text) and validated by hand, so a bad value gets a
/// field error instead of axum's plain-text rejection.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded_from_str(query).map(Query)
    }
}

/// The error for a query string holding `%00`, naming the parameter it is in.
fn nul_in_query(query: &str) -> ApiError {
    let pairs = format!("/?{query}")
        .parse()
        .ok()
        .and_then(|uri| axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri).ok().map(|q| q.0));
    let field = pairs
        .unwrap_or_default()
        .into_iter()
        .find(|(_, value)| value.contains('\0'))
        .map_or_else(|| "query".to_owned(), |(key, _)| key.replace('\0', ""));
    ApiError::field(StatusCode::BAD_REQUEST, &field, "may not contain NUL characters (%00)")
}

fn serde_urlencoded_from_str<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    if query.contains("%00") {
        return Err(nul_in_query(query));
    }
    axum::extract::Query::<T>::try_from_uri(
        &format!("/?{query}")
            .parse()
            .map_err(|_| ApiError::field(StatusCode::BAD_REQUEST, "query", "malformed query string"))?,
    )
    .map(|q| q.0)
    .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "query", &e.body_text()))
}
