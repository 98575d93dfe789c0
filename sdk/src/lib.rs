//! impetus-sdk: the light client applications embed, and the CLI uses.
//!
//! [`Client`] connects to one peer of a cluster over libp2p (TCP, optional
//! pnet pre-shared key, noise, yamux) and speaks the client protocol of
//! [`impetus_proto::api`] with it: streams, modules, submit, wait, jobs,
//! the data store, cluster status. [`transport`] holds the frames, the codec
//! and the transport, [`stream`] the long-lived request streams; both are
//! shared with the peer's server so both ends run the same code.
//!
//! The SDK holds no Raft state: it never links openraft, sled or wasmtime.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod client;
pub mod stream;
pub mod transport;

pub use client::{CasOutcome, Client, ClientError, CONNECT_TIMEOUT, MAX_IN_FLIGHT, WAIT_UNANSWERED};
pub use impetus_proto::api::{ClientRequest, ClientResponse, ClusterStatus, ServiceError};
pub use transport::{DEFAULT_PORT, REQUEST_TIMEOUT};
