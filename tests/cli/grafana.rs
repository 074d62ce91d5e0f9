//! The Grafana board of the compose `observability` profile, checked
//! against what the services export: the dashboard's JSON parses, every
//! metric it queries is one `/metrics` of a running system has, with the
//! labels the queries group and filter by; Prometheus scrapes the six
//! services at the ports they listen on; the board's data source is the one
//! Grafana is provisioned with.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{json, Value};

use super::{block_on, post, serve};

fn repo(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Every metric name and its label names in an OpenMetrics text.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..name_end].to_string()).or_default();
        if line[name_end..].starts_with('{') {
            let inside = &line[name_end + 1..line.find('}').unwrap()];
            for pair in inside.split(',') {
                if let Some((label, _)) = pair.split_once('=') {
                    labels.insert(label.trim().to_string());
                }
            }
        }
    }
    out
}

/// The `shardpay_*` metric names an expression reads, each with the labels
/// it filters or groups by (`by (...)` applies to the whole expression).
fn queried(expr: &str) -> Vec<(String, BTreeSet<String>)> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut grouped = BTreeSet::new();
    for part in expr.split("by (").skip(1) {
        for label in part.split(')').next().unwrap().split(',') {
            grouped.insert(label.trim().to_string());
        }
    }
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("shardpay_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !word(c)).unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let mut labels = grouped.clone();
        if tail[end..].starts_with('{') {
            let inside = &tail[end + 1..tail.find('}').unwrap()];
            for matcher in inside.split(',') {
                let label = matcher
                    .split(|c| c == '=' || c == '!' || c == '~')
                    .next()
                    .unwrap();
                labels.insert(label.trim().to_string());
            }
        }
        out.push((name, labels));
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_grafana_board_queries_only_what_the_services_export() {
    let board: Value = serde_json::from_str(&repo("deploy/grafana/dashboards/shardpay.json"))
        .expect("the dashboard's JSON parses");
    assert_eq!(board["uid"], "shardpay");
    let panels = board["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());

    // A system with a few transfers behind it, so every family has values.
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), None);
    for id in ["g_a", "g_b", "g_c"] {
        let (status, body) = post(
            &format!("{}/v1/accounts", server.url),
            json!({"id": id, "opening_balance": "10.00"}),
            &format!("open-{id}"),
        )
        .unwrap();
        assert_eq!(status, 201, "{body}");
    }
    for (n, (from, to)) in [("g_a", "g_b"), ("g_b", "g_c"), ("g_c", "g_a")]
        .iter()
        .enumerate()
    {
        let (status, body) = post(
            &format!("{}/v1/transfers", server.url),
            json!({"from": from, "to": to, "amount": "1.00"}),
            &format!("pay-{n}"),
        )
        .unwrap();
        assert!(status == 201 || status == 202, "{status} {body}");
    }
    // Let the consumers apply the events (their lag quantiles appear then).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let text = block_on(async {
        reqwest::get(format!("{}/metrics", server.url))
            .await?
            .text()
            .await
    })
    .unwrap();
    let metrics = exported(&text);
    // Labels Prometheus adds to what it scrapes (deploy/prometheus.yml),
    // and the histogram's bucket bound.
    let added: BTreeSet<String> = ["service", "le", "job", "instance"]
        .map(String::from)
        .into();

    let mut checked = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert_eq!(
            panel["datasource"]["uid"], "shardpay-prometheus",
            "panel {title}"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} queries nothing");
        for target in targets {
            let expr = target["expr"].as_str().expect("an expr");
            let reads = queried(expr);
            assert!(!reads.is_empty(), "panel {title}: {expr} reads no metric");
            for (name, labels) in reads {
                let has = metrics
                    .get(&name)
                    .unwrap_or_else(|| panic!("panel {title}: {name} is not exported: {text}"));
                for label in labels.difference(&added) {
                    assert!(
                        has.contains(label),
                        "panel {title}: {name} has no label {label} (it has {has:?})"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "{checked} metric reads checked");

    // Prometheus scrapes the six services where they listen.
    let prometheus = repo("deploy/prometheus.yml");
    for (service, port) in [
        ("auth", 8001),
        ("ledger", 8002),
        ("fraud", 8003),
        ("notification", 8004),
        ("analytics", 8005),
        ("shard-manager", 8006),
    ] {
        assert!(
            prometheus.contains(&format!("\"{service}:{port}\""))
                && prometheus.contains(&format!("service: {service}}}")),
            "deploy/prometheus.yml scrapes {service}:{port}"
        );
    }
    // Grafana is provisioned with that data source and this board, and the
    // compose profile mounts them.
    let datasource = repo("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert!(
        datasource.contains("uid: shardpay-prometheus"),
        "{datasource}"
    );
    assert!(
        datasource.contains("url: http://prometheus:9090"),
        "{datasource}"
    );
    let compose = repo("docker-compose.yml");
    for needed in [
        "profiles: [observability]",
        "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml",
        "./deploy/grafana/dashboards:/var/lib/grafana/dashboards",
        "./deploy/grafana/provisioning:/etc/grafana/provisioning",
    ] {
        assert!(compose.contains(needed), "docker-compose.yml: {needed}");
    }
}
