//! Reading a request body within its limits: its size (6 MiB), its time (`--read-timeout`), and
//! the memory that all bodies being read may hold together (`--max-body-memory`).
//!
//! **One budget for every connection.** The size limit bounds one body, not their sum: 256
//! connections that each send 6 MiB − 1 bytes and stall would hold 1.5 GiB until their timeout.
//! So every body takes its bytes from one [`BodyBudget`] before it holds them: the declared
//! `Content-Length` at once, or, for a chunked body, each growth of its buffer. The bytes go
//! back when the request has been answered. A request that cannot get its bytes before its
//! body timeout is answered 503 with `Retry-After` (see [`Rejection::Busy`] for why not 429):
//! the server is full, whoever filled it, and a retry a moment later finds room. While it
//! waits, its client's bytes wait in the kernel's socket buffers, not in this process.
//!
//! **One buffer per body.** hyper hands over a chunked body one frame per chunk, each a `Bytes`
//! that keeps the read buffer it was cut from alive. Collecting the frames
//! (`axum::body::to_bytes`) kept a list entry and a piece of read buffer per chunk: 360 MB for
//! 6 MiB sent as one-byte chunks. Here each frame is copied into one buffer and dropped at once,
//! so a body costs its own size (at most twice, while the buffer doubles), whatever its framing.
//! And a body may come in at most [`MAX_FRAMES`] pieces, which bounds the time its framing costs.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::serve::Limits;
use crate::serve::metrics::Rejection;

/// The first buffer of a chunked body: the size of a small review, so most reviews never
/// reallocate, and small enough that a thousand stalled one-chunk bodies hold 8 MiB.
const FIRST_BUFFER: usize = 8 * 1024;

/// Most pieces (chunks, or reads of a `Content-Length` body) one body may arrive in. hyper
/// hands each chunk over through a channel to the handler's task, about half a microsecond
/// apiece: 6 MiB of one-byte chunks took 3.3 s of CPU. This many bounds that to about 30 ms,
/// and it is far more than honest clients need: the API server sends a `Content-Length` body,
/// which arrives in reads of kilobytes, and a 6 MiB body within it averages 96-byte chunks.
const MAX_FRAMES: usize = 64 * 1024;

/// How long a client told 503 should wait before it tries again: bodies in flight are answered
/// or timed out within one `--read-timeout` (10 s), and most within milliseconds.
pub(super) const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The bytes every body being read may hold together, shared by all connections.
#[derive(Debug)]
pub(super) struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl BodyBudget {
    pub(super) fn new(total: usize) -> BodyBudget {
        BodyBudget {
            bytes: Arc::new(Semaphore::new(total.min(Semaphore::MAX_PERMITS))),
            total,
        }
    }

    /// Bytes not held by any body now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Waits until `bytes` are free, but not past `deadline`.
    async fn take(&self, bytes: usize, deadline: Instant) -> Option<OwnedSemaphorePermit> {
        // More than the whole budget can never be free; nor can more than u32 permits be asked.
        let n = u32::try_from(bytes).ok().filter(|_| bytes <= self.total)?;
        let acquire = self.bytes.clone().acquire_many_owned(n);
        match tokio::time::timeout_at(deadline, acquire).await {
            // The semaphore is never closed.
            Ok(permit) => permit.ok(),
            Err(_) => None,
        }
    }
}

/// A body read whole, holding its bytes of the budget until it is dropped (once answered).
#[derive(Debug)]
pub(super) struct HeldBody {
    bytes: Vec<u8>,
    /// The budget taken for `bytes`' capacity.
    held: Option<OwnedSemaphorePermit>,
    held_bytes: usize,
}

impl HeldBody {
    pub(super) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Makes room for `capacity` bytes in all, taking the difference from the budget first.
    async fn grow_to(
        &mut self,
        capacity: usize,
        budget: &BodyBudget,
        deadline: Instant,
    ) -> Result<(), (Rejection, String)> {
        let more = capacity.saturating_sub(self.held_bytes);
        if more == 0 {
            return Ok(());
        }
        let Some(permit) = budget.take(more, deadline).await else {
            let detail = format!(
                "the server is busy: request bodies in flight hold its {} bytes for bodies; retry",
                budget.total
            );
            return Err((Rejection::Busy, detail));
        };
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        self.held_bytes = capacity;
        self.bytes.reserve_exact(capacity - self.bytes.len());
        Ok(())
    }
}

/// The whole body, or why it was not read: over the limit (declared or actual), no room in
/// the budget, malformed framing, or too slow.
pub(super) async fn read_body(
    limits: &Limits,
    budget: &BodyBudget,
    headers: &HeaderMap,
    mut body: Body,
) -> Result<HeldBody, (Rejection, String)> {
    let deadline = Instant::now() + limits.body_timeout;
    let too_large = || {
        let detail = format!("body is over the {} byte limit", limits.max_body);
        (Rejection::TooLarge, detail)
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut held = HeldBody {
        bytes: Vec::new(),
        held: None,
        held_bytes: 0,
    };
    match declared {
        Some(n) if n > limits.max_body as u64 => return Err(too_large()),
        // hyper holds the body to its declared length: one buffer of that size is enough.
        Some(n) => held.grow_to(n as usize, budget, deadline).await?,
        None => {}
    }
    let mut frames = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                let detail = format!(
                    "the body did not arrive within {} s",
                    limits.body_timeout.as_secs_f64()
                );
                return Err((Rejection::BodyTimeout, detail));
            }
            Ok(None) => return Ok(held),
            Ok(Some(Err(e))) if is_bad_framing(&e) => {
                let detail = "the chunked body is malformed (chunk size, line ending or extension)";
                return Err((Rejection::BadFraming, detail.into()));
            }
            Ok(Some(Err(e))) => {
                return Err((Rejection::BodyTimeout, format!("reading the body: {e}")));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        frames += 1;
        if frames > MAX_FRAMES {
            let detail = format!(
                "the body came in more than {MAX_FRAMES} pieces; send it with a Content-Length or in larger chunks"
            );
            return Err((Rejection::BadFraming, detail));
        }
        // Trailers carry nothing the review needs.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = held.bytes.len() + data.len();
        if len > limits.max_body {
            return Err(too_large());
        }
        if len > held.held_bytes {
            // Doubling keeps the copies linear in the body's size, whatever its chunks.
            let capacity = len
                .max(held.held_bytes * 2)
                .max(FIRST_BUFFER)
                .min(limits.max_body);
            held.grow_to(capacity, budget, deadline).await?;
        }
        held.bytes.extend_from_slice(&data);
    }
}

/// Whether the body failed on its framing (hyper's chunked decoder reports a bad size, a bare
/// LF or an over-long extension as `InvalidInput` or `InvalidData`), not on a connection that
/// broke (`UnexpectedEof`, or no I/O error at all).
fn is_bad_framing(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            );
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use futures::SinkExt as _;

    /// A body that sends `first` and then nothing, until the sender is dropped.
    fn stalled(
        first: Vec<u8>,
    ) -> (
        Body,
        futures::channel::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    ) {
        let (mut tx, rx) = futures::channel::mpsc::channel(1);
        tx.try_send(Ok(first)).unwrap();
        (Body::from_stream(rx), tx)
    }

    fn declared(n: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        h
    }

    fn limits(body_timeout: Duration) -> Limits {
        Limits {
            body_timeout,
            ..Limits::default()
        }
    }

    /// Two stalled near-limit bodies take the whole budget; the third gets 503 (`Busy`) when its
    /// body timeout passes, and the budget is whole again once the first two are answered.
    #[tokio::test]
    async fn the_budget_refuses_the_body_that_does_not_fit() {
        let max = Limits::default().max_body;
        let budget = Arc::new(BodyBudget::new(2 * max));
        let mut holders = Vec::new();
        for _ in 0..2 {
            let budget = budget.clone();
            let (body, tx) = stalled(vec![b' '; 1024]);
            holders.push((
                tx,
                tokio::spawn(async move {
                    // Far longer than the test: these hold their bytes until dropped.
                    let long = limits(Duration::from_secs(3600));
                    read_body(&long, &budget, &declared(max - 1), body).await
                }),
            ));
        }
        while budget.available() > 2 * max - 2 * (max - 1) {
            tokio::task::yield_now().await;
        }

        let (third, _tx) = stalled(vec![b' '; 1024]);
        let short = limits(Duration::from_millis(50));
        let refused = read_body(&short, &budget, &declared(max - 1), third).await;
        assert_eq!(refused.unwrap_err().0, Rejection::Busy);
        // A small body still fits in what is left.
        let small = read_body(&short, &budget, &declared(1), Body::from(" ")).await;
        assert_eq!(small.unwrap().bytes(), b" ");

        for (mut tx, task) in holders {
            tx.send(Ok(vec![b' '; max - 1 - 1024])).await.unwrap();
            drop(tx);
            let body = task.await.unwrap().unwrap();
            assert_eq!(body.bytes().len(), max - 1);
        }
        assert_eq!(budget.available(), 2 * max);
    }

    /// One piece more than [`MAX_FRAMES`] is refused as bad framing, and its budget given back.
    #[tokio::test]
    async fn a_body_in_too_many_pieces_is_refused() {
        let budget = BodyBudget::new(Limits::default().max_body);
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..=MAX_FRAMES).map(|_| Ok(vec![b' '])).collect();
        let body = Body::from_stream(futures::stream::iter(chunks));
        let refused = read_body(&Limits::default(), &budget, &HeaderMap::new(), body).await;
        assert_eq!(refused.unwrap_err().0, Rejection::BadFraming);
        assert_eq!(budget.available(), Limits::default().max_body);
    }

    /// A body of many small chunks is one buffer of its size, charged to the budget as it grows
    /// and given back when dropped.
    #[tokio::test]
    async fn a_chunked_body_is_copied_into_one_buffer_charged_as_it_grows() {
        let budget = BodyBudget::new(Limits::default().max_body);
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..50_000)
            .map(|i| Ok(vec![b'0' + (i % 10) as u8]))
            .collect();
        let body = Body::from_stream(futures::stream::iter(chunks));
        let held = read_body(&Limits::default(), &budget, &HeaderMap::new(), body)
            .await
            .unwrap();
        assert_eq!(held.bytes().len(), 50_000);
        assert!(held.bytes().starts_with(b"0123456789"));
        let charged = Limits::default().max_body - budget.available();
        assert!(
            (50_000..=2 * 50_000).contains(&charged),
            "charged {charged} bytes for a 50,000-byte body"
        );
        drop(held);
        assert_eq!(budget.available(), Limits::default().max_body);
    }
}
