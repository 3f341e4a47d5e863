//! A bound server and its life: validate and bind ([`Server::bind`]), serve, drain, stop.
//!
//! Shutdown (the future given to [`Server::run`]: SIGTERM or Ctrl-C in the binary, anything in
//! tests): `/readyz` turns 503 at once, the server keeps serving for `--shutdown-delay` so the
//! endpoint controller can take the pod out of the Service, then stops accepting, lets each
//! connection finish the request it is on, and waits at most `--drain-timeout` for them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};

use crate::cluster;
use crate::policy::loader::{PolicyReload, PolicyStore};
use crate::runtime::admin;
use crate::runtime::metrics::Registry;
use crate::runtime::tls::{self, TlsStore};
use crate::serve::body::BodyBudget;
use crate::serve::listener::accept_loop;
use crate::serve::metrics::{PolicyMetrics, ReloadKind, WebhookMetrics};
use crate::serve::routes::{AppState, router};
use crate::serve::{ServeError, Settings};

/// The sub-registry of the watch caches' and Lease's metrics (`lightstep_tekton_cluster_*`).
const CLUSTER_COMPONENT: &str = "cluster";

/// A server with its certificate validated, its policy loaded and its ports bound.
pub struct Server {
    settings: Settings,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    registry: Arc<Registry>,
    tls: Arc<TlsStore>,
    state: Arc<AppState>,
    watch: Option<cluster::Watch>,
}

impl Server {
    /// Validates the certificate and policy, then binds both ports. Nothing is served yet.
    pub async fn bind(settings: Settings) -> Result<Server, ServeError> {
        let tls = Arc::new(TlsStore::load(settings.tls.clone())?);
        // An invalid policy file does not stop the start (see `policy::loader`): said here, on
        // every poll until fixed, in `policy_valid` and in a warning on every pod it leaves alone.
        let policy = Arc::new(PolicyStore::load(settings.policy.clone()));
        let mut registry = Registry::new();
        let metrics = Arc::new(WebhookMetrics::register(&mut registry));
        let policy_metrics = PolicyMetrics::register(&mut registry);
        policy_metrics.set_valid(policy.refused().is_none());
        if let Some(reason) = policy.refused() {
            log_no_policy(&reason);
        }
        let watch = match settings.watch_tracing_policies {
            true => {
                let metrics = registry.component(CLUSTER_COMPONENT);
                Some(cluster::Watch::configure(&settings.cluster, metrics).await?)
            }
            false => None,
        };
        metrics.set_certificate_expiry(tls.identity().not_after);
        let listener = admin::bind("--listen", settings.listen).await?;
        let metrics_listener = match settings.metrics_listen {
            None => None,
            Some(addr) => Some(admin::bind("--metrics-listen", addr).await?),
        };
        let state = Arc::new(AppState {
            policy,
            cluster: watch.as_ref().map(|w| w.cluster()),
            metrics,
            policy_metrics,
            ready: AtomicBool::new(false),
            limits: settings.limits.clone(),
            budget: BodyBudget::new(settings.limits.body_budget),
        });
        Ok(Server {
            settings,
            listener,
            metrics_listener,
            registry: Arc::new(registry),
            tls,
            state,
            watch,
        })
    }

    /// The HTTPS address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address.
        self.listener.local_addr().expect("bound listener")
    }

    /// The metrics address actually bound, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then drains (see the module docs) and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        // Connections wait in the kernel's queue until the accept loop below starts.
        self.state.ready.store(true, Ordering::SeqCst);
        self.log_serving();
        let Server {
            settings,
            listener,
            metrics_listener,
            registry,
            tls,
            state,
            watch,
        } = self;
        let (stop_watch, watch_stopped) = oneshot::channel::<()>();
        let watcher = watch.map(|w| {
            tokio::spawn(w.run_until(async move {
                let _ = watch_stopped.await;
            }))
        });
        let (drain_tx, drain_rx) = watch::channel(false);
        let permits = Arc::new(Semaphore::new(settings.limits.max_connections as usize));
        let poller = tokio::spawn(poll_files(
            tls.clone(),
            state.clone(),
            settings.reload_interval,
        ));
        // It keeps answering while the server drains, so the last scrape sees the last requests.
        let metrics_server = metrics_listener.map(|l| {
            let limits = &settings.limits;
            tokio::spawn(admin::serve(
                l,
                registry,
                admin::AdminLimits {
                    max_connections: limits.max_connections,
                    header_timeout: limits.header_timeout,
                    write_timeout: limits.write_timeout,
                },
            ))
        });

        let router = router(state.clone());
        let accept = accept_loop(
            listener,
            tls,
            router,
            state.clone(),
            permits.clone(),
            drain_rx,
        );
        let trigger = async {
            shutdown.await;
            state.ready.store(false, Ordering::SeqCst);
            tracing::info!(
                delay_s = settings.shutdown_delay.as_secs_f64(),
                "shutting down: readiness off, still serving until the delay ends"
            );
            tokio::time::sleep(settings.shutdown_delay).await;
            // Receivers live as long as the accept loop and the connections; none may be left.
            let _ = drain_tx.send(true);
        };
        tokio::join!(accept, trigger);

        wait_for_connections(
            &permits,
            settings.limits.max_connections,
            settings.drain_timeout,
        )
        .await;
        for task in [Some(poller), metrics_server].into_iter().flatten() {
            task.abort();
        }
        // Stop writing statuses and release the Lease, so the next leader need not wait for it
        // to expire.
        let _ = stop_watch.send(());
        if let Some(watcher) = watcher {
            let _ = watcher.await;
        }
    }

    fn log_serving(&self) {
        let settings = &self.settings;
        let policy = match &settings.policy {
            Some(p) => p.display().to_string(),
            None => "embedded default".into(),
        };
        tracing::info!(
            listen = %self.local_addr(),
            metrics = %self.metrics_addr().map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
            certificate_not_after = self.tls.identity().not_after,
            client_auth = settings.tls.client_ca.is_some(),
            policy = %policy,
            watch_tracing_policies = self.watch.is_some(),
            "serving"
        );
    }
}

/// Waits until every connection has closed, or `timeout`. Every open connection holds one of the
/// `all` permits: having them all back means all are closed.
async fn wait_for_connections(permits: &Semaphore, all: u32, timeout: Duration) {
    match tokio::time::timeout(timeout, permits.acquire_many(all)).await {
        Ok(_) => tracing::info!("all connections closed; exiting"),
        Err(_) => tracing::warn!(
            still_open = all as usize - permits.available_permits(),
            "drain timeout reached; closing the remaining connections"
        ),
    }
}

/// Polls the certificate and policy files and swaps in valid new versions.
async fn poll_files(tls: Arc<TlsStore>, state: Arc<AppState>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let (tls2, policy) = (tls.clone(), state.policy.clone());
        // File reads block; a slow volume must not stall a worker that serves requests.
        let Ok((tls_result, policy_result)) =
            tokio::task::spawn_blocking(move || (tls2.reload(), policy.reload())).await
        else {
            continue;
        };
        record_tls_reload(&state.metrics, tls_result);
        record_policy_reload(&state, policy_result);
    }
}

fn record_tls_reload(metrics: &WebhookMetrics, reload: tls::Reload) {
    match reload {
        tls::Reload::Unchanged => {}
        tls::Reload::Applied { not_after } => {
            metrics.reloaded(ReloadKind::Tls, true);
            metrics.set_certificate_expiry(not_after);
            tracing::info!(not_after, "serving certificate reloaded");
        }
        tls::Reload::Refused(reason) => {
            metrics.reloaded(ReloadKind::Tls, false);
            tracing::warn!(%reason, "new certificate refused; still serving the previous one");
        }
    }
}

fn record_policy_reload(state: &AppState, reload: PolicyReload) {
    let refused = match reload {
        PolicyReload::Unchanged => return,
        PolicyReload::Applied { fingerprint } => {
            state.metrics.reloaded(ReloadKind::Policy, true);
            state.policy_metrics.set_valid(true);
            tracing::info!(%fingerprint, "policy reloaded");
            return;
        }
        PolicyReload::Refused(reason) => {
            state.metrics.reloaded(ReloadKind::Policy, false);
            state.policy_metrics.set_valid(false);
            reason
        }
        PolicyReload::StillRefused(reason) => reason,
    };
    if state.policy.current().is_some() {
        tracing::warn!(
            reason = %refused,
            "policy file invalid; still using the previous policy (a restart would start without one)"
        );
    } else {
        log_no_policy(&refused);
    }
}

/// The line said at the start and at every poll while the server has no file policy.
fn log_no_policy(reason: &str) {
    tracing::error!(
        %reason,
        "policy file invalid; serving without a file policy: pods no TracingPolicy selects are \
         admitted untouched, on /enforce too, until the file is fixed"
    );
}
