//! The .deb under a real systemd: a minimal Debian bookworm root (`crate::debian_root`:
//! debootstrap, made once and cached as `target/nspawn-root`) booted with
//! `systemd-nspawn -b` on a private network (the container has only its own loopback:
//! nothing it does reaches the host's network), the test driving it with `nsenter`. Inside, moto (the host's `.venv`,
//! bind-mounted read-only) is KMS and `gpulink sim` the cluster, and the test checks:
//!
//! * install: the configuration is created from the example (not a conffile), the
//!   service is neither enabled nor started;
//! * a CA at mode 0600 fails the start naming `upstream.ca_file` and the sandbox, without
//!   a restart loop (exit 78 is not restarted);
//! * the `LoadCredential=` recipe shipped in the package makes a 0600 AWS credentials
//!   file and a 0600 CA work, `systemctl reload` (whose check reads the CA) included;
//! * `systemctl start` returns only once `/ready` answers 200; `STATUS=` names the phase
//!   and generation;
//! * `systemctl reload` applies a phase change under load with zero failed requests and
//!   applies it once; a rejected file makes `systemctl reload` fail and keeps serving;
//! * the watchdog restarts a process stopped with SIGSTOP;
//! * `systemctl stop` lets a request in flight finish;
//! * upgrade restarts the running service on the new binary and keeps the operator's
//!   file; remove stops it; purge removes the configuration and the enable symlink.
//!
//! Needs root, systemd-nspawn and debootstrap (`scripts/test.sh` installs them), and
//! cargo-deb. Without them the test is skipped, except in CI (`CI` set), where that is a
//! failure. Its addresses, 127.200.x.x, exist only inside the container's own network,
//! so they cannot meet the blocks the rest of the suite takes on the host.

use crate::deb;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether everything this test needs is here; in CI a missing piece is a failure.
fn prerequisites() -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root");
    }
    for program in ["systemd-nspawn", "debootstrap", "nsenter", "dpkg-deb"] {
        if !which(program) {
            missing.push(program);
        }
    }
    if !root_dir().join(".venv/bin/moto_server").exists() {
        missing.push(".venv with moto (run scripts/test.sh)");
    }
    if missing.is_empty() {
        return deb::available();
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the systemd boot test cannot run in CI without: {missing:?}"
    );
    println!("skipped: missing {missing:?} (scripts/test.sh installs them as root)");
    false
}

/// The virtualenv's Python installation, when it is not the system's (pyenv, a
/// toolchain image): bound read-only at the same path, so `.venv/bin/python` runs inside.
fn python_home_bind(venv: &Path) -> Option<String> {
    let cfg = std::fs::read_to_string(venv.join("pyvenv.cfg")).ok()?;
    let home = cfg
        .lines()
        .find_map(|l| l.strip_prefix("home"))
        .map(|rest| rest.trim_start_matches([' ', '=']).trim())?;
    let prefix = Path::new(home).parent()?;
    if prefix == Path::new("/usr") || prefix == Path::new("/") {
        return None;
    }
    Some(format!("--bind-ro={}", prefix.display()))
}

/// A booted container; powered off (then killed) when dropped.
struct Container {
    nspawn: Child,
    leader: u32,
    log: PathBuf,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.nspawn.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

impl Container {
    fn boot(root: &Path, assets: &Path, log: PathBuf) -> Container {
        let venv = root_dir().join(".venv");
        let name = format!("gpulink-test-{}", std::process::id());
        let nspawn = Command::new("systemd-nspawn")
            .arg("--quiet")
            .arg("--directory")
            .arg(root)
            .args([
                "--boot",
                "--volatile=overlay",
                "--private-network",
                "--register=no",
                "--keep-unit",
                "--console=pipe",
                "--machine",
                &name,
            ])
            .arg(format!("--bind-ro={}", venv.display()))
            .args(python_home_bind(&venv))
            .arg(format!("--bind-ro={}:/gpulink-test", assets.display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::from(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("log"),
            ))
            .spawn()
            .expect("systemd-nspawn starts");
        let mut container = Container {
            leader: 0,
            nspawn,
            log,
        };
        // The container's PID 1, as the host sees it: nspawn's child that runs systemd
        // (nspawn forks helpers first, so the first child may not be it).
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid = container.nspawn.id();
        loop {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            let init = children.split_whitespace().find(|child| {
                std::fs::read_to_string(format!("/proc/{child}/comm"))
                    .is_ok_and(|comm| comm.trim() == "systemd")
            });
            if let Some(init) = init {
                container.leader = init.parse().expect("pid");
                break;
            }
            if let Ok(Some(status)) = container.nspawn.try_wait() {
                panic!("systemd-nspawn exited with {status}:\n{}", container.log());
            }
            assert!(
                Instant::now() < deadline,
                "no container init:\n{}",
                container.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Booted: every start-up job done (running, or degraded if some unit failed).
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let output = container.sh("systemctl is-system-running || true");
            let state = stdout(&output);
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the container never finished booting ({state}; {}):\n{}",
                String::from_utf8_lossy(&output.stderr),
                container.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        container
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a shell script inside the container, with a clean environment.
    fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "--"])
            .args([
                "/usr/bin/env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                "DEBIAN_FRONTEND=noninteractive",
                "SYSTEMD_PAGER=",
                "/bin/sh",
                "-c",
            ])
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter runs")
    }

    /// Runs a script that must succeed; returns its stdout.
    fn ok(&self, script: &str) -> String {
        let output = self.sh(script);
        if !output.status.success() {
            let journal = self.sh("journalctl --no-pager -n 40 -u gpulink");
            panic!(
                "`{script}` failed ({}):\n{}{}\njournal:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&journal.stdout)
            );
        }
        stdout(&output)
    }

    /// Polls `script` until its stdout satisfies `done`, within `limit`.
    fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        script: &str,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let out = stdout(&self.sh(script));
            if done(&out) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}; last `{script}` said: {out}\n{}",
                self.ok("journalctl --no-pager -n 60 -u gpulink || true")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `systemctl show -p KEY --value gpulink`.
    fn property(&self, key: &str) -> String {
        self.ok(&format!("systemctl show -p {key} --value gpulink"))
    }

    /// GET on the admin server from inside: (status, body).
    fn admin(&self, path: &str) -> (u16, String) {
        let out = self.ok(&format!(
            "python3 -c 'import sys, urllib.request, urllib.error\n\
             try:\n    r = urllib.request.urlopen(\"http://{ADMIN}{path}\", timeout=10); print(r.status); print(r.read().decode())\n\
             except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n\
             except Exception as e:\n    print(0); print(type(e).__name__)'"
        ));
        let (status, body) = out.split_once('\n').unwrap_or((&out, ""));
        (status.trim().parse().unwrap_or(0), body.to_string())
    }

    fn status(&self) -> serde_json::Value {
        let (code, body) = self.admin("/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status JSON")
    }

    fn load_result(&self, file: &str) -> serde_json::Value {
        let text = self.ok(&format!("cat {file} 2>/dev/null || echo '{{}}'"));
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

const LISTEN: &str = "127.200.0.1:8000";
const ADMIN: &str = "127.200.0.1:9901";
const MOTO: &str = "127.200.0.5:5000";
const CONTROL: &str = "127.200.0.9:9950";
const PUBLIC: &str = "127.200.20.1";
const CA: &str = "/etc/gpulink/ca.pem";
/// Where the recipe (packaging/systemd/credentials.conf) puts the CA credential's copy.
const CA_COPY: &str = "/run/gpulink/ca.pem";

fn config(key_arn: &str, phase: &str, ca_file: &str) -> String {
    format!(
        r#"# written by tests/suite/systemd_boot.rs
[listen]
address = "{LISTEN}"
drain_delay = "1s"
shutdown_grace = "20s"

[admin]
address = "{ADMIN}"

[tenant]
id = "tenant-123"
model_pool = "model-a"

[kms]
key_id = "{key_arn}"
region = "us-east-1"
endpoint_url = "http://{MOTO}"

[upstream]
server_name = "gpu-cluster.yourcompany.internal"
ca_file = "{ca_file}"

[health]
# Generous: the machine running the test may be busy, and a slow health answer must
# not turn into failed requests here.
interval = "2s"
timeout = "2s"
unhealthy_threshold = 5

[[regions]]
name = "us-east-1"
privatelink = ["127.200.10.50:8443", "127.200.11.50:8443"]
public = [{{ address = "{PUBLIC}:8443", server_name = "gpu-cluster.public.example.com" }}]

[migration]
phase = "{phase}"
"#
    )
}

/// Writes `text` to `path` inside the container atomically (a rename, as editors do).
fn write_file(c: &Container, path: &str, text: &str, mode: &str) {
    let script = format!(
        "cat > {path}.new <<'GPULINK_EOF'\n{text}\nGPULINK_EOF\nchmod {mode} {path}.new && mv {path}.new {path}"
    );
    c.ok(&script);
}

#[test]
fn deb_under_real_systemd_starts_reloads_restarts_drains_upgrades_and_purges() {
    if !prerequisites() {
        return;
    }
    // Building the root and the packages and booting systemd load the machine: no
    // other test's health checks should time out because of it.
    let _alone = crate::common::alone_blocking();
    let root = crate::debian_root::path();
    let dir = tempfile::tempdir().expect("tempdir");
    let assets = dir.path().join("assets");
    std::fs::create_dir_all(&assets).expect("assets dir");
    let first = deb::build("0.1.0-1", &assets);
    let second = deb::build("0.1.0-2", &assets);
    let deb_name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let (first, second) = (deb_name(&first), deb_name(&second));
    std::fs::copy(
        root_dir().join("tests/support/nspawn_load.py"),
        assets.join("load.py"),
    )
    .expect("copy load.py");
    let venv = root_dir().join(".venv");
    let venv = venv.display();

    let c = Container::boot(&root, &assets, dir.path().join("nspawn.log"));

    // Install: configuration from the example, no conffile, service off.
    c.ok(&format!("dpkg -i /gpulink-test/{first} </dev/null"));
    c.ok("cmp /etc/gpulink/gpulink.toml /usr/share/doc/gpulink/examples/gpulink.toml");
    assert_eq!(c.ok("stat -c %a /etc/gpulink/gpulink.toml"), "644");
    assert_eq!(c.ok("stat -c %a /etc/gpulink/environment"), "600");
    assert_eq!(c.ok("dpkg-query -W -f='${Conffiles}' gpulink"), "");
    assert_eq!(stdout(&c.sh("systemctl is-enabled gpulink")), "disabled");
    assert_eq!(stdout(&c.sh("systemctl is-active gpulink")), "inactive");

    // KMS (moto) and the cluster (gpulink sim), as transient services.
    // `python -m`: the venv's scripts may name another venv path in their #! line.
    let (moto_host, moto_port) = MOTO.split_once(':').unwrap();
    c.ok(&format!(
        "systemd-run --unit=moto {venv}/bin/python -m moto.server -H {moto_host} -p {moto_port}"
    ));
    let key_arn = c.wait_for(
        "moto answers and makes a key",
        Duration::from_secs(60),
        &format!(
            "AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing {venv}/bin/python -c \
             'import boto3; print(boto3.client(\"kms\", region_name=\"us-east-1\", endpoint_url=\"http://{MOTO}\").create_key()[\"KeyMetadata\"][\"Arn\"])' 2>/dev/null"
        ),
        |out| out.starts_with("arn:aws:kms:"),
    );
    c.ok(&format!(
        "systemd-run --unit=gpulink-sim -p Environment=AWS_ACCESS_KEY_ID=testing \
         -p Environment=AWS_SECRET_ACCESS_KEY=testing -p Environment=AWS_EC2_METADATA_DISABLED=true \
         /usr/bin/gpulink sim --ca-dir /run/sim-ca --control {CONTROL} \
         --kms-endpoint-url http://{MOTO} --endpoint 127.200.10.50=us-east-1 \
         --endpoint 127.200.11.50=us-east-1 --endpoint {PUBLIC}=us-east-1:public"
    ));
    c.wait_for(
        "the simulator writes its CA",
        Duration::from_secs(60),
        "test -s /run/sim-ca/ca.pem && echo yes",
        |out| out == "yes",
    );

    // The operator's files: the CA and AWS credentials root-only, as they would keep them.
    c.ok("install -m 0600 /run/sim-ca/ca.pem /etc/gpulink/ca.pem");
    write_file(
        &c,
        "/etc/gpulink/aws-credentials",
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing",
        "0600",
    );
    c.ok("echo AWS_EC2_METADATA_DISABLED=true >> /etc/gpulink/environment");
    write_file(
        &c,
        "/etc/gpulink/gpulink.toml",
        &config(&key_arn, "privatelink", CA),
        "0644",
    );

    // Without LoadCredential=, the sandbox's user cannot read the 0600 CA: the start
    // fails, saying which key and what to do, and 78 is not restarted.
    let failed = c.sh("systemctl start gpulink");
    assert!(!failed.status.success(), "started with an unreadable CA");
    let journal = c.ok("journalctl --no-pager -u gpulink");
    assert!(
        journal.contains("`upstream.ca_file`") && journal.contains("DynamicUser=yes"),
        "{journal}"
    );
    assert_ne!(c.property("SubState"), "auto-restart", "{journal}");
    assert_eq!(c.property("NRestarts"), "0");
    assert_eq!(c.property("ExecMainStatus"), "78", "{journal}");

    // The recipe shipped in the package, plus a short watchdog for this test.
    c.ok("install -d /etc/systemd/system/gpulink.service.d && \
          cp /usr/share/doc/gpulink/examples/credentials.conf /etc/systemd/system/gpulink.service.d/");
    write_file(
        &c,
        "/etc/systemd/system/gpulink.service.d/test.conf",
        "[Service]\nWatchdogSec=3s\nLimitCORE=0\n",
        "0644",
    );
    // The CA stays 0600: the recipe loads it as a credential and copies it for the
    // service (and its reload check) to read.
    write_file(
        &c,
        "/etc/gpulink/gpulink.toml",
        &config(&key_arn, "privatelink", CA_COPY),
        "0644",
    );
    c.ok("systemctl daemon-reload && systemctl reset-failed gpulink && systemctl enable gpulink");

    // Start returns once READY=1 came: /ready answers 200 at once.
    c.ok("systemctl start gpulink");
    assert_eq!(c.admin("/ready").0, 200);
    // The CA's copy belongs to the service's dynamic user, not root.
    assert_ne!(c.ok(&format!("stat -c %u {CA_COPY}")), "0");
    let status_text = c.property("StatusText");
    assert!(
        status_text.starts_with("phase privatelink, ") && status_text.contains("generation 1;"),
        "{status_text}"
    );

    // Reload under load: a phase change, applied once, no request failing.
    let load_out = "/run/load.json";
    c.ok(&format!(
        "systemd-run --unit=load python3 /gpulink-test/load.py http://{LISTEN}/inference /run/load-stop {load_out}"
    ));
    let ok_count = |c: &Container| c.load_result(load_out)["ok"].as_u64().unwrap_or(0);
    let wait_ok = |c: &Container, at_least: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while ok_count(c) < at_least {
            assert!(
                Instant::now() < deadline,
                "the load stalled: {}",
                c.load_result(load_out)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_ok(&c, 20);
    write_file(
        &c,
        "/etc/gpulink/gpulink.toml",
        &config(&key_arn, "public", CA_COPY),
        "0644",
    );
    c.ok("systemctl reload gpulink");
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.status()["phase"] != "public" {
        assert!(Instant::now() < deadline, "the reload never applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = ok_count(&c);
    wait_ok(&c, before + 20);
    let status = c.status();
    assert_eq!(status["generation"].as_u64(), Some(2), "{status}");
    assert_eq!(status["reloads"]["applied"].as_u64(), Some(1), "{status}");
    // STATUS= is kept current, not only sent at READY=1: `systemctl status` shows the
    // new phase and generation (brought up to date every 2 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = c.property("StatusText");
        if text.starts_with("phase public, ") && text.contains("generation 2;") {
            break;
        }
        assert!(Instant::now() < deadline, "STATUS= stayed {text:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // journald gets plain text: every MESSAGE is a string (a byte array would mean
    // control bytes such as ANSI colour codes), none with an escape.
    let journal = c.ok("journalctl --no-pager -o json -u gpulink");
    let mut messages = 0;
    for line in journal.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line).expect("journal JSON");
        let message = entry["MESSAGE"].as_str().unwrap_or_else(|| {
            panic!("a MESSAGE that is not text: {line}");
        });
        assert!(
            !message.contains('\u{1b}'),
            "an escape in the journal: {message:?}"
        );
        messages += 1;
    }
    assert!(messages > 0, "no journal entries for gpulink");

    // A rejected file fails `systemctl reload`; the old configuration keeps serving.
    write_file(
        &c,
        "/etc/gpulink/gpulink.toml",
        "[listen]\nthis is not toml",
        "0644",
    );
    let rejected = c.sh("systemctl reload gpulink");
    assert!(
        !rejected.status.success(),
        "systemctl reload accepted a broken file"
    );
    assert_eq!(c.property("ActiveState"), "active");
    assert_eq!(c.admin("/ready").0, 200);
    let before = ok_count(&c);
    wait_ok(&c, before + 20);
    assert_eq!(c.status()["phase"], "public");
    write_file(
        &c,
        "/etc/gpulink/gpulink.toml",
        &config(&key_arn, "public", CA_COPY),
        "0644",
    );
    c.ok("touch /run/load-stop");
    c.wait_for(
        "the load ends",
        Duration::from_secs(90),
        &format!("test -e {load_out}.done && echo done"),
        |out| out == "done",
    );
    let load = c.load_result(load_out);
    assert_eq!(load["failed"].as_u64(), Some(0), "requests failed: {load}");
    assert!(load["ok"].as_u64().unwrap_or(0) >= 60, "{load}");

    // The watchdog: a stopped process misses its pings and is restarted.
    let stopped = c.property("MainPID");
    assert_ne!(stopped, "0");
    c.ok(&format!("kill -STOP {stopped}"));
    c.wait_for(
        "the watchdog restarts the stopped process",
        Duration::from_secs(60),
        "systemctl show -p MainPID -p NRestarts -p ActiveState -p SubState gpulink",
        |out| {
            out.contains("NRestarts=1")
                && out.contains("ActiveState=active")
                && out.contains("SubState=running")
                && !out.contains(&format!("MainPID={stopped}\n"))
        },
    );
    assert!(c
        .ok("journalctl --no-pager -u gpulink")
        .contains("Watchdog timeout"));
    assert_eq!(c.admin("/ready").0, 200);

    // Stop drains: a request in flight when `systemctl stop` starts still gets its 200.
    c.ok(&format!(
        "python3 -c 'import urllib.request; urllib.request.urlopen(urllib.request.Request(\"http://{CONTROL}/endpoints/{PUBLIC}/state\", data=b\"{{\\\"state\\\":\\\"slow\\\",\\\"delay_ms\\\":3000}}\", method=\"PUT\"), timeout=10).read()'"
    ));
    c.ok(&format!(
        "systemd-run --unit=slow python3 /gpulink-test/load.py http://{LISTEN}/inference /run/none /run/slow.json once"
    ));
    c.wait_for(
        "the slow request reaches the cluster",
        Duration::from_secs(30),
        &format!("python3 -c 'import json, urllib.request; print(json.load(urllib.request.urlopen(\"http://{CONTROL}/endpoints/{PUBLIC}\", timeout=10))[\"in_flight\"])'"),
        |out| out == "1",
    );
    c.ok("systemctl stop gpulink");
    let slow = c.load_result("/run/slow.json");
    assert_eq!(
        slow["ok"].as_u64(),
        Some(1),
        "the in-flight request: {slow}"
    );
    assert_eq!(c.property("Result"), "success");
    c.ok(&format!(
        "python3 -c 'import urllib.request; urllib.request.urlopen(urllib.request.Request(\"http://{CONTROL}/endpoints/{PUBLIC}/state\", data=b\"{{\\\"state\\\":\\\"healthy\\\"}}\", method=\"PUT\"), timeout=10).read()'"
    ));

    // Upgrade: the running service restarts on the new binary; the operator's file stays.
    c.ok("systemctl start gpulink");
    let old_pid = c.property("MainPID");
    let config_before = c.ok("sha256sum /etc/gpulink/gpulink.toml");
    c.ok(&format!("dpkg -i /gpulink-test/{second} </dev/null"));
    assert_eq!(c.ok("dpkg-query -W -f='${Version}' gpulink"), "0.1.0-2");
    let new_pid = c.property("MainPID");
    assert!(
        new_pid != old_pid && new_pid != "0",
        "not restarted: {old_pid} → {new_pid}"
    );
    assert_eq!(c.property("ActiveState"), "active");
    let exe = c.ok(&format!("readlink /proc/{new_pid}/exe"));
    assert_eq!(exe, "/usr/bin/gpulink", "runs a deleted binary: {exe}");
    assert_eq!(c.ok("sha256sum /etc/gpulink/gpulink.toml"), config_before);
    assert_eq!(c.admin("/ready").0, 200);

    // Remove stops it and keeps the configuration; purge removes it and the symlink.
    let wants = "/etc/systemd/system/multi-user.target.wants/gpulink.service";
    assert_eq!(c.ok(&format!("test -L {wants} && echo linked")), "linked");
    c.ok("dpkg -r gpulink </dev/null");
    assert_eq!(stdout(&c.sh("systemctl is-active gpulink")), "inactive");
    c.ok("test -f /etc/gpulink/gpulink.toml");
    c.ok("dpkg -P gpulink </dev/null");
    for gone in [
        wants,
        "/etc/gpulink/gpulink.toml",
        "/etc/gpulink/environment",
    ] {
        assert_eq!(
            c.ok(&format!("test -e {gone} || test -L {gone} || echo gone")),
            "gone",
            "{gone} survived the purge"
        );
    }
    // What the operator added (the CA, credentials) is theirs: not removed.
    c.ok("test -f /etc/gpulink/ca.pem");
    drop(c);
}
