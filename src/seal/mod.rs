//! Sealing: turns the app's plaintext JSON into the bytes the cluster accepts, bound to
//! the tenant's encryption context. Fails closed: every error here becomes a 503 and the
//! request goes nowhere.
//!
//! Two formats (`kms.format`):
//!
//! * `kms-direct` (`X-Encryption-Format: kms-direct-v1`): the body is KMS `Encrypt`'s
//!   `CiphertextBlob`, as in the setup guide. KMS takes at most 4096 bytes.
//! * `aws-esdk` (`aws-esdk-v2`): an AWS Encryption SDK message (format 2.0, suite 0x0478,
//!   [`esdk`]) under a data key from the [`cache`], so bodies up to `upstream.max_body`
//!   and one KMS call per many requests.
//! * `auto`: `kms-direct` when the body fits 4096 bytes, else `aws-esdk`.
//!
//! The pieces: [`keys`] (KMS; with the `dev-tools` feature, also the development key
//! provider of `dev.rs`), [`cache`] (data keys),
//! [`esdk`] (the message format), and [`Sealer`] here, which chooses and applies them.

pub mod cache;
#[cfg(any(test, feature = "dev-tools"))]
mod dev;
pub mod keys;

/// The message format, a crate of its own (`crates/esdk`); re-exported so the sealing
/// code and its users name it in one place.
pub use gpulink_esdk as esdk;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::{ByteSize, ContextMode, Kms, SealFormat, KMS_DIRECT_MAX_PLAINTEXT};
pub use cache::{
    Acquired, CacheCounters, CacheLimits, CacheState, DataKeyCache, PROVIDER_ID_AWS_KMS,
};
#[cfg(any(test, feature = "dev-tools"))]
pub use dev::{DevKeys, DEV_KEY_ARN};
pub use keys::{DataKey, EncryptionContext, KeyError, KeyService, KeyStats, KmsKeys, KmsOperation};

/// What a sealed body is on the wire: the value of `X-Encryption-Format`, also the
/// `format` label of `gpulink_seal_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireFormat {
    /// The body is KMS `Encrypt`'s ciphertext blob.
    KmsDirectV1,
    /// An AWS Encryption SDK message format v2 message.
    AwsEsdkV2,
}

impl WireFormat {
    pub const ALL: [WireFormat; 2] = [Self::KmsDirectV1, Self::AwsEsdkV2];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::KmsDirectV1 => "kms-direct-v1",
            Self::AwsEsdkV2 => "aws-esdk-v2",
        }
    }
}

impl PartialEq<&str> for WireFormat {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The value of `X-Encryption-Format` for a body sealed by KMS `Encrypt`.
pub const FORMAT_KMS_DIRECT: &str = WireFormat::KmsDirectV1.as_str();
/// The value of `X-Encryption-Format` for an AWS Encryption SDK v2 message.
pub const FORMAT_AWS_ESDK: &str = WireFormat::AwsEsdkV2.as_str();

/// Plaintexts from this size up are encrypted off the async thread, so a big body does
/// not hold up the other requests on the same runtime worker: inside
/// `tokio::task::block_in_place` on the multi-threaded runtime, on the blocking pool
/// (`spawn_blocking`) on a single-threaded one (the request-path workers,
/// `crate::runtime`, where `block_in_place` is not allowed), for bodies passed as
/// [`Bytes`] ([`Sealer::seal_bytes`]).
///
/// Measured (`cargo bench --bench seal`, release, this 2-core Xeon; see BENCHMARKS.md):
/// sealing runs at ~5-7 GiB/s, so 10 MiB takes ~1.9 ms and 1 MiB ~0.15 ms of CPU, well
/// over tokio's guideline of 10-100 us between awaits; 64 KiB takes ~14 us and 256 KiB
/// ~40 us. Handing the worker's core over costs ~8 us per call, so below 256 KiB inline
/// is cheaper for everyone, and above it the hand-over is under 20% of the seal (5% at
/// 1 MiB). `block_in_place` where it can, because it borrows the body: no copy and no
/// `'static` bound; `spawn_blocking` shares the `Bytes` instead (no copy either) and costs
/// a hand-over to another thread and back. How many run at once is bounded by the
/// in-flight body budget (`listen.max_in_flight_bytes`), which every such body holds.
pub const BLOCKING_SEAL_THRESHOLD: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The plaintext is larger than the chosen format can carry.
    #[error("{format}: {size} bytes, more than the limit of {limit} bytes")]
    TooLarge {
        size: usize,
        limit: usize,
        format: &'static str,
    },
    /// KMS or the encryption itself failed: 503, nothing is sent.
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl From<esdk::EsdkError> for SealError {
    fn from(error: esdk::EsdkError) -> Self {
        SealError::Key(KeyError::Envelope(error))
    }
}

/// A sealed body ready to send.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub body: Bytes,
    pub format: WireFormat,
    /// The key ARN that sealed it, for `X-KMS-Key-ID`.
    pub key_arn: String,
    /// `aws-esdk` only: whether the data key came from the cache without waiting for
    /// KMS (`Some(false)`: this request waited for `GenerateDataKey`). `None` for
    /// `kms-direct`, where every seal is one KMS `Encrypt`.
    pub cache_hit: Option<bool>,
}

/// What a [`Sealer`] is built from: `[kms]`, the tenant its encryption contexts name,
/// and the largest body the cluster accepts (`upstream.max_body`), which every sealed
/// body must fit.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    pub kms: &'a Kms,
    pub tenant_id: &'a str,
    pub max_sealed: ByteSize,
}

/// Seals bodies for one tenant under one key.
pub struct Sealer {
    keys: KeyService,
    key_id: String,
    format: SealFormat,
    context_mode: ContextMode,
    tenant_id: String,
    max_sealed: usize,
    frame_len: u32,
    cache: Arc<DataKeyCache>,
}

impl Sealer {
    pub fn new(settings: Settings<'_>, keys: KeyService) -> Self {
        let cache = Arc::new(DataKeyCache::new(
            keys.clone(),
            settings.kms.key_id.as_str(),
            CacheLimits::from_config(&settings.kms.cache),
        ));
        Self::with_cache(settings, keys, cache)
    }

    /// The sealer of a reloaded configuration. Keeps `previous`'s data keys when the key
    /// and the cache limits are unchanged (a reload then costs no KMS call), and its
    /// counters in any case, so the totals the metrics read never go backwards.
    pub fn after_reload(previous: &Sealer, settings: Settings<'_>, keys: KeyService) -> Self {
        let kms = settings.kms;
        let limits = CacheLimits::from_config(&kms.cache);
        let cache = if kms.key_id == *previous.cache.key_id() && previous.cache.limits() == limits {
            previous.cache.clone()
        } else {
            Arc::new(DataKeyCache::with_counters(
                keys.clone(),
                kms.key_id.as_str(),
                limits,
                previous.cache.counters().clone(),
            ))
        };
        Self::with_cache(settings, keys, cache)
    }

    fn with_cache(settings: Settings<'_>, keys: KeyService, cache: Arc<DataKeyCache>) -> Self {
        Self {
            keys,
            key_id: settings.kms.key_id.as_str().to_string(),
            format: settings.kms.format,
            context_mode: settings.kms.context,
            tenant_id: settings.tenant_id.to_string(),
            max_sealed: usize::try_from(settings.max_sealed.bytes()).unwrap_or(usize::MAX),
            frame_len: esdk::DEFAULT_FRAME_LEN,
            cache,
        }
    }

    pub fn keys(&self) -> &KeyService {
        &self.keys
    }

    /// Stops the data-key cache's background work and waits for it (shutdown).
    pub async fn shut_down(&self) {
        self.cache.shut_down().await;
    }

    /// The data-key cache's counters (hits, misses, refreshes, KMS calls and errors).
    pub fn cache_counters(&self) -> &Arc<CacheCounters> {
        self.cache.counters()
    }

    /// A snapshot of the data-key cache for `/status`.
    pub fn cache_state(&self) -> CacheState {
        self.cache.state()
    }

    /// The context a body for `model_pool` is bound to (empty for `context = "none"`).
    pub fn context_for(&self, model_pool: &str) -> EncryptionContext {
        encryption_context(self.context_mode, &self.tenant_id, model_pool)
    }

    /// The format `kms.format` gives a plaintext of `len` bytes.
    pub fn format_for(&self, len: usize) -> WireFormat {
        let esdk = match self.format {
            SealFormat::KmsDirect => false,
            SealFormat::AwsEsdk => true,
            SealFormat::Auto => len > KMS_DIRECT_MAX_PLAINTEXT,
        };
        if esdk {
            WireFormat::AwsEsdkV2
        } else {
            WireFormat::KmsDirectV1
        }
    }

    /// The start-up proof (`/ready` in docs/design.md): one KMS `Encrypt` with the
    /// configured key and `model_pool`'s context, and, where the format may use it
    /// (`aws-esdk`, `auto`), the first `GenerateDataKey`, whose data key is kept for the
    /// first requests. The `Encrypt` seals a fixed marker, not app data, and its
    /// ciphertext is dropped.
    pub async fn prove(&self, model_pool: &str) -> Result<(), KeyError> {
        const PROOF: &[u8] = b"gpulink start-up proof";
        self.keys.check_credentials().await?;
        let context = self.context_for(model_pool);
        self.keys.encrypt(&self.key_id, PROOF, &context).await?;
        if self.format != SealFormat::KmsDirect {
            self.cache.warm(&context).await?;
        }
        Ok(())
    }

    pub async fn seal(&self, plaintext: &[u8], model_pool: &str) -> Result<Sealed, SealError> {
        let context = self.context_for(model_pool);
        if self.format_for(plaintext.len()) == WireFormat::AwsEsdkV2 {
            self.seal_esdk(plaintext, None, &context).await
        } else {
            self.seal_kms_direct(plaintext, &context).await
        }
    }

    /// As [`Sealer::seal`], for a body it may hand to the blocking pool when it is big
    /// and the runtime is single-threaded (see [`BLOCKING_SEAL_THRESHOLD`]).
    pub async fn seal_bytes(
        &self,
        plaintext: &Bytes,
        model_pool: &str,
    ) -> Result<Sealed, SealError> {
        let context = self.context_for(model_pool);
        if self.format_for(plaintext.len()) == WireFormat::AwsEsdkV2 {
            self.seal_esdk(plaintext, Some(plaintext), &context).await
        } else {
            self.seal_kms_direct(plaintext, &context).await
        }
    }

    async fn seal_kms_direct(
        &self,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Sealed, SealError> {
        if plaintext.len() > KMS_DIRECT_MAX_PLAINTEXT {
            return Err(SealError::TooLarge {
                size: plaintext.len(),
                limit: KMS_DIRECT_MAX_PLAINTEXT,
                format: "the body for kms-direct (KMS Encrypt)",
            });
        }
        let encrypted = self.keys.encrypt(&self.key_id, plaintext, context).await?;
        self.check_sealed_len(encrypted.ciphertext.len())?;
        Ok(Sealed {
            body: Bytes::from(encrypted.ciphertext),
            format: WireFormat::KmsDirectV1,
            key_arn: encrypted.key_arn,
            cache_hit: None,
        })
    }

    async fn seal_esdk(
        &self,
        plaintext: &[u8],
        shared: Option<&Bytes>,
        context: &EncryptionContext,
    ) -> Result<Sealed, SealError> {
        // A lower bound (an encrypted data key can only add bytes) refuses a body that can
        // never fit before it costs a KMS call or a cache slot.
        let empty_edk = esdk::EncryptedDataKey {
            provider_id: PROVIDER_ID_AWS_KMS.to_string(),
            provider_info: Vec::new(),
            ciphertext: Vec::new(),
        };
        let at_least = esdk::sealed_len(
            std::slice::from_ref(&empty_edk),
            context,
            plaintext.len(),
            self.frame_len,
        )?;
        self.check_sealed_len(at_least)?;

        let len = u64::try_from(plaintext.len()).unwrap_or(u64::MAX);
        let Acquired { key, hit } = self.cache.acquire(context, len).await?;
        let edks = std::slice::from_ref(key.edk());
        // The exact size, before any encryption work.
        self.check_sealed_len(esdk::sealed_len(
            edks,
            context,
            plaintext.len(),
            self.frame_len,
        )?)?;
        let encrypt = || esdk::encrypt(key.plaintext(), edks, context, plaintext, self.frame_len);
        let message = match off_thread(plaintext.len(), shared) {
            OffThread::BlockInPlace => tokio::task::block_in_place(encrypt)?,
            OffThread::SpawnBlocking(body) => {
                let (key, context, frame_len) = (key.clone(), context.clone(), self.frame_len);
                let sealing = tokio::task::spawn_blocking(move || {
                    let edks = std::slice::from_ref(key.edk());
                    esdk::encrypt(key.plaintext(), edks, &context, &body, frame_len)
                });
                // A panic in the codec is a failed seal: 503, nothing sent.
                sealing
                    .await
                    .map_err(|_| esdk::EsdkError::Crypto("the sealing thread failed"))??
            }
            OffThread::Inline => encrypt()?,
        };
        Ok(Sealed {
            body: Bytes::from(message),
            format: WireFormat::AwsEsdkV2,
            key_arn: key.key_arn().to_string(),
            cache_hit: Some(hit),
        })
    }

    fn check_sealed_len(&self, len: usize) -> Result<(), SealError> {
        if len > self.max_sealed {
            return Err(SealError::TooLarge {
                size: len,
                limit: self.max_sealed,
                format: "the sealed body (upstream.max_body)",
            });
        }
        Ok(())
    }
}

/// Where a seal of `len` bytes runs (see [`BLOCKING_SEAL_THRESHOLD`]).
enum OffThread {
    Inline,
    BlockInPlace,
    SpawnBlocking(Bytes),
}

/// `block_in_place` panics outside the multi-threaded runtime; `spawn_blocking` needs a
/// runtime and a body it can share.
fn off_thread(len: usize, shared: Option<&Bytes>) -> OffThread {
    if len < BLOCKING_SEAL_THRESHOLD {
        return OffThread::Inline;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return OffThread::Inline;
    };
    match (runtime.runtime_flavor(), shared) {
        (tokio::runtime::RuntimeFlavor::MultiThread, _) => OffThread::BlockInPlace,
        (_, Some(body)) => OffThread::SpawnBlocking(body.clone()),
        (_, None) => OffThread::Inline,
    }
}

/// Where the start-up proof of KMS stands: gpulink is not ready until one seal with the
/// configured key and context succeeded ([`Sealer::prove`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KmsProof {
    pub proven: bool,
    /// Failed attempts so far.
    pub failures: u32,
    /// Why the last attempt failed: the short, classified message (never what KMS said).
    pub last_error: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::generation::seal_settings as settings;

    fn config(format: &str, extra: &str) -> Config {
        let text = format!(
            r#"
            [tenant]
            id = "tenant-123"
            model_pool = "model-a"
            model_pools = ["model-a", "model-b"]
            [kms]
            key_id = "arn:aws:kms:us-east-1:111122223333:key/k"
            region = "us-east-1"
            format = "{format}"
            [upstream]
            server_name = "gpu.internal"
            {extra}
            [[regions]]
            name = "us-east-1"
            privatelink = ["10.0.0.1"]
            "#
        );
        Config::from_toml(&text, std::path::Path::new("test.toml")).expect("valid config")
    }

    fn dev() -> (KeyService, Arc<DevKeys>) {
        let dev = Arc::new(DevKeys::new().expect("dev keys"));
        (KeyService::Dev(dev.clone()), dev)
    }

    /// Opens an `aws-esdk` body as the cluster would: KMS-decrypt the data key, decrypt.
    async fn open(keys: &KeyService, body: &[u8], pool: &str) -> Vec<u8> {
        let header = esdk::parse_header(body).expect("header");
        let data_key = keys
            .decrypt(&header.edks[0].ciphertext, &header.context)
            .await
            .expect("data key opens");
        let data_key: [u8; 32] = data_key.as_slice().try_into().expect("32 bytes");
        let expected = encryption_context(ContextMode::Tenant, "tenant-123", pool);
        esdk::decrypt_expecting_context(&data_key, body, &expected).expect("message opens")
    }

    /// A big body on a single-threaded runtime (a request-path worker) is sealed on the
    /// blocking pool, and on the multi-threaded one in place; both open.
    #[test]
    fn big_bodies_are_sealed_off_the_async_thread_on_either_runtime() {
        let body = Bytes::from(vec![b'3'; BLOCKING_SEAL_THRESHOLD + 1]);
        for multi in [false, true] {
            let runtime = if multi {
                tokio::runtime::Builder::new_multi_thread().build().unwrap()
            } else {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
            };
            runtime.block_on(async {
                let expected = if multi { "in place" } else { "spawn" };
                let chosen = match off_thread(body.len(), Some(&body)) {
                    OffThread::BlockInPlace => "in place",
                    OffThread::SpawnBlocking(_) => "spawn",
                    OffThread::Inline => "inline",
                };
                assert_eq!(chosen, expected);
                assert!(matches!(
                    off_thread(body.len() - 2, Some(&body)),
                    OffThread::Inline
                ));
                let (keys, _) = dev();
                let sealer = Sealer::new(settings(&config("aws-esdk", "")), keys.clone());
                let sealed = sealer.seal_bytes(&body, "model-a").await.unwrap();
                assert_eq!(open(&keys, &sealed.body, "model-a").await, body);
            });
        }
    }

    #[tokio::test]
    async fn auto_chooses_by_size_and_both_formats_open() {
        let (keys, _) = dev();
        let sealer = Sealer::new(settings(&config("auto", "")), keys.clone());
        let small = vec![b'1'; KMS_DIRECT_MAX_PLAINTEXT];
        let sealed = sealer.seal(&small, "model-a").await.unwrap();
        assert_eq!(sealed.format, FORMAT_KMS_DIRECT);
        assert_eq!(sealed.cache_hit, None);
        let context = sealer.context_for("model-a");
        assert_eq!(keys.decrypt(&sealed.body, &context).await.unwrap(), small);

        let big = vec![b'2'; KMS_DIRECT_MAX_PLAINTEXT + 1];
        let sealed = sealer.seal(&big, "model-b").await.unwrap();
        assert_eq!(sealed.format, FORMAT_AWS_ESDK);
        assert_eq!(
            sealed.key_arn, DEV_KEY_ARN,
            "the ARN the key service reported"
        );
        assert_eq!(sealed.cache_hit, Some(false));
        assert_eq!(open(&keys, &sealed.body, "model-b").await, big);
        let again = sealer.seal(&big, "model-b").await.unwrap();
        assert_eq!(again.cache_hit, Some(true));
        assert_eq!(keys.stats().generate_data_key.calls(), 1);
        assert_eq!(keys.stats().encrypt.calls(), 1);
    }

    #[tokio::test]
    async fn explicit_formats() {
        let (keys, _) = dev();
        let esdk_sealer = Sealer::new(settings(&config("aws-esdk", "")), keys.clone());
        let sealed = esdk_sealer.seal(b"1", "model-a").await.unwrap();
        assert_eq!(sealed.format, FORMAT_AWS_ESDK);
        assert_eq!(open(&keys, &sealed.body, "model-a").await, b"1");

        let direct = Sealer::new(settings(&config("kms-direct", "")), keys);
        let err = direct
            .seal(&vec![b'1'; KMS_DIRECT_MAX_PLAINTEXT + 1], "model-a")
            .await
            .unwrap_err();
        assert!(matches!(err, SealError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("4096"), "{err}");
    }

    #[tokio::test]
    async fn the_sealed_body_must_fit_upstream_max_body() {
        let (keys, _) = dev();
        let sealer = Sealer::new(
            settings(&config("aws-esdk", r#"max_body = "100KB""#)),
            keys.clone(),
        );
        // Far over: refused by the lower bound, before any KMS call.
        let err = sealer
            .seal(&vec![b'1'; 100_000], "model-a")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("upstream.max_body"), "{err}");
        assert_eq!(keys.stats().generate_data_key.calls(), 0);
        // Just over once the data key's size is known: refused before encrypting.
        let len = 100_000 - 300;
        let err = sealer.seal(&vec![b'1'; len], "model-a").await.unwrap_err();
        assert!(matches!(err, SealError::TooLarge { .. }), "{err}");
        // And the largest body that fits is exactly at the limit.
        let header_and_framing = {
            let sealed = sealer.seal(b"1", "model-a").await.unwrap();
            sealed.body.len() - 1
        };
        let fits = 100_000 - header_and_framing - 2 * 32; // two frames' overhead at most
        let sealed = sealer.seal(&vec![b'1'; fits], "model-a").await.unwrap();
        assert!(sealed.body.len() <= 100_000);
    }

    #[tokio::test]
    async fn kms_failure_is_a_key_error() {
        let (keys, dev) = dev();
        dev.set_unavailable(true);
        let sealer = Sealer::new(settings(&config("aws-esdk", "")), keys);
        let err = sealer.seal(b"{}", "model-a").await.unwrap_err();
        assert!(
            matches!(err, SealError::Key(KeyError::Unavailable)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_reload_keeps_the_cache_when_the_key_and_limits_are_unchanged() {
        let (keys, _) = dev();
        let first = Sealer::new(settings(&config("aws-esdk", "")), keys.clone());
        first.seal(b"{}", "model-a").await.unwrap();
        let same = Sealer::after_reload(&first, settings(&config("auto", "")), keys.clone());
        assert_eq!(
            same.seal(&[b'1'; 5000], "model-a").await.unwrap().cache_hit,
            Some(true)
        );
        let mut other = config("aws-esdk", "");
        other.kms.cache.max_messages = 5;
        let changed = Sealer::after_reload(&same, settings(&other), keys.clone());
        assert_eq!(
            changed.seal(b"{}", "model-a").await.unwrap().cache_hit,
            Some(false)
        );
        // The counters carry over.
        assert_eq!(changed.cache_counters().kms_calls(), 2);
        assert_eq!(changed.cache_counters().hits(), 1);
    }
}
