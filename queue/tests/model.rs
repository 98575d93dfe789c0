//! Property test: random command sequences against a small, obviously correct
//! reference model of the queue (a flat list of jobs, sorted by brute force).
//! After every command the real state's invariants hold, and the real state
//! agrees with the model on what is leased next and on every job's status.

mod common;

use std::collections::BTreeMap;

use common::{job, name, Harness};
use impetus_proto::*;
use proptest::prelude::*;

const STREAMS: [&str; 2] = ["a", "b"];
const MPPS: u32 = 3;
const TTL: u64 = 400;
const MAX_ATTEMPTS: u32 = 3;
const BACKOFF: u64 = 50;
const BACKOFF_MAX: u64 = 120;

#[derive(Clone, Debug)]
enum Op {
    Submit { stream: usize, priority: i32, delay: u64, count: usize },
    Lease { peer: u64, max: u32 },
    Complete { pick: usize, stale: bool },
    Fail { pick: usize },
    Renew { pick: usize },
    Release { pick: usize },
    Cancel { pick: usize },
    Retry { pick: usize },
    Pause { stream: usize, paused: bool },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, 0..3i32, prop_oneof![Just(0u64), Just(100), Just(300)], 1..4usize)
            .prop_map(|(stream, priority, delay, count)| Op::Submit { stream, priority, delay, count }),
        3 => (1..3u64, 1..6u32).prop_map(|(peer, max)| Op::Lease { peer, max }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, stale)| Op::Complete { pick, stale }),
        1 => any::<usize>().prop_map(|pick| Op::Fail { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Renew { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Retry { pick }),
        1 => (0..2usize, any::<bool>()).prop_map(|(stream, paused)| Op::Pause { stream, paused }),
        3 => (0..300u64).prop_map(|ms| Op::Advance { ms }),
    ]
}

#[derive(Clone, Debug)]
struct MJob {
    stream: usize,
    priority: i32,
    ready_at: u64,
    attempts: u32,
    status: JobStatus,
    lease: Option<(u64, u64, u64)>, // peer, token, expires_at
}

#[derive(Default)]
struct Model {
    now: u64,
    jobs: BTreeMap<u64, MJob>,
    paused: [bool; 2],
    /// Per stream, the token of its latest grant.
    last: [u64; 2],
}

impl Model {
    fn backoff(attempts: u32) -> u64 {
        (BACKOFF << (attempts - 1).min(20)).min(BACKOFF_MAX)
    }

    fn requeue(&mut self, id: u64, ready_at: u64) {
        let now = self.now;
        let j = self.jobs.get_mut(&id).unwrap();
        j.lease = None;
        j.ready_at = ready_at;
        j.status = if ready_at <= now { JobStatus::Queued } else { JobStatus::Delayed };
    }

    fn failed_attempt(&mut self, id: u64) {
        let j = &self.jobs[&id];
        if j.attempts >= MAX_ATTEMPTS {
            let j = self.jobs.get_mut(&id).unwrap();
            j.lease = None;
            j.status = JobStatus::Dead;
        } else {
            let at = self.now + Model::backoff(j.attempts);
            self.requeue(id, at);
        }
    }

    /// Time passes: due delayed jobs become queued, then expired leases fail.
    fn tick(&mut self, now: u64) {
        self.now = self.now.max(now);
        let now = self.now;
        for j in self.jobs.values_mut() {
            if j.status == JobStatus::Delayed && j.ready_at <= now {
                j.status = JobStatus::Queued;
            }
        }
        let expired: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.lease.is_some_and(|(_, _, exp)| exp <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.failed_attempt(id);
        }
    }

    /// What may be leased next: per stream by (priority desc, ready_at, id),
    /// streams taken round robin (those where the peer holds fewer leases
    /// first, then the one that granted least recently, then in order),
    /// within mpps.
    fn lease(&mut self, peer: u64, max: u32, token: u64) -> Vec<u64> {
        let held =
            |s: usize| self.jobs.values().filter(|j| j.stream == s && j.lease.is_some_and(|l| l.0 == peer)).count();
        let mut order: Vec<usize> = (0..2).collect();
        order.sort_by_key(|&s| (held(s), self.last[s], s));
        let mut per_stream: Vec<Vec<u64>> = order
            .into_iter()
            .map(|s| {
                if self.paused[s] {
                    return vec![];
                }
                let held = held(s);
                let mut ready: Vec<(i32, u64, u64)> = self
                    .jobs
                    .iter()
                    .filter(|(_, j)| j.stream == s && j.status == JobStatus::Queued)
                    .map(|(&id, j)| (-j.priority, j.ready_at, id))
                    .collect();
                ready.sort();
                ready.into_iter().take(MPPS as usize - held.min(MPPS as usize)).map(|(_, _, id)| id).rev().collect()
            })
            .collect();
        let mut out = Vec::new();
        'outer: loop {
            let mut progressed = false;
            for s in per_stream.iter_mut() {
                if out.len() == max as usize {
                    break 'outer;
                }
                if let Some(id) = s.pop() {
                    out.push(id);
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        for &id in &out {
            let j = self.jobs.get_mut(&id).unwrap();
            self.last[j.stream] = token;
            j.status = JobStatus::Leased;
            j.attempts += 1;
            j.lease = Some((peer, token, self.now + TTL));
        }
        out
    }

    fn leased(&self) -> Vec<u64> {
        self.jobs.iter().filter(|(_, j)| j.lease.is_some()).map(|(&id, _)| id).collect()
    }
}

fn pick(ids: &[u64], pick: usize) -> Option<u64> {
    (!ids.is_empty()).then(|| ids[pick % ids.len()])
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let props = StreamProps {
        mpps: MPPS,
        lease_ttl_ms: TTL,
        max_attempts: MAX_ATTEMPTS,
        retry_backoff_ms: BACKOFF,
        retry_backoff_max_ms: BACKOFF_MAX,
        ..StreamProps::default()
    };
    let mut h = Harness::new();
    for s in STREAMS {
        h.ok(Command::CreateStream { name: name(s), props: props.clone() });
    }
    h.register();
    h.register();
    let mut m = Model { now: h.now, ..Model::default() };
    for op in ops {
        if let Op::Advance { ms } = op {
            h.advance(ms);
            continue;
        }
        // Every command advances time first, in both.
        m.tick(h.now);
        let token = h.index + 1;
        match op {
            Op::Submit { stream, priority, delay, count } => {
                let jobs =
                    (0..count).map(|_| NewJob { priority: Some(priority), delay_ms: delay, ..job("x") }).collect();
                for id in h.submit(STREAMS[stream], jobs) {
                    let ready_at = m.now + delay;
                    let status = if delay == 0 { JobStatus::Queued } else { JobStatus::Delayed };
                    m.jobs.insert(id.0, MJob { stream, priority, ready_at, attempts: 0, status, lease: None });
                }
            }
            Op::Lease { peer, max } => {
                let got = h.lease_ids(PeerId(peer), max);
                let want = m.lease(peer, max, token);
                prop_assert_eq!(got, want, "lease for peer {} at {}", peer, m.now);
            }
            Op::Complete { pick: p, stale } => {
                let Some(id) = pick(&m.leased(), p) else {
                    h.ok(Command::Tick);
                    continue;
                };
                let (peer, tok, _) = m.jobs[&id].lease.unwrap();
                let tok = if stale { tok - 1 } else { tok };
                let c =
                    Completion { job: JobId(id), token: FencingToken(tok), result: b"r".to_vec(), stderr_tail: vec![] };
                let out = h.ok(Command::Complete { peer: PeerId(peer), completions: vec![c] });
                let Outcome::Completed(r) = out else { panic!() };
                prop_assert_eq!(r[0].is_ok(), !stale);
                if !stale {
                    let j = m.jobs.get_mut(&id).unwrap();
                    j.lease = None;
                    j.status = JobStatus::Succeeded;
                }
            }
            Op::Fail { pick: p } => {
                let Some(id) = pick(&m.leased(), p) else {
                    h.ok(Command::Tick);
                    continue;
                };
                let (peer, tok, _) = m.jobs[&id].lease.unwrap();
                let f = Failure {
                    job: JobId(id),
                    token: FencingToken(tok),
                    error: ErrorRecord::new(ErrorKind::Exit(1), "exit 1"),
                    stdout_tail: vec![],
                    stderr_tail: vec![],
                };
                h.ok(Command::Fail { peer: PeerId(peer), failures: vec![f] });
                m.failed_attempt(id);
            }
            Op::Renew { pick: p } => {
                let Some(id) = pick(&m.leased(), p) else {
                    h.ok(Command::Tick);
                    continue;
                };
                let (peer, tok, _) = m.jobs[&id].lease.unwrap();
                let out = h.ok(Command::Renew { peer: PeerId(peer), leases: vec![(JobId(id), FencingToken(tok))] });
                prop_assert_eq!(out, Outcome::Renewed(vec![Ok(Timestamp(m.now + TTL))]));
                let j = m.jobs.get_mut(&id).unwrap();
                j.lease = Some((peer, tok, m.now + TTL));
                j.status = JobStatus::Running;
            }
            Op::Release { pick: p } => {
                let Some(id) = pick(&m.leased(), p) else {
                    h.ok(Command::Tick);
                    continue;
                };
                let (peer, tok, _) = m.jobs[&id].lease.unwrap();
                h.ok(Command::Release { peer: PeerId(peer), leases: vec![(JobId(id), FencingToken(tok))] });
                m.jobs.get_mut(&id).unwrap().attempts -= 1;
                let at = m.jobs[&id].ready_at;
                m.requeue(id, at);
            }
            Op::Cancel { pick: p } => {
                let ids: Vec<u64> = m.jobs.keys().copied().collect();
                let Some(id) = pick(&ids, p) else {
                    h.ok(Command::Tick);
                    continue;
                };
                let live = !m.jobs[&id].status.is_final();
                prop_assert_eq!(h.apply(Command::Cancel { job: JobId(id) }).is_ok(), live);
                if live {
                    let j = m.jobs.get_mut(&id).unwrap();
                    j.lease = None;
                    j.status = JobStatus::Cancelled;
                }
            }
            Op::Retry { pick: p } => {
                let ids: Vec<u64> = m.jobs.keys().copied().collect();
                let Some(id) = pick(&ids, p) else {
                    h.ok(Command::Tick);
                    continue;
                };
                let ok = matches!(m.jobs[&id].status, JobStatus::Dead | JobStatus::Cancelled);
                prop_assert_eq!(h.apply(Command::Retry { job: JobId(id) }).is_ok(), ok);
                if ok {
                    m.jobs.get_mut(&id).unwrap().attempts = 0;
                    let now = m.now;
                    m.requeue(id, now);
                }
            }
            Op::Pause { stream, paused } => {
                let patch = StreamPatch { paused: Some(paused), ..StreamPatch::default() };
                h.ok(Command::UpdateStream { name: name(STREAMS[stream]), patch });
                m.paused[stream] = paused;
            }
            Op::Advance { .. } => unreachable!("handled above"),
        }
        for (&id, mj) in &m.jobs {
            let r = h.state.job(JobId(id)).unwrap();
            prop_assert_eq!((r.status, r.attempts), (mj.status, mj.attempts), "job {} at {}", id, m.now);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256), ..ProptestConfig::default() })]
    #[test]
    fn the_queue_agrees_with_the_reference_model(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops)?;
    }
}
