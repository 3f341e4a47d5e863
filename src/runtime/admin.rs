//! The admin port: plain HTTP, `GET /metrics` as OpenMetrics text (and, for a command with no
//! serving port of its own, `GET /healthz` and `GET /readyz`).
//!
//! Separate from any serving port so that scraping needs no client certificate, and so that a
//! server that drains (or a controller with no port of its own) still answers scrapes. The
//! port is bound before the command reports itself started, so a bad `--metrics-listen` fails
//! the start instead of a scrape.
//!
//! It is served like the webhook's port (`crate::runtime::http1`), with at most
//! `MAX_CONNECTIONS` connections, the same header and write timeouts, a 32 KiB request head,
//! and HTTP/1.1 only: a port that needs no certificate is the easiest one to hold open.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::runtime::http1::{self, ConnectionLimits};
use crate::runtime::metrics::Registry;

/// Connections the admin port serves at once. A Prometheus server scrapes over one connection,
/// so 16 leaves room for a few scrapers and a person with curl; more wait in the accept queue.
pub(crate) const MAX_CONNECTIONS: u32 = 16;

/// Largest request head on the admin port: `GET /metrics` and a scraper's headers are a few
/// hundred bytes; the webhook's port allows the same 32 KiB.
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// The content type OpenMetrics 1.0 scrapers ask for.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A port could not be bound; names the flag that chose it.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {addr}: cannot listen: {source}")]
pub struct BindError {
    flag: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds `addr`, which the flag `flag` chose.
pub(crate) async fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { flag, addr, source })
}

/// Whether a command is ready for `/readyz`, asked on each probe.
pub(crate) type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// How the admin port bounds its clients: at most `max_connections` connections (capped at
/// `MAX_CONNECTIONS`), each within the header and write timeouts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdminLimits {
    pub(crate) max_connections: u32,
    pub(crate) header_timeout: std::time::Duration,
    pub(crate) write_timeout: std::time::Duration,
}

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, registry: Arc<Registry>, limits: AdminLimits) {
    serve_app(listener, metrics(registry), limits).await;
}

/// Serves `GET /metrics`, `GET /healthz` (200 when `live` says so, else 503: a wedged loop)
/// and `GET /readyz` (200 when `ready` says so, else 503), for a command whose only port this
/// is (the exporter).
pub(crate) async fn serve_with_probes(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Readiness,
    live: Readiness,
    limits: AdminLimits,
) {
    let app = metrics(registry)
        .route(
            "/healthz",
            get(move || {
                let live = live();
                async move {
                    match live {
                        true => (StatusCode::OK, "ok"),
                        false => (StatusCode::SERVICE_UNAVAILABLE, "the loop is not turning"),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = ready();
                async move {
                    match ready {
                        true => (StatusCode::OK, "ready"),
                        false => (StatusCode::SERVICE_UNAVAILABLE, "not ready"),
                    }
                }
            }),
        );
    serve_app(listener, app, limits).await;
}

fn metrics(registry: Arc<Registry>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move { ([(header::CONTENT_TYPE, OPENMETRICS)], registry.encode()) }
        }),
    )
}

async fn serve_app(listener: TcpListener, app: Router, limits: AdminLimits) {
    let connection = ConnectionLimits {
        header_timeout: limits.header_timeout,
        write_timeout: limits.write_timeout,
        max_header_bytes: MAX_HEADER_BYTES,
    };
    let permits = Arc::new(Semaphore::new(
        limits.max_connections.min(MAX_CONNECTIONS) as usize
    ));
    // It answers until aborted, through the drain, so the last scrape sees the last requests:
    // the drain never starts (the sender lives as long as this future).
    let (_never, drain) = watch::channel(false);
    let connections = drain.clone();
    http1::accept_loop(listener, permits, drain, move |tcp, peer| {
        let (app, limits, drain) = (app.clone(), connection.clone(), connections.clone());
        async move { http1::serve_connection(tcp, app, &limits, drain, peer).await }
    })
    .await;
}
