//! The simulated peers' lifecycle: start, crash (losing unflushed log
//! writes), restart from what was durable.
//!
//! Every peer runs a Raft node, as in production (`impetus_node::serve`):
//! the founder and the peers the scenario adds as learners start as
//! members; a worker's node is not a member until the leader's membership
//! manager makes it a learner (then maybe a voter).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use impetus_node::peer::membership::{self, Policy};
use impetus_node::peer::{Consensus, Peer, PeerConfig, PeerError};
use impetus_node::raft_consensus::RaftConsensus;
use impetus_proto::{PeerId, PeerInfo};
use impetus_raft::openraft::AsyncRuntime;
use impetus_raft::{
    raft_config, start_node, MemLogStore, MemSnapshotStore, NodeId, SnapshotStore, StateHandle, StateMachineStore,
};
use openraft_rt_sim::SimRuntime;

use crate::env::{spawn_killable, SimConsensus, SimRt, SimRunner};
use crate::faults::{Bug, Fault};
use crate::world::{lock, sleep_ms, Live, NetFactory, SimRaft, World};

/// A snapshot every this many applied entries, built while the node goes
/// on applying (a copy on write, `State::freeze`), and what a restarted
/// node restores from; the sampler checks each against the committed log.
const SNAPSHOT_EVERY: u64 = 40;
/// The log is never purged behind a snapshot: the log checker replays the
/// whole of it.
const LOGS_TO_KEEP: u64 = 1_000_000;

/// The membership manager replaces a voter silent this long (production's
/// `--voter-timeout` is 10 s; a run's nemesis lasts about 8 virtual s, and
/// its crashes 0.3–3 s, so some voters stay silent past this one).
const DEAD_AFTER_MS: u64 = 2_000;
/// A learner or worker silent this long is taken out of the cluster
/// (production: 10 minutes); short, so that runs see it.
const FORGET_AFTER_MS: u64 = 5_000;

/// One simulated peer: its durable storage and, while it runs, its Raft
/// node and peer. A worker (`World::is_worker`) is one whose node starts
/// outside membership.
pub(crate) struct Node {
    pub id: NodeId,
    pub log: MemLogStore<crate::world::SimConfig>,
    pub snapshots: MemSnapshotStore,
    pub running: Option<Running>,
    /// Virtual ms at which a crashed node restarts.
    pub down_until: Option<u64>,
    /// A leave is under way (`scenario::leave`).
    pub leaving: bool,
    /// It left the cluster: it stays stopped.
    pub left: bool,
}

pub(crate) struct Running {
    pub alive: Arc<AtomicBool>,
    pub raft: SimRaft,
    pub state: StateHandle,
    pub consensus: Arc<RaftConsensus<SimConfig>>,
}

pub(crate) fn peer_config(id: NodeId) -> PeerConfig {
    PeerConfig {
        capacity: 4,
        max_lease_batch: 4,
        poll_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(1),
        early_wait: impetus_node::peer::early::EARLY_WAIT,
        info: PeerInfo {
            host: format!("sim-{id}"),
            addresses: vec![format!("sim-{id}")],
            capacity: 4,
            ..PeerInfo::default()
        },
    }
}

impl Node {
    pub fn new(world: &World, id: NodeId) -> Node {
        let log = MemLogStore::new();
        if world.has(Fault::Disk) {
            log.set_manual_flush(true);
            let every = world.rng().range(1, 41);
            lock(&world.books).entry(id).or_default().flush_every_ms = every;
        }
        if world.bug() == Bug::AckBeforeFlush {
            log.plant_ack_before_flush(true);
        }
        Node {
            id,
            log,
            snapshots: MemSnapshotStore::new(),
            running: None,
            down_until: None,
            leaving: false,
            left: false,
        }
    }

    /// Start (or restart) this node's Raft instance and its peer.
    pub async fn start(&mut self, world: &Arc<World>) -> Result<(), String> {
        let id = self.id;
        let sm = StateMachineStore::open(SnapshotStore::Memory(self.snapshots.clone()))
            .map_err(|e| format!("n{id}: open state machine: {e}"))?
            .with_invariant_checks(true);
        sm.handle().plant_bug(world.bug().state_bug());
        let alive = Arc::new(AtomicBool::new(true));
        let factory = NetFactory { world: world.clone(), source: id, alive: alive.clone() };
        let config = raft_config(SNAPSHOT_EVERY, LOGS_TO_KEEP);
        let (raft, state) = start_node(id, config, factory, self.log.clone(), sm, None)
            .await
            .map_err(|e| format!("n{id}: start raft: {e}"))?;
        let consensus = Arc::new(RaftConsensus::new(raft.clone(), state.clone(), id));
        let member = consensus.clone();
        let live = Live { raft: raft.clone(), consensus: consensus.clone(), snapshots: self.snapshots.clone() };
        lock(&world.net).live.insert(id, live);
        if world.has(Fault::Disk) {
            let (log, w) = (self.log.clone(), world.clone());
            spawn_killable(&alive, async move {
                loop {
                    let every = lock(&w.books).get(&id).map_or(5, |b| b.flush_every_ms);
                    sleep_ms(every).await;
                    log.flush();
                }
            });
        }
        let (rt, m, a) = (SimRt::new(world.clone(), id, alive.clone()), consensus.clone(), alive.clone());
        let policy = Policy { dead_after_ms: DEAD_AFTER_MS, forget_after_ms: FORGET_AFTER_MS, ..Policy::default() };
        spawn_killable(&alive, async move {
            membership::manage(rt, m, policy, Duration::from_millis(500), move || !a.load(Ordering::SeqCst)).await
        });
        let (w, a) = (world.clone(), alive.clone());
        spawn_killable(&alive, async move { start_peer(w, id, consensus, a).await });
        world.event(format_args!("n{id}{} started", if world.is_worker(id) { " (worker)" } else { "" }));
        self.running = Some(Running { alive, raft, state, consensus: member });
        Ok(())
    }

    /// Crash: the peer's tasks die, the Raft node stops, unflushed log writes are lost.
    pub async fn crash(&mut self, world: &World) {
        if self.halt(world).await {
            self.log.crash();
            lock(&world.audit).crashes += 1;
            world.event(format_args!("n{} CRASHED", self.id));
        }
    }

    /// Stop as a process stops after `impetus peer leave` or SIGTERM (its
    /// peer drained before): the log is flushed, nothing is lost. `left`:
    /// it left the cluster, and is never started again.
    pub async fn stop(&mut self, world: &World, left: bool) {
        if self.halt(world).await {
            self.log.flush();
            self.left = left;
            world.event(format_args!("n{} stopped{}", self.id, if left { " (left the cluster)" } else { "" }));
        }
    }

    /// The peer's tasks die and the Raft node stops. False if it was not running.
    async fn halt(&mut self, world: &World) -> bool {
        let Some(r) = self.running.take() else { return false };
        let id = self.id;
        self.leaving = false;
        r.alive.store(false, Ordering::SeqCst);
        lock(&world.net).live.remove(&id);
        if let Some(b) = lock(&world.books).get_mut(&id) {
            b.peer = None;
            b.left = None;
        }
        if SimRuntime::timeout(Duration::from_secs(5), r.raft.shutdown()).await.is_err() {
            world.violation("crash", format!("n{id}: raft shutdown did not finish within 5 s"));
        }
        true
    }
}

/// Start the real peer on a node with its registry id (= its Raft id, as
/// production's `run_peer` does: the founder registers itself, the others
/// joined before they started), retrying until it works. A registry id
/// other than the node's is a broken invariant.
async fn start_peer(world: Arc<World>, id: NodeId, consensus: Arc<RaftConsensus<SimConfig>>, alive: Arc<AtomicBool>) {
    loop {
        match crate::scenario::taken_out(&world, id) {
            None => {
                sleep_ms(100).await;
                continue;
            }
            // One holding no Raft state (a worker) joins again through
            // `--join` in production, where the leader gives it a new id; a
            // simulated node keeps its id, so it stays out. One holding
            // state starts, and its peer must learn that it was taken out.
            Some(true) if !consensus.holds_state().await => {
                world.event(format_args!("n{id} was taken out of the cluster: its peer stays out"));
                return;
            }
            Some(_) => {}
        }
        let rt = SimRt::new(world.clone(), id, alive.clone());
        let c = SimConsensus::new(world.clone(), id, consensus.clone());
        match Peer::start(rt, c, SimRunner::new(&world, id), peer_config(id), Some(PeerId(id))).await {
            Ok(p) if p.id() != PeerId(id) => {
                world.violation("restart", format!("n{id}: its peer registered as {}", p.id()));
                return;
            }
            Ok(p) => {
                world.event(format_args!("n{id} peer {} running", p.id()));
                // An incarnation that crashed while it started leaves no peer to talk to.
                if alive.load(Ordering::SeqCst) {
                    lock(&world.books).entry(id).or_default().peer = Some(p.clone());
                    let w = world.clone();
                    spawn_killable(&alive, async move {
                        p.removed().await;
                        learned_removed(&w, id, "from a refused worker turn");
                    });
                }
                return;
            }
            Err(PeerError::Removed(_)) => {
                learned_removed(&world, id, "at start");
                return;
            }
            Err(e) => {
                world.event(format_args!("n{id} peer start failed: {e}"));
                sleep_ms(200).await;
            }
        }
    }
}

/// Node `id`'s peer learned that the cluster took it out. Production then
/// sets its Raft state aside and joins again as a new peer; a simulated
/// node keeps its id, so the nemesis stops it for good. It must be true
/// (checked at the end, against the settled leader's registry: ids are
/// never registered again): a member told so by mistake would set aside a
/// replica still counted.
fn learned_removed(world: &World, id: NodeId, how: &str) {
    world.event(format_args!("n{id} learned {how} that the cluster took it out"));
    lock(&world.books).entry(id).or_default().removed = true;
    lock(&world.audit).removals_learned.push((id, how.to_string()));
}

use crate::world::SimConfig;
