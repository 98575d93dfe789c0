//! impetus-node: the peer and the `impetus` binary. See ARCHITECTURE.md.
#[cfg(feature = "net")]
pub mod cluster;
#[cfg(feature = "wasm")]
pub mod exec;
#[cfg(feature = "net")]
pub mod metrics;
#[cfg(feature = "net")]
pub mod net;
pub mod peer;
pub mod raft_consensus;
pub mod rt;
#[cfg(all(feature = "wasm", feature = "net", feature = "sled"))]
pub mod serve;

/// The tracing target of the events along a write's path (proposed, each
/// Raft RPC sent and answered, synced, applied, the job run, the worker's
/// turn): `RUST_LOG=impetus_latency=trace` shows where a write's time goes.
pub const LATENCY: &str = "impetus_latency";
