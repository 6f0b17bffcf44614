//! The core path end to end: app JSON → KMS (moto) → tenant headers → pooled TLS → the
//! simulated cluster, and every refusal on the way.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guide_request_end_to_end() {
    let world = World::with(ProxyOptions::default()).await;
    let reply = world
        .post(
            "/inference",
            GUIDE_REQUEST,
            &[("x-request-id", "req-guide-1")],
        )
        .await;
    reply.assert_status(200);
    let answer = reply.json();
    // The cluster opened the body with KMS and saw exactly the app's JSON.
    assert_eq!(answer["sha256"], sha256_hex(GUIDE_REQUEST.as_bytes()));
    assert_eq!(answer["bytes"], GUIDE_REQUEST.len());
    assert_eq!(answer["tenant_id"], "tenant-123");
    assert_eq!(answer["model_pool"], "model-a");
    assert_eq!(answer["format"], "kms-direct-v1");
    assert_eq!(answer["request_id"], "req-guide-1");
    assert_eq!(reply.header("x-region"), Some("us-east-1"));
    assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    assert_eq!(reply.header("x-request-id"), Some("req-guide-1"));
    let dialed = reply.header("x-gpulink-endpoint").expect("endpoint header");
    assert!(
        world
            .layout
            .enis()
            .iter()
            .any(|ip| dialed == format!("{ip}:8443")),
        "{dialed}"
    );
    let stats = world.sim.all_stats();
    assert_eq!(stats.iter().map(|s| s.ok).sum::<u64>(), 1);
    assert_eq!(stats.iter().map(|s| s.plaintext_seen).sum::<u64>(), 0);
    assert_eq!(stats.iter().map(|s| s.decrypt_failures).sum::<u64>(), 0);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_headers_come_from_configuration_only() {
    let world = World::with(ProxyOptions::default()).await;
    let reply = world
        .post(
            "/inference",
            GUIDE_REQUEST,
            &[
                ("x-tenant-id", "someone-else"),
                (
                    "x-kms-key-id",
                    "arn:aws:kms:us-east-1:999999999999:key/evil",
                ),
                ("x-encryption-format", "none"),
                ("x-gpulink-route", "public"),
                ("x-model-pool", "model-b"),
            ],
        )
        .await;
    reply.assert_status(200);
    let answer = reply.json();
    assert_eq!(answer["tenant_id"], "tenant-123");
    assert_eq!(answer["model_pool"], "model-b");
    assert_eq!(answer["key_id"], world.key_arn);
    assert_eq!(answer["content_type"], "application/octet-stream");
    assert_eq!(answer["format"], "kms-direct-v1");
    // A request id is made when the app sends none, and echoed.
    let id = reply.header("x-request-id").expect("request id");
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(answer["request_id"], id);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_never_reach_kms_or_the_cluster() {
    let world = World::with(
        ProxyOptions::default()
            .count_kms()
            .set("listen.max_body", "2KB"),
    )
    .await;
    let relay = world.kms_relay.as_ref().expect("relay");
    // The start-up KMS proof has been made; from here on, count what requests cause.
    let kms_calls = || world.proxy().proxy().keys().stats().calls();
    let (proof_connections, proof_calls) = (relay.count(), kms_calls());
    assert!(proof_calls >= 1, "the start-up proof reached KMS");

    let not_json = world.post("/inference", "{\"prompt\": ", &[]).await;
    assert_eq!(not_json.status, 400);
    assert_eq!(not_json.error_code(), "invalid_json");

    let get = send(
        &world.client,
        "GET",
        &world.url("/inference"),
        Vec::new(),
        &[],
    )
    .await;
    assert_eq!(get.status, 405);
    assert_eq!(get.error_code(), "method_not_allowed");

    let big = format!("{{\"prompt\": \"{}\"}}", "x".repeat(3000));
    let too_large = world.post("/inference", &big, &[]).await;
    assert_eq!(too_large.status, 413);
    assert_eq!(too_large.error_code(), "body_too_large");

    let pool = world
        .post("/inference", GUIDE_REQUEST, &[("x-model-pool", "model-z")])
        .await;
    assert_eq!(pool.status, 400);
    assert_eq!(pool.error_code(), "model_pool_not_allowed");

    assert_eq!(
        (relay.count(), kms_calls()),
        (proof_connections, proof_calls),
        "a refused request reached KMS"
    );
    assert_eq!(
        world.total_requests(),
        0,
        "a refused request reached the cluster"
    );

    // The counters do count: a good request reaches both.
    let ok = world.post("/inference", GUIDE_REQUEST, &[]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(kms_calls(), proof_calls + 1);
    assert_eq!(world.total_requests(), 1);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_kms_limit_is_refused_with_the_limit_named() {
    let world = World::with(ProxyOptions::default()).await;
    let big = format!("{{\"prompt\": \"{}\"}}", "x".repeat(5000));
    let reply = world.post("/inference", &big, &[]).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.error_code(), "body_too_large");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("4096"), "{message}");
    assert_eq!(world.total_requests(), 0);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_unreachable_fails_closed() {
    // A port nothing listens on.
    let dead_kms = format!("http://127.0.0.1:{}", free_port());
    let world = World::with(ProxyOptions::default().kms_url(dead_kms)).await;
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error_code(), "kms_unavailable");
    assert_eq!(
        world.total_requests(),
        0,
        "something was sent without encryption"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_context_mode_is_detected_by_the_cluster() {
    // context = "none" seals exactly as the guide's example: the cluster opens it
    // without a context.
    let world = World::with(ProxyOptions::default().set("kms.context", "none")).await;
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    reply.assert_status(200);
    let stats = world.sim.all_stats();
    assert_eq!(stats.iter().map(|s| s.context_none).sum::<u64>(), 1);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_eni_down_is_served_by_another() {
    let world = World::with(ProxyOptions::default()).await;
    let [down, ..] = world.layout.enis();
    world
        .set_state(down, gpulink_sim::EndpointState::Down)
        .await;
    // Before health notices, a request routed to the dead ENI fails to connect and is
    // retried elsewhere; after, the ENI is skipped. Either way: no error.
    for i in 0..12 {
        let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
        assert_eq!(
            reply.status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_ne!(
            reply.header("x-gpulink-endpoint"),
            Some(format!("{down}:8443").as_str())
        );
        assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    }
    world.wait_serving(down, false).await;
    for _ in 0..6 {
        let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(world.requests_at(down), 0);
    world.stop().await;
}

async fn all_enis_down(world: &World) {
    for ip in world.layout.enis() {
        world.set_state(ip, gpulink_sim::EndpointState::Down).await;
    }
    for ip in world.layout.enis() {
        world.wait_serving(ip, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_enis_down_falls_back_to_public_in_phase_privatelink() {
    let world = World::with(ProxyOptions::default().set(
        "migration.public_fallback_until",
        "2999-01-01T00:00:00+00:00",
    ))
    .await;
    all_enis_down(&world).await;
    for _ in 0..5 {
        let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
        reply.assert_status(200);
        assert_eq!(reply.header("x-gpulink-route"), Some("public"));
        assert_eq!(
            reply.header("x-gpulink-endpoint"),
            Some(format!("{}:8443", world.layout.public()).as_str())
        );
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_enis_down_after_the_fallback_window_is_503() {
    let world = World::with(ProxyOptions::default().set(
        "migration.public_fallback_until",
        "2020-01-01T00:00:00+00:00",
    ))
    .await;
    all_enis_down(&world).await;
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error_code(), "no_endpoint");
    assert_eq!(world.requests_at(world.layout.public()), 0);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_enis_down_in_privatelink_only_is_503() {
    let world =
        World::with(ProxyOptions::default().set("migration.phase", "privatelink-only")).await;
    all_enis_down(&world).await;
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error_code(), "no_endpoint");
    assert_eq!(world.total_requests(), 0);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_public_sends_everything_public() {
    let world = World::with(ProxyOptions::default().set("migration.phase", "public")).await;
    for _ in 0..5 {
        let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-gpulink-route"), Some("public"));
    }
    for ip in world.layout.enis() {
        assert_eq!(world.requests_at(ip), 0);
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificate_name_is_refused_and_nothing_is_sent() {
    let world = World::with(
        ProxyOptions::default()
            .set("upstream.server_name", "not-the-cluster.example.com")
            .set("migration.phase", "privatelink-only"),
    )
    .await;
    // The data-path check found the wrong name before any request: nothing can serve.
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    reply.assert_status(503);
    assert_eq!(reply.error_code(), "no_endpoint");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("wrong server name"), "{message}");
    let generation = world.proxy().proxy().current();
    for endpoint in generation
        .endpoints
        .iter()
        .filter(|e| e.kind() == gpulink::config::RouteKind::Privatelink)
    {
        let diagnosis = endpoint.data_path_snapshot().diagnosis.unwrap_or_default();
        assert!(
            diagnosis.contains("not-the-cluster.example.com"),
            "{diagnosis}"
        );
    }
    assert_eq!(world.total_requests(), 0);
    world.stop().await;
}
