//! The Raft log on sled, and a one-peer start on a data directory.

use std::fmt;
use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::snapshot_store::SnapshotStore;
use crate::state_machine::{StateHandle, StateMachineStore};
use crate::{
    default_raft_config, invalid_data, start_node, Entry, ImpetusConfig, LogId, PeerNode, Raft, RaftError, TypeConfig,
    Vote, LOG_ENTRY_VERSION, LOG_META_VERSION,
};

/// Name of the sled tree holding the log, the vote and the log pointers.
pub const LOG_TREE: &str = "raft-log";
/// Name of the sled tree holding the current snapshot.
pub const SNAPSHOT_TREE: &str = "raft-snapshot";

const ENTRY_PREFIX: u8 = b'e';
const VOTE_KEY: &[u8] = b"m/vote";
const COMMITTED_KEY: &[u8] = b"m/committed";
const PURGED_KEY: &[u8] = b"m/purged";

fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = ENTRY_PREFIX;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn sled_io(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

/// The Raft log in a sled tree: entries keyed by big-endian index, plus the
/// vote, the committed and the last purged log ids, all in one tree so that a
/// purge (entries and pointer) is one atomic batch.
///
/// Invariants:
/// - `append` writes the whole batch of entries and returns at once (they
///   are readable); a flusher thread flushes and only then acknowledges
///   the batch (`callback.io_completed`): a write is acknowledged only
///   after it is on disk. One flush covers every batch queued meanwhile
///   (group commit), and acknowledgements keep the order of the appends.
/// - `save_vote` and `truncate_after` return once flushed; `purge` runs on
///   the flusher thread, so a large purge does not stall Raft.
/// - no sled error is unwrapped: each becomes an `io::Error` for openraft.
pub struct SledLogStore<C: ImpetusConfig = TypeConfig> {
    tree: sled::Tree,
    flushes: Arc<AtomicU64>,
    durable_index: Arc<AtomicU64>,
    flusher: std::sync::mpsc::Sender<Job<C>>,
    _config: PhantomData<fn() -> C>,
}

/// Work for the flusher thread. Each job carries the tree, so the thread
/// holds the database only while it has work (a closed store releases
/// sled's directory lock).
enum Job<C: ImpetusConfig> {
    /// Acknowledge an appended batch (up to `last`) once flushed.
    Append { tree: sled::Tree, last: Option<u64>, done: IOFlushed<C> },
    /// Flush and answer.
    Sync { tree: sled::Tree, done: tokio::sync::oneshot::Sender<io::Result<()>> },
    /// Remove the entries up to this log id, set the purged pointer.
    Purge { tree: sled::Tree, upto: LogId },
}

/// What the flusher answers once a flush is done (the jobs without their trees).
enum Ack<C: ImpetusConfig> {
    Append { last: Option<u64>, done: IOFlushed<C> },
    Sync(tokio::sync::oneshot::Sender<io::Result<()>>),
}

/// The flusher: take every job queued, do the purges, flush once, then
/// acknowledge in order. Ends when every store handle is dropped.
fn flusher<C: ImpetusConfig>(
    jobs: std::sync::mpsc::Receiver<Job<C>>,
    flushes: Arc<AtomicU64>,
    durable_index: Arc<AtomicU64>,
) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        let mut tree = None;
        for job in &batch {
            match job {
                Job::Purge { tree: t, upto } => {
                    if let Err(e) = purge_upto(t, *upto) {
                        tracing::error!(upto = upto.index, error = %e, "purging the raft log failed");
                    }
                    tree = Some(t.clone());
                }
                Job::Append { tree: t, .. } | Job::Sync { tree: t, .. } => tree = Some(t.clone()),
            }
        }
        let Some(tree) = tree else { continue };
        let flushed = tree.flush().map(|_| ()).map_err(sled_io);
        drop(tree);
        if flushed.is_ok() {
            flushes.fetch_add(1, Ordering::SeqCst);
        }
        let result = || match &flushed {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), format!("flushing the raft log: {e}"))),
        };
        // Let go of every tree before the first acknowledgement: a store
        // closed once its writes are acknowledged finds sled's lock free.
        let acks: Vec<Ack<C>> = batch
            .into_iter()
            .filter_map(|job| match job {
                Job::Append { last, done, .. } => Some(Ack::Append { last, done }),
                Job::Sync { done, .. } => Some(Ack::Sync(done)),
                Job::Purge { .. } => None,
            })
            .collect();
        for ack in acks {
            match ack {
                Ack::Append { last, done } => {
                    if let (Some(last), true) = (last, flushed.is_ok()) {
                        durable_index.fetch_max(last, Ordering::SeqCst);
                    }
                    done.io_completed(result());
                }
                Ack::Sync(done) => {
                    let _ = done.send(result());
                }
            }
        }
    }
}

fn purge_upto(tree: &sled::Tree, upto: LogId) -> io::Result<()> {
    let mut batch = sled::Batch::default();
    let mut removed = 0u64;
    for kv in tree.range(entry_key(0)..=entry_key(upto.index)) {
        batch.remove(kv.map_err(sled_io)?.0);
        removed += 1;
    }
    batch.insert(PURGED_KEY, impetus_proto::wire::encode(LOG_META_VERSION, &upto));
    tree.apply_batch(batch).map_err(sled_io)?;
    tracing::debug!(upto = upto.index, removed, "log purged");
    Ok(())
}

impl<C: ImpetusConfig> Clone for SledLogStore<C> {
    fn clone(&self) -> Self {
        SledLogStore {
            tree: self.tree.clone(),
            flushes: self.flushes.clone(),
            durable_index: self.durable_index.clone(),
            flusher: self.flusher.clone(),
            _config: PhantomData,
        }
    }
}

impl<C: ImpetusConfig> Debug for SledLogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledLogStore").field("entries", &self.tree.len()).field("flushes", &self.flush_count()).finish()
    }
}

impl<C: ImpetusConfig> SledLogStore<C> {
    /// Open (or create) the log tree of `db`.
    pub fn open(db: &sled::Db) -> io::Result<SledLogStore<C>> {
        let tree = db.open_tree(LOG_TREE).map_err(sled_io)?;
        let (flushes, durable_index) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (tx, rx) = std::sync::mpsc::channel();
        let (f, d) = (flushes.clone(), durable_index.clone());
        std::thread::Builder::new().name("raft-log-flush".into()).spawn(move || flusher::<C>(rx, f, d))?;
        let store = SledLogStore { tree, flushes, durable_index, flusher: tx, _config: PhantomData };
        if let Some(last) = store.last_entry()? {
            store.durable_index.store(last.log_id.index, Ordering::SeqCst);
        }
        Ok(store)
    }

    /// Flushes of the log so far (each covers a whole appended batch).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Index of the last appended entry known to be flushed to disk.
    pub fn durable_index(&self) -> u64 {
        self.durable_index.load(Ordering::SeqCst)
    }

    /// `(first index, last index)` of the entries on disk, if any.
    pub fn index_range(&self) -> io::Result<Option<(u64, u64)>> {
        let mut it = self.tree.range(entry_key(0)..=entry_key(u64::MAX));
        let first = match it.next() {
            Some(kv) => decode_entry(&kv.map_err(sled_io)?.1)?.log_id.index,
            None => return Ok(None),
        };
        let last = self.last_entry()?.map_or(first, |e| e.log_id.index);
        Ok(Some((first, last)))
    }

    /// The last purged log id.
    pub fn purged(&self) -> io::Result<Option<LogId>> {
        self.get_meta(PURGED_KEY)
    }

    fn last_entry(&self) -> io::Result<Option<Entry>> {
        match self.tree.range(entry_key(0)..=entry_key(u64::MAX)).next_back() {
            Some(kv) => Ok(Some(decode_entry(&kv.map_err(sled_io)?.1)?)),
            None => Ok(None),
        }
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &'static [u8]) -> io::Result<Option<T>> {
        match self.tree.get(key).map_err(sled_io)? {
            Some(v) => impetus_proto::wire::decode("raft log meta", LOG_META_VERSION, &v, usize::MAX)
                .map(Some)
                .map_err(|e| invalid_data("raft log meta", e)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &'static [u8], value: &T) -> io::Result<()> {
        self.tree.insert(key, impetus_proto::wire::encode(LOG_META_VERSION, value)).map_err(sled_io)?;
        Ok(())
    }

    /// Flush everything written so far (on the flusher thread, after the
    /// appends queued before) and wait for it.
    async fn flush(&self) -> io::Result<()> {
        let (done, flushed) = tokio::sync::oneshot::channel();
        self.send(Job::Sync { tree: self.tree.clone(), done })?;
        flushed.await.map_err(|_| flusher_gone())?
    }

    fn send(&self, job: Job<C>) -> io::Result<()> {
        self.flusher.send(job).map_err(|_| flusher_gone())
    }
}

fn flusher_gone() -> io::Error {
    io::Error::other("the raft log's flusher thread has stopped")
}

fn decode_entry(bytes: &[u8]) -> io::Result<Entry> {
    impetus_proto::wire::decode("raft log entry", LOG_ENTRY_VERSION, bytes, usize::MAX)
        .map_err(|e| invalid_data("raft log entry", e))
}

impl<C: ImpetusConfig> RaftLogReader<C> for SledLogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => match s.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Bound::Included(entry_key(e)),
            Bound::Excluded(&e) => Bound::Excluded(entry_key(e)),
            Bound::Unbounded => Bound::Included(entry_key(u64::MAX)),
        };
        let mut out = Vec::new();
        for kv in self.tree.range((Bound::Included(entry_key(start)), end)) {
            out.push(decode_entry(&kv.map_err(sled_io)?.1)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(VOTE_KEY)
    }
}

impl<C: ImpetusConfig> RaftLogStorage<C> for SledLogStore<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.get_meta(PURGED_KEY)?;
        let last_log_id = self.last_entry()?.map(|e| e.log_id).or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(VOTE_KEY, vote)?;
        self.flush().await
    }

    /// Not flushed by itself: a committed pointer that lags after a crash is
    /// learned again from the leader.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        match committed {
            Some(c) => self.put_meta(COMMITTED_KEY, &c),
            None => self.tree.remove(COMMITTED_KEY).map(|_| ()).map_err(sled_io),
        }
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.get_meta(COMMITTED_KEY)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        let mut count = 0u64;
        let mut last = None;
        for entry in entries {
            let index = entry.log_id.index;
            batch.insert(&entry_key(index)[..], impetus_proto::wire::encode(LOG_ENTRY_VERSION, &entry));
            count += 1;
            last = Some(index);
        }
        self.tree.apply_batch(batch).map_err(sled_io)?;
        tracing::trace!(count, last_index = ?last, "log batch written; flush queued");
        self.send(Job::Append { tree: self.tree.clone(), last, done: callback })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = match last_log_id {
            Some(l) => match l.index.checked_add(1) {
                Some(i) => i,
                None => return Ok(()),
            },
            None => 0,
        };
        let mut batch = sled::Batch::default();
        let mut removed = 0u64;
        for kv in self.tree.range(entry_key(from)..=entry_key(u64::MAX)) {
            batch.remove(kv.map_err(sled_io)?.0);
            removed += 1;
        }
        self.tree.apply_batch(batch).map_err(sled_io)?;
        self.flush().await?;
        self.durable_index.fetch_min(from.saturating_sub(1), Ordering::SeqCst);
        tracing::debug!(from, removed, "log truncated");
        Ok(())
    }

    /// On the flusher thread: entries and the purged pointer change in one
    /// atomic batch, flushed with the flush that follows (a purge lost in a
    /// crash leaves no hole). Until then the entries are still readable.
    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.send(Job::Purge { tree: self.tree.clone(), upto: log_id })
    }
}

/// How long [`open_sled`] waits for another handle in this process to release the directory.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Open the sled database in `data_dir` and the log and state-machine
/// stores on it. The state machine is restored from the stored snapshot.
///
/// sled locks the directory while any handle to the database lives; a
/// Raft node that was just shut down in this process releases its handles a
/// moment later, so a lock conflict is retried for up to [`LOCK_WAIT`].
pub async fn open_sled<C: ImpetusConfig>(
    data_dir: &Path,
) -> Result<(SledLogStore<C>, StateMachineStore<C>), RaftError> {
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
    let log = SledLogStore::open(&db)?;
    let snapshots = db.open_tree(SNAPSHOT_TREE).map_err(sled_err)?;
    let sm = StateMachineStore::open(SnapshotStore::Sled(snapshots))?;
    Ok((log, sm))
}

/// Start one peer on `data_dir` with [`default_raft_config`]; see
/// [`start_single_with`].
pub async fn start_single(data_dir: &Path, node_id: u64, addr: String) -> Result<(Raft, StateHandle), RaftError> {
    start_single_with(data_dir, node_id, addr, default_raft_config()).await
}

/// Start one peer on `data_dir`: open sled, restore the state machine, start
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
    let (log, sm) = open_sled::<TypeConfig>(data_dir).await?;
    // A single voter sends no RPC; the in-process router with no other node
    // is a complete network for it.
    let network = crate::testing::Router::new();
    start_node(node_id, config, network, log, sm, Some(PeerNode { addr })).await
}
