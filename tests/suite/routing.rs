//! Routing under failure: failover between ENIs, AZs and regions, passive and active
//! detection, the balancer's preferences, safe retries and automatic rollback. Each test
//! awaits state changes (the proxy's endpoint state, the simulator's counters) and uses
//! fixed request counts; none asserts on time.

use std::time::Duration;

use crate::common::*;
use gpulink_sim::EndpointState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eni_that_starts_refusing_under_load_costs_no_request() {
    let world = World::with(ProxyOptions::default()).await;
    let [a, ..] = world.layout.enis();
    let background = {
        let (client, url) = (world.client.clone(), world.url("/inference"));
        tokio::spawn(async move {
            let mut failed = 0;
            for _ in 0..150 {
                let reply = send(&client, "POST", &url, GUIDE_REQUEST.into(), &[]).await;
                failed += u64::from(reply.status != 200);
            }
            failed
        })
    };
    let (ok, failed) = world.load(60, 3).await;
    world.set_state(a, EndpointState::Down).await;
    let (ok2, failed2) = world.load(90, 3).await;
    let background_failed = background.await.expect("join");
    assert_eq!(failed + failed2 + background_failed, 0, "ok {ok}+{ok2}");
    world.wait_serving(a, false).await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_eni_costs_only_what_it_swallowed_before_ejection() {
    let world = World::with(ProxyOptions::default().set("upstream.request_timeout", "2s")).await;
    let [a, ..] = world.layout.enis();
    let (_, failed_before) = world.load(30, 4).await;
    assert_eq!(failed_before, 0);
    world.set_state(a, EndpointState::Blackhole).await;
    let (_, failed_during) = world.load(60, 4).await;
    // Requests sent to the blackhole before health checks took it out time out (504);
    // in-flight-aware balancing keeps that to a handful.
    assert!(
        failed_during <= 8,
        "{failed_during} requests were lost to the blackhole"
    );
    world.wait_serving(a, false).await;
    let swallowed = world.requests_at(a);
    let (_, failed_after) = world.load(60, 4).await;
    assert_eq!(failed_after, 0);
    assert_eq!(
        world.requests_at(a),
        swallowed,
        "the blackhole received requests after it was out"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_eni_gets_a_small_share() {
    // The share depends on the balancer's random choices: the seed this test always had
    // (its block number before blocks were allocated).
    let world = World::with(ProxyOptions::default().seed(93)).await;
    let [slow, ..] = world.layout.enis();
    // Warm every endpoint's latency estimate first.
    let (_, failed) = world.load(30, 3).await;
    assert_eq!(failed, 0);
    let before = world.requests_at(slow);
    // The others answer in a few ms (KMS Decrypt via moto): 40x slower is ~400 ms.
    world
        .set_state(slow, EndpointState::Slow { delay_ms: 400 })
        .await;
    let (_, failed) = world.load(150, 3).await;
    assert_eq!(failed, 0);
    let share = world.requests_at(slow) - before;
    assert!(share < 15, "the slow ENI got {share} of 150 requests");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_eni_gets_nothing_while_others_have_capacity() {
    let world = World::with(ProxyOptions::default()).await;
    let [full, ..] = world.layout.enis();
    world.set_state(full, EndpointState::Full).await;
    // Await the health check that reports capacity 0.
    assert_eventually!(
        world
            .proxy()
            .proxy()
            .current()
            .endpoints
            .iter()
            .find(|e| e.authority == format!("{full}:8443"))
            .and_then(|e| e.capacity()),
        |capacity| *capacity == Some(0),
        "capacity 0 never seen"
    );
    let before = world.requests_at(full);
    let (_, failed) = world.load(60, 3).await;
    assert_eq!(failed, 0);
    assert_eq!(world.requests_at(full), before);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_capacity_answers_are_retried_elsewhere_and_never_double_delivered() {
    // Health checks are slow here, so the proxy does not know about the full ENIs and
    // meets the cluster's 503 no_capacity instead.
    let world = World::with(
        ProxyOptions::default()
            .set("health.interval", "60s")
            .set("migration.phase", "privatelink-only"),
    )
    .await;
    let [a, b, c] = world.layout.enis();
    world.set_state(a, EndpointState::Full).await;
    world.set_state(b, EndpointState::Full).await;
    for i in 0..12 {
        let id = format!("capacity-{i}");
        let reply = world
            .post("/inference", GUIDE_REQUEST, &[("x-request-id", &id)])
            .await;
        reply.assert_status(200);
        assert_eq!(
            reply.header("x-gpulink-endpoint"),
            Some(format!("{c}:8443").as_str())
        );
        assert_eq!(world.sim.deliveries(&id), 1);
    }
    assert!(
        world.requests_at(a) + world.requests_at(b) > 0,
        "the full ENIs were never tried"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_cluster_started_is_never_replayed() {
    let world = World::with(
        ProxyOptions::default()
            .set("migration.phase", "privatelink-only")
            .set("upstream.request_timeout", "30s"),
    )
    .await;
    for ip in world.layout.enis() {
        world.set_state(ip, EndpointState::Blackhole).await;
    }
    let request = {
        let (client, url) = (world.client.clone(), world.url("/inference"));
        tokio::spawn(async move {
            send(
                &client,
                "POST",
                &url,
                GUIDE_REQUEST.into(),
                &[("x-request-id", "started-once")],
            )
            .await
        })
    };
    // The cluster has the request; now it drops the connection without answering.
    let target = loop {
        let holding = world
            .layout
            .enis()
            .into_iter()
            .find(|ip| world.sim.stats(*ip).is_some_and(|s| s.in_flight > 0));
        if let Some(ip) = holding {
            break ip;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    world.set_state(target, EndpointState::Healthy).await;
    let reply = request.await.expect("join");
    reply.assert_status(502);
    assert_eq!(reply.error_code(), "upstream_connect");
    assert_eq!(world.sim.deliveries("started-once"), 1);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_local_region_fails_over_to_the_other_region_then_public() {
    let world = World::with(ProxyOptions::default().remote_region()).await;
    for ip in world.layout.enis() {
        world.set_state(ip, EndpointState::Down).await;
    }
    for ip in world.layout.enis() {
        world.wait_serving(ip, false).await;
    }
    for _ in 0..5 {
        let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-region"), Some("us-west-2"));
        assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    }
    let remote = world.layout.remote_eni();
    world.set_state(remote, EndpointState::Down).await;
    world.wait_serving(remote, false).await;
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-gpulink-route"), Some("public"));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rollback_fires_on_slow_privatelink_but_not_below_the_minimum() {
    let world = World::with(ProxyOptions::default().set("migration.public_fallback_until", "2999-01-01T00:00:00+00:00").set(
 "rollback",
 serde_json::json!({"window": "5m", "min_requests": 12, "max_error_rate": 0.5, "max_p99": "100ms", "cooldown": "10m"}),
 ),
    )
    .await;
    for ip in world.layout.enis() {
        world
            .set_state(ip, EndpointState::Slow { delay_ms: 300 })
            .await;
    }
    let rolled_back = |world: &World| {
        world
            .proxy()
            .proxy()
            .current()
            .routes
            .is_rolled_back(chrono::Utc::now())
    };
    // Below the minimum request count: slow, but no verdict yet.
    for _ in 0..11 {
        let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    }
    assert!(!rolled_back(&world));
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    assert_eq!(reply.status, 200);
    assert!(
        rolled_back(&world),
        "12 requests with p99 ~300ms > 100ms should roll back"
    );
    for _ in 0..3 {
        let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
        assert_eq!(reply.header("x-gpulink-route"), Some("public"));
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_automatic_rollback_in_privatelink_only() {
    let world = World::with(
        ProxyOptions::default()
            .set("migration.phase", "privatelink-only")
            .set(
                "rollback",
                serde_json::json!({"window": "5m", "min_requests": 5, "max_p99": "100ms"}),
            ),
    )
    .await;
    for ip in world.layout.enis() {
        world
            .set_state(ip, EndpointState::Slow { delay_ms: 300 })
            .await;
    }
    for _ in 0..10 {
        let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    }
    world.stop().await;
}
