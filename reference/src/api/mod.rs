//! The one route table: which service serves which route, the router each
//! process serves, and the API description derived from the same routes.

mod docs;

use std::sync::LazyLock;

use axum::http::StatusCode;
use axum::Router;
use utoipa_axum::router::OpenApiRouter;

use crate::codes::ErrorCode;
use crate::http::{self, ops, permissions, ApiError, AppState};
use crate::peers::Service;

/// The routes of `service` (all of them for `Service::All`), each with its
/// description: the one route table, from which the router, the API
/// description and which service serves a path are all derived.
pub fn api(service: Service) -> OpenApiRouter<AppState> {
    let mut routes = OpenApiRouter::new();
    if service.runs(Service::Auth) {
        routes = routes.merge(crate::auth::routes::routes());
    }
    if service.runs(Service::ShardManager) {
        // With the modelled system's routes, its /health among them.
        routes = routes.merge(crate::manager::routes::routes());
    } else {
        routes = routes.merge(ops::health_routes());
    }
    if service.runs(Service::ShardManager) || service.runs(Service::Ledger) {
        routes = routes.merge(crate::manager::routes::shard_routes());
    }
    if service.runs(Service::Ledger) {
        routes = routes.merge(crate::ledger::routes::routes());
    }
    if service.runs(Service::Fraud) {
        routes = routes.merge(crate::fraud::routes::routes());
    }
    if service.runs(Service::Notification) {
        routes = routes.merge(crate::notification::routes::routes());
    }
    if service.runs(Service::Analytics) {
        routes = routes.merge(crate::analytics::routes::routes());
    }
    routes.merge(ops::routes()).merge(docs::routes())
}

/// The routes of the process's service (all of them for `Service::All`),
/// for serving or for `oneshot` tests.
pub fn router(state: AppState) -> Router {
    let (routes, _) = api(state.service).split_for_parts();
    routes
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            permissions::guard,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ops::observe,
        ))
        .fallback(route_not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(http::MAX_BODY_BYTES))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            http::BODY_TIMEOUT,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            http::REQUEST_TIMEOUT,
        ))
        .layer(axum::middleware::from_fn(http::json_errors))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            http::MAX_CONCURRENT_REQUESTS,
        ))
        .with_state(state)
}

/// The API description (OpenAPI 3) of every route, as JSON: derived from
/// the handlers' annotations and the types of their bodies. Served at
/// `/openapi.json`; `reference/openapi/openapi.json` is a copy a test keeps
/// equal to it.
pub fn openapi_json() -> &'static str {
    static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
        let (_, mut doc) = api(Service::All).split_for_parts();
        doc.info = utoipa::openapi::InfoBuilder::new()
            .title("shardpay reference payment system")
            .version("1")
            .description(Some(API_DESCRIPTION))
            .build();
        doc.servers = Some(vec![utoipa::openapi::server::Server::new(
            "http://127.0.0.1:8006",
        )]);
        doc.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                utoipa::openapi::security::SecurityScheme::Http(
                    utoipa::openapi::security::HttpBuilder::new()
                        .scheme(utoipa::openapi::security::HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .build(),
                ),
            );
        doc.to_pretty_json()
            .expect("the API description serializes")
    });
    &DOCUMENT
}

const API_DESCRIPTION: &str = "The reference system's API: the routes of its six services. \
Run as one process (shardpay serve) all of them answer on one port; run as six (shardpay \
serve <service>) each service answers its own: auth 8001, ledger 8002, fraud 8003, \
notification 8004, analytics 8005, shard manager 8006. Money is integer minor units with a \
currency; amounts go in as decimal text or minor units. Errors are \
{\"error\":{\"code\",\"message\"}}. With auth on, send Authorization: Bearer <access token> \
from POST /v1/auth/login.";

/// Whether the routed path `template` (`/v1/accounts/{id}`) matches `path`.
fn template_matches(template: &str, path: &str) -> bool {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(t), Some(p)) if t == p || (t.starts_with('{') && !p.is_empty()) => {}
            _ => return false,
        }
    }
}

/// The service that serves `path` in a split deployment (the shard manager
/// first where several do), from the route table.
pub fn served_by(path: &str) -> Option<Service> {
    static PATHS: LazyLock<Vec<(Service, Vec<String>)>> = LazyLock::new(|| {
        let mut order = vec![Service::ShardManager];
        order.extend(
            Service::SPLIT
                .into_iter()
                .filter(|s| *s != Service::ShardManager),
        );
        order
            .into_iter()
            .map(|s| {
                let (_, doc) = api(s).split_for_parts();
                (s, doc.paths.paths.keys().cloned().collect())
            })
            .collect()
    });
    PATHS
        .iter()
        .find(|(_, templates)| templates.iter().any(|t| template_matches(t, path)))
        .map(|(service, _)| *service)
}

/// 404 for a route this process does not serve; in a split deployment,
/// naming the service that does.
async fn route_not_found(
    axum::extract::State(state): axum::extract::State<AppState>,
    uri: axum::http::Uri,
) -> ApiError {
    let elsewhere = served_by(uri.path()).filter(|s| !state.service.runs(*s));
    match (elsewhere, &state.peers) {
        (Some(service), Some(peers)) => {
            let url = match service {
                Service::Auth => Some(peers.auth.list()),
                Service::Ledger => Some(peers.ledger.list()),
                Service::Fraud => Some(peers.fraud.list()),
                Service::Notification => Some(peers.notification.list()),
                _ => None,
            };
            let at = url.map_or_else(
                || format!("on port {}", service.default_port()),
                |u| format!("at {u}"),
            );
            ApiError::new(
                ErrorCode::RouteNotFound,
                format!(
                    "this is the {} service; {} is served by the {} service ({at})",
                    state.service.name(),
                    uri.path(),
                    service.name()
                ),
            )
        }
        _ => ApiError::new(
            ErrorCode::RouteNotFound,
            "no such route; see README.md for the API",
        ),
    }
}
