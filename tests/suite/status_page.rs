//! The status page as an operator's browser renders it: a running proxy with traffic on
//! both routes through the simulator (successes, a failing ENI's 500s, a public endpoint
//! that refuses connections, requests refused before routing), its page rendered by
//! headless Chromium, and the charts, counts, error codes and relative times asserted in
//! the rendered DOM; a screenshot is taken too (`GPULINK_UPDATE_SCREENSHOT=1` copies it
//! to docs/status-page.png, the README's picture).
//!
//! Loopback block 127.235.x.x belongs to this module (fixed blocks >= 220 are outside
//! the allocator's range).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use gpulink_sim::EndpointState;

const BLOCK: u8 = 235;

fn chromium() -> PathBuf {
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("Chromium is not installed (scripts/test.sh installs Debian's `chromium`)");
}

/// Chromium on a loopback URL only: background services (updates, sync, safe
/// browsing, metrics) off, and every host name unresolvable, so nothing leaves the host.
fn run_chromium(profile: &Path, args: &[&str], url: &str) -> std::process::Output {
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--disable-breakpad",
            "--metrics-recording-only",
            "--no-pings",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--window-size=1600,1150",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert_success(&output, "chromium failed");
    output
}

/// The text of the DOM element that starts at `marker`, tags removed.
fn row_text(dom: &str, marker: &str) -> String {
    let start = dom
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} in the rendered page:\n{dom}"));
    let end = dom[start..].find("</tr>").expect("row end") + start;
    let mut text = String::new();
    let mut in_tag = false;
    for c in dom[start..end].chars() {
        match c {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_outcomes_and_charts_in_chromium() {
    // Half the requests go PrivateLink-first, the rest public only. Health checks are
    // slow on purpose: the failures below are met by requests, not by the checks.
    let world = World::start(
        BLOCK,
        ProxyOptions::default()
            .set("migration.phase", "canary")
            .set("migration.canary_percent", 50)
            .set("health.interval", "60s"),
    )
    .await;
    let [a, b, _] = world.layout.enis();
    let public = world.layout.public();
    let (a_auth, b_auth) = (format!("{a}:8443"), format!("{b}:8443"));
    let public_auth = format!("{public}:8443");

    // Successes on both routes; the public route a little slower, as in the guide.
    world
        .set_state(public, EndpointState::Slow { delay_ms: 20 })
        .await;
    // For the README's picture, traffic spread over two minutes so the charts have
    // lines to show; otherwise as fast as it goes.
    let picture = std::env::var_os("GPULINK_UPDATE_SCREENSHOT").is_some();
    let spread_until = tokio::time::Instant::now() + Duration::from_secs(120);
    while picture && tokio::time::Instant::now() < spread_until {
        for _ in 0..10 {
            let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
            reply.assert_status(200);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for _ in 0..10 {
            let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
            reply.assert_status(200);
        }
        let s = world.status().await;
        let routes = &s["traffic"]["routes"];
        if routes["privatelink"]["2xx"].as_u64() >= Some(5)
            && routes["public"]["2xx"].as_u64() >= Some(5)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "traffic never reached both routes: {routes}"
        );
    }
    // Refused before routing: not JSON.
    for _ in 0..3 {
        let reply = world.post("/inference", "not json", &[]).await;
        assert_eq!(reply.status, 400);
    }
    // Two ENIs answer 500, the public endpoint refuses connections: requests meet both.
    for eni in [a, b] {
        world.set_state(eni, EndpointState::Failing).await;
    }
    world.set_state(public, EndpointState::Down).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let snapshot = loop {
        for _ in 0..5 {
            let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
            assert!(
                [200, 500, 502, 503].contains(&reply.status),
                "{} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        let s = world.status().await;
        let failed = |e: &str| !endpoint_in(&s, e)["last_failed_request"].is_null();
        if (failed(&a_auth) || failed(&b_auth))
            && !endpoint_in(&s, &public_auth)["last_request_error"].is_null()
        {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failures never showed in /status: {}",
            s["endpoints"]
        );
    };
    // /status: outcomes per route, the codes, the series.
    let traffic = &snapshot["traffic"];
    let pl = &traffic["routes"]["privatelink"];
    let pb = &traffic["routes"]["public"];
    assert!(pl["5xx"].as_u64() >= Some(1), "{pl}");
    assert!(pb["5xx"].as_u64() >= Some(1), "{pb}");
    assert_eq!(traffic["routes"]["none"]["4xx"], 3);
    let codes = traffic["top_errors"].to_string();
    assert!(codes.contains("cluster_500"), "{codes}");
    assert!(codes.contains("invalid_json"), "{codes}");
    // The ENI that answered 500 (either of the two may have been picked first).
    let failing_auth = if endpoint_in(&snapshot, &a_auth)["last_failed_request"].is_null() {
        b_auth.clone()
    } else {
        a_auth.clone()
    };
    assert_eq!(
        endpoint_in(&snapshot, &failing_auth)["last_failed_request"]["code"],
        "cluster_500"
    );
    let series = &traffic["series"]["privatelink"]["requests_per_second"];
    assert_eq!(series.as_array().map(Vec::len), Some(90));
    assert!(series
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v.as_f64() > Some(0.0)));
    assert!(pl["p50_ms"].as_f64().is_some() && pb["p99_ms"].as_f64().is_some());

    // The page in a real browser. No requests flow from here on, so the counts in the
    // DOM are the ones /status just gave.
    let profile = tempfile::tempdir().expect("profile dir");
    let page_url = world.admin_url("/");
    let dom = run_chromium(profile.path(), &["--dump-dom"], &page_url);
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    for chart in ["requests_per_second", "error_rate", "latency"] {
        let marker = format!("data-chart=\"{chart}\"");
        let start = dom
            .find(&marker)
            .unwrap_or_else(|| panic!("chart {chart} in the rendered page:\n{dom}"));
        let svg = &dom[start..start + dom[start..].find("</svg>").expect("svg end")];
        assert!(
            svg.contains("<polyline") || svg.contains("<circle"),
            "chart {chart} draws data: {svg}"
        );
        assert!(!svg.contains("no requests yet"), "{chart}");
    }
    assert!(dom.contains("data-series=\"PrivateLink p99\""));
    assert!(dom.contains("data-series=\"public\""));
    let pl_row = row_text(&dom, "<tr data-route=\"privatelink\"");
    for key in ["requests", "2xx", "5xx"] {
        let n = pl[key].as_u64().expect("count").to_string();
        assert!(
            pl_row.split(' ').any(|cell| cell == n),
            "privatelink {key} = {n} in the row: {pl_row}"
        );
    }
    assert!(pl_row.contains("cluster_500"), "{pl_row}");
    let none_row = row_text(&dom, "<tr data-route=\"none\"");
    assert!(none_row.contains("invalid_json × 3"), "{none_row}");
    assert!(
        dom.contains("of requests failing"),
        "the verdict is not green"
    );
    // The endpoints: the failing ENI's last 500, the public one's refused connection,
    // with relative times.
    let failing_row = row_text(&dom, &format!("<tr data-endpoint=\"{failing_auth}\""));
    assert!(
        failing_row.contains("500 cluster_500") && relative_time(&failing_row),
        "{failing_row}"
    );
    let public_row = row_text(&dom, &format!("<tr data-endpoint=\"{public_auth}\""));
    assert!(public_row.contains("down for"), "{public_row}");
    assert!(relative_time(&public_row), "{public_row}");

    // The picture.
    let png = profile.path().join("status-page.png");
    run_chromium(
        profile.path(),
        &[&format!("--screenshot={}", png.display())],
        &page_url,
    );
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000);
    if std::env::var_os("GPULINK_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
        std::fs::write(&docs, &bytes).expect("docs/status-page.png");
    }
    world.stop().await;
}

/// A relative time as the page writes it: "3 s ago", or "just now" within the second
/// (a quick machine gets there before a whole second has passed).
fn relative_time(row: &str) -> bool {
    row.contains(" ago") || row.contains("just now")
}
