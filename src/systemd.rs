//! systemd integration for `Type=notify` units (`packaging/systemd/gpulink.service`):
//! `READY=1` once the proxy serves, `STOPPING=1` when it starts draining, `RELOADING=1`
//! around a reload, `WATCHDOG=1` pings at half of `WATCHDOG_USEC`, and `STATUS=` (the
//! line `systemctl status` shows) kept current: phase, serving endpoints, generation.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset: a terminal, a container) every call is a
//! no-op, so `gpulink run` behaves the same everywhere. A failed notification is logged,
//! never fatal: the proxy serving matters more than the service manager hearing of it.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::generation::{Current, Generation};

/// How often `STATUS=` is brought up to date (only sent when it changed).
const STATUS_INTERVAL: Duration = Duration::from_secs(2);

fn notify(what: &str, states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, state = what, "could not notify systemd");
    }
}

/// The proxy is ready: listeners bound, first health round done, KMS proven.
pub fn ready(status: &str) {
    notify("READY", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Shutdown has begun (`/ready` is 503 and the drain delay runs).
pub fn stopping() {
    notify(
        "STOPPING",
        &[NotifyState::Stopping, NotifyState::Status("draining")],
    );
}

/// A reload has begun; call [`reloaded`] when it is over, whatever its result. The
/// monotonic timestamp lets `Type=notify-reload` units match the two.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify("RELOADING", &[NotifyState::Reloading, now]),
        Err(_) => notify("RELOADING", &[NotifyState::Reloading]),
    }
}

/// A reload is over (applied or rejected: the proxy serves either way).
pub fn reloaded(status: &str) {
    notify("READY", &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// What the proxy serves right now, in one line for `systemctl status`, e.g.
/// `phase privatelink, 3/4 endpoints serving, generation 2; listening on 127.0.0.1:8000`.
pub fn status_line(generation: &Generation) -> String {
    let serving = generation.serving();
    format!(
        "phase {}, {serving}/{} endpoints serving, generation {}; listening on {}, admin on {}",
        generation.routes.phase().as_str(),
        generation.endpoints.len(),
        generation.number,
        generation.config.listen.address,
        generation.config.admin.address,
    )
}

/// Keeps `STATUS=` current until `stop` is cancelled (cancel it before [`stopping`], so
/// that "draining" is the last word).
pub fn spawn_status(generations: Arc<Current>, tasks: &TaskTracker, stop: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    tasks.spawn(async move {
        let mut last = String::new();
        let mut ticks = tokio::time::interval(STATUS_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {
                    let line = status_line(&generations.get());
                    if line != last {
                        notify("STATUS", &[NotifyState::Status(&line)]);
                        last = line;
                    }
                }
            }
        }
    });
}

/// The interval between watchdog pings: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
/// recommends, or `None` when the unit has no `WatchdogSec=`.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|timeout| !timeout.is_zero())
        .map(|timeout| timeout / 2)
}

/// Pings the watchdog from the async runtime until `stop` is cancelled. A runtime that
/// stops scheduling tasks stops the pings, and systemd restarts the service.
pub fn spawn_watchdog(tasks: &TaskTracker, stop: CancellationToken) {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    tracing::info!(?interval, "systemd watchdog enabled");
    tasks.spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => notify("WATCHDOG", &[NotifyState::Watchdog]),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_without_systemd_are_no_ops() {
        // NOTIFY_SOCKET is not set under `cargo test`; none of these may fail or block.
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            ready("test");
            reloading();
            reloaded("test");
            stopping();
        }
    }
}
