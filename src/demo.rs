//! `gpulink demo`: the whole journey on loopback, with no AWS account and no network.
//! The simulator plays the cluster (four PrivateLink ENIs in two regions and one public
//! endpoint), the development key provider plays KMS, and a scripted workload shows where
//! traffic goes as ENIs fail: the remaining ENIs, then the other region, then public.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::Config;
use crate::proxy::ProxyHandle;
use crate::seal::{DevKeys, KeyService};
use crate::sim::{EndpointState, Sim, SimConfig};

const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// Requests in flight at once during each step.
const CONCURRENCY: usize = 6;

type DemoClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Requests sent in each step of the scenario.
    #[arg(long, default_value_t = 30)]
    pub requests: usize,
}

struct StepResult {
    name: String,
    sent: usize,
    ok: usize,
    by_endpoint: BTreeMap<String, usize>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    crate::telemetry::init_with_default(crate::config::LogFormat::Text, "warn");
    let scratch = tempfile_dir()?;
    let keys = KeyService::Dev(Arc::new(DevKeys::new()?));
    let sim = Sim::start(SimConfig::default_layout(scratch.clone()), keys.clone())
        .await
        .context("starting the simulator (it needs 127.0.10.50 and friends on ports 8443/8080)")?;
    let text = DEMO_CONFIG.replace("SIM_CA_FILE", &sim.ca_file().display().to_string());
    let config = Config::from_toml(&text, Path::new("config/demo.toml"))?;
    let proxy = crate::proxy::start(config, keys).await?;
    println!(
        "gpulink demo: proxy on http://{} (admin http://{}), simulated cluster CA {}\n",
        proxy.listen_addr,
        proxy.admin_addr,
        sim.ca_file().display()
    );

    let client: DemoClient = Client::builder(TokioExecutor::new()).build_http();
    let mut steps = Vec::new();
    let phase = |name: &str| -> anyhow::Result<Config> {
        let text = text.replace("phase = \"privatelink\"", &format!("phase = \"{name}\""));
        Ok(Config::from_toml(&text, Path::new("config/demo.toml"))?)
    };

    // The guide's phases 1-3: cut over from public to PrivateLink, one reload at a time.
    println!("cutover: public -> canary 25% -> privatelink (each a configuration reload)");
    proxy.proxy().reload(phase("public")?).await?;
    steps.push(
        step(
            "phase public (before cutover)",
            &client,
            &proxy,
            args.requests,
        )
        .await,
    );
    proxy.proxy().reload(phase("canary")?).await?;
    steps.push(
        step(
            "phase canary, 25% PrivateLink",
            &client,
            &proxy,
            args.requests,
        )
        .await,
    );
    proxy.proxy().reload(phase("privatelink")?).await?;
    steps.push(step("phase privatelink", &client, &proxy, args.requests).await);

    // Failover: the guide's "if one ENI fails, traffic routes to the others", then AZs
    // and regions, then the public endpoints inside the fallback window.
    println!("failover: ENIs go down one by one");
    sim.set_state("127.0.10.50".parse()?, EndpointState::Down)
        .await?;
    wait_until_out(&proxy, "127.0.10.50:8443").await?;
    steps.push(step("ENI 127.0.10.50 down", &client, &proxy, args.requests).await);
    for ip in ["127.0.11.50", "127.0.12.50"] {
        sim.set_state(ip.parse()?, EndpointState::Down).await?;
        wait_until_out(&proxy, &format!("{ip}:8443")).await?;
    }
    steps.push(step("all us-east-1 ENIs down", &client, &proxy, args.requests).await);
    sim.set_state("127.0.13.50".parse()?, EndpointState::Down)
        .await?;
    wait_until_out(&proxy, "127.0.13.50:8443").await?;
    steps.push(step("all PrivateLink ENIs down", &client, &proxy, args.requests).await);

    // Automatic rollback: PrivateLink comes back but slow; its p99 breaches
    // rollback.max_p99 and traffic moves to public without an operator.
    println!("rollback: PrivateLink recovers but is slow (p99 over rollback.max_p99)");
    for ip in ENIS {
        sim.set_state(ip.parse()?, EndpointState::Slow { delay_ms: 300 })
            .await?;
        wait_until_in(&proxy, &format!("{ip}:8443")).await?;
    }
    steps.push(step("PrivateLink back, but slow", &client, &proxy, args.requests).await);
    let generation = proxy.proxy().current();
    if let Some(breach) = generation.routes.rollback().and_then(|r| r.last_breach()) {
        println!("  automatic rollback fired: {}", breach.reason);
    }
    steps.push(step("after automatic rollback", &client, &proxy, args.requests).await);
    drop(generation);

    // The instant rollback of the guide's plan: phase public, one reload.
    proxy.proxy().reload(phase("public")?).await?;
    steps.push(
        step(
            "operator rollback: phase public",
            &client,
            &proxy,
            args.requests,
        )
        .await,
    );
    println!();

    print_table(&steps);
    let stats = sim.all_stats();
    let leaks: u64 = stats.iter().map(|s| s.plaintext_seen).sum();
    let decrypt_failures: u64 = stats.iter().map(|s| s.decrypt_failures).sum();
    let failed: usize = steps.iter().map(|s| s.sent - s.ok).sum();
    println!(
        "\nthe simulated cluster opened every body: {decrypt_failures} decrypt failures, {leaks} plaintext bodies seen"
    );
    proxy.shutdown().await;
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&scratch);
    if failed == 0 && leaks == 0 && decrypt_failures == 0 {
        println!("every request succeeded.");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{failed} requests failed.");
        Ok(ExitCode::FAILURE)
    }
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("gpulink-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The simulator's PrivateLink ENIs in the demo layout.
const ENIS: [&str; 4] = ["127.0.10.50", "127.0.11.50", "127.0.12.50", "127.0.13.50"];

/// Waits until the proxy's health checks admit `authority` again.
async fn wait_until_in(proxy: &ProxyHandle, authority: &str) -> anyhow::Result<()> {
    wait_for_serving(proxy, authority, true).await
}

/// Waits until the proxy's health checks have taken `authority` out of service.
async fn wait_until_out(proxy: &ProxyHandle, authority: &str) -> anyhow::Result<()> {
    wait_for_serving(proxy, authority, false).await
}

async fn wait_for_serving(
    proxy: &ProxyHandle,
    authority: &str,
    serving: bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let generation = proxy.proxy().current();
        let reached = generation
            .endpoints
            .iter()
            .any(|e| e.authority == authority && e.is_serving() == serving);
        if reached {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let what = if serving { "up" } else { "down" };
            anyhow::bail!("the proxy did not notice that {authority} is {what} within 10s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `requests` guide-style requests, a few at a time as a busy app would, and counts
/// where each was served.
async fn step(name: &str, client: &DemoClient, proxy: &ProxyHandle, requests: usize) -> StepResult {
    let url: Arc<str> = format!("http://{}/inference", proxy.listen_addr).into();
    let mut tasks = tokio::task::JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..CONCURRENCY {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        tasks.spawn(async move {
            let mut served = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return served;
                }
                served.push(one_request(&client, &url, i).await);
            }
        });
    }
    let mut result = StepResult {
        name: name.to_string(),
        sent: requests,
        ok: 0,
        by_endpoint: BTreeMap::new(),
    };
    while let Some(joined) = tasks.join_next().await {
        for label in joined.unwrap_or_default().into_iter().flatten() {
            result.ok += 1;
            *result.by_endpoint.entry(label).or_default() += 1;
        }
    }
    result
}

/// One request; `Some(where it was served)` when it succeeded.
async fn one_request(client: &DemoClient, url: &str, i: usize) -> Option<String> {
    let body = format!(r#"{{"prompt": "Hello {i}", "max_tokens": 50}}"#);
    let request = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .ok()?;
    let response = client.request(request).await.ok()?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_string()
    };
    let label = format!(
        "{} {} {}",
        header("x-gpulink-endpoint"),
        header("x-gpulink-route"),
        header("x-region")
    );
    let ok = response.status().is_success();
    let _ = response.into_body().collect().await;
    ok.then_some(label)
}

fn print_table(steps: &[StepResult]) {
    let mut rows: Vec<String> = steps
        .iter()
        .flat_map(|s| s.by_endpoint.keys().cloned())
        .collect();
    rows.sort();
    rows.dedup();
    println!("where the requests went (one column per step of the scenario):\n");
    print!("{:<42}", "endpoint  route  region that answered");
    for (i, _) in steps.iter().enumerate() {
        print!(" | {:>7}", format!("step {}", i + 1));
    }
    println!();
    for row in &rows {
        print!("{row:<42}");
        for s in steps {
            print!(" | {:>7}", s.by_endpoint.get(row).copied().unwrap_or(0));
        }
        println!();
    }
    print!("{:<42}", "succeeded / sent");
    for s in steps {
        print!(" | {:>7}", format!("{}/{}", s.ok, s.sent));
    }
    println!("\n");
    for (i, s) in steps.iter().enumerate() {
        println!("step {}: {}", i + 1, s.name);
    }
}
