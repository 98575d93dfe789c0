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
