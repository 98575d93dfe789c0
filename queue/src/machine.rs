//! `State::apply`: the transitions of the state machine.
//!
//! Every handler checks first and mutates after, so a refused command
//! changes nothing (only time advances, which every command does).

use std::collections::BTreeMap;
use std::sync::Arc;

use impetus_proto::{
    ApplyError, ApplyResult, Command, Completion, ErrorKind, ErrorRecord, FailDisposition, Failure, FencingToken,
    JobId, JobSpec, JobStatus, Lease, LeaseError, LeaseGrant, ModuleHash, NewJob, Outcome, PeerId, PeerInfo, PeerRole,
    Ran, RunLimits, Stamp, StreamName, StreamPatch, StreamProps, Submitted, Timestamp,
};

use crate::state::{forget_at, Job, JobExtra, Peer, Presented, Stream, StreamIdx};
use crate::State;

impl State {
    /// Apply one command at `stamp` (its log index and the leader's time).
    ///
    /// Indexes must strictly increase across calls (gaps are fine: Raft's own
    /// entries take indexes too). Time is clamped so it never goes backwards.
    /// Before the command itself, due delayed jobs become Queued, expired
    /// leases return their jobs (attempt counted) and finished jobs past
    /// their stream's retention are forgotten (at most `FORGET_PER_COMMAND`).
    pub fn apply(&mut self, stamp: Stamp, cmd: &Command) -> ApplyResult {
        assert!(
            stamp.index > self.data.applied_index,
            "log index {} applied after {}",
            stamp.index,
            self.data.applied_index
        );
        self.data.applied_index = stamp.index;
        if stamp.now > self.data.now {
            self.data.now = stamp.now;
        }
        self.advance_time();
        let token = FencingToken(stamp.index);
        match cmd {
            Command::Batch(cmds) => {
                cmd.validate()?;
                Ok(Outcome::Batch(cmds.iter().map(|c| self.apply_one(token, c)).collect()))
            }
            _ => self.apply_one(token, cmd),
        }
    }

    fn apply_one(&mut self, token: FencingToken, cmd: &Command) -> ApplyResult {
        cmd.validate()?;
        match cmd {
            Command::Tick => Ok(Outcome::Ticked),
            Command::CreateStream { name, props } => self.create_stream(name, props),
            Command::UpdateStream { name, patch } => self.update_stream(name, patch),
            Command::DeleteStream { name, force } => self.delete_stream(name, *force),
            Command::PutModule { hash, bytes } => self.put_module(*hash, bytes),
            Command::Submit { stream, jobs } => self.submit(stream, jobs),
            Command::SubmitRan { stream, jobs, peer, max, ran } => {
                Ok(self.submit_ran(token, stream, jobs, *peer, *max, ran))
            }
            Command::Lease { peer, streams, max } => self.lease(token, *peer, streams, *max),
            Command::Renew { peer, leases } => Ok(Outcome::Renewed(
                leases.iter().map(|&(job, token)| self.renew(Presented { peer: *peer, job, token })).collect(),
            )),
            Command::Complete { peer, completions } => {
                Ok(Outcome::Completed(completions.iter().map(|c| self.complete(*peer, c)).collect()))
            }
            Command::Fail { peer, failures } => {
                Ok(Outcome::Failed(failures.iter().map(|f| self.fail(*peer, f)).collect()))
            }
            Command::Release { peer, leases } => Ok(Outcome::Released(
                leases.iter().map(|&(job, token)| self.release(Presented { peer: *peer, job, token })).collect(),
            )),
            Command::Cancel { job } => self.cancel(*job),
            Command::Retry { job } => self.retry(*job),
            Command::DataPut { stream, key, value } => {
                let s = self.stream_mut(stream)?;
                s.data.insert(key.clone(), value.clone());
                Ok(Outcome::DataWritten)
            }
            Command::DataDelete { stream, key } => {
                self.stream_mut(stream)?.data.remove(key);
                Ok(Outcome::DataWritten)
            }
            Command::DataCas { stream, key, expected, new } => {
                let s = self.stream_mut(stream)?;
                let current = s.data.get(key);
                if current != expected.as_ref() {
                    return Ok(Outcome::DataCas { swapped: false, current: current.cloned() });
                }
                match new {
                    Some(v) => s.data.insert(key.clone(), v.clone()),
                    None => s.data.remove(key),
                };
                Ok(Outcome::DataCas { swapped: true, current: new.clone() })
            }
            Command::RegisterPeer { info, role } => Ok(self.register_peer(info, *role)),
            Command::Heartbeat { peer, info, rss_bytes } => {
                let now = self.data.now;
                let p = self.peer_mut(*peer)?;
                p.info = info.clone();
                p.rss_bytes = *rss_bytes;
                p.last_heartbeat = now;
                Ok(Outcome::PeerUpdated)
            }
            Command::SetPeerRole { peer, role } => {
                self.peer_mut(*peer)?.role = *role;
                Ok(Outcome::PeerUpdated)
            }
            Command::DrainPeer { peer, draining } => {
                self.peer_mut(*peer)?.draining = *draining;
                Ok(Outcome::PeerUpdated)
            }
            Command::RemovePeer { peer } => self.remove_peer(*peer),
            Command::Purge { stream, older_than_ms, max } => self.purge(stream, *older_than_ms, *max),
            Command::Batch(_) => Err(ApplyError::Invalid("batches do not nest".into())),
        }
    }

    // ---- time -------------------------------------------------------------

    /// Promote due delayed jobs, expire leases and forget finished jobs
    /// past their retention, at `self.data.now`.
    fn advance_time(&mut self) {
        let now = self.data.now;
        while let Some(&(ready_at, id)) = self.index.delayed.first() {
            if ready_at > now {
                break;
            }
            self.index.delayed.pop_first();
            let job = self.job_mut_expect(id);
            debug_assert_eq!(job.status, JobStatus::Delayed);
            let (stream, key) = (job.stream, job.ready_key(id));
            job.status = JobStatus::Queued;
            job.updated_at = now;
            let s = self.stream_idx_mut(stream);
            s.stats.delayed -= 1;
            s.stats.queued += 1;
            s.ready.insert(key);
        }
        while let Some(&(expires_at, id)) = self.index.expiries.first() {
            if expires_at > now {
                break;
            }
            let error = ErrorRecord::new(
                ErrorKind::LeaseExpired,
                format!("lease expired at {expires_at} before the peer reported a result"),
            );
            self.end_lease(id);
            let stream = self.job_mut_expect(id).stream;
            self.stream_idx_mut(stream).stats.expired_leases_total += 1;
            // PLANTED BUG (simulator only, off unless `plant_bug` was called):
            // forget to requeue the job whose lease expired.
            if self.planted == crate::PlantedBug::ForgetExpiredRequeue {
                continue;
            }
            self.after_failed_attempt(id, error);
        }
        // Finished jobs past their stream's retention, a bounded number per
        // command: the rest go with the next ones (`poll_timeout` is then
        // due at once, so the leader ticks).
        for _ in 0..FORGET_PER_COMMAND {
            match self.index.forget.first() {
                Some(&(at, id)) if at <= now => {
                    self.index.forget.pop_first();
                    self.forget_job(id);
                }
                _ => break,
            }
        }
    }

    /// A finished job just got its final status and `updated_at`: index it
    /// for forgetting if its stream retains jobs for a while.
    fn finished(&mut self, id: JobId) {
        debug_assert!(self.data.jobs[&id].status.is_final());
        if let Some(key) = self.forget_key(id) {
            self.index.forget.insert(key);
        }
    }

    /// A finished job is about to leave its final status (retried) or the
    /// table (purged, its stream deleted): out of the forget index.
    fn unfinished(&mut self, id: JobId) {
        if let Some(key) = self.forget_key(id) {
            self.index.forget.remove(&key);
        }
    }

    /// The forget index's key of a finished job, under its stream's
    /// retention now.
    fn forget_key(&self, id: JobId) -> Option<(Timestamp, JobId)> {
        let job = &self.data.jobs[&id];
        forget_at(&self.data.streams[&job.stream].props, job.updated_at).map(|at| (at, id))
    }

    /// Forget a finished job that is in no index any more (a final job is
    /// in none but `forget`): it goes with its count and its idempotency
    /// key; totals stay.
    fn forget_job(&mut self, id: JobId) {
        let job = self.data.jobs.remove(&id).expect("a finished job to forget exists");
        debug_assert!(job.status.is_final());
        let s = self.stream_idx_mut(job.stream);
        *s.stats.count_mut(job.status) -= 1;
        s.stats.forgotten_total += 1;
        if let Some(key) = job.key() {
            let removed = s.keys.remove(key);
            debug_assert_eq!(removed, Some(id), "the key of {id} named another job");
        }
    }

    /// Remove a job's live lease and its index entries. The caller sets the new status.
    fn end_lease(&mut self, id: JobId) {
        let job = self.job_mut_expect(id);
        let lease = job.lease.take().expect("end_lease on a job without a lease");
        let (stream, status) = (job.stream, job.status);
        self.index.expiries.remove(&(lease.expires_at, id));
        let s = self.stream_idx_mut(stream);
        *s.stats.count_mut(status) -= 1;
        match s.leased_by_peer.get_mut(&lease.peer) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                s.leased_by_peer.remove(&lease.peer);
            }
        }
    }

    /// Put a job (not indexed anywhere) back as Queued or Delayed at `ready_at`.
    fn enqueue(&mut self, id: JobId, ready_at: Timestamp) {
        let now = self.data.now;
        let job = self.job_mut_expect(id);
        job.ready_at = ready_at;
        job.updated_at = now;
        let stream = job.stream;
        if ready_at <= now {
            job.status = JobStatus::Queued;
            let key = job.ready_key(id);
            let s = self.stream_idx_mut(stream);
            s.ready.insert(key);
            s.pending.insert(id);
            s.stats.queued += 1;
        } else {
            job.status = JobStatus::Delayed;
            self.index.delayed.insert((ready_at, id));
            let s = self.stream_idx_mut(stream);
            s.pending.insert(id);
            s.stats.delayed += 1;
        }
    }

    /// Record a failed attempt on a job whose lease has ended: retry after the
    /// backoff while attempts are left, else Dead.
    fn after_failed_attempt(&mut self, id: JobId, error: ErrorRecord) -> FailDisposition {
        let now = self.data.now;
        let job = self.job_mut_expect(id);
        job.output_mut().error = Some(error);
        let (stream, attempts) = (job.stream, job.attempts);
        let s = self.stream_idx_mut(stream);
        s.stats.failed_attempts_total += 1;
        if attempts >= s.props.max_attempts {
            s.stats.dead += 1;
            let job = self.job_mut_expect(id);
            job.status = JobStatus::Dead;
            job.updated_at = now;
            self.finished(id);
            FailDisposition::Dead
        } else {
            let ready_at = now.saturating_add_ms(s.props.backoff_after(attempts));
            self.enqueue(id, ready_at);
            FailDisposition::Retry { ready_at }
        }
    }

    // ---- streams ----------------------------------------------------------

    fn create_stream(&mut self, name: &StreamName, props: &StreamProps) -> ApplyResult {
        if self.data.stream_names.contains_key(name) {
            return Err(ApplyError::StreamExists(name.clone()));
        }
        // Stream ids are never reused (a job's stream is its id), so once
        // they are all spent no stream can be created any more.
        let idx = self.data.next_stream;
        let Some(next) = idx.checked_add(1) else {
            return Err(ApplyError::Invalid(format!(
                "stream {name} cannot be created: all {idx} stream ids have been used (ids are never reused)"
            )));
        };
        self.data.next_stream = next;
        self.data.stream_names.insert(name.clone(), idx);
        self.data.streams.insert(idx, Stream::new(name.clone(), props.clone(), self.data.now));
        Ok(Outcome::StreamCreated)
    }

    fn update_stream(&mut self, name: &StreamName, patch: &StreamPatch) -> ApplyResult {
        let idx = self.stream_idx(name)?;
        let s = self.stream_idx_mut(idx);
        let props = s.props.patched(patch);
        props.validate()?;
        let retain_changed = props.retain_ms != s.props.retain_ms;
        if !retain_changed {
            s.props = props;
            return Ok(Outcome::StreamUpdated);
        }
        // Its finished jobs are forgotten at new times: one scan of the
        // job table, as a purge does.
        let finished = self.stream_jobs(idx, |j| j.status.is_final(), usize::MAX);
        for &id in &finished {
            self.unfinished(id);
        }
        self.stream_idx_mut(idx).props = props;
        for &id in &finished {
            self.finished(id);
        }
        Ok(Outcome::StreamUpdated)
    }

    fn delete_stream(&mut self, name: &StreamName, force: bool) -> ApplyResult {
        let idx = self.stream_idx(name)?;
        let live = self.data.streams[&idx].stats.live();
        if live > 0 && !force {
            return Err(ApplyError::StreamHasLiveJobs { name: name.clone(), live });
        }
        let ids = self.stream_jobs(idx, |_| true, usize::MAX);
        for &id in &ids {
            if self.data.jobs[&id].status.is_final() {
                self.unfinished(id);
            }
            if let Some(job) = self.data.jobs.remove(&id) {
                if let Some(lease) = &job.lease {
                    self.index.expiries.remove(&(lease.expires_at, id));
                }
                if job.status == JobStatus::Delayed {
                    self.index.delayed.remove(&(job.ready_at, id));
                }
            }
        }
        self.data.streams.remove(&idx);
        self.data.stream_names.remove(name);
        Ok(Outcome::StreamDeleted { jobs_removed: ids.len() as u64 })
    }

    /// [`Command::Purge`]: a finished job is in no index but `forget`, so
    /// it goes with that entry, its count and its idempotency key.
    fn purge(&mut self, name: &StreamName, older_than_ms: u64, max: u32) -> ApplyResult {
        let idx = self.stream_idx(name)?;
        let now = self.data.now;
        let old_enough = |j: &Job| j.status.is_final() && now.since(j.updated_at) >= older_than_ms;
        let ids = self.stream_jobs(idx, old_enough, max as usize);
        for &id in &ids {
            self.unfinished(id);
            self.forget_job(id);
        }
        Ok(Outcome::Purged { jobs_removed: ids.len() as u64 })
    }

    // ---- modules and submit -----------------------------------------------

    fn put_module(&mut self, hash: ModuleHash, bytes: &[u8]) -> ApplyResult {
        let actual = ModuleHash::of(bytes);
        if actual != hash {
            return Err(ApplyError::ModuleHashMismatch { claimed: hash, actual });
        }
        let new = !self.data.modules.contains_key(&hash);
        if new {
            self.data.modules.insert(hash, Arc::from(bytes));
        }
        Ok(Outcome::ModuleStored { new })
    }

    fn submit(&mut self, stream: &StreamName, jobs: &[NewJob]) -> ApplyResult {
        let idx = self.stream_idx(stream)?;
        // Check everything before changing anything.
        let mut keys_in_batch = BTreeMap::new();
        for job in jobs {
            if !self.data.modules.contains_key(&job.module) {
                return Err(ApplyError::UnknownModule(job.module));
            }
            if let Some(key) = &job.key {
                if keys_in_batch.insert(key, ()).is_some() {
                    return Err(ApplyError::DuplicateKeyInBatch { stream: stream.clone(), key: key.clone() });
                }
            }
        }
        // Job ids are never reused: once they are spent (2^64 - 1 of them,
        // which no cluster reaches), a submit is refused, never wrapped.
        if self.data.next_job.checked_add(jobs.len() as u64).is_none_or(|n| n == u64::MAX) {
            return Err(ApplyError::Invalid(format!(
                "stream {stream}: no job id is left for {} more jobs (ids are never reused)",
                jobs.len()
            )));
        }
        let now = self.data.now;
        let mut out = Vec::with_capacity(jobs.len());
        for new in jobs {
            let id = JobId(self.data.next_job);
            let s = self.data.streams.get_mut(&idx).expect("checked above");
            if let Some(&existing) = new.key.as_ref().and_then(|k| s.keys.get(k)) {
                let status = self.data.jobs[&existing].status;
                out.push(Submitted { job: existing, existing: true, status });
                continue;
            }
            self.data.next_job += 1;
            let priority = new.priority.unwrap_or(s.props.default_priority);
            s.stats.submitted_total += 1;
            if let Some(key) = &new.key {
                s.keys.insert(key.clone(), id);
            }
            let JobSpec { args, env, input } = &new.spec;
            let extra = (!args.is_empty() || !env.is_empty() || new.key.is_some())
                .then(|| Box::new(JobExtra { args: args.clone(), env: env.clone(), key: new.key.clone() }));
            let job = Job {
                stream: idx,
                priority,
                attempts: 0,
                status: JobStatus::Queued,
                module: new.module,
                input: input.clone().into_boxed_slice(),
                extra,
                output: None,
                lease: None,
                last_peer: 0,
                ready_at: now,
                created_at: now,
                updated_at: now,
            };
            self.data.jobs.insert(id, job);
            self.enqueue(id, now.saturating_add_ms(new.delay_ms));
            let status = self.data.jobs[&id].status;
            out.push(Submitted { job: id, existing: false, status });
        }
        Ok(Outcome::Submitted(out))
    }

    /// [`Command::SubmitRan`]: the outcomes of its submit, its lease and
    /// its completions (one per `ran`), as a batch.
    fn submit_ran(
        &mut self,
        token: FencingToken,
        stream: &StreamName,
        jobs: &[NewJob],
        peer: PeerId,
        max: u32,
        ran: &[Ran],
    ) -> Outcome {
        let mut submitted = self.submit(stream, jobs);
        let leased = self.lease(token, peer, std::slice::from_ref(stream), max);
        let completed = match (&submitted, &leased) {
            (Err(e), _) => Err(e.clone()),
            (Ok(Outcome::Submitted(subs)), leased) => {
                debug_assert_eq!(subs.len(), jobs.len());
                let grants = match leased {
                    Ok(Outcome::Leased(g)) => g.as_slice(),
                    _ => &[],
                };
                Ok(Outcome::Completed(
                    ran.iter()
                        .map(|r| {
                            // Validated: every index is a job of the submit.
                            let sub = subs[r.index as usize];
                            let granted = !sub.existing
                                && grants.iter().any(|g| g.job == sub.job && RunLimits::of(g) == r.limits);
                            if !granted {
                                return Err(LeaseError::NotGranted { job: sub.job });
                            }
                            let c = Completion {
                                job: sub.job,
                                token,
                                result: r.result.clone(),
                                stderr_tail: r.stderr_tail.clone(),
                            };
                            self.complete(peer, &c)
                        })
                        .collect(),
                ))
            }
            (Ok(other), _) => unreachable!("a submit answered {other:?}"),
        };
        // The statuses once the whole entry is applied: the client learns
        // from its acknowledgement which jobs are done.
        if let Ok(Outcome::Submitted(subs)) = &mut submitted {
            for s in subs {
                s.status = self.data.jobs[&s.job].status;
            }
        }
        Outcome::Batch(vec![submitted, leased, completed])
    }

    // ---- leases -----------------------------------------------------------

    fn lease(&mut self, token: FencingToken, peer: PeerId, streams: &[StreamName], max: u32) -> ApplyResult {
        let p = self.data.peers.get(&peer).ok_or(ApplyError::UnknownPeer(peer))?;
        if p.draining || max == 0 {
            return Ok(Outcome::Leased(Vec::new()));
        }
        let candidates: Vec<StreamIdx> = if streams.is_empty() {
            self.data.streams.keys().copied().collect()
        } else {
            let mut v = Vec::with_capacity(streams.len());
            for name in streams {
                // An unknown stream in a lease request is not an error: it may
                // have been deleted since the peer last looked.
                if let Some(&idx) = self.data.stream_names.get(name) {
                    v.push(idx);
                }
            }
            v.sort_unstable();
            v.dedup();
            v
        };
        let now = self.data.now;
        let sec = now.0 / 1000;
        // How many each stream may grant to this peer now: (leases the peer
        // holds there, the stream's last grant, stream, allowance).
        let mut allowance: Vec<(u32, u64, StreamIdx, u32)> = Vec::new();
        for idx in candidates {
            let s = self.stream_idx_mut(idx);
            if s.ready.is_empty() || !s.leases_to(peer) {
                continue;
            }
            if s.props.spawn_frequency.is_some() && s.window_sec != sec {
                s.window_sec = sec;
                s.window_leases = 0;
            }
            let n = s.lease_allowance(peer, sec).min(u32::try_from(s.ready.len()).unwrap_or(u32::MAX));
            if n > 0 {
                let held = s.leased_by_peer.get(&peer).copied().unwrap_or(0);
                allowance.push((held, s.last_lease, idx, n));
            }
        }
        // Round robin across streams, one job at a time, so one busy stream
        // cannot starve the others of this peer's slots. The streams in which
        // the peer holds the fewest leases go first, then the one that granted
        // least recently: a worker leases for the slots that free up, one at
        // a time, so its successive small requests take turns too.
        allowance.sort_unstable();
        let mut grants = Vec::new();
        let mut left = max;
        // The grants carry their jobs' inputs: past LEASE_GRANT_BYTES no
        // more are taken, so the answer always fits in a message (a lease
        // granted in an answer too large to send would be lost, and cost
        // its job an attempt).
        let mut bytes = 0usize;
        while left > 0 && !allowance.is_empty() {
            allowance.retain_mut(|(_, _, idx, n)| {
                if left == 0 || *n == 0 {
                    return *n > 0;
                }
                let g = self.grant(token, peer, *idx);
                bytes = bytes.saturating_add(grant_bytes(&g));
                grants.push(g);
                *n -= 1;
                left = if bytes >= LEASE_GRANT_BYTES { 0 } else { left - 1 };
                *n > 0
            });
        }
        Ok(Outcome::Leased(grants))
    }

    fn grant(&mut self, token: FencingToken, peer: PeerId, idx: StreamIdx) -> LeaseGrant {
        let now = self.data.now;
        let s = self.stream_idx_mut(idx);
        let (_, _, id) = s.ready.pop_first().expect("grant from an empty ready queue");
        s.pending.remove(&id);
        s.stats.queued -= 1;
        s.stats.leased += 1;
        s.window_leases = s.window_leases.saturating_add(1);
        s.last_lease = token.0;
        *s.leased_by_peer.entry(peer).or_default() += 1;
        let props = s.props.clone();
        let stream = s.name.clone();
        let expires_at = now.saturating_add_ms(props.lease_ttl_ms);
        self.index.expiries.insert((expires_at, id));
        let job = self.job_mut_expect(id);
        job.status = JobStatus::Leased;
        job.attempts += 1;
        job.lease = Some(Box::new(Lease { peer, token, expires_at }));
        job.last_peer = peer.0;
        job.updated_at = now;
        let spec = JobSpec {
            args: job.extra.as_ref().map(|e| e.args.clone()).unwrap_or_default(),
            env: job.extra.as_ref().map(|e| e.env.clone()).unwrap_or_default(),
            input: job.input.to_vec(),
        };
        LeaseGrant {
            job: id,
            stream,
            token,
            expires_at,
            attempt: job.attempts,
            module: job.module,
            spec,
            job_timeout_ms: props.job_timeout_ms,
            fuel: props.fuel,
            memory_limit_bytes: props.memory_limit_bytes,
            lease_ttl_ms: props.lease_ttl_ms,
        }
    }

    /// Check that `p` presents the job's current, live lease.
    fn check_lease(&self, p: &Presented) -> Result<(), LeaseError> {
        let job = self.data.jobs.get(&p.job).ok_or(LeaseError::UnknownJob { job: p.job })?;
        let lease = job.lease.as_ref().ok_or(LeaseError::NotLeased { job: p.job, status: job.status })?;
        // PLANTED BUG (simulator only, off unless `plant_bug` was called):
        // accept a stale fencing token.
        if lease.token != p.token && self.planted != crate::PlantedBug::AcceptStaleToken {
            return Err(LeaseError::StaleToken { job: p.job, presented: p.token, current: lease.token });
        }
        if lease.peer != p.peer {
            return Err(LeaseError::WrongPeer { job: p.job, holder: lease.peer, peer: p.peer });
        }
        // Expired leases were ended by `advance_time` before this command.
        debug_assert!(lease.expires_at > self.data.now);
        Ok(())
    }

    fn renew(&mut self, p: Presented) -> Result<Timestamp, LeaseError> {
        self.check_lease(&p)?;
        let now = self.data.now;
        let job = self.job_mut_expect(p.job);
        let stream = job.stream;
        let ttl = self.data.streams[&stream].props.lease_ttl_ms;
        let expires_at = now.saturating_add_ms(ttl);
        let job = self.job_mut_expect(p.job);
        let lease = job.lease.as_mut().expect("checked");
        let old = std::mem::replace(&mut lease.expires_at, expires_at);
        let was = std::mem::replace(&mut job.status, JobStatus::Running);
        job.updated_at = now;
        self.index.expiries.remove(&(old, p.job));
        self.index.expiries.insert((expires_at, p.job));
        if was == JobStatus::Leased {
            let s = self.stream_idx_mut(stream);
            s.stats.leased -= 1;
            s.stats.running += 1;
        }
        Ok(expires_at)
    }

    fn complete(&mut self, peer: PeerId, c: &Completion) -> Result<(), LeaseError> {
        self.check_lease(&Presented { peer, job: c.job, token: c.token })?;
        self.end_lease(c.job);
        let now = self.data.now;
        let job = self.job_mut_expect(c.job);
        job.status = JobStatus::Succeeded;
        job.updated_at = now;
        let stream = job.stream;
        let out = job.output_mut();
        out.result = Some(c.result.clone());
        out.stderr_tail = c.stderr_tail.clone();
        let s = self.stream_idx_mut(stream);
        s.stats.succeeded += 1;
        s.stats.completed_total += 1;
        self.finished(c.job);
        Ok(())
    }

    fn fail(&mut self, peer: PeerId, f: &Failure) -> Result<FailDisposition, LeaseError> {
        self.check_lease(&Presented { peer, job: f.job, token: f.token })?;
        self.end_lease(f.job);
        let out = self.job_mut_expect(f.job).output_mut();
        out.stdout_tail = f.stdout_tail.clone();
        out.stderr_tail = f.stderr_tail.clone();
        Ok(self.after_failed_attempt(f.job, f.error.clone().bounded()))
    }

    fn release(&mut self, p: Presented) -> Result<(), LeaseError> {
        self.check_lease(&p)?;
        self.release_unchecked(p.job);
        Ok(())
    }

    /// Hand a job back without counting the attempt; it keeps its place.
    fn release_unchecked(&mut self, id: JobId) {
        self.end_lease(id);
        let job = self.job_mut_expect(id);
        job.attempts = job.attempts.saturating_sub(1);
        let ready_at = job.ready_at;
        self.enqueue(id, ready_at);
    }

    // ---- cancel and retry ---------------------------------------------------

    fn cancel(&mut self, id: JobId) -> ApplyResult {
        let job = self.data.jobs.get(&id).ok_or(ApplyError::UnknownJob(id))?;
        let (status, stream, key, ready_at) = (job.status, job.stream, job.ready_key(id), job.ready_at);
        match status {
            JobStatus::Queued | JobStatus::Delayed => {
                let s = self.stream_idx_mut(stream);
                *s.stats.count_mut(status) -= 1;
                s.ready.remove(&key);
                s.pending.remove(&id);
                self.index.delayed.remove(&(ready_at, id));
            }
            JobStatus::Leased | JobStatus::Running => self.end_lease(id),
            JobStatus::Succeeded | JobStatus::Dead | JobStatus::Cancelled => {
                return Err(ApplyError::InvalidTransition { job: id, status, op: "cancel".into() })
            }
        }
        let now = self.data.now;
        let job = self.job_mut_expect(id);
        job.status = JobStatus::Cancelled;
        job.updated_at = now;
        self.stream_idx_mut(stream).stats.cancelled += 1;
        self.finished(id);
        Ok(Outcome::Cancelled)
    }

    fn retry(&mut self, id: JobId) -> ApplyResult {
        let job = self.data.jobs.get(&id).ok_or(ApplyError::UnknownJob(id))?;
        let status = job.status;
        if !matches!(status, JobStatus::Dead | JobStatus::Cancelled) {
            return Err(ApplyError::InvalidTransition { job: id, status, op: "retry".into() });
        }
        let stream = job.stream;
        self.unfinished(id);
        *self.stream_idx_mut(stream).stats.count_mut(status) -= 1;
        self.job_mut_expect(id).attempts = 0;
        let now = self.data.now;
        self.enqueue(id, now);
        Ok(Outcome::Retried)
    }

    // ---- peers --------------------------------------------------------------

    fn register_peer(&mut self, info: &PeerInfo, role: PeerRole) -> Outcome {
        self.data.next_peer += 1;
        let id = PeerId(self.data.next_peer);
        let now = self.data.now;
        self.data.peers.insert(
            id,
            Peer { info: info.clone(), role, draining: false, registered_at: now, last_heartbeat: now, rss_bytes: 0 },
        );
        Outcome::PeerRegistered { peer: id }
    }

    fn remove_peer(&mut self, peer: PeerId) -> ApplyResult {
        if !self.data.peers.contains_key(&peer) {
            return Err(ApplyError::UnknownPeer(peer));
        }
        let held: Vec<JobId> = self
            .index
            .expiries
            .iter()
            .filter(|(_, id)| self.data.jobs[id].lease.as_ref().is_some_and(|l| l.peer == peer))
            .map(|&(_, id)| id)
            .collect();
        for id in held {
            self.release_unchecked(id);
        }
        self.data.peers.remove(&peer);
        Ok(Outcome::PeerUpdated)
    }

    // ---- lookups --------------------------------------------------------------

    fn stream_idx(&self, name: &StreamName) -> Result<StreamIdx, ApplyError> {
        self.data.stream_names.get(name).copied().ok_or_else(|| ApplyError::UnknownStream(name.clone()))
    }

    fn stream_mut(&mut self, name: &StreamName) -> Result<&mut Stream, ApplyError> {
        let idx = self.stream_idx(name)?;
        Ok(self.stream_idx_mut(idx))
    }

    fn stream_idx_mut(&mut self, idx: StreamIdx) -> &mut Stream {
        self.data.streams.get_mut(&idx).expect("a job's stream exists (invariant)")
    }

    /// The ids of at most `max` jobs of stream `idx` that pass `keep`,
    /// oldest first: one scan of the whole job table.
    fn stream_jobs(&self, idx: StreamIdx, keep: impl Fn(&Job) -> bool, max: usize) -> Vec<JobId> {
        let jobs = self.data.jobs.iter().filter(|(_, j)| j.stream == idx && keep(j));
        jobs.map(|(id, _)| id).take(max).collect()
    }

    fn job_mut_expect(&mut self, id: JobId) -> &mut Job {
        self.data.jobs.get_mut(&id).expect("an indexed job exists (invariant)")
    }

    fn peer_mut(&mut self, peer: PeerId) -> Result<&mut Peer, ApplyError> {
        self.data.peers.get_mut(&peer).ok_or(ApplyError::UnknownPeer(peer))
    }
}

/// The most finished jobs one command forgets for their streams'
/// retention (each as cheap as a purged one): a day of jobs finished at
/// once goes over the commands that follow, none of them long.
pub const FORGET_PER_COMMAND: usize = 1024;

/// The most bytes of job specs one lease grants (more only by the one job
/// that passes it): a quarter of the largest message, so a worker's answer
/// always fits, whatever its other parts.
pub const LEASE_GRANT_BYTES: usize = impetus_proto::limits::MAX_MESSAGE_BYTES / 4;

/// What a grant's spec takes (input, arguments, environment), roughly as
/// encoded: what [`LEASE_GRANT_BYTES`] counts.
pub fn grant_bytes(g: &LeaseGrant) -> usize {
    const PER_ITEM: usize = 8;
    let spec = &g.spec;
    let args = spec.args.iter().map(|a| a.len() + PER_ITEM).sum::<usize>();
    let env = spec.env.iter().map(|(k, v)| k.len() + v.len() + 2 * PER_ITEM).sum::<usize>();
    spec.input.len().saturating_add(args).saturating_add(env).saturating_add(128)
}
