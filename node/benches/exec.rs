//! Per-job overhead of the wasm executor: the cached `noop` example job.
//!
//! `cargo bench -p impetus-node --bench exec` (builds examples/jobs first if
//! its wasm/ is missing). Prints sequential latency (median, p99 over 20,000
//! runs), the same for runs spaced 5 ms apart as a paced 200 jobs/s spaces
//! them (the thread sleeps between runs and its caches go cold: on a 2-core
//! VM a spaced run took ~70 µs against ~10 µs back to back), and throughput
//! with 2 concurrent tasks on 2 worker threads.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use impetus_node::exec::{ExecConfig, Executor, RunSpec};
use impetus_proto::ModuleHash;

const SEQUENTIAL_RUNS: usize = 20_000;
const CONCURRENT_RUNS: usize = 40_000;
const TASKS: usize = 2;
/// Runs spaced as a paced 200 jobs/s spaces them: caches and pages go cold.
const PACED_RUNS: usize = 1_000;
const PACE: Duration = Duration::from_millis(5);

fn noop_bytes() -> Vec<u8> {
    let jobs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
    let path = jobs.join("wasm/noop.wasm");
    if !path.exists() {
        let status = std::process::Command::new("bash")
            .arg(jobs.join("build.sh"))
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .expect("run examples/jobs/build.sh");
        assert!(status.success(), "examples/jobs/build.sh failed");
    }
    std::fs::read(&path).expect("read noop.wasm")
}

async fn run_noop(exec: &Executor, module: ModuleHash) {
    let out = exec
        .run(RunSpec {
            module,
            args: &[],
            env: &[],
            input: &[],
            timeout_ms: 10_000,
            fuel: None,
            memory_limit_bytes: 64 << 20,
        })
        .await;
    if let Err(rec) = out.result {
        panic!("noop failed: {rec:?}");
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (seq_runs, conc_runs) = if quick { (200, 400) } else { (SEQUENTIAL_RUNS, CONCURRENT_RUNS) };

    let exec = Executor::new(ExecConfig::default()).expect("executor");
    let bytes = noop_bytes();
    let module = ModuleHash::of(&bytes);
    let compile = Instant::now();
    exec.prepare(module, &bytes).expect("prepare noop");
    let compile = compile.elapsed();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(TASKS).enable_all().build().expect("runtime");

    // Sequential: one task, one job at a time.
    let mut samples = rt.block_on(async {
        for _ in 0..seq_runs.min(1000) {
            run_noop(&exec, module).await; // warm up the pool's slots
        }
        let mut samples = Vec::with_capacity(seq_runs);
        for _ in 0..seq_runs {
            let t = Instant::now();
            run_noop(&exec, module).await;
            samples.push(t.elapsed());
        }
        samples
    });
    samples.sort_unstable();
    let paced = rt.block_on(async {
        let mut paced = Vec::with_capacity(PACED_RUNS);
        for _ in 0..if quick { 20 } else { PACED_RUNS } {
            tokio::time::sleep(PACE).await;
            let t = Instant::now();
            run_noop(&exec, module).await;
            paced.push(t.elapsed());
        }
        paced.sort_unstable();
        paced
    });
    let median = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;

    // Concurrent: TASKS tasks sharing the executor.
    let per_task = conc_runs / TASKS;
    let wall = rt.block_on(async {
        let t = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let exec = exec.clone();
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        run_noop(&exec, module).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("bench task");
        }
        t.elapsed()
    });
    let jobs_per_sec = (per_task * TASKS) as f64 / wall.as_secs_f64();

    println!(
        "wasm executor, cached noop module ({} bytes, compiled in {:.1} ms)",
        bytes.len(),
        compile.as_secs_f64() * 1e3
    );
    println!("| measure                              | value        |");
    println!("|--------------------------------------|--------------|");
    println!("| sequential runs                      | {seq_runs:>12} |");
    println!("| sequential median per job            | {:>9.1} µs |", micros(median));
    println!("| sequential mean per job              | {:>9.1} µs |", micros(mean));
    println!("| sequential p99 per job               | {:>9.1} µs |", micros(p99));
    println!("| paced runs, one per {:>3} ms           | {:>12} |", PACE.as_millis(), paced.len());
    println!("| paced median per job                 | {:>9.1} µs |", micros(paced[paced.len() / 2]));
    println!("| paced p99 per job                    | {:>9.1} µs |", micros(paced[paced.len() * 99 / 100]));
    println!("| concurrent runs ({TASKS} tasks, {TASKS} threads)  | {:>12} |", per_task * TASKS);
    println!("| concurrent throughput                | {:>7.0} jobs/s |", jobs_per_sec);
}
