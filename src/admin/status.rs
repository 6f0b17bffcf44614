//! The `/status` document: the generation in service, the runtime's lifecycle, every
//! endpoint's state, KMS and the key cache, as JSON. Built from explicit [`Inputs`] so
//! that it can be built (and tested) without a running gpulink.

use std::time::Duration;

use serde_json::{json, Value};

use crate::history::History;
use crate::listener::Listener;
use crate::metrics::{Metrics, Snapshot};
use crate::seal::KmsProof;
use crate::upstream::state::Check;

/// Everything the document reports.
pub struct Inputs<'a> {
    /// The generation in service, readiness, draining and reload counts.
    pub state: Snapshot<'a>,
    pub uptime: Duration,
    pub app_connections: &'a Listener,
    pub admin_connections: &'a Listener,
    /// Request-path workers, and the app listener sockets they serve (one each).
    pub workers: usize,
    pub listener_sockets: usize,
    /// Request body bytes held now (`listen.max_in_flight_bytes`).
    pub held_bytes: u64,
    pub metrics: &'a Metrics,
    /// The last 15 minutes of request outcomes.
    pub history: &'a History,
    pub kms_proof: KmsProof,
    /// Each discovered region's last rounds (`RegionStatus::to_json`), by region.
    pub discovery: Vec<Value>,
}

/// The JSON document behind `/status`.
pub fn document(inputs: &Inputs<'_>) -> Value {
    let generation = inputs.state.generation;
    let config = &generation.config;
    let now = chrono::Utc::now();
    let endpoints: Vec<Value> = generation
        .endpoints
        .iter()
        .map(|e| {
            let health = e.health_snapshot();
            let data_path = e.data_path_snapshot();
            // Which checks keep the endpoint out right now, so an operator sees at once
            // whether it is the health port or the inference port.
            let mut failing: Vec<Check> = Vec::new();
            if !e.is_healthy() {
                failing.push(Check::Health);
            }
            if !e.is_data_path_ok() {
                failing.push(Check::DataPath);
            }
            json!({
                "address": e.authority,
                "region": e.region(),
                "route": e.kind().as_str(),
                "tier": tier_name(e.kind().as_str(), e.region() == config.local_region()),
                "local": e.region() == config.local_region(),
                "server_name": e.config.server_name,
                // The ENI's availability zone (configured or discovered); null if unknown.
                "zone": e.zone(),
                // Relative to this host's zone: same_zone, cross_zone or unknown.
                "locality": generation.host_zone.locality(&e.config).as_str(),
                "health": health.state,
                "health_since": health.since,
                "serving": e.is_serving(),
                "ejected": e.outlier.is_ejected(),
                "ejected_for_ms": e.outlier.ejected_for().map(|d| d.as_millis() as u64),
                "ejections": e.outlier.ejections(),
                "capacity": e.capacity(),
                "latency_ms": e.latency().map(|d| d.as_secs_f64() * 1000.0),
                "in_flight": e.in_flight(),
                "requests": e.requests(),
                "failures": e.failures(),
                "health_checks": health.checks,
                "last_error": health.last_error,
                "health_problem": health.problem,
                "health_diagnosis": health.diagnosis,
                "reported_region": health.region,
                "data_path": data_path,
                "failing_checks": failing,
                "last_request_error": e.last_request_error(),
                // The last 5xx answer attributed to it (the cluster's or gpulink's).
                "last_failed_request": inputs.history.last_failure(&e.authority),
            })
        })
        .collect();
    let metrics = inputs.metrics;
    let kms_state = metrics.kms_state();
    let (kms_calls, kms_failures) = metrics.kms_totals(generation);
    let key_cache = serde_json::to_value(generation.sealer.cache_state()).unwrap_or(Value::Null);
    let keys = generation.sealer.keys();
    let (reloads_ok, reloads_failed) = inputs.state.reloads;
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": generation.number,
        "loaded_at": generation.loaded_at.to_rfc3339(),
        // The page's relative times ("3 s ago") are measured from here.
        "now": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "ready": inputs.state.ready,
        "draining": inputs.state.draining,
        "uptime_seconds": inputs.uptime.as_secs(),
        "phase": generation.routes.phase().as_str(),
        "public_fallback_until": config.migration.public_fallback_until.map(|t| t.to_rfc3339()),
        "public_fallback_open": generation.routes.public_fallback_open(now),
        "rollback": {
            "configured": generation.routes.rollback().is_some(),
            // Whether it may act now (phase and fallback window allow it).
            "allowed": generation.routes.rollback_allowed(now),
            "active": generation.routes.is_rolled_back(now),
            "fired": generation.routes.rollback().map_or(0, |r| r.times_fired()),
            "last_breach": generation.routes.rollback().and_then(|r| r.last_breach()),
        },
        "reloads": { "applied": reloads_ok, "rejected": reloads_failed },
        // The request-path threads ([runtime] workers): one SO_REUSEPORT socket each,
        // and the app connections each has accepted since start.
        "runtime": {
            "workers": inputs.workers,
            "listener_sockets": inputs.listener_sockets,
            "connections_by_worker": inputs.app_connections.accepted_by_worker(),
        },
        // Open client connections per listener against its limit; `evicted` counts idle
        // connections closed to admit new ones at the limit.
        "connections": {
            "listen": listener_status(inputs.app_connections),
            "admin": listener_status(inputs.admin_connections),
        },
        // Request bytes held now (plaintext and sealed copies) against
        // listen.max_in_flight_bytes; past it new requests get 503 overloaded.
        "request_bodies": {
            "held_bytes": inputs.held_bytes,
            "limit_bytes": config.listen.max_in_flight_bytes.bytes(),
        },
        // This host's availability zone (`zone`, and `alias`, the name IMDS gave beside
        // the id), how it was learned (`source`: config, imds, none) and, when IMDS gave
        // none, why (`note`). Zone-aware routing is on when a zone is known.
        "placement": generation.host_zone,
        "tenant": config.tenant.id,
        "kms": {
            "provider": if keys.is_development() { "development" } else { "aws-kms" },
            "key_id": config.kms.key_id.as_str(),
            "region": config.kms.region,
            "format": config.kms.format.as_str(),
            "context": config.kms.context.as_str(),
            "calls": kms_calls,
            "failures": kms_failures,
            "last_success": kms_state.last_success.map(|t| t.to_rfc3339()),
            "last_error": kms_state.last_error.map(|t| t.to_rfc3339()),
            "last_error_message": kms_state.last_error_message,
            // The start-up proof `/ready` waits for.
            "proof": inputs.kms_proof,
        },
        // The aws-esdk data-key cache: limits, counters, and each entry's key age and
        // use (never key material).
        "key_cache": key_cache,
        "endpoints": endpoints,
        // Regions whose PrivateLink ENIs are discovered (DNS or EC2): the source, the
        // VPC endpoint's state and what to do about it, the last good and failed rounds.
        "discovery": inputs.discovery,
        "traffic": inputs.history.to_json(),
    })
}

fn listener_status(listener: &crate::listener::Listener) -> Value {
    json!({
        "open": listener.open(),
        "limit": listener.limit(),
        "evicted": listener.evicted(),
    })
}

fn tier_name(route: &str, local: bool) -> String {
    format!("{} {route}", if local { "local" } else { "remote" })
}
