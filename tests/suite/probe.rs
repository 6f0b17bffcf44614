//! `gpulink probe` (the binary) against the simulated cluster: a healthy ENI, an ENI
//! configured with the wrong TLS name, a down ENI, a full public endpoint, then a
//! cluster where nothing can serve. Checks the diagnoses, the JSON shape scripts rely
//! on, the human report, and the exit status.
//!
//! No KMS: probe never calls it.

use std::path::Path;

use std::sync::Arc;

use crate::common::{endpoint_in, next_block, put_state, Layout};
use gpulink::seal::{DevKeys, KeyService};
use gpulink_sim::{EndpointState, Sim};

fn config_text(layout: &Layout, ca: &Path) -> String {
    let [a, b, c] = layout.enis();
    format!(
        r#"
[listen]
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"

[tenant]
id = "tenant-123"
model_pool = "model-a"

[kms]
key_id = "arn:aws:kms:us-east-1:111122223333:key/probe-test"
region = "us-east-1"

[upstream]
server_name = "gpu-cluster.yourcompany.internal"
ca_file = "{ca}"
connect_timeout = "2s"

[health]
timeout = "2s"

[[regions]]
name = "us-east-1"
privatelink = [
  {{ address = "{a}:8443", zone = "use1-az1" }},
  {{ address = "{b}:8443", server_name = "wrong-name.example.com" }},
  {{ address = "{c}:8443", zone = "use1-az2" }},
]
public = [{{ address = "{public}:8443", server_name = "gpu-cluster.public.example.com" }}]

[migration]
phase = "privatelink"

[placement]
zone = "use1-az1"
"#,
        ca = ca.display(),
        public = layout.public(),
    )
}

/// `gpulink probe` with `config` (and `--json`): (exit code, stdout, stderr).
async fn probe(config: &Path, json: bool) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_gpulink"));
    command
        .args(["probe", "--config"])
        .arg(config)
        .args(["--samples", "2"]);
    if json {
        command.arg("--json");
    }
    let output = command.output().await.expect("gpulink probe runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn problems(endpoint: &serde_json::Value) -> Vec<String> {
    endpoint["diagnoses"]
        .as_array()
        .expect("diagnoses")
        .iter()
        .map(|d| d["problem"].as_str().unwrap_or("").to_string())
        .collect()
}

fn diagnosis<'a>(endpoint: &'a serde_json::Value, problem: &str) -> &'a str {
    endpoint["diagnoses"]
        .as_array()
        .expect("diagnoses")
        .iter()
        .find(|d| d["problem"] == problem)
        .and_then(|d| d["message"].as_str())
        .unwrap_or_else(|| panic!("no `{problem}` diagnosis: {endpoint:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_diagnoses_a_down_eni_and_a_wrong_certificate_name() {
    gpulink::tls::install_crypto_provider();
    let layout = Layout::new(next_block());
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = KeyService::Dev(Arc::new(DevKeys::new().expect("dev keys")));
    let sim = Sim::start(layout.sim_config(dir.path().join("ca")), keys)
        .await
        .expect("sim starts");
    let config = dir.path().join("gpulink.toml");
    std::fs::write(&config, config_text(&layout, &sim.ca_file())).expect("write config");
    let [good, wrong_name, down] = layout.enis();
    put_state(&sim, down, EndpointState::Down).await;
    put_state(&sim, layout.public(), EndpointState::Full).await;

    let (code, stdout, stderr) = probe(&config, true).await;
    assert_eq!(
        code, 0,
        "something can serve, so exit 0\n{stdout}\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("--json is JSON");
    assert_eq!(report["can_serve"], true);
    assert!(report["verdict"]
        .as_str()
        .unwrap_or("")
        .starts_with("DEGRADED"));

    let ok = endpoint_in(&report, &format!("{good}:8443"));
    assert_eq!(ok["can_serve"], true, "{ok:#}");
    assert_eq!(ok["tcp"]["ok"], true);
    assert_eq!(ok["tls"]["ok"], true);
    assert_eq!(
        ok["tls"]["verified_name"],
        "gpu-cluster.yourcompany.internal"
    );
    assert_eq!(ok["tls"]["alpn"], "h2");
    assert_eq!(ok["health"]["status"], "healthy");
    assert_eq!(ok["health"]["capacity"], 45);
    assert_eq!(ok["health_latency"]["samples"], 2);
    assert!(problems(ok).is_empty(), "{ok:#}");
    // Zones: the host's from `[placement]`, each ENI's relative to it.
    assert_eq!(report["placement"]["zone"], "use1-az1");
    assert_eq!(report["placement"]["source"], "config");
    assert_eq!(ok["zone"], "use1-az1");
    assert_eq!(ok["locality"], "same_zone");

    let named = endpoint_in(&report, &format!("{wrong_name}:8443"));
    assert_eq!(named["can_serve"], false);
    assert_eq!(named["tcp"]["ok"], true);
    assert_eq!(named["tls"]["ok"], false);
    assert_eq!(named["tls"]["verified_name"], "wrong-name.example.com");
    assert_eq!(problems(named), ["tls_wrong_name"], "{named:#}");
    let message = diagnosis(named, "tls_wrong_name");
    assert!(message.contains("wrong-name.example.com") && message.contains("server_name"));
    // rustls tells which names the certificate does carry: the fix is in the message.
    assert!(
        message.contains("gpu-cluster.yourcompany.internal"),
        "{message}"
    );
    // Health is plain HTTP on 8080: it passes, which is what points at TLS naming.
    assert_eq!(named["health"]["ok"], true);

    let refused = endpoint_in(&report, &format!("{down}:8443"));
    assert_eq!(refused["can_serve"], false);
    assert_eq!(refused["tls"]["skipped"], true);
    let refused_problems = problems(refused);
    assert!(
        refused_problems.contains(&"connect_refused".to_string())
            && refused_problems.contains(&"health_refused".to_string()),
        "{refused:#}"
    );
    assert!(diagnosis(refused, "connect_refused").contains("ENI"));
    assert_eq!(refused["zone"], "use1-az2");
    assert_eq!(refused["locality"], "cross_zone");
    assert_eq!(
        endpoint_in(&report, &format!("{wrong_name}:8443"))["locality"],
        "unknown"
    );

    let full = endpoint_in(&report, &format!("{}:8443", layout.public()));
    assert_eq!(
        full["can_serve"], true,
        "a full endpoint still serves, last"
    );
    assert_eq!(full["health"]["capacity"], 0);
    assert_eq!(problems(full), ["no_capacity"]);

    assert_eq!(report["privatelink"]["endpoints"], 3);
    assert_eq!(report["privatelink"]["can_serve"], 1);
    assert_eq!(report["public"]["can_serve"], 1);
    assert!(report["privatelink_faster_by_ms"].is_number());

    // The human report says the same in words.
    let (code, text, _) = probe(&config, false).await;
    assert_eq!(code, 0);
    for needle in [
        "wrong server name",
        "connection refused",
        "no capacity",
        "PrivateLink against public",
        "DEGRADED",
        "ALPN h2",
        "this host's zone: use1-az1 (from config)",
        &format!("{good}:8443 (local region) zone use1-az1 (same zone)"),
        &format!("{down}:8443 (local region) zone use1-az2 (other zone)"),
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }

    // Nothing can serve: exit 1, and an unhealthy endpoint is named as such.
    put_state(&sim, good, EndpointState::Failing).await;
    put_state(&sim, layout.public(), EndpointState::Down).await;
    let (code, stdout, _) = probe(&config, true).await;
    assert_eq!(code, 1, "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["can_serve"], false);
    assert!(report["verdict"].as_str().unwrap_or("").starts_with("FAIL"));
    assert_eq!(
        problems(endpoint_in(&report, &format!("{good}:8443"))),
        ["unhealthy"]
    );

    // A broken configuration is EX_CONFIG, as for `gpulink check`.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[listen]\nnot_a_key = 1\n").expect("write");
    let (code, _, stderr) = probe(&broken, false).await;
    assert_eq!(code, 78, "{stderr}");
    sim.shutdown().await;
}
