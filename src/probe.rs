//! `gpulink probe`: the setup guide's step 5 ("Test connectivity") and its
//! troubleshooting section in one command.
//!
//! For every configured endpoint it resolves the address, times a TCP connect, completes
//! a TLS handshake exactly as the proxy would (same trust store from
//! [`crate::tls::client_config`], same TLS name), runs the proxy's own health check
//! (`crate::upstream::health::check`), and samples latency. Each failure gets one line
//! of diagnosis naming its likely causes (`crate::upstream::diagnose`, shared with the
//! proxy's own health checker so `/status` says the same), because the symptoms are ambiguous in ways an
//! operator should not have to rediscover: a TCP connect that times out looks the same
//! whether a security group drops the packets or the VPC endpoint is still
//! `pendingAcceptance`.
//!
//! It sends no inference request and needs no AWS credentials: nothing here touches KMS.
//! Exit status: 0 when at least one endpoint the migration phase allows can serve,
//! 1 when none can, 78 (EX_CONFIG) for an invalid configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::config::{
    Config, Discovery, EndpointConfig, Health, Phase, RouteKind, Upstream, EX_CONFIG,
};
use crate::placement::{HostZone, Locality};
use crate::upstream::diagnose;
pub use crate::upstream::diagnose::{Diagnosis, Problem};
use crate::upstream::health;

/// `gpulink probe` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// The configuration whose endpoints to probe.
    #[arg(
        long,
        env = "GPULINK_CONFIG",
        default_value = "/etc/gpulink/gpulink.toml"
    )]
    pub config: PathBuf,
    /// Print one JSON document (for scripts) instead of the human report.
    #[arg(long)]
    pub json: bool,
    /// Latency samples per endpoint (health round trips and TCP connects).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub samples: u32,
}

/// The outcome of one step (TCP, TLS, health).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Step {
    pub ok: bool,
    /// Milliseconds the step took (when it completed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the step ran at all (TLS is skipped when TCP failed).
    pub skipped: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct TlsStep {
    #[serde(flatten)]
    pub step: Step,
    /// The name the certificate was verified against.
    pub verified_name: String,
    /// The protocol the server chose by ALPN (`h2` or `http/1.1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The names the certificate carries, when verification failed on the name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub presented_names: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct HealthStep {
    #[serde(flatten)]
    pub step: Step,
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
}

/// Min / median / max over the samples, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Latency {
    pub samples: usize,
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(samples: &[Duration]) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let median = if ms.len() % 2 == 1 {
            ms[ms.len() / 2]
        } else {
            (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0
        };
        Some(Latency {
            samples: ms.len(),
            min_ms: ms[0],
            median_ms: median,
            max_ms: ms[ms.len() - 1],
        })
    }
}

/// Everything learned about one endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointReport {
    pub address: String,
    pub route: RouteKind,
    pub region: String,
    pub local: bool,
    /// Whether the migration phase lets traffic use this endpoint at all.
    pub allowed_by_phase: bool,
    /// The ENI's availability zone, when configured or discovered.
    pub zone: Option<String>,
    /// Relative to this host's zone: what zone-aware routing would make of it.
    pub locality: Locality,
    pub resolved: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialed: Option<String>,
    pub tcp: Step,
    pub tls: TlsStep,
    pub health: HealthStep,
    /// Health round trips on fresh connections (what `curl http://ip:8080/health` sees).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_latency: Option<Latency>,
    /// TCP connects to the inference port: the network round trip alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_latency: Option<Latency>,
    /// TLS verified and health passing (a full endpoint still serves, last).
    pub can_serve: bool,
    pub diagnoses: Vec<Diagnosis>,
}

/// Per-route totals for the PrivateLink-against-public comparison.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RouteSummary {
    pub endpoints: usize,
    pub can_serve: usize,
    /// Median over the route's endpoints of their health round-trip medians.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_median_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_median_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: String,
    pub phase: &'static str,
    pub samples: u32,
    /// This host's zone, as `gpulink run` would learn it (config, else IMDS).
    pub placement: HostZone,
    pub endpoints: Vec<EndpointReport>,
    pub privatelink: RouteSummary,
    pub public: RouteSummary,
    /// Positive when PrivateLink's health round trip is faster than public's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privatelink_faster_by_ms: Option<f64>,
    /// Whether at least one endpoint the phase allows can serve.
    pub can_serve: bool,
    pub verdict: String,
}

/// `gpulink probe`.
pub async fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    crate::tls::install_crypto_provider();
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("gpulink: {error}");
            return Ok(ExitCode::from(EX_CONFIG as u8));
        }
    };
    let host_zone =
        crate::placement::learn(&config.placement, &crate::placement::Imds::from_env()).await;
    let targets = Targets {
        endpoints: &config.endpoints,
        discovery: &config.discovery,
        local_region: config.local_region(),
        phase: config.migration.phase,
        upstream: &config.upstream,
        health: &config.health,
        host_zone: &host_zone,
    };
    let report = probe(targets, &args.config, args.samples).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_text(&report));
    }
    Ok(if report.can_serve {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// What `gpulink probe` probes, and how: a configuration's endpoints (listed, and found
/// through DNS or EC2) with the settings the proxy would reach them with.
#[derive(Debug, Clone, Copy)]
pub struct Targets<'a> {
    pub endpoints: &'a [EndpointConfig],
    pub discovery: &'a [Discovery],
    /// The first configured region.
    pub local_region: &'a str,
    pub phase: Phase,
    pub upstream: &'a Upstream,
    pub health: &'a Health,
    /// Where this host runs: each endpoint's locality is judged against it.
    pub host_zone: &'a HostZone,
}

/// Probes every endpoint of `targets` concurrently; `path` names the configuration in
/// the report.
pub async fn probe(targets: Targets<'_>, path: &Path, samples: u32) -> Result<Report, ProbeError> {
    let mut endpoints = targets.endpoints.to_vec();
    // Regions whose ENIs are discovered: probe every address discovery finds, as the
    // proxy would use them. A DNS name that does not resolve is probed as is, so its
    // report carries the DNS diagnosis; an EC2 discovery that fails is said on stderr
    // (`gpulink discover` diagnoses it).
    let clients = crate::upstream::discovery::Ec2Clients::default();
    for discovery in targets.discovery {
        match crate::upstream::discovery::discover(discovery, &clients).await {
            Ok(outcome) => endpoints.extend(outcome.found.iter().map(|f| discovery.endpoint(f))),
            Err(error) => match &discovery.source {
                crate::config::DiscoverySource::Dns { host } => {
                    let mut unresolved = discovery.endpoint(&crate::config::Found {
                        ip: std::net::IpAddr::from([0, 0, 0, 0]),
                        zone: None,
                        zone_alias: None,
                    });
                    unresolved.host = host.clone();
                    endpoints.push(unresolved);
                }
                crate::config::DiscoverySource::Ec2 { endpoint_id, .. } => {
                    eprintln!(
                        "region {}: cannot list the ENIs of {endpoint_id}: {error}",
                        discovery.region
                    );
                }
            },
        }
    }
    let phase = targets.phase;
    let mut tasks = tokio::task::JoinSet::new();
    for (index, endpoint) in endpoints.into_iter().enumerate() {
        let ca_files: Vec<PathBuf> = targets
            .upstream
            .ca_file
            .iter()
            .chain(endpoint.ca_file.iter())
            .cloned()
            .collect();
        let ca_refs: Vec<&Path> = ca_files.iter().map(PathBuf::as_path).collect();
        let tls = crate::tls::client_config(&ca_refs)?;
        let settings = Settings {
            connect_timeout: targets.upstream.connect_timeout.get(),
            health: targets.health.clone(),
            ca_files,
            samples: samples.max(1) as usize,
            local: endpoint.region == targets.local_region,
            allowed_by_phase: allowed(phase, endpoint.kind),
            locality: targets.host_zone.locality(&endpoint),
        };
        tasks.spawn(async move { (index, probe_endpoint(endpoint, tls, settings).await) });
    }
    let mut reports = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(report) = joined {
            reports.push(report);
        }
    }
    reports.sort_by_key(|(index, _)| *index);
    let endpoints: Vec<EndpointReport> = reports.into_iter().map(|(_, r)| r).collect();
    let privatelink = summarise(&endpoints, RouteKind::Privatelink);
    let public = summarise(&endpoints, RouteKind::Public);
    let privatelink_faster_by_ms = match (privatelink.health_median_ms, public.health_median_ms) {
        (Some(p), Some(q)) => Some(q - p),
        _ => None,
    };
    let can_serve = endpoints.iter().any(|e| e.can_serve && e.allowed_by_phase);
    let allowed_total = endpoints.iter().filter(|e| e.allowed_by_phase).count();
    let allowed_serving = endpoints
        .iter()
        .filter(|e| e.can_serve && e.allowed_by_phase)
        .count();
    let verdict = if !can_serve {
        format!(
            "FAIL: none of the {allowed_total} endpoints phase `{}` allows can serve; gpulink would answer 503 no_endpoint",
            phase.as_str()
        )
    } else if allowed_serving < allowed_total {
        format!(
            "DEGRADED: {allowed_serving} of {allowed_total} endpoints phase `{}` allows can serve; see the diagnoses",
            phase.as_str()
        )
    } else {
        format!(
            "OK: all {allowed_total} endpoints phase `{}` allows can serve",
            phase.as_str()
        )
    };
    Ok(Report {
        config: path.display().to_string(),
        phase: phase.as_str(),
        samples,
        placement: targets.host_zone.clone(),
        endpoints,
        privatelink,
        public,
        privatelink_faster_by_ms,
        can_serve,
        verdict,
    })
}

fn allowed(phase: Phase, kind: RouteKind) -> bool {
    match phase {
        Phase::Public => kind == RouteKind::Public,
        Phase::PrivatelinkOnly => kind == RouteKind::Privatelink,
        Phase::Canary | Phase::Privatelink => true,
    }
}

struct Settings {
    connect_timeout: Duration,
    health: crate::config::Health,
    ca_files: Vec<PathBuf>,
    samples: usize,
    local: bool,
    allowed_by_phase: bool,
    locality: Locality,
}

async fn probe_endpoint(
    endpoint: EndpointConfig,
    tls: Arc<rustls::ClientConfig>,
    settings: Settings,
) -> EndpointReport {
    let timeout = settings.connect_timeout;
    let mut report = EndpointReport {
        address: endpoint.authority(),
        route: endpoint.kind,
        region: endpoint.region.clone(),
        local: settings.local,
        allowed_by_phase: settings.allowed_by_phase,
        zone: endpoint.zone.as_ref().map(|zone| zone.as_str().to_string()),
        locality: settings.locality,
        resolved: Vec::new(),
        dialed: None,
        tcp: Step::default(),
        tls: TlsStep {
            verified_name: endpoint.server_name.clone(),
            ..TlsStep::default()
        },
        health: HealthStep {
            url: format!(
                "http://{}:{}{}",
                bracket(&endpoint.host),
                endpoint.health_port,
                settings.health.path
            ),
            ..HealthStep::default()
        },
        health_latency: None,
        connect_latency: None,
        can_serve: false,
        diagnoses: Vec::new(),
    };

    // 1. Resolve (an IP address needs no lookup).
    let target = match resolve(&endpoint, timeout).await {
        Ok(addrs) => {
            report.resolved = addrs.iter().map(|a| a.to_string()).collect();
            addrs.first().copied()
        }
        Err(message) => {
            report.tcp = failed(message.clone());
            report
                .diagnoses
                .push(diagnose::dns_failed(&endpoint.host, &message));
            None
        }
    };

    // 2-3. TCP, then TLS on the same connection.
    let mut tcp_failure: Option<Problem> = target.is_none().then_some(Problem::DnsFailed);
    if let Some(addr) = target {
        report.dialed = Some(addr.to_string());
        let started = Instant::now();
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                report.tcp = failed(format!("timed out after {timeout:?}"));
                tcp_failure = Some(Problem::ConnectTimeout);
                report
                    .diagnoses
                    .push(diagnose::connect_timeout(addr, timeout, &endpoint));
            }
            Ok(Err(error)) => {
                report.tcp = failed(error.to_string());
                let diagnosis = diagnose::connect_error(addr, &error, &endpoint);
                tcp_failure = Some(diagnosis.problem);
                report.diagnoses.push(diagnosis);
            }
            Ok(Ok(stream)) => {
                report.tcp = passed(started.elapsed());
                let _ = stream.set_nodelay(true);
                handshake(stream, addr, &endpoint, tls, &settings, &mut report).await;
            }
        }
        if tcp_failure.is_some() {
            report.tls.step.skipped = true;
        }
    } else {
        report.tls.step.skipped = true;
    }

    // 4. The proxy's own health check, on the health port.
    let health = health::check(&endpoint.host, endpoint.health_port, &settings.health).await;
    let mut health_samples = Vec::new();
    match &health {
        Ok(ok) => {
            report.health.step = passed(ok.latency);
            health_samples.push(ok.latency);
            report.health.status = Some(ok.document.status.clone());
            report.health.region = ok.document.region.clone();
            report.health.capacity = ok.document.available_capacity;
            report.health.timestamp = ok.document.timestamp;
            if ok.document.available_capacity == Some(0) {
                report.diagnoses.push(Diagnosis {
                    problem: Problem::NoCapacity,
                    message: format!(
                        "no capacity: {} reports available_capacity 0, so the region behind it is full; \
                         gpulink uses it only when nothing else can serve and the cluster answers 503 no_capacity meanwhile",
                        report.address
                    ),
                });
            }
            if let Some(reported) = &ok.document.region {
                if reported != &endpoint.region {
                    report.diagnoses.push(Diagnosis {
                        problem: Problem::RegionMismatch,
                        message: format!(
                            "{} reports region `{reported}` but is configured under `{}`: check that the addresses \
                             belong to the VPC endpoint of the region they are listed under",
                            report.address, endpoint.region
                        ),
                    });
                }
            }
        }
        Err(error) => {
            report.health.step = failed(error.to_string());
            if let Some(diagnosis) =
                diagnose::health_error(error, &endpoint, &report.health.url, tcp_failure)
            {
                report.diagnoses.push(diagnosis);
            }
        }
    }

    // 5. More samples: health round trips and TCP connects, one after the other so
    // they do not queue behind each other.
    if health.is_ok() {
        for _ in 1..settings.samples {
            if let Ok(ok) =
                health::check(&endpoint.host, endpoint.health_port, &settings.health).await
            {
                health_samples.push(ok.latency);
            }
        }
    }
    if let (Some(addr), true) = (target, report.tcp.ok) {
        let mut connects = Vec::new();
        if let Some(ms) = report.tcp.ms {
            connects.push(Duration::from_secs_f64(ms / 1000.0));
        }
        for _ in 1..settings.samples {
            let started = Instant::now();
            if let Ok(Ok(stream)) = tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                connects.push(started.elapsed());
                drop(stream);
            }
        }
        report.connect_latency = Latency::of(&connects);
    }
    report.health_latency = Latency::of(&health_samples);
    report.can_serve = report.tls.step.ok && report.health.step.ok;
    report
}

async fn resolve(endpoint: &EndpointConfig, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = endpoint.host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, endpoint.port)]);
    }
    match tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port)),
    )
    .await
    {
        Err(_) => Err(format!("DNS lookup timed out after {timeout:?}")),
        Ok(Err(error)) => Err(error.to_string()),
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err("resolved to no address".into())
            } else {
                Ok(addrs)
            }
        }
    }
}

async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    endpoint: &EndpointConfig,
    tls: Arc<rustls::ClientConfig>,
    settings: &Settings,
    report: &mut EndpointReport,
) {
    let timeout = settings.connect_timeout;
    let server_name = match ServerName::try_from(endpoint.server_name.clone()) {
        Ok(name) => name,
        Err(error) => {
            report.tls.step = failed(format!("invalid TLS name: {error}"));
            return;
        }
    };
    let connector = tokio_rustls::TlsConnector::from(tls);
    let started = Instant::now();
    match tokio::time::timeout(timeout, connector.connect(server_name, stream)).await {
        Err(_) => {
            report.tls.step = failed(format!("handshake timed out after {timeout:?}"));
            report.diagnoses.push(diagnose::tls_timeout(addr, timeout));
        }
        Ok(Err(error)) => {
            report.tls.step = failed(error.to_string());
            let (diagnosis, presented) =
                diagnose::tls_error(&error, addr, endpoint, &settings.ca_files);
            report.tls.presented_names = presented;
            report.diagnoses.push(diagnosis);
        }
        Ok(Ok(tls)) => {
            report.tls.step = passed(started.elapsed());
            let (_, session) = tls.get_ref();
            report.tls.alpn = session
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            report.tls.version = session.protocol_version().map(|v| format!("{v:?}"));
        }
    }
}

fn passed(elapsed: Duration) -> Step {
    Step {
        ok: true,
        ms: Some(elapsed.as_secs_f64() * 1000.0),
        error: None,
        skipped: false,
    }
}

fn failed(message: String) -> Step {
    Step {
        ok: false,
        ms: None,
        error: Some(message),
        skipped: false,
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn summarise(endpoints: &[EndpointReport], route: RouteKind) -> RouteSummary {
    let of_route: Vec<&EndpointReport> = endpoints.iter().filter(|e| e.route == route).collect();
    let median = |values: Vec<f64>| -> Option<f64> {
        let durations: Vec<Duration> = values
            .into_iter()
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
            .collect();
        Latency::of(&durations).map(|l| l.median_ms)
    };
    RouteSummary {
        endpoints: of_route.len(),
        can_serve: of_route.iter().filter(|e| e.can_serve).count(),
        health_median_ms: median(
            of_route
                .iter()
                .filter_map(|e| e.health_latency.map(|l| l.median_ms))
                .collect(),
        ),
        connect_median_ms: median(
            of_route
                .iter()
                .filter_map(|e| e.connect_latency.map(|l| l.median_ms))
                .collect(),
        ),
    }
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.1} ms"))
}

/// The human report: one block per endpoint, diagnoses under it, then the comparison.
pub fn render_text(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gpulink probe: {} (phase {}, {} endpoints, {} samples each)\n",
        report.config,
        report.phase,
        report.endpoints.len(),
        report.samples
    );
    match &report.placement.zone {
        Some(zone) => {
            let _ = writeln!(
                out,
                "this host's zone: {} (from {}); same-zone PrivateLink endpoints are preferred\n",
                zone.as_str(),
                report.placement.source.as_str()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "this host's zone: unknown{}; zone-aware routing is off\n",
                report
                    .placement
                    .note
                    .as_deref()
                    .map(|note| format!(" ({note})"))
                    .unwrap_or_default()
            );
        }
    }
    for e in &report.endpoints {
        let state = if e.can_serve {
            if e.diagnoses.iter().any(|d| d.problem == Problem::NoCapacity) {
                "FULL"
            } else {
                "OK"
            }
        } else {
            "FAIL"
        };
        let _ = writeln!(
            out,
            "{state:<4} {} {} {}{}{}{}",
            e.route.as_str(),
            e.region,
            e.address,
            if e.local { " (local region)" } else { "" },
            match (&e.zone, e.locality) {
                (Some(zone), Locality::SameZone) => format!(" zone {zone} (same zone)"),
                (Some(zone), Locality::CrossZone) => format!(" zone {zone} (other zone)"),
                (Some(zone), _) => format!(" zone {zone}"),
                (None, _) => String::new(),
            },
            if e.allowed_by_phase {
                ""
            } else {
                " (not used in this phase)"
            }
        );
        // A DNS name: show what it resolved to (an IP address is its own answer).
        if !e.resolved.is_empty()
            && (e.resolved.len() > 1 || e.dialed.as_deref() != Some(e.address.as_str()))
        {
            let _ = writeln!(out, "     resolved: {}", e.resolved.join(", "));
        }
        let tcp = if e.tcp.ok {
            format!("ok {}", ms(e.tcp.ms))
        } else {
            format!("FAILED ({})", e.tcp.error.as_deref().unwrap_or("?"))
        };
        let _ = writeln!(out, "     tcp     {tcp}");
        let tls = if e.tls.step.skipped {
            "skipped".to_string()
        } else if e.tls.step.ok {
            format!(
                "ok {}, verified `{}`, ALPN {}, {}",
                ms(e.tls.step.ms),
                e.tls.verified_name,
                e.tls.alpn.as_deref().unwrap_or("none"),
                e.tls.version.as_deref().unwrap_or("?")
            )
        } else {
            format!(
                "FAILED verifying `{}` ({})",
                e.tls.verified_name,
                e.tls.step.error.as_deref().unwrap_or("?")
            )
        };
        let _ = writeln!(out, "     tls     {tls}");
        let health = if e.health.step.ok {
            format!(
                "{} {}, capacity {}, region {}",
                e.health.status.as_deref().unwrap_or("?"),
                ms(e.health.step.ms),
                e.health
                    .capacity
                    .map_or_else(|| "unknown".to_string(), |c| c.to_string()),
                e.health.region.as_deref().unwrap_or("?")
            )
        } else {
            format!("FAILED ({})", e.health.step.error.as_deref().unwrap_or("?"))
        };
        let _ = writeln!(out, "     health  {health}  [{}]", e.health.url);
        if let Some(l) = e.health_latency {
            let _ = writeln!(
                out,
                "     latency health median {:.1} ms (min {:.1}, max {:.1}, {} samples)",
                l.median_ms, l.min_ms, l.max_ms, l.samples
            );
        }
        if let Some(l) = e.connect_latency {
            let _ = writeln!(
                out,
                "             tcp connect median {:.2} ms (min {:.2}, max {:.2})",
                l.median_ms, l.min_ms, l.max_ms
            );
        }
        for d in &e.diagnoses {
            let tag = if d.problem.is_warning() {
                "warning"
            } else {
                "problem"
            };
            let _ = writeln!(out, "     -> {tag}: {}", d.message);
        }
        out.push('\n');
    }
    let _ = writeln!(out, "PrivateLink against public:");
    for (name, s) in [
        ("privatelink", &report.privatelink),
        ("public", &report.public),
    ] {
        let _ = writeln!(
            out,
            "  {name:<12} {}/{} can serve; health round trip median {}, tcp connect median {}",
            s.can_serve,
            s.endpoints,
            ms(s.health_median_ms),
            ms(s.connect_median_ms)
        );
    }
    let public_ms = report.public.health_median_ms.unwrap_or(0.0);
    if let Some(delta) = report.privatelink_faster_by_ms {
        // Below a millisecond or 5 %, the samples cannot tell the two apart.
        if delta.abs() < (public_ms * 0.05).max(1.0) {
            let _ = writeln!(
                out,
                "  PrivateLink and public are about the same ({delta:+.1} ms)"
            );
        } else if delta > 0.0 {
            let _ = writeln!(out, "  PrivateLink is {delta:.1} ms faster than public");
        } else {
            let _ = writeln!(
                out,
                "  PrivateLink is {:.1} ms SLOWER than public: check that the ENIs are in this host's AZ and region (guide: High latency over PrivateLink)",
                -delta
            );
        }
    }
    let _ = writeln!(out, "\n{}", report.verdict);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary() {
        let l = Latency::of(&[
            Duration::from_millis(3),
            Duration::from_millis(1),
            Duration::from_millis(2),
        ])
        .unwrap();
        assert_eq!((l.min_ms, l.median_ms, l.max_ms), (1.0, 2.0, 3.0));
        assert!(Latency::of(&[]).is_none());
    }
}
