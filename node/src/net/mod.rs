//! The peer's network: one libp2p swarm (tokio) per peer.
//!
//! TCP → optional pnet (`--authkey`) → noise → yamux, carrying:
//! - `/impetus/client-stream/1`: the client protocol on long-lived streams
//!   (the SDK's [`impetus_sdk::stream`]): the CLI, applications, and the
//!   requests a peer sends another (writes forwarded to the leader, a
//!   worker's turns); `/impetus/client/1`, the same requests as
//!   request-response, is the fallback that also dials a peer the swarm
//!   has no address for. Both are served by a [`ClientService`];
//! - `/impetus/raft/1`: Raft RPCs ([`raft_rpc`]) as request-response (a
//!   snapshot; the fallback), and `/impetus/raft-stream/1`: appends and votes
//!   on one long-lived substream per leader→follower (libp2p-stream), which
//!   spares each RPC a substream and two hops through the swarm task;
//!   `/impetus/raft-pipeline/1`: a replication session, its appends
//!   pipelined ([`raft_pipeline`]);
//! - identify, Kademlia (server mode) and, when enabled, mDNS: peers learn
//!   each other's addresses; mDNS discoveries are reported to the joiner.
//!   Identify feeds Kademlia the addresses a peer listens on (a peer that
//!   dialed in shows only its outbound port), and Kademlia bootstraps
//!   0.5 s after its routing table gains a peer and every 5 minutes
//!   (libp2p-kad's defaults): it asks the peers it knows for the peers
//!   closest to itself, so a peer learns of others it was never told about.
//!   Raft and client streams are opened by peer id alone: when no
//!   connection is up, the swarm dials the addresses Kademlia's routing
//!   table holds for that id, besides those the registry and the Raft
//!   membership carry, which request-response dials. Test:
//!   `a_peer_reaches_one_it_was_never_told_about_through_kademlia`.
//!
//! The swarm runs in one task ([`Server::start`]); everything else talks to
//! it through a cheap [`NetHandle`]. Every inbound request is handled in its
//! own task; its answer comes back to the swarm task over a channel. A
//! handler that panics answers [`ServiceError::Internal`] instead of leaving
//! the caller waiting. The codec and the transport are the SDK's
//! ([`impetus_sdk::transport`]), so servers and clients run the same code.

pub mod raft_pipeline;
pub mod raft_rpc;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use impetus_proto::api::{ClientRequest, ClientResponse, ServiceError};
use impetus_sdk::transport::{self, ClientCodec, RequestFrame, TransportConfig};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, kad, mdns, ping, Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::sync::{mpsc, oneshot};

use impetus_sdk::stream::{StreamError, StreamPool, CLIENT_STREAM_PROTOCOL, SERVER_STREAM_IDLE};
pub use impetus_sdk::transport::{CLIENT_PROTOCOL, DEFAULT_PORT, REQUEST_TIMEOUT};
use raft_pipeline::{Appender, RAFT_PIPELINE_PROTOCOL};
use raft_rpc::{RaftCodec, RaftReply, RaftRpc, RAFT_PROTOCOL, RAFT_STREAM_PROTOCOL};

/// Bound on an inbound connection's handshake (pnet, noise, yamux). Longer
/// than the client's, for slow links; a stalled handshake (a wrong authkey)
/// is dropped after it.
pub const SERVER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Server::bind`] waits for the listener to report its address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Peer-to-peer connections stay open this long without traffic (Raft
/// heartbeats keep members' connections busy anyway).
const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The identify protocol version peers announce.
const IDENTIFY_PROTOCOL: &str = "/impetus/id/1";

/// The Kademlia protocol name: a private DHT, not the public IPFS one.
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/impetus/kad/1");

/// What a peer does with client requests. Each call runs in its own task.
pub trait ClientService: Send + Sync + 'static {
    fn handle(&self, req: ClientRequest) -> impl Future<Output = ClientResponse> + Send;
}

/// An inbound request handler installed after the swarm started.
pub type Handler<Req, Resp> = Arc<dyn Fn(Req) -> BoxFuture<'static, Resp> + Send + Sync>;

/// The handlers of inbound requests. Set once each, possibly after the swarm
/// started (Raft needs the running network before it exists); until then
/// requests are answered "starting".
#[derive(Default)]
pub struct Handlers {
    client: OnceLock<Handler<ClientRequest, ClientResponse>>,
    raft: OnceLock<Handler<RaftRpc, RaftReply>>,
    append: OnceLock<Appender>,
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handlers")
            .field("client", &self.client.get().is_some())
            .field("raft", &self.raft.get().is_some())
            .field("append", &self.append.get().is_some())
            .finish()
    }
}

impl Handlers {
    /// Serve the client protocol with `service`. Only the first call counts.
    pub fn set_client<S: ClientService>(&self, service: Arc<S>) {
        let h: Handler<ClientRequest, ClientResponse> = Arc::new(move |req| {
            let service = service.clone();
            async move { service.handle(req).await }.boxed()
        });
        if self.client.set(h).is_err() {
            tracing::warn!("the client handler was already set");
        }
    }

    /// Answer Raft RPCs with `raft`. Only the first call counts.
    pub fn set_raft(&self, raft: impetus_raft::Raft) {
        let appender = raft.clone();
        self.set_append_handler(Arc::new(move |requests| {
            appender.stream_append(requests).map(|r| r.map_err(|fatal| fatal.to_string())).boxed()
        }));
        self.set_raft_handler(Arc::new(move |rpc| {
            let raft = raft.clone();
            async move { raft_rpc::answer(&raft, rpc).await }.boxed()
        }));
    }

    /// Serve replication sessions with `append` (a test's stand-in for
    /// [`impetus_raft::Raft::stream_append`]). Only the first call counts.
    pub fn set_append_handler(&self, append: Appender) {
        if self.append.set(append).is_err() {
            tracing::warn!("the append handler was already set");
        }
    }

    /// The answer to `req` from `peer`: the client handler's, "starting"
    /// before it is set, an internal error naming the request if the
    /// handler panics.
    fn answer_client(&self, peer: PeerId, req: ClientRequest) -> BoxFuture<'static, ClientResponse> {
        let kind = req.kind();
        let Some(h) = self.client.get() else {
            return async { ClientResponse::Error(ServiceError::Unavailable("the peer is starting".into())) }.boxed();
        };
        AssertUnwindSafe(h(req))
            .catch_unwind()
            .map(move |r| {
                r.unwrap_or_else(|_| {
                    tracing::error!(%peer, kind, "client request handler panicked");
                    ClientResponse::Error(ServiceError::Internal(format!("the {kind} handler panicked")))
                })
            })
            .boxed()
    }

    /// The answer to `rpc` from `peer`: the Raft handler's, "not running
    /// yet" before it is set, an error naming the RPC if the handler panics.
    fn answer_raft(&self, peer: PeerId, rpc: RaftRpc) -> BoxFuture<'static, RaftReply> {
        let kind = rpc.kind();
        let Some(h) = self.raft.get() else {
            return async { RaftReply::Error("raft is not running on this peer yet".into()) }.boxed();
        };
        AssertUnwindSafe(h(rpc))
            .catch_unwind()
            .map(move |r| {
                r.unwrap_or_else(|_| {
                    tracing::error!(%peer, kind, "raft handler panicked");
                    RaftReply::Error(format!("the {kind} handler panicked"))
                })
            })
            .boxed()
    }

    /// Answer Raft RPCs with `h` (a test's stand-in for a Raft node).
    /// Only the first call counts.
    pub fn set_raft_handler(&self, h: Handler<RaftRpc, RaftReply>) {
        if self.raft.set(h).is_err() {
            tracing::warn!("the raft handler was already set");
        }
    }
}

/// Where and how a peer listens.
#[derive(Clone)]
pub struct NetConfig {
    /// Default `/ip4/127.0.0.1/tcp/7420`; port 0 picks a free port
    /// ([`Server::listen_addr`] tells which).
    pub listen: Multiaddr,
    /// A persistent identity; a fresh one per run if `None`.
    pub keypair: Option<Keypair>,
    /// Pre-shared key (libp2p pnet): no peer or client without it connects.
    pub authkey: Option<String>,
    /// Discover peers on the LAN by mDNS. libp2p's mDNS never runs on
    /// loopback, so it is useful only with a non-loopback listen address.
    pub mdns: bool,
    /// How a connection to another peer is checked alive: a ping every
    /// `interval`; one unanswered for `timeout` closes the connection.
    pub liveness: Liveness,
}

/// Ping policy for connections between peers ([`NetConfig::liveness`]).
///
/// A peer whose host died or was cut off leaves no FIN or RST: without a
/// ping its connection looks up for as long as TCP retransmits (about 15
/// minutes), and the streams opened on it (Raft sessions, a worker's
/// turns, forwarded writes) would each wait out their own timeout. A
/// failed ping closes the connection at once: its streams fail, and the
/// next request dials again, so a healed partition is used as soon as it
/// heals. Only a ping that times out closes a connection: clients (the
/// SDK) do not speak ping, and refuse it at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Liveness {
    /// A ping every 5 s, 10 s to answer: a dead connection is closed within
    /// 15 s, and a peer busy enough to miss that is not one to wait for.
    fn default() -> Liveness {
        Liveness { interval: Duration::from_secs(5), timeout: Duration::from_secs(10) }
    }
}

impl Default for NetConfig {
    fn default() -> NetConfig {
        NetConfig {
            listen: default_listen_addr(),
            keypair: None,
            authkey: None,
            mdns: false,
            liveness: Liveness::default(),
        }
    }
}

impl fmt::Debug for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetConfig")
            .field("listen", &self.listen)
            .field("keypair", &self.keypair.as_ref().map(|k| k.public().to_peer_id()))
            .field("authkey", &self.authkey.as_ref().map(|_| "<redacted>"))
            .field("mdns", &self.mdns)
            .field("liveness", &self.liveness)
            .finish()
    }
}

/// `/ip4/127.0.0.1/tcp/7420`.
pub fn default_listen_addr() -> Multiaddr {
    Multiaddr::empty().with(Protocol::Ip4([127, 0, 0, 1].into())).with(Protocol::Tcp(DEFAULT_PORT))
}

/// Whether every IP in `addr` is a loopback address.
pub fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(a) => a.is_loopback(),
        Protocol::Ip6(a) => a.is_loopback(),
        _ => false,
    })
}

/// Split `/ip4/../tcp/../p2p/ID` into the peer id and the address without it.
pub fn split_p2p(addr: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    let mut base = addr.clone();
    match base.pop() {
        Some(Protocol::P2p(peer)) => Some((peer, base)),
        _ => None,
    }
}

/// Why the network could not start, stopped, or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("could not start the network: {0}")]
    Build(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("{addr} has no /p2p/ peer id")]
    NoPeerId { addr: Multiaddr },
    #[error("request to {peer} failed: {reason}")]
    Request { peer: PeerId, reason: String },
    /// No connection to the peer could be made: nothing was sent.
    #[error("cannot reach {peer}: {reason}")]
    Unreachable { peer: PeerId, reason: String },
    /// The peer does not speak `protocol` (a different Impetus version?).
    #[error("{peer} does not speak {protocol}")]
    Unsupported { peer: PeerId, protocol: String },
    #[error("the network task has stopped")]
    Stopped,
    #[error("the network task failed: {0}")]
    Failed(String),
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    client: request_response::Behaviour<ClientCodec>,
    raft: request_response::Behaviour<RaftCodec>,
    streams: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    ping: ping::Behaviour,
}

/// Why an outbound request failed.
#[derive(Debug)]
enum Failure {
    /// No connection could be made: the request was never sent.
    Dial(String),
    Other(String),
}

impl From<request_response::OutboundFailure> for Failure {
    fn from(e: request_response::OutboundFailure) -> Failure {
        match e {
            request_response::OutboundFailure::DialFailure => Failure::Dial(e.to_string()),
            e => Failure::Other(e.to_string()),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, Failure>>;

/// What other tasks ask of the swarm task.
enum Call {
    Client { peer: PeerId, addr: Multiaddr, req: ClientRequest, reply: Reply<ClientResponse> },
    Raft { peer: PeerId, addr: Multiaddr, rpc: RaftRpc, reply: Reply<RaftReply> },
}

/// The client streams a peer keeps to other peers.
type ClientPools = Arc<Mutex<HashMap<PeerId, Arc<StreamPool>>>>;

/// Attempts at a request whose dial fails (nothing was sent, so it is safe).
const DIAL_ATTEMPTS: u32 = 3;
/// The pause between two dials of one request.
const DIAL_PAUSE: Duration = Duration::from_millis(50);

/// A cheap handle to the running swarm.
#[derive(Clone)]
pub struct NetHandle {
    calls: mpsc::UnboundedSender<Call>,
    streams: libp2p_stream::Control,
    /// Raft streams this peer opened.
    streams_opened: Arc<AtomicU64>,
    /// Client streams to other peers, by peer.
    client_pools: ClientPools,
    local: Multiaddr,
    discovered: Arc<Mutex<BTreeSet<Multiaddr>>>,
}

impl fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetHandle").field("local", &self.local).finish_non_exhaustive()
    }
}

impl NetHandle {
    /// This peer's address, with `/p2p/ID`: what goes into Raft membership.
    pub fn local_addr(&self) -> &Multiaddr {
        &self.local
    }

    /// Peers found by mDNS so far (addresses with `/p2p/ID`), in order.
    pub fn discovered(&self) -> Vec<Multiaddr> {
        self.discovered.lock().map(|d| d.iter().cloned().collect()).unwrap_or_default()
    }

    /// Send a client-protocol request to the peer at `addr` (with `/p2p/ID`),
    /// bounded by [`REQUEST_TIMEOUT`] in all: on a client stream, or, when
    /// none can be opened (nothing was sent), as request-response, which
    /// dials `addr`.
    pub async fn client(&self, addr: &Multiaddr, req: ClientRequest) -> Result<ClientResponse, NetError> {
        self.client_within(addr, req, REQUEST_TIMEOUT).await
    }

    /// [`NetHandle::client`] with every attempt (stream, request-response,
    /// dials again) within `limit` of the call.
    pub async fn client_within(
        &self,
        addr: &Multiaddr,
        req: ClientRequest,
        limit: Duration,
    ) -> Result<ClientResponse, NetError> {
        let (peer, base) = split_p2p(addr).ok_or_else(|| NetError::NoPeerId { addr: addr.clone() })?;
        let deadline = tokio::time::Instant::now() + limit;
        let out_of_time = || NetError::Request { peer, reason: format!("no answer within {limit:?}") };
        let pool = self.client_pool(peer);
        match pool.request(&req, limit).await {
            Ok(resp) => return Ok(resp),
            Err(e @ (StreamError::Open(_) | StreamError::Unsupported(_))) => {
                tracing::debug!(%peer, error = %e, "no client stream; using request-response");
            }
            Err(StreamError::Timeout(_)) => return Err(out_of_time()),
            Err(e) => return Err(NetError::Request { peer, reason: e.to_string() }),
        }
        let mut attempt = 1;
        loop {
            // Nothing is sent once the caller is told there was no answer.
            if tokio::time::Instant::now() >= deadline {
                return Err(out_of_time());
            }
            let (reply, rx) = oneshot::channel();
            let call = Call::Client { peer, addr: base.clone(), req: req.clone(), reply };
            self.calls.send(call).map_err(|_| NetError::Stopped)?;
            let res = tokio::time::timeout_at(deadline, rx).await.map_err(|_| out_of_time())?;
            match res.map_err(|_| NetError::Stopped)? {
                Ok(resp) => return Ok(resp),
                Err(Failure::Dial(reason)) if attempt < DIAL_ATTEMPTS => {
                    tracing::debug!(%peer, attempt, %reason, "dial failed; trying again");
                    attempt += 1;
                    tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + DIAL_PAUSE)).await;
                }
                Err(Failure::Dial(reason)) => return Err(NetError::Unreachable { peer, reason }),
                Err(Failure::Other(reason)) => return Err(NetError::Request { peer, reason }),
            }
        }
    }

    /// Open a Raft stream or session (`protocol`) to `peer` (connected
    /// already, or reachable at an address the swarm knows), bounded by `ttl`.
    pub(crate) async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        ttl: Duration,
    ) -> Result<libp2p::Stream, NetError> {
        let mut control = self.streams.clone();
        match tokio::time::timeout(ttl, control.open_stream(peer, protocol.clone())).await {
            Ok(Ok(stream)) => {
                self.streams_opened.fetch_add(1, Ordering::Relaxed);
                Ok(stream)
            }
            Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(p))) => {
                Err(NetError::Unsupported { peer, protocol: p.to_string() })
            }
            Ok(Err(e)) => Err(NetError::Unreachable { peer, reason: e.to_string() }),
            Err(_) => Err(NetError::Unreachable { peer, reason: format!("no {protocol} stream within {ttl:?}") }),
        }
    }

    fn client_pool(&self, peer: PeerId) -> Arc<StreamPool> {
        let mut pools = self.client_pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pools.entry(peer).or_insert_with(|| Arc::new(StreamPool::new(self.streams.clone(), peer))).clone()
    }

    /// How many client streams this peer has opened to other peers (one
    /// per request in flight to a peer at its busiest; they are reused).
    pub fn client_streams_opened(&self) -> u64 {
        let pools = self.client_pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pools.values().map(|p| p.opened()).sum()
    }

    /// How many Raft streams and replication sessions this peer has
    /// opened (while they stay up: one of each per target and leadership).
    pub fn raft_streams_opened(&self) -> u64 {
        self.streams_opened.load(Ordering::Relaxed)
    }

    /// Send a Raft RPC to the node at `addr` (with `/p2p/ID`), bounded by `ttl`.
    pub async fn raft(&self, addr: &Multiaddr, rpc: RaftRpc, ttl: Duration) -> Result<RaftReply, NetError> {
        let (peer, base) = split_p2p(addr).ok_or_else(|| NetError::NoPeerId { addr: addr.clone() })?;
        let (reply, rx) = oneshot::channel();
        self.calls.send(Call::Raft { peer, addr: base, rpc, reply }).map_err(|_| NetError::Stopped)?;
        let res = tokio::time::timeout(ttl, rx)
            .await
            .map_err(|_| NetError::Request { peer, reason: format!("no answer within {ttl:?}") })?;
        match res.map_err(|_| NetError::Stopped)? {
            Ok(reply) => Ok(reply),
            Err(Failure::Dial(reason) | Failure::Other(reason)) => Err(NetError::Request { peer, reason }),
        }
    }
}

type Swarm_ = Swarm<Behaviour>;

/// A bound, not yet serving, peer network.
pub struct Server {
    swarm: Swarm_,
    listen_addr: Multiaddr,
    streams: libp2p_stream::Control,
    incoming: Incoming,
}

/// Streams other peers and clients open to this one.
struct Incoming {
    raft: libp2p_stream::IncomingStreams,
    client: libp2p_stream::IncomingStreams,
    pipeline: libp2p_stream::IncomingStreams,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("peer_id", self.swarm.local_peer_id())
            .field("listen_addr", &self.listen_addr)
            .finish()
    }
}

/// The running swarm task.
#[derive(Debug)]
pub struct Running {
    pub handle: NetHandle,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), NetError>>,
}

impl Running {
    /// Stop the swarm and wait for its task.
    pub async fn stop(self) -> Result<(), NetError> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_else(|e| Err(NetError::Failed(e.to_string())))
    }

    /// Resolves if the swarm task ends by itself (its listener closed, a
    /// panic): the peer reaches no one after that. Then only drop this:
    /// [`Running::stop`] would wait for the task a second time.
    pub async fn ended(&mut self) -> NetError {
        match (&mut self.task).await {
            Ok(Ok(())) => NetError::Stopped,
            Ok(Err(e)) => e,
            Err(e) => NetError::Failed(e.to_string()),
        }
    }
}

impl Server {
    /// Build the swarm and start listening; returns once the listen address
    /// is known.
    pub async fn bind(cfg: NetConfig) -> Result<Server, NetError> {
        let keypair = cfg.keypair.unwrap_or_else(Keypair::generate_ed25519);
        let tcfg = TransportConfig {
            authkey: cfg.authkey,
            handshake_timeout: SERVER_HANDSHAKE_TIMEOUT,
            idle_timeout: PEER_IDLE_TIMEOUT,
        };
        let me = keypair.public().to_peer_id();
        let mdns = if cfg.mdns {
            Some(mdns::tokio::Behaviour::new(mdns::Config::default(), me).map_err(|e| NetError::Build(e.to_string()))?)
        } else {
            None
        };
        let mut kad = kad::Behaviour::with_config(me, kad::store::MemoryStore::new(me), kad::Config::new(KAD_PROTOCOL));
        // A private LAN has no public address to autodetect server mode from.
        kad.set_mode(Some(kad::Mode::Server));
        let behaviour = Behaviour {
            client: transport::client_protocol_behaviour(ProtocolSupport::Full),
            streams: libp2p_stream::Behaviour::new(),
            raft: request_response::Behaviour::with_codec(
                RaftCodec,
                [(RAFT_PROTOCOL, ProtocolSupport::Full)],
                // Each call has its own deadline, by the RPC and its size
                // (`raft_rpc::ttl_for`); this only bounds the largest.
                request_response::Config::default()
                    .with_request_timeout(raft_rpc::ttl_for(raft_rpc::SNAPSHOT_TTL, raft_rpc::MAX_RAFT_FRAME))
                    .with_max_concurrent_streams(transport::MAX_CONCURRENT_STREAMS),
            ),
            identify: identify::Behaviour::new(identify::Config::new(IDENTIFY_PROTOCOL.into(), keypair.public())),
            kad,
            mdns: Toggle::from(mdns),
            ping: ping::Behaviour::new(
                ping::Config::new().with_interval(cfg.liveness.interval).with_timeout(cfg.liveness.timeout),
            ),
        };
        let mut swarm =
            transport::build_swarm(keypair, &tcfg, behaviour).map_err(|e| NetError::Build(e.to_string()))?;
        let listen_err = |reason: String| NetError::Listen { addr: cfg.listen.clone(), reason };
        let listener = swarm.listen_on(cfg.listen.clone()).map_err(|e| listen_err(e.to_string()))?;
        let listen_addr = tokio::time::timeout(LISTEN_TIMEOUT, async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::NewListenAddr { listener_id, address } if listener_id == listener => {
                        return Ok(address);
                    }
                    SwarmEvent::ListenerClosed { listener_id, reason, .. } if listener_id == listener => {
                        return Err(match reason {
                            Err(e) => e.to_string(),
                            Ok(()) => "the listener closed".to_owned(),
                        });
                    }
                    SwarmEvent::ListenerError { listener_id, error } if listener_id == listener => {
                        return Err(error.to_string());
                    }
                    other => tracing::trace!(event = ?other, "swarm event while binding"),
                }
            }
        })
        .await
        .map_err(|_| listen_err(format!("no listen address after {LISTEN_TIMEOUT:?}")))?
        .map_err(listen_err)?;
        tracing::info!(peer_id = %swarm.local_peer_id(), addr = %listen_addr, "listening");
        let mut streams = swarm.behaviour().streams.new_control();
        let mut accept = |p| streams.accept(p).map_err(|e| NetError::Build(e.to_string()));
        let incoming = Incoming {
            raft: accept(RAFT_STREAM_PROTOCOL)?,
            client: accept(CLIENT_STREAM_PROTOCOL)?,
            pipeline: accept(RAFT_PIPELINE_PROTOCOL)?,
        };
        Ok(Server { swarm, listen_addr, streams, incoming })
    }

    /// The first address the server listens on (with the real port).
    pub fn listen_addr(&self) -> &Multiaddr {
        &self.listen_addr
    }

    /// This peer's libp2p identity.
    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Run the swarm in its own task, answering with `handlers` (which may be
    /// filled in later).
    pub fn start(self, handlers: Arc<Handlers>) -> Running {
        let (calls, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = oneshot::channel();
        let local = self.listen_addr.clone().with(Protocol::P2p(self.peer_id()));
        let discovered = Arc::new(Mutex::new(BTreeSet::new()));
        let client_pools = ClientPools::default();
        let handle = NetHandle {
            calls,
            streams: self.streams,
            streams_opened: Arc::default(),
            client_pools: client_pools.clone(),
            local,
            discovered: discovered.clone(),
        };
        let task = tokio::spawn(
            Driver {
                swarm: self.swarm,
                handlers,
                discovered,
                client_pools,
                pending_client: HashMap::new(),
                pending_raft: HashMap::new(),
            }
            .run(rx, self.incoming, async move {
                let _ = stop_rx.await;
            }),
        );
        Running { handle, stop, task }
    }

    /// Serve the client protocol with `service` until `shutdown` completes.
    pub async fn run<S: ClientService>(
        self,
        service: Arc<S>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), NetError> {
        let handlers = Arc::new(Handlers::default());
        handlers.set_client(service);
        let running = self.start(handlers);
        shutdown.await;
        running.stop().await
    }
}

/// Bind per `cfg` and serve `service` until `shutdown` completes.
pub async fn serve<S: ClientService>(
    cfg: NetConfig,
    service: Arc<S>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NetError> {
    Server::bind(cfg).await?.run(service, shutdown).await
}

/// Answer the client requests on one stream from `peer`, in order.
async fn serve_client_stream(peer: PeerId, mut stream: libp2p::Stream, handlers: Arc<Handlers>) {
    let end =
        impetus_sdk::stream::serve(&mut stream, SERVER_STREAM_IDLE, |req| handlers.answer_client(peer, req)).await;
    if let Err(e) = end {
        tracing::debug!(%peer, error = %e, "client stream closed");
    }
}

type ClientAnswer = (ResponseChannel<ClientResponse>, ClientResponse);
type RaftAnswer = (ResponseChannel<RaftReply>, RaftReply);

struct Driver {
    swarm: Swarm_,
    handlers: Arc<Handlers>,
    discovered: Arc<Mutex<BTreeSet<Multiaddr>>>,
    client_pools: ClientPools,
    pending_client: HashMap<OutboundRequestId, Reply<ClientResponse>>,
    pending_raft: HashMap<OutboundRequestId, Reply<RaftReply>>,
}

impl Driver {
    async fn run(
        mut self,
        mut calls: mpsc::UnboundedReceiver<Call>,
        mut incoming: Incoming,
        stop: impl Future<Output = ()>,
    ) -> Result<(), NetError> {
        let (client_tx, mut client_rx) = mpsc::unbounded_channel::<ClientAnswer>();
        let (raft_tx, mut raft_rx) = mpsc::unbounded_channel::<RaftAnswer>();
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                Some((channel, resp)) = client_rx.recv() => {
                    if self.swarm.behaviour_mut().client.send_response(channel, resp).is_err() {
                        tracing::debug!("client went away before its answer was ready");
                    }
                }
                Some((channel, resp)) = raft_rx.recv() => {
                    if self.swarm.behaviour_mut().raft.send_response(channel, resp).is_err() {
                        tracing::debug!("raft peer went away before its answer was ready");
                    }
                }
                Some(call) = calls.recv() => self.call(call),
                Some((peer, stream)) = incoming.raft.next() => {
                    tokio::spawn(raft_rpc::serve_stream(peer, stream, self.handlers.clone()));
                }
                Some((peer, stream)) = incoming.client.next() => {
                    tokio::spawn(serve_client_stream(peer, stream, self.handlers.clone()));
                }
                Some((peer, stream)) = incoming.pipeline.next() => {
                    tokio::spawn(raft_pipeline::serve(peer, stream, self.handlers.append.get().cloned()));
                }
                event = self.swarm.select_next_some() => self.event(event, &client_tx, &raft_tx)?,
            }
        }
        tracing::info!(peer_id = %self.swarm.local_peer_id(), "network stopped");
        Ok(())
    }

    fn call(&mut self, call: Call) {
        let b = self.swarm.behaviour_mut();
        match call {
            Call::Client { peer, addr, req, reply } => {
                let id = b.client.send_request_with_addresses(&peer, Ok(req), vec![addr]);
                self.pending_client.insert(id, reply);
            }
            Call::Raft { peer, addr, rpc, reply } => {
                let id = b.raft.send_request_with_addresses(&peer, rpc, vec![addr]);
                self.pending_raft.insert(id, reply);
            }
        }
    }

    fn event(
        &mut self,
        event: SwarmEvent<BehaviourEvent>,
        client_tx: &mpsc::UnboundedSender<ClientAnswer>,
        raft_tx: &mpsc::UnboundedSender<RaftAnswer>,
    ) -> Result<(), NetError> {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Client(e)) => self.client_event(e, client_tx),
            SwarmEvent::Behaviour(BehaviourEvent::Raft(e)) => self.raft_event(e, raft_tx),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                // Feed Kademlia the addresses a peer listens on; a remote
                // peer's loopback addresses are of no use to anyone else.
                let remote_is_local =
                    info.observed_addr.iter().next().is_some_and(|_| is_loopback(&info.observed_addr));
                for addr in info.listen_addrs {
                    if remote_is_local || !is_loopback(&addr) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    tracing::info!(%peer, %addr, "found a peer by mDNS");
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                    if let Ok(mut d) = self.discovered.lock() {
                        d.insert(addr.with(Protocol::P2p(peer)));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                if let Ok(mut d) = self.discovered.lock() {
                    for (peer, addr) in gone {
                        d.remove(&addr.with(Protocol::P2p(peer)));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, connection, result })) => match result {
                Ok(rtt) => tracing::trace!(%peer, ?rtt, "ping"),
                Err(ping::Failure::Timeout) => {
                    tracing::info!(%peer, "no answer to a ping; closing the connection");
                    self.swarm.close_connection(connection);
                }
                // A client (the SDK) does not speak ping: the negotiation
                // fails, which says nothing about the link.
                Err(error) => tracing::trace!(%peer, %error, "ping not answered"),
            },
            SwarmEvent::Behaviour(other) => tracing::trace!(event = ?other, "swarm behaviour event"),
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                tracing::debug!(peer = %peer_id, remote = %endpoint.get_remote_address(), "connected");
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, num_established, .. } => {
                tracing::debug!(peer = %peer_id, cause = ?cause, "disconnected");
                if num_established == 0 {
                    // Streams idle in the pool died with the connection.
                    let pools = self.client_pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Some(pool) = pools.get(&peer_id) {
                        pool.clear();
                    }
                }
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                tracing::debug!(remote = %send_back_addr, %error, "inbound connection failed (wrong authkey or not an Impetus peer?)");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "outbound connection failed (peer down, or a wrong authkey?)");
            }
            SwarmEvent::NewListenAddr { address, .. } => tracing::info!(addr = %address, "listening"),
            SwarmEvent::ExpiredListenAddr { address, .. } => tracing::info!(addr = %address, "no longer listening"),
            SwarmEvent::ListenerError { error, .. } => tracing::warn!(%error, "listener error"),
            SwarmEvent::ListenerClosed { addresses, reason, .. } => {
                let reason = match reason {
                    Ok(()) => "the listener closed".to_owned(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(%reason, "listener closed");
                let addr = addresses.into_iter().next().unwrap_or_else(Multiaddr::empty);
                return Err(NetError::Listen { addr, reason });
            }
            other => tracing::trace!(event = ?other, "swarm event"),
        }
        Ok(())
    }

    fn client_event(
        &mut self,
        event: request_response::Event<RequestFrame, ClientResponse>,
        answers: &mpsc::UnboundedSender<ClientAnswer>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request: Ok(req), channel, .. } => {
                    let fut = self.handlers.answer_client(peer, req);
                    let answers = answers.clone();
                    tokio::spawn(async move {
                        let resp = fut.await;
                        // The swarm task is gone only when the network stopped.
                        let _ = answers.send((channel, resp));
                    });
                }
                request_response::Message::Request { request: Err(reason), channel, .. } => {
                    tracing::warn!(%peer, %reason, "invalid client request");
                    let resp = ClientResponse::Error(ServiceError::InvalidRequest(reason));
                    if self.swarm.behaviour_mut().client.send_response(channel, resp).is_err() {
                        tracing::debug!(%peer, "client went away before its answer was ready");
                    }
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(reply) = self.pending_client.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure { request_id, error, peer, .. } => {
                tracing::debug!(%peer, %error, "outbound client request failed");
                if let Some(reply) = self.pending_client.remove(&request_id) {
                    let _ = reply.send(Err(error.into()));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound client request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn raft_event(
        &mut self,
        event: request_response::Event<RaftRpc, RaftReply>,
        answers: &mpsc::UnboundedSender<RaftAnswer>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let fut = self.handlers.answer_raft(peer, request);
                    let answers = answers.clone();
                    tokio::spawn(async move {
                        let resp = fut.await;
                        let _ = answers.send((channel, resp));
                    });
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(reply) = self.pending_raft.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure { request_id, error, .. } => {
                if let Some(reply) = self.pending_raft.remove(&request_id) {
                    let _ = reply.send(Err(error.into()));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound raft request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}
