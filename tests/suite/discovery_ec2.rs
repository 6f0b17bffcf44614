//! VPC-endpoint discovery through EC2 (`privatelink_endpoint_id`): the EC2 client
//! against moto's EC2 (request shapes, parsing, what boto3 created), and traffic through
//! the discovered ENIs with a loopback EC2 stand-in ([`common::ec2`]) that gives the
//! simulator's loopback ENIs, chosen zones and states.

use std::net::IpAddr;
use std::time::Duration;

use gpulink::ec2::{Ec2Client, Ec2Error, EndpointState};

use crate::common::ec2::{Ec2StandIn, StandInEni, ENDPOINT_ID};
use crate::common::{next_block, venv_bin, Layout, Moto, ProxyOptions, World, GUIDE_REQUEST};

/// What boto3 created in moto: the endpoint and its ENIs as EC2 lists them.
#[derive(Debug, serde::Deserialize)]
struct Created {
    id: String,
    state: String,
    service: String,
    enis: Vec<CreatedEni>,
}

#[derive(Debug, serde::Deserialize)]
struct CreatedEni {
    ip: String,
    subnet: String,
    zone: String,
}

/// A VPC with three subnets in three zones and an Interface endpoint over them, made
/// with boto3 in moto (moto gives each subnet's ENI a private address).
const CREATE: &str = r#"
import json, sys, boto3
ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sys.argv[1])
vpc = ec2.create_vpc(CidrBlock="10.34.0.0/16")["Vpc"]["VpcId"]
subnets = [
    ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.34.{10 + i}.0/24", AvailabilityZone=f"us-east-1{z}")["Subnet"]["SubnetId"]
    for i, z in enumerate("abc")
]
ep = ec2.create_vpc_endpoint(
    VpcId=vpc,
    VpcEndpointType="Interface",
    ServiceName="com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0",
    SubnetIds=subnets,
)["VpcEndpoint"]
enis = ec2.describe_network_interfaces(NetworkInterfaceIds=ep["NetworkInterfaceIds"])["NetworkInterfaces"]
print(json.dumps({
    "id": ep["VpcEndpointId"],
    "state": ep["State"],
    "service": ep["ServiceName"],
    "enis": [{"ip": e["PrivateIpAddress"], "subnet": e["SubnetId"], "zone": e["AvailabilityZone"]} for e in enis],
}))
"#;

async fn create_endpoint(moto: &Moto) -> Created {
    let output = tokio::process::Command::new(venv_bin("python"))
        .args(["-c", CREATE, &moto.url])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .await
        .expect("python from .venv");
    assert!(
        output.status.success(),
        "boto3 could not create the endpoint: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the script's JSON")
}

#[tokio::test]
async fn the_client_reads_what_boto3_created_in_moto() {
    let moto = Moto::get().await;
    let created = create_endpoint(&moto).await;
    assert_eq!(created.enis.len(), 3, "{created:?}");
    assert!(
        gpulink::config::valid_endpoint_id(&created.id),
        "moto's id {} must pass the configuration's check",
        created.id
    );

    let client = Ec2Client::new("us-east-1", Some(&moto.url), Duration::from_secs(10))
        .await
        .expect("client");
    let found = client.discover(&created.id).await.expect("discover");
    assert_eq!(found.endpoint.id, created.id);
    assert_eq!(found.endpoint.state, EndpointState::parse(&created.state));
    assert_eq!(found.endpoint.service_name, created.service);
    assert_eq!(found.endpoint.endpoint_type, "Interface");
    assert_eq!(found.endpoint.network_interface_ids.len(), 3);
    let mut expected: Vec<(String, String, String)> = created
        .enis
        .iter()
        .map(|e| (e.ip.clone(), e.subnet.clone(), e.zone.clone()))
        .collect();
    expected.sort_by_key(|e| e.0.parse::<IpAddr>().expect("an IP"));
    let got: Vec<(String, String, String)> = found
        .interfaces
        .iter()
        .map(|i| {
            (
                i.private_ip.to_string(),
                i.subnet_id.clone(),
                i.zone_name.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(got, expected);

    // An id EC2 does not know is named as such, not as a parse failure.
    let missing = client.discover("vpce-0123456789abcdef0").await.unwrap_err();
    assert!(matches!(missing, Ec2Error::NotFound(_)), "{missing:?}");
    assert!(missing.to_string().contains("privatelink_endpoint_id"));
}

#[tokio::test]
async fn unusable_answers_and_unreachable_ec2_are_errors_with_a_kind() {
    let block = next_block();
    let layout = Layout::new(block);
    let stand_in = Ec2StandIn::start(layout.ip(30, 1), "available", vec![]).await;
    let client = Ec2Client::new("us-east-1", Some(&stand_in.url), Duration::from_secs(5))
        .await
        .expect("client");
    // The stand-in refuses unsigned requests: the client's were signed for ec2 in us-east-1.
    let found = client.discover(ENDPOINT_ID).await.expect("discover");
    assert!(found.interfaces.is_empty());
    assert_eq!(
        stand_in.count("DescribeNetworkInterfaces"),
        0,
        "no ENIs, no call"
    );
    let (_, body) = &stand_in.calls()[0];
    assert!(body.contains("Action=DescribeVpcEndpoints"), "{body}");
    assert!(
        body.contains("VpcEndpointId.1=vpce-0abcd1234ef567890"),
        "{body}"
    );

    stand_in.set(|v| v.failing = true);
    let error = client.discover(ENDPOINT_ID).await.unwrap_err();
    assert_eq!(error.kind(), "api", "{error}");
    assert!(error.to_string().contains("Unavailable"), "{error}");

    let closed = format!("http://{}:1", layout.ip(30, 2));
    let client = Ec2Client::new("us-east-1", Some(&closed), Duration::from_secs(5))
        .await
        .expect("client");
    let error = client.discover(ENDPOINT_ID).await.unwrap_err();
    assert_eq!(error.kind(), "connect", "{error}");
}

/// The proxy's options for a region whose ENIs come from the stand-in.
fn discovered(stand_in: &Ec2StandIn) -> ProxyOptions {
    ProxyOptions::default()
        .remove("regions.0.privatelink")
        .set("regions.0.privatelink_endpoint_id", ENDPOINT_ID)
        .set("regions.0.privatelink_port", 8443)
        .set("regions.0.ec2_endpoint_url", stand_in.url.as_str())
        .set("regions.0.discovery_refresh", "1s")
}

/// The PrivateLink addresses in service, sorted.
fn privatelink_addresses(world: &World) -> Vec<String> {
    let mut v: Vec<String> = world
        .proxy()
        .proxy()
        .current()
        .endpoints
        .iter()
        .filter(|e| e.kind() == gpulink::config::RouteKind::Privatelink)
        .map(|e| e.authority.clone())
        .collect();
    v.sort();
    v
}

fn authorities(ips: &[IpAddr]) -> Vec<String> {
    let mut v: Vec<String> = ips.iter().map(|ip| format!("{ip}:8443")).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_id_alone_serves_traffic_through_the_discovered_enis() {
    let block = next_block();
    let layout = Layout::new(block);
    let [a, b, c] = layout.enis();
    let enis = vec![
        StandInEni::new(a, 1),
        StandInEni::new(b, 2),
        StandInEni::new(c, 3),
    ];
    let stand_in = Ec2StandIn::start(layout.ip(30, 1), "available", enis).await;
    let world = World::start(block, discovered(&stand_in)).await;
    assert_eq!(privatelink_addresses(&world), authorities(&[a, b, c]));
    for ip in [a, b, c] {
        world.wait_serving(ip, true).await;
    }
    for _ in 0..6 {
        let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
        reply.assert_status(200);
        assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    }
    assert_eq!(
        [a, b, c]
            .iter()
            .map(|ip| world.requests_at(*ip))
            .sum::<u64>(),
        6,
        "every request went to a discovered ENI"
    );
    assert!(stand_in.count("DescribeNetworkInterfaces") >= 1);
    world.stop().await;
}
