//! `impetus-simulation`: run seeded whole-cluster simulations.
//!
//! `--seeds N` sweeps seeds 0..N (default 1000); `--seed N` runs one;
//! `--check-determinism` runs each seed twice and fails if the trace hashes
//! differ. A failure prints the seed, the checker, the last trace events and
//! the command that replays it.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use impetus_simulation::{run, Bug, Faults, Options, RunReport};

#[derive(Parser, Debug)]
#[command(name = "impetus-simulation", about = "Seeded whole-cluster simulation of Impetus")]
struct Args {
    /// Run this one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Sweep seeds `first-seed .. first-seed + N`.
    #[arg(long, default_value_t = 1000)]
    seeds: u64,
    /// First seed of a sweep.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Print the run's event-trace hash as the last line.
    #[arg(long)]
    trace_hash: bool,
    /// Faults: `all`, `none`, or a comma list (delay,drop,dup,reorder,partition,oneway,crash,clock,disk,trap,hang,slow,client,leave).
    #[arg(long, default_value = "all")]
    faults: String,
    /// Peers: the first founds the cluster, the others join as learners and are promoted up to 3 voters; each runs a worker loop.
    #[arg(long, default_value_t = 3)]
    peers: usize,
    /// Workers: peers whose Raft node is no member at first; they work through the leader until the membership manager makes them learners (0..=4).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Nemesis steps (each 100–700 virtual ms, one fault).
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// Jobs the client submits.
    #[arg(long, default_value_t = 50)]
    jobs: u32,
    /// Run every seed twice (with the scheduler trace) and fail if the trace hashes differ.
    #[arg(long)]
    check_determinism: bool,
    /// Print the last trace events of a passing run too (with --seed).
    #[arg(long)]
    verbose: bool,
    /// Log every trace event to stderr as it happens (with --seed); `RUST_LOG` adds other targets, e.g.
    /// `RUST_LOG=impetus_simulation::trace=info,impetus_node::peer::membership=info`.
    #[arg(long)]
    print_trace: bool,
    /// Tests of the checkers only: plant a bug (stale-token, ack-before-flush, forget-requeue).
    #[arg(long, hide = true, default_value = "none")]
    plant_bug: String,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<bool> {
    let args = Args::parse();
    if args.print_trace {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("impetus_simulation::trace=info")),
            )
            .without_time()
            .with_target(false)
            .with_level(false)
            .init();
    }
    let faults = Faults::parse(&args.faults).context("--faults")?;
    let Some(bug) = Bug::parse(&args.plant_bug) else { bail!("unknown bug {:?}", args.plant_bug) };
    if args.peers == 0 || args.peers > 7 {
        bail!("--peers must be 1..=7");
    }
    if args.workers > 4 {
        bail!("--workers must be 0..=4, not {}", args.workers);
    }
    let base = Options {
        seed: 0,
        peers: args.peers,
        workers: args.workers,
        steps: args.steps,
        jobs: args.jobs,
        faults,
        bug,
        scheduler_trace: args.check_determinism,
        print_trace: args.print_trace,
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.first_seed..args.first_seed + args.seeds).collect(),
    };
    let started = Instant::now();
    let mut last_hash = String::new();
    let mut failed = 0u64;
    let mut done_in_submit = 0u64;
    let mut worker_completions = 0u64;
    let (mut workers_learners, mut workers_voters) = (0u64, 0u64);
    let (mut leaves, mut leaves_failed, mut removals_learned) = (0u64, 0u64, 0u64);
    for (i, &seed) in seeds.iter().enumerate() {
        let opts = Options { seed, ..base.clone() };
        let report = run(opts.clone());
        done_in_submit += report.stats.done_in_submit;
        worker_completions += report.stats.worker_completions;
        workers_learners += report.stats.workers_learners;
        workers_voters += report.stats.workers_voters;
        leaves += report.stats.leaves;
        leaves_failed += report.stats.leaves_failed;
        removals_learned += report.stats.removals_learned;
        if let Some(f) = &report.failure {
            failed += 1;
            print_failure(&report, f.checker, &f.message);
            if args.seed.is_none() {
                break;
            }
        } else if args.check_determinism {
            let again = run(opts.clone());
            if again.trace_hash != report.trace_hash || again.failure.is_some() {
                failed += 1;
                let msg = format!(
                    "seed {seed} ran twice with different traces: {} then {}",
                    report.trace_hash, again.trace_hash
                );
                print_failure(&again, "determinism", &msg);
                break;
            }
        }
        if args.seed.is_some() {
            let s = &report.stats;
            println!(
                "seed {seed}: {} ({} virtual ms, {} events, {} writes ok, {} failed, {} crashes, {} leaves ({} failed), {} learned they were taken out, {} jobs done in their submit's entry, {} by workers; {} workers made learners, {} voters)",
                if report.failure.is_none() { "ok" } else { "FAILED" },
                s.virtual_ms,
                s.events,
                s.writes_ok,
                s.writes_failed,
                s.crashes,
                s.leaves,
                s.leaves_failed,
                s.removals_learned,
                s.done_in_submit,
                s.worker_completions,
                s.workers_learners,
                s.workers_voters
            );
            if args.verbose && report.failure.is_none() {
                for e in &report.last_events {
                    println!("  {e}");
                }
            }
        } else if (i + 1) % 50 == 0 {
            let secs = started.elapsed().as_secs_f64();
            println!("{} seeds ok ({:.1} seeds/s)", i + 1, (i + 1) as f64 / secs);
        }
        last_hash = report.trace_hash;
    }
    let secs = started.elapsed().as_secs_f64();
    if args.seed.is_none() && failed == 0 {
        println!(
            "all {} seeds passed in {:.1} s ({:.2} seeds/s){}; {done_in_submit} jobs were done in their submit's entry, {worker_completions} by workers; {workers_learners} workers were made learners, {workers_voters} voters; {leaves} peers left the cluster, {leaves_failed} leaves failed, {removals_learned} peers learned they were taken out",
            seeds.len(),
            secs,
            seeds.len() as f64 / secs,
            if args.check_determinism { ", each run twice with identical traces" } else { "" }
        );
    }
    if args.trace_hash {
        println!("{last_hash}");
    }
    Ok(failed == 0)
}

fn print_failure(report: &RunReport, checker: &str, message: &str) {
    let o = &report.options;
    println!("FAILED: seed {} — checker `{checker}`", o.seed);
    println!("  {message}");
    println!("  last {} trace events:", report.last_events.len());
    for e in &report.last_events {
        println!("    {e}");
    }
    println!("  replay: {}", o.replay_command());
}
