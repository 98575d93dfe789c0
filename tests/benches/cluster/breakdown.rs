//! `--breakdown`: where a paced job's time goes, from the peers'
//! `impetus_latency` trace events (the peers run with
//! `RUST_LOG=warn,impetus_latency=trace`; one machine, so one clock).
//!
//! A job run early on the leader and written with its submit (a fused job:
//! every paced job while the leader has a free slot) is followed by its
//! log index: the leader's events from reading the client's request to
//! writing the answer, and those of the follower whose reply came first
//! (the one that made the quorum with the leader, or with the other
//! follower). Events with no index are matched by order: a job whose events
//! another request or write interleaved (a second request read before its
//! run started, a worker's turn) is left out, or may be.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

/// The milestones of one fused job (run on the leader, written with its
/// submit), in the order a job usually meets them; `f:` marks the
/// follower's.
pub const MILESTONES: [&str; 17] = [
    "client request read",
    "early run starts",
    "job starts",
    "job ends",
    "write proposed",
    "log batch written",
    "raft rpc sending",
    "f: raft rpc received",
    "f: log batch written",
    "f: raft log synced",
    "f: raft reply sent",
    "raft reply received",
    "raft log synced",
    "apply starts",
    "applied",
    "write applied",
    "client answer written",
];

/// Microseconds since midnight (UTC) of a log line that starts with an
/// RFC 3339 time (`2026-11-27T23:29:44.477254Z ...`).
fn micros(line: &str) -> Option<u64> {
    let t = line.get(11..26)?;
    let (h, rest) = t.split_once(':')?;
    let (m, s) = rest.split_once(':')?;
    let (s, frac) = s.split_once('.')?;
    let whole = h.parse::<u64>().ok()? * 3600 + m.parse::<u64>().ok()? * 60 + s.parse::<u64>().ok()?;
    Some(whole * 1_000_000 + frac.parse::<u64>().ok()?)
}

/// The number after `key=` in `line` (`last=631`, `last_index=Some(631)`).
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let digits: String = line[at..].trim_start_matches("Some(").chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Microseconds in a day.
const DAY_US: i64 = 86_400_000_000;

type Events = BTreeMap<u64, BTreeMap<&'static str, u64>>;

fn set(events: &mut Events, index: u64, name: &'static str, t: u64) {
    events.entry(index).or_default().entry(name).or_insert(t);
}

/// Each log index's first time at each milestone in one peer's log. Events
/// that carry no index belong to the index the peer writes next (the job's
/// run), applies next, or answered last; a sync, to every write up to the
/// last index it covers.
fn read(log: &str, follower: bool) -> Events {
    let mut events = Events::new();
    let (mut request, mut apply_start, mut answered) = (None, None, None);
    // Indexes written and not yet covered by a sync, oldest first.
    let mut unsynced: Vec<u64> = Vec::new();
    // Two requests read within a millisecond before a run starts: which one
    // it serves is unknown, so neither time is taken. (An older read was a
    // request that started no run: a status, a worker's turn.)
    let mut ambiguous = false;
    let mut pending: Vec<(&'static str, u64)> = Vec::new();
    for line in log.lines() {
        let Some((_, msg)) = line.split_once("impetus_latency: ") else { continue };
        let Some(t) = micros(line) else { continue };
        let name = MILESTONES
            .iter()
            .copied()
            .find(|m| m.starts_with("f: ") == follower && msg.starts_with(m.trim_start_matches("f: ")));
        match name {
            None => {}
            Some("client request read") => {
                ambiguous |= request.is_some_and(|r: u64| t.saturating_sub(r) < 1_000);
                request = Some(t);
            }
            Some("early run starts") => {
                pending.clear();
                pending.extend(request.take().filter(|_| !ambiguous).map(|r| ("client request read", r)));
                ambiguous = false;
                pending.push(("early run starts", t));
            }
            Some(n @ ("job starts" | "job ends" | "write proposed")) => pending.push((n, t)),
            Some(n @ ("log batch written" | "f: log batch written")) => {
                if let Some(i) = field(msg, "last_index") {
                    for (m, u) in pending.drain(..) {
                        set(&mut events, i, m, u);
                    }
                    set(&mut events, i, n, t);
                    unsynced.push(i);
                }
            }
            // A sync covers the writes up to its `last_index`; one written
            // while it ran waits for the next.
            Some(n @ ("raft log synced" | "f: raft log synced")) => {
                if let Some(last) = field(msg, "last_index") {
                    let covered = unsynced.iter().take_while(|&&i| i <= last).count();
                    for i in unsynced.drain(..covered) {
                        set(&mut events, i, n, t);
                    }
                }
            }
            Some("apply starts") => apply_start = Some(t),
            Some("applied") => {
                if let Some(i) = field(msg, "index") {
                    if let Some(s) = apply_start.take() {
                        set(&mut events, i, "apply starts", s);
                    }
                    set(&mut events, i, "applied", t);
                }
            }
            Some("write applied") => {
                if let Some(i) = field(msg, "index") {
                    set(&mut events, i, "write applied", t);
                    answered = Some(i);
                }
            }
            Some("client answer written") => {
                if let Some(i) = answered.take() {
                    set(&mut events, i, "client answer written", t);
                }
            }
            Some(n) => {
                if let Some(i) = field(msg, "last").filter(|&i| i > 0) {
                    set(&mut events, i, n, t);
                }
            }
        }
    }
    events
}

/// Per milestone: how many jobs, and the p50/p90/p99/max of its time since
/// the leader read the request (µs). Jobs are those the leader answered.
pub fn breakdown(dir: &Path, leader: &str, followers: &[&str]) -> Result<Vec<(&'static str, usize, [i64; 4])>> {
    let lead = read(&std::fs::read_to_string(dir.join(format!("{leader}.log")))?, false);
    let mut others = Vec::new();
    for f in followers {
        others.push(read(&std::fs::read_to_string(dir.join(format!("{f}.log")))?, true));
    }
    let mut offsets: BTreeMap<&'static str, Vec<i64>> = BTreeMap::new();
    for (index, ev) in &lead {
        let (Some(&t0), Some(_)) = (ev.get("client request read"), ev.get("client answer written")) else { continue };
        // The follower that replied first.
        let first = others
            .iter()
            .filter_map(|o| o.get(index))
            .filter(|e| e.contains_key("f: raft reply sent"))
            .min_by_key(|e| e["f: raft reply sent"]);
        for (name, t) in ev.iter().chain(first.into_iter().flatten()) {
            // Times are of the day: a job across midnight wraps.
            let mut offset = *t as i64 - t0 as i64;
            if offset < -DAY_US / 2 {
                offset += DAY_US;
            }
            offsets.entry(name).or_default().push(offset);
        }
    }
    let mut rows = Vec::new();
    for name in MILESTONES {
        let Some(v) = offsets.get_mut(name) else { continue };
        v.sort_unstable();
        let p = |q| super::percentile(v, q);
        rows.push((name, v.len(), [p(0.5), p(0.9), p(0.99), p(1.0)]));
    }
    Ok(rows)
}
