//! Read-only queries: what clients, `impetus status` and the peer read.

use impetus_proto::{
    FencingToken, JobId, JobRecord, JobSpec, JobStatus, Lease, ModuleHash, PeerId, PeerRecord, StreamInfo, StreamName,
    StreamStats, Timestamp,
};

use crate::state::{Job, Stream};
use crate::{JobFilter, State};

impl State {
    pub fn job(&self, id: JobId) -> Option<JobRecord> {
        self.data.jobs.get(&id).map(|j| self.record(id, j))
    }

    /// When a job was created and last changed (its result's time once it
    /// ended), without copying its record.
    pub fn job_times(&self, id: JobId) -> Option<(Timestamp, Timestamp)> {
        self.data.jobs.get(&id).map(|j| (j.created_at, j.updated_at))
    }

    /// The status of each job in `ids` (`None`: no such job), in order.
    pub fn job_statuses(&self, ids: &[JobId]) -> Vec<Option<JobStatus>> {
        ids.iter().map(|id| self.data.jobs.get(id).map(|j| j.status)).collect()
    }

    /// Jobs in id order, filtered, at most `filter.limit`, and no more than
    /// fit in `filter.max_bytes` (their approximate encoded size) but always
    /// at least one: a short page is not the last, page on from its last id
    /// until a page comes back empty.
    pub fn jobs(&self, filter: &JobFilter<'_>) -> Vec<JobRecord> {
        let stream = match filter.stream {
            Some(name) => match self.data.stream_names.get(name) {
                Some(&idx) => Some(idx),
                None => return Vec::new(),
            },
            None => None,
        };
        let start = filter.after.map_or(0, |a| a.0.saturating_add(1));
        let budget = filter.max_bytes.unwrap_or(usize::MAX);
        let mut bytes = 0usize;
        let mut out = Vec::new();
        let matching = self
            .data
            .jobs
            .iter_from(JobId(start))
            .filter(|(_, j)| stream.is_none_or(|s| j.stream == s) && filter.status.is_none_or(|st| j.status == st))
            .take(filter.limit);
        for (id, j) in matching {
            // Sized before it is copied: the copy is what the budget bounds.
            bytes = bytes.saturating_add(record_bytes(j));
            if bytes > budget && !out.is_empty() {
                break;
            }
            out.push(self.record(id, j));
        }
        out
    }

    /// The job submitted to `stream` with idempotency `key`, if any.
    pub fn job_by_key(&self, stream: &StreamName, key: &impetus_proto::IdempotencyKey) -> Option<JobId> {
        let idx = self.data.stream_names.get(stream)?;
        self.data.streams.get(idx)?.keys.get(key).copied()
    }

    pub fn stream(&self, name: &StreamName) -> Option<StreamInfo> {
        let idx = self.data.stream_names.get(name)?;
        self.data.streams.get(idx).map(|s| self.stream_info(s))
    }

    /// All streams, by name.
    pub fn streams(&self) -> Vec<StreamInfo> {
        self.data
            .stream_names
            .values()
            .filter_map(|idx| self.data.streams.get(idx))
            .map(|s| self.stream_info(s))
            .collect()
    }

    pub fn stream_stats(&self, name: &StreamName) -> Option<StreamStats> {
        self.stream(name).map(|s| s.stats)
    }

    pub fn has_module(&self, hash: &ModuleHash) -> bool {
        self.data.modules.contains_key(hash)
    }

    pub fn module(&self, hash: &ModuleHash) -> Option<&[u8]> {
        self.data.modules.get(hash).map(|m| &**m)
    }

    pub fn data_get(&self, stream: &StreamName, key: &[u8]) -> Option<&[u8]> {
        let idx = self.data.stream_names.get(stream)?;
        self.data.streams.get(idx)?.data.get(key).map(Vec::as_slice)
    }

    /// Keys of a stream's data store, in order, after `after`, at most `limit`.
    pub fn data_keys(&self, stream: &StreamName, after: Option<&[u8]>, limit: usize) -> Vec<Vec<u8>> {
        let Some(s) = self.data.stream_names.get(stream).and_then(|i| self.data.streams.get(i)) else {
            return Vec::new();
        };
        s.data.keys().filter(|k| after.is_none_or(|a| k.as_slice() > a)).take(limit).cloned().collect()
    }

    /// The live leases `peer` holds, by expiry: what a restarted peer hands back.
    pub fn leases_held_by(&self, peer: PeerId) -> Vec<(JobId, FencingToken)> {
        self.index
            .expiries
            .iter()
            .filter_map(|(_, id)| {
                let lease = self.data.jobs.get(id)?.lease.as_deref()?;
                (lease.peer == peer).then_some((*id, lease.token))
            })
            .collect()
    }

    /// Streams from which `peer` could lease a job right now: not paused, with
    /// Queued jobs, the peer allowed by pin/ignore and below the stream's mpps.
    /// (The spawn frequency is checked by the lease itself.)
    pub fn leasable_streams(&self, peer: PeerId) -> Vec<StreamName> {
        self.leasable_streams_idle(peer).into_iter().map(|(name, _)| name).collect()
    }

    /// How many jobs of `stream` a lease by `peer` may take now, however
    /// many are ready (0 for an unknown stream or peer, or a draining one):
    /// the limits a `Lease` applies, read at this state's time.
    pub fn lease_allowance(&self, stream: &StreamName, peer: PeerId) -> u32 {
        if self.data.peers.get(&peer).is_none_or(|p| p.draining) {
            return 0;
        }
        let Some(s) = self.data.stream_names.get(stream).and_then(|idx| self.data.streams.get(idx)) else {
            return 0;
        };
        s.lease_allowance(peer, self.data.now.0 / 1000)
    }

    /// [`State::leasable_streams`], each with its idle timeout in ms (how
    /// long a worker keeps tracking it).
    pub fn leasable_streams_idle(&self, peer: PeerId) -> Vec<(StreamName, u64)> {
        if self.data.peers.get(&peer).is_none_or(|p| p.draining) {
            return Vec::new();
        }
        self.data
            .stream_names
            .values()
            .filter_map(|idx| self.data.streams.get(idx))
            .filter(|s| {
                !s.ready.is_empty()
                    && s.leases_to(peer)
                    && s.leased_by_peer.get(&peer).copied().unwrap_or(0) < s.props.mpps
            })
            .map(|s| (s.name.clone(), s.props.idle_timeout_ms))
            .collect()
    }

    /// Whether the registry knows `peer` (cheaper than [`State::peer`]).
    pub fn has_peer(&self, peer: PeerId) -> bool {
        self.data.peers.contains_key(&peer)
    }

    /// Whether the registry has handed out `peer` (registered now or
    /// removed since): ids are never reused.
    pub fn peer_id_issued(&self, peer: PeerId) -> bool {
        (1..=self.data.next_peer).contains(&peer.0)
    }

    pub fn peers(&self) -> Vec<PeerRecord> {
        self.data.peers.keys().filter_map(|&id| self.peer(id)).collect()
    }

    pub fn peer(&self, id: PeerId) -> Option<PeerRecord> {
        let p = self.data.peers.get(&id)?;
        let leased = self
            .data
            .stream_names
            .iter()
            .filter_map(|(name, idx)| {
                let n = self.data.streams.get(idx)?.leased_by_peer.get(&id).copied()?;
                Some((name.clone(), n))
            })
            .collect::<Vec<_>>();
        let busy: u32 = leased.iter().map(|(_, n)| *n).sum();
        let free = p.info.capacity.saturating_sub(busy);
        let idle = self
            .data
            .stream_names
            .keys()
            .filter_map(|name| {
                let n = self.lease_allowance(name, id).min(free);
                (n > 0).then(|| (name.clone(), n))
            })
            .collect();
        Some(PeerRecord {
            id,
            info: p.info.clone(),
            role: p.role,
            draining: p.draining,
            registered_at: p.registered_at,
            last_heartbeat: p.last_heartbeat,
            rss_bytes: p.rss_bytes,
            leased,
            idle,
        })
    }

    fn stream_info(&self, s: &Stream) -> StreamInfo {
        let mut stats = s.stats.clone();
        stats.oldest_pending_age_ms =
            s.pending.first().and_then(|id| self.data.jobs.get(id)).map(|j| self.data.now.since(j.created_at));
        StreamInfo { name: s.name.clone(), props: s.props.clone(), created_at: s.created_at, stats }
    }

    fn record(&self, id: JobId, j: &Job) -> JobRecord {
        let stream =
            self.data.streams.get(&j.stream).map(|s| s.name.clone()).expect("a job's stream exists (invariant)");
        let extra = j.extra.as_deref();
        let out = j.output.as_deref();
        JobRecord {
            id,
            stream,
            module: j.module,
            spec: JobSpec {
                args: extra.map(|e| e.args.clone()).unwrap_or_default(),
                env: extra.map(|e| e.env.clone()).unwrap_or_default(),
                input: j.input.to_vec(),
            },
            priority: j.priority,
            status: j.status,
            ready_at: j.ready_at,
            attempts: j.attempts,
            lease: j.lease.as_deref().copied().map(|l: Lease| l),
            peer: (j.last_peer != 0).then_some(PeerId(j.last_peer)),
            created_at: j.created_at,
            updated_at: j.updated_at,
            key: j.key().cloned(),
            result: out.and_then(|o| o.result.clone()),
            error: out.and_then(|o| o.error.clone()),
            stdout_tail: out.map(|o| o.stdout_tail.clone()).unwrap_or_default(),
            stderr_tail: out.map(|o| o.stderr_tail.clone()).unwrap_or_default(),
        }
    }
}

/// What a job's record takes, encoded, besides its variable-length fields:
/// ids, stream name (at most [`impetus_proto::limits::MAX_STREAM_NAME`]),
/// module hash, times, lease, counters and length prefixes.
const RECORD_OVERHEAD: usize = 256;

/// An upper bound on the encoded size of a job's [`JobRecord`] (a length
/// prefix takes at most 10 bytes), computed without copying it.
fn record_bytes(j: &Job) -> usize {
    const PREFIX: usize = 10;
    let field = |len: usize| len.saturating_add(PREFIX);
    let mut n = RECORD_OVERHEAD.saturating_add(field(j.input.len()));
    if let Some(e) = j.extra.as_deref() {
        n = e.args.iter().fold(n, |n, a| n.saturating_add(field(a.len())));
        n = e.env.iter().fold(n, |n, (k, v)| n.saturating_add(field(k.len())).saturating_add(field(v.len())));
        n = n.saturating_add(e.key.as_ref().map_or(0, |k| field(k.as_str().len())));
    }
    if let Some(o) = j.output.as_deref() {
        n = n.saturating_add(o.result.as_ref().map_or(0, |r| field(r.len())));
        n = n.saturating_add(field(o.stdout_tail.len())).saturating_add(field(o.stderr_tail.len()));
        if let Some(e) = &o.error {
            let statement = e.statement.as_ref().map_or(0, |s| field(s.len()));
            // Its kind (an exit code at most), line and option tags.
            const ERROR_OVERHEAD: usize = 32;
            n = n.saturating_add(ERROR_OVERHEAD).saturating_add(field(e.error.len()));
            n = n.saturating_add(field(e.name.len())).saturating_add(statement);
        }
    }
    n
}
