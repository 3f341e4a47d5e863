//! The webhook's HTTPS listener: TLS on each connection, then HTTP/1.1 within the limits of
//! [`crate::runtime::http1`] (its accept loop, connection slots, header timeout and write-stall
//! guard, which the admin port shares).
//!
//! The connection loop is hyper's HTTP/1.1 server (the only protocol the API server uses for
//! webhooks) behind our own accept loop, not `axum::serve`, because the loop has to do TLS with
//! a configuration that can change between two connections ([`TlsStore`]), bound the
//! connections, and drain them on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::runtime::http1::{self, ConnectionLimits};
use crate::runtime::tls::TlsStore;
use crate::serve::metrics::WebhookMetrics;
use crate::serve::routes::AppState;

/// Largest request head (request line and headers) accepted; more gets 431 and the connection
/// is closed. The API server sends a few hundred bytes; hyper's own bound would be its ~400 KB
/// read buffer. (hyper also answers 431 past 100 headers, its default, kept.)
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Bytes read from the socket at a time. rustls reads 4 KiB at a time; a buffer under it turns
/// the five `recvfrom` calls of a 16 KB review into one. 32 KiB per connection is 8 MiB at the
/// default connection limit.
const READ_BUFFER: usize = 32 * 1024;

/// Accepts connections until the drain starts; each gets its own task and a permit.
pub(super) async fn accept_loop(
    listener: TcpListener,
    tls: Arc<TlsStore>,
    router: Router,
    state: Arc<AppState>,
    permits: Arc<Semaphore>,
    drain: watch::Receiver<bool>,
) {
    let connections = drain.clone();
    http1::accept_loop(listener, permits, drain, move |tcp, peer| {
        let connection = Connection {
            acceptor: tls.acceptor(),
            router: router.clone(),
            state: state.clone(),
            drain: connections.clone(),
        };
        connection.serve(tcp, peer)
    })
    .await;
}

/// One client connection: TLS handshake, then HTTP/1.1 requests until either side closes.
struct Connection {
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    state: Arc<AppState>,
    drain: watch::Receiver<bool>,
}

impl Connection {
    async fn serve(self, tcp: TcpStream, peer: SocketAddr) {
        let _open = OpenConnection::new(self.state.metrics.clone());
        let limits = &self.state.limits;
        let stream = match tokio::time::timeout(
            limits.handshake_timeout,
            self.acceptor
                .accept(BufReader::with_capacity(READ_BUFFER, tcp)),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.state.metrics.handshake_failed();
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                self.state.metrics.handshake_failed();
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let http = ConnectionLimits {
            header_timeout: limits.header_timeout,
            write_timeout: limits.write_timeout,
            max_header_bytes: MAX_HEADER_BYTES,
        };
        http1::serve_connection(stream, self.router, &http, self.drain, peer).await;
    }
}

/// Counts an open connection in the gauge for as long as it lives, however its task ends.
struct OpenConnection(Arc<WebhookMetrics>);

impl OpenConnection {
    fn new(metrics: Arc<WebhookMetrics>) -> OpenConnection {
        metrics.connection_opened();
        OpenConnection(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}
