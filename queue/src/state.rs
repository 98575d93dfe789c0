//! The data of the state machine and the indexes kept beside it.
//!
//! Primary data (streams, jobs, modules, peers, counters) is what a snapshot
//! holds; indexes (`Index`) are rebuilt from it on restore. Everything is a
//! `BTreeMap`/`BTreeSet`, so iteration order — and with it every outcome and
//! every snapshot byte — depends only on the commands applied.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

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
    pub keys: BTreeMap<IdempotencyKey, JobId>,
    pub data: BTreeMap<Vec<u8>, Vec<u8>>,
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

impl Stream {
    pub fn new(name: StreamName, props: StreamProps, now: Timestamp) -> Stream {
        Stream {
            name,
            props,
            created_at: now,
            stats: StreamStats::default(),
            keys: BTreeMap::new(),
            data: BTreeMap::new(),
            window_sec: 0,
            window_leases: 0,
            last_lease: 0,
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
    pub modules: BTreeMap<ModuleHash, Vec<u8>>,
    pub peers: BTreeMap<PeerId, Peer>,
}

impl Data {
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
                JobStatus::Succeeded | JobStatus::Dead | JobStatus::Cancelled => {}
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

/// All jobs, by id. Ids are assigned densely in submission order, so a deque
/// indexed by `id - base` holds them with no per-entry tree overhead (a
/// `BTreeMap` filled in ascending order leaves its nodes half empty: ~2x the
/// memory). Removed jobs leave a `None` until they reach the front: a job
/// is boxed so that such a hole is one pointer, not a whole job (a purged
/// stream's holes behind an older job that stays, a paused stream's, cost
/// 8 bytes each).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JobTable {
    base: u64,
    slots: VecDeque<Option<Box<Job>>>,
}

impl JobTable {
    /// The id the next inserted job must have.
    pub fn next_id(&self) -> JobId {
        JobId(self.base + self.slots.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn slot(&self, id: JobId) -> Option<usize> {
        let i = id.0.checked_sub(self.base)?;
        usize::try_from(i).ok().filter(|&i| i < self.slots.len())
    }

    pub fn get(&self, id: &JobId) -> Option<&Job> {
        self.slots.get(self.slot(*id)?)?.as_deref()
    }

    pub fn get_mut(&mut self, id: &JobId) -> Option<&mut Job> {
        let i = self.slot(*id)?;
        self.slots.get_mut(i)?.as_deref_mut()
    }

    /// Insert the job with the next id (anything else is a bug).
    pub fn insert(&mut self, id: JobId, job: Job) {
        if self.slots.is_empty() {
            self.base = id.0;
        }
        assert_eq!(id, self.next_id(), "jobs are inserted in id order");
        self.slots.push_back(Some(Box::new(job)));
    }

    pub fn remove(&mut self, id: &JobId) -> Option<Job> {
        let i = self.slot(*id)?;
        let job = self.slots.get_mut(i)?.take();
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        job.map(|j| *j)
    }

    pub fn iter(&self) -> impl Iterator<Item = (JobId, &Job)> + '_ {
        self.iter_from(JobId(0))
    }

    /// Jobs with id >= `from`, in id order.
    pub fn iter_from(&self, from: JobId) -> impl Iterator<Item = (JobId, &Job)> + '_ {
        let skip = from.0.saturating_sub(self.base);
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        let base = self.base;
        self.slots
            .iter()
            .enumerate()
            .skip(skip)
            .filter_map(move |(i, j)| j.as_deref().map(|j| (JobId(base + i as u64), j)))
    }
}

impl std::ops::Index<&JobId> for JobTable {
    type Output = Job;
    fn index(&self, id: &JobId) -> &Job {
        self.get(id).expect("job exists")
    }
}
