//! VPC-endpoint discovery through EC2 (`privatelink_endpoint_id`): the EC2 client
//! against moto's EC2 (request shapes, parsing, what boto3 created), and traffic through
//! the discovered ENIs with a loopback EC2 stand-in ([`common::ec2`]) that gives the
//! simulator's loopback ENIs, chosen zones and states.

use std::net::IpAddr;
use std::time::Duration;

use gpulink::ec2::{Ec2Client, Ec2Error, EndpointState};

use crate::common::ec2::{Ec2StandIn, StandInEni, ENDPOINT_ID};
use crate::common::{
    assert_eventually, assert_success, next_block, venv_bin, Layout, Moto, ProxyOptions, World,
    GUIDE_REQUEST,
};

/// What boto3 created in moto: the endpoint and its ENIs as EC2 lists them.
#[derive(Debug, serde::Deserialize)]
struct Created {
    id: String,
    state: String,
    service: String,
    dns_names: Vec<String>,
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
    "dns_names": [d["DnsName"] for d in ep.get("DnsEntries", [])],
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
    assert_success(&output, "boto3 could not create the endpoint");
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

/// The stand-in EC2 with the endpoint in `state` and the layout's three ENIs, one per
/// zone (us-east-1a, b, c), and a proxy that discovers them on a block of its own.
async fn discovering(state: &str) -> (Ec2StandIn, World) {
    let block = next_block();
    let layout = Layout::new(block);
    let enis = (1..)
        .zip(layout.enis())
        .map(|(zone, ip)| StandInEni::new(ip, zone))
        .collect();
    let stand_in = Ec2StandIn::start(layout.ip(30, 1), state, enis).await;
    let world = World::start(block, discovered(&stand_in)).await;
    (stand_in, world)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_id_alone_serves_traffic_through_the_discovered_enis() {
    let (stand_in, world) = discovering("available").await;
    let [a, b, c] = world.layout.enis();
    assert_eq!(privatelink_addresses(&world), authorities(&[a, b, c]));
    // Each ENI carries its zone id (what zone-aware routing compares).
    for (ip, zone) in [(a, "use1-az1"), (b, "use1-az2"), (c, "use1-az3")] {
        let generation = world.proxy().proxy().current();
        let endpoint = generation
            .endpoints
            .iter()
            .find(|e| e.authority == format!("{ip}:8443"))
            .expect("the discovered ENI");
        assert_eq!(endpoint.zone().map(|z| z.as_str()), Some(zone));
    }
    for ip in [a, b, c] {
        world.wait_serving(ip, true).await;
    }
    for _ in 0..6 {
        let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
        reply.assert_status(200);
        assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    }
    assert_eq!(
        world.requests_to(&[a, b, c]),
        6,
        "every request went to a discovered ENI"
    );
    assert!(stand_in.count("DescribeNetworkInterfaces") >= 1);
    world.stop().await;
}

/// The region's entry in `/status` `discovery`.
async fn discovery_status(world: &World) -> serde_json::Value {
    let status = world.status().await;
    status["discovery"]
        .as_array()
        .and_then(|regions| regions.iter().find(|r| r["region"] == "us-east-1"))
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_adds_and_removes_an_eni_under_load_drops_no_request() {
    let block = next_block();
    let layout = Layout::new(block);
    let [a, b, c] = layout.enis();
    let stand_in = Ec2StandIn::start(
        layout.ip(30, 1),
        "available",
        vec![StandInEni::new(a, 1), StandInEni::new(b, 2)],
    )
    .await;
    let world = std::sync::Arc::new(World::start(block, discovered(&stand_in)).await);
    world.wait_serving(a, true).await;
    world.wait_serving(b, true).await;
    let b_before = world
        .proxy()
        .proxy()
        .current()
        .endpoints
        .iter()
        .find(|e| e.authority == format!("{b}:8443"))
        .cloned()
        .expect("b");

    // Load: two clients sending back to back until told to stop.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for _ in 0..2 {
        let (world, stop) = (world.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop.is_cancelled() {
                statuses.push(world.post("/inference", GUIDE_REQUEST, &[]).await.status);
            }
            statuses
        }));
    }
    // A subnet added (c) and one removed (a) between two refreshes.
    stand_in.set(|v| v.enis = vec![StandInEni::new(b, 2), StandInEni::new(c, 3)]);
    assert_eventually!(
        privatelink_addresses(&world),
        |addresses| *addresses == authorities(&[b, c]),
        "the ENI change was never applied"
    );
    world.wait_serving(c, true).await;
    let served_by_c = world.requests_at(c);
    assert_eventually!(
        world.requests_at(c),
        |n| *n > served_by_c + 5,
        "the new ENI never got traffic"
    );
    stop.cancel();
    let mut statuses = Vec::new();
    for task in load {
        statuses.extend(task.await.expect("load task"));
    }
    assert!(statuses.len() > 10, "the load ran: {}", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request under the change succeeded: {:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    // The unchanged ENI kept its endpoint: health state and pool.
    let generation = world.proxy().proxy().current();
    let b_after = generation
        .endpoints
        .iter()
        .find(|e| e.authority == format!("{b}:8443"))
        .expect("b");
    assert!(std::sync::Arc::ptr_eq(&b_before, b_after), "b was rebuilt");
    drop(generation);
    let world = std::sync::Arc::into_inner(world).expect("no load task holds the world");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_refresh_keeps_the_last_good_set_and_says_so() {
    let (stand_in, world) = discovering("available").await;
    let [a, b, c] = world.layout.enis();
    let ok = discovery_status(&world).await;
    assert_eq!(ok["condition"], "ok", "{ok}");
    assert_eq!(ok["source"], "ec2");
    assert_eq!(ok["target"], ENDPOINT_ID);
    assert_eq!(ok["state"], "available");
    assert_eq!(ok["addresses"], 3);

    stand_in.set(|v| v.failing = true);
    let failing = assert_eventually!(
        discovery_status(&world).await,
        |s| s["condition"] == "failing" && s["failures"].as_u64() >= Some(1),
        "the failed refresh never showed in /status"
    );
    let error = failing["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("Unavailable"), "{failing}");
    assert!(!error.contains("<Response>"), "no raw EC2 body: {failing}");
    assert_eq!(failing["addresses"], 3, "the last good count stays");
    assert_eq!(privatelink_addresses(&world), authorities(&[a, b, c]));
    for ip in [a, b, c] {
        world.wait_serving(ip, true).await;
    }
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    reply.assert_status(200);
    assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    let metrics = String::from_utf8_lossy(&world.admin("/metrics").await.body).into_owned();
    let failures = metrics
        .lines()
        .find(|l| {
            l.starts_with("gpulink_discovery_refresh_failures_total{")
                && l.contains("region=\"us-east-1\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "{metrics}");
    assert!(metrics.contains("gpulink_discovery_last_success_timestamp_seconds{"));

    // EC2 back: the next round succeeds and the condition clears.
    stand_in.set(|v| v.failing = false);
    assert_eventually!(
        discovery_status(&world).await,
        |s| s["condition"] == "ok",
        "the recovered refresh never showed in /status"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_acceptance_gives_no_traffic_until_available() {
    let (stand_in, world) = discovering("pendingAcceptance").await;
    let [a, b, c] = world.layout.enis();
    assert!(privatelink_addresses(&world).is_empty());
    let pending = discovery_status(&world).await;
    assert_eq!(pending["condition"], "not_available", "{pending}");
    assert_eq!(pending["state"], "pendingAcceptance");
    assert_eq!(pending["interfaces"], 3);
    let message = pending["message"].as_str().unwrap_or_default();
    assert!(message.contains("accept"), "{pending}");
    // The status page says it too.
    let page = String::from_utf8_lossy(&world.admin("/").await.body).into_owned();
    assert!(
        page.contains("data-discovery=\"not_available\"") && page.contains("pendingAcceptance"),
        "{page}"
    );
    for _ in 0..3 {
        let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
        assert_ne!(reply.header("x-gpulink-route"), Some("privatelink"));
    }
    assert_eq!(
        world.requests_to(&[a, b, c]),
        0,
        "nothing went to the ENIs of an endpoint that is not available"
    );

    // Approved: gpulink picks the endpoint up by itself.
    stand_in.set(|v| v.state = "available".into());
    assert_eventually!(
        privatelink_addresses(&world),
        |addresses| *addresses == authorities(&[a, b, c]),
        "the available endpoint's ENIs were never used"
    );
    for ip in [a, b, c] {
        world.wait_serving(ip, true).await;
    }
    let reply = world.post("/inference", GUIDE_REQUEST, &[]).await;
    reply.assert_status(200);
    assert_eq!(reply.header("x-gpulink-route"), Some("privatelink"));
    assert_eq!(discovery_status(&world).await["condition"], "ok");
    world.stop().await;
}

/// [`discover_cli`] for the endpoint `id` in us-east-1 with EC2 at `endpoint_url`, then
/// `extra` arguments.
async fn discover_in_us_east_1(
    id: &str,
    endpoint_url: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let mut args = vec![
        "--vpc-endpoint-id",
        id,
        "--region",
        "us-east-1",
        "--endpoint-url",
        endpoint_url,
    ];
    args.extend_from_slice(extra);
    discover_cli(&args).await
}

/// `gpulink discover` with `args`, the test's credentials and no EC2 endpoint from the
/// environment: (exit code, stdout, stderr).
async fn discover_cli(args: &[&str]) -> (i32, String, String) {
    discover_cli_with(args, &[]).await
}

/// [`discover_cli`] with `env` set on top.
async fn discover_cli_with(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_gpulink"))
        .arg("discover")
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_EC2")
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .envs(env.iter().copied())
        .output()
        .await
        .expect("gpulink runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn gpulink_discover_shows_moto_s_endpoint_and_a_block_that_compiles() {
    let moto = Moto::get().await;
    let created = create_endpoint(&moto).await;
    let (code, out, err) = discover_in_us_east_1(&created.id, &moto.url, &["--json"]).await;
    let usable = EndpointState::parse(&created.state).is_usable();
    assert_eq!(code, if usable { 0 } else { 1 }, "{out}{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(answer["vpc_endpoint_id"], created.id.as_str());
    assert_eq!(answer["service_name"], created.service.as_str());
    assert!(!created.dns_names.is_empty(), "moto gave no DNS names");
    assert_eq!(answer["dns_names"], serde_json::json!(created.dns_names));
    assert_eq!(answer["usable"], usable);
    let mut ips: Vec<&str> = answer["network_interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .map(|i| i["ip"].as_str().unwrap_or_default())
        .collect();
    ips.sort();
    let mut expected: Vec<&str> = created.enis.iter().map(|e| e.ip.as_str()).collect();
    expected.sort();
    assert_eq!(ips, expected);
    // The block, pasted into a configuration, is a region gpulink accepts.
    let block = answer["toml"].as_str().expect("toml");
    let config = format!(
        "[tenant]\nid = \"t\"\nmodel_pool = \"m\"\n[kms]\nkey_id = \"arn:aws:kms:us-east-1:111122223333:key/k\"\n\
         region = \"us-east-1\"\n[upstream]\nserver_name = \"gpu.internal\"\n{block}"
    );
    let config = gpulink::config::Config::from_toml(&config, std::path::Path::new("pasted.toml"))
        .expect("the pasted block compiles");
    assert_eq!(config.discovery[0].source.target(), created.id);

    // Text: the state, each ENI with its subnet and zone.
    let (code_text, text, _) = discover_in_us_east_1(&created.id, &moto.url, &[]).await;
    assert_eq!(code_text, code);
    assert!(
        text.contains(&format!("state:    {}", created.state)),
        "{text}"
    );
    for eni in &created.enis {
        assert!(
            text.contains(&eni.ip) && text.contains(&eni.subnet),
            "{text}"
        );
        assert!(text.contains(&eni.zone), "{text}");
    }
    assert!(text.contains("[[regions]]"), "{text}");
    for name in &created.dns_names {
        assert!(
            text.contains(name.as_str()),
            "DNS name {name} not shown: {text}"
        );
    }

    // An id EC2 does not know: 3; not an id at all, or no region: 2.
    let (code, _, err) = discover_in_us_east_1("vpce-0123456789abcdef0", &moto.url, &[]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) =
        discover_cli(&["--vpc-endpoint-id", "vpce-xyz", "--region", "us-east-1"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = discover_cli(&["--vpc-endpoint-id", &created.id]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--region"), "{err}");
}

#[tokio::test]
async fn gpulink_discover_exits_1_for_an_endpoint_waiting_for_acceptance() {
    let layout = Layout::new(next_block());
    let stand_in = Ec2StandIn::start(
        layout.ip(30, 1),
        "pendingAcceptance",
        vec![StandInEni::new(layout.enis()[0], 1)],
    )
    .await;
    let (code, out, err) = discover_in_us_east_1(ENDPOINT_ID, &stand_in.url, &[]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("state:    pendingAcceptance"), "{out}");
    assert!(
        out.contains("usable: no: the endpoint waits for the GPU cluster team"),
        "{out}"
    );
    assert!(out.contains("use1-az1"), "{out}");
    stand_in.set(|v| v.state = "available".into());
    let (code, out, _) = discover_in_us_east_1(ENDPOINT_ID, &stand_in.url, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("usable: yes"), "{out}");

    // No --endpoint-url: AWS_ENDPOINT_URL_EC2 says where EC2 is (issue 12's override).
    let asked = stand_in.count("DescribeVpcEndpoints");
    let (code, out, err) = discover_cli_with(
        &["--vpc-endpoint-id", ENDPOINT_ID, "--region", "us-east-1"],
        &[("AWS_ENDPOINT_URL_EC2", stand_in.url.as_str())],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("usable: yes"), "{out}");
    assert_eq!(stand_in.count("DescribeVpcEndpoints"), asked + 1);
}
