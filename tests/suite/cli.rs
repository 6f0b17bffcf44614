//! `gpulink check` against the example configurations and the fixtures: exit 0 for
//! valid files, 78 (EX_CONFIG) with a message naming the bad key for invalid ones.

use std::path::{Path, PathBuf};
use std::process::Command;

fn gpulink() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gpulink"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn check(path: &Path) -> (i32, String) {
    let out = gpulink()
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run gpulink check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn valid_configurations_pass() {
    let mut files = vec![root().join("config/gpulink.example.toml")];
    for entry in std::fs::read_dir(root().join("tests/fixtures/valid")).expect("fixtures") {
        files.push(entry.expect("entry").path());
    }
    assert!(files.len() >= 3);
    for file in files {
        let (code, text) = check(&file);
        assert_eq!(code, 0, "{}: {text}", file.display());
        assert!(text.contains("valid"), "{text}");
    }
}

#[test]
fn invalid_configurations_exit_78_naming_the_key() {
    let cases = [
        ("unknown_key.toml", "max_bodyy"),
        ("unknown_section.toml", "tenant2"),
        ("bad_duration.toml", "interval"),
        ("bad_size.toml", "max_body"),
        ("bad_phase.toml", "phase"),
        ("bad_date.toml", "public_fallback_until"),
        ("canary_percent.toml", "migration.canary_percent"),
        ("pool_idle_over_nlb.toml", "upstream.pool_idle_timeout"),
        ("ip_without_server_name.toml", "regions[0].privatelink[0]"),
        ("missing_tenant.toml", "tenant"),
        ("endpoint_with_scheme.toml", "regions[0].privatelink[0]"),
        ("dns_and_list.toml", "regions[0].privatelink_dns"),
        (
            "endpoint_id_and_list.toml",
            "regions[0].privatelink_endpoint_id",
        ),
        ("esdk_alias_key.toml", "kms.key_id"),
        ("auto_key_other_region.toml", "kms.key_id"),
        ("cache_zero_messages.toml", "kms.cache.max_messages"),
        ("max_attempts_huge.toml", "retry.max_attempts"),
        ("max_connections_huge.toml", "listen.max_connections"),
        ("health_interval_tiny.toml", "health.interval"),
        ("ca_file_not_regular.toml", "upstream.ca_file"),
        ("many_out_of_range.toml", "listen.max_body"),
    ];
    let dir = root().join("tests/fixtures/invalid");
    let count = std::fs::read_dir(&dir).expect("fixtures").count();
    assert_eq!(count, cases.len(), "every invalid fixture has a case here");
    for (file, key) in cases {
        let (code, text) = check(&dir.join(file));
        assert_eq!(code, 78, "{file} should be invalid: {text}");
        assert!(
            text.contains(key),
            "{file}: message should name `{key}`: {text}"
        );
    }
}

#[test]
fn every_out_of_range_value_is_reported_at_once() {
    let (code, text) = check(&root().join("tests/fixtures/invalid/many_out_of_range.toml"));
    assert_eq!(code, 78, "{text}");
    for key in [
        "listen.max_body",
        "health.port",
        "health.healthy_threshold",
        "outlier.max_ejected_percent",
        "rollback.max_error_rate",
    ] {
        assert!(
            text.contains(&format!("`{key}`")),
            "{key} not named: {text}"
        );
    }
}

/// The minimal valid fixture with `upstream.ca_file` set.
fn with_ca_file(dir: &Path, ca: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("tests/fixtures/valid/minimal.toml"))
        .expect("fixture")
        .replace(
            "region = \"us-east-1\"\n",
            &format!(
                "region = \"us-east-1\"\n\n[upstream]\nca_file = \"{}\"\n",
                ca.display()
            ),
        );
    assert!(text.contains("ca_file"));
    let path = dir.join("gpulink.toml");
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn check_refuses_a_ca_file_that_run_would_refuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    // Empty, text without a certificate, a private key only, a certificate that is not
    // DER inside: `run` cannot build its trust store from any of them.
    for content in [
        "",
        "not a certificate\n",
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ] {
        std::fs::write(&ca, content).expect("write");
        let (code, text) = check(&with_ca_file(dir.path(), &ca));
        assert_eq!(code, 78, "{content:?} passed: {text}");
        assert!(text.contains("upstream.ca_file"), "{text}");
    }
    // A FIFO (opening it for reading would wait for a writer for ever).
    let fifo = dir.path().join("ca-fifo.pem");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    let (code, text) = check(&with_ca_file(dir.path(), &fifo));
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("not a regular file"), "{text}");
    // A real certificate passes.
    let cert = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).expect("cert");
    std::fs::write(&ca, cert.cert.pem()).expect("write");
    let (code, text) = check(&with_ca_file(dir.path(), &ca));
    assert_eq!(code, 0, "{text}");
}

#[test]
fn check_refuses_a_configuration_path_that_is_not_a_regular_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let zero = dir.path().join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
    let fifo = dir.path().join("fifo.toml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    for path in [zero.as_path(), fifo.as_path(), dir.path()] {
        let (code, text) = check(path);
        assert_eq!(code, 78, "{}: {text}", path.display());
        assert!(text.contains("not a regular file"), "{text}");
    }
}

#[test]
fn missing_file_is_a_config_error() {
    let (code, text) = check(Path::new("/nonexistent/gpulink.toml"));
    assert_eq!(code, 78);
    assert!(text.contains("/nonexistent/gpulink.toml"), "{text}");
}

#[test]
fn demo_config_is_valid_once_the_ca_is_filled_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    let cert = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).expect("cert");
    std::fs::write(&ca, cert.cert.pem()).expect("write");
    let text = std::fs::read_to_string(root().join("config/demo.toml"))
        .expect("demo config")
        .replace("SIM_CA_FILE", &ca.display().to_string());
    let path = dir.path().join("demo.toml");
    std::fs::write(&path, text).expect("write");
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn unreadable_ca_under_tmp_names_the_key_and_the_private_tmp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let example =
        std::fs::read_to_string(root().join("config/gpulink.example.toml")).expect("example");
    let missing = "/tmp/gpulink-test-no-such-dir/ca.pem";
    let text = example.replace(
        "# ca_file = \"/etc/gpulink/ca.pem\"",
        &format!("ca_file = \"{missing}\""),
    );
    assert!(text.contains(missing));
    let path = dir.path().join("gpulink.toml");
    std::fs::write(&path, text).expect("write");
    let (code, text) = check(&path);
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("`upstream.ca_file`"), "{text}");
    assert!(text.contains("PrivateTmp=yes"), "{text}");
}

/// The systemd sandbox hides a shared credentials file that works from a shell (a 0600
/// file under DynamicUser=, or one under the private /tmp): `run` names the variable and
/// the sandbox cause and exits 78, where the AWS SDK would only say "the credential
/// provider was not enabled" (issue 13).
#[test]
fn an_unreadable_aws_credentials_file_names_the_variable_and_the_sandbox() {
    let config = root().join("tests/fixtures/valid/minimal.toml");
    for variable in ["AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"] {
        let missing = "/tmp/gpulink-test-no-such-dir/aws-file";
        let out = Command::new("timeout")
            .arg("60")
            .arg(env!("CARGO_BIN_EXE_gpulink"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env(variable, missing)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .expect("gpulink runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{variable}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot read {variable}={missing}")),
            "{stderr}"
        );
        assert!(stderr.contains("PrivateTmp=yes"), "{stderr}");
    }

    // The finding itself: a root-owned 0600 credentials file, read by another user, as
    // the unit's dynamic user reads it. Only root can make that user (CI runs as root).
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the suite as root"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod dir");
    let credentials = dir.path().join("aws-credentials");
    std::fs::write(&credentials, "[default]\naws_access_key_id = x\n").expect("write");
    std::fs::set_permissions(
        &credentials,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod file");
    let out = Command::new("timeout")
        .args([
            "60",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .arg(env!("CARGO_BIN_EXE_gpulink"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("setpriv runs gpulink");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("cannot read AWS_SHARED_CREDENTIALS_FILE=")
            && stderr.contains("Permission denied"),
        "{stderr}"
    );
    assert!(
        stderr.contains("DynamicUser=yes") && stderr.contains("LoadCredential="),
        "{stderr}"
    );
}

/// Warnings go to stderr, one per line, labelled; the status stays 0.
fn warnings_of(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("gpulink: warning: "))
        .collect()
}

/// A configuration with nothing left of the example (its own tenant, key, names and
/// addresses), plus `extra` lines in `[migration]` and `public` entries in its region.
fn own_config(dir: &Path, public: &str, migration: &str) -> PathBuf {
    let text = format!(
        r#"[tenant]
id = "acme-prod"
model_pool = "model-a"

[kms]
key_id = "arn:aws:kms:us-east-1:444455556666:key/0f1e2d3c-aaaa-bbbb-cccc-1234567890ff"
region = "us-east-1"

[upstream]
server_name = "gpu-cluster.acme.internal"

[[regions]]
name = "us-east-1"
privatelink = ["10.1.2.3"]
public = [{public}]

[migration]
phase = "privatelink"
{migration}
"#
    );
    let path = dir.join("own.toml");
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn check_warns_about_the_examples_placeholders_and_still_exits_0() {
    let (code, text) = check(&root().join("config/gpulink.example.toml"));
    assert_eq!(code, 0, "{text}");
    let warnings = warnings_of(&text);
    for key in [
        "`kms.key_id`",
        "`tenant.id`",
        "`upstream.server_name`",
        "`regions[0].privatelink[0]`",
        "`regions[0].public[0]`",
        "`regions[1].privatelink[0]`",
    ] {
        assert!(
            warnings.iter().any(|w| w.contains(key)),
            "no warning for {key}: {text}"
        );
    }
    assert!(
        text.contains(&format!("{} warnings", warnings.len())),
        "{text}"
    );

    // The same file with every placeholder replaced: no warning at all.
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, text) = check(&own_config(dir.path(), "", ""));
    assert_eq!(code, 0, "{text}");
    assert!(warnings_of(&text).is_empty(), "{text}");
    assert!(!text.contains("warning"), "{text}");
}

#[test]
fn check_warns_about_a_fallback_window_already_past() {
    let dir = tempfile::tempdir().expect("tempdir");
    let past = own_config(
        dir.path(),
        "",
        "public_fallback_until = \"2020-01-01T00:00:00Z\"",
    );
    let (code, text) = check(&past);
    assert_eq!(code, 0, "{text}");
    let warnings = warnings_of(&text);
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("`migration.public_fallback_until`")
            && warnings[0].contains("already past"),
        "{text}"
    );
    let future = own_config(
        dir.path(),
        "",
        "public_fallback_until = \"2999-01-01T00:00:00Z\"",
    );
    let (code, text) = check(&future);
    assert_eq!(code, 0, "{text}");
    assert!(warnings_of(&text).is_empty(), "{text}");
}

/// The check runs in a network namespace of its own (no interface but a down loopback),
/// so its look-ups reach no DNS server: only /etc/hosts answers.
fn check_without_network(path: &Path, args: &[&str]) -> Option<(i32, String)> {
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net"])
        .arg(env!("CARGO_BIN_EXE_gpulink"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .args(args)
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("unshare:") {
        return None;
    }
    Some((out.status.code().unwrap_or(-1), text))
}

#[test]
fn check_warns_about_public_names_that_do_not_resolve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = own_config(
        dir.path(),
        "\"localhost:8443\", \"gpulink-check-test.invalid:8443\"",
        "",
    );
    let Some((code, text)) = check_without_network(&path, &[]) else {
        eprintln!("SKIPPED: needs `unshare --user --net` to keep the look-ups off the network");
        return;
    };
    assert_eq!(code, 0, "{text}");
    let warnings = warnings_of(&text);
    assert_eq!(warnings.len(), 1, "only the unresolvable name: {text}");
    assert!(
        warnings[0].contains("`regions[0].public[1]`")
            && warnings[0].contains("gpulink-check-test.invalid"),
        "{text}"
    );
    // --no-resolve: no look-up, no warning.
    let (code, text) = check_without_network(&path, &["--no-resolve"]).expect("unshare");
    assert_eq!(code, 0, "{text}");
    assert!(warnings_of(&text).is_empty(), "{text}");
}

/// `gpulink demo` beside a running simulator (something holds the simulator's ports
/// 8443 and 8080 on the demo's addresses): it picks other ports, succeeds, keeps the
/// proxy's log lines out of its report (they go to the log file), and its table's
/// columns line up.
#[test]
fn demo_runs_beside_a_simulator_with_its_log_in_a_file_and_an_aligned_table() {
    let block = 241u8;
    let mut held = Vec::new();
    for (c, d) in [(10, 50), (11, 50), (12, 50), (13, 50), (20, 1)] {
        for port in [8443, 8080] {
            held.push(
                std::net::TcpListener::bind(((std::net::Ipv4Addr::new(127, block, c, d)), port))
                    .expect("hold a simulator port"),
            );
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("demo.log");
    let out = gpulink()
        .args([
            "demo",
            "--requests",
            "6",
            "--loopback-block",
            &block.to_string(),
        ])
        .arg("--log-file")
        .arg(&log)
        .env_remove("RUST_LOG")
        .output()
        .expect("gpulink demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("every request succeeded."), "{stdout}");
    assert!(stderr.is_empty(), "the log went to stderr: {stderr}");
    for level in [" WARN ", " ERROR "] {
        assert!(
            !stdout.contains(level),
            "a log line in the report: {stdout}"
        );
    }
    // The log is in the file: the demo takes ENIs down, which the proxy reports.
    let logged = std::fs::read_to_string(&log).expect("log file");
    assert!(logged.contains(" WARN "), "{logged}");
    assert!(stdout.contains(&log.display().to_string()), "{stdout}");
    assert!(
        !stdout.contains(":8443"),
        "the simulator's port was taken: {stdout}"
    );

    let rows: Vec<&str> = stdout.lines().filter(|l| l.contains(" | ")).collect();
    assert!(rows.len() >= 4, "header, rows, totals: {stdout}");
    let bars = |line: &str| -> Vec<usize> { line.match_indices(" | ").map(|(i, _)| i).collect() };
    for row in &rows {
        assert_eq!(bars(row), bars(rows[0]), "misaligned:\n{stdout}");
    }
    let region_at = rows[0].find("region").expect("region column");
    for row in &rows[1..rows.len() - 1] {
        assert!(row[region_at..].starts_with("us-"), "misaligned:\n{stdout}");
    }
    drop(held);
}

/// `gpulink run` and `gpulink discover` with no usable system CA certificate (an empty
/// SSL_CERT_FILE and SSL_CERT_DIR, as in an image without ca-certificates): the AWS SDK
/// would panic building its HTTPS client (a debug assertion in aws-smithy's TrustStore)
/// or, in a release build, fail every KMS call as an unknown issuer. Instead: exit 78
/// (run) or 2 (discover) with a message that says what is missing and where it looked.
/// With the system's bundle the same discover gets past that check (to a refused
/// connection), so the check is not simply always failing.
#[test]
fn without_system_ca_certificates_run_and_discover_say_so_instead_of_panicking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty_file = dir.path().join("empty.pem");
    let empty_dir = dir.path().join("certs");
    std::fs::write(&empty_file, "").expect("empty bundle");
    std::fs::create_dir(&empty_dir).expect("empty dir");
    let bounded = |args: &[&str], cert_file: &Path| {
        let out = Command::new("timeout")
            .arg("60")
            .arg(env!("CARGO_BIN_EXE_gpulink"))
            .args(args)
            .env("SSL_CERT_FILE", cert_file)
            .env("SSL_CERT_DIR", &empty_dir)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_WEB_IDENTITY_TOKEN_FILE")
            .output()
            .expect("gpulink runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let config = root().join("tests/fixtures/valid/minimal.toml");
    let config = config.to_str().expect("utf-8 path");
    let discover = [
        "discover",
        "--vpc-endpoint-id",
        "vpce-0123456789abcdef0",
        "--region",
        "us-east-1",
        "--endpoint-url",
        "http://127.0.0.1:1",
    ];
    for (args, expected) in [(&["run", "--config", config][..], 78), (&discover[..], 2)] {
        let (code, stderr) = bounded(args, &empty_file);
        assert_eq!(code, expected, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("no usable system CA certificates"),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("SSL_CERT_FILE={}", empty_file.display())),
            "{stderr}"
        );
        assert!(stderr.contains("ca-certificates package"), "{stderr}");
    }
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if bundle.is_file() {
        let (_, stderr) = bounded(&discover, bundle);
        assert!(!stderr.contains("no usable system CA"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
