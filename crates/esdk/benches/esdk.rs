//! The codec alone (`cargo bench -p gpulink-esdk`): sealing and opening one message at
//! 0 B, 1 KiB and 64 KiB. Below one frame the time is the per-message cost (key
//! derivation, commitment, header authentication, one frame), which is what a typical
//! inference request pays; the 64 KiB case shows where AES-GCM itself takes over. The
//! whole seal step as a request runs it (cache, context, runtime) is `benches/seal.rs`
//! in the root package. Defaults keep the run short on a 2-core machine; command-line
//! flags override them. Results: BENCHMARKS.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use gpulink_esdk::{EncryptedDataKey, EncryptionContext};

const SIZES: [(usize, &str); 3] = [(0, "0B"), (1024, "1KiB"), (64 * 1024, "64KiB")];

fn context() -> EncryptionContext {
    [("tenant_id", "tenant-123"), ("model_pool", "model-a")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn edk() -> EncryptedDataKey {
    EncryptedDataKey {
        provider_id: "aws-kms".into(),
        provider_info: b"arn:aws:kms:us-east-1:111122223333:key/bench".to_vec(),
        ciphertext: vec![0xAB; 184], // the size of a real KMS CiphertextBlob
    }
}

fn bench_codec(c: &mut Criterion) {
    let key = [7u8; 32];
    let edks = [edk()];
    let ctx = context();
    let mut group = c.benchmark_group("esdk");
    for (len, name) in SIZES {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("encrypt", name), &data, |b, data| {
            b.iter(|| {
                black_box(
                    gpulink_esdk::encrypt(&key, &edks, &ctx, data, gpulink_esdk::DEFAULT_FRAME_LEN)
                        .expect("encrypt"),
                )
            })
        });
        let message =
            gpulink_esdk::encrypt(&key, &edks, &ctx, &data, gpulink_esdk::DEFAULT_FRAME_LEN)
                .expect("encrypt");
        group.bench_with_input(BenchmarkId::new("decrypt", name), &message, |b, message| {
            b.iter(|| {
                black_box(
                    gpulink_esdk::decrypt_expecting_context(&key, message, &ctx).expect("decrypt"),
                )
            })
        });
    }
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    bench_codec(&mut criterion);
    criterion.final_summary();
}
