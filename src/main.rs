//! The `gpulink` command: `run`, `check`, `health`, `probe`, `discover`, `demo` and `sim`.
//!
//! `demo` and `sim` are test equipment (the simulator, the development key provider):
//! they exist only with the `dev-tools` feature (on by default; the .deb and the image
//! build without it, and there they explain where to find them).

#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

#[cfg(feature = "dev-tools")]
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gpulink::config::{Config, EX_CONFIG};
use gpulink::seal::{KeyService, KmsKeys};

#[derive(Parser)]
#[command(
    name = "gpulink",
    version,
    about = "Sidecar to a private GPU inference cluster over AWS PrivateLink"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Run {
        #[arg(
            long,
            env = "GPULINK_CONFIG",
            default_value = "/etc/gpulink/gpulink.toml"
        )]
        config: PathBuf,
        /// Log format; overrides `log.format` in the configuration.
        #[arg(long, value_enum, env = "GPULINK_LOG_FORMAT")]
        log_format: Option<gpulink::telemetry::LogFormatFlag>,
    },
    /// Validate a configuration file: exit 0 when valid (warnings, on stderr, do not
    /// change that), 78 (EX_CONFIG) when not.
    Check {
        #[arg(
            long,
            env = "GPULINK_CONFIG",
            default_value = "/etc/gpulink/gpulink.toml"
        )]
        config: PathBuf,
        /// Do not resolve the public endpoint names (no DNS look-ups).
        #[arg(long)]
        no_resolve: bool,
    },
    /// Test connectivity to every endpoint (TCP, TLS, /health, latency) and diagnose
    /// failures: exit 0 when something can serve, 1 when nothing can, 78 for a bad config.
    Probe(gpulink::probe::ProbeArgs),
    /// Show a VPC endpoint as EC2 lists it (state, service, DNS names, each ENI's IP,
    /// subnet and zone) and print a `[[regions]]` block that discovers it: exit 0 when
    /// usable, 1 when not (the state says why), 2 for bad arguments, 3 when EC2 failed.
    Discover(gpulink::discover::DiscoverArgs),
    /// Ask a running gpulink's admin `/ready`: exit 0 on 200, 1 with the reason otherwise
    /// (for Docker HEALTHCHECK, ECS and `kubectl exec` probes; no shell or curl needed).
    Health(gpulink::healthcheck::HealthArgs),
    /// A self-contained scenario on loopback: no AWS account, no network.
    #[cfg(feature = "dev-tools")]
    Demo(demo::DemoArgs),
    /// The cluster simulator: TLS endpoints, health ports and a control API on loopback.
    #[cfg(feature = "dev-tools")]
    Sim(gpulink_sim::SimArgs),
    /// Not in this build (`demo`, `sim`: built without the `dev-tools` feature).
    #[cfg(not(feature = "dev-tools"))]
    #[command(hide = true)]
    Demo(NotBuilt),
    #[cfg(not(feature = "dev-tools"))]
    #[command(hide = true)]
    Sim(NotBuilt),
}

/// The arguments of a subcommand this build leaves out, taken as they come so that the
/// answer is the explanation rather than a usage error.
#[cfg(not(feature = "dev-tools"))]
#[derive(clap::Args)]
struct NotBuilt {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    _args: Vec<std::ffi::OsString>,
}

/// `eprintln!` panics when stderr is a closed pipe; a message to a missing reader is
/// lost, never a reason to crash.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    gpulink::tls::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, no_resolve } => check(&config, !no_resolve),
        command => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(error) => {
                    report!("gpulink: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async_main(command))
        }
    }
}

fn check(path: &std::path::Path, resolve: bool) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            let endpoints = config.endpoints.len();
            let warnings = gpulink::check::warnings(&config, chrono::Utc::now(), resolve);
            for warning in &warnings {
                report!("gpulink: warning: {warning}");
            }
            let noted = match warnings.len() {
                0 => String::new(),
                1 => ", 1 warning".to_string(),
                n => format!(", {n} warnings"),
            };
            println!(
                "{}: valid (phase {}, {} regions, {} endpoints{noted})",
                path.display(),
                config.migration.phase.as_str(),
                config.regions.len(),
                endpoints
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            report!("gpulink: {error}");
            ExitCode::from(EX_CONFIG as u8)
        }
    }
}

async fn async_main(command: Command) -> ExitCode {
    let result = match command {
        Command::Run { config, log_format } => run(&config, log_format).await,
        Command::Probe(args) => gpulink::probe::run(args).await,
        Command::Discover(args) => Ok(gpulink::discover::run(args).await),
        Command::Health(args) => Ok(gpulink::healthcheck::run(args).await),
        #[cfg(feature = "dev-tools")]
        Command::Demo(args) => demo::run(args).await,
        #[cfg(feature = "dev-tools")]
        Command::Sim(args) => gpulink_sim::run_cli(args).await.map(|()| ExitCode::SUCCESS),
        #[cfg(not(feature = "dev-tools"))]
        Command::Demo(_) => not_built("demo"),
        #[cfg(not(feature = "dev-tools"))]
        Command::Sim(_) => not_built("sim"),
        Command::Check { .. } => unreachable!("handled before the runtime starts"),
    };
    let code = match result {
        Ok(code) => code,
        Err(error) => {
            report!("gpulink: {error:#}");
            ExitCode::FAILURE
        }
    };
    // The log is written by its own thread: let it finish, within a bound (a stalled
    // reader must not keep the process from exiting).
    gpulink::telemetry::flush(std::time::Duration::from_secs(2));
    code
}

async fn run(
    path: &std::path::Path,
    log_format: Option<gpulink::telemetry::LogFormatFlag>,
) -> anyhow::Result<ExitCode> {
    // Read once: the configuration is parsed from exactly the bytes the reload watch
    // compares later changes against.
    let text = match Config::read(path) {
        Ok(text) => text,
        Err(error) => {
            report!("gpulink: {error}");
            return Ok(ExitCode::from(EX_CONFIG as u8));
        }
    };
    let config = match Config::from_toml(&text, path) {
        Ok(c) => c,
        Err(error) => {
            report!("gpulink: {error}");
            return Ok(ExitCode::from(EX_CONFIG as u8));
        }
    };
    let reload_triggers = gpulink::reload::watch(path.to_path_buf(), text.into_bytes())?;
    gpulink::telemetry::init(gpulink::telemetry::effective_format(
        config.log.format,
        log_format,
    ));
    if let Err(message) = aws_files_readable() {
        report!("gpulink: {message}");
        return Ok(ExitCode::from(EX_CONFIG as u8));
    }
    // Before the AWS SDK is built: without system roots it panics or fails opaquely.
    if let Err(error) = gpulink::tls::require_system_roots() {
        report!("gpulink: {error}");
        return Ok(ExitCode::from(EX_CONFIG as u8));
    }
    let keys = KeyService::Kms(KmsKeys::from_config(&config.kms).await);
    let handle = gpulink::proxy::start(config, keys).await?;
    // The tasks started here (the proxy tracks its own), awaited before exit.
    let tasks = tokio_util::task::TaskTracker::new();
    let stop_reloading = tokio_util::sync::CancellationToken::new();
    reload_triggers.spawn(handle.proxy().clone(), &tasks, stop_reloading.clone());
    // The process is alive while it waits for KMS: ping the watchdog from now on.
    let stop_watchdog = tokio_util::sync::CancellationToken::new();
    gpulink::systemd::spawn_watchdog(&tasks, stop_watchdog.clone());
    let shutdown = wait_for_shutdown_signal();
    tokio::pin!(shutdown);
    // systemd (Type=notify): ready only once KMS is proven, as `/ready` is; a SIGTERM
    // while waiting still shuts down in order.
    let proven = tokio::select! {
        _ = handle.proxy().kms_proven() => true,
        signal = &mut shutdown => {
            signal?;
            false
        }
    };
    if proven {
        gpulink::systemd::ready(&gpulink::systemd::status_line(&handle.proxy().current()));
        gpulink::systemd::spawn_status(
            handle.proxy().generations().clone(),
            &tasks,
            stop_reloading.clone(),
        );
        shutdown.await?;
    }
    stop_reloading.cancel();
    gpulink::systemd::stopping();
    handle.shutdown().await;
    stop_watchdog.cancel();
    tasks.close();
    // A reload under way finishes first (it is bounded by the file and KMS timeouts).
    tasks.wait().await;
    Ok(ExitCode::SUCCESS)
}

/// The AWS SDK treats an unreadable shared credentials or config file as absent and
/// ends with "the credential provider was not enabled"; name the file and the likely
/// cause instead (under the systemd unit: a 0600 file the dynamic user cannot read).
fn aws_files_readable() -> Result<(), String> {
    for variable in ["AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"] {
        let Some(path) = std::env::var_os(variable) else {
            continue;
        };
        let path = std::path::PathBuf::from(path);
        if let Err(error) = std::fs::File::open(&path) {
            return Err(format!(
                "cannot read {variable}={}: {error}{}",
                path.display(),
                gpulink::config::sandbox_hint(variable, &path, &error)
            ));
        }
    }
    Ok(())
}

async fn wait_for_shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

/// What `gpulink demo` and `gpulink sim` say in a build without them.
#[cfg(not(feature = "dev-tools"))]
fn not_built(name: &str) -> anyhow::Result<ExitCode> {
    report!(
        "gpulink: `gpulink {name}` is not in this build: the packaged sidecar (.deb, container \
         image) leaves out the simulator and the development key provider. Build from \
         source with the default features (`cargo build --release`) to get `demo` and `sim`."
    );
    Ok(ExitCode::from(2))
}
