//! Where the state machine keeps its current snapshot.

use std::io;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::{invalid_data, SnapshotMeta, STORED_SNAPSHOT_VERSION};

/// A snapshot as stored: its metadata and the state-machine body (the bytes
/// a follower receives; see [`crate::StateMachineStore`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub meta: SnapshotMeta,
    /// As bytes, not a sequence of `u8`s: postcard writes both alike, the
    /// former in one copy (a 60 MB state is not 60 million calls).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl StoredSnapshot {
    fn encode(&self) -> Vec<u8> {
        impetus_proto::wire::encode(STORED_SNAPSHOT_VERSION, self)
    }

    fn decode(bytes: &[u8]) -> io::Result<StoredSnapshot> {
        impetus_proto::wire::decode("stored snapshot", STORED_SNAPSHOT_VERSION, bytes, usize::MAX)
            .map_err(|e| invalid_data("stored snapshot", e))
    }
}

/// An in-memory snapshot slot. Clones share the slot, so a simulated peer
/// that "restarts" with a clone finds the snapshot it had saved (a snapshot
/// counts as durable as soon as `save` returns).
#[derive(Clone, Debug, Default)]
pub struct MemSnapshotStore {
    slot: Arc<Mutex<Option<Vec<u8>>>>,
}

impl MemSnapshotStore {
    pub fn new() -> MemSnapshotStore {
        MemSnapshotStore::default()
    }
}

/// The durable home of the current snapshot.
///
/// Invariant: when [`SnapshotStore::save`] returns `Ok`, the snapshot
/// survives a crash; openraft purges the log behind a snapshot only after
/// the snapshot was built (and so saved).
#[derive(Clone, Debug)]
pub enum SnapshotStore {
    /// In memory (tests, the simulator).
    Memory(MemSnapshotStore),
    /// One key of a sled tree; flushed on save.
    #[cfg(feature = "sled")]
    Sled(sled::Tree),
}

#[cfg(feature = "sled")]
const SNAPSHOT_KEY: &[u8] = b"current";

impl SnapshotStore {
    /// Store `snap` as the current snapshot, durably.
    pub async fn save(&self, snap: &StoredSnapshot) -> io::Result<()> {
        match self {
            SnapshotStore::Memory(m) => {
                let bytes = snap.encode();
                *m.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
                Ok(())
            }
            #[cfg(feature = "sled")]
            SnapshotStore::Sled(tree) => {
                crate::off_the_runtime(|| tree.insert(SNAPSHOT_KEY, snap.encode())).map_err(io::Error::other)?;
                tree.flush_async().await.map_err(io::Error::other)?;
                Ok(())
            }
        }
    }

    /// The current snapshot, if one was saved.
    pub fn load(&self) -> io::Result<Option<StoredSnapshot>> {
        let bytes = match self {
            SnapshotStore::Memory(m) => m.slot.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            #[cfg(feature = "sled")]
            SnapshotStore::Sled(tree) => tree.get(SNAPSHOT_KEY).map_err(io::Error::other)?.map(|v| v.to_vec()),
        };
        bytes.map(|b| StoredSnapshot::decode(&b)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored snapshot as builds before `serde_bytes` wrote it.
    #[derive(Serialize)]
    struct AsASequence {
        meta: SnapshotMeta,
        data: Vec<u8>,
    }

    #[test]
    fn snapshot_bytes_are_written_as_before_so_stored_snapshots_still_load() {
        let meta = SnapshotMeta::default();
        let data: Vec<u8> = (0..=255u8).cycle().take(1_000).collect();
        let before = impetus_proto::wire::encode(STORED_SNAPSHOT_VERSION, &AsASequence { meta: meta.clone(), data });
        let snap = StoredSnapshot::decode(&before).unwrap();
        assert_eq!(snap.data.len(), 1_000);
        assert_eq!(snap.encode(), before);
    }
}
