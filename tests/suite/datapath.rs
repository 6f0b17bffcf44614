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
use std::time::Duration;

use crate::common::*;
use gpulink::config::Config;
use gpulink::proxy::ProxyHandle;
use gpulink_sim::EndpointState;
use serde_json::Value;

/// moto, the simulator and a proxy whose configuration file the test writes (so that a
/// reload can fix what the first one broke).
struct Bench {
    cluster: Cluster,
    proxy: ProxyHandle,
    config_path: PathBuf,
    client: HttpClient,
}

/// The proxy configuration around `regions` (the `[[regions]]` tables) and `phase`, with
/// health checks every `interval` and (`upstream_ca`) the simulator's CA for the cluster.
fn config_text(
    cluster: &Cluster,
    upstream_ca: bool,
    interval: &str,
    phase: &str,
    regions: Vec<Value>,
) -> String {
    let mut options = ProxyOptions::default()
        .set("health.interval", interval)
        .set("migration.phase", phase)
        // One request's attempts: the request-path test counts on exactly three.
        .set("retry.max_attempts", 3);
    if !upstream_ca {
        options = options.remove("upstream.ca_file");
    }
    toml_text(&config_with_regions(
        regions,
        &cluster.moto.url,
        &cluster.key_arn,
        &cluster.sim.ca_file(),
        &options,
    ))
}

/// `local` as us-east-1's PrivateLink tier and `remote` as us-west-2's.
fn two_regions(local: impl serde::Serialize, remote: impl serde::Serialize) -> Vec<Value> {
    vec![
        serde_json::json!({ "name": "us-east-1", "privatelink": local }),
        serde_json::json!({ "name": "us-west-2", "privatelink": remote }),
    ]
}

/// `local` as us-east-1's PrivateLink tier with the public endpoint `public` behind it.
fn local_and_public(local: impl serde::Serialize, public: &str) -> Vec<Value> {
    vec![serde_json::json!({
        "name": "us-east-1",
        "privatelink": local,
        "public": [{ "address": public, "server_name": "gpu-cluster.public.example.com" }],
    })]
}

impl Bench {
    async fn start(cluster: Cluster, text: String) -> Bench {
        let config_path = cluster.dir.path().join("gpulink.toml");
        std::fs::write(&config_path, &text).expect("write config");
        let config = Config::load(&config_path).expect("valid config");
        let proxy = start_proxy(config, &cluster.moto.url, &ProxyOptions::default()).await;
        Bench {
            cluster,
            proxy,
            config_path,
            client: http_client(),
        }
    }

    /// Puts every one of `ips` into `state` in the simulator.
    async fn set_states(&self, ips: &[IpAddr], state: EndpointState) {
        for ip in ips {
            put_state(&self.cluster.sim, *ip, state).await;
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
        endpoint_in(&self.status().await, address).clone()
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
        let url = format!("http://{}/inference", self.proxy.listen_addr);
        let mut served = Vec::new();
        let mut failed = 0;
        for reply in load(&self.client, &url, total, concurrency).await {
            if reply.status == 200 {
                served.push(
                    reply
                        .header("x-gpulink-endpoint")
                        .unwrap_or("?")
                        .to_string(),
                );
            } else {
                eprintln!(
                    "failed: {} {}",
                    reply.status,
                    String::from_utf8_lossy(&reply.body)
                );
                failed += 1;
            }
        }
        (served, failed)
    }

    /// The sum of the samples `name` with `labels`, as the official Prometheus client
    /// parses `/metrics`.
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let body = self.admin("/metrics").await.body;
        crate::prom::parse_as(&body, "text").sum(name, labels)
    }

    async fn stop(self) {
        self.proxy.shutdown().await;
        self.cluster.sim.shutdown().await;
    }
}

fn addresses(ips: &[IpAddr], port: u16) -> Vec<String> {
    ips.iter().map(|ip| format!("{ip}:{port}")).collect()
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

/// A break in the local tier as the tests see it, for the assertion messages and the
/// checks of [`assert_served_meanwhile_and_out`].
struct Breakage<'a> {
    /// How the local tier is broken ("filtered on :443"), for the assertion messages.
    what: &'a str,
    /// The endpoints that must carry every request while the break stands.
    serving_meanwhile: &'a [String],
    broken: &'a [String],
    /// The data-path problem code `/status` must give, and words its diagnosis contains.
    problem: &'a str,
    words: &'a [&'a str],
}

/// Whether a check or a request learns of `breakage` first, no app request of a load of
/// `total` (`concurrency` at a time) fails, all are served by the other tier, and the
/// broken endpoints end up out for their data path with the right diagnosis.
async fn assert_served_meanwhile_and_out(
    bench: &Bench,
    breakage: &Breakage<'_>,
    total: u64,
    concurrency: usize,
) {
    let what = breakage.what;
    let (served, failed) = bench.load(total, concurrency).await;
    assert_eq!(
        failed, 0,
        "requests failed while gpulink learned the local tier {what}"
    );
    assert_eq!(served.len() as u64, total);
    assert_all_in(
        &served,
        breakage.serving_meanwhile,
        &format!("while the local tier is {what}"),
    );
    bench
        .wait_for(breakage.broken, "out for the data path", |e| {
            e["data_path"]["state"] == "failed"
        })
        .await;
    assert_out_for_data_path(bench, breakage.broken, breakage.problem, breakage.words).await;
}

/// Once fixed, `fixed` is back in service (`waited`: the wait's name) and serves every
/// request of a load; `what` names the fix for the assertion message.
async fn assert_back_in_service(bench: &Bench, fixed: &[String], waited: &str, what: &str) {
    bench
        .wait_for(fixed, waited, |e| e["serving"] == true)
        .await;
    let (served, failed) = bench.load(20, 2).await;
    assert_eq!(failed, 0);
    assert_all_in(&served, fixed, what);
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
    let regions = two_regions(&local, &remote);
    let text = config_text(&cluster, true, "300ms", "privatelink-only", regions);
    let bench = Bench::start(cluster, text).await;
    bench
        .wait_for(&local, "serving at start", |e| e["serving"] == true)
        .await;

    bench
        .set_states(&local_ips, EndpointState::InferenceFiltered)
        .await;
    let breakage = Breakage {
        what: "filtered on :443",
        serving_meanwhile: &remote,
        broken: &local,
        problem: "connect_timeout",
        words: &["timed out", "security group"],
    };
    assert_served_meanwhile_and_out(&bench, &breakage, 24, 3).await;
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

    bench.set_states(&local_ips, EndpointState::Healthy).await;
    assert_back_in_service(
        &bench,
        &local,
        "back in service",
        "once the local tier is fixed",
    )
    .await;
    bench.stop().await;
}

/// :443 refused while :8080 answers healthy; phase `privatelink` falls back to public.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_443_while_8080_answers_falls_through_to_public() {
    let cluster = Cluster::start(next_block()).await;
    let local_ips = cluster.layout.enis();
    let local = addresses(&local_ips, 8443);
    let public = addresses(&[cluster.layout.public()], 8443);
    let regions = local_and_public(&local, &public[0]);
    let text = config_text(&cluster, true, "300ms", "privatelink", regions);
    let bench = Bench::start(cluster, text).await;
    bench
        .wait_for(&local, "serving at start", |e| e["serving"] == true)
        .await;

    bench
        .set_states(&local_ips, EndpointState::InferenceRefused)
        .await;
    let breakage = Breakage {
        what: "refusing :443",
        serving_meanwhile: &public,
        broken: &local,
        problem: "connect_refused",
        words: &["connection refused", "port"],
    };
    assert_served_meanwhile_and_out(&bench, &breakage, 24, 3).await;

    bench.set_states(&local_ips, EndpointState::Healthy).await;
    assert_back_in_service(
        &bench,
        &local,
        "back in service",
        "once the local tier is fixed",
    )
    .await;
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
    let text = config_text(
        &cluster,
        true,
        "300ms",
        "privatelink-only",
        two_regions(&wrong, &remote),
    );
    let fixed_text = config_text(
        &cluster,
        true,
        "300ms",
        "privatelink-only",
        two_regions(&right, &remote),
    );
    let bench = Bench::start(cluster, text).await;
    out_until_a_reload_fixes_it(
        bench,
        Mistake {
            breakage: Breakage {
                what: "on a wrong port",
                serving_meanwhile: &remote,
                broken: &wrong,
                problem: "tls_failed",
                words: &["TLS handshake", "may not speak TLS"],
            },
            fixed_text,
            fixed: &right,
        },
    )
    .await;
}

/// A configuration mistake in the local tier and its fix by reload.
struct Mistake<'a> {
    /// How the local tier is wrong: `what` reads "on a wrong port", "trusting a wrong CA".
    breakage: Breakage<'a>,
    fixed_text: String,
    /// The endpoints that serve every request after the fix.
    fixed: &'a [String],
}

/// The story every configuration mistake shares: the other tier serves every request,
/// the broken endpoints are out for their data path with the right diagnosis, and after
/// a reload with the fix the local tier serves everything again.
async fn out_until_a_reload_fixes_it(bench: Bench, mistake: Mistake<'_>) {
    assert_served_meanwhile_and_out(&bench, &mistake.breakage, 20, 2).await;
    bench.reload(mistake.fixed_text).await;
    assert_back_in_service(
        &bench,
        mistake.fixed,
        "serving after the reload",
        &format!("once the local tier is no longer {}", mistake.breakage.what),
    )
    .await;
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
    let entry = |a: &String, ca: &Path| serde_json::json!({ "address": a, "ca_file": ca });
    let regions = |ca: &Path| {
        let local: Vec<Value> = local.iter().map(|a| entry(a, ca)).collect();
        two_regions(local, [entry(&remote[0], &right_ca)])
    };
    let text = config_text(
        &cluster,
        false,
        "300ms",
        "privatelink-only",
        regions(&wrong_ca),
    );
    let fixed_text = config_text(
        &cluster,
        false,
        "300ms",
        "privatelink-only",
        regions(&right_ca),
    );
    let bench = Bench::start(cluster, text).await;
    out_until_a_reload_fixes_it(
        bench,
        Mistake {
            breakage: Breakage {
                what: "trusting a wrong CA",
                serving_meanwhile: &remote,
                broken: &local,
                problem: "tls_unknown_ca",
                words: &["untrusted CA", "ca_file"],
            },
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
    let wrong_name: Vec<Value> = local
        .iter()
        .map(|a| serde_json::json!({ "address": a, "server_name": "gpu-cluster.wrong.internal" }))
        .collect();
    let text = config_text(
        &cluster,
        true,
        "300ms",
        "privatelink",
        local_and_public(wrong_name, &public[0]),
    );
    let fixed_text = config_text(
        &cluster,
        true,
        "300ms",
        "privatelink",
        local_and_public(&local, &public[0]),
    );
    let bench = Bench::start(cluster, text).await;
    out_until_a_reload_fixes_it(
        bench,
        Mistake {
            breakage: Breakage {
                what: "verifying a wrong server name",
                serving_meanwhile: &public,
                broken: &local,
                problem: "tls_wrong_name",
                words: &["wrong server name", "gpu-cluster.wrong.internal"],
            },
            fixed_text,
            fixed: &local,
        },
    )
    .await;
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
    let regions = two_regions(&local, &remote);
    let text = config_text(&cluster, true, "60s", "privatelink-only", regions);
    let bench = Bench::start(cluster, text).await;
    bench
        .wait_for(&local, "serving at start", |e| e["serving"] == true)
        .await;
    bench
        .set_states(&local_ips, EndpointState::InferenceRefused)
        .await;

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
