//! The commands of the replicated state machine and their outcomes.
//!
//! A command is what a client or worker asks for; the leader stamps the time
//! and Raft gives it a log index; every voter applies it in log order and gets
//! the same [`Outcome`].

use serde::{Deserialize, Serialize};

use crate::error::InvalidInput;
use crate::ids::{FencingToken, IdempotencyKey, JobId, ModuleHash, PeerId, StreamName, Timestamp};
use crate::limits;
use crate::records::{ErrorRecord, JobSpec, JobStatus, PeerInfo, PeerRole, StreamPatch, StreamProps};

/// One job to submit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewJob {
    pub module: ModuleHash,
    pub spec: JobSpec,
    /// `None` = the stream's default priority.
    pub priority: Option<i32>,
    /// Not ready before `now + delay_ms`.
    pub delay_ms: u64,
    pub key: Option<IdempotencyKey>,
}

/// A successful attempt, reported by the peer holding the lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub job: JobId,
    pub token: FencingToken,
    #[serde(with = "serde_bytes")]
    pub result: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub stderr_tail: Vec<u8>,
}

/// What reaches a guest besides its module and spec: the limits of its
/// stream when it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLimits {
    pub job_timeout_ms: u64,
    pub fuel: Option<u64>,
    pub memory_limit_bytes: u64,
}

impl RunLimits {
    /// The limits a grant carries.
    pub fn of(g: &LeaseGrant) -> RunLimits {
        RunLimits { job_timeout_ms: g.job_timeout_ms, fuel: g.fuel, memory_limit_bytes: g.memory_limit_bytes }
    }

    /// The limits of a stream's jobs, as a lease of one grants them.
    pub fn of_props(p: &StreamProps) -> RunLimits {
        RunLimits { job_timeout_ms: p.job_timeout_ms, fuel: p.fuel, memory_limit_bytes: p.memory_limit_bytes }
    }
}

/// A job of a [`Command::SubmitRan`] that its leader ran before writing it,
/// and what the run printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ran {
    /// The job's position in the submit.
    pub index: u32,
    pub limits: RunLimits,
    #[serde(with = "serde_bytes")]
    pub result: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub stderr_tail: Vec<u8>,
}

/// What became of each result of a [`Command::SubmitRan`]: the job of the
/// submit it ran (with the `index` of each of its `ran`, in order) and
/// whether the state machine took it, from the outcomes of the command's
/// submit and completions. Empty unless both succeeded.
pub fn ran_results<'a>(
    indexes: impl IntoIterator<Item = u32>,
    submitted: &'a ApplyResult,
    completed: &'a ApplyResult,
) -> Vec<(&'a Submitted, &'a Result<(), LeaseError>)> {
    let (Ok(Outcome::Submitted(subs)), Ok(Outcome::Completed(results))) = (submitted, completed) else {
        return Vec::new();
    };
    indexes.into_iter().zip(results).filter_map(|(i, r)| Some((subs.get(i as usize)?, r))).collect()
}

/// A failed attempt, reported by the peer holding the lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub job: JobId,
    pub token: FencingToken,
    pub error: ErrorRecord,
    #[serde(with = "serde_bytes")]
    pub stdout_tail: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub stderr_tail: Vec<u8>,
}

/// A command of the state machine. Encoded by variant position (postcard,
/// [`crate::wire`]): new variants go last, so the logs and snapshots on
/// disk keep their meaning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Advance time only: promote delayed jobs that are due, expire leases,
    /// forget finished jobs past their stream's retention.
    /// (Every command does this first; the leader sends `Tick` when idle.)
    Tick,
    CreateStream {
        name: StreamName,
        props: StreamProps,
    },
    UpdateStream {
        name: StreamName,
        patch: StreamPatch,
    },
    /// Delete a stream with its jobs and data. Refused while it has live jobs
    /// (queued, delayed, leased, running) unless `force`.
    DeleteStream {
        name: StreamName,
        force: bool,
    },
    /// Store a wasm module once under its content hash.
    PutModule {
        hash: ModuleHash,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    Submit {
        stream: StreamName,
        #[serde(deserialize_with = "crate::wire::bounded::submit_batch")]
        jobs: Vec<NewJob>,
    },
    /// Lease up to `max` jobs for `peer`, from `streams` (all streams if empty).
    Lease {
        peer: PeerId,
        #[serde(deserialize_with = "crate::wire::bounded::lease_streams")]
        streams: Vec<StreamName>,
        max: u32,
    },
    /// Extend leases (and mark the jobs Running).
    Renew {
        peer: PeerId,
        #[serde(deserialize_with = "crate::wire::bounded::lease_list")]
        leases: Vec<(JobId, FencingToken)>,
    },
    Complete {
        peer: PeerId,
        #[serde(deserialize_with = "crate::wire::bounded::completion_batch")]
        completions: Vec<Completion>,
    },
    Fail {
        peer: PeerId,
        #[serde(deserialize_with = "crate::wire::bounded::failure_batch")]
        failures: Vec<Failure>,
    },
    /// Hand leases back without counting an attempt (a draining peer).
    Release {
        peer: PeerId,
        #[serde(deserialize_with = "crate::wire::bounded::lease_list")]
        leases: Vec<(JobId, FencingToken)>,
    },
    Cancel {
        job: JobId,
    },
    /// Requeue a Dead or Cancelled job with its attempts reset.
    Retry {
        job: JobId,
    },
    DataPut {
        stream: StreamName,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    DataDelete {
        stream: StreamName,
        key: Vec<u8>,
    },
    /// Set `key` to `new` (or delete it when `None`) only if its current
    /// value equals `expected` (`None` = absent).
    DataCas {
        stream: StreamName,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        expected: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        new: Option<Vec<u8>>,
    },
    /// Register a new peer; the state machine assigns its id.
    RegisterPeer {
        info: PeerInfo,
        role: PeerRole,
    },
    Heartbeat {
        peer: PeerId,
        info: PeerInfo,
        rss_bytes: u64,
    },
    SetPeerRole {
        peer: PeerId,
        role: PeerRole,
    },
    /// A draining peer gets no new leases.
    DrainPeer {
        peer: PeerId,
        draining: bool,
    },
    /// Remove a peer; its leases are released (no attempt counted).
    RemovePeer {
        peer: PeerId,
    },
    /// Several commands in one log entry (group commit). Not nested.
    Batch(#[serde(deserialize_with = "crate::wire::bounded::command_batch")] Vec<Command>),
    /// A submit whose leader leased it to itself and ran its short jobs
    /// before writing it, so they end in the entry that submits them: as
    /// the batch `Submit`, `Lease { peer, streams: [stream], max }`, then
    /// `Complete` with this entry's token for each job of `ran` that the
    /// lease granted to `peer` with the limits it ran under (a job that
    /// already existed, or that the lease did not grant so, is not
    /// completed: its result is dropped and it runs under a lease of its
    /// own). Written by a leader for its own runs, never by clients.
    SubmitRan {
        stream: StreamName,
        #[serde(deserialize_with = "crate::wire::bounded::submit_batch")]
        jobs: Vec<NewJob>,
        peer: PeerId,
        max: u32,
        #[serde(deserialize_with = "crate::wire::bounded::ran_jobs")]
        ran: Vec<Ran>,
    },
    /// Forget up to `max` finished jobs of `stream` (Succeeded, Dead or
    /// Cancelled) whose last change is at least `older_than_ms` old in the
    /// state's time, oldest id first, with their results and idempotency
    /// keys (a key of a purged job may be used again). Totals stay.
    Purge {
        stream: StreamName,
        older_than_ms: u64,
        max: u32,
    },
}

impl Command {
    /// Whether applying this may make jobs ready to lease (new or retried
    /// jobs, leases handed back, a stream's limits changed): a peer that
    /// wrote it wakes its worker instead of waiting for the next poll.
    pub fn may_ready_jobs(&self) -> bool {
        match self {
            Command::Submit { .. }
            | Command::SubmitRan { .. }
            | Command::Retry { .. }
            | Command::UpdateStream { .. }
            | Command::Release { .. }
            | Command::RemovePeer { .. } => true,
            Command::Batch(cmds) => cmds.iter().any(Command::may_ready_jobs),
            _ => false,
        }
    }

    /// This command as another peer may send it: a [`Command::SubmitRan`]
    /// loses its results and becomes the batch of its submit and its lease
    /// (only the leader that ran the jobs writes their results; a result
    /// not written leaves its job to run under its lease). Others are
    /// unchanged.
    pub fn without_results(self) -> Command {
        match self {
            Command::SubmitRan { stream, jobs, peer, max, ran: _ } => Command::Batch(vec![
                Command::Submit { stream: stream.clone(), jobs },
                Command::Lease { peer, streams: vec![stream], max },
            ]),
            other => other,
        }
    }

    /// Check every bound of the vocabulary. Decoding calls this, and so does
    /// the state machine before applying.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        fn batch(what: &'static str, len: usize) -> Result<(), InvalidInput> {
            if len > limits::MAX_BATCH {
                return Err(InvalidInput::TooLarge { what, len, max: limits::MAX_BATCH });
            }
            Ok(())
        }
        fn bytes(what: &'static str, len: usize, max: usize) -> Result<(), InvalidInput> {
            if len > max {
                return Err(InvalidInput::TooLarge { what, len, max });
            }
            Ok(())
        }
        fn data_key(key: &[u8]) -> Result<(), InvalidInput> {
            if key.is_empty() {
                return Err(InvalidInput::Empty { what: "data-store key" });
            }
            bytes("data-store key", key.len(), limits::MAX_DATA_KEY)
        }
        fn submit(jobs: &[NewJob]) -> Result<(), InvalidInput> {
            if jobs.is_empty() {
                return Err(InvalidInput::Empty { what: "submit batch" });
            }
            batch("submit batch", jobs.len())?;
            jobs.iter().try_for_each(|j| j.spec.validate())
        }
        fn info(info: &PeerInfo) -> Result<(), InvalidInput> {
            bytes("peer host", info.host.len(), limits::MAX_ARG_BYTES)?;
            batch("peer addresses", info.addresses.len())?;
            bytes("peer labels", info.labels.len(), limits::MAX_PEER_LIST)
        }
        match self {
            Command::Tick | Command::Cancel { .. } | Command::Retry { .. } => Ok(()),
            Command::DeleteStream { .. } | Command::SetPeerRole { .. } => Ok(()),
            Command::DrainPeer { .. } | Command::RemovePeer { .. } => Ok(()),
            Command::Purge { max, .. } => batch("purge batch", *max as usize),
            Command::CreateStream { props, .. } => props.validate(),
            // Each field on its own: the rules between fields need the
            // stream's properties, which applying the patch checks.
            Command::UpdateStream { patch, .. } => patch.validate(),
            Command::PutModule { bytes: b, .. } => {
                if b.is_empty() {
                    return Err(InvalidInput::Empty { what: "module" });
                }
                bytes("module", b.len(), limits::MAX_MODULE_BYTES)
            }
            Command::Submit { jobs, .. } => submit(jobs),
            Command::SubmitRan { jobs, max, ran, .. } => {
                submit(jobs)?;
                batch("lease batch", *max as usize)?;
                let mut next = 0;
                for r in ran {
                    if r.index < next || r.index as usize >= jobs.len() {
                        return Err(InvalidInput::Value {
                            what: "ran job",
                            reason: format!(
                                "index {} is not a later job of the {} submitted (indexes increase)",
                                r.index,
                                jobs.len()
                            ),
                        });
                    }
                    next = r.index + 1;
                    bytes("job result", r.result.len(), limits::MAX_RESULT_BYTES)?;
                    bytes("stderr tail", r.stderr_tail.len(), limits::MAX_TAIL_BYTES)?;
                }
                Ok(())
            }
            Command::Lease { streams, max, .. } => {
                batch("lease streams", streams.len())?;
                batch("lease batch", *max as usize)
            }
            Command::Renew { leases, .. } | Command::Release { leases, .. } => batch("lease list", leases.len()),
            Command::Complete { completions, .. } => {
                batch("completion batch", completions.len())?;
                for c in completions {
                    bytes("job result", c.result.len(), limits::MAX_RESULT_BYTES)?;
                    bytes("stderr tail", c.stderr_tail.len(), limits::MAX_TAIL_BYTES)?;
                }
                Ok(())
            }
            Command::Fail { failures, .. } => {
                batch("failure batch", failures.len())?;
                for f in failures {
                    bytes("stdout tail", f.stdout_tail.len(), limits::MAX_TAIL_BYTES)?;
                    bytes("stderr tail", f.stderr_tail.len(), limits::MAX_TAIL_BYTES)?;
                    for t in [&f.error.error, &f.error.name] {
                        bytes("error text", t.len(), limits::MAX_ERROR_TEXT)?;
                    }
                }
                Ok(())
            }
            Command::DataPut { key, value, .. } => {
                data_key(key)?;
                bytes("data-store value", value.len(), limits::MAX_DATA_VALUE)
            }
            Command::DataDelete { key, .. } => data_key(key),
            Command::DataCas { key, expected, new, .. } => {
                data_key(key)?;
                for v in [expected, new].into_iter().flatten() {
                    bytes("data-store value", v.len(), limits::MAX_DATA_VALUE)?;
                }
                Ok(())
            }
            Command::RegisterPeer { info: i, .. } | Command::Heartbeat { info: i, .. } => info(i),
            Command::Batch(cmds) => {
                batch("command batch", cmds.len())?;
                for c in cmds {
                    if matches!(c, Command::Batch(_)) {
                        return Err(InvalidInput::Value {
                            what: "command batch",
                            reason: "batches do not nest".into(),
                        });
                    }
                    // A purge, or a change of a stream's retention (its
                    // finished jobs are indexed again), may scan the whole
                    // job table: one per entry.
                    let scans = match c {
                        Command::Purge { .. } => Some("a purge"),
                        Command::UpdateStream { patch, .. } if patch.retain_ms.is_some() => {
                            Some("a change of retention")
                        }
                        _ => None,
                    };
                    if let Some(what) = scans {
                        return Err(InvalidInput::Value {
                            what: "command batch",
                            reason: format!("{what} is a command of its own, not part of a batch"),
                        });
                    }
                    c.validate()?;
                }
                Ok(())
            }
        }
    }
}

/// One job of a submit: its id, whether it already existed (same
/// idempotency key), and its status once the entry that submitted it was
/// applied: Queued or Delayed for a new job, Leased if the leader leased it
/// to itself in that entry, Succeeded for one done in it
/// ([`Command::SubmitRan`]: the client knows it is done from the
/// acknowledgement), the current status of one that existed. (In a
/// [`Command::Batch`] a client sends, later commands of the batch are not
/// counted.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    pub job: JobId,
    pub existing: bool,
    pub status: JobStatus,
}

/// A granted lease with everything the peer needs to run the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub job: JobId,
    pub stream: StreamName,
    pub token: FencingToken,
    pub expires_at: Timestamp,
    /// The attempt this lease starts (1-based).
    pub attempt: u32,
    pub module: ModuleHash,
    pub spec: JobSpec,
    pub job_timeout_ms: u64,
    pub fuel: Option<u64>,
    pub memory_limit_bytes: u64,
    pub lease_ttl_ms: u64,
}

/// Why a renewal, completion, failure or release was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LeaseError {
    #[error("{job} does not exist")]
    UnknownJob { job: JobId },
    #[error("{job} is {status}, not leased")]
    NotLeased { job: JobId, status: JobStatus },
    #[error("stale fencing token for {job}: presented {presented}, current is {current}")]
    StaleToken { job: JobId, presented: FencingToken, current: FencingToken },
    #[error("lease on {job} is held by {holder}, not {peer}")]
    WrongPeer { job: JobId, holder: PeerId, peer: PeerId },
    /// A [`Command::SubmitRan`] result for a job its entry did not grant to
    /// the peer that ran it, or granted with other limits.
    #[error("{job} was not granted as it ran: its early result is dropped")]
    NotGranted { job: JobId },
}

/// What happened to a job after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailDisposition {
    /// Attempts left: it will be ready again at this time.
    Retry { ready_at: Timestamp },
    /// Attempts exhausted.
    Dead,
}

/// The outcome of a command that was applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Ticked,
    StreamCreated,
    StreamUpdated,
    StreamDeleted {
        jobs_removed: u64,
    },
    ModuleStored {
        new: bool,
    },
    Submitted(#[serde(deserialize_with = "crate::wire::bounded::submitted_jobs")] Vec<Submitted>),
    Leased(#[serde(deserialize_with = "crate::wire::bounded::lease_grants")] Vec<LeaseGrant>),
    Renewed(#[serde(deserialize_with = "crate::wire::bounded::renewal_results")] Vec<Result<Timestamp, LeaseError>>),
    Completed(#[serde(deserialize_with = "crate::wire::bounded::completion_results")] Vec<Result<(), LeaseError>>),
    Failed(
        #[serde(deserialize_with = "crate::wire::bounded::failure_results")] Vec<Result<FailDisposition, LeaseError>>,
    ),
    Released(#[serde(deserialize_with = "crate::wire::bounded::release_results")] Vec<Result<(), LeaseError>>),
    Cancelled,
    Retried,
    DataWritten,
    /// Whether the compare-and-set took effect, and the value now stored.
    DataCas {
        swapped: bool,
        #[serde(with = "serde_bytes")]
        current: Option<Vec<u8>>,
    },
    PeerRegistered {
        peer: PeerId,
    },
    PeerUpdated,
    Batch(#[serde(deserialize_with = "crate::wire::bounded::outcome_batch")] Vec<Result<Outcome, ApplyError>>),
    /// Finished jobs forgotten by a [`Command::Purge`]; fewer than its
    /// `max` when no more were old enough.
    Purged {
        jobs_removed: u64,
    },
}

/// Why a command was refused. A refused command changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ApplyError {
    #[error("stream {0} does not exist")]
    UnknownStream(StreamName),
    #[error("stream {0} already exists")]
    StreamExists(StreamName),
    #[error("stream {name} has {live} live jobs; cancel them or delete with force")]
    StreamHasLiveJobs { name: StreamName, live: u64 },
    #[error("module {0} is not stored; put it before submitting jobs that use it")]
    UnknownModule(ModuleHash),
    #[error("module bytes hash to {actual}, not the claimed {claimed}")]
    ModuleHashMismatch { claimed: ModuleHash, actual: ModuleHash },
    #[error("{0} does not exist")]
    UnknownJob(JobId),
    #[error("cannot {op} {job}: it is {status}")]
    InvalidTransition { job: JobId, status: JobStatus, op: String },
    #[error("{0} is not registered")]
    UnknownPeer(PeerId),
    #[error("idempotency key {key} of stream {stream} is used twice in one submit")]
    DuplicateKeyInBatch { stream: StreamName, key: IdempotencyKey },
    #[error("invalid command: {0}")]
    Invalid(String),
}

impl From<InvalidInput> for ApplyError {
    fn from(e: InvalidInput) -> ApplyError {
        ApplyError::Invalid(e.to_string())
    }
}

/// The result of applying one command.
pub type ApplyResult = Result<Outcome, ApplyError>;

/// The stamp of a command in the log: its index (the fencing token of any
/// lease it grants) and the leader's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub index: u64,
    pub now: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A patch is checked field by field when it is decoded: the rules
    /// between fields depend on the stream it patches (applying checks them).
    #[test]
    fn an_update_is_checked_field_by_field() {
        let update = |patch| Command::UpdateStream { name: StreamName::new("s").unwrap(), patch };
        // Two minutes of backoff: more than the default maximum (one minute),
        // less than this stream's (ten).
        let slow = StreamPatch { retry_backoff_ms: Some(120_000), ..StreamPatch::default() };
        assert_eq!(update(slow.clone()).validate(), Ok(()));
        let cmd = update(slow.clone());
        assert_eq!(crate::wire::decode_command(&crate::wire::encode_command(&cmd)).unwrap(), cmd);
        let props = StreamProps { retry_backoff_max_ms: 600_000, ..StreamProps::default() };
        assert_eq!(props.patched(&slow).validate(), Ok(()));
        assert!(StreamProps::default().patched(&slow).validate().is_err(), "the rule between fields, at apply");
        // A field that breaks its own rule is still refused.
        let zero = StreamPatch { lease_ttl_ms: Some(0), ..StreamPatch::default() };
        assert_eq!(update(zero).validate().unwrap_err().to_string(), "invalid lease TTL: must be greater than zero");
        let no_frequency = StreamPatch { spawn_frequency: Some(Some(0)), ..StreamPatch::default() };
        assert!(update(no_frequency).validate().is_err());
        let pin = (0..=limits::MAX_PEER_LIST as u64).map(PeerId).collect();
        let long = StreamPatch { pin: Some(pin), ..StreamPatch::default() };
        assert_eq!(
            update(long).validate().unwrap_err().to_string(),
            format!(
                "pin list is too large: {} bytes/items, the limit is {}",
                limits::MAX_PEER_LIST + 1,
                limits::MAX_PEER_LIST
            )
        );
    }

    #[test]
    fn what_may_ready_jobs_wakes_a_worker() {
        let stream = StreamName::new("s1").unwrap();
        let put = || Command::DataPut { stream: stream.clone(), key: b"k".to_vec(), value: b"v".to_vec() };
        let submit = Command::Submit { stream: stream.clone(), jobs: Vec::new() };
        let update = Command::UpdateStream { name: stream.clone(), patch: StreamPatch::default() };
        assert!(submit.may_ready_jobs());
        assert!(update.may_ready_jobs());
        assert!(Command::Release { peer: PeerId(1), leases: Vec::new() }.may_ready_jobs());
        assert!(!put().may_ready_jobs());
        assert!(!Command::Tick.may_ready_jobs());
        assert!(Command::Batch(vec![put(), submit]).may_ready_jobs());
        assert!(!Command::Batch(vec![put(), put()]).may_ready_jobs());
    }
}
