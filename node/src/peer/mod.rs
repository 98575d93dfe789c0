//! The peer's logic, written against traits ([`Runtime`], [`Consensus`],
//! [`JobRunner`]) so the simulator runs exactly this code.
//!
//! - [`Peer::handle`] answers the client protocol: writes go through
//!   consensus (a module is checked by the runner before it is stored), reads
//!   come from the applied state.
//! - The worker loop ([`worker`]) leases jobs, runs them, renews their leases
//!   and reports results, batching everything it has to say into one command.

pub mod consensus;
pub mod early;
pub mod membership;
pub mod runner;
pub mod runtime;
mod service;
mod worker;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use impetus_proto::api::{WorkReply, WorkRequest};
use impetus_proto::{
    ran_results, ApplyResult, Command, JobId, JobStatus, NewJob, Outcome, PeerId, PeerInfo, PeerRole, Ran, StreamName,
    Timestamp,
};
use tokio::sync::Notify;

/// How long a restarted peer tries to catch its replica up before it looks
/// itself up, and then waits for a leader to answer (see [`Peer::start`]):
/// the other members may be starting too (a whole cluster restarted), so
/// this is minutes, said in the log while it lasts; and the pause between
/// tries.
const START_WAIT: Duration = Duration::from_secs(180);
const START_WAIT_STEP: Duration = Duration::from_millis(100);
/// How often a starting peer says it is still waiting for its cluster.
const START_WAIT_SAY: u64 = 5_000;
/// How long setting the registry's draining mark may take.
const DRAIN_MARK_WAIT: Duration = Duration::from_secs(5);

pub use consensus::{serve_work, Consensus, ConsensusError, RaftStatus};
pub use runner::{Attempt, JobRunner, RunReport};
pub use runtime::Runtime;

/// How a peer behaves. Defaults suit a laptop and the tests.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Jobs this peer runs at once, across streams.
    pub capacity: u32,
    /// Most jobs leased in one request.
    pub max_lease_batch: u32,
    /// How often the worker looks for work when nothing wakes it.
    pub poll_interval: Duration,
    pub heartbeat_interval: Duration,
    /// On shutdown, how long running jobs may take before their leases are released.
    pub shutdown_grace: Duration,
    /// The longest the leader holds a submit back for its short jobs to
    /// end, to write their results with it ([`early::EARLY_WAIT`]).
    pub early_wait: Duration,
    pub info: PeerInfo,
}

impl Default for PeerConfig {
    fn default() -> PeerConfig {
        PeerConfig {
            capacity: 16,
            max_lease_batch: 256,
            poll_interval: Duration::from_millis(50),
            heartbeat_interval: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
            early_wait: early::EARLY_WAIT,
            info: PeerInfo::default(),
        }
    }
}

/// Why a peer could not start.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    #[error("could not register this peer: {0}")]
    Register(String),
    /// Its id was issued and is no longer registered: it left the cluster,
    /// or was removed while away. Registering again would give it another
    /// id than its Raft state's.
    #[error(
        "the cluster no longer has this peer ({0}): it left, or was removed while it was away. Its Raft state \
         is stale: start it with a fresh --data-dir (or move DATA_DIR/raft and DATA_DIR/peer-id aside) and \
         it joins again as a new peer"
    )]
    Removed(PeerId),
}

/// This peer's job slots (`capacity` of them), taken by running jobs and by
/// lease requests in flight, so the worker loop and fused submits together
/// never lease more than the peer runs at once.
#[derive(Debug)]
pub(crate) struct Slots {
    capacity: u32,
    taken: AtomicU32,
    /// Fused submits between [`Peer::fuse`] and the end of [`Peer::unfuse`]
    /// (their [`FusedLease`] alive): their grants may be committed before
    /// the worker loop learns of them, so it does not reconcile meanwhile.
    fusing: AtomicU32,
    /// Leases may have been granted to this peer in an answer it never got
    /// (a write that failed, or was given up, may have committed): the
    /// worker loop reconciles its leases with the cluster's next turns.
    unsure: AtomicBool,
}

impl Slots {
    /// Take up to `want` free slots; returns how many were taken.
    pub fn take(&self, want: u32) -> u32 {
        let mut got = 0;
        let _ = self.taken.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
            got = want.min(self.capacity.saturating_sub(t));
            Some(t + got)
        });
        got
    }

    /// Give back `n` slots.
    pub fn give(&self, n: u32) {
        let _ = self.taken.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
            debug_assert!(t >= n, "gave back {n} of {t} slots taken");
            Some(t.saturating_sub(n))
        });
    }

    /// How many fused submits are under way ([`Slots::fusing`]).
    pub fn fusing(&self) -> u32 {
        self.fusing.load(Ordering::SeqCst)
    }

    /// Note that leases may have been granted in a lost answer.
    pub fn set_unsure(&self) {
        self.unsure.store(true, Ordering::SeqCst);
    }

    /// Whether leases may have been granted in a lost answer, not clearing it.
    pub fn is_unsure(&self) -> bool {
        self.unsure.load(Ordering::SeqCst)
    }

    /// Whether leases may have been granted in a lost answer since asked last.
    pub fn take_unsure(&self) -> bool {
        self.unsure.swap(false, Ordering::SeqCst)
    }
}

/// What [`Peer::fuse`] hands to [`Peer::unfuse`] about a client write.
#[derive(Debug)]
pub struct Fused {
    /// The command may make jobs ready ([`Command::may_ready_jobs`]).
    wakes: bool,
    /// A submit fused with a lease for this peer: the slots it holds.
    lease: Option<FusedLease>,
}

/// Dropped (by [`Peer::unfuse`], or with a request that was given up), it
/// gives back the slots still in it and orphans the early runs no grant
/// adopted, so a slot is never lost.
#[derive(Debug)]
struct FusedLease {
    pool: Arc<Slots>,
    /// Slots taken that no early run holds.
    free: u32,
    /// Jobs in the submit.
    jobs: u32,
    /// Jobs of the submit started at once ([`early`]), each holding a slot.
    early: Vec<early::EarlyRun>,
    /// Notified as each early run ends.
    ends: Arc<Notify>,
    /// Early runs whose results are written with the submit (in the order
    /// of the command's `ran`); their slots are counted in `free`.
    carried: Vec<early::EarlyRun>,
    /// The write's outcome is known: its grants (if any) reached the
    /// worker loop. Dropped unsettled, it may have leased jobs to this
    /// peer that nothing here runs.
    settled: bool,
}

impl FusedLease {
    fn new(pool: Arc<Slots>, free: u32, jobs: u32, early: Vec<early::EarlyRun>, ends: Arc<Notify>) -> FusedLease {
        pool.fusing.fetch_add(1, Ordering::SeqCst);
        FusedLease { pool, free, jobs, early, ends, carried: Vec::new(), settled: false }
    }
}

impl Drop for FusedLease {
    fn drop(&mut self) {
        // After every grant of the write went to the worker loop (`unfuse`).
        if !self.settled {
            self.pool.set_unsure();
        }
        let _ = self.pool.fusing.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        self.pool.give(std::mem::take(&mut self.free));
        for e in self.early.drain(..) {
            e.orphan(&self.pool, true);
        }
        for e in self.carried.drain(..) {
            e.settle();
        }
    }
}

pub(crate) struct Inner<R, C, X> {
    pub rt: R,
    pub consensus: C,
    pub runner: X,
    pub cfg: PeerConfig,
    pub id: PeerId,
    pub slots: Arc<Slots>,
    /// To the worker loop: grants from fused submits, finished jobs.
    pub events: tokio::sync::mpsc::UnboundedSender<worker::Event>,
    /// Wakes the worker (new jobs, shutdown).
    pub wake: Notify,
    pub stopping: AtomicBool,
    /// Set by the worker loop when it has finished (all results reported).
    pub stopped: Notify,
    pub stopped_flag: AtomicBool,
    /// Set (and `removed_note` notified) when the cluster answered that its
    /// registry no longer has this peer: it was taken out while away.
    pub removed: AtomicBool,
    pub removed_note: Notify,
    /// Early runs per stream not yet adopted, or orphaned and still running.
    pub early_book: Arc<early::Book>,
    /// Modules whose early runs are worth waiting for.
    pub early_quick: early::Quick,
}

/// A starting peer's wait for its cluster to have a leader: bounded by
/// [`START_WAIT`], said in the log every [`START_WAIT_SAY`] ms.
struct StartWait {
    deadline: Timestamp,
    said: Timestamp,
}

impl StartWait {
    fn new<R: Runtime>(rt: &R) -> StartWait {
        let now = rt.now();
        StartWait { deadline: now.saturating_add_ms(START_WAIT.as_millis() as u64), said: now }
    }

    fn over<R: Runtime>(&self, rt: &R) -> bool {
        rt.now() >= self.deadline
    }

    /// Say why it waits (now and then), then pause before the next try.
    async fn pause<R: Runtime>(&mut self, rt: &R, peer: PeerId, why: &ConsensusError) {
        if rt.now().since(self.said) >= START_WAIT_SAY {
            self.said = rt.now();
            tracing::info!(%peer, error = %why, "waiting for the cluster to have a leader");
        }
        rt.sleep(START_WAIT_STEP).await;
    }
}

/// A running peer. Cheap to clone.
pub struct Peer<R, C, X> {
    inner: Arc<Inner<R, C, X>>,
}

impl<R, C, X> Clone for Peer<R, C, X> {
    fn clone(&self) -> Self {
        Peer { inner: self.inner.clone() }
    }
}

impl<R, C, X> std::fmt::Debug for Peer<R, C, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("id", &self.inner.id).finish_non_exhaustive()
    }
}

impl<R: Runtime, C: Consensus, X: JobRunner> Peer<R, C, X> {
    /// The first turn of a restarted peer, asked again (bounded by
    /// [`START_WAIT`]) while there is no leader to answer it: nothing was
    /// proposed then, so asking again applies nothing twice.
    async fn hello(rt: &R, consensus: &C, hello: WorkRequest) -> Result<WorkReply, ConsensusError> {
        let mut wait = StartWait::new(rt);
        loop {
            match consensus.work(rt.now(), hello.clone()).await {
                Err(e @ (ConsensusError::NotLeader { .. } | ConsensusError::Unavailable(_))) if !wait.over(rt) => {
                    wait.pause(rt, hello.peer, &e).await
                }
                other => return other,
            }
        }
    }

    /// Start a peer: register it (or re-use `id` from an earlier run of this
    /// peer), hand back leases an earlier incarnation left behind, and start
    /// the worker loop.
    pub async fn start(
        rt: R,
        consensus: C,
        runner: X,
        cfg: PeerConfig,
        id: Option<PeerId>,
    ) -> Result<Peer<R, C, X>, PeerError> {
        let holds_state = consensus.holds_state().await;
        if let Some(id) = id {
            // After a restart the log may not be re-applied yet, and the
            // commit index this replica restored may lag (it is not flushed
            // on its own): a peer with Raft state catches up to a read point
            // the leader confirms before deciding that it is unknown and
            // registering a new id (bounded; a worker holds no state and
            // asks the leader directly).
            if holds_state {
                let mut wait = StartWait::new(&rt);
                while !consensus.read(|s| s.peer(id).is_some()) && !wait.over(&rt) {
                    match consensus.catch_up().await {
                        Ok(()) => break,
                        Err(e) => wait.pause(&rt, id, &e).await,
                    }
                }
            }
        }
        // Is this id still registered? Then hand back the leases an earlier
        // run left behind (disbatch's "cleanup of orphaned work at start"):
        // their jobs go back to the queue without counting an attempt.
        let known = match id {
            Some(id) => {
                let hello =
                    WorkRequest { peer: id, cmds: Vec::new(), lease_max: 0, release_orphans: true, reconcile: None };
                let reply = Self::hello(&rt, &consensus, hello).await?;
                if reply.released > 0 {
                    tracing::info!(peer = %id, released = reply.released, "handed back leases left by an earlier run");
                }
                reply.registered.then_some(id)
            }
            None => None,
        };
        let id = match (known, id) {
            (Some(id), _) => id,
            // An id this replica saw issued (a restart with Raft state: a
            // fresh founder's replica has issued none) that the leader no
            // longer holds: removal from membership came first, so this
            // replica is nobody's to keep. Or a worker's id (no replica: its
            // id came from the leader when it joined) the leader no longer
            // holds: taken out since. The caller decides (`impetus peer`
            // sets the state aside and joins again as a new peer).
            (None, Some(id)) if !holds_state || consensus.read(|s| s.peer_id_issued(id)) => {
                return Err(PeerError::Removed(id))
            }
            (None, _) => {
                let cmd = Command::RegisterPeer { info: cfg.info.clone(), role: PeerRole::Voter };
                match consensus.write(rt.now(), cmd).await? {
                    Ok(Outcome::PeerRegistered { peer }) => peer,
                    other => return Err(PeerError::Register(format!("{other:?}"))),
                }
            }
        };
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let slots = Arc::new(Slots {
            capacity: cfg.capacity,
            taken: AtomicU32::new(0),
            fusing: AtomicU32::new(0),
            unsure: AtomicBool::new(false),
        });
        let inner = Arc::new(Inner {
            rt,
            consensus,
            runner,
            cfg,
            id,
            slots,
            events,
            wake: Notify::new(),
            stopping: AtomicBool::new(false),
            stopped: Notify::new(),
            stopped_flag: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            removed_note: Notify::new(),
            early_book: Arc::new(early::Book::default()),
            early_quick: early::Quick::default(),
        });
        tracing::info!(peer = %id, "peer started");
        let w = inner.clone();
        inner.rt.spawn(async move { worker::run(w, rx).await });
        Ok(Peer { inner })
    }

    pub fn id(&self) -> PeerId {
        self.inner.id
    }

    /// The runtime's clock, as the peer stamps commands.
    pub fn now(&self) -> impetus_proto::Timestamp {
        self.inner.rt.now()
    }

    /// Prepare a client write. On the leader, with free slots here, a
    /// submit also leases its jobs to this peer in the same entry: a job's
    /// lease is granted by the write that submits it, not by a second one.
    /// The jobs that may run at once (ready now, their module compiled
    /// here) start now ([`early`]), while the entry is replicated; or, if
    /// they are expected to end within [`PeerConfig::early_wait`], before it is
    /// written, with their results in it ([`Command::SubmitRan`]). Commit
    /// the command returned (stamped after this returns), then pass its
    /// result to [`Peer::unfuse`].
    pub async fn fuse(&self, cmd: Command) -> (Command, Fused) {
        let (cmd, mut fused) = self.fuse_now(cmd);
        let me = self.inner.id;
        let Command::Submit { stream, jobs } = cmd else { return (cmd, fused) };
        let Some(lease) = fused.lease.as_mut() else { return (Command::Submit { stream, jobs }, fused) };
        let max = lease.free + lease.early.len() as u32;
        let mut ran = Vec::new();
        let runs = lease.early.len();
        if (1..=early::EARLY_WAIT_RUNS).contains(&runs)
            && self.inner.early_quick.all(lease.early.iter().map(|e| e.attempt.module))
        {
            self.await_early(lease).await;
            let mut i = 0;
            while i < lease.early.len() {
                let Some((result, stderr_tail)) = lease.early[i].carry() else {
                    i += 1;
                    continue;
                };
                let e = lease.early.swap_remove(i);
                ran.push((Ran { index: e.index, limits: e.attempt.limits, result, stderr_tail }, e));
                lease.free += 1;
            }
        }
        if ran.is_empty() {
            let lease = Command::Lease { peer: me, streams: vec![stream.clone()], max };
            return (Command::Batch(vec![Command::Submit { stream, jobs }, lease]), fused);
        }
        // `ran` goes in submit order.
        ran.sort_by_key(|(r, _)| r.index);
        let (ran, carried): (Vec<Ran>, Vec<early::EarlyRun>) = ran.into_iter().unzip();
        lease.carried = carried;
        (Command::SubmitRan { stream, jobs, peer: me, max, ran }, fused)
    }

    /// Wait until the early runs of `lease` have ended, at most
    /// [`PeerConfig::early_wait`]. The modules of runs still going are not
    /// waited for again until one of their runs proves quick.
    async fn await_early(&self, lease: &FusedLease) {
        let inner = &self.inner;
        let timeout = inner.rt.sleep(inner.cfg.early_wait);
        tokio::pin!(timeout);
        loop {
            let ended = lease.ends.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if lease.early.iter().all(early::EarlyRun::ended) {
                return;
            }
            tokio::select! {
                biased;
                () = ended => {}
                () = &mut timeout => {
                    for e in lease.early.iter().filter(|e| !e.ended()) {
                        inner.early_quick.learn(e.attempt.module, false);
                    }
                    tracing::debug!(runs = lease.early.len(), "early runs outlasted the wait; their submit goes without them");
                    return;
                }
            }
        }
    }

    /// [`Peer::fuse`] up to the wait: the command as it came, with the
    /// slots taken for its lease (`lease` is set only for a submit).
    fn fuse_now(&self, cmd: Command) -> (Command, Fused) {
        let inner = &self.inner;
        let plain = |cmd: Command| {
            let wakes = cmd.may_ready_jobs();
            (cmd, Fused { wakes, lease: None })
        };
        let Command::Submit { stream, jobs } = &cmd else { return plain(cmd) };
        let status = inner.consensus.status();
        if status.leader != Some(status.node) || inner.stopping.load(Ordering::SeqCst) {
            return plain(cmd);
        }
        let count = jobs.len() as u32;
        let slots = inner.slots.take(count.min(inner.cfg.max_lease_batch));
        if slots == 0 {
            return plain(cmd);
        }
        let ends = Arc::new(Notify::new());
        let early = self.start_early(stream, jobs, slots, &ends);
        let free = slots - early.len() as u32;
        let fused = FusedLease::new(inner.slots.clone(), free, count, early, ends);
        (cmd, Fused { wakes: true, lease: Some(fused) })
    }

    /// Start early the jobs the fused lease will grant unless a write in
    /// flight changes the stream: the first of `jobs` ready now, in the
    /// lease's order, as many as `slots` and the stream's allowance for this
    /// peer (`State::lease_allowance`: pause, pin, mpps, spawn frequency)
    /// let once the jobs already ready are counted, whose module this peer
    /// has compiled.
    /// An early run is a job started, so it stays within what a lease of it
    /// would be allowed.
    fn start_early(
        &self,
        stream: &StreamName,
        jobs: &[NewJob],
        slots: u32,
        ends: &Arc<Notify>,
    ) -> Vec<early::EarlyRun> {
        let inner = &self.inner;
        let me = inner.id;
        let (info, allowance) = inner.consensus.read(|s| (s.stream(stream), s.lease_allowance(stream, me)));
        let Some(info) = info else { return Vec::new() };
        let props = info.props;
        // Jobs already ready go first (at equal priority, older first):
        // what the lease may take after them, counting all as ahead.
        // Early runs of earlier submits still in flight count against the
        // allowance too: the applied state does not know of them yet.
        let queued = u32::try_from(info.stats.queued).unwrap_or(u32::MAX);
        let mut book = inner.early_book.lock();
        let in_flight = book.get(stream).copied().unwrap_or(0);
        let room = slots.min(allowance.saturating_sub(in_flight)).saturating_sub(queued);
        // In the order the lease grants them: highest priority first, then
        // as submitted (a stable sort). Jobs held back (a delay) wait.
        let mut ready: Vec<(u32, &NewJob)> = (0..).zip(jobs).filter(|(_, j)| j.delay_ms == 0).collect();
        ready.sort_by_key(|(_, j)| std::cmp::Reverse(j.priority.unwrap_or(props.default_priority)));
        ready
            .into_iter()
            .take(room as usize)
            .filter(|(_, j)| j.spec.validate().is_ok() && inner.runner.is_prepared(&j.module))
            .map(|(index, j)| {
                *book.entry(stream.clone()).or_default() += 1;
                early::EarlyRun::start(inner, stream.clone(), index, Attempt::of_new(j, &props), ends.clone())
            })
            .collect()
    }

    /// The command's own result from a write [`Peer::fuse`] made; the jobs
    /// it leased to this peer start now, the slots it did not use are free.
    /// If the command may have made work ready, the worker loop is woken
    /// once it is written, but after a fused submit only if it left jobs
    /// for others: a turn with nothing to do would only take a core from
    /// the job.
    pub fn unfuse<E>(&self, fused: Fused, written: Result<ApplyResult, E>) -> Result<ApplyResult, E> {
        let Some(mut lease) = fused.lease else {
            if fused.wakes && written.is_ok() {
                self.wake();
            }
            return written;
        };
        let inner = &self.inner;
        let mut parts = match written {
            Ok(Ok(Outcome::Batch(parts))) if (2..=3).contains(&parts.len()) => parts.into_iter(),
            other => {
                // Answered (a refusal commits nothing): known. Failed, the
                // write may yet commit, lease and all ([`Slots::unsure`]).
                lease.settled = other.is_ok();
                return other;
            }
        };
        lease.settled = true;
        let (Some(mut submit), Some(leased)) = (parts.next(), parts.next()) else { unreachable!("two parts or three") };
        let mut grants = match leased {
            Ok(Outcome::Leased(grants)) => grants,
            _ => Vec::new(),
        };
        let granted = grants.len() as u32;
        debug_assert!(granted <= lease.free + lease.early.len() as u32, "leased more than asked");
        inner.runner.leased(grants.len());
        // The jobs whose results the entry took are done: nothing to run.
        let done = Self::carried_done(&submit, parts.next(), &lease.carried);
        for e in lease.carried.drain(..) {
            e.settle();
        }
        grants.retain(|g| !done.contains(&g.job));
        // The acknowledgement tells the statuses once the whole entry is
        // applied: the jobs its lease took (and did not complete) are Leased.
        if let Ok(Outcome::Submitted(subs)) = &mut submit {
            let leased: BTreeSet<JobId> = grants.iter().map(|g| g.job).collect();
            for s in subs.iter_mut().filter(|s| s.status == JobStatus::Queued && leased.contains(&s.job)) {
                s.status = JobStatus::Leased;
            }
        }
        // Every grant that can adopts an early run first, so that a grant
        // without one never takes the slot of a run a later grant would adopt.
        let mut unmatched = Vec::new();
        for g in grants {
            let attempt = Attempt::of(&g);
            match lease.early.iter().position(|e| e.attempt == attempt) {
                Some(i) => lease.early.swap_remove(i).adopt(inner, g),
                None => unmatched.push(g),
            }
        }
        for g in unmatched {
            // A slot for a job that did not run early: a free one of the
            // lease, else one an early run that no grant adopted holds
            // (grants ≤ slots, so there is one).
            if lease.free > 0 {
                lease.free -= 1;
            } else if let Some(e) = lease.early.pop() {
                e.orphan(&inner.slots, false);
            } else {
                debug_assert!(false, "a grant without a slot");
            }
            worker::run_granted(&self.inner, g);
        }
        if granted < lease.jobs {
            self.wake();
        }
        Ok(submit)
    }

    /// The jobs a [`Command::SubmitRan`] completed with the results of
    /// `carried` (its `ran`, in order), from its submit's and completions'
    /// outcomes.
    fn carried_done(
        submit: &ApplyResult,
        completed: Option<ApplyResult>,
        carried: &[early::EarlyRun],
    ) -> BTreeSet<JobId> {
        let Some(completed) = completed else { return BTreeSet::new() };
        if let Ok(Outcome::Completed(results)) = &completed {
            debug_assert_eq!(results.len(), carried.len(), "one completion per result written");
        }
        let done: BTreeSet<JobId> = ran_results(carried.iter().map(|e| e.index), submit, &completed)
            .into_iter()
            .filter_map(|(sub, r)| match r {
                Ok(()) => Some(sub.job),
                Err(why) => {
                    let job = sub.job;
                    tracing::debug!(%job, %why, "a result written with its submit was not taken; the job runs again");
                    None
                }
            })
            .collect();
        for &job in &done {
            tracing::trace!(target: crate::LATENCY, %job, "job done in the entry that submits it");
        }
        done
    }

    /// Set this peer's `draining` mark in the registry. Bounded by
    /// [`DRAIN_MARK_WAIT`]: a peer cut off from the leader drains all the
    /// same, and a failure is only logged.
    async fn mark_draining(&self, draining: bool) {
        let inner = &self.inner;
        let cmd = Command::DrainPeer { peer: inner.id, draining };
        // `biased`: tokio's random branch order would break the simulator's determinism.
        tokio::select! {
            biased;
            r = inner.consensus.write(inner.rt.now(), cmd) => match r {
                Ok(Ok(_)) => tracing::info!(peer = %inner.id, draining, "registry updated"),
                Ok(Err(e)) => tracing::warn!(peer = %inner.id, draining, error = %e, "the registry refused the draining mark"),
                Err(e) => tracing::warn!(peer = %inner.id, draining, error = %e, "could not set the draining mark"),
            },
            () = inner.rt.sleep(DRAIN_MARK_WAIT) => {
                tracing::warn!(peer = %inner.id, draining, "setting the draining mark timed out");
            }
        }
    }

    /// Wake the worker loop (new work may be ready).
    fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Read the applied state.
    pub fn read<T>(&self, f: impl FnOnce(&impetus_queue::State) -> T) -> T {
        self.inner.consensus.read(f)
    }

    /// Resolves once the cluster has answered that its registry no longer
    /// has this peer (it was taken out of the cluster while away, and ids
    /// are never reused): nothing it does is accepted from then on, and its
    /// Raft state, if any, belongs to a membership it is not in. What to do
    /// is the caller's: the `impetus peer` process sets that state aside
    /// and joins again as a new peer.
    pub async fn removed(&self) {
        loop {
            let note = self.inner.removed_note.notified();
            tokio::pin!(note);
            note.as_mut().enable();
            if self.inner.removed.load(Ordering::SeqCst) {
                return;
            }
            note.await;
        }
    }

    /// Stop leasing, let running jobs finish (up to the grace period), report
    /// their results, release what is left. Resolves when that is done.
    /// The registry marks the peer draining first, so the cluster neither
    /// leases to it nor makes it a Raft member meanwhile.
    /// A peer the cluster no longer has is not marked: there is no entry.
    pub async fn shutdown(&self) {
        let first = !self.inner.stopping.swap(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        if first && !self.inner.removed.load(Ordering::SeqCst) {
            self.mark_draining(true).await;
        }
        while !self.inner.stopped_flag.load(Ordering::SeqCst) {
            let notified = self.inner.stopped.notified();
            if self.inner.stopped_flag.load(Ordering::SeqCst) {
                break;
            }
            tokio::select! {
                biased;
                () = notified => {}
                () = self.inner.rt.sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}
