//! The wasm executor against the example jobs of examples/jobs (built on
//! first use by examples/jobs/build.sh) and hand-written modules.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use impetus_node::exec::{ExecConfig, ExecError, Executor, RunOutcome, RunSpec};
use impetus_proto::{limits, ErrorKind, ModuleHash};

const SECOND: u64 = 1000;

fn jobs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs")
}

/// The bytes of `examples/jobs/wasm/<name>.wasm`, building the examples once if missing.
fn job_bytes(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<()> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    let path = jobs_dir().join("wasm").join(format!("{name}.wasm"));
    if !path.exists() {
        let _guard = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
        BUILT.get_or_init(|| {
            if path.exists() {
                return;
            }
            let status = std::process::Command::new("bash")
                .arg(jobs_dir().join("build.sh"))
                // The host workspace's target dir must not leak into the wasm build.
                .env_remove("CARGO_TARGET_DIR")
                .status()
                .expect("run examples/jobs/build.sh");
            assert!(status.success(), "examples/jobs/build.sh failed: {status}");
        });
    }
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// One executor shared by the tests (as one peer runs every job).
fn executor() -> &'static Executor {
    static EXEC: OnceLock<Executor> = OnceLock::new();
    EXEC.get_or_init(|| Executor::new(ExecConfig::default()).expect("executor"))
}

fn prepare(exec: &Executor, name: &str) -> ModuleHash {
    let bytes = job_bytes(name);
    let hash = ModuleHash::of(&bytes);
    exec.prepare(hash, &bytes).unwrap_or_else(|e| panic!("prepare {name}: {e}"));
    assert!(exec.is_cached(&hash));
    hash
}

struct Job {
    module: ModuleHash,
    args: Vec<String>,
    env: Vec<(String, String)>,
    input: Vec<u8>,
    timeout_ms: u64,
    fuel: Option<u64>,
    memory_limit_bytes: u64,
}

impl Job {
    fn new(module: ModuleHash) -> Job {
        Job {
            module,
            args: Vec::new(),
            env: Vec::new(),
            input: Vec::new(),
            timeout_ms: 10 * SECOND,
            fuel: None,
            memory_limit_bytes: 64 << 20,
        }
    }

    fn args(mut self, args: &[&str]) -> Job {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    async fn run(&self, exec: &Executor) -> RunOutcome {
        exec.run(RunSpec {
            module: self.module,
            args: &self.args,
            env: &self.env,
            input: &self.input,
            timeout_ms: self.timeout_ms,
            fuel: self.fuel,
            memory_limit_bytes: self.memory_limit_bytes,
        })
        .await
    }
}

fn stdout_text(out: &RunOutcome) -> String {
    match &out.result {
        Ok(stdout) => String::from_utf8_lossy(stdout).into_owned(),
        Err(rec) => panic!("job failed: {rec:?}; stderr: {}", String::from_utf8_lossy(&out.stderr_tail)),
    }
}

fn error_of(out: &RunOutcome) -> &impetus_proto::ErrorRecord {
    match &out.result {
        Ok(stdout) => panic!("job succeeded unexpectedly with {} bytes of stdout", stdout.len()),
        Err(rec) => rec,
    }
}

#[tokio::test]
async fn square_of_7_is_49() {
    let exec = executor();
    let square = prepare(exec, "square");
    let mut job = Job::new(square);
    job.input = b"7\n".to_vec();
    assert_eq!(stdout_text(&job.run(exec).await), "49\n");
    let out = Job::new(square).args(&["-12"]).run(exec).await;
    assert_eq!(stdout_text(&out), "144\n");
}

#[tokio::test]
async fn bad_input_is_exit_2_with_the_message() {
    let exec = executor();
    let mut job = Job::new(prepare(exec, "square"));
    job.input = b"seven".to_vec();
    let out = job.run(exec).await;
    let rec = error_of(&out);
    assert_eq!(rec.kind, ErrorKind::Exit(2));
    assert!(rec.error.contains("\"seven\" is not an integer"), "{rec:?}");
    assert!(String::from_utf8_lossy(&out.stderr_tail).contains("seven"));
}

#[tokio::test]
async fn args_and_env_reach_the_module() {
    let exec = executor();
    let mut job = Job::new(prepare(exec, "env")).args(&["one", "two words"]);
    job.env = vec![("GREETING".into(), "hello".into()), ("EMPTY".into(), String::new())];
    let text = stdout_text(&job.run(exec).await);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, ["arg: job", "arg: one", "arg: two words", "env: GREETING=hello", "env: EMPTY="]);
}

#[tokio::test]
async fn a_trap_is_a_trap_record_with_its_frame() {
    let exec = executor();
    let out = Job::new(prepare(exec, "trap")).run(exec).await;
    let rec = error_of(&out);
    assert_eq!(rec.kind, ErrorKind::Trap);
    assert!(rec.error.contains("unreachable"), "{rec:?}");
    let statement = rec.statement.as_deref().expect("the top wasm frame");
    assert!(statement.contains("fail_here"), "{rec:?}");
    assert!(rec.name.contains("fail_here"), "{rec:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr_tail), "about to trap\n");
}

#[tokio::test]
async fn an_endless_loop_times_out() {
    let exec = executor();
    let mut job = Job::new(prepare(exec, "spin"));
    job.timeout_ms = 200;
    let t = Instant::now();
    let out = job.run(exec).await;
    let took = t.elapsed();
    let rec = error_of(&out);
    assert_eq!(rec.kind, ErrorKind::Timeout);
    assert_eq!(rec.error, "job exceeded its 200 ms timeout");
    assert!(took >= Duration::from_millis(200), "stopped early: {took:?}");
    assert!(took < Duration::from_secs(2), "stopped late: {took:?}");
}

#[tokio::test]
async fn a_job_sleeping_past_its_timeout_is_stopped() {
    let exec = executor();
    let mut job = Job::new(prepare(exec, "sleep")).args(&["60000"]);
    job.timeout_ms = 200;
    let t = Instant::now();
    let out = job.run(exec).await;
    assert_eq!(error_of(&out).kind, ErrorKind::Timeout);
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());

    let out = Job::new(job.module).args(&["20"]).run(exec).await;
    assert_eq!(stdout_text(&out), "slept 20\n");
}

#[tokio::test]
async fn running_out_of_fuel_is_a_timeout() {
    let exec = executor();
    let mut job = Job::new(prepare(exec, "spin"));
    job.fuel = Some(1_000_000);
    let t = Instant::now();
    let out = job.run(exec).await;
    let rec = error_of(&out);
    assert_eq!(rec.kind, ErrorKind::Timeout);
    assert!(rec.error.contains("fuel"), "{rec:?}");
    assert!(t.elapsed() < Duration::from_secs(5));

    // Enough fuel: square completes.
    let mut job = Job::new(prepare(exec, "square")).args(&["3"]);
    job.fuel = Some(10_000_000);
    assert_eq!(stdout_text(&job.run(exec).await), "9\n");
}

/// A spinning job yields to the runtime: on a single-threaded runtime,
/// another job still runs (and finishes) long before the spinner's deadline.
#[tokio::test(flavor = "current_thread")]
async fn a_spinning_job_does_not_block_other_tasks() {
    let exec = executor().clone();
    let spin = prepare(&exec, "spin");
    let square = prepare(&exec, "square");
    let spinner = {
        let exec = exec.clone();
        tokio::spawn(async move {
            let mut job = Job::new(spin);
            job.timeout_ms = 3 * SECOND;
            let out = job.run(&exec).await;
            (Instant::now(), out)
        })
    };
    // Let the spinner start first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let out = Job::new(square).args(&["5"]).run(&exec).await;
    let square_done = Instant::now();
    assert_eq!(stdout_text(&out), "25\n");
    let (spin_done, spin_out) = spinner.await.expect("spinner task");
    assert_eq!(error_of(&spin_out).kind, ErrorKind::Timeout);
    assert!(
        spin_done.duration_since(square_done) > Duration::from_secs(1),
        "square finished only when the spinner stopped"
    );
}

#[tokio::test]
async fn a_memory_hog_runs_out_of_memory() {
    let exec = executor();
    let mut job = Job::new(prepare(exec, "memhog"));
    job.memory_limit_bytes = 64 << 20;
    let out = job.run(exec).await;
    let rec = error_of(&out);
    assert_eq!(rec.kind, ErrorKind::OutOfMemory, "{rec:?}");
    assert!(rec.error.contains("memory limit of 67108864 bytes"), "{rec:?}");
    // The guest's allocator reported the failure before aborting.
    assert!(String::from_utf8_lossy(&out.stderr_tail).contains("memory allocation"), "{out:?}");
}

#[tokio::test]
async fn a_non_zero_exit_is_an_exit_record() {
    let exec = executor();
    let out = Job::new(prepare(exec, "exit")).run(exec).await;
    let rec = error_of(&out);
    assert_eq!(rec.kind, ErrorKind::Exit(3));
    assert_eq!(rec.error, "exiting with 3");
    let out = Job::new(prepare(exec, "exit")).args(&["0"]).run(exec).await;
    assert_eq!(stdout_text(&out), "");
}

#[tokio::test]
async fn output_over_the_cap_fails_clearly() {
    let exec = executor();
    let bigout = prepare(exec, "bigout");
    let out = Job::new(bigout).run(exec).await;
    let rec = error_of(&out);
    assert_eq!(rec.error.split(';').next(), Some(&*format!("output exceeded {} bytes", limits::MAX_RESULT_BYTES)));
    assert!(out.stdout_tail.len() <= limits::MAX_TAIL_BYTES);

    // Exactly the cap is fine.
    let cap = limits::MAX_RESULT_BYTES.to_string();
    let out = Job::new(bigout).args(&[&cap]).run(exec).await;
    let stdout = out.result.expect("exactly the cap");
    assert_eq!(stdout.len(), limits::MAX_RESULT_BYTES);
    assert!(stdout.iter().all(|b| *b == b'x'));
}

// ---- refused at prepare ----

/// A wasm binary from sections (id, contents).
fn module(sections: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = b"\0asm\x01\0\0\0".to_vec();
    for (id, body) in sections {
        out.push(*id);
        leb(&mut out, body.len() as u32);
        out.extend_from_slice(body);
    }
    out
}

fn leb(out: &mut Vec<u8>, mut n: u32) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn name(out: &mut Vec<u8>, s: &str) {
    leb(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

/// Type section with one `() -> ()` type.
fn unit_type() -> (u8, Vec<u8>) {
    (1, vec![1, 0x60, 0, 0])
}

/// Exports of functions by (name, index).
fn exports(funcs: &[(&str, u32)], memory: Option<&str>) -> (u8, Vec<u8>) {
    let mut b = Vec::new();
    leb(&mut b, (funcs.len() + usize::from(memory.is_some())) as u32);
    for (n, idx) in funcs {
        name(&mut b, n);
        b.push(0);
        leb(&mut b, *idx);
    }
    if let Some(n) = memory {
        name(&mut b, n);
        b.push(2);
        b.push(0);
    }
    (7, b)
}

/// One function of type 0 and its empty body.
fn one_empty_function() -> [(u8, Vec<u8>); 2] {
    [(3, vec![1, 0]), (10, vec![1, 2, 0, 0x0b])]
}

fn memory_section(min_pages: u32) -> (u8, Vec<u8>) {
    let mut b = vec![1, 0];
    leb(&mut b, min_pages);
    (5, b)
}

fn refuse(bytes: &[u8]) -> ExecError {
    let exec = executor();
    let hash = ModuleHash::of(bytes);
    let err = exec.prepare(hash, bytes).expect_err("module refused");
    assert!(!exec.is_cached(&hash));
    err
}

#[test]
fn hand_written_command_is_accepted() {
    let [f, c] = one_empty_function();
    let bytes = module(&[unit_type(), f, memory_section(1), exports(&[("_start", 0)], Some("memory")), c]);
    let hash = ModuleHash::of(&bytes);
    executor().prepare(hash, &bytes).expect("a minimal command");
    assert!(executor().is_cached(&hash));
}

#[test]
fn not_wasm_is_refused() {
    let err = refuse(b"#!/bin/sh\necho hello\n");
    assert!(matches!(err, ExecError::NotWasm(_)), "{err:?}");
    assert!(err.to_string().contains("not a WebAssembly module"), "{err}");
    let err = refuse(b"\0asm\x0d\0\x01\0");
    assert!(err.to_string().contains("component"), "{err}");
    let err = refuse(b"\0asm\x01\0\0\0\x01\xff");
    assert!(matches!(err, ExecError::Compile(_)), "{err:?}");
}

#[test]
fn a_reactor_is_not_a_command() {
    let [f, c] = one_empty_function();
    let bytes = module(&[unit_type(), f, memory_section(1), exports(&[("_initialize", 0)], Some("memory")), c]);
    let err = refuse(&bytes);
    assert!(matches!(err, ExecError::NotCommand), "{err:?}");
    assert!(err.to_string().contains("reactor"), "{err}");
}

#[test]
fn every_missing_import_is_named() {
    let mut imports = Vec::new();
    leb(&mut imports, 3);
    for (m, n) in [("env", "foo"), ("wasi_snapshot_preview1", "fd_write"), ("env", "bar")] {
        name(&mut imports, m);
        name(&mut imports, n);
        imports.extend_from_slice(&[0, 0]);
    }
    // fd_write has the wrong type here but exists: only env.foo and env.bar are missing.
    let bytes = module(&[
        unit_type(),
        (2, imports),
        (3, vec![1, 0]),
        exports(&[("_start", 3)], None),
        (10, vec![1, 2, 0, 0x0b]),
    ]);
    let err = refuse(&bytes);
    match &err {
        ExecError::MissingImports(names) => assert_eq!(names, &["env.foo", "env.bar"]),
        other => panic!("expected MissingImports, got {other:?}"),
    }
    assert!(err.to_string().contains("env.foo, env.bar"), "{err}");
}

#[test]
fn initial_memory_over_the_pool_max_is_refused() {
    let [f, c] = one_empty_function();
    // 16384 pages = 1 GiB, over the default 512 MiB per instance.
    let bytes = module(&[unit_type(), f, memory_section(16384), exports(&[("_start", 0)], Some("memory")), c]);
    let err = refuse(&bytes);
    assert!(matches!(err, ExecError::MemoryTooLarge { initial: 1073741824, max: 536870912 }), "{err:?}");
    assert!(err.to_string().contains("exceeds this peer's per-instance maximum"), "{err}");
}

#[test]
fn bytes_must_match_their_hash() {
    let bytes = job_bytes("noop");
    let err = executor().prepare(ModuleHash::of(b"something else"), &bytes).expect_err("mismatch");
    assert!(matches!(err, ExecError::HashMismatch { .. }), "{err:?}");
}

#[tokio::test]
async fn an_unprepared_module_fails_the_attempt() {
    let out = Job::new(ModuleHash::of(b"never prepared")).run(executor()).await;
    let rec = error_of(&out);
    assert_eq!(rec.kind, ErrorKind::Module);
    assert!(rec.error.contains("not prepared"), "{rec:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_noops_all_succeed() {
    let exec = executor().clone();
    let noop = prepare(&exec, "noop");
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let exec = exec.clone();
            tokio::spawn(async move { Job::new(noop).run(&exec).await })
        })
        .collect();
    for task in tasks {
        let out = task.await.expect("task");
        assert_eq!(out.result.as_deref().map_err(|r| r.clone()), Ok(&b""[..]));
    }
}

/// Its own small executor: every failure above, then a correct run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_survives_every_failure() {
    let exec = Executor::new(ExecConfig { max_instances: 4, max_memory_bytes: 128 << 20, ..ExecConfig::default() })
        .expect("executor");
    let square = prepare(&exec, "square");
    let failing: Vec<(&str, Vec<&str>, ErrorKind)> = vec![
        ("trap", vec![], ErrorKind::Trap),
        ("spin", vec![], ErrorKind::Timeout),
        ("memhog", vec![], ErrorKind::OutOfMemory),
        ("exit", vec!["7"], ErrorKind::Exit(7)),
        ("bigout", vec![], ErrorKind::Other),
        ("sleep", vec!["60000"], ErrorKind::Timeout),
    ];
    let mut tasks = Vec::new();
    for round in 0..3 {
        for (name, args, kind) in &failing {
            let mut job = Job::new(prepare(&exec, name)).args(args);
            // The memory hog must reach its limit, not the clock: touching
            // up to 128 MiB can take longer than 300 ms on a loaded machine.
            job.timeout_ms = if *name == "memhog" { 10_000 } else { 300 };
            job.memory_limit_bytes = if round == 2 { 0 } else { 32 << 20 };
            let exec = exec.clone();
            let kind = kind.clone();
            tasks.push(tokio::spawn(async move {
                let out = job.run(&exec).await;
                (kind, out)
            }));
        }
    }
    for task in tasks {
        let (kind, out) = task.await.expect("task");
        assert_eq!(error_of(&out).kind, kind, "{:?}", out.result);
    }
    assert!(exec.prepare(ModuleHash::of(b"junk"), b"junk").is_err(), "junk is refused, the executor goes on");
    let out = Job::new(square).args(&["11"]).run(&exec).await;
    assert_eq!(stdout_text(&out), "121\n");
}

/// The peer's runner: a lone job (no other runs on the peer) of a module
/// known to be quick runs where it is started, so it has reported before
/// `start` returns (no hand-off to a job thread and back). A module not yet
/// seen, a job that waits, a job beside a running one, and a job started
/// right after such a run (they take at most a tenth of the caller's
/// thread) run on the job threads; a long one runs there, side by side
/// with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_quick_job_runs_where_it_is_started_and_others_on_the_job_threads() {
    use impetus_node::peer::{Attempt, JobRunner, RunReport};
    use impetus_node::rt::TokioRuntime;
    use impetus_node::serve::{JobThreads, WasmRunner};
    use impetus_proto::{ErrorRecord, JobSpec, RunLimits};
    use std::sync::mpsc::{channel, Receiver, Sender};

    type Reported = (Option<String>, RunReport);
    let exec = executor().clone();
    let (noop, sleep, spin) = (prepare(&exec, "noop"), prepare(&exec, "sleep"), prepare(&exec, "spin"));
    let threads = JobThreads::new().expect("job threads");
    // A debug build runs even a no-op job slower than the production 1 ms.
    let quick = Duration::from_millis(500);
    let start = |runner: &WasmRunner, module, args: &[&str], job_timeout_ms| -> Receiver<Reported> {
        let (tx, rx): (Sender<Reported>, _) = channel();
        let spec = JobSpec { args: args.iter().map(|a| a.to_string()).collect(), ..JobSpec::default() };
        let attempt = Attempt {
            module,
            spec,
            limits: RunLimits { job_timeout_ms, fuel: None, memory_limit_bytes: 64 << 20 },
            lease_ttl_ms: 10_000,
        };
        runner.start(&TokioRuntime, attempt, move |r: RunReport| {
            let _ = tx.send((std::thread::current().name().map(str::to_owned), r));
        });
        rx
    };
    // Whether the report came from a job thread, and the result.
    let ran = |rx: Receiver<Reported>| -> (bool, Result<Vec<u8>, ErrorRecord>) {
        let (thread, r) = rx.recv_timeout(Duration::from_secs(10)).expect("the job reported");
        (thread.as_deref() == Some("impetus-job"), r.result)
    };

    // No spacing: what decides is the module and whether another job runs.
    let runner = WasmRunner::new(exec.clone(), None, &threads).with_inline(quick, 0);
    let (on_job_thread, result) = ran(start(&runner, noop, &[], 10 * SECOND));
    assert!(result.is_ok(), "{result:?}");
    assert!(on_job_thread, "a module not yet seen runs on a job thread");
    // A loaded machine may pause a slice past two epoch ticks (the job then
    // goes on on a job thread): a few tries.
    let inline = (0..5).any(|_| {
        let rx = start(&runner, noop, &[], 10 * SECOND);
        match rx.try_recv() {
            Ok((thread, r)) => {
                assert!(r.result.is_ok(), "{:?}", r.result);
                thread.as_deref() != Some("impetus-job")
            }
            Err(_) => {
                let (_, result) = ran(rx);
                assert!(result.is_ok(), "{result:?}");
                false
            }
        }
    });
    assert!(inline, "a lone job of a quick module reported when start returned, where it was started");

    let (_, result) = ran(start(&runner, sleep, &["0"], 10 * SECOND));
    assert!(result.is_ok(), "{result:?}");
    let sleeper = start(&runner, sleep, &["30"], 10 * SECOND);
    assert!(sleeper.try_recv().is_err(), "a job that waits has not reported when start returns");
    let (on_job_thread, result) = ran(sleeper);
    assert_eq!(String::from_utf8_lossy(&result.expect("it slept")).trim(), "slept 30");
    assert!(on_job_thread, "a quick module's job that waits goes on on a job thread");

    let spinner = start(&runner, spin, &[], SECOND);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (on_job_thread, result) = ran(start(&runner, noop, &[], 10 * SECOND));
    assert!(result.is_ok(), "{result:?}");
    assert!(on_job_thread, "beside a running job, a new one runs on a job thread");
    assert!(spinner.try_recv().is_err(), "the no-op job did not wait for the spinner");
    let (on_job_thread, result) = ran(spinner);
    assert_eq!(result.expect_err("the spinner times out").kind, ErrorKind::Timeout);
    assert!(on_job_thread, "the spinner ran on a job thread");

    // Spacing: after a slice run where it was started (here, spaced for
    // ever after), the next lone job goes to the job threads.
    let spaced = WasmRunner::new(exec, None, &threads).with_inline(quick, u32::MAX);
    for _ in 0..2 {
        let (_, result) = ran(start(&spaced, noop, &[], 10 * SECOND));
        assert!(result.is_ok(), "{result:?}");
    }
    let (on_job_thread, result) = ran(start(&spaced, noop, &[], 10 * SECOND));
    assert!(result.is_ok(), "{result:?}");
    assert!(on_job_thread, "right after a slice run where it was started, a job goes to the job threads");
}
