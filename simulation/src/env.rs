//! What a simulated peer plugs into the real peer logic: a [`Runtime`] on
//! the virtual clock (with skew and a kill switch for crashes), a
//! [`Consensus`] that forwards writes to the leader over the simulated
//! network, and a [`JobRunner`] whose outcomes the seed chooses.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use impetus_node::peer::{serve_work, Attempt, Consensus, ConsensusError, JobRunner, RaftStatus, RunReport, Runtime};
use impetus_node::raft_consensus::RaftConsensus;
use impetus_proto::api::{WorkReply, WorkRequest};
use impetus_proto::{ApplyResult, Command, ErrorKind, ErrorRecord, ModuleHash, Timestamp};
use impetus_queue::State;
use impetus_raft::openraft::AsyncRuntime;
use impetus_raft::NodeId;
use openraft_rt_sim::SimRuntime;

use crate::faults::Fault;
use crate::rng::mix;
use crate::world::{lock, with_timeout, SimConfig, World};

/// A task that ends (is dropped) at its next poll once its incarnation is killed.
struct Killable<F> {
    fut: Pin<Box<F>>,
    alive: Arc<AtomicBool>,
}

impl<F: Future<Output = ()>> Future for Killable<F> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.alive.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        self.fut.as_mut().poll(cx)
    }
}

/// Spawn `fut` on the simulator's runtime; it dies with `alive`.
pub(crate) fn spawn_killable(alive: &Arc<AtomicBool>, fut: impl Future<Output = ()> + Send + 'static) {
    let task = Killable { fut: Box::pin(fut), alive: alive.clone() };
    drop(SimRuntime::spawn(task));
}

/// The peer's runtime: `SimRuntime` tasks and timers, the node's skewed clock.
#[derive(Clone)]
pub struct SimRt {
    world: Arc<World>,
    node: NodeId,
    alive: Arc<AtomicBool>,
}

impl std::fmt::Debug for SimRt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimRt").field("node", &self.node).finish()
    }
}

impl SimRt {
    pub(crate) fn new(world: Arc<World>, node: NodeId, alive: Arc<AtomicBool>) -> SimRt {
        SimRt { world, node, alive }
    }
}

impl Runtime for SimRt {
    fn now(&self) -> Timestamp {
        self.world.clock_now(self.node)
    }

    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send + 'static {
        SimRuntime::sleep(d)
    }

    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        spawn_killable(&self.alive, fut);
    }

    fn rss_bytes(&self) -> u64 {
        0
    }
}

/// How long a worker keeps asking the leader for a module (as
/// `impetus_node::cluster::NO_LEADER_WAIT`).
const MODULE_FETCH_WAIT_MS: u64 = 5_000;

/// Consensus as a peer of the simulated cluster sees it.
///
/// - On a voter (or learner): reads and status from its own Raft node (the
///   real `RaftConsensus`); writes go to its own node when it leads, else are
///   forwarded to the leader it knows over the simulated network (the
///   leader stamps them with its clock).
/// - On a worker (no Raft state, as `ClusterConsensus` without a replica):
///   it asks a voter who leads, then sends its writes, its worker turns
///   (`serve_work` runs on the leader) and module fetches to the leader over
///   the simulated network; it reads an empty state and knows no leader.
pub struct SimConsensus {
    world: Arc<World>,
    node: NodeId,
    replica: Replica,
}

enum Replica {
    /// A Raft node's own replica.
    Local(Arc<RaftConsensus<SimConfig>>),
    /// A worker: no replica; what it reads is this empty state.
    Worker(Box<State>),
}

impl std::fmt::Debug for SimConsensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = match self.replica {
            Replica::Local(_) => "voter",
            Replica::Worker(_) => "worker",
        };
        f.debug_struct("SimConsensus").field("node", &self.node).field("role", &role).finish()
    }
}

impl SimConsensus {
    /// The consensus of a Raft node (voter or learner) with its replica.
    pub(crate) fn new(world: Arc<World>, node: NodeId, local: Arc<RaftConsensus<SimConfig>>) -> SimConsensus {
        SimConsensus { world, node, replica: Replica::Local(local) }
    }

    /// The consensus of a worker: no replica, everything through the leader.
    pub(crate) fn worker(world: Arc<World>, node: NodeId) -> SimConsensus {
        SimConsensus { world, node, replica: Replica::Worker(Box::new(State::new())) }
    }

    fn local(&self) -> Option<Arc<RaftConsensus<SimConfig>>> {
        match &self.replica {
            Replica::Local(l) => Some(l.clone()),
            Replica::Worker(_) => None,
        }
    }
}

impl Consensus for SimConsensus {
    fn write(&self, now: Timestamp, cmd: Command) -> impl Future<Output = Result<ApplyResult, ConsensusError>> + Send {
        let (world, node, local) = (self.world.clone(), self.node, self.local());
        async move {
            let res = match &local {
                Some(local) => match local.status().leader {
                    Some(l) if l == node => with_timeout(local.write(now, cmd.clone())).await,
                    Some(l) => world.forward(node, l, cmd.clone()).await,
                    None => {
                        // Like a real client of a peer with no leader: wait a little.
                        crate::world::sleep_ms(20).await;
                        Err(ConsensusError::Unavailable("no leader known".into()))
                    }
                },
                None => match world.find_leader(node).await {
                    Ok(l) => world.forward(node, l, cmd.clone()).await,
                    Err(e) => Err(e),
                },
            };
            world.observe_write(node, &cmd, &res);
            res
        }
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        match &self.replica {
            Replica::Local(local) => local.read(f),
            Replica::Worker(empty) => f(empty),
        }
    }

    fn status(&self) -> RaftStatus {
        match &self.replica {
            Replica::Local(local) => local.status(),
            Replica::Worker(_) => RaftStatus { node: self.node, ..RaftStatus::default() },
        }
    }

    fn holds_state(&self) -> impl Future<Output = bool> + Send {
        let local = self.local();
        async move {
            match local {
                Some(local) => local.holds_state().await,
                None => false,
            }
        }
    }

    fn catch_up(&self) -> impl Future<Output = Result<(), ConsensusError>> + Send {
        let local = self.local();
        async move {
            match local {
                Some(local) => local.catch_up().await,
                None => Err(ConsensusError::Unavailable("a worker holds no replica".into())),
            }
        }
    }

    fn module(&self, hash: ModuleHash) -> impl Future<Output = Option<Vec<u8>>> + Send {
        let (world, node, local) = (self.world.clone(), self.node, self.local());
        async move {
            if let Some(local) = local {
                return local.read(|s| s.module(&hash).map(<[u8]>::to_vec));
            }
            // As `ClusterConsensus::to_leader`: ask again for a while (a
            // fetch that fails costs the job an attempt).
            let deadline = crate::trace::vnow_ms() + MODULE_FETCH_WAIT_MS;
            loop {
                let got = match world.find_leader(node).await {
                    Ok(leader) => world.fetch_module(node, leader, hash).await,
                    Err(e) => Err(e),
                };
                match got {
                    Ok(bytes) => return bytes,
                    Err(e) if crate::trace::vnow_ms() >= deadline => {
                        world.event(format_args!("n{node} module fetch failed: {e}"));
                        return None;
                    }
                    Err(_) => crate::world::sleep_ms(50).await,
                }
            }
        }
    }

    async fn work(&self, now: Timestamp, req: WorkRequest) -> Result<WorkReply, ConsensusError> {
        if matches!(self.replica, Replica::Local(_)) {
            return serve_work(self, now, req).await;
        }
        let (world, node) = (&self.world, self.node);
        let res = match world.find_leader(node).await {
            Ok(leader) => world.forward_work(node, leader, req).await,
            Err(e) => Err(e),
        };
        match &res {
            Ok(reply) => {
                let leased = match &reply.leased {
                    Some(Ok(impetus_proto::Outcome::Leased(grants))) => grants.len(),
                    _ => 0,
                };
                world.event(format_args!("n{node} (worker) turn ok: leased {leased}"));
            }
            Err(e) => world.event(format_args!("n{node} (worker) turn failed: {e}")),
        }
        res
    }
}

/// Runs "jobs" natively: input `n` → `n*n`. Whether a run succeeds, traps,
/// hangs until the job timeout or finishes late is a function of the seed,
/// the node and its start time, the run's number on it and the job's input
/// (a run knows no job id: the leader starts jobs before their lease).
pub struct SimRunner {
    seed: u64,
    trap: bool,
    hang: bool,
    slow: bool,
    prepared: Mutex<BTreeSet<ModuleHash>>,
    /// Runs started so far.
    runs: AtomicU64,
}

impl std::fmt::Debug for SimRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimRunner").finish_non_exhaustive()
    }
}

/// The module every simulated job runs (its bytes only need the wasm magic).
pub const MODULE: &[u8] = b"\0asm impetus-simulation";

/// The result a correct run of a job with this input produces.
pub fn expected_result(input: &[u8]) -> Option<Vec<u8>> {
    let n: u64 = std::str::from_utf8(input).ok()?.trim().parse().ok()?;
    Some((n * n).to_string().into_bytes())
}

impl SimRunner {
    /// The runner of node `id`, started now: its runs roll apart from other
    /// nodes' and from its earlier incarnations'.
    pub(crate) fn new(world: &World, id: NodeId) -> SimRunner {
        SimRunner {
            seed: mix(mix(world.opts.seed, id), crate::trace::vnow_ms()),
            trap: world.has(Fault::Trap),
            hang: world.has(Fault::Hang),
            slow: world.has(Fault::Slow),
            prepared: Mutex::new(BTreeSet::new()),
            runs: AtomicU64::new(0),
        }
    }
}

impl JobRunner for SimRunner {
    fn prepare(&self, hash: ModuleHash, bytes: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let r = if bytes.starts_with(b"\0asm") {
            lock(&self.prepared).insert(hash);
            Ok(())
        } else {
            Err("not a WebAssembly module (bad magic)".into())
        };
        std::future::ready(r)
    }

    fn is_prepared(&self, hash: &ModuleHash) -> bool {
        lock(&self.prepared).contains(hash)
    }

    fn run(&self, a: Attempt) -> impl Future<Output = RunReport> + Send + 'static {
        // Each run rolls afresh (a run knows no job id: the leader starts
        // jobs before their lease exists); the simulation is one thread, so
        // the count, and every roll, follows from the seed.
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        let roll = mix(mix(self.seed, run), a.spec.input.iter().fold(0, |h, &b| mix(h, u64::from(b))));
        let pick = roll % 1000;
        let r2 = mix(roll, 7);
        let (trap, hang, slow) = (self.trap, self.hang, self.slow);
        async move {
            let ok = |input: &[u8]| match expected_result(input) {
                Some(r) => Ok(r),
                None => Err(ErrorRecord::new(ErrorKind::Trap, "input is not a number")),
            };
            let result = if trap && pick < 120 {
                SimRuntime::sleep(Duration::from_millis(5 + r2 % 30)).await;
                Err(ErrorRecord::new(ErrorKind::Trap, "wasm trap: unreachable"))
            } else if hang && (120..170).contains(&pick) {
                // The executor enforces the job timeout on a job that never ends.
                SimRuntime::sleep(Duration::from_millis(a.limits.job_timeout_ms)).await;
                Err(ErrorRecord::new(ErrorKind::Timeout, format!("ran past {} ms", a.limits.job_timeout_ms)))
            } else if slow && (170..270).contains(&pick) {
                let ms = a.lease_ttl_ms * (12 + r2 % 14) / 10;
                SimRuntime::sleep(Duration::from_millis(ms)).await;
                ok(&a.spec.input)
            } else if (270..620).contains(&pick) {
                // A no-op, shorter than a Raft round: the leader may wait
                // for it and write its result with its submit.
                SimRuntime::sleep(Duration::ZERO).await;
                ok(&a.spec.input)
            } else {
                SimRuntime::sleep(Duration::from_millis(5 + r2 % 60)).await;
                ok(&a.spec.input)
            };
            RunReport { result, stdout_tail: vec![], stderr_tail: vec![] }
        }
    }
}
