//! Sealing benchmarks (`cargo bench --bench seal`): throughput of the `aws-esdk` seal with
//! a warm data-key cache at 1 KiB, 64 KiB, 1 MiB and 10 MiB, next to a plain AES-256-GCM
//! baseline measured in the same run (copy the plaintext into a fresh buffer and encrypt
//! it in place under one nonce: the least any sealing can do), and the KMS calls per
//! 10,000 requests the data-key cache makes at steady state.
//!
//! Development keys stand in for KMS, so no network is involved: the numbers are CPU.
//! Defaults keep the run short on a 2-core machine (warm-up 1 s, measurement 3 s,
//! 20 samples); command-line flags override them. Results: BENCHMARKS.md.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use criterion::{BenchmarkId, Criterion, Throughput};
use gpulink::config::Config;
use gpulink::seal::esdk::{self, EncryptedDataKey};
use gpulink::seal::{CacheLimits, DataKeyCache, DevKeys, EncryptionContext, KeyService, Sealer};

const SIZES: [(usize, &str); 4] = [
    (1024, "1KiB"),
    (64 * 1024, "64KiB"),
    (1024 * 1024, "1MiB"),
    (10 * 1024 * 1024, "10MiB"),
];

const CONFIG: &str = r#"
[tenant]
id = "tenant-123"
model_pool = "model-a"
[kms]
key_id = "arn:aws:kms:us-east-1:111122223333:key/bench"
region = "us-east-1"
format = "aws-esdk"
[upstream]
server_name = "gpu.internal"
max_body = "100MB"
[[regions]]
name = "us-east-1"
privatelink = ["10.0.0.1"]
"#;

fn dev_keys() -> KeyService {
    KeyService::Dev(Arc::new(DevKeys::new().expect("development keys")))
}

fn sealer() -> Sealer {
    let config = Config::from_toml(CONFIG, Path::new("bench.toml")).expect("bench config");
    Sealer::new(gpulink::seal_settings(&config), dev_keys())
}

fn context() -> EncryptionContext {
    gpulink::seal::encryption_context(
        gpulink::config::ContextMode::Tenant,
        "tenant-123",
        "model-a",
    )
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn bench_seal(c: &mut Criterion) {
    let current_thread = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let multi_thread = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sealer = Arc::new(sealer());
    // Warm the cache: the first seal fetches the data key.
    current_thread
        .block_on(sealer.seal(b"{}", "model-a"))
        .expect("warm-up seal");

    let key = [7u8; 32];
    let edk = EncryptedDataKey {
        provider_id: "aws-kms".into(),
        provider_info: b"arn:aws:kms:us-east-1:111122223333:key/bench".to_vec(),
        ciphertext: vec![0xAB; 184], // the size of a real KMS CiphertextBlob
    };
    let ctx = context();
    let gcm = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("AES key"));

    let mut group = c.benchmark_group("seal");
    for (len, name) in SIZES {
        let data = plaintext(len);
        group.throughput(Throughput::Bytes(len as u64));
        if len >= 1024 * 1024 {
            group.sample_size(10);
        }

        group.bench_with_input(
            BenchmarkId::new("aes_gcm_baseline", name),
            &data,
            |b, data| {
                b.iter(|| {
                    let mut out = Vec::with_capacity(data.len() + 16);
                    out.extend_from_slice(data);
                    let tag = gcm
                        .seal_in_place_separate_tag(
                            Nonce::assume_unique_for_key([0u8; 12]),
                            Aad::empty(),
                            &mut out,
                        )
                        .expect("seal");
                    out.extend_from_slice(tag.as_ref());
                    black_box(out)
                })
            },
        );

        group.bench_with_input(BenchmarkId::new("esdk_encrypt", name), &data, |b, data| {
            b.iter(|| {
                black_box(
                    esdk::encrypt(
                        &key,
                        std::slice::from_ref(&edk),
                        &ctx,
                        data,
                        esdk::DEFAULT_FRAME_LEN,
                    )
                    .expect("encrypt"),
                )
            })
        });

        // The whole seal step as a request runs it: context, cache lookup, size checks,
        // encryption; inline on a current-thread runtime.
        group.bench_with_input(BenchmarkId::new("sealer", name), &data, |b, data| {
            b.iter_custom(|iters| {
                current_thread.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(sealer.seal(data, "model-a").await.expect("seal"));
                    }
                    start.elapsed()
                })
            })
        });

        // The same on a worker of the multi-threaded runtime `gpulink run` uses, where
        // bodies from 256 KiB up go through `block_in_place`.
        let data = Arc::new(data);
        group.bench_function(BenchmarkId::new("sealer_worker", name), |b| {
            b.iter_custom(|iters| {
                let sealer = sealer.clone();
                let data = data.clone();
                multi_thread.block_on(async move {
                    tokio::spawn(async move {
                        let start = Instant::now();
                        for _ in 0..iters {
                            black_box(sealer.seal(&data, "model-a").await.expect("seal"));
                        }
                        start.elapsed()
                    })
                    .await
                    .expect("task")
                })
            })
        });
    }
    group.finish();

    // What `block_in_place` costs, to place the threshold: each iteration yields (so the
    // worker gets its core back, as between two requests) with and without handing the
    // core over once.
    for (name, block) in [("yield_only", false), ("yield_and_block_in_place", true)] {
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                multi_thread.block_on(async move {
                    tokio::spawn(async move {
                        let start = Instant::now();
                        for _ in 0..iters {
                            if block {
                                tokio::task::block_in_place(|| black_box(()));
                            }
                            tokio::task::yield_now().await;
                        }
                        start.elapsed()
                    })
                    .await
                    .expect("task")
                })
            })
        });
    }
}

/// KMS `GenerateDataKey` calls per 10,000 requests at steady state, counted by the
/// cache's own counters, with the default limits (max_messages 100000, max_age 5m,
/// max_bytes 10GiB) and 1 KiB bodies. Only the cache is exercised (its lookups are what
/// decides the calls; encryption does not), so millions of requests take well under a
/// second. The age limit does not bind here (the run is far shorter than 5 minutes);
/// see BENCHMARKS.md for the age-bound rate at a given request rate.
fn kms_calls_per_10k() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let defaults = gpulink::config::KeyCache::default();
    let limits = CacheLimits::from_config(&defaults);
    let cache = DataKeyCache::new(
        dev_keys(),
        "arn:aws:kms:us-east-1:111122223333:key/bench",
        limits,
    );
    let ctx = context();
    const WARM_UP: u64 = 1_000;
    const REQUESTS: u64 = 1_500_000;
    let started = Instant::now();
    let (before, after) = runtime.block_on(async {
        for _ in 0..WARM_UP {
            cache.acquire(&ctx, 1024).await.expect("acquire");
        }
        let before = cache.counters().kms_calls();
        for i in 0..REQUESTS {
            cache.acquire(&ctx, 1024).await.expect("acquire");
            if i % 4096 == 0 {
                // Let a background refresh task run, as a busy runtime would.
                tokio::task::yield_now().await;
            }
        }
        tokio::task::yield_now().await;
        (before, cache.counters().kms_calls())
    });
    let calls = after - before;
    let counters = cache.counters();
    println!(
        "kms_calls_per_10k: {calls} GenerateDataKey calls for {REQUESTS} requests at steady \
         state = {:.3} per 10,000 requests (cache: {} hits, {} misses, {} background \
         refreshes; limits max_messages={} max_age={:?}; {:.0} ns per lookup)",
        calls as f64 * 10_000.0 / REQUESTS as f64,
        counters.hits(),
        counters.misses(),
        counters.refreshes(),
        limits.max_messages,
        limits.max_age,
        started.elapsed().as_nanos() as f64 / (WARM_UP + REQUESTS) as f64,
    );
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .configure_from_args();
    bench_seal(&mut criterion);
    kms_calls_per_10k();
    criterion.final_summary();
}
