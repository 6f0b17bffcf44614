//! Metrics that tell the truth during a cutover: gpulink's own upstream errors are
//! counted under the route, region and endpoint of the last attempt (and `no_endpoint`
//! under the route it would have taken), and every series a dashboard panel reads is
//! there at zero before the first failure, so `rate()` and `increase()` see it. Read
//! with the official Prometheus parser; no timing assertions.

use crate::prom;

use crate::common::*;
use gpulink_sim::EndpointState;

const REQUESTS: &str = "gpulink_requests_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privatelink_failures_are_attributed_to_their_route_region_and_endpoint() {
    let world = World::with(
        ProxyOptions::default()
            .set("migration.phase", "privatelink-only")
            // Health checks must not notice first: the requests find out.
            .set("health.interval", "1h"),
    )
    .await;
    let enis: Vec<String> = world
        .layout
        .enis()
        .iter()
        .map(|ip| format!("{ip}:8443"))
        .collect();

    // Before any request, every series the dashboard reads exists, at zero.
    let before = prom::scrape(world.proxy().admin_addr).await;
    for eni in &enis {
        let labels = [
            ("route", "privatelink"),
            ("region", "us-east-1"),
            ("endpoint", eni.as_str()),
        ];
        for status in ["2xx", "4xx", "5xx"] {
            let mut l = labels.to_vec();
            l.push(("status", status));
            assert_eq!(before.value(REQUESTS, &l), 0.0, "{l:?}");
        }
        for family in [
            "gpulink_upstream_attempts_total",
            "gpulink_upstream_connect_failures_total",
            "gpulink_upstream_timeouts_total",
            "gpulink_upstream_send_failures_total",
        ] {
            assert_eq!(before.value(family, &labels), 0.0, "{family}");
        }
        for reason in ["goaway", "refused_stream", "closed"] {
            let mut l = labels.to_vec();
            l.push(("reason", reason));
            assert_eq!(before.value("gpulink_upstream_unprocessed_total", &l), 0.0);
        }
        assert_eq!(
            before.value("gpulink_endpoint_data_path_healthy", &labels),
            1.0
        );
    }
    let no_endpoint = [
        ("route", "privatelink"),
        ("region", "none"),
        ("endpoint", "none"),
    ];
    let refused_before_routing = [("route", "none"), ("region", "none"), ("endpoint", "none")];
    assert_eq!(before.value(REQUESTS, &with_owned(no_endpoint, "5xx")), 0.0);
    for status in ["4xx", "5xx"] {
        assert_eq!(
            before.value(REQUESTS, &with_owned(refused_before_routing, status)),
            0.0
        );
    }
    for code in ["upstream_connect", "upstream_timeout", "no_endpoint"] {
        assert_eq!(
            before.value("gpulink_request_errors_total", &[("code", code)]),
            0.0
        );
    }
    for route in ["privatelink", "public", "none"] {
        assert_eq!(
            before.value(
                "gpulink_request_duration_seconds_count",
                &[("route", route)]
            ),
            0.0
        );
    }

    // Every ENI starts refusing connections. The first request tries them all and gets
    // 502; the failures take their data paths out, so the next finds none: 503.
    for ip in world.layout.enis() {
        world.set_state(ip, EndpointState::Down).await;
    }
    let first = world.post("/inference", GUIDE_REQUEST, &[]).await;
    first.assert_status(502);
    assert_eq!(first.error_code(), "upstream_connect");
    let second = world.post("/inference", GUIDE_REQUEST, &[]).await;
    second.assert_status(503);
    assert_eq!(second.error_code(), "no_endpoint");

    let text = prom::scrape_text(world.proxy().admin_addr).await;
    prom::promtool_check(&text);
    let after = prom::parse(&text);
    // The 502 is the last attempt's: one of the ENIs, on route privatelink, us-east-1.
    let per_eni: Vec<f64> = enis
        .iter()
        .map(|e| after.value(REQUESTS, &with_owned(endpoint(e), "5xx")))
        .collect();
    assert_eq!(per_eni.iter().sum::<f64>(), 1.0, "{per_eni:?}");
    assert_eq!(
        after.sum(REQUESTS, &[("route", "privatelink"), ("status", "5xx")]),
        2.0
    );
    // The 503 no_endpoint is on the route it would have taken.
    assert_eq!(after.value(REQUESTS, &with_owned(no_endpoint, "5xx")), 1.0);
    // Nothing is left under `none`: the dashboard's "by route" panels see it all.
    assert_eq!(after.sum(REQUESTS, &[("route", "none")]), 0.0);
    assert_eq!(
        after.value(
            "gpulink_request_duration_seconds_count",
            &[("route", "privatelink")]
        ),
        2.0
    );
    assert_eq!(
        after.value(
            "gpulink_request_duration_seconds_count",
            &[("route", "none")]
        ),
        0.0
    );
    assert_eq!(
        after.value(
            "gpulink_request_errors_total",
            &[("code", "upstream_connect")]
        ),
        1.0
    );
    assert_eq!(
        after.value("gpulink_request_errors_total", &[("code", "no_endpoint")]),
        1.0
    );
    let connect_failures: f64 = enis
        .iter()
        .map(|e| after.value("gpulink_upstream_connect_failures_total", &endpoint(e)))
        .sum();
    assert_eq!(connect_failures, 3.0);
    for eni in &enis {
        assert_eq!(
            after.value("gpulink_endpoint_data_path_healthy", &endpoint(eni)),
            0.0,
            "{eni}"
        );
    }
    world.stop().await;
}

/// The labels of one local ENI.
fn endpoint(e: &str) -> [(&str, &str); 3] {
    [
        ("route", "privatelink"),
        ("region", "us-east-1"),
        ("endpoint", e),
    ]
}

/// `labels` and a `status`.
fn with_owned<'a>(labels: [(&'a str, &'a str); 3], status: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut all = labels.to_vec();
    all.push(("status", status));
    all
}
