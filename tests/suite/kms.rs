//! KMS as gpulink meets it in production: proven before `/ready` (issue #8, item 3) and
//! never a way for secrets to leave (issue #9, item 1).
//!
//! `gpulink run` runs as a separate process (its stderr is the log channel under test),
//! against the in-process cluster simulator and moto, with a fault-injecting KMS in front
//! of moto ([`FaultKms`]): it refuses or blackholes connections, or answers
//! GenerateDataKey with a valid `Plaintext` and a broken `CiphertextBlob`, errors that
//! echo the request, garbage, or throttling. Every test owns a loopback block
//! ([`next_block`]). Waits poll `/ready`, `/status` or the log with a deadline; nothing sleeps
//! to synchronise.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Credentials the proxy process gets: distinctive, so a scan can find the secret.
const ACCESS_KEY: &str = "AKIAGPULINKTEST00001";
const SECRET_KEY: &str = "gpuLinkS3cretKeyNeverLogged/0123456789abcd";
/// In every request body, so a scan can find the plaintext.
const MARKER: &str = "PLAINTEXT-MARKER-4d1c9a";
/// In moto's account, but no such key.
const MISSING_KEY: &str =
    "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555";

// ---------------------------------------------------------------------------------------
// The fault-injecting KMS

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Pass every call to moto.
    Forward,
    /// Close every connection at once (nothing listens, as far as the client can tell).
    Refuse,
    /// Accept connections and never answer.
    Blackhole,
    /// GenerateDataKey: moto's answer with the `CiphertextBlob` made invalid (the valid
    /// `Plaintext` data key stays). Other calls pass.
    BrokenBlob,
    /// A 400 whose message and headers echo the request (the base64 plaintext).
    Echo,
    /// A 400 whose error code (`__type` and `x-amzn-ErrorType`) is the request's
    /// plaintext: a code is only repeated when it is one KMS documents.
    EchoCode,
    /// A 200 whose body is not JSON, with a piece of the request in it.
    Garbage,
    /// ThrottlingException, echoing the request in its message.
    Throttle,
}

/// One call moto answered (through the fault KMS).
#[derive(Debug, Clone)]
struct Exchange {
    target: String,
    answer: serde_json::Value,
}

struct FaultKms {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
}

impl FaultKms {
    async fn start(bind: SocketAddr, moto_url: String) -> FaultKms {
        let listener = TcpListener::bind(bind).await.expect("bind fault KMS");
        let addr = listener.local_addr().expect("addr");
        let (mode, watcher) = watch::channel(Mode::Forward);
        let exchanges = Arc::new(Mutex::new(Vec::new()));
        let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let ex = exchanges.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mut watcher = watcher.clone();
                let current = *watcher.borrow();
                match current {
                    Mode::Refuse => drop(stream),
                    Mode::Blackhole => {
                        tokio::spawn(async move {
                            let _held = stream;
                            let _ = watcher.wait_for(|m| *m != Mode::Blackhole).await;
                        });
                    }
                    _ => {
                        let (client, moto_url, ex) = (client.clone(), moto_url.clone(), ex.clone());
                        let service = hyper::service::service_fn(move |request| {
                            let mode = *watcher.borrow();
                            answer(request, mode, client.clone(), moto_url.clone(), ex.clone())
                        });
                        spawn_http1(stream, service);
                    }
                }
            }
        });
        FaultKms {
            addr,
            mode,
            exchanges,
        }
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().expect("exchanges").clone()
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn answer(
    request: http::Request<Incoming>,
    mode: Mode,
    client: Client,
    moto_url: String,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = read_request(request).await;
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let echoed = String::from_utf8_lossy(&body).into_owned();
    let request_plaintext = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["Plaintext"].as_str().map(str::to_string))
        .unwrap_or_default();
    let json = |status: u16, value: serde_json::Value| {
        let mut response = http::Response::new(Full::new(Bytes::from(value.to_string())));
        *response.status_mut() = http::StatusCode::from_u16(status).expect("status");
        response.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/x-amz-json-1.1"),
        );
        response
    };
    match mode {
        Mode::Echo => {
            let mut response = json(
                400,
                serde_json::json!({
                    "__type": "ValidationException",
                    "message": format!("1 validation error detected: Value '{request_plaintext}' at 'plaintext' failed; request was {echoed}"),
                }),
            );
            if let Ok(value) = http::HeaderValue::from_str(&request_plaintext) {
                response.headers_mut().insert("x-amzn-echo", value);
            }
            return Ok(response);
        }
        Mode::EchoCode => {
            let mut response = json(
                400,
                serde_json::json!({
                    "__type": request_plaintext,
                    "message": "see the code",
                }),
            );
            if let Ok(value) = http::HeaderValue::from_str(&format!("{request_plaintext}:")) {
                response.headers_mut().insert("x-amzn-errortype", value);
            }
            return Ok(response);
        }
        Mode::Throttle => {
            return Ok(json(
                400,
                serde_json::json!({
                    "__type": "ThrottlingException",
                    "message": format!("Rate exceeded for {echoed}"),
                }),
            ));
        }
        Mode::Garbage => {
            let mut response = http::Response::new(Full::new(Bytes::from(format!(
                "\u{0}\u{7f}<html>not json {request_plaintext}"
            ))));
            response.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/x-amz-json-1.1"),
            );
            return Ok(response);
        }
        _ => {}
    }
    // Forward to moto.
    let mut forward = http::Request::post(format!("{moto_url}/"));
    for (name, value) in &parts.headers {
        if name != http::header::HOST {
            forward = forward.header(name, value);
        }
    }
    let Ok(forward) = forward.body(Full::new(body)) else {
        return Ok(json(500, serde_json::json!({"__type": "InternalFailure"})));
    };
    let Ok(response) = client.request(forward).await else {
        return Ok(json(500, serde_json::json!({"__type": "InternalFailure"})));
    };
    let status = response.status().as_u16();
    let answer = body_bytes(response.into_body()).await;
    let mut value: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
    exchanges.lock().expect("exchanges").push(Exchange {
        target: target.clone(),
        answer: value.clone(),
    });
    if mode == Mode::BrokenBlob && target.ends_with("GenerateDataKey") && status == 200 {
        value["CiphertextBlob"] = serde_json::Value::String("%%% not base64 %%%".into());
    }
    Ok(json(status, value))
}

// ---------------------------------------------------------------------------------------
// gpulink run as a process

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The simulator and moto (in process), and `gpulink run` with its stderr captured.
struct Proxied {
    cluster: Cluster,
    proxy: Guard,
    log: Arc<Mutex<String>>,
    listen: SocketAddr,
    admin: SocketAddr,
    config_path: PathBuf,
    client: Client,
}

fn config_text(
    cluster: &Cluster,
    listen: SocketAddr,
    admin: SocketAddr,
    kms_url: &str,
    key_id: &str,
    format: &'static str,
) -> String {
    let options = ProxyOptions::default()
        .set("kms.format", format)
        .set("listen.address", listen)
        .set("admin.address", admin);
    proxy_toml(
        &cluster.layout,
        kms_url,
        key_id,
        &cluster.sim.ca_file(),
        &options,
    )
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

impl Proxied {
    async fn start(
        cluster: Cluster,
        kms_url: &str,
        key_id: &str,
        format: &'static str,
        rust_log: &str,
        env: &[(&str, &str)],
    ) -> Proxied {
        let block = cluster.layout.block;
        let listen = SocketAddr::from(([127, block, 0, 2], 8000));
        let admin = SocketAddr::from(([127, block, 0, 2], 9901));
        let config_path = cluster.dir.path().join("gpulink.toml");
        write_atomically(
            &config_path,
            &config_text(&cluster, listen, admin, kms_url, key_id, format),
        );
        let mut command = Command::new(env!("CARGO_BIN_EXE_gpulink"));
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", rust_log)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("NOTIFY_SOCKET");
        for (name, value) in env {
            if value.is_empty() {
                command.env_remove(name);
            } else {
                command.env(name, value);
            }
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gpulink run");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().expect("log");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let proxied = Proxied {
            cluster,
            proxy: Guard(child),
            log,
            listen,
            admin,
            config_path,
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        };
        wait_for_listener(admin, Duration::from_secs(30)).await;
        proxied
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// Fails, showing the log, unless one line of it contains both `what` and `key`.
    #[track_caller]
    fn assert_logged(&self, what: &str, key: &str) {
        let log = self.log();
        assert!(
            log.lines().any(|l| l.contains(what) && l.contains(key)),
            "no line with `{what}` and {key}:\n{log}"
        );
    }

    async fn get(&self, path: &str) -> Reply {
        send(
            &self.client,
            "GET",
            &format!("http://{}{path}", self.admin),
            Vec::new(),
            &[],
        )
        .await
    }

    async fn post(&self, body: &str, headers: &[(&str, &str)]) -> Reply {
        send(
            &self.client,
            "POST",
            &format!("http://{}/inference", self.listen),
            body.as_bytes().to_vec(),
            headers,
        )
        .await
    }

    async fn status(&self) -> serde_json::Value {
        self.get("/status").await.json()
    }

    /// Polls `what` until it holds (bounded).
    async fn until<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        assert_eventually!(
            within = Duration::from_secs(60),
            check().await,
            |done| *done,
            "never: {what}\n--- log ---\n{}",
            self.log()
        );
    }

    async fn until_ready(&self) {
        self.until("/ready is 200", || async {
            self.get("/ready").await.status == 200
        })
        .await;
    }

    /// Waits until the start-up proof has failed `n` times, and returns `/ready`.
    async fn until_proof_failed(&self, n: u64) -> Reply {
        self.until("the KMS proof failed", || async {
            self.status().await["kms"]["proof"]["failures"].as_u64() >= Some(n)
        })
        .await;
        self.get("/ready").await
    }

    fn sent_upstream(&self) -> u64 {
        self.cluster
            .sim
            .all_stats()
            .iter()
            .map(|s| s.requests)
            .sum()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.proxy.0.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

fn request_body(n: usize) -> String {
    format!(r#"{{"prompt": "{MARKER} request {n}", "max_tokens": 5}}"#)
}

fn assert_waiting_for_kms(ready: &Reply, reason_contains: &[&str]) {
    ready.assert_status(503);
    let doc = ready.json();
    assert_eq!(doc["status"], "starting", "{doc}");
    assert_eq!(doc["waiting_for"], "kms", "{doc}");
    let reason = doc["reason"].as_str().unwrap_or_default();
    for part in reason_contains {
        assert!(reason.contains(part), "{part:?} not in {reason:?}");
    }
}

// ---------------------------------------------------------------------------------------
// #8.3: KMS proven before ready

/// A key ARN that does not exist: gpulink serves its listeners but is not ready; the one
/// log line per attempt names `kms.key_id` and the key; requests get 503 with nothing
/// sent. A reload to the real key makes it ready without a restart; a later reload back
/// to the missing key is rejected (proven settings are only replaced by proven ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_keeps_gpulink_unready_until_a_reload_fixes_it() {
    let cluster = Cluster::start(next_block()).await;
    let moto_url = cluster.moto.url.clone();
    let good_key = cluster.key_arn.clone();
    let p = Proxied::start(cluster, &moto_url, MISSING_KEY, "auto", "info", &[]).await;

    let ready = p.until_proof_failed(1).await;
    assert_waiting_for_kms(
        &ready,
        &["does not exist", "kms.key_id", "NotFoundException"],
    );
    let status = p.status().await;
    assert_eq!(status["ready"], false);
    assert_eq!(status["kms"]["proof"]["proven"], false);
    p.until("a log line names kms.key_id and the key", || async {
        p.log().lines().any(|line| {
            line.contains("KMS refuses kms.key_id")
                && line.contains(MISSING_KEY)
                && line.contains("does not exist")
        })
    })
    .await;
    let reply = p.post(&request_body(1), &[]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error_code(), "kms_unavailable");
    assert_eq!(p.sent_upstream(), 0);

    // The operator fixes kms.key_id and reloads: ready, same process.
    let pid = p.proxy.0.id();
    write_atomically(
        &p.config_path,
        &config_text(&p.cluster, p.listen, p.admin, &moto_url, &good_key, "auto"),
    );
    p.signal("HUP");
    p.until_ready().await;
    assert_eq!(p.proxy.0.id(), pid);
    assert_eq!(p.post(&request_body(2), &[]).await.status, 200);

    // Proven now: a reload to a key KMS refuses is rejected, the good key keeps serving.
    let rejected_before = p.status().await["reloads"]["rejected"]
        .as_u64()
        .unwrap_or(0);
    write_atomically(
        &p.config_path,
        &config_text(
            &p.cluster,
            p.listen,
            p.admin,
            &moto_url,
            MISSING_KEY,
            "auto",
        ),
    );
    p.signal("HUP");
    p.until("the reload is rejected", || async {
        p.status().await["reloads"]["rejected"]
            .as_u64()
            .unwrap_or(0)
            > rejected_before
    })
    .await;
    let status = p.status().await;
    assert_eq!(status["kms"]["key_id"], good_key.as_str());
    assert_eq!(p.get("/ready").await.status, 200);
    assert_eq!(p.post(&request_body(3), &[]).await.status, 200);
    p.assert_logged("failed their proof seal", MISSING_KEY);
}

/// KMS unreachable at start (connections refused, then accepted and never answered):
/// not ready, with the reason; once KMS answers, ready without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_kms_at_start_delays_ready_until_it_answers() {
    let cluster = Cluster::start(next_block()).await;
    let kms = FaultKms::start(
        SocketAddr::new(cluster.layout.ip(0, 3), 0),
        cluster.moto.url.clone(),
    )
    .await;
    kms.set(Mode::Refuse);
    let key = cluster.key_arn.clone();
    // A fake systemd: READY=1 must wait for KMS too.
    let socket_path = cluster.dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let socket_text = socket_path.display().to_string();
    let p = Proxied::start(
        cluster,
        &kms.url(),
        &key,
        "aws-esdk",
        "info",
        &[("NOTIFY_SOCKET", &socket_text)],
    )
    .await;
    let notified = |socket: &tokio::net::UnixDatagram| {
        let mut buffer = vec![0u8; 4096];
        let mut seen = String::new();
        while let Ok(n) = socket.try_recv(&mut buffer) {
            seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
            seen.push('\n');
        }
        seen
    };

    let ready = p.until_proof_failed(1).await;
    assert_waiting_for_kms(&ready, &["could not be reached"]);
    p.assert_logged("KMS is not usable yet", &key);

    kms.set(Mode::Blackhole);
    p.until("the proof times out against a silent KMS", || async {
        p.status().await["kms"]["proof"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out"))
    })
    .await;
    assert_eq!(p.get("/ready").await.status, 503);
    assert_eq!(p.sent_upstream(), 0);
    let before = notified(&socket);
    assert!(
        !before.lines().any(|l| l == "READY=1"),
        "READY=1 before KMS: {before}"
    );

    let pid = p.proxy.0.id();
    kms.set(Mode::Forward);
    p.until_ready().await;
    assert_eq!(p.proxy.0.id(), pid, "ready without a restart");
    let mut after = String::new();
    p.until("systemd hears READY=1", || {
        after.push_str(&notified(&socket));
        let done = after.lines().any(|l| l == "READY=1");
        async move { done }
    })
    .await;
    assert_eq!(p.status().await["kms"]["proof"]["proven"], true);
    let reply = p.post(&request_body(1), &[]).await;
    reply.assert_status(200);
}

/// No credentials anywhere: not ready, and the reason says where credentials are looked
/// for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_say_where_they_are_looked_for() {
    let cluster = Cluster::start(next_block()).await;
    let moto_url = cluster.moto.url.clone();
    let key = cluster.key_arn.clone();
    let home = cluster.dir.path().join("empty-home");
    std::fs::create_dir_all(&home).expect("home");
    let home = home.display().to_string();
    let p = Proxied::start(
        cluster,
        &moto_url,
        &key,
        "kms-direct",
        "info",
        &[
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_SESSION_TOKEN", ""),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", ""),
            ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", ""),
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", ""),
            ("AWS_SHARED_CREDENTIALS_FILE", ""),
            ("AWS_CONFIG_FILE", ""),
            ("HOME", &home),
        ],
    )
    .await;
    let ready = p.until_proof_failed(1).await;
    assert_waiting_for_kms(
        &ready,
        &[
            "no AWS credentials",
            "AWS_ACCESS_KEY_ID",
            "~/.aws/credentials",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "IMDS",
        ],
    );
    p.assert_logged("no AWS credentials", &key);
    let reply = p.post(&request_body(1), &[]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(p.sent_upstream(), 0);
}

// ---------------------------------------------------------------------------------------
// #9.1: nothing secret leaves

/// Every form a secret may take in text: raw, hex (both cases), base64 (standard and
/// URL-safe, padded or not), and Rust's debug form of a byte slice.
fn forms(bytes: &[u8]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let debug = format!("{:?}", &bytes[..bytes.len().min(12)]);
    let mut forms = vec![
        b64.trim_end_matches('=').to_string(),
        url,
        hex.clone(),
        hex.to_uppercase(),
        debug.trim_end_matches(']').to_string(),
    ];
    if let Ok(text) = std::str::from_utf8(bytes) {
        forms.push(text.to_string());
    }
    forms.retain(|f| f.len() >= 12);
    forms
}

/// The base64 forms of `marker` inside any base64 text, whatever its alignment: the
/// characters that only depend on the marker's own bytes.
fn base64_of_marker_anywhere(marker: &str) -> Vec<String> {
    (0..3)
        .map(|shift| {
            let mut padded = vec![b'x'; shift];
            padded.extend_from_slice(marker.as_bytes());
            let encoded = base64::engine::general_purpose::STANDARD.encode(&padded);
            // Drop the characters that mix in the padding bytes or what follows.
            let start = (shift * 4).div_ceil(3) + 1;
            encoded[start..encoded.len() - 4].to_string()
        })
        .collect()
}

/// The secrets a scan looks for, with a name for the failure message.
fn secrets(kms: &FaultKms, bodies: &[String], sealed: &[Bytes]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut add = |name: &str, bytes: &[u8]| {
        for form in forms(bytes) {
            out.push((name.to_string(), form));
        }
    };
    add("the AWS secret key", SECRET_KEY.as_bytes());
    add("the plaintext marker", MARKER.as_bytes());
    for body in bodies {
        add("a request body", body.as_bytes());
    }
    for exchange in kms.exchanges() {
        for (field, name) in [
            ("Plaintext", "a data key"),
            ("CiphertextBlob", "a KMS ciphertext"),
        ] {
            if let Some(blob) = exchange.answer[field].as_str() {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(blob)
                    .expect("moto answers base64");
                add(&format!("{name} ({})", exchange.target), &bytes);
            }
        }
    }
    for body in sealed {
        add("a sealed body", &body[..body.len().min(64)]);
    }
    for form in base64_of_marker_anywhere(MARKER) {
        out.push(("the marker in base64".into(), form));
    }
    out
}

fn scan(channel: &str, text: &str, secrets: &[(String, String)]) {
    for (name, form) in secrets {
        assert!(
            !text.contains(form.as_str()),
            "{name} ({form}) leaked into {channel}:\n{}",
            &text[text.find(form.as_str()).unwrap_or(0).saturating_sub(300)..]
                .chars()
                .take(800)
                .collect::<String>()
        );
    }
}

/// The adversarial KMS answers of issue #9 against `gpulink run` at `RUST_LOG=trace`:
/// a GenerateDataKey answer with a valid data key and a broken `CiphertextBlob`, errors
/// that echo the request (message and headers), garbage, throttling. Each request gets
/// 503 `kms_unavailable` with a short message and nothing reaches the cluster; then the
/// app's error bodies, the whole log, `/status`, the page and `/metrics` are scanned for
/// the plaintext (raw and base64 at any alignment), every data key and ciphertext moto
/// produced (from the fault KMS, which saw moto's answers), the sealed bodies, and the
/// AWS secret key, in raw, hex and base64. Successful seals (kms-direct and aws-esdk)
/// at trace level are in the log under scan too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_leaves_through_errors_logs_status_or_metrics() {
    let cluster = Cluster::start(next_block()).await;
    cluster.sim.capture_bodies(true);
    let kms = FaultKms::start(
        SocketAddr::new(cluster.layout.ip(0, 3), 0),
        cluster.moto.url.clone(),
    )
    .await;
    let key = cluster.key_arn.clone();
    let p = Proxied::start(cluster, &kms.url(), &key, "auto", "trace", &[]).await;
    p.until_ready().await;

    let mut bodies = Vec::new();
    let mut sealed = Vec::new();
    let mut errors = Vec::new();
    // Successes at trace level: a kms-direct body and an aws-esdk one.
    for (n, body) in [
        (0, request_body(0)),
        (
            1,
            format!(r#"{{"prompt": "{MARKER} {}"}}"#, "y".repeat(5000)),
        ),
    ] {
        let reply = p.post(&body, &[]).await;
        assert_eq!(
            reply.status,
            200,
            "{n}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        sealed.push(p.cluster.sim.last_body().expect("captured"));
        bodies.push(body);
    }
    let sent_before = p.sent_upstream();

    // model-b's data key is not cached yet, so its requests call GenerateDataKey.
    let big = |n: usize| format!(r#"{{"prompt": "{MARKER} {n} {}"}}"#, "z".repeat(6000));
    type Headers = &'static [(&'static str, &'static str)];
    let cases: Vec<(Mode, String, Headers)> = vec![
        (Mode::BrokenBlob, big(1), &[("x-model-pool", "model-b")]),
        (Mode::Echo, request_body(2), &[]),
        (Mode::Echo, big(3), &[("x-model-pool", "model-b")]),
        (Mode::EchoCode, request_body(8), &[]),
        (Mode::EchoCode, big(9), &[("x-model-pool", "model-b")]),
        (Mode::Garbage, request_body(4), &[]),
        (Mode::Garbage, big(5), &[("x-model-pool", "model-b")]),
        (Mode::Throttle, request_body(6), &[]),
        (Mode::Throttle, big(7), &[("x-model-pool", "model-b")]),
    ];
    for (mode, body, headers) in cases {
        kms.set(mode);
        let reply = p.post(&body, headers).await;
        assert_eq!(
            reply.status,
            503,
            "{mode:?}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.error_code(), "kms_unavailable", "{mode:?}");
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.len() < 400, "{mode:?}: a long message: {message}");
        let expected = match mode {
            Mode::Throttle => "throttled",
            Mode::Echo | Mode::EchoCode => "refused",
            _ => "cannot be used",
        };
        assert!(message.contains(expected), "{mode:?}: {message}");
        errors.push(String::from_utf8_lossy(&reply.body).into_owned());
        bodies.push(body);
    }
    assert_eq!(
        p.sent_upstream(),
        sent_before,
        "a request went upstream unsealed"
    );
    kms.set(Mode::Forward);

    // The fault KMS saw moto's data keys (including the one whose blob it broke).
    let data_keys = kms
        .exchanges()
        .iter()
        .filter(|e| e.target.ends_with("GenerateDataKey"))
        .count();
    assert!(data_keys >= 2, "{data_keys}");
    let secrets = secrets(&kms, &bodies, &sealed);

    for (i, error) in errors.iter().enumerate() {
        scan(&format!("error body {i}"), error, &secrets);
    }
    let status = p.get("/status").await;
    let status_text = String::from_utf8_lossy(&status.body).into_owned();
    assert!(status_text.contains("last_error"), "{status_text}");
    scan("/status", &status_text, &secrets);
    let page = p.get("/").await;
    scan(
        "the status page",
        &String::from_utf8_lossy(&page.body),
        &secrets,
    );
    let metrics = p.get("/metrics").await;
    scan(
        "/metrics",
        &String::from_utf8_lossy(&metrics.body),
        &secrets,
    );
    let log = p.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log is at trace"
    );
    assert!(log.contains("KMS"), "{log}");
    scan("the log", &log, &secrets);
}
