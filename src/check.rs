//! What `gpulink check` says beyond "valid": warnings about a configuration that `run`
//! would accept but that is very likely not what the operator meant: values still the
//! example's placeholders, a public fallback window already past, and public endpoint
//! names that do not resolve. Warnings never make `check` fail: the file is valid, and
//! some of them (a name only the production network resolves) can be right where `check`
//! runs.

use std::collections::BTreeSet;
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::config::{Config, RouteKind};

/// How long `check` waits for all public names to resolve, together.
pub const RESOLVE_LIMIT: Duration = Duration::from_secs(5);

/// At most this many distinct names are resolved (one thread each).
const MAX_NAMES: usize = 64;

/// One warning: the key it is about and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.key, self.message)
    }
}

/// Values from `config/gpulink.example.toml` that only make sense as examples.
const EXAMPLE_ACCOUNT: &str = "111122223333";
const EXAMPLE_KEY_ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
const EXAMPLE_TENANT: &str = "tenant-123";
const EXAMPLE_ENIS: [&str; 4] = ["10.34.10.50", "10.34.11.50", "10.34.12.50", "10.40.10.50"];

/// A DNS name that is a placeholder: the example's `yourcompany`, or a domain reserved
/// for documentation (RFC 2606: example.com/.net/.org and the `.example` TLD).
fn placeholder_name(name: &str) -> Option<&'static str> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = name.split('.').collect();
    if labels.contains(&"yourcompany") {
        return Some("`yourcompany` is the example's placeholder");
    }
    let reserved = matches!(
        labels.as_slice(),
        [.., "example"] | [.., "example", "com" | "net" | "org"]
    );
    reserved.then_some("a domain reserved for documentation (RFC 2606)")
}

/// Every warning for `config`, with `now` as the time the fallback window is judged at;
/// `resolve` = look up the public names (DNS through the system resolver, nothing else).
pub fn warnings(config: &Config, now: DateTime<Utc>, resolve: bool) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut warn = |key: &str, message: String| {
        out.push(Warning {
            key: key.to_string(),
            message,
        })
    };

    let key_id = config.kms.key_id.as_str();
    if key_id.contains(EXAMPLE_ACCOUNT) || key_id.contains(EXAMPLE_KEY_ID) {
        warn(
            "kms.key_id",
            "the example's placeholder key ARN; set your key's ARN \
             (aws kms describe-key --key-id alias/...)"
                .into(),
        );
    }
    if config.tenant.id == EXAMPLE_TENANT {
        warn(
            "tenant.id",
            format!(
                "`{EXAMPLE_TENANT}` is the example's tenant id; set the id the cluster gave you"
            ),
        );
    }
    if let Some(name) = &config.upstream.server_name {
        if let Some(why) = placeholder_name(name) {
            warn(
                "upstream.server_name",
                format!("`{name}`: {why}; set the cluster's TLS name"),
            );
        }
    }

    let mut to_resolve: Vec<(String, String, u16)> = Vec::new();
    // In file order (region, then its privatelink list, then its public list), so the
    // key can be named as the file writes it.
    let region_index = |name: &str| config.regions.iter().position(|r| r == name);
    let mut position: (Option<usize>, RouteKind, usize) = (None, RouteKind::Privatelink, 0);
    for endpoint in &config.endpoints {
        let region = region_index(&endpoint.region);
        position = if position.0 == region && position.1 == endpoint.kind {
            (region, endpoint.kind, position.2 + 1)
        } else {
            (region, endpoint.kind, 0)
        };
        let key = format!(
            "regions[{}].{}[{}]",
            position.0.unwrap_or_default(),
            endpoint.kind.as_str(),
            position.2
        );
        let host = &endpoint.host;
        if EXAMPLE_ENIS.contains(&host.as_str()) {
            warn(
                &key,
                format!(
                    "`{host}` is the example's ENI address; set your VPC endpoint's \
                     (aws ec2 describe-network-interfaces)"
                ),
            );
        }
        if config.upstream.server_name.as_deref() != Some(endpoint.server_name.as_str())
            && Some(endpoint.server_name.as_str()) != Some(host.as_str())
        {
            if let Some(why) = placeholder_name(&endpoint.server_name) {
                warn(
                    &key,
                    format!("server_name `{}`: {why}", endpoint.server_name),
                );
            }
        }
        if host.parse::<IpAddr>().is_ok() {
            continue;
        }
        if let Some(why) = placeholder_name(host) {
            warn(&key, format!("`{host}`: {why}; set the cluster's name"));
        } else if endpoint.kind == RouteKind::Public {
            to_resolve.push((key, host.clone(), endpoint.port));
        }
    }
    for discovery in &config.discovery {
        let crate::config::DiscoverySource::Dns { host } = &discovery.source else {
            continue;
        };
        if let Some(why) = placeholder_name(host) {
            let i = region_index(&discovery.region).unwrap_or_default();
            warn(
                &format!("regions[{i}].privatelink_dns"),
                format!("`{host}`: {why}"),
            );
        }
    }

    if let Some(until) = config.migration.public_fallback_until {
        if until.with_timezone(&Utc) <= now {
            warn(
                "migration.public_fallback_until",
                format!(
                    "{} is already past: in phase `privatelink` gpulink never falls back to \
                     the public endpoints; set the end of your rollback window, or delete the \
                     line to keep the fallback for as long as public endpoints are configured",
                    until.to_rfc3339()
                ),
            );
        }
    }

    if resolve {
        out.extend(unresolved(&to_resolve, RESOLVE_LIMIT));
    }
    out
}

/// Resolves every name at once, one thread each, and waits at most `limit` for all: a
/// resolver that hangs costs `check` that long, never more (the threads left behind end
/// with the process).
fn unresolved(names: &[(String, String, u16)], limit: Duration) -> Vec<Warning> {
    let mut seen = BTreeSet::new();
    let (tx, rx) = mpsc::channel();
    let mut pending = Vec::new();
    for (key, host, port) in names {
        if !seen.insert(host.clone()) {
            continue;
        }
        if pending.len() == MAX_NAMES {
            break;
        }
        let (tx, host_owned, port) = (tx.clone(), host.clone(), *port);
        let spawned = std::thread::Builder::new()
            .name("check-resolve".into())
            .spawn(move || {
                let result = (host_owned.as_str(), port)
                    .to_socket_addrs()
                    .map(|mut addrs| addrs.next().is_some());
                let _ = tx.send((host_owned, result.map_err(|e| e.to_string())));
            });
        if spawned.is_ok() {
            pending.push((key.clone(), host.clone()));
        }
    }
    drop(tx);
    let deadline = Instant::now() + limit;
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < pending.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((host, result)) => {
                answers.insert(host, result);
            }
            Err(_) => break,
        }
    }
    let mut out = Vec::new();
    for (key, host) in pending {
        let message = match answers.get(&host) {
            Some(Ok(true)) => continue,
            Some(Ok(false)) => format!("`{host}` resolves to no address"),
            Some(Err(error)) => format!("`{host}` does not resolve: {error}"),
            None => format!("`{host}` did not resolve within {} s", limit.as_secs()),
        };
        out.push(Warning {
            key,
            message: format!(
                "{message} (from here); the public fallback cannot use it unless it \
                 resolves where gpulink runs"
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_names() {
        assert!(placeholder_name("gpu-cluster.yourcompany.internal").is_some());
        assert!(placeholder_name("gpu-cluster.us-east-1.example.com").is_some());
        assert!(placeholder_name("EXAMPLE.ORG.").is_some());
        assert!(placeholder_name("cluster.example").is_some());
        assert!(placeholder_name("gpu-cluster.acme.internal").is_none());
        assert!(placeholder_name("example.company.com").is_none());
        assert!(placeholder_name("myexample.com").is_none());
    }

    #[test]
    fn a_name_that_resolves_is_no_warning() {
        // A loopback name resolves from /etc/hosts; nothing leaves the host.
        let names = vec![("k".to_string(), "localhost".to_string(), 443)];
        assert!(unresolved(&names, Duration::from_secs(5)).is_empty());
    }
}
