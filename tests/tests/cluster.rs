//! Real `impetus peer` processes on 127.0.0.1 forming a cluster: joining,
//! roles, work shared by lease, losing the leader, losing a worker, a voter
//! catching up, and the private network. Every wait is bounded; every
//! process is killed when its `PeerProc` drops.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use impetus_proto::api::{ClientRequest, ClientResponse, ClusterStatus};
use impetus_proto::{
    JobId, JobRecord, JobSpec, JobStatus, ModuleHash, NewJob, PeerId, PeerRole, Seat, StreamName, StreamProps,
};
use impetus_sdk::Client;
use impetus_tests::{wait_for, wasm, PeerProc};

/// These tests start 3 to 5 debug-build peers each: run them one at a time,
/// or on 2 cores they starve each other's heartbeats.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// What a test of this file runs in: its turn (one test at a time), a
/// runtime for the SDK, a directory, and its peers. Bind all four: they
/// drop in reverse order, so the peers are killed before their directory
/// goes and the next test starts.
type Fixture = (std::sync::MutexGuard<'static, ()>, tokio::runtime::Runtime, tempfile::TempDir, Vec<PeerProc>);

/// A founder and `n - 1` peers that join it, started one after the other,
/// each with `extra` arguments.
fn cluster(n: usize, extra: &[&str]) -> Fixture {
    let turn = serial();
    let dir = tempfile::tempdir().unwrap();
    let peers = start_peers(dir.path(), n, extra);
    (turn, rt(), dir, peers)
}

fn start_peers(dir: &Path, n: usize, extra: &[&str]) -> Vec<PeerProc> {
    let first = PeerProc::start(&dir.join("p1"), extra).unwrap();
    let join = first.addr.clone();
    let mut peers = vec![first];
    for i in 2..=n {
        let mut args = vec!["--join", join.as_str()];
        args.extend_from_slice(extra);
        peers.push(PeerProc::start(&dir.join(format!("p{i}")), &args).unwrap());
    }
    peers
}

fn status(rt: &tokio::runtime::Runtime, p: &PeerProc) -> Option<ClusterStatus> {
    rt.block_on(async {
        let c = Client::connect(&p.addr, None).await.ok()?;
        c.status().await.ok()
    })
}

/// The registry id of the peer listening at `p.addr`.
fn id_of(st: &ClusterStatus, p: &PeerProc) -> PeerId {
    let port = format!("/tcp/{}/", p.addr.rsplit(':').next().unwrap());
    st.peers
        .iter()
        .find(|r| r.info.addresses.iter().any(|a| a.contains(&port)))
        .unwrap_or_else(|| panic!("{} is not registered: {st:?}", p.addr))
        .id
}

/// Registered peers outside Raft membership.
fn workers_of(st: &ClusterStatus) -> Vec<PeerId> {
    st.peers.iter().map(|p| p.id).filter(|id| st.role_of(*id) == PeerRole::Worker).collect()
}

/// Wait until `peers[0]` sees `voters` voters, no learner and `workers`
/// workers.
fn formed(rt: &tokio::runtime::Runtime, peers: &[PeerProc], voters: usize, workers: usize) -> ClusterStatus {
    wait_for(Duration::from_secs(30), || {
        status(rt, &peers[0])
            .filter(|s| s.voters.len() == voters && s.learners.is_empty() && workers_of(s).len() == workers)
    })
    .unwrap_or_else(|| panic!("no {voters} voters and {workers} workers; logs:\n{}", logs(peers)))
}

fn logs(peers: &[PeerProc]) -> String {
    peers.iter().map(|p| format!("--- {} ---\n{}\n", p.addr, tail(&p.log_text(), 80))).collect()
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn noop_jobs(module: ModuleHash, inputs: impl IntoIterator<Item = String>) -> Vec<NewJob> {
    inputs
        .into_iter()
        .map(|input| NewJob {
            module,
            spec: JobSpec { args: vec![], env: vec![], input: input.into_bytes() },
            priority: None,
            delay_ms: 0,
            key: None,
        })
        .collect()
}

/// Create `stream` and submit one `module` job per input through `c`.
async fn submit(c: &Client, stream: &str, props: StreamProps, module: &str, inputs: Vec<String>) -> Vec<JobId> {
    let s = StreamName::new(stream).unwrap();
    if c.stream(&s).await.is_err() {
        c.create_stream(&s, props).await.unwrap();
    }
    let hash = c.put_module(std::fs::read(wasm(module)).unwrap()).await.unwrap();
    let mut ids = Vec::new();
    for chunk in inputs.chunks(500) {
        let done = c.submit(&s, noop_jobs(hash, chunk.to_vec())).await.unwrap();
        ids.extend(done.into_iter().map(|d| d.job));
    }
    ids
}

async fn wait_all(c: &Client, ids: &[JobId], limit: Duration) -> Vec<JobRecord> {
    c.wait(ids, limit, |_, _| {}).await.unwrap()
}

#[test]
fn three_peers_become_voters_and_later_peers_workers_that_run_jobs() {
    let (_turn, rt, dir, mut peers) = cluster(3, &["--capacity", "2"]);
    formed(&rt, &peers, 3, 0);
    let join = peers[0].addr.clone();
    let metrics = format!("127.0.0.1:{}", impetus_tests::free_port());
    for i in 4..=5 {
        let mut args = vec!["--join", &join, "--capacity", "2"];
        if i == 5 {
            args.extend(["--metrics", &metrics]);
        }
        peers.push(PeerProc::start(&dir.path().join(format!("p{i}")), &args).unwrap());
    }
    let st = formed(&rt, &peers, 3, 2);
    assert_eq!(st.peers.len(), 5, "each peer registered once: {:?}", st.peers);
    let workers = [id_of(&st, &peers[3]), id_of(&st, &peers[4])];
    assert_eq!(workers_of(&st), workers.to_vec(), "{st:?}");
    // Workers hold no Raft state: their replicas never applied an entry.
    for w in &peers[3..] {
        assert_eq!(digest(&rt, w).map(|(applied, _)| applied), Some(0), "a worker applied entries");
    }

    // Reads are linearizable: a stream created through a worker is seen at
    // once through a follower, with no retry.
    let follower = (0..3).find(|&i| Some(id_of(&st, &peers[i])) != st.leader).unwrap();
    let (via_worker, via_follower) = (client_of(&rt, &peers[3]), client_of(&rt, &peers[follower]));
    for i in 0..5 {
        let name = StreamName::new(format!("fresh-{i}")).unwrap();
        rt.block_on(via_worker.create_stream(&name, StreamProps::default())).unwrap();
        let seen = rt.block_on(via_follower.stream(&name));
        assert!(seen.is_ok(), "created through a worker, not seen through a follower: {seen:?}");
    }

    // 40 jobs of 300 ms on 10 slots: every peer takes part, workers included.
    let c = client_of(&rt, &peers[4]);
    let ids = rt.block_on(submit(&c, "shared", StreamProps::default(), "sleep", vec!["300".into(); 40]));
    let records = rt.block_on(wait_all(&c, &ids, Duration::from_secs(120)));
    let mut ran: BTreeMap<PeerId, usize> = BTreeMap::new();
    for r in &records {
        assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
        *ran.entry(r.peer.unwrap()).or_default() += 1;
    }
    for w in workers {
        assert!(ran.get(&w).copied().unwrap_or(0) > 0, "worker {w} ran no job: {ran:?}");
    }
    // A worker's /metrics show the cluster as its leader sees it (its own
    // Raft knows no leader and holds no streams).
    let page = wait_for(Duration::from_secs(10), || {
        let page = impetus_tests::http_get(&metrics, "/metrics");
        page.contains(r#"impetus_stream_jobs{stream="shared",status="succeeded"} 40"#).then_some(page)
    })
    .unwrap_or_else(|| {
        panic!("the worker's metrics do not show the stream: {}", impetus_tests::http_get(&metrics, "/metrics"))
    });
    let leader = rt.block_on(c.status()).unwrap().leader.unwrap();
    assert_eq!(impetus_tests::sample(&page, "impetus_raft_leader"), leader.0 as f64);
    assert_eq!(impetus_tests::sample(&page, "impetus_raft_is_leader"), 0.0);
    assert!(impetus_tests::sample(&page, "impetus_raft_term") >= 1.0);
    assert!(impetus_tests::sample(&page, "impetus_raft_commit_index") >= 40.0);

    // `impetus status` names every peer and its role.
    let out = peers[2].ok(&["status"]);
    assert_eq!(out.matches("voter").count(), 3, "{out}");
    assert_eq!(out.matches("worker").count(), 2, "{out}");
}

#[test]
fn killing_the_leader_with_2000_jobs_in_flight_loses_nothing() {
    let (_turn, rt, _dir, mut peers) = cluster(3, &["--capacity", "8"]);
    formed(&rt, &peers, 3, 0);
    let c = client_of(&rt, &peers[1]);
    let props = StreamProps { lease_ttl_ms: 2_000, max_attempts: 10, mpps: 8, ..StreamProps::default() };
    let ids = rt.block_on(submit(&c, "inflight", props, "sleep", vec!["5".into(); 2000]));
    assert_eq!(ids.len(), 2000, "every job acknowledged");
    let s = StreamName::new("inflight").unwrap();
    // Wait until work is under way, then kill the leader.
    wait_for(Duration::from_secs(60), || rt.block_on(c.stream(&s)).ok().filter(|i| i.stats.succeeded >= 100))
        .unwrap_or_else(|| panic!("no progress; logs:\n{}", logs(&peers)));
    let before = status(&rt, &peers[1]).unwrap();
    let leader = before.leader.unwrap_or_else(|| panic!("no leader: {before:?}"));
    let at = peers.iter().position(|p| id_of(&before, p) == leader).unwrap();
    let commit_before = before.commit_index;
    peers[at].kill9();
    let killed = Instant::now();
    let survivors: Vec<Client> = (0..peers.len()).filter(|&i| i != at).map(|i| client_of(&rt, &peers[i])).collect();
    let failover = wait_for(Duration::from_secs(30), || {
        survivors.iter().find_map(|sc| {
            let st = rt.block_on(sc.status()).ok()?;
            (st.leader.is_some_and(|l| l != leader) && st.commit_index > commit_before).then(|| killed.elapsed())
        })
    })
    .unwrap_or_else(|| panic!("no new leader committed; logs:\n{}", logs(&peers)));
    eprintln!("failover: leader killed -> first commit under the new leader in {failover:?}");
    assert!(failover < Duration::from_secs(15), "failover took {failover:?}");

    let c = &survivors[0];
    let records = rt.block_on(wait_all(c, &ids, Duration::from_secs(180)));
    assert!(records.iter().all(|r| r.status == JobStatus::Succeeded && r.result.is_some()), "a job did not succeed");
    let stats = rt.block_on(c.stream(&s)).unwrap().stats;
    assert_eq!(
        (stats.succeeded, stats.completed_total),
        (2000, 2000),
        "every acknowledged job has exactly one committed result: {stats:?}"
    );
}

#[test]
fn a_dead_workers_jobs_run_elsewhere_and_a_late_completion_is_refused() {
    // Room on the voters for all eight re-runs at once.
    let (_turn, rt, dir, mut peers) = cluster(3, &["--capacity", "4"]);
    let join = peers[0].addr.clone();
    for i in 4..=5 {
        peers.push(PeerProc::start(&dir.path().join(format!("p{i}")), &["--join", &join, "--capacity", "4"]).unwrap());
    }
    let st = formed(&rt, &peers, 3, 2);
    let (w4, w5) = (id_of(&st, &peers[3]), id_of(&st, &peers[4]));
    let voters: Vec<PeerId> = st.voters.clone();

    // Each worker compiles the module first, so that the long jobs below
    // start running the moment they are leased.
    let c = client_of(&rt, &peers[0]);
    for (name, w) in [("warm-4", w4), ("warm-5", w5)] {
        let props = StreamProps { pin: [w].into_iter().collect(), ..StreamProps::default() };
        let warm = rt.block_on(submit(&c, name, props, "sleep", vec!["0".into()]));
        let done = rt.block_on(wait_all(&c, &warm, Duration::from_secs(60)));
        assert_eq!((done[0].status, done[0].peer), (JobStatus::Succeeded, Some(w)), "{done:?}");
    }

    // Eight 4-second jobs, only the two workers may take them.
    let props = StreamProps {
        lease_ttl_ms: 1_500,
        max_attempts: 5,
        pin: [w4, w5].into_iter().collect(),
        ..StreamProps::default()
    };
    let ids = rt.block_on(submit(&c, "long", props, "sleep", vec!["4000".into(); 8]));
    let held = |peer: PeerId| {
        ids.iter()
            .filter(|id| {
                let r = rt.block_on(c.job(**id)).unwrap();
                matches!(r.status, JobStatus::Leased | JobStatus::Running) && r.lease.is_some_and(|l| l.peer == peer)
            })
            .count()
    };
    wait_for(Duration::from_secs(30), || (held(w4) == 4 && held(w5) == 4).then_some(()))
        .unwrap_or_else(|| panic!("the workers did not take the jobs; logs:\n{}", logs(&peers)));
    // Past the 1.5 s lease TTL the workers still hold them: they renew
    // their leases through the leader while the jobs run.
    std::thread::sleep(Duration::from_millis(2_000));
    for id in &ids {
        let r = rt.block_on(c.job(*id)).unwrap();
        let by_worker = r.lease.is_some_and(|l| l.peer == w4 || l.peer == w5);
        assert!(by_worker && r.attempts == 1, "a lease was not renewed: {r:?}");
    }

    // Worker 4 freezes (it will wake up late), worker 5 dies.
    peers[3].signal("STOP");
    peers[4].kill9();
    let s = StreamName::new("long").unwrap();
    let patch = impetus_proto::StreamPatch { pin: Some(voters.iter().copied().collect()), ..Default::default() };
    rt.block_on(c.update_stream(&s, patch)).unwrap();

    // After the lease TTL every job runs again on a voter, under a new
    // fencing token. While those runs go on (4 s each), worker 4 wakes up:
    // its runs, which began first, end at once and it reports them with the
    // old tokens. The cluster refuses each one as stale, not merely as late.
    let rerunning = || {
        ids.iter().all(|id| {
            let r = rt.block_on(c.job(*id)).unwrap();
            r.attempts >= 2
                && matches!(r.status, JobStatus::Leased | JobStatus::Running)
                && r.lease.is_some_and(|l| voters.contains(&l.peer))
        })
    };
    wait_for(Duration::from_secs(60), || rerunning().then_some(()))
        .unwrap_or_else(|| panic!("the jobs did not run again on the voters; logs:\n{}", logs(&peers)));
    peers[3].signal("CONT");
    let refused = wait_for(Duration::from_secs(30), || {
        let log = peers[3].log_text();
        (log.matches("result rejected").count() >= 4).then_some(log)
    })
    .unwrap_or_else(|| panic!("the late worker did not report its 4 jobs; log:\n{}", tail(&peers[3].log_text(), 60)));
    let rejected: Vec<&str> = refused.lines().filter(|l| l.contains("result rejected")).collect();
    assert!(
        rejected.iter().all(|l| l.contains("stale fencing token")),
        "{rejected:#?}\nworker 4's log:\n{}",
        tail(&refused, 40)
    );

    let records = rt.block_on(wait_all(&c, &ids, Duration::from_secs(90)));
    for r in &records {
        assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
        assert!(voters.contains(&r.peer.unwrap()), "ran again on a voter after the lease TTL: {r:?}");
        assert!(r.attempts >= 2, "the expired attempt was counted: {r:?}");
    }
    let stats = rt.block_on(c.stream(&s)).unwrap().stats;
    assert_eq!((stats.succeeded, stats.completed_total), (8, 8), "no late completion was accepted: {stats:?}");
    let after = rt.block_on(wait_all(&c, &ids, Duration::from_secs(5)));
    assert_eq!(after, records, "the committed results did not change");

    // The dead worker comes back on its data directory: with no Raft state
    // to recover, it joins again and keeps its id (one registry entry).
    peers[4].restart().unwrap();
    let pid = peers[4].pid().unwrap();
    let st = wait_for(Duration::from_secs(30), || {
        status(&rt, &peers[0]).filter(|s| s.peers.iter().any(|p| p.id == w5 && p.info.pid == pid))
    })
    .unwrap_or_else(|| panic!("the restarted worker is not back as {w5}; logs:\n{}", logs(&peers)));
    assert_eq!(st.peers.len(), 5, "{:?}", st.peers);
    assert!(workers_of(&st).contains(&w5), "{st:?}");
}

fn digest(rt: &tokio::runtime::Runtime, p: &PeerProc) -> Option<(u64, String)> {
    rt.block_on(async {
        let c = Client::connect(&p.addr, None).await.ok()?;
        match c.request(ClientRequest::StateDigest).await.ok()? {
            ClientResponse::StateDigest { applied_index, digest } => Some((applied_index, digest)),
            _ => None,
        }
    })
}

#[test]
fn a_voter_killed_and_restarted_catches_up_to_the_same_state() {
    let (_turn, rt, _dir, mut peers) = cluster(3, &["--capacity", "4"]);
    formed(&rt, &peers, 3, 0);
    let c = client_of(&rt, &peers[0]);
    let first =
        rt.block_on(submit(&c, "catchup", StreamProps::default(), "square", (0..200).map(|i| i.to_string()).collect()));
    rt.block_on(wait_all(&c, &first, Duration::from_secs(120)));
    peers[2].kill9();
    let second =
        rt.block_on(submit(&c, "catchup", StreamProps::default(), "square", (0..200).map(|i| i.to_string()).collect()));
    rt.block_on(wait_all(&c, &second, Duration::from_secs(120)));
    let leader_applied = status(&rt, &peers[0]).unwrap().applied_index;
    peers[2].restart().unwrap();
    // Equal applied index, equal state (heartbeats keep the log moving, so
    // compare only answers taken at the same index).
    let agreed = wait_for(Duration::from_secs(60), || {
        let ds: Vec<(u64, String)> = peers.iter().filter_map(|p| digest(&rt, p)).collect();
        (ds.len() == 3 && ds.iter().all(|d| *d == ds[0]) && ds[0].0 >= leader_applied).then(|| ds[0].clone())
    })
    .unwrap_or_else(|| {
        let ds: Vec<_> = peers.iter().map(|p| digest(&rt, p)).collect();
        panic!("replicas never agreed: {ds:?}; logs:\n{}", logs(&peers))
    });
    eprintln!("replicas agree at index {} (digest {})", agreed.0, &agreed.1[..16]);
    let st = status(&rt, &peers[2]).unwrap();
    assert_eq!(st.voters.len(), 3, "the restarted peer is still a voter: {st:?}");

    // The same voter back without its Raft state is refused: with its
    // votes forgotten it could help elect two leaders in one term.
    // It asks to join through a follower, whose view of the voters the
    // leader's confirms.
    let id = id_of(&st, &peers[2]);
    let via = peers[..2].iter().find(|p| st.leader != Some(id_of(&st, p))).unwrap().addr.clone();
    peers[2].kill9();
    std::fs::remove_dir_all(peers[2].data_dir.join("raft")).unwrap();
    peers[2].set_extra(&["--join", &via, "--capacity", "4"]);
    peers[2].relaunch().unwrap();
    let exit = peers[2].wait_exit(Duration::from_secs(90));
    let log = std::fs::read_to_string(&peers[2].log).unwrap_or_default();
    assert!(
        exit.is_some_and(|e| !e.success()),
        "a voter without its state started: {exit:?}; log:\n{}",
        tail(&log, 30)
    );
    let why = format!("this peer is voter {} of the cluster, but its Raft state", id.0);
    assert!(log.contains(&why), "the refusal does not say why; log:\n{}", tail(&log, 30));
    let st = status(&rt, &peers[0]).unwrap();
    assert!(st.voters.contains(&id), "the refused peer's seat was changed meanwhile: {st:?}");
    let third = rt.block_on(submit(&c, "catchup", StreamProps::default(), "square", vec!["3".into()]));
    rt.block_on(wait_all(&c, &third, Duration::from_secs(60)));
}

#[test]
fn without_the_authkey_no_peer_or_client_gets_in() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let p1 = PeerProc::start(&dir.path().join("p1"), &["--authkey", "right-key"]).unwrap();
    p1.ok(&["stream", "create", "private"]);

    // A peer with the wrong key cannot join.
    let wrong_log = dir.path().join("wrong.log");
    let mut wrong = std::process::Command::new(impetus_tests::impetus_bin())
        .args(["peer", "--listen", &format!("127.0.0.1:{}", impetus_tests::free_port()), "--data-dir"])
        .arg(dir.path().join("wrong"))
        .args(["--join", &p1.addr, "--authkey", "wrong-key"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&wrong_log).unwrap())
        .spawn()
        .unwrap();
    let tried = wait_for(Duration::from_secs(30), || {
        let log = std::fs::read_to_string(&wrong_log).unwrap_or_default();
        log.contains("could not join yet").then_some(log)
    });
    let _ = wrong.kill();
    let _ = wrong.wait();
    let tried = tried.expect("the wrong-key peer never tried to join");
    assert!(tried.contains("authkey") || tried.contains("handshake"), "the error names the likely cause:\n{tried}");
    let st = p1.ok(&["status", "--json"]);
    let st: ClusterStatus = serde_json::from_str(&st).unwrap();
    assert_eq!(st.peers.len(), 1, "the wrong-key peer did not register: {st:?}");

    // Clients: no key, a wrong key: refused; the right key: served.
    for args in [vec!["--peer", p1.addr.as_str()], vec!["--peer", p1.addr.as_str(), "--authkey", "wrong-key"]] {
        for cmd in [vec!["stream", "list"], vec!["submit", wasm("noop").to_str().unwrap(), "--stream", "private"]] {
            let mut run = std::process::Command::new(impetus_tests::impetus_bin());
            run.env_remove("IMPETUS_AUTHKEY").args(&args).args(&cmd);
            let out = impetus_tests::output_within(run, impetus_tests::CLI_LIMIT).unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} {cmd:?} got in: {}", String::from_utf8_lossy(&out.stdout));
            assert!(err.contains("authkey"), "the error suggests the authkey: {err}");
        }
    }
    let out = p1.ok(&["stream", "list"]);
    assert!(out.contains("private"), "{out}");
}

/// A voter killed for good is replaced by a worker after `--voter-timeout`,
/// then, silent past `--forget-after`, taken out of the cluster: nobody
/// replicates to it or lists it forever. Started again on its old data, it
/// learns that it was taken out and joins again as a new peer.
#[test]
fn a_voter_gone_past_the_timeout_is_replaced_by_a_worker_then_forgotten() {
    let (_turn, rt, _dir, mut peers) = cluster(4, &["--voter-timeout", "2", "--forget-after", "4"]);
    let st = formed(&rt, &peers, 3, 1);
    let (gone, spare) = (id_of(&st, &peers[2]), id_of(&st, &peers[3]));
    assert!(st.voters.contains(&gone) && workers_of(&st) == [spare], "{st:?}");
    peers[2].kill9();
    let st = wait_for(Duration::from_secs(30), || {
        status(&rt, &peers[0]).filter(|s| s.voters.contains(&spare) && !s.voters.contains(&gone))
    })
    .unwrap_or_else(|| panic!("the dead voter was not replaced; logs:\n{}", logs(&peers)));
    assert_eq!(st.voters.len(), 3, "{st:?}");
    // The cluster still commits with the new voter set.
    let c = client_of(&rt, &peers[3]);
    let ids = rt.block_on(submit(&c, "after", StreamProps::default(), "square", vec!["9".into()]));
    let done = rt.block_on(wait_all(&c, &ids, Duration::from_secs(60)));
    assert_eq!(String::from_utf8_lossy(done[0].result.as_deref().unwrap()).trim(), "81");

    let forgotten = |s: &ClusterStatus| s.peers.iter().all(|p| p.id != gone) && !s.learners.contains(&gone);
    let st = wait_for(Duration::from_secs(30), || status(&rt, &peers[0]).filter(forgotten))
        .unwrap_or_else(|| panic!("the dead voter was not forgotten; logs:\n{}", logs(&peers)));
    assert_eq!((st.voters.len(), st.peers.len()), (3, 3), "{st:?}");
    peers[2].relaunch().unwrap();
    let new = wait_for(Duration::from_secs(60), || rejoined(&rt, &peers[0], &peers[2], gone))
        .unwrap_or_else(|| panic!("the forgotten peer did not join again; log:\n{}", tail(&peers[2].log_text(), 40)));
    assert!(new.0 > gone.0, "ids are never reused: {new} after {gone}");
    assert_set_aside(&peers[2], gone);
}

#[test]
fn peer_leave_drains_a_peer_and_takes_it_out_of_the_cluster() {
    let (_turn, rt, _dir, mut peers) = cluster(4, &[]);
    let st = formed(&rt, &peers, 3, 1);
    let leaving = id_of(&st, &peers[3]);
    let out = peers[3].ok(&["peer", "leave"]);
    assert!(out.contains("leaving"), "{out}");
    let st = wait_for(Duration::from_secs(30), || {
        status(&rt, &peers[0]).filter(|s| s.peers.iter().all(|p| p.id != leaving))
    })
    .unwrap_or_else(|| panic!("the peer did not leave; logs:\n{}", logs(&peers)));
    assert_eq!(st.voters.len(), 3, "{st:?}");
    let exited = peers[3].wait_exit(Duration::from_secs(30));
    assert!(exited.is_some_and(|s| s.success()), "the peer that left did not exit 0: {exited:?}");
    assert!(peers[3].log_text().contains("left the cluster"), "{}", tail(&peers[3].log_text(), 20));
    assert!(!peers[3].data_dir.join("raft").exists(), "a peer that left forgets its Raft state");
}

/// A leader that leaves (`impetus peer leave`) hands its lead to a voter,
/// which starts an election at once: the others do not wait out their
/// election timeout with no leader.
#[test]
fn a_leader_that_leaves_hands_its_lead_to_a_voter() {
    let (_turn, rt, _dir, mut peers) = cluster(4, &[]);
    let st = formed(&rt, &peers, 3, 1);
    let old = st.leader.unwrap();
    let at = (0..4).find(|&i| id_of(&st, &peers[i]) == old).unwrap();
    peers[at].ok(&["peer", "leave"]);
    let exited = peers[at].wait_exit(Duration::from_secs(30));
    assert!(exited.is_some_and(|s| s.success()), "the leader did not exit 0: {exited:?}\n{}", logs(&peers));
    let asked = (at + 1) % 4;
    let st = wait_for(Duration::from_secs(30), || {
        status(&rt, &peers[asked]).filter(|s| s.leader.is_some_and(|l| l != old) && s.voters.len() == 3)
    })
    .unwrap_or_else(|| panic!("no new leader with three voters; logs:\n{}", logs(&peers)));
    let new = st.leader.unwrap();
    let handed: Vec<String> = peers
        .iter()
        .flat_map(|p| {
            p.log_text()
                .lines()
                .filter(|l| l.contains("the leader hands its lead over"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!handed.is_empty(), "no peer was handed the lead; logs:\n{}", logs(&peers));
    assert!(handed.iter().all(|l| l.contains(&format!("to={}", new.0))), "handed to another than {new}: {handed:?}");

    // Started again with no --join, the peer that left joins the same
    // cluster through the members it saved (DATA_DIR/contacts), under a new
    // id; it does not found a second cluster at its old address.
    assert!(peers[at].data_dir.join("contacts").exists() && !peers[at].data_dir.join("raft").exists());
    peers[at].set_extra(&[]);
    peers[at].restart().unwrap();
    let st = wait_for(Duration::from_secs(30), || status(&rt, &peers[at]).filter(|s| s.leader == Some(new)))
        .unwrap_or_else(|| panic!("the peer that left did not rejoin; logs:\n{}", logs(&peers)));
    let again = id_of(&st, &peers[at]);
    assert!(again != old && st.peers.len() == 4, "rejoined as {again} (was {old}): {st:?}");
}

/// The peer at `p`'s address once the cluster registers it under another
/// id than `old`, seen from `from`: it joined again as a new peer.
fn rejoined(rt: &tokio::runtime::Runtime, from: &PeerProc, p: &PeerProc, old: PeerId) -> Option<PeerId> {
    let st = status(rt, from)?;
    let port = format!("/tcp/{}/", p.addr.rsplit(':').next()?);
    let at = st.peers.iter().find(|r| r.info.addresses.iter().any(|a| a.contains(&port)))?;
    (at.id != old && st.peers.iter().all(|r| r.id != old)).then_some(at.id)
}

/// The removed peer set its stale Raft state aside (`DATA_DIR/removed-ID`)
/// instead of deleting it, and says so.
fn assert_set_aside(p: &PeerProc, old: PeerId) {
    let kept = p.data_dir.join(format!("removed-{}", old.0));
    assert!(kept.join("raft").is_dir() && kept.join("peer-id").is_file(), "nothing kept in {}", kept.display());
    assert!(p.log_text().contains("the cluster no longer has this peer"), "{}", tail(&p.log_text(), 30));
}

/// A voter taken out of the cluster while it was down (here the leader is
/// asked to remove it), started again on its old data, believes it is still
/// a member; the cluster's registry no longer has it, and ids are never
/// reused. It sets its stale Raft state aside and joins again as a new
/// peer, with no operator.
#[test]
fn a_member_removed_while_down_joins_again_as_a_new_peer_when_started() {
    let (_turn, rt, _dir, mut peers) = cluster(3, &[]);
    let st = formed(&rt, &peers, 3, 0);
    // The founder: started with no --join, and killed, it never saved the
    // members it knew; it must still join again, not found a new cluster.
    let at = 0;
    let gone = id_of(&st, &peers[at]);
    // Let the promotion that formed the cluster finish (`formed` counts the
    // voters of its joint configuration too): a voter killed in the middle
    // of it holds every later change until it returns (joint consensus).
    std::thread::sleep(Duration::from_secs(1));
    peers[at].kill9();
    let lead = wait_for(Duration::from_secs(30), || {
        (1..3).find(|&i| status(&rt, &peers[i]).is_some_and(|s| s.leader == Some(id_of(&s, &peers[i]))))
    })
    .unwrap_or_else(|| panic!("no leader after the founder died; logs:\n{}", logs(&peers)));
    let c = client_of(&rt, &peers[lead]);
    let resp = rt.block_on(c.request(ClientRequest::Leave { peer: gone })).unwrap();
    assert!(matches!(resp, ClientResponse::Left), "{resp:?}");
    peers[at].relaunch().unwrap();
    let new = wait_for(Duration::from_secs(60), || rejoined(&rt, &peers[lead], &peers[at], gone))
        .unwrap_or_else(|| panic!("the removed peer did not join again; log:\n{}", tail(&peers[at].log_text(), 40)));
    assert!(new.0 > gone.0, "ids are never reused: {new} after {gone}");
    assert_set_aside(&peers[at], gone);
    // It works as the new peer: a job pinned to it runs there.
    let props = StreamProps { pin: [new].into_iter().collect(), ..StreamProps::default() };
    let ids = rt.block_on(submit(&c, "again", props, "square", vec!["9".into()]));
    let done = rt.block_on(wait_all(&c, &ids, Duration::from_secs(60)));
    assert_eq!((done[0].status, done[0].peer), (JobStatus::Succeeded, Some(new)), "{:?}", done[0]);
}

/// A voter taken out of the cluster while it was frozen (SIGSTOP: a long
/// pause, a partition) learns it when it wakes, from the refusal of its
/// next worker turn, and joins again as a new peer without a restart.
#[test]
fn a_member_removed_while_frozen_joins_again_as_a_new_peer_when_it_wakes() {
    let (_turn, rt, _dir, peers) = cluster(3, &[]);
    let st = formed(&rt, &peers, 3, 0);
    let at = (0..3).find(|&i| Some(id_of(&st, &peers[i])) != st.leader).unwrap();
    let gone = id_of(&st, &peers[at]);
    let lead = (0..3).find(|&i| Some(id_of(&st, &peers[i])) == st.leader).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    peers[at].signal("STOP");
    let c = client_of(&rt, &peers[lead]);
    let resp = rt.block_on(c.request(ClientRequest::Leave { peer: gone }));
    peers[at].signal("CONT");
    assert!(matches!(resp, Ok(ClientResponse::Left)), "{resp:?}");
    let new = wait_for(Duration::from_secs(60), || rejoined(&rt, &peers[lead], &peers[at], gone))
        .unwrap_or_else(|| panic!("the removed peer did not join again; log:\n{}", tail(&peers[at].log_text(), 40)));
    assert!(new.0 > gone.0, "ids are never reused: {new} after {gone}");
    assert_set_aside(&peers[at], gone);
    assert!(peers[at].pid().is_some(), "the peer exited instead of joining again");
}

fn client_of(rt: &tokio::runtime::Runtime, p: &PeerProc) -> Client {
    rt.block_on(Client::connect(&p.addr, None)).unwrap()
}

/// SIGTERM drains a voter: the registry marks it draining, it takes no new
/// lease, the jobs it runs finish there and are committed, then it leaves
/// Raft membership (a worker takes its seat) and exits 0.
#[test]
fn sigterm_drains_a_voter_running_jobs_then_it_leaves() {
    let (_turn, rt, _dir, mut peers) = cluster(4, &["--capacity", "4"]);
    let st = formed(&rt, &peers, 3, 1);
    let at = (0..3).find(|&i| Some(id_of(&st, &peers[i])) != st.leader).unwrap();
    let v = id_of(&st, &peers[at]);
    let c = client_of(&rt, &peers[(at + 1) % 3]);

    // Four 3-second jobs pinned to the voter, then four more it has no room for.
    let props = StreamProps { pin: [v].into_iter().collect(), ..StreamProps::default() };
    let running = rt.block_on(submit(&c, "drain", props, "sleep", vec!["3000".into(); 4]));
    let leased_to_v = |id: &JobId| rt.block_on(c.job(*id)).unwrap().lease.is_some_and(|l| l.peer == v);
    wait_for(Duration::from_secs(30), || running.iter().all(leased_to_v).then_some(()))
        .unwrap_or_else(|| panic!("the voter did not take its jobs; logs:\n{}", logs(&peers)));

    peers[at].signal("TERM");
    wait_for(Duration::from_secs(3), || {
        status(&rt, &peers[(at + 1) % 3]).filter(|s| s.peers.iter().any(|p| p.id == v && p.draining))
    })
    .unwrap_or_else(|| panic!("the registry does not show the voter draining; logs:\n{}", logs(&peers)));
    let queued = rt.block_on(submit(&c, "drain", StreamProps::default(), "sleep", vec!["10".into(); 4]));

    let exited = peers[at].wait_exit(Duration::from_secs(60));
    assert!(exited.is_some_and(|s| s.success()), "the voter did not exit 0: {exited:?}\n{}", logs(&peers));
    let records = rt.block_on(wait_all(&c, &running, Duration::from_secs(30)));
    for r in &records {
        assert_eq!((r.status, r.peer, r.attempts), (JobStatus::Succeeded, Some(v), 1), "finished where it ran: {r:?}");
    }
    for id in &queued {
        let r = rt.block_on(c.job(*id)).unwrap();
        assert!(r.peer.is_none() && r.lease.is_none(), "a draining peer took a new lease: {r:?}");
    }
    let st = wait_for(Duration::from_secs(30), || {
        status(&rt, &peers[(at + 1) % 3]).filter(|s| s.voters.len() == 3 && s.peers.iter().all(|p| p.id != v))
    })
    .unwrap_or_else(|| panic!("the voter did not leave, or no peer took its seat; logs:\n{}", logs(&peers)));
    assert!(!st.voters.contains(&v), "{st:?}");
}

/// The whole cluster stopped at once (SIGTERM to every peer, as a machine
/// shutting down does) and started again with the same commands comes back
/// as one cluster with its data: the peers that managed to leave on the way
/// down rejoin through the members they knew (`DATA_DIR/contacts`) instead
/// of founding a new, empty cluster beside the old one.
#[test]
fn a_cluster_stopped_at_once_and_started_again_keeps_its_data() {
    let (_turn, rt, _dir, mut peers) = cluster(3, &[]);
    formed(&rt, &peers, 3, 0);
    let c = client_of(&rt, &peers[0]);
    let ids =
        rt.block_on(submit(&c, "kept", StreamProps::default(), "square", (0..20).map(|i| i.to_string()).collect()));
    rt.block_on(wait_all(&c, &ids, Duration::from_secs(60)));
    drop(c);

    for p in &peers {
        p.signal("TERM");
    }
    for p in &mut peers {
        let exited = p.wait_exit(Duration::from_secs(60));
        assert!(exited.is_some(), "a peer did not stop on SIGTERM; logs:\n{}", logs(&peers));
    }
    for p in &mut peers {
        p.relaunch().unwrap();
    }
    for p in &mut peers {
        p.wait_ready(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    }
    // Every peer answers for one cluster, with one leader and three voters...
    let st = wait_for(Duration::from_secs(60), || {
        let all: Vec<ClusterStatus> = peers.iter().filter_map(|p| status(&rt, p)).collect();
        let one = all.len() == 3 && all.iter().all(|s| s.leader.is_some() && s.leader == all[0].leader);
        (one && all[0].voters.len() == 3).then(|| all[0].clone())
    })
    .unwrap_or_else(|| {
        let all: Vec<_> = peers.iter().map(|p| status(&rt, p)).collect();
        panic!("no single cluster of three voters after the restart: {all:?}; logs:\n{}", logs(&peers))
    });
    // ... and that cluster has the jobs it acknowledged before, with their results.
    for p in &peers {
        let c = client_of(&rt, p);
        let records = rt.block_on(wait_all(&c, &ids, Duration::from_secs(30)));
        let results: Vec<String> = records
            .iter()
            .map(|r| String::from_utf8_lossy(r.result.as_deref().unwrap_or_default()).trim().to_owned())
            .collect();
        let squares: Vec<String> = (0..20).map(|i: u64| (i * i).to_string()).collect();
        assert_eq!(results, squares, "asked through {} (cluster {st:?})", p.addr);
    }
}

/// `--voters 5`: five peers form a cluster of five voters (it survives two
/// failures), and it still commits with two of them killed.
#[test]
fn five_voters_with_voters_5_survive_two_kills() {
    let (_turn, rt, _dir, mut peers) = cluster(5, &["--voters", "5"]);
    let st = formed(&rt, &peers, 5, 0);
    let leader = st.leader.unwrap_or_else(|| panic!("no leader: {st:?}"));
    // Kill two voters that do not lead; the other three still commit.
    let doomed: Vec<usize> = (0..5).filter(|&i| id_of(&st, &peers[i]) != leader).take(2).collect();
    for &i in &doomed {
        peers[i].kill9();
    }
    let alive = (0..5).find(|i| !doomed.contains(i)).unwrap();
    let c = client_of(&rt, &peers[alive]);
    let ids = rt.block_on(submit(&c, "five", StreamProps::default(), "noop", vec![String::new(); 20]));
    let records = rt.block_on(wait_all(&c, &ids, Duration::from_secs(60)));
    assert!(records.iter().all(|r| r.status == JobStatus::Succeeded), "{records:?}");
}

/// `impetus peer --worker` never takes a voter seat, even while seats are
/// open, and cannot found a cluster; `--voter` is shown in the registry
/// (which of several workers the leader picks first is `plan`'s unit test).
#[test]
fn worker_peers_never_take_a_voter_seat_but_run_jobs() {
    let (_turn, rt, dir, mut peers) = cluster(1, &[]);
    // With no --join, a --worker peer has no cluster to join.
    let mut alone = std::process::Command::new(impetus_tests::impetus_bin());
    alone.args(["peer", "--worker", "--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path().join("alone"));
    let out = impetus_tests::output_within(alone, Duration::from_secs(60)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a lone --worker peer started: {stderr}");
    assert!(stderr.contains("a --worker peer cannot found a cluster"), "{stderr}");

    let join = peers[0].addr.clone();
    for (name, seat) in [("p2", "--worker"), ("p3", "--worker")] {
        peers.push(PeerProc::start(&dir.path().join(name), &["--join", &join, seat]).unwrap());
    }
    // Two seats are open, yet after several rounds of the membership
    // manager (every 0.5 s; a plain joiner is a learner within 1 s) the
    // founder still votes alone.
    formed(&rt, &peers, 1, 2);
    std::thread::sleep(Duration::from_secs(3));
    let st = formed(&rt, &peers, 1, 2);
    let pure = [id_of(&st, &peers[1]), id_of(&st, &peers[2])];
    // Later peers fill the seats; the --worker ones stay workers.
    for (name, seat) in [("p4", "--voter"), ("p5", "--capacity")] {
        let mut args = vec!["--join", join.as_str(), seat];
        if seat == "--capacity" {
            args.push("2");
        }
        peers.push(PeerProc::start(&dir.path().join(name), &args).unwrap());
    }
    let st = formed(&rt, &peers, 3, 2);
    assert_eq!(workers_of(&st), pure.to_vec(), "{st:?}");
    let seat = |p: &PeerProc| st.peers.iter().find(|r| r.id == id_of(&st, p)).map(|r| r.info.seat);
    assert_eq!(
        peers.iter().map(seat).collect::<Vec<_>>(),
        [Seat::Any, Seat::Never, Seat::Never, Seat::Preferred, Seat::Any].map(Some).to_vec()
    );
    let out = peers[0].ok(&["status"]);
    assert_eq!(out.matches("worker (--worker)").count(), 2, "{out}");
    assert_eq!(out.matches("voter (--voter)").count(), 1, "{out}");

    // They run jobs: a stream pinned to them.
    let c = client_of(&rt, &peers[0]);
    let props = StreamProps { pin: pure.into_iter().collect(), ..StreamProps::default() };
    let ids = rt.block_on(submit(&c, "pure", props, "sleep", vec!["100".into(); 20]));
    let records = rt.block_on(wait_all(&c, &ids, Duration::from_secs(120)));
    for r in &records {
        assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
        assert!(r.peer.is_some_and(|p| pure.contains(&p)), "ran on {:?}, not a --worker peer", r.peer);
    }
}

/// A tmpfs of `mib` MiB at `dir` (a small disk for one peer), unmounted when
/// dropped. Needs root (CAP_SYS_ADMIN), like the mDNS test's namespaces.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, mib: u32) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = std::process::Command::new("mount");
        cmd.args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(dir);
        let out = impetus_tests::output_within(cmd, Duration::from_secs(30)).unwrap();
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {}: {}\nthis test needs root (CAP_SYS_ADMIN) to give one peer a small disk",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: detached now, gone once the peer's files are closed.
        let mut cmd = std::process::Command::new("umount");
        cmd.arg("-l").arg(&self.0);
        let _ = impetus_tests::output_within(cmd, Duration::from_secs(30));
    }
}

/// A voter whose disk fills stops with an error that names the problem,
/// and nothing acknowledged is lost: the others commit on, a worker takes
/// its seat, and every acknowledged job succeeds.
#[test]
fn a_voter_whose_disk_fills_stops_naming_it_and_nothing_acknowledged_is_lost() {
    let (_turn, rt, dir, mut peers) = cluster(1, &["--voter-timeout", "2"]);
    let _disk = SmallDisk::mount(&dir.path().join("p2"), 1);
    let join = peers[0].addr.clone();
    for name in ["p2", "p3", "p4"] {
        peers.push(PeerProc::start(&dir.path().join(name), &["--join", &join, "--voter-timeout", "2"]).unwrap());
    }
    let st = formed(&rt, &peers, 3, 1);
    let (full, spare) = (id_of(&st, &peers[1]), id_of(&st, &peers[3]));
    assert!(st.voters.contains(&full) && !st.voters.contains(&spare), "{st:?}");

    // 64 KiB jobs, 4 to a submit, through p3: 4 MiB of log against p2's 1.
    let c = client_of(&rt, &peers[2]);
    let s = StreamName::new("big").unwrap();
    rt.block_on(c.create_stream(&s, StreamProps::default())).unwrap();
    let module = rt.block_on(c.put_module(std::fs::read(wasm("noop")).unwrap())).unwrap();
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for batch in 0..16 {
        let inputs = (0..4).map(|i| format!("{batch}-{i}-{}", "x".repeat((64 << 10) - 16)));
        match rt.block_on(c.submit(&s, noop_jobs(module, inputs))) {
            Ok(done) => acked.extend(done.into_iter().map(|d| d.job)),
            Err(e) => refused.push(e.to_string()),
        }
    }
    // p2 stops, naming the problem.
    let exit = peers[1].wait_exit(Duration::from_secs(60));
    let log = peers[1].log_text();
    assert!(exit.is_some_and(|e| !e.success()), "p2 did not stop with an error ({exit:?}); logs:\n{}", logs(&peers));
    assert!(log.contains("No space left on device"), "p2's log does not name the full disk:\n{}", tail(&log, 40));

    // The spare takes its seat; every acknowledged job succeeds.
    let seated = wait_for(Duration::from_secs(60), || {
        status(&rt, &peers[0]).filter(|st| st.voters.contains(&spare) && !st.voters.contains(&full))
    });
    assert!(seated.is_some(), "the spare did not replace the full voter; logs:\n{}", logs(&peers));
    assert!(acked.len() >= 32, "only {} jobs acknowledged; refused: {refused:?}", acked.len());
    let records = rt.block_on(wait_all(&c, &acked, Duration::from_secs(120)));
    assert!(records.iter().all(|r| r.status == JobStatus::Succeeded), "an acknowledged job did not succeed");
    eprintln!("disk full: {} jobs acknowledged, {} submits refused: {refused:?}", acked.len(), refused.len());
}
