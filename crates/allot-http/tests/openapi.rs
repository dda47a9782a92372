//! The OpenAPI document against the router it describes: the routes the router serves and the
//! operations the document lists are the same set; every operation answers an anonymous
//! request with a status it documents; the document has the shape of SPEC §4; Swagger UI and
//! its assets are served from the binary, with nothing fetched from elsewhere.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::TestApp;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// Operations that must be there whatever else changes: keeps the set checks from passing on
/// two empty sets (or on a parser that finds nothing).
const KNOWN: [(&str, &str); 6] = [
    ("POST", "/api/v1/bookings"),
    ("GET", "/api/v1/bookings/{id}"),
    ("POST", "/api/v1/bookings/{id}/confirm"),
    ("GET", "/api/v1/resources/{id}/availability"),
    ("DELETE", "/api/v1/venues/{id}"),
    ("GET", "/healthz"),
];

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

type Operations = BTreeSet<(String, String)>;

/// (method, path) of every operation in the document.
fn documented(spec: &Value) -> Operations {
    let paths = spec["paths"].as_object().unwrap();
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS.iter().filter(|m| item.get(**m).is_some()).map(|m| (m.to_uppercase(), path.clone()))
        })
        .collect()
}

/// (method, path) of every route the router serves. axum has no API to list routes, so this
/// reads its `Debug` form: the `paths` of the path router name each route id, and each
/// route's method router lists its methods in `allow_header`; a route that is a plain service
/// (no method router) counts as `ANY`, so it fails the comparison too. If axum changes that
/// form, the `KNOWN` checks fail rather than the test passing on nothing.
fn registered(router: &axum::Router) -> Operations {
    let debug = format!("{router:?}");
    let path_router = debug.split("fallback_router:").next().unwrap();
    let (routes, node) = path_router.split_once("node: Node").unwrap();
    let allow = regex::Regex::new(r#"^(\d+)\): MethodRouter\(.*allow_header: Bytes\(b"([A-Z,]*)"\)"#).unwrap();
    let methods: std::collections::HashMap<String, String> = routes
        .split("RouteId(")
        .filter_map(|route| allow.captures(route).map(|c| (c[1].to_owned(), c[2].to_owned())))
        .collect();
    let paths = regex::Regex::new(r#"RouteId\((\d+)\): "([^"]+)""#).unwrap();
    let mut operations = Operations::new();
    for route in paths.captures_iter(node) {
        let allowed = methods.get(&route[1]).map_or("ANY", String::as_str);
        for method in allowed.split(',').filter(|m| *m != "HEAD") {
            operations.insert((method.to_owned(), route[2].to_owned()));
        }
    }
    operations
}

/// The document as served (and the same as the library builds it).
async fn served_spec(t: &TestApp) -> Value {
    let response = t.client.get(format!("http://{}/api-docs/openapi.json", t.addr)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let spec: Value = response.json().await.unwrap();
    assert_eq!(spec, serde_json::to_value(allot_http::openapi_document()).unwrap());
    spec
}

#[tokio::test]
async fn every_route_is_documented_and_every_documented_operation_is_routed() {
    let t = TestApp::spawn().await;
    let spec = served_spec(&t).await;
    let router = allot_http::router(t.app.clone(), &allot_http::HttpOptions::default());
    let docs = documented(&spec);
    // Swagger UI's own routes are the documentation, not part of it.
    let routes: Operations = registered(&router).into_iter().filter(|(_, p)| !p.starts_with("/api-docs")).collect();
    for (method, path) in KNOWN {
        let op = (method.to_owned(), path.to_owned());
        assert!(routes.contains(&op), "the router listing lacks {method} {path}: {routes:?}");
        assert!(docs.contains(&op), "the document lacks {method} {path}");
    }
    let undocumented: Vec<_> = routes.difference(&docs).collect();
    let unrouted: Vec<_> = docs.difference(&routes).collect();
    assert!(undocumented.is_empty(), "routes missing from the OpenAPI document: {undocumented:?}");
    assert!(unrouted.is_empty(), "documented operations with no route: {unrouted:?}");
}

#[tokio::test]
async fn every_operation_answers_anonymously_with_a_documented_status() {
    let t = TestApp::spawn().await;
    let spec = served_spec(&t).await;
    let docs = documented(&spec);
    assert!(docs.len() > KNOWN.len());
    let missing_id = uuid::Uuid::now_v7().to_string();
    for (method, path) in docs {
        let url = format!("http://{}{}", t.addr, path.replace("{id}", &missing_id));
        let response = t.client.request(Method::from_bytes(method.as_bytes()).unwrap(), url).send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let responses = &spec["paths"][&path][method.to_lowercase()]["responses"];
        assert!(!status.is_server_error(), "{method} {path}: {status} {body}");
        assert!(responses.get(status.as_str()).is_some(), "{method} {path}: {status} is not documented ({body})");
        if status.is_client_error() {
            assert!(body["error"]["code"].is_string(), "{method} {path}: {status} without the error body: {body}");
        }
    }
}

#[tokio::test]
async fn the_document_is_openapi_3_1_with_the_shapes_of_the_spec() {
    let t = TestApp::spawn().await;
    let spec = served_spec(&t).await;
    assert_eq!(spec["openapi"], "3.1.0");
    assert!(spec["info"]["title"].is_string() && spec["info"]["version"].is_string());
    let schemas = spec["components"]["schemas"].as_object().unwrap();
    let error = &schemas["Error"];
    assert_eq!(error["properties"]["error"]["$ref"], "#/components/schemas/ErrorDetail");
    for field in ["code", "message", "details"] {
        assert!(schemas["ErrorDetail"]["properties"].get(field).is_some(), "ErrorDetail lacks {field}");
    }
    let booking = &schemas["Booking"];
    let required: BTreeSet<&str> = booking["required"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let fields =
        ["id", "status", "customer_id", "venue_id", "expires_at", "items", "currency", "subtotal", "discount", "total"];
    for field in fields {
        assert!(booking["properties"].get(field).is_some(), "Booking lacks {field}");
        assert!(required.contains(field), "Booking does not require {field}");
    }
    assert_eq!(spec["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_refs_resolve(&spec, schemas);
    for (method, path) in documented(&spec) {
        assert_operation_shape(&spec, &method, &path);
    }
}

/// Every `$ref` names a schema the document has.
fn assert_refs_resolve(value: &Value, schemas: &serde_json::Map<String, Value>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("unexpected $ref {r}"));
                assert!(schemas.contains_key(name), "dangling $ref {r}");
            }
            map.values().for_each(|v| assert_refs_resolve(v, schemas));
        }
        Value::Array(items) => items.iter().for_each(|v| assert_refs_resolve(v, schemas)),
        _ => {}
    }
}

/// One success; every API error answers the error body; needing credentials means a 401.
fn assert_operation_shape(spec: &Value, method: &str, path: &str) {
    let op = &spec["paths"][path][method.to_lowercase()];
    let responses = op["responses"].as_object().unwrap();
    assert!(responses.keys().any(|s| s.starts_with('2')), "{method} {path} documents no success");
    for (status, response) in responses.iter().filter(|(s, _)| s.starts_with('4')) {
        let schema = &response["content"]["application/json"]["schema"]["$ref"];
        assert_eq!(schema, "#/components/schemas/Error", "{method} {path} {status}");
    }
    if path.starts_with("/api/") {
        for status in ["429", "503"] {
            assert!(responses.contains_key(status), "{method} {path} does not document {status}");
        }
    }
    if op["security"].is_array() {
        assert!(responses.contains_key("401"), "{method} {path} needs credentials but does not document 401");
    }
    // Every POST, those answering with a live secret too (stored sealed).
    if method == "POST" {
        let params = op["parameters"].as_array().unwrap();
        assert!(params.iter().any(|p| p["name"] == "Idempotency-Key"), "{method} {path} lacks Idempotency-Key");
    }
}

#[tokio::test]
async fn swagger_ui_and_its_assets_are_served_offline() {
    let t = TestApp::spawn().await;
    let base = format!("http://{}", t.addr);
    let page = t.client.get(format!("{base}/api-docs")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.url().path(), "/api-docs/", "redirected to the UI's directory");
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    let assets = captures_all(&html, r#"(?:src|href)="([^"]+)""#);
    assert!(assets.iter().any(|a| a.ends_with(".js")) && assets.iter().any(|a| a.ends_with(".css")), "{assets:?}");
    for asset in &assets {
        assert!(!asset.contains("//"), "asset from elsewhere: {asset}");
        let response =
            t.client.get(format!("{base}/api-docs/{}", asset.trim_start_matches("./"))).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
    }
    // The initializer points the UI at our document and turns off the online validator.
    let init = t.client.get(format!("{base}/api-docs/swagger-initializer.js")).send().await.unwrap();
    assert_eq!(init.status(), StatusCode::OK);
    let init = init.text().await.unwrap();
    assert!(init.contains("/api-docs/openapi.json"), "{init}");
    assert!(init.contains(r#""validatorUrl": "none""#), "{init}");
    for text in [&html, &init] {
        assert!(!text.contains("http://") && !text.contains("https://"), "an external URL: {text}");
    }
}

/// The first group of every match of `pattern`.
fn captures_all(text: &str, pattern: &str) -> Vec<String> {
    let re = regex::Regex::new(pattern).unwrap();
    re.captures_iter(text).map(|c| c[1].to_owned()).collect()
}
