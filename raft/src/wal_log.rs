//! The Raft log in append-only segment files (a write-ahead log).
//!
//! Layout: a directory of segments named `{seq:016x}.wal`, `seq` counting up.
//! A segment is a sequence of records, each `[len: u32 LE][crc32: u32 LE]`
//! then `len` payload bytes (a versioned [`Record`]). Nothing is ever
//! rewritten in place: an append, a truncation, a purge, a vote and a commit
//! pointer are each a record at the end of the newest segment, and the log's
//! state is the replay of every record in order ([`Index::apply`] is the one
//! function both the live store and the replay use).
//!
//! Invariants:
//! - every segment begins with a [`Record::Meta`] carrying the vote, commit
//!   pointer and purge pointer at its creation, so an older segment can be
//!   deleted without losing them;
//! - segments are deleted oldest first, and one only once every entry ever
//!   written to it is purged and the record of that purge is on disk: the
//!   segments left are always the newest ones, so a truncation recorded in a
//!   deleted segment only ever touched entries that are gone too;
//! - a segment is synced before the next one is created, and on open every
//!   segment is synced before anything is built on it, so only the newest
//!   segment can end in a torn record (a write cut by a crash, never
//!   acknowledged): on open it is cut off there. Damage anywhere else — or
//!   in the newest segment with a valid record right after it, or a record
//!   whose checksum holds but does not decode — is an error that names the
//!   segment and the offset;
//! - after a failed write or sync the store refuses every later write
//!   (openraft stops on the first storage error anyway);
//! - an append is acknowledged only after `fdatasync` covered it; one sync
//!   covers every append queued meanwhile (group commit), on the flusher
//!   thread, and acknowledgements keep the order of the appends.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use serde::{Deserialize, Serialize};

use crate::{invalid_data, log_range, Entry, ImpetusConfig, LogId, TypeConfig, Vote};

/// Version byte of a WAL record's payload, and of the meaning of the
/// commands its entries hold: a change to how the state machine applies a
/// command bumps it, since a replica that replays an old entry with the new
/// rules would part from one whose snapshot applied it with the old. 2: a
/// lease takes the streams where the peer holds the fewest leases first,
/// then the one that granted least recently, and stops at
/// `LEASE_GRANT_BYTES`; 3: time forgets finished jobs past their stream's
/// `retain_ms`.
pub const WAL_RECORD_VERSION: u8 = 3;
/// A segment is closed and a new one begun once it passes this size.
pub const SEGMENT_BYTES: u64 = 32 << 20;
/// A sync of the log at least this long is logged as a warning: a commit
/// waits for it, so it explains a slow write (the disk, not Impetus).
pub const SLOW_SYNC: std::time::Duration = std::time::Duration::from_millis(100);
/// Bytes before each record's payload: its length and its CRC-32.
const HEADER: usize = 8;
const SUFFIX: &str = ".wal";

/// One record of the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// The state at the start of a segment.
    Meta {
        vote: Option<Vote>,
        committed: Option<LogId>,
        purged: Option<LogId>,
    },
    Entry(Entry),
    /// Remove every entry at or after `from`.
    Truncate {
        from: u64,
    },
    /// Remove every entry up to and including this log id.
    Purge(LogId),
    Vote(Vote),
    Committed(Option<LogId>),
}

/// Where an entry's record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    seg: u64,
    /// Offset of the record's header in its segment.
    pos: u64,
    /// Payload length.
    len: u32,
    log_id: LogId,
}

impl Loc {
    fn end(&self) -> u64 {
        self.pos + HEADER as u64 + u64::from(self.len)
    }
}

/// The log's state: what replaying the records gives.
#[derive(Debug, Default)]
struct Index {
    entries: BTreeMap<u64, Loc>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

impl Index {
    /// Apply one record found at `loc` (its log id is filled in for entries).
    fn apply(&mut self, record: &Record, seg: u64, pos: u64, len: u32) {
        match record {
            Record::Meta { vote, committed, purged } => {
                self.vote = *vote;
                self.committed = *committed;
                if let Some(p) = purged {
                    self.purge(*p);
                }
            }
            Record::Entry(e) => {
                let index = e.log_id.index;
                // A re-appended index replaces it and everything after it
                // (openraft truncates first; this keeps the index exact anyway).
                self.entries.split_off(&index);
                self.entries.insert(index, Loc { seg, pos, len, log_id: e.log_id });
            }
            Record::Truncate { from } => {
                self.entries.split_off(from);
            }
            Record::Purge(upto) => self.purge(*upto),
            Record::Vote(v) => self.vote = Some(*v),
            Record::Committed(c) => self.committed = *c,
        }
    }

    fn purge(&mut self, upto: LogId) {
        if self.purged.is_some_and(|p| p.index >= upto.index) {
            return;
        }
        self.purged = Some(upto);
        self.entries = self.entries.split_off(&upto.index.saturating_add(1));
    }

    fn meta(&self) -> Record {
        Record::Meta { vote: self.vote, committed: self.committed, purged: self.purged }
    }

    /// The entries follow each other without a gap, right after the purge pointer.
    fn check(&self) -> Result<(), String> {
        let mut expect = self.purged.map(|p| p.index.saturating_add(1));
        for (&index, loc) in &self.entries {
            if index != loc.log_id.index {
                return Err(format!("entry {} is filed under index {index}", loc.log_id.index));
            }
            if let Some(e) = expect {
                if index != e {
                    return Err(format!("entry {e} is missing (the next one is {index})"));
                }
            }
            expect = index.checked_add(1);
        }
        Ok(())
    }
}

/// An open segment file and its path (readers and the flusher hold it).
#[derive(Debug)]
struct SegmentFile {
    file: File,
    path: PathBuf,
}

/// One segment.
#[derive(Debug)]
struct Segment {
    file: Arc<SegmentFile>,
    /// Bytes written (the offset of the next record).
    len: u64,
    /// The highest entry index ever written to it (0: none).
    max_index: u64,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    segment_bytes: u64,
    /// Set by the first failed write or sync; every later write fails.
    failed: Arc<std::sync::OnceLock<String>>,
    index: Index,
    segments: BTreeMap<u64, Segment>,
}

/// The Raft log in segment files; see the module doc for the format and
/// the invariants. Clones share the log (openraft reads through a clone
/// while it appends).
pub struct WalLogStore<C: ImpetusConfig = TypeConfig> {
    inner: Arc<Mutex<Inner>>,
    flushes: Arc<AtomicU64>,
    durable_index: Arc<AtomicU64>,
    flusher: std::sync::mpsc::Sender<Job<C>>,
    _config: PhantomData<fn() -> C>,
}

impl<C: ImpetusConfig> Clone for WalLogStore<C> {
    fn clone(&self) -> Self {
        WalLogStore {
            inner: self.inner.clone(),
            flushes: self.flushes.clone(),
            durable_index: self.durable_index.clone(),
            flusher: self.flusher.clone(),
            _config: PhantomData,
        }
    }
}

impl<C: ImpetusConfig> Debug for WalLogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("WalLogStore")
            .field("dir", &g.dir)
            .field("entries", &g.index.entries.len())
            .field("segments", &g.segments.len())
            .field("flushes", &self.flush_count())
            .finish()
    }
}

/// Work for the flusher thread.
enum Job<C: ImpetusConfig> {
    /// Acknowledge an appended batch (up to `last`) once synced.
    Append { file: Arc<SegmentFile>, last: Option<u64>, done: IOFlushed<C> },
    /// Sync and answer.
    Sync { file: Arc<SegmentFile>, done: tokio::sync::oneshot::Sender<io::Result<()>> },
    /// Sync (the purge record is in `file`), then delete these segments
    /// (oldest first) and sync the directory.
    Purge { file: Arc<SegmentFile>, dir: PathBuf, delete: Vec<PathBuf> },
}

impl<C: ImpetusConfig> Job<C> {
    fn file(&self) -> &Arc<SegmentFile> {
        match self {
            Job::Append { file, .. } | Job::Sync { file, .. } | Job::Purge { file, .. } => file,
        }
    }
}

/// The flusher: take every job queued, sync each file they wrote to once,
/// delete the purged segments, then acknowledge in order. Ends when every
/// store handle is dropped.
fn flusher<C: ImpetusConfig>(
    jobs: std::sync::mpsc::Receiver<Job<C>>,
    flushes: Arc<AtomicU64>,
    durable_index: Arc<AtomicU64>,
    failed: Arc<std::sync::OnceLock<String>>,
) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        let mut files: Vec<&Arc<SegmentFile>> = Vec::new();
        for job in &batch {
            if !files.iter().any(|f| Arc::ptr_eq(f, job.file())) {
                files.push(job.file());
            }
        }
        let started = std::time::Instant::now();
        let synced: io::Result<()> = match failed.get() {
            // Never acknowledge anything after a failed write or sync.
            Some(why) => Err(io::Error::other(format!("an earlier write failed: {why}"))),
            None => files.iter().try_for_each(|f| f.file.sync_data().map_err(|e| with_path(&f.path, e))),
        };
        if let Err(e) = &synced {
            let _ = failed.set(e.to_string());
        }
        let took = started.elapsed();
        if took >= SLOW_SYNC {
            tracing::warn!(
                took_ms = took.as_millis() as u64,
                appends = batch.len(),
                "the raft log's disk sync was slow: every write of this peer waited for it"
            );
        }
        // `last_index`: the last entry this sync covers (an append queued
        // while it ran waits for the next one); computed only when traced.
        tracing::trace!(
            target: "impetus_latency",
            jobs = batch.len(),
            last_index = ?batch.iter().filter_map(|j| if let Job::Append { last, .. } = j { *last } else { None }).max(),
            ok = synced.is_ok(),
            "raft log synced"
        );
        if synced.is_ok() {
            flushes.fetch_add(1, Ordering::SeqCst);
        }
        let result = || match &synced {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), format!("syncing the raft log: {e}"))),
        };
        for job in batch {
            match job {
                Job::Append { last, done, .. } => {
                    if let (Some(last), true) = (last, synced.is_ok()) {
                        durable_index.fetch_max(last, Ordering::SeqCst);
                    }
                    done.io_completed(result());
                }
                Job::Sync { done, .. } => {
                    let _ = done.send(result());
                }
                // Delete only what a synced purge record covers, oldest
                // first, stopping at the first failure: the segments left
                // stay the newest ones.
                Job::Purge { dir, delete, .. } if synced.is_ok() => {
                    for path in &delete {
                        if let Err(e) = std::fs::remove_file(path) {
                            tracing::warn!(segment = %path.display(), error = %e, "could not delete a purged raft log segment");
                            break;
                        }
                        tracing::debug!(segment = %path.display(), "purged raft log segment deleted");
                    }
                    if let Err(e) = sync_dir(&dir) {
                        tracing::warn!(dir = %dir.display(), error = %e, "could not sync the raft log directory");
                    }
                }
                Job::Purge { .. } => {}
            }
        }
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}{SUFFIX}"))
}

fn frame(record: &Record, out: &mut Vec<u8>) -> u32 {
    let payload = impetus_proto::wire::encode(WAL_RECORD_VERSION, record);
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    assert_eq!(len as usize, payload.len(), "a raft log record over 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    len
}

fn decode_record(payload: &[u8]) -> Result<Record, String> {
    impetus_proto::wire::decode("raft log record", WAL_RECORD_VERSION, payload, usize::MAX).map_err(|e| e.to_string())
}

/// Why a record could not be read.
#[derive(Debug)]
enum BadRecord {
    /// The bytes end inside it, or its checksum fails: what a write cut by
    /// a crash leaves. `next` is where the record after it would begin, if
    /// its length field is plausible.
    Torn { why: String, next: Option<usize> },
    /// Its checksum holds but it does not decode: never a torn write.
    Undecodable(String),
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadRecord::Torn { why, .. } => f.write_str(why),
            BadRecord::Undecodable(why) => write!(f, "a record whose checksum holds does not decode: {why}"),
        }
    }
}

/// Parse the record at `pos` of `buf`: `Ok(None)` at a clean end.
fn parse_at(buf: &[u8], pos: usize) -> Result<Option<(Record, u32)>, BadRecord> {
    let Some(payload) = payload_at(buf, pos)? else { return Ok(None) };
    let len = payload.len() as u32;
    decode_record(payload).map(|r| Some((r, len))).map_err(BadRecord::Undecodable)
}

/// The payload of the record at `pos` of `buf`, its length and checksum
/// checked but not decoded: `Ok(None)` at a clean end.
fn payload_at(buf: &[u8], pos: usize) -> Result<Option<&[u8]>, BadRecord> {
    let rest = buf.get(pos..).unwrap_or_default();
    if rest.is_empty() {
        return Ok(None);
    }
    if rest.len() < HEADER {
        return Err(BadRecord::Torn {
            why: format!("{} bytes left, less than a record header", rest.len()),
            next: None,
        });
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len == 0 {
        // No record is empty (a payload starts with its version byte), and
        // an empty one's checksum is 0: zeroed bytes. At the end, a file a
        // crash left longer than the data written to it; before more
        // data, damage.
        if rest.iter().all(|b| *b == 0) {
            return Err(BadRecord::Torn { why: format!("{} zeroed bytes at the end", rest.len()), next: None });
        }
        return Err(BadRecord::Undecodable("an empty record (zeroed bytes) before more data".into()));
    }
    let end = HEADER + len as usize;
    let Some(payload) = rest.get(HEADER..end) else {
        return Err(BadRecord::Torn { why: format!("a record of {len} bytes runs past the end"), next: None });
    };
    if crc32fast::hash(payload) != crc {
        let why = format!("the checksum of a {len}-byte record does not match");
        return Err(BadRecord::Torn { why, next: Some(pos + end) });
    }
    Ok(Some(payload))
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl<C: ImpetusConfig> WalLogStore<C> {
    /// Open (or create) the log in `dir`: replay every segment, cut a torn
    /// record off the newest one, and begin a new segment.
    pub fn open(dir: &Path) -> io::Result<WalLogStore<C>> {
        WalLogStore::open_with(dir, SEGMENT_BYTES)
    }

    /// [`WalLogStore::open`], beginning a new segment once one passes
    /// `segment_bytes` (tests use small segments).
    pub fn open_with(dir: &Path, segment_bytes: u64) -> io::Result<WalLogStore<C>> {
        if !dir.is_dir() {
            // A new log: its directory entry must survive a crash too.
            std::fs::create_dir_all(dir).map_err(|e| with_path(dir, e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(|e| with_path(parent, e))?;
            }
        }
        let mut seqs = Vec::new();
        for item in std::fs::read_dir(dir).map_err(|e| with_path(dir, e))? {
            let name = item.map_err(|e| with_path(dir, e))?.file_name();
            if let Some(seq) = name.to_str().and_then(segment_seq) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let mut index = Index::default();
        let mut segments = BTreeMap::new();
        for (i, &seq) in seqs.iter().enumerate() {
            let newest = i + 1 == seqs.len();
            let seg = replay_segment(dir, seq, newest, &mut index)?;
            segments.insert(seq, seg);
        }
        index.check().map_err(|e| invalid_data(&format!("raft log in {}", dir.display()), e))?;
        let failed = Arc::new(std::sync::OnceLock::new());
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(1),
            failed: failed.clone(),
            index,
            segments,
        };
        let next = match seqs.last() {
            Some(s) => s.checked_add(1).ok_or_else(|| invalid_data("raft log", "segment numbers exhausted"))?,
            None => 0,
        };
        inner.begin_segment(next)?;

        let (flushes, durable_index) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        if let Some(last) = inner.index.entries.keys().next_back() {
            durable_index.store(*last, Ordering::SeqCst);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (f, d) = (flushes.clone(), durable_index.clone());
        std::thread::Builder::new().name("raft-log-flush".into()).spawn(move || flusher::<C>(rx, f, d, failed))?;
        tracing::debug!(dir = %dir.display(), segments = inner.segments.len(), entries = inner.index.entries.len(), "raft log opened");
        Ok(WalLogStore {
            inner: Arc::new(Mutex::new(inner)),
            flushes,
            durable_index,
            flusher: tx,
            _config: PhantomData,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Syncs of the log so far (each covers every append queued before it).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Index of the last appended entry known to be on disk.
    pub fn durable_index(&self) -> u64 {
        self.durable_index.load(Ordering::SeqCst)
    }

    /// `(first index, last index)` of the entries in the log, if any.
    pub fn index_range(&self) -> Option<(u64, u64)> {
        let g = self.lock();
        let first = *g.index.entries.keys().next()?;
        let last = *g.index.entries.keys().next_back()?;
        Some((first, last))
    }

    /// The last purged log id.
    pub fn purged(&self) -> Option<LogId> {
        self.lock().index.purged
    }

    /// The vote saved, if any (a member that voted holds state even
    /// before its first entry).
    pub fn vote(&self) -> Option<Vote> {
        self.lock().index.vote
    }

    /// The segment files on disk, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.lock().segments.values().map(|s| s.file.path.clone()).collect()
    }

    /// Sync everything written so far (on the flusher thread, after the
    /// appends queued before) and wait for it.
    async fn sync(&self, file: Arc<SegmentFile>) -> io::Result<()> {
        let (done, synced) = tokio::sync::oneshot::channel();
        self.send(Job::Sync { file, done })?;
        synced.await.map_err(|_| flusher_gone())?
    }

    fn send(&self, job: Job<C>) -> io::Result<()> {
        self.flusher.send(job).map_err(|_| flusher_gone())
    }

    /// Write one record (not synced); return the file to sync.
    fn write_one(&self, record: Record) -> io::Result<Arc<SegmentFile>> {
        let mut g = self.lock();
        g.write(std::slice::from_ref(&record))?;
        Ok(g.current().file.clone())
    }
}

/// Replay one segment into `index` and sync it (a record read back from
/// the page cache must be on disk before anything is built on it). A torn
/// record at the end of the newest segment is cut off; any other damage is
/// an error.
fn replay_segment(dir: &Path, seq: u64, newest: bool, index: &mut Index) -> io::Result<Segment> {
    let path = segment_path(dir, seq);
    let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| with_path(&path, e))?;
    let mut buf = Vec::new();
    io::Read::read_to_end(&mut &file, &mut buf).map_err(|e| with_path(&path, e))?;
    let damaged = |pos: usize, why: &dyn fmt::Display| {
        invalid_data(&format!("raft log segment {} is damaged at byte {pos}", path.display()), why)
    };
    if let Some(found) = written_by(&buf) {
        if found != WAL_RECORD_VERSION {
            return Err(invalid_data(
                &format!("raft log segment {}", path.display()),
                format!(
                    "written by another version of impetus (log version {found}; this build reads \
                     {WAL_RECORD_VERSION}), whose commands may apply differently here: every peer of a \
                     cluster runs one build; run the version that wrote it, or start this peer on a fresh \
                     --data-dir"
                ),
            ));
        }
    }
    let mut pos = 0usize;
    let mut max_index = 0;
    loop {
        match parse_at(&buf, pos) {
            Ok(None) => break,
            Ok(Some((record, len))) => {
                if let Record::Entry(e) = &record {
                    max_index = max_index.max(e.log_id.index);
                }
                index.apply(&record, seq, pos as u64, len);
                pos += HEADER + len as usize;
            }
            Err(BadRecord::Torn { why, next }) if newest => {
                // A valid record right after it: not a cut write but damage
                // inside acknowledged data; refuse rather than drop it.
                if next.is_some_and(|n| matches!(parse_at(&buf, n), Ok(Some(_)))) {
                    return Err(damaged(pos, &format_args!("{why}, and a valid record follows it")));
                }
                tracing::warn!(segment = %path.display(), offset = pos, dropped_bytes = buf.len() - pos, reason = %why,
                    "the raft log ends in a torn record (a write cut by a crash, never acknowledged); cutting it off");
                file.set_len(pos as u64).map_err(|e| with_path(&path, e))?;
                break;
            }
            Err(bad) => return Err(damaged(pos, &bad)),
        }
    }
    file.sync_all().map_err(|e| with_path(&path, e))?;
    Ok(Segment { file: Arc::new(SegmentFile { file, path }), len: pos as u64, max_index })
}

/// The version that wrote a segment: its first record's, if that record
/// is whole (its checksum holds; a torn one is for the replay to judge).
fn written_by(buf: &[u8]) -> Option<u8> {
    payload_at(buf, 0).ok().flatten()?.first().copied()
}

/// The sequence number of a segment file name: exactly 16 lowercase hex
/// digits and the suffix (what [`segment_path`] writes).
fn segment_seq(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(SUFFIX)?;
    let ok = hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

impl Inner {
    fn current(&self) -> &Segment {
        match self.segments.values().next_back() {
            Some(s) => s,
            None => unreachable!("the raft log always has a current segment once open"),
        }
    }

    /// Create segment `seq` beginning with the current meta record, synced
    /// with its directory entry.
    fn begin_segment(&mut self, seq: u64) -> io::Result<()> {
        let path = segment_path(&self.dir, seq);
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(|e| with_path(&path, e))?;
        let mut buf = Vec::new();
        frame(&self.index.meta(), &mut buf);
        file.write_all_at(&buf, 0).map_err(|e| with_path(&path, e))?;
        file.sync_data().map_err(|e| with_path(&path, e))?;
        sync_dir(&self.dir).map_err(|e| with_path(&self.dir, e))?;
        let file = Arc::new(SegmentFile { file, path });
        self.segments.insert(seq, Segment { file, len: buf.len() as u64, max_index: 0 });
        Ok(())
    }

    /// Append `records` to the current segment (one write) and apply them;
    /// first begin a new segment if the current one is full (syncing it:
    /// rare, once per [`SEGMENT_BYTES`], and under the lock, so the log
    /// stays in order; [`crate::off_the_runtime`]). A failure fails every later
    /// write.
    fn write(&mut self, records: &[Record]) -> io::Result<()> {
        if let Some(why) = self.failed.get() {
            return Err(io::Error::other(format!("the raft log refuses writes after an earlier failure: {why}")));
        }
        let written = self.try_write(records);
        if let Err(e) = &written {
            let _ = self.failed.set(e.to_string());
        }
        written
    }

    fn try_write(&mut self, records: &[Record]) -> io::Result<()> {
        let (seq, full) = match self.segments.iter().next_back() {
            Some((seq, s)) => (*seq, s.len >= self.segment_bytes),
            None => unreachable!("the raft log always has a current segment once open"),
        };
        let seq = if full {
            let next = seq.checked_add(1).ok_or_else(|| io::Error::other("raft log segment numbers exhausted"))?;
            crate::off_the_runtime(|| {
                let cur = self.current().file.clone();
                cur.file.sync_data().map_err(|e| with_path(&cur.path, e))?;
                self.begin_segment(next)
            })?;
            next
        } else {
            seq
        };
        let mut buf = Vec::new();
        let mut framed = Vec::with_capacity(records.len());
        for r in records {
            let pos = buf.len() as u64;
            framed.push((pos, frame(r, &mut buf)));
        }
        let seg = match self.segments.get_mut(&seq) {
            Some(s) => s,
            None => unreachable!("segment {seq} was just looked up"),
        };
        let base = seg.len;
        if let Err(e) = seg.file.file.write_all_at(&buf, base) {
            // Best effort: leave no partial record behind the logical end.
            let _ = seg.file.file.set_len(base);
            return Err(with_path(&seg.file.path, e));
        }
        seg.len += buf.len() as u64;
        for (r, (pos, len)) in records.iter().zip(framed) {
            if let Record::Entry(e) = r {
                seg.max_index = seg.max_index.max(e.log_id.index);
            }
            self.index.apply(r, seq, base + pos, len);
        }
        Ok(())
    }

    /// The oldest segments every entry of which is purged, up to the first
    /// one that is not (never the current one): forgotten here, deleted by
    /// the flusher once the purge record is synced.
    fn purgeable(&mut self) -> Vec<PathBuf> {
        let Some(purged) = self.index.purged else { return Vec::new() };
        let current = self.segments.keys().next_back().copied();
        let gone: Vec<u64> = self
            .segments
            .iter()
            .take_while(|(seq, s)| Some(**seq) != current && s.max_index <= purged.index)
            .map(|(seq, _)| *seq)
            .collect();
        gone.iter().filter_map(|seq| self.segments.remove(seq)).map(|s| s.file.path.clone()).collect()
    }
}

fn flusher_gone() -> io::Error {
    io::Error::other("the raft log's flusher thread has stopped")
}

/// Read the entries at `locs` (ascending): each run of records that follow
/// each other in one segment is one read.
fn read_entries(locs: &[(Arc<SegmentFile>, Loc)]) -> io::Result<Vec<Entry>> {
    let mut out = Vec::with_capacity(locs.len());
    let mut i = 0;
    while i < locs.len() {
        let (file, first) = &locs[i];
        let mut j = i + 1;
        while j < locs.len() && locs[j].1.seg == first.seg && locs[j].1.pos == locs[j - 1].1.end() {
            j += 1;
        }
        let end = locs[j - 1].1.end();
        let mut buf = vec![0u8; (end - first.pos) as usize];
        file.file.read_exact_at(&mut buf, first.pos).map_err(|e| with_path(&file.path, e))?;
        let mut pos = 0;
        for (_, loc) in &locs[i..j] {
            match parse_at(&buf, pos) {
                Ok(Some((Record::Entry(e), len))) if e.log_id == loc.log_id => {
                    out.push(e);
                    pos += HEADER + len as usize;
                }
                other => {
                    let why = match other {
                        Err(bad) => bad.to_string(),
                        Ok(r) => format!("expected entry {}, found {r:?}", loc.log_id.index),
                    };
                    let at = format!("raft log segment {} at byte {}", file.path.display(), loc.pos);
                    return Err(invalid_data(&at, why));
                }
            }
        }
        i = j;
    }
    Ok(out)
}

impl<C: ImpetusConfig> RaftLogReader<C> for WalLogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let Some(range) = log_range(&range) else { return Ok(Vec::new()) };
        let locs: Vec<(Arc<SegmentFile>, Loc)> = {
            let g = self.lock();
            let mut locs = Vec::new();
            for loc in g.index.entries.range(range).map(|(_, loc)| *loc) {
                match g.segments.get(&loc.seg) {
                    Some(s) => locs.push((s.file.clone(), loc)),
                    None => {
                        let why = format!("entry {} is in segment {:016x}, which is gone", loc.log_id.index, loc.seg);
                        return Err(invalid_data(&format!("raft log in {}", g.dir.display()), why));
                    }
                }
            }
            locs
        };
        read_entries(&locs)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.lock().index.vote)
    }
}

impl<C: ImpetusConfig> RaftLogStorage<C> for WalLogStore<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let g = self.lock();
        let last_purged_log_id = g.index.purged;
        let last_log_id = g.index.entries.values().next_back().map(|l| l.log_id).or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let file = self.write_one(Record::Vote(*vote))?;
        self.sync(file).await
    }

    /// Not synced by itself: a commit pointer that lags after a crash is
    /// learned again from the leader.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.write_one(Record::Committed(committed)).map(|_| ())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.lock().index.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let records: Vec<Record> = entries.into_iter().map(Record::Entry).collect();
        let last = match records.last() {
            Some(Record::Entry(e)) => Some(e.log_id.index),
            _ => None,
        };
        let file = {
            let mut g = self.lock();
            g.write(&records)?;
            g.current().file.clone()
        };
        tracing::trace!(target: "impetus_latency", count = records.len(), last_index = ?last, "log batch written; sync queued");
        self.send(Job::Append { file, last, done: callback })
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = match last_log_id {
            Some(l) => match l.index.checked_add(1) {
                Some(i) => i,
                None => return Ok(()),
            },
            None => 0,
        };
        let file = self.write_one(Record::Truncate { from })?;
        self.sync(file).await?;
        self.durable_index.fetch_min(from.saturating_sub(1), Ordering::SeqCst);
        tracing::debug!(from, "log truncated");
        Ok(())
    }

    /// The entries go at once; the segments they filled are deleted on the
    /// flusher thread once the purge record is synced.
    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let (file, dir, delete) = {
            let mut g = self.lock();
            g.write(&[Record::Purge(log_id)])?;
            (g.current().file.clone(), g.dir.clone(), g.purgeable())
        };
        tracing::debug!(upto = log_id.index, segments = delete.len(), "log purged");
        self.send(Job::Purge { file, dir, delete })
    }
}
