//! Sealing: turns the app's plaintext JSON into the bytes the cluster accepts, bound to
//! the tenant's encryption context. Fails closed: every error here becomes a 503 and the
//! request goes nowhere.

pub mod keys;

use bytes::Bytes;

use crate::config::{Config, ContextMode, SealFormat, KMS_DIRECT_MAX_PLAINTEXT};
pub use keys::{DevKeys, EncryptionContext, KeyError, KeyService, KmsKeys, DEV_KEY_ARN};

/// The value of `X-Encryption-Format` for a body sealed by KMS `Encrypt`.
pub const FORMAT_KMS_DIRECT: &str = "kms-direct-v1";
/// The value of `X-Encryption-Format` for an AWS Encryption SDK v2 message.
pub const FORMAT_AWS_ESDK: &str = "aws-esdk-v2";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The plaintext is larger than the chosen format can carry.
    #[error("the body is {size} bytes; {format} can seal at most {limit} bytes")]
    TooLarge {
        size: usize,
        limit: usize,
        format: &'static str,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// A sealed body ready to send.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub body: Bytes,
    pub format: &'static str,
    /// The key ARN that sealed it, for `X-KMS-Key-ID`.
    pub key_arn: String,
}

/// Seals bodies for one tenant under one key.
pub struct Sealer {
    keys: KeyService,
    key_id: String,
    format: SealFormat,
    context_mode: ContextMode,
    tenant_id: String,
    max_sealed: usize,
}

impl Sealer {
    pub fn new(config: &Config, keys: KeyService) -> Self {
        Self {
            keys,
            key_id: config.kms.key_id.clone(),
            format: config.kms.format,
            context_mode: config.kms.context,
            tenant_id: config.tenant.id.clone(),
            max_sealed: usize::try_from(config.upstream.max_body.bytes()).unwrap_or(usize::MAX),
        }
    }

    pub fn keys(&self) -> &KeyService {
        &self.keys
    }

    /// The context a body for `model_pool` is bound to (empty for `context = "none"`).
    pub fn context_for(&self, model_pool: &str) -> EncryptionContext {
        encryption_context(self.context_mode, &self.tenant_id, model_pool)
    }

    pub async fn seal(&self, plaintext: &[u8], model_pool: &str) -> Result<Sealed, SealError> {
        // Until the envelope format lands, `auto` can only choose kms-direct.
        match self.format {
            SealFormat::KmsDirect | SealFormat::Auto | SealFormat::AwsEsdk => {}
        }
        if plaintext.len() > KMS_DIRECT_MAX_PLAINTEXT {
            return Err(SealError::TooLarge {
                size: plaintext.len(),
                limit: KMS_DIRECT_MAX_PLAINTEXT,
                format: "kms-direct (KMS Encrypt)",
            });
        }
        let context = self.context_for(model_pool);
        let encrypted = self.keys.encrypt(&self.key_id, plaintext, &context).await?;
        if encrypted.ciphertext.len() > self.max_sealed {
            return Err(SealError::TooLarge {
                size: encrypted.ciphertext.len(),
                limit: self.max_sealed,
                format: "upstream.max_body",
            });
        }
        Ok(Sealed {
            body: Bytes::from(encrypted.ciphertext),
            format: FORMAT_KMS_DIRECT,
            key_arn: encrypted.key_arn,
        })
    }
}

/// `{"tenant_id": ..., "model_pool": ...}`, or nothing for a cluster that decrypts
/// without a context (the guide's own example).
pub fn encryption_context(
    mode: ContextMode,
    tenant_id: &str,
    model_pool: &str,
) -> EncryptionContext {
    let mut context = EncryptionContext::new();
    if mode == ContextMode::Tenant {
        context.insert("tenant_id".into(), tenant_id.into());
        context.insert("model_pool".into(), model_pool.into());
    }
    context
}
