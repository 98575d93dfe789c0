//! One real `impetus` peer on 127.0.0.1, driven through the real CLI and
//! checked through the SDK: submit → run → result, durability across
//! `kill -9`, bad input, result files, status.

use std::collections::BTreeMap;
use std::time::Duration;

use impetus_proto::{JobId, JobRecord, JobStatus, StreamName};
use impetus_sdk::Client;
use impetus_tests::{wait_for, wasm, PeerProc};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn client(p: &PeerProc) -> (tokio::runtime::Runtime, Client) {
    let rt = rt();
    let c = rt.block_on(Client::connect(&p.addr, None)).unwrap();
    (rt, c)
}

fn all_jobs(rt: &tokio::runtime::Runtime, c: &Client, stream: &str) -> Vec<JobRecord> {
    let s = StreamName::new(stream).unwrap();
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = rt.block_on(c.jobs(Some(&s), None, after, 1000)).unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        out.extend(page);
    }
    out
}

#[test]
fn submit_wait_returns_the_square() {
    let dir = tempfile::tempdir().unwrap();
    let p = PeerProc::start(&dir.path().join("p"), &[]).unwrap();
    p.ok(&["stream", "create", "s1"]);
    let square = wasm("square");
    let out = p.ok(&["submit", square.to_str().unwrap(), "--stream", "s1", "--input", "7", "--wait"]);
    assert_eq!(out.trim(), "49");
    // Arguments after `--` reach the module as its argv.
    let out = p.ok(&["submit", square.to_str().unwrap(), "--stream", "s1", "--wait", "--", "12"]);
    assert_eq!(out.trim(), "144");
}

#[test]
fn acknowledged_jobs_survive_kill_9_and_each_ends_with_one_result() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = PeerProc::start(&dir.path().join("p"), &["--capacity", "4"]).unwrap();
    p.ok(&["stream", "create", "durable", "--lease-ttl", "3s", "--max-attempts", "5"]);
    // 1,000 jobs of ~10 ms each on 4 slots: a few seconds of work.
    let inputs = dir.path().join("inputs.txt");
    std::fs::write(&inputs, (0..1000).map(|_| "10\n").collect::<String>()).unwrap();
    let out = p.ok(&[
        "submit",
        wasm("sleep").to_str().unwrap(),
        "--stream",
        "durable",
        "--inputs",
        inputs.to_str().unwrap(),
        "--json",
    ]);
    let acked: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(acked.len(), 1000, "every submit acknowledged");
    let acked: Vec<u64> = acked.iter().map(|v| v["id"].as_u64().unwrap()).collect();

    // Kill part-way: some jobs done, some running, most queued.
    {
        let (rt, c) = client(&p);
        let s = StreamName::new("durable").unwrap();
        let progressed = wait_for(Duration::from_secs(30), || {
            let st = rt.block_on(c.stream(&s)).ok()?.stats;
            (st.succeeded >= 50).then_some(st)
        });
        assert!(progressed.is_some(), "no progress before the kill; log:\n{}", p.log_text());
    }
    p.kill9();
    p.restart().unwrap();

    let (rt, c) = client(&p);
    let s = StreamName::new("durable").unwrap();
    let done = wait_for(Duration::from_secs(60), || {
        let st = rt.block_on(c.stream(&s)).ok()?.stats;
        (st.live() == 0).then_some(st)
    });
    let stats = done.unwrap_or_else(|| panic!("jobs did not finish after the restart; log:\n{}", p.log_text()));
    assert_eq!((stats.succeeded, stats.dead, stats.completed_total), (1000, 0, 1000), "{stats:?}");
    let jobs = all_jobs(&rt, &c, "durable");
    let by_id: BTreeMap<u64, &JobRecord> = jobs.iter().map(|j| (j.id.0, j)).collect();
    for id in &acked {
        let j = by_id.get(id).unwrap_or_else(|| panic!("acknowledged job {id} lost"));
        assert_eq!(j.status, JobStatus::Succeeded);
        assert_eq!(
            j.result.as_deref().map(|r| String::from_utf8_lossy(r).trim().to_owned()),
            Some("slept 10".into()),
            "job {id}"
        );
    }
    assert_eq!(jobs.len(), 1000, "no job created twice");
}

#[test]
fn bad_input_is_refused_with_a_clear_message_and_failing_jobs_end_dead() {
    let dir = tempfile::tempdir().unwrap();
    let p = PeerProc::start(&dir.path().join("p"), &[]).unwrap();
    let square = wasm("square");
    let square = square.to_str().unwrap();

    // An unknown stream.
    let out = p.cli(&["submit", square, "--stream", "nope", "--input", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stream nope does not exist"), "{err}");

    p.ok(&["stream", "create", "s", "--max-attempts", "1", "--timeout", "500ms", "--memory", "32"]);
    // Not wasm at all.
    let not_wasm = dir.path().join("job.wasm");
    std::fs::write(&not_wasm, b"#!/bin/sh\necho hi\n").unwrap();
    let out = p.cli(&["submit", not_wasm.to_str().unwrap(), "--stream", "s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a WebAssembly module"), "{err}");
    // Wasm, but not a WASI command (an empty module exports no `_start`).
    let reactor = dir.path().join("reactor.wasm");
    std::fs::write(&reactor, b"\0asm\x01\0\0\0").unwrap();
    let out = p.cli(&["submit", reactor.to_str().unwrap(), "--stream", "s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a WASI command"), "{err}");

    // A trap, an endless loop, a memory hog, a non-zero exit.
    let mut ids = BTreeMap::new();
    // The memory hog gets its own stream with a generous timeout: it must
    // reach its memory limit, not the clock, however loaded the machine is.
    p.ok(&["stream", "create", "m", "--max-attempts", "1", "--timeout", "60s", "--memory", "32"]);
    for name in ["trap", "spin", "memhog", "exit"] {
        let stream = if name == "memhog" { "m" } else { "s" };
        let out = p.ok(&["submit", wasm(name).to_str().unwrap(), "--stream", stream, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        ids.insert(name, JobId(v[0]["id"].as_u64().unwrap()));
    }
    let (rt, c) = client(&p);
    let finished = wait_for(Duration::from_secs(30), || {
        let jobs: Vec<JobRecord> = ids.values().map(|id| rt.block_on(c.job(*id)).unwrap()).collect();
        jobs.iter().all(|j| j.status.is_final()).then_some(jobs)
    })
    .expect("failing jobs did not finish");
    let got: BTreeMap<&str, String> = ids
        .keys()
        .zip(&finished)
        .map(|(name, j)| {
            assert_eq!(j.status, JobStatus::Dead, "{name}: {j:?}");
            (*name, format!("{:?}", j.error.as_ref().expect("an error record").kind))
        })
        .collect();
    assert_eq!(got["trap"], "Trap");
    assert_eq!(got["spin"], "Timeout");
    assert_eq!(got["memhog"], "OutOfMemory");
    assert_eq!(got["exit"], "Exit(3)");

    // The peer keeps serving.
    let out = p.ok(&["submit", square, "--stream", "s", "--input", "5", "--wait"]);
    assert_eq!(out.trim(), "25");
}

#[test]
fn results_files_and_status_show_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let p = PeerProc::start(&dir.path().join("p"), &[]).unwrap();
    p.ok(&["stream", "create", "r", "--max-attempts", "1"]);
    let inputs = dir.path().join("in.txt");
    std::fs::write(&inputs, "1\n2\nnot-a-number\n3\n").unwrap();
    let out = p.cli(&[
        "submit",
        wasm("square").to_str().unwrap(),
        "--stream",
        "r",
        "--inputs",
        inputs.to_str().unwrap(),
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(1), "a Dead job makes --wait fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not an integer"), "the error record is shown: {err}");
    let out_dir = dir.path().join("results");
    p.ok(&["results", "r", "--out", out_dir.to_str().unwrap()]);
    let ok = std::fs::read_to_string(out_dir.join("r.ok")).unwrap();
    let err = std::fs::read_to_string(out_dir.join("r.err")).unwrap();
    let results: Vec<String> = ok
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["result"].as_str().unwrap().trim().to_owned())
        .collect();
    assert_eq!(results, ["1", "4", "9"]);
    let errs: Vec<serde_json::Value> = err.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(errs.len(), 1);
    assert_eq!((&errs[0]["error"]["kind"], &errs[0]["error"]["exit_code"]), (&"exit".into(), &2.into()));
    assert_eq!(errs[0]["input"], "not-a-number");

    // A stream pinned to a peer the cluster does not have says so.
    p.ok(&["stream", "create", "pinned", "--pin", "99"]);
    let out = p.ok(&["stream", "show", "pinned"]);
    assert!(out.contains("peer-99 (none is in the cluster: no peer may lease these jobs)"), "{out}");
    assert!(p.ok(&["status"]).contains("pinned (pinned to no peer of the cluster)"));

    let status = p.ok(&["status"]);
    assert!(
        status.contains(" r ") || status.contains("\nr ") || status.contains("r\t") || status.contains("│ r"),
        "{status}"
    );
    let pid = p.pid().unwrap().to_string();
    assert!(status.contains(&pid), "status shows the peer's pid {pid}:\n{status}");
}

#[test]
fn purge_forgets_finished_jobs_and_keeps_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let p = PeerProc::start(&dir.path().join("p"), &[]).unwrap();
    p.ok(&["stream", "create", "done", "--max-attempts", "1"]);
    p.ok(&["stream", "create", "held"]);
    let square = wasm("square");
    for input in ["2", "x"] {
        // One succeeds, one ends Dead.
        p.cli(&["submit", square.to_str().unwrap(), "--stream", "done", "--input", input, "--wait"]);
    }
    p.ok(&["stream", "pause", "held"]);
    p.ok(&["submit", square.to_str().unwrap(), "--stream", "held", "--input", "3"]);

    let out = p.ok(&["jobs", "purge", "--stream", "done", "--older-than", "1h"]);
    assert_eq!(out.trim(), "0 finished jobs of done purged", "none is an hour old");
    let out = p.ok(&["jobs", "purge", "--stream", "done"]);
    assert_eq!(out.trim(), "2 finished jobs of done purged");
    let (rt, c) = client(&p);
    assert!(all_jobs(&rt, &c, "done").is_empty());
    let held = all_jobs(&rt, &c, "held");
    assert_eq!(held.iter().map(|j| j.status).collect::<Vec<_>>(), [JobStatus::Queued]);
    let out = p.ok(&["jobs", "purge", "--stream", "held"]);
    assert_eq!(out.trim(), "0 finished jobs of held purged", "a queued job is not finished");
    assert_eq!(all_jobs(&rt, &c, "held").len(), 1);

    let out = p.cli(&["jobs", "purge", "--stream", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stream nope does not exist"), "{err}");
}

#[test]
fn a_finished_job_is_forgotten_after_its_streams_retention() {
    let dir = tempfile::tempdir().unwrap();
    let p = PeerProc::start(&dir.path().join("p"), &[]).unwrap();
    p.ok(&["stream", "create", "brief", "--retain", "8s"]);
    p.ok(&["stream", "create", "kept", "--retain", "none"]);
    let show = p.ok(&["stream", "show", "brief"]);
    assert!(show.lines().any(|l| l.starts_with("retain finished") && l.ends_with(" 8s")), "{show}");
    let show = p.ok(&["stream", "show", "kept"]);
    assert!(show.lines().any(|l| l.starts_with("retain finished") && l.ends_with("until purged")), "{show}");
    let square = wasm("square");
    let (rt, c) = client(&p);
    for stream in ["brief", "kept"] {
        let out = p.ok(&["submit", square.to_str().unwrap(), "--stream", stream, "--input", "2", "--wait"]);
        assert_eq!(out.trim(), "4");
        assert_eq!(all_jobs(&rt, &c, stream).len(), 1, "kept while its retention runs");
    }
    // The peer's own ticks forget it once its retention has passed:
    // nothing else is sent to the cluster meanwhile.
    let gone = wait_for(Duration::from_secs(30), || all_jobs(&rt, &c, "brief").is_empty().then_some(()));
    assert!(gone.is_some(), "forgotten within 30 s");
    let kept = all_jobs(&rt, &c, "kept");
    assert_eq!(kept.iter().map(|j| j.status).collect::<Vec<_>>(), [JobStatus::Succeeded]);
    let stats = rt.block_on(c.stream(&StreamName::new("brief").unwrap())).unwrap().stats;
    assert_eq!((stats.succeeded, stats.completed_total), (0, 1), "its count goes, the total stays");
    assert_eq!(stats.forgotten_total, 1);
    let show = p.ok(&["stream", "show", "brief"]);
    assert!(show.lines().any(|l| l.starts_with("forgotten (total)") && l.ends_with(" 1")), "{show}");

    let out = p.cli(&["stream", "update", "kept", "--retain", "0s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("retention: must be greater than zero"), "{err}");
}

#[test]
fn sigterm_stops_the_peer_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = PeerProc::start(&dir.path().join("p"), &[]).unwrap();
    p.ok(&["stream", "create", "s"]);
    assert!(p.stop().unwrap(), "exit code 0 after SIGTERM; log:\n{}", p.log_text());
    // And it starts again on the same data, with the stream still there.
    p.restart().unwrap();
    let out = p.ok(&["stream", "list"]);
    assert!(out.contains('s'), "{out}");
}

/// A short job submitted to the leader is done in the entry that submits
/// it: once the peer has seen the module's runs end before their entries
/// commit, `impetus submit` answers with the job already succeeded, and
/// every job still runs exactly once with its own result.
#[test]
fn a_short_job_is_done_when_its_submit_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let p = PeerProc::start(&dir.path().join("p"), &[]).unwrap();
    p.ok(&["stream", "create", "s1"]);
    let square = wasm("square");
    let mut acked = Vec::new();
    // Bounded: the first submit teaches the peer the module is quick; a
    // loaded machine may need a few more.
    for n in 1..=20u64 {
        let out = p.ok(&["submit", square.to_str().unwrap(), "--stream", "s1", "--input", &n.to_string(), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let status = v[0]["status"].as_str().unwrap().to_owned();
        acked.push((n, JobId(v[0]["id"].as_u64().unwrap()), status.clone()));
        if status == "Succeeded" {
            break;
        }
    }
    let (n, id, _) = acked.last().cloned().unwrap();
    assert!(acked.iter().any(|(_, _, s)| s == "Succeeded"), "no submit was acknowledged done: {acked:?}");
    let (rt, c) = client(&p);
    let done = rt.block_on(c.job(id)).unwrap();
    assert_eq!((done.status, done.attempts), (JobStatus::Succeeded, 1));
    assert_eq!(String::from_utf8_lossy(done.result.as_deref().unwrap()).trim(), (n * n).to_string());
    // Every job, done at its acknowledgement or later, ran once.
    let jobs = wait_for(Duration::from_secs(30), || {
        let jobs = all_jobs(&rt, &c, "s1");
        jobs.iter().all(|j| j.status.is_final()).then_some(jobs)
    })
    .expect("the jobs did not finish");
    let got: Vec<(JobStatus, u32, String)> = jobs
        .iter()
        .map(|j| {
            (j.status, j.attempts, String::from_utf8_lossy(j.result.as_deref().unwrap_or_default()).trim().to_owned())
        })
        .collect();
    let want: Vec<(JobStatus, u32, String)> =
        acked.iter().map(|(n, _, _)| (JobStatus::Succeeded, 1, (n * n).to_string())).collect();
    assert_eq!(got, want);
}

/// `--metrics ADDR` serves Prometheus metrics of the peer and its streams,
/// and `--log-format json` makes every log line one JSON object.
#[test]
fn a_peer_serves_its_metrics_and_logs_json() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", impetus_tests::free_port());
    let p = PeerProc::start(&dir.path().join("p"), &["--metrics", &metrics, "--log-format", "json"]).unwrap();
    p.ok(&["stream", "create", "m1"]);
    let square = wasm("square");
    for i in 0..3 {
        let out = p.ok(&["submit", square.to_str().unwrap(), "--stream", "m1", "--input", &i.to_string(), "--wait"]);
        assert_eq!(out.trim(), (i * i).to_string());
    }
    let page = impetus_tests::http_get(&metrics, "/metrics");
    assert!(impetus_tests::sample(&page, "impetus_raft_term") >= 1.0);
    assert_eq!(impetus_tests::sample(&page, "impetus_raft_is_leader"), 1.0);
    let (commit, applied) = (
        impetus_tests::sample(&page, "impetus_raft_commit_index"),
        impetus_tests::sample(&page, "impetus_raft_applied_index"),
    );
    assert!(commit >= 5.0 && applied >= 5.0, "stream, module, 3 submits at least: {commit} {applied}");
    assert_eq!(impetus_tests::sample(&page, r#"impetus_stream_jobs{stream="m1",status="succeeded"}"#), 3.0);
    assert_eq!(impetus_tests::sample(&page, r#"impetus_stream_jobs{stream="m1",status="queued"}"#), 0.0);
    assert_eq!(impetus_tests::sample(&page, r#"impetus_stream_submitted_total{stream="m1"}"#), 3.0);
    assert_eq!(impetus_tests::sample(&page, "impetus_job_latency_seconds_count"), 3.0, "submit → success of each job");
    assert_eq!(impetus_tests::sample(&page, "impetus_jobs_run_total{outcome=\"succeeded\"}"), 3.0);

    let log = p.log_text();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{line}");
    }
    assert!(log.contains("impetus peer ready"), "{log}");
}

/// `submit --wait` gives up when its peer stops answering: killed under
/// it, the peer leaves the command with no answer, and after
/// `WAIT_UNANSWERED` it exits non-zero with the last error instead of
/// polling for the rest of its year-long default wait.
#[test]
fn submit_wait_gives_up_when_its_peer_stops_answering() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = PeerProc::start(&dir.path().join("p"), &[]).unwrap();
    p.ok(&["stream", "create", "s1"]);
    let mut cmd = std::process::Command::new(impetus_tests::impetus_bin());
    cmd.args(["--peer", &p.addr, "submit", wasm("sleep").to_str().unwrap(), "--stream", "s1"]);
    cmd.args(["--input", "600000", "--wait"]);
    let limit = impetus_sdk::WAIT_UNANSWERED + Duration::from_secs(40);
    let waiting = std::thread::spawn(move || impetus_tests::run_bounded(cmd, limit).unwrap());
    // Submitted and running: then the peer dies.
    let c = wait_for(Duration::from_secs(20), || {
        let (rt, c) = client(&p);
        let jobs = all_jobs(&rt, &c, "s1");
        jobs.iter().any(|j| j.status == JobStatus::Running).then_some(())
    });
    assert!(c.is_some(), "the job did not start; log:\n{}", p.log_text());
    p.kill9();
    let started = std::time::Instant::now();
    let out = waiting.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let status = out.status.unwrap_or_else(|| panic!("still waiting {limit:?} after the kill; stderr:\n{stderr}"));
    assert!(!status.success(), "{status}: {stderr}");
    assert!(started.elapsed() >= impetus_sdk::WAIT_UNANSWERED - Duration::from_secs(1), "gave up too soon: {stderr}");
    assert!(stderr.to_lowercase().contains("reach") || stderr.contains("connect"), "{stderr}");
}

/// A submit the SDK splits in batches that fails after some batches were
/// committed says which jobs stay submitted (sending them again without
/// keys would submit them twice): 10,001 jobs, the last one invalid, make
/// one committed batch of 10,000 and a refused one.
#[test]
fn a_submit_that_fails_part_way_says_which_jobs_stay_submitted() {
    use impetus_proto::limits::{MAX_ARGS, MAX_BATCH};
    use impetus_proto::{JobSpec, NewJob};
    let dir = tempfile::tempdir().unwrap();
    let p = PeerProc::start(&dir.path().join("p"), &[]).unwrap();
    let (rt, c) = client(&p);
    let s = StreamName::new("s1").unwrap();
    rt.block_on(c.create_stream(&s, impetus_proto::StreamProps::default())).unwrap();
    let module = rt.block_on(c.put_module(std::fs::read(wasm("noop")).unwrap())).unwrap();
    let job = |args: Vec<String>| NewJob {
        module,
        spec: JobSpec { args, env: vec![], input: vec![] },
        priority: None,
        delay_ms: 0,
        key: None,
    };
    let mut jobs: Vec<NewJob> = (0..MAX_BATCH).map(|_| job(vec![])).collect();
    jobs.push(job(vec!["x".into(); MAX_ARGS + 1]));
    let err = rt.block_on(c.submit(&s, jobs)).unwrap_err();
    let impetus_sdk::ClientError::PartlySubmitted { submitted, total, error } = &err else {
        panic!("not a partial submit: {err}");
    };
    assert_eq!((submitted.len(), *total), (MAX_BATCH, MAX_BATCH + 1));
    assert!(error.to_string().contains("arguments"), "{error}");
    let msg = err.to_string();
    assert!(msg.starts_with("10000 of 10001 jobs were submitted (ids "), "{msg}");
    // They are in the cluster, as the error says.
    let listed: Vec<JobId> = all_jobs(&rt, &c, "s1").iter().map(|j| j.id).collect();
    assert_eq!(listed, submitted.iter().map(|s| s.job).collect::<Vec<_>>());
}
