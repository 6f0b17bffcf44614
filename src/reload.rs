//! What triggers a configuration reload: SIGHUP, and changes in the configuration
//! file's directory. The directory, not the file, is watched because Kubernetes updates
//! a mounted ConfigMap by swapping a symlink, which a watch on the file never sees.
//! Bursts of events are debounced, and a file whose content did not change is not
//! reloaded, whichever the trigger: an edit followed by `systemctl reload` (the watch and
//! the SIGHUP both fire) applies it once, and a SIGHUP with nothing changed is a no-op.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proxy::Proxy;

/// Editors and ConfigMap swaps write in several steps; wait for the burst to end.
const DEBOUNCE: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {path} for configuration changes: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("cannot listen for SIGHUP: {0}")]
    Signal(std::io::Error),
}

/// The reload triggers, armed before the proxy starts: a SIGHUP or a file change that
/// comes while it starts is kept, not lost (an unhandled SIGHUP would even end the
/// process), and acted on once [`Triggers::spawn`] hands them the proxy.
pub struct Triggers {
    path: PathBuf,
    /// The file's content as the running configuration was parsed from it.
    loaded: Vec<u8>,
    hangup: tokio::signal::unix::Signal,
    changed: mpsc::Receiver<()>,
    watcher: notify::RecommendedWatcher,
}

/// Arms SIGHUP and the watch on `path`'s directory. `loaded` is the content the proxy is
/// about to start with.
pub fn watch(path: PathBuf, loaded: Vec<u8>) -> Result<Triggers, WatchError> {
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(WatchError::Signal)?;
    let (changed_tx, changed) = mpsc::channel::<()>(1);
    let directory = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // A full channel already holds a pending "changed": nothing is lost.
            let _ = changed_tx.try_send(());
        }
    })
    .map_err(|source| WatchError::Watch {
        path: directory.clone(),
        source,
    })?;
    watcher
        .watch(&directory, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError::Watch {
            path: directory.clone(),
            source,
        })?;
    Ok(Triggers {
        path,
        loaded,
        hangup,
        changed,
        watcher,
    })
}

impl Triggers {
    /// Reloads into `proxy` on SIGHUP and on file changes until `stop` is cancelled.
    pub fn spawn(self, proxy: Arc<Proxy>, tasks: &TaskTracker, stop: CancellationToken) {
        let Triggers {
            path,
            loaded,
            mut hangup,
            mut changed,
            watcher,
        } = self;
        tasks.spawn(async move {
            // The watcher stops when dropped; it lives as long as this task.
            let _watcher = watcher;
            let mut last = Some(digest(&loaded));
            // A change made while the proxy started has no event left to wake us.
            let now = read_digest(&path).await;
            if now.is_some() && now != last {
                tracing::info!(path = %path.display(), "configuration file changed during start-up: reloading");
                reload_notifying_systemd(&proxy, &path).await;
                last = now;
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = hangup.recv() => {
                        // Unreadable (None) still reloads: the rejection names the problem.
                        let now = read_digest(&path).await;
                        if now.is_some() && now == last {
                            tracing::info!(path = %path.display(), "SIGHUP: the configuration file has not changed since it was last loaded; nothing to do");
                            continue;
                        }
                        tracing::info!(path = %path.display(), "SIGHUP: reloading the configuration");
                        reload_notifying_systemd(&proxy, &path).await;
                        last = now;
                    }
                    Some(()) = changed.recv() => {
                        tokio::time::sleep(DEBOUNCE).await;
                        while changed.try_recv().is_ok() {}
                        let now = read_digest(&path).await;
                        if now.is_some() && now != last {
                            tracing::info!(path = %path.display(), "configuration file changed: reloading");
                            reload_notifying_systemd(&proxy, &path).await;
                            last = now;
                        }
                    }
                }
            }
        });
    }
}

/// The file's bytes, to compare with the last ones loaded; `None` when it cannot be read
/// (an unreadable file is then rejected by the reload itself, with the reason). Read
/// off the async workers, bounded in size and time, and only if it is a regular file:
/// a path that became a FIFO or a link to `/dev/zero` must not hang or bloat the proxy.
async fn read_file(path: &Path) -> Option<Vec<u8>> {
    let owned = path.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        crate::config::read_regular_file(&owned, crate::config::MAX_CONFIG_FILE).ok()
    });
    tokio::time::timeout(crate::config::READ_TIMEOUT, read)
        .await
        .ok()
        .and_then(|joined| joined.ok())
        .flatten()
}

/// SHA-256 of a configuration file's content: what "has it changed" compares, without
/// keeping a copy of the file.
type Digest = [u8; 32];

fn digest(content: &[u8]) -> Digest {
    let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, content);
    let mut out = [0u8; 32];
    out.copy_from_slice(hash.as_ref());
    out
}

async fn read_digest(path: &Path) -> Option<Digest> {
    read_file(path).await.map(|content| digest(&content))
}

/// Reloads, telling systemd (`Type=notify`) that a reload is under way, so that
/// `systemctl reload` returns when it is done.
async fn reload_notifying_systemd(proxy: &Proxy, path: &Path) {
    crate::systemd::reloading();
    let status = match proxy.reload_from_file(path).await {
        Ok(_) => crate::systemd::status_line(&proxy.current()),
        Err(_) => format!(
            "reload rejected (see the log); {}",
            crate::systemd::status_line(&proxy.current())
        ),
    };
    crate::systemd::reloaded(&status);
}
