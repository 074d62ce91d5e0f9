//! Who may call what: one table for every route of every service, checked
//! by one middleware before any handler runs.
//!
//! The table decides the coarse part (no token needed, any valid token, or
//! a token of given roles). Handlers then decide what depends on the data:
//! whether the caller owns the account named (`Caller::may_debit`,
//! `Caller::may_read`). A route without a row is refused to everyone
//! (`no_permission_rule`), so a new route cannot ship open by accident; the
//! permission-matrix test walks this table against a running server.
//!
//! In demo mode (no auth, loopback only) nothing is checked by role, but a
//! browser must not be usable against the server from another site: a
//! state-changing request whose `Origin` is not the server's own is
//! refused, and so is a `Host` that is not a loopback name (DNS
//! rebinding).

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::Caller;
use super::{ApiError, AppState};
use crate::auth::Role;
use crate::codes::ErrorCode;

/// What a route asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, no token (health, login, the API description).
    Public,
    /// Any valid token, whatever its role.
    Signed,
    /// A valid token of one of these roles. Handlers of account routes
    /// check ownership on top.
    Roles(&'static [Role]),
}

const USER: &[Role] = &[Role::User];
const ADMIN: &[Role] = &[Role::Admin];
const STAFF: &[Role] = &[Role::Admin, Role::Service];
const USER_OR_ADMIN: &[Role] = &[Role::User, Role::Admin];
const ANY_ROLE: &[Role] = &[Role::User, Role::Admin, Role::Service];

/// Every route: (method, path as routed, access). `HEAD` is checked as
/// `GET`.
pub const TABLE: &[(&str, &str, Access)] = &[
    // Operations.
    ("GET", "/health", Access::Public),
    ("GET", "/ready", Access::Public),
    ("GET", "/metrics", Access::Public),
    ("GET", "/openapi.json", Access::Public),
    ("GET", "/docs", Access::Public),
    // Auth service.
    ("POST", "/v1/auth/register", Access::Public),
    ("POST", "/v1/auth/login", Access::Public),
    ("POST", "/v1/auth/refresh", Access::Public),
    ("POST", "/v1/auth/logout", Access::Signed),
    ("POST", "/v1/auth/logout-all", Access::Signed),
    ("GET", "/v1/auth/me", Access::Signed),
    ("POST", "/v1/auth/owners", Access::Roles(STAFF)),
    ("GET", "/v1/auth/owners/{account}", Access::Roles(STAFF)),
    ("PUT", "/v1/auth/owners/{account}", Access::Roles(ADMIN)),
    // Shard manager: accounts and transfers (owners checked by handlers).
    ("POST", "/v1/accounts", Access::Roles(USER_OR_ADMIN)),
    ("GET", "/v1/accounts", Access::Roles(STAFF)),
    ("POST", "/v1/accounts/bulk", Access::Roles(ADMIN)),
    ("GET", "/v1/accounts/{id}", Access::Roles(ANY_ROLE)),
    ("POST", "/v1/transfers", Access::Roles(USER)),
    ("POST", "/v1/transfers/lookup", Access::Roles(STAFF)),
    ("GET", "/v1/transfers/{id}", Access::Roles(ANY_ROLE)),
    ("GET", "/v1/shards", Access::Roles(STAFF)),
    ("GET", "/v1/audit", Access::Roles(ADMIN)),
    ("POST", "/v1/admin/reshard", Access::Roles(ADMIN)),
    ("GET", "/v1/admin/reshard", Access::Roles(ADMIN)),
    // Ledger.
    ("GET", "/v1/ledger/trial-balance", Access::Roles(STAFF)),
    ("GET", "/v1/accounts/{id}/entries", Access::Roles(ANY_ROLE)),
    ("GET", "/v1/ledger/relay", Access::Roles(STAFF)),
    // Fraud.
    ("POST", "/v1/fraud/score", Access::Roles(STAFF)),
    // Notification.
    ("POST", "/v1/webhooks", Access::Roles(USER_OR_ADMIN)),
    ("GET", "/v1/dlq", Access::Roles(ADMIN)),
    ("POST", "/v1/dlq/replay", Access::Roles(ADMIN)),
    ("GET", "/v1/notification/stats", Access::Roles(STAFF)),
    // Analytics. The dashboard page holds no data; it reads /v1/analytics
    // with the token given to it.
    ("GET", "/v1/pipeline", Access::Roles(STAFF)),
    ("GET", "/v1/analytics", Access::Roles(STAFF)),
    ("GET", "/dashboard/analytics", Access::Public),
    // The modelled system's routes.
    (
        "POST",
        "/create_user/{user}/{balance}",
        Access::Roles(USER_OR_ADMIN),
    ),
    (
        "POST",
        "/transfer/{from}/{to}/{amount}",
        Access::Roles(USER),
    ),
    ("GET", "/user_shard/{user}", Access::Roles(ANY_ROLE)),
    ("GET", "/user/{user}/shard", Access::Public),
    ("GET", "/accounts/{user}", Access::Roles(ANY_ROLE)),
    (
        "POST",
        "/accounts/{user}/create/{balance}",
        Access::Roles(USER_OR_ADMIN),
    ),
    ("GET", "/users", Access::Roles(STAFF)),
    ("GET", "/stats", Access::Roles(STAFF)),
    ("GET", "/analytics", Access::Roles(STAFF)),
    ("GET", "/shard-stats", Access::Roles(STAFF)),
];

/// The table's answer for a request, `None` for a route without a row.
pub fn access(method: &Method, route: &str) -> Option<Access> {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    TABLE
        .iter()
        .find(|(m, r, _)| *m == method && *r == route)
        .map(|(_, _, a)| *a)
}

/// The middleware on every route: demo-mode origin checks, or the table's
/// check of the caller, whose `Caller` the handler then reuses.
pub async fn guard(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let Some(access) = access(request.method(), &route) else {
        return ApiError::new(
            ErrorCode::NoPermissionRule,
            format!(
                "{} {route} has no row in the permission table; refused to everyone",
                request.method()
            ),
        )
        .into_response();
    };
    if state.auth.is_none() {
        if let Err(refusal) = same_site(&request) {
            return refusal.into_response();
        }
        return next.run(request).await;
    }
    let roles = match access {
        Access::Public => return next.run(request).await,
        Access::Signed => ANY_ROLE,
        Access::Roles(roles) => roles,
    };
    let caller = match Caller::from_headers(request.headers(), &state).await {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = caller.require(roles) {
        return e.into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Whether `host` (a `Host` header value, or an origin's host and port)
/// names this machine: `localhost`, `127.0.0.0/8` or `[::1]`, any port.
fn is_loopback_host(host: &str) -> bool {
    let port_ok = |port: &str| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, "")) => inside,
            Some((inside, after)) => match after.strip_prefix(':') {
                Some(port) if port_ok(port) => inside,
                _ => return false,
            },
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port_ok(port) => name,
            Some(_) => return false,
            None => host,
        }
    };
    let name = name.to_ascii_lowercase();
    if name == "localhost" {
        return true;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => false,
    }
}

/// Demo mode's defence against other sites: the `Host` must be a loopback
/// name, and a state-changing request that carries an `Origin` must come
/// from this server's own origin.
fn same_site(request: &Request) -> Result<(), ApiError> {
    let headers = request.headers();
    let host = headers
        .get(axum::http::header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{0}"));
    if let Some(host) = host {
        if !is_loopback_host(host) {
            return Err(ApiError::new(ErrorCode::HostNotAllowed,
                "demo mode answers only requests addressed to a loopback name (localhost, 127.0.0.1, [::1])",
            ));
        }
    }
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if safe {
        return Ok(());
    }
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let own = match (origin_host, host) {
        (Some(o), Some(h)) => o.eq_ignore_ascii_case(h) && is_loopback_host(o),
        _ => false,
    };
    if own {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::CrossOriginRefused,
            "demo mode refuses state-changing requests from another site's page",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_are_told_apart() {
        for ok in [
            "localhost",
            "localhost:8006",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.0.0.1:8006",
            "127.9.9.9:80",
            "[::1]",
            "[::1]:8006",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8006",
            "localhost.evil.example",
            "10.0.0.1:8006",
            "0.0.0.0:8006",
            "[::]:8006",
            "[::1",
            "[::1]x",
            "localhost:evil.example",
            "127.0.0.1:8006@evil.example",
            "localhost:",
            "",
            "127.0.0.1.nip.io",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn every_row_is_unique_and_head_reads_as_get() {
        for (i, (m, r, _)) in TABLE.iter().enumerate() {
            assert!(
                !TABLE[i + 1..].iter().any(|(m2, r2, _)| m == m2 && r == r2),
                "{m} {r} has two rows"
            );
        }
        assert_eq!(access(&Method::HEAD, "/health"), Some(Access::Public));
        assert_eq!(access(&Method::DELETE, "/health"), None);
        assert_eq!(access(&Method::GET, "/no/such/route"), None);
    }

    /// A route cannot be added without documentation: the API description
    /// is made from the same route table as the router, and every
    /// permission row (without which a route answers 403 to everyone) must
    /// be an operation of it, and the other way round.
    #[test]
    fn every_row_is_documented_and_every_documented_route_has_a_row() {
        let spec: serde_json::Value =
            serde_json::from_str(crate::api::openapi_json()).expect("JSON");
        let mut documented = std::collections::BTreeSet::new();
        for (path, ops) in spec["paths"].as_object().expect("paths") {
            for (method, op) in ops.as_object().expect("operations") {
                assert!(
                    op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                    "{method} {path} has no summary"
                );
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let rows: std::collections::BTreeSet<(String, String)> = TABLE
            .iter()
            .map(|(m, r, _)| (m.to_string(), r.to_string()))
            .collect();
        let undocumented: Vec<_> = rows.difference(&documented).collect();
        let without_row: Vec<_> = documented.difference(&rows).collect();
        assert!(
            undocumented.is_empty(),
            "routes without documentation: {undocumented:?}"
        );
        assert!(
            without_row.is_empty(),
            "documented routes without a row: {without_row:?}"
        );
    }

    #[test]
    fn the_route_table_says_which_service_serves_a_path() {
        use crate::api::served_by;
        use crate::peers::Service;
        assert_eq!(served_by("/v1/auth/login"), Some(Service::Auth));
        assert_eq!(served_by("/v1/accounts/alice"), Some(Service::ShardManager));
        assert_eq!(
            served_by("/v1/accounts/alice/entries"),
            Some(Service::Ledger)
        );
        assert_eq!(served_by("/v1/ledger/relay"), Some(Service::Ledger));
        assert_eq!(served_by("/v1/fraud/score"), Some(Service::Fraud));
        assert_eq!(served_by("/v1/dlq/replay"), Some(Service::Notification));
        assert_eq!(served_by("/v1/pipeline"), Some(Service::Analytics));
        assert_eq!(served_by("/dashboard/analytics"), Some(Service::Analytics));
        assert_eq!(served_by("/v1/shards"), Some(Service::ShardManager));
        assert_eq!(served_by("/v1/accounts//entries"), None);
        assert_eq!(served_by("/v1/nothing"), None);
    }
}
