//! The only way the peer logic reaches time, tasks and host facts.
//!
//! Production plugs in [`crate::rt::TokioRuntime`]; the simulator plugs in a
//! runtime of its own with a virtual clock, so the same peer code runs under
//! one seed. Nothing in `peer/` spawns tokio tasks or reads tokio timers directly.

use std::future::Future;
use std::time::Duration;

use impetus_proto::Timestamp;

pub trait Runtime: Clone + Send + Sync + 'static {
    /// Wall-clock time, used to stamp commands (the state machine never reads a clock).
    fn now(&self) -> Timestamp;
    /// Time since a fixed point of this process that never steps (a
    /// monotonic clock), for intervals this peer measures alone: when to
    /// renew a lease. The wall clock may be set back or forward at any time.
    fn monotonic(&self) -> Duration;
    /// Resolve after `d`.
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send + 'static;
    /// Run `fut` concurrently.
    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static);
    /// This process's resident memory, for heartbeats (0 if unknown).
    fn rss_bytes(&self) -> u64;
}
