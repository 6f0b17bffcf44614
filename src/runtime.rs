//! The request-path threads (`[runtime] workers`): thread per core, as nginx workers and
//! pingora do. Each worker is one OS thread running a single-threaded tokio runtime with
//! its own app listener socket (`SO_REUSEPORT`, so the kernel spreads connections over
//! the workers) and its own upstream connection pools (an endpoint keeps one pool per
//! worker, [`pool_index`]): a connection's requests, the pooled upstream connection they
//! use and the tasks hyper spawns for both live on one thread, so a request never wakes
//! another thread. What the workers share is read-mostly (the configuration generation,
//! endpoint health and latency, metrics, the connection limit and the in-flight budget).
//! The admin server, health checks, KMS proof, reloads and discovery stay on the control
//! runtime that started the proxy.
//!
//! Why: under load the multi-threaded runtime moved a request between its server
//! connection task and its pooled upstream connection task on different threads, about
//! one futex wake-up per request (issue 11's profile; BENCHMARKS.md has the numbers).

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// This thread's worker index, when it is a request-path worker.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The request-path worker this thread is, if it is one.
pub fn current_worker() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// Which of an endpoint's `pools` (one per worker, then one for everything else) the
/// current thread uses. A worker index beyond the pools (a generation built for fewer
/// workers) shares the last one: correct, only not thread-local.
pub fn pool_index(pools: usize) -> usize {
    let last = pools.saturating_sub(1);
    current_worker().filter(|&i| i < last).unwrap_or(last)
}

/// How many workers `configured` (`runtime.workers`) means: itself, or for 0 the cores
/// this process may use (the affinity mask and the cgroup CPU quota, at least 1).
pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let quota = std::fs::read_to_string("/sys/fs/cgroup/cpu.max")
        .ok()
        .and_then(|text| cgroup_cpu_limit(&text));
    quota.map_or(cores, |q| q.min(cores)).max(1)
}

/// The CPUs a cgroup v2 `cpu.max` (`"$QUOTA $PERIOD"` or `"max $PERIOD"`) allows,
/// rounded up: a 1.5-CPU limit gets 2 workers, each busy part of the time.
fn cgroup_cpu_limit(text: &str) -> Option<usize> {
    let mut fields = text.split_whitespace();
    let quota: u64 = fields.next()?.parse().ok()?;
    let period: u64 = fields.next()?.parse().ok()?;
    if period == 0 {
        return None;
    }
    usize::try_from(quota.div_ceil(period).max(1)).ok()
}

/// Binds the app listener's sockets: one per worker on `address`, with `SO_REUSEPORT`
/// when there is more than one (port 0 takes the port the first one got). They listen
/// before the workers start: connections that arrive meanwhile wait in the backlog.
/// Called on a runtime (the sockets are handed over deregistered, as std listeners).
pub fn bind_listeners(
    address: SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut address = address;
    let mut listeners = Vec::with_capacity(workers);
    for _ in 0..workers {
        let socket = if address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As tokio's `TcpListener::bind`: a restart may bind while old connections are
        // in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        if workers > 1 {
            socket.set_reuseport(true)?;
        }
        socket.bind(address)?;
        let listener = socket.listen(LISTEN_BACKLOG)?;
        address = listener.local_addr()?;
        listeners.push(listener.into_std()?);
    }
    Ok(listeners)
}

/// tokio's `TcpListener::bind` backlog, per socket.
const LISTEN_BACKLOG: u32 = 1024;

/// The running workers.
pub struct Workers {
    done: Vec<oneshot::Receiver<()>>,
}

impl Workers {
    /// Starts one worker per listener, each running `serve(index, listener)` on its own
    /// thread and single-threaded runtime until the future ends, or at once (dropping
    /// everything it runs) when `abandon` is cancelled. Returns once every worker runs
    /// its listener; an error is the first worker that could not start.
    pub async fn start<S, F>(
        listeners: Vec<std::net::TcpListener>,
        serve: S,
        abandon: CancellationToken,
    ) -> std::io::Result<Workers>
    where
        S: Fn(usize, tokio::net::TcpListener) -> F + Clone + Send + 'static,
        F: Future<Output = ()> + 'static,
    {
        let mut done = Vec::with_capacity(listeners.len());
        let mut started = Vec::with_capacity(listeners.len());
        // A worker's runtime also drives connections other workers may still use (a
        // KMS client connection is pooled process-wide and lives on the runtime that
        // opened it): every runtime stays up until the last worker has finished serving.
        let serving = Arc::new(AtomicUsize::new(listeners.len()));
        let all_served = CancellationToken::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            let (serving, all_served) = (serving.clone(), all_served.clone());
            let (started_tx, started_rx) = oneshot::channel::<std::io::Result<()>>();
            let (done_tx, done_rx) = oneshot::channel();
            let (serve, abandon) = (serve.clone(), abandon.clone());
            std::thread::Builder::new()
                .name(format!("gpulink-worker-{index}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(Some(index)));
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            let _ = started_tx.send(Err(error));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let listener = match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => listener,
                            Err(error) => {
                                let _ = started_tx.send(Err(error));
                                return;
                            }
                        };
                        let _ = started_tx.send(Ok(()));
                        tokio::select! {
                            () = serve(index, listener) => {}
                            _ = abandon.cancelled() => return,
                        }
                        if serving.fetch_sub(1, Ordering::AcqRel) == 1 {
                            all_served.cancel();
                        }
                        tokio::select! {
                            _ = all_served.cancelled() => {}
                            _ = abandon.cancelled() => {}
                        }
                    });
                    // Every task of this worker (connections, pooled upstream
                    // connections, drains) ends with its runtime, before `done`.
                    drop(runtime);
                    let _ = done_tx.send(());
                })?;
            started.push(started_rx);
            done.push(done_rx);
        }
        for started in started {
            match started.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(error),
                Err(_) => return Err(std::io::Error::other("a worker thread ended at start")),
            }
        }
        Ok(Workers { done })
    }

    /// How many workers run (the tests check the count they asked for).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.done.len()
    }

    /// Waits until every worker has ended (its future finished and its runtime is gone).
    pub async fn join(self) {
        for done in self.done {
            let _ = done.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_quota_rounds_up_to_whole_workers() {
        assert_eq!(cgroup_cpu_limit("max 100000\n"), None);
        assert_eq!(cgroup_cpu_limit("100000 100000\n"), Some(1));
        assert_eq!(cgroup_cpu_limit("150000 100000\n"), Some(2));
        assert_eq!(cgroup_cpu_limit("50000 100000\n"), Some(1));
        assert_eq!(cgroup_cpu_limit("400000 100000"), Some(4));
        assert_eq!(cgroup_cpu_limit("1 0"), None);
        assert_eq!(cgroup_cpu_limit(""), None);
    }

    #[test]
    fn zero_workers_means_the_usable_cores() {
        assert_eq!(worker_count(3), 3);
        let auto = worker_count(0);
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        assert!((1..=cores).contains(&auto), "{auto} of {cores}");
    }

    #[test]
    fn threads_outside_the_workers_use_the_last_pool() {
        assert_eq!(current_worker(), None);
        assert_eq!(pool_index(3), 2);
        assert_eq!(pool_index(1), 0);
        WORKER.with(|w| w.set(Some(1)));
        assert_eq!(pool_index(3), 1);
        // More workers than the generation has pools for: the shared last one.
        assert_eq!(pool_index(2), 1);
        WORKER.with(|w| w.set(Some(5)));
        assert_eq!(pool_index(3), 2);
        WORKER.with(|w| w.set(None));
    }

    #[tokio::test]
    async fn every_worker_gets_a_socket_on_the_same_port() {
        let listeners = bind_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|&p| p == ports[0] && p != 0), "{ports:?}");
        let address = listeners[0].local_addr().unwrap();
        let abandon = CancellationToken::new();
        let workers = Workers::start(
            listeners,
            |index, listener: tokio::net::TcpListener| async move {
                // Each worker answers its own index, then ends.
                let (mut stream, _) = listener.accept().await.unwrap();
                assert_eq!(current_worker(), Some(index));
                tokio::io::AsyncWriteExt::write_all(&mut stream, &[index as u8])
                    .await
                    .unwrap();
            },
            abandon.clone(),
        )
        .await
        .unwrap();
        assert_eq!(workers.len(), 3);
        // Connect until each of the three workers has answered once (the kernel hashes
        // connections over the sockets; one that lands on a finished worker's socket is
        // refused or reset, and tried again).
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < 3 {
            let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
                continue;
            };
            let mut byte = [0u8; 1];
            if tokio::io::AsyncReadExt::read_exact(&mut stream, &mut byte)
                .await
                .is_ok()
            {
                seen.insert(byte[0]);
            }
        }
        workers.join().await;
    }
}
