//! `impetus demo`: the helloworld of impetus v2 on a local cluster. Starts 3
//! peers as child processes (one founds the cluster, two join it), runs 100
//! jobs square(i) on them, prints their total and which peer ran how many.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use impetus_proto::api::ClusterStatus;
use impetus_proto::command::NewJob;
use impetus_proto::ids::{IdempotencyKey, PeerId, StreamName};
use impetus_proto::records::{JobSpec, JobStatus, StreamProps};
use impetus_sdk::{Client, ClientError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::submit::{describe_failure, progress_bar, put_module};
use super::{exit, Global};

const DEFAULT_MODULE: &str = "examples/jobs/wasm/square.wasm";
const STREAM: &str = "helloworld";
const JOBS: u64 = 100;
/// Peer processes in the demo cluster (all of them voters).
const PEERS: usize = 3;
/// How long the cluster has to form: every peer registered and a voter.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one connection attempt and status request may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long creating the stream, storing the module and running the 100
/// jobs may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a request that failed while the cluster changed leader is retried.
const RETRY_EVERY: Duration = Duration::from_millis(250);
/// Failed jobs whose error record is printed.
const SHOW_FAILURES: u64 = 3;
/// How long each peer has to drain and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Starts a local cluster of 3 `impetus peer` processes on free ports of 127.0.0.1, each with its \
data and log in a temporary directory: peer 1 founds the cluster, peers 2 and 3 join it with \
--join, and the demo waits until all 3 are registered voters. It then creates the stream \
helloworld, submits 100 jobs square(i) for i in 0..99 (the input is i), waits for them and \
prints `Total: 328350`, `Errors: 0` and how many jobs each peer ran, then stops the peers \
(SIGTERM: the joiners first, the founder last). \
Exits 0 only when the total is right and no job failed.")]
pub struct DemoArgs {
    /// The square module [default: examples/jobs/wasm/square.wasm; build it with `just jobs`].
    #[arg(long, value_name = "PATH")]
    pub module: Option<PathBuf>,
    /// Keep the temporary directory (the peers' data and logs).
    #[arg(long)]
    pub keep: bool,
}

/// The module to run: the flag, or the default relative to the current
/// directory, or to this source tree.
fn module_path(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    let candidates: Vec<PathBuf> = match flag {
        Some(p) => vec![p.to_path_buf()],
        None => {
            vec![PathBuf::from(DEFAULT_MODULE), Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(DEFAULT_MODULE)]
        }
    };
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    crate::bad_input!(
        "the demo module {} is missing: build the example jobs with `just jobs` (or `examples/jobs/build.sh`)",
        candidates[0].display()
    )
}

/// A peer child process; killed if dropped while still running.
#[derive(Debug)]
struct PeerChild {
    /// `peer 1`, `peer 2`, ... in the order they were started.
    name: String,
    child: Child,
    log: PathBuf,
}

impl PeerChild {
    fn running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait().with_context(|| format!("checking the {} process", self.name))? {
            bail!("{} exited ({status}){}", self.name, log_tail(&self.log));
        }
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit (bounded).
    fn stop(mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let pid = Pid::from_raw(self.child.id() as i32);
        if self.child.try_wait().with_context(|| format!("checking the {} process", self.name))?.is_none() {
            kill(pid, Signal::SIGTERM).with_context(|| format!("sending SIGTERM to {}", self.name))?;
        }
        loop {
            if let Some(status) = self.child.try_wait().with_context(|| format!("waiting for {}", self.name))? {
                if !status.success() {
                    bail!("{} did not shut down cleanly ({status}){}", self.name, log_tail(&self.log));
                }
                return Ok(started.elapsed());
            }
            if started.elapsed() > STOP_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "{} did not exit within {}s of SIGTERM; killed it{}",
                    self.name,
                    STOP_TIMEOUT.as_secs(),
                    log_tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PeerChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            format!("; the end of its log ({}):\n{tail}", path.display())
        }
        Err(_) => String::new(),
    }
}

/// `n` distinct free ports of 127.0.0.1: every listener is held until all
/// are found, so no port is handed out twice.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners.iter().map(|l| Ok(l.local_addr().context("finding a free port on 127.0.0.1")?.port())).collect()
}

/// Start peer number `n` (1-based) listening on `listen`, joining the
/// cluster at `join` if given (else it founds one), with its data in
/// `dir/peerN` and its log in `dir/peerN.log`.
fn start_peer(g: &Global, dir: &Path, n: usize, listen: &str, join: Option<&str>) -> anyhow::Result<PeerChild> {
    let name = format!("peer {n}");
    let exe = std::env::current_exe().context("finding the impetus executable")?;
    let log = dir.join(format!("peer{n}.log"));
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Process::new(&exe);
    cmd.arg("--log-format").arg(g.log_format.to_string());
    for _ in 0..g.verbose {
        cmd.arg("-v");
    }
    cmd.args(["peer", "--foreground", "--listen", listen])
        .arg("--voters")
        .arg(PEERS.to_string())
        .arg("--data-dir")
        .arg(dir.join(format!("peer{n}")));
    if let Some(j) = join {
        cmd.args(["--join", j]);
    }
    cmd.env_remove("IMPETUS_AUTHKEY").stdin(Stdio::null()).stdout(Stdio::from(out)).stderr(Stdio::from(err));
    let child = cmd.spawn().with_context(|| format!("starting {} ({name})", exe.display()))?;
    tracing::info!(peer = %name, pid = child.id(), %listen, join = join.unwrap_or("-"), "demo peer started");
    Ok(PeerChild { name, child, log })
}

/// Whether the status shows `n` peers registered (and, with `voters`, all
/// of them voters) under a leader.
fn has_peers(st: &ClusterStatus, n: usize, voters: bool) -> bool {
    st.leader.is_some() && st.peers.len() >= n && (!voters || st.voters.len() >= n)
}

fn describe_progress(st: &ClusterStatus) -> String {
    format!(
        "{} of {PEERS} peers registered, {} of {PEERS} voters, {}",
        st.peers.len(),
        st.voters.len(),
        match st.leader {
            Some(l) => format!("leader {l}"),
            None => "no leader".into(),
        }
    )
}

/// Ask the founder at `addr` for the status until `done` holds or
/// `deadline` comes; every peer started must keep running meanwhile.
/// `client` is reused (and kept) across calls.
async fn wait_until(
    peers: &mut [PeerChild],
    addr: &str,
    client: &mut Option<Client>,
    deadline: Instant,
    done: impl Fn(&ClusterStatus) -> bool,
) -> anyhow::Result<ClusterStatus> {
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        for p in peers.iter_mut() {
            p.running()?;
        }
        let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
            let c = match client.take() {
                Some(c) => c,
                None => Client::connect(addr, None).await.map_err(|e| e.to_string())?,
            };
            let st = c.status().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((c, st))
        })
        .await;
        match attempt {
            Ok(Ok((c, st))) => {
                *client = Some(c);
                if done(&st) {
                    return Ok(st);
                }
                last = describe_progress(&st);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tails: String = peers.iter().map(|p| format!("\n{}{}", p.name, log_tail(&p.log))).collect();
    bail!("the cluster of {PEERS} peers did not form within {}s (last: {last}){tails}", CLUSTER_TIMEOUT.as_secs())
}

/// The TCP port in a multiaddr `/ip4/../tcp/PORT/..`.
fn tcp_port(addr: &str) -> Option<&str> {
    let mut parts = addr.split('/');
    parts.by_ref().find(|p| *p == "tcp")?;
    parts.next()
}

/// SIGTERM each peer in turn, the joiners first (the last started first),
/// the founder last; every one is stopped even if another fails. Returns
/// how long it took, or the first failure.
fn stop_all(mut peers: Vec<PeerChild>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut first_err: Option<anyhow::Error> = None;
    while let Some(p) = peers.pop() {
        let name = p.name.clone();
        match p.stop() {
            Ok(took) => tracing::info!(peer = %name, secs = took.as_secs_f64(), "demo peer stopped"),
            Err(e) => {
                tracing::error!(peer = %name, error = %format!("{e:#}"), "demo peer did not stop cleanly");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(started.elapsed()),
    }
}

/// Whether `e` is a failure of the moment ([`ClientError::is_transient`]):
/// the cluster is electing a leader, the peer cannot reach it yet, or the
/// connection dropped.
fn transient(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ClientError>().is_some_and(ClientError::is_transient)
}

/// Run `op` until it succeeds, fails for good, or `deadline` comes: a
/// [`transient`] failure is retried every [`RETRY_EVERY`]. `op` must be
/// safe to repeat.
async fn retrying<T, F, Fut>(what: &str, deadline: Instant, mut op: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    loop {
        match op().await {
            Err(e) if transient(&e) && Instant::now() + RETRY_EVERY < deadline => {
                tracing::info!(error = %format!("{e:#}"), "{what}: retrying after a transient failure");
                tokio::time::sleep(RETRY_EVERY).await;
            }
            other => return other,
        }
    }
}

pub async fn run(g: &Global, args: DemoArgs) -> anyhow::Result<u8> {
    let module = module_path(args.module.as_deref())?;
    let bytes = std::fs::read(&module).with_context(|| format!("reading {}", module.display()))?;
    let tmp = tempfile::Builder::new().prefix("impetus-demo-").tempdir().context("creating a temporary directory")?;
    let addrs: Vec<String> = free_ports(PEERS)?.into_iter().map(|p| format!("127.0.0.1:{p}")).collect();
    println!("starting {PEERS} peers (data and logs in {})", tmp.path().display());
    let mut peers: Vec<PeerChild> = Vec::with_capacity(PEERS);

    let outcome = start_and_drive(g, tmp.path(), &addrs, &mut peers, &module, bytes).await;
    // Stop the peers whatever happened: SIGTERM, drain, clean exit.
    let started = peers.len();
    let stopped = tokio::task::block_in_place(|| stop_all(peers));
    let dir = args.keep.then(|| tmp.keep());
    let code = outcome?;
    let took = stopped?;
    println!("{started} peers stopped cleanly in {:.1}s", took.as_secs_f64());
    if let Some(d) = dir {
        println!("kept {}", d.display());
    }
    Ok(code)
}

/// Start the peers (pushed onto `peers` as they start, so the caller stops
/// them whatever happens), wait for the cluster, run the jobs.
async fn start_and_drive(
    g: &Global,
    dir: &Path,
    addrs: &[String],
    peers: &mut Vec<PeerChild>,
    module: &Path,
    bytes: Vec<u8>,
) -> anyhow::Result<u8> {
    let founder = addrs.first().context("no address for the founding peer")?;
    let started = Instant::now();
    let deadline = started + CLUSTER_TIMEOUT;
    let mut client = None;
    // One at a time, each joiner once the previous peer is registered, so
    // that peer N gets the id peer-N.
    for (i, addr) in addrs.iter().enumerate() {
        let join = (i > 0).then_some(founder.as_str());
        match join {
            None => println!("  peer 1 on {addr}: founds the cluster"),
            Some(j) => println!("  peer {} on {addr}: joins through {j}", i + 1),
        }
        peers.push(start_peer(g, dir, i + 1, addr, join)?);
        if i + 1 < addrs.len() {
            wait_until(peers, founder, &mut client, deadline, |st| has_peers(st, i + 1, false)).await?;
        }
    }
    let cluster = wait_until(peers, founder, &mut client, deadline, |st| has_peers(st, addrs.len(), true)).await?;
    let client = client.context("no client after the cluster formed")?;
    let mut members: Vec<_> = cluster.peers.iter().collect();
    members.sort_by_key(|p| p.id);
    let described: Vec<String> = members
        .iter()
        .map(|p| {
            let port = p.info.addresses.iter().find_map(|a| tcp_port(a)).unwrap_or("?");
            let leader = if cluster.leader == Some(p.id) { ", leader" } else { "" };
            format!("{} (:{port}{leader})", p.id)
        })
        .collect();
    println!(
        "cluster ready in {:.1}s: {} voters: {}",
        started.elapsed().as_secs_f64(),
        cluster.voters.len(),
        described.join(", ")
    );
    let known: Vec<PeerId> = members.iter().map(|p| p.id).collect();
    drive(&client, &known, module, bytes).await
}

async fn drive(client: &Client, known: &[PeerId], module: &Path, bytes: Vec<u8>) -> anyhow::Result<u8> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    let stream = StreamName::new(STREAM).context("the demo stream name")?;
    // Every step is safe to repeat, so a step that fails while the cluster
    // changes leader is retried: the stream is created unless it exists, the
    // module is content-addressed, the jobs carry idempotency keys.
    retrying("creating the stream", deadline, || async {
        match client.stream(&stream).await {
            Ok(_) => Ok(()),
            Err(ClientError::UnknownStream(_)) => client.create_stream(&stream, StreamProps::default()).await,
            Err(e) => Err(e),
        }
        .context("creating the stream helloworld")
    })
    .await?;
    let hash = retrying("storing the module", deadline, || put_module(client, module, bytes.clone())).await?;
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|i| {
            Ok(NewJob {
                module: hash,
                spec: JobSpec { input: i.to_string().into_bytes(), ..JobSpec::default() },
                priority: None,
                delay_ms: 0,
                key: Some(IdempotencyKey::new(format!("demo-square-{i}")).context("a demo idempotency key")?),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let submitted = retrying("submitting the jobs", deadline, || async {
        client.submit(&stream, jobs.clone()).await.context("submitting the demo jobs")
    })
    .await?;
    println!("submitted {} jobs square(i) to stream {STREAM}", submitted.len());
    let ids: Vec<_> = submitted.iter().map(|s| s.job).collect();
    let bar = progress_bar(ids.len() as u64);
    let waited = retrying("waiting for the jobs", deadline, || async {
        let left = deadline.saturating_duration_since(Instant::now());
        client.wait(&ids, left, |done, _| bar.set_position(done as u64)).await.context("waiting for the demo jobs")
    })
    .await;
    bar.finish_and_clear();
    let records = waited?;
    let elapsed = started.elapsed();

    let mut total: i128 = 0;
    let mut errors = 0u64;
    let mut bad_results = 0u64;
    // Every registered peer is listed, even one that ran nothing; sorted by
    // peer id (jobs with no peer first).
    let mut by_peer: BTreeMap<Option<PeerId>, u64> = known.iter().map(|p| (Some(*p), 0)).collect();
    for r in &records {
        match (&r.status, &r.result) {
            (JobStatus::Succeeded, Some(res)) => match String::from_utf8_lossy(res).trim().parse::<i128>() {
                Ok(n) => total += n,
                Err(_) => {
                    bad_results += 1;
                    eprintln!("{}: result {:?} is not a number", r.id, String::from_utf8_lossy(res));
                }
            },
            _ => {
                errors += 1;
                if errors <= SHOW_FAILURES {
                    eprintln!("{}", describe_failure(r));
                }
            }
        }
        *by_peer.entry(r.peer).or_default() += 1;
    }
    if errors > SHOW_FAILURES {
        eprintln!("... and {} more failed jobs", errors - SHOW_FAILURES);
    }
    let expected: i128 = (0..JOBS as i128).map(|i| i * i).sum();
    println!("Total: {total}");
    println!("Errors: {errors}");
    for (p, n) in &by_peer {
        match p {
            Some(p) => println!("{p} ran {n} jobs"),
            None => println!("no peer: {n} jobs"),
        }
    }
    println!("{} jobs in {:.2}s", records.len(), elapsed.as_secs_f64());
    if errors > 0 || bad_results > 0 || total != expected {
        eprintln!("demo FAILED: expected Total: {expected} and Errors: 0");
        return Ok(exit::FAILED);
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_module_says_how_to_build_it() {
        let err = module_path(Some(Path::new("/nonexistent/square.wasm"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the demo module /nonexistent/square.wasm is missing: build the example jobs with `just jobs` (or `examples/jobs/build.sh`)"
        );
        assert_eq!(crate::cli::exit_code_of(&err), exit::USAGE);
    }

    #[test]
    fn the_expected_total_is_the_seeds_one() {
        assert_eq!((0..JOBS as i128).map(|i| i * i).sum::<i128>(), 328_350);
    }

    #[test]
    fn the_port_of_a_multiaddr() {
        assert_eq!(tcp_port("/ip4/127.0.0.1/tcp/41857/p2p/12D3KooW"), Some("41857"));
        assert_eq!(tcp_port("/ip4/127.0.0.1/udp/1"), None);
    }

    #[test]
    fn free_ports_are_found() {
        let ports = free_ports(PEERS).unwrap();
        assert_eq!(ports.len(), PEERS);
        assert!(ports.iter().all(|p| *p > 0));
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), PEERS, "{ports:?}");
    }
}
