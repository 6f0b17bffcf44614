//! The admin server as an operator meets it: `/metrics` parsed by the official Python
//! client's parsers (both exposition formats) with counters that move as requests flow,
//! `/ready` through start, a full outage and drain, `/status` and the HTML page
//! following endpoint state changes made through the simulator, and the Grafana
//! dashboard querying only metrics that exist.

use std::time::Duration;

use crate::common::*;
use crate::prom::{parse_as, Exposition};
use gpulink_sim::EndpointState;

const OPENMETRICS_ACCEPT: &str =
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";

async fn get(world: &World, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(
        &world.client,
        "GET",
        &world.admin_url(path),
        Vec::new(),
        headers,
    )
    .await
}

/// Scrapes in both formats, checks both parse, returns the OpenMetrics view.
async fn scrape(world: &World) -> Exposition {
    let open = get(world, "/metrics", &[("accept", OPENMETRICS_ACCEPT)]).await;
    assert_eq!(open.status, 200);
    assert!(
        open.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        open.header("content-type")
    );
    let text = get(world, "/metrics", &[]).await;
    assert_eq!(text.status, 200);
    assert!(text
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    let classic = parse_as(&text.body, "text");
    assert!(classic.has_sample("gpulink_build_info"));
    parse_as(&open.body, "openmetrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_what_flows() {
    let world = World::with(ProxyOptions::default()).await;
    let before = scrape(&world).await;
    assert_eq!(
        before.sum(
            "gpulink_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    for eni in world.layout.enis() {
        let endpoint = format!("{eni}:8443");
        assert_eq!(
            before.sum(
                "gpulink_endpoint_healthy",
                &[("endpoint", endpoint.as_str()), ("route", "privatelink")]
            ),
            1.0,
            "{endpoint}"
        );
        assert_eq!(
            before.sum(
                "gpulink_endpoint_capacity",
                &[("endpoint", endpoint.as_str())]
            ),
            45.0
        );
    }
    assert_eq!(before.sum("gpulink_ready", &[]), 1.0);
    assert_eq!(
        before.sum("gpulink_migration_phase", &[("phase", "privatelink")]),
        1.0
    );
    assert_eq!(before.sum("gpulink_config_generation", &[]), 1.0);

    const N: usize = 4;
    for i in 0..N {
        let id = format!("metrics-{i}");
        let reply = world
            .post(
                "/inference",
                GUIDE_REQUEST,
                &[("x-request-id", id.as_str())],
            )
            .await;
        reply.assert_status(200);
    }
    let refused = world.post("/inference", "not json", &[]).await;
    assert_eq!(refused.status, 400);

    let after = scrape(&world).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    let n = N as f64;
    assert_eq!(
        delta(
            "gpulink_requests_total",
            &[
                ("route", "privatelink"),
                ("region", "us-east-1"),
                ("status", "2xx")
            ]
        ),
        n
    );
    assert_eq!(
        delta(
            "gpulink_requests_total",
            &[("route", "none"), ("status", "4xx")]
        ),
        1.0
    );
    assert_eq!(
        delta("gpulink_request_errors_total", &[("code", "invalid_json")]),
        1.0
    );
    assert_eq!(
        delta(
            "gpulink_request_duration_seconds_count",
            &[("route", "privatelink")]
        ),
        n
    );
    assert_eq!(
        delta(
            "gpulink_upstream_duration_seconds_count",
            &[("route", "privatelink"), ("region", "us-east-1")]
        ),
        n
    );
    assert_eq!(
        delta(
            "gpulink_upstream_attempts_total",
            &[("route", "privatelink")]
        ),
        n
    );
    assert_eq!(
        delta("gpulink_kms_calls_total", &[("operation", "Encrypt")]),
        n
    );
    assert_eq!(
        delta(
            "gpulink_kms_call_duration_seconds_count",
            &[("operation", "Encrypt")]
        ),
        n
    );
    // Every request counted in the histogram falls in some bucket up to +Inf.
    assert_eq!(
        after.sum(
            "gpulink_request_duration_seconds_bucket",
            &[("route", "privatelink"), ("le", "+Inf")]
        ),
        after.sum(
            "gpulink_request_duration_seconds_count",
            &[("route", "privatelink")]
        )
    );
    // The endpoints that answered carry their own labels.
    let by_endpoint: f64 = world
        .layout
        .enis()
        .iter()
        .map(|ip| {
            let endpoint = format!("{ip}:8443");
            delta(
                "gpulink_requests_total",
                &[("endpoint", endpoint.as_str()), ("status", "2xx")],
            )
        })
        .sum();
    assert_eq!(by_endpoint, n);

    // The dashboard queries only metrics this exposition has.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/grafana/gpulink.json"
        ))
        .expect("dashboard file"),
    )
    .expect("dashboard is valid JSON");
    let queried = dashboard_metric_names(&dashboard);
    assert!(queried.len() >= 20, "{queried:?}");
    for name in &queried {
        assert!(
            exposes(&after, name),
            "the dashboard queries `{name}`, which /metrics does not expose"
        );
    }
    world.stop().await;
}

/// Every `gpulink_*` name in the dashboard's queries.
fn dashboard_metric_names(dashboard: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    collect_exprs(dashboard, &mut exprs);
    let mut names: Vec<String> = Vec::new();
    for expr in exprs {
        let bytes = expr.as_bytes();
        let mut i = 0;
        while let Some(pos) = expr[i..].find("gpulink_") {
            let start = i + pos;
            let mut end = start;
            while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                end += 1;
            }
            names.push(expr[start..end].to_string());
            i = end;
        }
    }
    names.sort();
    names.dedup();
    names
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                if key == "expr" {
                    if let Some(s) = v.as_str() {
                        out.push(s.to_string());
                    }
                } else {
                    collect_exprs(v, out);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Whether `name` is a series name of some family (counters gain `_total`, histograms
/// `_bucket`/`_count`/`_sum`), even if that family has no sample yet.
fn exposes(parsed: &Exposition, name: &str) -> bool {
    parsed.families.iter().any(|(family, kind)| {
        let suffixes: &[&str] = match kind.as_str().unwrap_or("") {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_count", "_sum"],
            _ => &[""],
        };
        suffixes.iter().any(|s| format!("{family}{s}") == name)
    })
}

/// A GET's status and body, `None` while nothing answers (the proxy is still starting).
async fn admin_get(client: &HttpClient, url: &str) -> Option<(u16, String)> {
    let request = http::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .ok()?;
    let response = client.request(request).await.ok()?;
    let reply = Reply::read(response).await.ok()?;
    Some((
        reply.status,
        String::from_utf8_lossy(&reply.body).into_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_start_outage_and_drain() {
    let cluster = Cluster::start(next_block()).await;
    let (layout, sim) = (&cluster.layout, &cluster.sim);
    // Every endpoint accepts and never answers: the first health round can only end
    // by its timeout, so the proxy is observably "starting" until then.
    for endpoint in sim.endpoints() {
        put_state(sim, endpoint.ip, EndpointState::Blackhole).await;
    }
    let admin = std::net::SocketAddr::new(layout.ip(0, 2), 9901).to_string();
    let admin = admin.as_str();
    let text = cluster.config_toml(
        &ProxyOptions::default()
            .set("admin.address", admin)
            .set("health.timeout", "4s")
            .set("listen.drain_delay", "3s"),
    );
    assert!(text.contains(admin) && text.contains("drain_delay = \"3s\""));
    let config = gpulink::config::Config::from_toml(&text, std::path::Path::new("ready.toml"))
        .expect("valid config");
    let keys = gpulink::seal::KeyService::Kms(cluster.moto.keys().await);
    let client = http_client();
    let ready_url = format!("http://{admin}/ready");

    // Start, and meanwhile take the first answer /ready gives.
    let watcher = async {
        loop {
            if let Some(answer) = admin_get(&client, &ready_url).await {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (started, first_answer) = tokio::join!(gpulink::proxy::start(config, keys), watcher);
    let handle = started.expect("proxy starts although no endpoint answers");
    // 503 while the first health round runs: "starting", or, while the KMS proof that
    // runs alongside it has not finished, the JSON naming KMS.
    assert_eq!(first_answer.0, 503, "{first_answer:?}");
    assert!(
        first_answer.1 == "starting\n" || first_answer.1.contains(r#""waiting_for":"kms""#),
        "{first_answer:?}"
    );

    // Started and KMS proven: ready, although every endpoint is down (a cluster outage
    // must not take the app's pods out of service).
    tokio::time::timeout(Duration::from_secs(30), handle.proxy().kms_proven())
        .await
        .expect("KMS (moto) is proven");
    let (status, body) = admin_get(&client, &ready_url).await.expect("/ready");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (_, status_doc) = admin_get(&client, &format!("http://{admin}/status"))
        .await
        .expect("/status");
    let status_doc: serde_json::Value = serde_json::from_str(&status_doc).expect("JSON");
    let endpoints = status_doc["endpoints"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 4);
    assert!(
        endpoints
            .iter()
            .all(|e| e["health"] == "unhealthy" && e["serving"] == false),
        "{status_doc:#}"
    );
    assert_eq!(status_doc["ready"], true);

    // Draining: /ready turns 503 at once, for the whole drain delay.
    let shutdown = tokio::spawn(handle.shutdown());
    loop {
        match admin_get(&client, &ready_url).await {
            Some((503, body)) => {
                assert_eq!(body, "draining\n");
                break;
            }
            Some((200, _)) => tokio::time::sleep(Duration::from_millis(10)).await,
            other => panic!("unexpected /ready answer while draining: {other:?}"),
        }
    }
    shutdown.await.expect("shutdown completes");
    cluster.sim.shutdown().await;
}

/// Polls `/status` until `condition` holds for the endpoint `authority`.
async fn await_endpoint(
    world: &World,
    authority: &str,
    what: &str,
    condition: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    assert_eventually!(
        get(world, "/status", &[]).await.json(),
        |status| status["endpoints"]
            .as_array()
            .and_then(|all| all.iter().find(|e| e["address"] == authority))
            .is_some_and(&condition),
        "{authority} never became {what}"
    )
}

/// The `<tr>` of one endpoint on the status page.
fn page_row(page: &str, authority: &str) -> String {
    let marker = format!("<tr data-endpoint=\"{authority}\"");
    let start = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no row for {authority} in the page"));
    let end = page[start..].find("</tr>").expect("row end") + start;
    page[start..end].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_page_follow_endpoint_state() {
    let world = World::with(ProxyOptions::default()).await;
    let [a, b, _] = world.layout.enis();
    let (a_auth, b_auth) = (format!("{a}:8443"), format!("{b}:8443"));

    let page = get(&world, "/", &[]).await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/html")));
    let html = String::from_utf8_lossy(&page.body).into_owned();
    assert!(html.contains("http-equiv=\"refresh\""));
    assert!(
        !html.contains("<script") && !html.contains("<link") && !html.contains("src="),
        "the page must be self-contained"
    );
    assert!(page_row(&html, &a_auth).contains("data-health=\"healthy\""));
    assert!(html.contains("privatelink"));
    assert!(html.contains("aws-kms"));

    // An ENI goes down: /status, the page and the metrics say so.
    world.set_state(a, EndpointState::Down).await;
    let status = await_endpoint(&world, &a_auth, "unhealthy", |e| {
        e["health"] == "unhealthy" && e["serving"] == false
    })
    .await;
    assert!(status["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .any(|e| e["address"] == a_auth && e["last_error"].as_str().is_some()));
    let html = String::from_utf8_lossy(&get(&world, "/", &[]).await.body).into_owned();
    let row = page_row(&html, &a_auth);
    assert!(row.contains("data-health=\"unhealthy\""), "{row}");
    assert!(row.contains(">unhealthy<"), "{row}");
    let metrics = get(&world, "/metrics", &[]).await;
    let parsed = parse_as(&metrics.body, "text");
    assert_eq!(
        parsed.sum("gpulink_endpoint_healthy", &[("endpoint", a_auth.as_str())]),
        0.0
    );

    // Another reports no capacity: shown as full.
    world.set_state(b, EndpointState::Full).await;
    await_endpoint(&world, &b_auth, "full", |e| e["capacity"] == 0).await;
    let html = String::from_utf8_lossy(&get(&world, "/", &[]).await.body).into_owned();
    assert!(page_row(&html, &b_auth).contains(">full<"));

    // And both recover.
    world.set_state(a, EndpointState::Healthy).await;
    world.set_state(b, EndpointState::Healthy).await;
    await_endpoint(&world, &a_auth, "healthy again", |e| {
        e["health"] == "healthy" && e["serving"] == true
    })
    .await;
    await_endpoint(&world, &b_auth, "not full", |e| e["capacity"] == 45).await;
    let html = String::from_utf8_lossy(&get(&world, "/", &[]).await.body).into_owned();
    assert!(page_row(&html, &a_auth).contains(">healthy<"));
    world.stop().await;
}
