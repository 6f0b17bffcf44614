//! The request-path workers (`[runtime] workers`, `src/runtime.rs`): every worker gets
//! its own bound socket and serves, and serving, reloading and draining across workers
//! lose no request.

use std::time::Duration;

use crate::common::*;
use gpulink_sim::EndpointState;

fn in_flight(world: &World) -> u64 {
    world
        .proxy()
        .proxy()
        .current()
        .endpoints
        .iter()
        .map(|e| e.in_flight())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_bind_serve_reload_and_drain_without_a_failed_request() {
    let mut world = World::with(ProxyOptions::default().set("runtime.workers", 2)).await;
    let doc = world.status().await;
    assert_eq!(doc["runtime"]["workers"], 2, "{}", doc["runtime"]);
    assert_eq!(doc["runtime"]["listener_sockets"], 2, "{}", doc["runtime"]);

    // Serving: 32 connections at once; the kernel spreads them over both sockets (all
    // 32 on one of two has a chance of 2^-31).
    let (ok, failed) = world.load(96, 32).await;
    assert_eq!((ok, failed), (96, 0));
    let doc = world.status().await;
    let by_worker: Vec<u64> = doc["runtime"]["connections_by_worker"]
        .as_array()
        .expect("connections_by_worker")
        .iter()
        .map(|n| n.as_u64().expect("a count"))
        .collect();
    assert_eq!(by_worker.len(), 2, "{by_worker:?}");
    assert!(
        by_worker.iter().all(|&n| n > 0),
        "every worker accepts connections: {by_worker:?}"
    );

    // Reloading under load: no request fails, and the worker count (restart only) stays.
    let proxy = world.proxy().proxy().clone();
    let generation = proxy.current().number;
    let reloads = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                let mut config = (*proxy.current().config).clone();
                config.runtime.workers = 1;
                proxy.reload(config).await.expect("reload");
            }
        })
    };
    let (ok, failed) = world.load(120, 8).await;
    reloads.await.expect("reloads");
    assert_eq!((ok, failed), (120, 0));
    assert_eq!(proxy.current().number, generation + 3);
    assert_eq!(proxy.current().config.runtime.workers, 2);
    assert_eq!(world.status().await["runtime"]["workers"], 2);

    // Draining: requests in flight on both workers when the shutdown starts all finish.
    for ip in world.layout.enis() {
        world
            .set_state(ip, EndpointState::Slow { delay_ms: 300 })
            .await;
    }
    let mut in_flight_requests = tokio::task::JoinSet::new();
    for _ in 0..8 {
        // A client each: eight connections, spread over the workers.
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let url = world.url("/inference");
        in_flight_requests
            .spawn(async move { send(&client, "POST", &url, GUIDE_REQUEST.into(), &[]).await });
    }
    assert_eventually!(
        in_flight(&world),
        |n| *n == 8,
        "the eight requests never were all in flight"
    );
    let listen_addr = world.proxy().listen_addr;
    let shutdown = tokio::spawn(world.proxy.take().expect("proxy").shutdown());
    while let Some(reply) = in_flight_requests.join_next().await {
        reply.expect("client task").assert_status(200);
    }
    tokio::time::timeout(Duration::from_secs(30), shutdown)
        .await
        .expect("shutdown ends")
        .expect("shutdown task");
    // Every worker's socket is closed.
    assert!(tokio::net::TcpStream::connect(listen_addr).await.is_err());
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_is_one_socket() {
    let world = World::with(ProxyOptions::default().set("runtime.workers", 1)).await;
    let (ok, failed) = world.load(20, 4).await;
    assert_eq!((ok, failed), (20, 0));
    let doc = world.status().await;
    assert_eq!(doc["runtime"]["workers"], 1, "{}", doc["runtime"]);
    assert_eq!(doc["runtime"]["listener_sockets"], 1, "{}", doc["runtime"]);
    let by_worker = doc["runtime"]["connections_by_worker"]
        .as_array()
        .expect("connections_by_worker")
        .clone();
    assert_eq!(by_worker.len(), 1);
    assert!(
        by_worker[0].as_u64().expect("a count") >= 4,
        "{by_worker:?}"
    );
    world.stop().await;
}
