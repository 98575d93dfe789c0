//! An in-process Raft network: RPCs are direct calls on the target's
//! [`ImpetusRaft`] handle, found in a shared router map. For tests, for a
//! single peer (which sends no RPC), and as a base for the simulator (which
//! adds its own delays and faults).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::errors::{Fatal, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::OptionalSend;

use crate::{ImpetusConfig, ImpetusRaft, NodeId, PeerNode, Snapshot, SnapshotData, Vote};

struct Nodes<C: ImpetusConfig> {
    rafts: BTreeMap<NodeId, ImpetusRaft<C>>,
    isolated: BTreeSet<NodeId>,
}

/// The shared map of in-process Raft nodes. Clones share the map.
///
/// A node that is not in the map (never added, or removed to simulate a
/// crash) or that is isolated is unreachable: RPCs to or from it fail with
/// `Unreachable`.
pub struct Router<C: ImpetusConfig> {
    nodes: Arc<Mutex<Nodes<C>>>,
    /// The node this factory sends from (`None`: not known, never isolated).
    source: Option<NodeId>,
}

impl<C: ImpetusConfig> Clone for Router<C> {
    fn clone(&self) -> Self {
        Router { nodes: self.nodes.clone(), source: self.source }
    }
}

impl<C: ImpetusConfig> Default for Router<C> {
    fn default() -> Self {
        Router::new()
    }
}

impl<C: ImpetusConfig> fmt::Debug for Router<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("Router")
            .field("source", &self.source)
            .field("nodes", &g.rafts.keys().collect::<Vec<_>>())
            .field("isolated", &g.isolated)
            .finish()
    }
}

impl<C: ImpetusConfig> Router<C> {
    pub fn new() -> Router<C> {
        Router {
            nodes: Arc::new(Mutex::new(Nodes { rafts: BTreeMap::new(), isolated: BTreeSet::new() })),
            source: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Nodes<C>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The network factory to give to node `id`'s `Raft::new`.
    pub fn for_node(&self, id: NodeId) -> Router<C> {
        Router { nodes: self.nodes.clone(), source: Some(id) }
    }

    /// Make node `id` reachable through `raft`.
    pub fn add(&self, id: NodeId, raft: ImpetusRaft<C>) {
        self.lock().rafts.insert(id, raft);
    }

    /// Remove node `id` (e.g. before shutting it down): it becomes unreachable.
    pub fn remove(&self, id: NodeId) -> Option<ImpetusRaft<C>> {
        self.lock().rafts.remove(&id)
    }

    /// Cut node `id` off from every other node (`true`) or heal it (`false`).
    pub fn set_isolated(&self, id: NodeId, isolated: bool) {
        let mut g = self.lock();
        if isolated {
            g.isolated.insert(id);
        } else {
            g.isolated.remove(&id);
        }
    }

    /// The Raft handle of node `id`, if it is in the map.
    pub fn get(&self, id: NodeId) -> Option<ImpetusRaft<C>> {
        self.lock().rafts.get(&id).cloned()
    }

    /// The ids of the nodes in the map.
    pub fn ids(&self) -> Vec<NodeId> {
        self.lock().rafts.keys().copied().collect()
    }

    fn route(&self, target: NodeId) -> Result<ImpetusRaft<C>, Unreachable<C>> {
        let g = self.lock();
        let cut = g.isolated.contains(&target) || self.source.is_some_and(|s| g.isolated.contains(&s));
        match g.rafts.get(&target) {
            Some(raft) if !cut => Ok(raft.clone()),
            Some(_) => Err(Unreachable::from_string(format!("node {target} is partitioned away"))),
            None => Err(Unreachable::from_string(format!("node {target} is not running"))),
        }
    }
}

/// A connection from one node to `target` through a [`Router`].
pub struct Connection<C: ImpetusConfig> {
    router: Router<C>,
    target: NodeId,
}

impl<C: ImpetusConfig> fmt::Debug for Connection<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").field("source", &self.router.source).field("target", &self.target).finish()
    }
}

fn unreachable_rpc<C: ImpetusConfig>(e: RaftError<C>) -> RPCError<C> {
    match e {
        RaftError::APIError(never) => match never {},
        RaftError::Fatal(f) => RPCError::Unreachable(Unreachable::new(&f)),
    }
}

impl<C: ImpetusConfig> RaftNetworkFactory<C> for Router<C> {
    type Network = Connection<C>;

    async fn new_client(&mut self, target: NodeId, _node: &PeerNode) -> Connection<C> {
        Connection { router: self.clone(), target }
    }
}

impl<C: ImpetusConfig> RaftNetworkV2<C> for Connection<C> {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        let raft = self.router.route(self.target)?;
        raft.append_entries(rpc).await.map_err(unreachable_rpc)
    }

    async fn vote(&mut self, rpc: VoteRequest<C>, _option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        let raft = self.router.route(self.target)?;
        raft.vote(rpc).await.map_err(unreachable_rpc)
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<C>, _option: RPCOption) -> Result<VoteResponse<C>, RPCError<C>> {
        let raft = self.router.route(self.target)?;
        raft.pre_vote(rpc).await.map_err(unreachable_rpc)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let raft = self.router.route(self.target)?;
        raft.install_full_snapshot(vote, snapshot).await.map_err(|e: Fatal<C>| Unreachable::new(&e).into())
    }
}
