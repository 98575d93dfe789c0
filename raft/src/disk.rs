//! A peer's data directory: the Raft log in a WAL ([`WalLogStore`]), the
//! current snapshot in sled, and a one-peer start on it.
//!
//! ```text
//! DATA_DIR/            sled database (the snapshot tree; locked while open)
//! DATA_DIR/raft-wal/   the Raft log's segments
//! ```

use std::io;
use std::path::Path;

use crate::snapshot_store::SnapshotStore;
use crate::state_machine::{StateHandle, StateMachineStore};
use crate::wal_log::WalLogStore;
use crate::{default_raft_config, invalid_data, start_node, ImpetusConfig, PeerNode, Raft, RaftError, TypeConfig};

/// Name of the sled tree holding the current snapshot.
pub const SNAPSHOT_TREE: &str = "raft-snapshot";
/// The directory of the Raft log's segments, inside the data directory.
pub const WAL_DIR: &str = "raft-wal";
/// Name of the sled tree that held the Raft log before the WAL (refused
/// unless empty).
const OLD_LOG_TREE: &str = "raft-log";

fn sled_io(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

/// A Raft log kept in sled by a version older than the WAL is refused by
/// name: its commands were applied under other rules
/// ([`crate::wal_log::WAL_RECORD_VERSION`]), and replaying them under these would
/// part this replica from the others. An empty tree is dropped.
fn refuse_sled_log(db: &sled::Db, data_dir: &Path) -> io::Result<()> {
    if !db.tree_names().iter().any(|n| n.as_ref() == OLD_LOG_TREE.as_bytes()) {
        return Ok(());
    }
    if db.open_tree(OLD_LOG_TREE).map_err(sled_io)?.is_empty() {
        db.drop_tree(OLD_LOG_TREE).map_err(sled_io)?;
        return Ok(());
    }
    Err(invalid_data(
        &format!("the raft log in {}", data_dir.display()),
        "written by an older version of impetus (a log kept in sled), whose commands may apply differently \
         here: every peer of a cluster runs one build; run the version that wrote it, or start this peer on \
         a fresh --data-dir",
    ))
}

/// How long [`open_stores`] waits for another handle in this process to release the directory.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Open the stores of `data_dir`: the Raft log (the WAL in
/// [`WAL_DIR`]) and the state machine, restored from the snapshot in sled.
///
/// sled locks the directory while any handle to the database lives; a
/// Raft node that was just shut down in this process releases its handles a
/// moment later, so a lock conflict is retried for up to [`LOCK_WAIT`].
pub async fn open_stores<C: ImpetusConfig>(
    data_dir: &Path,
) -> Result<(WalLogStore<C>, StateMachineStore<C>), RaftError> {
    let sled_err = |source| RaftError::Sled { path: data_dir.display().to_string(), source };
    let started = std::time::Instant::now();
    let db = loop {
        match sled::open(data_dir) {
            Ok(db) => break db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && started.elapsed() < LOCK_WAIT =>
            {
                tracing::debug!(path = %data_dir.display(), "sled directory still locked; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => return Err(sled_err(e)),
        }
    };
    let wal_dir = data_dir.join(WAL_DIR);
    refuse_sled_log(&db, data_dir)?;
    let log = WalLogStore::open(&wal_dir)?;
    let snapshots = db.open_tree(SNAPSHOT_TREE).map_err(sled_err)?;
    let sm = StateMachineStore::open(SnapshotStore::Sled(snapshots))?;
    Ok((log, sm))
}

/// Start one peer on `data_dir` with [`default_raft_config`]; see
/// [`start_single_with`].
pub async fn start_single(data_dir: &Path, node_id: u64, addr: String) -> Result<(Raft, StateHandle), RaftError> {
    start_single_with(data_dir, node_id, addr, default_raft_config()).await
}

/// Start one peer on `data_dir`: open its stores, restore the state machine, start
/// Raft and, only if this store was never initialized (no vote, no log, no
/// membership), initialize a one-voter cluster of `node_id` at `addr`. On a
/// restart nothing is re-initialized: the peer recovers from its snapshot
/// and log and elects itself again. When this node is the only voter, return
/// only once it is leader (writes are accepted right away).
pub async fn start_single_with(
    data_dir: &Path,
    node_id: u64,
    addr: String,
    config: openraft::Config,
) -> Result<(Raft, StateHandle), RaftError> {
    let (log, sm) = open_stores::<TypeConfig>(data_dir).await?;
    // A single voter sends no RPC; the in-process router with no other node
    // is a complete network for it.
    let network = crate::testing::Router::new();
    start_node(node_id, config, network, log, sm, Some(PeerNode { addr })).await
}
