//! Specs that need to reach inside the state: states no command sequence
//! makes (ids about to run out, corrupt snapshots) and how they are refused.

use expect_test::expect;
use impetus_proto::{
    Command, IdempotencyKey, JobSpec, ModuleHash, NewJob, Outcome, PeerInfo, PeerRole, Stamp, StreamName, StreamProps,
    Timestamp,
};

use crate::State;

const NOOP: &[u8] = b"\0asm\x01\0\0\0";

fn name(s: &str) -> StreamName {
    StreamName::new(s).unwrap()
}

fn keyed(key: &str) -> NewJob {
    NewJob {
        module: ModuleHash::of(NOOP),
        spec: JobSpec::default(),
        priority: None,
        delay_ms: 0,
        key: Some(IdempotencyKey::new(key).unwrap()),
    }
}

/// Apply `cmd` at the next index, check the invariants, return the outcome.
fn apply(state: &mut State, cmd: Command) -> impetus_proto::ApplyResult {
    let stamp = Stamp { index: state.applied_index() + 1, now: Timestamp(1_000_000) };
    let out = state.apply(stamp, &cmd);
    state.check_invariants();
    out
}

/// A module, stream `s`, peer-1 and two keyed jobs, `a` and `b`.
fn state() -> State {
    let mut state = State::new();
    let cmds = [
        Command::PutModule { hash: ModuleHash::of(NOOP), bytes: NOOP.to_vec() },
        Command::CreateStream { name: name("s"), props: StreamProps::default() },
        Command::RegisterPeer { info: PeerInfo::default(), role: PeerRole::Worker },
        Command::Submit { stream: name("s"), jobs: vec![keyed("a"), keyed("b")] },
    ];
    for cmd in cmds {
        apply(&mut state, cmd).unwrap();
    }
    state
}

/// Why `restore` refuses the snapshot of `state`.
fn refusal(state: &State) -> String {
    State::restore(&state.snapshot()).unwrap_err().to_string()
}

#[test]
fn a_stream_is_refused_once_stream_ids_are_spent_never_wrapped() {
    let mut state = state();
    // Ids are never reused: 2^32 - 3 streams came and went.
    state.data.next_stream = u32::MAX - 1;
    state.check_invariants();
    let create = |n| Command::CreateStream { name: name(n), props: StreamProps::default() };
    assert_eq!(apply(&mut state, create("last")), Ok(Outcome::StreamCreated));
    let mut before = state.clone();
    let e = apply(&mut state, create("one-more")).unwrap_err();
    expect!["invalid command: stream one-more cannot be created: all 4294967295 stream ids have been used (ids are never reused)"]
        .assert_eq(&e.to_string());
    before.data.applied_index = state.applied_index();
    assert_eq!(state, before, "a refused create changes nothing but the applied index");
    assert!(state.stream(&name("s")).is_some(), "stream 0 is still s");
    assert_eq!(state.streams().len(), 2);
}

#[test]
fn a_submit_is_refused_once_job_ids_are_spent_never_wrapped() {
    let mut state = State::new();
    apply(&mut state, Command::PutModule { hash: ModuleHash::of(NOOP), bytes: NOOP.to_vec() }).unwrap();
    apply(&mut state, Command::CreateStream { name: name("s"), props: StreamProps::default() }).unwrap();
    // 2^64 - 3 jobs came and went.
    state.data.next_job = u64::MAX - 2;
    state.check_invariants();
    let submit = |n: usize| Command::Submit { stream: name("s"), jobs: vec![NewJob { key: None, ..keyed("x") }; n] };
    let e = apply(&mut state, submit(2)).unwrap_err();
    expect!["invalid command: stream s: no job id is left for 2 more jobs (ids are never reused)"]
        .assert_eq(&e.to_string());
    assert!(apply(&mut state, submit(1)).is_ok(), "the last id there is");
    assert!(apply(&mut state, submit(1)).is_err());
    state.data.next_job = u64::MAX;
    expect!["invalid snapshot: invalid snapshot: next_job is the last id there is: no job could be submitted"]
        .assert_eq(&refusal(&state));
}

#[test]
fn a_snapshot_with_a_stream_id_not_below_next_stream_is_refused() {
    let mut state = state();
    state.data.next_stream = 0;
    expect!["invalid snapshot: invalid snapshot: stream s has id 0, not below next_stream 0"]
        .assert_eq(&refusal(&state));
}

/// The next submit would insert job `next_job` into a table that expects
/// another id, and panic on every replica.
#[test]
fn a_snapshot_whose_job_table_would_refuse_the_next_job_is_refused() {
    let mut state = state();
    state.data.next_job += 1;
    expect!["invalid snapshot: invalid snapshot: the job table's next id is job-2, but next_job is 3"]
        .assert_eq(&refusal(&state));
}

#[test]
fn a_snapshot_with_two_idempotency_keys_for_one_job_is_refused() {
    let mut state = state();
    // Job 1 was submitted with key b; key c claims it too.
    let s = state.data.streams.get_mut(&0).unwrap();
    let b = s.keys[&IdempotencyKey::new("b").unwrap()];
    s.keys.insert(IdempotencyKey::new("c").unwrap(), b);
    expect![
        "invalid snapshot: invalid snapshot: idempotency key c of stream s points at job-1, which does not carry it"
    ]
    .assert_eq(&refusal(&state));
}

#[test]
fn the_snapshot_of_a_sound_state_restores() {
    let state = state();
    assert_eq!(State::restore(&state.snapshot()).unwrap(), state);
}

/// The bytes of a snapshot, pinned: a change to how the state is kept in
/// memory must not change what a snapshot on disk says (a change that does
/// bumps `wire::SNAPSHOT_VERSION`).
#[test]
fn the_snapshot_format_is_pinned() {
    let mut state = state();
    let peer = impetus_proto::PeerId(1);
    let job = |n: u64| impetus_proto::JobId(n);
    let unkeyed = || NewJob { key: None, ..keyed("x") };
    let purge = |max| Command::Purge { stream: name("s"), older_than_ms: 0, max };
    let cmds = [
        Command::DataPut { stream: name("s"), key: b"k".to_vec(), value: b"v".to_vec() },
        Command::Lease { peer, streams: vec![], max: 1 },
        // Past the first 1024 jobs, holes in the middle (2 and 3), none
        // first (0 purged), a finished job kept (700).
        Command::Submit { stream: name("s"), jobs: (0..550).map(|_| unkeyed()).collect() },
        Command::Submit { stream: name("s"), jobs: (0..550).map(|_| unkeyed()).collect() },
        Command::Cancel { job: job(2) },
        Command::Cancel { job: job(3) },
        Command::Cancel { job: job(700) },
        purge(2),
        Command::Cancel { job: job(0) },
        purge(1),
    ];
    for cmd in cmds {
        apply(&mut state, cmd).unwrap();
    }
    let bytes = state.snapshot();
    expect!["56197 bytes, digest 2cedffa5438dec0b86993aae2ec80a2ffdfc5a501493a7123c69e29eea0e10f6"]
        .assert_eq(&format!("{} bytes, digest {}", bytes.len(), ModuleHash::of(&bytes)));
    assert_eq!(State::restore(&bytes).unwrap(), state);
}
