//! One run: start the cluster, drive client load, inject the seed's faults,
//! heal, wait for the cluster to finish, then run the checkers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use impetus_node::peer::Consensus;
use impetus_node::raft_consensus::{should_leave, RaftConsensus};
use impetus_proto::api::{ClientRequest, ClientResponse};
use impetus_proto::{
    ApplyError, Command, IdempotencyKey, JobSpec, ModuleHash, NewJob, Outcome, PeerId, PeerRole, StreamName,
    StreamProps,
};
use impetus_queue::{JobFilter, State};
use impetus_raft::openraft::AsyncRuntime;
use impetus_raft::{NodeId, PeerNode, SnapshotStore};
use openraft_rt_sim::SimRuntime;

use crate::cluster::{peer_config, Node};
use crate::env::{spawn_killable, SimConsensus, MODULE};
use crate::faults::Fault;
use crate::trace::vnow_ms;
use crate::world::{lock, sleep_ms, SimConfig, SimPeer, World};
use crate::Failure;

/// After the heal, every job must be final within this many virtual ms.
pub const LIVENESS_BOUND_MS: u64 = 60_000;

pub(crate) const STREAM: &str = "sim";

fn fail(checker: &'static str, message: impl Into<String>) -> Failure {
    Failure { checker, message: message.into() }
}

pub(crate) fn stream_props() -> StreamProps {
    StreamProps {
        mpps: 4,
        lease_ttl_ms: 1_000,
        max_attempts: 8,
        retry_backoff_ms: 50,
        retry_backoff_max_ms: 400,
        job_timeout_ms: 2_000,
        ..StreamProps::default()
    }
}

pub(crate) async fn run(world: Arc<World>) -> Result<(), Failure> {
    let n = world.opts.peers as NodeId;
    let total = n + world.opts.workers as NodeId;
    if world.has(Fault::Clock) {
        let mut skew = lock(&world.skew);
        for id in 1..=total {
            let s = world.rng().range(0, 601) as i64 - 300;
            skew.insert(id, s);
        }
    }
    // As in production: the first peer founds a one-voter cluster and
    // registers itself; every other peer joins (the leader registers it as a
    // worker: the next id, its node id) and starts its Raft node. The peers
    // up to `peers` are added as learners here; the workers are left to the
    // membership manager (running on every node, acting on the leader),
    // which promotes learners and, while voters are missing or silent, adds
    // workers as learners, all under the faults.
    let mut nodes: Vec<Node> = (1..=total).map(|id| Node::new(&world, id)).collect();
    nodes[0].start(&world).await.map_err(|e| fail("startup", e))?;
    let first = world.live(1).ok_or_else(|| fail("startup", "n1 not running"))?;
    let founder = BTreeMap::from([(1, PeerNode::new("sim-1"))]);
    first.raft.initialize(founder).await.map_err(|e| fail("startup", format!("initialize: {e}")))?;
    for id in 2..=total {
        join(&world, &first.consensus, id).await?;
    }
    for node in &mut nodes[1..] {
        node.start(&world).await.map_err(|e| fail("startup", e))?;
    }
    for id in 2..=n {
        let mut tries = 0;
        while let Err(e) = first.raft.add_learner(id, PeerNode::new(format!("sim-{id}")), false).await {
            tries += 1;
            if tries > 100 {
                return Err(fail("startup", format!("add learner n{id}: {e}")));
            }
            sleep_ms(50).await;
        }
    }
    lock(&world.net).faulty = true;
    world.event("cluster initialized; faults on");

    drop(SimRuntime::spawn(sampler(world.clone())));
    drop(SimRuntime::spawn(client(world.clone())));

    // The nemesis.
    for _ in 0..world.opts.steps {
        let wait = world.rng().range(100, 700);
        sleep_ms(wait).await;
        restart_due(&world, &mut nodes).await?;
        nemesis_step(&world, &mut nodes).await;
    }

    // Heal everything.
    {
        let mut net = lock(&world.net);
        net.faulty = false;
        net.blocked.clear();
    }
    // Leaves under way end first (bounded by `LEAVE_WAIT`).
    let leaves_from = vnow_ms();
    while nodes.iter().any(|n| n.leaving) && vnow_ms() - leaves_from < 2 * LEAVE_WAIT.as_millis() as u64 {
        stop_the_leavers(&world, &mut nodes, None).await;
        sleep_ms(50).await;
    }
    for node in &mut nodes {
        if node.running.is_none() && !node.left {
            node.down_until = None;
            node.start(&world).await.map_err(|e| fail("restart", e))?;
        }
    }
    let healed_at = vnow_ms();
    world.event("HEALED: partitions removed, crashed peers restarted, message faults off");

    // Liveness: the client finishes and every job becomes final.
    loop {
        if vnow_ms() - healed_at > LIVENESS_BOUND_MS {
            let summary = liveness_summary(&world);
            return Err(fail(
                "liveness",
                format!("{LIVENESS_BOUND_MS} ms after the heal the work is not done: {summary}"),
            ));
        }
        if lock(&world.audit).client_done && all_final(&world) {
            break;
        }
        stop_the_removed(&world, &mut nodes).await;
        sleep_ms(100).await;
    }
    world.event(format_args!("all jobs final {} ms after the heal", vnow_ms() - healed_at));

    // Let every member apply what the leader applied, under one leader all
    // agree on. The leader that judged the work done may be one cut off
    // before the heal that has yet to learn of a newer term: it steps down
    // after the heal, and the next leader's first entry is applied too.
    let quiet_from = vnow_ms();
    loop {
        // Every member, the workers made members included, holds the replica.
        let members: Vec<NodeId> =
            leader_status(&world).map(|s| s.voters.into_iter().chain(s.learners).collect()).unwrap_or_default();
        let views: Vec<(u64, Option<NodeId>)> = nodes
            .iter()
            .filter(|n| members.contains(&n.id))
            .filter_map(|n| Some((n.running.as_ref()?, world.live(n.id)?)))
            .map(|(r, live)| (r.state.read(|s| s.applied_index()), live.consensus.status().leader))
            .collect();
        let top = views.iter().map(|v| v.0).max().unwrap_or(0);
        let leader = views.first().and_then(|v| v.1);
        let agreed = leader.is_some() && views.iter().all(|v| v.1 == leader);
        // Every entry any replica applied was committed: the members apply
        // it too (a leader just elected has yet to commit its first entry).
        let applied_anywhere = lock(&world.audit).samples.keys().next_back().copied().unwrap_or(0);
        if views.len() == members.len()
            && agreed
            && views.iter().all(|v| v.0 == top)
            && top >= applied_anywhere
            && leader_view(&world).is_some()
        {
            break;
        }
        stop_the_removed(&world, &mut nodes).await;
        if vnow_ms() - quiet_from > 20_000 {
            return Err(fail(
                "liveness",
                format!("members {members:?} did not converge under one leader within 20 s: {views:?}"),
            ));
        }
        sleep_ms(50).await;
    }

    crate::check::final_checks(&world, &nodes).await
}

/// Join peer `id` as `ClusterService::join` does on the leader (here the
/// founder, before the faults): register it as a worker, the same id again
/// for the same address. Its registry id must be its node id, so the
/// founder registers first.
async fn join(world: &World, leader: &RaftConsensus<SimConfig>, id: NodeId) -> Result<(), Failure> {
    let info = peer_config(id).info;
    let registered = |s: &State| s.peers().into_iter().find(|p| p.info.addresses == info.addresses).map(|p| p.id);
    for _ in 0..200 {
        let founder_first = leader.read(|s| s.peer(PeerId(1)).is_some());
        let peer = match leader.read(registered) {
            Some(peer) => Some(peer),
            None if !founder_first => None,
            None => {
                let cmd = Command::RegisterPeer { info: info.clone(), role: PeerRole::Worker };
                match leader.write(world.clock_now(1), cmd).await {
                    Ok(Ok(Outcome::PeerRegistered { peer })) => Some(peer),
                    Ok(other) => return Err(fail("startup", format!("join n{id}: {other:?}"))),
                    Err(_) => None,
                }
            }
        };
        match peer {
            Some(peer) if peer.0 == id => return Ok(()),
            Some(peer) => return Err(fail("startup", format!("n{id} joined as {peer}"))),
            None => sleep_ms(50).await,
        }
    }
    Err(fail("startup", format!("n{id} could not join within 10 s")))
}

async fn restart_due(world: &Arc<World>, nodes: &mut [Node]) -> Result<(), Failure> {
    let now = vnow_ms();
    let restart_at = now + world.rng().range(300, 3_000);
    stop_the_leavers(world, nodes, Some(restart_at)).await;
    for node in nodes.iter_mut() {
        if node.running.is_none() && node.down_until.is_some_and(|t| t <= now) {
            node.down_until = None;
            node.start(world).await.map_err(|e| fail("restart", e))?;
        }
    }
    Ok(())
}

/// How long a leave may take (as `impetus_node::serve`'s `LEAVE_TIMEOUT`).
const LEAVE_WAIT: Duration = Duration::from_secs(15);

/// `impetus peer leave` on node `a`, as a task of its own: its peer drains
/// and it leaves the cluster ([`leave`]); once that is over its process
/// stops ([`stop_the_leavers`]). At most one leave per worker in a run
/// (those under way and those done), so a voter that leaves can be replaced.
fn start_leave(world: &Arc<World>, nodes: &mut [Node], a: NodeId) {
    if nodes.iter().filter(|n| n.leaving || n.left).count() >= world.opts.workers {
        return;
    }
    let Some(node) = nodes.get_mut(a as usize - 1) else { return };
    let Some(r) = node.running.as_ref() else { return };
    let Some(peer) = lock(&world.books).get(&a).and_then(|b| b.peer.clone()) else { return };
    if node.leaving {
        return;
    }
    node.leaving = true;
    world.event(format_args!("nemesis: n{a} asked to leave the cluster"));
    let (w, local) = (world.clone(), r.consensus.clone());
    spawn_killable(&r.alive, async move {
        let outcome = leave(&w, a, &peer, &local).await;
        match &outcome {
            Ok(()) => {
                lock(&w.audit).leaves += 1;
                w.event(format_args!("n{a} left the cluster"));
            }
            Err(e) => {
                lock(&w.audit).leaves_failed += 1;
                w.event(format_args!("n{a} could not leave the cluster: {e}"));
            }
        }
        lock(&w.books).entry(a).or_default().left = Some(outcome);
    });
}

/// As `impetus_node::serve` stops a peer asked to leave: the peer drains,
/// then, unless it is the last voter, it leaves through the leader
/// (`RaftConsensus::remove_peer`, on this node if it leads), asking again
/// until it is done or [`LEAVE_WAIT`] has passed.
async fn leave(
    world: &Arc<World>,
    id: NodeId,
    peer: &SimPeer,
    local: &Arc<RaftConsensus<SimConfig>>,
) -> Result<(), String> {
    peer.shutdown().await;
    let me = PeerId(id);
    if !should_leave(&local.status()) {
        return Err("it is the last voter".into());
    }
    let cluster = SimConsensus::new(world.clone(), id, local.clone());
    let asked = async {
        loop {
            let res = if local.status().leads_as_voter() {
                local.remove_peer(&cluster, world.clock_now(id), me).await
            } else {
                match cluster.leader().await {
                    Ok(l) => world.forward_leave(id, l, me).await,
                    Err(e) => Err(e),
                }
            };
            match res {
                Ok(()) => return,
                Err(e) => {
                    world.event(format_args!("n{id} leave: {e}"));
                    sleep_ms(100).await;
                }
            }
        }
    };
    SimRuntime::timeout(LEAVE_WAIT, asked).await.map_err(|_| format!("not done within {LEAVE_WAIT:?}"))
}

/// Stop the nodes whose leave is over: one that left stays stopped; one
/// that did not is started again at `restart_at` (as an operator would),
/// or is left for the heal to start when `None`.
async fn stop_the_leavers(world: &Arc<World>, nodes: &mut [Node], restart_at: Option<u64>) {
    stop_the_removed(world, nodes).await;
    for node in nodes.iter_mut() {
        let outcome = lock(&world.books).get_mut(&node.id).and_then(|b| b.left.take());
        match outcome {
            Some(Ok(())) => node.stop(world, true).await,
            // Not done, or done with its answer lost (the registry no
            // longer has it): started again, its peer must learn which.
            Some(Err(_)) => {
                node.stop(world, false).await;
                node.down_until = restart_at;
            }
            None => {}
        }
    }
}

/// Stop for good the nodes whose peer learned that the cluster took them
/// out (a real peer would join again as a new peer, with a new id, which a
/// simulated node, its id fixed, cannot).
async fn stop_the_removed(world: &Arc<World>, nodes: &mut [Node]) {
    for node in nodes.iter_mut() {
        let removed = lock(&world.books).get_mut(&node.id).is_some_and(|b| std::mem::take(&mut b.removed));
        if removed {
            node.stop(world, true).await;
        }
    }
}

/// One fault on a node chosen by the seed among all peers.
async fn nemesis_step(world: &Arc<World>, nodes: &mut [Node]) {
    let mut options = Vec::new();
    for f in [Fault::Partition, Fault::OneWay, Fault::Crash, Fault::Clock, Fault::Disk, Fault::Leave] {
        if world.has(f) {
            options.push(Some(f));
        }
    }
    if world.has(Fault::Partition) || world.has(Fault::OneWay) {
        options.push(None); // heal the partitions
    }
    let n = nodes.len() as u64;
    let (choice, a, b, x) = {
        let mut r = world.rng();
        let Some(choice) = r.pick(&options) else { return };
        (choice, r.range(1, n + 1), r.range(1, n + 1), r.next_u64())
    };
    match choice {
        None => {
            lock(&world.net).blocked.clear();
            world.event("nemesis: partitions healed");
        }
        Some(Fault::Partition) => {
            let mut net = lock(&world.net);
            for other in 1..=n {
                if other != a {
                    net.blocked.insert((a, other));
                    net.blocked.insert((other, a));
                }
            }
            drop(net);
            world.event(format_args!("nemesis: n{a} partitioned away"));
        }
        Some(Fault::OneWay) => {
            if a != b {
                lock(&world.net).blocked.insert((a, b));
                world.event(format_args!("nemesis: link n{a}->n{b} cut (one way)"));
            }
        }
        Some(Fault::Crash) => {
            // Usually at most a minority of the voters is down; sometimes a
            // power cut takes a majority (safe for correct code: only
            // availability suffers). Peers outside the voters do not count.
            let voters = world.newest_status().voters;
            let power_cut = x % 4 == 0;
            let most = voters.len().saturating_sub(1);
            let limit = if power_cut { most } else { most / 2 };
            let mut victims = vec![a];
            if power_cut && b != a {
                victims.push(b);
            }
            for v in victims {
                let down = |id: &&NodeId| nodes.get(**id as usize - 1).is_some_and(|n| n.running.is_none());
                if voters.contains(&v) && voters.iter().filter(down).count() >= limit {
                    continue;
                }
                let node = &mut nodes[(v - 1) as usize];
                if node.running.is_none() {
                    continue;
                }
                node.crash(world).await;
                node.down_until = Some(vnow_ms() + world.rng().range(300, 3_000));
            }
        }
        Some(Fault::Clock) => {
            let jump = (x % 3001) as i64 - 1500;
            let mut skew = lock(&world.skew);
            let s = skew.entry(a).or_insert(0);
            *s = (*s + jump).clamp(-3_000, 3_000);
            let now = *s;
            drop(skew);
            world.event(format_args!("nemesis: n{a} clock jumps {jump} ms (skew now {now} ms)"));
        }
        Some(Fault::Disk) => {
            let every = 1 + x % 40;
            lock(&world.books).entry(a).or_default().flush_every_ms = every;
            world.event(format_args!("nemesis: n{a} disk flushes every {every} ms"));
        }
        Some(Fault::Leave) => start_leave(world, nodes, a),
        Some(_) => {}
    }
}

/// Every 100 ms, hash each live replica's state at its applied index (a
/// worker's node, no member yet, holds none) and the state of its newest
/// snapshot at the index the snapshot holds, and trace the membership
/// when it changes.
async fn sampler(world: Arc<World>) {
    let mut last: BTreeMap<NodeId, u64> = BTreeMap::new();
    let mut last_snapshot: BTreeMap<NodeId, u64> = BTreeMap::new();
    let mut membership = (Vec::new(), Vec::new());
    loop {
        sleep_ms(100).await;
        let newest = world.newest_status();
        if (&newest.voters, &newest.learners) != (&membership.0, &membership.1) {
            world.event(format_args!("membership: voters {:?}, learners {:?}", newest.voters, newest.learners));
            membership = (newest.voters, newest.learners);
        }
        for id in world.live_ids() {
            let Some(live) = world.live(id) else { continue };
            let (index, bytes) = live.consensus.read(|s| (s.applied_index(), s.snapshot()));
            if index == 0 || last.get(&id) == Some(&index) {
                continue;
            }
            last.insert(id, index);
            let hash = *blake3::hash(&bytes).as_bytes();
            lock(&world.audit).samples.entry(index).or_default().insert(id, hash);
            world.event(format_args!("sample n{id} @{index} {}", hex_short(&hash)));
        }
        for id in world.live_ids() {
            let Some(live) = world.live(id) else { continue };
            let stored = match SnapshotStore::Memory(live.snapshots).load() {
                Ok(Some(stored)) => stored,
                Ok(None) => continue,
                Err(e) => {
                    world.violation("snapshot", format!("n{id}: its snapshot does not load: {e}"));
                    continue;
                }
            };
            let state = match stored.applied() {
                Ok(applied) => applied.state,
                Err(e) => {
                    world.violation("snapshot", format!("n{id}: its snapshot does not restore: {e}"));
                    continue;
                }
            };
            let index = state.applied_index();
            if index == 0 || last_snapshot.get(&id) == Some(&index) {
                continue;
            }
            last_snapshot.insert(id, index);
            let hash = *blake3::hash(&state.snapshot()).as_bytes();
            lock(&world.audit).samples.entry(index).or_default().insert(id, hash);
            world.event(format_args!("snapshot n{id} @{index} {}", hex_short(&hash)));
        }
    }
}

pub(crate) fn hex_short(h: &[u8; 32]) -> String {
    h[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// A running peer to talk to, any of them, as a real client may: a worker,
/// or a learner, forwards what it is asked to the leader.
fn pick_peer(world: &World) -> Option<(NodeId, SimPeer)> {
    let candidates: Vec<(NodeId, SimPeer)> =
        lock(&world.books).iter().filter_map(|(id, b)| b.peer.clone().map(|p| (*id, p))).collect();
    if candidates.is_empty() {
        return None;
    }
    let i = world.rng().range(0, candidates.len() as u64) as usize;
    candidates.into_iter().nth(i)
}

async fn request(world: &World, req: ClientRequest) -> Option<ClientResponse> {
    let Some((id, peer)) = pick_peer(world) else {
        sleep_ms(100).await;
        return None;
    };
    let resp = peer.handle(req).await;
    if let ClientResponse::Error(e) = &resp {
        world.event(format_args!("client via n{id}: {e}"));
    }
    Some(resp)
}

/// The client: store the module, create the stream, submit the jobs in
/// batches with idempotency keys, retrying until each batch is acknowledged.
async fn client(world: Arc<World>) {
    let hash = ModuleHash::of(MODULE);
    loop {
        let req = ClientRequest::Write(Command::PutModule { hash, bytes: MODULE.to_vec() });
        if let Some(ClientResponse::Applied(Ok(_))) = request(&world, req).await {
            break;
        }
        sleep_ms(50).await;
    }
    let stream = StreamName::new(STREAM).expect("valid stream name");
    loop {
        let req = ClientRequest::Write(Command::CreateStream { name: stream.clone(), props: stream_props() });
        match request(&world, req).await {
            Some(ClientResponse::Applied(Ok(_) | Err(ApplyError::StreamExists(_)))) => break,
            _ => sleep_ms(50).await,
        }
    }
    world.event("client: stream ready");
    let total = world.opts.jobs;
    let mut next = 0u32;
    let mut acked_batches: Vec<Vec<NewJob>> = Vec::new();
    while next < total {
        let size = (world.rng().range(1, 9) as u32).min(total - next);
        let jobs: Vec<NewJob> = (next..next + size).map(new_job).collect();
        next += size;
        submit_until_acked(&world, &stream, jobs.clone()).await;
        acked_batches.push(jobs);
        let (pause, resubmit) = {
            let mut r = world.rng();
            (r.range(0, 150), r.chance(250))
        };
        if world.has(Fault::Client) && resubmit {
            // A client that did not see its ack resubmits: same keys, same jobs.
            let i = world.rng().range(0, acked_batches.len() as u64) as usize;
            world.event(format_args!("client: resubmitting batch {i}"));
            submit_until_acked(&world, &stream, acked_batches[i].clone()).await;
        }
        sleep_ms(pause).await;
    }
    lock(&world.audit).client_done = true;
    world.event("client: all batches acknowledged");
}

fn new_job(i: u32) -> NewJob {
    NewJob {
        module: ModuleHash::of(MODULE),
        spec: JobSpec { input: i.to_string().into_bytes(), ..JobSpec::default() },
        priority: Some((i % 3) as i32),
        delay_ms: 0,
        key: Some(IdempotencyKey::new(format!("k{i}")).expect("valid key")),
    }
}

async fn submit_until_acked(world: &World, stream: &StreamName, jobs: Vec<NewJob>) {
    loop {
        let req = ClientRequest::Write(Command::Submit { stream: stream.clone(), jobs: jobs.clone() });
        if let Some(ClientResponse::Applied(Ok(Outcome::Submitted(subs)))) = request(world, req).await {
            let mut audit = lock(&world.audit);
            let mut clash = Vec::new();
            for (job, s) in jobs.iter().zip(&subs) {
                let key = job.key.as_ref().map(|k| k.as_str().to_string()).unwrap_or_default();
                match audit.acked.get(&key) {
                    Some(&earlier) if earlier != s.job => clash.push(format!("{key}: {earlier} then {}", s.job)),
                    _ => {
                        audit.acked.insert(key, s.job);
                    }
                }
            }
            drop(audit);
            for c in clash {
                world.violation("idempotency", format!("one key acknowledged as two jobs: {c}"));
            }
            let ids: Vec<u64> = subs.iter().map(|s| s.job.0).collect();
            world.event(format_args!("client: acked {ids:?}"));
            return;
        }
        let backoff = world.rng().range(20, 200);
        sleep_ms(backoff).await;
    }
}

/// Whether the leader's state has every acknowledged job final.
fn all_final(world: &World) -> bool {
    let Some(state) = leader_view(world) else { return false };
    let acked: Vec<_> = lock(&world.audit).acked.values().copied().collect();
    state.1.iter().all(|j| j.status.is_final()) && acked.iter().all(|id| state.1.iter().any(|j| j.id == *id))
}

/// Whether node `id`'s peer was registered and the leader's registry no
/// longer has it: it left, its answer lost, or crashed while it left.
/// `None` while no leader has applied all it committed.
pub(crate) fn taken_out(world: &World, id: NodeId) -> Option<bool> {
    let leader = leader_status(world).filter(|s| s.applied_index >= s.commit_index)?;
    let read = |s: &State| s.peer_id_issued(PeerId(id)) && !s.has_peer(PeerId(id));
    world.live(leader.node).map(|l| l.consensus.read(read))
}

/// The status of the leader: a live node leading as a voter of its own
/// configuration, the newest term if two think so. Not `newest_status`: a
/// node taken out of membership while away may hold a higher term and a
/// configuration that still names it, and it is no member.
fn leader_status(world: &World) -> Option<impetus_node::peer::RaftStatus> {
    let live: Vec<_> = world.live_ids().into_iter().filter_map(|id| world.live(id)).collect();
    live.iter()
        .map(|l| l.consensus.status())
        .filter(impetus_node::peer::RaftStatus::leads_as_voter)
        .max_by_key(|s| s.term)
}

/// The jobs as the current leader has applied them.
pub(crate) fn leader_view(world: &World) -> Option<(NodeId, Vec<impetus_proto::JobRecord>)> {
    let id = leader_status(world)?.node;
    let jobs = world.live(id)?.consensus.read(|s| s.jobs(&JobFilter { limit: usize::MAX, ..JobFilter::default() }));
    Some((id, jobs))
}

fn liveness_summary(world: &World) -> String {
    let client_done = lock(&world.audit).client_done;
    match leader_view(world) {
        None => format!("no leader; client done: {client_done}"),
        Some((id, jobs)) => {
            let mut by: BTreeMap<String, u32> = BTreeMap::new();
            for j in &jobs {
                *by.entry(j.status.to_string()).or_default() += 1;
            }
            let stuck: Vec<String> = jobs
                .iter()
                .filter(|j| !j.status.is_final())
                .take(5)
                .map(|j| format!("{}:{}(attempts {}, lease {:?})", j.id, j.status, j.attempts, j.lease))
                .collect();
            format!("leader n{id}, client done: {client_done}, jobs by status {by:?}, e.g. {stuck:?}")
        }
    }
}
