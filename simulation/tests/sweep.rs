//! A small sweep of seeded simulations with every fault passes, and runs are
//! deterministic: the same seed twice gives the same event-trace hash.

use impetus_simulation::{run, Faults, Options, RunReport};

/// Short runs: the debug build runs about one per second.
fn short(seed: u64) -> Options {
    Options { seed, jobs: 20, steps: 10, ..Options::default() }
}

/// Run `seeds` on two threads (each run is single-threaded and independent).
fn run_all(seeds: Vec<Options>) -> Vec<RunReport> {
    let (a, b): (Vec<_>, Vec<_>) = seeds.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    std::thread::scope(|s| {
        let ha = s.spawn(|| a.into_iter().map(|(_, o)| run(o)).collect::<Vec<_>>());
        let hb = s.spawn(|| b.into_iter().map(|(_, o)| run(o)).collect::<Vec<_>>());
        let mut all = ha.join().expect("thread");
        all.extend(hb.join().expect("thread"));
        all
    })
}

fn explain(r: &RunReport) -> String {
    let f = r.failure.as_ref().map(|f| format!("{}: {}", f.checker, f.message)).unwrap_or_default();
    format!("{f}\n{}\nreplay: {}", r.last_events.join("\n"), r.options.replay_command())
}

#[test]
fn a_sweep_with_every_fault_passes() {
    let reports = run_all((100..116).map(short).collect());
    for r in &reports {
        assert!(r.failure.is_none(), "seed {} failed: {}", r.options.seed, explain(r));
        assert!(r.stats.writes_ok > 0);
    }
    // The faults really happened somewhere in the sweep.
    assert!(reports.iter().map(|r| r.stats.crashes).sum::<u64>() > 0, "no crash in the sweep");
    assert!(reports.iter().map(|r| r.stats.writes_failed).sum::<u64>() > 0, "no failed write in the sweep");
}

#[test]
fn a_run_without_faults_passes() {
    let r = run(Options { faults: Faults::none(), ..short(7) });
    assert!(r.failure.is_none(), "{}", explain(&r));
    assert_eq!(r.stats.crashes, 0);
}

#[test]
fn the_same_seed_gives_the_same_trace_hash() {
    let opts: Vec<Options> = [3, 11, 42].map(|s| Options { scheduler_trace: true, ..short(s) }).into();
    let twice: Vec<Options> = opts.iter().chain(opts.iter()).cloned().collect();
    let reports = run_all(twice);
    let by_seed = |seed: u64| -> Vec<&str> {
        reports.iter().filter(|r| r.options.seed == seed).map(|r| r.trace_hash.as_str()).collect()
    };
    for o in &opts {
        let hashes = by_seed(o.seed);
        assert_eq!(hashes.len(), 2);
        assert_eq!(hashes[0], hashes[1], "seed {} is not deterministic", o.seed);
    }
    assert_ne!(by_seed(3)[0], by_seed(11)[0], "different seeds should give different traces");
}

/// Regression: a single voter with learners (the founder before its joiners
/// are promoted) crashed and lost log entries it had not flushed but had
/// already sent to a learner. openraft restored its leadership in the same
/// term, it wrote different entries under the same log ids, and the learner,
/// taking them for the entries it had, diverged. Fixed by turning openraft's
/// leader restore off (`impetus_raft::raft_config`): a restarted leader is
/// elected again, in a new term. (Seed 55 found it; since voters grow from
/// one to three in one change its course differs and it crashes no peer, so
/// seed 56, which crashes the founder, runs in its place. Neither replays
/// the original interleaving: the nemesis starts once the cluster formed.)
#[test]
fn a_restarted_leader_never_reuses_its_term_regression_seeds() {
    let crash_disk = Faults::parse("crash,disk").expect("valid faults");
    let reports = run_all(vec![
        Options { seed: 10, faults: crash_disk, ..Options::default() },
        // Every fault there was when it was found (`leave` came later).
        Options {
            seed: 56,
            faults: Faults::parse("delay,drop,dup,reorder,partition,oneway,crash,clock,disk,trap,hang,slow,client")
                .expect("valid faults"),
            ..Options::default()
        },
    ]);
    for r in &reports {
        assert!(r.failure.is_none(), "seed {} failed: {}", r.options.seed, explain(r));
        assert!(r.stats.crashes > 0, "seed {}: the regression needs its crashes", r.options.seed);
    }
}
