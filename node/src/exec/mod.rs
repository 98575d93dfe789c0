//! The wasm executor: runs jobs (WASI preview-1 command modules) in wasmtime.
//!
//! One [`Executor`] per peer holds one wasmtime `Engine` with the pooling
//! allocator, a cache of compiled modules (`InstancePre`, keyed by module
//! hash: compile once per peer) and a thread that ticks the engine's epoch
//! every [`EPOCH_TICK`]. A job gets a fresh store: argv `["job", args...]`, its
//! environment, stdin = its input, stdout and stderr captured and bounded, no
//! preopened directories and no network.
//!
//! Limits, and how a failed attempt is reported (never a crashed or hung peer):
//! - wall-clock timeout: the epoch callback yields to the async runtime at
//!   every tick from the second after the start, and a job yields after
//!   each [`YIELD_FUEL`] of fuel too (a spinning job cannot stall other
//!   tasks); the callback interrupts the job
//!   past its deadline; a job blocked in a host call (sleeping) is dropped at
//!   the deadline too. Optional fuel. Both: [`ErrorKind::Timeout`].
//! - memory: a per-job `StoreLimits` below the pool's per-instance maximum;
//!   a job that fails after a refused `memory.grow`: [`ErrorKind::OutOfMemory`].
//! - stdout past `max_output_bytes`: the write fails in the guest and the
//!   attempt fails with "output exceeded N bytes".
//! - a trap: [`ErrorKind::Trap`] with the top wasm frame; a non-zero exit:
//!   [`ErrorKind::Exit`] with the last line of stderr.
//!
//! [`Executor::run`] must be called inside a tokio runtime with the time
//! driver enabled; any number of tasks may call it at once: jobs beyond the
//! pool's `max_instances` wait for a slot.

mod capture;
mod wasm;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use impetus_proto::{limits, ErrorKind, ErrorRecord, ModuleHash};
use tokio::sync::Semaphore;
use wasmtime::{
    Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module, PoolingAllocationConfig,
    ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap, UpdateDeadline, WasmBacktrace,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{I32Exit, WasiCtxBuilder};

use self::capture::Capture;

/// How often the epoch ticker advances the engine's epoch: the granularity of
/// timeouts (a job is first checked at the second tick after its start, so
/// it is stopped 10–20 ms past a deadline under 10 ms) and of a job's
/// yields besides fuel's.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// A running job yields to the async runtime each time it has used this
/// much fuel (one per wasm operator: about 0.3–2 ms of plain code), as well
/// as on every epoch tick. This ends the first slice of a job run where it
/// is started before it moves to a job thread (`WasmRunner::start`); a
/// yield costs about a microsecond. It is no hard bound on a slice: bulk
/// memory operators and host calls cost one fuel each, however much they
/// do, and then only the second epoch tick (10–20 ms) ends the slice.
pub const YIELD_FUEL: u64 = 1_000_000;

/// The program name a job sees as `argv[0]`.
pub const ARGV0: &str = "job";

/// Bytes of each pool slot's linear memory and table kept resident (not
/// decommitted) between jobs: most jobs never touch more (DESIGN.md).
const KEEP_RESIDENT: usize = 256 << 10;

/// How long past its deadline a job blocked in a host call may take before
/// it is dropped (a job in wasm code is interrupted by the epoch callback).
const HOST_CALL_GRACE: Duration = Duration::from_millis(50);

/// Sizing of the executor.
#[derive(Clone, Debug)]
pub struct ExecConfig {
    /// Instances that can run at once (pool slots). Default 64.
    pub max_instances: u32,
    /// The largest linear memory of one instance. Default 512 MiB.
    pub max_memory_bytes: u64,
    /// The most stdout a job may write (its result). Default
    /// [`limits::MAX_RESULT_BYTES`].
    pub max_output_bytes: usize,
    /// The stderr tail kept per job. Default [`limits::MAX_TAIL_BYTES`].
    pub max_stderr_bytes: usize,
}

impl Default for ExecConfig {
    fn default() -> ExecConfig {
        ExecConfig {
            max_instances: 64,
            max_memory_bytes: 512 << 20,
            max_output_bytes: limits::MAX_RESULT_BYTES,
            max_stderr_bytes: limits::MAX_TAIL_BYTES,
        }
    }
}

/// Why the executor could not be built or a module could not be prepared.
#[derive(thiserror::Error, Debug)]
pub enum ExecError {
    #[error("not a WebAssembly module: {0}")]
    NotWasm(String),
    #[error("module of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("module bytes hash to {actual}, not to the expected {expected}")]
    HashMismatch { expected: ModuleHash, actual: ModuleHash },
    #[error(
        "the module exports no `_start` function: it is a reactor (or a library), not a WASI command; \
         build it as a binary (a `main`)"
    )]
    NotCommand,
    #[error("the module imports what this peer does not provide: {}", .0.join(", "))]
    MissingImports(Vec<String>),
    #[error("the module's initial memory of {initial} bytes exceeds this peer's per-instance maximum of {max} bytes")]
    MemoryTooLarge { initial: u64, max: u64 },
    #[error("module {0} is not prepared on this peer")]
    ModuleNotPrepared(ModuleHash),
    #[error("the module does not compile: {0}")]
    Compile(String),
    #[error("the module cannot be linked: {0}")]
    Link(String),
    #[error("invalid executor configuration: {0}")]
    InvalidConfig(String),
    #[error("wasm engine: {0}")]
    Engine(String),
}

/// One job to run.
#[derive(Clone, Copy, Debug)]
pub struct RunSpec<'a> {
    /// A module [`Executor::prepare`]d before.
    pub module: ModuleHash,
    /// Arguments after `argv[0]` (which is [`ARGV0`]).
    pub args: &'a [String],
    /// The job's whole environment.
    pub env: &'a [(String, String)],
    /// The job's stdin.
    pub input: &'a [u8],
    /// Wall-clock limit from the start of instantiation.
    pub timeout_ms: u64,
    /// Optional fuel (roughly: wasm instructions); running out is a timeout.
    pub fuel: Option<u64>,
    /// Linear memory limit of this job, capped at the pool's
    /// `max_memory_bytes`; 0 means the pool's maximum.
    pub memory_limit_bytes: u64,
}

/// What came of one job.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// Stdout on success (exit code 0), else the error record.
    pub result: Result<Vec<u8>, ErrorRecord>,
    /// The last bytes of stdout (at most [`limits::MAX_TAIL_BYTES`]).
    pub stdout_tail: Vec<u8>,
    /// The last bytes of stderr (at most `max_stderr_bytes`).
    pub stderr_tail: Vec<u8>,
    /// Time from instantiation to the end of the job.
    pub elapsed: Duration,
}

/// Runs jobs; cheap to clone, shareable across tasks and threads.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    linker: Linker<JobState>,
    modules: RwLock<HashMap<ModuleHash, InstancePre<JobState>>>,
    slots: Semaphore,
    cfg: ExecConfig,
}

impl fmt::Debug for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cached = self.inner.modules.read().map(|m| m.len()).unwrap_or_default();
        f.debug_struct("Executor")
            .field("cfg", &self.inner.cfg)
            .field("cached_modules", &cached)
            .field("free_slots", &self.inner.slots.available_permits())
            .finish_non_exhaustive()
    }
}

/// The data of one job's store.
struct JobState {
    wasi: WasiP1Ctx,
    limiter: JobLimiter,
}

/// `StoreLimits`, remembering whether it refused (or the pool failed) a
/// memory growth: a job that then fails ran out of memory.
struct JobLimiter {
    limits: StoreLimits,
    /// The size in bytes of the first refused memory growth.
    refused: Option<usize>,
}

impl ResourceLimiter for JobLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if !allowed {
            self.refused.get_or_insert(desired);
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        tracing::debug!(error = %error, "job memory growth failed");
        self.refused.get_or_insert(0);
        Ok(())
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl Executor {
    /// Builds the engine (pooling allocator sized by `cfg`), the WASI linker
    /// and the epoch ticker thread (which stops when the executor is dropped).
    pub fn new(cfg: ExecConfig) -> Result<Executor, ExecError> {
        if cfg.max_instances == 0 {
            return Err(ExecError::InvalidConfig("max_instances must be at least 1".into()));
        }
        if cfg.max_memory_bytes < 64 << 10 {
            return Err(ExecError::InvalidConfig("max_memory_bytes must be at least one wasm page (64 KiB)".into()));
        }
        let max_memory = usize::try_from(cfg.max_memory_bytes)
            .map_err(|_| ExecError::InvalidConfig("max_memory_bytes does not fit this machine".into()))?;

        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(cfg.max_instances)
            .total_memories(cfg.max_instances)
            .total_tables(cfg.max_instances)
            .total_stacks(cfg.max_instances)
            .max_memory_size(max_memory)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT);

        let mut config = Config::new();
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        config.epoch_interruption(true);
        config.consume_fuel(true);
        // The pool's max memory may not exceed the reservation (4 GiB by default).
        if cfg.max_memory_bytes > 4 << 30 {
            config.memory_reservation(cfg.max_memory_bytes);
        }
        let engine = Engine::new(&config).map_err(|e| ExecError::Engine(chain(&e)))?;

        let mut linker: Linker<JobState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut JobState| &mut s.wasi)
            .map_err(|e| ExecError::Engine(chain(&e)))?;

        let weak = engine.weak();
        std::thread::Builder::new()
            .name("impetus-wasm-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            })
            .map_err(|e| ExecError::Engine(format!("cannot start the epoch ticker thread: {e}")))?;

        let slots = Semaphore::new(cfg.max_instances as usize);
        tracing::info!(
            max_instances = cfg.max_instances,
            max_memory_bytes = cfg.max_memory_bytes,
            "wasm executor ready"
        );
        Ok(Executor { inner: Arc::new(Inner { engine, linker, modules: RwLock::new(HashMap::new()), slots, cfg }) })
    }

    /// Validates and compiles a module, once per hash. Refuses bytes that are
    /// not a core wasm module, a module without `_start` (a reactor), a module
    /// whose imports this peer cannot satisfy (naming every one of them), and
    /// one whose initial memory exceeds the pool's per-instance maximum.
    pub fn prepare(&self, hash: ModuleHash, bytes: &[u8]) -> Result<(), ExecError> {
        if self.is_cached(&hash) {
            return Ok(());
        }
        check_header(bytes)?;
        let actual = ModuleHash::of(bytes);
        if actual != hash {
            return Err(ExecError::HashMismatch { expected: hash, actual });
        }
        let inner = &self.inner;
        // Checked before compiling: the pooling allocator would refuse it
        // there with a message about its own configuration.
        if let Some(initial) = wasm::initial_memory_bytes(bytes) {
            if initial > inner.cfg.max_memory_bytes {
                return Err(ExecError::MemoryTooLarge { initial, max: inner.cfg.max_memory_bytes });
            }
        }
        let started = Instant::now();
        let module = Module::from_binary(&inner.engine, bytes).map_err(|e| ExecError::Compile(chain(&e)))?;

        match module.get_export("_start") {
            Some(ExternType::Func(ty)) if ty.params().next().is_none() && ty.results().next().is_none() => {}
            Some(ExternType::Func(_)) => {
                return Err(ExecError::Link("its `_start` export has parameters or results".into()));
            }
            _ => return Err(ExecError::NotCommand),
        }

        let required = module.resources_required();
        if let Some(initial) = required.max_initial_memory_size {
            if initial > inner.cfg.max_memory_bytes {
                return Err(ExecError::MemoryTooLarge { initial, max: inner.cfg.max_memory_bytes });
            }
        }

        // `instantiate_pre` names only the first missing import: name them all.
        let mut probe = Store::new(&inner.engine, JobState::probe());
        let missing: Vec<String> = module
            .imports()
            .filter(|import| inner.linker.get_by_import(&mut probe, import).is_none())
            .map(|import| format!("{}.{}", import.module(), import.name()))
            .collect();
        if !missing.is_empty() {
            return Err(ExecError::MissingImports(missing));
        }

        let pre = inner.linker.instantiate_pre(&module).map_err(|e| ExecError::Link(chain(&e)))?;
        inner.modules.write().unwrap_or_else(|p| p.into_inner()).insert(hash, pre);
        tracing::info!(module = %hash, bytes = bytes.len(), compile_ms = started.elapsed().as_millis() as u64, "module prepared");
        Ok(())
    }

    /// Whether `hash` has been prepared (compiled) on this peer.
    pub fn is_cached(&self, hash: &ModuleHash) -> bool {
        self.inner.modules.read().unwrap_or_else(|p| p.into_inner()).contains_key(hash)
    }

    /// Runs one job to completion, failure or timeout. Never panics on
    /// anything the job does.
    pub async fn run(&self, job: RunSpec<'_>) -> RunOutcome {
        let inner = &self.inner;
        let pre = inner.modules.read().unwrap_or_else(|p| p.into_inner()).get(&job.module).cloned();
        let Some(pre) = pre else {
            return RunOutcome::failed(ErrorRecord::new(
                ErrorKind::Module,
                ExecError::ModuleNotPrepared(job.module).to_string(),
            ));
        };
        let Ok(_slot) = inner.slots.acquire().await else {
            return RunOutcome::failed(ErrorRecord::new(ErrorKind::Other, "the executor is shut down"));
        };

        let started = Instant::now();
        let stdout = Capture::head(inner.cfg.max_output_bytes);
        let stderr = Capture::tail(inner.cfg.max_stderr_bytes);
        let memory_limit = match job.memory_limit_bytes {
            0 => inner.cfg.max_memory_bytes,
            n => n.min(inner.cfg.max_memory_bytes),
        };
        let wasi = WasiCtxBuilder::new()
            .arg(ARGV0)
            .args(job.args)
            .envs(job.env)
            .stdin(MemoryInputPipe::new(job.input.to_vec()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .build_p1();
        let limiter = JobLimiter {
            limits: StoreLimitsBuilder::new()
                .memory_size(usize::try_from(memory_limit).unwrap_or(usize::MAX))
                .instances(1)
                .build(),
            refused: None,
        };
        let mut store = Store::new(&inner.engine, JobState { wasi, limiter });
        store.limiter(|s| &mut s.limiter);
        if let Err(e) = store.set_fuel(job.fuel.unwrap_or(u64::MAX)) {
            return RunOutcome::failed(ErrorRecord::new(ErrorKind::Other, format!("cannot set fuel: {}", chain(&e))));
        }
        if let Err(e) = store.fuel_async_yield_interval(Some(YIELD_FUEL)) {
            return RunOutcome::failed(ErrorRecord::new(
                ErrorKind::Other,
                format!("cannot set the yield interval: {}", chain(&e)),
            ));
        }
        let timeout = Duration::from_millis(job.timeout_ms);
        let deadline = started + timeout;
        // The first check at the second tick, not the next one (which may
        // come at once): a short job is not cut in two by a tick, so it
        // ends in its first slice (`WasmRunner::start`); fuel yields bound
        // a spinning job meanwhile.
        store.set_epoch_deadline(2);
        store.epoch_deadline_callback(move |_| {
            Ok(if Instant::now() >= deadline { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
        });

        let run = async {
            let instance = pre.instantiate_async(&mut store).await.map_err(Failure::Instantiate)?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start").map_err(Failure::Instantiate)?;
            start.call_async(&mut store, ()).await.map_err(Failure::Call)
        };
        let ended = match tokio::time::timeout(timeout + HOST_CALL_GRACE, run).await {
            Ok(r) => r,
            Err(_elapsed) => Err(Failure::Deadline),
        };
        let elapsed = started.elapsed();
        let refused = store.data().limiter.refused;
        drop(store);

        let stdout_tail = stdout.last(limits::MAX_TAIL_BYTES);
        let stderr_tail = stderr.contents();
        let result = classify(ended, &Context { job: &job, memory_limit, refused, stdout: &stdout, stderr: &stderr });
        match &result {
            Ok(out) => tracing::debug!(module = %job.module, ?elapsed, stdout_bytes = out.len(), "job succeeded"),
            Err(rec) => {
                tracing::debug!(module = %job.module, ?elapsed, kind = ?rec.kind, error = %rec.error, "job failed")
            }
        }
        RunOutcome { result, stdout_tail, stderr_tail, elapsed }
    }
}

impl JobState {
    /// A store state for checking imports, never run.
    fn probe() -> JobState {
        JobState {
            wasi: WasiCtxBuilder::new().build_p1(),
            limiter: JobLimiter { limits: StoreLimitsBuilder::new().build(), refused: None },
        }
    }
}

impl RunOutcome {
    fn failed(record: ErrorRecord) -> RunOutcome {
        RunOutcome {
            result: Err(record.bounded()),
            stdout_tail: Vec::new(),
            stderr_tail: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }
}

/// How a job's run ended, if not with `_start` returning.
enum Failure {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
    /// Still blocked in a host call past the deadline.
    Deadline,
}

struct Context<'a> {
    job: &'a RunSpec<'a>,
    memory_limit: u64,
    refused: Option<usize>,
    stdout: &'a Capture,
    stderr: &'a Capture,
}

impl Context<'_> {
    fn timeout(&self) -> ErrorRecord {
        ErrorRecord::new(ErrorKind::Timeout, format!("job exceeded its {} ms timeout", self.job.timeout_ms))
    }

    fn out_of_memory(&self, then: &str) -> ErrorRecord {
        let grow = match self.refused {
            Some(bytes) if bytes > 0 => format!(" (memory.grow to {bytes} bytes was refused)"),
            _ => String::new(),
        };
        ErrorRecord::new(
            ErrorKind::OutOfMemory,
            format!("job exceeded its memory limit of {} bytes{grow}; {then}", self.memory_limit),
        )
    }

    fn last_stderr_line(&self) -> Option<String> {
        let tail = self.stderr.contents();
        let text = String::from_utf8_lossy(&tail);
        text.lines().rev().map(str::trim).find(|l| !l.is_empty()).map(str::to_owned)
    }
}

fn classify(ended: Result<(), Failure>, cx: &Context<'_>) -> Result<Vec<u8>, ErrorRecord> {
    let record = match ended {
        Ok(()) => None,
        Err(Failure::Deadline) => Some(cx.timeout()),
        Err(Failure::Instantiate(e)) => Some(if cx.refused.is_some() {
            cx.out_of_memory("the module could not be instantiated")
        } else {
            ErrorRecord::new(ErrorKind::Module, format!("cannot instantiate the module: {}", chain(&e)))
        }),
        Err(Failure::Call(e)) => call_error(&e, cx),
    };
    // Output past the cap fails the attempt whatever the job did next.
    if cx.stdout.overflowed() {
        let mut rec = ErrorRecord::new(ErrorKind::Other, format!("output exceeded {} bytes", cx.stdout.cap()));
        if let Some(other) = record {
            rec.error = format!("{}; then: {}", rec.error, other.error);
        }
        return Err(rec.bounded());
    }
    match record {
        None => Ok(cx.stdout.contents()),
        Some(rec) => Err(rec.bounded()),
    }
}

/// An error from `_start`: an exit, a trap, a timeout, or something else.
fn call_error(e: &wasmtime::Error, cx: &Context<'_>) -> Option<ErrorRecord> {
    if let Some(exit) = e.downcast_ref::<I32Exit>() {
        if exit.0 == 0 {
            return None;
        }
        if cx.refused.is_some() {
            return Some(cx.out_of_memory(&format!("the job then exited with code {}", exit.0)));
        }
        let error = cx.last_stderr_line().unwrap_or_else(|| format!("exited with code {}", exit.0));
        return Some(ErrorRecord::new(ErrorKind::Exit(exit.0), error));
    }
    if let Some(trap) = e.downcast_ref::<Trap>() {
        match trap {
            Trap::Interrupt => return Some(cx.timeout()),
            Trap::OutOfFuel => {
                return Some(ErrorRecord::new(
                    ErrorKind::Timeout,
                    format!("job ran out of fuel ({} units)", cx.job.fuel.unwrap_or(u64::MAX)),
                ));
            }
            _ => {}
        }
        let mut rec = if cx.refused.is_some() {
            cx.out_of_memory(&format!("the job then trapped: {trap}"))
        } else {
            ErrorRecord::new(ErrorKind::Trap, trap.to_string())
        };
        if let Some(frame) = e.downcast_ref::<WasmBacktrace>().and_then(|bt| bt.frames().first()) {
            let module = frame.module().name().unwrap_or("job");
            let func = match frame.func_name() {
                Some(name) => wasm::demangle(name),
                None => format!("<wasm function {}>", frame.func_index()),
            };
            let offset = frame.module_offset().map(|o| format!(" @ {o:#x}")).unwrap_or_default();
            rec.statement = Some(format!("{module}!{func}{offset}"));
            if let Some(symbol) = frame.symbols().first() {
                rec.line = symbol.line();
            }
            rec.name = func;
        }
        return Some(rec);
    }
    if cx.refused.is_some() {
        return Some(cx.out_of_memory(&format!("the job then failed: {}", chain(e))));
    }
    tracing::warn!(module = %cx.job.module, error = %chain(e), "job failed with an unexpected error");
    Some(ErrorRecord::new(ErrorKind::Other, chain(e)))
}

/// Refuses what is not a core wasm module before handing it to the compiler.
fn check_header(bytes: &[u8]) -> Result<(), ExecError> {
    if bytes.len() > limits::MAX_MODULE_BYTES {
        return Err(ExecError::TooLarge { len: bytes.len(), max: limits::MAX_MODULE_BYTES });
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(ExecError::NotWasm("it does not start with the wasm magic bytes \\0asm".into()));
    }
    match bytes[4..8] {
        [1, 0, 0, 0] => Ok(()),
        [_, _, 1, 0] => Err(ExecError::NotWasm(
            "it is a WebAssembly component, not a core module: only WASI preview-1 commands run here".into(),
        )),
        _ => Err(ExecError::NotWasm(format!("unsupported wasm binary version {:?}", &bytes[4..8]))),
    }
}

/// An error with its causes, on one line.
fn chain(e: &wasmtime::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&cause.to_string());
    }
    out
}
