//! `gpulink sim`: runs the simulator as its own process, opening bodies with real KMS
//! (or moto through `AWS_ENDPOINT_URL_KMS`). There is deliberately no development-key
//! option here: development keys live inside one process, so only the in-process
//! `gpulink demo` can use them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::{default_server_names, Sim, SimConfig, SimEndpointConfig, DEFAULT_CAPACITY};
use gpulink::seal::{KeyService, KmsKeys};

/// Options of `gpulink sim`.
#[derive(Clone, Debug, clap::Args)]
pub struct SimArgs {
    /// Directory where the simulator writes its CA certificate, `ca.pem`.
    #[arg(long, value_name = "DIR", default_value = "./sim-ca")]
    pub ca_dir: PathBuf,
    /// Address of the control API (loopback only).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9950")]
    pub control: SocketAddr,
    /// A simulated endpoint as IP=REGION[:privatelink|public] (repeatable). Default: the
    /// guide's layout, 127.0.10.50, 127.0.11.50, 127.0.12.50 in us-east-1, 127.0.13.50 in
    /// us-west-2, and a public endpoint 127.0.20.1 in us-east-1.
    #[arg(long = "endpoint", value_name = "IP=REGION[:KIND]", value_parser = parse_endpoint_spec)]
    pub endpoints: Vec<EndpointSpec>,
    /// TLS inference port of every endpoint.
    #[arg(long, value_name = "PORT", default_value_t = 8443)]
    pub tls_port: u16,
    /// Plain-HTTP health port of every endpoint.
    #[arg(long, value_name = "PORT", default_value_t = 8080)]
    pub health_port: u16,
    /// `available_capacity` each endpoint reports while not full.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CAPACITY)]
    pub capacity: u32,
    /// A DNS name for the certificate (repeatable). Default:
    /// gpu-cluster.yourcompany.internal and gpu-cluster.public.example.com.
    #[arg(long = "server-name", value_name = "NAME")]
    pub server_names: Vec<String>,
    /// KMS endpoint, e.g. moto's `http://127.0.0.1:5000`.
    #[arg(long, value_name = "URL", env = "AWS_ENDPOINT_URL_KMS")]
    pub kms_endpoint_url: Option<String>,
    /// KMS region.
    #[arg(long, value_name = "REGION", default_value = "us-east-1")]
    pub kms_region: String,
    /// Deadline for each KMS call, e.g. "3s".
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = gpulink::config::parse_duration)]
    pub kms_timeout: Duration,
    /// Count bodies without opening them (benchmarks: the simulator must not be the
    /// bottleneck). No KMS credentials are needed then.
    #[arg(long)]
    pub skip_open: bool,
    /// Print a gpulink configuration for the simulator these options describe (its
    /// `[[regions]]`, `ca_file`, health port and KMS lines) and exit without starting it.
    #[arg(long)]
    pub print_config: bool,
    /// The key ARN written into `--print-config`'s `kms.key_id` (the simulator itself
    /// opens bodies under whatever key they name).
    #[arg(long, value_name = "ARN", requires = "print_config")]
    pub key_id: Option<String>,
}

/// One `--endpoint` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub ip: IpAddr,
    pub region: String,
    pub kind: EndpointKind,
}

/// A label only: the simulator serves both kinds alike; the proxy's configuration
/// decides which tier an address belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointKind {
    PrivateLink,
    Public,
}

impl EndpointKind {
    fn name(self) -> &'static str {
        match self {
            EndpointKind::PrivateLink => "privatelink",
            EndpointKind::Public => "public",
        }
    }
}

/// Parses `IP=REGION[:privatelink|public]`.
pub fn parse_endpoint_spec(text: &str) -> Result<EndpointSpec, String> {
    let usage = "write IP=REGION[:privatelink|public], e.g. 127.0.10.50=us-east-1";
    let (ip, rest) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` has no `=`; {usage}"))?;
    let ip: IpAddr = ip
        .trim()
        .parse()
        .map_err(|_| format!("`{ip}` is not an IP address; {usage}"))?;
    let (region, kind) = match rest.split_once(':') {
        Some((region, kind)) => (region, kind),
        None => (rest, "privatelink"),
    };
    let region = region.trim();
    if region.is_empty() {
        return Err(format!("`{text}` has no region; {usage}"));
    }
    let kind = match kind.trim() {
        "privatelink" => EndpointKind::PrivateLink,
        "public" => EndpointKind::Public,
        other => return Err(format!("unknown endpoint kind `{other}`; {usage}")),
    };
    Ok(EndpointSpec {
        ip,
        region: region.to_string(),
        kind,
    })
}

impl SimArgs {
    /// The simulator configuration these options describe, with each endpoint's label.
    pub fn to_config(&self) -> (SimConfig, Vec<EndpointKind>) {
        let mut config = SimConfig::default_layout(self.ca_dir.clone());
        let mut kinds: Vec<EndpointKind> = config
            .endpoints
            .iter()
            .map(|e| {
                if e.ip == IpAddr::from([127, 0, 20, 1]) {
                    EndpointKind::Public
                } else {
                    EndpointKind::PrivateLink
                }
            })
            .collect();
        if !self.endpoints.is_empty() {
            config.endpoints = self
                .endpoints
                .iter()
                .map(|spec| SimEndpointConfig::new(spec.ip, &spec.region))
                .collect();
            kinds = self.endpoints.iter().map(|spec| spec.kind).collect();
        }
        for endpoint in &mut config.endpoints {
            endpoint.tls_port = self.tls_port;
            endpoint.health_port = self.health_port;
            endpoint.capacity = self.capacity;
        }
        config.server_names = if self.server_names.is_empty() {
            default_server_names()
        } else {
            self.server_names.clone()
        };
        config.control_addr = self.control;
        config.skip_open = self.skip_open;
        (config, kinds)
    }

    /// A configuration for `gpulink run` that reaches this simulator: its endpoints
    /// by region and tier, its CA (where `gpulink sim` writes it), its health port and
    /// the KMS endpoint it opens bodies with. Only the tenant and key are invented.
    pub fn proxy_config(&self) -> String {
        use std::fmt::Write as _;
        let (config, kinds) = self.to_config();
        let ca_dir = std::path::absolute(&self.ca_dir).unwrap_or_else(|_| self.ca_dir.clone());
        let ca_file = ca_dir.join(super::certs::CA_FILE_NAME);
        let server_name = &config.server_names[0];
        // The default certificate names a public name of its own; a chosen list serves
        // every endpoint with its first name.
        let public_name = if self.server_names.is_empty() {
            config.server_names.get(1).unwrap_or(server_name)
        } else {
            server_name
        };
        let key_id = self.key_id.clone().unwrap_or_else(|| {
            format!(
                "arn:aws:kms:{}:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                self.kms_region
            )
        });
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# gpulink configuration for the simulator that `gpulink sim` starts with the same\n\
             # options (written by `gpulink sim --print-config`). Start the simulator, then:\n\
             #   gpulink run --config THIS_FILE\n\
             # `gpulink check` warns about the example names the simulator's certificate uses.\n"
        );
        let _ = writeln!(
            out,
            "[tenant]\nid = \"tenant-sim\"\nmodel_pool = \"model-a\"\nmodel_pools = [\"model-a\", \"model-b\"]\n"
        );
        let _ = writeln!(out, "[kms]");
        if self.key_id.is_none() {
            let _ = writeln!(
                out,
                "# the example's placeholder: pass --key-id ARN (e.g. a key created in moto)"
            );
        }
        let _ = writeln!(out, "key_id = {}", toml_string(&key_id));
        let _ = writeln!(out, "region = {}", toml_string(&self.kms_region));
        if let Some(url) = &self.kms_endpoint_url {
            let _ = writeln!(out, "endpoint_url = {}", toml_string(url));
        }
        let _ = writeln!(
            out,
            "\n[upstream]\nserver_name = {}\nca_file = {}\n",
            toml_string(server_name),
            toml_string(&ca_file.display().to_string())
        );
        let _ = writeln!(out, "[health]\nport = {}\n", self.health_port);
        let mut regions: Vec<&str> = Vec::new();
        for endpoint in &config.endpoints {
            if !regions.contains(&endpoint.region.as_str()) {
                regions.push(&endpoint.region);
            }
        }
        for region in regions {
            let mut privatelink = Vec::new();
            let mut public = Vec::new();
            for (endpoint, kind) in config.endpoints.iter().zip(&kinds) {
                if endpoint.region != region {
                    continue;
                }
                let address = toml_string(&endpoint.tls_addr().to_string());
                match kind {
                    EndpointKind::PrivateLink => privatelink.push(address),
                    EndpointKind::Public => public.push(format!(
                        "{{ address = {address}, server_name = {} }}",
                        toml_string(public_name)
                    )),
                }
            }
            let _ = writeln!(out, "[[regions]]\nname = {}", toml_string(region));
            let _ = writeln!(out, "privatelink = [{}]", privatelink.join(", "));
            if !public.is_empty() {
                let _ = writeln!(out, "public = [{}]", public.join(", "));
            }
            let _ = writeln!(out);
        }
        out
    }
}

/// A TOML basic string (quotes and backslashes escaped).
fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Runs `gpulink sim` until Ctrl-C or SIGTERM (`--print-config`: prints and returns).
pub async fn run_cli(args: SimArgs) -> anyhow::Result<()> {
    if args.print_config {
        use std::io::Write as _;
        std::io::stdout()
            .write_all(args.proxy_config().as_bytes())
            .context("cannot write the configuration to stdout")?;
        return Ok(());
    }
    gpulink::tls::install_crypto_provider();
    let (config, kinds) = args.to_config();
    let kms = KmsKeys::new(
        &args.kms_region,
        args.kms_endpoint_url.as_deref(),
        args.kms_timeout,
    )
    .await;
    let keys = KeyService::Kms(kms);
    if !args.skip_open {
        keys.check_credentials().await.context(
            "the simulator opens bodies with KMS and needs AWS credentials (or pass --skip-open)",
        )?;
    }
    let sim = Sim::start(config.clone(), keys)
        .await
        .context("cannot start the cluster simulator")?;

    for (endpoint, kind) in config.endpoints.iter().zip(kinds) {
        println!(
            "endpoint {ip} region={region} kind={kind} inference=https://{tls} health=http://{health}/health capacity={capacity}",
            ip = endpoint.ip,
            region = endpoint.region,
            kind = kind.name(),
            tls = endpoint.tls_addr(),
            health = endpoint.health_addr(),
            capacity = endpoint.capacity,
        );
    }
    let ca_file = std::fs::canonicalize(sim.ca_file()).unwrap_or_else(|_| sim.ca_file());
    println!("ca_file {}", ca_file.display());
    println!("control http://{}", sim.control_addr());

    wait_for_signal().await?;
    sim.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("cannot listen for Ctrl-C")?,
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_specs() {
        let spec = parse_endpoint_spec("127.0.10.50=us-east-1").unwrap();
        assert_eq!(spec.ip, IpAddr::from([127, 0, 10, 50]));
        assert_eq!(spec.region, "us-east-1");
        assert_eq!(spec.kind, EndpointKind::PrivateLink);
        let spec = parse_endpoint_spec("127.0.20.1=us-east-1:public").unwrap();
        assert_eq!(spec.kind, EndpointKind::Public);
        assert!(parse_endpoint_spec("127.0.20.1").is_err());
        assert!(parse_endpoint_spec("nope=us-east-1").is_err());
        assert!(parse_endpoint_spec("127.0.20.1=").is_err());
        assert!(parse_endpoint_spec("127.0.20.1=us-east-1:other").is_err());
    }

    #[test]
    fn args_build_a_config() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            sim: SimArgs,
        }
        let cli = Cli::try_parse_from([
            "sim",
            "--endpoint",
            "127.0.10.50=us-east-1",
            "--endpoint",
            "127.0.20.1=us-east-1:public",
            "--tls-port",
            "9443",
            "--skip-open",
        ])
        .unwrap();
        let (config, kinds) = cli.sim.to_config();
        assert_eq!(config.endpoints.len(), 2);
        assert_eq!(config.endpoints[1].tls_port, 9443);
        assert_eq!(kinds, vec![EndpointKind::PrivateLink, EndpointKind::Public]);
        assert!(config.skip_open);
        assert_eq!(config.control_addr, "127.0.0.1:9950".parse().unwrap());

        let cli = Cli::try_parse_from(["sim"]).unwrap();
        let (config, kinds) = cli.sim.to_config();
        assert_eq!(config.endpoints.len(), 5);
        assert_eq!(
            kinds.iter().filter(|k| **k == EndpointKind::Public).count(),
            1
        );
    }

    #[test]
    fn print_config_describes_the_simulator_it_would_start() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            sim: SimArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let cli = Cli::try_parse_from([
            "sim",
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--endpoint",
            "127.240.10.50=us-east-1",
            "--endpoint",
            "127.240.13.50=us-west-2",
            "--endpoint",
            "127.240.20.1=us-east-1:public",
            "--tls-port",
            "9443",
            "--health-port",
            "9080",
            "--kms-endpoint-url",
            "http://127.240.0.9:5000",
            "--print-config",
            "--key-id",
            "arn:aws:kms:us-east-1:123456789012:key/abc",
        ])
        .unwrap();
        let text = cli.sim.proxy_config();
        // The CA the simulator writes when it starts.
        std::fs::create_dir_all(&ca_dir).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        std::fs::write(ca_dir.join("ca.pem"), cert.cert.pem()).unwrap();
        let config = gpulink::config::Config::from_toml(&text, std::path::Path::new("sim.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.health.port, 9080);
        assert_eq!(
            config.kms.endpoint_url.as_deref(),
            Some("http://127.240.0.9:5000")
        );
        assert_eq!(
            config.kms.key_id,
            "arn:aws:kms:us-east-1:123456789012:key/abc"
        );
        assert!(config.upstream.ca_file.as_ref().unwrap().is_absolute());
        let endpoints = &config.endpoints;
        let described: Vec<(String, String, gpulink::config::RouteKind)> = endpoints
            .iter()
            .map(|e| (e.region.clone(), e.authority(), e.kind))
            .collect();
        use gpulink::config::RouteKind::{Privatelink, Public};
        assert_eq!(
            described,
            vec![
                ("us-east-1".into(), "127.240.10.50:9443".into(), Privatelink),
                ("us-east-1".into(), "127.240.20.1:9443".into(), Public),
                ("us-west-2".into(), "127.240.13.50:9443".into(), Privatelink),
            ]
        );
        assert_eq!(endpoints[1].server_name, "gpu-cluster.public.example.com");
        assert_eq!(config.local_region(), "us-east-1");
    }
}
