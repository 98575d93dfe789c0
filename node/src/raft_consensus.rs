//! [`Consensus`] on openraft: writes go through `client_write`, reads come
//! from the applied state handle.

use impetus_proto::{ApplyResult, Command, Timestamp};
use impetus_queue::State;
use impetus_raft::openraft::async_runtime::WatchReceiver;
use impetus_raft::openraft::error::{ClientWriteError, RaftError};
use impetus_raft::{ImpetusConfig, ImpetusRaft, Request, StateHandle};

use crate::peer::{Consensus, ConsensusError, RaftStatus};

/// One Raft member and its applied state.
pub struct RaftConsensus<C: ImpetusConfig> {
    raft: ImpetusRaft<C>,
    state: StateHandle,
    node: u64,
}

impl<C: ImpetusConfig> std::fmt::Debug for RaftConsensus<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftConsensus").field("node", &self.node).finish_non_exhaustive()
    }
}

impl<C: ImpetusConfig> RaftConsensus<C> {
    pub fn new(raft: ImpetusRaft<C>, state: StateHandle, node: u64) -> RaftConsensus<C> {
        RaftConsensus { raft, state, node }
    }

    pub fn raft(&self) -> &ImpetusRaft<C> {
        &self.raft
    }
}

impl<C: ImpetusConfig> Consensus for RaftConsensus<C> {
    async fn write(&self, now: Timestamp, cmd: Command) -> Result<ApplyResult, ConsensusError> {
        match self.raft.client_write(Request { now, cmd }).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ConsensusError::NotLeader { leader: f.leader_node.map(|n| n.addr.clone()) })
            }
            Err(e) => Err(ConsensusError::Unavailable(e.to_string())),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.state.read(f)
    }

    fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        RaftStatus {
            node: self.node,
            leader: m.current_leader,
            term: m.current_term,
            commit_index: m.cluster_committed.map(|l| l.index()).unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index()).unwrap_or(0),
        }
    }
}
