//! The configuration file: the TOML schema of `docs/design.md` with its defaults, parsed
//! with unknown keys rejected (`raw.rs`) and compiled once into the typed [`Config`]
//! (`compile.rs`), whose messages name every offending key at once.
//!
//! Everything downstream takes a compiled [`Config`], or just its own section of it;
//! nothing else reads the file.

mod bounds;
mod compile;
mod endpoints;
mod file;
mod key;
mod raw;
mod sections;
mod units;
mod zone;

use std::path::{Path, PathBuf};

pub use endpoints::{
    split_host_port, valid_endpoint_id, Discovery, DiscoverySource, EndpointConfig, Found,
    RouteKind,
};
pub use file::{read_regular_file, sandbox_hint, MAX_CA_FILE, MAX_CONFIG_FILE};
pub use key::{check_key_arn, KeyArn, KeyId};
pub use sections::{
    Admin, ContextMode, Health, KeyCache, Kms, Listen, Log, LogFormat, Migration, Outlier, Phase,
    Placement, Retry, Rollback, Runtime, SealFormat, Tenant, Upstream,
};
pub use units::{parse_duration, parse_size, ByteSize, HumanDuration};
pub use zone::{Zone, MAX_ZONE_LEN};

/// The exit code `gpulink check` uses for an invalid configuration (sysexits EX_CONFIG).
pub const EX_CONFIG: i32 = 78;

/// How long reading the configuration file (and the CA files it names) may take.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// KMS refuses `Encrypt` plaintext over this many bytes.
pub const KMS_DIRECT_MAX_PLAINTEXT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: invalid `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// Several keys are invalid: all are reported at once, one per line.
    #[error("{path}: {} invalid values:{}", problems.len(), list_problems(problems))]
    InvalidMany {
        path: PathBuf,
        problems: Vec<(String, String)>,
    },
}

fn list_problems(problems: &[(String, String)]) -> String {
    problems
        .iter()
        .map(|(key, message)| format!("\n  invalid `{key}`: {message}"))
        .collect()
}

/// A compiled configuration: every value checked, every default applied.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub admin: Admin,
    pub log: Log,
    pub runtime: Runtime,
    pub tenant: Tenant,
    pub kms: Kms,
    pub upstream: Upstream,
    pub health: Health,
    pub outlier: Outlier,
    pub retry: Retry,
    /// The region names in configuration order; the first is the local one.
    pub regions: Vec<String>,
    /// Every listed endpoint with its defaults, in configuration order (the order the
    /// tiers rely on).
    pub endpoints: Vec<EndpointConfig>,
    /// The regions whose PrivateLink ENIs are found at run time (DNS or EC2).
    pub discovery: Vec<Discovery>,
    pub migration: Migration,
    pub rollback: Option<Rollback>,
    /// Where this host runs, as far as the file says (zone-aware routing).
    pub placement: Placement,
}

impl Config {
    /// Reads, parses and compiles a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = Self::read(path)?;
        Self::from_toml(&text, path)
    }

    /// As [`Config::load`], off the async workers (a reload must never stall requests
    /// or `/live` on a slow file system) and bounded by [`READ_TIMEOUT`]: a read that
    /// does not finish is a rejected reload, never a hang.
    pub async fn load_off_thread(path: &Path) -> Result<Config, ConfigError> {
        let owned = path.to_owned();
        let read = tokio::task::spawn_blocking(move || Config::load(&owned));
        match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Err(ConfigError::Read {
                path: path.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("not read within {READ_TIMEOUT:?}"),
                ),
            }),
        }
    }

    /// The file's text, read only when it is a regular UTF-8 file of at most
    /// [`MAX_CONFIG_FILE`] bytes (see [`read_regular_file`]).
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let bytes = read_regular_file(path, MAX_CONFIG_FILE).map_err(read_error)?;
        String::from_utf8(bytes).map_err(|_| {
            read_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not UTF-8 text",
            ))
        })
    }

    /// The listeners bound outside loopback, by key: other hosts can reach them, and the
    /// app listener takes plaintext JSON, so the proxy warns about each at start.
    pub fn exposed_listeners(&self) -> Vec<(&'static str, std::net::SocketAddr)> {
        [
            ("listen.address", self.listen.address),
            ("admin.address", self.admin.address),
        ]
        .into_iter()
        .filter(|(_, address)| !address.ip().is_loopback())
        .collect()
    }

    /// Parses and compiles configuration text; `path` only labels messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(&e),
        })?;
        compile::compile(raw).map_err(|mut problems| {
            if problems.len() == 1 {
                let (key, message) = problems.remove(0);
                ConfigError::Invalid {
                    path: path.to_owned(),
                    key,
                    message,
                }
            } else {
                ConfigError::InvalidMany {
                    path: path.to_owned(),
                    problems,
                }
            }
        })
    }

    /// The first region is the local one.
    pub fn local_region(&self) -> &str {
        self.regions.first().map(String::as_str).unwrap_or("")
    }
}

/// toml's messages carry a snippet with line and column; keep them, they point at the key.
fn describe_toml_error(e: &toml::de::Error) -> String {
    e.to_string().trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    const MINIMAL: &str = r#"
        [tenant]
        id = "tenant-123"
        model_pool = "model-a"
        [kms]
        key_id = "arn:aws:kms:us-east-1:111122223333:key/k"
        region = "us-east-1"
        [upstream]
        server_name = "gpu.internal"
        [[regions]]
        name = "us-east-1"
        privatelink = ["10.34.10.50", "10.34.11.50:8443", { address = "10.34.12.50", server_name = "eni.internal", health_port = 9090 }]
        public = ["gpu.us-east-1.example.com"]
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen.address.to_string(), "127.0.0.1:8000");
        assert_eq!(c.admin.address.to_string(), "127.0.0.1:9901");
        assert_eq!(c.listen.max_body.bytes(), 10_000_000);
        assert_eq!(c.tenant.model_pools, vec!["model-a".to_string()]);
        assert_eq!(c.migration.phase, Phase::Privatelink);
        assert_eq!(c.kms.format, SealFormat::Auto);
        let eps = &c.endpoints;
        assert_eq!(eps.len(), 4);
        assert_eq!(eps[0].port, 443);
        assert_eq!(eps[0].server_name, "gpu.internal");
        assert_eq!(eps[0].health_port, 8080);
        assert_eq!(eps[1].port, 8443);
        assert_eq!(eps[2].server_name, "eni.internal");
        assert_eq!(eps[2].health_port, 9090);
        assert_eq!(eps[3].kind, RouteKind::Public);
        assert_eq!(eps[3].server_name, "gpu.us-east-1.example.com");
        assert!(c.exposed_listeners().is_empty());
    }

    #[test]
    fn listeners_outside_loopback_are_named() {
        let text = MINIMAL.replacen(
            "[tenant]",
            "[listen]\naddress = \"0.0.0.0:8000\"\n[admin]\naddress = \"[::1]:9901\"\n[tenant]",
            1,
        );
        let c = parse(&text).unwrap();
        let exposed = c.exposed_listeners();
        assert_eq!(exposed.len(), 1, "{exposed:?}");
        assert_eq!(exposed[0].0, "listen.address");
        assert_eq!(exposed[0].1.to_string(), "0.0.0.0:8000");
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("[upstream]", "[upstream]\nconect_timeout = \"2s\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("conect_timeout"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let text = MINIMAL.replace(
            "[upstream]",
            "[upstream]\nconnect_timeout = \"2 fortnights\"",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("connect_timeout"), "{err}");
    }

    #[test]
    fn ip_endpoint_needs_a_server_name() {
        let text = MINIMAL.replace("server_name = \"gpu.internal\"", "");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("regions[0].privatelink[0]"), "{err}");
    }

    #[test]
    fn default_pool_must_be_allowed() {
        let text = MINIMAL.replace(
            "model_pool = \"model-a\"",
            "model_pool = \"model-a\"\nmodel_pools = [\"model-b\"]",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("tenant.model_pools"), "{err}");
    }

    #[test]
    fn envelope_formats_need_a_key_arn_in_the_kms_region() {
        // MINIMAL uses the default format, auto, with an ARN: valid.
        assert_eq!(parse(MINIMAL).unwrap().kms.format, SealFormat::Auto);
        for (key_id, format, why) in [
            ("alias/gpulink", "auto", "not a KMS key ARN"),
            (
                "1234abcd-12ab-34cd-56ef-1234567890ab",
                "aws-esdk",
                "not a KMS key ARN",
            ),
            (
                "arn:aws:kms:us-east-1:111122223333:alias/gpulink",
                "aws-esdk",
                "not a KMS key ARN",
            ),
            (
                "arn:aws:kms:us-east-1:1111:key/k",
                "auto",
                "not a KMS key ARN",
            ),
            (
                "arn:aws:kms:eu-west-1:111122223333:key/k",
                "auto",
                "eu-west-1",
            ),
        ] {
            let text = MINIMAL
                .replace("arn:aws:kms:us-east-1:111122223333:key/k", key_id)
                .replace(
                    "region = \"us-east-1\"\n",
                    &format!("region = \"us-east-1\"\nformat = \"{format}\"\n"),
                );
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.contains("kms.key_id") && err.contains(why),
                "{key_id}: {err}"
            );
            assert!(err.contains("describe-key"), "{err}");
        }
        // kms-direct accepts an alias: KMS Encrypt resolves it.
        let text = MINIMAL
            .replace("arn:aws:kms:us-east-1:111122223333:key/k", "alias/gpulink")
            .replace(
                "region = \"us-east-1\"\n",
                "region = \"us-east-1\"\nformat = \"kms-direct\"\n",
            );
        parse(&text).unwrap();
        // Other partitions and multi-Region keys are ARNs too.
        assert!(check_key_arn(
            "arn:aws-cn:kms:cn-north-1:111122223333:key/mrk-1a2b",
            "cn-north-1"
        )
        .is_ok());
    }

    #[test]
    fn cache_limits_must_be_positive() {
        for (line, key) in [
            ("max_age = \"0s\"", "kms.cache.max_age"),
            ("max_messages = 0", "kms.cache.max_messages"),
            ("max_bytes = \"0B\"", "kms.cache.max_bytes"),
        ] {
            let text = MINIMAL.replace("[upstream]", &format!("[kms.cache]\n{line}\n[upstream]"));
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = MINIMAL
            .replace("id = \"tenant-123\"", "id = \" \"")
            .replace(
                "region = \"us-east-1\"\n",
                "region = \"us-east-1\"\nendpoint_url = \"kms.local\"\n",
            )
            .replace("server_name = \"gpu.internal\"", "max_body = 0")
            .replace("[[regions]]", "[health]\npath = \"health\"\n[[regions]]");
        let err = parse(&text).unwrap_err();
        let ConfigError::InvalidMany { problems, .. } = &err else {
            panic!("several problems expected: {err}");
        };
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        for key in [
            "upstream.max_body",
            "tenant.id",
            "kms.endpoint_url",
            "health.path",
            "regions[0].privatelink[0]",
            "regions[0].privatelink[1]",
        ] {
            assert!(keys.contains(&key), "{key} missing: {err}");
        }
        // A broken entry is the problem, not the phase it would leave unsatisfied.
        assert!(!keys.contains(&"migration.phase"), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("invalid `tenant.id`: must not be empty"),
            "{message}"
        );
    }

    #[test]
    fn endpoints_and_discovery_are_compiled_once() {
        let text = MINIMAL.replace(
            "public = [\"gpu.us-east-1.example.com\"]",
            "public = [\"gpu.us-east-1.example.com\"]\n[[regions]]\nname = \"us-west-2\"\nprivatelink_dns = \"vpce-1.example.com:8443\"\ndns_refresh = \"10s\"",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.regions, ["us-east-1", "us-west-2"]);
        assert_eq!(c.local_region(), "us-east-1");
        assert_eq!(c.endpoints.len(), 4);
        let [dns] = &c.discovery[..] else {
            panic!("one discovery: {:?}", c.discovery);
        };
        assert_eq!(
            (dns.region.as_str(), dns.source.target(), dns.port),
            ("us-west-2", "vpce-1.example.com", 8443)
        );
        assert_eq!(dns.source.kind(), "dns");
        assert_eq!(dns.server_name, "gpu.internal");
        assert_eq!(dns.refresh, std::time::Duration::from_secs(10));
        let arn = c.kms.key_id.arn().expect("the key is an ARN");
        assert_eq!(arn.region(), "us-east-1");
    }

    #[test]
    fn zones_of_the_host_and_of_privatelink_entries_are_checked_and_kept() {
        let text = MINIMAL
            .replace(
                "\"10.34.11.50:8443\"",
                "{ address = \"10.34.11.50:8443\", zone = \"use1-az2\" }",
            )
            .replace("[upstream]", "[placement]\nzone = \"use1-az1\"\n[upstream]");
        let c = parse(&text).unwrap();
        assert_eq!(c.placement.zone, Some(Zone::new("use1-az1").unwrap()));
        let zones: Vec<Option<&str>> = c
            .endpoints
            .iter()
            .map(|e| e.zone.as_ref().map(Zone::as_str))
            .collect();
        assert_eq!(zones, [None, Some("use1-az2"), None, None]);
        // Unset: no zone, nothing learned yet.
        assert_eq!(parse(MINIMAL).unwrap().placement.zone, None);
    }

    #[test]
    fn bad_zones_are_named_by_key_all_at_once() {
        let text = MINIMAL
            .replace(
                "\"10.34.11.50:8443\"",
                "{ address = \"10.34.11.50:8443\", zone = \"use1 az2\" }",
            )
            .replace(
                "public = [\"gpu.us-east-1.example.com\"]",
                "public = [{ address = \"gpu.us-east-1.example.com\", zone = \"use1-az1\" }]",
            )
            .replace("[upstream]", "[placement]\nzone = \"\"\n[upstream]");
        let err = parse(&text).unwrap_err();
        let ConfigError::InvalidMany { problems, .. } = &err else {
            panic!("several problems expected: {err}");
        };
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "placement.zone",
                "regions[0].privatelink[1].zone",
                "regions[0].public[0].zone"
            ],
            "{err}"
        );
        let message = err.to_string();
        assert!(message.contains("privatelink` entries only"), "{message}");
        assert!(message.contains("use1-az1"), "{message}");
        // An unknown key in [placement] is an error like anywhere else.
        let text = MINIMAL.replace("[upstream]", "[placement]\nzones = \"a\"\n[upstream]");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("zones"), "{err}");
    }

    #[test]
    fn a_vpc_endpoint_id_compiles_to_ec2_discovery() {
        let region = "[[regions]]\nname = \"us-west-2\"\nprivatelink_endpoint_id = \"vpce-0abcd1234ef567890\"\n";
        let text = format!("{MINIMAL}{region}privatelink_port = 8443\ndiscovery_refresh = \"1m\"\nec2_endpoint_url = \"http://127.0.0.1:5000\"\n");
        let c = parse(&text).unwrap();
        let [d] = &c.discovery[..] else {
            panic!("one discovery: {:?}", c.discovery);
        };
        assert_eq!(
            d.source,
            DiscoverySource::Ec2 {
                endpoint_id: "vpce-0abcd1234ef567890".into(),
                endpoint_url: Some("http://127.0.0.1:5000".into()),
            }
        );
        assert_eq!((d.port, d.server_name.as_str()), (8443, "gpu.internal"));
        assert_eq!(d.refresh, std::time::Duration::from_secs(60));
        // The defaults: port 443, every 5 minutes, EC2 from the environment or the region.
        let c = parse(&format!("{MINIMAL}{region}")).unwrap();
        assert_eq!(
            (c.discovery[0].port, c.discovery[0].refresh.as_secs()),
            (443, 300)
        );
    }

    #[test]
    fn a_vpc_endpoint_id_is_checked_with_its_keys() {
        let bad = format!(
            "{MINIMAL}[[regions]]\nname = \"us-west-2\"\nprivatelink_endpoint_id = \"vpce-0abcd1234efgh5678\"\n\
             privatelink = [\"10.0.0.1\"]\nprivatelink_port = 0\ndiscovery_refresh = \"0s\"\n\
             ec2_endpoint_url = \"ftp://x\"\n[[regions]]\nname = \"eu-west-1\"\nprivatelink_port = 8443\n"
        );
        let err = parse(&bad).unwrap_err().to_string();
        for needle in [
            "regions[1].privatelink_endpoint_id`: give one of",
            "regions[1].privatelink_port`: 0 is out of range",
            "regions[1].discovery_refresh",
            "regions[1].ec2_endpoint_url",
            "regions[2].privatelink_port`: only applies with `privatelink_endpoint_id`",
        ] {
            assert!(err.contains(needle), "{needle} in {err}");
        }
        // The guide's example id is not hex: refused with the form to use.
        let guide_id = format!(
            "{MINIMAL}[[regions]]\nname = \"us-west-2\"\nprivatelink_endpoint_id = \"vpce-0abcd1234efgh5678\"\n"
        );
        let err = parse(&guide_id).unwrap_err().to_string();
        assert!(err.contains("is not a VPC endpoint id"), "{err}");
        let no_name = format!(
            "{}[[regions]]\nname = \"us-west-2\"\nprivatelink_endpoint_id = \"vpce-0abcd1234ef567890\"\n",
            MINIMAL
                .replace("server_name = \"gpu.internal\"", "")
                .replace(", { address = \"10.34.12.50\", server_name = \"eni.internal\", health_port = 9090 }", "")
                .replace("\"10.34.10.50\", \"10.34.11.50:8443\"", "\"eni.example.com\"")
        );
        let err = parse(&no_name).unwrap_err().to_string();
        assert!(err.contains("set `upstream.server_name`"), "{err}");
        assert!(valid_endpoint_id("vpce-0123abcd"));
        assert!(!valid_endpoint_id("vpce-0123ABCD"));
        assert!(!valid_endpoint_id("vpc-0123abcd"));
    }

    #[test]
    fn a_listed_endpoint_appears_once() {
        let text = MINIMAL.replace("\"10.34.11.50:8443\"", "\"10.34.10.50:443\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("`regions`") && err.contains("endpoint `10.34.10.50:443` is listed twice"),
            "{err}"
        );
    }

    /// The values docs/design.md gives in `key`'s range column, in the section `heading`.
    fn documented_values(heading: &str, key: &str) -> Vec<String> {
        let design = include_str!("../../docs/design.md");
        let section = &design[design.find(heading).expect(heading)..];
        let row = section
            .lines()
            .find(|l| l.starts_with(&format!("| `{key}` |")))
            .unwrap_or_else(|| panic!("{heading} documents {key}"));
        let range = row.split('|').nth(3).expect("a range column");
        range
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn each_enumerated_key_has_one_list_of_names_and_the_contract_gives_it() {
        let names = |all: &[&str]| all.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            documented_values("### `[migration]`", "phase"),
            names(&Phase::ALL.map(Phase::as_str))
        );
        assert_eq!(
            documented_values("### `[kms]`", "format"),
            names(&SealFormat::ALL.map(SealFormat::as_str))
        );
        assert_eq!(
            documented_values("### `[kms]`", "context"),
            names(&ContextMode::ALL.map(ContextMode::as_str))
        );
        // The name each one has in the file is its `as_str`.
        for phase in Phase::ALL {
            let m: Migration = toml::from_str(&format!("phase = \"{}\"", phase.as_str())).unwrap();
            assert_eq!(m.phase, phase);
        }
        #[derive(Deserialize)]
        struct K {
            format: SealFormat,
            context: ContextMode,
        }
        for (format, context) in SealFormat::ALL
            .into_iter()
            .zip(ContextMode::ALL.into_iter().cycle())
        {
            let k: K = toml::from_str(&format!(
                "format = \"{}\"\ncontext = \"{}\"",
                format.as_str(),
                context.as_str()
            ))
            .unwrap();
            assert_eq!((k.format, k.context), (format, context));
        }
    }

    #[test]
    fn host_port_split() {
        assert_eq!(
            split_host_port("10.0.0.1").unwrap(),
            ("10.0.0.1".into(), 443)
        );
        assert_eq!(
            split_host_port("10.0.0.1:8443").unwrap(),
            ("10.0.0.1".into(), 8443)
        );
        assert_eq!(split_host_port("[::1]:8443").unwrap(), ("::1".into(), 8443));
        assert_eq!(
            split_host_port("a.example.com").unwrap(),
            ("a.example.com".into(), 443)
        );
        assert!(split_host_port("https://a.example.com").is_err());
        assert!(split_host_port("a:b").is_err());
    }
}
