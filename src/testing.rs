//! What the library's unit tests share (compiled only for them): a configuration made of
//! the sections every file needs plus the test's own, and the endpoints it lists, built
//! but never contacted. One copy, so that a new required key is added in one place.

use std::path::Path;
use std::sync::Arc;

use crate::config::Config;
use crate::upstream::{build_endpoints_with_pools, Endpoint};

/// The sections every configuration needs besides `[[regions]]`: tenant `t` with model
/// pool `m`, a KMS key in us-east-1 sealing `kms-direct`, the cluster's TLS name
/// `gpu.internal`.
const REQUIRED: &str = r#"
[tenant]
id = "t"
model_pool = "m"
[kms]
key_id = "arn:aws:kms:us-east-1:111122223333:key/k"
region = "us-east-1"
format = "kms-direct"
[upstream]
server_name = "gpu.internal"
"#;

/// [`REQUIRED`] followed by `rest` (the regions and whatever else the test is about),
/// compiled.
pub(crate) fn config(rest: &str) -> Config {
    let text = format!("{REQUIRED}{rest}");
    Config::from_toml(&text, Path::new("t.toml")).expect("config")
}

/// The endpoints `config` lists, in its order, one pool each and none discovered.
pub(crate) fn endpoints(config: &Config) -> Vec<Arc<Endpoint>> {
    crate::tls::install_crypto_provider();
    build_endpoints_with_pools(
        &config.endpoints,
        &config.discovery,
        &config.upstream,
        &[],
        &Default::default(),
        1,
    )
    .expect("endpoints")
}
