//! Pipelined replication: `/impetus/raft-pipeline/1`.
//!
//! openraft replicates to each follower through one *stream session*: a
//! stream of AppendEntries requests that it fills as entries are written on
//! the leader, and a stream of results it reads back. Sent one at a time,
//! an append waits for the previous one's reply, so an entry proposed while
//! a follower flushes leaves only after that flush. Here a session is one
//! substream: the leader writes requests as openraft yields them (a task of
//! its own) and reads the results in the same order on the other half; the
//! follower hands the requests to [`Raft::stream_append`], which keeps them
//! flowing into its log (the WAL's group commit), and writes each result as
//! the entries it acknowledges are flushed.
//!
//! Frames are the Raft protocol's (`[u32 length][RAFT_RPC_VERSION][postcard]`):
//! `AppendEntriesRequest`s one way, [`PipeReply`]s the other.
//!
//! Invariants:
//! - replies come back in request order, one per request, and a session
//!   ends at its first failed result (a conflict, a higher vote, a refusal):
//!   the follower sends it, then closes; the leader yields it, then stops;
//! - a substream that fails, closes early or keeps a request unanswered
//!   past the RPC TTL is dropped and the session ends with an error:
//!   openraft then backs off and starts another session from what was
//!   acknowledged, so nothing is skipped and a late reply answers nothing;
//! - the leader closes its half when openraft ends the session's input;
//!   the follower then answers what it holds and closes too. A follower
//!   also ends a session that brought no request for
//!   [`SERVER_SESSION_IDLE`] (a leader gone without closing its connection).
//!
//! A session of one request (a heartbeat) goes over the Raft stream of
//! [`super::raft_rpc`] instead: a new substream per heartbeat would cost
//! more than it could save.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::io::{ReadHalf, WriteHalf};
use futures::stream::BoxStream;
use futures::{AsyncReadExt, AsyncWriteExt, Stream, StreamExt};
use impetus_raft::openraft::error::{RPCError, Unreachable};
use impetus_raft::openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use impetus_raft::{NodeId, TypeConfig};
use impetus_sdk::stream::refused_protocol;
use impetus_sdk::transport::{read_frame, within, write_frame};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::raft_rpc::{decode, encode, ttl_for, MAX_RAFT_FRAME};
use crate::rt::AbortOnDrop;
use crate::LATENCY;

/// The protocol name of a replication session.
pub const RAFT_PIPELINE_PROTOCOL: StreamProtocol = StreamProtocol::new("/impetus/raft-pipeline/1");

/// A follower gives up writing one reply after this long (a leader that
/// stopped reading).
const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A follower ends a session that brought no request for this long: its
/// leader is gone without closing the connection (half-open TCP). A live
/// leader never idles this long, since every peer's registry heartbeat is a
/// Raft write every few seconds; were it to, its next write fails and
/// openraft opens a new session. (No such bound on the leader's side:
/// openraft sleeps its backoff inside the request stream, so a leader
/// cannot tell backoff from idleness.)
pub const SERVER_SESSION_IDLE: Duration = Duration::from_secs(600);

/// What a follower answers to each request of a session, in order.
#[derive(Debug, Serialize, Deserialize)]
pub enum PipeReply {
    /// openraft's result: `Ok` with the last log id now flushed, or why not.
    Appended(StreamAppendResult<TypeConfig>),
    /// The follower cannot take appends (Raft not running yet, or stopped).
    Refused(String),
}

/// What a peer does with the requests of a session: [`Raft::stream_append`]
/// (`Err` is its fatal error, as text), or a test's stand-in.
///
/// [`Raft::stream_append`]: impetus_raft::openraft::Raft::stream_append
pub type Appender = Arc<
    dyn Fn(
            BoxStream<'static, AppendEntriesRequest<TypeConfig>>,
        ) -> BoxStream<'static, Result<StreamAppendResult<TypeConfig>, String>>
        + Send
        + Sync,
>;

/// The results of a session, as openraft reads them.
pub type Replies = BoxStream<'static, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>;

fn unreachable(target: NodeId, what: impl std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(format!("node {target}: {what}")))
}

/// Run a session to `target` on `stream`: write `requests` on it as they
/// come (a task of its own), and read back their results. Writing one
/// request, and its reply once awaited, each get `ttl`: a session that
/// stops making progress ends. A follower that turns out not to speak the
/// protocol is noted in `unsupported`.
pub fn start<S>(
    target: NodeId,
    stream: libp2p::Stream,
    requests: S,
    ttl: Duration,
    unsupported: Arc<AtomicBool>,
) -> Replies
where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    let (reader, writer) = stream.split();
    let (sent, written) = mpsc::unbounded_channel();
    let writer = AbortOnDrop(tokio::spawn(write_requests(requests, writer, sent, ttl)));
    let session = Session { target, reader, written, ttl, first: true, unsupported, _writer: writer };
    futures::stream::unfold(Some(session), Session::next_reply).boxed()
}

/// Write each request as openraft yields it; report each write (its frame's
/// size, or its failure, then stop) on `sent`. Closes the write half after
/// the last.
async fn write_requests<S>(
    mut requests: S,
    mut writer: WriteHalf<libp2p::Stream>,
    sent: mpsc::UnboundedSender<io::Result<usize>>,
    ttl: Duration,
) where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    while let Some(req) = requests.next().await {
        let last = req.entries.last().map_or(0, |e| e.log_id.index);
        tracing::trace!(target: LATENCY, kind = "append-entries", last, "raft rpc sending");
        let written = match encode(&req) {
            Ok(frame) => {
                within(ttl_for(ttl, frame.len()), "no progress", write_frame(&mut writer, &frame, MAX_RAFT_FRAME))
                    .await
                    .map(|()| frame.len())
            }
            Err(e) => Err(e),
        };
        let failed = written.is_err();
        if sent.send(written).is_err() || failed {
            return;
        }
    }
    // No more requests: the follower answers what it holds, then closes.
    if let Err(e) = writer.close().await {
        tracing::debug!(error = %e, "closing a replication session");
    }
}

/// The leader's end of a session: the read half, and the writes to answer.
struct Session {
    target: NodeId,
    reader: ReadHalf<libp2p::Stream>,
    /// One item per request written (its frame's size), in order; closed
    /// when the writer is done.
    written: mpsc::UnboundedReceiver<io::Result<usize>>,
    ttl: Duration,
    /// No reply read yet: a refused protocol shows here (V1Lazy).
    first: bool,
    unsupported: Arc<AtomicBool>,
    _writer: AbortOnDrop,
}

type Next = (Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>, Option<Session>);

impl Session {
    /// The reply to the oldest request not yet answered; `None` once the
    /// writer is done and every request it wrote is answered.
    async fn next_reply(session: Option<Session>) -> Option<Next> {
        let mut s = session?;
        let reply = match s.written.recv().await? {
            // The follower writes and syncs the request before it answers:
            // a large one gets longer.
            Ok(bytes) => {
                match within(ttl_for(s.ttl, bytes), "no progress", read_frame(&mut s.reader, MAX_RAFT_FRAME)).await {
                    Ok(frame) => decode::<PipeReply>("raft pipeline reply", &frame),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        let first = std::mem::replace(&mut s.first, false);
        match reply {
            Ok(PipeReply::Appended(result)) => {
                let last = result.as_ref().ok().and_then(|id| id.map(|id| id.index));
                tracing::trace!(target: LATENCY, kind = "append-entries", last = last.unwrap_or(0), "raft reply received");
                let go_on = result.is_ok();
                Some((Ok(result), go_on.then_some(s)))
            }
            Ok(PipeReply::Refused(why)) => {
                let err = unreachable(s.target, format_args!("refused append-entries: {why}"));
                Some((Err(err), None))
            }
            Err(e) if first && refused_protocol(&e) => {
                // Nothing was taken: the next sessions go one append at a time.
                tracing::info!(
                    target = s.target,
                    "peer does not speak {RAFT_PIPELINE_PROTOCOL}; replicating one append at a time"
                );
                s.unsupported.store(true, Ordering::Relaxed);
                Some((Err(unreachable(s.target, format_args!("does not speak {RAFT_PIPELINE_PROTOCOL}"))), None))
            }
            Err(e) => {
                tracing::debug!(target = s.target, error = %e, "replication session failed; dropped");
                Some((Err(unreachable(s.target, format_args!("replication session: {e}"))), None))
            }
        }
    }
}

/// Serve one replication session from `peer` with `append` (`None`: Raft is
/// not running here yet), until either side ends it.
pub async fn serve(peer: PeerId, stream: libp2p::Stream, append: Option<Appender>) {
    let (reader, mut writer) = stream.split();
    let Some(append) = append else {
        let refused = PipeReply::Refused("raft is not running on this peer yet".into());
        if write_reply(&mut writer, &refused).await.is_ok() {
            let _ = writer.close().await;
        }
        return;
    };
    // The requests end when the leader closes its half, at a malformed
    // frame (named in `malformed`), or when the replies end (`stop` dropped).
    let (stop, stopped) = oneshot::channel::<()>();
    let malformed: Arc<Mutex<Option<String>>> = Arc::default();
    let bad = malformed.clone();
    let requests = futures::stream::unfold(reader, move |mut reader| {
        let bad = bad.clone();
        async move {
            let frame = match within(SERVER_SESSION_IDLE, "no request", read_frame(&mut reader, MAX_RAFT_FRAME)).await {
                Ok(frame) => frame,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "replication session closed");
                    return None;
                }
            };
            match decode::<AppendEntriesRequest<TypeConfig>>("append-entries request", &frame) {
                Ok(req) => {
                    let last = req.entries.last().map_or(0, |e| e.log_id.index);
                    tracing::trace!(target: LATENCY, kind = "append-entries", last, "raft rpc received");
                    Some((req, reader))
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "malformed append-entries request; ending its session");
                    *bad.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                    None
                }
            }
        }
    })
    .take_until(stopped);
    let mut replies = append(requests.boxed());
    let mut ended = false;
    while let Some(result) = replies.next().await {
        let reply = match result {
            Ok(result) => PipeReply::Appended(result),
            Err(fatal) => PipeReply::Refused(fatal),
        };
        let last = !matches!(reply, PipeReply::Appended(Ok(_)));
        if let Err(e) = write_reply(&mut writer, &reply).await {
            tracing::debug!(%peer, error = %e, "replication reply not sent; ending its session");
            return;
        }
        let acked = match &reply {
            PipeReply::Appended(Ok(Some(id))) => id.index,
            _ => 0,
        };
        tracing::trace!(target: LATENCY, kind = "append-entries", last = acked, "raft reply sent");
        if last {
            ended = true;
            break;
        }
    }
    drop(stop);
    // Every request read is answered: say why the rest was not taken.
    let why = malformed.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let (false, Some(why)) = (ended, why) {
        let _ = write_reply(&mut writer, &PipeReply::Refused(why)).await;
    }
    let _ = writer.close().await;
}

async fn write_reply(writer: &mut WriteHalf<libp2p::Stream>, reply: &PipeReply) -> io::Result<()> {
    within(REPLY_WRITE_TIMEOUT, "no progress", write_frame(writer, &encode(reply)?, MAX_RAFT_FRAME)).await
}
