//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::Duration;

use impetus_proto::{Command, JobSpec, ModuleHash, NewJob, Outcome, StreamName, StreamProps, Timestamp};
use impetus_queue::{JobFilter, State};
use impetus_raft::{ImpetusConfig, ImpetusRaft, Request};

pub const MODULE: &[u8] = b"\0asm-test-module";

pub fn stream() -> StreamName {
    StreamName::new("s1").expect("valid stream name")
}

pub fn put_module() -> Command {
    Command::PutModule { hash: ModuleHash::of(MODULE), bytes: MODULE.to_vec() }
}

pub fn create_stream() -> Command {
    Command::CreateStream { name: stream(), props: StreamProps::default() }
}

pub fn submit(i: u64) -> Command {
    Command::Submit {
        stream: stream(),
        jobs: vec![NewJob {
            module: ModuleHash::of(MODULE),
            spec: JobSpec { args: vec![i.to_string()], env: vec![], input: i.to_string().into_bytes() },
            priority: None,
            delay_ms: 0,
            key: None,
        }],
    }
}

pub fn req(now: u64, cmd: Command) -> Request {
    Request { now: Timestamp(now), cmd }
}

/// Write `cmd`, assert it was applied without error, return its log index.
///
/// A leader whose lease lapsed (a loaded test machine) refuses writes with
/// `ForwardToLeader` without appending them; those are retried for up to 10 s.
pub async fn write<C: ImpetusConfig>(raft: &ImpetusRaft<C>, now: u64, cmd: Command) -> (u64, Outcome) {
    let mut tries = 0;
    let resp = loop {
        match raft.client_write(req(now, cmd.clone())).await {
            Ok(resp) => break resp,
            Err(e) if e.forward_to_leader().is_some() && tries < 200 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("client_write: {e:?}"),
        }
    };
    let outcome = resp.data.expect("command applied without error");
    (resp.log_id.index, outcome)
}

/// Put a module, create the stream and submit `jobs` jobs. Returns the last index.
pub async fn populate<C: ImpetusConfig>(raft: &ImpetusRaft<C>, jobs: u64) -> u64 {
    write(raft, 1_000, put_module()).await;
    let (mut last, _) = write(raft, 1_001, create_stream()).await;
    for i in 0..jobs {
        let (idx, outcome) = write(raft, 1_002 + i, submit(i)).await;
        assert!(matches!(outcome, Outcome::Submitted(ref s) if s.len() == 1), "{outcome:?}");
        last = idx;
    }
    last
}

pub fn job_count(state: &State) -> usize {
    state.jobs(&JobFilter { stream: Some(&stream()), limit: usize::MAX, ..Default::default() }).len()
}

/// Wait until `raft` has applied at least `index`.
pub async fn wait_applied<C: ImpetusConfig>(raft: &ImpetusRaft<C>, index: u64) {
    raft.wait(Some(Duration::from_secs(10)))
        .applied_index_at_least(Some(index), "applied")
        .await
        .expect("applied in time");
}

/// Submit jobs `from..from + n` (the stream exists). Returns the last index.
pub async fn submit_many<C: ImpetusConfig>(raft: &ImpetusRaft<C>, from: u64, n: u64) -> u64 {
    let mut last = 0;
    for i in from..from + n {
        last = write(raft, 10_000 + i, submit(i)).await.0;
    }
    last
}
