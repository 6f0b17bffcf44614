//! Logging set-up: `RUST_LOG`-style filtering (default `info`), human or JSON lines on
//! stderr (journald and container runtimes collect stderr). The format comes from
//! `log.format`, overridden by `gpulink run --log-format`.
//!
//! Every app request runs inside one `request` span carrying its request id (see
//! [`crate::forward`]), so every line about a request, in either format, names it.
//! What is logged never includes bodies, keys or ciphertext: only ids, sizes, addresses
//! and outcomes.
//!
//! Logging can never stop or stall the proxy: lines go through `crate::logwriter`
//! (bounded queue, dropped and counted when full, write errors ignored). Colours only
//! when stderr is a terminal and `NO_COLOR` is unset. Text that came from the network is
//! logged in its escaped (`Debug`) form at the call site; the writer also escapes any
//! line break left inside a text line, so no value can forge a line.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// `--log-format`: overrides `log.format` from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormatFlag {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the current span's fields (the request id).
    Json,
}

impl From<LogFormatFlag> for LogFormat {
    fn from(flag: LogFormatFlag) -> Self {
        match flag {
            LogFormatFlag::Text => LogFormat::Text,
            LogFormatFlag::Json => LogFormat::Json,
        }
    }
}

/// The format in force: the flag when given, else the configuration's.
pub fn effective_format(configured: LogFormat, flag: Option<LogFormatFlag>) -> LogFormat {
    flag.map_or(configured, LogFormat::from)
}

/// Installs the global subscriber once; later calls are ignored (tests start many proxies).
pub fn init(format: LogFormat) {
    init_with_default(format, "info");
}

/// As [`init`], with another filter when `RUST_LOG` is unset (the demo prints its own
/// report and keeps the log to warnings).
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let writer = crate::logwriter::NonBlocking::stderr(format == LogFormat::Text);
    let colour = use_colour(
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
        std::env::var_os("NO_COLOR"),
    );
    install(format, default_filter, writer, colour);
}

/// As [`init_with_default`], writing to `file` instead of stderr (the demo keeps the
/// proxy's log out of its report), never in colour.
pub fn init_to_file(format: LogFormat, default_filter: &str, file: std::fs::File) {
    let writer = crate::logwriter::NonBlocking::installed(file, format == LogFormat::Text);
    install(format, default_filter, writer, false);
}

fn install(
    format: LogFormat,
    default_filter: &str,
    writer: std::io::Result<crate::logwriter::NonBlocking>,
    colour: bool,
) {
    let filter = cap_dependencies(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
    );
    let Ok(writer) = writer else {
        // No thread for the writer: run without a log rather than with a blocking one.
        return;
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        // tracing-subscriber reports a failed write with `eprintln!`, which panics when
        // stderr is a closed pipe; the writer never fails, and nothing must panic here.
        .log_internal_errors(false)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Colour codes only for a terminal, and never when `NO_COLOR` is set to anything
/// (<https://no-color.org>): a file, a pipe or journald would store them verbatim.
fn use_colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Waits (at most `limit`) until queued log lines are written; call before exiting.
pub fn flush(limit: std::time::Duration) {
    crate::logwriter::flush(limit);
}

/// Dependencies that log request and response bodies, headers or TLS material at debug
/// or trace (the AWS SDK's `SdkBody` debug output is the KMS request, plaintext
/// included; its responses hold data keys): held at `info` whatever `RUST_LOG` asks,
/// so that no log level formats a secret.
const CAPPED_TARGETS: &[&str] = &[
    "aws_config",
    "aws_credential_types",
    "aws_runtime",
    "aws_sdk_kms",
    "aws_sdk_sso",
    "aws_sdk_ssooidc",
    "aws_sdk_sts",
    "aws_sigv4",
    "aws_smithy_checksums",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "aws_smithy_json",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_types",
    "h2",
    "hyper",
    "hyper_rustls",
    "hyper_util",
    "reqwest",
    "rustls",
    "tokio_rustls",
    "tower",
];

fn cap_dependencies(mut filter: EnvFilter) -> EnvFilter {
    for target in CAPPED_TARGETS {
        if let Ok(directive) = format!("{target}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some("".into())));
        assert!(!use_colour(true, Some("1".into())));
        assert!(!use_colour(false, None));
    }

    #[test]
    fn dependency_targets_stay_at_info_even_at_trace() {
        let filter = cap_dependencies(EnvFilter::new("trace,aws_smithy_runtime=trace"));
        let text = filter.to_string();
        for target in CAPPED_TARGETS {
            assert!(text.contains(&format!("{target}=info")), "{target}: {text}");
        }
        assert!(!text.contains("aws_smithy_runtime=trace"), "{text}");
    }

    #[test]
    fn the_flag_overrides_the_configuration() {
        assert_eq!(effective_format(LogFormat::Text, None), LogFormat::Text);
        assert_eq!(
            effective_format(LogFormat::Text, Some(LogFormatFlag::Json)),
            LogFormat::Json
        );
        assert_eq!(
            effective_format(LogFormat::Json, Some(LogFormatFlag::Text)),
            LogFormat::Text
        );
    }
}
