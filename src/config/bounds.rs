//! The valid range of every numeric, size and duration key. A value outside its range is
//! a configuration error naming the key, found by `gpulink check` exactly as by `run`
//! and by a reload: a value that passes here cannot abort, stall or flood the proxy later
//! (a 4-billion-attempt retry loop, a semaphore larger than tokio allows, health checks
//! every microsecond). The ranges are documented in the README's configuration reference
//! and in `config/gpulink.example.toml`.
//!
//! Every value is checked and every problem reported, not just the first.

use std::time::Duration;

use super::compile::Problems;
use super::raw::{EndpointSpec, RawConfig};
use super::units::HumanDuration;

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// Largest body, plaintext or sealed, gpulink accepts to hold (the cluster's own limit is
/// 10 MB).
pub const MAX_BODY: u64 = 1_000_000_000;
pub const MAX_CONNECTIONS: u64 = 1_000_000;
pub const MAX_ATTEMPTS: u64 = 10;
/// Request-path threads (`runtime.workers`); 0 means one per usable core.
pub const MAX_WORKERS: u64 = 256;

/// The range checks, one helper per kind of value, each message in the same form.
impl Problems {
    fn int(&mut self, key: &str, value: u64, min: u64, max: u64) {
        if !(min..=max).contains(&value) {
            self.push(
                key,
                format!("{value} is out of range: must be {min}..={max}"),
            );
        }
    }

    fn size(&mut self, key: &str, bytes: u64, min: u64, max: u64) {
        if !(min..=max).contains(&bytes) {
            self.push(
                key,
                format!("{bytes} bytes is out of range: must be {min}..={max} bytes"),
            );
        }
    }

    fn duration(&mut self, key: &str, value: Duration, min: Duration, max: Duration) {
        if !(min..=max).contains(&value) {
            let min = if min.is_zero() {
                "0s".to_string()
            } else {
                format!("{min:?}")
            };
            self.push(
                key,
                format!("{value:?} is out of range: must be {min}..={max:?}"),
            );
        }
    }

    /// A duration that must be above zero (the smallest step the file can say is 1 ms).
    fn positive(&mut self, key: &str, value: Duration, max: Duration) {
        self.duration(key, value, MS, max);
    }

    /// Explains the problem just found for `key`, if any.
    fn because(&mut self, key: &str, why: &str) {
        self.explain_last(key, why);
    }

    fn percent(&mut self, key: &str, value: u32) {
        self.int(key, u64::from(value), 0, 100);
    }
}

/// Checks every numeric and duration key against its range.
pub(super) fn check(c: &RawConfig, p: &mut Problems) {
    p.size("listen.max_body", c.listen.max_body.bytes(), 1, MAX_BODY);
    p.int(
        "listen.max_connections",
        c.listen.max_connections as u64,
        1,
        MAX_CONNECTIONS,
    );
    p.int("runtime.workers", c.runtime.workers as u64, 0, MAX_WORKERS);
    p.duration(
        "listen.drain_delay",
        c.listen.drain_delay.get(),
        Duration::ZERO,
        10 * MINUTE,
    );
    p.duration(
        "listen.shutdown_grace",
        c.listen.shutdown_grace.get(),
        Duration::ZERO,
        HOUR,
    );

    p.positive("kms.timeout", c.kms.timeout.get(), MINUTE);
    p.duration("kms.cache.max_age", c.kms.cache.max_age.get(), SECOND, DAY);
    // The ESDK's own limit: at most 2^32 messages under one data key.
    p.int(
        "kms.cache.max_messages",
        c.kms.cache.max_messages,
        1,
        1 << 32,
    );
    p.size(
        "kms.cache.max_bytes",
        c.kms.cache.max_bytes.bytes(),
        1,
        1 << 50,
    );

    p.size(
        "upstream.max_body",
        c.upstream.max_body.bytes(),
        1,
        MAX_BODY,
    );
    p.positive(
        "upstream.connect_timeout",
        c.upstream.connect_timeout.get(),
        MINUTE,
    );
    p.positive(
        "upstream.request_timeout",
        c.upstream.request_timeout.get(),
        HOUR,
    );
    p.positive("upstream.idle_timeout", c.upstream.idle_timeout.get(), HOUR);
    p.duration(
        "upstream.pool_idle_timeout",
        c.upstream.pool_idle_timeout.get(),
        MS,
        Duration::from_secs(349),
    );
    p.because(
        "upstream.pool_idle_timeout",
        "it must stay under 350s, the NLB's idle timeout, or pooled connections die silently",
    );

    p.int("health.port", u64::from(c.health.port), 1, 65_535);
    p.duration("health.interval", c.health.interval.get(), 100 * MS, HOUR);
    p.duration("health.timeout", c.health.timeout.get(), 10 * MS, MINUTE);
    p.int(
        "health.healthy_threshold",
        u64::from(c.health.healthy_threshold),
        1,
        100,
    );
    p.int(
        "health.unhealthy_threshold",
        u64::from(c.health.unhealthy_threshold),
        1,
        100,
    );
    p.duration(
        "health.max_staleness",
        c.health.max_staleness.get(),
        SECOND,
        DAY,
    );

    p.int(
        "outlier.consecutive_failures",
        u64::from(c.outlier.consecutive_failures),
        1,
        1000,
    );
    p.positive("outlier.base_ejection", c.outlier.base_ejection.get(), HOUR);
    p.duration(
        "outlier.max_ejection",
        c.outlier.max_ejection.get(),
        c.outlier.base_ejection.get().min(DAY),
        DAY,
    );
    p.percent("outlier.max_ejected_percent", c.outlier.max_ejected_percent);

    p.int(
        "retry.max_attempts",
        u64::from(c.retry.max_attempts),
        1,
        MAX_ATTEMPTS,
    );
    p.percent("retry.budget_percent", c.retry.budget_percent);
    p.int(
        "retry.min_per_second",
        u64::from(c.retry.min_per_second),
        0,
        100_000,
    );

    p.percent("migration.canary_percent", c.migration.canary_percent);

    if let Some(r) = &c.rollback {
        p.duration("rollback.window", r.window.get(), SECOND, HOUR);
        p.int("rollback.min_requests", r.min_requests, 0, 1_000_000_000);
        if !(0.0..=1.0).contains(&r.max_error_rate) {
            p.push(
                "rollback.max_error_rate",
                format!("{} is out of range: must be 0..=1", r.max_error_rate),
            );
        }
        p.positive("rollback.max_p99", r.max_p99.get(), HOUR);
        p.duration("rollback.cooldown", r.cooldown.get(), SECOND, DAY);
    }

    for (i, region) in c.regions.iter().enumerate() {
        if region.privatelink_endpoint_id.is_some() {
            p.duration(
                &format!("regions[{i}].discovery_refresh"),
                region.discovery_refresh.get(),
                SECOND,
                DAY,
            );
        }
        if region.privatelink_dns.is_some() {
            p.duration(
                &format!("regions[{i}].dns_refresh"),
                region.dns_refresh.get(),
                SECOND,
                DAY,
            );
        }
        for (field, list) in [
            ("privatelink", &region.privatelink),
            ("public", &region.public),
        ] {
            for (j, spec) in list.iter().enumerate() {
                if let EndpointSpec::Table(t) = spec {
                    if t.health_port == Some(0) {
                        p.push(
                            format!("regions[{i}].{field}[{j}].health_port"),
                            "0 is out of range: must be 1..=65535",
                        );
                    }
                }
            }
        }
    }
    client_limits(c, p);
}

/// The bounds on what clients can hold: time per connection and body, connections,
/// and the in-flight body budget.
fn client_limits(c: &RawConfig, p: &mut Problems) {
    for (key, value, min, max) in [
        (
            "listen.header_read_timeout",
            c.listen.header_read_timeout,
            100 * MS,
            5 * MINUTE,
        ),
        (
            "listen.body_read_timeout",
            c.listen.body_read_timeout,
            100 * MS,
            10 * MINUTE,
        ),
        ("listen.idle_timeout", c.listen.idle_timeout, 100 * MS, HOUR),
        (
            "listen.h2_keepalive_interval",
            c.listen.h2_keepalive_interval,
            100 * MS,
            HOUR,
        ),
        (
            "listen.h2_keepalive_timeout",
            c.listen.h2_keepalive_timeout,
            100 * MS,
            5 * MINUTE,
        ),
        (
            "listen.send_timeout",
            c.listen.send_timeout,
            100 * MS,
            10 * MINUTE,
        ),
        (
            "admin.header_read_timeout",
            c.admin.header_read_timeout,
            100 * MS,
            5 * MINUTE,
        ),
        ("admin.idle_timeout", c.admin.idle_timeout, 100 * MS, HOUR),
    ] {
        if value.get() < min || value.get() > max {
            p.push(
                key,
                format!(
                    "{value} is out of range; use {} to {}",
                    HumanDuration(min),
                    HumanDuration(max)
                ),
            );
        }
    }
    if c.listen.body_min_rate.bytes() > 1 << 30 {
        p.push(
            "listen.body_min_rate",
            "must be at most 1GiB (bytes per second); 0 turns the rate check off",
        );
    }
    if !(1..=10_000).contains(&c.admin.max_connections) {
        p.push("admin.max_connections", "must be between 1 and 10000");
    }
    // One request of the largest size must fit, or it could never be served.
    let one_request = c
        .listen
        .max_body
        .bytes()
        .saturating_add(c.upstream.max_body.bytes());
    let budget = c.listen.max_in_flight_bytes.bytes();
    if budget < one_request || budget > 1 << 40 {
        p.push(
            "listen.max_in_flight_bytes",
            format!(
                "{budget} bytes is out of range; use at least listen.max_body + upstream.max_body ({one_request} bytes: one request of the largest size, plaintext and sealed) and at most 1TiB"
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key `check` bounds, each set outside its range (one region discovers through
    /// EC2 and one through DNS, so both refresh keys are checked).
    const OUT_OF_RANGE: &str = r#"
        [listen]
        max_body = "2GB"
        max_connections = 2000000
        max_in_flight_bytes = 1
        header_read_timeout = "1ms"
        body_read_timeout = "1ms"
        body_min_rate = "2GiB"
        idle_timeout = "1ms"
        h2_keepalive_interval = "1ms"
        h2_keepalive_timeout = "1ms"
        send_timeout = "1ms"
        drain_delay = "11m"
        shutdown_grace = "2h"
        [admin]
        max_connections = 0
        header_read_timeout = "1ms"
        idle_timeout = "1ms"
        [runtime]
        workers = 1000
        [tenant]
        id = "t"
        model_pool = "m"
        [kms]
        key_id = "arn:aws:kms:us-east-1:111122223333:key/k"
        region = "us-east-1"
        timeout = "2m"
        [kms.cache]
        max_age = "25h"
        max_messages = 0
        max_bytes = 0
        [upstream]
        max_body = 0
        connect_timeout = "2m"
        request_timeout = "2h"
        idle_timeout = "2h"
        pool_idle_timeout = "350s"
        [health]
        port = 0
        interval = "1ms"
        timeout = "1ms"
        healthy_threshold = 0
        unhealthy_threshold = 0
        max_staleness = "25h"
        [outlier]
        consecutive_failures = 0
        base_ejection = "2h"
        max_ejection = "25h"
        max_ejected_percent = 101
        [retry]
        max_attempts = 11
        budget_percent = 101
        min_per_second = 100001
        [migration]
        canary_percent = 101
        [rollback]
        window = "2h"
        min_requests = 2000000000
        max_error_rate = 2.0
        max_p99 = "2h"
        cooldown = "25h"
        [[regions]]
        name = "us-east-1"
        privatelink_endpoint_id = "vpce-0abcd1234ef567890"
        discovery_refresh = "25h"
        [[regions]]
        name = "us-west-2"
        privatelink_dns = "vpce.example.com"
        dns_refresh = "25h"
    "#;

    /// The row of `name` in docs/design.md's table under `heading` (that section only).
    fn documented_row(heading: &str, name: &str) -> Option<String> {
        let design = include_str!("../../docs/design.md");
        let start = design.find(heading)? + heading.len();
        let section = &design[start..];
        let section = &section[..section.find("\n### ").unwrap_or(section.len())];
        section
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .map(str::to_string)
    }

    /// The range column is the contract `check` enforces: every key it bounds has a
    /// non-empty range in docs/design.md's configuration reference, and `check` still
    /// bounds every key listed here (a key dropped from `check` fails the count).
    #[test]
    fn every_bounded_key_is_refused_out_of_range_and_documented_with_its_range() {
        let raw: RawConfig = toml::from_str(OUT_OF_RANGE).expect("the TOML parses");
        let mut problems = Problems::default();
        check(&raw, &mut problems);
        let keys: Vec<String> = problems.into_vec().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys.len(), 46, "{keys:#?}");
        for key in &keys {
            let (heading, name) = match key.split_once('.') {
                Some((region, name)) if region.starts_with("regions[") => {
                    ("### `[[regions]]`".to_string(), name)
                }
                Some((section, name)) => (format!("### `[{section}]`"), name),
                None => panic!("a key without a section: {key}"),
            };
            let row = documented_row(&heading, name)
                .unwrap_or_else(|| panic!("docs/design.md {heading} has no row for `{name}`"));
            let range = row.split('|').nth(3).unwrap_or_default().trim();
            assert!(
                !range.is_empty(),
                "docs/design.md documents `{key}` without a range: {row}"
            );
        }
    }
}
