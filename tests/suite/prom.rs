//! `/metrics` read the way Prometheus reads it: fetched from the admin server and parsed
//! with the official Python client's parser (`tests/support/parse_metrics.py`).

#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

/// One parsed exposition.
pub struct Exposition {
    pub families: serde_json::Map<String, serde_json::Value>,
    pub samples: Vec<(String, serde_json::Map<String, serde_json::Value>, f64)>,
}

impl Exposition {
    /// The samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = f64> + 'a {
        self.samples
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).and_then(|x| x.as_str()) == Some(*v))
            })
            .map(|(_, _, value)| *value)
    }

    /// Whether some sample is named `name`.
    pub fn has_sample(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }

    /// The sum of [`Exposition::matching`].
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).sum()
    }

    /// The one sample with exactly these labels; panics when it is absent, which is
    /// the point: an absent series is not a zero to PromQL.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).and_then(|x| x.as_str()) == Some(*v))
            })
            .map(|(_, _, value)| *value)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{name}{labels:?} is not exposed exactly once"
        );
        found[0]
    }
}

/// Parses `text` with the official parser (`text` = the classic format 0.0.4).
pub fn parse(text: &str) -> Exposition {
    parse_as(text.as_bytes(), "text")
}

/// Parses `exposition` with the official parser for `mode`: `text` (the classic format
/// 0.0.4) or `openmetrics`. Panics with the parser's message and the exposition when it
/// does not parse.
pub fn parse_as(exposition: &[u8], mode: &str) -> Exposition {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/parse_metrics.py"
    );
    let mut parser = Command::new(crate::common::venv_bin("python"));
    parser.args([script, mode]);
    let out = run_with_input(
        &mut parser,
        exposition,
        "python from .venv (run scripts/test.sh, which installs prometheus_client)",
    );
    assert!(
        out.status.success(),
        "the {mode} parser rejected the exposition: {}\n---\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(exposition)
    );
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("parser JSON");
    let families = parsed["families"].as_object().cloned().unwrap_or_default();
    let samples = parsed["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|s| {
            (
                s[0].as_str().unwrap_or("").to_string(),
                s[1].as_object().cloned().unwrap_or_default(),
                s[2].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    Exposition { families, samples }
}

/// Runs `command` with `input` on its stdin and returns its output (`expect`: what to
/// say when it cannot start).
fn run_with_input(command: &mut Command, input: &[u8], expect: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(expect);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write exposition");
    child.wait_with_output().expect("the parser runs")
}

/// The proxy's `/metrics` in the classic text format, parsed.
pub async fn scrape(admin: std::net::SocketAddr) -> Exposition {
    parse(&scrape_text(admin).await)
}

/// The proxy's `/metrics` in the classic text format.
pub async fn scrape_text(admin: std::net::SocketAddr) -> String {
    let client = crate::common::http_client();
    let url = format!("http://{admin}/metrics");
    let reply = crate::common::send(&client, "GET", &url, Vec::new(), &[]).await;
    assert_eq!(reply.status, 200);
    String::from_utf8(reply.body.to_vec()).expect("UTF-8 exposition")
}

/// `promtool check metrics` (Prometheus's own linter, from Debian's `prometheus`
/// package, which scripts/test.sh installs): panics with its findings when it has any.
pub fn promtool_check(text: &str) {
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect(
            "promtool is not installed: run scripts/test.sh, which installs Debian's prometheus",
        );
    let mut check = Command::new(promtool);
    check.args(["check", "metrics"]);
    let out = run_with_input(&mut check, text.as_bytes(), "promtool runs");
    crate::common::assert_success(&out, "promtool check metrics");
}
