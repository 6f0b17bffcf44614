//! `gpulink demo`: the whole journey on loopback, with no AWS account and no network.
//! The simulator plays the cluster (four PrivateLink ENIs in two regions and one public
//! endpoint), the development key provider plays KMS, and a scripted workload shows where
//! traffic goes as ENIs fail: the remaining ENIs, then the other region, then public.
//!
//! It shares the simulator's addresses (127.0.x.y) but not its ports: the demo picks
//! free ones, so it runs beside a `gpulink sim`. The proxy's log goes to a file (or to
//! stderr with `--verbose`), never into the middle of the report.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use gpulink::config::Config;
use gpulink::proxy::ProxyHandle;
use gpulink::seal::{DevKeys, KeyService};
use gpulink_sim::{EndpointState, Sim, SimConfig};

const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// Requests in flight at once during each step.
const CONCURRENCY: usize = 6;

type DemoClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Requests sent in each step of the scenario.
    #[arg(long, default_value_t = 30)]
    pub requests: usize,
    /// Show the proxy's log (warnings and errors, or `RUST_LOG`) on stderr instead of
    /// writing it to a file.
    #[arg(long, short)]
    pub verbose: bool,
    /// Where the proxy's log goes without `--verbose`. Default: gpulink-demo-PID.log in
    /// the temporary directory.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// The second byte of every loopback address the demo uses (127.N.x.y), so that tests
    /// can run it inside their own block.
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    pub loopback_block: u8,
}

struct StepResult {
    name: String,
    sent: usize,
    ok: usize,
    by_endpoint: BTreeMap<Served, usize>,
}

/// Where one request was served, as the proxy's response headers say.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Served {
    endpoint: String,
    route: String,
    region: String,
}

/// The addresses of one demo run: the simulator's layout inside `127.<block>`, on ports
/// nothing else holds.
struct Layout {
    block: u8,
    tls_port: u16,
    health_port: u16,
}

impl Layout {
    fn ip(&self, base: &str) -> IpAddr {
        let base: Ipv4Addr = base.parse().unwrap_or(Ipv4Addr::LOCALHOST);
        let [a, _, c, d] = base.octets();
        IpAddr::V4(Ipv4Addr::new(a, self.block, c, d))
    }

    fn authority(&self, base: &str) -> String {
        SocketAddr::new(self.ip(base), self.tls_port).to_string()
    }

    /// The demo configuration with this layout's addresses and ports.
    fn config_text(&self, ca_file: &Path) -> String {
        DEMO_CONFIG
            .replace("127.0.", &format!("127.{}.", self.block))
            .replace(":8443\"", &format!(":{}\"", self.tls_port))
            .replace("port = 8080", &format!("port = {}", self.health_port))
            .replace("SIM_CA_FILE", &ca_file.display().to_string())
    }

    fn sim_config(&self, ca_dir: PathBuf) -> SimConfig {
        let mut config = SimConfig::default_layout(ca_dir);
        for endpoint in &mut config.endpoints {
            endpoint.ip = self.ip(&endpoint.ip.to_string());
            endpoint.tls_port = self.tls_port;
            endpoint.health_port = self.health_port;
        }
        config.control_addr = SocketAddr::new(self.ip("127.0.0.1"), 0);
        config
    }

    /// Two ports free on every endpoint address (a `gpulink sim` holds 8443 and 8080).
    /// Another process may still take one before the simulator binds it: the caller
    /// retries with a new layout.
    fn pick(block: u8) -> anyhow::Result<Layout> {
        let ips: Vec<IpAddr> = SimConfig::default_layout(PathBuf::new())
            .endpoints
            .iter()
            .map(|e| match e.ip {
                IpAddr::V4(ip) => {
                    let [a, _, c, d] = ip.octets();
                    IpAddr::V4(Ipv4Addr::new(a, block, c, d))
                }
                other => other,
            })
            .collect();
        let first = *ips
            .first()
            .context("the simulator layout has no endpoint")?;
        let mut ports = Vec::new();
        let mut held = Vec::new();
        for _ in 0..50 {
            let probe = TcpListener::bind(SocketAddr::new(first, 0))
                .with_context(|| format!("cannot bind a port on {first}"))?;
            let port = probe.local_addr()?.port();
            let others: Result<Vec<TcpListener>, _> = ips[1..]
                .iter()
                .map(|ip| TcpListener::bind(SocketAddr::new(*ip, port)))
                .collect();
            // Held until both ports are chosen, so the second cannot equal the first.
            if let Ok(others) = others {
                ports.push(port);
                held.push(probe);
                held.extend(others);
                if ports.len() == 2 {
                    return Ok(Layout {
                        block,
                        tls_port: ports[0],
                        health_port: ports[1],
                    });
                }
            }
        }
        anyhow::bail!("found no port free on all of the demo's addresses 127.{block}.x.y")
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let log_file = if args.verbose {
        gpulink::telemetry::init_with_default(gpulink::config::LogFormat::Text, "warn");
        None
    } else {
        let path = args.log_file.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("gpulink-demo-{}.log", std::process::id()))
        });
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create the demo's log file {}", path.display()))?;
        gpulink::telemetry::init_to_file(gpulink::config::LogFormat::Text, "warn", file);
        Some(path)
    };
    let scratch = tempfile_dir()?;
    let keys = KeyService::Dev(Arc::new(DevKeys::new()?));
    let mut attempt = 0;
    let (layout, sim) = loop {
        let layout = Layout::pick(args.loopback_block)?;
        match Sim::start(layout.sim_config(scratch.clone()), keys.clone()).await {
            Ok(sim) => break (layout, sim),
            // Lost a race for a port: pick again.
            Err(_) if attempt < 3 => attempt += 1,
            Err(error) => {
                return Err(anyhow::Error::new(error).context(format!(
                    "starting the simulator on 127.{}.x.y",
                    args.loopback_block
                )))
            }
        }
    };
    let text = layout.config_text(&sim.ca_file());
    let config = Config::from_toml(&text, Path::new("config/demo.toml"))?;
    let proxy = gpulink::proxy::start(config, keys).await?;
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
    let first = ENIS[0];
    sim.set_state(layout.ip(first), EndpointState::Down).await?;
    wait_until_out(&proxy, &layout.authority(first)).await?;
    let name = format!("ENI {} down", layout.ip(first));
    steps.push(step(&name, &client, &proxy, args.requests).await);
    for ip in &ENIS[1..3] {
        sim.set_state(layout.ip(ip), EndpointState::Down).await?;
        wait_until_out(&proxy, &layout.authority(ip)).await?;
    }
    steps.push(step("all us-east-1 ENIs down", &client, &proxy, args.requests).await);
    sim.set_state(layout.ip(ENIS[3]), EndpointState::Down)
        .await?;
    wait_until_out(&proxy, &layout.authority(ENIS[3])).await?;
    steps.push(step("all PrivateLink ENIs down", &client, &proxy, args.requests).await);

    // Automatic rollback: PrivateLink comes back but slow; its p99 breaches
    // rollback.max_p99 and traffic moves to public without an operator.
    println!("rollback: PrivateLink recovers but is slow (p99 over rollback.max_p99)");
    for ip in ENIS {
        sim.set_state(layout.ip(ip), EndpointState::Slow { delay_ms: 300 })
            .await?;
        wait_until_in(&proxy, &layout.authority(ip)).await?;
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
    if let Some(path) = log_file {
        gpulink::telemetry::flush(Duration::from_secs(2));
        let lines = std::fs::read_to_string(&path)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        // Warnings are expected here: the demo fails endpoints on purpose.
        println!(
            "the proxy's log ({lines} lines; the demo fails endpoints on purpose, so warnings are expected): {}",
            path.display()
        );
    }
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

/// The simulator's PrivateLink ENIs in the demo layout (in block 0; see [`Layout::ip`]).
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
async fn one_request(client: &DemoClient, url: &str, i: usize) -> Option<Served> {
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
    let label = Served {
        endpoint: header("x-gpulink-endpoint"),
        route: header("x-gpulink-route"),
        region: header("x-region"),
    };
    let ok = response.status().is_success();
    let _ = response.into_body().collect().await;
    ok.then_some(label)
}

fn print_table(steps: &[StepResult]) {
    print!("{}", table(steps));
}

/// The report's table: one row per place requests were served, one column per step,
/// every column as wide as its widest cell.
fn table(steps: &[StepResult]) -> String {
    use std::fmt::Write as _;
    let mut rows: Vec<&Served> = steps.iter().flat_map(|s| s.by_endpoint.keys()).collect();
    rows.sort();
    rows.dedup();
    let width =
        |header: &str, cells: &mut dyn Iterator<Item = usize>| cells.fold(header.len(), usize::max);
    let endpoint_w = width("endpoint", &mut rows.iter().map(|r| r.endpoint.len()));
    let route_w = width("route", &mut rows.iter().map(|r| r.route.len()));
    let region_w = width("region", &mut rows.iter().map(|r| r.region.len()));
    let label_w = endpoint_w + route_w + region_w + 4;
    let totals: Vec<String> = steps
        .iter()
        .map(|s| format!("{}/{}", s.ok, s.sent))
        .collect();
    let step_w: Vec<usize> = steps
        .iter()
        .enumerate()
        .map(|(i, _)| format!("step {}", i + 1).len().max(totals[i].len()))
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "where the requests went (one column per step of the scenario):\n"
    );
    let _ = write!(
        out,
        "{:<endpoint_w$}  {:<route_w$}  {:<region_w$}",
        "endpoint", "route", "region"
    );
    for (i, w) in step_w.iter().enumerate() {
        let _ = write!(out, " | {:>w$}", format!("step {}", i + 1));
    }
    out.push('\n');
    for row in &rows {
        let _ = write!(
            out,
            "{:<endpoint_w$}  {:<route_w$}  {:<region_w$}",
            row.endpoint, row.route, row.region
        );
        for (s, w) in steps.iter().zip(&step_w) {
            let _ = write!(
                out,
                " | {:>w$}",
                s.by_endpoint.get(*row).copied().unwrap_or(0)
            );
        }
        out.push('\n');
    }
    let _ = write!(out, "{:<label_w$}", "succeeded / sent");
    for (total, w) in totals.iter().zip(&step_w) {
        let _ = write!(out, " | {total:>w$}");
    }
    out.push_str("\n\n");
    for (i, s) in steps.iter().enumerate() {
        let _ = writeln!(out, "step {}: {}", i + 1, s.name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_columns_line_up() {
        let served = |endpoint: &str, route: &str, region: &str| Served {
            endpoint: endpoint.into(),
            route: route.into(),
            region: region.into(),
        };
        let steps = vec![
            StepResult {
                name: "one".into(),
                sent: 30,
                ok: 30,
                by_endpoint: BTreeMap::from([
                    (served("127.0.10.50:41234", "privatelink", "us-east-1"), 29),
                    (served("127.0.20.1:41234", "public", "us-east-1"), 1),
                ]),
            },
            StepResult {
                name: "two".into(),
                sent: 1000,
                ok: 999,
                by_endpoint: BTreeMap::from([(
                    served("127.0.13.50:41234", "privatelink", "us-west-2"),
                    999,
                )]),
            },
        ];
        let text = table(&steps);
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(" | ")).collect();
        assert_eq!(lines.len(), 5, "{text}");
        let bars =
            |line: &str| -> Vec<usize> { line.match_indices(" | ").map(|(i, _)| i).collect() };
        for line in &lines {
            assert_eq!(bars(line), bars(lines[0]), "{text}");
            assert_eq!(line.len(), lines[0].len(), "{text}");
        }
        // The region column starts at the same place in every row and the header.
        let region_at = lines[0].find("region").unwrap();
        for line in &lines[1..4] {
            assert!(line[region_at..].starts_with("us-"), "{text}");
        }
    }
}
