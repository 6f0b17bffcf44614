//! The data-key cache of the envelope format (`aws-esdk`): one KMS `GenerateDataKey` serves
//! many messages, as with the AWS Encryption SDK's caching CMM, so that neither gpulink's
//! latency nor its KMS bill grows with the request rate.
//!
//! * **Keyed** by encryption context within one cache; a cache belongs to one KMS key id
//!   (the [`super::Sealer`] makes a new cache when `kms.key_id` changes), so an entry is
//!   one (key id, encryption context) pair. With `kms.context = "tenant"` that is one entry
//!   per model pool: the entry count is bounded by the configuration.
//! * **Limits** (`[kms.cache]`): a data key is used for at most `max_age`, `max_messages`
//!   messages and `max_bytes` plaintext bytes. These are hard limits: a key past any of
//!   them is never used again, and is dropped (its plaintext zeroized once the last
//!   in-progress seal lets go of it).
//! * **Refreshed ahead of expiry**: once a key reaches 3/4 of any limit, a background task
//!   fetches the next one while the old key keeps serving, so after warm-up the request
//!   path never waits on KMS. A timer does the same at 3/4 of `max_age` for a key in use,
//!   so uneven traffic does not find the key expired either.
//! * **Single flight**: at most one `GenerateDataKey` per entry is in progress; every
//!   request that needs a key meanwhile waits for that one call. The call runs in its own
//!   task, so a client that goes away does not cancel it for the others.
//! * **Fail closed, degrade gently**: when a background refresh fails, the current key
//!   keeps serving until its hard limits (the refresh is retried with backoff); only a
//!   request that finds no usable key waits for KMS, and gets the error (503) if that
//!   fails.
//!
//! The counters ([`CacheCounters`]) are plain atomics for `/status` and the metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::esdk::EncryptedDataKey;
use super::keys::{DataKey, EncryptionContext, KeyError, KeyService};
use crate::config::KeyCache as KeyCacheConfig;

/// The ESDK key provider ID of AWS KMS encrypted data keys.
pub const PROVIDER_ID_AWS_KMS: &str = "aws-kms";

/// Fraction of each limit at which the next key is fetched in the background. Early
/// enough that a KMS call (10-30 ms, up to `kms.timeout` with retries) finishes long
/// before the hard limit at any realistic rate; late enough to cost few extra calls.
const REFRESH_AT_NUMERATOR: u32 = 3;
const REFRESH_AT_DENOMINATOR: u32 = 4;

/// Backoff between failed background refreshes (doubling), so an outage does not turn
/// every request into a KMS call while the current key still serves.
const REFRESH_BACKOFF_MIN: Duration = Duration::from_secs(1);
const REFRESH_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A safety bound on entries. The configuration bounds the contexts (one per model pool),
/// so this is only reached by misuse; then idle entries are forgotten.
const MAX_ENTRIES: usize = 1024;

/// The hard limits of one data key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    pub max_age: Duration,
    pub max_messages: u64,
    pub max_bytes: u64,
}

impl CacheLimits {
    pub fn from_config(config: &KeyCacheConfig) -> Self {
        Self {
            max_age: config.max_age.get(),
            max_messages: config.max_messages,
            max_bytes: config.max_bytes.bytes(),
        }
    }

    fn refresh_age(&self) -> Duration {
        self.max_age * REFRESH_AT_NUMERATOR / REFRESH_AT_DENOMINATOR
    }

    /// `used` has reached 3/4 of `limit` (computed without overflow or rounding down to 0).
    fn past_refresh_point(used: u64, limit: u64) -> bool {
        u128::from(used) * u128::from(REFRESH_AT_DENOMINATOR)
            >= u128::from(limit) * u128::from(REFRESH_AT_NUMERATOR)
    }
}

/// Counters of one cache (and of the caches that took it over on reload).
#[derive(Debug, Default)]
pub struct CacheCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    refreshes: AtomicU64,
    refresh_failures: AtomicU64,
    kms_calls: AtomicU64,
    kms_errors: AtomicU64,
    bypasses: AtomicU64,
}

impl CacheCounters {
    /// Requests served by a cached key without waiting.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
    /// Requests that found no usable key and waited for `GenerateDataKey`.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
    /// Background refreshes started ahead of a key's limits.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }
    /// Background refreshes that failed (the old key kept serving).
    pub fn refresh_failures(&self) -> u64 {
        self.refresh_failures.load(Ordering::Relaxed)
    }
    /// `GenerateDataKey` calls made by the cache.
    pub fn kms_calls(&self) -> u64 {
        self.kms_calls.load(Ordering::Relaxed)
    }
    /// `GenerateDataKey` calls that failed.
    pub fn kms_errors(&self) -> u64 {
        self.kms_errors.load(Ordering::Relaxed)
    }
    /// Messages larger than `max_bytes`: sealed under a key of their own, never cached.
    pub fn bypasses(&self) -> u64 {
        self.bypasses.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A data key as the sealer uses it: the plaintext key (zeroized on drop) and the
/// encrypted data key exactly as it is written into each message header.
pub struct CachedKey {
    data_key: DataKey,
    edk: EncryptedDataKey,
    created: Instant,
}

impl CachedKey {
    fn new(data_key: DataKey, created: Instant) -> Self {
        let edk = EncryptedDataKey {
            provider_id: PROVIDER_ID_AWS_KMS.to_string(),
            provider_info: data_key.key_arn.as_bytes().to_vec(),
            ciphertext: data_key.ciphertext.clone(),
        };
        Self {
            data_key,
            edk,
            created,
        }
    }

    pub fn plaintext(&self) -> &[u8; 32] {
        &self.data_key.plaintext
    }

    pub fn edk(&self) -> &EncryptedDataKey {
        &self.edk
    }

    /// The key ARN KMS reported (the EDK's provider info, and `X-KMS-Key-ID`).
    pub fn key_arn(&self) -> &str {
        &self.data_key.key_arn
    }
}

impl std::fmt::Debug for CachedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedKey")
            .field("key_arn", &self.data_key.key_arn)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// A data key handed out for one message.
#[derive(Debug, Clone)]
pub struct Acquired {
    pub key: Arc<CachedKey>,
    /// Served from the cache without waiting for KMS.
    pub hit: bool,
}

/// The key an entry is serving and what it has sealed so far.
struct InUse {
    key: Arc<CachedKey>,
    messages: u64,
    bytes: u64,
}

impl InUse {
    /// Room for one more message of `len` bytes (age aside).
    fn has_room(&self, len: u64, limits: &CacheLimits) -> bool {
        self.messages < limits.max_messages && self.bytes.saturating_add(len) <= limits.max_bytes
    }

    fn expired(&self, now: Instant, limits: &CacheLimits) -> bool {
        now.saturating_duration_since(self.key.created) >= limits.max_age
    }

    fn reserve(&mut self, len: u64) {
        self.messages += 1;
        self.bytes = self.bytes.saturating_add(len);
    }

    fn past_refresh_point(&self, now: Instant, limits: &CacheLimits) -> bool {
        now.saturating_duration_since(self.key.created) >= limits.refresh_age()
            || CacheLimits::past_refresh_point(self.messages, limits.max_messages)
            || CacheLimits::past_refresh_point(self.bytes, limits.max_bytes)
    }
}

/// Why a `GenerateDataKey` call is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flight {
    /// A request found no usable key and waits.
    Miss,
    /// The key in use is past its refresh point; nobody waits.
    Refresh,
    /// The start-up proof ([`DataKeyCache::warm`]), which logs its own failures.
    Warm,
}

/// `None` while the call is in progress; then its outcome, for every waiter.
type FlightOutcome = Option<Result<Arc<CachedKey>, KeyError>>;

#[derive(Default)]
struct EntryState {
    current: Option<InUse>,
    /// The `GenerateDataKey` call in progress, if any (single flight).
    flight: Option<watch::Receiver<FlightOutcome>>,
    /// No background refresh before this instant (backoff after a failure).
    refresh_not_before: Option<Instant>,
    consecutive_failures: u32,
    last_error: Option<String>,
}

struct Entry {
    context: EncryptionContext,
    state: Mutex<EntryState>,
}

impl Entry {
    fn lock(&self) -> MutexGuard<'_, EntryState> {
        // The state stays consistent at every unlock, so a panic elsewhere cannot have
        // left it half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The data-key cache of one KMS key.
pub struct DataKeyCache {
    inner: Arc<Inner>,
}

struct Inner {
    keys: KeyService,
    key_id: String,
    limits: CacheLimits,
    entries: Mutex<HashMap<EncryptionContext, Arc<Entry>>>,
    counters: Arc<CacheCounters>,
    /// Stops the age-refresh timers when the cache is dropped (e.g. replaced on reload).
    stop: CancellationToken,
    /// The `GenerateDataKey` fetches and the age-refresh timers, so that shutdown can
    /// wait for them.
    tasks: TaskTracker,
}

impl Drop for DataKeyCache {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

impl DataKeyCache {
    pub fn new(keys: KeyService, key_id: &str, limits: CacheLimits) -> Self {
        Self::with_counters(keys, key_id, limits, Arc::default())
    }

    /// A cache that adds to existing counters (so a replaced cache's totals continue).
    pub fn with_counters(
        keys: KeyService,
        key_id: &str,
        limits: CacheLimits,
        counters: Arc<CacheCounters>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                keys,
                key_id: key_id.to_string(),
                limits,
                entries: Mutex::new(HashMap::new()),
                counters,
                stop: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.inner.key_id
    }

    /// Stops the age-refresh timers and waits for the `GenerateDataKey` fetches under
    /// way (each bounded by `kms.timeout`).
    pub async fn shut_down(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    pub fn limits(&self) -> CacheLimits {
        self.inner.limits
    }

    pub fn counters(&self) -> &Arc<CacheCounters> {
        &self.inner.counters
    }

    /// A data key for one message of `plaintext_len` bytes under `context`, with the
    /// message already counted against the key's limits. Waits for KMS only when no
    /// cached key can take the message.
    pub async fn acquire(
        &self,
        context: &EncryptionContext,
        plaintext_len: u64,
    ) -> Result<Acquired, KeyError> {
        self.inner.acquire(context, plaintext_len).await
    }

    /// Fetches the first data key for `context` unless the entry has one or is fetching
    /// it (then waits for that call): the start-up proof that `GenerateDataKey` works,
    /// which also spares the first request the wait. Counts a KMS call, not a hit, a
    /// miss or a message; the caller logs a failure.
    pub async fn warm(&self, context: &EncryptionContext) -> Result<(), KeyError> {
        let inner = &self.inner;
        let entry = inner.entry(context);
        let flight = {
            let mut state = entry.lock();
            if state.current.is_some() {
                return Ok(());
            }
            match &state.flight {
                Some(flight) => flight.clone(),
                None => inner.start_flight(&entry, &mut state, Flight::Warm),
            }
        };
        inner.wait(&entry, flight).await.map(|_| ())
    }

    /// A snapshot for `/status`: limits, counters and each entry's current key. Never
    /// contains key material or encrypted data keys.
    pub fn state(&self) -> CacheState {
        let inner = &self.inner;
        let now = Instant::now();
        let entries: Vec<Arc<Entry>> = inner.lock_entries().values().cloned().collect();
        let mut entries: Vec<CacheEntryState> = entries
            .iter()
            .map(|entry| {
                let state = entry.lock();
                let current = state.current.as_ref();
                CacheEntryState {
                    context: entry.context.clone(),
                    key_arn: current.map(|c| c.key.key_arn().to_string()),
                    age_ms: current.map(|c| millis(now.saturating_duration_since(c.key.created))),
                    messages: current.map_or(0, |c| c.messages),
                    bytes: current.map_or(0, |c| c.bytes),
                    usable: current.is_some_and(|c| {
                        !c.expired(now, &inner.limits) && c.has_room(0, &inner.limits)
                    }),
                    fetching: state.flight.is_some(),
                    consecutive_failures: state.consecutive_failures,
                    last_error: state.last_error.clone(),
                }
            })
            .collect();
        entries.sort_by(|a, b| a.context.cmp(&b.context));
        let c = &inner.counters;
        CacheState {
            key_id: inner.key_id.clone(),
            max_age_ms: millis(inner.limits.max_age),
            max_messages: inner.limits.max_messages,
            max_bytes: inner.limits.max_bytes,
            hits: c.hits(),
            misses: c.misses(),
            refreshes: c.refreshes(),
            refresh_failures: c.refresh_failures(),
            kms_calls: c.kms_calls(),
            kms_errors: c.kms_errors(),
            bypasses: c.bypasses(),
            entries,
        }
    }
}

impl Inner {
    fn lock_entries(&self) -> MutexGuard<'_, HashMap<EncryptionContext, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn entry(&self, context: &EncryptionContext) -> Arc<Entry> {
        let mut entries = self.lock_entries();
        if let Some(entry) = entries.get(context) {
            return entry.clone();
        }
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, entry| entry.lock().flight.is_some());
        }
        let entry = Arc::new(Entry {
            context: context.clone(),
            state: Mutex::new(EntryState::default()),
        });
        entries.insert(context.clone(), entry.clone());
        entry
    }

    async fn acquire(
        self: &Arc<Self>,
        context: &EncryptionContext,
        len: u64,
    ) -> Result<Acquired, KeyError> {
        let limits = self.limits;
        if len > limits.max_bytes {
            // One message can never fit the byte limit: like the ESDK's caching CMM, seal
            // it under a key of its own and do not cache that key.
            CacheCounters::add(&self.counters.bypasses);
            let data_key = self.generate(context).await?;
            return Ok(Acquired {
                key: Arc::new(CachedKey::new(data_key, Instant::now())),
                hit: false,
            });
        }
        let entry = self.entry(context);
        let mut delivered: Option<Arc<CachedKey>> = None;
        let mut counted_miss = false;
        loop {
            let flight = {
                let mut state = entry.lock();
                let now = Instant::now();
                if let Some(current) = state.current.as_mut() {
                    // A key our own wait delivered is fresh for us whatever its age (it
                    // was made for this request), so only its message and byte limits
                    // apply; that also keeps a tiny `max_age` from looping forever.
                    let ours = delivered
                        .as_ref()
                        .is_some_and(|key| Arc::ptr_eq(key, &current.key));
                    if current.has_room(len, &limits) && (ours || !current.expired(now, &limits)) {
                        current.reserve(len);
                        let key = current.key.clone();
                        let refresh = current.past_refresh_point(now, &limits);
                        if !counted_miss {
                            CacheCounters::add(&self.counters.hits);
                        }
                        if refresh {
                            self.refresh_in_background(&entry, &mut state, now);
                        }
                        return Ok(Acquired {
                            key,
                            hit: !counted_miss,
                        });
                    }
                    if !ours {
                        // Past a hard limit: never used again. Dropping it here zeroizes
                        // the plaintext as soon as in-progress seals are done with it.
                        state.current = None;
                    }
                }
                if !counted_miss {
                    counted_miss = true;
                    CacheCounters::add(&self.counters.misses);
                }
                match &state.flight {
                    Some(flight) => flight.clone(),
                    None => self.start_flight(&entry, &mut state, Flight::Miss),
                }
            };
            delivered = Some(self.wait(&entry, flight).await?);
        }
    }

    /// Starts a background refresh unless one is running or the backoff forbids it.
    fn refresh_in_background(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        state: &mut EntryState,
        now: Instant,
    ) {
        if state.flight.is_some() || state.refresh_not_before.is_some_and(|t| now < t) {
            return;
        }
        CacheCounters::add(&self.counters.refreshes);
        let _ = self.start_flight(entry, state, Flight::Refresh);
    }

    /// Starts the entry's one `GenerateDataKey` call in its own task.
    fn start_flight(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        state: &mut EntryState,
        kind: Flight,
    ) -> watch::Receiver<FlightOutcome> {
        let (tx, rx) = watch::channel(None);
        state.flight = Some(rx.clone());
        let inner = self.clone();
        let entry = entry.clone();
        self.tasks
            .spawn(async move { inner.fetch(entry, tx, kind).await });
        rx
    }

    async fn generate(&self, context: &EncryptionContext) -> Result<DataKey, KeyError> {
        CacheCounters::add(&self.counters.kms_calls);
        let result = self.keys.generate_data_key(&self.key_id, context).await;
        if result.is_err() {
            CacheCounters::add(&self.counters.kms_errors);
        }
        result
    }

    async fn fetch(
        self: Arc<Self>,
        entry: Arc<Entry>,
        tx: watch::Sender<FlightOutcome>,
        kind: Flight,
    ) {
        let background = kind == Flight::Refresh;
        let result = self.generate(&entry.context).await;
        let now = Instant::now();
        let outcome = result.map(|data_key| Arc::new(CachedKey::new(data_key, now)));
        {
            let mut state = entry.lock();
            state.flight = None;
            match &outcome {
                Ok(key) => {
                    state.current = Some(InUse {
                        key: key.clone(),
                        messages: 0,
                        bytes: 0,
                    });
                    state.consecutive_failures = 0;
                    state.refresh_not_before = None;
                    state.last_error = None;
                    self.schedule_age_refresh(&entry, key);
                }
                Err(error) => {
                    if background {
                        CacheCounters::add(&self.counters.refresh_failures);
                    }
                    state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                    state.refresh_not_before =
                        Some(now + refresh_backoff(state.consecutive_failures));
                    state.last_error = Some(error.to_string());
                    let serving = state.current.is_some();
                    if kind != Flight::Warm {
                        tracing::warn!(
                            %error,
                            background,
                            serving_cached_key = serving,
                            "KMS GenerateDataKey failed"
                        );
                    }
                }
            }
        }
        // Nobody may be waiting (a background refresh): that is fine.
        let _ = tx.send(Some(outcome));
    }

    async fn wait(
        &self,
        entry: &Entry,
        mut flight: watch::Receiver<FlightOutcome>,
    ) -> Result<Arc<CachedKey>, KeyError> {
        let outcome = match flight.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => None,
        };
        match outcome {
            Some(result) => result,
            None => {
                // The fetch task ended without an answer (the runtime is shutting down):
                // forget it so that the next request starts a new one.
                let mut state = entry.lock();
                if state
                    .flight
                    .as_ref()
                    .is_some_and(|f| f.same_channel(&flight))
                {
                    state.flight = None;
                }
                Err(KeyError::Kms {
                    operation: super::keys::KmsOperation::GenerateDataKey,
                    kind: super::keys::KmsErrorKind::Interrupted,
                    detail: Default::default(),
                })
            }
        }
    }

    /// At 3/4 of `max_age`, refresh the key if it is being used, so that a request
    /// arriving after a quiet spell does not find it expired.
    fn schedule_age_refresh(self: &Arc<Self>, entry: &Arc<Entry>, key: &Arc<CachedKey>) {
        let at = key.created + self.limits.refresh_age();
        let inner = Arc::downgrade(self);
        let entry = Arc::downgrade(entry);
        let key = Arc::downgrade(key);
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(at) => {}
            }
            let (Some(inner), Some(entry)) = (inner.upgrade(), entry.upgrade()) else {
                return;
            };
            let mut state = entry.lock();
            let in_use = state
                .current
                .as_ref()
                .is_some_and(|c| Weak::as_ptr(&key) == Arc::as_ptr(&c.key) && c.messages > 0);
            if in_use {
                inner.refresh_in_background(&entry, &mut state, Instant::now());
            }
        });
    }
}

fn refresh_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    REFRESH_BACKOFF_MIN
        .saturating_mul(1u32 << doublings)
        .min(REFRESH_BACKOFF_MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What `/status` shows about the data-key cache.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheState {
    pub key_id: String,
    pub max_age_ms: u64,
    pub max_messages: u64,
    pub max_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub refreshes: u64,
    pub refresh_failures: u64,
    pub kms_calls: u64,
    pub kms_errors: u64,
    pub bypasses: u64,
    pub entries: Vec<CacheEntryState>,
}

/// One (key, context) entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheEntryState {
    pub context: EncryptionContext,
    /// The ARN of the key the current data key belongs to (none before the first fetch).
    pub key_arn: Option<String>,
    pub age_ms: Option<u64>,
    /// Messages and plaintext bytes sealed under the current data key.
    pub messages: u64,
    pub bytes: u64,
    /// Whether the current data key can take another message now.
    pub usable: bool,
    /// A `GenerateDataKey` call is in progress.
    pub fetching: bool,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::DevKeys;

    fn dev() -> (KeyService, Arc<DevKeys>) {
        let dev = Arc::new(DevKeys::new().expect("dev keys"));
        (KeyService::Dev(dev.clone()), dev)
    }

    fn ctx(pool: &str) -> EncryptionContext {
        let mut c = EncryptionContext::new();
        c.insert("tenant_id".into(), "t".into());
        c.insert("model_pool".into(), pool.into());
        c
    }

    fn limits(max_age_s: u64, max_messages: u64, max_bytes: u64) -> CacheLimits {
        CacheLimits {
            max_age: Duration::from_secs(max_age_s),
            max_messages,
            max_bytes,
        }
    }

    /// Lets spawned tasks (timers that just fired, background fetches) run, then waits
    /// until no fetch is in progress for `context`. The clock is paused: yielding never
    /// moves it.
    async fn settle(cache: &DataKeyCache, context: &EncryptionContext) {
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        loop {
            let entry = cache.inner.entry(context);
            let flight = entry.lock().flight.clone();
            match flight {
                Some(mut rx) => {
                    let _ = rx.wait_for(Option::is_some).await;
                }
                None => return,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn max_messages_is_a_hard_limit_and_refresh_comes_early() {
        let (keys, _) = dev();
        let cache = DataKeyCache::new(keys.clone(), "k", limits(3600, 4, u64::MAX));
        let c = ctx("a");
        let first = cache.acquire(&c, 10).await.unwrap().key;
        assert_eq!(cache.counters().kms_calls(), 1);
        assert_eq!(cache.counters().misses(), 1);
        for _ in 0..2 {
            let k = cache.acquire(&c, 10).await.unwrap().key;
            assert!(Arc::ptr_eq(&k, &first));
        }
        // Message 3 of 4 reaches 3/4: a background refresh starts, the old key serves.
        assert_eq!(cache.counters().refreshes(), 1);
        settle(&cache, &c).await;
        assert_eq!(cache.counters().kms_calls(), 2);
        let next = cache.acquire(&c, 10).await.unwrap().key;
        assert!(!Arc::ptr_eq(&next, &first), "the refreshed key serves next");
        assert_eq!(
            cache.counters().misses(),
            1,
            "no request waited after warm-up"
        );
        assert_eq!(cache.counters().hits(), 3);
        assert_eq!(keys.stats().generate_data_key.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_key_is_never_reused_even_without_a_refresh() {
        let (keys, dev) = dev();
        let cache = DataKeyCache::new(keys, "k", limits(3600, 2, u64::MAX));
        let c = ctx("a");
        let first = cache.acquire(&c, 1).await.unwrap().key;
        dev.set_unavailable(true);
        // Message 2 of 2 is served; the refresh it triggers fails.
        let second = cache.acquire(&c, 1).await.unwrap().key;
        assert!(Arc::ptr_eq(&first, &second));
        settle(&cache, &c).await;
        assert_eq!(cache.counters().refresh_failures(), 1);
        // Message 3 would exceed the limit: it waits for KMS, which fails.
        let err = cache.acquire(&c, 1).await.unwrap_err();
        assert!(matches!(err, KeyError::Unavailable), "{err}");
        let state = cache.state();
        assert_eq!(state.entries.len(), 1);
        assert!(
            state.entries[0].key_arn.is_none(),
            "the exhausted key is gone"
        );
        assert!(state.entries[0].last_error.is_some());
        // KMS comes back: the next request gets a new key.
        dev.set_unavailable(false);
        let third = cache.acquire(&c, 1).await.unwrap().key;
        assert!(!Arc::ptr_eq(&first, &third));
    }

    #[tokio::test(start_paused = true)]
    async fn max_bytes_is_a_hard_limit() {
        let (keys, _) = dev();
        let cache = DataKeyCache::new(keys, "k", limits(3600, 1000, 100));
        let c = ctx("a");
        let first = cache.acquire(&c, 60).await.unwrap().key;
        assert_eq!(
            cache.counters().refreshes(),
            0,
            "60 of 100 bytes is under 3/4"
        );
        // 60 + 50 > 100: a new key.
        let second = cache.acquire(&c, 50).await.unwrap().key;
        assert!(!Arc::ptr_eq(&first, &second));
        let third = cache.acquire(&c, 50).await.unwrap().key;
        assert!(Arc::ptr_eq(&second, &third), "100 bytes fit exactly");
        // A message larger than max_bytes gets a key of its own, never cached.
        let big = cache.acquire(&c, 101).await.unwrap().key;
        assert!(!Arc::ptr_eq(&big, &third));
        assert_eq!(cache.counters().bypasses(), 1);
        settle(&cache, &c).await;
        let state = cache.state();
        assert_ne!(state.entries[0].key_arn, None);
    }

    #[tokio::test(start_paused = true)]
    async fn max_age_refreshes_in_the_background_then_expires() {
        let (keys, dev) = dev();
        let cache = DataKeyCache::new(keys, "k", limits(100, 1_000_000, u64::MAX));
        let c = ctx("a");
        let first = cache.acquire(&c, 1).await.unwrap().key;
        // Before 3/4 of the age: the same key, no refresh.
        tokio::time::advance(Duration::from_secs(74)).await;
        assert!(Arc::ptr_eq(
            &cache.acquire(&c, 1).await.unwrap().key,
            &first
        ));
        assert_eq!(cache.counters().refreshes(), 0);
        // At 3/4 the timer refreshes a key in use, with no request involved.
        tokio::time::advance(Duration::from_secs(2)).await;
        settle(&cache, &c).await;
        assert_eq!(cache.counters().refreshes(), 1);
        assert_eq!(cache.counters().kms_calls(), 2);
        let second = cache.acquire(&c, 1).await.unwrap().key;
        assert!(!Arc::ptr_eq(&second, &first));
        assert_eq!(cache.counters().misses(), 1);

        // With KMS down, the key serves until max_age, then requests fail.
        dev.set_unavailable(true);
        tokio::time::advance(Duration::from_secs(80)).await; // past 3/4: refresh fails
        settle(&cache, &c).await;
        assert!(cache.counters().refresh_failures() >= 1);
        assert!(Arc::ptr_eq(
            &cache.acquire(&c, 1).await.unwrap().key,
            &second
        ));
        tokio::time::advance(Duration::from_secs(20)).await; // 100 s: expired
        assert!(cache.acquire(&c, 1).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cold_miss_makes_one_call_however_many_wait() {
        let (keys, _) = dev();
        let cache = Arc::new(DataKeyCache::new(
            keys,
            "k",
            limits(3600, 1_000_000, u64::MAX),
        ));
        let c = ctx("a");
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let cache = cache.clone();
                let c = c.clone();
                tokio::spawn(async move { cache.acquire(&c, 1).await.map(|a| a.key) })
            })
            .collect();
        let mut first: Option<Arc<CachedKey>> = None;
        for task in tasks {
            let key = task.await.unwrap().unwrap();
            if let Some(f) = &first {
                assert!(Arc::ptr_eq(f, &key));
            }
            first = Some(key);
        }
        assert_eq!(cache.counters().kms_calls(), 1);
        // Each context is its own entry.
        cache.acquire(&ctx("b"), 1).await.unwrap();
        assert_eq!(cache.counters().kms_calls(), 2);
        assert_eq!(cache.state().entries.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_cold_miss_fails_every_waiter_with_one_call() {
        let (keys, dev) = dev();
        dev.set_unavailable(true);
        let cache = Arc::new(DataKeyCache::new(keys, "k", limits(3600, 10, u64::MAX)));
        let c = ctx("a");
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let cache = cache.clone();
                let c = c.clone();
                tokio::spawn(async move { cache.acquire(&c, 1).await.map(|a| a.key) })
            })
            .collect();
        for task in tasks {
            assert!(task.await.unwrap().is_err());
        }
        assert_eq!(cache.counters().kms_calls(), 1);
        assert_eq!(cache.counters().kms_errors(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_key_is_bound_to_its_context() {
        let (keys, _) = dev();
        let cache = DataKeyCache::new(keys.clone(), "k", limits(3600, 10, u64::MAX));
        let key = cache.acquire(&ctx("a"), 1).await.unwrap().key;
        assert_eq!(key.edk().provider_id, PROVIDER_ID_AWS_KMS);
        assert_eq!(key.edk().provider_info, key.key_arn().as_bytes());
        let opened = keys
            .decrypt(&key.edk().ciphertext, &ctx("a"))
            .await
            .unwrap();
        assert_eq!(&opened[..], &key.plaintext()[..]);
        assert!(keys
            .decrypt(&key.edk().ciphertext, &ctx("b"))
            .await
            .is_err());
    }

    #[test]
    fn refresh_point_and_backoff() {
        assert!(!CacheLimits::past_refresh_point(2, 3));
        assert!(CacheLimits::past_refresh_point(3, 3));
        assert!(CacheLimits::past_refresh_point(0, 0));
        assert!(CacheLimits::past_refresh_point(75, 100));
        assert!(!CacheLimits::past_refresh_point(74, 100));
        // No overflow at the extremes.
        assert!(!CacheLimits::past_refresh_point(u64::MAX / 2, u64::MAX));
        assert!(CacheLimits::past_refresh_point(u64::MAX, u64::MAX));
        assert_eq!(refresh_backoff(1), Duration::from_secs(1));
        assert_eq!(refresh_backoff(3), Duration::from_secs(4));
        assert_eq!(refresh_backoff(100), REFRESH_BACKOFF_MAX);
    }
}
