//! gpulink as operators run it: the real binaries (`gpulink sim`, `gpulink run`) as
//! separate processes, with moto as KMS. Reload by SIGHUP and by file change under load,
//! and graceful shutdown on SIGTERM with requests in flight.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::reliability::{get_within, set_sim_state, signal, spawn_proxy, Guard, SimProcess};

/// A simulated cluster (`gpulink sim`) on `127.<block>.x.y` and a proxy (`gpulink run`)
/// configured for it.
struct Processes {
    cluster: SimProcess,
    proxy: Option<Guard>,
    listen: SocketAddr,
    admin: SocketAddr,
    config_path: PathBuf,
    /// The proxy's settings over the shared configuration, kept across rewrites.
    options: ProxyOptions,
    client: HttpClient,
}

impl Processes {
    async fn start(block: u8, phase: &str) -> Processes {
        Self::launch(block, phase, None).await
    }

    /// With `hosts`, the proxy runs in a mount namespace of its own whose /etc/hosts is
    /// that file, so the test controls what the system resolver answers.
    async fn launch(block: u8, phase: &str, hosts: Option<&Path>) -> Processes {
        let options = ProxyOptions::default();
        Self::launch_with(block, phase, options, hosts, Stdio::inherit(), None).await
    }

    /// Phase `privatelink` on a block of its own, the proxy's stderr going to `stderr`
    /// at `RUST_LOG` `level`: for the tests that read or choke the proxy's log.
    async fn logging_to(stderr: Stdio, level: &str) -> Processes {
        let block = next_block();
        let options = ProxyOptions::default();
        Self::launch_with(block, "privatelink", options, None, stderr, Some(level)).await
    }

    /// Phase `privatelink` at `RUST_LOG=info`, the proxy's stderr read to its end on a
    /// thread: join it after the proxy has exited for the whole log.
    async fn launch_reading_log(
        block: u8,
        options: ProxyOptions,
    ) -> (Processes, std::thread::JoinHandle<Vec<u8>>) {
        use std::io::Read;
        let (mut reader, writer) = std::io::pipe().expect("pipe");
        let log = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = reader.read_to_end(&mut all);
            all
        });
        let processes = Self::launch_with(
            block,
            "privatelink",
            options,
            None,
            Stdio::from(writer),
            Some("info"),
        )
        .await;
        (processes, log)
    }

    /// As [`Processes::launch`], with the proxy's stderr and `RUST_LOG` chosen by the test.
    async fn launch_with(
        block: u8,
        phase: &str,
        options: ProxyOptions,
        hosts: Option<&Path>,
        stderr: Stdio,
        rust_log: Option<&str>,
    ) -> Processes {
        let cluster = SimProcess::start(block).await;
        let (listen, admin) = cluster.proxy_addresses();
        let config_dir = cluster.dir.path().join("config");
        std::fs::create_dir_all(&config_dir).expect("config dir");
        let config_path = config_dir.join("gpulink.toml");
        let mut processes = Processes {
            cluster,
            proxy: None,
            listen,
            admin,
            config_path,
            options,
            client: http_client(),
        };
        processes.write_config(phase);
        let mut proxy = match hosts {
            None => Command::new(env!("CARGO_BIN_EXE_gpulink")),
            Some(hosts) => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(format!(
                        "mount --bind '{}' /etc/hosts && exec '{}' \"$@\"",
                        hosts.display(),
                        env!("CARGO_BIN_EXE_gpulink")
                    ))
                    .arg("gpulink");
                c
            }
        };
        proxy.arg("run").arg("--config").arg(&processes.config_path);
        let rust_log = rust_log.map_or_else(|| proxy_log("warn"), str::to_string);
        let proxy = spawn_proxy(&mut proxy, &rust_log, stderr);
        processes.proxy = Some(Guard(proxy));
        processes.wait_ready().await;
        processes
    }

    /// The configuration in `phase` with `options`' settings, on the fixed listen and admin
    /// addresses this proxy keeps across reloads.
    fn config_text(&self, phase: &str, options: &ProxyOptions) -> String {
        let options = options
            .clone()
            .set("migration.phase", phase)
            .set("listen.address", self.listen)
            .set("admin.address", self.admin)
            .set("listen.drain_delay", "500ms");
        self.cluster.config_toml(&options)
    }

    fn write_config(&self, phase: &str) {
        write_atomically(&self.config_path, &self.config_text(phase, &self.options));
    }

    fn proxy(&self) -> &Child {
        &self.proxy.as_ref().expect("proxy").0
    }

    /// Waits for the proxy process to exit: its exit status.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.proxy.as_mut().expect("proxy").0.wait().expect("wait")
    }

    /// `n` requests one after another, each answered 200 within 20 s; `after` ends the
    /// failure message ("after the log backed up").
    async fn assert_serves(&self, n: usize, after: &str) {
        for i in 0..n {
            assert_eq!(
                post_within(self, Duration::from_secs(20)).await,
                200,
                "request {i}{after}"
            );
        }
    }

    async fn get(&self, addr: SocketAddr, path: &str) -> Option<Reply> {
        get_within(&self.client, addr, path).await
    }

    async fn wait_ready(&self) {
        assert_eventually!(
            within = Duration::from_secs(60),
            self.get(self.admin, "/ready").await.map(|r| r.status),
            |status| *status == Some(200),
            "proxy never became ready"
        );
    }

    async fn status(&self) -> serde_json::Value {
        self.get(self.admin, "/status")
            .await
            .expect("status")
            .json()
    }

    /// Waits until `/status` shows configuration generation `n` or later (a SIGHUP and
    /// the file watch may both reload the same change).
    async fn wait_generation(&self, n: u64) {
        assert_eventually!(
            self.status().await["generation"].as_u64(),
            |generation| *generation >= Some(n),
            "generation {n} never appeared"
        );
    }

    async fn post(&self) -> Reply {
        send(
            &self.client,
            "POST",
            &format!("http://{}/inference", self.listen),
            GUIDE_REQUEST.into(),
            &[],
        )
        .await
    }

    async fn set_state(&self, ip: IpAddr, state: &str) {
        set_sim_state(&self.client, self.cluster.control, ip, state).await;
    }

    async fn sim_in_flight(&self) -> u64 {
        let reply = self
            .get(self.cluster.control, "/endpoints")
            .await
            .expect("sim stats");
        reply
            .json()
            .as_array()
            .expect("array")
            .iter()
            .map(|e| e["in_flight"].as_u64().unwrap_or(0))
            .sum()
    }
}

/// Writes via a temporary file and a rename, as deployment tools do.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// Sends requests one after another until told to stop; counts outcomes.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(p: &Processes) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (client, url) = (p.client.clone(), format!("http://{}/inference", p.listen));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            // Bounded: at most 5,000 requests even if never told to stop.
            for _ in 0..5_000 {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let reply = send(&client, "POST", &url, GUIDE_REQUEST.into(), &[]).await;
                if reply.status == 200 {
                    o.fetch_add(1, Ordering::SeqCst);
                } else {
                    eprintln!(
                        "failed under load: {} {}",
                        reply.status,
                        String::from_utf8_lossy(&reply.body)
                    );
                    f.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Load {
            stop,
            ok,
            failed,
            task,
        }
    }

    async fn wait_for_ok(&self, at_least: u64) {
        let (ok, ended) = assert_eventually!(
            (self.ok.load(Ordering::SeqCst), self.task.is_finished()),
            |(ok, ended)| *ok >= at_least || *ended,
            "{at_least} requests answered ok (ok, load ended)"
        );
        assert!(ok >= at_least && !ended, "load ended early after {ok} ok");
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_sim_serve_the_guide_request() {
    let mut p = Processes::start(next_block(), "privatelink").await;
    let reply = p.post().await;
    reply.assert_status(200);
    assert_eq!(reply.json()["sha256"], sha256_hex(GUIDE_REQUEST.as_bytes()));
    assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    let status = p.status().await;
    assert_eq!(status["generation"], 1);
    assert_eq!(status["phase"], "privatelink");
    signal(p.proxy(), "TERM");
    let code = p.wait_exit();
    assert!(code.success(), "{code:?}");
    drop(p.cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_phase_under_load_without_failures() {
    let p = Processes::start(next_block(), "privatelink").await;
    let load = Load::start(&p);
    load.wait_for_ok(20).await;
    p.write_config("public");
    // The file watcher may also pick this up; SIGHUP makes it certain.
    signal(p.proxy(), "HUP");
    let status = assert_eventually!(
        p.status().await,
        |status| status["phase"] == "public",
        "reload never applied"
    );
    assert!(status["generation"].as_u64().unwrap_or(0) >= 2);
    let before = load.ok.load(Ordering::SeqCst);
    load.wait_for_ok(before + 20).await;
    let (ok, failed) = load.finish().await;
    assert_eq!(
        failed, 0,
        "{failed} requests failed during the reload ({ok} ok)"
    );
    let reply = p.post().await;
    assert_eq!(reply.header("x-gpulink-route"), Some("public"));
}

/// An edit followed by SIGHUP (what `systemctl reload` does) applies it once, although
/// the directory watch sees the edit too; a SIGHUP with the file unchanged is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_an_unchanged_file_is_a_no_op() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let p = Processes::logging_to(Stdio::from(log), "info").await;
    p.write_config("public");
    signal(p.proxy(), "HUP");
    p.wait_generation(2).await;
    assert_eq!(p.status().await["phase"], "public");

    let no_op = "has not changed since it was last loaded";
    let count = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .matches(no_op)
            .count()
    };
    let before = count();
    signal(p.proxy(), "HUP");
    assert_eventually!(
        count(),
        |n| *n != before,
        "the SIGHUP was never handled:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let status = p.status().await;
    assert_eq!(status["generation"].as_u64(), Some(2), "{status}");
    assert_eq!(status["reloads"]["applied"].as_u64(), Some(1), "{status}");
    assert_eq!(p.post().await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_change_reloads_and_an_invalid_file_changes_nothing() {
    let p = Processes::start(next_block(), "public").await;
    let load = Load::start(&p);
    load.wait_for_ok(10).await;

    // Valid change, picked up by the directory watch alone.
    p.write_config("privatelink");
    p.wait_generation(2).await;
    assert_eq!(p.status().await["phase"], "privatelink");
    let before = load.ok.load(Ordering::SeqCst);
    load.wait_for_ok(before + 10).await;

    // Invalid change: rejected, generation and phase unchanged, still serving. The
    // directory watch and the SIGHUP both try it (the watch skips it if the SIGHUP read
    // it first); await a rejection.
    let generation = p.status().await["generation"].as_u64().unwrap_or(0);
    write_atomically(&p.config_path, "[listen]\nthis is not toml\n");
    signal(p.proxy(), "HUP");
    assert_eventually!(
        p.status().await["reloads"]["rejected"].as_u64(),
        |rejected| *rejected >= Some(1),
        "the invalid file was never rejected"
    );
    let before = load.ok.load(Ordering::SeqCst);
    load.wait_for_ok(before + 10).await;
    let status = p.status().await;
    assert_eq!(status["generation"].as_u64(), Some(generation));
    assert_eq!(status["phase"], "privatelink");
    p.write_config("public");
    p.wait_generation(generation + 1).await;
    assert_eq!(p.status().await["phase"], "public");
    let (ok, failed) = load.finish().await;
    assert_eq!(
        failed, 0,
        "{failed} requests failed across reloads ({ok} ok)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let mut p = Processes::start(next_block(), "privatelink-only").await;
    for ip in p.cluster.layout.enis() {
        p.set_state(ip, r#"{"state": "slow", "delay_ms": 1500}"#)
            .await;
    }
    const N: u64 = 4;
    let mut held = Vec::new();
    for _ in 0..N {
        let (client, url) = (p.client.clone(), format!("http://{}/inference", p.listen));
        held.push(tokio::spawn(async move {
            send(&client, "POST", &url, GUIDE_REQUEST.into(), &[])
                .await
                .status
        }));
    }
    assert_eventually!(
        p.sim_in_flight().await,
        |in_flight| *in_flight >= N,
        "{N} requests in flight at the cluster"
    );
    signal(p.proxy(), "TERM");
    // Draining: not ready any more, while the in-flight requests continue.
    assert_eventually!(
        p.get(p.admin, "/ready").await.map(|r| r.status),
        |ready| matches!(ready, Some(503) | None),
        "/ready stops answering 200 once draining"
    );
    for task in held {
        assert_eq!(task.await.expect("join"), 200);
    }
    // After the drain delay the listener is closed: new connections are refused.
    assert_eventually!(
        tokio::net::TcpStream::connect(p.listen).await.is_ok(),
        |accepting| !*accepting,
        "the listener closes after the drain delay (observed: still accepting)"
    );
    let code = p.wait_exit();
    assert!(code.success(), "exit status {code:?}");
}

/// Whether this machine lets a test give a process its own /etc/hosts.
fn can_fake_hosts() -> bool {
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind /etc/hosts /etc/hosts",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privatelink_dns_discovers_enis_and_keeps_unchanged_ones() {
    if !can_fake_hosts() {
        eprintln!("SKIPPED: needs `unshare --mount` (root) to give the proxy its own /etc/hosts");
        return;
    }
    let block = next_block();
    let layout = Layout::new(block);
    let [a, b, c] = layout.enis();
    let hosts_dir = tempfile::tempdir().expect("tempdir");
    let hosts = hosts_dir.path().join("hosts");
    // The bind mount follows the inode: always rewrite in place, never rename.
    let write_hosts = |ips: &[IpAddr]| {
        let text: String = ips
            .iter()
            .map(|ip| format!("{ip} eni.vpce.test\n"))
            .collect();
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n{text}")).expect("hosts");
    };
    write_hosts(&[a, b]);
    // The region's ENIs come from DNS; the static list in the configuration is replaced.
    let p = Processes::launch(block, "privatelink", Some(&hosts)).await;
    let text = p.config_text(
        "privatelink",
        &ProxyOptions::default()
            .remove("regions.0.privatelink")
            .set("regions.0.privatelink_dns", "eni.vpce.test:8443")
            .set("regions.0.dns_refresh", "1s"),
    );
    assert!(text.contains("privatelink_dns"));
    write_atomically(&p.config_path, &text);
    p.wait_generation(2).await;

    let addresses = |status: &serde_json::Value| -> Vec<String> {
        let mut v: Vec<String> = status["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .filter(|e| e["route"] == "privatelink")
            .map(|e| e["address"].as_str().unwrap_or("").to_string())
            .collect();
        v.sort();
        v
    };
    let checks_of = |status: &serde_json::Value, address: &str| -> u64 {
        status["endpoints"]
            .as_array()
            .and_then(|list| list.iter().find(|e| e["address"] == address))
            .and_then(|e| e["health_checks"].as_u64())
            .unwrap_or(0)
    };
    let status = p.status().await;
    assert_eq!(
        addresses(&status),
        vec![format!("{a}:8443"), format!("{b}:8443")]
    );
    for _ in 0..4 {
        let reply = p.post().await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    }
    // Wait for a few health checks on `a`, to see them survive re-resolution.
    let a_address = format!("{a}:8443");
    assert_eventually!(
        checks_of(&p.status().await, &a_address),
        |checks| *checks >= 3,
        "three health checks of {a_address}"
    );
    let checks_before = checks_of(&p.status().await, &a_address);

    write_hosts(&[a, c]);
    let status = assert_eventually!(
        p.status().await,
        |status| addresses(status) == vec![format!("{a}:8443"), format!("{c}:8443")],
        "the DNS change was never applied"
    );
    assert!(
        checks_of(&status, &a_address) >= checks_before,
        "the unchanged ENI lost its health state"
    );
    for _ in 0..4 {
        let reply = p.post().await;
        assert_eq!(reply.status, 200);
        assert_ne!(
            reply.header("x-gpulink-endpoint"),
            Some(format!("{b}:8443").as_str())
        );
    }
}

/// `gpulink_log_lines_dropped_total` from `/metrics`.
async fn log_lines_dropped(p: &Processes) -> u64 {
    let reply = p.get(p.admin, "/metrics").await.expect("metrics");
    String::from_utf8_lossy(&reply.body)
        .lines()
        .find_map(|l| l.strip_prefix("gpulink_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("gpulink_log_lines_dropped_total in /metrics")
}

/// A request bounded in time: a proxy stalled by its log would hang it, not the test.
async fn post_within(p: &Processes, limit: Duration) -> u16 {
    tokio::time::timeout(limit, p.post())
        .await
        .map(|reply| reply.status)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_log_reader_never_stops_the_proxy() {
    // stderr is a pipe whose reader is gone (a dead `tee` or log shipper): every write
    // fails with EPIPE.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let mut p = Processes::logging_to(Stdio::from(writer), "info").await;
    p.assert_serves(40, "").await;
    assert_eq!(p.get(p.admin, "/ready").await.map(|r| r.status), Some(200));
    assert!(log_lines_dropped(&p).await > 0, "no write ever failed");
    let guard = p.proxy.as_mut().expect("proxy");
    assert!(
        guard.0.try_wait().expect("try_wait").is_none(),
        "the proxy died"
    );
    signal(p.proxy(), "TERM");
    let code = p.wait_exit();
    assert!(code.success(), "{code:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_never_stalls_requests() {
    // The reader exists but never reads: the pipe's buffer fills and stays full. At
    // `trace` every request writes many lines, so it fills within the first requests.
    let (reader, writer) = std::io::pipe().expect("pipe");
    let p = Processes::logging_to(Stdio::from(writer), "trace").await;
    // Requests until lines are being dropped (the stall is real), then some more.
    let mut i = 0;
    assert_eventually!(
        within = Duration::from_secs(120),
        {
            assert_eq!(
                post_within(&p, Duration::from_secs(20)).await,
                200,
                "request {i}"
            );
            i += 1;
            log_lines_dropped(&p).await
        },
        |dropped| *dropped > 0,
        "the log never backed up ({i} requests)"
    );
    p.assert_serves(20, " after the log backed up").await;
    assert_eq!(p.get(p.admin, "/ready").await.map(|r| r.status), Some(200));
    drop(reader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_cannot_forge_log_lines_or_colour_the_log() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An endpoint whose health port answers a status with a line break, a forged line
    // and an ANSI colour code.
    let block = next_block();
    let health_addr = SocketAddr::from(([127, block, 30, 1], 8080));
    let listener = tokio::net::TcpListener::bind(health_addr)
        .await
        .expect("bind health");
    let answered = Arc::new(AtomicU64::new(0));
    let counter = answered.clone();
    let server = tokio::spawn(async move {
        let body = r#"{"status":"sick\nFORGED level=ERROR \u001b[31mred","region":"x\ny\u001b[0m","timestamp":1}"#;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let options = ProxyOptions::default().push(
        "regions",
        serde_json::json!({
            "name": "eu-west-1",
            "privatelink": [{
                "address": format!("127.{block}.30.1:8443"),
                "server_name": "gpu-cluster.yourcompany.internal",
                "health_port": 8080,
            }],
        }),
    );
    let (mut p, log) = Processes::launch_reading_log(block, options).await;
    // Two answers: the first check's result has been recorded (and logged).
    assert_eventually!(
        answered.load(Ordering::SeqCst),
        |answered| *answered >= 2,
        "never health-checked"
    );
    assert_eq!(p.post().await.status, 200);
    signal(p.proxy(), "TERM");
    assert!(p.wait_exit().success());
    drop(p.proxy.take());
    server.abort();
    let log = log.join().expect("log reader");
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("FORGED"),
        "the unhealthy status was not logged"
    );
    assert!(
        !log.contains(&0x1b),
        "an ESC byte reached a log that is not a terminal"
    );
    for line in text.lines() {
        assert!(!line.starts_with("FORGED"), "forged line: {line:?}");
        assert!(!line.starts_with("y"), "forged line: {line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_from_a_fifo_or_dev_zero_is_rejected_while_serving() {
    let p = Processes::start(next_block(), "privatelink").await;
    let load = Load::start(&p);
    load.wait_for_ok(10).await;
    let rejected = |status: &serde_json::Value| status["reloads"]["rejected"].as_u64().unwrap_or(0);
    for (n, what) in ["a FIFO", "/dev/zero"].into_iter().enumerate() {
        std::fs::remove_file(&p.config_path).expect("remove config");
        if n == 0 {
            assert!(Command::new("mkfifo")
                .arg(&p.config_path)
                .status()
                .expect("mkfifo")
                .success());
        } else {
            std::os::unix::fs::symlink("/dev/zero", &p.config_path).expect("symlink");
        }
        signal(p.proxy(), "HUP");
        // `/status` and `/live` answering while the reload is under way is the point:
        // a read that hangs would hang them too.
        assert_eventually!(
            rejected(&p.status().await),
            |count| *count > n as u64,
            "a reload from {what} was never rejected"
        );
        assert_eq!(p.get(p.admin, "/live").await.map(|r| r.status), Some(200));
        let before = load.ok.load(Ordering::SeqCst);
        load.wait_for_ok(before + 10).await;
        assert_eq!(p.status().await["generation"].as_u64(), Some(1), "{what}");
    }
    // A regular file again: reloaded.
    std::fs::remove_file(&p.config_path).expect("remove link");
    p.write_config("public");
    signal(p.proxy(), "HUP");
    p.wait_generation(2).await;
    let (ok, failed) = load.finish().await;
    assert_eq!(failed, 0, "{failed} requests failed ({ok} ok)");
}

/// The README's "try `gpulink run` locally": `gpulink sim --print-config` is a
/// configuration `gpulink run` serves with, against that simulator, unedited but for the
/// listen addresses this test needs to keep to its block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_print_config_is_a_configuration_run_serves_with() {
    let block = 240u8;
    let moto = Moto::get().await;
    let key_arn = moto.create_key().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SocketAddr::from(([127, block, 0, 1], 9950));
    let sim_args = |command: &mut Command| {
        command
            .arg("sim")
            .arg("--ca-dir")
            .arg(dir.path().join("ca"))
            .arg("--control")
            .arg(control.to_string())
            .arg("--kms-endpoint-url")
            .arg(&moto.url)
            .args(["--endpoint", "127.240.10.50=us-east-1"])
            .args(["--endpoint", "127.240.11.50=us-east-1"])
            .args(["--endpoint", "127.240.13.50=us-west-2"])
            .args(["--endpoint", "127.240.20.1=us-east-1:public"]);
    };
    let mut print = Command::new(env!("CARGO_BIN_EXE_gpulink"));
    sim_args(&mut print);
    let out = print
        .args(["--print-config", "--key-id", &key_arn])
        .output()
        .expect("gpulink sim --print-config");
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).expect("UTF-8");
    for line in [
        "[[regions]]\nname = \"us-east-1\"\nprivatelink = [\"127.240.10.50:8443\", \"127.240.11.50:8443\"]",
        "public = [{ address = \"127.240.20.1:8443\"",
        "[[regions]]\nname = \"us-west-2\"\nprivatelink = [\"127.240.13.50:8443\"]",
        &format!("endpoint_url = \"{}\"", moto.url),
        &format!("key_id = \"{key_arn}\""),
        &format!("ca_file = \"{}\"", dir.path().join("ca/ca.pem").display()),
    ] {
        assert!(printed.contains(line), "missing {line:?} in:\n{printed}");
    }

    let mut sim = Command::new(env!("CARGO_BIN_EXE_gpulink"));
    sim_args(&mut sim);
    let _sim = Guard(
        sim.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gpulink sim"),
    );
    wait_for_listener(control, Duration::from_secs(30)).await;

    let listen = SocketAddr::from(([127, block, 0, 2], 8000));
    let admin = SocketAddr::from(([127, block, 0, 2], 9901));
    let config = dir.path().join("gpulink.toml");
    std::fs::write(
        &config,
        format!("[listen]\naddress = \"{listen}\"\n\n[admin]\naddress = \"{admin}\"\n\n{printed}"),
    )
    .expect("write config");
    let check = Command::new(env!("CARGO_BIN_EXE_gpulink"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("gpulink check");
    assert!(check.status.success(), "{check:?}");
    let _proxy = Guard(
        Command::new(env!("CARGO_BIN_EXE_gpulink"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("gpulink run"),
    );
    let client = http_client();
    let served = assert_eventually!(
        within = Duration::from_secs(60),
        {
            let request = http::Request::post(format!("http://{listen}/inference"))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(GUIDE_REQUEST)))
                .expect("request");
            match client.request(request).await {
                Ok(response) if response.status() == 200 => {
                    let route = response.headers().get("x-gpulink-route").cloned();
                    let body = http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .expect("body")
                        .to_bytes();
                    Some((route, body))
                }
                _ => None,
            }
        },
        |served| served.is_some(),
        "the proxy never served a request"
    );
    let reply = served.expect("accepted");
    assert_eq!(
        reply.0.as_ref().and_then(|v| v.to_str().ok()),
        Some("privatelink")
    );
    let json: serde_json::Value = serde_json::from_slice(&reply.1).expect("JSON");
    assert_eq!(json["sha256"], sha256_hex(GUIDE_REQUEST.as_bytes()));
}

/// A discovery refresh that fails says so in the log too (issue 12: "log, metric,
/// `/status`"; the metric and `/status` are asserted in `discovery_ec2`): `gpulink run`
/// discovers its ENIs from the EC2 stand-in, EC2 starts failing, and the warning names
/// the region and the endpoint id, carries no raw EC2 answer, and the last good set
/// keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_discovery_refresh_is_logged_and_the_last_good_set_serves() {
    use crate::common::ec2::{Ec2StandIn, StandInEni, ENDPOINT_ID};
    let block = next_block();
    let layout = Layout::new(block);
    let enis = (1..)
        .zip(layout.enis())
        .map(|(zone, ip)| StandInEni::new(ip, zone))
        .collect();
    let stand_in = Ec2StandIn::start(layout.ip(30, 1), "available", enis).await;
    let options = ProxyOptions::default()
        .remove("regions.0.privatelink")
        .set("regions.0.privatelink_endpoint_id", ENDPOINT_ID)
        .set("regions.0.privatelink_port", 8443)
        .set("regions.0.ec2_endpoint_url", stand_in.url.as_str())
        .set("regions.0.discovery_refresh", "1s");
    let (mut p, log) = Processes::launch_reading_log(block, options).await;
    let discovery = |status: serde_json::Value| status["discovery"][0].clone();
    assert_eq!(discovery(p.status().await)["condition"], "ok");

    stand_in.set(|v| v.failing = true);
    assert_eventually!(
        discovery(p.status().await),
        |d| d["condition"] == "failing",
        "the failed refresh never showed in /status"
    );
    let reply = p.post().await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    signal(p.proxy(), "TERM");
    assert!(p.wait_exit().success());
    drop(p.proxy.take());
    let log = String::from_utf8_lossy(&log.join().expect("log reader")).into_owned();
    let warning = log
        .lines()
        .find(|l| l.contains("PrivateLink discovery failed; keeping the last known addresses"))
        .unwrap_or_else(|| panic!("no warning for the failed refresh:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains(ENDPOINT_ID), "{warning}");
    assert!(warning.contains("us-east-1"), "{warning}");
    assert!(warning.contains("Unavailable"), "{warning}");
    assert!(
        !log.contains("<Response>"),
        "a raw EC2 answer in the log:\n{log}"
    );
}
