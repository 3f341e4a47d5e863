//! The HTTPS listener: the accept loop, the connection limit, one task per connection, and the
//! guard against clients that stop reading.
//!
//! The connection loop is hyper's HTTP/1.1 server (the only protocol the API server uses for
//! webhooks) behind our own accept loop, not `axum::serve`, because the loop has to do TLS with
//! a configuration that can change between two connections ([`TlsStore`]), bound the
//! connections, and drain them on shutdown.
//!
//! Each connection is its own task holding one of `--max-connections` permits, so a slow or
//! hostile client costs one slot and nothing else, and clients over the limit wait in the
//! kernel's accept queue rather than in memory. Headers that stall close the connection
//! (hyper's header timeout); hyper has no write timeout, so [`WriteClock`] times each write and a
//! client that stops reading its replies is cut off. On drain, each connection finishes the
//! request it is on (hyper's graceful shutdown) and closes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::runtime::tls::TlsStore;
use crate::serve::metrics::WebhookMetrics;
use crate::serve::routes::AppState;

/// After a failed accept (out of file descriptors, say), wait this long before the next one so
/// the loop does not spin while connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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
    let mut stop = drain.clone();
    loop {
        let permit = tokio::select! {
            biased;
            _ = drained(&mut stop) => return,
            // The semaphore is never closed.
            p = permits.clone().acquire_owned() => p.expect("semaphore open"),
        };
        let (tcp, peer) = tokio::select! {
            biased;
            _ = drained(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let connection = Connection {
            acceptor: tls.acceptor(),
            router: router.clone(),
            state: state.clone(),
            drain: drain.clone(),
        };
        tokio::spawn(async move {
            let _permit = permit;
            connection.serve(tcp, peer).await;
        });
    }
}

/// Completes once the drain has started (at once if it already has).
pub(super) async fn drained(drain: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens after the drain started.
    let _ = drain.wait_for(|d| *d).await;
}

/// One client connection: TLS handshake, then HTTP/1.1 requests until either side closes.
struct Connection {
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    state: Arc<AppState>,
    drain: watch::Receiver<bool>,
}

impl Connection {
    async fn serve(mut self, tcp: TcpStream, peer: SocketAddr) {
        let _open = OpenConnection::new(self.state.metrics.clone());
        // Small replies: send each as soon as it is written.
        let _ = tcp.set_nodelay(true);
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
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_header_size(MAX_HEADER_BYTES)
            .keep_alive(true);
        let writes = Arc::new(WriteClock::new());
        let conn = http.serve_connection(
            TokioIo::new(Watched {
                inner: stream,
                writes: writes.clone(),
            }),
            TowerToHyperService::new(self.router.clone()),
        );
        tokio::pin!(conn);
        // hyper has no write timeout: a client that stops reading its replies would keep the
        // connection (and its slot) forever once the socket buffers are full.
        let stalled = writes.stalled_longer_than(limits.write_timeout);
        tokio::pin!(stalled);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = drained(&mut self.drain) => {
                // Finish the request in progress (if any), then close.
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = stalled.as_mut() => Ok(()),
                }
            }
            _ = stalled.as_mut() => {
                tracing::debug!(%peer, "client stopped reading its replies; connection closed");
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection closed with an error");
        }
    }
}

/// When a write to the client started waiting, if one is waiting now.
struct WriteClock {
    origin: Instant,
    /// Milliseconds from `origin` to the start of the wait, plus one; 0 when no write waits.
    waiting_since: AtomicU64,
}

impl WriteClock {
    fn new() -> WriteClock {
        WriteClock {
            origin: Instant::now(),
            waiting_since: AtomicU64::new(0),
        }
    }

    fn note<T>(&self, poll: &Poll<T>) {
        if poll.is_pending() {
            if self.waiting_since.load(Ordering::Relaxed) == 0 {
                let now = self.origin.elapsed().as_millis() as u64 + 1;
                self.waiting_since.store(now, Ordering::Relaxed);
            }
        } else {
            self.waiting_since.store(0, Ordering::Relaxed);
        }
    }

    /// Completes once a single write has waited longer than `limit`.
    async fn stalled_longer_than(&self, limit: Duration) {
        // Checking a quarter of the limit apart cuts a stalled client off within 1.25 limits.
        let every = (limit / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            let since = self.waiting_since.load(Ordering::Relaxed);
            if since != 0 {
                let waited = self
                    .origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since - 1));
                if waited > limit {
                    return;
                }
            }
        }
    }
}

/// The connection's stream, with its writes timed by a [`WriteClock`].
struct Watched<S> {
    inner: S,
    writes: Arc<WriteClock>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.writes.note(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.writes.note(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.writes.note(&poll);
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
