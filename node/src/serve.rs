//! `impetus peer`: one real peer — Raft on sled, the wasm executor, the
//! client protocol on libp2p — wired to the peer logic.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use impetus_proto::api::{ClientRequest, ClientResponse};
use impetus_proto::{LeaseGrant, ModuleHash, PeerId, PeerInfo};

use crate::exec::{ExecConfig, ExecError, Executor, RunSpec};
use crate::net::{ClientService, NetConfig, Server};
use crate::peer::{JobRunner, Peer, PeerConfig, RunReport};
use crate::raft_consensus::RaftConsensus;
use crate::rt::TokioRuntime;

/// Where a peer listens when not told: client commands find it with no flags.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

/// How to run a peer.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    /// `host:port` or a multiaddr.
    pub listen: String,
    pub data_dir: PathBuf,
    pub authkey: Option<String>,
    /// Jobs run at once on this peer.
    pub capacity: u32,
    /// Peers to join. Joining arrives with the cluster issue.
    pub join: Vec<String>,
}

impl PeerOptions {
    pub fn default_capacity() -> u32 {
        std::thread::available_parallelism().map(|n| n.get() as u32 * 2).unwrap_or(4)
    }
}

/// Why a peer could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("joining other peers (--join) is not available yet: this build runs a single peer")]
    JoinUnsupported,
    #[error("invalid listen address {addr:?}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("data directory {}: {source}", path.display())]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("raft storage: {0}")]
    Raft(#[from] impetus_raft::RaftError),
    #[error("wasm executor: {0}")]
    Exec(#[from] ExecError),
    #[error("peer: {0}")]
    Peer(#[from] crate::peer::PeerError),
    #[error("network: {0}")]
    Net(#[from] crate::net::NetError),
}

/// The wasm executor as the peer's [`JobRunner`].
#[derive(Clone, Debug)]
pub struct WasmRunner(pub Executor);

impl JobRunner for WasmRunner {
    fn prepare(&self, hash: ModuleHash, bytes: &[u8]) -> Result<(), String> {
        self.0.prepare(hash, bytes).map_err(|e| e.to_string())
    }

    fn is_prepared(&self, hash: &ModuleHash) -> bool {
        self.0.is_cached(hash)
    }

    fn run(&self, g: LeaseGrant) -> impl Future<Output = RunReport> + Send + 'static {
        let exec = self.0.clone();
        async move {
            let out = exec
                .run(RunSpec {
                    module: g.module,
                    args: &g.spec.args,
                    env: &g.spec.env,
                    input: &g.spec.input,
                    timeout_ms: g.job_timeout_ms,
                    fuel: g.fuel,
                    memory_limit_bytes: g.memory_limit_bytes,
                })
                .await;
            RunReport { result: out.result, stdout_tail: out.stdout_tail, stderr_tail: out.stderr_tail }
        }
    }
}

type RealPeer = Peer<TokioRuntime, RaftConsensus<impetus_raft::TypeConfig>, WasmRunner>;

struct Service(RealPeer);

impl ClientService for Service {
    fn handle(&self, req: ClientRequest) -> impl Future<Output = ClientResponse> + Send {
        let peer = self.0.clone();
        async move { peer.handle(req).await }
    }
}

/// Run a peer until `shutdown` resolves, then drain it: no new leases,
/// running jobs finish (bounded by the grace period), results are committed,
/// Raft shuts down.
pub async fn run_peer(
    opts: PeerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    if !opts.join.is_empty() {
        return Err(ServeError::JoinUnsupported);
    }
    let listen = impetus_sdk::transport::resolve_addr(&opts.listen)
        .await
        .map_err(|reason| ServeError::Listen { addr: opts.listen.clone(), reason })?;
    let data_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServeError::DataDir { path, source }
    };
    std::fs::create_dir_all(&opts.data_dir).map_err(data_err(&opts.data_dir))?;

    // Bind first: a busy port is the most common mistake; say so before
    // touching storage. libp2p's TCP listener reuses ports, so probe with a
    // plain listener, which refuses a port another process listens on.
    if let Some(sock) = tcp_socket(&listen) {
        if let Err(e) = std::net::TcpListener::bind(sock) {
            return Err(ServeError::Listen {
                addr: opts.listen.clone(),
                reason: format!("{e} (is another peer running there?)"),
            });
        }
    }
    let server = Server::bind(NetConfig { listen, keypair: None, authkey: opts.authkey.clone() }).await?;
    let addr = server.listen_addr().to_string();

    let (raft, state) = impetus_raft::start_single(&opts.data_dir.join("raft"), 1, addr.clone()).await?;
    let executor = Executor::new(ExecConfig::default())?;
    let id_file = opts.data_dir.join("peer-id");
    let known_id = read_peer_id(&id_file);
    let cfg = PeerConfig {
        capacity: opts.capacity.max(1),
        info: PeerInfo {
            host: hostname(),
            pid: std::process::id(),
            addresses: vec![addr.clone()],
            capacity: opts.capacity,
            labels: vec![],
        },
        ..PeerConfig::default()
    };
    let consensus = RaftConsensus::new(raft.clone(), state, 1);
    let peer = Peer::start(TokioRuntime, consensus, WasmRunner(executor), cfg, known_id).await?;
    if known_id != Some(peer.id()) {
        std::fs::write(&id_file, peer.id().0.to_string()).map_err(data_err(&id_file))?;
    }
    tracing::info!(peer = %peer.id(), %addr, data_dir = %opts.data_dir.display(), "impetus peer ready");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = Arc::new(Service(peer.clone()));
    let net = tokio::spawn(server.run(service, async move {
        let _ = stop_rx.await;
    }));
    shutdown.await;
    tracing::info!(peer = %peer.id(), "shutting down: draining running jobs");
    peer.shutdown().await;
    let _ = stop_tx.send(());
    match net.await {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "network task failed"),
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    tracing::info!(peer = %peer.id(), "peer stopped");
    Ok(())
}

/// The IP socket address of a `/ip4|ip6/../tcp/PORT` multiaddr with a fixed port.
fn tcp_socket(addr: &libp2p::Multiaddr) -> Option<std::net::SocketAddr> {
    use libp2p::multiaddr::Protocol;
    let mut ip = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(port) if port != 0 => return ip.map(|ip| std::net::SocketAddr::new(ip, port)),
            _ => {}
        }
    }
    None
}

fn read_peer_id(path: &Path) -> Option<PeerId> {
    let text = std::fs::read_to_string(path).ok()?;
    match text.trim().parse::<u64>() {
        Ok(id) => Some(PeerId(id)),
        Err(_) => {
            tracing::warn!(path = %path.display(), "ignoring an unreadable peer-id file");
            None
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
