//! The envelope format end to end: gpulink seals with the AWS Encryption SDK message
//! format v2 (suite 0x0478) under cached KMS data keys (moto), the simulated cluster
//! opens it, and the official Python ESDK (`tests/interop/esdk.py` in `.venv`) opens
//! exactly the bytes the cluster received; the other way, gpulink's decoder opens what
//! Python produced. Also: tampering, the cache's limits counted in KMS calls, and KMS
//! failures with a cold and a warm cache.
//!
//! The ESDK 3.x line and the ESDK CLI (`.venv-esdk3`) open gpulink's messages too.
//!
//! Each test owns a loopback block ([`next_block`]). The simulator's opt-in body capture
//! ([`gpulink_sim::Sim::capture_bodies`]) provides the bytes the upstream received.
//! Nothing sleeps to synchronise; the one wait (for an age-driven refresh) polls the
//! cache's own state for the event.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::common::*;
use bytes::Bytes;
use gpulink::seal::esdk::{self, EncryptedDataKey};
use gpulink::seal::{EncryptionContext, KeyService};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const TENANT: &str = "tenant-123";
/// 9.9 MB: under both the 10 MB plaintext limit and, once sealed, the 10 MB upstream one.
const LARGE: usize = 9_900_000;

// ---------------------------------------------------------------------------------------
// Helpers

/// A JSON document of exactly `len` bytes (deterministic filler), like a large prompt.
fn json_of_len(len: usize) -> Vec<u8> {
    const HEAD: &[u8] = br#"{"prompt": ""#;
    const TAIL: &[u8] = br#"", "max_tokens": 50}"#;
    match len {
        0 => Vec::new(),
        1 => b"1".to_vec(),
        n if n < HEAD.len() + TAIL.len() => {
            let mut out = vec![b'"'];
            out.resize(n - 1, b'x');
            out.push(b'"');
            out
        }
        n => {
            let mut out = Vec::with_capacity(n);
            out.extend_from_slice(HEAD);
            let mut state: u64 = 0x2545_F491_4F6C_DD1D;
            while out.len() < n - TAIL.len() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let letter = b"abcdefghijklmnopqrstuvwxyz     "[(state % 31) as usize];
                out.push(letter);
            }
            out.extend_from_slice(TAIL);
            out
        }
    }
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("test bodies are UTF-8")
}

fn context(pool: &str) -> EncryptionContext {
    [("tenant_id", TENANT), ("model_pool", pool)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The proxy with `kms.format = format`.
fn options(format: &str) -> ProxyOptions {
    ProxyOptions::default().set("kms.format", format)
}

/// Posts `body`, requires a 200, and returns the body the simulator received.
async fn post_captured(world: &World, body: &[u8], headers: &[(&str, &str)]) -> (Reply, Bytes) {
    let reply = world.post("/inference", text(body), headers).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body[..reply.body.len().min(2000)])
    );
    let sealed = world
        .sim
        .last_body()
        .expect("the simulator captured the body");
    (reply, sealed)
}

/// The one encrypted data key of a gpulink message.
fn edk_of(message: &[u8]) -> EncryptedDataKey {
    let header = esdk::parse_header(message).expect("an ESDK v2 header");
    assert_eq!(header.edks.len(), 1);
    header.edks[0].clone()
}

fn generate_data_key_calls(world: &World) -> u64 {
    world
        .proxy()
        .proxy()
        .current()
        .sealer
        .keys()
        .stats()
        .generate_data_key
        .calls()
}

fn cache_state(world: &World) -> gpulink::seal::CacheState {
    world.proxy().proxy().current().sealer.cache_state()
}

fn ok_total(world: &World) -> u64 {
    world.sim.all_stats().iter().map(|s| s.ok).sum()
}

fn decrypt_failures(world: &World) -> u64 {
    world
        .sim
        .all_stats()
        .iter()
        .map(|s| s.decrypt_failures)
        .sum()
}

/// The second virtualenv `scripts/test.sh` makes: the Python ESDK 3.x line and the ESDK
/// CLI (which pins that line), next to `.venv`'s 4.x.
const ESDK3_VENV: &str = ".venv-esdk3";

fn esdk3_bin(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(ESDK3_VENV)
        .join("bin")
        .join(name)
}

/// Runs `tests/interop/esdk.py` with `.venv`'s Python (ESDK 4.x).
async fn python(args: Vec<String>, stdin: Vec<u8>) -> (bool, Vec<u8>, String) {
    let mut command = vec![Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop/esdk.py")
        .display()
        .to_string()];
    command.extend(args);
    run_tool(venv_bin("python"), command, stdin, &[]).await
}

/// Runs `program` with `stdin` and returns (exit ok, stdout, stderr).
async fn run_tool(
    program: std::path::PathBuf,
    args: Vec<String>,
    stdin: Vec<u8>,
    env: &[(&'static str, String)],
) -> (bool, Vec<u8>, String) {
    let env = env.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(&program)
            .args(&args)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{} ({e}; run scripts/test.sh, which installs the ESDKs)",
                    program.display()
                )
            });
        let mut input = child.stdin.take().expect("stdin");
        // Written from another thread: the child writes a large stdout meanwhile.
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = input.write_all(&stdin);
        });
        let output = child.wait_with_output().expect("the tool runs");
        let _ = writer.join();
        (
            output.status.success(),
            output.stdout,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .expect("tool task")
}

/// The Python ESDK decrypts `message` (strict KMS provider for `key_arn`), requiring
/// exactly `expect` as the encryption context. Returns the plaintext and the context
/// Python reports.
async fn python_decrypt(
    moto_url: &str,
    key_arn: &str,
    message: &[u8],
    expect: &EncryptionContext,
) -> (Vec<u8>, serde_json::Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let context_file = dir.path().join("context.json");
    let mut args = vec![
        "decrypt".to_string(),
        "--endpoint".into(),
        moto_url.into(),
        "--key-arn".into(),
        key_arn.into(),
        "--context-out".into(),
        context_file.display().to_string(),
    ];
    // An empty `expect` cannot be passed as `--expect-context`; the check below covers it.
    for (k, v) in expect {
        args.push("--expect-context".into());
        args.push(format!("{k}={v}"));
    }
    let (ok, plaintext, stderr) = python(args, message.to_vec()).await;
    assert!(ok, "the Python ESDK refused gpulink's message: {stderr}");
    let reported: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&context_file).expect("esdk.py wrote the context"))
            .expect("context JSON");
    let expected: serde_json::Map<String, serde_json::Value> = expect
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    assert_eq!(reported, serde_json::Value::Object(expected));
    (plaintext, reported)
}

/// The Python ESDK 3.x line (`.venv-esdk3`) decrypts `message`, through the same
/// `esdk.py`; returns the plaintext, or the SDK's reason.
async fn python3_line_decrypt(
    moto_url: &str,
    key_arn: &str,
    message: &[u8],
    expect: &EncryptionContext,
) -> Result<Vec<u8>, String> {
    let mut args = vec![
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/interop/esdk.py")
            .display()
            .to_string(),
        "decrypt".into(),
        "--endpoint".into(),
        moto_url.into(),
        "--key-arn".into(),
        key_arn.into(),
    ];
    for (k, v) in expect {
        args.push("--expect-context".into());
        args.push(format!("{k}={v}"));
    }
    let (ok, plaintext, stderr) = run_tool(esdk3_bin("python"), args, message.to_vec(), &[]).await;
    if ok {
        Ok(plaintext)
    } else {
        Err(stderr)
    }
}

/// The ESDK CLI (`aws-encryption-cli` from `.venv-esdk3`) decrypts `message` from stdin
/// to stdout with a strict KMS wrapping key; returns the plaintext, or its stderr.
async fn cli_decrypt(
    moto_url: &str,
    key_arn: &str,
    message: &[u8],
    expect: &EncryptionContext,
) -> Result<Vec<u8>, String> {
    let mut args: Vec<String> = [
        "--decrypt",
        "--input",
        "-",
        "--output",
        "-",
        "--suppress-metadata",
        "--buffer",
        "--commitment-policy",
        "require-encrypt-require-decrypt",
        "--wrapping-keys",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    args.push(format!("key={key_arn}"));
    if !expect.is_empty() {
        // On decrypt, the CLI requires these pairs to be in the message's context.
        args.push("--encryption-context".into());
        args.extend(expect.iter().map(|(k, v)| format!("{k}={v}")));
    }
    let env = [
        ("AWS_ENDPOINT_URL_KMS", moto_url.to_string()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_string()),
    ];
    let (ok, plaintext, stderr) = run_tool(
        esdk3_bin("aws-encryption-cli"),
        args,
        message.to_vec(),
        &env,
    )
    .await;
    if ok {
        Ok(plaintext)
    } else {
        Err(stderr)
    }
}

/// The Python ESDK encrypts `plaintext` with suite 0x0478.
async fn python_encrypt(
    moto_url: &str,
    key_arn: &str,
    plaintext: &[u8],
    context: &EncryptionContext,
    frame_length: u32,
) -> Vec<u8> {
    let mut args = vec![
        "encrypt".to_string(),
        "--endpoint".into(),
        moto_url.into(),
        "--key-arn".into(),
        key_arn.into(),
        "--frame-length".into(),
        frame_length.to_string(),
    ];
    for (k, v) in context {
        args.push("--context".into());
        args.push(format!("{k}={v}"));
    }
    let (ok, message, stderr) = python(args, plaintext.to_vec()).await;
    assert!(ok, "the Python ESDK could not encrypt: {stderr}");
    message
}

/// A TLS connection straight to a simulated endpoint, as the proxy would open it.
async fn sim_connection(
    world: &World,
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let ca = world.sim.ca_file();
    let config = gpulink::tls::client_config(&[ca.as_path()]).expect("client TLS config");
    // This connection speaks HTTP/1.1, so it offers only that (the simulator serves the
    // protocol ALPN chose).
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    let tcp = TcpStream::connect(addr).await.expect("connect to the sim");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            ServerName::try_from("gpu-cluster.yourcompany.internal").expect("name"),
            tcp,
        )
        .await
        .expect("TLS handshake with the sim");
    let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    send
}

/// Sends a sealed body to the simulator with the headers gpulink sends; returns the
/// status and the error code (if any).
async fn send_to_sim(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    body: Bytes,
    key_arn: &str,
    pool: &str,
) -> (StatusCode, String) {
    let request = Request::builder()
        .method(Method::POST)
        .uri("https://gpu-cluster.yourcompany.internal/inference")
        .header("host", "gpu-cluster.yourcompany.internal")
        .header("content-type", "application/octet-stream")
        .header("x-tenant-id", TENANT)
        .header("x-kms-key-id", key_arn)
        .header("x-model-pool", pool)
        .header("x-encryption-format", gpulink::seal::FORMAT_AWS_ESDK)
        .header("x-request-id", "tamper")
        .body(Full::new(body))
        .expect("request");
    send.ready().await.expect("connection ready");
    let response = send.send_request(request).await.expect("the sim answers");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status, code)
}

/// A TCP relay in front of moto that can be switched off: while off it closes every
/// open connection and hangs up on new ones, as an unreachable KMS would look.
struct SwitchRelay {
    addr: SocketAddr,
    up: watch::Sender<bool>,
}

impl SwitchRelay {
    async fn start(bind: SocketAddr, target: SocketAddr) -> SwitchRelay {
        let listener = TcpListener::bind(bind).await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let (up, watcher) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut watcher = watcher.clone();
                if !*watcher.borrow() {
                    continue; // dropped: the client sees the connection closed
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watcher.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        SwitchRelay { addr, up }
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn moto_addr(moto: &Moto) -> SocketAddr {
    moto.url
        .trim_start_matches("http://")
        .parse()
        .expect("moto URL is http://ip:port")
}

// ---------------------------------------------------------------------------------------
// End to end and interop

/// The issue's "done when": a 9.9 MB JSON request goes through gpulink (format auto,
/// default limits), the simulated cluster opens it, and the Python ESDK opens exactly
/// the bytes the upstream received and reports the tenant/pool context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_goes_end_to_end_and_python_opens_what_the_upstream_received() {
    let world = World::with(options("auto")).await;
    world.sim.capture_bodies(true);

    // Small: auto keeps the guide's format.
    let (small, _) = post_captured(&world, GUIDE_REQUEST.as_bytes(), &[]).await;
    assert_eq!(small.json()["format"], "kms-direct-v1");

    let body = json_of_len(LARGE);
    let (reply, sealed) = post_captured(&world, &body, &[("x-model-pool", "model-b")]).await;
    let answer = reply.json();
    assert_eq!(answer["format"], "aws-esdk-v2");
    assert_eq!(answer["opened"], true);
    assert_eq!(answer["bytes"], LARGE);
    assert_eq!(answer["sha256"], sha256_hex(&body));
    assert_eq!(answer["key_id"], world.key_arn);
    assert_eq!(answer["model_pool"], "model-b");
    assert!(
        sealed.len() > LARGE && sealed.len() <= 10_000_000,
        "{}",
        sealed.len()
    );

    // The header as the ESDK spec lays it out: suite 0x0478, the tenant context, one
    // aws-kms data key whose provider info is the key ARN GenerateDataKey reported.
    let header = esdk::parse_header(&sealed).expect("ESDK header");
    assert_eq!(&sealed[..3], &[0x02, 0x04, 0x78]);
    assert_eq!(header.context, context("model-b"));
    assert_eq!(header.frame_len, esdk::DEFAULT_FRAME_LEN);
    let edk = edk_of(&sealed);
    assert_eq!(edk.provider_id, "aws-kms");
    assert_eq!(edk.provider_info, world.key_arn.as_bytes());

    let (plaintext, _) = python_decrypt(
        &world.moto.url,
        &world.key_arn,
        &sealed,
        &context("model-b"),
    )
    .await;
    assert_eq!(sha256_hex(&plaintext), sha256_hex(&body));
    assert!(plaintext == body);

    let stats = world.sim.all_stats();
    assert_eq!(stats.iter().map(|s| s.plaintext_seen).sum::<u64>(), 0);
    assert_eq!(decrypt_failures(&world), 0);
    assert_eq!(ok_total(&world), 2);
    world.stop().await;
}

/// Python decrypts gpulink's `aws-esdk` output at 1 byte, 4 KiB, 1 MiB and 9.9 MB
/// (one frame, exactly a frame multiple of nothing, many frames, the largest body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_opens_gpulink_messages_of_every_size() {
    let world = World::with(options("aws-esdk")).await;
    world.sim.capture_bodies(true);
    for len in [1, 4096, 1 << 20, 65536 * 3, LARGE] {
        let body = json_of_len(len);
        let (reply, sealed) = post_captured(&world, &body, &[]).await;
        assert_eq!(reply.json()["format"], "aws-esdk-v2", "{len}");
        assert_eq!(reply.json()["sha256"], sha256_hex(&body), "{len}");
        assert_eq!(
            sealed.len(),
            esdk::sealed_len(
                std::slice::from_ref(&edk_of(&sealed)),
                &context("model-a"),
                len,
                esdk::DEFAULT_FRAME_LEN
            )
            .expect("sealed_len"),
            "{len}"
        );
        let (plaintext, _) = python_decrypt(
            &world.moto.url,
            &world.key_arn,
            &sealed,
            &context("model-a"),
        )
        .await;
        assert!(plaintext == body, "Python opened different bytes at {len}");
    }
    // All five under one cached data key: one GenerateDataKey.
    assert_eq!(generate_data_key_calls(&world), 1);
    assert_eq!(decrypt_failures(&world), 0);
    world.stop().await;
}

/// Issue #8.5: the Python ESDK 3.x line and the ESDK CLI refuse a final frame as long as
/// the frame length ("Invalid final frame length: 65536 >= 65536"), so gpulink ends an
/// exact multiple with an empty final frame. 3.x, 4.x and the CLI each open gpulink's
/// messages around the frame boundary: 1 byte, frame - 1, 64 KiB, frame + 1, 128 KiB and
/// 1 MiB through the proxy, and an empty plaintext sealed by the library's encoder (an
/// empty body is no JSON request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_python_esdk_line_and_the_cli_open_frame_multiples() {
    let world = World::with(options("aws-esdk")).await;
    world.sim.capture_bodies(true);
    let frame = esdk::DEFAULT_FRAME_LEN as usize;
    let ctx = context("model-a");
    let mut messages = Vec::new();
    for len in [1, frame - 1, frame, frame + 1, 2 * frame, 1 << 20] {
        let body = json_of_len(len);
        let (reply, sealed) = post_captured(&world, &body, &[]).await;
        assert_eq!(reply.json()["format"], "aws-esdk-v2", "{len}");
        messages.push((len, body, sealed.to_vec()));
    }
    let kms = KeyService::Kms(world.moto.keys().await);
    let data_key = kms
        .generate_data_key(&world.key_arn, &ctx)
        .await
        .expect("GenerateDataKey on moto");
    let edk = EncryptedDataKey {
        provider_id: "aws-kms".into(),
        provider_info: data_key.key_arn.clone().into_bytes(),
        ciphertext: data_key.ciphertext.clone(),
    };
    let empty = esdk::encrypt(
        &data_key.plaintext,
        &[edk],
        &ctx,
        b"",
        esdk::DEFAULT_FRAME_LEN,
    )
    .expect("seal an empty plaintext");
    messages.push((0, Vec::new(), empty));

    for (len, body, sealed) in &messages {
        let (four, _) = python_decrypt(&world.moto.url, &world.key_arn, sealed, &ctx).await;
        assert!(&four == body, "ESDK 4.x opened different bytes at {len}");
        let three = python3_line_decrypt(&world.moto.url, &world.key_arn, sealed, &ctx)
            .await
            .unwrap_or_else(|e| panic!("the ESDK 3.x line refused {len} bytes: {e}"));
        assert!(&three == body, "ESDK 3.x opened different bytes at {len}");
        let cli = cli_decrypt(&world.moto.url, &world.key_arn, sealed, &ctx)
            .await
            .unwrap_or_else(|e| panic!("the ESDK CLI refused {len} bytes: {e}"));
        assert!(&cli == body, "the ESDK CLI opened different bytes at {len}");
    }
    // The CLI's checks are real, so its success above means something: a context pair the
    // message lacks makes it skip the message (exit 0, nothing written), and a truncated
    // message fails.
    let mut other = ctx.clone();
    other.insert("model_pool".into(), "model-b".into());
    let skipped = cli_decrypt(&world.moto.url, &world.key_arn, &messages[0].2, &other).await;
    assert!(skipped.map_or(true, |out| out.is_empty()));
    let (_, _, sealed) = &messages[2];
    let truncated = &sealed[..sealed.len() - 1];
    assert!(
        cli_decrypt(&world.moto.url, &world.key_arn, truncated, &ctx)
            .await
            .is_err()
    );
    assert_eq!(decrypt_failures(&world), 0);
    world.stop().await;
}

/// gpulink's decoder opens what the Python ESDK produced with suite 0x0478: several
/// sizes and frame lengths, including exact frame multiples (Python ends those with an
/// empty final frame) and an empty plaintext. The data key comes from KMS (moto)
/// `Decrypt` of the message's encrypted data key under the message's context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpulink_opens_python_messages() {
    let moto = Moto::get().await;
    let key_arn = moto.create_key().await;
    let kms = KeyService::Kms(moto.keys().await);
    let ctx = context("model-a");
    for (len, frame) in [
        (0usize, 4096u32),
        (1, 4096),
        (4096, 4096),
        (300, 128),
        (256, 128),
        ((1 << 20) + 7, 65536),
        (1 << 20, 4096),
    ] {
        let plaintext = json_of_len(len);
        let message = python_encrypt(&moto.url, &key_arn, &plaintext, &ctx, frame).await;
        let header = esdk::parse_header(&message).expect("Python header");
        assert_eq!(&message[..3], &[0x02, 0x04, 0x78]);
        assert_eq!(header.frame_len, frame);
        assert_eq!(header.context, ctx);
        let edk = header
            .edks
            .iter()
            .find(|e| e.provider_id == "aws-kms" && e.provider_info == key_arn.as_bytes())
            .expect("an aws-kms data key for our key");
        let data_key = kms
            .decrypt(&edk.ciphertext, &header.context)
            .await
            .expect("KMS opens the data key");
        let data_key: [u8; 32] = data_key.as_slice().try_into().expect("32-byte data key");
        let opened = esdk::decrypt_expecting_context(&data_key, &message, &ctx)
            .unwrap_or_else(|e| panic!("len {len} frame {frame}: {e}"));
        assert!(opened == plaintext, "len {len} frame {frame}");
        // And tampering with Python's message is caught too.
        let mut bad = message.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        assert!(esdk::decrypt_expecting_context(&data_key, &bad, &ctx).is_err());
    }
}

/// A flipped byte anywhere that matters, a truncation, or a message presented for
/// another model pool: the simulated cluster refuses each (decrypt_failed) and counts
/// it. The untouched message, resent the same way, opens: the harness can succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_messages_are_refused_by_the_cluster() {
    let world = World::with(options("aws-esdk")).await;
    world.sim.capture_bodies(true);
    let body = json_of_len(200_000);
    let (reply, sealed) = post_captured(&world, &body, &[]).await;
    let endpoint: SocketAddr = reply
        .header("x-gpulink-endpoint")
        .expect("endpoint header")
        .parse()
        .expect("ip:port");
    let header = esdk::parse_header(&sealed).expect("header");
    let mut send = sim_connection(&world, endpoint).await;

    let (status, _) = send_to_sim(&mut send, sealed.clone(), &world.key_arn, "model-a").await;
    assert_eq!(status, StatusCode::OK, "the untouched message opens");
    let before = decrypt_failures(&world);

    let positions = [
        ("suite id", 2),
        ("message id", 10),
        ("context", 45),
        ("encrypted data key", header.header_body_len - 60),
        ("commitment", header.header_body_len - 1),
        ("header tag", header.header_len - 1),
        ("first frame's ciphertext", header.header_len + 100),
        ("middle of the body", sealed.len() / 2),
        ("last byte (final tag)", sealed.len() - 1),
    ];
    for (what, at) in positions {
        let mut bad = sealed.to_vec();
        bad[at] ^= 0x01;
        let (status, code) =
            send_to_sim(&mut send, Bytes::from(bad), &world.key_arn, "model-a").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(code, "decrypt_failed", "{what}");
    }
    let truncated = sealed.slice(..sealed.len() - 1000);
    let (_, code) = send_to_sim(&mut send, truncated, &world.key_arn, "model-a").await;
    assert_eq!(code, "decrypt_failed", "truncated");
    // Sealed for model-a, presented as model-b: the context check refuses it.
    let (_, code) = send_to_sim(&mut send, sealed.clone(), &world.key_arn, "model-b").await;
    assert_eq!(code, "decrypt_failed", "other pool");
    // A key ARN other than the one in the message: a strict decryptor has no key for it.
    let other_arn = world.moto.create_key().await;
    let (_, code) = send_to_sim(&mut send, sealed.clone(), &other_arn, "model-a").await;
    assert_eq!(code, "decrypt_failed", "other key");

    assert_eq!(
        decrypt_failures(&world) - before,
        positions.len() as u64 + 3
    );
    world.stop().await;
}

// ---------------------------------------------------------------------------------------
// The data-key cache, counted in KMS calls and observed on the wire

/// `max_messages = 3`: requests 1-3 share a data key (same encrypted data key on the
/// wire), request 4 has a new one, and KMS saw exactly two GenerateDataKey calls (the
/// second fetched in the background when request 3 reached 3/4 of the limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_messages_bounds_the_messages_per_data_key() {
    let world = World::with(options("aws-esdk").set("kms.cache.max_messages", 3)).await;
    world.sim.capture_bodies(true);
    let mut edks = Vec::new();
    for i in 0..4 {
        let (_, sealed) = post_captured(&world, &json_of_len(100 + i), &[]).await;
        edks.push(edk_of(&sealed).ciphertext);
    }
    assert_eq!(edks[0], edks[1]);
    assert_eq!(edks[1], edks[2]);
    assert_ne!(edks[2], edks[3], "the 4th message must use a new data key");
    assert_eq!(generate_data_key_calls(&world), 2);
    let state = cache_state(&world);
    assert_eq!(state.kms_calls, 2);
    // Request 4 may arrive before the background fetch ends; it then waits for that
    // same call (single flight) rather than making another.
    assert!(state.misses <= 2, "{state:?}");
    assert_eq!(state.entries.len(), 1);
    assert_eq!(state.entries[0].messages, 1);
    assert_eq!(
        state.entries[0].key_arn.as_deref(),
        Some(world.key_arn.as_str())
    );
    world.stop().await;
}

/// `max_bytes = "20KB"`: three 6000-byte bodies fit one key, the fourth (24 KB in all)
/// needs a new one; a 30 KB body can never fit, so it gets a data key of its own and the
/// cached key carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_bounds_the_plaintext_per_data_key() {
    let world = World::with(options("aws-esdk").set("kms.cache.max_bytes", "20KB")).await;
    world.sim.capture_bodies(true);
    let mut edks = Vec::new();
    for _ in 0..4 {
        let (_, sealed) = post_captured(&world, &json_of_len(6000), &[]).await;
        edks.push(edk_of(&sealed).ciphertext);
    }
    assert_eq!(edks[0], edks[1]);
    assert_eq!(edks[1], edks[2]);
    assert_ne!(edks[2], edks[3]);
    assert_eq!(generate_data_key_calls(&world), 2);

    let (_, big) = post_captured(&world, &json_of_len(30_000), &[]).await;
    let big_edk = edk_of(&big).ciphertext;
    assert!(!edks.contains(&big_edk));
    let (_, after) = post_captured(&world, &json_of_len(6000), &[]).await;
    assert_eq!(
        edk_of(&after).ciphertext,
        edks[3],
        "the cached key carries on"
    );
    let state = cache_state(&world);
    assert_eq!(state.bypasses, 1);
    assert_eq!(generate_data_key_calls(&world), 3);
    world.stop().await;
}

/// `max_age = "2s"`: at 3/4 of the age the key in use is replaced in the background,
/// with no request waiting: the next request is a hit and carries a new data key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_replaces_the_key_in_the_background() {
    let world = World::with(options("aws-esdk").set("kms.cache.max_age", "2s")).await;
    world.sim.capture_bodies(true);
    let (_, first) = post_captured(&world, &json_of_len(5000), &[]).await;
    assert_eq!(generate_data_key_calls(&world), 1);
    // The event: the cache reports the refresh done (polled, as /status would be).
    assert_eventually!(
        cache_state(&world),
        |state| state.refreshes >= 1 && state.kms_calls >= 2 && !state.entries[0].fetching,
        "no age refresh"
    );
    // The start-up proof fetched the first key, so no request ever waited.
    assert_eq!(cache_state(&world).misses, 0);
    let (_, second) = post_captured(&world, &json_of_len(5000), &[]).await;
    assert_ne!(edk_of(&first).ciphertext, edk_of(&second).ciphertext);
    world.stop().await;
}

/// Many requests on a cold cache entry (model-b: the start-up proof warmed only the
/// default pool's): exactly one GenerateDataKey for it, and every request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_under_load_makes_one_kms_call() {
    let world = Arc::new(World::with(options("aws-esdk")).await);
    assert_eq!(generate_data_key_calls(&world), 1, "the start-up proof's");
    let body = Arc::new(String::from_utf8(json_of_len(10_000)).expect("utf-8"));
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let world = world.clone();
            let body = body.clone();
            tokio::spawn(async move {
                world
                    .post("/inference", &body, &[("x-model-pool", "model-b")])
                    .await
                    .status
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task"), 200);
    }
    assert_eq!(generate_data_key_calls(&world), 2);
    let state = cache_state(&world);
    assert_eq!(state.kms_calls, 2);
    assert_eq!(state.hits + state.misses, 24);
    assert_eq!(ok_total(&world), 24);
    let world = Arc::into_inner(world).expect("all tasks finished");
    world.stop().await;
}

// ---------------------------------------------------------------------------------------
// KMS failures: fail closed, but a warm cache rides out an outage until its limits

/// KMS unreachable and no cached key: 503 kms_unavailable, and nothing reaches the
/// cluster, in `aws-esdk` and in `auto` above 4096 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_down_with_a_cold_cache_sends_nothing() {
    let dead_kms = format!("http://127.{}.0.9:{}", next_block(), free_port());
    let world = World::with(
        ProxyOptions::default()
            .set("kms.format", "auto")
            .kms_url(dead_kms),
    )
    .await;
    for len in [5000, 1 << 20] {
        let reply = world.post("/inference", text(&json_of_len(len)), &[]).await;
        assert_eq!(reply.status, 503, "{len}");
        assert_eq!(reply.error_code(), "kms_unavailable");
    }
    assert_eq!(
        world.total_requests(),
        0,
        "something was sent unsealed or unsent"
    );
    let state = cache_state(&world);
    assert_eq!(state.kms_errors, state.kms_calls);
    assert!(state.kms_calls >= 1);
    assert!(state.entries[0].last_error.is_some());
    world.stop().await;
}

/// `max_messages = 4` and KMS goes away after the first request: requests 2-4 are still
/// served from the cached key (the background refresh fails), request 5 would exceed the
/// limit and gets 503 with nothing sent; when KMS is back, requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_outage_with_a_warm_cache_serves_until_the_hard_limit() {
    let moto = Moto::get().await;
    let relay = SwitchRelay::start(
        SocketAddr::from(([127, next_block(), 0, 9], 0)),
        moto_addr(&moto),
    )
    .await;
    let world = World::with(
        ProxyOptions::default()
            .set("kms.format", "aws-esdk")
            .set("kms.cache.max_messages", 4)
            .kms_url(relay.url()),
    )
    .await;
    let body = json_of_len(8000);
    let first = world.post("/inference", text(&body), &[]).await;
    assert_eq!(first.status, 200);
    relay.set_up(false);
    for i in 2..=4 {
        let reply = world.post("/inference", text(&body), &[]).await;
        assert_eq!(reply.status, 200, "request {i} should use the cached key");
    }
    let reply = world.post("/inference", text(&body), &[]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error_code(), "kms_unavailable");
    assert_eq!(
        world.total_requests(),
        4,
        "the 5th request must not be sent"
    );
    let state = cache_state(&world);
    assert!(state.refresh_failures >= 1, "{state:?}");
    assert!(state.kms_errors >= 1, "{state:?}");

    relay.set_up(true);
    let reply = world.post("/inference", text(&body), &[]).await;
    reply.assert_status(200);
    assert_eq!(world.total_requests(), 5);
    world.stop().await;
}

// ---------------------------------------------------------------------------------------
// Size limits and the context-free mode

/// A body that fits `listen.max_body` but not, once sealed, `upstream.max_body`: 413
/// before any KMS call, nothing sent. With `kms.context = "none"` the message carries no
/// context and the cluster and Python both open it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_size_limit_and_context_none() {
    let world = World::with(
        ProxyOptions::default()
            .set("kms.format", "auto")
            .set("kms.context", "none"),
    )
    .await;
    world.sim.capture_bodies(true);
    // The start-up proof's GenerateDataKey; the refusal must add none.
    let proof_calls = generate_data_key_calls(&world);
    let reply = world
        .post("/inference", text(&json_of_len(9_999_000)), &[])
        .await;
    reply.assert_status(413);
    assert_eq!(reply.error_code(), "body_too_large");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("upstream.max_body"), "{message}");
    assert_eq!(
        generate_data_key_calls(&world),
        proof_calls,
        "refused before KMS"
    );
    assert_eq!(world.total_requests(), 0);

    let body = json_of_len(100_000);
    let (_, sealed) = post_captured(&world, &body, &[]).await;
    assert!(esdk::parse_header(&sealed)
        .expect("header")
        .context
        .is_empty());
    let stats = world.sim.all_stats();
    assert_eq!(stats.iter().map(|s| s.context_none).sum::<u64>(), 1);
    let (plaintext, _) = python_decrypt(
        &world.moto.url,
        &world.key_arn,
        &sealed,
        &EncryptionContext::new(),
    )
    .await;
    assert!(plaintext == body);
    world.stop().await;
}
