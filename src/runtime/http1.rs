//! HTTP/1.1 connections within limits, for every port a command serves: the accept loop with
//! its connection slots, and one connection served with a header timeout, a head size limit
//! and a guard against clients that stop reading.
//!
//! The webhook's HTTPS port and the plain-HTTP admin port both use these, so neither can be
//! held open by a client that sends half a request head or reads nothing: each connection is
//! its own task holding one of the port's permits, clients over the limit wait in the kernel's
//! accept queue rather than in memory, and only HTTP/1.1 is spoken (hyper's `http1` server:
//! an HTTP/2 preface, h2c included, is a parse error and the connection is closed).
//!
//! Headers that stall close the connection (hyper's header timeout); hyper has no write
//! timeout, so [`WriteClock`] times each write and a client that stops reading its replies is
//! cut off. On drain, each connection finishes the request it is on (hyper's graceful
//! shutdown) and closes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// After a failed accept (out of file descriptors, say), wait this long before the next one so
/// the loop does not spin while connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The least hyper accepts as its largest read buffer (its `MINIMUM_MAX_BUFFER_SIZE`).
const READ_BUFFER_MIN: usize = 8192;

/// What one HTTP/1.1 connection may cost its server.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionLimits {
    /// Time for a request head, and the longest an idle keep-alive connection stays open.
    pub(crate) header_timeout: Duration,
    /// The longest one write of a reply may wait on a client that does not read it.
    pub(crate) write_timeout: Duration,
    /// Largest request head; more gets 431 and the connection is closed.
    pub(crate) max_header_bytes: usize,
}

/// Accepts connections until the drain starts; each runs `serve` on its own task, holding one
/// of `permits` for as long as it lives.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    permits: Arc<Semaphore>,
    drain: watch::Receiver<bool>,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut stop = drain;
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
        // Small replies: send each as soon as it is written.
        let _ = tcp.set_nodelay(true);
        let connection = serve(tcp, peer);
        tokio::spawn(async move {
            let _permit = permit;
            connection.await;
        });
    }
}

/// Completes once the drain has started (at once if it already has).
pub(crate) async fn drained(drain: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens after the drain started.
    let _ = drain.wait_for(|d| *d).await;
}

/// Serves HTTP/1.1 requests on `stream` with `router` until either side closes, a limit is
/// passed, or the drain has started and the request in progress is answered.
pub(crate) async fn serve_connection<S>(
    stream: S,
    router: Router,
    limits: &ConnectionLimits,
    mut drain: watch::Receiver<bool>,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes)
        // hyper's read buffer grows to ~400 KB by default while a body streams in: 100 MB over
        // 256 connections. Twice the largest head still reads a head whole, and bodies arrive
        // in 16 KiB TLS records anyway.
        .max_buf_size((2 * limits.max_header_bytes).max(READ_BUFFER_MIN))
        .keep_alive(true);
    let writes = Arc::new(WriteClock::new());
    let conn = http.serve_connection(
        TokioIo::new(Watched {
            inner: stream,
            writes: writes.clone(),
        }),
        TowerToHyperService::new(router),
    );
    tokio::pin!(conn);
    // hyper has no write timeout: a client that stops reading its replies would keep the
    // connection (and its slot) forever once the socket buffers are full.
    let stalled = writes.stalled_longer_than(limits.write_timeout);
    tokio::pin!(stalled);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = drained(&mut drain) => {
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
