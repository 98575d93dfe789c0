//! impetus-proto: the shared vocabulary of Impetus.
//!
//! Validated ids and names ([`ids`]), the records the state machine keeps
//! ([`records`]), its commands and outcomes ([`command`]), bounds
//! ([`limits`]) and the versioned wire encoding ([`wire`]). No I/O.
//!
//! Invariant at this boundary: a value of a type from this crate that came
//! out of [`wire::decode_command`] satisfies every rule of the vocabulary.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod api;
pub mod command;
pub mod error;
pub mod ids;
pub mod limits;
pub mod records;
pub mod wire;

pub use command::{
    ran_results, ApplyError, ApplyResult, Command, Completion, FailDisposition, Failure, LeaseError, LeaseGrant,
    NewJob, Outcome, Ran, RunLimits, Stamp, Submitted,
};
pub use error::{DecodeError, InvalidInput};
pub use ids::{FencingToken, IdempotencyKey, JobId, ModuleHash, PeerId, StreamName, Timestamp};
pub use records::{
    ErrorKind, ErrorRecord, JobRecord, JobSpec, JobStatus, Lease, PeerInfo, PeerRecord, PeerRole, Seat, StreamInfo,
    StreamPatch, StreamProps, StreamStats,
};
