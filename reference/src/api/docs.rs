//! `/openapi.json` and `/docs`: the API description, as JSON and as a page.

use std::sync::LazyLock;

use axum::response::{IntoResponse, Response};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::AppState;

/// The routes that serve the API description.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(openapi))
        .routes(routes!(docs))
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    summary = "This document",
    security(()),
    responses(
        (status = 200, description = "OK"),
    ),
)]
async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::openapi_json(),
    )
        .into_response()
}

/// The API description as a page: every operation with its summary, who
/// may call it, its body fields and its answers. Self-contained: no
/// scripts, nothing fetched.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "operations",
    summary = "This document as a page",
    security(()),
    responses(
        (status = 200, description = "OK"),
    ),
)]
async fn docs() -> Response {
    static PAGE: LazyLock<String> = LazyLock::new(|| {
        let spec: Value =
            serde_json::from_str(super::openapi_json()).expect("the API description is JSON");
        docs_page(&spec).into_string()
    });
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE.as_str(),
    )
        .into_response()
}

const DOCS_CSS: &str = "body{font:14px system-ui;max-width:960px;margin:2em auto;padding:0 1em}\
code{background:#f3f3f3;padding:1px 4px}h2{margin-top:1.6em}.m{font-weight:bold;\
display:inline-block;width:4em}td{padding:2px 8px;vertical-align:top}";

/// The page of the API description `spec`: texts escaped by the template.
fn docs_page(spec: &Value) -> Markup {
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    html! {
        (DOCTYPE)
        meta charset="utf-8";
        title { "shardpay API" }
        style { (PreEscaped(DOCS_CSS)) }
        h1 { (text(&spec["info"]["title"])) }
        p { (text(&spec["info"]["description"])) }
        p { "Machine-readable: " a href="/openapi.json" { "/openapi.json" } " (OpenAPI 3)." }
        @for (path, ops) in spec["paths"].as_object().into_iter().flatten() {
            @for (method, op) in ops.as_object().into_iter().flatten() {
                (operation(spec, path, method, op))
            }
        }
    }
}

/// One operation: method and path, summary, who may call, body fields,
/// answers.
fn operation(spec: &Value, path: &str, method: &str, op: &Value) -> Markup {
    // `[]` or `[{}]`: no token needed.
    let public = op["security"].as_array().is_some_and(|a| {
        a.iter()
            .all(|r| r.as_object().is_some_and(|r| r.is_empty()))
    });
    let mut schema = &op["requestBody"]["content"]["application/json"]["schema"];
    if let Some(name) = schema["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
    {
        schema = &spec["components"]["schemas"][name];
    }
    html! {
        h2 { span class="m" { (method.to_uppercase()) } code { (path) } }
        p {
            (op["summary"].as_str().unwrap_or(""))
            (if public { " · no token needed" } else { " · bearer token" })
        }
        @if let Some(fields) = schema["properties"].as_object() {
            p {
                "Body: "
                @for (i, name) in fields.keys().enumerate() {
                    @if i > 0 { ", " }
                    code { (name) }
                }
            }
        }
        @if let Some(responses) = op["responses"].as_object() {
            table {
                @for (code, r) in responses {
                    tr {
                        td { code { (code) } }
                        td { (r["description"].as_str().unwrap_or("")) }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_lists_every_operation_and_escapes_what_it_shows() {
        let spec: Value = serde_json::from_str(crate::api::openapi_json()).unwrap();
        let page = docs_page(&spec).into_string();
        assert!(page.contains("<code>/v1/transfers</code>"));
        assert!(page.contains("<code>/v1/accounts/{id}</code>"));
        let hostile = serde_json::json!({
            "info": {"title": "<script>x</script>", "description": "a & b"},
            "paths": {"/<b>": {"get": {"summary": "\"quoted\"", "responses": {}}}}
        });
        let page = docs_page(&hostile).into_string();
        assert!(
            !page.contains("<script>") && !page.contains("<b>"),
            "{page}"
        );
        assert!(page.contains("&lt;script&gt;x&lt;/script&gt;") && page.contains("a &amp; b"));
    }
}
