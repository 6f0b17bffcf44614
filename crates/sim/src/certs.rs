//! The simulator's PKI: a throw-away CA and one leaf certificate that every endpoint
//! serves, made fresh at each start. The CA is written to disk so that the proxy under
//! test can trust it through `upstream.ca_file`, exactly as a tenant would trust the
//! cluster's private CA. Nothing here is meant for production use.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::SimError;

/// The file name of the CA certificate inside `SimConfig::ca_dir`.
pub const CA_FILE_NAME: &str = "ca.pem";

/// PEM material for the TLS servers, plus where the CA was written.
pub(crate) struct Pki {
    pub ca_file: PathBuf,
    pub leaf_pem: String,
    pub leaf_key_pem: String,
}

/// Generates the CA and the leaf (SANs: every server name and every endpoint IP, so the
/// proxy may verify either a DNS name or the dialled address) and writes `ca.pem`.
pub(crate) fn generate(
    ca_dir: &Path,
    server_names: &[String],
    ips: &[IpAddr],
) -> Result<Pki, SimError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "gpulink cluster simulator CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(server_names.to_vec())?;
    leaf_params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    leaf_params.distinguished_name.push(
        DnType::CommonName,
        server_names
            .first()
            .map(String::as_str)
            .unwrap_or("gpulink-sim"),
    );
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params.use_authority_key_identifier_extension = true;
    let leaf = leaf_params.signed_by(&leaf_key, &ca_cert, &ca_key)?;

    let ca_file = write_ca(ca_dir, &ca_cert.pem())?;
    Ok(Pki {
        ca_file,
        leaf_pem: leaf.pem(),
        leaf_key_pem: leaf_key.serialize_pem(),
    })
}

/// Writes through a temporary file and a rename, so that a proxy reading the CA while a
/// simulator restarts sees the old file or the new one, never half of one.
fn write_ca(ca_dir: &Path, pem: &str) -> Result<PathBuf, SimError> {
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| SimError::CaFile { path, source }
    };
    std::fs::create_dir_all(ca_dir).map_err(io_error(ca_dir))?;
    let final_path = ca_dir.join(CA_FILE_NAME);
    let temp_path = ca_dir.join(format!(".{CA_FILE_NAME}.{}.tmp", std::process::id()));
    std::fs::write(&temp_path, pem).map_err(io_error(&temp_path))?;
    std::fs::rename(&temp_path, &final_path).map_err(io_error(&final_path))?;
    Ok(final_path)
}
