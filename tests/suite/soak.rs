//! The soak: `gpulink sim`, moto and `gpulink run` as separate processes, steady load from
//! several clients, and, round after round, every ENI failure the simulator knows (down,
//! blackhole, slow, back to healthy) and SIGHUP reloads through every migration phase.
//!
//! Asserted: **no lost request**: every request gets an answer; a failure is allowed only
//! when the cluster may have started the request (the simulator saw it: it must not be
//! replayed), never `no_endpoint` (one ENI fails at a time and the others stay healthy),
//! never a request the cluster did not see; no request is delivered twice; and the proxy's
//! RSS after the last round is within 5 % of its RSS after the two warm-up rounds.
//!
//! `soak_short` is the short version (two warm-up rounds and two more), in the normal
//! suite. `soak_long` is the documented soak:
//! `scripts/soak.sh [seconds]` (default 600), which sets `GPULINK_SOAK_SECS`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{alone, assert_eventually, next_block};
use crate::reliability::*;

/// One request that did not get a 200.
#[derive(Debug, Clone)]
struct Failure {
    id: String,
    answer: Result<(u16, String), String>,
}

struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<Failure>>>,
    ok_ids: Arc<Mutex<Vec<String>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(d: &Arc<Deployment>, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let ok_ids = Arc::new(Mutex::new(Vec::new()));
        let mut workers = Vec::new();
        for w in 0..clients {
            let (d, stop, ok, sent) = (d.clone(), stop.clone(), ok.clone(), sent.clone());
            let (failures, ok_ids) = (failures.clone(), ok_ids.clone());
            workers.push(tokio::spawn(async move {
                // Bounded even if never told to stop.
                for n in 0..10_000_000u64 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let id = format!("soak-{w}-{n}");
                    sent.fetch_add(1, Ordering::SeqCst);
                    match d.post(&id).await {
                        Ok(reply) if reply.status == 200 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            // A sample for the no-replay check.
                            if n % 50 == 0 {
                                ok_ids.lock().expect("ids").push(id);
                            }
                        }
                        Ok(reply) => {
                            let code = serde_json::from_slice::<serde_json::Value>(&reply.body)
                                .ok()
                                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                                .unwrap_or_else(|| {
                                    format!(
                                        "(not a JSON error: {})",
                                        String::from_utf8_lossy(&reply.body)
                                    )
                                });
                            failures.lock().expect("failures").push(Failure {
                                id,
                                answer: Ok((reply.status, code)),
                            });
                        }
                        Err(e) => failures
                            .lock()
                            .expect("failures")
                            .push(Failure { id, answer: Err(e) }),
                    }
                }
            }));
        }
        Load {
            stop,
            ok,
            sent,
            failures,
            ok_ids,
            workers,
        }
    }

    /// Waits (bounded) until `n` more requests have succeeded.
    async fn progress(&self, n: u64, during: &str) {
        let target = self.ok.load(Ordering::SeqCst) + n;
        assert_eventually!(
            within = Duration::from_secs(60),
            self.ok.load(Ordering::SeqCst),
            |ok| *ok >= target,
            "the load made no progress during {during}"
        );
    }

    async fn finish(self) -> (u64, u64, Vec<Failure>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            let _ = w.await;
        }
        let failures = self.failures.lock().expect("failures").clone();
        let ok_ids = self.ok_ids.lock().expect("ids").clone();
        (
            self.sent.load(Ordering::SeqCst),
            self.ok.load(Ordering::SeqCst),
            failures,
            ok_ids,
        )
    }
}

/// One round: each ENI fails in one way and recovers, one at a time, and the proxy is
/// reloaded through every phase by SIGHUP, all under load.
async fn round(d: &Deployment, load: &Load, reloads: &mut u64) {
    let enis = d.cluster.layout.enis();
    let faults = [
        (enis[0], r#"{"state":"down"}"#),
        (enis[1], r#"{"state":"blackhole"}"#),
        (enis[2], r#"{"state":"slow","delay_ms":300}"#),
    ];
    for (ip, fault) in faults {
        d.set_state(ip, fault).await;
        load.progress(40, fault).await;
        d.set_state(ip, r#"{"state":"healthy"}"#).await;
        load.progress(40, "recovery").await;
    }
    for phase in ["canary", "public", "privatelink"] {
        d.write_phase(phase);
        signal(&d.proxy.0, "HUP");
        *reloads += 1;
        d.wait_reloads(*reloads).await;
        load.progress(40, phase).await;
    }
}

async fn soak(block: u8, duration: Duration) {
    // Four clients and failure rounds load the machine: no other test's health checks
    // should time out because of it.
    let _alone = alone().await;
    let d = Arc::new(Deployment::start(block, "privatelink").await);
    let load = Load::start(&d, 4);
    let started = Instant::now();
    let mut reloads = 0;

    // Warm-up: two rounds fill the pools, the allocator's arenas and the metrics series.
    for _ in 0..2 {
        round(&d, &load, &mut reloads).await;
    }
    let warm_rss = rss_kib(d.pid()).expect("proxy RSS");
    let mut rounds = 2;
    // At least two rounds after the warm-up; then as many as the duration allows.
    while rounds < 4 || (started.elapsed() < duration && rounds < 100_000) {
        round(&d, &load, &mut reloads).await;
        rounds += 1;
    }
    let final_rss = rss_kib(d.pid()).expect("proxy RSS");
    let (sent, ok, failures, ok_ids) = load.finish().await;
    eprintln!(
        "soak: {rounds} rounds in {:?}, {sent} requests, {ok} ok, {} failed; RSS {warm_rss} KiB after warm-up, {final_rss} KiB at the end",
        started.elapsed(),
        failures.len()
    );

    // Every failure: an answer, and only for a request the cluster may have started.
    let mut lost = Vec::new();
    for f in &failures {
        let deliveries = d.deliveries(&f.id).await;
        eprintln!("soak: {f:?}, seen by the cluster {deliveries} times");
        let allowed = match &f.answer {
            Ok((status, code)) => {
                deliveries == 1
                    && matches!(code.as_str(), "upstream_timeout" | "upstream_connect")
                    && matches!(status, 502 | 504)
            }
            Err(_) => false,
        };
        if !allowed {
            lost.push(format!("{f:?} (the cluster saw it {deliveries} times)"));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {sent} requests were lost or failed although the cluster never started them: {:#?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    // No replays: a sample of the served requests reached the cluster exactly once.
    for id in ok_ids.iter().take(300) {
        assert_eq!(
            d.deliveries(id).await,
            1,
            "{id} was delivered more than once"
        );
    }
    assert!(
        final_rss * 100 <= warm_rss * 105,
        "RSS grew from {warm_rss} KiB after warm-up to {final_rss} KiB after {rounds} rounds"
    );
    let status = d.status().await;
    assert_eq!(status["reloads"]["rejected"], 0, "{status}");
}

// Once ignored: a run on a tree without "Simulator serves the protocol ALPN chose"
// (f36eae6) reported requests the cluster saw twice when an ENI went `down`. It has not
// recurred since (14 runs, 3 of them pinned to one CPU); h2 0.4 fails only streams above
// a GOAWAY's last-stream-id (or opened after it) with the GOAWAY error, and the simulator
// refuses (REFUSED_STREAM) only before it counts a delivery, so a retried refusal is
// never a replay. If it fails again, the proxy's warn log
// (GPULINK_TEST_PROXY_LOG=warn) names each retried attempt and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_short() {
    soak(next_block(), Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run with scripts/soak.sh [seconds]"]
async fn soak_long() {
    let secs = std::env::var("GPULINK_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    soak(next_block(), Duration::from_secs(secs)).await;
}
