//! Early runs: the leader starts the jobs of a submit it leases to itself
//! ([`super::Peer::fuse`]) while their entry is replicated, not after it is
//! applied, so a short job has its result by the time its lease is granted.
//!
//! A run is only ever reported under a grant whose [`Attempt`] equals the
//! one that ran (same module, spec and limits: nothing else reaches the
//! guest), so it is a run the grant would have made itself. A submit that is
//! never committed, or whose lease went to other jobs, leaves its early runs
//! unadopted: their reports are dropped when they end.
//!
//! A run that ends quickly can do better still: when the runs of a submit
//! are expected to end within a millisecond ([`EARLY_WAIT`]; their modules' last early
//! runs ended before their grants came), the leader waits for them and
//! writes their results in the entry that submits them
//! ([`impetus_proto::Command::SubmitRan`]): the job is done in one Raft
//! round, not two. The state machine takes such a result only for a job
//! that entry grants to this peer with the limits it ran under.
//!
//! Invariants:
//! - the worker loop learns of a grant ([`Event::Granted`]) before its
//!   report ([`Event::Done`]): adoption sends the grant first, and the run's
//!   end sends its report only once it sees the adoption;
//! - an early run holds one of the fused lease's slots until it is adopted
//!   (the slot is the grant's from then on) or, unadopted, until it ends.
//!   A grant that matched no run takes a free slot of the lease, else the
//!   slot of an unadopted run (which then ends without one): the slots taken
//!   never exceed the capacity, though an unadopted run may still be using a
//!   core for a job that has the slot;
//! - an early run counts in the [`Book`] of its stream until it is adopted
//!   (the applied state counts its lease from then on), or its result was
//!   written and the write is over, or, unadopted, it ends: the runs of
//!   submits in flight count against the stream's limits;
//! - a run whose result is written ([`EarlyRun::carry`]) is never adopted
//!   nor reported otherwise: its result reaches the cluster once or not at
//!   all, and if not, its job runs again under a lease of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use impetus_proto::{limits, FencingToken, JobId, LeaseGrant, ModuleHash, StreamName};
use tokio::sync::Notify;

use super::worker::Event;
use super::{Attempt, Consensus, Inner, JobRunner, RunReport, Runtime, Slots};

/// Early runs per stream that the applied state does not count yet: not
/// adopted (then the lease counts it), or orphaned and still running.
#[derive(Debug, Default)]
pub(crate) struct Book(Mutex<BTreeMap<StreamName, u32>>);

impl Book {
    pub fn lock(&self) -> MutexGuard<'_, BTreeMap<StreamName, u32>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One early run of `stream` leaves the book.
    fn leave(&self, stream: &StreamName) {
        let mut book = self.lock();
        if let Some(n) = book.get_mut(stream) {
            debug_assert!(*n > 0, "an early run of {stream} left twice");
            *n = n.saturating_sub(1);
            if *n == 0 {
                book.remove(stream);
            }
        }
    }
}

/// The longest a leader holds a submit back for its early runs to end, by
/// default ([`super::PeerConfig::early_wait`]; the runtime's timer may
/// round it up to its tick). Only runs expected to end well within it are
/// waited for ([`Quick`]); a job shorter than a Raft round is done sooner
/// for the wait.
pub const EARLY_WAIT: Duration = Duration::from_millis(1);

/// Most early runs of one submit waited for: more would not end within
/// the wait on a few cores however short each is (a bulk submit is
/// written at once, as throughput wants).
pub(crate) const EARLY_WAIT_RUNS: usize = 16;

/// A bounded set of modules found quick, each user by its own measure (the
/// peer's `early_quick`: the last early run ended before its grant came;
/// `serve::WasmRunner`: the last run took under `QUICK_RUN`). A module
/// found slow again is taken out.
#[derive(Debug, Default)]
pub(crate) struct Quick(Mutex<BTreeSet<ModuleHash>>);

impl Quick {
    /// Bound on the modules remembered (forgotten all at once past it).
    const MAX: usize = 1024;

    pub fn all(&self, modules: impl IntoIterator<Item = ModuleHash>) -> bool {
        let quick = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        modules.into_iter().all(|m| quick.contains(&m))
    }

    pub fn learn(&self, module: ModuleHash, quick: bool) {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !quick {
            set.remove(&module);
            return;
        }
        if set.len() >= Self::MAX {
            set.clear();
        }
        set.insert(module);
    }
}

/// One early run, as [`super::Peer::unfuse`] sees it. Its caller has
/// entered it in the [`Book`]; it leaves when adopted, when the write that
/// carried its result is over ([`EarlyRun::settle`]), or when it ends
/// orphaned.
#[derive(Debug)]
pub(crate) struct EarlyRun {
    pub attempt: Attempt,
    /// The job's position in its submit.
    pub index: u32,
    stream: StreamName,
    book: Arc<Book>,
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
enum State {
    /// Running; no grant has claimed it yet.
    Running,
    /// Ended before any grant claimed it.
    Ended(RunReport),
    /// Running for this grant: its end reports it.
    Adopted(JobId, FencingToken),
    /// Running for nothing: its end gives back its slot if it holds one.
    Orphan { holds_slot: bool },
    /// Ended; its result went into the write of its submit.
    Carried,
    /// Reported, or dropped.
    Gone,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EarlyRun {
    /// Start `attempt` now. Its module must be prepared, and the caller has
    /// taken a slot for it.
    /// `ends` is notified when it ends.
    pub fn start<R: Runtime, C: Consensus, X: JobRunner>(
        inner: &Arc<Inner<R, C, X>>,
        stream: StreamName,
        index: u32,
        attempt: Attempt,
        ends: Arc<Notify>,
    ) -> EarlyRun {
        tracing::trace!(target: crate::LATENCY, module = %attempt.module, "early run starts");
        let state = Arc::new(Mutex::new(State::Running));
        let (st, owner, name) = (state.clone(), inner.clone(), stream.clone());
        let module = attempt.module;
        inner.runner.start(
            &inner.rt,
            attempt.clone(),
            super::runner::reported_once(module, move |report| {
                let mut st = lock(&st);
                match std::mem::replace(&mut *st, State::Gone) {
                    State::Running => {
                        *st = State::Ended(report);
                        ends.notify_one();
                    }
                    State::Adopted(job, token) => {
                        tracing::trace!(target: crate::LATENCY, %job, "job ran");
                        // The loop may have stopped (grace period over); then the lease was released.
                        let _ = owner.events.send(Event::Done((job, token, report)));
                    }
                    State::Orphan { holds_slot } => {
                        if holds_slot {
                            owner.slots.give(1);
                        }
                        owner.early_book.leave(&name);
                    }
                    State::Ended(_) | State::Carried | State::Gone => debug_assert!(false, "an early run ended twice"),
                }
            }),
        );
        let book = inner.early_book.clone();
        EarlyRun { attempt, index, stream, book, state }
    }

    /// Whether the run has ended (its report not yet taken).
    pub fn ended(&self) -> bool {
        matches!(*lock(&self.state), State::Ended(_))
    }

    /// Take the result of a run that ended well, to write it with its
    /// submit: its stdout and stderr tail. A run still going, one that
    /// failed (the failure is reported as any other), or one whose output
    /// is past what a command may carry (it must not sink the submit) is
    /// left as it is.
    pub fn carry(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut st = lock(&self.state);
        match std::mem::replace(&mut *st, State::Carried) {
            State::Ended(RunReport { result: Ok(out), stderr_tail, .. })
                if out.len() <= limits::MAX_RESULT_BYTES && stderr_tail.len() <= limits::MAX_TAIL_BYTES =>
            {
                Some((out, stderr_tail))
            }
            other => {
                *st = other;
                None
            }
        }
    }

    /// The write that carried this run's result is over (its slot was
    /// counted free when it was carried).
    pub fn settle(self) {
        debug_assert!(matches!(*lock(&self.state), State::Carried), "settled a run that was not carried");
        self.book.leave(&self.stream);
    }

    /// Report this run as the attempt `g` grants (its attempt equals ours);
    /// `g` takes over the run's slot.
    pub fn adopt<R: Runtime, C: Consensus, X: JobRunner>(self, inner: &Inner<R, C, X>, g: LeaseGrant) {
        debug_assert_eq!(Attempt::of(&g), self.attempt, "adopted by a grant of another attempt");
        inner.early_quick.learn(self.attempt.module, self.ended());
        let (job, token) = (g.job, g.token);
        tracing::trace!(target: crate::LATENCY, %job, "granted job adopts its early run");
        if inner.events.send(Event::Granted(g)).is_err() {
            // The worker loop has stopped: the lease expires and the job
            // runs elsewhere.
            self.orphan(&inner.slots, true);
            return;
        }
        self.book.leave(&self.stream);
        let mut st = lock(&self.state);
        match std::mem::replace(&mut *st, State::Gone) {
            State::Running => *st = State::Adopted(job, token),
            State::Ended(report) => {
                tracing::trace!(target: crate::LATENCY, %job, "job ran");
                let _ = inner.events.send(Event::Done((job, token, report)));
            }
            other => debug_assert!(false, "adopted an early run in state {other:?}"),
        }
    }

    /// No grant takes this run: drop its report. It gives its slot back
    /// when it ends if `holds_slot` (else a grant has taken the slot).
    pub fn orphan(self, slots: &Slots, holds_slot: bool) {
        let mut st = lock(&self.state);
        match std::mem::replace(&mut *st, State::Gone) {
            State::Running => *st = State::Orphan { holds_slot },
            State::Ended(_) => {
                if holds_slot {
                    slots.give(1);
                }
                self.book.leave(&self.stream);
            }
            other => debug_assert!(false, "orphaned an early run in state {other:?}"),
        }
        tracing::debug!(module = %self.attempt.module, "an early run was not granted; its report is dropped");
    }
}
