//! The split deployment with replicas: two of each service but the ledger
//! (which runs the outbox relay and the recovery loop), on real local servers (four MySQL shard databases, the
//! Kafka-protocol broker, Redis), each service given its peers as lists of
//! replica URLs. The smoke scenario runs against both shard managers; in
//! the middle of it one replica of each of the three is killed with
//! SIGKILL. The run's audit, its books, the event pipeline (every event
//! applied once by every consumer) and the webhook receiver's checks must
//! pass, and the only errors allowed are those of the requests the kills
//! cut off. Both analytics replicas, each in a consumer group of its own,
//! must have applied every event.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::six::{free_port, ready, server, start, text, Process};
use super::{mysql_databases, only_report};

/// The instances, in start order: (service, replica).
const INSTANCES: [(&str, u32); 11] = [
    ("auth", 1),
    ("auth", 2),
    ("ledger", 1),
    ("fraud", 1),
    ("fraud", 2),
    ("notification", 1),
    ("notification", 2),
    ("analytics", 1),
    ("analytics", 2),
    ("shard-manager", 1),
    ("shard-manager", 2),
];
/// Transfers the shard manager to be killed answers before the kills: the
/// load is running through both replicas by then.
const TRANSFERS_BEFORE_KILL: u64 = 150;

fn instance_name(service: &str, replica: u32) -> String {
    format!("{service}-{replica}")
}

/// The servers this test needs, or `None` (skipped).
pub(super) struct Servers {
    kafka: String,
    redis: String,
    shards: Vec<String>,
}

pub(super) fn servers() -> Option<Servers> {
    let kafka = server(
        "SHARDPAY_TEST_KAFKA_BOOTSTRAP",
        "SHARDPAY_REQUIRE_KAFKA",
        "scripts/kafka.sh up",
    )?;
    let redis = server(
        "SHARDPAY_TEST_REDIS_URL",
        "SHARDPAY_REQUIRE_REDIS",
        "scripts/redis.sh up",
    )?;
    let shards = mysql_databases()?;
    Some(Servers {
        kafka,
        redis,
        shards,
    })
}

/// The deployment: every instance on a port of its own, each told where
/// every replica of its peers answers.
pub(super) struct Deployment {
    pub(super) dir: tempfile::TempDir,
    pub(super) admin_password: String,
    instances: Vec<(&'static str, u32)>,
    ports: Vec<u16>,
    /// Each instance's environment and arguments, to start it again.
    env: Vec<(String, String)>,
    args: Vec<Vec<String>>,
    processes: Vec<Process>,
}

impl Deployment {
    fn index(&self, service: &str, replica: u32) -> usize {
        self.instances
            .iter()
            .position(|(s, r)| *s == service && *r == replica)
            .unwrap()
    }

    pub(super) fn url(&self, service: &str, replica: u32) -> String {
        format!(
            "http://127.0.0.1:{}",
            self.ports[self.index(service, replica)]
        )
    }

    /// Every replica's URL of `service`, separated by commas.
    pub(super) fn urls(&self, service: &str) -> String {
        self.instances
            .iter()
            .filter(|(s, _)| *s == service)
            .map(|(s, r)| self.url(s, *r))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    pub(super) fn process(&mut self, service: &str, replica: u32) -> &mut Process {
        let i = self.index(service, replica);
        &mut self.processes[i]
    }

    /// Starts `service`'s replica `replica` again, on its port with its
    /// arguments (after a kill), and waits until it is ready. Its log
    /// goes on in a file of its own per start.
    pub(super) fn restart(&mut self, service: &str, replica: u32, start_count: u32) {
        let i = self.index(service, replica);
        let name = format!("{}-start{start_count}", instance_name(service, replica));
        let command = ["serve".to_string(), service.to_string()];
        let process = start(&command, &self.env, &self.args[i], &self.log(&name));
        ready(&name, &process.url, &self.log(&name));
        self.processes[i] = process;
    }

    pub(super) fn start(servers: &Servers, instances: &[(&'static str, u32)]) -> Deployment {
        let tag = format!("rep{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let mut d = Deployment {
            dir: tempfile::tempdir().unwrap(),
            admin_password: uuid::Uuid::new_v4().simple().to_string(),
            instances: instances.to_vec(),
            ports: instances.iter().map(|_| free_port()).collect(),
            env: Vec::new(),
            args: Vec::new(),
            processes: Vec::new(),
        };
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let env: Vec<(String, String)> = [
            ("SHARDPAY_JWT_SECRET", secret.as_str()),
            ("SHARDPAY_ADMIN_PASSWORD", d.admin_password.as_str()),
            // The run's webhook receiver listens on loopback.
            ("SHARDPAY_WEBHOOKS_TO_PRIVATE_NETWORKS", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (i, (service, replica)) in instances.iter().enumerate() {
            let name = instance_name(service, *replica);
            let data_dir = d.dir.path().join(&name);
            let args: Vec<String> = [
                "--port",
                &d.ports[i].to_string(),
                "--data-dir",
                &data_dir.display().to_string(),
                "--mysql-urls",
                &servers.shards.join(","),
                "--auth-mysql-url",
                &format!("{}_auth", servers.shards[0]),
                "--notification-mysql-url",
                &format!("{}_notify", servers.shards[0]),
                "--kafka",
                &servers.kafka,
                "--kafka-prefix",
                &format!("{tag}-"),
                "--redis",
                &servers.redis,
                "--redis-prefix",
                &format!("{tag}:"),
                "--fraud-features",
                "redis",
                "--auth-url",
                &d.urls("auth"),
                "--ledger-url",
                &d.urls("ledger"),
                "--fraud-url",
                &d.urls("fraud"),
                "--notification-url",
                &d.urls("notification"),
                // The simulator logs in its users from one address.
                "--login-limit-per-user",
                "0",
                "--login-limit-per-address",
                "0",
                "--argon2-memory-kib",
                "64",
                "--argon2-iterations",
                "1",
                "--recovery-grace-ms",
                "500",
                // Each analytics replica reads every event.
                "--analytics-group",
                &format!("analytics-{replica}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let command = ["serve".to_string(), service.to_string()];
            let process = start(&command, &env, &args, &d.log(&name));
            d.processes.push(process);
            d.args.push(args);
        }
        d.env = env;
        for (i, (service, replica)) in instances.iter().enumerate() {
            let name = instance_name(service, *replica);
            ready(&name, &d.processes[i].url, &d.log(&name));
        }
        d
    }
}

/// The smoke scenario with no error-rate threshold: requests in flight to
/// a replica when it is killed fail, and the test bounds those itself.
/// Every other threshold (the audit, the books, the pipeline, the
/// webhooks) stays the run's gate.
pub(super) fn smoke_without_error_rate(dir: &Path, duration_s: Option<u32>) -> PathBuf {
    let smoke =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/smoke.toml"))
            .unwrap();
    let line = "error_rate = 0.0\n";
    assert!(smoke.contains(line), "scenarios/smoke.toml changed: {line}");
    let mut smoke = smoke.replace(line, "");
    if let Some(seconds) = duration_s {
        let line = "duration_s = 6\n";
        assert!(smoke.contains(line), "scenarios/smoke.toml changed: {line}");
        smoke = smoke.replace(line, &format!("duration_s = {seconds}\n"));
    }
    let path = dir.join("smoke-replicas.toml");
    std::fs::write(&path, smoke).unwrap();
    path
}

/// Transfers a shard manager has answered with a transfer (201, 202, 422),
/// from its /metrics.
pub(super) fn transfers_answered(url: &str) -> u64 {
    text(&format!("{url}/metrics"))
        .lines()
        .filter(|l| {
            l.starts_with("shardpay_http_requests_total{")
                && l.contains("method=\"POST\"")
                && l.contains("route=\"/v1/transfers\"")
                && ["201", "202", "422"]
                    .iter()
                    .any(|s| l.contains(&format!("status=\"{s}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Polls (deadline 120 s) until `url` has answered `count` transfers, while
/// the run is still going.
pub(super) fn wait_for_transfers(url: &str, count: u64, run: &mut Child, said: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answered = transfers_answered(url);
        if answered >= count {
            return;
        }
        if let Some(status) = run.try_wait().unwrap() {
            panic!(
                "the run ended ({status}) before {url} answered {count} transfers ({answered}):\n{}",
                std::fs::read_to_string(said).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{url} answered {answered} transfers in 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILL (no graceful stop), and reaped.
pub(super) fn kill(process: &mut Process) {
    process.child.kill().unwrap();
    process.child.wait().unwrap();
}

#[test]
fn replicas_survive_the_smoke_scenario_with_one_of_each_killed() {
    let _one_stack = super::six::one_stack_at_a_time();
    let Some(servers) = servers() else {
        return;
    };
    let mut d = Deployment::start(&servers, &INSTANCES);
    let scenario = smoke_without_error_rate(d.dir.path(), None);
    let reports = d.dir.path().join("reports");
    let said = d.dir.path().join("run.out");
    let mut run = d.run(&scenario, &reports, &said);

    // Mid-run: both shard managers are taking transfers; then one replica
    // of each of the three dies at once.
    let (manager_1, manager_2) = (d.url("shard-manager", 1), d.url("shard-manager", 2));
    wait_for_transfers(&manager_2, TRANSFERS_BEFORE_KILL, &mut run, &said);
    assert!(
        transfers_answered(&manager_1) > 0,
        "{manager_1} took no transfer"
    );
    for service in ["shard-manager", "fraud", "notification"] {
        kill(d.process(service, 2));
    }
    assert!(
        run.try_wait().unwrap().is_none(),
        "the run ended before the kills"
    );
    let at_kill = transfers_answered(&manager_1);

    let status = wait_for_run(&mut run);
    let output = std::fs::read_to_string(&said).unwrap_or_default();
    // The load went on through the replica left.
    assert!(
        transfers_answered(&manager_1) > at_kill,
        "no transfer after the kills:\n{output}"
    );
    let report = only_report(&reports);
    check_report(&report, &output);
    assert!(status.success(), "the run failed ({status}):\n{output}");
    // Each analytics replica, in a group of its own, applied every event
    // (in one group they would have split them).
    for replica in [1, 2] {
        let url = d.url("analytics", replica);
        let pipeline = pipeline_of(&d, &url);
        assert_eq!(
            pipeline["complete"], true,
            "analytics {replica}: {pipeline}"
        );
    }
    eprintln!(
        "replicas: {}",
        output.lines().take(40).collect::<Vec<_>>().join("\n")
    );
}

/// The run's process, waited for (at most 600 s).
pub(super) fn wait_for_run(run: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = run.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the run took over 600 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `/v1/pipeline` of the analytics service at `url`, asked as the admin.
pub(super) fn pipeline_of(d: &Deployment, url: &str) -> Value {
    let admin = super::six::login(&d.url("auth", 1), "admin", &d.admin_password);
    super::six::get_auth(&format!("{url}/v1/pipeline"), &admin)
}

impl Deployment {
    /// `shardpay run` of `scenario` against every shard-manager replica,
    /// its output in `said`, its report under `reports`.
    pub(super) fn run(&self, scenario: &Path, reports: &Path, said: &Path) -> Child {
        Command::new(env!("CARGO_BIN_EXE_shardpay"))
            .arg("run")
            .arg(scenario)
            .args([
                "--quiet",
                "--webhooks",
                "--target",
                &self.urls("shard-manager"),
            ])
            .arg("--service")
            .arg(format!("auth={}", self.urls("auth")))
            .arg("--service")
            .arg(format!("notification={}", self.urls("notification")))
            .arg("--service")
            .arg(format!("analytics={}", self.urls("analytics")))
            .arg("--reports")
            .arg(reports)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("SHARDPAY_ADMIN_PASSWORD", &self.admin_password)
            .stdout(Stdio::from(std::fs::File::create(said).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::options().append(true).open(said).unwrap(),
            ))
            .spawn()
            .unwrap()
    }
}

/// The run's gates: the audit, the books, every event applied once, every
/// webhook delivery verified and arrived; errors only of the kinds a
/// killed replica explains, no more than the requests it could have had in
/// flight.
pub(super) fn check_report(report: &Value, output: &str) {
    eprintln!(
        "replicas: pipeline {}\nreplicas: webhooks {}\nreplicas: accounting ok {} settled after the run {}",
        report["pipeline"], report["webhooks"], report["accounting"]["ok"], report["accounting"]["settled_after_run"]
    );
    assert_eq!(report["audit"]["ok"], true, "{}\n{output}", report["audit"]);
    let accounting = &report["accounting"];
    assert_eq!(accounting["ok"], true, "{accounting}\n{output}");
    assert_eq!(accounting["unsettled"], 0, "{accounting}");
    let pipeline = &report["pipeline"];
    assert_eq!(pipeline["complete"], true, "{pipeline}\n{output}");
    let webhooks = &report["webhooks"];
    assert!(
        webhooks["hooked_accounts"].as_u64().unwrap_or(0) > 0,
        "no webhooks registered: {webhooks}"
    );
    assert!(
        webhooks["system_delivered"].as_u64().unwrap_or(0) > 0,
        "no webhook delivered: {webhooks}"
    );
    assert_eq!(webhooks["ok"], true, "{webhooks}\n{output}");
    // Cut off by a kill: a request in flight to the shard manager (no
    // answer), or its call to the fraud replica (503 fraud_unavailable).
    // Each virtual user has at most two requests in flight (a retry
    // group's racer besides its own).
    let users = report["run"]["users"].as_u64().unwrap();
    let errors = report["totals"]["counts"]["errors"].as_u64().unwrap();
    assert!(errors <= 2 * users, "{errors} errors\n{output}");
    for row in report["outcomes"].as_array().unwrap() {
        let (status, code) = (
            row["status"].as_u64().unwrap(),
            row["code"].as_str().unwrap(),
        );
        let expected = matches!(
            (status, code),
            (0, "transport") | (503, "fraud_unavailable")
        ) || (200..500).contains(&status);
        assert!(expected, "unexpected outcome {row}\n{output}");
    }
}
