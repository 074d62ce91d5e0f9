//! The live view in a real browser: `shardpay run --live` prints an
//! address; headless Chromium opens it during the run, with every host but
//! loopback unresolvable, and the page it renders has the run's charts with
//! data in them; and the system's own dashboard (`/dashboard/analytics`)
//! draws its per-shard series. Screenshots are kept under
//! `target/artefacts/`.
//!
//! Chromium (Debian's `chromium`) is installed by `scripts/test.sh
//! --install`; without it the test says so and passes, unless
//! `SHARDPAY_REQUIRE_CHROMIUM=1` (as CI sets) makes that a failure.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SCENARIO: &str = r#"
name = "live-view"
seed = 3
duration_s = 14
warmup_s = 1

[accounts]
count = 400
opening_balance = "1000.00"

[load]
model = "closed"
users = 4

[mix]
same_shard = 50
cross_shard = 30
idempotent_retry = 10
fraud_heavy = 10

[thresholds]
audit = true
"#;

fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(move |dir| dir.join(name))
        })
        .find(|path| path.is_file());
    if found.is_none() {
        assert!(
            std::env::var("SHARDPAY_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "SHARDPAY_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install -y chromium)"
        );
        eprintln!("no chromium on PATH: the live view's browser test is skipped");
    }
    found
}

/// Chromium, headless, as on a machine with no network: every host but
/// loopback fails to resolve.
fn headless(browser: &PathBuf, profile: &std::path::Path) -> Command {
    let mut command = Command::new(browser);
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--window-size=1000,2600",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command
}

#[test]
fn the_live_view_renders_the_runs_charts_in_a_browser() {
    let Some(browser) = chromium() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let scenario = dir.path().join("live.toml");
    std::fs::write(&scenario, SCENARIO).unwrap();
    let mut run = Command::new(env!("CARGO_BIN_EXE_shardpay"))
        .args(["run", "--quiet", "--live"])
        .arg(&scenario)
        .arg("--reports")
        .arg(dir.path().join("reports"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(run.stderr.take().unwrap());
    let mut lines = stderr.lines();
    let url = loop {
        let line = lines
            .next()
            .expect("the run ended before printing the live view's address")
            .unwrap();
        if let Some(rest) = line.strip_prefix("live view: ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    // Keep reading the run's output, so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    // The page asks nothing of the network: no script, style, font or
    // image from anywhere else.
    let page = super::block_on(async { reqwest::get(&url).await?.text().await }).unwrap();
    for outside in ["src=", "href=", "http://", "https://", "@import", "url("] {
        assert!(
            !page.contains(outside),
            "the page refers to {outside}: {page}"
        );
    }

    // A few seconds into the load.
    let started = Instant::now();
    loop {
        let series = super::get(&format!("{url}series.json"));
        if series["timeline"]["requests"]
            .as_array()
            .map_or(0, Vec::len)
            >= 4
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{series}");
        std::thread::sleep(Duration::from_millis(250));
    }

    // One browser, for three pushed updates (then the page stops
    // listening, and the budget of virtual time runs out): the DOM the
    // script built, and a screenshot of it.
    let artefacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let shot = artefacts.join("live-view.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    let out = headless(&browser, profile.path())
        .arg("--virtual-time-budget=3000")
        .arg("--dump-dom")
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("{url}?frames=3"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{said}");
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    std::fs::write(artefacts.join("live-view.html"), &dom).unwrap();
    assert!(
        std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0) > 10_000,
        "a screenshot at {}: {said}",
        shot.display()
    );
    eprintln!("the live view's screenshot: {}", shot.display());

    let status = run.wait().unwrap();
    let output = drain.join().unwrap().join("\n");
    assert!(status.success(), "{output}");

    // The script ran and swapped pushed charts in: the status line has
    // figures, and the charts hold series with points above zero.
    assert!(dom.contains("requests ·"), "status line: {dom}");
    let seconds = number_attribute(&dom, "data-seconds").expect("the page got pushed charts");
    assert!(seconds >= 4, "{seconds} seconds of data");
    assert!(dom.contains("data-frames=\"3\""), "three updates pushed");
    for title in [
        "Throughput",
        "Errors and p99 latency per second",
        "Declines and errors by code, per second",
        "Event pipeline",
    ] {
        assert!(dom.contains(title), "chart {title:?} missing: {dom}");
    }
    for legend in [">shard 0<", ">shard 3<", ">p99 ms<", ">outbox backlog<"] {
        assert!(dom.contains(legend), "series {legend:?} missing");
    }
    // Every series of the throughput chart: points, some above the axis.
    let throughput = dom.split("<h3>").next().unwrap();
    let mut series = 0;
    for polyline in throughput.split("<polyline").skip(1) {
        let points = polyline
            .split("points=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        let ys: Vec<f64> = points
            .split_whitespace()
            .filter_map(|p| p.split(',').nth(1)?.parse().ok())
            .collect();
        assert!(ys.len() >= 3, "a series with {} points", ys.len());
        // The charts' zero line is at y = 260.
        assert!(
            ys.iter().any(|y| *y < 250.0),
            "a series flat on the axis: {points}"
        );
        series += 1;
    }
    assert_eq!(series, 4, "one throughput series per shard");
}

/// The system's own dashboard (`/dashboard/analytics`) in the browser:
/// per-shard series (transfers and volume per second, health) and the
/// pipeline's, drawn from the samples the page keeps, with the totals.
#[test]
fn the_analytics_dashboard_draws_per_shard_series_in_a_browser() {
    let Some(browser) = chromium() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = super::serve(dir.path(), None);
    let ids: Vec<String> = (0..8).map(|i| format!("dash_{i}")).collect();
    for id in &ids {
        let (status, body) = super::post(
            &format!("{}/v1/accounts", server.url),
            serde_json::json!({"id": id, "opening_balance": "100.00"}),
            &format!("open-{id}"),
        )
        .unwrap();
        assert_eq!(status, 201, "{body}");
    }
    // Transfers keep flowing while the browser watches.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (url, ids, stop) = (server.url.clone(), ids.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (from, to) = (&ids[n % ids.len()], &ids[(n * 3 + 1) % ids.len()]);
                if from != to {
                    let _ = super::post(
                        &format!("{url}/v1/transfers"),
                        serde_json::json!({"from": from, "to": to, "amount": "0.01"}),
                        &format!("dash-pay-{n}"),
                    );
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let profile = tempfile::tempdir().unwrap();
    let artefacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let shot = artefacts.join("analytics-dashboard.png");
    let out = headless(&browser, profile.path())
        .arg("--virtual-time-budget=6000")
        .arg("--dump-dom")
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("{}/dashboard/analytics", server.url))
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = traffic.join().unwrap();
    assert!(sent > 10, "{sent} transfers sent");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    std::fs::write(artefacts.join("analytics-dashboard.html"), &dom).unwrap();
    let samples = number_attribute(&dom, "data-samples").expect("the page drew its charts");
    assert!(samples >= 3, "{samples} samples");
    for title in [
        "Transfers completed per second, by shard",
        "Volume per second, by shard",
        "Shards up (1) or down (0)",
        "Event pipeline: outbox backlog and dead letters",
        "Commit-to-consume lag",
    ] {
        assert!(dom.contains(title), "chart {title:?} missing: {dom}");
    }
    for shard in 0..4 {
        assert!(dom.contains(&format!(">shard {shard}<")), "shard {shard}");
    }
    // Every shard up: its health series sits at 1 (the top of its chart).
    let health = dom
        .split("Shards up (1) or down (0)")
        .nth(1)
        .unwrap()
        .split("<h2>")
        .next()
        .unwrap();
    assert_eq!(health.matches("<polyline").count(), 4);
    assert!(dom.contains("totals match the shards") || dom.contains("catching up"));
    assert!(dom.contains("<h2>Totals</h2>"), "{dom}");
    assert!(
        std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0) > 10_000,
        "a screenshot at {}",
        shot.display()
    );
}

/// The number in the first `name="..."` attribute of a page's DOM.
fn number_attribute(dom: &str, name: &str) -> Option<u64> {
    dom.split(&format!("{name}=\""))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
}
