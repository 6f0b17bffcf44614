//! Healthy means requests can flow: the inference port broken while `/health` still says
//! healthy (filtered, refused, a wrong port, an untrusted CA, a wrong server name), each
//! with another tier that works. gpulink must learn it (data-path checks, or a request's
//! own connect failure), serve every request from the other tier meanwhile (a not-sent
//! failure takes the endpoint out at once and the last attempt falls through to the
//! next tier, so the bound on failed app requests is **zero**), keep the broken
//! endpoints out while broken, say why in `/status`, the page and the metrics, and take
//! them back once fixed.
//!
//! Real parts: moto as KMS, the simulator's real TLS sockets, real certificates. Every
//! wait polls a state with a deadline; nothing asserts on time.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use gpulink::config::Config;
use gpulink::proxy::ProxyHandle;
use gpulink::seal::{KeyService, KmsKeys};
use gpulink_sim::EndpointState;
use serde_json::Value;

/// moto, the simulator and a proxy whose configuration file the test writes (so that a
/// reload can fix what the first one broke).
struct Bench {
    cluster: Cluster,
    proxy: ProxyHandle,
    config_path: PathBuf,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

/// The proxy configuration around `regions` (the `[[regions]]` tables) and `phase`.
fn config_text(
    cluster: &Cluster,
    upstream_ca: bool,
    interval: &str,
    phase: &str,
    regions: &str,
) -> String {
    let ca = if upstream_ca {
        format!("ca_file = \"{}\"", cluster.sim.ca_file().display())
    } else {
        String::new()
    };
    format!(
        r#"
[listen]
address = "127.0.0.1:0"
drain_delay = "0s"
shutdown_grace = "5s"

[admin]
address = "127.0.0.1:0"

[tenant]
id = "tenant-123"
model_pool = "model-a"

[kms]
key_id = "{key}"
region = "us-east-1"
format = "kms-direct"
timeout = "3s"
endpoint_url = "{kms}"

[upstream]
server_name = "gpu-cluster.yourcompany.internal"
{ca}
connect_timeout = "1s"
request_timeout = "10s"

[health]
interval = "{interval}"
timeout = "500ms"
healthy_threshold = 1
unhealthy_threshold = 1

[retry]
max_attempts = 3

{regions}

[migration]
phase = "{phase}"
"#,
        key = cluster.key_arn,
        kms = cluster.moto.url,
    )
}

impl Bench {
    async fn start(cluster: Cluster, text: String) -> Bench {
        let config_path = cluster.dir.path().join("gpulink.toml");
        std::fs::write(&config_path, &text).expect("write config");
        let config = Config::load(&config_path).expect("valid config");
        let keys = KmsKeys::new("us-east-1", Some(&cluster.moto.url), Duration::from_secs(3)).await;
        let options = gpulink::proxy::StartOptions {
            random_seed: Some(test_seed()),
            ..Default::default()
        };
        let proxy = gpulink::proxy::start_with(config, KeyService::Kms(keys), options)
            .await
            .expect("proxy starts");
        Bench {
            cluster,
            proxy,
            config_path,
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        }
    }

    /// Writes a new configuration and applies it as SIGHUP would.
    async fn reload(&self, text: String) {
        std::fs::write(&self.config_path, text).expect("write config");
        self.proxy
            .proxy()
            .reload_from_file(&self.config_path)
            .await
            .expect("reload applies");
    }

    async fn post(&self) -> Reply {
        let url = format!("http://{}/inference", self.proxy.listen_addr);
        send(&self.client, "POST", &url, GUIDE_REQUEST.into(), &[]).await
    }

    async fn admin(&self, path: &str) -> Reply {
        let url = format!("http://{}{}", self.proxy.admin_addr, path);
        send(&self.client, "GET", &url, Vec::new(), &[]).await
    }

    async fn status(&self) -> Value {
        self.admin("/status").await.json()
    }

    /// `/status`'s entry for `address`.
    async fn endpoint(&self, address: &str) -> Value {
        let status = self.status().await;
        status["endpoints"]
            .as_array()
            .and_then(|all| all.iter().find(|e| e["address"] == address).cloned())
            .unwrap_or_else(|| panic!("{address} is not in /status: {status}"))
    }

    /// Polls `/status` until `condition` holds for every one of `addresses`.
    async fn wait_for(&self, addresses: &[String], what: &str, condition: impl Fn(&Value) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut all = true;
            for address in addresses {
                all &= condition(&self.endpoint(address).await);
            }
            if all {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let mut last = Vec::new();
                for address in addresses {
                    last.push(self.endpoint(address).await);
                }
                panic!("never {what}: {last:#?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends `total` requests, `concurrency` at a time; returns the `X-Gpulink-Endpoint`
    /// of each success and the number of failures.
    async fn load(&self, total: u64, concurrency: usize) -> (Vec<String>, u64) {
        let next = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let served = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let url = format!("http://{}/inference", self.proxy.listen_addr);
            let client = self.client.clone();
            let (next, failed, served) = (next.clone(), failed.clone(), served.clone());
            workers.spawn(async move {
                while next.fetch_add(1, Ordering::SeqCst) < total {
                    let reply = send(&client, "POST", &url, GUIDE_REQUEST.into(), &[]).await;
                    if reply.status == 200 {
                        let endpoint = reply
                            .header("x-gpulink-endpoint")
                            .unwrap_or("?")
                            .to_string();
                        served.lock().expect("lock").push(endpoint);
                    } else {
                        eprintln!(
                            "failed: {} {}",
                            reply.status,
                            String::from_utf8_lossy(&reply.body)
                        );
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        while workers.join_next().await.is_some() {}
        let served = served.lock().expect("lock").clone();
        (served, failed.load(Ordering::SeqCst))
    }

    /// The metrics as the official Prometheus client parses them.
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let body = self.admin("/metrics").await.body;
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/parse_metrics.py"
        );
        let mut child = std::process::Command::new(venv_bin("python"))
            .args([script, "text"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect(".venv/bin/python (scripts/test.sh installs prometheus_client)");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&body)
            .expect("write");
        let output = child.wait_with_output().expect("parser runs");
        assert!(output.status.success(), "the parser rejected /metrics");
        let parsed: Value = serde_json::from_slice(&output.stdout).expect("parser JSON");
        parsed["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .filter(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k].as_str() == Some(*v)))
            .map(|s| s[2].as_f64().unwrap_or(0.0))
            .sum()
    }

    async fn stop(self) {
        self.proxy.shutdown().await;
        self.cluster.sim.shutdown().await;
    }
}

fn addresses(ips: &[IpAddr], port: u16) -> Vec<String> {
    ips.iter().map(|ip| format!("{ip}:{port}")).collect()
}

fn list(addresses: &[String]) -> String {
    addresses
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What every broken endpoint must show while broken: out of service because of its
/// data path (the health port still says healthy), with `problem` and a diagnosis that
/// contains each of `words`; the gauge at 0 and the failing check named in the metrics.
async fn assert_out_for_data_path(bench: &Bench, broken: &[String], problem: &str, words: &[&str]) {
    for address in broken {
        let e = bench.endpoint(address).await;
        assert_eq!(e["serving"], false, "{e:#}");
        assert_eq!(e["data_path"]["state"], "failed", "{e:#}");
        assert_eq!(e["data_path"]["problem"], problem, "{e:#}");
        assert_eq!(
            e["failing_checks"],
            serde_json::json!(["data_path"]),
            "{e:#}"
        );
        let diagnosis = e["data_path"]["diagnosis"].as_str().unwrap_or("");
        for word in words {
            assert!(diagnosis.contains(word), "`{word}` not in: {diagnosis}");
        }
        let labels = [("endpoint", address.as_str())];
        assert_eq!(
            bench
                .metric("gpulink_endpoint_data_path_healthy", &labels)
                .await,
            0.0
        );
        assert_eq!(bench.metric("gpulink_endpoint_healthy", &labels).await, 1.0);
        assert_eq!(bench.metric("gpulink_endpoint_serving", &labels).await, 0.0);
        assert_eq!(
            bench
                .metric(
                    "gpulink_endpoint_check_failing",
                    &[
                        ("endpoint", address.as_str()),
                        ("check", "data_path"),
                        ("problem", problem)
                    ]
                )
                .await,
            1.0
        );
    }
    let page = String::from_utf8_lossy(&bench.admin("/").await.body).into_owned();
    assert!(
        page.contains("data-path=\"failed\""),
        "the page does not show the data path"
    );
    assert!(
        page.contains(words[0]),
        "the page lacks the diagnosis `{}`",
        words[0]
    );
}

fn assert_all_in(served: &[String], allowed: &[String], what: &str) {
    for endpoint in served {
        assert!(
            allowed.contains(endpoint),
            "{what}: served by {endpoint}, not by {allowed:?}"
        );
    }
}

/// :443 filtered (connects time out) while :8080 answers healthy, broken under a running
/// proxy; the other region's PrivateLink carries everything; the fix is on the cluster
/// side and gpulink notices by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_443_while_8080_answers_falls_through_to_the_other_region() {
    let cluster = Cluster::start(next_block()).await;
    let local_ips = cluster.layout.enis();
    let local = addresses(&local_ips, 8443);
    let remote = addresses(&[cluster.layout.remote_eni()], 8443);
    let regions = format!(
        "[[regions]]\nname = \"us-east-1\"\nprivatelink = [{}]\n[[regions]]\nname = \"us-west-2\"\nprivatelink = [{}]\n",
        list(&local),
        list(&remote)
    );
    let text = config_text(&cluster, true, "300ms", "privatelink-only", &regions);
    let bench = Bench::start(cluster, text).await;
    bench
        .wait_for(&local, "serving at start", |e| e["serving"] == true)
        .await;

    for ip in local_ips {
        bench
            .cluster
            .sim
            .set_state(ip, EndpointState::InferenceFiltered)
            .await
            .expect("state");
    }
    // Whether a check or a request learns it first, no app request may fail.
    let (served, failed) = bench.load(24, 3).await;
    assert_eq!(
        failed, 0,
        "requests failed while gpulink learned a filtered :443"
    );
    assert_eq!(served.len(), 24);
    assert_all_in(&served, &remote, "while the local tier is filtered");

    bench
        .wait_for(&local, "out for the data path", |e| {
            e["data_path"]["state"] == "failed"
        })
        .await;
    assert_out_for_data_path(
        &bench,
        &local,
        "connect_timeout",
        &["timed out", "security group"],
    )
    .await;
    for address in &local {
        assert_eq!(bench.endpoint(address).await["health"], "healthy");
    }
    assert_eq!(
        bench
            .metric(
                "gpulink_endpoint_data_path_healthy",
                &[("endpoint", &remote[0])]
            )
            .await,
        1.0
    );

    // They stay out while broken: many checks later, everything still goes remote.
    let (served, failed) = bench.load(20, 2).await;
    assert_eq!(failed, 0);
    assert_all_in(&served, &remote, "while the local tier stays filtered");

    for ip in local_ips {
        bench
            .cluster
            .sim
            .set_state(ip, EndpointState::Healthy)
            .await
            .expect("state");
    }
    bench
        .wait_for(&local, "back in service", |e| e["serving"] == true)
        .await;
    let (served, failed) = bench.load(20, 2).await;
    assert_eq!(failed, 0);
    assert_all_in(&served, &local, "once the local tier is fixed");
    bench.stop().await;
}

/// :443 refused while :8080 answers healthy; phase `privatelink` falls back to public.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_443_while_8080_answers_falls_through_to_public() {
    let cluster = Cluster::start(next_block()).await;
    let local_ips = cluster.layout.enis();
    let local = addresses(&local_ips, 8443);
    let public = addresses(&[cluster.layout.public()], 8443);
    let regions = format!(
        "[[regions]]\nname = \"us-east-1\"\nprivatelink = [{}]\npublic = [{{ address = \"{}\", server_name = \"gpu-cluster.public.example.com\" }}]\n",
        list(&local),
        public[0]
    );
    let text = config_text(&cluster, true, "300ms", "privatelink", &regions);
    let bench = Bench::start(cluster, text).await;
    bench
        .wait_for(&local, "serving at start", |e| e["serving"] == true)
        .await;

    for ip in local_ips {
        bench
            .cluster
            .sim
            .set_state(ip, EndpointState::InferenceRefused)
            .await
            .expect("state");
    }
    let (served, failed) = bench.load(24, 3).await;
    assert_eq!(
        failed, 0,
        "requests failed while gpulink learned a refused :443"
    );
    assert_all_in(&served, &public, "while the local tier refuses");
    bench
        .wait_for(&local, "out for the data path", |e| {
            e["data_path"]["state"] == "failed"
        })
        .await;
    assert_out_for_data_path(
        &bench,
        &local,
        "connect_refused",
        &["connection refused", "port"],
    )
    .await;

    for ip in local_ips {
        bench
            .cluster
            .sim
            .set_state(ip, EndpointState::Healthy)
            .await
            .expect("state");
    }
    bench
        .wait_for(&local, "back in service", |e| e["serving"] == true)
        .await;
    let (served, failed) = bench.load(20, 2).await;
    assert_eq!(failed, 0);
    assert_all_in(&served, &local, "once the local tier is fixed");
    bench.stop().await;
}

/// The ENIs configured on the health port instead of the TLS port: TCP connects, TLS
/// cannot. Fixed by a reload with the right port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_port_is_out_with_a_tls_diagnosis_until_a_reload_fixes_it() {
    let cluster = Cluster::start(next_block()).await;
    let local_ips = cluster.layout.enis();
    let wrong = addresses(&local_ips, 8080);
    let right = addresses(&local_ips, 8443);
    let remote = addresses(&[cluster.layout.remote_eni()], 8443);
    let regions = |local: &[String]| {
        format!(
            "[[regions]]\nname = \"us-east-1\"\nprivatelink = [{}]\n[[regions]]\nname = \"us-west-2\"\nprivatelink = [{}]\n",
            list(local),
            list(&remote)
        )
    };
    let text = config_text(
        &cluster,
        true,
        "300ms",
        "privatelink-only",
        &regions(&wrong),
    );
    let fixed_text = config_text(
        &cluster,
        true,
        "300ms",
        "privatelink-only",
        &regions(&right),
    );
    let bench = Bench::start(cluster, text).await;
    out_until_a_reload_fixes_it(
        bench,
        Mistake {
            what: "on a wrong port",
            serving_meanwhile: &remote,
            broken: &wrong,
            problem: "tls_failed",
            words: &["TLS handshake", "may not speak TLS"],
            fixed_text,
            fixed: &right,
        },
    )
    .await;
}

/// A configuration mistake in the local tier and its fix by reload.
struct Mistake<'a> {
    /// How the local tier is wrong, for the assertion messages.
    what: &'a str,
    /// The endpoints that must carry every request while the mistake stands.
    serving_meanwhile: &'a [String],
    broken: &'a [String],
    /// The data-path problem code `/status` must give, and words its diagnosis contains.
    problem: &'a str,
    words: &'a [&'a str],
    fixed_text: String,
    /// The endpoints that serve every request after the fix.
    fixed: &'a [String],
}

/// The story every configuration mistake shares: the other tier serves every request,
/// the broken endpoints are out for their data path with the right diagnosis, and after
/// a reload with the fix the local tier serves everything again.
async fn out_until_a_reload_fixes_it(bench: Bench, mistake: Mistake<'_>) {
    let what = mistake.what;
    let (served, failed) = bench.load(20, 2).await;
    assert_eq!(failed, 0, "requests failed with the local tier {what}");
    assert_all_in(
        &served,
        mistake.serving_meanwhile,
        &format!("while the local tier is {what}"),
    );
    bench
        .wait_for(mistake.broken, "out for the data path", |e| {
            e["data_path"]["state"] == "failed"
        })
        .await;
    assert_out_for_data_path(&bench, mistake.broken, mistake.problem, mistake.words).await;

    bench.reload(mistake.fixed_text).await;
    bench
        .wait_for(mistake.fixed, "serving after the reload", |e| {
            e["serving"] == true
        })
        .await;
    let (served, failed) = bench.load(20, 2).await;
    assert_eq!(failed, 0);
    assert_all_in(
        &served,
        mistake.fixed,
        &format!("once the local tier is no longer {what}"),
    );
    bench.stop().await;
}

/// A self-signed CA that did not sign the cluster's certificate.
fn write_wrong_ca(path: &Path) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "not the cluster's CA");
    let cert = params.self_signed(&key).expect("self-signed");
    std::fs::write(path, cert.pem()).expect("write CA");
}

/// The local ENIs trust the wrong CA file (the other region trusts the right one): out
/// with "untrusted CA" until a reload names the right file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_out_with_its_diagnosis_until_a_reload_fixes_it() {
    let cluster = Cluster::start(next_block()).await;
    let wrong_ca = cluster.dir.path().join("wrong-ca.pem");
    write_wrong_ca(&wrong_ca);
    let right_ca = cluster.sim.ca_file();
    let local = addresses(&cluster.layout.enis(), 8443);
    let remote = addresses(&[cluster.layout.remote_eni()], 8443);
    let regions = |ca: &Path| {
        let entry = |a: &String, ca: &Path| {
            format!("{{ address = \"{a}\", ca_file = \"{}\" }}", ca.display())
        };
        format!(
            "[[regions]]\nname = \"us-east-1\"\nprivatelink = [{}]\n[[regions]]\nname = \"us-west-2\"\nprivatelink = [{}]\n",
            local.iter().map(|a| entry(a, ca)).collect::<Vec<_>>().join(", "),
            entry(&remote[0], &right_ca)
        )
    };
    let text = config_text(
        &cluster,
        false,
        "300ms",
        "privatelink-only",
        &regions(&wrong_ca),
    );
    let fixed_text = config_text(
        &cluster,
        false,
        "300ms",
        "privatelink-only",
        &regions(&right_ca),
    );
    let bench = Bench::start(cluster, text).await;
    out_until_a_reload_fixes_it(
        bench,
        Mistake {
            what: "trusting a wrong CA",
            serving_meanwhile: &remote,
            broken: &local,
            problem: "tls_unknown_ca",
            words: &["untrusted CA", "ca_file"],
            fixed_text,
            fixed: &local,
        },
    )
    .await;
}

/// The local ENIs verify a name the cluster's certificate does not carry; public serves
/// (phase `privatelink`) until a reload drops the wrong `server_name`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_server_name_is_out_with_its_diagnosis_until_a_reload_fixes_it() {
    let cluster = Cluster::start(next_block()).await;
    let local = addresses(&cluster.layout.enis(), 8443);
    let public = addresses(&[cluster.layout.public()], 8443);
    let regions = |name: Option<&str>| {
        let entry = |a: &String| match name {
            Some(name) => format!("{{ address = \"{a}\", server_name = \"{name}\" }}"),
            None => format!("\"{a}\""),
        };
        format!(
            "[[regions]]\nname = \"us-east-1\"\nprivatelink = [{}]\npublic = [{{ address = \"{}\", server_name = \"gpu-cluster.public.example.com\" }}]\n",
            local.iter().map(entry).collect::<Vec<_>>().join(", "),
            public[0]
        )
    };
    let text = config_text(
        &cluster,
        true,
        "300ms",
        "privatelink",
        &regions(Some("gpu-cluster.wrong.internal")),
    );
    let bench = Bench::start(cluster, text).await;
    let (served, failed) = bench.load(20, 2).await;
    assert_eq!(
        failed, 0,
        "requests failed with a wrong server name on the local tier"
    );
    assert_all_in(
        &served,
        &public,
        "while the local tier has a wrong server name",
    );
    bench
        .wait_for(&local, "out for the data path", |e| {
            e["data_path"]["state"] == "failed"
        })
        .await;
    assert_out_for_data_path(
        &bench,
        &local,
        "tls_wrong_name",
        &["wrong server name", "gpu-cluster.wrong.internal"],
    )
    .await;

    let text = config_text(&bench.cluster, true, "300ms", "privatelink", &regions(None));
    bench.reload(text).await;
    bench
        .wait_for(&local, "serving after the reload", |e| e["serving"] == true)
        .await;
    let (served, failed) = bench.load(20, 2).await;
    assert_eq!(failed, 0);
    assert_all_in(&served, &local, "once the name is fixed");
    bench.stop().await;
}

/// No check runs during this test (`health.interval` is a minute), so only the request
/// path can learn: the first request after :443 broke tries two local ENIs (each connect
/// refused takes that ENI out at once), and its last attempt falls through to the other
/// region instead of the third local ENI. It and every later request are served; the
/// endpoints tried show the request's error and `failed_by: request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_learns_a_broken_tier_and_is_served_by_the_next() {
    let cluster = Cluster::start(next_block()).await;
    let local_ips = cluster.layout.enis();
    let local = addresses(&local_ips, 8443);
    let remote = addresses(&[cluster.layout.remote_eni()], 8443);
    let regions = format!(
        "[[regions]]\nname = \"us-east-1\"\nprivatelink = [{}]\n[[regions]]\nname = \"us-west-2\"\nprivatelink = [{}]\n",
        list(&local),
        list(&remote)
    );
    let text = config_text(&cluster, true, "60s", "privatelink-only", &regions);
    let bench = Bench::start(cluster, text).await;
    bench
        .wait_for(&local, "serving at start", |e| e["serving"] == true)
        .await;
    for ip in local_ips {
        bench
            .cluster
            .sim
            .set_state(ip, EndpointState::InferenceRefused)
            .await
            .expect("state");
    }

    let reply = bench.post().await;
    reply.assert_status(200);
    assert_eq!(reply.header("x-gpulink-endpoint"), Some(remote[0].as_str()));
    let mut learned = Vec::new();
    for address in &local {
        let e = bench.endpoint(address).await;
        assert_eq!(e["health_checks"], 1, "a check ran: {e:#}");
        if e["data_path"]["state"] == "failed" {
            assert_eq!(e["data_path"]["failed_by"], "request", "{e:#}");
            assert_eq!(e["data_path"]["problem"], "connect_refused", "{e:#}");
            assert_eq!(e["serving"], false);
            assert_eq!(
                e["last_request_error"]["problem"], "connect_refused",
                "{e:#}"
            );
            assert!(
                e["last_request_error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("refused")),
                "{e:#}"
            );
            learned.push(address.clone());
        }
    }
    // max_attempts = 3: two local tries, then the fall-through to the next tier.
    assert_eq!(
        learned.len(),
        2,
        "local ENIs tried by the first request: {learned:?}"
    );

    let (served, failed) = bench.load(10, 1).await;
    assert_eq!(failed, 0);
    assert_eq!(served.len(), 10);
    assert_all_in(&served, &remote, "after the request path learned");
    for address in &local {
        assert_eq!(bench.endpoint(address).await["serving"], false, "{address}");
    }
    bench.stop().await;
}

/// The simulator's new states through its control API, as a script would use them: the
/// health port keeps answering healthy while the inference port refuses or drops
/// connects, and `healthy` brings the port back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_breaks_only_the_inference_port_on_request() {
    let cluster = Cluster::start(next_block()).await;
    let ip = cluster.layout.enis()[0];
    let control = format!("http://{}", cluster.sim.control_addr());
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let put = |state: &'static str| {
        let (client, url) = (client.clone(), format!("{control}/endpoints/{ip}/state"));
        async move {
            let body = format!("{{\"state\":\"{state}\"}}").into_bytes();
            let reply = send(&client, "PUT", &url, body, &[]).await;
            reply.assert_status(200);
            assert_eq!(reply.json()["state"], state);
        }
    };
    let health = || {
        let (client, url) = (client.clone(), format!("http://{ip}:8080/health"));
        async move { send(&client, "GET", &url, Vec::new(), &[]).await.json()["status"].clone() }
    };
    let inference = std::net::SocketAddr::new(ip, 8443);
    let connect = |limit: Duration| async move {
        tokio::time::timeout(limit, tokio::net::TcpStream::connect(inference)).await
    };

    put("inference_refused").await;
    assert_eq!(health().await, "healthy");
    let refused = connect(Duration::from_secs(10))
        .await
        .expect("refused at once");
    assert_eq!(
        refused.expect_err("nothing accepts").kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let state = send(
        &client,
        "GET",
        &format!("{control}/endpoints/{ip}/state"),
        Vec::new(),
        &[],
    )
    .await;
    assert_eq!(state.json()["state"], "inference_refused");

    put("inference_filtered").await;
    assert_eq!(health().await, "healthy");
    // Dropped SYNs: the connect neither succeeds nor is refused.
    assert!(
        connect(Duration::from_millis(500)).await.is_err(),
        "a filtered port answered"
    );

    put("healthy").await;
    connect(Duration::from_secs(10))
        .await
        .expect("connects once healthy")
        .expect("the inference port is back");
    cluster.sim.shutdown().await;
}
