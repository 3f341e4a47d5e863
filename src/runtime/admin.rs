//! The admin port: plain HTTP, `GET /metrics` as OpenMetrics text (and, for a command with no
//! serving port of its own, `GET /healthz` and `GET /readyz`).
//!
//! Separate from any serving port so that scraping needs no client certificate, and so that a
//! server that drains (or a controller with no port of its own) still answers scrapes. The
//! port is bound before the command reports itself started, so a bad `--metrics-listen` fails
//! the start instead of a scrape.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::runtime::metrics::Registry;

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

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    serve_app(listener, metrics(registry)).await;
}

/// Serves `GET /metrics`, `GET /healthz` (200 while the process answers) and `GET /readyz` (200
/// when `ready` says so, else 503), for a command whose only port this is (the exporter).
pub(crate) async fn serve_with_probes(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Readiness,
) {
    let app = metrics(registry)
        .route("/healthz", get(|| async { "ok" }))
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
    serve_app(listener, app).await;
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

async fn serve_app(listener: TcpListener, app: Router) {
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}
