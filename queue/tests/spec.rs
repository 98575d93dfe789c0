//! The rules of the state machine, one spec each. Every apply is followed by
//! `check_invariants()` (see `common::Harness::apply`).

mod common;

use common::{job, module, name, Harness};
use expect_test::expect;
use impetus_proto::*;

fn props() -> StreamProps {
    StreamProps { lease_ttl_ms: 10_000, retry_backoff_ms: 100, retry_backoff_max_ms: 1_000, ..StreamProps::default() }
}

// ---- streams ---------------------------------------------------------------

#[test]
fn streams_are_created_once_and_listed_by_name() {
    let mut h = Harness::new();
    h.ok(Command::CreateStream { name: name("b"), props: props() });
    h.ok(Command::CreateStream { name: name("a"), props: props() });
    let e = h.err(Command::CreateStream { name: name("a"), props: props() });
    expect!["stream a already exists"].assert_eq(&e.to_string());
    let names: Vec<String> = h.state.streams().iter().map(|s| s.name.to_string()).collect();
    assert_eq!(names, ["a", "b"]);
    let e = h.err(Command::CreateStream { name: name("c"), props: StreamProps { mpps: 0, ..props() } });
    expect!["invalid command: invalid mpps: must be greater than zero"].assert_eq(&e.to_string());
    assert!(h.state.stream(&name("c")).is_none(), "a refused create leaves nothing behind");
}

#[test]
fn stream_properties_are_updated_by_patch() {
    let mut h = Harness::with_stream(props());
    let patch = StreamPatch { mpps: Some(9), spawn_frequency: Some(Some(5)), ..StreamPatch::default() };
    assert_eq!(h.ok(Command::UpdateStream { name: name("s"), patch }), Outcome::StreamUpdated);
    let p = h.state.stream(&name("s")).unwrap().props;
    assert_eq!((p.mpps, p.spawn_frequency, p.lease_ttl_ms), (9, Some(5), 10_000));
    let e = h.err(Command::UpdateStream { name: name("nope"), patch: StreamPatch::default() });
    expect!["stream nope does not exist"].assert_eq(&e.to_string());
    let bad = StreamPatch { max_attempts: Some(0), ..StreamPatch::default() };
    h.err(Command::UpdateStream { name: name("s"), patch: bad });
    assert_eq!(h.state.stream(&name("s")).unwrap().props.max_attempts, 3);
}

#[test]
fn a_paused_stream_takes_submits_but_grants_no_leases() {
    let mut h = Harness::with_stream(props());
    let peer = PeerId(1);
    let pause =
        |p| Command::UpdateStream { name: name("s"), patch: StreamPatch { paused: Some(p), ..Default::default() } };
    h.ok(pause(true));
    h.submit("s", vec![job("1")]);
    assert!(h.lease(peer, 10).is_empty());
    h.ok(pause(false));
    assert_eq!(h.lease_ids(peer, 10), [0]);
}

#[test]
fn delete_is_refused_while_jobs_are_live_unless_forced() {
    let mut h = Harness::with_stream(props());
    h.ok(Command::DataPut { stream: name("s"), key: b"k".to_vec(), value: b"v".to_vec() });
    h.submit("s", vec![job("1"), job("2")]);
    let e = h.err(Command::DeleteStream { name: name("s"), force: false });
    expect!["stream s has 2 live jobs; cancel them or delete with force"].assert_eq(&e.to_string());
    h.lease(PeerId(1), 1);
    assert_eq!(
        h.ok(Command::DeleteStream { name: name("s"), force: true }),
        Outcome::StreamDeleted { jobs_removed: 2 }
    );
    assert!(h.state.stream(&name("s")).is_none());
    assert!(h.state.job(JobId(0)).is_none());
    // The name can be used again, with nothing left of the old stream.
    h.ok(Command::CreateStream { name: name("s"), props: props() });
    assert_eq!(h.state.data_get(&name("s"), b"k"), None);
    assert_eq!(h.stats("s").live(), 0);
}

#[test]
fn a_stream_without_live_jobs_deletes_without_force() {
    let mut h = Harness::with_stream(props());
    let g = &h.submit("s", vec![job("1")]);
    h.ok(Command::Cancel { job: g[0] });
    assert_eq!(
        h.ok(Command::DeleteStream { name: name("s"), force: false }),
        Outcome::StreamDeleted { jobs_removed: 1 }
    );
}

#[test]
fn stats_count_jobs_per_status_and_the_oldest_pending_age() {
    let mut h = Harness::with_stream(props());
    let peer = PeerId(1);
    h.submit("s", vec![job("a"), job("b"), job("c")]);
    h.advance(500);
    h.submit("s", vec![NewJob { delay_ms: 60_000, ..job("d") }]);
    let g = h.lease(peer, 2);
    h.renew(peer, &g[1]).unwrap();
    h.complete(peer, &g[0], "ok").unwrap();
    h.advance(250);
    h.ok(Command::Tick);
    let s = h.stats("s");
    expect![[r#"
        StreamStats {
            queued: 1,
            delayed: 1,
            leased: 0,
            running: 1,
            succeeded: 1,
            dead: 0,
            cancelled: 0,
            oldest_pending_age_ms: Some(
                750,
            ),
            submitted_total: 4,
            completed_total: 1,
            failed_attempts_total: 0,
            expired_leases_total: 0,
            forgotten_total: 0,
        }
    "#]]
    .assert_debug_eq(&s);
}

// ---- submit ----------------------------------------------------------------

#[test]
fn submit_needs_a_known_stream_and_a_stored_module() {
    let mut h = Harness::with_stream(props());
    let e = h.err(Command::Submit { stream: name("nope"), jobs: vec![job("1")] });
    expect!["stream nope does not exist"].assert_eq(&e.to_string());
    let other = NewJob { module: ModuleHash::of(b"other"), ..job("1") };
    let e = h.err(Command::Submit { stream: name("s"), jobs: vec![job("0"), other] });
    assert!(matches!(e, ApplyError::UnknownModule(_)), "{e}");
    assert_eq!(h.stats("s").submitted_total, 0, "a refused batch submits nothing");
}

#[test]
fn a_batch_submit_assigns_increasing_ids_and_keeps_args_env_and_input() {
    let mut h = Harness::with_stream(props());
    let with_args = NewJob {
        spec: JobSpec {
            args: vec!["--n".into(), "7".into()],
            env: vec![("LANG".into(), "C".into())],
            input: b"7".to_vec(),
        },
        priority: Some(3),
        ..job("")
    };
    let ids = h.submit("s", vec![job("x"), with_args]);
    assert_eq!(ids, [JobId(0), JobId(1)]);
    let r = h.state.job(JobId(1)).unwrap();
    assert_eq!(
        (r.spec.args.as_slice(), r.spec.env[0].0.as_str(), r.spec.input.as_slice()),
        (&["--n".to_string(), "7".to_string()][..], "LANG", &b"7"[..])
    );
    assert_eq!((r.priority, r.status, r.attempts), (3, JobStatus::Queued, 0));
    let g = h.lease(PeerId(1), 1);
    assert_eq!(g[0].spec, r.spec, "the lease carries what to run");
    assert_eq!(g[0].module, module());
}

#[test]
fn the_same_idempotency_key_returns_the_existing_job_never_a_second() {
    let mut h = Harness::with_stream(props());
    let keyed = |input: &str| NewJob { key: Some(IdempotencyKey::new("order-17").unwrap()), ..job(input) };
    let first = h.ok(Command::Submit { stream: name("s"), jobs: vec![keyed("a")] });
    let again = h.ok(Command::Submit { stream: name("s"), jobs: vec![keyed("b"), job("c")] });
    expect![[r#"
        (
            Submitted(
                [
                    Submitted {
                        job: JobId(
                            0,
                        ),
                        existing: false,
                        status: Queued,
                    },
                ],
            ),
            Submitted(
                [
                    Submitted {
                        job: JobId(
                            0,
                        ),
                        existing: true,
                        status: Queued,
                    },
                    Submitted {
                        job: JobId(
                            1,
                        ),
                        existing: false,
                        status: Queued,
                    },
                ],
            ),
        )
    "#]]
    .assert_debug_eq(&(first, again));
    assert_eq!(h.state.job(JobId(0)).unwrap().spec.input, b"a");
    assert_eq!(h.stats("s").submitted_total, 2);
    let e = h.err(Command::Submit { stream: name("s"), jobs: vec![keyed("x"), keyed("y")] });
    expect!["idempotency key order-17 of stream s is used twice in one submit"].assert_eq(&e.to_string());
}

#[test]
fn purge_forgets_finished_jobs_old_enough_and_nothing_live() {
    let mut h = Harness::with_stream(props());
    let peer = h.register();
    let keyed = |input: &str| NewJob { key: Some(IdempotencyKey::new("once").unwrap()), ..job(input) };
    // 0 succeeds, 1 is cancelled, 2 stays queued, 3 (keyed) succeeds, 4 is leased.
    h.submit("s", vec![job("0"), job("1"), job("2")]);
    h.submit("s", vec![keyed("3"), job("4")]);
    let grants = h.lease(peer, 1);
    h.complete(peer, &grants[0], "zero").unwrap();
    h.ok(Command::Cancel { job: JobId(1) });
    h.advance(1_000);
    let grants = h.lease(peer, 2);
    assert_eq!(grants.iter().map(|g| g.job.0).collect::<Vec<_>>(), [2, 3]);
    h.complete(peer, &grants[1], "three").unwrap();
    let purge = |older_than_ms, max| Command::Purge { stream: name("s"), older_than_ms, max };

    // Only jobs finished at least 500 ms ago: 0 and 1, one per command.
    assert_eq!(h.ok(purge(500, 1)), Outcome::Purged { jobs_removed: 1 });
    assert!(h.state.job(JobId(0)).is_none());
    assert_eq!(h.ok(purge(500, 10)), Outcome::Purged { jobs_removed: 1 });
    assert!(h.state.job(JobId(1)).is_none());
    assert_eq!(h.ok(purge(500, 10)), Outcome::Purged { jobs_removed: 0 });
    // Then every finished one: 3; the leased 2 and the queued 4 stay.
    assert_eq!(h.ok(purge(0, 10)), Outcome::Purged { jobs_removed: 1 });
    let left: Vec<(u64, JobStatus)> = (0..5).filter_map(|i| h.state.job(JobId(i)).map(|j| (i, j.status))).collect();
    assert_eq!(left, [(2, JobStatus::Leased), (4, JobStatus::Queued)]);
    let stats = h.stats("s");
    assert_eq!((stats.succeeded, stats.cancelled, stats.live()), (0, 0, 2));
    assert_eq!((stats.submitted_total, stats.completed_total), (5, 2), "totals stay");
    assert_eq!(stats.forgotten_total, 3, "purged");
    // The key of a purged job is free again: a new job, not the old one.
    let again = h.submit("s", vec![keyed("3 again")]);
    assert_eq!(again, [JobId(5)]);

    let e = h.err(Command::Purge { stream: name("nope"), older_than_ms: 0, max: 1 });
    expect!["stream nope does not exist"].assert_eq(&e.to_string());
    let e = h.err(Command::Batch(vec![Command::Tick, purge(0, 1)]));
    expect!["invalid command: invalid command batch: a purge is a command of its own, not part of a batch"]
        .assert_eq(&e.to_string());
    let e = h.err(purge(0, u32::MAX));
    expect!["invalid command: purge batch is too large: 4294967295 bytes/items, the limit is 10000"]
        .assert_eq(&e.to_string());
}

/// The ids of the jobs the state still holds, of the first `n`.
fn held(h: &Harness, n: u64) -> Vec<u64> {
    (0..n).filter(|&i| h.state.job(JobId(i)).is_some()).collect()
}

#[test]
fn a_finished_job_is_forgotten_its_streams_retention_after_it_finished() {
    let mut h = Harness::with_stream(StreamProps { retain_ms: Some(1_000), max_attempts: 1, ..props() });
    let peer = h.register();
    let keyed = NewJob { key: Some(IdempotencyKey::new("once").unwrap()), ..job("0") };
    // 0 (keyed) succeeds, 1 is cancelled, 2 goes dead, 3 stays queued.
    h.submit("s", vec![keyed.clone(), job("1"), job("2"), job("3")]);
    let grants = h.lease(peer, 1);
    h.complete(peer, &grants[0], "zero").unwrap();
    h.advance(300);
    h.ok(Command::Cancel { job: JobId(1) });
    let grants = h.lease(peer, 1);
    assert_eq!(h.fail(peer, &grants[0], "trap"), Ok(FailDisposition::Dead));
    assert_eq!(h.state.poll_timeout(), Some(Timestamp(1_001_000)), "job 0 is forgotten first");

    h.advance(699);
    h.ok(Command::Tick);
    assert_eq!(held(&h, 4), [0, 1, 2, 3], "a millisecond early");
    h.advance(1);
    h.ok(Command::Tick);
    assert_eq!(held(&h, 4), [1, 2, 3]);
    h.advance(300);
    h.ok(Command::Tick);
    assert_eq!(held(&h, 4), [3], "the live job stays");
    assert_eq!(h.state.poll_timeout(), None);
    let stats = h.stats("s");
    assert_eq!((stats.succeeded, stats.cancelled, stats.dead, stats.queued), (0, 0, 0, 1));
    assert_eq!((stats.submitted_total, stats.completed_total), (4, 1), "totals stay");
    assert_eq!(stats.forgotten_total, 3);
    // The key of a forgotten job is free again: a new job, not the old one.
    assert_eq!(h.submit("s", vec![keyed]), [JobId(4)]);
}

#[test]
fn a_stream_that_keeps_its_jobs_forgets_none_and_a_retried_job_is_kept() {
    let mut h = Harness::with_stream(StreamProps { retain_ms: None, ..props() });
    h.ok(Command::CreateStream { name: name("t"), props: StreamProps { retain_ms: Some(100), ..props() } });
    h.submit("s", vec![job("0")]);
    h.submit("t", vec![job("1")]);
    h.ok(Command::Cancel { job: JobId(0) });
    h.ok(Command::Cancel { job: JobId(1) });
    h.advance(50);
    h.ok(Command::Retry { job: JobId(1) });
    h.advance(10 * 365 * 24 * 3600 * 1000);
    h.ok(Command::Tick);
    assert_eq!(held(&h, 2), [0, 1], "kept: a stream with no retention; a job no longer finished");
    assert_eq!(h.status(JobId(1)), JobStatus::Queued);
}

#[test]
fn a_changed_retention_applies_to_the_jobs_already_finished() {
    let mut h = Harness::with_stream(StreamProps { retain_ms: None, ..props() });
    h.submit("s", vec![job("0"), job("1")]);
    h.ok(Command::Cancel { job: JobId(0) });
    h.advance(1_000);
    h.ok(Command::Cancel { job: JobId(1) });
    let retain = |r| Command::UpdateStream {
        name: name("s"),
        patch: StreamPatch { retain_ms: Some(r), ..StreamPatch::default() },
    };
    // Job 0 finished 1000 ms ago, job 1 just now.
    h.ok(retain(Some(500)));
    h.ok(Command::Tick);
    assert_eq!(held(&h, 2), [1]);
    h.ok(retain(None));
    h.advance(1_000);
    h.ok(Command::Tick);
    assert_eq!(held(&h, 2), [1], "kept again");
    let e = h.err(retain(Some(0)));
    expect!["invalid command: invalid retention: must be greater than zero"].assert_eq(&e.to_string());
    // It scans the job table, as a purge does: one per entry.
    let e = h.err(Command::Batch(vec![retain(Some(500)), retain(None)]));
    expect![
        "invalid command: invalid command batch: a change of retention is a command of its own, not part of a batch"
    ]
    .assert_eq(&e.to_string());
    let paused = StreamPatch { paused: Some(true), ..StreamPatch::default() };
    h.ok(Command::Batch(vec![Command::UpdateStream { name: name("s"), patch: paused }]));
}

/// A day of jobs finished at once is not forgotten in one long command: at
/// most `FORGET_PER_COMMAND` per command, and the state is due again at
/// once until they are all gone.
#[test]
fn forgetting_is_bounded_per_command() {
    let mut h = Harness::with_stream(StreamProps { retain_ms: Some(100), ..props() });
    let n = impetus_queue::FORGET_PER_COMMAND as u64 + 10;
    for chunk in 0..n.div_ceil(1000) {
        let ids: Vec<JobId> = h.submit("s", (chunk * 1000..n.min((chunk + 1) * 1000)).map(|_| job("x")).collect());
        let cancels: Vec<Command> = ids.iter().map(|&job| Command::Cancel { job }).collect();
        h.ok(Command::Batch(cancels));
    }
    h.advance(100);
    h.ok(Command::Tick);
    assert_eq!(h.stats("s").cancelled, 10);
    assert_eq!(h.state.poll_timeout(), Some(Timestamp(h.now)), "due at once");
    h.ok(Command::Tick);
    assert_eq!(h.stats("s").cancelled, 0);
    assert_eq!(h.state.poll_timeout(), None);
}

// ---- lease order and limits ---------------------------------------------------

#[test]
fn leases_go_by_priority_then_ready_time_then_submission_order() {
    let mut h = Harness::with_stream(StreamProps { mpps: 100, ..props() });
    let p = |prio, input: &str| NewJob { priority: Some(prio), ..job(input) };
    h.submit("s", vec![p(1, "0"), p(5, "1"), p(1, "2")]);
    // Job 3 is submitted later but with a delay that ends before job 4's submit.
    h.submit("s", vec![NewJob { delay_ms: 10, ..p(5, "3") }]);
    h.advance(20);
    h.submit("s", vec![p(5, "4"), p(9, "5")]);
    assert_eq!(h.lease_ids(PeerId(1), 100), [5, 1, 3, 4, 0, 2]);
}

#[test]
fn a_delayed_job_is_not_leased_before_it_is_ready() {
    let mut h = Harness::with_stream(props());
    let id = h.submit("s", vec![NewJob { delay_ms: 1_000, ..job("1") }])[0];
    assert_eq!(h.status(id), JobStatus::Delayed);
    assert_eq!(h.state.poll_timeout(), Some(Timestamp(h.now + 1_000)));
    h.advance(999);
    assert!(h.lease(PeerId(1), 1).is_empty());
    h.advance(1);
    assert_eq!(h.lease_ids(PeerId(1), 1), [id.0]);
}

#[test]
fn spawn_frequency_caps_new_leases_per_second_across_peers() {
    let mut h = Harness::with_stream(StreamProps { spawn_frequency: Some(3), mpps: 100, ..props() });
    let p2 = h.register();
    h.submit("s", (0..10).map(|i| job(&i.to_string())).collect());
    assert_eq!(h.lease(PeerId(1), 2).len(), 2);
    assert_eq!(h.lease(p2, 5).len(), 1, "one left in this second");
    assert_eq!(h.lease(p2, 5).len(), 0);
    h.advance(1_000);
    assert_eq!(h.lease(p2, 5).len(), 3);
}

#[test]
fn mpps_caps_the_jobs_one_peer_holds_per_stream() {
    let mut h = Harness::with_stream(StreamProps { mpps: 2, ..props() });
    let p2 = h.register();
    h.submit("s", (0..10).map(|i| job(&i.to_string())).collect());
    let g = h.lease(PeerId(1), 10);
    assert_eq!(g.len(), 2);
    assert!(h.lease(PeerId(1), 10).is_empty());
    assert_eq!(h.lease(p2, 10).len(), 2, "another peer has its own slots");
    h.complete(PeerId(1), &g[0], "").unwrap();
    assert_eq!(h.lease(PeerId(1), 10).len(), 1, "a finished job frees a slot");
}

/// `lease_allowance` is the limit a lease applies, before the ready jobs:
/// what lets the leader tell which jobs of a submit it may lease itself.
#[test]
fn lease_allowance_is_what_a_lease_may_take_however_many_are_ready() {
    let mut h = Harness::with_stream(StreamProps { mpps: 4, spawn_frequency: Some(3), ..props() });
    let (s, p1, p2) = (name("s"), PeerId(1), h.register());
    assert_eq!(h.state.lease_allowance(&s, p1), 3, "no job ready, and still: the spawn frequency");
    h.submit("s", (0..10).map(|i| job(&i.to_string())).collect());
    assert_eq!(h.lease(p1, 2).len(), 2);
    assert_eq!((h.state.lease_allowance(&s, p1), h.state.lease_allowance(&s, p2)), (1, 1), "one left this second");
    h.advance(1_000);
    h.ok(Command::Tick);
    assert_eq!(h.state.lease_allowance(&s, p1), 2, "a new second; mpps 4 with 2 held");
    assert_eq!(h.lease(p1, 10).len(), 2);
    assert_eq!(h.state.lease_allowance(&s, p1), 0);
    let patch = StreamPatch { pin: Some([p2].into()), ..StreamPatch::default() };
    h.ok(Command::UpdateStream { name: s.clone(), patch });
    assert_eq!(h.state.lease_allowance(&s, p2), 1, "pinned; one left this second");
    h.ok(Command::DrainPeer { peer: p2, draining: true });
    assert_eq!(h.state.lease_allowance(&s, p2), 0, "draining");
    h.ok(Command::DrainPeer { peer: p2, draining: false });
    h.ok(Command::UpdateStream { name: s.clone(), patch: StreamPatch { paused: Some(true), ..Default::default() } });
    assert_eq!(h.state.lease_allowance(&s, p2), 0, "paused");
    assert_eq!(h.state.lease_allowance(&name("nope"), p2), 0, "unknown stream");
    assert_eq!(h.state.lease_allowance(&s, PeerId(99)), 0, "unknown peer");
}

// ---- a submit its leader ran --------------------------------------------------

/// What `index` printed, run under the limits of `props()`.
fn ran(index: u32, result: &str) -> Ran {
    let p = props();
    let limits = RunLimits { job_timeout_ms: p.job_timeout_ms, fuel: p.fuel, memory_limit_bytes: p.memory_limit_bytes };
    Ran { index, limits, result: result.into(), stderr_tail: b"e".to_vec() }
}

/// Each job's status, result, attempts and lease token, as a line.
fn jobs_view(h: &Harness) -> String {
    let all = h.state.jobs(&impetus_queue::JobFilter { limit: 100, ..Default::default() });
    all.iter()
        .map(|j| {
            let result = j.result.as_deref().map(String::from_utf8_lossy);
            let token = j.lease.as_ref().map(|l| l.token.0);
            format!("{} {:?} result={result:?} attempts={} token={token:?}\n", j.id, j.status, j.attempts)
        })
        .collect()
}

/// Apply a `SubmitRan` of `jobs` to stream `s` for peer-1; its outcome's
/// parts: the submit's, the lease's, the completions'.
fn submit_ran(h: &mut Harness, jobs: Vec<NewJob>, max: u32, ran: Vec<Ran>) -> Vec<ApplyResult> {
    match h.ok(Command::SubmitRan { stream: name("s"), jobs, peer: PeerId(1), max, ran }) {
        Outcome::Batch(parts) => parts,
        o => panic!("{o:?}"),
    }
}

/// The (job, token) of each grant of a lease's outcome.
fn grants_of(leased: &ApplyResult) -> Vec<(u64, u64)> {
    match leased {
        Ok(Outcome::Leased(g)) => g.iter().map(|g| (g.job.0, g.token.0)).collect(),
        o => panic!("{o:?}"),
    }
}

#[test]
fn a_submit_its_leader_ran_ends_its_jobs_in_the_entry_that_submits_them() {
    let mut h = Harness::with_stream(props());
    let parts = submit_ran(&mut h, vec![job("1"), job("2"), job("3")], 3, vec![ran(0, "1"), ran(2, "9")]);
    let grants = grants_of(&parts[1]);
    assert_eq!(grants, [(0, 4), (1, 4), (2, 4)], "the lease takes the entry's index as token");
    assert_eq!(parts[2], Ok(Outcome::Completed(vec![Ok(()), Ok(())])));
    let statuses: Vec<JobStatus> = match &parts[0] {
        Ok(Outcome::Submitted(subs)) => subs.iter().map(|s| s.status).collect(),
        o => panic!("{o:?}"),
    };
    use JobStatus::{Leased, Succeeded};
    assert_eq!(statuses, [Succeeded, Leased, Succeeded], "the acknowledgement tells which jobs are done");
    // Jobs 0 and 2 ended in this entry; job 1 did not run yet: it stays leased.
    expect![[r#"
        job-0 Succeeded result=Some("1") attempts=1 token=None
        job-1 Leased result=None attempts=1 token=Some(4)
        job-2 Succeeded result=Some("9") attempts=1 token=None
    "#]]
    .assert_eq(&jobs_view(&h));
    let st = h.stats("s");
    assert_eq!((st.succeeded, st.leased, st.completed_total), (2, 1, 2));
}

#[test]
fn a_result_counts_only_for_a_job_its_entry_granted_to_the_runner_as_it_ran() {
    let mut h = Harness::with_stream(props());
    let keyed = |input: &str| NewJob { key: Some(IdempotencyKey::new("k").unwrap()), ..job(input) };
    // An older ready job takes the only lease; then a job that already
    // existed (same key); then limits that changed since the run.
    h.submit("s", vec![keyed("older")]);
    let mut completed = vec![submit_ran(&mut h, vec![job("new")], 1, vec![ran(0, "x")]).remove(2)];
    completed.push(submit_ran(&mut h, vec![keyed("again")], 1, vec![ran(0, "y")]).remove(2));
    let slower = StreamPatch { job_timeout_ms: Some(props().job_timeout_ms + 1), ..StreamPatch::default() };
    h.ok(Command::UpdateStream { name: name("s"), patch: slower });
    completed.push(submit_ran(&mut h, vec![job("late")], 1, vec![ran(0, "z")]).remove(2));
    expect![[r#"
        [
            Ok(
                Completed(
                    [
                        Err(
                            NotGranted {
                                job: JobId(
                                    1,
                                ),
                            },
                        ),
                    ],
                ),
            ),
            Ok(
                Completed(
                    [
                        Err(
                            NotGranted {
                                job: JobId(
                                    0,
                                ),
                            },
                        ),
                    ],
                ),
            ),
            Ok(
                Completed(
                    [
                        Err(
                            NotGranted {
                                job: JobId(
                                    2,
                                ),
                            },
                        ),
                    ],
                ),
            ),
        ]
    "#]]
    .assert_debug_eq(&completed);
    // No result was taken: job 0 was leased by the first entry, job 1 by
    // the second, job 2 (new limits) by the last; each runs as granted.
    expect![[r#"
        job-0 Leased result=None attempts=1 token=Some(5)
        job-1 Leased result=None attempts=1 token=Some(6)
        job-2 Leased result=None attempts=1 token=Some(8)
    "#]]
    .assert_eq(&jobs_view(&h));
}

/// A result is the run of the spec that was submitted with it: a job that
/// already existed (same key) may have another spec, so its lease in the
/// entry does not take the result.
#[test]
fn a_result_for_a_job_that_already_existed_is_not_taken() {
    let mut h = Harness::with_stream(props());
    let keyed = |input: &str| NewJob { key: Some(IdempotencyKey::new("k").unwrap()), ..job(input) };
    h.submit("s", vec![keyed("first")]);
    let parts = submit_ran(&mut h, vec![keyed("second")], 1, vec![ran(0, "x")]);
    let granted: Vec<u64> = grants_of(&parts[1]).iter().map(|&(job, _)| job).collect();
    assert_eq!(granted, [0], "the entry's lease took the job that existed");
    assert_eq!(parts[2], Ok(Outcome::Completed(vec![Err(LeaseError::NotGranted { job: JobId(0) })])));
    expect![[r#"
        job-0 Leased result=None attempts=1 token=Some(5)
    "#]]
    .assert_eq(&jobs_view(&h));
}

#[test]
fn a_submit_ran_names_only_jobs_of_its_submit_in_order() {
    let mut h = Harness::with_stream(props());
    let bad = |ran: Vec<Ran>| Command::SubmitRan {
        stream: name("s"),
        jobs: vec![job("1"), job("2")],
        peer: PeerId(1),
        max: 2,
        ran,
    };
    let errors: Vec<String> = [vec![ran(2, "")], vec![ran(1, ""), ran(0, "")], vec![ran(0, ""), ran(0, "")]]
        .into_iter()
        .map(|r| h.err(bad(r)).to_string())
        .collect();
    expect![[r#"
        [
            "invalid command: invalid ran job: index 2 is not a later job of the 2 submitted (indexes increase)",
            "invalid command: invalid ran job: index 0 is not a later job of the 2 submitted (indexes increase)",
            "invalid command: invalid ran job: index 0 is not a later job of the 2 submitted (indexes increase)",
        ]
    "#]]
    .assert_debug_eq(&errors);
    assert_eq!(h.stats("s").submitted_total, 0, "a refused entry changes nothing");
}

#[test]
fn pin_and_ignore_lists_choose_the_peers() {
    let mut h = Harness::with_stream(props());
    let p2 = h.register();
    let p3 = h.register();
    let patch = StreamPatch { pin: Some([PeerId(1), p2].into()), ignore: Some([p2].into()), ..StreamPatch::default() };
    h.ok(Command::UpdateStream { name: name("s"), patch });
    h.submit("s", vec![job("1"), job("2")]);
    assert!(h.lease(p3, 5).is_empty(), "not pinned");
    assert!(h.lease(p2, 5).is_empty(), "pinned but ignored");
    assert_eq!(h.lease(PeerId(1), 5).len(), 2);
}

#[test]
fn leases_are_shared_round_robin_across_streams() {
    let mut h = Harness::with_stream(StreamProps { mpps: 10, ..props() });
    h.ok(Command::CreateStream { name: name("t"), props: StreamProps { mpps: 10, ..props() } });
    h.submit("s", (0..5).map(|i| job(&i.to_string())).collect());
    h.submit("t", (0..5).map(|i| job(&i.to_string())).collect());
    let streams: Vec<String> = h.lease(PeerId(1), 4).iter().map(|g| g.stream.to_string()).collect();
    assert_eq!(streams, ["s", "t", "s", "t"]);
    let only_t = h.ok(Command::Lease { peer: PeerId(1), streams: vec![name("t"), name("gone")], max: 10 });
    let Outcome::Leased(g) = only_t else { panic!() };
    assert_eq!(g.len(), 3);
    assert!(g.iter().all(|g| g.stream.as_str() == "t"));
}

/// Streams `s` (created first) and `t`, ten jobs queued in each.
fn two_backlogged_streams() -> Harness {
    let mut h = Harness::with_stream(StreamProps { mpps: 10, ..props() });
    h.ok(Command::CreateStream { name: name("t"), props: StreamProps { mpps: 10, ..props() } });
    h.submit("s", (0..10).map(|i| job(&i.to_string())).collect());
    h.submit("t", (0..10).map(|i| job(&i.to_string())).collect());
    h
}

/// A worker leases for the slots that free up, one or two at a time: its
/// successive requests take turns across streams too, so a busy stream
/// created first does not take every slot.
#[test]
fn a_worker_leasing_one_slot_at_a_time_takes_turns_across_streams() {
    let mut h = two_backlogged_streams();
    let p = PeerId(1);
    let streams = |grants: &[LeaseGrant]| grants.iter().map(|g| g.stream.to_string()).collect::<Vec<_>>();
    // Four slots fill up one at a time.
    let mut held: Vec<LeaseGrant> = (0..4).map(|_| h.lease(p, 1).remove(0)).collect();
    assert_eq!(streams(&held), ["s", "t", "s", "t"]);
    // Then each job that ends frees one slot, which the next request fills.
    let mut next = Vec::new();
    for _ in 0..4 {
        let done = held.remove(0);
        h.complete(p, &done, "ok").unwrap();
        next.push(h.lease(p, 1).remove(0));
    }
    assert_eq!(streams(&next), ["s", "t", "s", "t"], "the slot goes to the stream the peer holds fewer of");
    assert_eq!(h.state.peer(p).unwrap().leased, [(name("s"), 2), (name("t"), 2)]);
}

/// A worker with one slot completes and leases in turn, holding nothing
/// in either stream when it asks: the stream that granted least recently
/// goes first, so both are served.
#[test]
fn a_one_slot_worker_takes_turns_across_streams() {
    let mut h = two_backlogged_streams();
    let p = PeerId(1);
    let mut order = Vec::new();
    for _ in 0..6 {
        let g = h.lease(p, 1).remove(0);
        order.push(g.stream.to_string());
        h.complete(p, &g, "ok").unwrap();
    }
    assert_eq!(order, ["s", "t", "s", "t", "s", "t"]);
    h.state.check_invariants();
}

#[test]
fn only_registered_undrained_peers_lease() {
    let mut h = Harness::with_stream(props());
    h.submit("s", vec![job("1")]);
    let e = h.err(Command::Lease { peer: PeerId(42), streams: vec![], max: 1 });
    expect!["peer-42 is not registered"].assert_eq(&e.to_string());
    h.ok(Command::DrainPeer { peer: PeerId(1), draining: true });
    assert!(h.lease(PeerId(1), 1).is_empty());
    h.ok(Command::DrainPeer { peer: PeerId(1), draining: false });
    assert_eq!(h.lease(PeerId(1), 1).len(), 1);
}

// ---- fencing tokens ------------------------------------------------------------

#[test]
fn a_lease_carries_the_log_index_as_fencing_token_and_an_expiry() {
    let mut h = Harness::with_stream(props());
    h.submit("s", vec![job("1")]);
    let g = h.lease(PeerId(1), 1).remove(0);
    assert_eq!(g.token, FencingToken(h.index));
    assert_eq!(g.expires_at, Timestamp(h.now + 10_000));
    assert_eq!((g.attempt, g.lease_ttl_ms), (1, 10_000));
    assert_eq!(h.status(g.job), JobStatus::Leased);
}

#[test]
fn renewal_extends_the_lease_and_marks_the_job_running() {
    let mut h = Harness::with_stream(props());
    h.submit("s", vec![job("1")]);
    let g = h.lease(PeerId(1), 1).remove(0);
    h.advance(9_000);
    assert_eq!(h.renew(PeerId(1), &g), Ok(Timestamp(h.now + 10_000)));
    assert_eq!(h.status(g.job), JobStatus::Running);
    h.advance(9_000);
    h.ok(Command::Tick);
    assert_eq!(h.status(g.job), JobStatus::Running, "renewed: not expired at the old time");
}

#[test]
fn stale_tokens_wrong_peers_and_unleased_jobs_are_rejected() {
    let mut h = Harness::with_stream(props());
    let p2 = h.register();
    h.submit("s", vec![job("1")]);
    let first = h.lease(PeerId(1), 1).remove(0);
    h.ok(Command::Cancel { job: first.job });
    h.ok(Command::Retry { job: first.job });
    let second = h.lease(p2, 1).remove(0);
    let errs = [
        h.complete(PeerId(1), &first, "late").unwrap_err().to_string(),
        h.complete(PeerId(1), &second, "thief").unwrap_err().to_string(),
        h.renew(PeerId(1), &LeaseGrant { job: JobId(77), ..first.clone() }).unwrap_err().to_string(),
    ];
    expect![[r#"
        [
            "stale fencing token for job-0: presented token-6, current is token-9",
            "lease on job-0 is held by peer-2, not peer-1",
            "job-77 does not exist",
        ]
    "#]]
    .assert_debug_eq(&errs);
    h.complete(p2, &second, "42").unwrap();
    assert_eq!(
        h.complete(p2, &second, "again").unwrap_err(),
        LeaseError::NotLeased { job: second.job, status: JobStatus::Succeeded }
    );
    assert_eq!(h.state.job(second.job).unwrap().result.as_deref(), Some(&b"42"[..]), "the first result stays");
}

#[test]
fn an_expired_lease_is_rejected_and_its_job_returns_with_an_attempt_counted() {
    let mut h = Harness::with_stream(props());
    h.submit("s", vec![job("1")]);
    let g = h.lease(PeerId(1), 1).remove(0);
    h.advance(10_000);
    let e = h.complete(PeerId(1), &g, "too late").unwrap_err();
    assert_eq!(e, LeaseError::NotLeased { job: g.job, status: JobStatus::Delayed });
    let r = h.state.job(g.job).unwrap();
    assert_eq!((r.status, r.attempts, r.ready_at), (JobStatus::Delayed, 1, Timestamp(h.now + 100)));
    assert_eq!(r.error.unwrap().kind, ErrorKind::LeaseExpired);
    assert_eq!(h.stats("s").expired_leases_total, 1);
}

/// Regression (found by the model proptest in CI): a retried job keeps its last
/// error as history while its attempts restart at zero; cancelling it then is fine.
#[test]
fn a_retried_job_that_expired_before_can_be_cancelled() {
    let mut h = Harness::with_stream(StreamProps { max_attempts: 1, ..props() });
    let id = h.submit("s", vec![job("1")])[0];
    h.lease(PeerId(1), 1);
    h.advance(10_000);
    h.ok(Command::Tick);
    assert_eq!(h.status(id), JobStatus::Dead);
    h.ok(Command::Retry { job: id });
    assert_eq!(h.ok(Command::Cancel { job: id }), Outcome::Cancelled);
    let r = h.state.job(id).unwrap();
    assert_eq!((r.status, r.attempts), (JobStatus::Cancelled, 0));
    assert_eq!(r.error.unwrap().kind, ErrorKind::LeaseExpired, "the last error stays as history");
}

#[test]
fn leases_that_keep_expiring_end_dead() {
    let mut h = Harness::with_stream(StreamProps { max_attempts: 2, ..props() });
    let id = h.submit("s", vec![job("1")])[0];
    for _ in 0..2 {
        h.advance(1_000);
        assert_eq!(h.lease(PeerId(1), 1).len(), 1);
        h.advance(10_000);
        h.ok(Command::Tick);
    }
    let r = h.state.job(id).unwrap();
    assert_eq!((r.status, r.attempts), (JobStatus::Dead, 2));
    assert_eq!(r.error.unwrap().kind, ErrorKind::LeaseExpired);
}

// ---- complete, fail, retry, cancel, release ------------------------------------

#[test]
fn completion_commits_the_result_and_stderr_tail() {
    let mut h = Harness::with_stream(props());
    h.submit("s", vec![job("7")]);
    let g = h.lease(PeerId(1), 1).remove(0);
    let c = Completion { job: g.job, token: g.token, result: b"49".to_vec(), stderr_tail: b"note".to_vec() };
    h.ok(Command::Complete { peer: PeerId(1), completions: vec![c] });
    let r = h.state.job(g.job).unwrap();
    assert_eq!(
        (r.status, r.result.as_deref(), r.stderr_tail.as_slice()),
        (JobStatus::Succeeded, Some(&b"49"[..]), &b"note"[..])
    );
    assert!(r.lease.is_none());
    assert_eq!(r.peer, Some(PeerId(1)));
}

#[test]
fn failures_retry_with_backoff_until_max_attempts_then_go_dead() {
    let mut h = Harness::with_stream(props());
    let id = h.submit("s", vec![job("1")])[0];
    let mut dispositions = Vec::new();
    for _ in 0..3 {
        h.advance(10_000);
        let g = h.lease(PeerId(1), 1).remove(0);
        dispositions.push(h.fail(PeerId(1), &g, "boom").map(|d| match d {
            FailDisposition::Retry { ready_at } => format!("retry in {}ms", ready_at.0 - h.now),
            FailDisposition::Dead => "dead".into(),
        }));
    }
    expect![[r#"
        [
            Ok(
                "retry in 100ms",
            ),
            Ok(
                "retry in 200ms",
            ),
            Ok(
                "dead",
            ),
        ]
    "#]]
    .assert_debug_eq(&dispositions);
    let r = h.state.job(id).unwrap();
    assert_eq!((r.status, r.attempts, r.stderr_tail.as_slice()), (JobStatus::Dead, 3, &b"oops"[..]));
    expect![[r#"
        ErrorRecord {
            kind: Trap,
            error: "boom",
            name: "",
            line: None,
            statement: None,
        }
    "#]]
    .assert_debug_eq(&r.error.unwrap());
    assert_eq!(h.stats("s").dead, 1);
    assert_eq!(
        h.state
            .jobs(&impetus_queue::JobFilter { status: Some(JobStatus::Dead), limit: 10, ..Default::default() })
            .len(),
        1,
        "dead jobs are listable"
    );
}

/// A page of jobs is bounded in bytes as well as in count, so a listing
/// of large results copies no more than one answer can carry; paging on
/// from the last id of each page, until one is empty, reads every job once.
#[test]
fn a_job_list_stops_at_its_byte_budget_and_pages_on_to_every_job() {
    let mut h = Harness::with_stream(StreamProps { mpps: 100, ..props() });
    let p = PeerId(1);
    let ids = h.submit("s", (0..40).map(|i| job(&i.to_string())).collect());
    for g in h.lease(p, 40) {
        h.complete(p, &g, &"r".repeat(10_000)).unwrap();
    }
    let budget = 64 << 10;
    let page = |after| {
        h.state.jobs(&impetus_queue::JobFilter { after, limit: 1_000, max_bytes: Some(budget), ..Default::default() })
    };
    let (mut seen, mut sizes, mut after) = (Vec::new(), Vec::new(), None);
    loop {
        let jobs = page(after);
        let Some(last) = jobs.last() else { break };
        let bytes: usize = jobs.iter().map(|j| postcard::to_allocvec(j).unwrap().len()).sum();
        assert!(bytes <= budget, "a page of {bytes} bytes passes the budget of {budget}");
        after = Some(last.id);
        sizes.push(jobs.len());
        seen.extend(jobs.iter().map(|j| j.id));
    }
    assert_eq!(sizes, [6, 6, 6, 6, 6, 6, 4], "short pages, far below the limit of 1000");
    assert_eq!(seen, ids, "every job exactly once, in id order");
    // A record larger than the whole budget still comes back, alone: paging progresses.
    let one = h.state.jobs(&impetus_queue::JobFilter { limit: 1_000, max_bytes: Some(1), ..Default::default() });
    assert_eq!(one.iter().map(|j| j.id).collect::<Vec<_>>(), [ids[0]]);
    let all = h.state.jobs(&impetus_queue::JobFilter { limit: 1_000, ..Default::default() });
    assert_eq!(all.len(), 40, "no budget, no bound");
}

#[test]
fn a_lease_stops_at_its_byte_budget_so_its_answer_fits_in_a_message() {
    let mut h = Harness::with_stream(StreamProps { mpps: 100, ..props() });
    let p = PeerId(1);
    let big = "x".repeat(1 << 20);
    let ids = h.submit("s", (0..30).map(|_| job(&big)).collect());
    let first = h.lease(p, 30);
    let budget = impetus_queue::LEASE_GRANT_BYTES;
    // Grants until the budget is reached: the inputs carried are within one
    // job of it, and fewer jobs than asked.
    let carried: usize = first.iter().map(|g| g.spec.input.len()).sum();
    assert!(first.len() < 30, "{} granted", first.len());
    assert!(carried + (1 << 20) >= budget && carried <= budget + (1 << 20), "{carried} bytes for {budget}");
    let mut rest = Vec::new();
    for _ in 0..30 {
        let more = h.lease(p, 30);
        if more.is_empty() {
            break;
        }
        assert!(more.len() <= first.len());
        rest.extend(more);
    }
    assert_eq!(first.len() + rest.len(), 30, "the next leases go on");
    let granted: Vec<_> = first.iter().chain(&rest).map(|g| g.job).collect();
    assert_eq!(granted, ids);
    h.state.check_invariants();
}

#[test]
fn a_dead_job_can_be_retried_with_its_attempts_reset() {
    let mut h = Harness::with_stream(StreamProps { max_attempts: 1, ..props() });
    h.submit("s", vec![job("1")]);
    let g = h.lease(PeerId(1), 1).remove(0);
    assert_eq!(h.fail(PeerId(1), &g, "x"), Ok(FailDisposition::Dead));
    assert_eq!(h.ok(Command::Retry { job: g.job }), Outcome::Retried);
    assert_eq!((h.status(g.job), h.state.job(g.job).unwrap().attempts), (JobStatus::Queued, 0));
    let e = h.err(Command::Retry { job: g.job });
    expect!["cannot retry job-0: it is Queued"].assert_eq(&e.to_string());
    let g = h.lease(PeerId(1), 1).remove(0);
    h.complete(PeerId(1), &g, "fine").unwrap();
    assert_eq!(h.status(g.job), JobStatus::Succeeded);
}

#[test]
fn cancel_works_on_live_jobs_and_revokes_the_lease() {
    let mut h = Harness::with_stream(props());
    let ids = h.submit("s", vec![job("1"), NewJob { delay_ms: 5_000, ..job("2") }, job("3")]);
    let g = h.lease(PeerId(1), 1).remove(0);
    for id in &ids {
        assert_eq!(h.ok(Command::Cancel { job: *id }), Outcome::Cancelled);
    }
    assert_eq!(
        h.complete(PeerId(1), &g, "late").unwrap_err(),
        LeaseError::NotLeased { job: g.job, status: JobStatus::Cancelled }
    );
    let e = h.err(Command::Cancel { job: ids[0] });
    expect!["cannot cancel job-0: it is Cancelled"].assert_eq(&e.to_string());
    assert_eq!(h.err(Command::Cancel { job: JobId(99) }), ApplyError::UnknownJob(JobId(99)));
    assert_eq!(h.stats("s").cancelled, 3);
    // No delay nor lease is waiting any more: only the cancelled jobs'
    // forgetting, their stream's retention on.
    let forget_at = Timestamp(h.now + impetus_proto::records::DEFAULT_RETAIN_MS);
    assert_eq!(h.state.poll_timeout(), Some(forget_at));
}

#[test]
fn release_hands_a_job_back_without_counting_an_attempt() {
    let mut h = Harness::with_stream(props());
    h.submit("s", vec![job("1"), job("2")]);
    let g = h.lease(PeerId(1), 1).remove(0);
    let out = h.ok(Command::Release { peer: PeerId(1), leases: vec![(g.job, g.token)] });
    assert_eq!(out, Outcome::Released(vec![Ok(())]));
    let r = h.state.job(g.job).unwrap();
    assert_eq!((r.status, r.attempts), (JobStatus::Queued, 0));
    assert_eq!(h.lease_ids(PeerId(1), 1), [g.job.0], "it keeps its place in the queue");
}

// ---- modules, data store, peers ------------------------------------------------

#[test]
fn modules_are_stored_once_by_content_hash() {
    let mut h = Harness::new();
    let bytes = b"\0asm\x01\0\0\0 other".to_vec();
    let put = |b: &Vec<u8>| Command::PutModule { hash: ModuleHash::of(b), bytes: b.clone() };
    assert_eq!(h.ok(put(&bytes)), Outcome::ModuleStored { new: true });
    assert_eq!(h.ok(put(&bytes)), Outcome::ModuleStored { new: false });
    assert_eq!(h.state.module(&ModuleHash::of(&bytes)), Some(bytes.as_slice()));
    let e = h.err(Command::PutModule { hash: module(), bytes });
    assert!(matches!(e, ApplyError::ModuleHashMismatch { .. }), "{e}");
}

#[test]
fn the_data_store_puts_deletes_and_compares_and_sets() {
    let mut h = Harness::with_stream(props());
    let (s, k) = (name("s"), b"k".to_vec());
    let cas = |expected: Option<&str>, new: Option<&str>| Command::DataCas {
        stream: name("s"),
        key: b"k".to_vec(),
        expected: expected.map(|v| v.as_bytes().to_vec()),
        new: new.map(|v| v.as_bytes().to_vec()),
    };
    assert_eq!(h.ok(cas(None, Some("1"))), Outcome::DataCas { swapped: true, current: Some(b"1".to_vec()) });
    assert_eq!(h.ok(cas(None, Some("2"))), Outcome::DataCas { swapped: false, current: Some(b"1".to_vec()) });
    assert_eq!(h.ok(cas(Some("1"), Some("2"))), Outcome::DataCas { swapped: true, current: Some(b"2".to_vec()) });
    assert_eq!(h.state.data_get(&s, &k), Some(&b"2"[..]));
    h.ok(Command::DataPut { stream: s.clone(), key: b"j".to_vec(), value: b"x".to_vec() });
    assert_eq!(h.state.data_keys(&s, None, 10), [b"j".to_vec(), k.clone()]);
    h.ok(Command::DataDelete { stream: s.clone(), key: k.clone() });
    assert_eq!(h.state.data_get(&s, &k), None);
    let e = h.err(Command::DataPut { stream: name("nope"), key: k, value: vec![] });
    assert_eq!(e, ApplyError::UnknownStream(name("nope")));
}

#[test]
fn peers_register_with_ids_never_reused_and_heartbeat() {
    let mut h = Harness::new();
    let a = h.register();
    let b = h.register();
    h.ok(Command::RemovePeer { peer: b });
    let c = h.register();
    assert_eq!((a, b, c), (PeerId(1), PeerId(2), PeerId(3)));
    h.advance(5_000);
    let info = PeerInfo {
        host: "h1".into(),
        pid: 42,
        addresses: vec![],
        capacity: 8,
        labels: vec!["gpu".into()],
        seat: impetus_proto::Seat::Preferred,
    };
    h.ok(Command::Heartbeat { peer: a, info: info.clone(), rss_bytes: 1 << 20 });
    h.ok(Command::SetPeerRole { peer: a, role: PeerRole::Voter });
    let r = h.state.peer(a).unwrap();
    assert_eq!((r.info, r.rss_bytes, r.last_heartbeat, r.role), (info, 1 << 20, Timestamp(h.now), PeerRole::Voter));
    assert_eq!(
        h.err(Command::Heartbeat { peer: b, info: PeerInfo::default(), rss_bytes: 0 }),
        ApplyError::UnknownPeer(b)
    );
}

#[test]
fn a_peers_registry_entry_shows_its_idle_slots_per_stream() {
    let mut h = Harness::with_stream(StreamProps { mpps: 2, ..props() });
    let p = PeerId(1);
    let other = h.register();
    h.ok(Command::CreateStream { name: name("wide"), props: props() });
    let pin = [other].into_iter().collect();
    h.ok(Command::CreateStream { name: name("pinned"), props: StreamProps { pin, ..props() } });
    h.ok(Command::Heartbeat { peer: p, info: PeerInfo { capacity: 4, ..PeerInfo::default() }, rss_bytes: 0 });
    h.submit("s", vec![job("1")]);
    h.lease(p, 1);
    let r = h.state.peer(p).unwrap();
    assert_eq!(r.leased, [(name("s"), 1)]);
    // s: its max per peer (2) less the job running; wide: the 3 slots the
    // capacity leaves; pinned: none, it runs on peer-2 only.
    assert_eq!(r.idle, [(name("s"), 1), (name("wide"), 3)]);
    h.ok(Command::DrainPeer { peer: p, draining: true });
    assert_eq!(h.state.peer(p).unwrap().idle, [], "a draining peer takes nothing");
}

#[test]
fn removing_a_peer_returns_its_jobs_without_counting_attempts() {
    let mut h = Harness::with_stream(props());
    h.submit("s", vec![job("1"), job("2")]);
    h.lease(PeerId(1), 2);
    assert_eq!(h.state.peer(PeerId(1)).unwrap().leased, [(name("s"), 2)]);
    h.ok(Command::RemovePeer { peer: PeerId(1) });
    assert_eq!(h.stats("s").queued, 2);
    assert!(h.state.job(JobId(0)).unwrap().attempts == 0);
}

// ---- batches, time, refusals ------------------------------------------------------

#[test]
fn a_batch_applies_each_command_and_reports_each_outcome() {
    let mut h = Harness::with_stream(props());
    let out = h.ok(Command::Batch(vec![
        Command::Submit { stream: name("s"), jobs: vec![job("1")] },
        Command::Submit { stream: name("nope"), jobs: vec![job("1")] },
        Command::Lease { peer: PeerId(1), streams: vec![], max: 5 },
    ]));
    let Outcome::Batch(results) = out else { panic!() };
    assert!(matches!(results[0], Ok(Outcome::Submitted(_))));
    assert_eq!(results[1], Err(ApplyError::UnknownStream(name("nope"))));
    assert!(matches!(&results[2], Ok(Outcome::Leased(g)) if g.len() == 1));
    let e = h.err(Command::Batch(vec![Command::Batch(vec![])]));
    expect!["invalid command: invalid command batch: batches do not nest"].assert_eq(&e.to_string());
}

#[test]
fn time_never_goes_backwards() {
    let mut h = Harness::with_stream(props());
    h.submit("s", vec![job("1")]);
    let g = h.lease(PeerId(1), 1).remove(0);
    h.now -= 500_000; // a new leader with a slow clock
    h.ok(Command::Tick);
    assert_eq!(h.state.now(), Timestamp(1_000_000));
    assert_eq!(h.renew(PeerId(1), &g), Ok(Timestamp(1_010_000)));
}

#[test]
fn a_refused_command_changes_nothing_but_the_applied_index() {
    let mut h = Harness::with_stream(props());
    h.submit("s", vec![job("1")]);
    let before = h.state.clone();
    let refusals = [
        Command::Submit {
            stream: name("s"),
            jobs: vec![job("ok"), NewJob { module: ModuleHash::of(b"x"), ..job("bad") }],
        },
        Command::DeleteStream { name: name("s"), force: false },
        Command::Cancel { job: JobId(5) },
        Command::UpdateStream { name: name("s"), patch: StreamPatch { lease_ttl_ms: Some(0), ..Default::default() } },
    ];
    for cmd in refusals {
        h.err(cmd);
    }
    assert_eq!(
        h.state.snapshot()[1..],
        {
            let mut b = before;
            // Only the applied index differs; apply a no-op to align it.
            b.apply(Stamp { index: h.index, now: Timestamp(h.now) }, &Command::Tick).unwrap();
            b.snapshot()
        }[1..]
    );
}

#[test]
#[should_panic(expected = "log index 2 applied after 2")]
fn applying_an_index_twice_is_a_bug_and_panics() {
    let mut h = Harness::new();
    h.ok(Command::Tick);
    h.state.apply(Stamp { index: h.index, now: Timestamp(h.now) }, &Command::Tick).ok();
}
