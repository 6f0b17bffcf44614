//! Header names of the tenant API and of gpulink itself, and the inbound header hygiene:
//! tenant identity comes from configuration only, never from the app.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const X_TENANT_ID: HeaderName = HeaderName::from_static("x-tenant-id");
pub const X_KMS_KEY_ID: HeaderName = HeaderName::from_static("x-kms-key-id");
pub const X_MODEL_POOL: HeaderName = HeaderName::from_static("x-model-pool");
pub const X_ENCRYPTION_FORMAT: HeaderName = HeaderName::from_static("x-encryption-format");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_REGION: HeaderName = HeaderName::from_static("x-region");
pub const X_GPULINK_ROUTE: HeaderName = HeaderName::from_static("x-gpulink-route");
pub const X_GPULINK_ENDPOINT: HeaderName = HeaderName::from_static("x-gpulink-endpoint");

/// Longest app-supplied request id that is kept (longer ones are replaced).
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Hop-by-hop headers (RFC 9110 7.6.1) and their common relatives: they describe one
/// connection and must not be forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the few names a head has rather than a hashed removal per listed
    // name, nine of them (issue 11's profile): most heads carry none of them.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // `Connection: keep-alive` (nginx's every answer) and `close` name no header to drop
    // beyond the listed ones: no allocation for them.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| {
            !name.eq_ignore_ascii_case("keep-alive") && !name.eq_ignore_ascii_case("close")
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    // The listed ones present, usually one or two: found by a scan each, not collected.
    while let Some(name) = headers.keys().find(|k| is_hop_by_hop(k)).cloned() {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name.as_str() == "proxy-connection"
}

/// Headers the app sends that gpulink drops besides the hop-by-hop ones: the identity
/// it sets itself, and the framing and addressing it recomputes.
const DROPPED_INBOUND: [HeaderName; 7] = [
    X_TENANT_ID,
    X_KMS_KEY_ID,
    X_ENCRYPTION_FORMAT,
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::EXPECT,
];

/// Drops everything the app must not decide: tenant, key, format, gpulink's own headers,
/// hop-by-hop headers, and the framing and addressing headers gpulink recomputes.
pub fn sanitize_inbound(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    // The names present, found in one pass (as above), then removed.
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            DROPPED_INBOUND.contains(k)
                || k.as_str().starts_with("x-gpulink-")
                || is_look_alike(k.as_str())
        })
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
}

/// Whether `name` spells, with `_` for `-`, a header gpulink drops or sets itself:
/// CGI/WSGI stacks fold `X_Tenant_ID` onto `X-Tenant-ID`, so a cluster behind one would
/// read the app's look-alike as the real identity header.
fn is_look_alike(name: &str) -> bool {
    if !name.contains('_') {
        return false;
    }
    let dashed = name.replace('_', "-");
    dashed.starts_with("x-gpulink-")
        || [
            &X_TENANT_ID,
            &X_KMS_KEY_ID,
            &X_MODEL_POOL,
            &X_ENCRYPTION_FORMAT,
            &X_REQUEST_ID,
            &header::HOST,
            &header::CONTENT_LENGTH,
            &header::CONTENT_TYPE,
            &header::EXPECT,
        ]
        .into_iter()
        .chain(HOP_BY_HOP.iter())
        .any(|n| n.as_str() == dashed)
}

/// The tenant headers' values, made once per configuration generation instead of once
/// per request. The configuration's values are checked when it is compiled; one that
/// still cannot be a header value is left out here and refused per request, as before.
#[derive(Debug, Clone, Default)]
pub struct TenantHeaders {
    tenant_id: Option<HeaderValue>,
    /// `X-Model-Pool` for each of `tenant.model_pools`.
    pools: Vec<(String, HeaderValue)>,
    /// `X-KMS-Key-ID` for `kms.key_id` as configured: the ARN every `aws-esdk` seal names.
    key_id: Option<(String, HeaderValue)>,
}

impl TenantHeaders {
    pub fn new(tenant: &crate::config::Tenant, key_id: &str) -> Self {
        let value = |text: &str| HeaderValue::from_str(text).ok();
        Self {
            tenant_id: value(&tenant.id),
            pools: tenant
                .model_pools
                .iter()
                .filter_map(|pool| Some((pool.clone(), value(pool)?)))
                .collect(),
            key_id: value(key_id).map(|v| (key_id.to_string(), v)),
        }
    }

    pub fn tenant_id(&self) -> Option<&HeaderValue> {
        self.tenant_id.as_ref()
    }

    pub fn model_pool(&self, pool: &str) -> Option<&HeaderValue> {
        self.pools.iter().find(|(p, _)| p == pool).map(|(_, v)| v)
    }

    pub fn key_arn(&self, arn: &str) -> Option<&HeaderValue> {
        self.key_id
            .as_ref()
            .filter(|(k, _)| k == arn)
            .map(|(_, v)| v)
    }
}

/// An app request id is kept when it is 1..=128 visible ASCII characters.
pub fn valid_request_id(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_REQUEST_ID_LEN
        && value.iter().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn inbound_identity_and_hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("x-tenant-id", HeaderValue::from_static("evil"));
        h.insert("X-KMS-Key-ID", HeaderValue::from_static("evil"));
        h.insert("x-encryption-format", HeaderValue::from_static("none"));
        h.insert("x-gpulink-route", HeaderValue::from_static("x"));
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("accept", HeaderValue::from_static("text/event-stream"));
        h.insert("x-model-pool", HeaderValue::from_static("model-a"));
        sanitize_inbound(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("accept"));
        assert!(h.contains_key("x-model-pool"));
    }

    #[test]
    fn hop_by_hop_headers_of_an_answer_are_dropped_and_the_rest_kept() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("server", HeaderValue::from_static("nginx"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type", "server"]);
        // None present: nothing changes.
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn underscore_look_alikes_are_dropped() {
        let mut h = HeaderMap::new();
        for name in [
            "X_Tenant_ID",
            "x_kms_key_id",
            "X_Model_Pool",
            "X_Encryption_Format",
            "X_Gpulink_Route",
            "x-gpulink_endpoint",
            "X_Request_ID",
            "Transfer_Encoding",
            "Content_Length",
        ] {
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("evil"),
            );
        }
        h.insert("x_custom_header", HeaderValue::from_static("kept"));
        sanitize_inbound(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x_custom_header"]);
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"has space"));
        assert!(!valid_request_id(&[b'a'; 129]));
        assert!(valid_request_id(&[b'a'; 128]));
    }
}
