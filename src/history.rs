//! The last 15 minutes of requests, in memory, for `/status` and the status page: per
//! route (`privatelink`, `public`, and `none` for answers made before routing), how many
//! requests finished with 2xx, 4xx and 5xx, which error codes, and how long they took, in
//! a ring of [`BUCKETS`] coarse buckets of [`BUCKET_SECONDS`] each. It answers "are my
//! requests succeeding, and is PrivateLink faster than the public route?" at a glance,
//! without a Prometheus; `/metrics` remains the place for history beyond that.
//!
//! Bounded by construction: a fixed number of buckets, a fixed latency histogram per
//! bucket and route, at most [`CODES_PER_BUCKET`] distinct error codes per bucket and
//! route (more count as `other`), and the last failure of at most [`MAX_ENDPOINTS`]
//! endpoints. One short lock per finished request; no allocation once a bucket's code
//! list has grown. Nothing secret is kept: status codes, gpulink's error codes and
//! messages (which never carry bodies, keys or what KMS answered), and durations.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use serde_json::{json, Value};

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::metrics::EndpointLabels;

/// Width of one bucket.
pub const BUCKET_SECONDS: u64 = 10;
/// Buckets kept: 90 × 10 s = the last 15 minutes.
pub const BUCKETS: usize = 90;
/// Distinct error codes counted per bucket and route; the rest count as `other`.
pub const CODES_PER_BUCKET: usize = 8;
/// Endpoints whose last failed request is remembered (endpoints are bounded by the
/// configuration; this bounds what reloads that rename them leave behind).
pub const MAX_ENDPOINTS: usize = 64;
/// Error codes listed per route in `/status`.
const TOP_CODES: usize = 5;
/// Longest error message kept for an endpoint's last failure.
const MAX_MESSAGE: usize = 300;

/// Latency histogram: bucket `i` holds samples up to `GROWTH^i` ms (the last one
/// everything longer), so the relative error of a quantile stays under 15 % from 1 ms
/// to a minute, enough to tell PrivateLink's 150 ms from the public route's 170 ms.
const LATENCY_BINS: usize = 80;
const GROWTH: f64 = 1.15;

/// The route a request was answered on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Privatelink,
    Public,
    /// Answered before routing (refused at ingress, KMS unavailable).
    None,
}

impl Route {
    pub const ALL: [Route; 3] = [Route::Privatelink, Route::Public, Route::None];

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Privatelink => "privatelink",
            Route::Public => "public",
            Route::None => "none",
        }
    }

    fn index(self) -> usize {
        match self {
            Route::Privatelink => 0,
            Route::Public => 1,
            Route::None => 2,
        }
    }

    fn parse(route: &str) -> Route {
        match route {
            "privatelink" => Route::Privatelink,
            "public" => Route::Public,
            _ => Route::None,
        }
    }
}

/// An error as counted: gpulink's own code, or the status a cluster answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Gpulink(&'static str),
    Cluster(u16),
    /// Codes past [`CODES_PER_BUCKET`] in one bucket.
    Other,
}

impl ErrorCode {
    pub fn label(self) -> String {
        match self {
            ErrorCode::Gpulink(code) => code.to_string(),
            ErrorCode::Cluster(status) => format!("cluster_{status}"),
            ErrorCode::Other => "other".to_string(),
        }
    }
}

/// One finished request, as the ring counts it.
#[derive(Clone, Debug)]
pub struct Outcome<'a> {
    pub route: Route,
    pub status: u16,
    /// Set for 4xx and 5xx answers.
    pub code: Option<ErrorCode>,
    /// Time to the response headers, for answers relayed from the cluster (gpulink's
    /// own errors would blur the comparison of routes).
    pub latency: Option<Duration>,
    /// The endpoint it was answered by or attributed to, and for a failure, what the app
    /// was told.
    pub endpoint: Option<&'a str>,
    pub message: Option<String>,
}

#[derive(Clone, Default)]
struct RouteBucket {
    /// 2xx, 4xx, 5xx, and anything else (1xx, 3xx).
    classes: [u32; 4],
    codes: Vec<(ErrorCode, u32)>,
    latency: LatencyHistogram,
}

#[derive(Clone)]
struct LatencyHistogram {
    bins: [u32; LATENCY_BINS],
    count: u32,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            bins: [0; LATENCY_BINS],
            count: 0,
        }
    }
}

impl LatencyHistogram {
    fn bin(latency: Duration) -> usize {
        let ms = latency.as_secs_f64() * 1000.0;
        if ms <= 1.0 {
            return 0;
        }
        let bin = (ms.ln() / GROWTH.ln()).ceil();
        (bin as usize).min(LATENCY_BINS - 1)
    }

    fn upper_ms(bin: usize) -> f64 {
        GROWTH.powi(bin as i32)
    }

    fn record(&mut self, bin: usize) {
        self.bins[bin] = self.bins[bin].saturating_add(1);
        self.count = self.count.saturating_add(1);
    }

    fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.bins.iter_mut().zip(other.bins.iter()) {
            *mine = mine.saturating_add(*theirs);
        }
        self.count = self.count.saturating_add(other.count);
    }

    /// The `q` quantile in milliseconds, interpolated within its bin; `None` without
    /// samples.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * f64::from(self.count)).max(1.0);
        let mut seen = 0.0;
        for (bin, &n) in self.bins.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let before = seen;
            seen += f64::from(n);
            if seen >= rank {
                let lower = if bin == 0 {
                    0.0
                } else {
                    Self::upper_ms(bin - 1)
                };
                let upper = Self::upper_ms(bin);
                let within = (rank - before) / f64::from(n);
                return Some(lower + (upper - lower) * within);
            }
        }
        Some(Self::upper_ms(LATENCY_BINS - 1))
    }
}

#[derive(Clone, Default)]
struct Bucket {
    /// Which 10-second interval since the ring started this slot holds now.
    index: u64,
    routes: [RouteBucket; 3],
}

/// An endpoint's last failed request.
#[derive(Clone, Debug)]
struct LastFailure {
    at: chrono::DateTime<chrono::Utc>,
    status: u16,
    code: ErrorCode,
    message: Option<String>,
}

struct Ring {
    buckets: Vec<Bucket>,
    last_failures: HashMap<String, LastFailure>,
}

/// The ring; one per process, outliving configuration generations.
pub struct History {
    started: Instant,
    started_wall: chrono::DateTime<chrono::Utc>,
    ring: Mutex<Ring>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    pub fn new() -> Self {
        Self::starting_at(Instant::now(), chrono::Utc::now())
    }

    /// A ring whose first bucket starts at `started` (`started_wall` on the wall clock).
    pub fn starting_at(started: Instant, started_wall: chrono::DateTime<chrono::Utc>) -> Self {
        let mut buckets = vec![Bucket::default(); BUCKETS];
        // No slot may pass for a bucket it never held: index 0 is the first real one.
        for bucket in &mut buckets {
            bucket.index = u64::MAX;
        }
        Self {
            started,
            started_wall,
            ring: Mutex::new(Ring {
                buckets,
                last_failures: HashMap::new(),
            }),
        }
    }

    fn bucket_index(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs() / BUCKET_SECONDS
    }

    /// Counts one request that gpulink answered: the forwarder's result, the endpoint
    /// its last attempt went to (or the route it would have taken), and how long it took.
    pub fn request_finished(
        &self,
        result: &Result<Response<ProxyBody>, ProxyError>,
        attribution: Option<&EndpointLabels>,
        elapsed: Duration,
    ) {
        let outcome = match result {
            Ok(response) => {
                // A relayed answer's attribution is the endpoint that answered.
                let served = attribution;
                let status = response.status();
                Outcome {
                    route: served.map_or(Route::None, |s| Route::parse(s.route)),
                    status: status.as_u16(),
                    code: is_error(status).then_some(ErrorCode::Cluster(status.as_u16())),
                    latency: Some(elapsed),
                    endpoint: served.map(|s| s.endpoint.as_str()),
                    message: None,
                }
            }
            Err(error) => {
                let status = error.status();
                let endpoint = attribution
                    .map(|a| a.endpoint.as_str())
                    .filter(|e| *e != "none");
                Outcome {
                    route: attribution.map_or(Route::None, |a| Route::parse(a.route)),
                    status: status.as_u16(),
                    code: Some(ErrorCode::Gpulink(error.code().as_str())),
                    latency: None,
                    endpoint,
                    // Only an endpoint's 5xx is remembered with its message: a flood of
                    // refusals (overloaded, bad requests) costs no allocation here.
                    message: (status.is_server_error() && endpoint.is_some())
                        .then(|| error.to_string()),
                }
            }
        };
        self.record_at(Instant::now(), chrono::Utc::now(), outcome);
    }

    /// Counts `outcome` as finished at `now` (`wall` on the wall clock).
    pub fn record_at(&self, now: Instant, wall: chrono::DateTime<chrono::Utc>, outcome: Outcome) {
        let index = self.bucket_index(now);
        let bin = outcome.latency.map(LatencyHistogram::bin);
        let failure = match (outcome.code, outcome.endpoint) {
            (Some(code), Some(endpoint)) if outcome.status >= 500 => Some((
                endpoint,
                LastFailure {
                    at: wall,
                    status: outcome.status,
                    code,
                    message: outcome.message.map(|m| truncate(m, MAX_MESSAGE)),
                },
            )),
            _ => None,
        };
        let Ok(mut guard) = self.ring.lock() else {
            return;
        };
        let ring = &mut *guard;
        let slot = &mut ring.buckets[(index % BUCKETS as u64) as usize];
        if slot.index != index {
            slot.index = index;
            for route in &mut slot.routes {
                route.classes = [0; 4];
                route.codes.clear();
                route.latency = LatencyHistogram::default();
            }
        }
        let route = &mut slot.routes[outcome.route.index()];
        let class = match outcome.status / 100 {
            2 => 0,
            4 => 1,
            5 => 2,
            _ => 3,
        };
        route.classes[class] = route.classes[class].saturating_add(1);
        if let Some(code) = outcome.code {
            count_code(&mut route.codes, code);
        }
        if let Some(bin) = bin {
            route.latency.record(bin);
        }
        if let Some((endpoint, failure)) = failure {
            if let Some(last) = ring.last_failures.get_mut(endpoint) {
                *last = failure;
            } else {
                if ring.last_failures.len() >= MAX_ENDPOINTS {
                    // Room for the new one: forget the endpoint that failed longest ago.
                    let oldest = ring
                        .last_failures
                        .iter()
                        .min_by_key(|(_, f)| f.at)
                        .map(|(name, _)| name.clone());
                    if let Some(oldest) = oldest {
                        ring.last_failures.remove(&oldest);
                    }
                }
                ring.last_failures.insert(endpoint.to_string(), failure);
            }
        }
    }

    /// The last 5xx answer attributed to `endpoint`, as JSON (`null` if none).
    pub fn last_failure(&self, endpoint: &str) -> Value {
        let Ok(ring) = self.ring.lock() else {
            return Value::Null;
        };
        ring.last_failures.get(endpoint).map_or(Value::Null, |f| {
            json!({
                "at": f.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "status": f.status,
                "code": f.code.label(),
                "message": f.message,
            })
        })
    }

    /// The `traffic` section of `/status`: totals over the window per route and the
    /// per-bucket series, oldest first.
    pub fn to_json(&self) -> Value {
        self.to_json_at(Instant::now())
    }

    pub fn to_json_at(&self, now: Instant) -> Value {
        let current = self.bucket_index(now);
        let elapsed = now.saturating_duration_since(self.started);
        let Ok(ring) = self.ring.lock() else {
            return Value::Null;
        };
        // Bucket k of the series is interval `first + k`; intervals before the ring
        // started are not covered (null), the current one only for its elapsed part.
        let first = current as i64 - (BUCKETS as i64 - 1);
        let mut covered = Vec::with_capacity(BUCKETS);
        let mut slots: Vec<Option<&Bucket>> = Vec::with_capacity(BUCKETS);
        for k in 0..BUCKETS as i64 {
            let interval = first + k;
            if interval < 0 {
                covered.push(0.0);
                slots.push(None);
                continue;
            }
            let interval = interval as u64;
            let seconds = if interval == current {
                (elapsed.as_secs_f64() - (interval * BUCKET_SECONDS) as f64).max(1.0)
            } else {
                BUCKET_SECONDS as f64
            };
            covered.push(seconds);
            let slot = &ring.buckets[(interval % BUCKETS as u64) as usize];
            slots.push((slot.index == interval).then_some(slot));
        }
        let window_seconds: f64 = covered.iter().sum();
        let mut routes = serde_json::Map::new();
        let mut series = serde_json::Map::new();
        let mut all_codes: Vec<(ErrorCode, u32)> = Vec::new();
        for route in Route::ALL {
            let mut classes = [0u64; 4];
            let mut codes: Vec<(ErrorCode, u32)> = Vec::new();
            let mut latency = LatencyHistogram::default();
            let (mut rate, mut errors, mut p50, mut p99) = (vec![], vec![], vec![], vec![]);
            for (k, slot) in slots.iter().enumerate() {
                let bucket = slot.map(|s| &s.routes[route.index()]);
                if covered[k] == 0.0 {
                    for s in [&mut rate, &mut errors, &mut p50, &mut p99] {
                        s.push(Value::Null);
                    }
                    continue;
                }
                let Some(bucket) = bucket else {
                    rate.push(json!(0.0));
                    for s in [&mut errors, &mut p50, &mut p99] {
                        s.push(Value::Null);
                    }
                    continue;
                };
                for (sum, n) in classes.iter_mut().zip(bucket.classes) {
                    *sum += u64::from(n);
                }
                for &(code, n) in &bucket.codes {
                    add_code(&mut codes, code, n);
                }
                latency.merge(&bucket.latency);
                let total: u32 = bucket.classes.iter().sum();
                rate.push(json!(round(f64::from(total) / covered[k], 3)));
                errors.push(if total == 0 {
                    Value::Null
                } else {
                    json!(round(f64::from(bucket.classes[2]) / f64::from(total), 4))
                });
                p50.push(quantile(&bucket.latency, 0.5));
                p99.push(quantile(&bucket.latency, 0.99));
            }
            let total: u64 = classes.iter().sum();
            for &(code, n) in &codes {
                add_code(&mut all_codes, code, n);
            }
            routes.insert(
                route.as_str().into(),
                json!({
                    "requests": total,
                    "2xx": classes[0],
                    "4xx": classes[1],
                    "5xx": classes[2],
                    "other": classes[3],
                    "per_second": round(total as f64 / window_seconds.max(1.0), 3),
                    "error_rate": if total == 0 { Value::Null } else { json!(round(classes[2] as f64 / total as f64, 4)) },
                    "p50_ms": quantile(&latency, 0.5),
                    "p99_ms": quantile(&latency, 0.99),
                    "top_errors": top(codes),
                }),
            );
            if route != Route::None {
                series.insert(
                    route.as_str().into(),
                    json!({
                        "requests_per_second": rate,
                        "error_rate": errors,
                        "p50_ms": p50,
                        "p99_ms": p99,
                    }),
                );
            }
        }
        let newest_start = self.started_wall
            + chrono::Duration::seconds((current * BUCKET_SECONDS).min(i64::MAX as u64) as i64);
        json!({
            "bucket_seconds": BUCKET_SECONDS,
            "buckets": BUCKETS,
            "window_seconds": round(window_seconds, 1),
            // The start of the newest (current, partial) bucket; the series end with it.
            "newest_bucket_start": newest_start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "routes": routes,
            "top_errors": top(all_codes),
            "series": series,
        })
    }
}

fn is_error(status: StatusCode) -> bool {
    status.is_client_error() || status.is_server_error()
}

fn count_code(codes: &mut Vec<(ErrorCode, u32)>, code: ErrorCode) {
    if let Some(entry) = codes.iter_mut().find(|(c, _)| *c == code) {
        entry.1 = entry.1.saturating_add(1);
    } else if codes.len() < CODES_PER_BUCKET - 1 {
        codes.push((code, 1));
    } else {
        // The last place is `other`'s.
        match codes.iter_mut().find(|(c, _)| *c == ErrorCode::Other) {
            Some(other) => other.1 = other.1.saturating_add(1),
            None => codes.push((ErrorCode::Other, 1)),
        }
    }
}

fn add_code(codes: &mut Vec<(ErrorCode, u32)>, code: ErrorCode, n: u32) {
    match codes.iter_mut().find(|(c, _)| *c == code) {
        Some(entry) => entry.1 = entry.1.saturating_add(n),
        None => codes.push((code, n)),
    }
}

fn top(mut codes: Vec<(ErrorCode, u32)>) -> Value {
    codes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.label().cmp(&b.0.label())));
    codes
        .into_iter()
        .take(TOP_CODES)
        .map(|(code, count)| json!({"code": code.label(), "count": count}))
        .collect()
}

fn quantile(histogram: &LatencyHistogram, q: f64) -> Value {
    histogram
        .quantile_ms(q)
        .map_or(Value::Null, |ms| json!(round(ms, 1)))
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(route: Route, ms: u64) -> Outcome<'static> {
        Outcome {
            route,
            status: 200,
            code: None,
            latency: Some(Duration::from_millis(ms)),
            endpoint: Some("10.0.0.1:443"),
            message: None,
        }
    }

    fn failed(route: Route, code: &'static str) -> Outcome<'static> {
        Outcome {
            route,
            status: 503,
            code: Some(ErrorCode::Gpulink(code)),
            latency: None,
            endpoint: Some("10.0.0.1:443"),
            message: Some(format!("{code} happened")),
        }
    }

    fn ring() -> (History, Instant, chrono::DateTime<chrono::Utc>) {
        let start = Instant::now();
        let wall = chrono::Utc::now();
        (History::starting_at(start, wall), start, wall)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn counts_outcomes_per_route_with_rates_and_codes() {
        let (h, t0, w) = ring();
        for _ in 0..8 {
            h.record_at(t0 + secs(1), w, ok(Route::Privatelink, 150));
        }
        h.record_at(
            t0 + secs(2),
            w,
            failed(Route::Privatelink, "upstream_timeout"),
        );
        h.record_at(
            t0 + secs(2),
            w,
            failed(Route::Privatelink, "upstream_timeout"),
        );
        h.record_at(t0 + secs(3), w, ok(Route::Public, 170));
        let json = h.to_json_at(t0 + secs(10));
        let pl = &json["routes"]["privatelink"];
        assert_eq!(pl["requests"], 10);
        assert_eq!(pl["2xx"], 8);
        assert_eq!(pl["5xx"], 2);
        assert_eq!(pl["error_rate"], 0.2);
        assert_eq!(pl["top_errors"][0]["code"], "upstream_timeout");
        assert_eq!(pl["top_errors"][0]["count"], 2);
        assert_eq!(json["routes"]["public"]["requests"], 1);
        assert_eq!(json["routes"]["none"]["requests"], 0);
        // The window so far: the first 10 s bucket and 1 s of the second.
        assert_eq!(json["window_seconds"], 11.0);
        let series = json["series"]["privatelink"]["requests_per_second"]
            .as_array()
            .unwrap();
        assert_eq!(series.len(), BUCKETS);
        assert_eq!(series[BUCKETS - 2], 1.0, "10 requests in a 10 s bucket");
        assert_eq!(
            series[BUCKETS - 1],
            0.0,
            "nothing yet in the current bucket"
        );
        assert!(series[0].is_null(), "before the start is not covered");
        let p50 = pl["p50_ms"].as_f64().unwrap();
        assert!((130.0..=175.0).contains(&p50), "{p50}");
    }

    #[test]
    fn buckets_roll_over_and_old_ones_leave_the_window() {
        let (h, t0, w) = ring();
        h.record_at(t0, w, failed(Route::Public, "no_endpoint"));
        h.record_at(t0 + secs(15), w, ok(Route::Public, 5));
        let json = h.to_json_at(t0 + secs(15));
        assert_eq!(json["routes"]["public"]["requests"], 2);
        // 90 buckets later the same slot holds a new interval: the first bucket is gone.
        let later = t0 + secs(BUCKET_SECONDS * BUCKETS as u64);
        h.record_at(later, w, ok(Route::Public, 5));
        let json = h.to_json_at(later);
        assert_eq!(json["routes"]["public"]["requests"], 2);
        assert_eq!(json["routes"]["public"]["5xx"], 0);
        assert_eq!(json["routes"]["public"]["top_errors"], json!([]));
        // Long after, nothing is left but the window is full and zero.
        let json = h.to_json_at(later + secs(3600));
        assert_eq!(json["routes"]["public"]["requests"], 0);
        assert_eq!(json["window_seconds"].as_f64().unwrap(), 891.0);
        let rates = json["series"]["public"]["requests_per_second"]
            .as_array()
            .unwrap();
        assert!(rates.iter().all(|r| r == 0.0));
        assert!(json["series"]["public"]["p99_ms"]
            .as_array()
            .unwrap()
            .iter()
            .all(Value::is_null));
    }

    #[test]
    fn error_codes_per_bucket_are_bounded() {
        let (h, t0, w) = ring();
        const CODES: [&str; 12] = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"];
        for code in CODES {
            h.record_at(t0, w, failed(Route::Privatelink, code));
        }
        let ring = h.ring.lock().unwrap();
        let codes = &ring.buckets[0].routes[0].codes;
        assert_eq!(codes.len(), CODES_PER_BUCKET);
        let other = codes.iter().find(|(c, _)| *c == ErrorCode::Other).unwrap();
        assert_eq!(other.1 as usize, CODES.len() - (CODES_PER_BUCKET - 1));
        drop(ring);
        let json = h.to_json_at(t0);
        assert_eq!(
            json["routes"]["privatelink"]["top_errors"][0]["code"],
            "other"
        );
        assert_eq!(
            json["routes"]["privatelink"]["top_errors"]
                .as_array()
                .unwrap()
                .len(),
            TOP_CODES
        );
    }

    #[test]
    fn last_failures_are_bounded_and_per_endpoint() {
        let (h, t0, w) = ring();
        for i in 0..(MAX_ENDPOINTS + 10) {
            let name = format!("10.0.{i}.1:443");
            let at = w + chrono::Duration::seconds(i as i64);
            h.record_at(
                t0,
                at,
                Outcome {
                    endpoint: Some(&name),
                    message: Some("x".repeat(1000)),
                    ..failed(Route::Privatelink, "upstream_connect")
                },
            );
        }
        assert_eq!(h.ring.lock().unwrap().last_failures.len(), MAX_ENDPOINTS);
        assert!(h.last_failure("10.0.0.1:443").is_null(), "the oldest went");
        let last = h.last_failure(&format!("10.0.{}.1:443", MAX_ENDPOINTS + 9));
        assert_eq!(last["code"], "upstream_connect");
        assert_eq!(last["status"], 503);
        assert!(last["message"].as_str().unwrap().chars().count() <= MAX_MESSAGE + 1);
        // A 4xx is the app's doing, not the endpoint's.
        h.record_at(
            t0,
            w,
            Outcome {
                status: 400,
                endpoint: Some("10.9.9.9:443"),
                ..failed(Route::Public, "invalid_json")
            },
        );
        assert!(h.last_failure("10.9.9.9:443").is_null());
    }

    #[test]
    fn quantiles_follow_the_samples() {
        let mut histogram = LatencyHistogram::default();
        assert_eq!(histogram.quantile_ms(0.5), None);
        for ms in 1..=100u64 {
            histogram.record(LatencyHistogram::bin(Duration::from_millis(ms)));
        }
        let p50 = histogram.quantile_ms(0.5).unwrap();
        let p99 = histogram.quantile_ms(0.99).unwrap();
        assert!((43.0..=58.0).contains(&p50), "{p50}");
        assert!((86.0..=115.0).contains(&p99), "{p99}");
        // Extremes land in the first and last bins.
        assert_eq!(LatencyHistogram::bin(Duration::ZERO), 0);
        assert_eq!(
            LatencyHistogram::bin(Duration::from_secs(86_400)),
            LATENCY_BINS - 1
        );
    }
}
