//! What the peer needs from an executor: check a module, run a leased job.

use std::future::Future;

use impetus_proto::{ErrorRecord, JobSpec, LeaseGrant, ModuleHash, NewJob, RunLimits, StreamProps};

use super::Runtime;

/// What one attempt of a job runs: its module and spec under its stream's
/// limits. Nothing else reaches the guest (no job id, no token), so two
/// equal attempts are interchangeable runs: a run made for one is a valid
/// run of the other (what lets the leader start a job before its lease is
/// granted, [`super::Peer::fuse`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub module: ModuleHash,
    pub spec: JobSpec,
    pub limits: RunLimits,
    /// The lease's TTL between renewals (not the guest's business; the
    /// simulator's slow jobs outlast it on purpose).
    pub lease_ttl_ms: u64,
}

impl Attempt {
    /// The attempt a lease grants.
    pub fn of(g: &LeaseGrant) -> Attempt {
        Attempt { module: g.module, spec: g.spec.clone(), limits: RunLimits::of(g), lease_ttl_ms: g.lease_ttl_ms }
    }

    /// The attempt a lease of `job`, submitted to a stream with `props`,
    /// would grant (as the state machine's `grant` builds it).
    pub fn of_new(job: &NewJob, props: &StreamProps) -> Attempt {
        Attempt {
            module: job.module,
            spec: job.spec.clone(),
            limits: RunLimits::of_props(props),
            lease_ttl_ms: props.lease_ttl_ms,
        }
    }
}

/// What one attempt produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    /// stdout on success, the error record on failure.
    pub result: Result<Vec<u8>, ErrorRecord>,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
}

/// `done`, called exactly once: if the run drops it unreported (the job's
/// task panicked, or the job threads stopped), with a failure that says
/// so. Without it such a job stayed leased, its lease renewed for ever with
/// nothing running.
pub(crate) fn reported_once(
    module: ModuleHash,
    done: impl FnOnce(RunReport) + Send + 'static,
) -> impl FnOnce(RunReport) + Send + 'static {
    struct Guard<F: FnOnce(RunReport)>(ModuleHash, Option<F>);
    impl<F: FnOnce(RunReport)> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(done) = self.1.take() {
                tracing::error!(module = %self.0, "a run ended without a report (it panicked, or the job threads stopped); reporting it as failed");
                let why = "the run ended without a report: the executor panicked or stopped";
                done(RunReport {
                    result: Err(ErrorRecord::new(impetus_proto::ErrorKind::Other, why)),
                    stdout_tail: vec![],
                    stderr_tail: vec![],
                });
            }
        }
    }
    let mut guard = Guard(module, Some(done));
    move |report| {
        if let Some(done) = guard.1.take() {
            done(report);
        }
    }
}

pub trait JobRunner: Send + Sync + 'static {
    /// Check that `bytes` can run here (a WASI command whose imports are all
    /// provided) and cache it compiled. The error names the problem.
    /// Compiling takes a while: an implementation must not block the async
    /// runtime meanwhile (Raft heartbeats share it).
    fn prepare(&self, hash: ModuleHash, bytes: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send + 'static;
    fn is_prepared(&self, hash: &ModuleHash) -> bool;
    /// Run one attempt. Never panics: every failure is a `RunReport`.
    fn run(&self, attempt: Attempt) -> impl Future<Output = RunReport> + Send + 'static;
    /// Start one attempt now and hand its report to `done` when it ends.
    /// By default [`JobRunner::run`] is driven on the peer's runtime `rt`; a
    /// runner with threads of its own starts the job there at once and calls
    /// `done` from that thread (one hand-off less on the job's way back). A
    /// runner may also run a short job to its end inside `start` and call
    /// `done` before returning: a caller must not hold, across `start`,
    /// anything `done` takes.
    fn start<R: Runtime>(&self, rt: &R, attempt: Attempt, done: impl FnOnce(RunReport) + Send + 'static) {
        let running = self.run(attempt);
        rt.spawn(async move { done(running.await) });
    }
    /// This peer was granted `n` leases (for metrics; nothing by default).
    fn leased(&self, n: usize) {
        let _ = n;
    }
}
