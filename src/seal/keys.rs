//! Where data keys and ciphertexts come from: AWS KMS in production, or, in builds with
//! the `dev-tools` feature, the in-process development key provider ([`super::DevKeys`],
//! `seal/dev.rs`) that stands in for KMS in `gpulink demo` (and that `gpulink run`
//! refuses).
//!
//! Every KMS call has a deadline (`kms.timeout`, retries included), is retried by the SDK
//! with exponential backoff on throttling and transient errors, and is counted in
//! [`KeyStats`] (calls, errors, latency) for the metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use zeroize::{Zeroize, Zeroizing};

use super::esdk::EsdkError;
#[cfg(any(test, feature = "dev-tools"))]
use super::DevKeys;

/// The encryption context: one type for KMS (which serialises it in key order) and the
/// envelope format (which writes it sorted), so the two can never disagree.
pub use super::esdk::EncryptionContext;

/// The KMS operations gpulink calls, each with its API name: the `operation` label of
/// the metrics, and the name in messages and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KmsOperation {
    /// `kms-direct`: every seal; also the start-up proof.
    Encrypt,
    /// `aws-esdk`: the data-key cache's fetches.
    GenerateDataKey,
    /// Only to open what was sealed (tests, the simulator, the demo).
    Decrypt,
}

impl KmsOperation {
    /// The operations sealing calls, in the order `/metrics` lists them.
    pub const SEALING: [KmsOperation; 2] = [Self::Encrypt, Self::GenerateDataKey];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Encrypt => "Encrypt",
            Self::GenerateDataKey => "GenerateDataKey",
            Self::Decrypt => "Decrypt",
        }
    }
}

impl std::fmt::Display for KmsOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a key operation failed. Messages never contain key material, plaintext, or
/// anything KMS or the SDK answered beyond a recognised error code and the HTTP status:
/// a KMS error message can echo the request (the base64 plaintext), and the SDK's error
/// dumps carry the raw response (a broken `GenerateDataKey` answer holds the data key).
/// `Clone` because one failed data-key fetch answers every request that waited for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error("KMS call timed out after {0:?}")]
    Timeout(Duration),
    #[error("KMS {operation} failed: {kind}{detail}")]
    Kms {
        operation: KmsOperation,
        kind: KmsErrorKind,
        detail: KmsDetail,
    },
    #[error(
        "the ciphertext could not be opened (wrong key, wrong encryption context or tampered)"
    )]
    Open,
    #[error("{0}")]
    Credentials(CredentialsProblem),
    #[error(
        "KMS GenerateDataKey returned a {0}-byte plaintext key where AES_256 gives 32 bytes; \
         refusing to use it"
    )]
    BadDataKey(usize),
    /// Sealing or opening the AWS Encryption SDK message failed (not a KMS failure, but
    /// it fails closed the same way).
    #[error("AWS Encryption SDK message: {0}")]
    Envelope(#[from] EsdkError),
    /// The development key provider was switched off to stand for a KMS outage.
    #[error("the development key provider is switched off (simulated KMS outage)")]
    Unavailable,
}

impl KeyError {
    /// KMS refused the configured key itself (not a transient failure): the operator has
    /// to change `kms.key_id`, the key or its policy.
    pub fn is_key_refusal(&self) -> bool {
        matches!(
            self,
            KeyError::Kms {
                kind: KmsErrorKind::NotFound
                    | KmsErrorKind::Disabled
                    | KmsErrorKind::InvalidState
                    | KmsErrorKind::AccessDenied
                    | KmsErrorKind::InvalidKeyUsage
                    | KmsErrorKind::InvalidKeyId,
                ..
            }
        )
    }

    pub(super) fn kms(operation: KmsOperation, kind: KmsErrorKind) -> Self {
        KeyError::Kms {
            operation,
            kind,
            detail: KmsDetail::default(),
        }
    }
}

/// What went wrong with a KMS call, classified once from the SDK's error. Each renders
/// as a short message an operator can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KmsErrorKind {
    #[error(
        "the key does not exist or these credentials cannot see it; check kms.key_id and kms.region"
    )]
    NotFound,
    #[error("the key is disabled; enable it or change kms.key_id")]
    Disabled,
    #[error(
        "the key is not in a usable state (pending deletion or awaiting key material); check kms.key_id"
    )]
    InvalidState,
    #[error(
        "access denied: the credentials may not use the key for this operation; check the key policy \
         and the role's permissions for kms.key_id"
    )]
    AccessDenied,
    #[error(
        "the key cannot be used for this operation (it must be a symmetric ENCRYPT_DECRYPT key); \
         check kms.key_id"
    )]
    InvalidKeyUsage,
    #[error("kms.key_id is not a valid key id, key ARN or alias")]
    InvalidKeyId,
    #[error("KMS throttled the request; it is retried with backoff (raise the KMS request quota if this persists)")]
    Throttled,
    #[error("KMS failed on its side; retry later")]
    ServiceFailure,
    #[error(
        "KMS could not be reached; check kms.endpoint_url, kms.region, DNS and the network path to KMS"
    )]
    Unreachable,
    #[error("KMS sent an answer that cannot be used (malformed or incomplete)")]
    InvalidResponse,
    #[error("KMS refused the request")]
    Rejected,
    #[error("the call was abandoned before it finished")]
    Interrupted,
}

/// The part of a KMS answer that may be shown: a recognised error code (from a fixed
/// list: a code that is not on it is never repeated, since a faulty or hostile endpoint
/// could put anything there) and the HTTP status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KmsDetail {
    pub code: Option<&'static str>,
    pub status: Option<u16>,
}

impl std::fmt::Display for KmsDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.status) {
            (Some(code), Some(status)) => write!(f, " ({code}, HTTP {status})"),
            (Some(code), None) => write!(f, " ({code})"),
            (None, Some(status)) => write!(f, " (HTTP {status})"),
            (None, None) => Ok(()),
        }
    }
}

/// KMS error codes and what they mean for gpulink.
const KMS_ERROR_CODES: &[(&str, KmsErrorKind)] = &[
    ("NotFoundException", KmsErrorKind::NotFound),
    ("DisabledException", KmsErrorKind::Disabled),
    ("KMSInvalidStateException", KmsErrorKind::InvalidState),
    ("KeyUnavailableException", KmsErrorKind::ServiceFailure),
    ("AccessDeniedException", KmsErrorKind::AccessDenied),
    ("UnrecognizedClientException", KmsErrorKind::AccessDenied),
    ("InvalidSignatureException", KmsErrorKind::AccessDenied),
    ("IncompleteSignature", KmsErrorKind::AccessDenied),
    ("ExpiredTokenException", KmsErrorKind::AccessDenied),
    ("InvalidClientTokenId", KmsErrorKind::AccessDenied),
    ("MissingAuthenticationToken", KmsErrorKind::AccessDenied),
    ("InvalidKeyUsageException", KmsErrorKind::InvalidKeyUsage),
    ("InvalidArnException", KmsErrorKind::InvalidKeyId),
    ("ThrottlingException", KmsErrorKind::Throttled),
    ("Throttling", KmsErrorKind::Throttled),
    ("TooManyRequestsException", KmsErrorKind::Throttled),
    ("LimitExceededException", KmsErrorKind::Throttled),
    ("KMSInternalException", KmsErrorKind::ServiceFailure),
    ("DependencyTimeoutException", KmsErrorKind::ServiceFailure),
    ("InternalFailure", KmsErrorKind::ServiceFailure),
    ("ServiceUnavailable", KmsErrorKind::ServiceFailure),
    ("InvalidCiphertextException", KmsErrorKind::Rejected),
    ("IncorrectKeyException", KmsErrorKind::Rejected),
    ("InvalidGrantTokenException", KmsErrorKind::Rejected),
    ("DryRunOperationException", KmsErrorKind::Rejected),
    ("ValidationException", KmsErrorKind::Rejected),
    ("SerializationException", KmsErrorKind::Rejected),
];

/// Classifies a failed SDK call once, keeping only what [`KeyError`] may show.
fn classify<E, R>(operation: KmsOperation, error: &SdkError<E, R>, timeout: Duration) -> KeyError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HttpStatus + 'static,
{
    if caused_by_missing_credentials(error) {
        return KeyError::Credentials(CredentialsProblem::NotFound);
    }
    match error {
        SdkError::TimeoutError(_) => KeyError::Timeout(timeout),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => KeyError::Timeout(timeout),
        SdkError::DispatchFailure(_) => KeyError::kms(operation, KmsErrorKind::Unreachable),
        SdkError::ConstructionFailure(_) => KeyError::kms(operation, KmsErrorKind::Rejected),
        SdkError::ResponseError(response) => KeyError::Kms {
            operation,
            kind: KmsErrorKind::InvalidResponse,
            detail: KmsDetail {
                code: None,
                status: Some(response.raw().status_code()),
            },
        },
        SdkError::ServiceError(service) => {
            let status = service.raw().status_code();
            let known = service.err().code().and_then(|code| {
                KMS_ERROR_CODES
                    .iter()
                    .find(|(known, _)| *known == code)
                    .copied()
            });
            let (code, kind) = match known {
                Some((code, kind)) => (Some(code), kind),
                None if status >= 500 => (None, KmsErrorKind::ServiceFailure),
                // A 2xx or 3xx that is not the operation's answer, or a 4xx without a
                // code KMS uses: nothing usable came back.
                None if status < 400 => (None, KmsErrorKind::InvalidResponse),
                None => (None, KmsErrorKind::Rejected),
            };
            if operation == KmsOperation::Decrypt && code == Some("InvalidCiphertextException") {
                return KeyError::Open;
            }
            KeyError::Kms {
                operation,
                kind,
                detail: KmsDetail {
                    code,
                    status: Some(status),
                },
            }
        }
        _ => KeyError::kms(operation, KmsErrorKind::Rejected),
    }
}

/// The HTTP status of the SDK's raw response.
trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_kms::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// Whether the SDK failed because no credentials could be loaded (it reports that as a
/// failure to construct or dispatch the request, with the credentials error as a cause).
fn caused_by_missing_credentials(error: &(dyn std::error::Error + 'static)) -> bool {
    use aws_credential_types::provider::error::CredentialsError;
    let mut next = Some(error);
    while let Some(current) = next {
        if current.downcast_ref::<CredentialsError>().is_some() {
            return true;
        }
        next = current.source();
    }
    false
}

/// Why no credentials could be used. The credential chain's own error text is never
/// shown: a provider's message can quote a configuration or credentials file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsProblem {
    #[error(
        "no AWS credentials found for KMS; looked in the environment (AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY), the shared files (~/.aws/credentials, ~/.aws/config, AWS_PROFILE), \
         web identity (AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN, as EKS IRSA sets), ECS \
         container credentials and the EC2 instance metadata service (IMDS)"
    )]
    NotFound,
    #[error("loading AWS credentials for KMS timed out (a credential provider such as IMDS or STS did not answer)")]
    TimedOut,
    #[error("the AWS credential configuration is invalid (check AWS_PROFILE, ~/.aws/config and the AWS_* variables)")]
    InvalidConfiguration,
    #[error("an AWS credential provider failed (STS or the instance metadata service refused or was unreachable)")]
    ProviderFailed,
    #[error("no credential provider is configured for KMS")]
    NoProvider,
}

impl CredentialsProblem {
    fn of(error: &aws_credential_types::provider::error::CredentialsError) -> Self {
        use aws_credential_types::provider::error::CredentialsError as E;
        match error {
            E::CredentialsNotLoaded(_) => CredentialsProblem::NotFound,
            E::ProviderTimedOut(_) => CredentialsProblem::TimedOut,
            E::InvalidConfiguration(_) => CredentialsProblem::InvalidConfiguration,
            _ => CredentialsProblem::ProviderFailed,
        }
    }
}

/// A fresh data key from `GenerateDataKey` (AES_256). The plaintext is zeroized when the
/// last holder drops it; it never appears in `Debug` output or logs.
pub struct DataKey {
    pub plaintext: Zeroizing<[u8; 32]>,
    /// The `CiphertextBlob`: the data key encrypted under the KMS key and the context.
    pub ciphertext: Vec<u8>,
    /// The `KeyId` KMS reports: always the key ARN, even when called with an alias.
    pub key_arn: String,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("plaintext", &"<redacted>")
            .field("ciphertext_len", &self.ciphertext.len())
            .field("key_arn", &self.key_arn)
            .finish()
    }
}

/// Counters of one key operation (plain atomics: read by `/status` and the metrics).
#[derive(Debug, Default)]
pub struct OperationStats {
    calls: AtomicU64,
    errors: AtomicU64,
}

impl OperationStats {
    /// Calls made (successful or not).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
    /// Calls that failed (timeouts included).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
    fn record<T>(&self, result: &Result<T, KeyError>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counters per KMS operation, shared by every clone of one key service (so they survive
/// configuration reloads).
#[derive(Debug, Default)]
pub struct KeyStats {
    pub encrypt: OperationStats,
    pub generate_data_key: OperationStats,
    pub decrypt: OperationStats,
}

impl KeyStats {
    /// Calls of every operation.
    pub fn calls(&self) -> u64 {
        self.encrypt.calls() + self.generate_data_key.calls() + self.decrypt.calls()
    }
    /// Failed calls of every operation.
    pub fn errors(&self) -> u64 {
        self.encrypt.errors() + self.generate_data_key.errors() + self.decrypt.errors()
    }
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
    #[cfg(any(test, feature = "dev-tools"))]
    Dev(Arc<DevKeys>),
}

impl KeyService {
    pub fn is_development(&self) -> bool {
        #[cfg(any(test, feature = "dev-tools"))]
        return matches!(self, KeyService::Dev(_));
        #[cfg(not(any(test, feature = "dev-tools")))]
        false
    }

    /// KMS `Encrypt`: seals up to 4096 bytes under `key_id` bound to `context`.
    pub async fn encrypt(
        &self,
        key_id: &str,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Encrypted, KeyError> {
        let result = match self {
            // Boxed: the SDK call's future is ~12 KB, and every request's future would
            // otherwise carry it inline even when no KMS call happens.
            KeyService::Kms(kms) => Box::pin(kms.encrypt(key_id, plaintext, context)).await,
            #[cfg(any(test, feature = "dev-tools"))]
            KeyService::Dev(dev) => dev.encrypt(plaintext, context),
        };
        self.stats().encrypt.record(&result);
        result
    }

    /// KMS `Decrypt`: opens a ciphertext made by [`KeyService::encrypt`] or
    /// [`KeyService::generate_data_key`] with the same context.
    pub async fn decrypt(
        &self,
        ciphertext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, KeyError> {
        let result = match self {
            KeyService::Kms(kms) => Box::pin(kms.decrypt(ciphertext, context)).await,
            #[cfg(any(test, feature = "dev-tools"))]
            KeyService::Dev(dev) => dev.decrypt(ciphertext, context),
        };
        self.stats().decrypt.record(&result);
        result
    }

    /// KMS `GenerateDataKey` (AES_256) under `key_id`, bound to `context`: a fresh data
    /// key in plaintext and encrypted. The development provider makes a random key and
    /// encrypts it with its own key, so that [`KeyService::decrypt`] opens it.
    pub async fn generate_data_key(
        &self,
        key_id: &str,
        context: &EncryptionContext,
    ) -> Result<DataKey, KeyError> {
        let result = match self {
            KeyService::Kms(kms) => Box::pin(kms.generate_data_key(key_id, context)).await,
            #[cfg(any(test, feature = "dev-tools"))]
            KeyService::Dev(dev) => dev.generate_data_key(context),
        };
        self.stats().generate_data_key.record(&result);
        result
    }

    /// Call counters, shared by every clone of this key service.
    pub fn stats(&self) -> &KeyStats {
        match self {
            KeyService::Kms(kms) => &kms.stats,
            #[cfg(any(test, feature = "dev-tools"))]
            KeyService::Dev(dev) => &dev.stats,
        }
    }

    /// Resolves credentials once so that a missing credential shows at start, not on the
    /// first request.
    pub async fn check_credentials(&self) -> Result<(), KeyError> {
        match self {
            KeyService::Kms(kms) => kms.check_credentials().await,
            #[cfg(any(test, feature = "dev-tools"))]
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
    stats: Arc<KeyStats>,
}

/// Attempts per KMS call (the first included). The SDK's standard retry mode backs off
/// exponentially with jitter and also retries throttling (`ThrottlingException`); every
/// attempt together stays inside `kms.timeout`.
const KMS_MAX_ATTEMPTS: u32 = 3;

impl KmsKeys {
    /// Builds a client from the standard credential chain. The endpoint comes from
    /// `endpoint_url`, else `AWS_ENDPOINT_URL_KMS`/`AWS_ENDPOINT_URL`, else real KMS.
    /// The client `[kms]` describes.
    pub async fn from_config(kms: &crate::config::Kms) -> Self {
        Self::new(&kms.region, kms.endpoint_url.as_deref(), kms.timeout.get()).await
    }

    pub async fn new(region: &str, endpoint_url: Option<&str>, timeout: Duration) -> Self {
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .operation_timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .build();
        let retry = aws_config::retry::RetryConfig::standard()
            .with_max_attempts(KMS_MAX_ATTEMPTS)
            .with_initial_backoff(Duration::from_millis(50));
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .timeout_config(timeouts)
            .retry_config(retry);
        if let Some(url) = endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk_config = loader.load().await;
        let client = aws_sdk_kms::Client::new(&sdk_config);
        Self {
            client,
            credentials: sdk_config.credentials_provider(),
            timeout,
            stats: Arc::new(KeyStats::default()),
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
            .ok_or(KeyError::Credentials(CredentialsProblem::NoProvider))?;
        tokio::time::timeout(self.timeout, provider.provide_credentials())
            .await
            .map_err(|_| KeyError::Credentials(CredentialsProblem::TimedOut))?
            .map(|_| ())
            .map_err(|e| KeyError::Credentials(CredentialsProblem::of(&e)))
    }

    /// A second deadline around the SDK's own: the SDK's covers its retries, this one
    /// also covers credential resolution.
    async fn bounded<T, E, F>(&self, operation: KmsOperation, call: F) -> Result<T, KeyError>
    where
        F: std::future::Future<
            Output = Result<T, SdkError<E, aws_sdk_kms::config::http::HttpResponse>>,
        >,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(KeyError::Timeout(self.timeout)),
            Ok(Err(error)) => Err(classify(operation, &error, self.timeout)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    async fn encrypt(
        &self,
        key_id: &str,
        plaintext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Encrypted, KeyError> {
        let request = self
            .client
            .encrypt()
            .key_id(key_id)
            .plaintext(Blob::new(plaintext))
            .set_encryption_context(sdk_context(context));
        let output = self.bounded(KmsOperation::Encrypt, request.send()).await?;
        let invalid = || KeyError::kms(KmsOperation::Encrypt, KmsErrorKind::InvalidResponse);
        let ciphertext = output.ciphertext_blob.ok_or_else(invalid)?.into_inner();
        if ciphertext.is_empty() {
            return Err(invalid());
        }
        let key_arn = match output.key_id {
            Some(reported) => checked_key_arn(key_id, reported).ok_or_else(invalid)?,
            None => key_id.to_string(),
        };
        Ok(Encrypted {
            ciphertext,
            key_arn,
        })
    }

    async fn generate_data_key(
        &self,
        key_id: &str,
        context: &EncryptionContext,
    ) -> Result<DataKey, KeyError> {
        let request = self
            .client
            .generate_data_key()
            .key_id(key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(sdk_context(context));
        let output = self
            .bounded(KmsOperation::GenerateDataKey, request.send())
            .await?;
        let invalid =
            || KeyError::kms(KmsOperation::GenerateDataKey, KmsErrorKind::InvalidResponse);
        let mut plaintext_blob = output.plaintext.ok_or_else(invalid)?.into_inner();
        let plaintext = data_key_array(&plaintext_blob);
        plaintext_blob.zeroize();
        let plaintext = plaintext?;
        let ciphertext = output.ciphertext_blob.ok_or_else(invalid)?.into_inner();
        if ciphertext.is_empty() || ciphertext.len() > MAX_CIPHERTEXT_BLOB {
            return Err(invalid());
        }
        // The ESDK's provider info must be the key ARN; KMS always reports it here. It
        // is written into every message and header, so it must be one.
        let key_arn = output
            .key_id
            .and_then(|reported| checked_key_arn(key_id, reported))
            .ok_or_else(invalid)?;
        Ok(DataKey {
            plaintext,
            ciphertext,
            key_arn,
        })
    }

    async fn decrypt(
        &self,
        ciphertext: &[u8],
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, KeyError> {
        let request = self
            .client
            .decrypt()
            .ciphertext_blob(Blob::new(ciphertext))
            .set_encryption_context(sdk_context(context));
        let output = self.bounded(KmsOperation::Decrypt, request.send()).await?;
        output.plaintext.map(Blob::into_inner).ok_or(KeyError::Open)
    }
}

/// The encryption context as a KMS request takes it. With none (`kms.context = "none"`)
/// the field is left out rather than sent as an empty map, as it always was.
fn sdk_context(context: &EncryptionContext) -> Option<std::collections::HashMap<String, String>> {
    (!context.is_empty()).then(|| context.clone().into_iter().collect())
}

/// Copies a 32-byte data key into zeroizing storage; anything else is refused.
fn data_key_array(bytes: &[u8]) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != key.len() {
        return Err(KeyError::BadDataKey(bytes.len()));
    }
    key.copy_from_slice(bytes);
    Ok(key)
}

/// KMS ciphertext blobs of a 32-byte data key are about 180 bytes; anything near the
/// ESDK's 64 KiB field limit is not one.
const MAX_CIPHERTEXT_BLOB: usize = 6144;

/// The key ARN KMS reported, if it is one: it goes into message headers and the
/// `X-KMS-Key-ID` header, so an answer that carries anything else (a faulty or hostile
/// endpoint could put request data there) is refused. When `kms.key_id` is itself a key
/// ARN, KMS must report exactly it.
fn checked_key_arn(configured: &str, reported: String) -> Option<String> {
    if is_key_arn(configured) {
        return (reported == configured).then_some(reported);
    }
    is_key_arn(&reported).then_some(reported)
}

/// `arn:PARTITION:kms:REGION:ACCOUNT:key/ID` with the characters AWS uses.
fn is_key_arn(text: &str) -> bool {
    let mut parts = text.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("kms"), Some(region), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let word = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    text.len() <= 256
        && word(partition)
        && word(region)
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && resource
            .strip_prefix("key/")
            .is_some_and(|id| word(id) && id.len() <= 128)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::DEV_KEY_ARN;

    #[test]
    fn only_key_arns_pass_as_the_reported_key() {
        let arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_eq!(checked_key_arn(arn, arn.into()).as_deref(), Some(arn));
        assert_eq!(
            checked_key_arn("alias/app", arn.into()).as_deref(),
            Some(arn)
        );
        let other = "arn:aws:kms:us-east-1:123456789012:key/ffffffff-12ab-34cd-56ef-1234567890ab";
        assert_eq!(
            checked_key_arn(arn, other.into()),
            None,
            "not the configured key"
        );
        for bad in [
            "",
            "eyJwcm9tcHQiOiAiSGVsbG8ifQ==",
            "arn:aws:kms:us-east-1:123456789012:alias/app",
            "arn:aws:kms:us-east-1:12345:key/abc",
            "arn:aws:kms:us-east-1:123456789012:key/a b",
            "arn:aws:kms:us-east-1:123456789012:key/abc\nforged log line",
        ] {
            assert_eq!(checked_key_arn("alias/app", bad.into()), None, "{bad:?}");
        }
    }

    #[test]
    fn messages_are_short_and_name_what_to_check() {
        let refused = KeyError::Kms {
            operation: KmsOperation::Encrypt,
            kind: KmsErrorKind::NotFound,
            detail: KmsDetail {
                code: Some("NotFoundException"),
                status: Some(400),
            },
        };
        let text = refused.to_string();
        assert!(text.contains("kms.key_id") && text.contains("NotFoundException, HTTP 400"));
        assert!(refused.is_key_refusal());
        assert!(!KeyError::kms(KmsOperation::Encrypt, KmsErrorKind::Throttled).is_key_refusal());
        let none = KeyError::Credentials(CredentialsProblem::NotFound).to_string();
        assert!(
            none.contains("AWS_ACCESS_KEY_ID") && none.contains("IMDS"),
            "{none}"
        );
        for (code, _) in KMS_ERROR_CODES {
            assert!(code.bytes().all(|b| b.is_ascii_alphabetic()), "{code}");
        }
    }

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
