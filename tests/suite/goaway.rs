//! Requests the cluster never processed are retried, and only those: HTTP/2 connection
//! rotation by a real nginx (GOAWAY after `keepalive_requests`), and ENIs killed and
//! configurations reloaded, under concurrent load. Every test counts failed requests
//! and deliveries on the cluster's side; none asserts on time.

use crate::prom;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use crate::reliability::{set_sim_state, CertFault, Pki};
use gpulink::config::Config;
use gpulink::seal::{KeyService, KmsKeys};

/// What a load run saw: answers by outcome, the failures' bodies, and the request ids.
#[derive(Default)]
struct Outcome {
    ok: u64,
    /// (request id, status and body) of each failed request.
    failures: Vec<(String, String)>,
    ids: Vec<String>,
}

/// Sends `total` requests with `concurrency` workers, each with its own request id.
async fn load(
    client: &HttpClient,
    url: &str,
    prefix: &str,
    total: u64,
    concurrency: usize,
) -> Outcome {
    let next = Arc::new(AtomicU64::new(0));
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, prefix) = (client.clone(), url.to_string(), prefix.to_string());
        let (next, outcome) = (next.clone(), outcome.clone());
        workers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= total {
                    break;
                }
                let id = format!("{prefix}-{n}");
                let reply = send(
                    &client,
                    "POST",
                    &url,
                    GUIDE_REQUEST.into(),
                    &[("x-request-id", &id)],
                )
                .await;
                let mut o = outcome.lock().expect("outcome");
                if reply.status == 200 {
                    o.ok += 1;
                } else {
                    let text = format!("{} {}", reply.status, String::from_utf8_lossy(&reply.body));
                    o.failures.push((id.clone(), text));
                }
                o.ids.push(id);
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.expect("worker");
    }
    Arc::try_unwrap(outcome)
        .ok()
        .expect("workers done")
        .into_inner()
        .expect("outcome")
}

/// Failures grouped by message (addresses left out) and by how many times the cluster
/// received the request, most frequent first.
fn kinds(sim: &gpulink_sim::Sim, failures: &[(String, String)]) -> Vec<(usize, String)> {
    let mut by_kind = std::collections::BTreeMap::<String, usize>::new();
    for (id, failure) in failures {
        let mut kind: String = failure
            .split_whitespace()
            .filter(|w| !w.starts_with("127."))
            .collect::<Vec<_>>()
            .join(" ");
        kind.push_str(&format!(" [delivered {}]", sim.deliveries(id)));
        *by_kind.entry(kind).or_default() += 1;
    }
    let mut kinds: Vec<(usize, String)> = by_kind.into_iter().map(|(k, n)| (n, k)).collect();
    kinds.sort_by(|a, b| b.cmp(a));
    kinds
}

/// The cluster received each request exactly once: nothing lost on its side, nothing
/// replayed.
fn assert_delivered_once(sim: &gpulink_sim::Sim, ids: &[String]) {
    let wrong: Vec<(String, u64)> = ids
        .iter()
        .map(|id| (id.clone(), sim.deliveries(id)))
        .filter(|(_, n)| *n != 1)
        .take(10)
        .collect();
    assert!(wrong.is_empty(), "deliveries != 1: {wrong:?}");
}

// ---- nginx as the cluster's TLS + HTTP/2 front --------------------------------------

/// A TLS name the front's certificate carries (and the proxy verifies).
const FRONT_NAME: &str = "gpu-cluster.yourcompany.internal";

/// A CA and a leaf for the nginx front, made for this test: (CA, certificate, key).
fn front_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let pki = Pki::new(dir);
    let (cert, key) = pki.leaf(CertFault::None);
    let (cert_file, key_file) = (dir.join("front.pem"), dir.join("front.key"));
    std::fs::write(&cert_file, cert).expect("write leaf");
    std::fs::write(&key_file, key).expect("write key");
    (pki.ca_file, cert_file, key_file)
}

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nginx is not installed: run scripts/test.sh, which installs Debian's nginx-light")
}

/// nginx in the foreground, with its own prefix, stopped (and reaped) on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, conf: &str) -> Nginx {
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        let conf_file = dir.join("nginx.conf");
        std::fs::write(&conf_file, conf).expect("write nginx.conf");
        // nginx with this prefix, error log and configuration, then `extra`.
        let nginx = |extra: &[&str]| {
            let mut command = Command::new(nginx_binary());
            command
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("logs/error.log"))
                .arg("-c")
                .arg(&conf_file)
                .args(extra);
            command
        };
        let test = nginx(&["-t"]).output().expect("nginx -t runs");
        assert_success(&test, "nginx rejects the test's configuration");
        let child = nginx(&["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        Nginx {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two nginx fronts (two addresses, as two ENIs would be) terminating TLS with HTTP/2,
/// rotating each connection after `keepalive_requests` requests, and proxying over
/// verified TLS to the simulator's three ENIs.
fn nginx_conf(
    dir: &Path,
    fronts: &[IpAddr],
    enis: &[IpAddr],
    cert: &Path,
    key: &Path,
    sim_ca: &Path,
) -> String {
    // One directive line per address, `{ip}` replaced, indented for the blocks below.
    let per_ip = |ips: &[IpAddr], directive: &str| -> String {
        ips.iter()
            .map(|ip| format!("        {};\n", directive.replace("{ip}", &ip.to_string())))
            .collect()
    };
    let listens = per_ip(fronts, "listen {ip}:8443 ssl http2");
    let servers = per_ip(enis, "server {ip}:8443");
    let health_listens = per_ip(fronts, "listen {ip}:8080");
    let health_servers = per_ip(enis, "server {ip}:8080");
    format!(
        r#"
# One process, so that killing it leaves no worker holding the ports.
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    upstream sim {{
{servers}        keepalive 16;
    }}
    upstream sim_health {{
{health_servers}    }}
    server {{
{health_listens}        location / {{
            proxy_pass http://sim_health;
        }}
    }}
    server {{
{listens}        server_name {name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        keepalive_requests 5;
        location / {{
            proxy_pass https://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {sim_ca};
            proxy_ssl_name {name};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"#,
        dir = dir.display(),
        name = FRONT_NAME,
        cert = cert.display(),
        key = key.display(),
        sim_ca = sim_ca.display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_rotating_http2_connections_costs_no_request() {
    let cluster = Cluster::start(next_block()).await;
    let dir = cluster.dir.path();
    let (front_ca, cert, key) = front_pki(dir);
    let fronts = [cluster.layout.ip(30, 1), cluster.layout.ip(31, 1)];
    let nginx_dir = dir.join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    // nginx drops root when it runs as root; it must still reach its directories.
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [dir, nginx_dir.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
    }
    let conf = nginx_conf(
        &nginx_dir,
        &fronts,
        &cluster.layout.enis(),
        &cert,
        &key,
        &cluster.sim.ca_file(),
    );
    let nginx = Nginx::start(&nginx_dir, &conf);
    for ip in fronts {
        wait_for_listener((ip, 8443).into(), Duration::from_secs(20)).await;
    }

    let fronts_authorities: Vec<String> = fronts.iter().map(|ip| format!("{ip}:8443")).collect();
    let regions =
        vec![serde_json::json!({ "name": "us-east-1", "privatelink": fronts_authorities })];
    let options = ProxyOptions::default()
        .set("kms.format", "aws-esdk")
        .set("upstream.server_name", FRONT_NAME)
        .set("upstream.connect_timeout", "2s")
        .set("upstream.request_timeout", "20s")
        // Checks through nginx as the defaults have them: a front under this load must
        // not drop out on one slow answer.
        .set("health.interval", "500ms")
        .set("health.timeout", "1s")
        .set("health.healthy_threshold", 2)
        .set("health.unhealthy_threshold", 2)
        .set("migration.phase", "privatelink-only");
    let text = toml_text(&config_with_regions(
        regions,
        &cluster.moto.url,
        &cluster.key_arn,
        &front_ca,
        &options,
    ));
    let config = Config::from_toml(&text, Path::new("nginx.toml")).expect("config");
    let keys = KmsKeys::new("us-east-1", Some(&cluster.moto.url), Duration::from_secs(3)).await;
    let proxy = gpulink::proxy::start(config, KeyService::Kms(keys))
        .await
        .expect("proxy starts");
    let client = http_client();
    let url = format!("http://{}/inference", proxy.listen_addr);

    let outcome = load(&client, &url, "nginx", 400, 16).await;
    let metrics = prom::scrape(proxy.admin_addr).await;
    let goaway = metrics.sum(
        "gpulink_upstream_unprocessed_total",
        &[("reason", "goaway")],
    );
    let retries = metrics.sum("gpulink_upstream_retries_total", &[]);
    // Failures as passive outlier detection counts them.
    let endpoint_failures: u64 = proxy
        .proxy()
        .current()
        .endpoints
        .iter()
        .map(|e| e.failures())
        .sum();
    assert!(
        outcome.failures.is_empty(),
        "{} of 400 failed ({} ok): {:#?}\nhealth: {:?}\nnginx: {}",
        outcome.failures.len(),
        outcome.ok,
        kinds(&cluster.sim, &outcome.failures),
        proxy
            .proxy()
            .current()
            .endpoints
            .iter()
            .map(|e| e.health_snapshot().last_error)
            .collect::<Vec<_>>(),
        nginx
            .error_log()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert_eq!(outcome.ok, 400);
    assert_delivered_once(&cluster.sim, &outcome.ids);
    // nginx did rotate connections under the load, and gpulink met the GOAWAYs: it
    // retried what nginx never processed, and no front was ejected for it.
    assert!(
        goaway > 0.0,
        "no request met a GOAWAY: the test did not exercise rotation"
    );
    assert!(
        retries >= goaway,
        "retries {retries} < GOAWAY refusals {goaway}"
    );
    assert_eq!(
        endpoint_failures, 0,
        "GOAWAY refusals counted as endpoint (outlier) failures"
    );

    proxy.shutdown().await;
    drop(nginx);
    cluster.sim.shutdown().await;
}

// ---- ENI kills and reloads under load -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eni_kills_and_reloads_under_load_replay_nothing_and_retry_every_refusal() {
    // 3,000 requests through 51 kill and reload rounds load the machine: no other test's
    // health checks should time out because of it, nor this one's because of another.
    let _alone = alone().await;
    let world = World::with(
        ProxyOptions::default()
            .set("kms.format", "aws-esdk")
            .set("migration.phase", "privatelink-only")
            .remote_region(),
    )
    .await;
    let enis = world.layout.enis();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Faults while the load runs: each ENI in turn killed (ports closed, connections
    // shut down with GOAWAY) and brought back; configuration reloads in between, one
    // that keeps every endpoint and one that replaces them all (new pools).
    let faults = {
        let stop = stop.clone();
        let sim_ips = enis;
        let proxy = world.proxy().proxy().clone();
        let control = world.sim.control_addr();
        let base = proxy.current().config.clone();
        tokio::spawn(async move {
            let mut rounds = 0u64;
            let http = http_client();
            while !stop.load(Ordering::SeqCst) {
                let ip = sim_ips[(rounds % 3) as usize];
                set_sim_state(&http, control, ip, r#"{"state":"down"}"#).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
                let mut config = (*base).clone();
                if rounds % 2 == 1 {
                    // A changed connect_timeout makes every endpoint new.
                    config.upstream.connect_timeout =
                        gpulink::config::HumanDuration::from_millis(1500 + rounds);
                }
                proxy.reload(config).await.expect("reload");
                set_sim_state(&http, control, ip, r#"{"state":"healthy"}"#).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
                rounds += 1;
            }
            rounds
        })
    };
    let outcome = load(&world.client, &world.url("/inference"), "fault", 3000, 24).await;
    stop.store(true, Ordering::SeqCst);
    let rounds = faults.await.expect("faults");
    assert!(
        rounds >= 2,
        "only {rounds} fault rounds ran during the load"
    );
    // Every refusal the cluster made (GOAWAY of a draining connection, REFUSED_STREAM
    // of an endpoint going down) was retried. The only failure tolerated is a stream
    // that ended without any answer because its connection closed: ambiguous to any
    // client, so never replayed. (The simulator used to cause those by dropping
    // connections still sniffing their protocol at shutdown; it now serves the ALPN
    // protocol, and measured runs show none.)
    let unexpected: Vec<&(String, String)> = outcome
        .failures
        .iter()
        .filter(|(id, text)| {
            world.sim.deliveries(id) != 0
                || !text.starts_with("502 ")
                || !(text.contains("close_notify") || text.contains("connection closed"))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "{} of 3000 failed over {rounds} kill/reload rounds, {} unexpectedly: {:#?}",
        outcome.failures.len(),
        unexpected.len(),
        kinds(&world.sim, &outcome.failures)
    );
    eprintln!(
        "{} of 3000 requests failed over {rounds} kill/reload rounds: {:?}",
        outcome.failures.len(),
        kinds(&world.sim, &outcome.failures)
    );
    // Nothing replayed: each request reached the cluster at most once, each success
    // exactly once.
    let failed: std::collections::HashSet<&str> =
        outcome.failures.iter().map(|(id, _)| id.as_str()).collect();
    let served: Vec<String> = outcome
        .ids
        .iter()
        .filter(|id| !failed.contains(id.as_str()))
        .cloned()
        .collect();
    assert_delivered_once(&world.sim, &served);
    world.stop().await;
}
