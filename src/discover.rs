//! `gpulink discover --vpc-endpoint-id ID`: what EC2 says about a VPC endpoint (state,
//! service name, DNS names, and per network interface its IP, subnet and zone) and a
//! ready-to-paste `[[regions]]` block that makes gpulink discover it by itself. It runs
//! the same EC2 client the sidecar does ([`crate::ec2`]), with the same credentials, so
//! a success here means the sidecar's discovery will work from this host.
//!
//! Exit status: 0 the endpoint is usable (`available` with at least one network
//! interface); 1 it is not (another state, or no interfaces: the message says what to
//! do); 2 the arguments are wrong; 3 EC2 could not be asked (credentials, permissions,
//! network, unknown id).

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use crate::ec2::{Discovered, Ec2Client, Ec2Error};

#[derive(Debug, clap::Args)]
pub struct DiscoverArgs {
    /// The VPC endpoint's id (`vpce-...`, as `aws ec2 create-vpc-endpoint` printed it).
    #[arg(long)]
    pub vpc_endpoint_id: String,
    /// The endpoint's region; else AWS_REGION, else AWS_DEFAULT_REGION.
    #[arg(long)]
    pub region: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Send the EC2 calls here (else AWS_ENDPOINT_URL_EC2, AWS_ENDPOINT_URL, or the
    /// region's EC2); also written into the block as `ec2_endpoint_url`.
    #[arg(long)]
    pub endpoint_url: Option<String>,
    /// Deadline of each EC2 call, in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

/// Exit codes (also in the module documentation and the README).
pub const USABLE: u8 = 0;
pub const NOT_USABLE: u8 = 1;
pub const BAD_ARGUMENTS: u8 = 2;
pub const EC2_FAILED: u8 = 3;

/// `gpulink discover`.
pub async fn run(args: DiscoverArgs) -> ExitCode {
    crate::tls::install_crypto_provider();
    let region = args
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .filter(|r| !r.trim().is_empty());
    let Some(region) = region else {
        eprintln!("gpulink: give the endpoint's region: --region (or AWS_REGION)");
        return ExitCode::from(BAD_ARGUMENTS);
    };
    if !crate::config::valid_endpoint_id(&args.vpc_endpoint_id) {
        eprintln!(
            "gpulink: `{}` is not a VPC endpoint id (`vpce-` and 8 or 17 hex digits)",
            args.vpc_endpoint_id
        );
        return ExitCode::from(BAD_ARGUMENTS);
    }
    let timeout = Duration::from_secs(args.timeout.clamp(1, 120));
    let client = match Ec2Client::new(&region, args.endpoint_url.as_deref(), timeout).await {
        Ok(client) => client,
        Err(error) => return failed(&args, &error, BAD_ARGUMENTS),
    };
    let found = match client.discover(&args.vpc_endpoint_id).await {
        Ok(found) => found,
        Err(error) => return failed(&args, &error, EC2_FAILED),
    };
    let usable = is_usable(&found);
    let block = regions_block(&region, &found, args.endpoint_url.as_deref());
    if args.json {
        println!("{}", to_json(&region, &found, &block));
    } else {
        print!("{}", render_text(&region, &found, &block));
    }
    ExitCode::from(if usable { USABLE } else { NOT_USABLE })
}

fn failed(args: &DiscoverArgs, error: &Ec2Error, code: u8) -> ExitCode {
    if args.json {
        println!(
            "{}",
            json!({
                "vpc_endpoint_id": args.vpc_endpoint_id,
                "usable": false,
                "error": { "kind": error.kind(), "message": error.to_string() },
            })
        );
    }
    eprintln!("gpulink: {error}");
    ExitCode::from(code)
}

/// `available` with at least one network interface.
pub fn is_usable(found: &Discovered) -> bool {
    found.endpoint.state.is_usable() && !found.interfaces.is_empty()
}

/// Why the endpoint is not usable, when it is not.
fn problem(found: &Discovered) -> Option<&'static str> {
    found.endpoint.state.advice().or_else(|| {
        found.interfaces.is_empty().then_some(
            "the endpoint is available but has no network interfaces: add a subnet to it \
             (one per zone your workloads run in)",
        )
    })
}

/// The `[[regions]]` block that discovers this endpoint.
pub fn regions_block(region: &str, found: &Discovered, endpoint_url: Option<&str>) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut block = format!(
        "[[regions]]\nname = {}\nprivatelink_endpoint_id = {}\nprivatelink_port = 443        # the cluster's inference port on the ENIs\ndiscovery_refresh = \"5m\"\n",
        quote(region),
        quote(&found.endpoint.id)
    );
    if let Some(url) = endpoint_url {
        block.push_str(&format!("ec2_endpoint_url = {}\n", quote(url)));
    }
    block.push_str(
        "# The ENIs are addresses: set [upstream] server_name to the cluster certificate's name.\n",
    );
    block
}

pub fn render_text(region: &str, found: &Discovered, block: &str) -> String {
    let e = &found.endpoint;
    let mut out = format!(
        "VPC endpoint {} ({region})\n  state:    {}\n  service:  {}\n  type:     {}\n  vpc:      {}\n",
        e.id,
        e.state.as_str(),
        e.service_name,
        e.endpoint_type,
        e.vpc_id
    );
    out.push_str("  DNS names:\n");
    if e.dns_names.is_empty() {
        out.push_str("    (none)\n");
    }
    for name in &e.dns_names {
        out.push_str(&format!("    {name}\n"));
    }
    out.push_str(&format!(
        "  network interfaces ({}):\n",
        found.interfaces.len()
    ));
    for i in &found.interfaces {
        out.push_str(&format!(
            "    {:<15}  {:<24}  {} ({})  {}\n",
            i.private_ip.to_string(),
            i.subnet_id,
            i.zone_name.as_deref().unwrap_or("zone unknown"),
            i.zone_id.as_deref().unwrap_or("zone id unknown"),
            i.id
        ));
    }
    match problem(found) {
        None => out.push_str(&format!(
            "\nusable: yes. Put this in gpulink.toml instead of the region's `privatelink` list:\n\n{block}"
        )),
        Some(why) => out.push_str(&format!(
            "\nusable: no: {why}\n\nOnce it is usable, this block makes gpulink follow it (gpulink sends nothing to it before):\n\n{block}"
        )),
    }
    out
}

fn to_json(region: &str, found: &Discovered, block: &str) -> serde_json::Value {
    let e = &found.endpoint;
    json!({
        "region": region,
        "vpc_endpoint_id": e.id,
        "state": e.state.as_str(),
        "usable": is_usable(found),
        "message": problem(found),
        "service_name": e.service_name,
        "endpoint_type": e.endpoint_type,
        "vpc_id": e.vpc_id,
        "dns_names": e.dns_names,
        "network_interfaces": found.interfaces.iter().map(|i| json!({
            "id": i.id,
            "ip": i.private_ip.to_string(),
            "subnet_id": i.subnet_id,
            "zone_name": i.zone_name,
            "zone_id": i.zone_id,
            "status": i.status,
        })).collect::<Vec<_>>(),
        "toml": block,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ec2::{EndpointState, NetworkInterface, VpcEndpoint};

    fn found(state: EndpointState, interfaces: usize) -> Discovered {
        Discovered {
            endpoint: VpcEndpoint {
                id: "vpce-0abcd1234ef567890".into(),
                state,
                service_name: "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0".into(),
                endpoint_type: "Interface".into(),
                vpc_id: "vpc-1".into(),
                dns_names: vec!["vpce-x.example.com".into()],
                network_interface_ids: vec![],
                subnet_ids: vec![],
            },
            interfaces: (0..interfaces)
                .map(|n| NetworkInterface {
                    id: format!("eni-{n}"),
                    private_ip: std::net::IpAddr::from([10, 34, 10 + n as u8, 50]),
                    subnet_id: format!("subnet-{n}"),
                    zone_name: Some(format!("us-east-1{}", char::from(b'a' + n as u8))),
                    zone_id: Some(format!("use1-az{}", n + 1)),
                    status: "in-use".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_block_is_a_region_the_configuration_accepts() {
        let f = found(EndpointState::Available, 3);
        let block = regions_block("us-east-1", &f, Some("http://127.0.0.1:5000"));
        let value: toml::Table = toml::from_str(&block).unwrap();
        let region = &value["regions"].as_array().unwrap()[0];
        assert_eq!(
            region["privatelink_endpoint_id"].as_str(),
            Some("vpce-0abcd1234ef567890")
        );
        assert_eq!(
            region["ec2_endpoint_url"].as_str(),
            Some("http://127.0.0.1:5000")
        );
        let text = render_text("us-east-1", &f, &block);
        assert!(text.contains("usable: yes"), "{text}");
        assert!(text.contains("10.34.11.50"), "{text}");
        assert!(text.contains("us-east-1b (use1-az2)"), "{text}");
        assert!(is_usable(&f));
    }

    #[test]
    fn unusable_endpoints_say_why() {
        let pending = found(EndpointState::PendingAcceptance, 3);
        assert!(!is_usable(&pending));
        assert!(render_text("us-east-1", &pending, "").contains("usable: no: the endpoint waits"));
        let empty = found(EndpointState::Available, 0);
        assert!(!is_usable(&empty));
        assert_eq!(to_json("us-east-1", &empty, "")["usable"], false);
        assert!(problem(&empty).unwrap().contains("no network interfaces"));
    }
}
