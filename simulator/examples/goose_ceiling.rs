//! How fast can goose itself send? Serves a trivial endpoint, or drives one
//! with goose the way the simulator does (one transaction, no think time),
//! so goose's ceiling can be put next to wrk's on the same machine:
//!
//! ```text
//! cargo run --release -p shardpay-simulator --example goose_ceiling -- serve 127.0.0.1:8099
//! cargo run --release -p shardpay-simulator --example goose_ceiling -- drive http://127.0.0.1:8099 64 10
//! wrk -t2 -c64 -d10s http://127.0.0.1:8099/
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use goose::config::GooseConfiguration;
use goose::goose::{Scenario, Transaction, TransactionFunction};
use goose::GooseAttack;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Runtime::new()?;
    match args.first().map(String::as_str) {
        Some("serve") => runtime.block_on(serve(
            args.get(1).map(String::as_str).unwrap_or("127.0.0.1:8099"),
        )),
        Some("drive") => {
            let url = args
                .get(1)
                .cloned()
                .unwrap_or_else(|| "http://127.0.0.1:8099".into());
            let users: usize = args.get(2).map(|u| u.parse()).transpose()?.unwrap_or(64);
            let seconds: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
            runtime.block_on(drive(&url, users, seconds))
        }
        _ => anyhow::bail!("usage: goose_ceiling serve [ADDR] | drive [URL] [USERS] [SECONDS]"),
    }
}

async fn serve(addr: &str) -> anyhow::Result<()> {
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("serving http://{}/", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn drive(url: &str, users: usize, seconds: u64) -> anyhow::Result<()> {
    let mut config = GooseConfiguration::default();
    config.host = Some(url.to_string());
    config.users = Some(users);
    config.increase_rate = Some((users * 100).to_string());
    config.run_time = Some(seconds.to_string());
    config.quiet = 1;
    config.no_print_metrics = true;
    config.no_telnet = true;
    let count = Arc::new(AtomicU64::new(0));
    let counted = count.clone();
    let get: TransactionFunction = Arc::new(move |user| {
        let count = counted.clone();
        Box::pin(async move {
            let _ = user.get("/").await?;
            count.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    });
    let started = Instant::now();
    GooseAttack::initialize_with_config(config)?
        .register_scenario(Scenario::new("trivial").register_transaction(Transaction::new(get)))
        .execute()
        .await?;
    let wall = started.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed);
    println!(
        "goose: {n} requests in {wall:.1} s with {users} users: {:.0} requests/s",
        n as f64 / seconds as f64
    );
    Ok(())
}
