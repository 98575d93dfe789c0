//! The simulated peers' lifecycle: start, crash (losing unflushed log
//! writes), restart from what was durable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use impetus_node::peer::membership::{self, Policy};
use impetus_node::peer::{Consensus, Peer, PeerConfig};
use impetus_node::raft_consensus::RaftConsensus;
use impetus_proto::PeerInfo;
use impetus_raft::openraft::AsyncRuntime;
use impetus_raft::{
    raft_config, start_node, MemLogStore, MemSnapshotStore, NodeId, SnapshotStore, StateHandle, StateMachineStore,
};
use openraft_rt_sim::SimRuntime;

use crate::env::{spawn_killable, SimConsensus, SimRt, SimRunner};
use crate::faults::{Bug, Fault};
use crate::world::{lock, sleep_ms, Live, NetFactory, SimRaft, World};

/// No snapshots in a short run: the log checker replays the whole log.
const SNAPSHOT_EVERY: u64 = 1_000_000;

/// One simulated peer: its durable storage and, while it runs, its Raft node.
pub(crate) struct Node {
    pub id: NodeId,
    pub log: MemLogStore<crate::world::SimConfig>,
    pub snapshots: MemSnapshotStore,
    pub running: Option<Running>,
    /// Virtual ms at which a crashed node restarts.
    pub down_until: Option<u64>,
}

pub(crate) struct Running {
    pub alive: Arc<AtomicBool>,
    pub raft: SimRaft,
    pub state: StateHandle,
}

pub(crate) fn peer_config(id: NodeId) -> PeerConfig {
    PeerConfig {
        capacity: 4,
        max_lease_batch: 4,
        poll_interval: Duration::from_millis(50),
        heartbeat_interval: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(1),
        early_wait: impetus_node::peer::early::EARLY_WAIT,
        info: PeerInfo { host: format!("sim-{id}"), capacity: 4, ..PeerInfo::default() },
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
        Node { id, log, snapshots: MemSnapshotStore::new(), running: None, down_until: None }
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
        let config = raft_config(SNAPSHOT_EVERY, SNAPSHOT_EVERY);
        let (raft, state) = start_node(id, config, factory, self.log.clone(), sm, None)
            .await
            .map_err(|e| format!("n{id}: start raft: {e}"))?;
        let consensus = Arc::new(RaftConsensus::new(raft.clone(), state.clone(), id));
        lock(&world.net).live.insert(id, Live { raft: raft.clone(), consensus: consensus.clone() });
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
        let policy = Policy { target_voters: world.opts.peers.min(3), ..Policy::default() };
        spawn_killable(&alive, async move {
            membership::manage(rt, m, policy, Duration::from_millis(500), move || !a.load(Ordering::SeqCst)).await
        });
        let (w, a) = (world.clone(), alive.clone());
        spawn_killable(&alive, async move { start_peer(w, id, Some(consensus), a).await });
        world.event(format_args!("n{id} started"));
        self.running = Some(Running { alive, raft, state });
        Ok(())
    }

    /// Crash: the peer's tasks die, the Raft node stops, unflushed log writes are lost.
    pub async fn crash(&mut self, world: &World) {
        let Some(r) = self.running.take() else { return };
        let id = self.id;
        r.alive.store(false, Ordering::SeqCst);
        lock(&world.net).live.remove(&id);
        if let Some(b) = lock(&world.books).get_mut(&id) {
            b.peer = None;
        }
        if SimRuntime::timeout(Duration::from_secs(5), r.raft.shutdown()).await.is_err() {
            world.violation("crash", format!("n{id}: raft shutdown did not finish within 5 s"));
        }
        self.log.crash();
        lock(&world.audit).crashes += 1;
        world.event(format_args!("n{id} CRASHED"));
    }
}

/// A simulated worker: a peer with no Raft node, whose turns, writes and
/// module fetches go to the leader over the simulated network.
pub(crate) struct Worker {
    pub id: NodeId,
    /// The kill switch of the running incarnation.
    pub running: Option<Arc<AtomicBool>>,
    /// Virtual ms at which a crashed worker restarts.
    pub down_until: Option<u64>,
}

impl Worker {
    pub fn new(id: NodeId) -> Worker {
        Worker { id, running: None, down_until: None }
    }

    /// Start (or restart) the worker's peer: it registers through the
    /// leader, or re-uses its peer id (its hello hands back orphaned leases).
    pub fn start(&mut self, world: &Arc<World>) {
        let id = self.id;
        let alive = Arc::new(AtomicBool::new(true));
        let (w, a) = (world.clone(), alive.clone());
        spawn_killable(&alive, async move { start_peer(w, id, None, a).await });
        world.event(format_args!("n{id} (worker) started"));
        self.running = Some(alive);
    }

    /// Crash: the peer's tasks die (what it ran is lost; its leases expire
    /// unless a restart hands them back).
    pub fn crash(&mut self, world: &World) {
        let Some(alive) = self.running.take() else { return };
        let id = self.id;
        alive.store(false, Ordering::SeqCst);
        if let Some(b) = lock(&world.books).get_mut(&id) {
            b.peer = None;
        }
        lock(&world.audit).crashes += 1;
        world.event(format_args!("n{id} (worker) CRASHED"));
    }
}

/// Start the real peer on a node (register, or re-use its peer id after a
/// restart once its replica knows it), retrying until it works. `replica`
/// is the node's Raft replica; a worker has none.
async fn start_peer(
    world: Arc<World>,
    id: NodeId,
    replica: Option<Arc<RaftConsensus<SimConfig>>>,
    alive: Arc<AtomicBool>,
) {
    let known = lock(&world.books).get(&id).and_then(|b| b.peer_id);
    if let (Some(pid), Some(consensus)) = (known, &replica) {
        for _ in 0..60 {
            if consensus.read(|s| s.peer(pid).is_some()) {
                break;
            }
            sleep_ms(50).await;
        }
    }
    loop {
        let rt = SimRt::new(world.clone(), id, alive.clone());
        let c = match &replica {
            Some(consensus) => SimConsensus::new(world.clone(), id, consensus.clone()),
            None => SimConsensus::worker(world.clone(), id),
        };
        match Peer::start(rt, c, SimRunner::new(&world, id), peer_config(id), known).await {
            Ok(p) => {
                world.event(format_args!("n{id} peer {} running", p.id()));
                let mut books = lock(&world.books);
                let b = books.entry(id).or_default();
                b.peer_id = Some(p.id());
                // An incarnation that crashed while it started leaves no peer to talk to.
                if alive.load(Ordering::SeqCst) {
                    b.peer = Some(p);
                }
                return;
            }
            Err(e) => {
                world.event(format_args!("n{id} peer start failed: {e}"));
                sleep_ms(200).await;
            }
        }
    }
}

use crate::world::SimConfig;
