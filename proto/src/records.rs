//! The records the state machine keeps and answers with: streams, jobs, peers.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::InvalidInput;
use crate::ids::{FencingToken, IdempotencyKey, JobId, ModuleHash, PeerId, StreamName, Timestamp};
use crate::limits;

/// A stream's properties (the seeds' "Properties"). Every field has a default
/// a user of a serious job system would expect; see [`StreamProps::default`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamProps {
    /// Priority of a job submitted without one. Higher runs first.
    pub default_priority: i32,
    /// Most new leases per second across the whole cluster; `None` = unlimited.
    pub spawn_frequency: Option<u32>,
    /// Most jobs of this stream running at once on one peer (max processes per stream).
    pub mpps: u32,
    /// A peer stops tracking the stream after it has been idle this long.
    pub idle_timeout_ms: u64,
    /// How long a lease lives unless renewed.
    pub lease_ttl_ms: u64,
    /// Attempts before a job goes Dead. At least 1.
    pub max_attempts: u32,
    /// Backoff before retry `n` (1-based) is `retry_backoff_ms * 2^(n-1)`, capped
    /// at `retry_backoff_max_ms`.
    pub retry_backoff_ms: u64,
    pub retry_backoff_max_ms: u64,
    /// Wall-clock limit of one attempt.
    pub job_timeout_ms: u64,
    /// Fuel limit of one attempt; `None` = wall clock only.
    pub fuel: Option<u64>,
    /// Linear-memory limit of one instance, in bytes.
    pub memory_limit_bytes: u64,
    /// If not empty, only these peers may lease jobs of this stream.
    #[serde(deserialize_with = "crate::wire::bounded::pin_list")]
    pub pin: BTreeSet<PeerId>,
    /// These peers never lease jobs of this stream.
    #[serde(deserialize_with = "crate::wire::bounded::ignore_list")]
    pub ignore: BTreeSet<PeerId>,
    /// A paused stream accepts submits but grants no leases.
    pub paused: bool,
    /// A finished job (succeeded, dead or cancelled) is forgotten, with its
    /// result, this long after it finished, in the state's time (as
    /// `Command::Purge` forgets it: totals stay); `None` = kept until
    /// purged or its stream is deleted. Default [`DEFAULT_RETAIN_MS`].
    pub retain_ms: Option<u64>,
}

/// How long a finished job is kept by default: a day, as Celery keeps
/// results. A cluster that runs for ever then holds a day of jobs, not
/// every job it ever ran.
pub const DEFAULT_RETAIN_MS: u64 = 24 * 3600 * 1000;

impl Default for StreamProps {
    fn default() -> StreamProps {
        StreamProps {
            default_priority: 0,
            spawn_frequency: None,
            mpps: 4,
            idle_timeout_ms: 60_000,
            lease_ttl_ms: 30_000,
            max_attempts: 3,
            retry_backoff_ms: 1_000,
            retry_backoff_max_ms: 60_000,
            job_timeout_ms: 60_000,
            fuel: None,
            memory_limit_bytes: 256 << 20,
            pin: BTreeSet::new(),
            ignore: BTreeSet::new(),
            paused: false,
            retain_ms: Some(DEFAULT_RETAIN_MS),
        }
    }
}

impl StreamProps {
    /// Check every rule of the properties: each field's own
    /// ([`StreamPatch::validate`]'s) and those between fields.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        self.validate_fields()?;
        if self.retry_backoff_max_ms < self.retry_backoff_ms {
            return Err(InvalidInput::Value {
                what: "retry backoff",
                reason: "the maximum is smaller than the base".into(),
            });
        }
        Ok(())
    }

    /// The rules of each field on its own: positive values, list lengths.
    fn validate_fields(&self) -> Result<(), InvalidInput> {
        let positive = |what: &'static str, v: u64| {
            if v == 0 {
                Err(InvalidInput::Value { what, reason: "must be greater than zero".into() })
            } else {
                Ok(())
            }
        };
        positive("mpps", self.mpps.into())?;
        positive("lease TTL", self.lease_ttl_ms)?;
        positive("max attempts", self.max_attempts.into())?;
        positive("job timeout", self.job_timeout_ms)?;
        positive("memory limit", self.memory_limit_bytes)?;
        if let Some(f) = self.spawn_frequency {
            positive("spawn frequency", f.into())?;
        }
        if let Some(r) = self.retain_ms {
            // A job forgotten as it finishes leaves nothing to read its result from.
            positive("retention", r)?;
        }
        for (what, list) in [("pin list", &self.pin), ("ignore list", &self.ignore)] {
            if list.len() > limits::MAX_PEER_LIST {
                return Err(InvalidInput::TooLarge { what, len: list.len(), max: limits::MAX_PEER_LIST });
            }
        }
        Ok(())
    }

    /// Backoff before the retry that follows failed attempt number `attempt` (1-based).
    pub fn backoff_after(&self, attempt: u32) -> u64 {
        let shift = attempt.saturating_sub(1).min(32);
        self.retry_backoff_ms.saturating_mul(1u64 << shift).min(self.retry_backoff_max_ms)
    }

    /// Apply a patch: each `Some` field replaces the current value.
    pub fn patched(&self, patch: &StreamPatch) -> StreamProps {
        let mut p = self.clone();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &patch.$f { p.$f = v.clone(); } )* };
        }
        set!(
            default_priority,
            spawn_frequency,
            mpps,
            idle_timeout_ms,
            lease_ttl_ms,
            max_attempts,
            retry_backoff_ms,
            retry_backoff_max_ms,
            job_timeout_ms,
            fuel,
            memory_limit_bytes,
            pin,
            ignore,
            paused,
            retain_ms
        );
        p
    }
}

/// A change to some of a stream's properties.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPatch {
    pub default_priority: Option<i32>,
    pub spawn_frequency: Option<Option<u32>>,
    pub mpps: Option<u32>,
    pub idle_timeout_ms: Option<u64>,
    pub lease_ttl_ms: Option<u64>,
    pub max_attempts: Option<u32>,
    pub retry_backoff_ms: Option<u64>,
    pub retry_backoff_max_ms: Option<u64>,
    pub job_timeout_ms: Option<u64>,
    pub fuel: Option<Option<u64>>,
    pub memory_limit_bytes: Option<u64>,
    #[serde(deserialize_with = "crate::wire::bounded::pin_list")]
    pub pin: Option<BTreeSet<PeerId>>,
    #[serde(deserialize_with = "crate::wire::bounded::ignore_list")]
    pub ignore: Option<BTreeSet<PeerId>>,
    pub paused: Option<bool>,
    pub retain_ms: Option<Option<u64>>,
}

impl StreamPatch {
    /// Check each field the patch sets on its own (positive values, list
    /// lengths). The rules between fields (the maximum backoff against the
    /// base) depend on the properties it patches: applying it checks the
    /// result with [`StreamProps::validate`].
    pub fn validate(&self) -> Result<(), InvalidInput> {
        // The defaults keep every field's own rule, so only the fields the
        // patch sets can break one.
        StreamProps::default().patched(self).validate_fields()
    }
}

/// A stream as listed: name, properties and counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub name: StreamName,
    pub props: StreamProps,
    pub created_at: Timestamp,
    pub stats: StreamStats,
}

/// Counts of a stream's jobs, as `impetus status` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStats {
    pub queued: u64,
    pub delayed: u64,
    pub leased: u64,
    pub running: u64,
    pub succeeded: u64,
    pub dead: u64,
    pub cancelled: u64,
    /// Age of the oldest Queued or Delayed job (from its submission), if any.
    pub oldest_pending_age_ms: Option<u64>,
    /// Jobs ever submitted / completed / failed attempts, for rates.
    pub submitted_total: u64,
    pub completed_total: u64,
    pub failed_attempts_total: u64,
    pub expired_leases_total: u64,
    /// Finished jobs forgotten (past the stream's retention, or purged).
    pub forgotten_total: u64,
}

impl StreamStats {
    /// Jobs not yet in a final state.
    pub fn live(&self) -> u64 {
        self.queued + self.delayed + self.leased + self.running
    }

    pub fn count(&self, status: JobStatus) -> u64 {
        match status {
            JobStatus::Queued => self.queued,
            JobStatus::Delayed => self.delayed,
            JobStatus::Leased => self.leased,
            JobStatus::Running => self.running,
            JobStatus::Succeeded => self.succeeded,
            JobStatus::Dead => self.dead,
            JobStatus::Cancelled => self.cancelled,
        }
    }

    pub fn count_mut(&mut self, status: JobStatus) -> &mut u64 {
        match status {
            JobStatus::Queued => &mut self.queued,
            JobStatus::Delayed => &mut self.delayed,
            JobStatus::Leased => &mut self.leased,
            JobStatus::Running => &mut self.running,
            JobStatus::Succeeded => &mut self.succeeded,
            JobStatus::Dead => &mut self.dead,
            JobStatus::Cancelled => &mut self.cancelled,
        }
    }
}

/// A job's status (explicit codes, as disbatch had).
///
/// A failed attempt is not a resting status: with attempts left the job goes
/// back to `Delayed` (or `Queued` when the backoff is zero) carrying the error
/// record; with none left it goes to `Dead`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum JobStatus {
    /// Ready to be leased.
    Queued,
    /// Waiting for its `ready_at` (a submit delay or a retry backoff).
    Delayed,
    /// Leased to a peer that has not yet reported it running.
    Leased,
    /// Leased, and the peer has renewed the lease: the job is executing.
    Running,
    /// Finished with exit code 0; the result is committed.
    Succeeded,
    /// Attempts exhausted: dead-lettered, kept and listable, can be retried.
    Dead,
    /// Cancelled by a client.
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Queued,
        JobStatus::Delayed,
        JobStatus::Leased,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Dead,
        JobStatus::Cancelled,
    ];

    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Dead | JobStatus::Cancelled)
    }

    pub fn is_leased(self) -> bool {
        matches!(self, JobStatus::Leased | JobStatus::Running)
    }

    pub fn is_pending(self) -> bool {
        matches!(self, JobStatus::Queued | JobStatus::Delayed)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What kind of failure ended an attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The module trapped (unreachable, out-of-bounds access, ...).
    Trap,
    /// The attempt ran past the stream's job timeout (or fuel).
    Timeout,
    /// The module tried to grow memory past the stream's limit.
    OutOfMemory,
    /// The module exited with a non-zero code.
    Exit(i32),
    /// The lease expired before the peer reported a result.
    LeaseExpired,
    /// The module could not be loaded or instantiated.
    Module,
    /// Anything else the executor reports.
    Other,
}

/// The error record of a failed attempt: as impetus v2's error files had
/// ({error, name, linenumber, statement}), plus its kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub kind: ErrorKind,
    /// What went wrong, for a human.
    pub error: String,
    /// The function (or module) that failed, if known.
    pub name: String,
    /// The line, if known.
    pub line: Option<u32>,
    /// The statement or wasm frame, if known.
    pub statement: Option<String>,
}

impl ErrorRecord {
    pub fn new(kind: ErrorKind, error: impl Into<String>) -> ErrorRecord {
        ErrorRecord { kind, error: error.into(), name: String::new(), line: None, statement: None }
    }

    /// Truncate every text field to the limit, so a record never grows without bound.
    pub fn bounded(mut self) -> ErrorRecord {
        truncate_utf8(&mut self.error, limits::MAX_ERROR_TEXT);
        truncate_utf8(&mut self.name, limits::MAX_ERROR_TEXT);
        if let Some(s) = &mut self.statement {
            truncate_utf8(s, limits::MAX_ERROR_TEXT);
        }
        self
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// A lease: who holds the job, with which token, until when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub peer: PeerId,
    pub token: FencingToken,
    pub expires_at: Timestamp,
}

/// What to run: the module and its command line. Shared by submit and lease.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Arguments after argv[0].
    #[serde(deserialize_with = "crate::wire::bounded::args_and_env")]
    pub args: Vec<String>,
    /// Environment variables, in order.
    #[serde(deserialize_with = "crate::wire::bounded::args_and_env")]
    pub env: Vec<(String, String)>,
    /// Bytes on stdin.
    #[serde(with = "serde_bytes")]
    pub input: Vec<u8>,
}

impl JobSpec {
    pub fn validate(&self) -> Result<(), InvalidInput> {
        let n = self.args.len() + self.env.len();
        if n > limits::MAX_ARGS {
            return Err(InvalidInput::TooLarge { what: "arguments and environment", len: n, max: limits::MAX_ARGS });
        }
        for a in self.args.iter().chain(self.env.iter().flat_map(|(k, v)| [k, v])) {
            if a.len() > limits::MAX_ARG_BYTES {
                return Err(InvalidInput::TooLarge { what: "argument", len: a.len(), max: limits::MAX_ARG_BYTES });
            }
        }
        for (k, _) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(InvalidInput::Value {
                    what: "environment variable name",
                    reason: format!("{k:?} must be non-empty and contain no '=' or NUL"),
                });
            }
        }
        if self.input.len() > limits::MAX_INPUT_BYTES {
            return Err(InvalidInput::TooLarge {
                what: "job input",
                len: self.input.len(),
                max: limits::MAX_INPUT_BYTES,
            });
        }
        Ok(())
    }
}

/// A job as clients see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub stream: StreamName,
    pub module: ModuleHash,
    pub spec: JobSpec,
    pub priority: i32,
    pub status: JobStatus,
    pub ready_at: Timestamp,
    /// Attempts started so far (a lease grant starts one).
    pub attempts: u32,
    pub lease: Option<Lease>,
    /// The peer that last held a lease on the job.
    pub peer: Option<PeerId>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub key: Option<IdempotencyKey>,
    /// The result (stdout) of the successful attempt.
    #[serde(with = "serde_bytes")]
    pub result: Option<Vec<u8>>,
    /// The error record of the last failed attempt.
    pub error: Option<ErrorRecord>,
    #[serde(with = "serde_bytes")]
    pub stdout_tail: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub stderr_tail: Vec<u8>,
}

/// What a peer is in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PeerRole {
    Voter,
    Learner,
    Worker,
}

/// Whether a peer may take a voter seat (`impetus peer --voter|--worker`).
///
/// The leader fills open seats with workers, `Preferred` ones first (lowest
/// id first within each kind); a `Never` peer stays a worker: it runs jobs
/// and holds no Raft state, whatever seats are open (a spot instance, a
/// machine for jobs only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Seat {
    Preferred,
    #[default]
    Any,
    Never,
}

/// What a peer says about itself when it registers or heartbeats.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub host: String,
    pub pid: u32,
    #[serde(deserialize_with = "crate::wire::bounded::peer_addresses")]
    pub addresses: Vec<String>,
    /// Jobs it can run at once.
    pub capacity: u32,
    #[serde(deserialize_with = "crate::wire::bounded::peer_labels")]
    pub labels: Vec<String>,
    /// Whether it may take a voter seat.
    pub seat: Seat,
}

/// A peer in the registry (disbatch-style).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub id: PeerId,
    pub info: PeerInfo,
    pub role: PeerRole,
    pub draining: bool,
    pub registered_at: Timestamp,
    pub last_heartbeat: Timestamp,
    /// Resident memory at the last heartbeat, in bytes.
    pub rss_bytes: u64,
    /// Jobs this peer holds leases on, per stream.
    pub leased: Vec<(StreamName, u32)>,
    /// Idle slots per stream: how many more jobs of each stream a lease by
    /// this peer could take now (its pin, max per peer and spawn frequency),
    /// within the capacity its leases leave free. Streams with none are left
    /// out; a draining peer has none.
    pub idle: Vec<(StreamName, u32)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = StreamProps { retry_backoff_ms: 100, retry_backoff_max_ms: 1000, ..StreamProps::default() };
        let seq: Vec<u64> = (1..=6).map(|a| p.backoff_after(a)).collect();
        assert_eq!(seq, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff_after(u32::MAX), 1000);
    }

    #[test]
    fn props_are_validated() {
        assert!(StreamProps::default().validate().is_ok());
        let bad = StreamProps { mpps: 0, ..StreamProps::default() };
        assert_eq!(bad.validate().unwrap_err().to_string(), "invalid mpps: must be greater than zero");
        let bad = StreamProps { retry_backoff_ms: 10, retry_backoff_max_ms: 5, ..StreamProps::default() };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn job_spec_limits() {
        let ok = JobSpec { args: vec!["7".into()], env: vec![("K".into(), "V".into())], input: vec![1; 16] };
        assert!(ok.validate().is_ok());
        let big = JobSpec { input: vec![0; limits::MAX_INPUT_BYTES + 1], ..JobSpec::default() };
        assert_eq!(
            big.validate().unwrap_err().to_string(),
            format!(
                "job input is too large: {} bytes/items, the limit is {}",
                limits::MAX_INPUT_BYTES + 1,
                limits::MAX_INPUT_BYTES
            )
        );
        let bad_env = JobSpec { env: vec![("A=B".into(), "x".into())], ..JobSpec::default() };
        assert!(bad_env.validate().is_err());
    }

    #[test]
    fn error_records_are_bounded() {
        let r = ErrorRecord::new(ErrorKind::Trap, "é".repeat(limits::MAX_ERROR_TEXT)).bounded();
        assert!(r.error.len() <= limits::MAX_ERROR_TEXT);
    }
}
