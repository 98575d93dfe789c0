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

    fn monotonic(&self) -> Duration {
        // The virtual clock itself: skew and jumps are the wall clock's.
        Duration::from_millis(crate::trace::vnow_ms())
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

/// How long a peer keeps asking the leader for a module (as
/// `impetus_node::cluster::NO_LEADER_WAIT`).
const MODULE_FETCH_WAIT_MS: u64 = 5_000;

/// Consensus as a peer of the simulated cluster sees it, as
/// `impetus_node::cluster::ClusterConsensus` does: every peer has a Raft
/// node and reads its own replica.
///
/// - A voter works on its own replica (`serve_work`); its writes go to its
///   own node when it leads, else are forwarded to the leader it knows over
///   the simulated network (the leader stamps them with its clock).
/// - A peer outside the voters (a worker, whose node is no member, or a
///   learner) sends its writes and worker turns (`serve_work` runs on the
///   leader) to the leader: the one its Raft knows, else the one a voter
///   names.
/// - A module missing from the replica is fetched from the leader.
pub struct SimConsensus {
    world: Arc<World>,
    node: NodeId,
    local: Arc<RaftConsensus<SimConfig>>,
}

impl std::fmt::Debug for SimConsensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConsensus").field("node", &self.node).field("voter", &self.is_voter()).finish()
    }
}

impl SimConsensus {
    pub(crate) fn new(world: Arc<World>, node: NodeId, local: Arc<RaftConsensus<SimConfig>>) -> SimConsensus {
        SimConsensus { world, node, local }
    }

    /// Whether this peer is a voter: it works on its own replica
    /// (`ClusterConsensus::is_voter`).
    fn is_voter(&self) -> bool {
        self.local.status().is_voter()
    }

    /// The leader to send to from outside the voters: the one this node's
    /// Raft knows (never itself; only while it is a member, which hears
    /// from the leader), else the one a voter names.
    pub(crate) async fn leader(&self) -> Result<NodeId, ConsensusError> {
        let s = self.local.status();
        match s.leader.filter(|l| s.holds_replica() && *l != self.node) {
            Some(l) => Ok(l),
            None => self.world.find_leader(self.node).await,
        }
    }
}

impl Consensus for SimConsensus {
    async fn write(&self, now: Timestamp, cmd: Command) -> Result<ApplyResult, ConsensusError> {
        let (world, node, local) = (&self.world, self.node, &self.local);
        let res = if self.is_voter() {
            match local.status().leader {
                Some(l) if l == node => with_timeout(local.write(now, cmd.clone())).await,
                Some(l) => world.forward(node, l, cmd.clone()).await,
                None => {
                    // Like a real client of a peer with no leader: wait a little.
                    crate::world::sleep_ms(20).await;
                    Err(ConsensusError::Unavailable("no leader known".into()))
                }
            }
        } else {
            match self.leader().await {
                Ok(l) => world.forward(node, l, cmd.clone()).await,
                Err(e) => Err(e),
            }
        };
        world.observe_write(node, &cmd, &res);
        res
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.local.read(f)
    }

    fn stamp(&self, wall: Timestamp) -> Timestamp {
        self.local.stamp(wall)
    }

    fn status(&self) -> RaftStatus {
        self.local.status()
    }

    async fn holds_state(&self) -> bool {
        self.local.holds_state().await
    }

    async fn catch_up(&self) -> Result<(), ConsensusError> {
        self.local.catch_up().await
    }

    async fn module(&self, hash: ModuleHash) -> Option<Vec<u8>> {
        if let Some(bytes) = self.local.read(|s| s.module(&hash).map(<[u8]>::to_vec)) {
            return Some(bytes);
        }
        // As `ClusterConsensus::to_leader`: ask again for a while (a
        // fetch that fails costs the job an attempt).
        let (world, node) = (&self.world, self.node);
        let deadline = crate::trace::vnow_ms() + MODULE_FETCH_WAIT_MS;
        loop {
            let got = match self.leader().await {
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

    async fn work(&self, now: Timestamp, req: WorkRequest) -> Result<WorkReply, ConsensusError> {
        if self.is_voter() {
            return serve_work(self, now, req).await;
        }
        let (world, node) = (&self.world, self.node);
        let res = match self.leader().await {
            Ok(leader) => world.forward_work(node, leader, req).await,
            Err(e) => Err(e),
        };
        match &res {
            Ok(reply) => {
                let leased = match &reply.leased {
                    Some(Ok(impetus_proto::Outcome::Leased(grants))) => grants.len(),
                    _ => 0,
                };
                world.event(format_args!("n{node} (not a voter) turn ok: leased {leased}"));
            }
            Err(e) => world.event(format_args!("n{node} (not a voter) turn failed: {e}")),
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
