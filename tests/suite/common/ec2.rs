//! A stand-in for the two EC2 calls gpulink's VPC-endpoint discovery makes
//! (`DescribeVpcEndpoints`, `DescribeNetworkInterfaces`), on loopback: it answers with
//! the endpoint state and the ENIs (loopback addresses, chosen zones) a test sets, and
//! can be switched at run time (new ENIs, a new state, failing). moto's EC2 cannot give
//! loopback ENIs or change an endpoint's state; this can. Requests without a SigV4
//! `Authorization` header for service `ec2` are refused, as EC2 would.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};

/// One network interface of the stand-in's endpoint.
#[derive(Debug, Clone)]
pub struct StandInEni {
    pub ip: IpAddr,
    pub zone_name: String,
    pub zone_id: String,
}

impl StandInEni {
    pub fn new(ip: IpAddr, zone: u8) -> Self {
        let letter = char::from(b'a' + zone - 1);
        Self {
            ip,
            zone_name: format!("us-east-1{letter}"),
            zone_id: format!("use1-az{zone}"),
        }
    }

    fn id(&self) -> String {
        let octets = match self.ip {
            IpAddr::V4(ip) => ip.octets().iter().map(|o| format!("{o:02x}")).collect(),
            IpAddr::V6(ip) => ip.to_string().replace(':', ""),
        };
        format!("eni-0{octets}")
    }
}

/// What the stand-in answers.
#[derive(Debug, Clone)]
pub struct Ec2View {
    pub endpoint_id: String,
    pub state: String,
    pub enis: Vec<StandInEni>,
    /// Answer every call with a 503 `Unavailable`.
    pub failing: bool,
}

#[derive(Default)]
struct Shared {
    calls: Vec<(String, String)>,
}

pub struct Ec2StandIn {
    pub url: String,
    view: Arc<Mutex<Ec2View>>,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Ec2StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub const ENDPOINT_ID: &str = "vpce-0abcd1234ef567890";

impl Ec2StandIn {
    /// Listens on `ip` (a port of its own), answering for [`ENDPOINT_ID`].
    pub async fn start(ip: IpAddr, state: &str, enis: Vec<StandInEni>) -> Ec2StandIn {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .expect("bind the EC2 stand-in");
        let addr = listener.local_addr().expect("addr");
        let view = Arc::new(Mutex::new(Ec2View {
            endpoint_id: ENDPOINT_ID.into(),
            state: state.into(),
            enis,
            failing: false,
        }));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (v, s) = (view.clone(), shared.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (v, s) = (v.clone(), s.clone());
                let service = hyper::service::service_fn(move |request| {
                    let (v, s) = (v.clone(), s.clone());
                    async move { Ok::<_, Infallible>(answer(request, &v, &s).await) }
                });
                super::spawn_http1(stream, service);
            }
        });
        Ec2StandIn {
            url: format!("http://{addr}"),
            view,
            shared,
            task,
        }
    }

    /// Changes what the stand-in answers from the next call on.
    pub fn set(&self, change: impl FnOnce(&mut Ec2View)) {
        change(&mut self.view.lock().expect("view"));
    }

    /// The calls answered so far: (action, form body).
    pub fn calls(&self) -> Vec<(String, String)> {
        self.shared.lock().expect("shared").calls.clone()
    }

    pub fn count(&self, action: &str) -> usize {
        self.calls().iter().filter(|(a, _)| a == action).count()
    }
}

fn form(body: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn xml(status: u16, text: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(text)))
        .expect("response")
}

/// A 200 answer to `action` (`DescribeVpcEndpoints`) with `content` inside EC2's
/// `<{action}Response>` envelope.
fn answered(action: &str, content: &str) -> Response<Full<Bytes>> {
    xml(
        200,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{action}Response \
             xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>r</requestId>\
             {content}</{action}Response>"
        ),
    )
}

fn error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    xml(
        status,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
             <Message>{message}</Message></Error></Errors><RequestID>stand-in</RequestID></Response>"
        ),
    )
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    view: &Mutex<Ec2View>,
    shared: &Mutex<Shared>,
) -> Response<Full<Bytes>> {
    let signed = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("AWS4-HMAC-SHA256 ") && v.contains("/us-east-1/ec2/aws4_request")
        });
    let form_type = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let post = request.method() == hyper::Method::POST;
    let body = match request.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => return error(400, "InvalidRequest", "unreadable body"),
    };
    let params = form(&body);
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let action = param("Action").unwrap_or_default();
    shared
        .lock()
        .expect("shared")
        .calls
        .push((action.clone(), body.clone()));
    if !signed {
        return error(
            401,
            "AuthFailure",
            "AWS was not able to validate the provided access credentials",
        );
    }
    if !post || !form_type || param("Version").as_deref() != Some("2016-11-15") {
        return error(400, "InvalidRequest", "not a Query-API POST");
    }
    let view = view.lock().expect("view").clone();
    if view.failing {
        return error(
            503,
            "Unavailable",
            "The service is unavailable. Please try again shortly.",
        );
    }
    match action.as_str() {
        "DescribeVpcEndpoints" => {
            if param("VpcEndpointId.1").as_deref() != Some(view.endpoint_id.as_str()) {
                return error(
                    400,
                    "InvalidVpcEndpointId.NotFound",
                    "The VpcEndpoint Id does not exist",
                );
            }
            let enis: String = view
                .enis
                .iter()
                .map(|e| format!("<item>{}</item>", e.id()))
                .collect();
            let endpoint = format!(
                "<vpcEndpointSet><item><vpcEndpointId>{}</vpcEndpointId>\
                 <vpcEndpointType>Interface</vpcEndpointType><vpcId>vpc-12345678</vpcId>\
                 <serviceName>com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0</serviceName>\
                 <state>{}</state><networkInterfaceIdSet>{enis}</networkInterfaceIdSet>\
                 <dnsEntrySet><item><dnsName>{}.vpce-svc-0123456789abcdef0.us-east-1.vpce.amazonaws.com</dnsName>\
                 </item></dnsEntrySet></item></vpcEndpointSet>",
                view.endpoint_id, view.state, view.endpoint_id
            );
            answered("DescribeVpcEndpoints", &endpoint)
        }
        "DescribeNetworkInterfaces" => {
            let asked: Vec<String> = params
                .iter()
                .filter(|(k, _)| k.starts_with("NetworkInterfaceId."))
                .map(|(_, v)| v.clone())
                .collect();
            let items: String = view
                .enis
                .iter()
                .filter(|e| asked.contains(&e.id()))
                .map(|e| {
                    format!(
                        "<item><networkInterfaceId>{}</networkInterfaceId><subnetId>subnet-{}</subnetId>\
                         <availabilityZone>{}</availabilityZone><availabilityZoneId>{}</availabilityZoneId>\
                         <privateIpAddress>{}</privateIpAddress><status>in-use</status></item>",
                        e.id(),
                        e.zone_id,
                        e.zone_name,
                        e.zone_id,
                        e.ip
                    )
                })
                .collect();
            let interfaces = format!("<networkInterfaceSet>{items}</networkInterfaceSet>");
            answered("DescribeNetworkInterfaces", &interfaces)
        }
        _ => error(400, "InvalidAction", "unknown action"),
    }
}
