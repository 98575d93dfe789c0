//! What the peer needs from an executor: check a module, run a leased job.

use std::future::Future;

use impetus_proto::{ErrorRecord, LeaseGrant, ModuleHash};

use super::Runtime;

/// What one attempt produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    /// stdout on success, the error record on failure.
    pub result: Result<Vec<u8>, ErrorRecord>,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
}

pub trait JobRunner: Send + Sync + 'static {
    /// Check that `bytes` can run here (a WASI command whose imports are all
    /// provided) and cache it compiled. The error names the problem.
    /// Compiling takes a while: an implementation must not block the async
    /// runtime meanwhile (Raft heartbeats share it).
    fn prepare(&self, hash: ModuleHash, bytes: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send + 'static;
    fn is_prepared(&self, hash: &ModuleHash) -> bool;
    /// Run one leased job. Never panics: every failure is a `RunReport`.
    fn run(&self, grant: LeaseGrant) -> impl Future<Output = RunReport> + Send + 'static;
    /// Start one leased job now and hand its report to `done` when it ends.
    /// By default [`JobRunner::run`] is driven on the peer's runtime `rt`; a
    /// runner with threads of its own starts the job there at once and calls
    /// `done` from that thread (one hand-off less on the job's way back).
    fn start<R: Runtime>(&self, rt: &R, grant: LeaseGrant, done: impl FnOnce(RunReport) + Send + 'static) {
        let running = self.run(grant);
        rt.spawn(async move { done(running.await) });
    }
}
