//! impetus-queue: the replicated state machine of Impetus.
//!
//! [`State::apply`] takes a command stamped with its Raft log index and the
//! leader's time and returns an outcome. It is pure: no clock, no randomness,
//! no I/O, and no iteration order but by key (`BTreeMap`, `imbl::OrdMap`). So every voter
//! that applies the same log holds the same state, byte for byte
//! ([`State::snapshot`]).
//!
//! Invariants (checked by [`State::check_invariants`], which tests and the
//! simulator call after every apply):
//! - every job is in exactly one place: the ready queue (Queued), the delay
//!   index (Delayed), the lease index (Leased/Running) or, final, the
//!   forget index if its stream retains jobs for a while, else none;
//! - a job is Leased or Running if and only if it has a lease, and that lease
//!   expires after `now`;
//! - per-stream counters equal the counts of jobs by status;
//! - every Succeeded job has a result, every Dead job an error record;
//! - every job's stream and module exist; ids are below their counters.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod invariants;
mod machine;
pub use machine::{grant_bytes, FORGET_PER_COMMAND, LEASE_GRANT_BYTES};
mod query;
mod state;
#[cfg(test)]
mod tests;

use impetus_proto::wire;
use impetus_proto::{DecodeError, Timestamp};

use state::{Data, Index};

/// The whole replicated state. Cheap to query; mutated only by [`State::apply`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    data: Data,
    index: Index,
    /// Simulator only: a deliberately planted bug (never in a snapshot). See [`PlantedBug`].
    planted: PlantedBug,
}

/// Simulator only: a bug the deterministic simulator plants on purpose to
/// prove its checkers find it (`simulation/tests/planted.rs`). A runtime
/// switch, not a cargo feature, so no normal build can turn it on by feature
/// unification; it is `None` unless [`State::plant_bug`] is called, and it is
/// not part of the snapshot.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PlantedBug {
    #[default]
    None,
    /// `check_lease` accepts a completion/renewal/failure with a stale fencing token.
    AcceptStaleToken,
    /// An expired lease is ended but its job is never requeued.
    ForgetExpiredRequeue,
}

/// Filter for [`State::jobs`].
#[derive(Clone, Debug, Default)]
pub struct JobFilter<'a> {
    pub stream: Option<&'a impetus_proto::StreamName>,
    pub status: Option<impetus_proto::JobStatus>,
    /// Only jobs with a larger id (for paging).
    pub after: Option<impetus_proto::JobId>,
    pub limit: usize,
    /// Stop before the records' approximate encoded size passes this many
    /// bytes (but return at least one job); `None`: no bound. What a client
    /// asks for is bounded by [`LIST_JOBS_BYTES`].
    pub max_bytes: Option<usize>,
}

/// The byte budget of one page of jobs listed for a client: half a
/// message, so the records are not all copied (under the state's read
/// lock) only for the answer to be refused as too large.
pub const LIST_JOBS_BYTES: usize = impetus_proto::limits::MAX_MESSAGE_BYTES / 2;

impl State {
    pub fn new() -> State {
        State::default()
    }

    /// Simulator only: plant a bug (see [`PlantedBug`]).
    #[doc(hidden)]
    pub fn plant_bug(&mut self, bug: PlantedBug) {
        self.planted = bug;
    }

    /// The log index of the last command applied (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.data.applied_index
    }

    /// The state machine's time: the latest `now` any command carried.
    pub fn now(&self) -> Timestamp {
        self.data.now
    }

    /// The earliest time at which the state changes by itself (a delayed job
    /// becomes ready, a lease expires, a finished job is forgotten): when
    /// the leader should send a `Tick` if nothing else happens. `None` when
    /// nothing is waiting; a time already past when more finished jobs are
    /// due than one command forgets ([`FORGET_PER_COMMAND`]).
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let d = self.index.delayed.first().map(|&(t, _)| t);
        let e = self.index.expiries.first().map(|&(t, _)| t);
        let f = self.index.forget.first().map(|&(t, _)| t);
        d.into_iter().chain(e).chain(f).min()
    }

    /// The state as versioned, deterministic bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        wire::encode(wire::SNAPSHOT_VERSION, &self.data)
    }

    /// What [`State::snapshot`] would encode now, copied cheaply: the jobs,
    /// keys, data stores and modules are shared, copy on write, so the copy
    /// costs O(streams and peers, and jobs / 1024). A replica takes it under
    /// its lock and encodes it outside, so a snapshot of a large state no
    /// longer stops every apply and read while it is encoded.
    pub fn freeze(&self) -> Frozen {
        Frozen(self.data.durable_copy())
    }

    /// Rebuild a state from [`State::snapshot`] bytes.
    pub fn restore(bytes: &[u8]) -> Result<State, DecodeError> {
        let mut data: Data = wire::decode("snapshot", wire::SNAPSHOT_VERSION, bytes, usize::MAX)?;
        let index = data.build_index();
        let state = State { data, index, planted: PlantedBug::None };
        state.verify().map_err(|reason| DecodeError::Invalid {
            what: "snapshot",
            source: impetus_proto::InvalidInput::Value { what: "snapshot", reason },
        })?;
        Ok(state)
    }
}

/// The state as it was when [`State::freeze`] was called; later applies do
/// not change it.
#[derive(Debug)]
pub struct Frozen(Data);

impl Frozen {
    /// The bytes [`State::snapshot`] gave when this was frozen.
    pub fn snapshot(&self) -> Vec<u8> {
        wire::encode(wire::SNAPSHOT_VERSION, &self.0)
    }
}
