//! The peer's network: one libp2p swarm (tokio) per peer.
//!
//! For now it serves the client protocol (`/impetus/client/1`) over TCP →
//! optional pnet (`--authkey`) → noise → yamux. The codec and the transport
//! are the SDK's ([`impetus_sdk::transport`]), so the server and the
//! [`impetus_sdk::Client`] run the same code. The server is generic over
//! [`ClientService`], which the peer implements.
//!
//! Every inbound request is handled in its own task; its answer comes back
//! to the swarm task over a channel. A handler that panics answers
//! [`ServiceError::Internal`] instead of leaving the client waiting.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use impetus_proto::api::{ClientRequest, ClientResponse, ServiceError};
use impetus_sdk::transport::{self, ClientCodec, TransportConfig};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::mpsc;

pub use impetus_sdk::transport::{CLIENT_PROTOCOL, DEFAULT_PORT, REQUEST_TIMEOUT};

/// Bound on an inbound connection's handshake (pnet, noise, yamux). Longer
/// than the client's, for slow links; a stalled handshake (a wrong authkey)
/// is dropped after it.
pub const SERVER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Server::bind`] waits for the listener to report its address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a peer does with client requests. Each call runs in its own task.
pub trait ClientService: Send + Sync + 'static {
    fn handle(&self, req: ClientRequest) -> impl Future<Output = ClientResponse> + Send;
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
}

impl Default for NetConfig {
    fn default() -> NetConfig {
        NetConfig { listen: default_listen_addr(), keypair: None, authkey: None }
    }
}

impl fmt::Debug for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetConfig")
            .field("listen", &self.listen)
            .field("keypair", &self.keypair.as_ref().map(|k| k.public().to_peer_id()))
            .field("authkey", &self.authkey.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `/ip4/127.0.0.1/tcp/7420`.
pub fn default_listen_addr() -> Multiaddr {
    Multiaddr::empty().with(Protocol::Ip4([127, 0, 0, 1].into())).with(Protocol::Tcp(DEFAULT_PORT))
}

/// Why the network could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("could not start the network: {0}")]
    Build(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
}

type Swarm_ = Swarm<request_response::Behaviour<ClientCodec>>;

/// A bound, not yet serving, client-protocol server.
pub struct Server {
    swarm: Swarm_,
    listen_addr: Multiaddr,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("peer_id", self.swarm.local_peer_id())
            .field("listen_addr", &self.listen_addr)
            .finish()
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
            ..TransportConfig::default()
        };
        let behaviour = transport::client_protocol_behaviour(ProtocolSupport::Inbound);
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
        tracing::info!(peer_id = %swarm.local_peer_id(), addr = %listen_addr, "listening for clients");
        Ok(Server { swarm, listen_addr })
    }

    /// The first address the server listens on (with the real port).
    pub fn listen_addr(&self) -> &Multiaddr {
        &self.listen_addr
    }

    /// This peer's libp2p identity.
    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    /// Serve requests with `service` until `shutdown` completes.
    pub async fn run<S: ClientService>(
        self,
        service: Arc<S>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), NetError> {
        let mut swarm = self.swarm;
        let (answers, mut answered) = mpsc::unbounded_channel::<(ResponseChannel<ClientResponse>, ClientResponse)>();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some((channel, resp)) = answered.recv() => {
                    if swarm.behaviour_mut().send_response(channel, resp).is_err() {
                        tracing::debug!("client went away before its answer was ready");
                    }
                }
                event = swarm.select_next_some() => {
                    handle_event(&mut swarm, event, &service, &answers)?;
                }
            }
        }
        tracing::info!(peer_id = %swarm.local_peer_id(), "client server stopped");
        Ok(())
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

fn handle_event<S: ClientService>(
    swarm: &mut Swarm_,
    event: SwarmEvent<request_response::Event<transport::RequestFrame, ClientResponse>>,
    service: &Arc<S>,
    answers: &mpsc::UnboundedSender<(ResponseChannel<ClientResponse>, ClientResponse)>,
) -> Result<(), NetError> {
    match event {
        SwarmEvent::Behaviour(request_response::Event::Message {
            peer,
            message: request_response::Message::Request { request, channel, .. },
            ..
        }) => match request {
            Ok(req) => {
                let service = Arc::clone(service);
                let answers = answers.clone();
                tokio::spawn(async move {
                    let kind = req.kind();
                    let resp = match AssertUnwindSafe(service.handle(req)).catch_unwind().await {
                        Ok(resp) => resp,
                        Err(_) => {
                            tracing::error!(%peer, kind, "client request handler panicked");
                            ClientResponse::Error(ServiceError::Internal(format!("the {kind} handler panicked")))
                        }
                    };
                    // The swarm task is gone only when the server stopped.
                    let _ = answers.send((channel, resp));
                });
            }
            Err(reason) => {
                tracing::warn!(%peer, %reason, "invalid client request");
                let resp = ClientResponse::Error(ServiceError::InvalidRequest(reason));
                if swarm.behaviour_mut().send_response(channel, resp).is_err() {
                    tracing::debug!(%peer, "client went away before its answer was ready");
                }
            }
        },
        SwarmEvent::Behaviour(request_response::Event::InboundFailure { peer, error, .. }) => {
            tracing::debug!(%peer, %error, "inbound client request failed");
        }
        SwarmEvent::Behaviour(_) => {}
        SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
            tracing::debug!(peer = %peer_id, remote = %endpoint.get_remote_address(), "client connected");
        }
        SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
            tracing::debug!(peer = %peer_id, cause = ?cause, "client disconnected");
        }
        SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
            tracing::debug!(remote = %send_back_addr, %error, "inbound connection failed (wrong authkey or not an Impetus client?)");
        }
        SwarmEvent::NewListenAddr { address, .. } => {
            tracing::info!(addr = %address, "listening for clients");
        }
        SwarmEvent::ExpiredListenAddr { address, .. } => {
            tracing::info!(addr = %address, "no longer listening");
        }
        SwarmEvent::ListenerError { error, .. } => {
            tracing::warn!(%error, "listener error");
        }
        SwarmEvent::ListenerClosed { addresses, reason, .. } => {
            let reason = match reason {
                Ok(()) => "the listener closed".to_owned(),
                Err(e) => e.to_string(),
            };
            tracing::error!(%reason, "client listener closed");
            let addr = addresses.into_iter().next().unwrap_or_else(Multiaddr::empty);
            return Err(NetError::Listen { addr, reason });
        }
        other => tracing::trace!(event = ?other, "swarm event"),
    }
    Ok(())
}
