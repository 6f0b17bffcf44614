//! Zone-aware routing end to end: the host's zone from a stand-in instance metadata
//! service (IMDSv2: a PUT for a token, then GETs that must carry it) or from
//! `[placement] zone`, the three local ENIs each in a zone of their own, and the
//! traffic counted at the simulator. Same-zone preference, spill-over when the
//! same-zone ENI goes down or slow, and zone-blind routing when no zone is known.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;

use crate::common::*;
use gpulink_sim::EndpointState;

const TOKEN: &str = "imds-token-for-the-test";

/// A stand-in IMDSv2 on loopback: counts the calls; answers placement only with the
/// token its PUT handed out. `answer: false` accepts connections and never answers.
struct Imds {
    url: String,
    tokens: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Imds {
    async fn start(
        ip: IpAddr,
        zone_id: &'static str,
        zone_name: &'static str,
        answer: bool,
    ) -> Imds {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .expect("bind imds");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (tokens, reads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (t, r) = (tokens.clone(), reads.clone());
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                if !answer {
                    held.push(stream);
                    continue;
                }
                let (t, r) = (t.clone(), r.clone());
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (t, r) = (t.clone(), r.clone());
                    async move {
                        let ttl = req
                            .headers()
                            .get("x-aws-ec2-metadata-token-ttl-seconds")
                            .cloned();
                        let header =
                            |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
                        let (status, body) = match (req.method().as_str(), req.uri().path()) {
                            ("PUT", "/latest/api/token")
                                if header("x-aws-ec2-metadata-token-ttl-seconds").is_some() =>
                            {
                                t.fetch_add(1, Ordering::SeqCst);
                                (200, TOKEN)
                            }
                            ("GET", path) if header("x-aws-ec2-metadata-token") == Some(TOKEN) => {
                                r.fetch_add(1, Ordering::SeqCst);
                                match path {
                                    "/latest/meta-data/placement/availability-zone-id" => {
                                        (200, zone_id)
                                    }
                                    "/latest/meta-data/placement/availability-zone" => {
                                        (200, zone_name)
                                    }
                                    _ => (404, ""),
                                }
                            }
                            _ => (401, ""),
                        };
                        let mut answer = hyper::Response::builder().status(status);
                        // IMDS echoes the token's lifetime; the SDK reads it.
                        if let Some(ttl) = ttl {
                            answer = answer.header("x-aws-ec2-metadata-token-ttl-seconds", ttl);
                        }
                        answer.body(Full::new(Bytes::from_static(body.as_bytes())))
                    }
                });
                spawn_http1(stream, service);
            }
        });
        Imds {
            url,
            tokens,
            reads,
            task,
        }
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The three local ENIs as endpoint tables in zones use1-az1, use1-az2, use1-az4.
fn zoned_enis(world_layout: &Layout) -> serde_json::Value {
    let zones = ["use1-az1", "use1-az2", "use1-az4"];
    serde_json::Value::Array(
        world_layout
            .enis()
            .iter()
            .zip(zones)
            .map(|(ip, zone)| serde_json::json!({ "address": format!("{ip}:8443"), "zone": zone }))
            .collect(),
    )
}

fn zoned(block: u8, options: ProxyOptions) -> ProxyOptions {
    options.set("regions.0.privatelink", zoned_enis(&Layout::new(block)))
}

/// `gpulink_privatelink_locality_total{locality}` from `/metrics` (0 when absent).
async fn locality_count(world: &World, locality: &str) -> u64 {
    let metrics = world.admin("/metrics").await;
    let prefix = format!("gpulink_privatelink_locality_total{{locality=\"{locality}\"}} ");
    String::from_utf8_lossy(&metrics.body)
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Sends `n` requests one after another; all must succeed.
async fn send_all(world: &World, n: usize) {
    for _ in 0..n {
        world
            .post("/inference", GUIDE_REQUEST, &[])
            .await
            .assert_status(200);
    }
}

/// A stand-in IMDS on a block of its own that places the host in use1-az2 (us-east-1b),
/// or (`answer: false`) never answers, and a proxy on the zoned layout that asks it.
async fn asking_imds(answer: bool) -> (Imds, World) {
    let block = next_block();
    let ip = Layout::new(block).ip(0, 2);
    let imds = Imds::start(ip, "use1-az2", "us-east-1b", answer).await;
    let options = zoned(block, ProxyOptions::default().imds_url(&imds.url));
    let world = World::start(block, options).await;
    (imds, world)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_imds_zone_gets_the_traffic_and_it_spills_when_that_eni_goes_down() {
    let (imds, world) = asking_imds(true).await;
    let [a, b, c] = world.layout.enis();
    // One token, then the id and the name with it.
    assert!((1..=2).contains(&imds.tokens.load(Ordering::SeqCst)));
    assert_eq!(imds.reads.load(Ordering::SeqCst), 2);
    let placement = &world.status().await["placement"];
    assert_eq!(placement["zone"], "use1-az2", "{placement}");
    assert_eq!(placement["alias"], "us-east-1b");
    assert_eq!(placement["source"], "imds");

    let before = [a, b, c].map(|ip| world.requests_at(ip));
    send_all(&world, 40).await;
    assert_eq!(
        world.requests_at(b) - before[1],
        40,
        "the same-zone ENI got every request"
    );
    assert_eq!(world.requests_at(a), before[0]);
    assert_eq!(world.requests_at(c), before[2]);
    assert_eq!(locality_count(&world, "same_zone").await, 40);
    assert_eq!(locality_count(&world, "cross_zone").await, 0);

    // The same-zone ENI goes down: the other local zones carry everything, nothing fails.
    world.set_state(b, EndpointState::Down).await;
    world.wait_serving(b, false).await;
    let (a0, c0) = (world.requests_at(a), world.requests_at(c));
    send_all(&world, 40).await;
    let (da, dc) = (world.requests_at(a) - a0, world.requests_at(c) - c0);
    assert_eq!(da + dc, 40);
    assert!(
        da > 0 && dc > 0,
        "spill went to both other zones: {da} / {dc}"
    );
    // The spilled requests are counted as crossing zones, the earlier ones stay same-zone.
    assert_eq!(locality_count(&world, "cross_zone").await, 40);
    assert_eq!(locality_count(&world, "same_zone").await, 40);
    // Back: its latency estimate (peak EWMA) fades while it is idle, and the zone
    // takes the traffic again.
    world.set_state(b, EndpointState::Healthy).await;
    world.wait_serving(b, true).await;
    let b0 = world.requests_at(b);
    assert_eventually!(
        {
            send_all(&world, 1).await;
            world.requests_at(b) - b0
        },
        |got| *got > 0,
        "the recovered same-zone ENI never got traffic again"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_same_zone_eni_spills_to_the_other_zones() {
    let block = next_block();
    let layout = Layout::new(block);
    let [a, b, c] = layout.enis();
    let world = World::start(
        block,
        zoned(
            block,
            ProxyOptions::default().set("placement.zone", "use1-az1"),
        ),
    )
    .await;
    assert_eq!(world.status().await["placement"]["source"], "config");
    // Warm the others' latency estimates: with the zone healthy they get nothing, so
    // take the zone out for a moment.
    world.set_state(a, EndpointState::Down).await;
    world.wait_serving(a, false).await;
    send_all(&world, 10).await;
    world
        .set_state(a, EndpointState::Slow { delay_ms: 400 })
        .await;
    world.wait_serving(a, true).await;
    let before = [a, b, c].map(|ip| world.requests_at(ip));
    send_all(&world, 30).await;
    let got = [a, b, c].map(|ip| world.requests_at(ip));
    let slow_share = got[0] - before[0];
    assert!(
        slow_share < 10,
        "the slow same-zone ENI got {slow_share} of 30"
    );
    assert!(
        got[1] > before[1] && got[2] > before[2],
        "{before:?} -> {got:?}"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_zone_known_spreads_as_before_and_a_silent_imds_costs_one_deadline() {
    // The harness disables IMDS (AWS_EC2_METADATA_DISABLED): no host zone.
    let block = next_block();
    let world = World::start(block, zoned(block, ProxyOptions::default())).await;
    let placement = &world.status().await["placement"];
    assert_eq!(placement["source"], "none", "{placement}");
    assert!(placement["note"]
        .as_str()
        .unwrap_or("")
        .contains("AWS_EC2_METADATA_DISABLED"));
    send_all(&world, 60).await;
    for ip in world.layout.enis() {
        assert!(
            world.requests_at(ip) > 0,
            "{ip} got nothing: zones were not ignored"
        );
    }
    assert_eq!(world.status().await["endpoints"][0]["locality"], "unknown");
    // No host zone: every attempt is of unknown locality, none same or cross zone.
    assert!(locality_count(&world, "unknown").await >= 60);
    assert_eq!(locality_count(&world, "same_zone").await, 0);
    assert_eq!(locality_count(&world, "cross_zone").await, 0);
    world.stop().await;

    // A metadata service that accepts and never answers: the proxy starts without a
    // zone once the one deadline passes (the test would hang on a retry loop).
    let (_silent, world) = asking_imds(false).await;
    let placement = &world.status().await["placement"];
    assert_eq!(placement["source"], "none", "{placement}");
    assert!(
        placement["note"]
            .as_str()
            .unwrap_or("")
            .contains("did not answer"),
        "{placement}"
    );
    send_all(&world, 30).await;
    let spread = world
        .layout
        .enis()
        .iter()
        .filter(|ip| world.requests_at(**ip) > 0)
        .count();
    assert!(spread >= 2, "zone-blind routing uses every ENI");
    world.stop().await;
}
