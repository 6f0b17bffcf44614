//! The fuzz targets on the stable toolchain, short and deterministic, so CI exercises
//! them: each target's seed corpus (`fuzz/corpus/<target>/`) and a bounded number of
//! mutations of it (bit flips, byte changes, insertions, deletions, truncations, chunk
//! copies and splices of two seeds, from a fixed-seed generator) go through the very
//! checks the cargo-fuzz targets run (`fuzz/checks/*.rs`, included here by path). A
//! panic is a failure; the input is printed, hex, to replay with
//! `cargo fuzz run <target>`. The long, coverage-guided run is `scripts/fuzz.sh`.

use std::path::PathBuf;

#[path = "../../fuzz/checks/config.rs"]
mod config_target;
#[path = "../../fuzz/checks/esdk.rs"]
mod esdk_target;
#[path = "../../fuzz/checks/health.rs"]
mod health_target;
#[path = "../../fuzz/checks/request_head.rs"]
mod request_head_target;

/// The request_head target's proxy lives in this block (a fixed one: the proxy is
/// started once per process and outlives any one test).
const REQUEST_HEAD_BLOCK: u8 = 244;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&path).expect("read seed"))
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "{target} has no seeds");
    seeds
}

/// xorshift64*: a fixed sequence, so every run tries the same inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes that often matter to parsers.
const INTERESTING: &[u8] = b"\x00\x01\x7f\x80\xff\r\n\"\\:=[]{},. 0-9aZ%\t";

/// One to four edits of `seed`, sometimes spliced with `other`.
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                let byte = if rng.below(2) == 0 {
                    INTERESTING[rng.below(INTERESTING.len())]
                } else {
                    rng.next() as u8
                };
                data.insert(i, byte);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                data.drain(i..i + n);
            }
            4 => data.truncate(rng.below(len + 1)),
            5 if len > 0 => {
                // Copy a chunk elsewhere (repeated fields, duplicated frames).
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let chunk = data[i..i + n].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            6 if !other.is_empty() => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            _ => {
                // An integer-ish edit: a byte set to a boundary value.
                if len > 0 {
                    let i = rng.below(len);
                    data[i] = [0u8, 1, 0x7f, 0x80, 0xfe, 0xff][rng.below(6)];
                }
            }
        }
    }
    data
}

/// Runs `check` on every seed and `per_seed` mutations of each; names the input that
/// failed.
fn replay(target: &str, per_seed: usize, check: impl Fn(&[u8])) {
    let seeds = corpus(target);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    let mut runs = 0;
    for (i, (name, seed)) in seeds.iter().enumerate() {
        let other = &seeds[(i + 1) % seeds.len()].1;
        let inputs = std::iter::once(seed.clone())
            .chain((0..per_seed).map(|_| mutate(&mut rng, seed, other)));
        for (n, input) in inputs.enumerate() {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
            if outcome.is_err() {
                let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
                panic!("{target}: seed {name}, input {n} failed; the input, hex: {hex}");
            }
            runs += 1;
        }
    }
    eprintln!("{target}: {runs} inputs, no failure");
}

#[test]
fn config_target_replays_its_corpus_and_mutations() {
    replay("config", 500, config_target::check);
}

#[test]
fn health_target_replays_its_corpus_and_mutations() {
    replay("health", 500, health_target::check);
}

#[test]
fn esdk_target_replays_its_corpus_and_mutations() {
    replay("esdk", 300, esdk_target::check);
}

#[test]
fn request_head_target_replays_its_corpus_and_mutations() {
    replay("request_head", 150, |data| {
        request_head_target::check(REQUEST_HEAD_BLOCK, data)
    });
}
