//! `impetus peer`: one real peer — Raft on sled, the wasm executor, the
//! client protocol on libp2p — wired to the peer logic.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use impetus_raft::{PeerNode, TypeConfig};
use libp2p::identity::Keypair;
use tokio::sync::Notify;

use impetus_proto::api::{ClientRequest, ClientResponse};
use impetus_proto::{ModuleHash, PeerId, PeerInfo, Seat};

use crate::cluster::{ClusterConsensus, ClusterService};
use crate::exec::{ExecConfig, ExecError, Executor, RunSpec};
use crate::metrics::Metrics;
use crate::net::raft_rpc::P2pRaftNetwork;
use crate::net::{Handlers, NetConfig, Server};
use crate::peer::early::Quick;
use crate::peer::membership::{self, Policy};
use crate::peer::{Attempt, Consensus, JobRunner, Peer, PeerConfig, PeerError, RaftStatus, RunReport};
use crate::raft_consensus::RaftConsensus;
use crate::rt::TokioRuntime;

/// Where a peer listens when not told: client commands find it with no flags.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

/// How to run a peer.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    /// `host:port` or a multiaddr.
    pub listen: String,
    pub data_dir: PathBuf,
    pub authkey: Option<String>,
    /// Jobs run at once on this peer.
    pub capacity: u32,
    /// Peers to join (any member will do). Empty: found a cluster, or find
    /// one by mDNS.
    pub join: Vec<String>,
    /// Voters the cluster grows to (3, or 5 to survive two failures).
    pub voters: usize,
    /// A voter silent this long is replaced by a caught-up learner.
    pub voter_timeout: Duration,
    /// A learner or worker silent this long is taken out of the cluster
    /// (zero: never).
    pub forget_after: Duration,
    /// mDNS discovery; `None`: on unless the listen address is loopback
    /// (libp2p's mDNS never runs on loopback).
    pub mdns: Option<bool>,
    /// Serve Prometheus `/metrics` on this `host:port`.
    pub metrics: Option<String>,
    /// Whether this peer may take a voter seat (`--voter`, `--worker`).
    pub seat: Seat,
}

impl PeerOptions {
    pub fn default_capacity() -> u32 {
        std::thread::available_parallelism().map(|n| n.get() as u32 * 2).unwrap_or(4)
    }

    /// Options for a peer on `listen` with data in `data_dir`, everything
    /// else at its default.
    pub fn new(listen: impl Into<String>, data_dir: impl Into<PathBuf>) -> PeerOptions {
        PeerOptions {
            listen: listen.into(),
            data_dir: data_dir.into(),
            authkey: None,
            capacity: PeerOptions::default_capacity(),
            join: vec![],
            voters: DEFAULT_VOTERS,
            voter_timeout: DEFAULT_VOTER_TIMEOUT,
            forget_after: DEFAULT_FORGET_AFTER,
            mdns: None,
            metrics: None,
            seat: Seat::Any,
        }
    }
}

/// Voters a cluster grows to by default.
pub const DEFAULT_VOTERS: usize = 3;
/// A voter silent this long is replaced, by default.
pub const DEFAULT_VOTER_TIMEOUT: Duration = Duration::from_secs(10);
/// A learner or worker silent this long is taken out, by default.
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(600);

/// How often the peer looks whether its Raft node stopped on its own.
const RAFT_CHECK_EVERY: Duration = Duration::from_millis(500);

/// Why a peer could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not join the cluster through {tried} (last error: {last}); is a peer running there, with the same --authkey?")]
    Join { tried: String, last: String },
    #[error(
        "a --worker peer cannot found a cluster (it never holds Raft state), and it has no --join address \
         and found no peer by mDNS: start a member first and give its address with --join ADDR"
    )]
    WorkerCannotFound,
    #[error("the Raft node stopped: {reason}; fix the cause (a full disk?) and start the peer again")]
    RaftStopped { reason: String },
    #[error("this peer is node {raft} in Raft but {registry} in the registry; its data directory is inconsistent")]
    Identity { raft: u64, registry: u64 },
    #[error("invalid listen address {addr:?}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("data directory {}: {source}", path.display())]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("raft storage: {0}")]
    Raft(#[from] impetus_raft::RaftError),
    #[error("wasm executor: {0}")]
    Exec(#[from] ExecError),
    #[error("peer: {0}")]
    Peer(#[from] crate::peer::PeerError),
    #[error("network: {0}")]
    Net(#[from] crate::net::NetError),
    #[error("starting the threads jobs run on: {0}")]
    JobThreads(std::io::Error),
    #[error(
        "the cluster took this peer out {times} times in a row, each time it joined again; is another peer \
         using the same address?"
    )]
    RemovedAgain { times: usize },
    #[error(
        "this peer is voter {id} of the cluster, but its Raft state ({}) is gone, and a voter that forgot \
         its votes could help elect two leaders: restore that directory; or, once the cluster has replaced \
         voter {id} (after --voter-timeout), start this peer with a fresh --data-dir (a new identity and id)",
        raft.display()
    )]
    VoterLostItsState { id: u64, raft: PathBuf },
}

/// How much nicer than the peer's own threads its job threads run, so the
/// Raft and network work of every peer on the machine preempts a job.
#[cfg(target_os = "linux")]
const JOB_NICENESS: i32 = 10;

/// Run the calling job thread [`JOB_NICENESS`] nicer. Linux only: there the
/// call names the calling thread (elsewhere it would renice the process).
fn lower_job_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        let base = rustix::process::getpriority_process(None).unwrap_or(0);
        if let Err(e) = rustix::process::setpriority_process(None, job_niceness(base)) {
            tracing::debug!(error = %e, "job thread keeps its priority");
        }
    }
}

/// A job thread's niceness when the peer's is `base` (19 is the lowest priority).
#[cfg(target_os = "linux")]
fn job_niceness(base: i32) -> i32 {
    base.saturating_add(JOB_NICENESS).min(19)
}

/// The threads jobs run on: a runtime of their own, so a job starts at
/// once on an idle thread instead of waiting behind the Raft and network
/// work of the peer's runtime, and at a lower priority
/// ([`lower_job_thread_priority`]), so a busy job never delays a heartbeat.
/// (A lone job of a module known to be quick runs where it is started:
/// [`WasmRunner`].)
/// Shut down without waiting when dropped: by then the peer has drained
/// its jobs.
pub struct JobThreads {
    rt: Option<tokio::runtime::Runtime>,
}

impl JobThreads {
    /// One thread per core.
    pub fn new() -> std::io::Result<JobThreads> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("impetus-job")
            .on_thread_start(lower_job_thread_priority)
            .enable_time()
            .build()?;
        Ok(JobThreads { rt: Some(rt) })
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match &self.rt {
            Some(rt) => rt.handle().clone(),
            None => unreachable!("the job threads are only taken when dropped"),
        }
    }
}

impl std::fmt::Debug for JobThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let threads = self.rt.as_ref().map(|rt| rt.metrics().num_workers());
        f.debug_struct("JobThreads").field("threads", &threads).finish()
    }
}

impl Drop for JobThreads {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The wasm executor as the peer's [`JobRunner`], counting what it runs.
/// Jobs run on [`JobThreads`], except that a lone job of a module known to
/// be quick runs its first slice where it is started (see `start`).
#[derive(Clone)]
pub struct WasmRunner {
    exec: Executor,
    metrics: Option<Arc<Metrics>>,
    jobs: tokio::runtime::Handle,
    inline: Arc<Inline>,
    /// One compile at a time: the jobs of a module this peer has not seen
    /// yet all wait for its first compile instead of each compiling it
    /// (64 concurrent compiles starved Raft heartbeats in `just bench cluster`).
    compiling: Arc<tokio::sync::Mutex<()>>,
}

impl WasmRunner {
    pub fn new(exec: Executor, metrics: Option<Arc<Metrics>>, jobs: &JobThreads) -> WasmRunner {
        WasmRunner {
            exec,
            metrics,
            jobs: jobs.handle(),
            inline: Arc::new(Inline::new(QUICK_RUN, INLINE_SPACING)),
            compiling: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The same runner with other measures than [`QUICK_RUN`] and
    /// [`INLINE_SPACING`], for tests: a debug build runs even a no-op job
    /// slower, and a loaded test machine pauses threads.
    pub fn with_inline(mut self, quick_run: Duration, spacing: u32) -> WasmRunner {
        self.inline = Arc::new(Inline::new(quick_run, spacing));
        self
    }
}

impl std::fmt::Debug for WasmRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRunner").field("exec", &self.exec).finish_non_exhaustive()
    }
}

impl JobRunner for WasmRunner {
    fn prepare(&self, hash: ModuleHash, bytes: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let (exec, compiling) = (self.exec.clone(), self.compiling.clone());
        async move {
            let _one_at_a_time = compiling.lock().await;
            if exec.is_cached(&hash) {
                return Ok(());
            }
            // Cranelift compiles for a while: off the async threads, which
            // also carry Raft heartbeats.
            match tokio::task::spawn_blocking(move || exec.prepare(hash, &bytes)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(format!("compiling the module failed: {e}")),
            }
        }
    }

    fn is_prepared(&self, hash: &ModuleHash) -> bool {
        self.exec.is_cached(hash)
    }

    /// The job runs on whatever drives the future (the peer uses `start`).
    fn run(&self, a: Attempt) -> impl Future<Output = RunReport> + Send + 'static {
        run_job(self.exec.clone(), self.metrics.clone(), a)
    }

    /// The job runs on [`JobThreads`] and reports from there; but a lone
    /// job (no other runs on this peer: a lone submit, whose latency is
    /// made of hand-offs) of a module whose last run here took under
    /// [`QUICK_RUN`] runs its first slice here and now, and ends and reports
    /// within it: no hand-off to a job thread and back (each a thread woken
    /// from sleep: ~60 µs on a 2-core VM). One not done after its first
    /// slice ([`crate::exec::YIELD_FUEL`] of fuel, or sooner if it waits)
    /// goes on on the job threads. Such slices take at most a tenth of the
    /// caller's thread ([`INLINE_SPACING`]); a burst of jobs goes to the job
    /// threads, which run them side by side. A panic in a slice is caught
    /// and logged, and the job dropped, as a job thread would (its lease
    /// expires; it runs again). A job's timers are the job threads' either
    /// way.
    fn start<R: crate::peer::Runtime>(&self, _rt: &R, a: Attempt, done: impl FnOnce(RunReport) + Send + 'static) {
        let (exec, metrics, inline, module) = (self.exec.clone(), self.metrics.clone(), self.inline.clone(), a.module);
        let alone = inline.running.fetch_add(1, Ordering::SeqCst) == 0;
        let quick = inline.quick.all([a.module]);
        let counted = Running(inline.clone());
        let mut job = Box::pin(async move {
            let started = Instant::now();
            let report = run_job(exec, metrics, a).await;
            counted.0.quick.learn(module, started.elapsed() < counted.0.quick_run);
            drop(counted);
            done(report);
        });
        let _jobs = self.jobs.enter();
        let now = inline.epoch.elapsed();
        if alone && quick && micros(now) >= inline.next_us.load(Ordering::SeqCst) {
            let t = Instant::now();
            let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
            let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.as_mut().poll(&mut cx)));
            let next = now.saturating_add(t.elapsed().saturating_mul(inline.spacing));
            inline.next_us.store(micros(next), Ordering::SeqCst);
            match ended {
                Ok(std::task::Poll::Ready(())) => return,
                Ok(std::task::Poll::Pending) => {}
                Err(_) => {
                    // Its `done` went with it: the worker reports the job failed.
                    tracing::error!(%module, "a job panicked in its first slice");
                    return;
                }
            }
        }
        // Dropped unpolled when the job threads are gone (the peer stopped).
        drop(self.jobs.spawn(job));
    }

    fn leased(&self, n: usize) {
        if let Some(m) = &self.metrics {
            m.leases_granted(n as u64);
        }
    }
}

/// A lone job's first slice starts no sooner than this many times the
/// last such slice's length after that slice started: slices run where
/// jobs are started take at most a tenth of that thread, whatever the jobs.
const INLINE_SPACING: u32 = 10;

/// A module whose last run on this peer took less is quick: its next lone
/// job may run where it is started.
pub const QUICK_RUN: Duration = Duration::from_millis(1);

/// When [`WasmRunner::start`] may run a job's first slice where it is
/// started.
#[derive(Debug)]
struct Inline {
    /// Jobs started and not yet reported.
    running: AtomicUsize,
    /// When (µs after `epoch`) the next such slice may start.
    next_us: AtomicU64,
    epoch: Instant,
    /// A run that took less is quick.
    quick_run: Duration,
    /// Modules whose last run here was quick.
    quick: Quick,
    /// [`INLINE_SPACING`], but for tests.
    spacing: u32,
}

impl Inline {
    fn new(quick_run: Duration, spacing: u32) -> Inline {
        Inline {
            running: AtomicUsize::new(0),
            next_us: AtomicU64::new(0),
            epoch: Instant::now(),
            quick_run,
            quick: Quick::default(),
            spacing,
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One job counted in [`Inline::running`] until it reports (or is dropped
/// unfinished: the peer stopped).
struct Running(Arc<Inline>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Run one attempt on the executor, counting it.
async fn run_job(exec: Executor, metrics: Option<Arc<Metrics>>, a: Attempt) -> RunReport {
    tracing::trace!(target: crate::LATENCY, module = %a.module, "job starts");
    let started = std::time::Instant::now();
    let out = exec
        .run(RunSpec {
            module: a.module,
            args: &a.spec.args,
            env: &a.spec.env,
            input: &a.spec.input,
            timeout_ms: a.limits.job_timeout_ms,
            fuel: a.limits.fuel,
            memory_limit_bytes: a.limits.memory_limit_bytes,
        })
        .await;
    if let Some(m) = &metrics {
        let outcome = if out.result.is_ok() { "succeeded" } else { "failed" };
        m.job_finished(outcome, started.elapsed().as_secs_f64());
    }
    tracing::trace!(target: crate::LATENCY, module = %a.module, "job ends");
    RunReport { result: out.result, stdout_tail: out.stdout_tail, stderr_tail: out.stderr_tail }
}

/// How long a joiner keeps asking the `--join` peers to let it in.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fresh peer with mDNS listens for a cluster before founding one.
const MDNS_WINDOW: Duration = Duration::from_secs(3);
/// How long leaving the cluster may take on shutdown.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(15);

/// Run a peer until `shutdown` resolves (or a client asks it to leave), then
/// drain it: no new leases, running jobs finish (bounded by the grace
/// period), results are committed, it leaves the cluster's membership if
/// others remain, Raft shuts down.
///
/// A member the cluster took out while it was away (its registry entry is
/// gone: `impetus peer leave` was asked for it, or its own leave was done
/// but the answer lost) sets its Raft state aside ([`set_aside`]) and
/// starts again as a new peer, joining through the members it knew.
pub async fn run_peer(
    opts: PeerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let mut shutdown = Box::pin(shutdown);
    let _stalls = crate::rt::watch_stalls();
    let mut rejoins = 0;
    loop {
        let began = std::time::Instant::now();
        match run_once(&opts, &mut shutdown, rejoins > 0).await? {
            Life::Stopped => return Ok(()),
            Life::Removed(id) => {
                rejoins = if began.elapsed() < REJOIN_RESET { rejoins + 1 } else { 1 };
                if rejoins > MAX_REJOINS {
                    return Err(ServeError::RemovedAgain { times: rejoins });
                }
                let kept = set_aside(&opts.data_dir, id)?;
                tracing::warn!(
                    peer = %id,
                    kept = %kept.display(),
                    "the cluster no longer has this peer: it was taken out while away. Its Raft state is set aside \
                     (delete it once sure it is not needed) and the peer joins again as a new peer"
                );
            }
        }
    }
}

/// How a peer's life in a cluster ended.
enum Life {
    /// Shut down (a signal, a leave): the process exits.
    Stopped,
    /// The cluster no longer has this peer ([`Peer::removed`]): its Raft
    /// state is stale, and it should join again afresh.
    Removed(PeerId),
}

/// Times in a row a peer set aside stale state and joined again before it
/// gives up: one is the rule; more means something else is wrong. A life
/// that lasted [`REJOIN_RESET`] starts the count again.
const MAX_REJOINS: usize = 2;
const REJOIN_RESET: Duration = Duration::from_secs(600);

/// Move the state of a membership this peer is no longer in
/// (`DATA_DIR/raft`, `DATA_DIR/peer-id`) into `DATA_DIR/removed-ID[-N]`,
/// where `ID` is the peer id it had: kept, not deleted, in case the
/// cluster that answered was not the one that state came from.
fn set_aside(data_dir: &Path, id: PeerId) -> Result<PathBuf, ServeError> {
    let base = format!("removed-{}", id.0);
    let dest = (0..100)
        .map(|n| data_dir.join(if n == 0 { base.clone() } else { format!("{base}-{n}") }))
        .find(|d| !d.exists())
        .ok_or_else(|| ServeError::DataDir {
            path: data_dir.to_path_buf(),
            source: std::io::Error::other(format!("too many {base}-N directories; delete old ones")),
        })?;
    std::fs::create_dir(&dest).map_err(data_err(&dest))?;
    for name in ["raft", "peer-id"] {
        let from = data_dir.join(name);
        if from.exists() {
            std::fs::rename(&from, dest.join(name)).map_err(data_err(&from))?;
        }
    }
    std::fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(data_err(data_dir))?;
    Ok(dest)
}

/// One life of the peer in a cluster: from binding its address to
/// [`Life`].
///
/// `rejoining`: an earlier life was taken out of a cluster; this one joins
/// it again through the members it saved and never founds a new one.
async fn run_once<S: Future<Output = ()> + Send>(
    opts: &PeerOptions,
    shutdown: &mut Pin<Box<S>>,
    rejoining: bool,
) -> Result<Life, ServeError> {
    let listen = impetus_sdk::transport::resolve_addr(&opts.listen)
        .await
        .map_err(|reason| ServeError::Listen { addr: opts.listen.clone(), reason })?;
    std::fs::create_dir_all(&opts.data_dir).map_err(data_err(&opts.data_dir))?;

    // Bind first: a busy port is the most common mistake; say so before
    // touching storage. libp2p's TCP listener reuses ports, so probe with a
    // plain listener, which refuses a port another process listens on.
    if let Some(sock) = tcp_socket(&listen) {
        if let Err(e) = std::net::TcpListener::bind(sock) {
            return Err(ServeError::Listen {
                addr: opts.listen.clone(),
                reason: format!("{e} (is another peer running there?)"),
            });
        }
    }
    let keypair = load_or_create_identity(&opts.data_dir.join("identity"))?;
    let mdns = opts.mdns.unwrap_or_else(|| !crate::net::is_loopback(&listen));
    let server = Server::bind(NetConfig {
        listen,
        keypair: Some(keypair),
        authkey: opts.authkey.clone(),
        mdns,
        ..NetConfig::default()
    })
    .await?;
    let handlers = Arc::new(Handlers::default());
    let mut net = server.start(handlers.clone());
    let addr = net.handle.local_addr().to_string();

    let id_file = opts.data_dir.join("peer-id");
    let raft_dir = opts.data_dir.join("raft");
    let known_id = read_peer_id(&id_file);
    let info = PeerInfo {
        host: hostname(),
        pid: std::process::id(),
        addresses: vec![addr.clone()],
        capacity: opts.capacity,
        labels: vec![],
        seat: opts.seat,
    };
    // Who am I in Raft? A restarted member keeps its id and its replica. A
    // new peer joins (the leader registers it as a worker) or founds the
    // cluster as node 1. A worker holds no Raft state: after a restart it
    // joins again through its `--join` peers and gets its id back.
    let (log, sm) = impetus_raft::open_stores::<TypeConfig>(&raft_dir).await?;
    let metrics = Arc::new(Metrics::new());
    let observed = metrics.clone();
    let sm = sm.with_observer(Arc::new(move |state, cmd, result| observed.applied(state, cmd, result)));
    let holds_state = log.index_range().is_some()
        || log.purged().is_some()
        || log.vote().is_some()
        || sm.handle().last_applied().is_some();
    // The members this peer knew when it last joined or left a cluster.
    let saved = read_contacts(&opts.data_dir);
    let mut contacts = saved.clone();
    let (node_id, founder) = match known_id {
        Some(id) if holds_state => (id.0, false),
        _ => {
            // A signal while looking for the cluster stops the peer at once.
            let joined = tokio::select! {
                r = find_and_join(&net.handle, opts, &saved, &info, mdns) => r?,
                () = shutdown.as_mut() => {
                    tracing::info!("stopped before joining a cluster");
                    net.stop().await?;
                    return Ok(Life::Stopped);
                }
            };
            match (joined, known_id) {
                (None, _) if rejoining => {
                    return Err(ServeError::Join {
                        tried: format!("the members saved in {}", contacts_file(&opts.data_dir).display()),
                        last: "none answered; this peer was taken out of that cluster and joins it again, never \
                               founding a new one: start it with --join ADDR of a member"
                            .into(),
                    })
                }
                (None, None) if opts.seat == Seat::Never => return Err(ServeError::WorkerCannotFound),
                (None, None) => (FOUNDER, true),
                (None, Some(id)) => {
                    return Err(ServeError::Join {
                        tried: "no --join address and no peer found by mDNS".into(),
                        last: format!("this peer was worker {id} of a cluster; start it with --join ADDR of a member"),
                    })
                }
                // The same address is a voter's id: this is that voter,
                // back without its Raft state. It must not vote again
                // with its votes forgotten (two leaders in one term).
                // (With its state but no `peer-id` file it is that voter
                // whole, and goes on.)
                (Some(Joined { id, voter: true, .. }), _) if !holds_state => {
                    net.stop().await?;
                    return Err(ServeError::VoterLostItsState { id: id.0, raft: raft_dir.clone() });
                }
                (Some(Joined { id, members, .. }), _) => {
                    if known_id != Some(id) {
                        std::fs::write(&id_file, id.0.to_string()).map_err(data_err(&id_file))?;
                    }
                    save_contacts(&opts.data_dir, &members);
                    contacts = members;
                    (id.0, false)
                }
            }
        }
    };
    let init = founder.then(|| PeerNode { addr: addr.clone() });
    let network = P2pRaftNetwork::new(net.handle.clone());
    let (raft, state) =
        impetus_raft::start_node(node_id, impetus_raft::default_raft_config(), network, log, sm, init).await?;
    handlers.set_raft(raft.clone());
    let local = Arc::new(RaftConsensus::new(raft.clone(), state.clone(), node_id));
    let consensus = ClusterConsensus::new(local.clone(), net.handle.clone(), contacts);

    let executor = Executor::new(ExecConfig::default())?;
    let cfg = PeerConfig { capacity: opts.capacity.max(1), info, ..PeerConfig::default() };
    let job_threads = JobThreads::new().map_err(ServeError::JobThreads)?;
    let runner = WasmRunner::new(executor, Some(metrics.clone()), &job_threads);
    // A restarted member may wait minutes here for its cluster to have a
    // leader again (its peers starting too); a signal stops it at once.
    let started = tokio::select! {
        r = Peer::start(TokioRuntime, consensus.clone(), runner, cfg, Some(PeerId(node_id))) => r,
        () = shutdown.as_mut() => {
            tracing::info!("stopped while waiting for the cluster");
            stop_node(&raft, net).await?;
            return Ok(Life::Stopped);
        }
    };
    let peer = match started {
        Ok(peer) => peer,
        Err(PeerError::Removed(id)) => {
            // Where the cluster is, for the next life to join it again (a
            // founder killed before it ever stopped cleanly saved none).
            save_contacts(&opts.data_dir, &consensus.cluster_addresses());
            stop_node(&raft, net).await?;
            return Ok(Life::Removed(id));
        }
        Err(e) => return Err(e.into()),
    };
    if peer.id().0 != node_id {
        tracing::error!(peer = %peer.id(), node_id, "the registry and Raft disagree on this peer's id");
        peer.shutdown().await;
        return Err(ServeError::Identity { raft: node_id, registry: peer.id().0 });
    }
    if known_id != Some(peer.id()) {
        std::fs::write(&id_file, peer.id().0.to_string()).map_err(data_err(&id_file))?;
    }
    let leave = Arc::new(Notify::new());
    let service = Arc::new(ClusterService { peer: peer.clone(), consensus: consensus.clone(), leave: leave.clone() });
    handlers.set_client(service.clone());
    tracing::info!(peer = %peer.id(), %addr, data_dir = %opts.data_dir.display(), "impetus peer ready");

    let stopping = Arc::new(AtomicBool::new(false));
    let policy = Policy {
        target_voters: opts.voters.max(1),
        dead_after_ms: u64::try_from(opts.voter_timeout.as_millis()).unwrap_or(u64::MAX),
        forget_after_ms: u64::try_from(opts.forget_after.as_millis()).unwrap_or(u64::MAX),
        ..Policy::default()
    };
    let manager = {
        let (local, stopping) = (local.clone(), stopping.clone());
        tokio::spawn(membership::manage(TokioRuntime, local, policy, MANAGE_EVERY, move || {
            stopping.load(Ordering::SeqCst)
        }))
    };
    let metrics_server = match &opts.metrics {
        Some(maddr) => {
            match start_metrics(maddr, metrics.clone(), consensus.clone(), net.handle.clone(), peer.id()).await {
                Ok(server) => Some(server),
                Err(e) => {
                    // Stop the worker loop before the job threads go.
                    peer.shutdown().await;
                    manager.abort();
                    return Err(e);
                }
            }
        }
        None => None,
    };

    let removed = tokio::select! {
        () = shutdown.as_mut() => false,
        () = leave.notified() => false,
        () = peer.removed() => true,
        reason = raft_stopped(&raft) => {
            // Nothing can be committed through this replica any more: stop,
            // and say why. The jobs it holds go back to the queue when
            // their leases expire; what the cluster acknowledged is on a
            // quorum of the others.
            tracing::error!(peer = %peer.id(), %reason, "the Raft node stopped; this peer stops");
            stopping.store(true, Ordering::SeqCst);
            manager.abort();
            return Err(ServeError::RaftStopped { reason });
        }
        e = net.ended() => {
            // Nothing reaches this peer, nor it anyone: stop and say why
            // (its leases expire and its jobs run elsewhere).
            tracing::error!(peer = %peer.id(), error = %e, "the network stopped; this peer stops");
            stopping.store(true, Ordering::SeqCst);
            manager.abort();
            return Err(ServeError::Net(e));
        }
    };
    tracing::info!(peer = %peer.id(), removed, "shutting down: draining running jobs");
    stopping.store(true, Ordering::SeqCst);
    peer.shutdown().await;
    // Where the cluster is, for a later start that holds no Raft state
    // (this one leaving, or a worker): it joins there again instead of
    // founding a new cluster beside the old one.
    save_contacts(&opts.data_dir, &consensus.cluster_addresses());
    // A peer the cluster no longer has has nothing to leave.
    let left = !removed && leave_cluster(&service).await;
    manager.abort();
    if let Some((stop, task)) = metrics_server {
        let _ = stop.send(());
        let _ = task.await;
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    drop((raft, state, local, consensus, service, peer.clone()));
    let stopped = net.stop().await;
    if left {
        // This peer's Raft state belongs to a membership it is no longer
        // in: a later start joins afresh with a new id (even if the
        // network task failed meanwhile).
        forget_membership(&opts.data_dir);
    }
    stopped?;
    tracing::info!(peer = %peer.id(), left, "peer stopped");
    Ok(if removed { Life::Removed(peer.id()) } else { Life::Stopped })
}

/// Shut down a Raft node and the network of a peer that never started.
async fn stop_node(raft: &impetus_raft::Raft, net: crate::net::Running) -> Result<(), ServeError> {
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    net.stop().await?;
    Ok(())
}

/// The node id of the peer that founds a cluster: the registry's first id.
const FOUNDER: u64 = 1;
/// How often the membership manager looks at the cluster.
const MANAGE_EVERY: Duration = Duration::from_millis(500);

fn data_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError {
    let path = path.to_path_buf();
    move |source| ServeError::DataDir { path, source }
}

/// The peer's libp2p identity, kept in `path` so its address (`/p2p/ID`)
/// stays the same across restarts.
fn load_or_create_identity(path: &Path) -> Result<Keypair, ServeError> {
    match std::fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| ServeError::DataDir {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a peer identity: {e}")),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = Keypair::generate_ed25519();
            let bytes = k.to_protobuf_encoding().map_err(|e| ServeError::DataDir {
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
            std::fs::write(path, bytes).map_err(data_err(path))?;
            Ok(k)
        }
        Err(e) => Err(ServeError::DataDir { path: path.to_path_buf(), source: e }),
    }
}

/// What a join answered: this peer's id, the voters' addresses (whom to
/// ask who leads, later) and whether that id is a voter's.
struct Joined {
    id: PeerId,
    members: Vec<String>,
    voter: bool,
}

/// No `--join`, no saved contacts and no cluster found by mDNS: `None`
/// (found one). Otherwise join it and return what the join answered
/// ([`Joined`]).
///
/// A peer that was in a cluster (`saved`: `DATA_DIR/contacts`) joins it
/// again through those members, and never founds another: two clusters
/// answering for one set of addresses would be a split brain.
async fn find_and_join(
    net: &crate::net::NetHandle,
    opts: &PeerOptions,
    saved: &[String],
    info: &PeerInfo,
    mdns: bool,
) -> Result<Option<Joined>, ServeError> {
    let authkey = opts.authkey.as_deref();
    if opts.join.is_empty() && !saved.is_empty() {
        tracing::info!(contacts = ?saved, "joining the cluster this peer was in");
        return join_cluster(saved, authkey, info).await.map(Some).map_err(|e| match e {
            ServeError::Join { tried, last } => ServeError::Join {
                tried,
                last: format!(
                    "{last}; these are the members this peer knew ({}); to found a new cluster instead, remove that file",
                    contacts_file(&opts.data_dir).display()
                ),
            },
            other => other,
        });
    }
    let mut join = opts.join.clone();
    if join.is_empty() && mdns {
        join = mdns_cluster(net, authkey).await;
    }
    if join.is_empty() {
        return Ok(None);
    }
    join_cluster(&join, authkey, info).await.map(Some)
}

fn contacts_file(data_dir: &Path) -> PathBuf {
    data_dir.join("contacts")
}

/// The members saved by [`save_contacts`] (none if there is no file).
fn read_contacts(data_dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(contacts_file(data_dir)).unwrap_or_default();
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

/// Keep `members` (addresses, one per line) in `DATA_DIR/contacts`. Not
/// fatal: a peer that cannot write it still runs (and says so).
fn save_contacts(data_dir: &Path, members: &[String]) {
    if members.is_empty() {
        return;
    }
    let path = contacts_file(data_dir);
    let text = format!("# the members of this peer's cluster, as it last knew them\n{}\n", members.join("\n"));
    if let Err(e) = std::fs::write(&path, text) {
        tracing::warn!(path = %path.display(), error = %e, "could not save the cluster's members");
    }
}

/// Ask the `--join` peers, in turn, to let this peer in; returns what the
/// first to answer said ([`Joined`]).
async fn join_cluster(join: &[String], authkey: Option<&str>, info: &PeerInfo) -> Result<Joined, ServeError> {
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        for target in join {
            match join_once(target, authkey, info).await {
                Ok(joined) => {
                    tracing::info!(via = %target, peer = %joined.id, voter = joined.voter, "joined the cluster");
                    return Ok(joined);
                }
                Err(e) => {
                    tracing::info!(via = %target, error = %e, "could not join yet; retrying");
                    last = format!("{target}: {e}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(ServeError::Join { tried: join.join(", "), last })
}

async fn join_once(target: &str, authkey: Option<&str>, info: &PeerInfo) -> Result<Joined, String> {
    let client = impetus_sdk::Client::connect(target, authkey).await.map_err(|e| e.to_string())?;
    let peer = match client.request(ClientRequest::Join { info: info.clone() }).await.map_err(|e| e.to_string())? {
        ClientResponse::Joined { peer } => peer,
        ClientResponse::Error(e) => return Err(e.to_string()),
        other => return Err(format!("{target} answered a join request with {}", other.kind())),
    };
    // Whom to ask who leads, later: the voters, by their full addresses.
    let st = client.status().await.map_err(|e| e.to_string())?;
    let voters = st.peers.iter().filter(|p| st.voters.contains(&p.id));
    let members = voters.filter_map(|p| p.info.addresses.first().cloned()).collect();
    // Whether the id is a voter's, by the leader's membership when the
    // target is another peer (a follower's view may lag a promotion);
    // the target's if the leader cannot be asked.
    let leader_addr = st
        .leader
        .filter(|l| *l != st.peer)
        .and_then(|l| st.peers.iter().find(|p| p.id == l))
        .and_then(|p| p.info.addresses.first());
    let leader_voters = match leader_addr {
        Some(addr) => match impetus_sdk::Client::connect(&strip_p2p(addr), authkey).await {
            Ok(leader) => leader.status().await.ok().map(|s| s.voters),
            Err(_) => None,
        },
        None => None,
    };
    let voter = leader_voters.unwrap_or(st.voters).contains(&peer);
    Ok(Joined { id: peer, members, voter })
}

/// With mDNS and no `--join`: listen for peers for [`MDNS_WINDOW`]. If one
/// of them belongs to a cluster, join through it. If none does, the peer
/// with the lowest libp2p id founds the cluster and the others join it.
async fn mdns_cluster(net: &crate::net::NetHandle, authkey: Option<&str>) -> Vec<String> {
    tokio::time::sleep(MDNS_WINDOW).await;
    let found = net.discovered();
    if found.is_empty() {
        return vec![];
    }
    let me = net.local_addr().to_string();
    let mut in_cluster = vec![];
    for addr in &found {
        let target = addr.to_string();
        if let Ok(client) = impetus_sdk::Client::connect(&strip_p2p(&target), authkey).await {
            if client.status().await.is_ok_and(|s| s.leader.is_some()) {
                in_cluster.push(strip_p2p(&target));
            }
        }
    }
    if !in_cluster.is_empty() {
        return in_cluster;
    }
    let lowest = found.iter().map(|a| peer_id_of(&a.to_string())).min();
    if lowest.is_some_and(|l| l < peer_id_of(&me)) {
        // Someone else founds it: join it (it is starting, so retry).
        found.iter().map(|a| strip_p2p(&a.to_string())).collect()
    } else {
        vec![]
    }
}

fn strip_p2p(addr: &str) -> String {
    addr.split("/p2p/").next().unwrap_or(addr).to_owned()
}

fn peer_id_of(addr: &str) -> String {
    addr.rsplit("/p2p/").next().unwrap_or_default().to_owned()
}

/// After draining: leave membership if other voters remain. Returns
/// whether this peer left.
async fn leave_cluster<R: crate::peer::Runtime, X: JobRunner>(service: &ClusterService<R, X>) -> bool {
    let me = service.peer.id();
    let status = service.consensus.local.status();
    if !crate::raft_consensus::should_leave(&status) {
        return false;
    }
    // Asked again until done or `LEAVE_TIMEOUT` (an election, a change in
    // flight, a lost answer): each step of a departure is done at most once
    // (`RaftConsensus::remove_peer`). Asked of whoever leads now: a leader
    // that took itself out of membership leads no more.
    let mut last = String::from("no answer");
    let done = tokio::time::timeout(LEAVE_TIMEOUT, async {
        loop {
            let attempt = if service.consensus.local.status().leads_as_voter() {
                service.remove(me).await.map_err(|e| e.to_string())
            } else {
                match service.consensus.to_leader(ClientRequest::Leave { peer: me }).await {
                    Ok(ClientResponse::Left) => Ok(()),
                    Ok(ClientResponse::Error(e)) => Err(e.to_string()),
                    Ok(other) => Err(format!("the leader answered a leave request with {}", other.kind())),
                    Err(e) => Err(e.to_string()),
                }
            };
            match attempt {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(peer = %me, error = %e, "leaving the cluster: asking again");
                    last = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    })
    .await;
    match done {
        Ok(()) => {
            tracing::info!(peer = %me, "left the cluster");
            true
        }
        Err(_) => {
            tracing::warn!(peer = %me, error = %last, timeout = ?LEAVE_TIMEOUT,
                "could not leave the cluster; it keeps this peer as a member");
            false
        }
    }
}

fn forget_membership(data_dir: &Path) {
    for p in [data_dir.join("raft"), data_dir.join("peer-id")] {
        let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        if let Err(e) = r {
            tracing::warn!(path = %p.display(), error = %e, "could not remove state of a membership this peer left");
        }
    }
}

/// How often a worker's metrics refresh their view of the cluster from
/// the leader.
const WORKER_VIEW_EVERY: Duration = Duration::from_secs(2);

/// The cluster as a worker's metrics show it: the leader's Raft status and
/// streams, as last fetched.
type ClusterView = Arc<std::sync::Mutex<Option<(RaftStatus, Vec<impetus_proto::StreamInfo>)>>>;

/// Keep `view` fresh while this peer is a worker (it holds no replica of
/// its own): every [`WORKER_VIEW_EVERY`], ask the leader for its status. A
/// failed fetch keeps the last view.
async fn refresh_worker_view(consensus: ClusterConsensus, me: PeerId, view: ClusterView) {
    loop {
        if !consensus.local.status().holds_replica() {
            match consensus.to_leader(ClientRequest::Status).await {
                Ok(ClientResponse::Status(st)) => {
                    let raft = RaftStatus {
                        node: me.0,
                        leader: st.leader.map(|l| l.0),
                        term: st.term,
                        commit_index: st.commit_index,
                        applied_index: st.applied_index,
                        voters: st.voters.iter().map(|v| v.0).collect(),
                        learners: st.learners.iter().map(|l| l.0).collect(),
                    };
                    *view.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((raft, st.streams));
                }
                Ok(other) => tracing::debug!(answer = other.kind(), "metrics: unexpected answer to Status"),
                Err(e) => tracing::debug!(error = %e, "metrics: could not fetch the cluster's status"),
            }
        }
        tokio::time::sleep(WORKER_VIEW_EVERY).await;
    }
}

/// Completes when the Raft node stops on its own, with what stopped it:
/// a storage error (a full disk, a failed write or sync) is fatal to it.
/// Looked at twice a second: the metrics channel changes with every
/// append, and waking on each would cost the hot path a wake-up per write.
async fn raft_stopped(raft: &impetus_raft::Raft) -> String {
    use impetus_raft::openraft::async_runtime::WatchReceiver;
    let metrics = raft.metrics();
    let mut every = tokio::time::interval(RAFT_CHECK_EVERY);
    loop {
        every.tick().await;
        if let Err(fatal) = &metrics.borrow_watched().running_state {
            return fatal.to_string();
        }
    }
}

/// Serve `/metrics`. A voter or learner shows its own replica; a worker
/// the leader's view, refreshed every [`WORKER_VIEW_EVERY`] (its own Raft
/// knows no leader and holds no streams).
async fn start_metrics(
    addr: &str,
    metrics: Arc<Metrics>,
    consensus: ClusterConsensus,
    net: crate::net::NetHandle,
    me: PeerId,
) -> Result<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServeError::Listen { addr: addr.to_owned(), reason: format!("metrics: {e}") })?;
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /metrics");
    let view = ClusterView::default();
    let refresher = tokio::spawn(refresh_worker_view(consensus.clone(), me, view.clone()));
    let local = consensus.local.clone();
    let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
        let own = local.status();
        let fetched = if own.holds_replica() {
            None
        } else {
            view.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
        };
        let (raft, streams) = fetched.unwrap_or_else(|| (own, local.read(|s| s.streams())));
        metrics.render(&crate::metrics::Snapshot {
            peer: me.0,
            raft: &raft,
            streams: &streams,
            raft_streams_opened: net.raft_streams_opened(),
            client_streams_opened: net.client_streams_opened(),
        })
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        if let Err(e) = crate::metrics::serve(listener, render, async move {
            let _ = stopped.await;
        })
        .await
        {
            tracing::warn!(error = %e, "metrics server stopped");
        }
        refresher.abort();
    });
    Ok((stop, task))
}

/// The IP socket address of a `/ip4|ip6/../tcp/PORT` multiaddr with a fixed port.
fn tcp_socket(addr: &libp2p::Multiaddr) -> Option<std::net::SocketAddr> {
    use libp2p::multiaddr::Protocol;
    let mut ip = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(port) if port != 0 => return ip.map(|ip| std::net::SocketAddr::new(ip, port)),
            _ => {}
        }
    }
    None
}

fn read_peer_id(path: &Path) -> Option<PeerId> {
    let text = std::fs::read_to_string(path).ok()?;
    match text.trim().parse::<u64>() {
        Ok(id) => Some(PeerId(id)),
        Err(_) => {
            tracing::warn!(path = %path.display(), "ignoring an unreadable peer-id file");
            None
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jobs run below the peer's own threads, so Raft and network work
    /// preempts them.
    #[cfg(target_os = "linux")]
    #[test]
    fn job_threads_run_below_the_peers_priority() {
        let jobs = JobThreads::new().expect("job threads");
        let here = rustix::process::getpriority_process(None).expect("this thread's niceness");
        let on_job_thread = jobs.handle().spawn(async { rustix::process::getpriority_process(None) });
        let there = jobs.handle().block_on(on_job_thread).expect("joined").expect("a job thread's niceness");
        assert_eq!(there, job_niceness(here));
        assert!(there > here || here == 19, "{here} → {there}");
    }
}
