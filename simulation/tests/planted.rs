//! The checkers find planted bugs: each bug is reported within a bounded
//! number of seeds, and the same seed passes with no bug planted.

use impetus_simulation::{run, Bug, Options, RunReport};

/// Seeds searched per bug.
const MAX_SEEDS: u64 = 200;

fn opts(seed: u64, bug: Bug) -> Options {
    Options { seed, bug, ..Options::default() }
}

/// The first seed in 0..MAX_SEEDS whose run fails, searched on two threads
/// (each run is single-threaded and independent).
fn first_failure(bug: Bug) -> Option<RunReport> {
    let mut next = 0;
    while next < MAX_SEEDS {
        let (a, b) = (next, next + 1);
        let (ra, rb) = std::thread::scope(|s| {
            let ha = s.spawn(move || run(opts(a, bug)));
            let hb = s.spawn(move || run(opts(b, bug)));
            (ha.join().expect("thread"), hb.join().expect("thread"))
        });
        for r in [ra, rb] {
            if r.failure.is_some() {
                return Some(r);
            }
        }
        next += 2;
    }
    None
}

fn check(bug: Bug, checkers: &[&str]) {
    let report = first_failure(bug).unwrap_or_else(|| panic!("{bug:?} not found in {MAX_SEEDS} seeds"));
    let f = report.failure.as_ref().expect("a failure");
    let seed = report.options.seed;
    eprintln!("{bug:?}: seed {seed}, checker {}: {}", f.checker, f.message);
    assert!(checkers.contains(&f.checker), "{bug:?} at seed {seed} reported by {}: {}", f.checker, f.message);
    let clean = run(opts(seed, Bug::None));
    assert!(clean.failure.is_none(), "seed {seed} fails without a planted bug too: {:?}", clean.failure);
}

#[test]
fn a_stale_fencing_token_accepted_is_caught() {
    check(Bug::StaleToken, &["lease-audit", "double-result", "invariant", "result"]);
}

#[test]
fn a_forgotten_expired_lease_is_caught() {
    check(Bug::ForgetRequeue, &["invariant", "liveness"]);
}

#[test]
fn an_append_acknowledged_before_its_flush_is_caught() {
    check(
        Bug::AckBeforeFlush,
        &["acked-lost", "divergence", "liveness", "panic", "invariant", "log-audit", "double-result"],
    );
}
