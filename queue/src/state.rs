//! The data of the state machine and the indexes kept beside it.
//!
//! Primary data (streams, jobs, modules, peers, counters) is what a snapshot
//! holds; indexes (`Index`) are rebuilt from it on restore. Everything is
//! ordered by key (`BTreeMap`/`BTreeSet`, `imbl::OrdMap`, the job table by
//! id), so iteration order — and with it every outcome and every snapshot
//! byte — depends only on the commands applied.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use imbl::OrdMap;
use impetus_proto::{
    ErrorRecord, FencingToken, IdempotencyKey, JobId, JobStatus, Lease, ModuleHash, PeerId, PeerInfo, PeerRole,
    StreamName, StreamProps, StreamStats, Timestamp,
};
use serde::{Deserialize, Serialize};

/// Internal, dense id of a stream (names can be deleted and reused; ids never are).
pub(crate) type StreamIdx = u32;

/// Key of the ready queue: highest priority first, then earliest ready time,
/// then submission order.
pub(crate) type ReadyKey = (Reverse<i32>, Timestamp, JobId);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Stream {
    pub name: StreamName,
    pub props: StreamProps,
    pub created_at: Timestamp,
    /// Counts per status and totals; kept in step with `jobs` (see invariants).
    pub stats: StreamStats,
    /// Persistent maps (as the job table is copy on write): a snapshot's
    /// copy shares them, O(1) (`Stream::durable_copy`).
    #[serde(deserialize_with = "ordered_map")]
    pub keys: OrdMap<IdempotencyKey, JobId>,
    #[serde(deserialize_with = "ordered_map")]
    pub data: OrdMap<Vec<u8>, Vec<u8>>,
    /// Spawn-frequency window: the second (now / 1000) and leases granted in it.
    pub window_sec: u64,
    pub window_leases: u32,
    /// The fencing token (log index) of this stream's latest grant, 0 if
    /// none: between streams a peer holds as many leases of, the one that
    /// granted least recently goes first.
    pub last_lease: u64,
    #[serde(skip)]
    pub ready: BTreeSet<ReadyKey>,
    /// Queued and Delayed jobs, by id (the oldest pending job is the first).
    #[serde(skip)]
    pub pending: BTreeSet<JobId>,
    /// Live leases per peer.
    #[serde(skip)]
    pub leased_by_peer: BTreeMap<PeerId, u32>,
}

/// Decode an `OrdMap` as a `BTreeMap` is: entry by entry. imbl's own
/// decoder reserves room for the length the bytes claim, and a crafted
/// snapshot claiming 2^40 entries would abort the process.
fn ordered_map<'de, D, K, V>(deserializer: D) -> Result<OrdMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: Deserialize<'de> + Ord + Clone,
    V: Deserialize<'de> + Clone,
{
    Ok(BTreeMap::<K, V>::deserialize(deserializer)?.into_iter().collect())
}

impl Stream {
    pub fn new(name: StreamName, props: StreamProps, now: Timestamp) -> Stream {
        Stream {
            name,
            props,
            created_at: now,
            stats: StreamStats::default(),
            keys: OrdMap::new(),
            data: OrdMap::new(),
            window_sec: 0,
            window_leases: 0,
            last_lease: 0,
            ready: BTreeSet::new(),
            pending: BTreeSet::new(),
            leased_by_peer: BTreeMap::new(),
        }
    }

    /// What a snapshot holds of this stream (its indexes left empty), in
    /// O(1): the maps are persistent.
    fn durable_copy(&self) -> Stream {
        // Every field named, none defaulted: a new one must be decided here.
        Stream {
            name: self.name.clone(),
            props: self.props.clone(),
            created_at: self.created_at,
            stats: self.stats.clone(),
            keys: self.keys.clone(),
            data: self.data.clone(),
            window_sec: self.window_sec,
            window_leases: self.window_leases,
            last_lease: self.last_lease,
            ready: BTreeSet::new(),
            pending: BTreeSet::new(),
            leased_by_peer: BTreeMap::new(),
        }
    }

    /// Whether this stream leases to `peer` at all (not paused, `peer` not
    /// ignored, and pinned to if the stream pins).
    pub fn leases_to(&self, peer: PeerId) -> bool {
        let p = &self.props;
        !p.paused && !p.ignore.contains(&peer) && (p.pin.is_empty() || p.pin.contains(&peer))
    }

    /// How many more jobs this stream may lease to `peer` in second `sec`,
    /// however many are ready: its leases to the peer stay within `mpps`,
    /// its leases in one second within the spawn frequency.
    pub fn lease_allowance(&self, peer: PeerId, sec: u64) -> u32 {
        if !self.leases_to(peer) {
            return 0;
        }
        let running = self.leased_by_peer.get(&peer).copied().unwrap_or(0);
        let mut n = self.props.mpps.saturating_sub(running);
        if let Some(freq) = self.props.spawn_frequency {
            let used = if self.window_sec == sec { self.window_leases } else { 0 };
            n = n.min(freq.saturating_sub(used));
        }
        n
    }
}

/// Rarely set fields of a job, boxed so the common job stays small.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JobExtra {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub key: Option<IdempotencyKey>,
}

/// What attempts produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JobOutput {
    pub result: Option<Vec<u8>>,
    pub error: Option<ErrorRecord>,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
}

/// A job as the state machine keeps it (about 120 bytes plus its input).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Job {
    pub stream: StreamIdx,
    pub priority: i32,
    pub attempts: u32,
    pub status: JobStatus,
    pub module: ModuleHash,
    pub input: Box<[u8]>,
    pub extra: Option<Box<JobExtra>>,
    pub output: Option<Box<JobOutput>>,
    pub lease: Option<Box<Lease>>,
    /// The peer that last held a lease (0 = none; peer ids start at 1).
    pub last_peer: u64,
    pub ready_at: Timestamp,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Job {
    pub fn ready_key(&self, id: JobId) -> ReadyKey {
        (Reverse(self.priority), self.ready_at, id)
    }

    pub fn output_mut(&mut self) -> &mut JobOutput {
        self.output.get_or_insert_with(Default::default)
    }

    pub fn key(&self) -> Option<&IdempotencyKey> {
        self.extra.as_ref().and_then(|e| e.key.as_ref())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Peer {
    pub info: PeerInfo,
    pub role: PeerRole,
    pub draining: bool,
    pub registered_at: Timestamp,
    pub last_heartbeat: Timestamp,
    pub rss_bytes: u64,
}

/// Indexes over all streams, rebuilt on restore.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Index {
    /// Delayed jobs by the time they become ready.
    pub delayed: BTreeSet<(Timestamp, JobId)>,
    /// Live leases by expiry.
    pub expiries: BTreeSet<(Timestamp, JobId)>,
    /// Finished jobs of streams that retain them for a while, by the time
    /// they are forgotten (`forget_at`).
    pub forget: BTreeSet<(Timestamp, JobId)>,
}

/// When a job of a stream with `props`, finished at `finished_at` (its
/// `updated_at`), is forgotten: `None` if the stream keeps its jobs.
pub(crate) fn forget_at(props: &StreamProps, finished_at: Timestamp) -> Option<Timestamp> {
    props.retain_ms.map(|r| finished_at.saturating_add_ms(r))
}

/// Everything a snapshot holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Data {
    pub applied_index: u64,
    /// The latest time any command carried; time never goes backwards here.
    pub now: Timestamp,
    pub next_job: u64,
    pub next_peer: u64,
    pub next_stream: StreamIdx,
    pub stream_names: BTreeMap<StreamName, StreamIdx>,
    pub streams: BTreeMap<StreamIdx, Stream>,
    pub jobs: JobTable,
    pub modules: BTreeMap<ModuleHash, Arc<[u8]>>,
    pub peers: BTreeMap<PeerId, Peer>,
}

impl Data {
    /// What a snapshot holds, copied in O(streams + peers + modules + jobs
    /// / 1024): the jobs, the streams' keys and data stores and the modules
    /// are shared, copy on write, and the indexes left out. A replica takes
    /// it under the state's lock and encodes it after.
    pub fn durable_copy(&self) -> Data {
        Data {
            applied_index: self.applied_index,
            now: self.now,
            next_job: self.next_job,
            next_peer: self.next_peer,
            next_stream: self.next_stream,
            stream_names: self.stream_names.clone(),
            streams: self.streams.iter().map(|(&idx, s)| (idx, s.durable_copy())).collect(),
            jobs: self.jobs.clone(),
            modules: self.modules.clone(),
            peers: self.peers.clone(),
        }
    }

    /// Rebuild the per-stream and global indexes from the primary data.
    pub fn build_index(&mut self) -> Index {
        let mut index = Index::default();
        for s in self.streams.values_mut() {
            s.ready.clear();
            s.pending.clear();
            s.leased_by_peer.clear();
        }
        for (id, job) in self.jobs.iter() {
            let Some(stream) = self.streams.get_mut(&job.stream) else { continue };
            match job.status {
                JobStatus::Queued => {
                    stream.ready.insert(job.ready_key(id));
                    stream.pending.insert(id);
                }
                JobStatus::Delayed => {
                    index.delayed.insert((job.ready_at, id));
                    stream.pending.insert(id);
                }
                JobStatus::Leased | JobStatus::Running => {
                    if let Some(lease) = &job.lease {
                        index.expiries.insert((lease.expires_at, id));
                        *stream.leased_by_peer.entry(lease.peer).or_default() += 1;
                    }
                }
                JobStatus::Succeeded | JobStatus::Dead | JobStatus::Cancelled => {
                    if let Some(at) = forget_at(&stream.props, job.updated_at) {
                        index.forget.insert((at, id));
                    }
                }
            }
        }
        index
    }
}

/// A lease as presented by a peer.
pub(crate) struct Presented {
    pub peer: PeerId,
    pub job: JobId,
    pub token: FencingToken,
}

/// Jobs per chunk of the job table.
const CHUNK: u64 = 1024;

/// One chunk of the job table: the slots of ids `n * CHUNK + start ..`,
/// from its first job to its last (the others are empty), shared with the
/// copies a snapshot took until either side writes to it. Its form depends
/// only on the jobs it holds, so a restored table equals the one saved.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChunkData {
    /// The jobs in `slots`: a chunk with none is dropped.
    live: u32,
    /// The offset in the chunk of `slots[0]`.
    start: u32,
    /// First and last hold a job.
    slots: VecDeque<Option<Arc<Job>>>,
}

impl ChunkData {
    fn slot(&self, offset: usize) -> Option<&Arc<Job>> {
        self.slots.get(offset.checked_sub(self.start as usize)?)?.as_ref()
    }

    /// The jobs from `offset` on, with their offsets.
    fn jobs_from(&self, offset: usize) -> impl Iterator<Item = (usize, &Job)> + '_ {
        let skip = offset.saturating_sub(self.start as usize);
        let start = self.start as usize;
        self.slots.iter().enumerate().skip(skip).filter_map(move |(i, j)| j.as_deref().map(|j| (start + i, j)))
    }
}

type Chunk = Arc<ChunkData>;

/// All jobs, by id. Ids are assigned densely in submission order, so chunks
/// of slots, by `id / CHUNK`, hold them with no per-entry tree overhead (a
/// `BTreeMap` of jobs filled in ascending order leaves its nodes half
/// empty: ~2x the memory). A removed job leaves an empty slot (8 bytes: a
/// job is behind a pointer) while its chunk holds another job; a chunk
/// with none is dropped, so ids forgotten behind an old job that stays (a
/// `--retain none` stream's, a paused one's) cost nothing, in memory or in
/// a snapshot, however many.
///
/// Copy on write: a clone shares every chunk and job (O(jobs / CHUNK)), and
/// a write copies only the chunk and the job it changes, so a snapshot
/// copies the table under the state's lock and encodes it outside.
///
/// Invariant: every job's id is below `end`; a chunk is in `chunks` iff it
/// holds a job (`live` of them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct JobTable {
    end: u64,
    chunks: BTreeMap<u64, Chunk>,
}

impl JobTable {
    /// The id the next inserted job must have.
    pub fn next_id(&self) -> JobId {
        JobId(self.end)
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The id of the first job, or `end` if there is none: where a
    /// snapshot's runs begin.
    fn base(&self) -> u64 {
        self.chunks.first_key_value().map_or(self.end, |(n, chunk)| n * CHUNK + u64::from(chunk.start))
    }

    pub fn get(&self, id: &JobId) -> Option<&Job> {
        self.chunks.get(&(id.0 / CHUNK))?.slot((id.0 % CHUNK) as usize).map(|j| &**j)
    }

    pub fn get_mut(&mut self, id: &JobId) -> Option<&mut Job> {
        let (chunk, i) = self.chunk_of(*id)?;
        Arc::make_mut(chunk).slots.get_mut(i)?.as_mut().map(Arc::make_mut)
    }

    /// The chunk of a job that is in the table, and the index of its slot
    /// in `slots` (an empty slot's chunk is not copied on write).
    fn chunk_of(&mut self, id: JobId) -> Option<(&mut Chunk, usize)> {
        let chunk = self.chunks.get_mut(&(id.0 / CHUNK))?;
        chunk.slot((id.0 % CHUNK) as usize)?;
        let i = (id.0 % CHUNK) as usize - chunk.start as usize;
        Some((chunk, i))
    }

    /// Insert the job with the next id (anything else is a bug). Into an
    /// empty table, any id: ids of jobs gone before are never reused.
    pub fn insert(&mut self, id: JobId, job: Job) {
        if self.is_empty() {
            self.end = id.0;
        }
        assert_eq!(id, self.next_id(), "jobs are inserted in id order");
        self.push(Arc::new(job));
    }

    /// Take the job out; it may still be shared with a frozen copy, so
    /// it comes back as it is kept, never cloned.
    pub fn remove(&mut self, id: &JobId) -> Option<Arc<Job>> {
        let (chunk, i) = self.chunk_of(*id)?;
        if chunk.live == 1 {
            // Its last job: the chunk goes, not copied first.
            let job = chunk.slots.get(i)?.clone();
            self.chunks.remove(&(id.0 / CHUNK));
            job
        } else {
            let chunk = Arc::make_mut(chunk);
            let job = chunk.slots.get_mut(i)?.take();
            chunk.live -= 1;
            while let Some(None) = chunk.slots.front() {
                chunk.slots.pop_front();
                chunk.start += 1;
            }
            while let Some(None) = chunk.slots.back() {
                chunk.slots.pop_back();
            }
            job
        }
    }

    /// Put `job` in the slot of id `end`, which must not be `u64::MAX`
    /// (the state machine's ids run out long before; a snapshot is checked).
    fn push(&mut self, job: Arc<Job>) {
        let offset = (self.end % CHUNK) as u32;
        let chunk = self
            .chunks
            .entry(self.end / CHUNK)
            .or_insert_with(|| Arc::new(ChunkData { live: 0, start: offset, slots: VecDeque::new() }));
        let chunk = Arc::make_mut(chunk);
        // Empty slots since its last job (ids forgotten or skipped).
        let len = (offset - chunk.start) as usize;
        chunk.slots.resize(len, None);
        chunk.slots.push_back(Some(job));
        chunk.live += 1;
        self.end += 1;
    }

    pub fn iter(&self) -> impl Iterator<Item = (JobId, &Job)> + '_ {
        self.iter_from(JobId(0))
    }

    /// Jobs with id >= `from`, in id order.
    pub fn iter_from(&self, from: JobId) -> impl Iterator<Item = (JobId, &Job)> + '_ {
        let start = from.0;
        self.chunks.range(start / CHUNK..).flat_map(move |(&n, chunk)| {
            let from = if n == start / CHUNK { (start % CHUNK) as usize } else { 0 };
            chunk.jobs_from(from).map(move |(o, j)| (JobId(n * CHUNK + o as u64), j))
        })
    }

    /// Every job from the first, and the runs of empty slots between them
    /// and before `end`: what a snapshot holds.
    fn runs(&self) -> impl Iterator<Item = Run<&Job>> + '_ {
        let mut at = self.base();
        let jobs = self.iter().flat_map(move |(id, job)| {
            let holes = id.0 - at;
            at = id.0 + 1;
            (holes > 0).then_some(Run::Holes(holes)).into_iter().chain([Run::Job(job)])
        });
        let last = self.last_id().map_or(self.end, |id| id + 1);
        jobs.chain((self.end > last).then_some(Run::Holes(self.end - last)))
    }

    /// The id of the last job, if any.
    fn last_id(&self) -> Option<u64> {
        let (n, chunk) = self.chunks.last_key_value()?;
        Some(n * CHUNK + u64::from(chunk.start) + chunk.slots.len() as u64 - 1)
    }
}

/// A run of the job table in a snapshot: a job, or that many empty slots.
#[derive(Serialize, Deserialize)]
enum Run<J> {
    Job(J),
    Holes(u64),
}

/// A snapshot holds the table as `{ base, runs }`: the first id, then its
/// jobs in id order with the runs of empty slots between them (and before
/// `end`), so forgotten ids take no room.
impl Serialize for JobTable {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeSeq, SerializeStruct};
        struct Runs<'a>(&'a JobTable);
        impl Serialize for Runs<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                // postcard needs the length first.
                let mut seq = serializer.serialize_seq(Some(self.0.runs().count()))?;
                for run in self.0.runs() {
                    seq.serialize_element(&run)?;
                }
                seq.end()
            }
        }
        let mut s = serializer.serialize_struct("JobTable", 2)?;
        s.serialize_field("base", &self.base())?;
        s.serialize_field("runs", &Runs(self))?;
        s.end()
    }
}

impl<'de> Deserialize<'de> for JobTable {
    /// Reads `{ base, runs }` as postcard writes a struct (a sequence of
    /// its fields), each job straight into its chunk.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{DeserializeSeed, Error, SeqAccess, Visitor};

        struct Table;
        impl<'de> Visitor<'de> for Table {
            type Value = JobTable;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a job table: its first id, then its runs")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JobTable, A::Error> {
                let base: u64 = seq.next_element()?.ok_or_else(|| A::Error::invalid_length(0, &self))?;
                seq.next_element_seed(Runs(JobTable { end: base, chunks: BTreeMap::new() }))?
                    .ok_or_else(|| A::Error::invalid_length(1, &self))
            }
        }

        struct Runs(JobTable);
        impl<'de> DeserializeSeed<'de> for Runs {
            type Value = JobTable;
            fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<JobTable, D::Error> {
                deserializer.deserialize_seq(self)
            }
        }
        impl<'de> Visitor<'de> for Runs {
            type Value = JobTable;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the job table's runs")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JobTable, A::Error> {
                let past_the_last_id = || A::Error::custom("the job table runs past the last job id");
                let mut table = self.0;
                while let Some(run) = seq.next_element::<Run<Job>>()? {
                    match run {
                        Run::Job(job) if table.end < u64::MAX => table.push(Arc::new(job)),
                        Run::Job(_) => return Err(past_the_last_id()),
                        Run::Holes(n) => table.end = table.end.checked_add(n).ok_or_else(past_the_last_id)?,
                    }
                }
                // A state never leaves a hole first; a snapshot that has
                // one loads as if the hole had been trimmed (the first job
                // is where the runs begin).
                Ok(table)
            }
        }

        deserializer.deserialize_struct("JobTable", &["base", "runs"], Table)
    }
}

impl std::ops::Index<&JobId> for JobTable {
    type Output = Job;
    fn index(&self, id: &JobId) -> &Job {
        self.get(id).expect("job exists")
    }
}

#[cfg(test)]
mod job_table_tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn job(mark: i32) -> Job {
        Job {
            stream: 0,
            priority: mark,
            attempts: 0,
            status: JobStatus::Queued,
            module: ModuleHash([0; 32]),
            input: Box::new([]),
            extra: None,
            output: None,
            lease: None,
            last_peer: 0,
            ready_at: Timestamp(0),
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
        }
    }

    fn contents(t: &JobTable) -> Vec<(u64, i32)> {
        t.iter().map(|(id, j)| (id.0, j.priority)).collect()
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Insert this many jobs at the next id.
        Insert(u16),
        /// Remove the job at this position among the live ones (front-heavy).
        Remove(prop::sample::Index),
        RemoveFirst,
        /// Change the job at this position.
        Touch(prop::sample::Index),
        /// Take a copy (a snapshot's), to check later that nothing changed it.
        Copy,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1..2500u16).prop_map(Op::Insert),
            any::<prop::sample::Index>().prop_map(Op::Remove),
            Just(Op::RemoveFirst),
            any::<prop::sample::Index>().prop_map(Op::Touch),
            Just(Op::Copy),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// The chunked table behaves as a map from id to job, across chunk
        /// boundaries and from an unaligned first id; its bytes are those of
        /// `{ base, runs }`; a copy taken earlier never sees a later write.
        #[test]
        fn the_job_table_is_a_map_by_id_and_its_copies_are_frozen(
            first in 0..3000u64,
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let mut table = JobTable { end: first, chunks: BTreeMap::new() };
            let mut model: BTreeMap<u64, i32> = BTreeMap::new();
            let mut next = first;
            let mut copies: Vec<(JobTable, Vec<(u64, i32)>)> = Vec::new();
            let mut mark = 0;
            for op in ops {
                match op {
                    Op::Insert(n) => {
                        if table.is_empty() {
                            // An empty table takes any id; ids are never reused.
                            next += 7;
                        }
                        for _ in 0..n {
                            mark += 1;
                            table.insert(JobId(next), job(mark));
                            model.insert(next, mark);
                            next += 1;
                        }
                    }
                    Op::Remove(i) | Op::Touch(i) if model.is_empty() => { let _ = i; }
                    Op::Remove(i) => {
                        let id = *model.keys().nth(i.index(model.len())).unwrap();
                        prop_assert_eq!(table.remove(&JobId(id)).map(|j| j.priority), model.remove(&id));
                        prop_assert!(table.remove(&JobId(id)).is_none());
                    }
                    Op::RemoveFirst => {
                        if let Some((id, m)) = model.pop_first() {
                            prop_assert_eq!(table.remove(&JobId(id)).map(|j| j.priority), Some(m));
                        }
                    }
                    Op::Touch(i) => {
                        let id = *model.keys().nth(i.index(model.len())).unwrap();
                        mark += 1;
                        table.get_mut(&JobId(id)).unwrap().priority = mark;
                        model.insert(id, mark);
                    }
                    Op::Copy => copies.push((table.clone(), contents(&table))),
                }
                prop_assert_eq!(contents(&table), model.iter().map(|(&k, &v)| (k, v)).collect::<Vec<_>>());
                prop_assert_eq!(table.is_empty(), model.is_empty());
                prop_assert_eq!(table.next_id(), JobId(next));
                if let Some((&id, _)) = model.first_key_value() {
                    prop_assert_eq!(table.base(), id, "no hole first");
                }
                let chunks: BTreeSet<u64> = model.keys().map(|id| id / CHUNK).collect();
                prop_assert_eq!(table.chunks.keys().copied().collect::<BTreeSet<_>>(), chunks, "only chunks with jobs");
                for chunk in table.chunks.values() {
                    prop_assert_eq!(chunk.live as usize, chunk.slots.iter().flatten().count());
                    prop_assert!(chunk.slots.front().is_some_and(Option::is_some), "a job first");
                    prop_assert!(chunk.slots.back().is_some_and(Option::is_some), "a job last");
                }
            }
            for (copy, was) in &copies {
                prop_assert_eq!(&contents(copy), was);
            }
            // The bytes are `{ base, runs }`, as the model gives them, and
            // read back the same.
            let mut runs: Vec<Run<Job>> = Vec::new();
            let mut at = table.base();
            for (&id, &mark) in &model {
                if id > at {
                    runs.push(Run::Holes(id - at));
                }
                runs.push(Run::Job(job(mark)));
                at = id + 1;
            }
            if next > at && !model.is_empty() {
                runs.push(Run::Holes(next - at));
            }
            let bytes = postcard::to_stdvec(&table).unwrap();
            prop_assert_eq!(&bytes, &postcard::to_stdvec(&(table.base(), &runs)).unwrap());
            let back: JobTable = postcard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(&back, &table);
        }
    }

    /// Lengths a snapshot claims are not trusted: a map of 2^40 entries or a
    /// job table past the last id is an error, not an abort or a wrap; a
    /// run of 2^60 forgotten ids costs nothing.
    #[test]
    fn a_snapshot_claiming_too_much_is_refused() {
        let huge = [0x80, 0x80, 0x80, 0x80, 0x80, 0x20]; // varint 2^40
        let mut de = postcard::Deserializer::from_bytes(&huge);
        assert!(ordered_map::<_, Vec<u8>, Vec<u8>>(&mut de).is_err());

        let table = |base: u64, runs: Vec<Run<Job>>| {
            postcard::from_bytes::<JobTable>(&postcard::to_stdvec(&(base, runs)).unwrap())
        };
        assert!(table(u64::MAX, vec![Run::Job(job(1))]).is_err());
        assert!(table(1, vec![Run::Holes(u64::MAX)]).is_err());
        assert_eq!(contents(&table(u64::MAX - 1, vec![Run::Job(job(1))]).unwrap()), vec![(u64::MAX - 1, 1)]);
        let sparse = table(0, vec![Run::Job(job(1)), Run::Holes(1 << 60), Run::Job(job(2))]).unwrap();
        assert_eq!(contents(&sparse), vec![(0, 1), ((1 << 60) + 1, 2)]);
        assert_eq!(sparse.chunks.len(), 2);
    }

    /// A table and the one its snapshot restores are equal (not only their
    /// jobs): a chunk's form depends only on the jobs it holds.
    #[test]
    fn a_restored_table_equals_the_saved_one() {
        let mut table = JobTable::default();
        for (id, mark) in [(0, 1), (1, 2), (2, 3), (3, 4)] {
            table.insert(JobId(id), job(mark));
        }
        table.remove(&JobId(3)); // the newest of its chunk
        table.remove(&JobId(1)); // one in the middle
        let bytes = postcard::to_stdvec(&table).unwrap();
        assert_eq!(postcard::from_bytes::<JobTable>(&bytes).unwrap(), table);
        table.remove(&JobId(0)); // the first
        let bytes = postcard::to_stdvec(&table).unwrap();
        assert_eq!(postcard::from_bytes::<JobTable>(&bytes).unwrap(), table);
        assert_eq!((table.base(), table.next_id(), contents(&table)), (2, JobId(4), vec![(2, 3)]));
    }

    /// A snapshot that begins with a hole (no state leaves one) loads as if
    /// it had been trimmed: the first slot holds a job.
    #[test]
    fn a_hole_first_in_a_snapshot_is_trimmed_on_load() {
        let runs = vec![Run::Holes(2), Run::Job(job(1))];
        let bytes = postcard::to_stdvec(&(5u64, &runs)).unwrap();
        let table: JobTable = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(contents(&table), vec![(7, 1)]);
        assert_eq!((table.base(), table.next_id()), (7, JobId(8)));
    }
}
