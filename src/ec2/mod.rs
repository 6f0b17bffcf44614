//! A small client for the two EC2 Query-API calls VPC-endpoint discovery needs,
//! `DescribeVpcEndpoints` and `DescribeNetworkInterfaces`: SigV4-signed form POSTs
//! (`aws-sigv4`) over hyper and rustls, credentials from the standard AWS chain (the one
//! the KMS client uses), XML answers read by [`xml`]. Not `aws-sdk-ec2`: that crate is
//! about a million generated lines for two calls (docs/design.md, "EC2 client").
//!
//! Bounded: every call has one deadline (credentials, connect, TLS, answer), answers are
//! at most [`MAX_ANSWER`] bytes, pagination follows at most [`MAX_PAGES`] pages, and
//! nothing is retried here: the caller's next refresh is the retry.

pub mod answer;
pub mod xml;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

pub use answer::{EndpointState, NetworkInterface, VpcEndpoint};

/// The Query API version both calls are defined in.
const API_VERSION: &str = "2016-11-15";
/// Larger answers are refused (an endpoint with a few ENIs answers in a few KB).
pub const MAX_ANSWER: usize = 1024 * 1024;
/// Pages followed through `NextToken` per call.
pub const MAX_PAGES: usize = 10;
/// Network interfaces asked for per endpoint (an endpoint has one per subnet).
pub const MAX_INTERFACES: usize = 64;
/// The deadline of one call when the caller gives none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Ec2Error {
    #[error(
        "`{0}` is not a usable EC2 endpoint URL (http:// or https://, host and port, no path)"
    )]
    EndpointUrl(String),
    #[error("`{0}` is not a valid AWS region name")]
    Region(String),
    #[error("no AWS credentials: {0} (gpulink uses the standard chain: environment, profile, web identity, container or instance role)")]
    Credentials(String),
    #[error("EC2 did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach EC2 at {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    #[error("EC2 refused {action} ({status} {code}): {message}{hint}")]
    Api {
        action: &'static str,
        status: u16,
        code: String,
        message: String,
        hint: &'static str,
    },
    #[error("EC2's answer is not usable: {0}")]
    InvalidResponse(String),
    #[error("VPC endpoint {0} not found (check privatelink_endpoint_id and the region)")]
    NotFound(String),
}

impl Ec2Error {
    /// A stable word for metrics and `/status`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::EndpointUrl(_) | Self::Region(_) => "config",
            Self::Credentials(_) => "credentials",
            Self::Timeout(_) => "timeout",
            Self::Connect { .. } => "connect",
            Self::Api { .. } => "api",
            Self::InvalidResponse(_) => "invalid_response",
            Self::NotFound(_) => "not_found",
        }
    }
}

/// What to do about an EC2 error code.
fn hint(code: &str) -> &'static str {
    match code {
        "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" => {
            "; the credentials need ec2:DescribeVpcEndpoints and ec2:DescribeNetworkInterfaces"
        }
        "AuthFailure"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "ExpiredToken"
        | "RequestExpired" => "; check the AWS credentials and the clock",
        "RequestLimitExceeded" | "Throttling" => {
            "; EC2 is throttling; the next refresh tries again"
        }
        _ => "",
    }
}

/// Where the calls go.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
    /// `scheme://host[:port]/`, what is signed.
    url: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, Ec2Error> {
        let bad = || Ec2Error::EndpointUrl(url.to_string());
        let uri: http::Uri = url.trim().parse().map_err(|_| bad())?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad()),
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad());
        }
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(bad)?;
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let authority = uri.authority().ok_or_else(bad)?.as_str();
        Ok(Self {
            tls,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            url: format!("{}://{authority}/", if tls { "https" } else { "http" }),
        })
    }

    fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// Whether `url` is a usable `ec2_endpoint_url` (what the configuration checks).
pub fn check_endpoint_url(url: &str) -> Result<(), Ec2Error> {
    Target::parse(url).map(|_| ())
}

/// The EC2 endpoint for `region`: `endpoint_url` (a configuration key), else
/// `AWS_ENDPOINT_URL_EC2`, else `AWS_ENDPOINT_URL`, else `https://ec2.<region>.amazonaws.com`.
pub fn endpoint_url(region: &str, endpoint_url: Option<&str>) -> Result<String, Ec2Error> {
    let from_env = |name| {
        std::env::var(name)
            .ok()
            .filter(|v: &String| !v.trim().is_empty())
    };
    if let Some(url) = endpoint_url
        .map(str::to_string)
        .or_else(|| from_env("AWS_ENDPOINT_URL_EC2"))
        .or_else(|| from_env("AWS_ENDPOINT_URL"))
    {
        return Ok(url);
    }
    if !valid_region(region) {
        return Err(Ec2Error::Region(region.to_string()));
    }
    Ok(format!("https://ec2.{region}.amazonaws.com"))
}

/// `us-east-1`, `eu-central-2`, `us-gov-west-1`: lowercase letters, digits, dashes.
pub fn valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 32
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !region.starts_with('-')
        && !region.ends_with('-')
}

/// A VPC endpoint with its network interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub endpoint: VpcEndpoint,
    /// Sorted by IP address.
    pub interfaces: Vec<NetworkInterface>,
}

/// The EC2 client of one region.
#[derive(Clone)]
pub struct Ec2Client {
    region: String,
    target: Target,
    credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl std::fmt::Debug for Ec2Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Client")
            .field("region", &self.region)
            .field("endpoint", &self.target.url)
            .finish_non_exhaustive()
    }
}

impl Ec2Client {
    /// A client for `region` (see [`endpoint_url`] for where it sends), with the
    /// standard credential chain and `timeout` per call.
    pub async fn new(
        region: &str,
        endpoint: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, Ec2Error> {
        let target = Target::parse(&endpoint_url(region, endpoint)?)?;
        // Before the SDK's loader, which panics (debug) or fails opaquely without roots.
        crate::tls::require_system_roots().map_err(|e| Ec2Error::Connect {
            endpoint: target.url.clone(),
            message: e.to_string(),
        })?;
        let sdk_config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .load()
            .await;
        let mut tls = (*crate::tls::client_config(&[]).map_err(|e| Ec2Error::Connect {
            endpoint: target.url.clone(),
            message: e.to_string(),
        })?)
        .clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            region: region.to_string(),
            target,
            credentials: sdk_config.credentials_provider(),
            tls: Arc::new(tls),
            timeout,
        })
    }

    /// Where this client sends (`scheme://host[:port]/`).
    pub fn endpoint(&self) -> &str {
        &self.target.url
    }

    /// The endpoint `id` and its network interfaces (none asked for when it lists none).
    pub async fn discover(&self, id: &str) -> Result<Discovered, Ec2Error> {
        let endpoint = self.describe_vpc_endpoint(id).await?;
        let mut interfaces = if endpoint.network_interface_ids.is_empty() {
            Vec::new()
        } else {
            self.describe_network_interfaces(&endpoint.network_interface_ids)
                .await?
        };
        interfaces.sort_by_key(|i| i.private_ip);
        interfaces.dedup_by(|a, b| a.private_ip == b.private_ip);
        Ok(Discovered {
            endpoint,
            interfaces,
        })
    }

    /// `DescribeVpcEndpoints` for one id.
    pub async fn describe_vpc_endpoint(&self, id: &str) -> Result<VpcEndpoint, Ec2Error> {
        let doc = self
            .call(
                "DescribeVpcEndpoints",
                vec![("VpcEndpointId.1".to_string(), id.to_string())],
            )
            .await
            .map_err(|e| match e {
                Ec2Error::Api { ref code, .. } if code.starts_with("InvalidVpcEndpointId") => {
                    Ec2Error::NotFound(id.to_string())
                }
                e => e,
            })?;
        let (endpoints, _) = answer::vpc_endpoints(&doc)?;
        endpoints
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(|| Ec2Error::NotFound(id.to_string()))
    }

    /// `DescribeNetworkInterfaces` for `ids` (at most [`MAX_INTERFACES`]), following
    /// `NextToken` for at most [`MAX_PAGES`] pages.
    pub async fn describe_network_interfaces(
        &self,
        ids: &[String],
    ) -> Result<Vec<NetworkInterface>, Ec2Error> {
        if ids.len() > MAX_INTERFACES {
            return Err(Ec2Error::InvalidResponse(format!(
                "the endpoint lists {} network interfaces (at most {MAX_INTERFACES})",
                ids.len()
            )));
        }
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut params: Vec<(String, String)> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| (format!("NetworkInterfaceId.{}", i + 1), id.clone()))
                .collect();
            if let Some(t) = token.take() {
                params.push(("NextToken".into(), t));
            }
            let doc = self.call("DescribeNetworkInterfaces", params).await?;
            let (page, next) = answer::network_interfaces(&doc)?;
            out.extend(page);
            match next {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
        Err(Ec2Error::InvalidResponse(format!(
            "DescribeNetworkInterfaces still had more pages after {MAX_PAGES}"
        )))
    }

    /// One signed call within the deadline; the parsed answer, or the error EC2 gave.
    async fn call(
        &self,
        action: &'static str,
        params: Vec<(String, String)>,
    ) -> Result<xml::Element, Ec2Error> {
        match tokio::time::timeout(self.timeout, self.call_unbounded(action, params)).await {
            Ok(result) => result,
            Err(_) => Err(Ec2Error::Timeout(self.timeout)),
        }
    }

    async fn call_unbounded(
        &self,
        action: &'static str,
        params: Vec<(String, String)>,
    ) -> Result<xml::Element, Ec2Error> {
        let body = {
            // Dropped before the first await: the serializer is not `Send`.
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("Action", action);
            form.append_pair("Version", API_VERSION);
            for (k, v) in &params {
                form.append_pair(k, v);
            }
            form.finish()
        };
        let request = self.signed(body).await?;
        let (status, bytes) = self.send(request).await?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| Ec2Error::InvalidResponse("the answer is not UTF-8".into()))?;
        let doc = xml::parse(text)
            .map_err(|e| Ec2Error::InvalidResponse(format!("HTTP {status}, {e}")))?;
        if status != 200 {
            let (code, message) = answer::error(&doc).unwrap_or_else(|| {
                (
                    "Unknown".into(),
                    format!("HTTP {status} without an error code"),
                )
            });
            return Err(Ec2Error::Api {
                action,
                status,
                hint: hint(&code),
                code: answer::short(&code),
                message,
            });
        }
        Ok(doc)
    }

    /// The request with its SigV4 signature (service `ec2`, this client's region).
    async fn signed(&self, body: String) -> Result<http::Request<Full<Bytes>>, Ec2Error> {
        use aws_credential_types::provider::ProvideCredentials;
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        let provider = self
            .credentials
            .as_ref()
            .ok_or_else(|| Ec2Error::Credentials("no credential provider".into()))?;
        let credentials = provider
            .provide_credentials()
            .await
            .map_err(|e| Ec2Error::Credentials(answer::short(&e.to_string())))?;
        let identity: aws_smithy_runtime_api::client::identity::Identity = credentials.into();
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let host = self.target.authority();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("ec2")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| Ec2Error::Credentials(answer::short(&e.to_string())))?
            .into();
        let headers = [("content-type", content_type), ("host", host.as_str())];
        let signable = SignableRequest::new(
            "POST",
            &self.target.url,
            headers.into_iter(),
            SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| Ec2Error::Credentials(answer::short(&e.to_string())))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| Ec2Error::Credentials(answer::short(&e.to_string())))?
            .into_parts();
        let mut request = http::Request::post(self.target.url.as_str())
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::HOST, host)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Ec2Error::EndpointUrl(format!("{}: {e}", self.target.url)))?;
        instructions.apply_to_request_http1x(&mut request);
        Ok(request)
    }

    /// Sends on a fresh connection (a call every few minutes needs no pool) and reads
    /// at most [`MAX_ANSWER`] bytes of the answer.
    async fn send(&self, request: http::Request<Full<Bytes>>) -> Result<(u16, Bytes), Ec2Error> {
        let connect_error = |message: String| Ec2Error::Connect {
            endpoint: self.target.url.clone(),
            message,
        };
        let tcp = tokio::net::TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        if self.target.tls {
            let name = rustls_pki_types::ServerName::try_from(self.target.host.clone())
                .map_err(|_| Ec2Error::EndpointUrl(self.target.url.clone()))?;
            let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| connect_error(format!("TLS: {e}")))?;
            exchange(TokioIo::new(stream), request)
                .await
                .map_err(connect_error)
        } else {
            exchange(TokioIo::new(tcp), request)
                .await
                .map_err(connect_error)
        }
    }
}

/// One HTTP/1.1 request and its bounded answer on `io`.
async fn exchange<T>(io: T, request: http::Request<Full<Bytes>>) -> Result<(u16, Bytes), String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!("the answer is larger than {MAX_ANSWER} bytes")
                } else {
                    e.to_string()
                }
            })?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_parse_and_default_by_region() {
        let t = Target::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port), (false, "127.0.0.1", 5000));
        assert_eq!(t.url, "http://127.0.0.1:5000/");
        assert_eq!(t.authority(), "127.0.0.1:5000");
        let t = Target::parse("https://ec2.us-east-1.amazonaws.com/").unwrap();
        assert_eq!((t.tls, t.port), (true, 443));
        assert_eq!(t.authority(), "ec2.us-east-1.amazonaws.com");
        for bad in ["ftp://x", "http://x/path", "x:80", "http://x/?a=b", ""] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            endpoint_url("us-east-1", Some("http://127.0.0.1:1")).unwrap(),
            "http://127.0.0.1:1"
        );
        assert!(valid_region("us-gov-west-1"));
        assert!(!valid_region("us east"));
        assert!(!valid_region("evil.example.com/"));
        assert!(!valid_region(""));
    }

    #[test]
    fn error_kinds_and_hints() {
        assert!(hint("UnauthorizedOperation").contains("ec2:DescribeVpcEndpoints"));
        assert_eq!(hint("SomethingElse"), "");
        assert_eq!(Ec2Error::Timeout(DEFAULT_TIMEOUT).kind(), "timeout");
        assert_eq!(Ec2Error::NotFound("vpce-1".into()).kind(), "not_found");
    }
}
