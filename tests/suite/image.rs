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

/// Whether root and `programs` (and, with `moto`, the test venv) are here; a missing one
/// skips the test, except in CI (`CI` set), where that is a failure.
fn prerequisites(programs: &[&str], moto: bool) -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root");
    }
    for program in programs {
        if !which(program) {
            missing.push(program);
        }
    }
    if moto && !root_dir().join(".venv/bin/python").exists() {
        missing.push(".venv with moto (run scripts/test.sh)");
    }
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the image test cannot run in CI without: {missing:?}"
    );
    println!("skipped: missing {missing:?} (scripts/test.sh installs them as root)");
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

/// `scripts/image-bases.sh` on the Debian root (`--runtime-only` unless `full`): its
/// `KEY=image` lines.
fn image_bases(debian: &Path, full: bool) -> String {
    let mut bases = Command::new("bash");
    bases
        .arg(root_dir().join("scripts/image-bases.sh"))
        .arg(debian);
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
    text(&bases)
}

/// One image of [`image_bases`]'s answer.
fn base_image(names: &str, key: &str) -> String {
    names
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} from scripts/image-bases.sh: {names}"))
        .to_string()
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
    if !prerequisites(&["podman", "debootstrap", "nsenter", "rustc"], true) {
        return;
    }
    // The Debian root is made (once) under this lock, which systemd_boot.rs takes too;
    // and the Dockerfile build takes both cores for minutes.
    let _alone = crate::common::alone_blocking();
    let debian = crate::debian_root::path();

    let full = std::env::var("GPULINK_IMAGE_TEST").is_ok_and(|v| v == "dockerfile");
    let names = image_bases(&debian, full);
    let base = |key: &str| base_image(&names, key);
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

/// A HEAD of a manifest at a plain-HTTP registry on loopback, asking for every manifest
/// kind (an index or list too): its `Content-Type` and `Docker-Content-Digest`, what
/// the registry itself says the tag is, independent of skopeo (which the script uses).
fn registry_manifest(registry: &str, name: &str, tag: &str) -> Result<(String, String), String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(registry).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "HEAD /v2/{name}/manifests/{tag} HTTP/1.1\r\nHost: {registry}\r\nConnection: close\r\n\
         Accept: application/vnd.oci.image.index.v1+json, \
         application/vnd.docker.distribution.manifest.list.v2+json, \
         application/vnd.docker.distribution.manifest.v2+json, \
         application/vnd.oci.image.manifest.v1+json\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = String::new();
    stream
        .read_to_string(&mut head)
        .map_err(|e| e.to_string())?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head);
    }
    let header = |wanted: &str| {
        head.lines()
            .find_map(|l| {
                let (key, value) = l.split_once(':')?;
                key.eq_ignore_ascii_case(wanted)
                    .then(|| value.trim().to_string())
            })
            .ok_or_else(|| format!("no {wanted}: {head}"))
    };
    Ok((header("Content-Type")?, header("Docker-Content-Digest")?))
}

/// The default of `ARG name=` in a Dockerfile.
fn arg_default<'a>(dockerfile: &'a str, name: &str) -> &'a str {
    dockerfile
        .lines()
        .find_map(|l| l.strip_prefix(&format!("ARG {name}=")))
        .unwrap_or_else(|| panic!("no ARG {name}= in:\n{dockerfile}"))
}

/// `scripts/pin-images.sh --registry … --plain-http` against a real registry: the
/// distribution registry Docker Hub runs (Debian's `docker-registry`) on 127.0.0.1,
/// holding the local stand-ins of the two bases under the names the Dockerfile uses
/// (`library/rust:<v>-bookworm` as one manifest, `distroless/cc-debian12:nonroot` as a
/// multi-arch style index, as the real one is). Checks that:
///
/// * the ARG defaults become `tag@sha256:<digest>` with the digest the registry reports
///   for the tag (its `Docker-Content-Digest`; for the index, the index's, which is what
///   `docker pull` of a multi-arch image verifies), the `# Unpinned:` note goes, and the
///   packaging check accepts the result;
/// * the pinned references pull as written (`rust:1.95-bookworm@sha256:…` and
///   `gcr.io/distroless/…:nonroot@sha256:…`, through a registries.conf mirror to the
///   local registry) and are the stand-in images;
/// * after the tag moves (a base rebuilt), running the script again re-pins to the new
///   digest: the update path the Dockerfile's note describes.
///
/// The repository's own Dockerfile stays unpinned: Docker Hub and gcr.io are not
/// reachable from here, and a digest of a local stand-in would be a lie about them.
#[test]
fn pin_images_pins_to_the_digests_a_real_registry_serves() {
    if !prerequisites(
        &[
            "podman",
            "skopeo",
            "docker-registry",
            "debootstrap",
            "rustc",
        ],
        false,
    ) {
        return;
    }
    let _alone = crate::common::alone_blocking();
    let debian = crate::debian_root::path();
    let names = image_bases(&debian, false);
    let (runtime_image, debian_image) = (
        base_image(&names, "RUNTIME_IMAGE"),
        base_image(&names, "DEBIAN_IMAGE"),
    );

    // The registry, on a loopback port of its own, storing in a temporary directory.
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = format!("127.0.0.1:{}", crate::common::free_port());
    let config = dir.path().join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {registry}\n",
            dir.path().join("storage").display()
        ),
    )
    .expect("registry config");
    let mut cleanup = Cleanup::default();
    cleanup.children.push(
        Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry starts"),
    );
    wait_for("the registry answers", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&registry)
            .map(drop)
            .map_err(|e| e.to_string())
    });

    let dockerfile = std::fs::read_to_string(root_dir().join("packaging/docker/Dockerfile"))
        .expect("Dockerfile");
    let rust_tag = format!("{}-bookworm", arg_default(&dockerfile, "RUST_VERSION"));
    let rust_at = format!("{registry}/library/rust:{rust_tag}");
    let distroless_at = format!("{registry}/distroless/cc-debian12:nonroot");
    podman_ok(&["push", "--tls-verify=false", &debian_image, &rust_at]);
    // A fixed name: a list a failed run left behind is replaced, not accumulated.
    let list = "localhost/gpulink-suite-pin-list:latest";
    let _ = podman(&["manifest", "rm", list]);
    podman_ok(&["manifest", "create", list]);
    let push_list = |image: &str| {
        podman_ok(&[
            "manifest",
            "add",
            list,
            &format!("containers-storage:{image}"),
        ]);
        podman_ok(&[
            "manifest",
            "push",
            "--tls-verify=false",
            list,
            &format!("docker://{distroless_at}"),
        ]);
    };
    push_list(&runtime_image);

    let copy = dir.path().join("Dockerfile");
    std::fs::write(&copy, &dockerfile).expect("copy");
    let pin = || {
        let output = Command::new("bash")
            .arg(root_dir().join("scripts/pin-images.sh"))
            .args(["--registry", &registry, "--plain-http"])
            .arg(&copy)
            .output()
            .expect("pin-images.sh runs");
        assert!(
            output.status.success(),
            "pin-images.sh failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::read_to_string(&copy).expect("pinned")
    };
    let expect_pins = |pinned: &str| -> (String, String) {
        let (rust_type, rust_digest) = registry_manifest(&registry, "library/rust", &rust_tag)
            .unwrap_or_else(|e| panic!("{e}"));
        let (list_type, list_digest) =
            registry_manifest(&registry, "distroless/cc-debian12", "nonroot")
                .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            rust_type.ends_with("manifest.v1+json") || rust_type.ends_with("manifest.v2+json"),
            "{rust_type}"
        );
        assert!(
            list_type.ends_with("index.v1+json") || list_type.ends_with("list.v2+json"),
            "{list_type}"
        );
        assert_eq!(
            arg_default(pinned, "BUILD_IMAGE"),
            format!("rust:${{RUST_VERSION}}-bookworm@{rust_digest}"),
            "{pinned}"
        );
        assert_eq!(
            arg_default(pinned, "RUNTIME_IMAGE"),
            format!("gcr.io/distroless/cc-debian12:nonroot@{list_digest}"),
            "{pinned}"
        );
        assert_eq!(crate::packaging::image_pins(pinned), Ok(0), "{pinned}");
        assert!(!pinned.contains("# Unpinned:"), "{pinned}");
        (rust_digest, list_digest)
    };
    let pinned = pin();
    let (rust_digest, list_digest) = expect_pins(&pinned);
    // Nothing but the two ARG lines and the note changed.
    let changed: Vec<_> = dockerfile
        .lines()
        .filter(|l| !pinned.lines().any(|p| p == *l))
        .collect();
    assert_eq!(changed.len(), 3, "{changed:?}");

    // The pinned references pull as the Dockerfile writes them, from a mirror of Docker
    // Hub and gcr.io that is the local registry.
    let registries = dir.path().join("registries.conf");
    std::fs::write(
        &registries,
        format!(
            "unqualified-search-registries = [\"docker.io\"]\nshort-name-mode = \"permissive\"\n\
             [[registry]]\nprefix = \"gcr.io\"\nlocation = \"gcr.io\"\n\
             [[registry.mirror]]\nlocation = \"{registry}\"\ninsecure = true\n\
             [[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\
             [[registry.mirror]]\nlocation = \"{registry}\"\ninsecure = true\n"
        ),
    )
    .expect("registries.conf");
    let image_id = |image: &str| podman_ok(&["image", "inspect", "--format", "{{.Id}}", image]);
    let rust_version = arg_default(&dockerfile, "RUST_VERSION");
    for (reference, stand_in, untag) in [
        (
            arg_default(&pinned, "BUILD_IMAGE").replace("${RUST_VERSION}", rust_version),
            &debian_image,
            format!("docker.io/library/rust@{rust_digest}"),
        ),
        (
            arg_default(&pinned, "RUNTIME_IMAGE").to_string(),
            &runtime_image,
            format!("gcr.io/distroless/cc-debian12@{list_digest}"),
        ),
    ] {
        let pulled = Command::new("podman")
            .args(["--runtime", "runc", "pull", "--quiet", &reference])
            .env("CONTAINERS_REGISTRIES_CONF", &registries)
            .stdin(Stdio::null())
            .output()
            .expect("podman pull runs");
        let _ = podman(&["rmi", &untag]);
        assert!(
            pulled.status.success(),
            "podman pull {reference}: {}",
            String::from_utf8_lossy(&pulled.stderr)
        );
        assert_eq!(text(&pulled), image_id(stand_in), "{reference}");
    }

    // The base gets a fix (here: another image under the same tag): a second run re-pins
    // the runtime image to the tag's new digest and leaves the build image as it was.
    podman_ok(&["manifest", "rm", list]);
    podman_ok(&["manifest", "create", list]);
    push_list(&debian_image);
    let repinned = pin();
    let (rust_again, list_again) = expect_pins(&repinned);
    assert_eq!(rust_again, rust_digest);
    assert_ne!(list_again, list_digest);
    let _ = podman(&["manifest", "rm", list]);
    drop(cleanup);
}
