//! What the peer needs from an executor: check a module, run a leased job.

use std::future::Future;

use impetus_proto::{ErrorRecord, LeaseGrant, ModuleHash};

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
    /// The job may start at the call, before the future is first polled.
    fn run(&self, grant: LeaseGrant) -> impl Future<Output = RunReport> + Send + 'static;
}
