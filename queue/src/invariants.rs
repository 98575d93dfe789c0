//! `check_invariants`: recompute every index and counter from the primary
//! data and compare. Slow (O(n)); for tests, the simulator and restore.

use std::collections::BTreeMap;

use impetus_proto::{ErrorKind, JobStatus, StreamStats};

use crate::State;

impl State {
    /// Panic, naming the broken invariant, if the state is inconsistent.
    pub fn check_invariants(&self) {
        if let Err(e) = self.verify() {
            panic!("state machine invariant broken at index {}: {e}", self.data.applied_index);
        }
    }

    /// Like [`State::check_invariants`], as a `Result`.
    pub fn verify(&self) -> Result<(), String> {
        let d = &self.data;
        let mut rebuilt = d.clone();
        let index = rebuilt.build_index();
        if index != self.index {
            return Err("global delay/expiry/forget indexes differ from the jobs".into());
        }
        if d.next_job == u64::MAX {
            return Err("next_job is the last id there is: no job could be submitted".into());
        }
        // The next Submit inserts job `next_job` into the table, which takes
        // only its own next id (an empty table takes any).
        if !d.jobs.is_empty() && d.jobs.next_id().0 != d.next_job {
            return Err(format!("the job table's next id is {}, but next_job is {}", d.jobs.next_id(), d.next_job));
        }
        let mut counts: BTreeMap<u32, StreamStats> = BTreeMap::new();
        for (id, job) in d.jobs.iter() {
            if id.0 >= d.next_job {
                return Err(format!("{id} is not below next_job {}", d.next_job));
            }
            if !d.streams.contains_key(&job.stream) {
                return Err(format!("{id} belongs to a stream that does not exist"));
            }
            if !d.modules.contains_key(&job.module) {
                return Err(format!("{id} uses module {} that is not stored", job.module));
            }
            *counts.entry(job.stream).or_default().count_mut(job.status) += 1;
            match (job.status.is_leased(), &job.lease) {
                (true, None) => return Err(format!("{id} is {} without a lease", job.status)),
                (false, Some(_)) => return Err(format!("{id} is {} but holds a lease", job.status)),
                (true, Some(lease)) => {
                    if lease.expires_at <= d.now {
                        return Err(format!("{id} holds a lease that expired at {}", lease.expires_at));
                    }
                    if !d.peers.contains_key(&lease.peer) {
                        return Err(format!("{id} is leased by unregistered {}", lease.peer));
                    }
                    if lease.token.0 > d.applied_index {
                        return Err(format!("{id} has a fencing token from the future"));
                    }
                }
                (false, None) => {}
            }
            if job.status == JobStatus::Delayed && job.ready_at <= d.now {
                return Err(format!("{id} is Delayed but was ready at {}", job.ready_at));
            }
            let out = job.output.as_deref();
            if job.status == JobStatus::Succeeded && out.and_then(|o| o.result.as_ref()).is_none() {
                return Err(format!("{id} Succeeded without a result"));
            }
            if job.status == JobStatus::Dead && out.and_then(|o| o.error.as_ref()).is_none() {
                return Err(format!("{id} is Dead without an error record"));
            }
            if let Some(e) = out.and_then(|o| o.error.as_ref()) {
                // An expiry counts an attempt, so a job it sent back to the queue
                // (Delayed for backoff, or Dead) has at least one. A retried job
                // keeps its last error as history and starts again at zero, so
                // Queued and Cancelled are exempt.
                let sent_back = matches!(job.status, JobStatus::Delayed | JobStatus::Dead);
                if e.kind == ErrorKind::LeaseExpired && job.attempts == 0 && sent_back {
                    return Err(format!("{id} expired a lease without counting an attempt"));
                }
            }
            if let Some(key) = job.key() {
                if d.streams[&job.stream].keys.get(key) != Some(&id) {
                    return Err(format!("{id}'s idempotency key {key} does not map back to it"));
                }
            }
        }
        for (idx, s) in &d.streams {
            if *idx >= d.next_stream {
                return Err(format!("stream {} has id {idx}, not below next_stream {}", s.name, d.next_stream));
            }
            if d.stream_names.get(&s.name) != Some(idx) {
                return Err(format!("stream {} is not in the name map", s.name));
            }
            let c = counts.remove(idx).unwrap_or_default();
            for status in JobStatus::ALL {
                if c.count(status) != s.stats.count(status) {
                    return Err(format!(
                        "stream {} counts {} {status} jobs, but holds {}",
                        s.name,
                        s.stats.count(status),
                        c.count(status)
                    ));
                }
            }
            let r = &rebuilt.streams[idx];
            if r.ready != s.ready || r.pending != s.pending {
                return Err(format!("stream {}'s ready queue differs from its Queued jobs", s.name));
            }
            if r.leased_by_peer != s.leased_by_peer {
                return Err(format!("stream {}'s per-peer lease counts differ from its leases", s.name));
            }
            for (key, id) in &s.keys {
                let Some(job) = d.jobs.get(id) else {
                    return Err(format!(
                        "idempotency key {key} of stream {} points at {id}, which does not exist",
                        s.name
                    ));
                };
                if job.stream != *idx {
                    return Err(format!("idempotency key {key} of stream {} points at {id} elsewhere", s.name));
                }
                if job.key() != Some(key) {
                    return Err(format!(
                        "idempotency key {key} of stream {} points at {id}, which does not carry it",
                        s.name
                    ));
                }
            }
        }
        if d.stream_names.len() != d.streams.len() {
            return Err("the stream name map and the streams differ".into());
        }
        if let Some((&id, _)) = d.peers.iter().next_back() {
            if id.0 > d.next_peer {
                return Err(format!("{id} is above next_peer {}", d.next_peer));
            }
        }
        Ok(())
    }
}
