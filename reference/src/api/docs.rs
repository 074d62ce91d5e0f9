//! `/openapi.json` and `/docs`: the API description, as JSON and as a page.

use std::fmt::Write;

use axum::response::{IntoResponse, Response};
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

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
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
    let spec: serde_json::Value =
        serde_json::from_str(super::openapi_json()).expect("the API description is JSON");
    let mut page = String::from(
        "<!doctype html><meta charset=utf-8><title>shardpay API</title>\
         <style>body{font:14px system-ui;max-width:960px;margin:2em auto;padding:0 1em}\
         code{background:#f3f3f3;padding:1px 4px}h2{margin-top:1.6em}.m{font-weight:bold;\
         display:inline-block;width:4em}td{padding:2px 8px;vertical-align:top}</style>",
    );
    let info = &spec["info"];
    let _ = write!(
        page,
        "<h1>{}</h1><p>{}</p><p>Machine-readable: <a href=/openapi.json>/openapi.json</a> (OpenAPI 3).</p>",
        escape(info["title"].as_str().unwrap_or("")),
        escape(info["description"].as_str().unwrap_or(""))
    );
    if let Some(paths) = spec["paths"].as_object() {
        for (path, ops) in paths {
            let Some(ops) = ops.as_object() else { continue };
            for (method, op) in ops {
                // `[]` or `[{}]`: no token needed.
                let public = op["security"].as_array().is_some_and(|a| {
                    a.iter()
                        .all(|r| r.as_object().is_some_and(|r| r.is_empty()))
                });
                let _ = write!(
                    page,
                    "<h2><span class=m>{}</span><code>{}</code></h2><p>{}{}</p>",
                    method.to_uppercase(),
                    escape(path),
                    escape(op["summary"].as_str().unwrap_or("")),
                    if public {
                        " · no token needed"
                    } else {
                        " · bearer token"
                    }
                );
                let mut schema = &op["requestBody"]["content"]["application/json"]["schema"];
                if let Some(name) = schema["$ref"]
                    .as_str()
                    .and_then(|r| r.strip_prefix("#/components/schemas/"))
                {
                    schema = &spec["components"]["schemas"][name];
                }
                let fields = &schema["properties"];
                if let Some(fields) = fields.as_object() {
                    let names: Vec<String> = fields
                        .keys()
                        .map(|k| format!("<code>{}</code>", escape(k)))
                        .collect();
                    let _ = write!(page, "<p>Body: {}</p>", names.join(", "));
                }
                if let Some(responses) = op["responses"].as_object() {
                    page.push_str("<table>");
                    for (code, r) in responses {
                        let _ = write!(
                            page,
                            "<tr><td><code>{}</code></td><td>{}</td></tr>",
                            escape(code),
                            escape(r["description"].as_str().unwrap_or(""))
                        );
                    }
                    page.push_str("</table>");
                }
            }
        }
    }
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}
