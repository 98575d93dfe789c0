//! `just bench queue`: apply throughput of submit → lease → complete on one
//! core, and the memory held by one million queued jobs with 16-byte inputs.
//! Prints a table; targets: ≥ 500,000 commands/s, < 300 MB for 1M jobs.
#![allow(unsafe_code)] // the counting allocator below
#![allow(clippy::print_stdout)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use impetus_proto::*;
use impetus_queue::State;

/// Counts live heap bytes so the bench can report what the state holds.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Relaxed);
        LIVE.fetch_sub(l.size(), Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MODULE: &[u8] = b"\0asm\x01\0\0\0";

struct Driver {
    state: State,
    index: u64,
    now: u64,
}

impl Driver {
    fn new(stream_props: StreamProps) -> Driver {
        let mut d = Driver { state: State::new(), index: 0, now: 1_000 };
        d.apply(&Command::PutModule { hash: ModuleHash::of(MODULE), bytes: MODULE.to_vec() });
        d.apply(&Command::CreateStream { name: StreamName::new("s").expect("valid"), props: stream_props });
        d.apply(&Command::RegisterPeer { info: PeerInfo::default(), role: PeerRole::Worker });
        d
    }

    fn apply(&mut self, cmd: &Command) -> Outcome {
        self.index += 1;
        self.now += 1;
        match self.state.apply(Stamp { index: self.index, now: Timestamp(self.now / 1000) }, cmd) {
            Ok(o) => o,
            Err(e) => panic!("bench command refused: {e}"),
        }
    }
}

fn new_job(i: u64) -> NewJob {
    let mut input = i.to_le_bytes().to_vec();
    input.resize(16, 0);
    NewJob {
        module: ModuleHash::of(MODULE),
        spec: JobSpec { args: vec![], env: vec![], input },
        priority: None,
        delay_ms: 0,
        key: None,
    }
}

/// submit → lease → complete, `batch` jobs per command. Returns (commands/s, jobs/s).
fn throughput(jobs: u64, batch: u64, backlog: u64) -> (f64, f64) {
    let props = StreamProps { mpps: u32::MAX, lease_ttl_ms: u64::MAX / 4, ..StreamProps::default() };
    let mut d = Driver::new(props);
    let stream = StreamName::new("s").expect("valid");
    let peer = PeerId(1);
    // A standing backlog makes the queue realistic (O(log n) per operation).
    for chunk in 0..backlog / 1000 {
        d.apply(&Command::Submit {
            stream: stream.clone(),
            jobs: (0..1000).map(|i| new_job(chunk * 1000 + i)).collect(),
        });
    }
    // Prepare the commands outside the timed loop.
    let submits: Vec<Command> = (0..jobs / batch)
        .map(|c| Command::Submit { stream: stream.clone(), jobs: (0..batch).map(|i| new_job(c * batch + i)).collect() })
        .collect();
    let lease = Command::Lease { peer, streams: vec![], max: batch as u32 };
    let mut commands = 0u64;
    let start = Instant::now();
    for submit in &submits {
        d.apply(submit);
        let Outcome::Leased(grants) = d.apply(&lease) else { panic!("lease") };
        let completions = grants
            .iter()
            .map(|g| Completion { job: g.job, token: g.token, result: b"1".to_vec(), stderr_tail: vec![] })
            .collect();
        d.apply(&Command::Complete { peer, completions });
        commands += 3;
    }
    let secs = start.elapsed().as_secs_f64();
    (commands as f64 / secs, jobs as f64 / secs)
}

/// Resident set size of this process, from /proc (Linux); 0 elsewhere.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kb.unwrap_or(0) * 1024
}

/// What a snapshot of a state costs.
struct SnapshotCosts {
    /// `State::freeze`: a peer holds the state's read lock this long.
    freeze_ms: f64,
    /// Encoding the frozen copy, after the lock is let go.
    encode_ms: f64,
    bytes: usize,
    restore_ms: f64,
}

fn snapshot_costs(state: &State) -> SnapshotCosts {
    let ms = |start: Instant| start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let frozen = state.freeze();
    let freeze_ms = ms(start);
    let start = Instant::now();
    let bytes = frozen.snapshot();
    let encode_ms = ms(start);
    drop(frozen);
    assert_eq!(bytes, state.snapshot(), "a frozen copy encodes as the state does");
    let start = Instant::now();
    let restored = State::restore(&bytes).expect("a snapshot restores");
    let restore_ms = ms(start);
    assert_eq!(restored.snapshot().len(), bytes.len());
    SnapshotCosts { freeze_ms, encode_ms, bytes: bytes.len(), restore_ms }
}

fn memory_for(jobs: u64) -> (usize, u64, f64, SnapshotCosts) {
    let before = LIVE.load(Relaxed);
    let rss_before = rss_bytes();
    let mut d = Driver::new(StreamProps::default());
    let stream = StreamName::new("s").expect("valid");
    let start = Instant::now();
    for chunk in 0..jobs / 1000 {
        d.apply(&Command::Submit {
            stream: stream.clone(),
            jobs: (0..1000).map(|i| new_job(chunk * 1000 + i)).collect(),
        });
    }
    let secs = start.elapsed().as_secs_f64();
    let held = LIVE.load(Relaxed) - before;
    let rss = rss_bytes().saturating_sub(rss_before);
    assert_eq!(d.state.stream_stats(&stream).map(|s| s.queued), Some(jobs));
    let snapshot = snapshot_costs(&d.state);
    drop(d);
    (held, rss, jobs as f64 / secs, snapshot)
}

/// `jobs` jobs finished and forgotten past their stream's retention behind
/// one old job that stays (queued in a stream that keeps its jobs): what
/// the state still holds for them (heap bytes), and its snapshot's size.
fn forgotten_behind_an_old_job(jobs: u64) -> (usize, usize) {
    let mut d = Driver::new(StreamProps { retain_ms: Some(1), ..StreamProps::default() });
    let kept = StreamName::new("kept").expect("valid");
    d.apply(&Command::CreateStream {
        name: kept.clone(),
        props: StreamProps { retain_ms: None, ..StreamProps::default() },
    });
    d.apply(&Command::Submit { stream: kept, jobs: vec![new_job(0)] });
    let before = LIVE.load(Relaxed);
    let stream = StreamName::new("s").expect("valid");
    for chunk in 0..jobs / 1000 {
        let Outcome::Submitted(subs) = d.apply(&Command::Submit {
            stream: stream.clone(),
            jobs: (0..1000).map(|i| new_job(chunk * 1000 + i)).collect(),
        }) else {
            panic!("submit")
        };
        d.apply(&Command::Batch(subs.iter().map(|s| Command::Cancel { job: s.job }).collect()));
    }
    d.now += 10_000_000; // past the retention
    for _ in 0..jobs / impetus_queue::FORGET_PER_COMMAND as u64 + 2 {
        d.apply(&Command::Tick);
    }
    assert_eq!(d.state.stream_stats(&stream).map(|s| s.cancelled), Some(0), "all forgotten");
    (LIVE.load(Relaxed).saturating_sub(before), d.state.snapshot().len())
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not used here.
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 20_000 } else { 200_000 };
    println!("impetus-queue apply benchmark (one core, release build)");
    println!("{:<48} {:>14} {:>14}", "scenario", "commands/s", "jobs/s");
    for (batch, backlog) in [(1, 0), (1, 100_000), (64, 0), (64, 100_000)] {
        let (cps, jps) = throughput(n, batch, if quick { backlog / 10 } else { backlog });
        let label = format!("submit→lease→complete, batch {batch}, backlog {backlog}");
        println!("{label:<48} {cps:>14.0} {jps:>14.0}");
    }
    let jobs = if quick { 100_000 } else { 1_000_000 };
    let (bytes, rss, rate, snap) = memory_for(jobs);
    println!();
    println!("{:<48} {:>14}", "memory", "value");
    println!("{:<48} {:>11.1} MB", format!("{jobs} queued jobs, 16-byte inputs"), bytes as f64 / 1e6);
    println!("{:<48} {:>11.1} MB", "growth of the process's RSS (malloc overhead incl.)", rss as f64 / 1e6);
    println!("{:<48} {:>14.0}", "bytes per queued job (heap)", bytes as f64 / jobs as f64);
    println!("{:<48} {:>14.0}", "submit rate while filling (jobs/s, batch 1000)", rate);
    println!();
    println!("{:<48} {:>14}", format!("snapshot of those {jobs} jobs"), "value");
    println!("{:<48} {:>11.1} MB", "encoded size", snap.bytes as f64 / 1e6);
    println!("{:<48} {:>11.2} ms", "freeze (a peer holds the read lock this long)", snap.freeze_ms);
    println!("{:<48} {:>11.0} ms", "encode the frozen copy (outside the lock)", snap.encode_ms);
    println!("{:<48} {:>11.0} ms", "restore (decode, index, verify)", snap.restore_ms);
    let (held, snap_bytes) = forgotten_behind_an_old_job(jobs);
    println!();
    println!("{:<48} {:>14}", format!("{jobs} jobs forgotten behind one old job"), "value");
    println!("{:<48} {:>11} B", "heap the state still holds for them", held);
    println!("{:<48} {:>11} B", "snapshot of the state", snap_bytes);
}
