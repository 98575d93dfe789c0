//! Raft RPCs over the swarm: `/impetus/raft/1`.
//!
//! [`RaftRpc`] and [`RaftReply`] are openraft's own messages (serde) framed
//! like the client protocol: `[u32 length][RAFT_RPC_VERSION][postcard...]`.
//! [`P2pRaftNetwork`] is openraft's network factory on a [`NetHandle`];
//! [`answer`] is the receiving side, calling into the local Raft.
//!
//! Votes and single appends (heartbeats, and the first append to a peer
//! not yet connected) go over one long-lived substream per connection
//! (`/impetus/raft-stream/1`, the same frames, one request then its reply,
//! in turn): openraft sends them one at a time to each target, so nothing
//! is lost by the order. A stream that fails or times out is dropped (a
//! late reply must not answer the next request) and the RPC goes once over
//! request-response instead, which also dials the target's address; the
//! next RPC opens a new stream. Snapshots always use request-response.
//! Replication sessions of more than one append are pipelined on a
//! substream of their own ([`super::raft_pipeline`]).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, Stream, StreamExt};
use impetus_raft::openraft::base::{BoxFuture, BoxStream};
use impetus_raft::openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use impetus_raft::openraft::network::{stream_append_sequential, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use impetus_raft::openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use impetus_raft::openraft::OptionalSend;
use impetus_raft::{NodeId, PeerNode, Raft, Snapshot, SnapshotData, SnapshotMeta, TypeConfig, Vote};
use impetus_sdk::transport::{read_frame, write_frame};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use super::{raft_pipeline, split_p2p, Handlers, NetError, NetHandle};
use crate::LATENCY;

/// The protocol name of Raft RPCs.
pub const RAFT_PROTOCOL: StreamProtocol = StreamProtocol::new("/impetus/raft/1");

/// The protocol name of the long-lived Raft stream.
pub const RAFT_STREAM_PROTOCOL: StreamProtocol = StreamProtocol::new("/impetus/raft-stream/1");

/// Version byte of a Raft RPC frame. Bumped with the meaning of the
/// commands it carries (`impetus_raft::wal_log::WAL_RECORD_VERSION`), so a
/// peer of another build is refused by name, not fed entries it would
/// apply under other rules. 2: with WAL record version 2; 3: with WAL
/// record version 3 (retention).
pub const RAFT_RPC_VERSION: u8 = 3;

/// Largest Raft frame: a full snapshot travels in one.
pub const MAX_RAFT_FRAME: usize = 1 << 30;

/// The least time a Raft RPC gets before it counts as lost.
pub const MIN_RPC_TTL: Duration = Duration::from_secs(1);

/// The least time a snapshot gets, before its size adds to it.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(30);

/// The slowest a Raft frame may move (sent, and on the follower written to
/// its log and synced) before it counts as lost: a frame of many MB
/// (modules a lagging follower catches up on, a snapshot) gets a second
/// more per 4 MiB. Without it such a frame would time out and be sent
/// again, the same, for ever.
pub const MIN_BYTES_PER_SEC: u64 = 4 << 20;

/// `ttl` stretched for a frame of `bytes` (see [`MIN_BYTES_PER_SEC`]).
pub fn ttl_for(ttl: Duration, bytes: usize) -> Duration {
    let extra_ms = (bytes as u64).saturating_mul(1000) / MIN_BYTES_PER_SEC;
    ttl.saturating_add(Duration::from_millis(extra_ms))
}

/// A Raft RPC, as one node sends it to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    Snapshot {
        vote: Vote,
        meta: SnapshotMeta,
        data: Vec<u8>,
    },
    /// A leader leaving membership hands its lead to this node, which
    /// starts an election at once instead of after its election timeout.
    /// (Last, so the other variants keep their encoding.)
    TransferLeader(TransferLeaderRequest<TypeConfig>),
}

impl RaftRpc {
    /// The last log index an append carries (0: none, or not an append).
    pub fn last_index(&self) -> u64 {
        match self {
            RaftRpc::Append(r) => r.entries.last().map_or(0, |e| e.log_id.index),
            _ => 0,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            RaftRpc::Append(_) => "append-entries",
            RaftRpc::Vote(_) => "vote",
            RaftRpc::PreVote(_) => "pre-vote",
            RaftRpc::Snapshot { .. } => "snapshot",
            RaftRpc::TransferLeader(_) => "transfer-leader",
        }
    }
}

/// The answer to a [`RaftRpc`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    Append(AppendEntriesResponse<TypeConfig>),
    Vote(VoteResponse<TypeConfig>),
    Snapshot(SnapshotResponse<TypeConfig>),
    /// The receiver could not handle it (not started yet, stopped, fatal).
    Error(String),
    TransferLeader(TransferLeaderResponse<TypeConfig>),
}

pub(super) fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    postcard::to_extend(v, vec![RAFT_RPC_VERSION])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(what: &str, frame: &[u8]) -> io::Result<T> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    match frame.split_first() {
        Some((&RAFT_RPC_VERSION, body)) => {
            postcard::from_bytes(body).map_err(|e| bad(format!("malformed {what}: {e}")))
        }
        Some((v, _)) => Err(bad(format!("unsupported {what} version {v} (this build speaks {RAFT_RPC_VERSION})"))),
        None => Err(bad(format!("empty {what}"))),
    }
}

/// The request-response codec of `/impetus/raft/1`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RaftCodec;

impl libp2p::request_response::Codec for RaftCodec {
    type Protocol = StreamProtocol;
    type Request = RaftRpc;
    type Response = RaftReply;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<RaftRpc> {
        decode("raft request", &read_frame(io, MAX_RAFT_FRAME).await?)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<RaftReply> {
        decode("raft reply", &read_frame(io, MAX_RAFT_FRAME).await?)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: RaftRpc,
    ) -> io::Result<()> {
        write_frame(io, &encode(&req)?, MAX_RAFT_FRAME).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: RaftReply,
    ) -> io::Result<()> {
        write_frame(io, &encode(&resp)?, MAX_RAFT_FRAME).await
    }
}

/// Handle one inbound RPC with the local Raft.
pub async fn answer(raft: &Raft, rpc: RaftRpc) -> RaftReply {
    fn fatal(e: impl std::fmt::Display) -> RaftReply {
        RaftReply::Error(e.to_string())
    }
    match rpc {
        RaftRpc::Append(r) => raft.append_entries(r).await.map_or_else(fatal, RaftReply::Append),
        RaftRpc::Vote(r) => raft.vote(r).await.map_or_else(fatal, RaftReply::Vote),
        RaftRpc::PreVote(r) => raft.pre_vote(r).await.map_or_else(fatal, RaftReply::Vote),
        RaftRpc::Snapshot { vote, meta, data } => {
            let snapshot = Snapshot { meta, snapshot: SnapshotData::new(data) };
            raft.install_full_snapshot(vote, snapshot).await.map_or_else(fatal, RaftReply::Snapshot)
        }
        RaftRpc::TransferLeader(r) => {
            tracing::info!(to = %r.to_node_id(), "the leader hands its lead over");
            raft.handle_transfer_leader(r).await.map_or_else(fatal, RaftReply::TransferLeader)
        }
    }
}

/// Answer the RPCs that arrive on one Raft stream from `peer`, in order,
/// until it closes or a frame is malformed.
pub async fn serve_stream(peer: PeerId, mut stream: libp2p::Stream, handlers: Arc<Handlers>) {
    loop {
        let rpc = match read_frame(&mut stream, MAX_RAFT_FRAME).await {
            Ok(frame) => match decode::<RaftRpc>("raft request", &frame) {
                Ok(rpc) => rpc,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "malformed raft request; closing its stream");
                    return;
                }
            },
            Err(e) => {
                tracing::debug!(%peer, error = %e, "raft stream closed");
                return;
            }
        };
        let (kind, last) = (rpc.kind(), rpc.last_index());
        tracing::trace!(target: LATENCY, kind, last, "raft rpc received");
        let reply = handlers.answer_raft(peer, rpc).await;
        let sent = match encode(&reply) {
            Ok(frame) => write_frame(&mut stream, &frame, MAX_RAFT_FRAME).await,
            Err(e) => Err(e),
        };
        tracing::trace!(target: LATENCY, kind, last, "raft reply sent");
        if let Err(e) = sent {
            tracing::debug!(%peer, kind, error = %e, "raft reply not sent; closing its stream");
            return;
        }
    }
}

/// One request (`frame`, the encoded `rpc`) and its reply on a Raft stream.
async fn exchange(stream: &mut libp2p::Stream, rpc: &RaftRpc, frame: &[u8]) -> io::Result<RaftReply> {
    let (kind, last) = (rpc.kind(), rpc.last_index());
    tracing::trace!(target: LATENCY, kind, last, "raft rpc sending");
    write_frame(stream, frame, MAX_RAFT_FRAME).await?;
    let reply = decode("raft reply", &read_frame(stream, MAX_RAFT_FRAME).await?);
    tracing::trace!(target: LATENCY, kind, last, "raft reply received");
    reply
}

/// openraft's network on the swarm: one [`P2pConnection`] per target node,
/// addressed by the multiaddr (with `/p2p/ID`) its membership entry holds.
#[derive(Clone, Debug)]
pub struct P2pRaftNetwork {
    net: NetHandle,
}

impl P2pRaftNetwork {
    pub fn new(net: NetHandle) -> P2pRaftNetwork {
        P2pRaftNetwork { net }
    }
}

/// A Raft connection to one node.
#[derive(Debug)]
pub struct P2pConnection {
    net: NetHandle,
    target: NodeId,
    addr: Result<Multiaddr, String>,
    /// The target's peer id, from the `/p2p/` part of `addr` (parsed once).
    peer: Option<PeerId>,
    /// The open Raft stream to the target, if any. Only ever reached
    /// through `&mut self` (`Mutex::get_mut`, no lock): the mutex is there
    /// because openraft wants a `Sync` network and a stream is not.
    stream: std::sync::Mutex<Option<libp2p::Stream>>,
    /// The target does not speak `/impetus/raft-pipeline/1`: every session
    /// goes one append at a time.
    no_pipeline: Arc<AtomicBool>,
}

impl RaftNetworkFactory<TypeConfig> for P2pRaftNetwork {
    type Network = P2pConnection;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> P2pConnection {
        let addr = node.addr.parse::<Multiaddr>().map_err(|e| format!("node {target} has a bad address {node}: {e}"));
        let peer = addr.as_ref().ok().and_then(split_p2p).map(|(peer, _)| peer);
        let stream = std::sync::Mutex::new(None);
        P2pConnection { net: self.net.clone(), target, addr, peer, stream, no_pipeline: Arc::default() }
    }
}

impl P2pConnection {
    /// `rpc` (encoded: `frame`) over the Raft stream (opened first if
    /// needed); `Err` gives the RPC back when the stream could not carry it.
    async fn over_stream(
        &mut self,
        peer: PeerId,
        rpc: RaftRpc,
        frame: &[u8],
        ttl: Duration,
    ) -> Result<RaftReply, RaftRpc> {
        let slot = self.stream.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut stream = match slot.take() {
            Some(s) => s,
            None => match self.net.open_stream(peer, RAFT_STREAM_PROTOCOL, ttl).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(target = self.target, error = %e, "no raft stream; using request-response");
                    return Err(rpc);
                }
            },
        };
        match tokio::time::timeout(ttl, exchange(&mut stream, &rpc, frame)).await {
            Ok(Ok(reply)) => {
                *slot = Some(stream);
                Ok(reply)
            }
            Ok(Err(e)) => {
                tracing::debug!(target = self.target, error = %e, "raft stream failed; dropped");
                Err(rpc)
            }
            Err(_) => {
                tracing::debug!(target = self.target, ?ttl, "raft stream timed out; dropped");
                Err(rpc)
            }
        }
    }

    async fn call(&mut self, rpc: RaftRpc, ttl: Duration) -> Result<RaftReply, RPCError<TypeConfig>> {
        let addr = self.addr.clone().map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))?;
        let kind = rpc.kind();
        // openraft asks for one heartbeat interval (100 ms). A loaded
        // machine (a debug build, a flush behind a busy disk) can take
        // longer, and cutting the RPC then only makes it send it again.
        let ttl = ttl.max(MIN_RPC_TTL);
        let (rpc, ttl) = match (self.peer, &rpc) {
            (Some(peer), RaftRpc::Append(_) | RaftRpc::Vote(_) | RaftRpc::PreVote(_)) => {
                let frame = encode(&rpc).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
                let ttl = ttl_for(ttl, frame.len());
                match self.over_stream(peer, rpc, &frame, ttl).await {
                    Ok(reply) => return Self::answered(self.target, kind, reply),
                    Err(rpc) => (rpc, ttl),
                }
            }
            // The data is nearly all of a snapshot's frame.
            (_, RaftRpc::Snapshot { data, .. }) => {
                let ttl = ttl_for(ttl, data.len());
                (rpc, ttl)
            }
            _ => (rpc, ttl),
        };
        match self.net.raft(&addr, rpc, ttl).await {
            Ok(reply) => Self::answered(self.target, kind, reply),
            Err(e) => Err(RPCError::Unreachable(Unreachable::from_string(format!("node {}: {e}", self.target)))),
        }
    }

    fn answered(target: NodeId, kind: &str, reply: RaftReply) -> Result<RaftReply, RPCError<TypeConfig>> {
        match reply {
            // Not started yet, or stopping: back off as from an unreachable node.
            RaftReply::Error(e) => {
                Err(RPCError::Unreachable(Unreachable::from_string(format!("node {target} refused {kind}: {e}"))))
            }
            reply => Ok(reply),
        }
    }
}

fn unexpected(kind: &str, reply: RaftReply) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(format!("unexpected answer to {kind}: {reply:?}")))
}

impl RaftNetworkV2<TypeConfig> for P2pConnection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::Append(rpc), option.hard_ttl()).await? {
            RaftReply::Append(r) => Ok(r),
            other => Err(unexpected("append-entries", other)),
        }
    }

    /// A session of appends is pipelined on a substream of its own; one
    /// of a single append (a heartbeat) takes the Raft stream.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        let one = impetus_raft::is_single_append(&input);
        let Some(peer) = self.peer.filter(|_| !one && !self.no_pipeline.load(Ordering::Relaxed)) else {
            return stream_append_sequential(self, input, option);
        };
        let ttl = option.soft_ttl().max(MIN_RPC_TTL);
        Box::pin(async move {
            let opened = self.net.open_stream(peer, raft_pipeline::RAFT_PIPELINE_PROTOCOL, ttl).await;
            match opened {
                Ok(stream) => Ok(raft_pipeline::start(self.target, stream, input, ttl, self.no_pipeline.clone())),
                Err(NetError::Unsupported { protocol, .. }) => {
                    tracing::info!(target = self.target, %protocol, "peer does not speak it; replicating one append at a time");
                    self.no_pipeline.store(true, Ordering::Relaxed);
                    stream_append_sequential(self, input, option).await
                }
                // Not connected yet: the first append goes by request-response,
                // which dials; the session then ends, and openraft starts the
                // next one at once from what was acknowledged.
                Err(e) => {
                    tracing::debug!(target = self.target, error = %e, "no replication session; one append by request-response");
                    stream_append_sequential(self, input.take(1), option).await
                }
            }
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::Vote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(r) => Ok(r),
            other => Err(unexpected("vote", other)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::PreVote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(r) => Ok(r),
            other => Err(unexpected("pre-vote", other)),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::TransferLeader(req), option.hard_ttl()).await? {
            RaftReply::TransferLeader(r) => Ok(r),
            other => Err(unexpected("transfer-leader", other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let rpc = RaftRpc::Snapshot { vote, meta: snapshot.meta, data: snapshot.snapshot.into_inner() };
        // A snapshot may be large: give it more than one heartbeat's TTL
        // (and `call` more for its size).
        let ttl = option.hard_ttl().max(SNAPSHOT_TTL);
        match self.call(rpc, ttl).await {
            Ok(RaftReply::Snapshot(r)) => Ok(r),
            Ok(other) => Err(StreamingError::from(unexpected("snapshot", other))),
            Err(e) => Err(StreamingError::from(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_frame_gets_a_second_more_per_4_mib() {
        let s = Duration::from_secs;
        assert_eq!(ttl_for(s(1), 0), s(1));
        assert_eq!(ttl_for(s(1), 200), s(1), "a small frame: the RPC's own time");
        assert_eq!(ttl_for(s(1), 4 << 20), s(2));
        assert_eq!(ttl_for(s(1), 100 << 20), s(26), "a 100 MiB catch-up append");
        assert_eq!(ttl_for(SNAPSHOT_TTL, MAX_RAFT_FRAME), s(30 + 256), "the largest snapshot");
        assert_eq!(ttl_for(Duration::MAX, usize::MAX), Duration::MAX, "saturates");
    }
}
