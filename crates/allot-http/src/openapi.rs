//! The OpenAPI 3.1 document and Swagger UI. Paths come from each handler's `#[utoipa::path]`,
//! registered together with the route (`routes!` in [`crate::router`]); this module adds what
//! every operation shares: the bearer scheme, the error responses, and the `Idempotency-Key`
//! header of POSTs.

use std::collections::BTreeMap;

use utoipa::openapi::path::{HttpMethod, Operation, Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{AnyOfBuilder, KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, Required, Response, ResponseBuilder};
use utoipa::{IntoResponses, Modify};
use utoipa_swagger_ui::{Config, SwaggerUi};

use crate::error::ErrorBody;

/// Where the document and the UI are served.
pub const JSON_PATH: &str = "/api-docs/openapi.json";
pub const UI_PATH: &str = "/api-docs";

/// The scheme name handlers use in `security(("bearer" = []))`.
pub const BEARER: &str = "bearer";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Allot API", description = "Booking engine HTTP API v1 (SPEC §4)."),
    modifiers(&Shared),
    components(schemas(ErrorBody)),
    tags(
        (name = "auth", description = "Accounts, sessions and tokens"),
        (name = "catalogue", description = "Venues, resources, events, seat maps, availability"),
        (name = "bookings", description = "Hold, confirm, cancel, history"),
        (name = "payments", description = "The payment provider's signed events"),
        (name = "access", description = "Roles and partner API keys (admins)"),
        (name = "audit", description = "The audit trail of every state-changing attempt"),
        (name = "operations", description = "Health, readiness and metrics"),
    )
)]
pub struct ApiDoc;

/// Swagger UI at [`UI_PATH`] over `spec`, from the assets vendored in `utoipa-swagger-ui`. The
/// validator is off: Swagger UI would otherwise send the document to validator.swagger.io.
pub fn swagger_ui(spec: OpenApi) -> SwaggerUi {
    SwaggerUi::new(UI_PATH).url(JSON_PATH, spec).config(Config::new([JSON_PATH]).validator_url("none"))
}

/// Declares a marker type usable in `responses(...)` that answers one status with the error
/// body, so each handler lists its failures in one word each.
macro_rules! error_response {
    ($name:ident, $status:literal, $description:literal) => {
        pub struct $name;

        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                BTreeMap::from([($status.to_owned(), error($description).into())])
            }
        }
    };
}

error_response!(BadRequest, "400", "`invalid_request`: unparseable body or query; `details.fields` names them");
error_response!(Unauthenticated, "401", "`unauthenticated`: missing, invalid or expired credentials");
error_response!(PaymentDeclined, "402", "`payment_declined`; `details.attempts_left`");
error_response!(Forbidden, "403", "`forbidden`: the principal may not do this");
error_response!(NotFound, "404", "`not_found`");
error_response!(Conflict, "409", "`conflict` with the current state, or `unavailable` (`details.item_index`)");
error_response!(Gone, "410", "`hold_expired`: hold again");
error_response!(Unprocessable, "422", "`invalid_request`: well-formed input that breaks a rule; `details.fields`");
error_response!(
    ProviderUnavailable,
    "503",
    "`payment_provider_unavailable` or `overloaded`; retry after `Retry-After`"
);

fn error(description: &str) -> Response {
    let schema = Ref::from_schema_name("Error");
    ResponseBuilder::new().description(description).content("application/json", Content::new(Some(schema))).build()
}

/// A query bound that is a date (`YYYY-MM-DD`, in the venue's zone) or an RFC 3339 time.
pub fn date_or_time() -> Schema {
    let string =
        |format| ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(format)));
    AnyOfBuilder::new()
        .description(Some("A date `YYYY-MM-DD` (midnight in the venue's zone) or an RFC 3339 time"))
        .item(string(KnownFormat::Date))
        .item(string(KnownFormat::DateTime))
        .into()
}

/// What every operation shares, added after the handlers' own entries (which win).
struct Shared;

impl Modify for Shared {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("An access token from /api/v1/auth/login, or a partner API key"))
            .build();
        components.add_security_scheme(BEARER, SecurityScheme::Http(bearer));
    }
}

/// Adds the responses and headers every operation of the API shares. Runs on the finished
/// document ([`crate::openapi`]): the paths exist only once the routes are registered.
pub fn add_shared(spec: &mut OpenApi) {
    for (path, item) in spec.paths.paths.iter_mut() {
        let api = path.starts_with("/api/");
        let ops = [
            (HttpMethod::Get, &mut item.get),
            (HttpMethod::Post, &mut item.post),
            (HttpMethod::Patch, &mut item.patch),
            (HttpMethod::Put, &mut item.put),
            (HttpMethod::Delete, &mut item.delete),
        ];
        for (method, op) in ops {
            let Some(op) = op.as_mut() else { continue };
            if op.request_body.is_some() {
                add_response(op, "413", "`invalid_request`: the body is larger than the limit");
            }
            if api {
                add_response(op, "429", "`rate_limited`: wait for `Retry-After` seconds");
                add_response(op, "503", "`overloaded`: the store is busy; retry after `Retry-After`");
            }
            if method == HttpMethod::Post {
                add_idempotency(op);
            }
        }
    }
}

/// Adds `status`, or, when the handler lists it for its own reasons, names this one too.
fn add_response(op: &mut Operation, status: &str, description: &str) {
    match op.responses.responses.get_mut(status) {
        None => {
            op.responses.responses.insert(status.to_owned(), error(description).into());
        }
        Some(RefOr::T(existing)) if !existing.description.contains(description) => {
            existing.description = format!("{}; or {description}", existing.description);
        }
        Some(_) => {}
    }
}

/// I4: every POST may carry a key; its outcome is replayed for 24 h.
fn add_idempotency(op: &mut Operation) {
    let header: Parameter = ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some("Replays the first response to this key (24 h); a different body gets 422, a retry while the first runs 409"))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(allot_app::idempotency::KEY_LEN_MAX))
                .pattern(Some("^[ -~]+$")),
        ))
        .build();
    op.parameters.get_or_insert_with(Vec::new).push(RefOr::T(header));
    add_response(op, "409", "`idempotency_key_in_use`: a request with this key is still running");
    add_response(op, "422", "`idempotency_key_reused` with a different request");
}
