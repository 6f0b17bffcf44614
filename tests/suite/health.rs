//! `gpulink health` (the binary) against a real proxy's admin server: exit 0 when
//! `/ready` answers 200; exit 1 with one line naming the reason for a non-200 answer, a
//! refused connection, and a server that accepts but never answers (bounded by
//! `--timeout`, so the probe cannot hang).

use std::process::Command;

use crate::common::*;

/// Runs `gpulink health ARGS`; returns (exit code, stdout + stderr).
async fn health(args: Vec<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_gpulink"))
            .arg("health")
            .args(&args)
            .output()
            .expect("gpulink health runs");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    })
    .await
    .expect("task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_0_only_when_ready_answers_200() {
    let world = World::with(ProxyOptions::default()).await;
    let admin = world.proxy().admin_addr;

    let (code, text) = health(vec!["--url".into(), format!("http://{admin}/ready")]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("ready:"), "{text}");

    // Any answer but 200 is a failure, and says what came back.
    let (code, text) = health(vec!["--url".into(), format!("http://{admin}/nowhere")]).await;
    assert_eq!(code, 1, "{text}");
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    assert!(text.contains("HTTP 404"), "{text}");

    // Nothing listening: refused, named.
    let closed = std::net::TcpListener::bind((world.layout.ip(0, 9), 0)).expect("bind");
    let closed_addr = closed.local_addr().expect("addr");
    drop(closed);
    let (code, text) = health(vec!["--url".into(), format!("http://{closed_addr}/ready")]).await;
    assert_eq!(code, 1, "{text}");
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    assert!(text.contains("cannot connect"), "{text}");

    // Accepts, never answers: the deadline ends the probe.
    let silent = tokio::net::TcpListener::bind((world.layout.ip(0, 10), 0))
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let (code, text) = health(vec![
        "--url".into(),
        format!("http://{silent_addr}/ready"),
        "--timeout".into(),
        "300ms".into(),
    ])
    .await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("no answer within"), "{text}");
    holder.abort();

    // Not HTTP: refused before any connection.
    let (code, text) = health(vec!["--url".into(), format!("https://{admin}/ready")]).await;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("plain HTTP"), "{text}");

    world.stop().await;
}
