//! `gpulink run` (the binary) under a fake systemd: a notification socket of the test's
//! own receives `READY=1` only once `/ready` answers 200, `WATCHDOG=1` pings at half of
//! `WATCHDOG_USEC`, and `STOPPING=1` on SIGTERM, after which the process exits 0. The
//! same run checks `--log-format json`: every stderr line is JSON, a request's lines
//! carry its request id, and the body never appears.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use tokio::net::UnixDatagram;

/// Receives notifications until one contains `wanted`; returns everything received.
async fn await_notification(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) {
    let mut buffer = vec![0u8; 4096];
    let deadline = Duration::from_secs(60);
    let result = tokio::time::timeout(deadline, async {
        loop {
            let n = socket.recv(&mut buffer).await.expect("recv");
            let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
            let done = message.lines().any(|l| l == wanted);
            seen.push(message);
            if done {
                return;
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "no {wanted} within {deadline:?}; got {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_notifies_systemd_and_logs_json_with_request_ids() {
    let cluster = Cluster::start(next_block()).await;
    let ip = cluster.layout.ip(0, 2);
    let (listen, admin) = (format!("{ip}:8000"), format!("{ip}:9901"));
    let (listen, admin) = (listen.as_str(), admin.as_str());
    let text = cluster.config_toml(
        &ProxyOptions::default()
            .set("listen.address", listen)
            .set("admin.address", admin),
    );
    let dir = &cluster.dir;
    assert!(text.contains(listen) && text.contains(admin));
    let config = dir.path().join("gpulink.toml");
    std::fs::write(&config, text).expect("write config");

    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notification socket");
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpulink"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("gpulink run starts");

    let mut seen = Vec::new();
    await_notification(&socket, "READY=1", &mut seen).await;
    // READY=1 means serving: /ready agrees at once.
    let client = http_client();
    let ready = send(
        &client,
        "GET",
        &format!("http://{admin}/ready"),
        Vec::new(),
        &[],
    )
    .await;
    assert_eq!(ready.status, 200);
    await_notification(&socket, "WATCHDOG=1", &mut seen).await;

    let reply = send(
        &client,
        "POST",
        &format!("http://{listen}/inference"),
        GUIDE_REQUEST.as_bytes().to_vec(),
        &[("x-request-id", "systemd-log-1")],
    )
    .await;
    reply.assert_status(200);

    crate::reliability::signal(&child, "TERM");
    await_notification(&socket, "STOPPING=1", &mut seen).await;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("wait task")
        .expect("wait");
    assert!(status.success(), "gpulink run exited with {status}");
    // Before READY=1 (which waits for the KMS proof) only watchdog pings came: the
    // process pings while it waits.
    let before_ready = seen
        .iter()
        .take_while(|m| !m.lines().any(|l| l == "READY=1"))
        .count();
    assert!(
        seen[..before_ready]
            .iter()
            .all(|m| m.trim() == "WATCHDOG=1"),
        "{seen:?}"
    );
    let ready_message = seen.get(before_ready).expect("READY=1 came");
    // STATUS= (what `systemctl status` shows) says what is served.
    let status = ready_message
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_default();
    assert!(
        status.starts_with("phase privatelink, ")
            && status.contains("endpoints serving, generation 1;"),
        "{seen:?}"
    );

    let logs = std::fs::read_to_string(&log_path).expect("logs");
    let mut request_lines = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        if value["span"]["id"] == "systemd-log-1" {
            request_lines += 1;
        }
    }
    assert!(
        request_lines >= 1,
        "no log line carries the request id:\n{logs}"
    );
    assert!(
        !logs.contains("Hello") && !logs.contains("max_tokens"),
        "a body reached the logs:\n{logs}"
    );
    cluster.sim.shutdown().await;
}
