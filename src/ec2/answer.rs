//! EC2's answers as gpulink uses them: a VPC endpoint (state, service, DNS names, ENI
//! ids) and its network interfaces (private IP, subnet, zone name and id), read from the
//! Query-API XML, and EC2's error document reduced to its code and a short message.

use std::net::IpAddr;

use super::xml::Element;
use super::Ec2Error;

/// A VPC endpoint's lifecycle state. EC2 spells them `available`, `pendingAcceptance`,
/// ...; they are compared ignoring case (the SDKs' enums disagree on spelling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointState {
    Available,
    PendingAcceptance,
    Pending,
    Rejected,
    Failed,
    Deleting,
    Deleted,
    Expired,
    /// A state this version does not know, as EC2 spelled it.
    Other(String),
}

impl EndpointState {
    pub fn parse(text: &str) -> Self {
        match text.trim().to_ascii_lowercase().as_str() {
            "available" => Self::Available,
            "pendingacceptance" => Self::PendingAcceptance,
            "pending" => Self::Pending,
            "rejected" => Self::Rejected,
            "failed" => Self::Failed,
            "deleting" => Self::Deleting,
            "deleted" => Self::Deleted,
            "expired" => Self::Expired,
            _ => Self::Other(text.trim().to_string()),
        }
    }

    /// EC2's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Available => "available",
            Self::PendingAcceptance => "pendingAcceptance",
            Self::Pending => "pending",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
            Self::Expired => "expired",
            Self::Other(s) => s,
        }
    }

    /// Only an `available` endpoint carries traffic.
    pub fn is_usable(&self) -> bool {
        *self == Self::Available
    }

    /// What the operator should do, for every state but `available`.
    pub fn advice(&self) -> Option<&'static str> {
        Some(match self {
            Self::Available => return None,
            Self::PendingAcceptance => {
                "the endpoint waits for the GPU cluster team to accept it (usually under an hour, up to 4 hours); gpulink sends nothing to it until it is available and picks it up by itself then"
            }
            Self::Pending => "the endpoint is being created; gpulink starts using it once it is available",
            Self::Rejected => {
                "the GPU cluster team rejected the endpoint: ask them to approve your AWS account, then create a new endpoint"
            }
            Self::Failed => "the endpoint could not be created: check its subnets and security groups, then recreate it",
            Self::Deleting | Self::Deleted => {
                "the endpoint is deleted: create a new one and put its id in privatelink_endpoint_id"
            }
            Self::Expired => "the endpoint's acceptance expired: create a new one",
            Self::Other(_) => "the endpoint is in a state gpulink does not know; it is not used",
        })
    }
}

/// One VPC endpoint as DescribeVpcEndpoints gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcEndpoint {
    pub id: String,
    pub state: EndpointState,
    pub service_name: String,
    pub endpoint_type: String,
    pub vpc_id: String,
    pub dns_names: Vec<String>,
    pub network_interface_ids: Vec<String>,
    pub subnet_ids: Vec<String>,
}

/// One network interface as DescribeNetworkInterfaces gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInterface {
    pub id: String,
    pub private_ip: IpAddr,
    pub subnet_id: String,
    /// The zone's name (`us-east-1a`): differs between accounts for the same zone.
    pub zone_name: Option<String>,
    /// The zone's id (`use1-az1`): the same in every account.
    pub zone_id: Option<String>,
    pub status: String,
}

impl NetworkInterface {
    /// The zone to route by: the id when EC2 gives it (stable across accounts), else
    /// the name.
    pub fn zone(&self) -> Option<&str> {
        self.zone_id.as_deref().or(self.zone_name.as_deref())
    }
}

fn invalid(what: impl Into<String>) -> Ec2Error {
    Ec2Error::InvalidResponse(what.into())
}

fn text(item: &Element, name: &str) -> String {
    item.text_of(name).unwrap_or_default().to_string()
}

fn list(item: &Element, set: &str) -> Vec<String> {
    item.items(set)
        .map(|i| i.text.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether `doc` is the answer to `action` (`<{action}Response>`). Any other document is
/// refused whole: read as an answer, it would say "no endpoints" instead of "wrong".
fn answer_to(doc: &Element, action: &str) -> Result<(), Ec2Error> {
    if doc.name.strip_suffix("Response") == Some(action) {
        Ok(())
    } else {
        Err(invalid(format!("`{}` is not a {action} answer", doc.name)))
    }
}

/// The token of the next page, when the answer has one.
fn next_token(doc: &Element) -> Option<String> {
    doc.text_of("nextToken").map(str::to_string)
}

/// A DescribeVpcEndpoints answer: its endpoints, and the next page's token.
pub fn vpc_endpoints(doc: &Element) -> Result<(Vec<VpcEndpoint>, Option<String>), Ec2Error> {
    answer_to(doc, "DescribeVpcEndpoints")?;
    let mut out = Vec::new();
    for item in doc.items("vpcEndpointSet") {
        let id = item
            .text_of("vpcEndpointId")
            .ok_or_else(|| invalid("a VPC endpoint without vpcEndpointId"))?;
        let state = item
            .text_of("state")
            .ok_or_else(|| invalid(format!("VPC endpoint {id} has no state")))?;
        out.push(VpcEndpoint {
            id: id.to_string(),
            state: EndpointState::parse(state),
            service_name: text(item, "serviceName"),
            endpoint_type: text(item, "vpcEndpointType"),
            vpc_id: text(item, "vpcId"),
            dns_names: item
                .items("dnsEntrySet")
                .filter_map(|e| e.text_of("dnsName"))
                .map(str::to_string)
                .collect(),
            network_interface_ids: list(item, "networkInterfaceIdSet"),
            subnet_ids: list(item, "subnetIdSet"),
        });
    }
    Ok((out, next_token(doc)))
}

/// A DescribeNetworkInterfaces answer: its interfaces, and the next page's token.
pub fn network_interfaces(
    doc: &Element,
) -> Result<(Vec<NetworkInterface>, Option<String>), Ec2Error> {
    answer_to(doc, "DescribeNetworkInterfaces")?;
    let mut out = Vec::new();
    for item in doc.items("networkInterfaceSet") {
        let id = item
            .text_of("networkInterfaceId")
            .ok_or_else(|| invalid("a network interface without networkInterfaceId"))?;
        let ip = item
            .text_of("privateIpAddress")
            .ok_or_else(|| invalid(format!("network interface {id} has no privateIpAddress")))?;
        let private_ip = ip.parse().map_err(|_| {
            invalid(format!(
                "network interface {id}: `{ip}` is not an IP address"
            ))
        })?;
        out.push(NetworkInterface {
            id: id.to_string(),
            private_ip,
            subnet_id: text(item, "subnetId"),
            zone_name: item.text_of("availabilityZone").map(str::to_string),
            zone_id: item.text_of("availabilityZoneId").map(str::to_string),
            status: text(item, "status"),
        });
    }
    Ok((out, next_token(doc)))
}

/// EC2's error document (`<Response><Errors><Error><Code/><Message/>`): the code and
/// the message cut to a short, printable line.
pub fn error(doc: &Element) -> Option<(String, String)> {
    let error = doc.child("Errors")?.child("Error")?;
    let code = error.text_of("Code")?.to_string();
    Some((code, short(error.text_of("Message").unwrap_or_default())))
}

/// At most 200 printable characters of `message`.
pub fn short(message: &str) -> String {
    const MAX: usize = 200;
    let clean: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX + 1)
        .collect();
    if clean.chars().count() > MAX {
        clean.chars().take(MAX).collect::<String>() + "..."
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::super::xml::parse;
    use super::*;

    const ENDPOINTS: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeVpcEndpointsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>0a1b</requestId>
    <vpcEndpointSet>
        <item>
            <vpcEndpointId>vpce-0abcd1234ef567890</vpcEndpointId>
            <vpcEndpointType>Interface</vpcEndpointType>
            <vpcId>vpc-12345678</vpcId>
            <serviceName>com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0</serviceName>
            <state>pendingAcceptance</state>
            <subnetIdSet><item>subnet-aaa</item><item>subnet-bbb</item></subnetIdSet>
            <networkInterfaceIdSet><item>eni-aaa</item><item>eni-bbb</item></networkInterfaceIdSet>
            <dnsEntrySet>
                <item><dnsName>vpce-0abcd1234ef567890-x.vpce-svc-0123.us-east-1.vpce.amazonaws.com</dnsName><hostedZoneId>Z7</hostedZoneId></item>
            </dnsEntrySet>
        </item>
    </vpcEndpointSet>
</DescribeVpcEndpointsResponse>"#;

    #[test]
    fn reads_a_vpc_endpoint() {
        let (endpoints, next) = vpc_endpoints(&parse(ENDPOINTS).unwrap()).unwrap();
        assert_eq!(next, None);
        let [e] = &endpoints[..] else {
            panic!("{endpoints:?}")
        };
        assert_eq!(e.id, "vpce-0abcd1234ef567890");
        assert_eq!(e.state, EndpointState::PendingAcceptance);
        assert_eq!(e.endpoint_type, "Interface");
        assert_eq!(e.network_interface_ids, ["eni-aaa", "eni-bbb"]);
        assert_eq!(e.subnet_ids, ["subnet-aaa", "subnet-bbb"]);
        assert_eq!(e.dns_names.len(), 1);
        assert!(e.service_name.ends_with("vpce-svc-0123456789abcdef0"));
    }

    #[test]
    fn reads_network_interfaces_and_prefers_the_zone_id() {
        let doc = parse(
            r#"<DescribeNetworkInterfacesResponse><networkInterfaceSet>
            <item><networkInterfaceId>eni-aaa</networkInterfaceId><subnetId>subnet-aaa</subnetId>
              <availabilityZone>us-east-1a</availabilityZone><availabilityZoneId>use1-az4</availabilityZoneId>
              <privateIpAddress>10.34.10.50</privateIpAddress><status>in-use</status></item>
            <item><networkInterfaceId>eni-bbb</networkInterfaceId><subnetId>subnet-bbb</subnetId>
              <availabilityZone>us-east-1b</availabilityZone>
              <privateIpAddress>10.34.11.50</privateIpAddress></item>
            </networkInterfaceSet><nextToken>page2</nextToken></DescribeNetworkInterfacesResponse>"#,
        )
        .unwrap();
        let (enis, next) = network_interfaces(&doc).unwrap();
        assert_eq!(next.as_deref(), Some("page2"));
        assert_eq!(enis.len(), 2);
        assert_eq!(enis[0].private_ip.to_string(), "10.34.10.50");
        assert_eq!(enis[0].zone(), Some("use1-az4"));
        assert_eq!(enis[0].zone_name.as_deref(), Some("us-east-1a"));
        assert_eq!(enis[1].zone(), Some("us-east-1b"));
        assert_eq!(enis[1].subnet_id, "subnet-bbb");
    }

    #[test]
    fn refuses_answers_it_cannot_use() {
        let wrong = parse("<DescribeSubnetsResponse/>").unwrap();
        assert!(vpc_endpoints(&wrong).is_err());
        assert!(network_interfaces(&wrong).is_err());
        // Each call's answer is refused as the other's, by name.
        let endpoints = parse(ENDPOINTS).unwrap();
        let err = network_interfaces(&endpoints).unwrap_err().to_string();
        assert!(
            err.contains(
                "`DescribeVpcEndpointsResponse` is not a DescribeNetworkInterfaces answer"
            ),
            "{err}"
        );
        let enis = parse("<DescribeNetworkInterfacesResponse/>").unwrap();
        assert!(network_interfaces(&enis).is_ok());
        let err = vpc_endpoints(&enis).unwrap_err().to_string();
        assert!(
            err.contains(
                "`DescribeNetworkInterfacesResponse` is not a DescribeVpcEndpoints answer"
            ),
            "{err}"
        );
        let bad_ip = parse(
            "<DescribeNetworkInterfacesResponse><networkInterfaceSet><item>\
             <networkInterfaceId>eni-a</networkInterfaceId><privateIpAddress>ten</privateIpAddress>\
             </item></networkInterfaceSet></DescribeNetworkInterfacesResponse>",
        )
        .unwrap();
        assert!(network_interfaces(&bad_ip).is_err());
        let no_state = parse(
            "<DescribeVpcEndpointsResponse><vpcEndpointSet><item><vpcEndpointId>vpce-1</vpcEndpointId>\
             </item></vpcEndpointSet></DescribeVpcEndpointsResponse>",
        )
        .unwrap();
        assert!(vpc_endpoints(&no_state).is_err());
    }

    #[test]
    fn states_compare_ignoring_case_and_explain_themselves() {
        assert_eq!(EndpointState::parse("Available"), EndpointState::Available);
        assert_eq!(
            EndpointState::parse("PENDINGACCEPTANCE"),
            EndpointState::PendingAcceptance
        );
        assert_eq!(
            EndpointState::parse("pendingAcceptance").as_str(),
            "pendingAcceptance"
        );
        assert!(EndpointState::Available.is_usable());
        assert!(EndpointState::Available.advice().is_none());
        for s in [
            "pending", "rejected", "failed", "deleted", "expired", "weird",
        ] {
            let state = EndpointState::parse(s);
            assert!(!state.is_usable(), "{s}");
            assert!(state.advice().is_some(), "{s}");
        }
        assert!(EndpointState::PendingAcceptance
            .advice()
            .unwrap()
            .contains("accept"));
    }

    #[test]
    fn error_documents_give_code_and_a_short_message() {
        let doc = parse(&format!(
            "<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>no\n{}</Message>\
             </Error></Errors><RequestID>r</RequestID></Response>",
            "x".repeat(500)
        ))
        .unwrap();
        let (code, message) = error(&doc).unwrap();
        assert_eq!(code, "UnauthorizedOperation");
        assert!(message.starts_with("no x"));
        assert_eq!(message.chars().count(), 203);
        assert!(error(&parse("<Response/>").unwrap()).is_none());
    }
}
