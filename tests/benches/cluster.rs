//! `just bench cluster`: three real `impetus peer` processes (release build)
//! on 127.0.0.1 forming one cluster (the first founds it, the others
//! `--join` it), driven through the SDK. Prints a table:
//! - end-to-end throughput of no-op wasm jobs (submit → run → result
//!   committed; every Raft write replicated to a quorum and flushed), with
//!   the submits all sent to the leader and spread over the three peers;
//! - submit→done latency p50/p99 at a paced 200 jobs/s, as a client sees
//!   it: from sending the submit to knowing the job succeeded (µs): from
//!   the acknowledgement if the job was done in the entry that submitted
//!   it, else from reading its status, right after the acknowledgement and
//!   again until it is done (`submit_until_done`). The leader's stamps on
//!   the submit's entry and the result's are printed beside it;
//! - failover: the leader is killed (SIGKILL) while jobs flow; the time from
//!   the kill until a surviving peer reports a new leader and a commit past
//!   what it had seen before the kill; every acknowledged job still finishes;
//! - each peer's RSS idle and after the run.
//!
//! Flags (after `--`): `--quick` (small counts), `--paced-only` (form the
//! cluster and measure the paced latency only), `--breakdown` (the paced
//! phase, with the peers tracing each write's path; prints, per milestone,
//! when a job reached it after the leader read its request: see
//! `cluster/breakdown.rs`), `--capacity N` (per peer;
//! default 256: on a 2-core machine throughput grew from ~12k jobs/s at 64
//! to ~25k at 256 and no further at 512, where latency rose), `--keep-logs`
//! (keep the peers' data and logs and print where; `RUST_LOG` sets their
//! level, except with `--breakdown`, which sets it). `IMPETUS_BIN=path` runs the peers from that binary instead of
//! building one (to compare two builds). Alongside the targets it prints
//! what explains a miss: the machine's floor measured apart from Impetus
//! (`cluster/floor.rs`: one writer syncing back to back and three syncing
//! at once on the data disk, every 5 ms for as long as the paced phase,
//! with the rounds that stalled over 10 ms counted, and
//! a round trip on the peers' libp2p transport and on plain TCP, paced as
//! the jobs are), one Raft write's latency, CPU per peer and of the rest of
//! the machine, the machine's own pauses during the paced phase (a thread
//! sleeping 1 ms woken late; CPU stolen by the VM's host: `floor::Hiccups`),
//! and when the slow paced jobs were submitted (UTC, to match
//! the peers' logs, where a peer warns of a raft log sync over 100 ms and of
//! its runtime held up 100 ms or more). `--echo-server` is the floor probe's other end, which
//! the bench starts itself.
#![allow(clippy::print_stdout)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use impetus_proto::{JobId, JobSpec, JobStatus, ModuleHash, NewJob, PeerId, StreamName, StreamProps};
use impetus_sdk::Client;
use impetus_tests::{free_port, release_bin, rss_of, submit_until_done, wasm};

#[path = "cluster/breakdown.rs"]
mod breakdown;
#[path = "cluster/floor.rs"]
mod floor;

/// Jobs per submit request.
const BATCH: usize = 500;
/// Concurrent submitters in the throughput runs (whatever peers they use).
const SUBMITTERS: usize = 6;
/// Jobs per page when listing a stream's jobs.
const PAGE: u32 = 2_000;

const TARGET_JOBS_PER_S: f64 = 7_500.0;
const TARGET_P99_US: u64 = 2_500;
const TARGET_FAILOVER: Duration = Duration::from_secs(3);

/// CPU time (user + system) a process has used, in seconds (`/proc/PID/stat`,
/// at the usual 100 clock ticks per second).
fn cpu_secs(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = s.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After the ")": state is field 3, utime 14, stime 15.
    (tick(11) + tick(12)) as f64 / 100.0
}

/// CPU time all processes have used (user, nice, system, irq, softirq,
/// steal from `/proc/stat`), in seconds.
fn machine_busy_secs() -> f64 {
    let v = floor::cpu_ticks();
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum::<u64>() as f64 / 100.0
}

/// Milliseconds since the Unix epoch as a UTC time of day, as the peers log it.
fn utc(ms: u64) -> String {
    let d = (ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}.{:03}", d / 3600, d / 60 % 60, d % 60, ms % 1000)
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("?").to_owned()
}

/// CPU used over an interval: by each peer, by this process, by the rest of
/// the machine (in cores: CPU seconds per wall-clock second).
struct CpuMeter {
    pids: Vec<u32>,
    peers: Vec<f64>,
    me: f64,
    busy: f64,
    t: Instant,
}

struct CpuUse {
    peers: Vec<f64>,
    me: f64,
    others: f64,
}

impl CpuMeter {
    fn start(pids: &[u32]) -> CpuMeter {
        CpuMeter {
            pids: pids.to_vec(),
            peers: pids.iter().map(|p| cpu_secs(&p.to_string())).collect(),
            me: cpu_secs("self"),
            busy: machine_busy_secs(),
            t: Instant::now(),
        }
    }

    fn finish(&self) -> CpuUse {
        let wall = self.t.elapsed().as_secs_f64();
        let peers: Vec<f64> =
            self.pids.iter().zip(&self.peers).map(|(p, c0)| (cpu_secs(&p.to_string()) - c0) / wall).collect();
        let me = (cpu_secs("self") - self.me) / wall;
        let all = (machine_busy_secs() - self.busy) / wall;
        let others = (all - me - peers.iter().sum::<f64>()).max(0.0);
        CpuUse { peers, me, others }
    }
}

fn job(module: ModuleHash) -> NewJob {
    NewJob { module, spec: JobSpec::default(), priority: None, delay_ms: 0, key: None }
}

fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One `impetus peer` child process, killed (SIGKILL) on drop.
struct Proc {
    child: Option<Child>,
    addr: String,
    pid: u32,
}

impl Proc {
    /// With `--breakdown`, the peer logs the `impetus_latency` trace events;
    /// else `RUST_LOG` decides, as for any peer.
    fn start(bin: &Path, dir: &Path, name: &str, opts: &Opts, join: Option<&str>) -> Result<Proc> {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(bin);
        cmd.args(["peer", "--listen", &addr, "--capacity", &opts.capacity.to_string(), "--data-dir"])
            .arg(dir.join(name))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if opts.breakdown {
            cmd.env("RUST_LOG", "warn,impetus_latency=trace");
        }
        if let Some(j) = join {
            cmd.args(["--join", j]);
        }
        let child = cmd.spawn().with_context(|| format!("starting peer {name}"))?;
        let pid = child.id();
        Ok(Proc { child: Some(child), addr, pid })
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn connect(p: &mut Proc, limit: Duration) -> Result<Client> {
    let start = Instant::now();
    loop {
        if !p.alive() {
            bail!("peer at {} exited before it answered", p.addr);
        }
        match Client::connect(&p.addr, None).await {
            Ok(c) if c.status().await.is_ok() => return Ok(c),
            _ if start.elapsed() > limit => bail!("peer at {} did not answer within {limit:?}", p.addr),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn wait_drained(c: &Client, s: &StreamName, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        // A read can fail while a new leader settles; keep polling.
        if let Ok(info) = c.stream(s).await {
            if info.stats.live() == 0 {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("stream {s} not drained after {limit:?}: {:?}", info.stats);
            }
        } else if start.elapsed() > limit {
            bail!("stream {s} unreadable after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every job of the stream, paged in id order.
async fn all_jobs(c: &Client, s: &StreamName) -> Result<Vec<impetus_proto::JobRecord>> {
    let mut out = Vec::new();
    let mut after: Option<JobId> = None;
    loop {
        let page = c.jobs(Some(s), None, after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        out.extend(page);
    }
    Ok(out)
}

/// Which index of `clients` leads now (asking `asker`).
async fn leader_of(asker: &Client, ids: &[PeerId]) -> Result<usize> {
    let st = asker.status().await?;
    let leader = st.leader.context("no leader")?;
    ids.iter().position(|&p| p == leader).with_context(|| format!("leader {leader} is none of our peers"))
}

struct Throughput {
    jobs_per_s: f64,
    submit_per_s: f64,
    cpu: CpuUse,
    /// Share of the jobs each peer ran (in peer order).
    ran: Vec<f64>,
}

/// The running cluster, as the measurements see it (peer order throughout).
struct Peers<'a> {
    clients: &'a [Client],
    ids: &'a [PeerId],
    pids: &'a [u32],
    leader: usize,
}

/// Submit `n` no-op jobs to a new stream `s` in batches from [`SUBMITTERS`]
/// concurrent submitters using the peers `targets`, wait until all are done.
async fn throughput(
    p: &Peers<'_>,
    targets: &[usize],
    s: &StreamName,
    module: ModuleHash,
    n: usize,
) -> Result<Throughput> {
    let (clients, pids, ids, reader) = (p.clients, p.pids, p.ids, &p.clients[p.leader]);
    reader.create_stream(s, StreamProps { mpps: 1024, ..StreamProps::default() }).await?;
    let batches = n / BATCH;
    let next = Arc::new(AtomicUsize::new(0));
    let meter = CpuMeter::start(pids);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..SUBMITTERS {
        let (c, s, next) = (clients[targets[k % targets.len()]].clone(), s.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < batches {
                c.submit(&s, (0..BATCH).map(|_| job(module)).collect()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let submitted = t.elapsed();
    wait_drained(reader, s, Duration::from_secs(600)).await?;
    let total = t.elapsed();
    let wall = total.as_secs_f64();
    let cpu = meter.finish();

    let jobs = all_jobs(reader, s).await?;
    let ok = jobs.iter().filter(|j| j.status == JobStatus::Succeeded).count();
    if jobs.len() != batches * BATCH || ok != jobs.len() {
        bail!("stream {s}: {} jobs listed, {ok} succeeded, {} submitted", jobs.len(), batches * BATCH);
    }
    let ran =
        ids.iter().map(|id| jobs.iter().filter(|j| j.peer == Some(*id)).count() as f64 / jobs.len() as f64).collect();
    Ok(Throughput {
        ran,
        jobs_per_s: (batches * BATCH) as f64 / wall,
        submit_per_s: (batches * BATCH) as f64 / submitted.as_secs_f64(),
        cpu,
    })
}

struct Failover {
    /// Kill → a survivor reports a new leader and a commit past its pre-kill commit index.
    new_commit: Duration,
    /// Kill → a survivor first reports a new leader.
    new_leader: Duration,
    /// When the leader was killed (to read the peers' logs by).
    killed_at: std::time::SystemTime,
    /// Kill → first submit sent after the kill acknowledged.
    first_ack: Option<Duration>,
    acked: usize,
    /// Jobs in the stream no submit acknowledged (committed, answer lost).
    unacked: usize,
    failed_submits: usize,
    finished: Duration,
}

async fn failover(
    procs: &mut [Proc],
    clients: &[Client],
    ids: &[PeerId],
    module: ModuleHash,
    quick: bool,
) -> Result<(Failover, usize)> {
    let leader = leader_of(&clients[0], ids).await?;
    let old = ids[leader];
    let survivors: Vec<usize> = (0..procs.len()).filter(|&i| i != leader).collect();
    let sc = &clients[survivors[0]];
    let fs = StreamName::new("failover")?;
    // A short lease TTL so jobs the dead leader held come back soon.
    sc.create_stream(&fs, StreamProps { mpps: 1024, lease_ttl_ms: 2_000, ..StreamProps::default() }).await?;

    // 2 submitters (one per survivor), 50 jobs every 50 ms each: 2,000 jobs/s.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<JobId>>> = Arc::default();
    let acks: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let errors = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for &i in &survivors {
        let (c, fs, stop, acked, acks, errors) =
            (clients[i].clone(), fs.clone(), stop.clone(), acked.clone(), acks.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let sent = Instant::now();
                match c.submit(&fs, (0..50).map(|_| job(module)).collect()).await {
                    Ok(v) => {
                        acked.lock().expect("lock").extend(v.iter().map(|s| s.job));
                        acks.lock().expect("lock").push((sent, Instant::now()));
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let pid = procs[leader].pid;
    let st = clients[leader].status().await?;
    if let Some(rec) = st.peers.iter().find(|p| p.id == old) {
        if rec.info.pid != pid {
            bail!("the leader's record says pid {} but peer {leader} is pid {pid}", rec.info.pid);
        }
    }
    let (a, b) = (&clients[survivors[0]], &clients[survivors[1]]);
    let (sa, sb) = tokio::join!(a.status(), b.status());
    let mut before = [sa?.commit_index, sb?.commit_index];
    procs[leader].kill9();
    let killed = Instant::now();
    let killed_at = std::time::SystemTime::now();
    // Whatever the old leader had committed may still reach the survivors
    // just after the kill: count it as "before" too.
    let (sa, sb) = tokio::join!(a.status(), b.status());
    for (k, r) in [sa, sb].into_iter().enumerate() {
        if let Ok(st) = r {
            before[k] = before[k].max(st.commit_index);
        }
    }

    let mut new_leader = None;
    let new_commit = loop {
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("no commit under a new leader within 30 s of killing the leader");
        }
        let (sa, sb) = tokio::join!(a.status(), b.status());
        let mut done = None;
        for (k, r) in [sa, sb].into_iter().enumerate() {
            let Ok(st) = r else { continue };
            if st.leader.is_some_and(|l| l != old) {
                new_leader.get_or_insert(killed.elapsed());
                if st.commit_index > before[k] {
                    done = Some(killed.elapsed());
                }
            }
        }
        if let Some(d) = done {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    // Keep jobs flowing under the new leader for a while, then stop.
    tokio::time::sleep(Duration::from_secs(if quick { 1 } else { 2 })).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let first_ack = acks
        .lock()
        .expect("lock")
        .iter()
        .filter(|(sent, _)| *sent >= killed)
        .map(|(_, at)| at.duration_since(killed))
        .min();

    wait_drained(sc, &fs, Duration::from_secs(120)).await?;
    let finished = killed.elapsed();
    let acked = std::mem::take(&mut *acked.lock().expect("lock"));
    let jobs = all_jobs(sc, &fs).await?;
    let succeeded: std::collections::HashSet<JobId> =
        jobs.iter().filter(|j| j.status == JobStatus::Succeeded).map(|j| j.id).collect();
    let lost = acked.iter().filter(|id| !succeeded.contains(id)).count();
    if lost > 0 {
        bail!("{lost} of {} acknowledged jobs did not succeed after the failover", acked.len());
    }
    if succeeded.len() != jobs.len() {
        bail!("{} of {} jobs in the failover stream did not succeed", jobs.len() - succeeded.len(), jobs.len());
    }
    let f = Failover {
        killed_at,
        new_commit,
        new_leader: new_leader.unwrap_or(new_commit),
        first_ack,
        acked: acked.len(),
        unacked: jobs.len() - acked.len(),
        failed_submits: errors.load(Ordering::Relaxed),
        finished,
    };
    Ok((f, leader))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    if flag("--echo-server") {
        return floor::echo_server().await;
    }
    let breakdown = flag("--breakdown");
    let opts = Opts {
        capacity: match args.iter().position(|a| a == "--capacity") {
            Some(i) => args.get(i + 1).context("--capacity N")?.parse()?,
            None => 256,
        },
        quick: flag("--quick"),
        paced_only: flag("--paced-only") || breakdown,
        breakdown,
    };
    let bin = release_bin()?;
    let noop = std::fs::read(wasm("noop"))?;
    let dir = tempfile::tempdir()?;
    let result = run(&bin, dir.path(), &opts, noop).await;
    if flag("--keep-logs") || result.is_err() {
        let kept = dir.keep();
        println!("peer logs kept in {}", kept.display());
    }
    result
}

/// `ms:count` for each latency seen, ascending (`lat` sorted).
fn histogram(lat: &[u64]) -> String {
    let mut out: Vec<(u64, usize)> = Vec::new();
    for &l in lat {
        match out.last_mut() {
            Some((v, n)) if *v == l => *n += 1,
            _ => out.push((l, 1)),
        }
    }
    out.iter().map(|(v, n)| format!("{v}:{n}")).collect::<Vec<_>>().join(" ")
}

/// How `main` was asked to run.
struct Opts {
    /// `--capacity N`: job slots per peer.
    capacity: u32,
    /// `--quick`: small counts.
    quick: bool,
    /// `--paced-only` (or `--breakdown`): the paced latency alone.
    paced_only: bool,
    /// `--breakdown`: the peers trace a write's path; where a paced job's
    /// time goes is printed from their logs.
    breakdown: bool,
}

/// Jobs in the paced phase, one every 5 ms.
fn paced_count(quick: bool) -> usize {
    if quick {
        400
    } else {
        2_000
    }
}

/// How many samples (µs) are over 10 ms, and the largest, in ms.
fn stalls(us: &[u64]) -> String {
    let over = us.iter().filter(|&&u| u > 10_000).count();
    format!("{over}; {:.1}", us.iter().max().copied().unwrap_or(0) as f64 / 1e3)
}

async fn run(bin: &Path, dir: &Path, opts: &Opts, noop: Vec<u8>) -> Result<()> {
    let Opts { capacity, quick, paced_only, .. } = *opts;
    let fsync = floor::fsync(dir)?;
    // As many rounds as the paced phase has jobs, over as long: the disk's
    // stalls (on this VM a flush of 10-70 ms every ~5 s) show at the same
    // rate as they can reach the jobs.
    let (quorum_flush, each_flush) = floor::quorum_flush(dir, paced_count(quick))?;
    let (stream_rtt, tcp_rtt) = floor::network_round_trips(if quick { 200 } else { 400 }).await?;
    let load_start = load_avg();
    // Form the cluster: the first peer founds it, the others join it.
    let t_form = Instant::now();
    let mut procs = vec![Proc::start(bin, dir, "p1", opts, None)?];
    let first = connect(&mut procs[0], Duration::from_secs(30)).await?;
    let join = procs[0].addr.clone();
    for name in ["p2", "p3"] {
        procs.push(Proc::start(bin, dir, name, opts, Some(&join))?);
    }
    let mut clients = vec![first];
    for p in procs.iter_mut().skip(1) {
        clients.push(connect(p, Duration::from_secs(30)).await?);
    }
    loop {
        let st = clients[0].status().await?;
        if st.voters.len() == 3 && st.leader.is_some() {
            break;
        }
        if t_form.elapsed() > Duration::from_secs(60) {
            bail!("cluster did not reach 3 voters within 60 s: voters {:?} learners {:?}", st.voters, st.learners);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let formed = t_form.elapsed();
    let mut ids = Vec::new();
    for c in &clients {
        ids.push(c.status().await?.peer);
    }
    let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss: Vec<u64> = pids.iter().map(|&p| rss_of(p)).collect();
    let leader = leader_of(&clients[0], &ids).await?;
    let module = clients[leader].put_module(noop).await?;

    // Warm-up: one job pinned to each peer (mpps 1), so each compiles the
    // module once before the measured runs.
    let t_warm = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let w = StreamName::new(format!("warm-p{}", i + 1))?;
        let pin = std::iter::once(*id).collect();
        clients[leader].create_stream(&w, StreamProps { mpps: 1, pin, ..StreamProps::default() }).await?;
        clients[leader].submit(&w, vec![job(module)]).await?;
    }
    for i in 0..ids.len() {
        let w = StreamName::new(format!("warm-p{}", i + 1))?;
        wait_drained(&clients[leader], &w, Duration::from_secs(60)).await?;
    }
    let warm = t_warm.elapsed();

    // One Raft write as a client sees it (replicated to a quorum, flushed):
    // 200 sequential data-puts, to the leader and through a follower.
    let follower = (leader + 1) % clients.len();
    let mut write_lat = Vec::new();
    for target in [leader, follower] {
        let w = StreamName::new("warm-p1")?;
        let mut v = Vec::new();
        for i in 0..200u32 {
            let t = Instant::now();
            clients[target].data_put(&w, b"k", i.to_le_bytes().to_vec()).await?;
            v.push(t.elapsed().as_micros() as u64);
        }
        v.sort_unstable();
        write_lat.push(v);
    }

    let peers = Peers { clients: &clients, ids: &ids, pids: &pids, leader };
    // Throughput: all submits to the leader, or spread over the three peers;
    // interleaved, twice each. Each stream is deleted once checked, so every
    // run starts from the same state.
    let n: usize = if quick { 5_000 } else { 50_000 };
    let (mut to_leader, mut spread) = (Vec::new(), Vec::new());
    for round in 0..if paced_only { 0 } else { 2 } {
        let s = StreamName::new(format!("bench-leader-{round}"))?;
        to_leader.push(throughput(&peers, &[leader], &s, module, n).await?);
        clients[leader].delete_stream(&s, false).await?;
        let s = StreamName::new(format!("bench-spread-{round}"))?;
        spread.push(throughput(&peers, &[0, 1, 2], &s, module, n).await?);
        clients[leader].delete_stream(&s, false).await?;
    }

    // Latency at a paced 200 jobs/s for ~10 s, submitted to the leader.
    let c = clients[leader].clone();
    let paced = StreamName::new("paced")?;
    c.create_stream(&paced, StreamProps { mpps: 1024, ..StreamProps::default() }).await?;
    let count = paced_count(quick);
    let paced_meter = CpuMeter::start(&pids);
    let hiccups = floor::Hiccups::start();
    let t0 = Instant::now();
    let mut subs = Vec::with_capacity(count);
    for i in 0..count {
        let due = Duration::from_millis(5 * i as u64);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let (c, paced) = (c.clone(), paced.clone());
        subs.push(tokio::spawn(async move { submit_until_done(&c, &paced, job(module)).await }));
    }
    // Per job, µs: submit sent → acknowledged; submit sent → known done.
    let mut acks = Vec::with_capacity(count);
    let mut done_us = std::collections::BTreeMap::new();
    for s in subs {
        let (id, ack, done) = s.await??;
        acks.push(ack);
        done_us.insert(id, done);
    }
    acks.sort_unstable();
    wait_drained(&c, &paced, Duration::from_secs(120)).await?;
    let paced_cpu = paced_meter.finish();
    let (hiccups, stolen) = hiccups.finish();
    let longest = hiccups.iter().max_by_key(|h| h.1).copied();
    let hiccup_row = (
        "machine, paced phase: 1 ms sleeps woken >10 ms late; longest; stolen",
        match longest {
            Some((at, us)) => format!("{}; {:.1} ms at {}; {stolen:.2} s", hiccups.len(), us as f64 / 1e3, utc(at)),
            None => format!("0; -; {stolen:.2} s"),
        },
    );
    let (mut lat, mut lat_leader, mut lat_followers) = (Vec::new(), Vec::new(), Vec::new());
    // The leader's stamps on the submit's entry and the result's (ms): 0
    // for a job done in the entry that submits it.
    let mut stamps = Vec::new();
    // Jobs slower than 10 ms (a disk stall): how many, and when (UTC, first to last submit).
    let mut slow: Vec<u64> = Vec::new();
    for j in all_jobs(&c, &paced).await? {
        if j.status != JobStatus::Succeeded {
            bail!("paced job {} ended {:?}", j.id, j.status);
        }
        let Some(&l) = done_us.get(&j.id) else { bail!("paced job {} was not submitted by the bench", j.id) };
        lat.push(l);
        stamps.push(j.updated_at.since(j.created_at));
        if l > 10_000 {
            slow.push(j.created_at.0);
        }
        if j.peer == Some(ids[leader]) {
            lat_leader.push(l);
        } else {
            lat_followers.push(l);
        }
    }
    if lat.len() != count {
        bail!("{} paced jobs listed, {count} submitted", lat.len());
    }
    for l in [&mut lat, &mut lat_leader, &mut lat_followers, &mut stamps] {
        l.sort_unstable();
    }
    let ms = |us: u64| format!("{:.1}", us as f64 / 1e3);
    // Histograms by whole ms, rounded up (2 = over 1 ms, up to 2 ms).
    let by_ms = |us: &[u64]| histogram(&us.iter().map(|u| u.div_ceil(1000)).collect::<Vec<_>>());
    let pair = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        format!("{}/{}", ms(percentile(&v, 0.50)), ms(percentile(&v, 0.99)))
    };
    // The machine's floor alone against the target: a miss it explains.
    let mut paced_floor = floor::paced_floor(&stream_rtt, &quorum_flush);
    paced_floor.sort_unstable();
    let floor_p99 = percentile(&paced_floor, 0.99);
    let floor_verdict = (
        "  this machine's floor p99 (no Impetus) against the target",
        if floor_p99 < TARGET_P99_US {
            format!("{} ms: under it", ms(floor_p99))
        } else {
            format!("{} ms: over it, a miss is the machine's", ms(floor_p99))
        },
    );
    let floor_rows = [
        ("disk: 4 KiB write + fdatasync in the data dir p50/p99 (ms)", pair(&fsync)),
        ("disk: 3 writers at once, 300 B + fdatasync, each p50/p99 (ms)", pair(&each_flush)),
        ("  the 2nd of the 3 done (what a commit waits for) p50/p99 (ms)", pair(&quorum_flush)),
        ("  rounds whose 2nd sync took over 10 ms; the longest (ms)", stalls(&quorum_flush)),
        ("network: 200 B round trip on a libp2p stream, p50/p99 (ms)", pair(&stream_rtt)),
        ("  the same on plain TCP (both one every 5 ms) p50/p99 (ms)", pair(&tcp_rtt)),
        ("floor: 2 stream round trips + the 2nd of 3 syncs, p50/p99 (ms)", pair(&paced_floor)),
    ];
    if opts.breakdown {
        let name = |i: usize| format!("p{}", i + 1);
        let followers: Vec<String> = (0..procs.len()).filter(|&i| i != leader).map(name).collect();
        let followers: Vec<&str> = followers.iter().map(String::as_str).collect();
        println!(
            "where a paced job's time goes, for those run early on the leader (µs since it read the request; f: the follower that replied first):"
        );
        println!("{:<30} {:>6} {:>7} {:>7} {:>7} {:>7}", "event", "jobs", "p50", "p90", "p99", "max");
        for (event, jobs, [p50, p90, p99, max]) in breakdown::breakdown(dir, &name(leader), &followers)? {
            println!("{event:<30} {jobs:>6} {p50:>7} {p90:>7} {p99:>7} {max:>7}");
        }
    }
    if paced_only {
        // `--paced-only`: the latency rows alone (for iterating on them).
        for (name, value) in floor_rows.iter().chain([&hiccup_row, &floor_verdict]) {
            println!("{name}: {value}");
        }
        println!(
            "submit→done at 200 jobs/s: p50 {} ms, p99 {} ms, max {} ms; CPU (cores) of p1/p2/p3 {}",
            ms(percentile(&lat, 0.50)),
            ms(percentile(&lat, 0.99)),
            ms(lat.last().copied().unwrap_or(0)),
            paced_cpu.peers.iter().map(|c| format!("{c:.2}")).collect::<Vec<_>>().join("/")
        );
        println!(
            "leader's stamps, submit entry → result entry: p50 {} ms, p99 {} ms; jobs by ms {}",
            percentile(&stamps, 0.50),
            percentile(&stamps, 0.99),
            histogram(&stamps)
        );
        println!(
            "submit acknowledged (client round trip): p50 {:.1} ms, p99 {:.1} ms",
            percentile(&acks, 0.5) as f64 / 1e3,
            percentile(&acks, 0.99) as f64 / 1e3
        );
        if let (Some(first), Some(last)) = (slow.iter().min(), slow.iter().max()) {
            println!("jobs over 10 ms: {}, submitted {}–{} (UTC)", slow.len(), utc(*first), utc(*last));
        }
        println!(
            "jobs by submit→done ms (ran on the leader / elsewhere): {} / {}",
            by_ms(&lat_leader),
            by_ms(&lat_followers)
        );
        return Ok(());
    }
    let loaded_rss: Vec<u64> = pids.iter().map(|&p| rss_of(p)).collect();

    // Failover.
    let (f, killed) = failover(&mut procs, &clients, &ids, module, quick).await?;
    let after_rss: Vec<u64> = pids.iter().map(|&p| rss_of(p)).collect();

    let mean = |v: &[Throughput]| v.iter().map(|t| t.jobs_per_s).sum::<f64>() / v.len() as f64;
    let (best, best_rate) =
        if mean(&to_leader) >= mean(&spread) { ("to the leader", mean(&to_leader)) } else { ("spread", mean(&spread)) };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mark = |ok: bool| if ok { "ok" } else { "MISS" };
    let w = 60;
    println!();
    println!(
        "impetus 3-peer cluster benchmark (release, 127.0.0.1, --capacity {capacity}, every Raft write replicated to a quorum and flushed)"
    );
    println!("{:<w$} {:>14}  {:<16}", "measure", "value", "target");
    for (name, value) in &floor_rows {
        println!("{name:<w$} {value:>14}");
    }
    println!(
        "{:<w$} {:>14}",
        format!("machine: {} cores, load average (1 min) at start/end", cores),
        format!("{load_start}/{}", load_avg())
    );
    println!("{:<w$} {:>11.1} s", "cluster formed (3 voters)", formed.as_secs_f64());
    println!("{:<w$} {:>11.1} s", "warm-up: one pinned job per peer (module compile)", warm.as_secs_f64());
    println!("{:<w$} {:>14}", "leader at the start", format!("p{}", leader + 1));
    for (name, v) in [("to the leader", &write_lat[0]), ("through a follower", &write_lat[1])] {
        println!(
            "{:<w$} {:>14}",
            format!("one write {name} (200 sequential data-puts) p50/p99 (ms)"),
            format!("{:.1}/{:.1}", percentile(v, 0.5) as f64 / 1e3, percentile(v, 0.99) as f64 / 1e3)
        );
    }
    let row = |name: &str, v: &[Throughput]| {
        let all = |f: &dyn Fn(&Throughput) -> String| v.iter().map(f).collect::<Vec<_>>().join(" | ");
        println!(
            "{:<w$} {:>14}",
            format!("no-op jobs end to end, {n} jobs, submits {name} (jobs/s)"),
            all(&|t| format!("{:.0}", t.jobs_per_s))
        );
        println!(
            "{:<w$} {:>14}",
            "  of which submit acknowledged (jobs/s)",
            all(&|t| format!("{:.0}", t.submit_per_s))
        );
        let cpu = |t: &Throughput| t.cpu.peers.iter().map(|c| format!("{c:.2}")).collect::<Vec<_>>().join("/");
        println!("{:<w$} {:>14}", "  CPU (cores) of p1/p2/p3", all(&cpu));
        println!("{:<w$} {:>14}", "  CPU (cores) of the bench client", all(&|t| format!("{:.2}", t.cpu.me)));
        println!(
            "{:<w$} {:>14}",
            "  CPU (cores) of other processes on the machine",
            all(&|t| format!("{:.2}", t.cpu.others))
        );
        let ran = |t: &Throughput| t.ran.iter().map(|r| format!("{:.0}", r * 100.0)).collect::<Vec<_>>().join("/");
        println!("{:<w$} {:>14}", "  jobs run by p1/p2/p3 (%)", all(&ran));
    };
    row("to the leader", &to_leader);
    row("spread over 3 peers", &spread);
    println!(
        "{:<w$} {:>14.0}  ≥ {:.0} {}",
        format!("mean of the better mode: submits {best} (jobs/s)"),
        best_rate,
        TARGET_JOBS_PER_S,
        mark(best_rate >= TARGET_JOBS_PER_S)
    );
    println!("{:<w$} {:>11} ms", "submit→done p50 at 200 jobs/s (sent → known done)", ms(percentile(&lat, 0.50)));
    let p99 = percentile(&lat, 0.99);
    println!(
        "{:<w$} {:>11} ms  < 2.5 ms {}",
        "submit→done p99 at 200 jobs/s (sent → known done)",
        ms(p99),
        mark(p99 < TARGET_P99_US)
    );
    println!("{:<w$} {}", floor_verdict.0, floor_verdict.1);
    println!("{:<w$} {:>11} ms", "submit→done max at 200 jobs/s", ms(lat.last().copied().unwrap_or(0)));
    println!("{:<w$} {}", "  jobs by submit→done, whole ms rounded up (ms:count)", by_ms(&lat));
    println!(
        "{:<w$} {:>14}",
        "  submit acknowledged p50/p99 (ms)",
        format!("{}/{}", ms(percentile(&acks, 0.50)), ms(percentile(&acks, 0.99)))
    );
    println!(
        "{:<w$} {:>14}",
        "  leader's stamps, submit entry → result entry p50/p99 (ms)",
        format!("{}/{}", percentile(&stamps, 0.50), percentile(&stamps, 0.99))
    );
    println!(
        "{:<w$} {:>14}",
        "  CPU (cores) of p1/p2/p3, bench client, other processes",
        format!(
            "{}, {:.2}, {:.2}",
            paced_cpu.peers.iter().map(|c| format!("{c:.2}")).collect::<Vec<_>>().join("/"),
            paced_cpu.me,
            paced_cpu.others
        )
    );
    println!("{:<w$} {:>14}", hiccup_row.0, hiccup_row.1);
    if let (Some(first), Some(last)) = (slow.iter().min(), slow.iter().max()) {
        println!(
            "{:<w$} {:>14}",
            "  jobs over 10 ms: count, submitted between (UTC)",
            format!("{}, {}–{}", slow.len(), utc(*first), utc(*last))
        );
    }
    for (name, l) in [("leader", &lat_leader), ("followers", &lat_followers)] {
        println!(
            "{:<w$} {:>14}",
            format!("  run on the {name}: jobs, p50/p99 (ms)"),
            format!("{}, {}/{}", l.len(), ms(percentile(l, 0.50)), ms(percentile(l, 0.99)))
        );
    }
    let ms = f.killed_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    println!("{:<w$} {:>14}", "failover: leader killed at (UTC)", utc(ms));
    println!("{:<w$} {:>11.0} ms", "failover: kill -9 leader → new leader seen", f.new_leader.as_secs_f64() * 1e3);
    println!(
        "{:<w$} {:>11.0} ms  < {} s {}",
        "failover: kill -9 leader → first commit under new leader",
        f.new_commit.as_secs_f64() * 1e3,
        TARGET_FAILOVER.as_secs(),
        mark(f.new_commit < TARGET_FAILOVER)
    );
    match f.first_ack {
        Some(d) => println!("{:<w$} {:>11.0} ms", "failover: kill → first submit acknowledged", d.as_secs_f64() * 1e3),
        None => println!("{:<w$} {:>14}", "failover: kill → first submit acknowledged", "none"),
    }
    println!("{:<w$} {:>14}", "failover: acknowledged jobs succeeded", format!("{}/{}", f.acked, f.acked));
    println!("{:<w$} {:>14}", "failover: submits failed (not acknowledged)", f.failed_submits);
    println!("{:<w$} {:>14}", "failover: jobs committed but not acknowledged (succeeded)", f.unacked);
    println!("{:<w$} {:>11.1} s", "failover: kill → every job finished", f.finished.as_secs_f64());
    for i in 0..pids.len() {
        let role = if i == killed { " (leader, killed)" } else { "" };
        println!(
            "{:<w$} {:>14}",
            format!("RSS of p{}{role}: idle / after load / after failover (MB)", i + 1),
            format!(
                "{:.0}/{:.0}/{}",
                idle_rss[i] as f64 / 1e6,
                loaded_rss[i] as f64 / 1e6,
                if i == killed { "-".to_string() } else { format!("{:.0}", after_rss[i] as f64 / 1e6) }
            )
        );
    }
    Ok(())
}
