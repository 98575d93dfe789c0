//! The client protocol on long-lived substreams: `/impetus/client-stream/1`.
//!
//! The frames are [`ClientCodec`](crate::transport::ClientCodec)'s: one
//! request, then its answer, in turn, on a substream that stays open for
//! the next request. A client keeps a [`StreamPool`]: a request takes an
//! idle stream (or opens one) and gives it back once answered, so a client
//! with N requests in flight holds N streams, and a sequential client one.
//! Against request-response this spares every request a substream (yamux
//! open and close frames, a protocol proposal), a timer, and the hops
//! through the swarm task on both ends.
//!
//! A stream that fails or times out is dropped, never reused: a late answer
//! must not answer the next request. A request goes again on a fresh stream
//! only when a pooled stream refused its frame (the connection had closed
//! meanwhile), so the server cannot have read it whole. Any other failure
//! is reported, because the request may have been carried out.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use impetus_proto::api::{self, ClientRequest, ClientResponse, ServiceError};
use impetus_proto::limits;
use libp2p::{PeerId, Stream, StreamProtocol};

use crate::transport::{encode_response_bounded, frame, read_frame, within, write_frame};

/// The protocol name of the long-lived client stream.
pub const CLIENT_STREAM_PROTOCOL: StreamProtocol = StreamProtocol::new("/impetus/client-stream/1");

/// A server closes a client stream that brings no request for this long.
pub const SERVER_STREAM_IDLE: Duration = Duration::from_secs(120);

/// A pooled stream idle for longer is dropped rather than reused: well
/// under [`SERVER_STREAM_IDLE`], so a server never closes a stream that a
/// client is about to reuse.
pub const POOLED_STREAM_IDLE: Duration = Duration::from_secs(30);

/// Most idle streams a pool keeps (a client's in-flight limit).
pub const MAX_POOLED_STREAMS: usize = 256;

/// How long opening a stream may take (a dial included) before the
/// request counts as not sent.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a server may take to handle one request and write its answer;
/// past it the stream ends (a client that stopped reading cannot hold it).
pub const SERVER_ANSWER_TIMEOUT: Duration = crate::transport::REQUEST_TIMEOUT;

/// Why a request on a client stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// No stream could be opened: the request was not sent.
    #[error("the peer does not speak {0} (a different Impetus version?)")]
    Unsupported(StreamProtocol),
    /// No stream could be opened (no connection, and none could be made):
    /// the request was not sent.
    #[error("cannot open a stream to the peer: {0}")]
    Open(String),
    /// The request is over [`limits::MAX_MESSAGE_BYTES`]: not sent.
    #[error("the request is {len} bytes, over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The stream failed after the request went out: it may have been
    /// carried out.
    #[error("the stream failed: {0}")]
    Io(io::Error),
    /// The answer is not a response of this version.
    #[error("bad answer: {0}")]
    BadAnswer(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Answer the requests on one client stream, in order, with `handle`, until
/// the stream closes, brings no request for `idle`, breaks the framing, or
/// an answer takes longer than [`SERVER_ANSWER_TIMEOUT`] to handle and write.
/// A well-framed request that does not decode (a version skew, a limit) is
/// answered with [`ServiceError::InvalidRequest`] and the stream goes on.
pub async fn serve<S, F, Fut>(io: &mut S, idle: Duration, mut handle: F) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    F: FnMut(ClientRequest) -> Fut,
    Fut: Future<Output = ClientResponse>,
{
    loop {
        let frame = within(idle, "no request", read_frame(io, limits::MAX_MESSAGE_BYTES)).await?;
        tracing::trace!(target: "impetus_latency", "client request read");
        let answer = async {
            let resp = match api::decode_request(&frame) {
                Ok(req) => handle(req).await,
                Err(e) => {
                    tracing::warn!(error = %e, "invalid client request");
                    ClientResponse::Error(ServiceError::InvalidRequest(e.to_string()))
                }
            };
            let r = write_frame(io, &encode_response_bounded(&resp), limits::MAX_MESSAGE_BYTES).await;
            tracing::trace!(target: "impetus_latency", ok = r.is_ok(), "client answer written");
            r
        };
        within(SERVER_ANSWER_TIMEOUT, "no answer handled and written", answer).await?;
    }
}

/// The client streams to one peer.
pub struct StreamPool {
    control: Mutex<libp2p_stream::Control>,
    peer: PeerId,
    /// Idle streams, most recently used last.
    idle: Mutex<Vec<(Instant, Stream)>>,
    opened: AtomicU64,
}

impl std::fmt::Debug for StreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamPool")
            .field("peer", &self.peer)
            .field("opened", &self.opened.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl StreamPool {
    /// Streams to `peer`, opened through `control` (the swarm dials the
    /// peer if it is not connected).
    pub fn new(control: libp2p_stream::Control, peer: PeerId) -> StreamPool {
        StreamPool { control: Mutex::new(control), peer, idle: Mutex::new(Vec::new()), opened: AtomicU64::new(0) }
    }

    /// How many streams this pool has opened.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Drop every idle stream (their connection closed).
    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    /// Send `req` and read its answer, all within `timeout`.
    pub async fn request(&self, req: &ClientRequest, timeout: Duration) -> Result<ClientResponse, StreamError> {
        let body = api::encode_request(req);
        let max = limits::MAX_MESSAGE_BYTES;
        let frame = frame(&body, max).map_err(|_| StreamError::TooLarge { len: body.len(), max })?;
        tokio::time::timeout(timeout, self.exchange(&frame)).await.map_err(|_| StreamError::Timeout(timeout))?
    }

    async fn exchange(&self, frame: &[u8]) -> Result<ClientResponse, StreamError> {
        // Each pass with a pooled stream takes one out of the pool, so this
        // ends: with an answer, or on a fresh stream.
        loop {
            let (mut stream, pooled) = match self.take() {
                Some(s) => (s, true),
                None => (self.open().await?, false),
            };
            if let Err(e) = stream.write_all(frame).await {
                if pooled {
                    tracing::debug!(peer = %self.peer, error = %e, "a pooled stream refused the request; trying another");
                    continue;
                }
                return Err(StreamError::Io(e));
            }
            stream.flush().await.map_err(StreamError::Io)?;
            let answer = match read_frame(&mut stream, limits::MAX_MESSAGE_BYTES).await {
                Ok(answer) => answer,
                // The swarm proposes a protocol and sends at once (V1Lazy):
                // a peer without it refuses only now, having read nothing.
                Err(e) if !pooled && refused_protocol(&e) => {
                    return Err(StreamError::Unsupported(CLIENT_STREAM_PROTOCOL))
                }
                Err(e) => return Err(StreamError::Io(e)),
            };
            let resp = api::decode_response(&answer).map_err(|e| StreamError::BadAnswer(e.to_string()))?;
            self.give_back(stream);
            return Ok(resp);
        }
    }

    /// The most recently used idle stream that is not too old.
    fn take(&self) -> Option<Stream> {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        idle.retain(|(since, _)| now.duration_since(*since) < POOLED_STREAM_IDLE);
        idle.pop().map(|(_, s)| s)
    }

    fn give_back(&self, stream: Stream) {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < MAX_POOLED_STREAMS {
            idle.push((Instant::now(), stream));
        }
    }

    async fn open(&self) -> Result<Stream, StreamError> {
        let mut control = self.control.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let open = control.open_stream(self.peer, CLIENT_STREAM_PROTOCOL);
        match tokio::time::timeout(OPEN_TIMEOUT, open).await {
            Ok(Ok(stream)) => {
                self.opened.fetch_add(1, Ordering::Relaxed);
                Ok(stream)
            }
            Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(p))) => Err(StreamError::Unsupported(p)),
            Ok(Err(e)) => Err(StreamError::Open(e.to_string())),
            Err(_) => Err(StreamError::Open(format!("no stream within {OPEN_TIMEOUT:?}"))),
        }
    }
}

/// Whether `e` is a peer refusing the protocol of a stream (multistream-select).
/// The swarm negotiates lazily (V1Lazy): a stream opens at once, and a peer
/// that does not speak its protocol shows only at the first read or write.
pub fn refused_protocol(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<libp2p::core::upgrade::NegotiationError>())
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures::io::Cursor;
    use impetus_proto::ids::JobId;

    use super::*;

    /// Reads from `input`, writes to `output`.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl AsyncRead for Duplex {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.input).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Duplex {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.output.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn framed(body: &[u8]) -> Vec<u8> {
        frame(body, usize::MAX).unwrap()
    }

    /// The answers `serve` wrote, decoded in order.
    fn answers(mut out: &[u8]) -> Vec<ClientResponse> {
        let mut all = Vec::new();
        while !out.is_empty() {
            let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
            all.push(api::decode_response(&out[4..4 + len]).unwrap());
            out = &out[4 + len..];
        }
        all
    }

    #[tokio::test]
    async fn serve_answers_requests_in_order_and_survives_an_undecodable_one() {
        let input = [
            framed(&api::encode_request(&ClientRequest::GetJob(JobId(1)))),
            // Well framed, but version 9: answered, and the stream goes on.
            framed(&[9, 0]),
            framed(&api::encode_request(&ClientRequest::GetJob(JobId(2)))),
        ]
        .concat();
        let mut io = Duplex { input: Cursor::new(input), output: Vec::new() };
        let mut seen = Vec::new();
        let end = serve(&mut io, Duration::from_secs(5), |req| {
            seen.push(req.clone());
            async move {
                match req {
                    ClientRequest::GetJob(id) => ClientResponse::HasModule(id == JobId(2)),
                    _ => ClientResponse::Error(ServiceError::Internal("unexpected".into())),
                }
            }
        })
        .await;
        // The stream ended after the last whole request.
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(seen, [ClientRequest::GetJob(JobId(1)), ClientRequest::GetJob(JobId(2))]);
        let got = answers(&io.output);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], ClientResponse::HasModule(false));
        assert!(
            matches!(&got[1], ClientResponse::Error(ServiceError::InvalidRequest(m)) if m.contains("version 9")),
            "{:?}",
            got[1]
        );
        assert_eq!(got[2], ClientResponse::HasModule(true));
    }

    /// A handler that never answers (or a client that never reads) cannot
    /// hold the stream past [`SERVER_ANSWER_TIMEOUT`].
    #[tokio::test(start_paused = true)]
    async fn serve_ends_a_stream_whose_answer_takes_too_long() {
        let input = framed(&api::encode_request(&ClientRequest::GetJob(JobId(1))));
        let mut io = Duplex { input: Cursor::new(input), output: Vec::new() };
        let started = tokio::time::Instant::now();
        let end = serve(&mut io, Duration::from_secs(600), |_| std::future::pending::<ClientResponse>()).await;
        let err = end.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert_eq!(started.elapsed(), SERVER_ANSWER_TIMEOUT);
        assert!(io.output.is_empty());
    }

    #[tokio::test]
    async fn serve_stops_at_a_broken_frame() {
        // A length over the limit: no allocation, no answer, the stream ends.
        let mut io = Duplex { input: Cursor::new(u32::MAX.to_be_bytes().to_vec()), output: Vec::new() };
        let mut calls = 0;
        let end = serve(&mut io, Duration::from_secs(5), |_| {
            calls += 1;
            async { ClientResponse::HasModule(true) }
        })
        .await;
        let err = end.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
        assert_eq!((calls, io.output.len()), (0, 0));
    }
}
