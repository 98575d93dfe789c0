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

/// The tracing target of the events along a write's path (the client
/// request read and answered, the job run, proposed, each Raft RPC sent and
/// answered, written, synced, applied, the worker's turn):
/// `RUST_LOG=impetus_latency=trace` shows where a write's time goes, and
/// `just bench cluster -- --breakdown` reads these messages (keep them as
/// they are; raft and the SDK spell the target out).
pub const LATENCY: &str = "impetus_latency";
