//! impetus-simulation: the seeded whole-cluster simulator.
//!
//! One seed drives a whole run of N peers made of the real code: the queue
//! state machine (`impetus_queue::State`), openraft with the in-memory log
//! and state-machine storage (`impetus_raft::MemLogStore`,
//! `StateMachineStore` on `SnapshotStore::Memory`), and the worker/lease
//! loop and client service (`impetus_node::peer::Peer`) — on
//! `openraft_rt_sim::SimRuntime` (one thread, FIFO tasks, a virtual clock, a
//! seeded RNG), a simulated network and a simulated job runner. See
//! README.md, "Simulation".
//!
//! - [`run`] runs one seed and returns a [`RunReport`]: the failure (which
//!   checker, why), the last trace events and the event-trace hash.
//! - [`Options`] chooses the seed, the peers (Raft members from the start)
//!   and workers (peers whose Raft node is no member until the leader's
//!   membership manager adds it), the nemesis steps, the jobs, the
//!   [`Faults`] and (tests only) a planted [`Bug`].

mod check;
mod cluster;
mod env;
mod faults;
mod rng;
mod scenario;
mod trace;
mod world;

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use impetus_raft::openraft::AsyncRuntime;
use openraft_rt_sim::SimRuntime;

pub use env::{expected_result, SimConsensus, SimRt, SimRunner, MODULE};
pub use faults::{Bug, Fault, Faults, UnknownFault};
pub use scenario::LIVENESS_BOUND_MS;
pub use trace::KEEP_EVENTS;
pub use world::{SimConfig, SimPeer, SimRaft};

/// What one run does.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// Raft members from the start (the founder, then learners the
    /// membership manager promotes up to 3 voters), each also running a
    /// peer (worker loop).
    pub peers: usize,
    /// Workers (ids `peers+1 ..= peers+workers`): peers whose Raft node is
    /// no member at first, so their turns, writes and module fetches go to
    /// the leader over the simulated network. The membership manager makes
    /// the lowest answering one a learner while voters are missing or silent
    /// (then a voter); from then on it is a member like the others.
    pub workers: usize,
    /// Nemesis steps: each waits 100–700 virtual ms, then injects one fault.
    pub steps: u32,
    /// Jobs the client submits.
    pub jobs: u32,
    pub faults: Faults,
    /// A planted bug (tests of the checkers only).
    pub bug: Bug,
    /// Fold openraft-rt-sim's scheduler trace (every spawn, poll, wake and
    /// timer) into the trace hash: slower, stricter.
    pub scheduler_trace: bool,
    /// Log every trace event (tracing, target `impetus_simulation::trace`) as it happens.
    pub print_trace: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            seed: 0,
            peers: 3,
            workers: 1,
            steps: 20,
            jobs: 50,
            faults: Faults::all(),
            bug: Bug::None,
            scheduler_trace: false,
            print_trace: false,
        }
    }
}

impl Options {
    /// The command that replays this run.
    pub fn replay_command(&self) -> String {
        let mut cmd = format!(
            "cargo run -p impetus-simulation --release -- --seed {} --peers {} --workers {} --steps {} --jobs {} --faults {}",
            self.seed, self.peers, self.workers, self.steps, self.jobs, self.faults
        );
        if self.bug != Bug::None {
            cmd.push_str(&format!(" --plant-bug {}", self.bug.name()));
        }
        cmd
    }
}

/// A checker that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Which checker: `invariant`, `panic`, `acked-lost`, `result`,
    /// `lease-audit`, `double-result`, `divergence`, `idempotency`,
    /// `liveness`, `log-audit`, `startup`, `restart`, `crash`, `removed`.
    pub checker: &'static str,
    pub message: String,
}

/// The result of one run.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub options: Options,
    pub failure: Option<Failure>,
    /// blake3 of every trace event (and, with `scheduler_trace`, of the scheduler trace).
    pub trace_hash: String,
    /// The last [`KEEP_EVENTS`] trace events.
    pub last_events: Vec<String>,
    pub stats: Stats,
}

/// Counters of one run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub virtual_ms: u64,
    pub events: u64,
    pub writes_ok: u64,
    pub writes_failed: u64,
    pub crashes: u64,
    /// Leaves that took the peer out of the cluster, and those that did not.
    pub leaves: u64,
    pub leaves_failed: u64,
    /// Peers that learned by themselves that the cluster took them out (a
    /// leave done whose answer was lost, or forgotten while silent).
    pub removals_learned: u64,
    /// Jobs done in the entry that submitted them (results their leader
    /// wrote with the submit).
    pub done_in_submit: u64,
    /// Completions of workers' peers the leader accepted.
    pub worker_completions: u64,
    /// Workers the membership manager made learners (the committed log
    /// holds them in a membership), and voters.
    pub workers_learners: u64,
    pub workers_voters: u64,
}

thread_local! {
    /// Panics caught while a simulation runs on this thread.
    static PANICS: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Install (once) a panic hook that records panics raised while a
/// simulation runs on the current thread (spawned tasks' panics are caught
/// by the runtime; this keeps their message) and stays quiet about them;
/// other panics go to the previous hook.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let recorded = PANICS
                .try_with(|p| {
                    let mut p = p.borrow_mut();
                    match p.as_mut() {
                        Some(list) => {
                            let msg = payload_message(info.payload());
                            let at =
                                info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                            list.push(format!("{msg}{at}"));
                            true
                        }
                        None => false,
                    }
                })
                .unwrap_or(false);
            if !recorded {
                previous(info);
            }
        }));
    });
}

fn payload_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

/// Run one simulation.
pub fn run(options: Options) -> RunReport {
    install_panic_hook();
    let world = Arc::new(world::World::new(options.clone()));
    let mut rt = SimRuntime::with_seed(options.seed);
    rt.record_trace(options.scheduler_trace);
    PANICS.with(|p| *p.borrow_mut() = Some(Vec::new()));
    let w = world.clone();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| rt.block_on(scenario::run(w))));
    let virtual_ms = rt.block_on(async { trace::vnow_ms() });
    if options.scheduler_trace {
        for line in rt.take_trace() {
            world.trace.absorb(line.as_bytes());
            world.trace.absorb(b"\n");
        }
    }
    drop(rt);
    let panics = PANICS.with(|p| p.borrow_mut().take()).unwrap_or_default();
    let mut failure = match result {
        Err(payload) => Some(Failure { checker: "panic", message: payload_message(payload.as_ref()) }),
        Ok(Err(f)) => Some(f),
        Ok(Ok(())) => None,
    };
    // A panic in a task (e.g. a voter's invariant check) is the root cause
    // of whatever failed after it.
    if let Some(first) = panics.first() {
        let checker = if first.contains("invariant") { "invariant" } else { "panic" };
        failure = Some(Failure { checker, message: first.clone() });
    }
    world.trace.absorb(format!("{failure:?}").as_bytes());
    let audit = world::lock(&world.audit);
    let stats = Stats {
        virtual_ms,
        events: world.trace.count(),
        writes_ok: audit.writes_ok,
        writes_failed: audit.writes_failed,
        crashes: audit.crashes,
        leaves: audit.leaves,
        leaves_failed: audit.leaves_failed,
        removals_learned: audit.removals_learned.len() as u64,
        done_in_submit: audit.done_in_submit,
        worker_completions: audit.worker_completions,
        workers_learners: audit.workers_learners,
        workers_voters: audit.workers_voters,
    };
    drop(audit);
    let report =
        RunReport { options, failure, trace_hash: world.trace.hash_hex(), last_events: world.trace.last(), stats };
    world.clear();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Workers (peers whose Raft node is no member) register, lease and
    /// complete jobs through the leader under the faults, and the run's
    /// checks pass.
    #[test]
    fn workers_complete_jobs_through_the_leader() {
        let reports: Vec<RunReport> =
            (0..3).map(|seed| run(Options { seed, workers: 2, jobs: 20, steps: 10, ..Options::default() })).collect();
        for r in &reports {
            assert!(r.failure.is_none(), "seed {}: {:?}\n{}", r.options.seed, r.failure, r.last_events.join("\n"));
        }
        let by_workers: u64 = reports.iter().map(|r| r.stats.worker_completions).sum();
        assert!(by_workers > 0, "no job was completed by a worker");
    }

    /// The founder alone: the membership manager makes workers learners,
    /// then voters, to reach 3 voters, and the checks pass on their replicas.
    #[test]
    fn workers_become_learners_and_voters() {
        let reports: Vec<RunReport> = (0..2)
            .map(|seed| run(Options { seed, peers: 1, workers: 2, jobs: 20, steps: 10, ..Options::default() }))
            .collect();
        for r in &reports {
            assert!(r.failure.is_none(), "seed {}: {:?}\n{}", r.options.seed, r.failure, r.last_events.join("\n"));
        }
        assert!(reports.iter().map(|r| r.stats.workers_voters).sum::<u64>() > 0, "no worker became a voter");
    }

    #[test]
    fn the_replay_command_names_the_workers() {
        let cmd = Options { workers: 3, ..Options::default() }.replay_command();
        assert!(cmd.contains("--workers 3"), "{cmd}");
    }
}
