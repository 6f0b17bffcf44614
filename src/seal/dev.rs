//! The development key provider: stands in for KMS in `gpulink demo`, the tests and the
//! benchmarks (and `gpulink run` refuses it). Only in builds with the `dev-tools`
//! feature (and this crate's own unit tests): the shipped sidecar has no key but KMS's.

use std::sync::atomic::{AtomicBool, Ordering};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::keys::{
    DataKey, Encrypted, EncryptionContext, KeyError, KeyStats, KmsErrorKind, KmsOperation,
};

/// The development key provider: AES-256-GCM under a random key that lives only in this
/// process. Its ciphertexts mean nothing outside the process, which is the point: it lets
/// `gpulink demo` run the whole journey without an AWS account.
pub struct DevKeys {
    key: LessSafeKey,
    rng: SystemRandom,
    pub(super) stats: KeyStats,
    /// When set, every operation fails as KMS would during an outage (tests and demos).
    unavailable: AtomicBool,
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
            stats: KeyStats::default(),
            unavailable: AtomicBool::new(false),
        })
    }

    /// Switches the provider off (`true`) or back on, to stand for a KMS outage: while
    /// off, every operation fails with [`KeyError::Unavailable`].
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    fn check_available(&self) -> Result<(), KeyError> {
        if self.unavailable.load(Ordering::SeqCst) {
            Err(KeyError::Unavailable)
        } else {
            Ok(())
        }
    }

    pub(super) fn generate_data_key(
        &self,
        context: &EncryptionContext,
    ) -> Result<DataKey, KeyError> {
        self.check_available()?;
        let mut plaintext = Zeroizing::new([0u8; 32]);
        self.rng.fill(plaintext.as_mut()).map_err(|_| {
            KeyError::kms(KmsOperation::GenerateDataKey, KmsErrorKind::ServiceFailure)
        })?;
        let sealed = self.encrypt(plaintext.as_ref(), context)?;
        Ok(DataKey {
            plaintext,
            ciphertext: sealed.ciphertext,
            key_arn: sealed.key_arn,
        })
    }

    fn aad(context: &EncryptionContext) -> Vec<u8> {
        serde_json::to_vec(context).unwrap_or_default()
    }

    pub(super) fn encrypt(
        &self,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Encrypted, KeyError> {
        self.check_available()?;
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

    pub(super) fn decrypt(
        &self,
        ciphertext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, KeyError> {
        self.check_available()?;
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
