//! Where data keys and ciphertexts come from: AWS KMS in production, or an in-process
//! development key provider that stands in for KMS in `gpulink demo` (and that
//! `gpulink run` refuses).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_sdk_kms::primitives::Blob;

/// The encryption context, serialised by KMS in key order.
pub type EncryptionContext = BTreeMap<String, String>;

/// Why a key operation failed. Messages never contain key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("KMS call timed out after {0:?}")]
    Timeout(Duration),
    #[error("KMS {operation} failed: {message}")]
    Kms {
        operation: &'static str,
        message: String,
    },
    #[error(
        "the ciphertext could not be opened (wrong key, wrong encryption context or tampered)"
    )]
    Open,
    #[error("cannot resolve AWS credentials for KMS: {0}")]
    Credentials(String),
}

/// The result of sealing with the key service directly.
#[derive(Debug)]
pub struct Encrypted {
    pub ciphertext: Vec<u8>,
    /// The key's ARN as the key service reports it.
    pub key_arn: String,
}

/// A key service: AWS KMS or the development stand-in.
#[derive(Clone)]
pub enum KeyService {
    Kms(KmsKeys),
    Dev(Arc<DevKeys>),
}

impl KeyService {
    pub fn is_development(&self) -> bool {
        matches!(self, KeyService::Dev(_))
    }

    /// KMS `Encrypt`: seals up to 4096 bytes under `key_id` bound to `context`.
    pub async fn encrypt(
        &self,
        key_id: &str,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Encrypted, KeyError> {
        match self {
            KeyService::Kms(kms) => kms.encrypt(key_id, plaintext, context).await,
            KeyService::Dev(dev) => dev.encrypt(plaintext, context),
        }
    }

    /// KMS `Decrypt`: opens a ciphertext made by [`KeyService::encrypt`] with the same context.
    pub async fn decrypt(
        &self,
        ciphertext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, KeyError> {
        match self {
            KeyService::Kms(kms) => kms.decrypt(ciphertext, context).await,
            KeyService::Dev(dev) => dev.decrypt(ciphertext, context),
        }
    }

    /// Resolves credentials once so that a missing credential shows at start, not on the
    /// first request.
    pub async fn check_credentials(&self) -> Result<(), KeyError> {
        match self {
            KeyService::Kms(kms) => kms.check_credentials().await,
            KeyService::Dev(_) => Ok(()),
        }
    }
}

/// AWS KMS through the official SDK, with a deadline on every call.
#[derive(Clone)]
pub struct KmsKeys {
    client: aws_sdk_kms::Client,
    credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
    timeout: Duration,
}

impl KmsKeys {
    /// Builds a client from the standard credential chain. The endpoint comes from
    /// `endpoint_url`, else `AWS_ENDPOINT_URL_KMS`/`AWS_ENDPOINT_URL`, else real KMS.
    pub async fn new(region: &str, endpoint_url: Option<&str>, timeout: Duration) -> Self {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .timeout_config(timeouts);
        if let Some(url) = endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk_config = loader.load().await;
        let client = aws_sdk_kms::Client::new(&sdk_config);
        Self {
            client,
            credentials: sdk_config.credentials_provider(),
            timeout,
        }
    }

    pub fn client(&self) -> &aws_sdk_kms::Client {
        &self.client
    }

    async fn check_credentials(&self) -> Result<(), KeyError> {
        use aws_credential_types::provider::ProvideCredentials;
        let provider = self
            .credentials
            .clone()
            .ok_or_else(|| KeyError::Credentials("no credential provider is configured".into()))?;
        tokio::time::timeout(self.timeout, provider.provide_credentials())
            .await
            .map_err(|_| KeyError::Timeout(self.timeout))?
            .map(|_| ())
            .map_err(|e| {
                KeyError::Credentials(aws_sdk_kms::error::DisplayErrorContext(e).to_string())
            })
    }

    /// A second deadline around the SDK's own: the SDK's covers its retries, this one
    /// also covers credential resolution.
    async fn bounded<T, F>(&self, operation: &'static str, call: F) -> Result<T, KeyError>
    where
        F: std::future::Future<Output = Result<T, String>>,
    {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(KeyError::Timeout(self.timeout)),
            Ok(Err(message)) => Err(KeyError::Kms { operation, message }),
            Ok(Ok(v)) => Ok(v),
        }
    }

    async fn encrypt(
        &self,
        key_id: &str,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Encrypted, KeyError> {
        let mut request = self
            .client
            .encrypt()
            .key_id(key_id)
            .plaintext(Blob::new(plaintext));
        if !context.is_empty() {
            request = request.set_encryption_context(Some(context.clone().into_iter().collect()));
        }
        let output = self
            .bounded("Encrypt", async {
                request.send().await.map_err(|e| short_sdk_error(&e))
            })
            .await?;
        let ciphertext = output
            .ciphertext_blob
            .ok_or_else(|| KeyError::Kms {
                operation: "Encrypt",
                message: "the response carried no CiphertextBlob".into(),
            })?
            .into_inner();
        let key_arn = output.key_id.unwrap_or_else(|| key_id.to_string());
        Ok(Encrypted {
            ciphertext,
            key_arn,
        })
    }

    async fn decrypt(
        &self,
        ciphertext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, KeyError> {
        let mut request = self.client.decrypt().ciphertext_blob(Blob::new(ciphertext));
        if !context.is_empty() {
            request = request.set_encryption_context(Some(context.clone().into_iter().collect()));
        }
        let output = self
            .bounded("Decrypt", async {
                request.send().await.map_err(|e| short_sdk_error(&e))
            })
            .await?;
        output.plaintext.map(Blob::into_inner).ok_or(KeyError::Open)
    }
}

/// The SDK's full error chain, which names the service error code (e.g. `InvalidCiphertextException`).
fn short_sdk_error<E: std::error::Error>(e: &E) -> String {
    aws_sdk_kms::error::DisplayErrorContext(e).to_string()
}

/// The development key provider: AES-256-GCM under a random key that lives only in this
/// process. Its ciphertexts mean nothing outside the process, which is the point: it lets
/// `gpulink demo` run the whole journey without an AWS account.
pub struct DevKeys {
    key: LessSafeKey,
    rng: SystemRandom,
}

/// Marks development ciphertexts so they are never mistaken for KMS ones.
const DEV_MAGIC: &[u8; 6] = b"GLDEV1";
pub const DEV_KEY_ARN: &str = "arn:aws:kms:local:000000000000:key/gpulink-development-key";

impl DevKeys {
    pub fn new() -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
        rng.fill(bytes.as_mut()).map_err(|_| KeyError::Open)?;
        let key = UnboundKey::new(&AES_256_GCM, bytes.as_ref()).map_err(|_| KeyError::Open)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            rng,
        })
    }

    fn aad(context: &EncryptionContext) -> Vec<u8> {
        serde_json::to_vec(context).unwrap_or_default()
    }

    fn encrypt(
        &self,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Encrypted, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| KeyError::Open)?;
        let mut out = Vec::with_capacity(DEV_MAGIC.len() + NONCE_LEN + plaintext.len() + 16);
        out.extend_from_slice(DEV_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let start = DEV_MAGIC.len() + NONCE_LEN;
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(context)),
                &mut out[start..],
            )
            .map_err(|_| KeyError::Open)?;
        out.extend_from_slice(tag.as_ref());
        Ok(Encrypted {
            ciphertext: out,
            key_arn: DEV_KEY_ARN.to_string(),
        })
    }

    fn decrypt(&self, ciphertext: &[u8], context: &EncryptionContext) -> Result<Vec<u8>, KeyError> {
        let start = DEV_MAGIC.len() + NONCE_LEN;
        if ciphertext.len() < start + 16 || &ciphertext[..DEV_MAGIC.len()] != DEV_MAGIC {
            return Err(KeyError::Open);
        }
        let nonce = Nonce::try_assume_unique_for_key(&ciphertext[DEV_MAGIC.len()..start])
            .map_err(|_| KeyError::Open)?;
        let mut buffer = ciphertext[start..].to_vec();
        let plaintext = self
            .key
            .open_in_place(nonce, Aad::from(Self::aad(context)), &mut buffer)
            .map_err(|_| KeyError::Open)?;
        let len = plaintext.len();
        buffer.truncate(len);
        Ok(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dev_keys_round_trip_and_bind_the_context() {
        let keys = KeyService::Dev(Arc::new(DevKeys::new().unwrap()));
        let mut ctx = EncryptionContext::new();
        ctx.insert("tenant_id".into(), "t".into());
        let sealed = keys.encrypt("ignored", b"{\"a\":1}", &ctx).await.unwrap();
        assert_eq!(sealed.key_arn, DEV_KEY_ARN);
        assert_eq!(
            keys.decrypt(&sealed.ciphertext, &ctx).await.unwrap(),
            b"{\"a\":1}"
        );
        let mut other = ctx.clone();
        other.insert("tenant_id".into(), "u".into());
        assert!(keys.decrypt(&sealed.ciphertext, &other).await.is_err());
        let mut tampered = sealed.ciphertext.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(keys.decrypt(&tampered, &ctx).await.is_err());
    }
}
