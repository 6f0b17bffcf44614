//! Why an endpoint cannot serve, in words an operator can act on: one classification of
//! connect, TLS and health-check failures, shared by `gpulink probe` and the proxy's own
//! health checker and request path, so that `/status`, the log and `probe` give the same
//! diagnosis for the same failure.
//!
//! The symptoms are ambiguous in ways an operator should not have to rediscover: a TCP
//! connect that times out looks the same whether a security group drops the packets or
//! the VPC endpoint is still `pendingAcceptance`; a TLS failure may be a wrong CA, a
//! wrong name, a wrong clock or a port that does not speak TLS. Each function here turns
//! one failure into a [`Problem`] (stable, machine-readable) and a one-line message.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::connector::ConnectError;
use super::health::HealthError;
use crate::config::{EndpointConfig, RouteKind};

/// What went wrong, as a stable machine-readable kind plus the operator's line.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Diagnosis {
    pub problem: Problem,
    pub message: String,
}

/// The failure kinds `probe` and the health checker tell apart.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    DnsFailed,
    ConnectTimeout,
    ConnectRefused,
    NoRoute,
    ConnectFailed,
    TlsWrongName,
    TlsUnknownCa,
    TlsExpired,
    TlsTimeout,
    TlsFailed,
    HealthTimeout,
    HealthRefused,
    HealthFailed,
    HealthStatus,
    HealthNotJson,
    Unhealthy,
    StaleHealth,
    NoCapacity,
    RegionMismatch,
}

impl Problem {
    /// The kind as `/status` and the metrics spell it (`connect_timeout`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::DnsFailed => "dns_failed",
            Problem::ConnectTimeout => "connect_timeout",
            Problem::ConnectRefused => "connect_refused",
            Problem::NoRoute => "no_route",
            Problem::ConnectFailed => "connect_failed",
            Problem::TlsWrongName => "tls_wrong_name",
            Problem::TlsUnknownCa => "tls_unknown_ca",
            Problem::TlsExpired => "tls_expired",
            Problem::TlsTimeout => "tls_timeout",
            Problem::TlsFailed => "tls_failed",
            Problem::HealthTimeout => "health_timeout",
            Problem::HealthRefused => "health_refused",
            Problem::HealthFailed => "health_failed",
            Problem::HealthStatus => "health_status",
            Problem::HealthNotJson => "health_not_json",
            Problem::Unhealthy => "unhealthy",
            Problem::StaleHealth => "stale_health",
            Problem::NoCapacity => "no_capacity",
            Problem::RegionMismatch => "region_mismatch",
        }
    }

    /// A few words for a one-line message (the app's `no_endpoint` error); the full
    /// diagnosis is in `/status`, the log and `gpulink probe`.
    pub fn label(self) -> &'static str {
        match self {
            Problem::DnsFailed => "DNS lookup failed",
            Problem::ConnectTimeout => "TCP connect timed out (filtered?)",
            Problem::ConnectRefused => "connection refused",
            Problem::NoRoute => "no route",
            Problem::ConnectFailed => "TCP connect failed",
            Problem::TlsWrongName => "wrong server name",
            Problem::TlsUnknownCa => "untrusted CA",
            Problem::TlsExpired => "certificate expired or not yet valid",
            Problem::TlsTimeout => "TLS handshake timed out",
            Problem::TlsFailed => "TLS handshake failed",
            Problem::HealthTimeout => "health check timed out",
            Problem::HealthRefused => "health port refused",
            Problem::HealthFailed => "health check failed",
            Problem::HealthStatus => "health check answered an error",
            Problem::HealthNotJson => "health answer is not the cluster's JSON",
            Problem::Unhealthy => "reports unhealthy",
            Problem::StaleHealth => "stale health timestamp",
            Problem::NoCapacity => "no capacity",
            Problem::RegionMismatch => "region mismatch",
        }
    }

    /// Warnings do not stop an endpoint from serving.
    pub fn is_warning(self) -> bool {
        matches!(self, Problem::NoCapacity | Problem::RegionMismatch)
    }
}

/// A name lookup that failed: private DNS names resolve only inside the VPC.
pub fn dns_failed(host: &str, message: &str) -> Diagnosis {
    Diagnosis {
        problem: Problem::DnsFailed,
        message: format!(
            "cannot resolve `{host}` ({message}): a private DNS name resolves only inside the VPC \
             (VPC endpoint with private DNS enabled, VPC enableDnsSupport and enableDnsHostnames); \
             check the spelling, or list the ENI addresses from the guide's step 4 instead"
        ),
    }
}

/// TCP connects, TLS never finishes: not the TLS port, or a middlebox holds the flow.
pub fn tls_timeout(addr: SocketAddr, timeout: Duration) -> Diagnosis {
    Diagnosis {
        problem: Problem::TlsTimeout,
        message: format!(
            "TCP to {addr} connects but the TLS handshake did not finish within {timeout:?}: \
             port {} may not be the cluster's TLS port (the cluster serves 443), or something in \
             between holds the connection",
            addr.port()
        ),
    }
}

/// The diagnosis of a failed connect as the pool (and the data-path check) makes it:
/// `ca_files` are the CA files trusted besides the system roots.
pub fn connect_failure(
    error: &ConnectError,
    endpoint: &EndpointConfig,
    ca_files: &[PathBuf],
) -> Diagnosis {
    match error {
        ConnectError::Resolve { host, source } => dns_failed(host, &source.to_string()),
        ConnectError::NoAddress { host } => dns_failed(host, "resolved to no address"),
        ConnectError::Tcp { addr, source } => connect_error(*addr, source, endpoint),
        ConnectError::Timeout { addr, timeout } => connect_timeout(*addr, *timeout, endpoint),
        ConnectError::TlsTimeout { addr, timeout } => tls_timeout(*addr, *timeout),
        ConnectError::Tls { addr, source, .. } => tls_error(source, *addr, endpoint, ca_files).0,
    }
}

/// The one diagnosis that has to name two unrelated causes: dropped SYNs look the same
/// whether a firewall drops them or the endpoint is not accepting yet.
pub fn connect_timeout(
    addr: SocketAddr,
    timeout: Duration,
    endpoint: &EndpointConfig,
) -> Diagnosis {
    let extra = if endpoint.kind == RouteKind::Privatelink {
        " or the VPC endpoint is not `available` yet (still `pendingAcceptance`: \
         `aws ec2 describe-vpc-endpoints --query 'VpcEndpoints[].State'`, then ask the GPU cluster team to accept it)"
    } else {
        " or this host has no route to the internet (NAT gateway / egress rules) for public endpoints"
    };
    Diagnosis {
        problem: Problem::ConnectTimeout,
        message: format!(
            "TCP connect to {addr} timed out after {timeout:?} (packets dropped, not refused): either a security group \
             or network ACL drops the traffic,{extra}. The endpoint's own security group must allow inbound TCP {} and {} \
             from this host (the guide's \"no inbound rules\" is about the client's group, not the endpoint's); this host's \
             group must allow outbound {} and {}; network ACLs must allow both directions and the ephemeral return ports",
            addr.port(),
            endpoint.health_port,
            addr.port(),
            endpoint.health_port
        ),
    }
}

pub fn connect_error(addr: SocketAddr, error: &io::Error, endpoint: &EndpointConfig) -> Diagnosis {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => Diagnosis {
            problem: Problem::ConnectRefused,
            message: format!(
                "connection refused by {addr}: the address answers but nothing accepts on port {}. Check the port \
                 (the cluster serves 443, health on 8080), that {} is one of the VPC endpoint's ENI addresses \
                 (guide step 4: describe-network-interfaces), and with the GPU cluster team that the service behind \
                 the endpoint is up",
                addr.port(),
                addr.ip()
            ),
        },
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Diagnosis {
            problem: Problem::NoRoute,
            message: format!(
                "no route to {addr} ({error}): check this subnet's route table and that {} is an address of the \
                 VPC endpoint in this VPC (guide step 4)",
                addr.ip()
            ),
        },
        _ => Diagnosis {
            problem: Problem::ConnectFailed,
            message: format!(
                "TCP connect to {addr} failed: {error}; check the address `{}` and the network path",
                endpoint.authority()
            ),
        },
    }
}

/// Tells a wrong name from an untrusted CA from an expired certificate.
pub fn tls_error(
    error: &io::Error,
    addr: SocketAddr,
    endpoint: &EndpointConfig,
    ca_files: &[PathBuf],
) -> (Diagnosis, Vec<String>) {
    use rustls::CertificateError as C;
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let trusted = if ca_files.is_empty() {
        "the system roots only".to_string()
    } else {
        format!(
            "the system roots and {}",
            ca_files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(cert_error)) => match cert_error {
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                let presented = match cert_error {
                    C::NotValidForNameContext { presented, .. } => {
                        presented.iter().map(|name| plain_name(name)).collect()
                    }
                    _ => Vec::new(),
                };
                let names = if presented.is_empty() {
                    String::new()
                } else {
                    format!(" (it is valid for: {})", presented.join(", "))
                };
                (
                    Diagnosis {
                        problem: Problem::TlsWrongName,
                        message: format!(
                            "wrong server name: the certificate of {addr} is not valid for `{}`{names}. Set `server_name` \
                             on this endpoint (or `upstream.server_name`) to a name the cluster's certificate carries; \
                             ask the GPU cluster team which one",
                            endpoint.server_name
                        ),
                    },
                    presented,
                )
            }
            C::UnknownIssuer | C::BadSignature => (
                Diagnosis {
                    problem: Problem::TlsUnknownCa,
                    message: format!(
                        "untrusted CA: the certificate of {addr} is not signed by a CA this host trusts ({trusted}). \
                         Set `upstream.ca_file` (or this endpoint's `ca_file`) to the cluster's CA bundle"
                    ),
                },
                Vec::new(),
            ),
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => (
                Diagnosis {
                    problem: Problem::TlsExpired,
                    message: format!(
                        "the certificate of {addr} is expired or not yet valid ({cert_error:?}): check this host's \
                         clock (chronyc tracking / timedatectl), else tell the GPU cluster team"
                    ),
                },
                Vec::new(),
            ),
            other => (
                Diagnosis {
                    problem: Problem::TlsFailed,
                    message: format!(
                        "the certificate of {addr} was rejected ({other:?}); trusted: {trusted}"
                    ),
                },
                Vec::new(),
            ),
        },
        _ => (
            Diagnosis {
                problem: Problem::TlsFailed,
                message: format!(
                    "TLS handshake with {addr} failed: {error}. Port {} may not speak TLS (the cluster serves TLS on \
                     443), or a proxy or firewall interferes with the connection",
                    addr.port()
                ),
            },
            Vec::new(),
        ),
    }
}

/// rustls reports presented names as `DnsName("x")` / `IpAddress(1.2.3.4)`: show `x`.
pub fn plain_name(name: &str) -> String {
    let inner = name
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or(name);
    inner.trim_matches('"').to_string()
}

pub fn health_error(
    error: &HealthError,
    endpoint: &EndpointConfig,
    url: &str,
    tcp_failure: Option<Problem>,
) -> Option<Diagnosis> {
    let port = endpoint.health_port;
    if tcp_failure == Some(Problem::DnsFailed) {
        // The health check fails for the same reason, already explained.
        return None;
    }
    let (problem, message) = match error {
        HealthError::Timeout(limit) => {
            if tcp_failure == Some(Problem::ConnectTimeout) {
                // Same cause as the TLS port's timeout, already explained.
                return Some(Diagnosis {
                    problem: Problem::HealthTimeout,
                    message: format!(
                        "{url} timed out after {limit:?} as well: the same drop (security group, NACL or pendingAcceptance) affects port {port}"
                    ),
                });
            }
            (
                Problem::HealthTimeout,
                format!(
                    "{url} did not answer within {limit:?}: port {port} is filtered or the health service hangs. The endpoint's \
                     security group must allow inbound TCP {port} from this host and this host's group outbound {port} \
                     (the guide's step 5: curl -v {url})"
                ),
            )
        }
        HealthError::Connect { message, .. } if message.contains("refused") => {
            if tcp_failure == Some(Problem::ConnectRefused) {
                (
                    Problem::HealthRefused,
                    format!("{url}: connection refused as well; nothing accepts on this address (see above)"),
                )
            } else {
                (
                    Problem::HealthRefused,
                    format!(
                        "{url}: connection refused: nothing listens on port {port}; check `health.port` or this \
                         endpoint's `health_port` (the cluster serves /health on 8080)"
                    ),
                )
            }
        }
        HealthError::Connect { message, .. } => (
            Problem::HealthFailed,
            format!("{url}: cannot connect: {message}"),
        ),
        HealthError::Http(message) => (
            Problem::HealthFailed,
            format!("{url}: the HTTP exchange failed ({message}); is port {port} the cluster's health port?"),
        ),
        HealthError::Status(status) => (
            Problem::HealthStatus,
            format!(
                "{url} answered HTTP {status}: check `health.path` (the cluster's is /health); the service behind the \
                 endpoint may be failing"
            ),
        ),
        HealthError::Parse(message) => (
            Problem::HealthNotJson,
            format!(
                "{url} did not answer the cluster's health JSON ({message}); is port {port} the cluster's health port?"
            ),
        ),
        HealthError::Unhealthy(status) => (
            Problem::Unhealthy,
            format!(
                "unhealthy: {} reports status {status:?}; the cluster behind it is failing and gpulink sends it nothing \
                 until it recovers; tell the GPU cluster team if it persists",
                endpoint.authority()
            ),
        ),
        HealthError::Stale { age_secs, max } => (
            Problem::StaleHealth,
            format!(
                "stale health: the timestamp {} reports is {age_secs}s old (health.max_staleness {max:?}): the cluster's \
                 health reporter is stuck, or this host's clock is wrong (chronyc tracking / timedatectl)",
                endpoint.authority()
            ),
        ),
        HealthError::Implausible { timestamp } => (
            Problem::StaleHealth,
            format!(
                "implausible health: the timestamp {} reports ({timestamp}) is before 1970 or in the future:                  the cluster's health reporter is broken, or this host's clock is wrong (chronyc tracking / timedatectl)",
                endpoint.authority()
            ),
        ),
    };
    Some(Diagnosis { problem, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(kind: RouteKind) -> EndpointConfig {
        EndpointConfig {
            region: "us-east-1".into(),
            kind,
            host: "10.34.10.50".into(),
            port: 443,
            server_name: "gpu-cluster.yourcompany.internal".into(),
            health_port: 8080,
            ca_file: None,
            zone: None,
            zone_alias: None,
        }
    }

    #[test]
    fn connect_timeout_names_both_causes_and_the_endpoint_security_group() {
        let e = endpoint(RouteKind::Privatelink);
        let d = connect_timeout(
            "10.34.10.50:443".parse().unwrap(),
            Duration::from_secs(2),
            &e,
        );
        assert_eq!(d.problem, Problem::ConnectTimeout);
        for needle in [
            "security group",
            "network ACL",
            "pendingAcceptance",
            "inbound TCP 443 and 8080",
            "endpoint's own security group",
        ] {
            assert!(d.message.contains(needle), "{needle}: {}", d.message);
        }
    }

    #[test]
    fn refused_is_not_a_timeout() {
        let e = endpoint(RouteKind::Privatelink);
        let error = io::Error::from(io::ErrorKind::ConnectionRefused);
        let d = connect_error("10.34.10.50:443".parse().unwrap(), &error, &e);
        assert_eq!(d.problem, Problem::ConnectRefused);
        assert!(d.message.contains("refused"));
    }

    #[test]
    fn tls_errors_are_told_apart() {
        let e = endpoint(RouteKind::Privatelink);
        let addr: SocketAddr = "10.34.10.50:443".parse().unwrap();
        let wrap = |err: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, err);
        let (name, _) = tls_error(
            &wrap(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            )),
            addr,
            &e,
            &[],
        );
        assert_eq!(name.problem, Problem::TlsWrongName);
        assert!(name.message.contains("server_name"));
        let (ca, _) = tls_error(
            &wrap(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
            addr,
            &e,
            &[],
        );
        assert_eq!(ca.problem, Problem::TlsUnknownCa);
        assert!(ca.message.contains("ca_file"));
    }

    #[test]
    fn stale_and_unhealthy_health() {
        let e = endpoint(RouteKind::Privatelink);
        let stale = health_error(
            &HealthError::Stale {
                age_secs: 120,
                max: Duration::from_secs(30),
            },
            &e,
            "http://10.34.10.50:8080/health",
            None,
        )
        .unwrap();
        assert_eq!(stale.problem, Problem::StaleHealth);
        assert!(stale.message.contains("clock"));
        let unhealthy = health_error(
            &HealthError::Unhealthy("degraded".into()),
            &e,
            "http://10.34.10.50:8080/health",
            None,
        )
        .unwrap();
        assert_eq!(unhealthy.problem, Problem::Unhealthy);
    }

    #[test]
    fn presented_names_are_shown_plain() {
        assert_eq!(
            plain_name("DnsName(\"gpu.example.com\")"),
            "gpu.example.com"
        );
        assert_eq!(plain_name("IpAddress(10.0.0.1)"), "10.0.0.1");
        assert_eq!(plain_name("plain"), "plain");
    }
}
