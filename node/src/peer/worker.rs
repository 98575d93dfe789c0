//! The worker loop: lease, run, renew, report.
//!
//! Each turn it gathers everything it has to say — results of finished jobs,
//! renewals of leases that are a third through their TTL, a lease request for
//! its free slots, a heartbeat, a tick when the state has a deadline due — and
//! sends it as one command (group commit). Results that could not be sent are
//! kept and sent again; a completion the state machine rejects (stale token)
//! is dropped, because the job already belongs to someone else. A turn
//! carries at most [`REPORT_BYTES`] of results (and [`MAX_BATCH`] of each
//! kind); the rest goes in the turns that follow at once, so a pile of large
//! results never makes a request the cluster refuses, turn after turn. A
//! stopping peer stops only once its results are sent (or
//! [`REPORT_AFTER_GRACE`] after its grace period, if the cluster cannot be
//! reached).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use impetus_proto::api::{Reconcile, WorkRequest};
use impetus_proto::limits::{MAX_BATCH, MAX_MESSAGE_BYTES};
use impetus_proto::{
    ApplyError, Command, Completion, ErrorKind, ErrorRecord, Failure, FencingToken, JobId, LeaseGrant, Outcome,
    StreamName, Timestamp,
};

use super::{Attempt, Consensus, ConsensusError, Inner, JobRunner, RunReport, Runtime};

/// Most bytes of results (outputs, tails, error texts) one turn carries: a
/// quarter of the largest request, so that the rest of the turn always fits.
pub const REPORT_BYTES: usize = MAX_MESSAGE_BYTES / 4;

/// How long after its grace period a stopping peer goes on trying to send
/// the results it holds when the cluster cannot be reached.
pub const REPORT_AFTER_GRACE: Duration = Duration::from_secs(10);

/// How long after a turn that asked for a lease failed (or a fused submit's
/// write did) the worker's turns reconcile its leases with the cluster
/// ([`WorkRequest::reconcile`]): the write that granted them may commit a
/// while after it failed here (a forwarded request given up while the
/// leader still works on it, an entry the next leader commits after its
/// election, ~2 s).
pub const RECONCILE_FOR: Duration = Duration::from_secs(5);

/// Per-record room a report takes besides its bytes (ids, token, kind).
const REPORT_OVERHEAD: usize = 64;

fn completion_bytes(c: &Completion) -> usize {
    REPORT_OVERHEAD + c.result.len() + c.stderr_tail.len()
}

fn failure_bytes(f: &Failure) -> usize {
    let e = &f.error;
    REPORT_OVERHEAD
        + e.error.len()
        + e.name.len()
        + e.statement.as_ref().map_or(0, String::len)
        + f.stdout_tail.len()
        + f.stderr_tail.len()
}

/// Take the oldest reports that fit in one turn: at most `budget` bytes
/// (but always the first, which the bounds on a result keep far below
/// it) and [`MAX_BATCH`] of each kind. What stays is for the next turns.
fn take_reports(
    completions: &mut Vec<Completion>,
    failures: &mut Vec<Failure>,
    budget: usize,
) -> (Vec<Completion>, Vec<Failure>) {
    let mut used = 0usize;
    let mut fits = |bytes: usize| {
        let ok = used == 0 || used.saturating_add(bytes) <= budget;
        if ok {
            used = used.saturating_add(bytes);
        }
        ok
    };
    let c = completions.iter().take(MAX_BATCH).take_while(|c| fits(completion_bytes(c))).count();
    let f = failures.iter().take(MAX_BATCH).take_while(|f| fits(failure_bytes(f))).count();
    (completions.drain(..c).collect(), failures.drain(..f).collect())
}

/// A job this peer is running.
struct Running {
    stream: StreamName,
    token: FencingToken,
    /// When to renew its lease, on this peer's monotonic clock
    /// ([`Runtime::monotonic`]): a third of the TTL after the grant or last
    /// renewal was asked for ([`renew_at`]).
    renew_at: Duration,
    /// The lease was lost (renewal refused): no more renewals; the result
    /// is still reported and the state machine refuses its stale token.
    lost: bool,
}

/// When a lease asked for (granted or renewed) at `asked` on this peer's
/// monotonic clock is renewed: a third of its TTL later, on the same clock.
/// Never from the lease's expiry, which is in the state's time: a peer
/// whose clock is behind the cluster's by more than two thirds of the TTL
/// would renew too late, every time, and lose every long job; nor on the
/// wall clock, which a step back would make late just the same.
fn renew_at(asked: Duration, ttl_ms: u64) -> Duration {
    asked.saturating_add(Duration::from_millis(ttl_ms / 3))
}

/// What each part of a batch was, to read its outcome.
enum Sent {
    Complete,
    Fail,
    Renew(Vec<JobId>),
    Other,
}

type Done = (JobId, FencingToken, RunReport);

/// What reaches the worker loop from elsewhere, in order: a job granted by
/// a fused submit ([`super::Peer::unfuse`]) and already started, before
/// any report of it; a finished job.
pub(crate) enum Event {
    Granted(LeaseGrant),
    Done(Done),
}

pub(super) async fn run<R: Runtime, C: Consensus, X: JobRunner>(
    inner: Arc<Inner<R, C, X>>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) {
    let mut w = Worker {
        inner: inner.clone(),
        running: BTreeMap::new(),
        completions: Vec::new(),
        failures: Vec::new(),
        releases: Vec::new(),
        tracked: BTreeMap::new(),
        last_heartbeat: Timestamp::ZERO,
        grace_deadline: None,
        said_removed: false,
        reconcile_until: None,
    };
    let poll = inner.cfg.poll_interval;
    // A job granted by a fused submit only needs tracking: a turn then
    // would have nothing to say and take a core from the job starting.
    // Without a turn the earlier deadline stands, so that a run of grants
    // cannot put off heartbeats and renewals.
    let mut turn = true;
    let mut deadline = Timestamp::ZERO;
    loop {
        // Looked at only when a reconcile may be due (it reads the Raft
        // status and the state): otherwise the turn does not reconcile.
        let fused = if w.reconcile_until.is_some() || inner.slots.is_unsure() {
            FusedView::now(&inner)
        } else {
            FusedView { quiet: false, through: None }
        };
        while let Ok(event) = rx.try_recv() {
            turn |= w.event(event);
        }
        if turn {
            let (finished, again) = w.turn(fused).await;
            if finished {
                break;
            }
            if again {
                continue;
            }
        }
        let now = inner.rt.now();
        let next = now.saturating_add_ms(w.next_wait(poll).as_millis() as u64);
        deadline = if turn { next } else { deadline.min(next) };
        let wait = Duration::from_millis(deadline.since(now));
        turn = tokio::select! {
            biased;
            Some(event) = rx.recv() => w.event(event),
            () = inner.wake.notified() => true,
            () = inner.rt.sleep(wait) => true,
        };
    }
    inner.stopped_flag.store(true, Ordering::SeqCst);
    inner.stopped.notify_waiters();
    tracing::info!(peer = %inner.id, "worker stopped");
}

struct Worker<R, C, X> {
    inner: Arc<Inner<R, C, X>>,
    running: BTreeMap<JobId, Running>,
    completions: Vec<Completion>,
    failures: Vec<Failure>,
    /// Leases of jobs a stopping peer gave up on, to hand back.
    releases: Vec<(JobId, FencingToken)>,
    /// Streams this peer works on: when they last had work for it, and
    /// their idle timeout (ms).
    tracked: BTreeMap<StreamName, (Timestamp, u64)>,
    last_heartbeat: Timestamp,
    grace_deadline: Option<Timestamp>,
    /// Whether this peer has said that the cluster no longer has it.
    said_removed: bool,
    /// Until when (on the monotonic clock) its turns reconcile this peer's
    /// leases ([`RECONCILE_FOR`]).
    reconcile_until: Option<Duration>,
}

/// What the worker loop knew of fused submits ([`super::Peer::fuse`])
/// before it took its events, so that reconciling never hands back a lease
/// one of them granted while the job runs.
#[derive(Clone, Copy, Debug)]
struct FusedView {
    /// No fused submit was under way ([`super::Slots::fusing`]): one that
    /// ended had sent its grants to the loop before, so they are taken
    /// with the events.
    quiet: bool,
    /// On the leader, its applied index, read before `quiet`: a fused
    /// submit that starts after that is written at a later index, and so
    /// are its grants' tokens ([`Reconcile::through`]). Elsewhere no fused
    /// submit starts.
    through: Option<u64>,
}

impl FusedView {
    fn now<R: Runtime, C: Consensus, X: JobRunner>(inner: &Inner<R, C, X>) -> FusedView {
        let status = inner.consensus.status();
        let through =
            (status.leader == Some(status.node)).then(|| inner.consensus.read(impetus_queue::State::applied_index));
        FusedView { quiet: inner.slots.fusing() == 0, through }
    }
}

/// Run a job granted by a fused submit: the worker loop learns of it first
/// (renewals, its report), then it starts. Its slot is already taken.
pub(super) fn run_granted<R: Runtime, C: Consensus, X: JobRunner>(inner: &Arc<Inner<R, C, X>>, g: LeaseGrant) {
    tracing::trace!(target: crate::LATENCY, job = %g.job, "granted job starts");
    if inner.events.send(Event::Granted(g.clone())).is_err() {
        // The worker loop has stopped: the lease expires and the job runs elsewhere.
        inner.slots.give(1);
        return;
    }
    spawn_run(inner.clone(), g);
}

/// Run a leased job (compiling its module first if this peer has not) and
/// report it to the worker loop.
fn spawn_run<R: Runtime, C: Consensus, X: JobRunner>(inner: Arc<Inner<R, C, X>>, g: LeaseGrant) {
    let (job, token) = (g.job, g.token);
    let attempt = Attempt::of(&g);
    let events = inner.events.clone();
    let done = super::runner::reported_once(g.module, move |report: RunReport| {
        tracing::trace!(target: crate::LATENCY, %job, "job ran");
        // The loop may have stopped (grace period over); then the lease was released.
        let _ = events.send(Event::Done((job, token, report)));
    });
    if inner.runner.is_prepared(&g.module) {
        inner.runner.start(&inner.rt, attempt, done);
        return;
    }
    let rt = inner.rt.clone();
    rt.spawn(async move {
        // Compile once per peer; a replica that lags fetches the bytes.
        let prepared = match inner.consensus.module(g.module).await {
            Some(bytes) => inner.runner.prepare(g.module, bytes).await,
            None => Err(format!("module {} is not stored", g.module)),
        };
        match prepared {
            Ok(()) => inner.runner.start(&inner.rt, attempt, done),
            Err(why) => done(RunReport {
                result: Err(ErrorRecord::new(ErrorKind::Module, why)),
                stdout_tail: vec![],
                stderr_tail: vec![],
            }),
        }
    });
}

impl<R: Runtime, C: Consensus, X: JobRunner> Worker<R, C, X> {
    /// Take in `event`; whether it calls for a turn (a result to report).
    fn event(&mut self, event: Event) -> bool {
        match event {
            Event::Granted(g) => {
                self.track_running(self.inner.rt.monotonic(), g);
                false
            }
            Event::Done(done) => {
                self.finished(done);
                true
            }
        }
    }

    fn finished(&mut self, (job, token, report): Done) {
        // A late report of an earlier attempt must not take the entry of a
        // newer lease on the same job.
        if self.running.get(&job).map(|r| r.token) != Some(token) {
            tracing::debug!(%job, %token, "report of a superseded attempt dropped");
            return;
        }
        let Some(r) = self.running.remove(&job) else { return };
        self.inner.slots.give(1);
        if r.lost {
            // Report it all the same: the fencing token, not this peer's
            // guess, decides; the cluster refuses it unless the lease is
            // still this one.
            tracing::info!(%job, %token, "job finished after its lease was lost; reporting it with its old token");
        }
        match report.result {
            Ok(result) => self.completions.push(Completion { job, token, result, stderr_tail: report.stderr_tail }),
            Err(error) => self.failures.push(Failure {
                job,
                token,
                error,
                stdout_tail: report.stdout_tail,
                stderr_tail: report.stderr_tail,
            }),
        }
    }

    /// Reconcile this peer's leases with its turns for [`RECONCILE_FOR`]
    /// from `mono` (the monotonic clock).
    fn reconcile_from(&mut self, mono: Duration) {
        self.reconcile_until = Some(mono.saturating_add(RECONCILE_FOR));
    }

    /// One round trip to consensus. Returns (stop now, go again at once).
    /// `fused`: what it knew of fused submits before the events were taken.
    async fn turn(&mut self, fused: FusedView) -> (bool, bool) {
        let inner = self.inner.clone();
        let now = inner.rt.now();
        let mono = inner.rt.monotonic();
        tracing::trace!(target: crate::LATENCY, completions = self.completions.len(), "worker turn");
        let me = inner.id;
        let stopping = inner.stopping.load(Ordering::SeqCst);
        if stopping && self.grace_deadline.is_none() {
            self.grace_deadline = Some(now.saturating_add_ms(inner.cfg.shutdown_grace.as_millis() as u64));
            tracing::info!(peer = %me, running = self.running.len(), "stopping: no new leases, finishing running jobs");
        }

        // Taken out of the cluster: nothing this peer reports is accepted
        // and its leases went with its registry entry, so its running jobs
        // (which run again elsewhere) are not waited for.
        if stopping && inner.removed.load(Ordering::SeqCst) {
            if !self.running.is_empty() {
                tracing::info!(peer = %me, dropped = self.running.len(), "taken out of the cluster: running jobs dropped");
                inner.slots.give(self.running.len() as u32);
                self.running.clear();
            }
            return (true, false);
        }

        // Leases granted in an answer this peer never got go back to their
        // queue (no attempt counted) instead of waiting out their TTL. Not
        // while a fused submit is under way (its grants may be committed
        // before they reach this loop), nor one granted after `fused` was
        // read.
        if inner.slots.take_unsure() {
            self.reconcile_from(mono);
        }
        if self.reconcile_until.is_some_and(|until| mono >= until) {
            self.reconcile_until = None;
        }
        // The leases this peer keeps when it reconciles: the jobs it runs,
        // and those whose reports (or hand-backs) wait to be sent. Listed
        // only then: most turns do not reconcile.
        let keep: Option<Vec<(JobId, FencingToken)>> = (self.reconcile_until.is_some() && fused.quiet).then(|| {
            self.running
                .iter()
                .map(|(&job, r)| (job, r.token))
                .chain(self.completions.iter().map(|c| (c.job, c.token)))
                .chain(self.failures.iter().map(|f| (f.job, f.token)))
                .chain(self.releases.iter().copied())
                .collect()
        });
        let mut cmds = Vec::new();
        let mut sent = Vec::new();
        let (completions, failures) = take_reports(&mut self.completions, &mut self.failures, REPORT_BYTES);
        let more_reports = !self.completions.is_empty() || !self.failures.is_empty();
        if !completions.is_empty() {
            cmds.push(Command::Complete { peer: me, completions: completions.clone() });
            sent.push(Sent::Complete);
        }
        if !failures.is_empty() {
            cmds.push(Command::Fail { peer: me, failures: failures.clone() });
            sent.push(Sent::Fail);
        }
        let renew: Vec<(JobId, FencingToken)> =
            self.running.iter().filter(|(_, r)| !r.lost && mono >= r.renew_at).map(|(&id, r)| (id, r.token)).collect();
        if !renew.is_empty() {
            sent.push(Sent::Renew(renew.iter().map(|(id, _)| *id).collect()));
            cmds.push(Command::Renew { peer: me, leases: renew });
        }
        // A heartbeat lost with its turn is sent again with the next one.
        let heartbeat_before = self.last_heartbeat;
        if now.since(self.last_heartbeat) >= inner.cfg.heartbeat_interval.as_millis() as u64 {
            self.last_heartbeat = now;
            let cmd = Command::Heartbeat { peer: me, info: inner.cfg.info.clone(), rss_bytes: inner.rt.rss_bytes() };
            cmds.push(cmd);
            sent.push(Sent::Other);
        }
        let finishing =
            stopping && (self.running.is_empty() || self.grace_deadline.is_some_and(|deadline| now >= deadline));
        if finishing && !self.running.is_empty() {
            let leases: Vec<_> = self.running.iter().filter(|(_, r)| !r.lost).map(|(&id, r)| (id, r.token)).collect();
            tracing::warn!(peer = %me, released = leases.len(), "grace period over: handing back running jobs");
            self.releases.extend(leases);
            inner.slots.give(self.running.len() as u32);
            self.running.clear();
        }
        let releases = std::mem::take(&mut self.releases);
        if !releases.is_empty() {
            cmds.push(Command::Release { peer: me, leases: releases.clone() });
            sent.push(Sent::Other);
        }
        // A stopping peer leaves once what it holds is sent, or when it has
        // tried long enough past its grace period (a turn that hangs, on a
        // leader that lost its quorum, is given up then too).
        let give_up_at = self.grace_deadline.map(|d| d.saturating_add_ms(REPORT_AFTER_GRACE.as_millis() as u64));
        let all_sent = finishing && !more_reports;
        let status = inner.consensus.status();
        let leader = status.leader == Some(status.node);
        // A lease request holds its slots until answered. On the leader,
        // where submits lease to this peer's free slots themselves
        // (`Peer::fuse`), take them only when its (freshest) state has work.
        let idle_leader = leader && inner.consensus.read(|s| s.leasable_streams(me).is_empty());
        let lease_max = if stopping || idle_leader { 0 } else { inner.slots.take(inner.cfg.max_lease_batch) };
        let reconcile = keep.filter(|k| k.len() <= MAX_BATCH).map(|keep| Reconcile { keep, through: fused.through });
        if cmds.is_empty() && lease_max == 0 && !leader && reconcile.is_none() {
            // Nothing to say and no room: only a leader has a reason to
            // look (a deadline may be due).
            return (all_sent, false);
        }
        let reconciling = reconcile.is_some();
        let req = WorkRequest { peer: me, cmds, lease_max, release_orphans: false, reconcile };
        let work = inner.consensus.work(now, req);
        let replied = match give_up_at {
            Some(at) => tokio::select! {
                biased;
                r = work => r,
                () = inner.rt.sleep(Duration::from_millis(at.since(now))) => {
                    Err(ConsensusError::Unavailable("no answer by the stopping peer's deadline".into()))
                }
            },
            None => work.await,
        };
        let reply = match replied {
            Ok(reply) => reply,
            Err(e) => {
                // Nothing is lost: results (and a heartbeat) are kept and
                // sent again next turn. A lease may have been granted all
                // the same, in the answer that did not come.
                if lease_max > 0 {
                    self.reconcile_from(inner.rt.monotonic());
                }
                inner.slots.give(lease_max);
                self.last_heartbeat = heartbeat_before;
                tracing::warn!(peer = %me, error = %e, "could not reach consensus; will retry");
                let unsent = completions.len() + failures.len() + releases.len();
                self.completions.splice(..0, completions);
                self.failures.splice(..0, failures);
                self.releases.splice(..0, releases);
                let gave_up = give_up_at.is_some_and(|at| inner.rt.now() >= at);
                if finishing && gave_up && (unsent > 0 || more_reports) {
                    tracing::error!(peer = %me, unsent, "stopping without sending these results: the cluster cannot be reached; their jobs run again when their leases expire");
                    return (true, false);
                }
                inner.rt.sleep(inner.cfg.poll_interval).await;
                return (finishing && unsent == 0 && !more_reports, false);
            }
        };
        self.track(now, &reply.streams);
        if reconciling && reply.released > 0 {
            tracing::info!(
                peer = %me,
                released = reply.released,
                "handed back leases granted in an answer this peer never got; their jobs run again, no attempt counted"
            );
        }
        let state_now = reply.now;
        let outcomes = reply.outcomes;
        for (kind, result) in sent.into_iter().zip(outcomes) {
            match (kind, result) {
                (Sent::Complete, Ok(Outcome::Completed(rs))) => {
                    for e in rs.into_iter().filter_map(Result::err) {
                        tracing::warn!(peer = %me, error = %e, "result rejected");
                    }
                }
                (Sent::Fail, Ok(Outcome::Failed(rs))) => {
                    for e in rs.into_iter().filter_map(Result::err) {
                        tracing::warn!(peer = %me, error = %e, "failure report rejected");
                    }
                }
                (Sent::Renew(ids), Ok(Outcome::Renewed(rs))) => {
                    for (id, r) in ids.into_iter().zip(rs) {
                        let Some(run) = self.running.get_mut(&id) else { continue };
                        match r {
                            // Renewed for the TTL the stream grants now (it
                            // may have been changed since the grant).
                            Ok(expires_at) => run.renew_at = renew_at(mono, expires_at.since(state_now).max(1)),
                            Err(e) => {
                                tracing::warn!(peer = %me, job = %id, error = %e, "lease lost while running");
                                run.lost = true;
                            }
                        }
                    }
                }
                // The committed registry does not know this peer: it was
                // taken out of the cluster (`Leave`) while it was away, and
                // its state here is stale. Say so once, and tell the owner
                // of the peer ([`super::Peer::removed`]).
                (_, Err(ApplyError::UnknownPeer(p))) if p == me => {
                    if !self.said_removed {
                        self.said_removed = true;
                        tracing::warn!(
                            peer = %me,
                            "the cluster no longer has this peer (it was taken out while away) and refuses its turns"
                        );
                        self.inner.removed.store(true, Ordering::SeqCst);
                        self.inner.removed_note.notify_waiters();
                    }
                }
                (_, Err(e)) => tracing::warn!(peer = %me, error = %e, "part of a worker command refused"),
                (_, Ok(_)) => {}
            }
        }
        let grants = match reply.leased {
            Some(Ok(Outcome::Leased(grants))) => grants,
            Some(Err(e)) => {
                tracing::warn!(peer = %me, error = %e, "lease refused");
                Vec::new()
            }
            Some(Ok(_)) | None => Vec::new(),
        };
        let granted = grants.len() as u32;
        debug_assert!(granted <= lease_max, "leased {granted}, asked {lease_max}");
        inner.runner.leased(grants.len());
        inner.slots.give(lease_max.saturating_sub(granted));
        // Go again at once while the lease had more to give: it granted all
        // it was asked, or stopped at its byte budget (large jobs).
        let carried = grants.iter().map(impetus_queue::grant_bytes).sum::<usize>();
        let again =
            more_reports || (granted > 0 && (granted == lease_max || carried >= impetus_queue::LEASE_GRANT_BYTES));
        for g in grants {
            self.track_running(mono, g.clone());
            spawn_run(self.inner.clone(), g);
        }
        (all_sent, again)
    }

    /// Follow a job this peer was granted: renew its lease, await its report.
    /// `asked` is on this peer's monotonic clock: when its turn asked for the lease,
    /// or, for a grant of a fused submit, when the loop learned of it
    /// (after the write, and up to one turn later: the loop takes events
    /// between turns), well within the two thirds of the TTL a renewal
    /// leaves.
    fn track_running(&mut self, asked: Duration, g: LeaseGrant) {
        if self.running.get(&g.job).is_some_and(|r| r.token > g.token) {
            // An older grant learned after a newer one of the same job:
            // its run's report would be dropped (a stale token), so its
            // slot is given back now, and the newer lease stays tracked.
            self.inner.slots.give(1);
            return;
        }
        let r = Running { stream: g.stream, token: g.token, renew_at: renew_at(asked, g.lease_ttl_ms), lost: false };
        if let Some(old) = self.running.insert(g.job, r) {
            // The job came back to this peer under a new lease while the run
            // of its lost one goes on: that run's report will be dropped
            // (its token is stale), so its slot is given back now.
            debug_assert_ne!(old.token, g.token, "one grant tracked twice");
            self.inner.slots.give(1);
        }
    }

    /// Follow which streams have work for this peer; forget a stream after
    /// its idle timeout (as impetus v2's Node did).
    fn track(&mut self, now: Timestamp, leasable: &[(StreamName, u64)]) {
        for (name, idle_ms) in leasable {
            if self.tracked.insert(name.clone(), (now, *idle_ms)).is_none() {
                tracing::info!(peer = %self.inner.id, stream = %name, "tracking stream");
            }
        }
        for r in self.running.values() {
            if let Some(t) = self.tracked.get_mut(&r.stream) {
                t.0 = now;
            }
        }
        let id = self.inner.id;
        self.tracked.retain(|name, (last, idle_ms)| {
            let keep = now.since(*last) <= *idle_ms;
            if !keep {
                tracing::info!(peer = %id, stream = %name, "stream idle: no longer tracked");
            }
            keep
        });
    }

    /// How long to sleep: until the next renewal is due, at most `poll`.
    fn next_wait(&self, poll: Duration) -> Duration {
        let mono = self.inner.rt.monotonic();
        let next_renew = self.running.values().filter(|r| !r.lost).map(|r| r.renew_at.saturating_sub(mono)).min();
        match next_renew {
            Some(d) => poll.min(d.max(Duration::from_millis(1))),
            None => poll,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(id: u64, bytes: usize) -> Completion {
        Completion { job: JobId(id), token: FencingToken(1), result: vec![7; bytes], stderr_tail: vec![] }
    }

    fn failure(id: u64, text: usize) -> Failure {
        let error = ErrorRecord::new(ErrorKind::Trap, "x".repeat(text));
        Failure { job: JobId(id), token: FencingToken(1), error, stdout_tail: vec![], stderr_tail: vec![] }
    }

    fn ids<T>(v: &[T], id: impl Fn(&T) -> JobId) -> Vec<u64> {
        v.iter().map(|x| id(x).0).collect()
    }

    #[test]
    fn a_turn_carries_the_oldest_reports_that_fit_and_leaves_the_rest() {
        let (mut c, mut f) = ((0..5).map(|i| completion(i, 1_000)).collect(), vec![failure(9, 1_000)]);
        // Room for three completions of 1,064 bytes.
        let (sent_c, sent_f) = take_reports(&mut c, &mut f, 3_300);
        assert_eq!(ids(&sent_c, |c| c.job), [0, 1, 2]);
        assert!(sent_f.is_empty(), "the budget is spent");
        assert_eq!((ids(&c, |c| c.job), ids(&f, |f| f.job)), (vec![3, 4], vec![9]));
        let (sent_c, sent_f) = take_reports(&mut c, &mut f, 3_300);
        assert_eq!((ids(&sent_c, |c| c.job), ids(&sent_f, |f| f.job)), (vec![3, 4], vec![9]));
        assert!(c.is_empty() && f.is_empty());
    }

    #[test]
    fn failures_take_the_room_completions_leave() {
        let (mut c, mut f) = (vec![completion(0, 2_000), completion(1, 5_000)], vec![failure(9, 100)]);
        let (sent_c, sent_f) = take_reports(&mut c, &mut f, 3_000);
        assert_eq!((ids(&sent_c, |c| c.job), ids(&sent_f, |f| f.job)), (vec![0], vec![9]));
    }

    #[test]
    fn one_report_over_the_budget_still_goes_alone() {
        let (mut c, mut f) = (vec![completion(0, 5_000), completion(1, 10)], vec![]);
        let (sent, _) = take_reports(&mut c, &mut f, 1_000);
        assert_eq!(ids(&sent, |c| c.job), [0], "never stuck behind a large result");
        assert_eq!(ids(&c, |c| c.job), [1]);
    }

    #[test]
    fn a_turn_carries_at_most_a_batch_of_each_kind() {
        let mut c: Vec<Completion> = (0..MAX_BATCH as u64 + 5).map(|i| completion(i, 0)).collect();
        let mut f: Vec<Failure> = (0..3).map(|i| failure(i, 0)).collect();
        let (sent_c, sent_f) = take_reports(&mut c, &mut f, usize::MAX);
        assert_eq!((sent_c.len(), sent_f.len(), c.len()), (MAX_BATCH, 3, 5));
    }

    #[test]
    fn the_report_budget_leaves_room_in_the_largest_request() {
        let most = REPORT_BYTES + completion_bytes(&completion(0, impetus_proto::limits::MAX_RESULT_BYTES));
        assert!(most < MAX_MESSAGE_BYTES / 2, "{most}");
    }
}
