//! impetus-raft: openraft type config, log and state-machine storage (on
//! disk: a WAL and sled; in memory for tests and the simulator), snapshots.
//!
//! The pieces:
//! - [`ImpetusConfig`]: every openraft type config Impetus runs with; the
//!   storage and the in-process network are generic over it, so only the
//!   async runtime differs between production ([`TypeConfig`], tokio) and the
//!   simulator (declare one with [`declare_impetus_types!`] and
//!   `openraft_rt_sim::SimRuntime`).
//! - [`StateMachineStore`]: the replicated [`impetus_queue::State`] plus the
//!   last applied log id and membership; snapshots go to a [`SnapshotStore`].
//! - [`MemLogStore`] (tests, simulator) and `WalLogStore` (feature `sled`:
//!   append-only segment files): the Raft log. A write is acknowledged only
//!   after it is flushed.
//! - [`testing::Router`]: an in-process network between Raft instances.
//! - `start_single` (feature `sled`): one peer on a data directory.
//!
//! Invariant: the state machine is rebuilt on start from the last snapshot,
//! then openraft re-applies the committed log after the snapshot's last log
//! id, so every log entry up to the last snapshot may be purged and nothing
//! acknowledged is lost.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::fmt;

pub use impetus_proto::ApplyResult;
use impetus_proto::{Command, Timestamp};
use serde::{Deserialize, Serialize};

/// Run `f`, which blocks its thread for long (waits on the disk: a segment
/// rollover's three syncs; or encodes a whole state: a snapshot), telling
/// a multi-threaded tokio runtime first, so that the tasks queued on this
/// worker thread move to another rather than wait behind it (a peer's
/// runtime has one thread by default: its heartbeats would wait too).
/// Anywhere else (no runtime, a current-thread one, the simulator's) `f`
/// just runs.
pub(crate) fn off_the_runtime<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(feature = "sled")]
    {
        use tokio::runtime::{Handle, RuntimeFlavor};
        if matches!(Handle::try_current(), Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread) {
            return tokio::task::block_in_place(f);
        }
    }
    f()
}

#[cfg(feature = "sled")]
mod disk;
mod error;
mod mem_log;
mod snapshot_store;
mod state_machine;
pub mod testing;
#[cfg(feature = "sled")]
pub mod wal_log;

#[cfg(feature = "sled")]
pub use disk::{open_stores, start_single, start_single_with, SNAPSHOT_TREE, WAL_DIR};
pub use error::RaftError;
pub use mem_log::MemLogStore;
pub use openraft;
pub use snapshot_store::{MemSnapshotStore, SnapshotStore, StoredSnapshot};
pub use state_machine::{Applied, ApplyObserver, StateHandle, StateMachineStore};
#[cfg(feature = "sled")]
pub use wal_log::WalLogStore;

/// Version byte of a log entry in the sled-kept Raft log of builds before
/// the WAL (which such a data directory is refused for; tests write one).
pub const LOG_ENTRY_VERSION: u8 = 1;
/// Version byte of the vote, committed and purged log ids in that old log.
pub const LOG_META_VERSION: u8 = 1;
/// Version byte of the state-machine snapshot body (what followers receive).
pub const SM_SNAPSHOT_VERSION: u8 = 1;
/// Version byte of a stored snapshot (meta + body) as written to disk.
pub const STORED_SNAPSHOT_VERSION: u8 = 1;

/// Take a snapshot after this many applied log entries (production default).
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 10_000;
/// Keep this many log entries that are already in a snapshot, so a follower
/// that lags a little catches up from the log and not with a full snapshot.
pub const DEFAULT_LOGS_TO_KEEP: u64 = 1_000;

/// One entry of the replicated log: a command and the time the leader
/// stamped on it. `apply` never reads a clock: it uses `now`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub now: Timestamp,
    pub cmd: Command,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Request(now={}, cmd={:?})", self.now.0, command_name(&self.cmd))
    }
}

fn command_name(cmd: &Command) -> &'static str {
    match cmd {
        Command::Tick => "Tick",
        Command::CreateStream { .. } => "CreateStream",
        Command::UpdateStream { .. } => "UpdateStream",
        Command::DeleteStream { .. } => "DeleteStream",
        Command::PutModule { .. } => "PutModule",
        Command::Submit { .. } => "Submit",
        Command::SubmitRan { .. } => "SubmitRan",
        Command::Lease { .. } => "Lease",
        Command::Renew { .. } => "Renew",
        Command::Complete { .. } => "Complete",
        Command::Fail { .. } => "Fail",
        Command::Release { .. } => "Release",
        Command::Cancel { .. } => "Cancel",
        Command::Retry { .. } => "Retry",
        Command::DataPut { .. } => "DataPut",
        Command::DataDelete { .. } => "DataDelete",
        Command::DataCas { .. } => "DataCas",
        Command::RegisterPeer { .. } => "RegisterPeer",
        Command::Heartbeat { .. } => "Heartbeat",
        Command::SetPeerRole { .. } => "SetPeerRole",
        Command::DrainPeer { .. } => "DrainPeer",
        Command::RemovePeer { .. } => "RemovePeer",
        Command::Purge { .. } => "Purge",
        Command::Batch(_) => "Batch",
    }
}

/// A Raft member as the membership config records it: where to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerNode {
    /// Transport address (a libp2p multiaddr in production; any string in tests).
    pub addr: String,
}

impl PeerNode {
    pub fn new(addr: impl Into<String>) -> PeerNode {
        PeerNode { addr: addr.into() }
    }
}

impl fmt::Display for PeerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)
    }
}

/// Raft node ids: Impetus peer ids, never reused.
pub type NodeId = u64;
/// The leader id Impetus uses (openraft's default "advanced" leader id).
pub type LeaderId = openraft::impls::leader_id_adv::LeaderId<u64, NodeId>;
/// A log id: (leader id, index).
pub type LogId = openraft::LogId<LeaderId>;
/// A vote.
pub type Vote = openraft::impls::Vote<LeaderId>;
/// The payload of a log entry.
pub type Payload = openraft::EntryPayload<Request, NodeId, PeerNode>;
/// A log entry.
pub type Entry = openraft::Entry<LeaderId, Payload>;
/// The membership config as the state machine stores it.
pub type StoredMembership = openraft::StoredMembership<LeaderId, NodeId, PeerNode>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<LeaderId, NodeId, PeerNode>;
/// The data of a snapshot as it moves between the state machine and the network.
pub type SnapshotData = std::io::Cursor<Vec<u8>>;
/// A snapshot with its metadata.
pub type Snapshot = openraft::Snapshot<LeaderId, NodeId, PeerNode, SnapshotData>;

/// Every openraft type config Impetus runs with: the same data, node and log
/// types; only the async runtime (and openraft's internal responder, batch
/// and error-source types) may differ. Storage and the test network are
/// generic over it. Blanket-implemented: declare a config with
/// [`declare_impetus_types!`].
pub trait ImpetusConfig:
    openraft::RaftTypeConfig<
    D = Request,
    R = ApplyResult,
    NodeId = NodeId,
    Node = PeerNode,
    Term = u64,
    LeaderId = LeaderId,
    Vote = Vote,
    Payload = Payload,
    Entry = Entry,
>
{
}

impl<C> ImpetusConfig for C where
    C: openraft::RaftTypeConfig<
        D = Request,
        R = ApplyResult,
        NodeId = NodeId,
        Node = PeerNode,
        Term = u64,
        LeaderId = LeaderId,
        Vote = Vote,
        Payload = Payload,
        Entry = Entry,
    >
{
}

/// Declare an Impetus type config on a given openraft `AsyncRuntime`:
///
/// ```text
/// impetus_raft::declare_impetus_types!(pub SimTypeConfig, openraft_rt_sim::SimRuntime);
/// ```
///
/// The result implements [`ImpetusConfig`], so [`StateMachineStore`],
/// [`MemLogStore`] and [`testing::Router`] work with it unchanged.
#[macro_export]
macro_rules! declare_impetus_types {
    ($(#[$outer:meta])* $vis:vis $name:ident, $runtime:ty) => {
        $crate::openraft::declare_raft_types!(
            $(#[$outer])*
            $vis $name:
                D = $crate::Request,
                R = $crate::ApplyResult,
                NodeId = $crate::NodeId,
                Node = $crate::PeerNode,
                AsyncRuntime = $runtime,
        );
    };
}

declare_impetus_types!(
    /// The production type config: openraft on tokio.
    pub TypeConfig,
    openraft::impls::TokioRuntime
);

// The simulator declares its own config next to `TypeConfig`, e.g.
// `declare_impetus_types!(pub SimTypeConfig, openraft_rt_sim::SimRuntime);`
// (openraft-rt-sim is a dependency of the simulator, not of this crate).

/// A Raft node of config `C` over the Impetus state machine.
pub type ImpetusRaft<C> = openraft::Raft<C, StateMachineStore<C>>;
/// The production Raft node (tokio).
pub type Raft = ImpetusRaft<TypeConfig>;

/// Whether an openraft stream session `input` carries one append only (the
/// heartbeat worker's): both networks, the real one and the simulator's,
/// send such a session as one request and its reply instead of pipelining
/// it on a channel of its own.
pub fn is_single_append<S: futures::Stream>(input: &S) -> bool {
    input.size_hint().1 == Some(1)
}

/// The openraft configuration Impetus runs with.
///
/// - heartbeat every 100 ms (skipped for a follower that acknowledged a
///   replication RPC within the last 100 ms), election timeout drawn from 500–1000 ms: a
///   leader that stops heartbeating is replaced within about a second, and
///   a few heartbeats lost or late (a loaded machine) start no election;
/// - a snapshot after `snapshot_every` applied entries
///   ([`DEFAULT_SNAPSHOT_EVERY`] in production), and the log behind a
///   snapshot purged except the last `logs_to_keep`
///   ([`DEFAULT_LOGS_TO_KEEP`]), so the log on disk stays bounded;
/// - up to 4096 entries per append-entries RPC (batching);
/// - no leader restore: a restarted leader is elected again, in a new term.
///
/// Validate with [`openraft::Config::validate`] (the `start_*` functions do).
pub fn raft_config(snapshot_every: u64, logs_to_keep: u64) -> openraft::Config {
    openraft::Config {
        cluster_name: "impetus".to_string(),
        heartbeat_interval: 100,
        // No heartbeat to a follower that acknowledged a replication RPC
        // within the last 100 ms (it proves the same): under load most
        // heartbeats go, and they come back once writes stop.
        heartbeat_min_interval: Some(100),
        election_timeout_min: 500,
        election_timeout_max: 1000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every.max(1)),
        max_in_snapshot_log_to_keep: logs_to_keep,
        purge_batch_size: 1,
        max_payload_entries: 4096,
        // Replicate entries as soon as they are appended (the flush runs in
        // the background): the leader's flush overlaps the round trip to the
        // followers. Its own copy counts for the quorum only once flushed.
        broadcast_submitted_on_append: Some(true),
        // A leader that restarts must win a new election (a new term).
        // openraft's default restores leadership in the old term, and a
        // leader that lost unflushed entries it had already sent to a
        // learner then writes different entries under the same log ids: the
        // learner keeps its copies (same id, "same entry") and diverges.
        // Found by the simulator (seed 10 with `--faults crash,disk`).
        enable_leader_restore: Some(false),
        ..Default::default()
    }
}

/// [`raft_config`] with the production defaults.
pub fn default_raft_config() -> openraft::Config {
    raft_config(DEFAULT_SNAPSHOT_EVERY, DEFAULT_LOGS_TO_KEEP)
}

/// The log indexes `range` covers, as an inclusive range; `None` when it
/// covers none (openraft may ask for an empty or inverted range, which
/// `BTreeMap::range` would panic on).
pub(crate) fn log_range(range: &impl std::ops::RangeBounds<u64>) -> Option<std::ops::RangeInclusive<u64>> {
    use std::ops::Bound;
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e,
        Bound::Excluded(&e) => e.checked_sub(1)?,
        Bound::Unbounded => u64::MAX,
    };
    (start <= end).then_some(start..=end)
}

pub(crate) fn invalid_data(what: &str, e: impl fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
}

/// Create a Raft node over `log` and `sm` and start it. If `init_single` is
/// given and the stores were never initialized (openraft's
/// `is_initialized`: no vote, no log, no membership), initialize a
/// one-voter cluster of `node_id` at that node; otherwise do nothing, so a
/// restart never re-initializes. With `init_single`, when `node_id` is the
/// only voter, return only once it is leader.
pub async fn start_node<C, LS, N>(
    node_id: NodeId,
    config: openraft::Config,
    network: N,
    log: LS,
    sm: StateMachineStore<C>,
    init_single: Option<PeerNode>,
) -> Result<(ImpetusRaft<C>, StateHandle), RaftError>
where
    C: ImpetusConfig,
    LS: openraft::storage::RaftLogStorage<C>,
    N: openraft::RaftNetworkFactory<C>,
    N::Network: openraft::network::NetSnapshot<C, SnapshotData = SnapshotData>,
{
    let fatal = |e: &dyn fmt::Display| RaftError::Fatal { node: node_id, message: e.to_string() };
    let handle = sm.handle();
    let config_election_max = config.election_timeout_max;
    let config = std::sync::Arc::new(config.validate()?);
    let raft = openraft::Raft::new(node_id, config, network, log, sm).await.map_err(|e| fatal(&e))?;
    if let Some(node) = init_single {
        if raft.is_initialized().await.map_err(|e| fatal(&e))? {
            tracing::info!(node_id, "raft already initialized; recovering from storage");
        } else {
            tracing::info!(node_id, addr = %node.addr, "initializing a one-voter raft cluster");
            let members = std::collections::BTreeMap::from([(node_id, node)]);
            raft.initialize(members)
                .await
                .map_err(|e| RaftError::Initialize { node: node_id, message: e.to_string() })?;
        }
        // The sole voter returns only once it leads, so writes work at once;
        // a member of a larger cluster does not wait.
        let wait_ms = config_election_max.saturating_mul(20).max(1_000);
        raft.wait(Some(std::time::Duration::from_millis(wait_ms)))
            .metrics(
                |m| {
                    let voters: Vec<NodeId> = m.membership_config.voter_ids().collect();
                    match voters.as_slice() {
                        [] => false,
                        [only] if *only == node_id => m.current_leader == Some(node_id) && m.state.is_leader(),
                        _ => true,
                    }
                },
                "the single voter leads",
            )
            .await
            .map_err(|e| fatal(&e))?;
    }
    Ok((raft, handle))
}
