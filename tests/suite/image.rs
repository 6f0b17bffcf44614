//! The container image, run for real with podman: its runtime stage, exactly as
//! `packaging/docker/Dockerfile` writes it, on a local stand-in for distroless
//! `cc-debian12:nonroot` (no registry is reachable here; `scripts/image-bases.sh` makes
//! the stand-ins from the cached Debian root), then:
//!
//! * the image runs as 65532, with the `HEALTHCHECK` the Dockerfile declares, under the
//!   Kubernetes example's securityContext (read-only root, no capabilities);
//! * started with a configuration mounted at `/etc/gpulink` (a directory mount, as the
//!   Dockerfile says) beside moto (KMS) and `gpulink sim` (the cluster), the image's own
//!   health check, unchanged (`gpulink health` on the default admin address), goes
//!   healthy, and a request through the sidecar is answered 200;
//! * `podman exec … gpulink health` works without a shell (the README's `kubectl exec`);
//! * `podman stop`, with the stop timeout the Dockerfile documents, ends it with exit 0
//!   (drained, not SIGKILLed at the timeout); its logs are JSON lines.
//!
//! Two ways to get the image. By default (CI) the build stage is replaced by this test
//! run's binary: the runtime stage's instructions are taken from the Dockerfile
//! verbatim, only `COPY --from=build` pointed at that binary (a minute, most of it the
//! stand-in bases). With `GPULINK_IMAGE_TEST=dockerfile` the Dockerfile is built as
//! written, only its `BUILD_IMAGE`/`RUNTIME_IMAGE` arguments substituted: a cold release
//! build inside the build container, far over CI's budget for one test (README "Build
//! the image without a registry" has the measured times), so it is a separate command:
//!
//!     GPULINK_IMAGE_TEST=dockerfile bash scripts/test.sh --test suite image::
//!
//! Everything talks over the loopback of a network namespace of its own (a holder
//! container with `--network none`; moto and the simulator join it with `nsenter`), so
//! the image's default 127.0.0.1:8000/9901 meet nothing else on the machine. Needs
//! root, podman and runc (scripts/test.sh installs them), debootstrap and nsenter;
//! without them the test is skipped, except in CI (`CI` set), where that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::GUIDE_REQUEST;

/// The images this test builds (kept: a rebuild reuses podman's layers and, for the
/// Dockerfile build, its cache mounts).
const IMAGE: &str = "localhost/gpulink:suite";
const DOCKERFILE_IMAGE: &str = "localhost/gpulink:suite-dockerfile";
/// This machine's containers: runc (no crun), and limits the sandbox allows (podman's
/// defaults for root ask for more open files and processes than the host may grant).
const RUN_FLAGS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];
/// `docker run --stop-timeout` as the Dockerfile documents it (drain + grace + margin).
const STOP_TIMEOUT: &str = "45";

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

fn prerequisites() -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root");
    }
    for program in ["podman", "debootstrap", "nsenter", "rustc"] {
        if !which(program) {
            missing.push(program);
        }
    }
    if !root_dir().join(".venv/bin/python").exists() {
        missing.push(".venv with moto (run scripts/test.sh)");
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the image test cannot run in CI without: {missing:?}"
    );
    println!("skipped: missing {missing:?} (scripts/test.sh installs podman as root)");
    false
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .arg("--runtime")
        .arg("runc")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("podman runs")
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Runs podman; panics with its output unless it succeeds; returns stdout.
fn podman_ok(args: &[&str]) -> String {
    let output = podman(args);
    assert!(
        output.status.success(),
        "podman {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    text(&output)
}

/// Containers and processes this test started, removed and ended when it ends.
#[derive(Default)]
struct Cleanup {
    containers: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in self.containers.iter().rev() {
            let _ = podman(&["rm", "--force", "--time", "0", name]);
        }
    }
}

/// A command inside the test's network namespace (the holder container's).
fn in_netns(pid: &str, program: &Path) -> Command {
    let mut command = Command::new("nsenter");
    command.args(["-t", pid, "-n", "--"]).arg(program);
    command
}

fn wait_for<T>(what: &str, limit: Duration, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}; last: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `podman build` of `file` in `context`. `--format docker`: OCI image configs have no
/// HEALTHCHECK, and podman would drop it.
fn build(tag: &str, file: &Path, context: &Path, args: &[(&str, &str)]) {
    let mut argv = vec![
        "build".to_string(),
        "--format".into(),
        "docker".into(),
        "--ulimit".into(),
        "nofile=1024:1024".into(),
        "--file".into(),
        file.display().to_string(),
        "--tag".into(),
        tag.into(),
    ];
    for (name, value) in args {
        argv.push("--build-arg".into());
        argv.push(format!("{name}={value}"));
    }
    argv.push(context.display().to_string());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    podman_ok(&argv);
}

/// The Dockerfile's last stage, verbatim but for its `COPY --from=<build stage>`, which
/// takes `gpulink` from the build context instead; with the global ARG its FROM names.
fn runtime_stage(dockerfile: &str) -> Result<String, String> {
    let lines: Vec<&str> = dockerfile.lines().collect();
    let from = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .ok_or("no FROM")?;
    let image_arg = lines[from]
        .split_whitespace()
        .nth(1)
        .and_then(|image| image.strip_prefix("${"))
        .and_then(|image| image.strip_suffix('}'))
        .ok_or_else(|| format!("the last stage's image is not an ARG: {}", lines[from]))?;
    let mut out = vec![format!("ARG {image_arg}")];
    let mut copies = 0;
    for line in &lines[from..] {
        if let Some(rest) = line.strip_prefix("COPY --from=") {
            let destination = rest
                .split_whitespace()
                .last()
                .ok_or_else(|| format!("COPY without a destination: {line}"))?;
            out.push(format!("COPY gpulink {destination}"));
            copies += 1;
        } else {
            out.push(line.to_string());
        }
    }
    if copies != 1 {
        return Err(format!(
            "{copies} COPY --from= lines in the runtime stage; expected the binary's one"
        ));
    }
    Ok(out.join("\n") + "\n")
}

const MOTO: &str = "127.0.0.5:5000";
const CONTROL: &str = "127.0.0.9:9950";

fn config(key_arn: &str) -> String {
    // listen and admin are left at their defaults (127.0.0.1:8000 and :9901): the
    // image's HEALTHCHECK asks the default admin address.
    format!(
        r#"# written by tests/suite/image.rs
[listen]
drain_delay = "1s"
shutdown_grace = "10s"

[tenant]
id = "tenant-123"
model_pool = "model-a"

[kms]
key_id = "{key_arn}"
region = "us-east-1"
endpoint_url = "http://{MOTO}"

[upstream]
server_name = "gpu-cluster.yourcompany.internal"
ca_file = "/etc/gpulink/ca.pem"

[health]
interval = "1s"
timeout = "2s"

[[regions]]
name = "us-east-1"
privatelink = ["127.0.10.50:8443", "127.0.11.50:8443"]

[migration]
phase = "privatelink"
"#
    )
}

#[test]
fn image_runs_healthy_as_non_root_and_stops_cleanly() {
    if !prerequisites() {
        return;
    }
    // The Debian root is made (once) under this lock, which systemd_boot.rs takes too;
    // and the Dockerfile build takes both cores for minutes.
    let _alone = crate::common::alone_blocking();
    let debian = crate::debian_root::path();

    let full = std::env::var("GPULINK_IMAGE_TEST").is_ok_and(|v| v == "dockerfile");
    let mut bases = Command::new("bash");
    bases
        .arg(root_dir().join("scripts/image-bases.sh"))
        .arg(&debian);
    if !full {
        bases.arg("--runtime-only");
    }
    let bases = bases.output().expect("scripts/image-bases.sh runs");
    assert!(
        bases.status.success(),
        "scripts/image-bases.sh failed:\n{}{}",
        String::from_utf8_lossy(&bases.stdout),
        String::from_utf8_lossy(&bases.stderr)
    );
    let names = text(&bases);
    let base = |key: &str| -> String {
        names
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} from scripts/image-bases.sh: {names}"))
            .to_string()
    };
    let (runtime_image, debian_image) = (base("RUNTIME_IMAGE"), base("DEBIAN_IMAGE"));
    let dockerfile = root_dir().join("packaging/docker/Dockerfile");
    let image = if full {
        // The Dockerfile as written: only the two base-image arguments given.
        build(
            DOCKERFILE_IMAGE,
            &dockerfile,
            &root_dir(),
            &[
                ("BUILD_IMAGE", &base("BUILD_IMAGE")),
                ("RUNTIME_IMAGE", &runtime_image),
            ],
        );
        DOCKERFILE_IMAGE
    } else {
        // The runtime stage as written, fed this run's binary instead of the build
        // stage's.
        let text = std::fs::read_to_string(&dockerfile).expect("Dockerfile");
        let context = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            context.path().join("Containerfile"),
            runtime_stage(&text).unwrap_or_else(|e| panic!("{e}")),
        )
        .expect("Containerfile");
        std::fs::copy(
            env!("CARGO_BIN_EXE_gpulink"),
            context.path().join("gpulink"),
        )
        .expect("copy the binary");
        build(
            IMAGE,
            &context.path().join("Containerfile"),
            context.path(),
            &[("RUNTIME_IMAGE", &runtime_image)],
        );
        IMAGE
    };

    // What the image declares: non-root, the health check on the binary, no shell.
    let user = podman_ok(&["image", "inspect", "--format", "{{.Config.User}}", image]);
    assert_eq!(user, "65532:65532");
    let health = podman_ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Healthcheck}}",
        image,
    ]);
    assert!(
        health.contains(r#""CMD","/usr/local/bin/gpulink","health""#),
        "{health}"
    );

    let mut cleanup = Cleanup::default();
    let tag = std::process::id();
    let (holder, sidecar) = (
        format!("gpulink-suite-net-{tag}"),
        format!("gpulink-suite-{tag}"),
    );
    // The network namespace everything shares: a container with only its loopback.
    let mut args = vec!["run", "--detach", "--name", &holder, "--network", "none"];
    args.extend(RUN_FLAGS);
    args.extend([debian_image.as_str(), "sleep", "infinity"]);
    podman_ok(&args);
    cleanup.containers.push(holder.clone());
    let netns = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &holder]);

    let dir = tempfile::tempdir().expect("tempdir");
    let venv_python = root_dir().join(".venv/bin/python");
    let (moto_host, moto_port) = MOTO.split_once(':').expect("host:port");
    cleanup.children.push(
        in_netns(&netns, &venv_python)
            .args(["-m", "moto.server", "-H", moto_host, "-p", moto_port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto starts"),
    );
    let key_arn = wait_for("moto makes a key", Duration::from_secs(60), || {
        let output = in_netns(&netns, &venv_python)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .args([
                "-c",
                &format!(
                    "import boto3; print(boto3.client('kms', region_name='us-east-1', \
                     endpoint_url='http://{MOTO}').create_key()['KeyMetadata']['Arn'])"
                ),
            ])
            .output()
            .expect("python runs");
        let arn = text(&output);
        if arn.starts_with("arn:aws:kms:") {
            Ok(arn)
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    });
    let sim_ca = dir.path().join("sim-ca");
    cleanup.children.push(
        in_netns(&netns, Path::new(env!("CARGO_BIN_EXE_gpulink")))
            .arg("sim")
            .arg("--ca-dir")
            .arg(&sim_ca)
            .args(["--control", CONTROL])
            .args(["--kms-endpoint-url", &format!("http://{MOTO}")])
            .args(["--endpoint", "127.0.10.50=us-east-1"])
            .args(["--endpoint", "127.0.11.50=us-east-1"])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gpulink sim starts"),
    );
    let ca = wait_for(
        "the simulator writes its CA",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(sim_ca.join("ca.pem"))
                .ok()
                .filter(|pem| pem.contains("END CERTIFICATE"))
                .ok_or_else(|| "no ca.pem yet".to_string())
        },
    );

    // The configuration directory, readable by the image's user (65532), mounted as the
    // Dockerfile says: the whole directory at /etc/gpulink.
    let etc = dir.path().join("etc-gpulink");
    std::fs::create_dir(&etc).expect("config dir");
    std::fs::write(etc.join("gpulink.toml"), config(&key_arn)).expect("config");
    std::fs::write(etc.join("ca.pem"), ca).expect("ca.pem");
    let chmod = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&etc)
        .status()
        .expect("chmod");
    assert!(chmod.success());
    let mount = format!("{}:/etc/gpulink:ro", etc.display());
    let network = format!("container:{holder}");
    let mut args = vec![
        "run",
        "--detach",
        "--name",
        &sidecar,
        "--network",
        &network,
        "--stop-timeout",
        STOP_TIMEOUT,
        "--volume",
        &mount,
        "--env",
        "AWS_ACCESS_KEY_ID=testing",
        "--env",
        "AWS_SECRET_ACCESS_KEY=testing",
        "--env",
        "AWS_EC2_METADATA_DISABLED=true",
        // The Kubernetes example's securityContext: read-only root, no capabilities,
        // no privilege escalation.
        "--read-only",
        "--cap-drop",
        "all",
        "--security-opt",
        "no-new-privileges",
    ];
    args.extend(RUN_FLAGS);
    args.push(image);
    podman_ok(&args);
    cleanup.containers.push(sidecar.clone());

    // The image's own health check, as declared: healthy once /ready answers 200.
    wait_for(
        "podman healthcheck run reports healthy",
        Duration::from_secs(120),
        || {
            let output = podman(&["healthcheck", "run", &sidecar]);
            if output.status.success() {
                return Ok(());
            }
            let running = text(&podman(&[
                "inspect",
                "--format",
                "{{.State.Status}}",
                &sidecar,
            ]));
            assert_ne!(
                running,
                "exited",
                "the container exited:\n{}",
                String::from_utf8_lossy(&podman(&["logs", &sidecar]).stderr)
            );
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        },
    );

    // It serves: the guide's request through the sidecar's loopback listener.
    let reply = in_netns(&netns, &venv_python)
        .args([
            "-c",
            "import sys, urllib.request\n\
             r = urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:8000/inference', \
             data=sys.argv[1].encode(), headers={'content-type': 'application/json'}), timeout=30)\n\
             print(r.status)",
            GUIDE_REQUEST,
        ])
        .output()
        .expect("python runs");
    assert_eq!(
        text(&reply),
        "200",
        "{}",
        String::from_utf8_lossy(&reply.stderr)
    );

    // Non-root for real: the process's user, as the kernel sees it.
    let pid = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &sidecar]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let uids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("Uid line");
    assert!(
        uids.split_whitespace().all(|uid| uid == "65532"),
        "Uid:{uids}"
    );
    // exec needs no shell (there is none): the README's `kubectl exec … gpulink health`.
    let exec = podman_ok(&["exec", &sidecar, "/usr/local/bin/gpulink", "health"]);
    assert!(exec.starts_with("ready: "), "{exec}");
    assert!(!podman(&["exec", &sidecar, "/bin/sh", "-c", "true"])
        .status
        .success());

    // Stop: SIGTERM, drain, exit 0 well inside the documented stop timeout (a SIGKILL
    // at the timeout would be exit 137).
    podman_ok(&["stop", &sidecar]);
    let exit = podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &sidecar]);
    let logs = podman(&["logs", &sidecar]);
    let logs =
        String::from_utf8_lossy(&logs.stderr).into_owned() + &String::from_utf8_lossy(&logs.stdout);
    assert_eq!(exit, "0", "exit {exit}:\n{logs}");
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let _: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    assert!(
        logs.contains("SIGTERM received") && logs.contains("shutdown complete"),
        "{logs}"
    );
    drop(cleanup);
}
