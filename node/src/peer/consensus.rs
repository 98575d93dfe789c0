//! What the peer needs from Raft: commit a command, read the applied state.

use std::future::Future;

use impetus_proto::{ApplyResult, Command, ModuleHash, Timestamp};
use impetus_queue::State;

/// Why a write did not commit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConsensusError {
    #[error("this peer is not the leader (leader: {})", leader.as_deref().unwrap_or("unknown"))]
    NotLeader { leader: Option<String>, leader_id: Option<u64> },
    #[error("consensus unavailable: {0}")]
    Unavailable(String),
}

/// Raft as the peer sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub node: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Raft voters and learners (node ids are peer ids).
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

pub trait Consensus: Send + Sync + 'static {
    /// Commit `cmd` stamped with `now` and return its outcome once applied on
    /// this peer. Acknowledged only after a quorum has flushed it.
    fn write(&self, now: Timestamp, cmd: Command) -> impl Future<Output = Result<ApplyResult, ConsensusError>> + Send;
    /// Read this peer's applied state.
    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T;
    fn status(&self) -> RaftStatus;
    /// A module's bytes by hash, from this peer's replica; an implementation
    /// whose replica may lag (a follower) asks the cluster when it is missing.
    fn module(&self, hash: ModuleHash) -> impl Future<Output = Option<Vec<u8>>> + Send {
        let bytes = self.read(|s| s.module(&hash).map(<[u8]>::to_vec));
        async move { bytes }
    }
}
