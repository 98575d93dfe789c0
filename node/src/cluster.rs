//! The cluster glue of a real peer: Raft over the swarm, writes forwarded to
//! the leader, fresh reads, joining and leaving.
//!
//! - [`ClusterConsensus`]: the peer's [`Consensus`]. A write goes to the local
//!   Raft; on a follower it is forwarded to the leader
//!   ([`ClientRequest::Forward`]), which stamps its own time, commits it and
//!   answers with the outcome and log index. A module missing from a
//!   lagging replica is fetched from the leader.
//! - [`ClusterService`]: the client protocol of a cluster peer. Membership
//!   requests (`Join`, `Leave`) are served by the leader (any peer forwards
//!   them); reads of the queue are linearizable: the leader confirms it
//!   still leads (read index) and answers, a follower passes them on;
//!   everything else is [`Peer::handle`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use impetus_proto::api::{ClientRequest, ClientResponse, ServiceError, WorkReply, WorkRequest};
use impetus_proto::{ApplyResult, Command, ModuleHash, Outcome, PeerId, PeerRole, Timestamp};
use impetus_queue::State;
use impetus_raft::TypeConfig;
use libp2p::Multiaddr;
use tokio::sync::Notify;

use crate::net::{ClientService, NetError, NetHandle};
use crate::peer::{serve_work, Consensus, ConsensusError, JobRunner, Peer, RaftStatus, Runtime};
use crate::raft_consensus::RaftConsensus;

/// How long a follower waits for its replica to apply a forwarded write
/// or a read index before answering from what it has.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a write waits for an election when no leader is known.
pub const NO_LEADER_WAIT: Duration = Duration::from_secs(5);

/// The peer's Raft member plus the network to reach the leader.
///
/// A voter works on its own replica. A peer outside the voters (a worker,
/// which holds no Raft state, or a learner catching up) sends its writes,
/// reads and worker turns to the leader: the one its Raft knows, else the
/// one the cluster's members name (asked through `contacts`: the addresses
/// it joined through and the members it has learned since).
#[derive(Clone, Debug)]
pub struct ClusterConsensus {
    pub local: Arc<RaftConsensus<TypeConfig>>,
    pub net: NetHandle,
    /// Where this peer last found the leader (a worker's Raft knows none).
    leader_hint: Arc<Mutex<Option<String>>>,
    /// Members to ask who leads.
    contacts: Arc<Mutex<Vec<String>>>,
}

fn leader_addr(addr: &str) -> Result<Multiaddr, ConsensusError> {
    addr.parse().map_err(|e| ConsensusError::Unavailable(format!("the leader's address {addr:?} is invalid: {e}")))
}

fn service_error(e: ServiceError) -> ConsensusError {
    match e {
        ServiceError::NotLeader { leader } => ConsensusError::NotLeader { leader, leader_id: None },
        other => ConsensusError::Unavailable(other.to_string()),
    }
}

/// The leader answered `asked` with something else (a peer of another
/// version, or a bug): name both.
fn unexpected(asked: &str, resp: &ClientResponse) -> ConsensusError {
    ConsensusError::Unavailable(format!("the leader answered {asked} with {}", resp.kind()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ClusterConsensus {
    /// `contacts`: members to ask who leads when this peer's Raft does not
    /// know (the `--join` addresses of a worker).
    pub fn new(local: Arc<RaftConsensus<TypeConfig>>, net: NetHandle, contacts: Vec<String>) -> ClusterConsensus {
        ClusterConsensus {
            local,
            net,
            leader_hint: Arc::new(Mutex::new(None)),
            contacts: Arc::new(Mutex::new(contacts)),
        }
    }

    /// Members to ask who leads from now on, besides those known.
    pub fn add_contacts(&self, addrs: impl IntoIterator<Item = String>) {
        let mut c = lock(&self.contacts);
        for a in addrs {
            if !c.contains(&a) && a != self.net.local_addr().to_string() {
                c.push(a);
            }
        }
    }

    /// The addresses of the cluster's other peers as this peer knows them,
    /// voters first: its replica's registry, then the contacts it asks.
    pub fn cluster_addresses(&self) -> Vec<String> {
        let (status, peers) = (self.local.status(), self.local.read(|s| s.peers()));
        let voters_first = peers.iter().filter(|p| status.voters.contains(&p.id.0)).chain(peers.iter());
        let me = self.net.local_addr().to_string();
        let mut out: Vec<String> = Vec::new();
        for a in voters_first.flat_map(|p| p.info.addresses.iter().cloned()).chain(lock(&self.contacts).clone()) {
            if a != me && !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    /// Whether this peer is a voter: it works on its own replica.
    pub fn is_voter(&self) -> bool {
        self.local.status().is_voter()
    }

    /// The leader's address as far as this peer knows, never itself.
    fn known_leader(&self) -> Option<String> {
        let status = self.local.status();
        // Metrics may still name this peer for a moment after it lost the
        // lead: that is no leader to forward to. A peer outside membership
        // (a worker, or one taken out) hears from no leader: what its Raft
        // names is stale.
        let member = status.holds_replica();
        let from_raft = status.leader.filter(|l| member && *l != status.node).and_then(|l| self.local.member_addr(l));
        from_raft.or_else(|| lock(&self.leader_hint).clone())
    }

    /// Ask the contacts who leads, then the members of the configuration
    /// this replica holds (a member restarted with no contacts saved, a
    /// founder killed, must still find its cluster); remember the answer
    /// and the members.
    async fn find_leader(&self) -> Option<String> {
        let mut contacts = lock(&self.contacts).clone();
        let me = self.net.local_addr().to_string();
        for a in self.local.member_addrs() {
            if a != me && !contacts.contains(&a) {
                contacts.push(a);
            }
        }
        for contact in contacts {
            let Ok(addr) = contact.parse::<Multiaddr>() else { continue };
            let Ok(ClientResponse::Status(st)) = self.net.client(&addr, ClientRequest::Status).await else { continue };
            let addr_of =
                |id: PeerId| st.peers.iter().find(|p| p.id == id).and_then(|p| p.info.addresses.first().cloned());
            let members: Vec<String> = st.voters.iter().filter_map(|v| addr_of(*v)).collect();
            let leader = st.leader.and_then(addr_of);
            self.add_contacts(members);
            if let Some(l) = leader {
                *lock(&self.leader_hint) = Some(l.clone());
                return Some(l);
            }
        }
        None
    }

    /// Send `req` to the leader and return its answer. While no leader is
    /// known (an election), or the one known is gone or no longer leads,
    /// ask again for up to [`NO_LEADER_WAIT`]: in each of those cases
    /// nothing was proposed, so retrying cannot apply anything twice.
    pub async fn to_leader(&self, req: ClientRequest) -> Result<ClientResponse, ConsensusError> {
        let deadline = tokio::time::Instant::now() + NO_LEADER_WAIT;
        loop {
            let waited = tokio::time::Instant::now() >= deadline;
            let leader = match self.known_leader() {
                Some(l) => Some(l),
                None => self.find_leader().await,
            };
            let Some(addr) = leader else {
                if waited {
                    return Err(ConsensusError::NotLeader { leader: None, leader_id: None });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match self.net.client(&leader_addr(&addr)?, req.clone()).await {
                Ok(ClientResponse::Error(ServiceError::NotLeader { .. })) | Err(NetError::Unreachable { .. })
                    if !waited =>
                {
                    lock(&self.leader_hint).take();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(resp) => return Ok(resp),
                Err(e) => return Err(ConsensusError::Unavailable(format!("forwarding to the leader: {e}"))),
            }
        }
    }

    /// Commit `cmd` on the leader (locally if this peer leads) and return
    /// its log index and outcome.
    pub async fn write_indexed(&self, now: Timestamp, cmd: Command) -> Result<(u64, ApplyResult), ConsensusError> {
        let deadline = tokio::time::Instant::now() + NO_LEADER_WAIT;
        if self.is_voter() {
            loop {
                match self.local.write_indexed(now, cmd.clone()).await {
                    // This peer just lost or is about to win the lead: wait.
                    Err(ConsensusError::NotLeader { leader: Some(addr), .. })
                        if addr == self.net.local_addr().to_string() && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    // An election: this voter may win it.
                    Err(ConsensusError::NotLeader { leader: None, .. }) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(ConsensusError::NotLeader { .. }) => break,
                    other => return other,
                }
            }
        }
        // Committed by the leader: acknowledge now. This replica (if any)
        // learns of the commit with the leader's next message; fresh reads
        // go to the leader, so they see it already. Results this peer ran
        // as leader are not another leader's to write: they are dropped.
        match self.to_leader(ClientRequest::Forward(cmd.without_results())).await? {
            ClientResponse::Written { index, result } => Ok((index, result)),
            ClientResponse::Error(e) => Err(service_error(e)),
            other => Err(unexpected("a forwarded write", &other)),
        }
    }

    /// Make this replica at least as fresh as the leader's commit point at
    /// the time of the call (a linearizable read follows).
    pub async fn fresh(&self) -> Result<(), ConsensusError> {
        let index = match self.local.read_index().await {
            Ok(i) => return self.local.wait_applied(i, CATCH_UP_TIMEOUT).await,
            Err(ConsensusError::NotLeader { .. }) => match self.to_leader(ClientRequest::ReadIndex).await? {
                ClientResponse::ReadIndex(i) => i,
                ClientResponse::Error(e) => return Err(service_error(e)),
                other => return Err(unexpected("a read-index request", &other)),
            },
            Err(e) => return Err(e),
        };
        self.local.wait_applied(index, CATCH_UP_TIMEOUT).await
    }
}

impl Consensus for ClusterConsensus {
    async fn write(&self, now: Timestamp, cmd: Command) -> Result<ApplyResult, ConsensusError> {
        self.write_indexed(now, cmd).await.map(|(_, r)| r)
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.local.read(f)
    }

    fn stamp(&self, wall: Timestamp) -> Timestamp {
        self.local.stamp(wall)
    }

    async fn holds_state(&self) -> bool {
        self.local.holds_state().await
    }

    async fn catch_up(&self) -> Result<(), ConsensusError> {
        self.fresh().await
    }

    fn status(&self) -> RaftStatus {
        self.local.status()
    }

    async fn module(&self, hash: ModuleHash) -> Option<Vec<u8>> {
        if let Some(bytes) = self.local.read(|s| s.module(&hash).map(<[u8]>::to_vec)) {
            return Some(bytes);
        }
        match self.to_leader(ClientRequest::GetModule(hash)).await {
            Ok(ClientResponse::Module(bytes)) => bytes,
            Ok(other) => {
                tracing::warn!(module = %hash, answer = other.kind(), "could not fetch a module from the leader");
                None
            }
            Err(e) => {
                tracing::warn!(module = %hash, error = %e, "could not fetch a module from the leader");
                None
            }
        }
    }

    async fn work(&self, now: Timestamp, req: WorkRequest) -> Result<WorkReply, ConsensusError> {
        if self.is_voter() {
            return serve_work(self, now, req).await;
        }
        match self.to_leader(ClientRequest::Work(req)).await? {
            ClientResponse::Work(reply) => Ok(reply),
            ClientResponse::Error(e) => Err(service_error(e)),
            other => Err(unexpected("a worker's turn", &other)),
        }
    }
}

/// The client protocol of a cluster peer.
pub struct ClusterService<R, X> {
    pub peer: Peer<R, ClusterConsensus, X>,
    pub consensus: ClusterConsensus,
    /// Notified when a client asks this peer to leave the cluster.
    pub leave: Arc<Notify>,
}

impl<R, X> std::fmt::Debug for ClusterService<R, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterService").field("peer", &self.peer).finish_non_exhaustive()
    }
}

fn error(e: ConsensusError) -> ClientResponse {
    ClientResponse::Error(e.into())
}

impl<R: Runtime, X: JobRunner> ClusterService<R, X> {
    async fn serve(&self, req: ClientRequest) -> ClientResponse {
        let c = &self.consensus;
        let is_leader = || {
            let s = c.local.status();
            s.leader == Some(s.node)
        };
        match req {
            ClientRequest::Forward(cmd) => {
                if !is_leader() {
                    return error(ConsensusError::NotLeader { leader: None, leader_id: None });
                }
                let (cmd, fused) = self.peer.fuse(cmd).await;
                let written = c.local.write_indexed(self.peer.now(), cmd).await;
                let index = written.as_ref().map_or(0, |(index, _)| *index);
                match self.peer.unfuse(fused, written.map(|(_, result)| result)) {
                    Ok(result) => ClientResponse::Written { index, result },
                    Err(e) => error(e),
                }
            }
            ClientRequest::ReadIndex => match c.local.read_index().await {
                Ok(i) => ClientResponse::ReadIndex(i),
                Err(e) => error(e),
            },
            ClientRequest::StateDigest => {
                let (applied_index, digest) = c.local.digest();
                ClientResponse::StateDigest { applied_index, digest }
            }
            ClientRequest::Join { info } if is_leader() => self.join(info).await,
            ClientRequest::Leave { peer } if peer == self.peer.id() => {
                tracing::info!(peer = %peer, "asked to leave the cluster");
                self.leave.notify_one();
                ClientResponse::Left
            }
            ClientRequest::Leave { peer } if is_leader() => match self.remove(peer).await {
                Ok(()) => ClientResponse::Left,
                Err(e) => error(e),
            },
            req @ (ClientRequest::Join { .. } | ClientRequest::Leave { .. }) => {
                c.to_leader(req).await.unwrap_or_else(error)
            }
            req @ (ClientRequest::GetJob(_)
            | ClientRequest::JobStatuses(_)
            | ClientRequest::ListJobs { .. }
            | ClientRequest::GetStream(_)
            | ClientRequest::ListStreams
            | ClientRequest::HasModule(_)
            | ClientRequest::GetModule(_)
            | ClientRequest::DataGet { .. }) => {
                // Linearizable: the leader confirms it still leads and
                // answers from a state that includes every acknowledged
                // write; a follower passes the read on to it.
                if is_leader() {
                    match c.fresh().await {
                        Ok(()) => self.peer.handle(req).await,
                        Err(e) => error(e),
                    }
                } else {
                    c.to_leader(req).await.unwrap_or_else(error)
                }
            }
            ClientRequest::Work(req) if is_leader() => match serve_work(&*c.local, self.peer.now(), req).await {
                Ok(reply) => ClientResponse::Work(reply),
                Err(e) => error(e),
            },
            req @ ClientRequest::Work(_) => c.to_leader(req).await.unwrap_or_else(error),
            // A peer without a replica of its own shows the leader's view.
            ClientRequest::Status if !c.is_voter() => match c.to_leader(ClientRequest::Status).await {
                Ok(ClientResponse::Status(mut st)) => {
                    st.peer = self.peer.id();
                    ClientResponse::Status(st)
                }
                Ok(other) => other,
                Err(e) => error(e),
            },
            req @ (ClientRequest::Write(_) | ClientRequest::Status) => self.peer.handle(req).await,
        }
    }

    /// On the leader: register the joiner as a worker (a new id, never
    /// reused; the same id again for the same address). The membership
    /// manager makes it a learner, then a voter, if voters are needed.
    async fn join(&self, info: impetus_proto::PeerInfo) -> ClientResponse {
        let c = &self.consensus;
        let Some(addr) = info.addresses.first().cloned() else {
            return ClientResponse::Error(ServiceError::InvalidRequest("a joining peer must give its address".into()));
        };
        if let Err(e) = addr.parse::<Multiaddr>() {
            return ClientResponse::Error(ServiceError::InvalidRequest(format!("bad address {addr:?}: {e}")));
        }
        // A joiner that asks again (its first answer was lost, or it
        // restarted) keeps the id it was given: one registry entry per
        // identity.
        let again = c.local.read(|s| s.peers().into_iter().find(|p| p.info.addresses.first() == Some(&addr)));
        if let Some(p) = again {
            return ClientResponse::Joined { peer: p.id };
        }
        let cmd = Command::RegisterPeer { info, role: PeerRole::Worker };
        match c.local.write_indexed(self.peer.now(), cmd).await {
            Ok((_, Ok(Outcome::PeerRegistered { peer }))) => {
                tracing::info!(%peer, %addr, "a peer joined as a worker");
                ClientResponse::Joined { peer }
            }
            Ok((_, other)) => {
                ClientResponse::Error(ServiceError::Internal(format!("registering the joiner: {other:?}")))
            }
            Err(e) => error(e),
        }
    }

    /// On the leader: [`RaftConsensus::remove_peer`]. The leader leaving
    /// first keeps the other members' addresses: once out of membership it
    /// leads no more, and finds the next leader through them.
    pub async fn remove(&self, peer: PeerId) -> Result<(), ConsensusError> {
        let c = &self.consensus;
        if peer == self.peer.id() {
            c.add_contacts(c.cluster_addresses());
        }
        c.local.remove_peer(c, self.peer.now(), peer).await?;
        tracing::info!(%peer, "a peer left the cluster");
        Ok(())
    }
}

impl<R: Runtime, X: JobRunner> ClientService for ClusterService<R, X> {
    fn handle(&self, req: ClientRequest) -> impl std::future::Future<Output = ClientResponse> + Send {
        self.serve(req)
    }
}
