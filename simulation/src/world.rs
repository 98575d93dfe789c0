//! The shared world of one run: the seeded fault source, the simulated
//! network (partitions, delay, drop, duplication), the clocks, the live Raft
//! nodes and what the checkers collect along the way.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{Stream, StreamExt};
use impetus_node::peer::{serve_work, Consensus, ConsensusError, Peer, RaftStatus};
use impetus_node::raft_consensus::RaftConsensus;
use impetus_proto::api::{WorkReply, WorkRequest};
use impetus_proto::{ran_results, ApplyResult, Command, JobId, ModuleHash, Outcome, PeerId, Timestamp};
use impetus_raft::openraft::base::{BoxFuture, BoxStream};
use impetus_raft::openraft::errors::{Fatal, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable};
use impetus_raft::openraft::network::{stream_append_sequential, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use impetus_raft::openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use impetus_raft::openraft::{AsyncRuntime, OptionalSend};
use impetus_raft::{ImpetusRaft, MemSnapshotStore, NodeId, PeerNode, Snapshot, SnapshotData, Vote};
use openraft_rt_sim::SimRuntime;

use crate::env::{SimConsensus, SimRt, SimRunner};
use crate::faults::{Bug, Fault};
use crate::rng::Rng;
use crate::trace::{vnow_ms, Trace};
use crate::Options;

impetus_raft::declare_impetus_types!(
    /// The simulator's openraft type config: Impetus's types on `openraft_rt_sim::SimRuntime`.
    pub SimConfig,
    openraft_rt_sim::SimRuntime
);

/// A Raft node of the simulation.
pub type SimRaft = ImpetusRaft<SimConfig>;
/// A peer of the simulation: the real `impetus_node::peer::Peer`.
pub type SimPeer = Peer<SimRt, SimConsensus, SimRunner>;

/// Wall-clock base of the simulated clocks (2025-01-01), so timestamps look real.
pub const CLOCK_BASE_MS: u64 = 1_735_689_600_000;

/// A write (local or forwarded) gives up after this long.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

pub(crate) async fn sleep_ms(ms: u64) {
    SimRuntime::sleep(Duration::from_millis(ms)).await;
}

/// A live Raft node: what the network and forwarding reach.
#[derive(Clone)]
pub(crate) struct Live {
    pub raft: SimRaft,
    pub consensus: Arc<RaftConsensus<SimConfig>>,
    /// The snapshots the node built (what it restarts from).
    pub snapshots: MemSnapshotStore,
}

/// How one message travels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub delay_ms: u64,
    pub drop_request: bool,
    pub duplicate: bool,
    pub resp_delay_ms: u64,
    pub drop_response: bool,
}

#[derive(Default)]
pub(crate) struct NetState {
    pub live: BTreeMap<NodeId, Live>,
    /// Directed links that are cut: (from, to).
    pub blocked: BTreeSet<(NodeId, NodeId)>,
    /// Message faults are on (until the heal).
    pub faulty: bool,
}

/// What the checkers collect during the run.
#[derive(Default)]
pub(crate) struct Audit {
    /// Acknowledged submits: idempotency key → job id.
    pub acked: BTreeMap<String, JobId>,
    /// Violations seen while running (e.g. a resubmit that got another job).
    pub violations: Vec<(&'static str, String)>,
    /// Completions the writers saw accepted, per job.
    pub accepted_completions: BTreeMap<JobId, u32>,
    /// Snapshot hashes sampled on replicas: state applied index → (node → hash).
    pub samples: BTreeMap<u64, BTreeMap<NodeId, [u8; 32]>>,
    pub client_done: bool,
    pub writes_ok: u64,
    pub writes_failed: u64,
    pub crashes: u64,
    /// Leaves that ended with the peer out of the cluster, and those that did not.
    pub leaves: u64,
    pub leaves_failed: u64,
    /// Peers that learned by themselves that the cluster took them out,
    /// and how: checked against the registry at the end.
    pub removals_learned: Vec<(NodeId, String)>,
    /// Jobs whose results their leader wrote with their submit.
    pub done_in_submit: u64,
    /// Completions accepted from workers' peers (the leader writes them for
    /// the worker's turn).
    pub worker_completions: u64,
    /// Workers the committed log made learners, and voters.
    pub workers_learners: u64,
    pub workers_voters: u64,
}

/// Per-node disk and peer bookkeeping.
#[derive(Default)]
pub(crate) struct NodeBook {
    /// This node's running `Peer` (its registry id is the node id).
    pub peer: Option<SimPeer>,
    /// Flush interval of the slow disk (ms), when the disk fault is on.
    pub flush_every_ms: u64,
    /// How this node's leave ended (`Err` says why it did not leave), once
    /// it has; the nemesis then stops the node.
    pub left: Option<Result<(), String>>,
    /// Its peer learned that the cluster took it out (`PeerError::Removed`
    /// at start, or `Peer::removed`); the nemesis then stops the node.
    pub removed: bool,
}

pub(crate) struct World {
    pub opts: Options,
    pub rng: Mutex<Rng>,
    pub trace: Trace,
    pub net: Mutex<NetState>,
    /// Clock skew per node, ms.
    pub skew: Mutex<BTreeMap<NodeId, i64>>,
    pub audit: Mutex<Audit>,
    pub books: Mutex<BTreeMap<NodeId, NodeBook>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    pub fn new(opts: Options) -> World {
        World {
            rng: Mutex::new(Rng::new(opts.seed)),
            trace: Trace::new(opts.print_trace),
            net: Mutex::new(NetState::default()),
            skew: Mutex::new(BTreeMap::new()),
            audit: Mutex::new(Audit::default()),
            books: Mutex::new(BTreeMap::new()),
            opts,
        }
    }

    /// Break the reference cycles (peers hold the world) so a run frees its memory.
    pub fn clear(&self) {
        lock(&self.books).clear();
        lock(&self.net).live.clear();
    }

    pub fn has(&self, f: Fault) -> bool {
        self.opts.faults.has(f)
    }

    pub fn bug(&self) -> Bug {
        self.opts.bug
    }

    pub fn rng(&self) -> MutexGuard<'_, Rng> {
        lock(&self.rng)
    }

    pub fn event(&self, what: impl std::fmt::Display) {
        self.trace.event(what);
    }

    pub fn violation(&self, checker: &'static str, msg: String) {
        self.event(format_args!("VIOLATION {checker}: {msg}"));
        lock(&self.audit).violations.push((checker, msg));
    }

    /// The wall clock a node's `Runtime::now` shows: virtual time plus its skew.
    pub fn clock_now(&self, node: NodeId) -> Timestamp {
        let skew = lock(&self.skew).get(&node).copied().unwrap_or(0);
        let ms = (CLOCK_BASE_MS + vnow_ms()) as i64 + skew;
        Timestamp(ms.max(0) as u64)
    }

    pub fn live(&self, node: NodeId) -> Option<Live> {
        lock(&self.net).live.get(&node).cloned()
    }

    pub fn live_ids(&self) -> Vec<NodeId> {
        lock(&self.net).live.keys().copied().collect()
    }

    /// Whether `node` started as a worker: outside Raft membership (ids
    /// after the peers').
    pub fn is_worker(&self, node: NodeId) -> bool {
        node > self.opts.peers as NodeId
    }

    /// The status of the most advanced live node (highest term, its leader
    /// first, then commit index): whose membership the nemesis and the end
    /// go by.
    pub fn newest_status(&self) -> RaftStatus {
        let live: Vec<Live> = lock(&self.net).live.values().cloned().collect();
        let statuses = live.iter().map(|l| l.consensus.status());
        statuses.max_by_key(|s| (s.term, s.leader == Some(s.node), s.commit_index)).unwrap_or_default()
    }

    pub fn link_open(&self, from: NodeId, to: NodeId) -> bool {
        !lock(&self.net).blocked.contains(&(from, to))
    }

    /// Draw how the next message from `from` to `to` travels.
    pub fn plan(&self) -> Plan {
        let faulty = lock(&self.net).faulty;
        let mut r = self.rng();
        let latency = |r: &mut Rng| {
            let base = if self.has(Fault::Delay) { r.range(1, 21) } else { 1 };
            if faulty && self.has(Fault::Reorder) && r.chance(30) {
                base + r.range(50, 400)
            } else {
                base
            }
        };
        let delay_ms = latency(&mut r);
        let resp_delay_ms = latency(&mut r);
        let drop_request = faulty && self.has(Fault::Drop) && r.chance(40);
        let drop_response = faulty && self.has(Fault::Drop) && r.chance(30);
        let duplicate = faulty && self.has(Fault::Dup) && r.chance(30);
        Plan { delay_ms, drop_request, duplicate, resp_delay_ms, drop_response }
    }

    /// Record a write a peer made and what it saw (trace and audit).
    pub fn observe_write(&self, node: NodeId, cmd: &Command, res: &Result<ApplyResult, ConsensusError>) {
        let name = cmd_name(cmd);
        match res {
            Ok(Ok(outcome)) => {
                let mut a = lock(&self.audit);
                a.writes_ok += 1;
                let pairs: Vec<(&Command, Option<&Outcome>)> = match (cmd, outcome) {
                    (Command::Batch(cs), Outcome::Batch(os)) => {
                        cs.iter().zip(os.iter().map(|o| o.as_ref().ok())).collect()
                    }
                    _ => vec![(cmd, Some(outcome))],
                };
                let mut accepted = Vec::new();
                for (c, o) in pairs {
                    match (c, o) {
                        (Command::Complete { peer, completions }, Some(Outcome::Completed(rs))) => {
                            for (comp, r) in completions.iter().zip(rs) {
                                if r.is_ok() {
                                    *a.accepted_completions.entry(comp.job).or_default() += 1;
                                    accepted.push(comp.job.0);
                                    if self.is_worker(peer.0) {
                                        a.worker_completions += 1;
                                    }
                                }
                            }
                        }
                        // Results written with their submit: completions too.
                        (Command::SubmitRan { ran, .. }, Some(Outcome::Batch(parts))) => {
                            let [submitted, _, completed] = parts.as_slice() else { continue };
                            for (sub, _) in ran_results(ran.iter().map(|r| r.index), submitted, completed)
                                .into_iter()
                                .filter(|(_, r)| r.is_ok())
                            {
                                *a.accepted_completions.entry(sub.job).or_default() += 1;
                                accepted.push(sub.job.0);
                                a.done_in_submit += 1;
                            }
                        }
                        _ => {}
                    }
                }
                drop(a);
                self.event(format_args!("n{node} write {name} ok completed={accepted:?}"));
            }
            Ok(Err(e)) => {
                lock(&self.audit).writes_ok += 1;
                self.event(format_args!("n{node} write {name} refused: {e}"));
            }
            Err(e) => {
                lock(&self.audit).writes_failed += 1;
                self.event(format_args!("n{node} write {name} failed: {e}"));
            }
        }
    }

    /// Carry a request of a peer (a forwarded write, a worker's ask) from `from` to `to`: delay, loss, a cut
    /// link, the target down. What the target runs comes next; then
    /// [`World::carry_response`] with the same plan.
    async fn carry_request(&self, from: NodeId, to: NodeId, what: &str) -> Result<(Live, Plan), ConsensusError> {
        let plan = self.plan();
        sleep_ms(plan.delay_ms).await;
        if plan.drop_request || !self.link_open(from, to) {
            return Err(ConsensusError::Unavailable(format!("{what} n{from}->n{to}: request lost")));
        }
        match self.live(to) {
            Some(live) => Ok((live, plan)),
            None => Err(ConsensusError::Unavailable(format!("{what} n{from}->n{to}: n{to} is down"))),
        }
    }

    /// Carry the response of a [`World::carry_request`] back.
    async fn carry_response(&self, from: NodeId, to: NodeId, what: &str, plan: Plan) -> Result<(), ConsensusError> {
        sleep_ms(plan.resp_delay_ms).await;
        if plan.drop_response || !self.link_open(to, from) {
            return Err(ConsensusError::Unavailable(format!("{what} n{from}->n{to}: response lost")));
        }
        Ok(())
    }

    /// A peer whose Raft knows no leader asks a live voter, chosen by the
    /// seed, who leads.
    pub async fn find_leader(&self, from: NodeId) -> Result<NodeId, ConsensusError> {
        let live: Vec<(NodeId, Live)> = lock(&self.net).live.iter().map(|(id, l)| (*id, l.clone())).collect();
        let ids: Vec<NodeId> =
            live.into_iter().filter(|(id, l)| l.consensus.status().voters.contains(id)).map(|(id, _)| id).collect();
        let pick = self.rng().pick(&ids);
        let Some(to) = pick else {
            sleep_ms(20).await;
            return Err(ConsensusError::Unavailable("no voter is up".into()));
        };
        let (live, plan) = self.carry_request(from, to, "leader?").await?;
        let leader = live.consensus.status().leader;
        self.carry_response(from, to, "leader?", plan).await?;
        match leader {
            Some(l) => Ok(l),
            None => {
                // Like a real worker while no leader is known: wait a little.
                sleep_ms(20).await;
                Err(ConsensusError::Unavailable(format!("n{to} knows no leader")))
            }
        }
    }

    /// `from` asks the leader `to` to take `peer` out of the cluster, as
    /// `ClientRequest::Leave` does (`ClusterService::remove` on the leader).
    pub async fn forward_leave(self: &Arc<Self>, from: NodeId, to: NodeId, peer: PeerId) -> Result<(), ConsensusError> {
        let (leader, plan) = self.carry_request(from, to, "leave").await?;
        let cluster = SimConsensus::new(self.clone(), to, leader.consensus.clone());
        let res = leader.consensus.remove_peer(&cluster, self.clock_now(to), peer).await;
        self.carry_response(from, to, "leave", plan).await?;
        res
    }

    /// A worker fetches a module's bytes from the leader `to`.
    pub async fn fetch_module(
        &self,
        from: NodeId,
        to: NodeId,
        hash: ModuleHash,
    ) -> Result<Option<Vec<u8>>, ConsensusError> {
        let (live, plan) = self.carry_request(from, to, "module").await?;
        let bytes = live.consensus.read(|s| s.module(&hash).map(<[u8]>::to_vec));
        self.carry_response(from, to, "module", plan).await?;
        Ok(bytes)
    }

    /// Carry a worker's turn from `from` to the leader `to`, which runs
    /// `serve_work` on its own state (its writes observed like any other)
    /// in a task of its own: the worker going down mid-turn does not stop it.
    pub async fn forward_work(
        self: &Arc<Self>,
        from: NodeId,
        to: NodeId,
        req: WorkRequest,
    ) -> Result<WorkReply, ConsensusError> {
        let (live, plan) = self.carry_request(from, to, "work").await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let world = self.clone();
        drop(SimRuntime::spawn(async move {
            let status = live.consensus.status();
            let res = if status.leader == Some(to) {
                let c = SimConsensus::new(world.clone(), to, live.consensus);
                serve_work(&c, world.clock_now(to), req).await
            } else {
                Err(ConsensusError::NotLeader { leader: None, leader_id: status.leader })
            };
            // The worker may be gone: then no one reads the answer.
            let _ = tx.send(res);
        }));
        let res =
            rx.await.unwrap_or_else(|_| Err(ConsensusError::Unavailable(format!("work n{from}->n{to}: no answer"))));
        self.carry_response(from, to, "work", plan).await?;
        res
    }

    /// Forward a write from `from` to the leader `to` over the simulated
    /// network; the leader stamps it with its own clock.
    pub async fn forward(&self, from: NodeId, to: NodeId, cmd: Command) -> Result<ApplyResult, ConsensusError> {
        let (leader, plan) = self.carry_request(from, to, "forward").await?;
        let now = self.clock_now(to);
        // As a peer forwards: results it ran as leader are not another's to write.
        let res = with_timeout(leader.consensus.write(now, cmd.without_results())).await;
        self.carry_response(from, to, "forward", plan).await?;
        res
    }
}

/// A write that gives up after [`WRITE_TIMEOUT`].
pub(crate) async fn with_timeout(
    fut: impl Future<Output = Result<ApplyResult, ConsensusError>> + Send,
) -> Result<ApplyResult, ConsensusError> {
    match SimRuntime::timeout(WRITE_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConsensusError::Unavailable("write timed out".into())),
    }
}

pub(crate) fn cmd_name(cmd: &Command) -> String {
    match cmd {
        Command::Batch(cs) => {
            let names: Vec<String> = cs.iter().map(cmd_name).collect();
            format!("[{}]", names.join(","))
        }
        Command::Submit { jobs, .. } => format!("Submit({})", jobs.len()),
        Command::SubmitRan { jobs, ran, .. } => format!("SubmitRan({}, ran {})", jobs.len(), ran.len()),
        Command::Lease { max, .. } => format!("Lease({max})"),
        Command::Complete { completions, .. } => {
            let ids: Vec<String> = completions.iter().map(|c| format!("{}@{}", c.job.0, c.token.0)).collect();
            format!("Complete({})", ids.join(" "))
        }
        Command::Fail { failures, .. } => {
            let ids: Vec<String> = failures.iter().map(|c| format!("{}@{}", c.job.0, c.token.0)).collect();
            format!("Fail({})", ids.join(" "))
        }
        Command::Renew { leases, .. } => format!("Renew({})", leases.len()),
        Command::Tick => "Tick".into(),
        Command::Heartbeat { .. } => "Heartbeat".into(),
        Command::RegisterPeer { .. } => "RegisterPeer".into(),
        Command::Release { leases, .. } => format!("Release({})", leases.len()),
        Command::PutModule { .. } => "PutModule".into(),
        Command::CreateStream { .. } => "CreateStream".into(),
        other => {
            let s = format!("{other:?}");
            s.split([' ', '{', '(']).next().unwrap_or("?").to_string()
        }
    }
}

// ---- the Raft network ------------------------------------------------------

/// The network factory of one node.
#[derive(Clone)]
pub(crate) struct NetFactory {
    pub world: Arc<World>,
    pub source: NodeId,
    /// The source incarnation: a crashed process sends nothing, even if one
    /// of its tasks (e.g. an openraft replication task) outlives the shutdown.
    pub alive: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone)]
pub(crate) struct Connection {
    world: Arc<World>,
    from: NodeId,
    to: NodeId,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

impl RaftNetworkFactory<SimConfig> for NetFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &PeerNode) -> Connection {
        Connection { world: self.world.clone(), from: self.source, to: target, alive: self.alive.clone() }
    }
}

fn unreachable<E: std::fmt::Display>(e: E) -> Unreachable<SimConfig> {
    Unreachable::from_string(e.to_string())
}

fn fatal_rpc(e: RaftError<SimConfig>) -> RPCError<SimConfig> {
    match e {
        RaftError::APIError(never) => match never {},
        RaftError::Fatal(f) => RPCError::Unreachable(Unreachable::new(&f)),
    }
}

impl Connection {
    /// Carry a request to the target: delay, loss, partition, target down.
    async fn request(&self, kind: &str) -> Result<(SimRaft, Plan), Unreachable<SimConfig>> {
        let plan = self.world.plan();
        sleep_ms(plan.delay_ms).await;
        let (from, to) = (self.from, self.to);
        if !self.alive.load(std::sync::atomic::Ordering::SeqCst) {
            self.world.event(format_args!("net n{from}->n{to} {kind} from a crashed incarnation: not sent"));
            return Err(unreachable("source crashed"));
        }
        if plan.drop_request {
            self.world.event(format_args!("net n{from}->n{to} {kind} dropped"));
            return Err(unreachable("request dropped"));
        }
        if !self.world.link_open(from, to) {
            return Err(unreachable("partitioned"));
        }
        match self.world.live(to) {
            Some(l) => Ok((l.raft, plan)),
            None => Err(unreachable("target down")),
        }
    }

    /// Carry the response back.
    async fn response(&self, kind: &str, plan: Plan) -> Result<(), Unreachable<SimConfig>> {
        sleep_ms(plan.resp_delay_ms).await;
        let (from, to) = (self.from, self.to);
        if plan.drop_response {
            self.world.event(format_args!("net n{to}->n{from} {kind} response dropped"));
            return Err(unreachable("response dropped"));
        }
        if !self.world.link_open(to, from) {
            return Err(unreachable("partitioned (response)"));
        }
        if self.world.live(from).is_none() || !self.alive.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(unreachable("source down"));
        }
        Ok(())
    }
}

impl RaftNetworkV2<SimConfig> for Connection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<SimConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<SimConfig>, RPCError<SimConfig>> {
        let (raft, plan) = self.request("append").await?;
        let n = rpc.entries.len();
        let mut resp = raft.append_entries(rpc.clone()).await.map_err(fatal_rpc)?;
        if plan.duplicate {
            self.world.event(format_args!("net n{}->n{} append({n}) duplicated", self.from, self.to));
            resp = raft.append_entries(rpc).await.map_err(fatal_rpc)?;
        }
        self.response("append", plan).await?;
        Ok(resp)
    }

    /// A stream session as the real network runs it (`raft_pipeline` in
    /// `impetus-node`): one ordered channel, the appends pipelined into the
    /// target's `Raft::stream_append`. A fault on any message (loss, a cut
    /// link, either end down) breaks the channel, and the session ends with
    /// an error after the replies already on their way. A session of one
    /// append (a heartbeat) goes one request at a time, as in `impetus-node`.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<BoxStream<'s, Result<StreamAppendResult<SimConfig>, RPCError<SimConfig>>>, RPCError<SimConfig>>,
    >
    where
        S: Stream<Item = AppendEntriesRequest<SimConfig>> + OptionalSend + Unpin + 'static,
    {
        if impetus_raft::is_single_append(&input) {
            return stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let (raft, _) = self.request("session").await?;
            let broken: Arc<Mutex<Option<String>>> = Arc::default();
            let (c, b) = (self.clone(), broken.clone());
            let requests = input
                .then(move |req| {
                    let (c, b) = (c.clone(), b.clone());
                    async move {
                        let n = req.entries.len();
                        match c.request("session append").await {
                            Ok(_) => Some(req),
                            Err(e) => {
                                c.world.event(format_args!("net n{}->n{} session broken at append({n})", c.from, c.to));
                                *b.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
                                None
                            }
                        }
                    }
                })
                .take_while(|req| std::future::ready(req.is_some()))
                .filter_map(std::future::ready);
            let replies = raft.stream_append(requests).boxed();
            let session = Some((replies, self.clone(), broken));
            let replies = futures::stream::unfold(session, |session| async move {
                let (mut replies, c, broken) = session?;
                let result = match replies.next().await {
                    Some(Ok(result)) => result,
                    Some(Err(fatal)) => return Some((Err(RPCError::Unreachable(Unreachable::new(&fatal))), None)),
                    None => {
                        let why = broken.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()?;
                        return Some((Err(RPCError::Unreachable(unreachable(why))), None));
                    }
                };
                if let Err(e) = c.response("session reply", c.world.plan()).await {
                    return Some((Err(RPCError::Unreachable(e)), None));
                }
                let go_on = result.is_ok();
                Some((Ok(result), go_on.then_some((replies, c, broken))))
            });
            let replies: BoxStream<'s, _> = replies.boxed();
            Ok(replies)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<SimConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<SimConfig>, RPCError<SimConfig>> {
        let (raft, plan) = self.request("vote").await?;
        let mut resp = raft.vote(rpc.clone()).await.map_err(fatal_rpc)?;
        if plan.duplicate {
            resp = raft.vote(rpc).await.map_err(fatal_rpc)?;
        }
        self.world.event(format_args!("net n{}->n{} vote granted={}", self.from, self.to, resp.vote_granted));
        self.response("vote", plan).await?;
        Ok(resp)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<SimConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<SimConfig>, RPCError<SimConfig>> {
        let (raft, plan) = self.request("pre_vote").await?;
        let resp = raft.pre_vote(rpc).await.map_err(fatal_rpc)?;
        self.response("pre_vote", plan).await?;
        Ok(resp)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<SimConfig>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<SimConfig>, RPCError<SimConfig>> {
        let (raft, plan) = self.request("transfer_leader").await?;
        let resp = raft.handle_transfer_leader(req).await.map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        self.world.event(format_args!("net n{}->n{} the leader hands its lead over", self.from, self.to));
        self.response("transfer_leader", plan).await?;
        Ok(resp)
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + impetus_raft::openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<SimConfig>, StreamingError<SimConfig>> {
        let (raft, plan) = self.request("snapshot").await?;
        let resp =
            raft.install_full_snapshot(vote, snapshot).await.map_err(|e: Fatal<SimConfig>| Unreachable::new(&e))?;
        self.response("snapshot", plan).await?;
        Ok(resp)
    }
}
