//! Packaging checked without the tools this machine lacks: the systemd unit (verified by
//! `systemd-analyze` where it exists), the Dockerfile (statically: no Docker engine
//! here), the Kubernetes manifests (against the Kubernetes schemas, offline, with
//! PyPI `kubernetes-validate`), the .deb (built with cargo-deb and taken apart with
//! `dpkg-deb`: its control files, maintainer scripts and contents; installing it under a
//! real systemd is tests/suite/systemd_boot.rs) and the Grafana dashboard.
//! Nothing here listens on the network.

use crate::common::{assert_success, repo_root as root, venv_bin};
use crate::deb;

use std::path::{Path, PathBuf};
use std::process::Command;

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

/// `key=value` lines of one section of a unit file (repeated keys kept in order).
fn unit_directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Writes an executable script (mode 0755) to `path`.
fn write_script(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The values of `key` among `directives`, in order.
fn values<'a>(directives: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    directives
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn systemd_unit_is_hardened_notify_and_reloadable() {
    let unit = read("packaging/systemd/gpulink.service");
    let directives = unit_directives(&unit);
    let value = |key: &str| values(&directives, key);
    for (key, expected) in [
        ("Type", "notify"),
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        (
            "ExecReload",
            "/usr/bin/gpulink check --no-resolve --config /etc/gpulink/gpulink.toml",
        ),
        ("RestartPreventExitStatus", "78"),
        ("ConfigurationDirectory", "gpulink"),
        (
            "ExecStart",
            "/usr/bin/gpulink run --config /etc/gpulink/gpulink.toml",
        ),
    ] {
        assert!(
            value(key).contains(&expected),
            "{key}={expected} missing; found {:?}",
            value(key)
        );
    }
    assert!(value("SystemCallFilter").contains(&"@system-service"));
    // The check runs before the signal: systemd stops at the first failing ExecReload.
    assert_eq!(
        value("ExecReload").first(),
        Some(&"/usr/bin/gpulink check --no-resolve --config /etc/gpulink/gpulink.toml")
    );
    assert!(
        !value("WatchdogSec").is_empty(),
        "the watchdog needs WatchdogSec="
    );
    // Validation is `run`'s own (exit 78, not restarted): RestartPreventExitStatus= does
    // not cover ExecStartPre=, whose 78 would loop into start-limit-hit.
    assert!(
        value("ExecStartPre").is_empty(),
        "{:?}",
        value("ExecStartPre")
    );
}

#[test]
fn credentials_recipe_hands_over_aws_credentials_and_a_ca_the_reload_check_can_read() {
    let dropin = read("packaging/systemd/credentials.conf");
    let directives = unit_directives(&dropin);
    let value = |key: &str| values(&directives, key);
    let credentials = value("LoadCredential");
    assert!(
        credentials.contains(&"aws:/etc/gpulink/aws-credentials"),
        "{credentials:?}"
    );
    assert!(value("Environment").contains(&"AWS_SHARED_CREDENTIALS_FILE=%d/aws"));
    // The CA: loaded as a credential, copied by the start into the runtime directory
    // (the ExecReload= check is not given credentials on systemd 252), where the
    // configuration's ca_file names it.
    let (name, source) = credentials
        .iter()
        .find_map(|c| c.split_once(':').filter(|(n, _)| n.contains("ca")))
        .expect("a LoadCredential= for the CA");
    assert_eq!(source, "/etc/gpulink/ca.pem");
    assert_eq!(value("RuntimeDirectory"), ["gpulink"]);
    assert_eq!(
        value("ExecStartPre"),
        [format!("/bin/cp -f %d/{name} /run/gpulink/ca.pem").as_str()]
    );
    assert!(dropin.contains(r#"ca_file = "/run/gpulink/ca.pem""#));
    // Nothing in the drop-in resets or replaces the unit's reload check.
    assert!(value("ExecReload").is_empty());
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = which("systemd-analyze") else {
        println!(
            "skipped: systemd-analyze is not installed (apt-get install systemd to run this check)"
        );
        return;
    };
    // verify insists that ExecStart's binary exists: point it at the one cargo built.
    let dir = tempfile::tempdir().expect("tempdir");
    let unit_path = dir.path().join("gpulink.service");
    let unit = read("packaging/systemd/gpulink.service")
        .replace("/usr/bin/gpulink", env!("CARGO_BIN_EXE_gpulink"));
    std::fs::write(&unit_path, unit).expect("write unit");
    let output = Command::new(&analyze)
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Warnings about the unit itself (unknown keys, bad values) are failures too;
    // lines about the host's other units are not ours.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("gpulink.service"))
        .collect();
    assert!(
        output.status.success() && ours.is_empty(),
        "systemd-analyze verify failed:\n{stderr}"
    );

    // The sandbox, as systemd scores it (0 = locked down, 10 = exposed).
    let security = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze security runs");
    let text = String::from_utf8_lossy(&security.stdout).into_owned()
        + &String::from_utf8_lossy(&security.stderr);
    match text
        .split("Overall exposure level for gpulink.service:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
    {
        Some(exposure) => assert!(exposure <= 2.0, "exposure {exposure}:\n{text}"),
        None => println!("skipped the exposure score: this systemd-analyze has no --offline"),
    }
}

/// Dockerfile instructions with line continuations joined.
fn instructions(dockerfile: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        if let Some((word, rest)) = current.trim().split_once(char::is_whitespace) {
            out.push((word.to_ascii_uppercase(), rest.trim().to_string()));
        }
        current.clear();
    }
    out
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_ships_the_release_binary() {
    let dockerfile = read("packaging/docker/Dockerfile");
    let steps = instructions(&dockerfile);
    // FROM lines name their images through ARGs (so digests can be pinned at build
    // time): resolve the defaults.
    let mut args: Vec<(String, String)> = Vec::new();
    let expand = |text: &str, args: &[(String, String)]| -> String {
        let mut out = text.to_string();
        for (name, value) in args.iter().rev() {
            out = out.replace(&format!("${{{name}}}"), value);
        }
        out
    };
    let mut resolved = Vec::new();
    for (i, (word, rest)) in steps.iter().enumerate() {
        if word == "ARG" {
            if let Some((name, value)) = rest.split_once('=') {
                let value = expand(value, &args);
                args.push((name.to_string(), value));
            }
        }
        if word == "FROM" {
            resolved.push((i, expand(rest, &args)));
        }
    }
    let froms: Vec<(usize, &str)> = resolved.iter().map(|(i, r)| (*i, r.as_str())).collect();
    assert!(
        froms[0].1.starts_with("rust:") && froms.last().unwrap().1.contains("distroless"),
        "{froms:?}"
    );
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    let (build_index, build_from) = froms[0];
    let stage_name = build_from
        .split_whitespace()
        .skip_while(|w| !w.eq_ignore_ascii_case("AS"))
        .nth(1)
        .expect("the build stage is named");
    let (final_index, final_from) = *froms.last().expect("final stage");
    let build: Vec<&(String, String)> = steps[build_index..final_index].iter().collect();
    let runtime: Vec<&(String, String)> = steps[final_index..].iter().collect();

    // The build stage builds exactly what `cargo build --release` produces, without the
    // test equipment (the `dev-tools` feature: simulator, development keys, rcgen).
    assert!(build.iter().any(|(w, r)| w == "RUN"
        && r.contains("cargo build --release")
        && r.contains("--locked")
        && r.contains("--no-default-features")));
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).expect("Cargo.toml");
    let bin = manifest["bin"][0]["name"].as_str().expect("bin name");
    let artifact = format!("target/release/{bin}");
    // target/ is a BuildKit cache mount (not in the image), so the build copies the
    // artifact out of it; the final stage takes that copy.
    let (_, build_run) = build
        .iter()
        .find(|(w, r)| w == "RUN" && r.contains("cargo build --release"))
        .expect("the cargo build");
    for cache in ["/usr/local/cargo/registry", "/src/target"] {
        assert!(
            build_run.contains(&format!("--mount=type=cache,target={cache}")),
            "no cache mount for {cache}: {build_run}"
        );
    }
    let exported = build_run
        .split("&&")
        .find(|part| part.contains(&artifact) && part.trim_start().starts_with("install"))
        .and_then(|part| part.split_whitespace().last())
        .unwrap_or_else(|| panic!("the build copies {artifact} out of the cache: {build_run}"));
    let copy = runtime
        .iter()
        .find(|(w, r)| w == "COPY" && r.contains(&format!("--from={stage_name}")))
        .unwrap_or_else(|| panic!("the final stage copies from `{stage_name}`"));
    let copy_args: Vec<&str> = copy.1.split_whitespace().collect();
    assert!(
        copy_args.contains(&exported),
        "COPY must take {exported}: {copy:?}"
    );
    // No packages installed for the build: aws-lc-rs needs neither cmake nor clang.
    assert!(
        !build
            .iter()
            .any(|(w, r)| w == "RUN" && r.contains("apt-get install")),
        "{build:?}"
    );
    let installed = *copy_args.last().expect("COPY destination");

    // Non-root, with CA certificates, entrypoint on the copied binary.
    let user = runtime
        .iter()
        .rev()
        .find(|(w, _)| w == "USER")
        .map(|(_, r)| r.as_str())
        .expect("USER in the final stage");
    let user_name = user.split(':').next().unwrap_or(user);
    assert!(
        !matches!(user_name, "root" | "0" | ""),
        "runs as root: {user}"
    );
    let has_ca = final_from.contains("distroless")
        || runtime
            .iter()
            .any(|(w, r)| w == "RUN" && r.contains("ca-certificates"));
    assert!(
        has_ca,
        "the final image needs CA certificates: {final_from}"
    );
    let entrypoint = runtime
        .iter()
        .find(|(w, _)| w == "ENTRYPOINT")
        .expect("ENTRYPOINT");
    assert!(
        entrypoint.1.contains(installed),
        "{entrypoint:?} vs {installed}"
    );
    // The health check runs the binary itself (distroless has no shell or curl).
    let healthcheck = runtime
        .iter()
        .find(|(w, _)| w == "HEALTHCHECK")
        .map(|(_, r)| r.as_str())
        .expect("HEALTHCHECK");
    assert!(
        healthcheck.contains(&format!("CMD [\"{installed}\", \"health\"")),
        "{healthcheck}"
    );
    // The loopback app port is not advertised; the admin port is.
    let exposed: Vec<&str> = runtime
        .iter()
        .filter(|(w, _)| w == "EXPOSE")
        .flat_map(|(_, r)| r.split_whitespace())
        .collect();
    assert_eq!(exposed, ["9901"]);

    // The builder's Rust is at least the crate's rust-version.
    let needed = manifest["package"]["rust-version"]
        .as_str()
        .expect("rust-version");
    let arg = steps
        .iter()
        .find(|(w, r)| w == "ARG" && r.starts_with("RUST_VERSION="))
        .map(|(_, r)| r.trim_start_matches("RUST_VERSION="))
        .expect("ARG RUST_VERSION");
    let version = |v: &str| -> Vec<u32> { v.split('.').filter_map(|p| p.parse().ok()).collect() };
    assert!(version(arg) >= version(needed), "rust {arg} < {needed}");
    // The build context leaves out what the image never needs.
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target"));
}

/// The manifests as JSON, through PyYAML (installed with kubernetes-validate).
fn manifests(path: &Path) -> Vec<serde_json::Value> {
    let output = Command::new(venv_bin("python"))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(path)
        .output()
        .expect(".venv/bin/python (run scripts/test.sh)");
    assert_success(&output, "reading the YAML failed");
    serde_json::from_slice(&output.stdout).expect("JSON")
}

fn kubernetes_validate(path: &Path, version: &str) -> std::process::Output {
    let validator = venv_bin("kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: run scripts/test.sh (tests/requirements.txt pins it)",
        validator.display()
    );
    Command::new(validator)
        .args(["--strict", "--quiet", "-k", version])
        .arg(path)
        .output()
        .expect("kubernetes-validate runs")
}

#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let dir = root().join("packaging/kubernetes");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("packaging/kubernetes")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    assert!(!files.is_empty());
    // 1.29: the first release with native sidecars on by default; and the newest known.
    for version in ["1.29.0", "1.37.0"] {
        for file in &files {
            let output = kubernetes_validate(file, version);
            let what = format!("{} is not valid for Kubernetes {version}", file.display());
            assert_success(&output, &what);
        }
    }

    // The validator is not a no-op: a misspelt field fails strict validation.
    let sidecar = dir.join("gpulink-sidecar.yaml");
    let text = std::fs::read_to_string(&sidecar).expect("sidecar manifest");
    let broken_dir = tempfile::tempdir().expect("tempdir");
    let broken = broken_dir.path().join("broken.yaml");
    std::fs::write(&broken, text.replace("readinessProbe:", "readynessProbe:")).expect("write");
    assert!(!kubernetes_validate(&broken, "1.37.0").status.success());

    // What the sidecar pattern needs, beyond the schema.
    let docs = manifests(&sidecar);
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).cloned();
    let account = kind("ServiceAccount").expect("ServiceAccount");
    assert!(
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            .as_str()
            .is_some_and(|arn| arn.starts_with("arn:aws:iam::"))
    );
    let deployment = kind("Deployment").expect("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    let sidecar_container = pod["initContainers"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["name"] == "gpulink"))
        .expect("gpulink init container");
    assert_eq!(sidecar_container["restartPolicy"], "Always");
    let admin_port = sidecar_container["ports"][0]["name"].clone();
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live")] {
        let get = &sidecar_container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], admin_port, "{probe}");
    }
    assert_eq!(sidecar_container["securityContext"]["runAsUser"], 65532);
    let mount = &sidecar_container["volumeMounts"][0];
    assert!(
        mount["subPath"].is_null(),
        "a subPath mount never sees ConfigMap updates"
    );
    assert_eq!(mount["mountPath"], "/etc/gpulink");
    let volume = pod["volumes"]
        .as_array()
        .and_then(|all| all.iter().find(|v| v["name"] == mount["name"]))
        .expect("config volume");
    let config_map = kind("ConfigMap").expect("ConfigMap");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);

    // The configuration it ships is one gpulink accepts, and it keeps the app port on
    // loopback while the probes can reach the admin port.
    let toml_text = config_map["data"]["gpulink.toml"]
        .as_str()
        .expect("gpulink.toml in the ConfigMap");
    // ca_file is the ConfigMap's ca.pem, mounted beside gpulink.toml.
    let ca_pem = config_map["data"]["ca.pem"]
        .as_str()
        .expect("ca.pem in the ConfigMap");
    let ca_path = broken_dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_pem).expect("write ca.pem");
    assert!(toml_text.contains("ca_file = \"/etc/gpulink/ca.pem\""));
    let toml_text = toml_text.replace("/etc/gpulink/ca.pem", &ca_path.display().to_string());
    let config_path = broken_dir.path().join("gpulink.toml");
    std::fs::write(&config_path, toml_text).expect("write");
    let check = Command::new(env!("CARGO_BIN_EXE_gpulink"))
        .args(["check", "--config"])
        .arg(&config_path)
        .output()
        .expect("gpulink check");
    assert_success(&check, "gpulink check rejected the file");
    let config = gpulink::config::Config::load(&config_path).expect("valid");
    assert!(config.listen.address.ip().is_loopback());

    // IRSA credentials reach the gpulink container only.
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    let skipped: Vec<&str> = annotations["eks.amazonaws.com/skip-containers"]
        .as_str()
        .expect("eks.amazonaws.com/skip-containers")
        .split(',')
        .map(str::trim)
        .collect();
    for container in pod["containers"].as_array().expect("containers") {
        let name = container["name"].as_str().expect("name");
        assert!(skipped.contains(&name), "{name} would get the KMS role");
    }
    assert!(!skipped.contains(&"gpulink"));

    // Memory: the in-flight body budget fits in the limit with room for the process,
    // and is reserved (requests = limits).
    let memory = |which: &str| -> u64 {
        let text = sidecar_container["resources"][which]["memory"]
            .as_str()
            .unwrap_or_else(|| panic!("resources.{which}.memory"));
        let mib: u64 = text
            .strip_suffix("Mi")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("memory in Mi: {text}"));
        mib << 20
    };
    let budget = config.listen.max_in_flight_bytes.bytes() as u64;
    assert!(
        memory("limits") >= budget + (64 << 20),
        "limit {} for a budget of {budget}",
        memory("limits")
    );
    assert_eq!(memory("requests"), memory("limits"));
    // ... and the limit is that budget plus the process, not an unrelated number: the
    // manifest's comment ("plus about 128Mi") stays true when one of them changes.
    assert!(
        memory("limits") <= budget + (256 << 20),
        "limit {} far above the budget {budget}: raise both together",
        memory("limits")
    );

    // The admin port is admitted by a NetworkPolicy selecting these pods.
    let policy = kind("NetworkPolicy").expect("NetworkPolicy");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in policy["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&labels[key], value, "the policy does not select the pods");
    }
    let rules = policy["spec"]["ingress"].as_array().expect("ingress rules");
    let admin_rule = rules
        .iter()
        .find(|r| {
            r["ports"]
                .as_array()
                .is_some_and(|ports| ports.iter().any(|p| p["port"] == 9901))
        })
        .expect("a rule for the admin port");
    assert!(
        admin_rule["from"].as_array().is_some_and(|f| !f.is_empty()),
        "port 9901 open to everyone: {admin_rule}"
    );
    assert!(config.admin.address.ip().is_unspecified());
    assert_eq!(config.admin.address.port(), 9901);
}

#[test]
fn deb_metadata_ships_examples_and_no_conffile_in_etc() {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).expect("Cargo.toml");
    let deb = &manifest["package"]["metadata"]["deb"];
    // Nothing under /etc: cargo-deb would make it a conffile, and the operator's
    // configuration is created by postinst instead (never a prompt on upgrade).
    assert!(deb.get("conf-files").is_none(), "no conffiles: {deb:?}");
    // The packaged sidecar is built without the test equipment (`dev-tools`).
    assert_eq!(deb["default-features"].as_bool(), Some(false), "{deb:?}");
    assert_eq!(
        manifest["features"]["default"].as_array().map(Vec::len),
        Some(1),
        "dev-tools is the one default feature"
    );
    let assets = deb["assets"].as_array().expect("assets");
    let mut targets = Vec::new();
    for asset in assets {
        let source = asset[0].as_str().expect("source");
        let target = asset[1].as_str().expect("target");
        assert!(
            !target.trim_start_matches('/').starts_with("etc"),
            "{target} would be a conffile"
        );
        targets.push(target.to_string());
        if !source.starts_with("target/") {
            assert!(root().join(source).exists(), "asset {source} is missing");
        }
    }
    for wanted in [
        "usr/share/doc/gpulink/examples/gpulink.toml",
        "usr/share/doc/gpulink/examples/environment",
        "usr/share/doc/gpulink/examples/credentials.conf",
        "usr/share/gpulink/gpulink.example.toml",
        "usr/share/gpulink/environment.example",
    ] {
        assert!(targets.iter().any(|t| t == wanted), "{wanted} not shipped");
    }
    assert!(targets.iter().any(|t| t.starts_with("usr/bin")));
    let scripts = deb["maintainer-scripts"]
        .as_str()
        .expect("maintainer-scripts");
    for script in ["postinst", "prerm", "postrm"] {
        let text = read(&format!("{scripts}/{script}"));
        assert!(
            text.contains("\n#DEBHELPER#\n"),
            "{script} lacks the #DEBHELPER# token"
        );
        // The token must appear once: cargo-deb replaces every occurrence, comments too.
        assert_eq!(text.matches("#DEBHELPER#").count(), 1, "{script}");
    }
    assert!(root()
        .join(deb["changelog"].as_str().expect("changelog"))
        .exists());
    let units = &deb["systemd-units"];
    assert_eq!(units["enable"].as_bool(), Some(false));
    assert_eq!(units["start"].as_bool(), Some(false));
    assert_eq!(units["restart-after-upgrade"].as_bool(), Some(true));
    let unit_dir = units["unit-scripts"].as_str().expect("unit-scripts");
    assert!(root().join(unit_dir).join("gpulink.service").exists());
    // What postinst installs as /etc/gpulink/gpulink.toml must be valid as shipped.
    let check = Command::new(env!("CARGO_BIN_EXE_gpulink"))
        .args(["check", "--config"])
        .arg(root().join("config/gpulink.example.toml"))
        .output()
        .expect("gpulink check");
    assert!(check.status.success());
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let output = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .expect("dpkg-deb runs");
    assert_success(&output, &format!("dpkg-deb {args:?}"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn deb_has_maintainer_scripts_that_restart_stop_and_purge() {
    if !deb::available() || which("dpkg-deb").is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let package = deb::build("0.1.0-1", dir.path());

    let info = dpkg_deb(&["-I"], &package);
    for line in ["Package: gpulink", "Version: 0.1.0-1", "Section: net"] {
        assert!(
            info.lines().any(|l| l.trim() == line),
            "{line} missing:\n{info}"
        );
    }
    assert!(
        info.contains("Depends: ") && info.contains("ca-certificates"),
        "{info}"
    );

    let control = dir.path().join("control");
    let extract = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&package)
        .arg(&control)
        .status()
        .expect("dpkg-deb -e");
    assert!(extract.success());
    // No conffile at all: the configuration is the operator's, created by postinst.
    assert!(
        !control.join("conffiles").exists(),
        "the package has conffiles"
    );
    let script = |name: &str| -> String {
        let path = control.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let syntax = Command::new("sh")
            .arg("-n")
            .arg(&path)
            .status()
            .expect("sh -n");
        assert!(syntax.success(), "{name} is not valid sh:\n{text}");
        assert!(!text.contains("#DEBHELPER#"), "{name}: token not replaced");
        text
    };
    let postinst = script("postinst");
    // The configuration, from the example, only when absent; the environment file 0600.
    assert!(postinst.contains("if [ ! -e /etc/gpulink/gpulink.toml ]; then"));
    assert!(postinst.contains(
        "install -m 0644 /usr/share/gpulink/gpulink.example.toml /etc/gpulink/gpulink.toml"
    ));
    assert!(postinst.contains(
        "install -m 0600 /usr/share/gpulink/environment.example /etc/gpulink/environment"
    ));
    // Upgrade ($2 = the old version): restart if running, so the new binary serves.
    assert!(
        postinst.contains("deb-systemd-invoke try-restart gpulink.service"),
        "{postinst}"
    );
    assert!(postinst.contains("systemctl --system daemon-reload"));
    // Never enabled nor started by the package: the operator edits the file first.
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");
    // dh_installsystemd's enabling snippet enables on a fresh install ("was-enabled
    // defaults to true"); the one kept only re-enables a unit the operator enabled.
    assert!(
        !postinst.contains("was-enabled defaults to true"),
        "{postinst}"
    );
    assert!(postinst.contains("if deb-systemd-helper debian-installed gpulink.service; then"));
    let prerm = script("prerm");
    assert!(
        prerm.contains("[ \"$1\" = remove ]; then\n\tdeb-systemd-invoke stop gpulink.service"),
        "{prerm}"
    );
    let postrm = script("postrm");
    assert!(postrm.contains("rm -f /etc/gpulink/gpulink.toml /etc/gpulink/environment"));
    assert!(
        postrm.contains("deb-systemd-helper purge gpulink.service"),
        "{postrm}"
    );
    assert!(
        postrm.contains("deb-systemd-helper mask gpulink.service"),
        "{postrm}"
    );

    let contents = dpkg_deb(&["-c"], &package);
    let paths: Vec<&str> = contents
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    for wanted in [
        "./usr/bin/gpulink",
        "./usr/lib/systemd/system/gpulink.service",
        "./usr/share/doc/gpulink/examples/gpulink.toml",
        "./usr/share/doc/gpulink/examples/environment",
        "./usr/share/doc/gpulink/examples/credentials.conf",
        "./usr/share/doc/gpulink/changelog.Debian.gz",
        "./usr/share/doc/gpulink/copyright",
        "./usr/share/gpulink/gpulink.example.toml",
        "./usr/share/gpulink/environment.example",
    ] {
        assert!(
            paths.contains(&wanted),
            "{wanted} not in the package:\n{contents}"
        );
    }
    assert!(!paths.iter().any(|p| p.starts_with("./etc")), "{contents}");
    // The unit in the package is the one in the repository.
    let unit = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&package)
        .output()
        .expect("dpkg-deb --fsys-tarfile");
    assert!(unit.status.success());
    let tar = dir.path().join("data.tar");
    std::fs::write(&tar, &unit.stdout).expect("write data.tar");
    let shipped = Command::new("tar")
        .arg("-xOf")
        .arg(&tar)
        .arg("./usr/lib/systemd/system/gpulink.service")
        .output()
        .expect("tar");
    assert_eq!(
        String::from_utf8_lossy(&shipped.stdout),
        read("packaging/systemd/gpulink.service")
    );
}

#[test]
fn grafana_dashboard_compares_routes_and_covers_kms_and_cache() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("packaging/grafana/gpulink.json")).expect("valid JSON");
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let text = dashboard.to_string();
    for needle in [
        "histogram_quantile(0.50, sum by (route, le)",
        "histogram_quantile(0.99, sum by (route, le)",
        "gpulink_upstream_timeouts_total",
        "gpulink_endpoint_healthy",
        "gpulink_endpoint_capacity",
        "gpulink_kms_calls_total",
        "gpulink_key_cache_hits_total",
    ] {
        assert!(text.contains(needle), "the dashboard lacks {needle}");
    }
    // Panels do not overlap and every query has a datasource.
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = std::collections::BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "duplicate id"
        );
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert!(target["expr"]
                .as_str()
                .is_some_and(|e| e.contains("gpulink_")));
            assert!(!target["datasource"].is_null());
        }
    }
}

/// Whether the Dockerfile's base images are honest about pinning: each `ARG *_IMAGE`
/// default is `name:tag@sha256:<64 hex>`, or a bare tag while the `# Unpinned:` note
/// (pointing at scripts/pin-images.sh) says so; the note goes once all are pinned.
pub(crate) fn image_pins(dockerfile: &str) -> Result<usize, String> {
    let mut unpinned = Vec::new();
    let mut images = 0;
    for line in dockerfile.lines() {
        let Some((name, value)) = line
            .strip_prefix("ARG ")
            .and_then(|rest| rest.split_once('='))
        else {
            continue;
        };
        if !name.ends_with("_IMAGE") {
            continue;
        }
        images += 1;
        match value.split_once('@') {
            Some((tag, digest)) => {
                let hex = digest
                    .strip_prefix("sha256:")
                    .ok_or_else(|| format!("{name}: not a sha256 digest: {digest}"))?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(format!("{name}: not 64 lowercase hex digits: {hex}"));
                }
                if !tag.contains(':') {
                    return Err(format!("{name}: pin a tag (name:tag@digest): {value}"));
                }
            }
            None => unpinned.push(name),
        }
    }
    let note = dockerfile.lines().find(|l| l.starts_with("# Unpinned: "));
    match (unpinned.is_empty(), note) {
        (false, None) => Err(format!(
            "{unpinned:?} name tags, and no `# Unpinned:` note says so"
        )),
        (false, Some(note)) if !note.contains("scripts/pin-images.sh") => {
            Err(format!("the note does not say how to pin: {note}"))
        }
        (true, Some(note)) => Err(format!("everything is pinned, yet the note says: {note}")),
        _ if images < 2 => Err(format!(
            "{images} image ARGs; the build and runtime bases expected"
        )),
        _ => Ok(unpinned.len()),
    }
}

#[test]
fn dockerfile_base_images_are_pinned_by_digest_or_say_they_are_not() {
    let dockerfile = read("packaging/docker/Dockerfile");
    image_pins(&dockerfile).unwrap_or_else(|e| panic!("{e}"));
    // The check can fail: a made-up short digest, and a bare tag without the note.
    assert!(image_pins(&dockerfile.replace(
        "ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot\n",
        "ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:abc\n"
    ))
    .is_err());
    let without_note: String = dockerfile
        .lines()
        .filter(|l| !l.starts_with("# Unpinned: "))
        .map(|l| format!("{l}\n"))
        .collect();
    if image_pins(&dockerfile) != Ok(0) {
        assert!(image_pins(&without_note).is_err());
    }

    // scripts/pin-images.sh, its registry replaced by a stand-in resolver: every image
    // default pinned (the tag kept, ${RUST_VERSION} expanded for the lookup), the note
    // gone, the result passing the check; a second run re-pins in place.
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("Dockerfile");
    std::fs::write(&copy, &dockerfile).expect("copy");
    let resolver = dir.path().join("resolve");
    let asked = dir.path().join("asked");
    write_script(
        &resolver,
        &format!(
            "#!/bin/sh\necho \"$1\" >> {}\nprintf 'sha256:%s\\n' \"$(printf %s \"$1\" | sha256sum | cut -c1-64)\"\n",
            asked.display()
        ),
    );
    let pin = |resolver: &Path| {
        Command::new("bash")
            .arg(root().join("scripts/pin-images.sh"))
            .arg(&copy)
            .env("PIN_IMAGES_RESOLVE", resolver)
            .output()
            .expect("pin-images.sh runs")
    };
    for _ in 0..2 {
        let output = pin(&resolver);
        assert_success(&output, "pin-images.sh failed");
        let pinned = std::fs::read_to_string(&copy).expect("pinned");
        assert_eq!(image_pins(&pinned), Ok(0), "{pinned}");
        assert!(pinned.contains("ARG BUILD_IMAGE=rust:${RUST_VERSION}-bookworm@sha256:"));
    }
    let asked = std::fs::read_to_string(&asked).expect("the resolver was asked");
    assert!(
        asked
            .lines()
            .any(|l| l.starts_with("rust:1.") && l.ends_with("-bookworm")),
        "{asked}"
    );
    assert!(
        asked
            .lines()
            .any(|l| l == "gcr.io/distroless/cc-debian12:nonroot"),
        "{asked}"
    );
    // An answer that is not a digest writes nothing.
    std::fs::write(&copy, &dockerfile).expect("copy");
    let liar = dir.path().join("liar");
    write_script(&liar, "#!/bin/sh\necho sha256:not-a-digest\n");
    assert!(!pin(&liar).status.success());
    assert_eq!(std::fs::read_to_string(&copy).expect("copy"), dockerfile);
}
