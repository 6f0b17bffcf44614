//! `gpulink health`: a probe for places that can run a command but not an HTTP check of
//! their own (Docker `HEALTHCHECK` in the distroless image, which has no shell or curl;
//! ECS container health checks; `kubectl exec`). It asks the admin server's `/ready` and
//! exits 0 on 200, 1 otherwise, with one line saying why. Bounded by one deadline for
//! the whole exchange, so a stuck process makes the probe fail, not hang.

use std::process::ExitCode;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};

/// What `/ready` may answer is a word ("ready", "starting", "draining"): more is not read.
const MAX_REASON_BYTES: usize = 256;

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The readiness URL (plain HTTP). Default: `/ready` on the default admin.address.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Deadline for the whole check (connect, request, answer), e.g. "2s".
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
}

/// The default URL: `/ready` on the default `admin.address`.
pub fn default_url() -> String {
    format!("http://{}/ready", crate::config::Admin::default().address)
}

pub async fn run(args: HealthArgs) -> ExitCode {
    let url = args.url.unwrap_or_else(default_url);
    match tokio::time::timeout(args.timeout, check(&url)).await {
        Ok(Ok(())) => {
            println!("ready: {url} answered 200");
            ExitCode::SUCCESS
        }
        Ok(Err(reason)) => {
            println!("not ready: {url}: {reason}");
            ExitCode::FAILURE
        }
        Err(_) => {
            println!(
                "not ready: {url}: no answer within {:?} (is gpulink running, and is this its admin.address?)",
                args.timeout
            );
            ExitCode::FAILURE
        }
    }
}

async fn check(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("not a URL ({e}); e.g. http://127.0.0.1:9901/ready"))?;
    if uri.scheme_str() != Some("http") {
        return Err("the admin server speaks plain HTTP: use an http:// URL".into());
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let response = client.get(uri).await.map_err(|e| {
        // The useful part is the innermost cause (e.g. "Connection refused").
        let mut source: &dyn std::error::Error = &e;
        while let Some(next) = source.source() {
            source = next;
        }
        format!("cannot connect: {source}")
    })?;
    let status = response.status();
    if status == http::StatusCode::OK {
        return Ok(());
    }
    let body = Limited::new(response.into_body(), MAX_REASON_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reason: String = String::from_utf8_lossy(&body)
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(80)
        .collect();
    if reason.is_empty() {
        Err(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP {status} ({reason})"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_url_is_ready_on_the_default_admin_address() {
        assert_eq!(super::default_url(), "http://127.0.0.1:9901/ready");
    }
}
