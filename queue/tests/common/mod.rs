//! A small driver for specs: applies commands at increasing log indexes and
//! checks every invariant after each one.
#![allow(dead_code)]

use impetus_proto::*;
use impetus_queue::State;

pub struct Harness {
    pub state: State,
    pub index: u64,
    pub now: u64,
}

pub const NOOP: &[u8] = b"\0asm\x01\0\0\0";

pub fn name(s: &str) -> StreamName {
    StreamName::new(s).unwrap()
}

pub fn module() -> ModuleHash {
    ModuleHash::of(NOOP)
}

pub fn job(input: &str) -> NewJob {
    NewJob {
        module: module(),
        spec: JobSpec { args: vec![], env: vec![], input: input.as_bytes().to_vec() },
        priority: None,
        delay_ms: 0,
        key: None,
    }
}

impl Harness {
    pub fn new() -> Harness {
        let mut h = Harness { state: State::new(), index: 0, now: 1_000_000 };
        h.ok(Command::PutModule { hash: module(), bytes: NOOP.to_vec() });
        h
    }

    /// A harness with stream `s` (default props but the ones given) and peer-1.
    pub fn with_stream(props: StreamProps) -> Harness {
        let mut h = Harness::new();
        h.ok(Command::CreateStream { name: name("s"), props });
        h.register();
        h
    }

    pub fn apply(&mut self, cmd: Command) -> ApplyResult {
        self.index += 1;
        let out = self.state.apply(Stamp { index: self.index, now: Timestamp(self.now) }, &cmd);
        self.state.check_invariants();
        out
    }

    #[track_caller]
    pub fn ok(&mut self, cmd: Command) -> Outcome {
        match self.apply(cmd) {
            Ok(o) => o,
            Err(e) => panic!("command refused: {e}"),
        }
    }

    #[track_caller]
    pub fn err(&mut self, cmd: Command) -> ApplyError {
        match self.apply(cmd) {
            Ok(o) => panic!("command accepted: {o:?}"),
            Err(e) => e,
        }
    }

    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    pub fn register(&mut self) -> PeerId {
        match self.ok(Command::RegisterPeer { info: PeerInfo::default(), role: PeerRole::Worker }) {
            Outcome::PeerRegistered { peer } => peer,
            o => panic!("{o:?}"),
        }
    }

    pub fn submit(&mut self, stream: &str, jobs: Vec<NewJob>) -> Vec<JobId> {
        match self.ok(Command::Submit { stream: name(stream), jobs }) {
            Outcome::Submitted(v) => v.into_iter().map(|s| s.job).collect(),
            o => panic!("{o:?}"),
        }
    }

    pub fn lease(&mut self, peer: PeerId, max: u32) -> Vec<LeaseGrant> {
        match self.ok(Command::Lease { peer, streams: vec![], max }) {
            Outcome::Leased(v) => v,
            o => panic!("{o:?}"),
        }
    }

    /// Lease and return just the job ids.
    pub fn lease_ids(&mut self, peer: PeerId, max: u32) -> Vec<u64> {
        self.lease(peer, max).iter().map(|g| g.job.0).collect()
    }

    pub fn complete(&mut self, peer: PeerId, g: &LeaseGrant, result: &str) -> Result<(), LeaseError> {
        let c = Completion { job: g.job, token: g.token, result: result.as_bytes().to_vec(), stderr_tail: vec![] };
        match self.ok(Command::Complete { peer, completions: vec![c] }) {
            Outcome::Completed(mut v) => v.remove(0),
            o => panic!("{o:?}"),
        }
    }

    pub fn fail(&mut self, peer: PeerId, g: &LeaseGrant, msg: &str) -> Result<FailDisposition, LeaseError> {
        let f = Failure {
            job: g.job,
            token: g.token,
            error: ErrorRecord::new(ErrorKind::Trap, msg),
            stdout_tail: vec![],
            stderr_tail: b"oops".to_vec(),
        };
        match self.ok(Command::Fail { peer, failures: vec![f] }) {
            Outcome::Failed(mut v) => v.remove(0),
            o => panic!("{o:?}"),
        }
    }

    pub fn renew(&mut self, peer: PeerId, g: &LeaseGrant) -> Result<Timestamp, LeaseError> {
        match self.ok(Command::Renew { peer, leases: vec![(g.job, g.token)] }) {
            Outcome::Renewed(mut v) => v.remove(0),
            o => panic!("{o:?}"),
        }
    }

    pub fn status(&self, id: JobId) -> JobStatus {
        self.state.job(id).unwrap().status
    }

    pub fn stats(&self, stream: &str) -> StreamStats {
        self.state.stream_stats(&name(stream)).unwrap()
    }
}
