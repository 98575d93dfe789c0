//! The client protocol: what a client (the CLI, an application through the
//! SDK) asks a peer, and what the peer answers.
//!
//! Every message crosses the network as `[CLIENT_API_VERSION, postcard...]`
//! ([`wire::encode`]). [`decode_request`] and [`decode_response`] check the
//! version, the size limit, the structure and then every rule of the
//! vocabulary, so bytes from outside become a valid message or a named
//! [`DecodeError`], never a panic.

use serde::{Deserialize, Serialize};

use crate::command::{ApplyResult, Command};
use crate::error::{DecodeError, InvalidInput};
use crate::ids::{FencingToken, JobId, ModuleHash, PeerId, StreamName, Timestamp};
use crate::limits;
use crate::records::{JobRecord, JobStatus, PeerInfo, PeerRecord, PeerRole, StreamInfo};
use crate::wire;

/// Version of the client protocol encoding. A peer refuses any other.
/// 2: `Submitted` carries the job's status; 3: a `PeerRecord` carries its
/// idle slots per stream; 4: a `PeerInfo` carries its `Seat`; 5: a
/// `WorkReply` and a `ClusterStatus` carry the state's time; 6: a
/// `WorkRequest` may ask to reconcile its leases (`reconcile`); 7: stream
/// properties carry `retain_ms`, stream stats `forgotten_total`.
pub const CLIENT_API_VERSION: u8 = 7;

/// A client's request to a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// A state-machine command; the peer stamps time and commits it through
    /// Raft (forwarding to the leader later). Answer: `Applied`.
    Write(Command),
    /// Answer: `Job(Option<JobRecord>)`.
    GetJob(JobId),
    /// The status of many jobs at once (what a waiting client polls).
    /// Answer: `JobStatuses`, in the order asked.
    JobStatuses(#[serde(deserialize_with = "crate::wire::bounded::job_status_list")] Vec<JobId>),
    /// Jobs ordered by id, those after `after` only, at most `limit`.
    /// Answer: `Jobs(Vec<JobRecord>)`.
    ListJobs { stream: Option<StreamName>, status: Option<JobStatus>, after: Option<JobId>, limit: u32 },
    /// Answer: `Stream(Option<StreamInfo>)`.
    GetStream(StreamName),
    /// Answer: `Streams(Vec<StreamInfo>)`.
    ListStreams,
    /// Answer: `HasModule(bool)`.
    HasModule(ModuleHash),
    /// Answer: `Module(Option<Vec<u8>>)`.
    GetModule(ModuleHash),
    /// Answer: `Data(Option<Vec<u8>>)`.
    DataGet { stream: StreamName, key: Vec<u8> },
    /// Answer: `Status(ClusterStatus)`.
    Status,
    /// A new peer asks to join: the leader registers it as a worker (a fresh
    /// id, never reused; the same id again for the same address). A worker
    /// holds no Raft state; the membership manager adds it to Raft as a
    /// learner at `info.addresses[0]` when more voters are needed. Any peer
    /// accepts it and forwards it to the leader. Answer: `Joined`.
    Join { info: PeerInfo },
    /// A peer leaves: it is removed from Raft membership and drained in the
    /// registry. Answer: `Left`.
    Leave { peer: PeerId },
    /// A write forwarded by a peer that is not the leader. Answer:
    /// `Written`, with the log index so the forwarder can wait until its
    /// own replica has applied it (read your writes).
    Forward(Command),
    /// The leader's linearizable read index (the leader confirms it still
    /// leads first). Answer: `ReadIndex`.
    ReadIndex,
    /// A digest of the applied state, to compare replicas. Answer: `StateDigest`.
    StateDigest,
    /// The worker protocol: one turn of a worker's loop, served by the
    /// leader from its state (a peer without Raft state has none). Answer:
    /// `Work`.
    Work(WorkRequest),
}

/// One turn of a worker: what it reports, and how many jobs it can take.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkRequest {
    pub peer: PeerId,
    /// Results, failures, renewals, heartbeats, releases: committed as one
    /// entry, in order, before any lease.
    #[serde(deserialize_with = "crate::wire::bounded::worker_commands")]
    pub cmds: Vec<Command>,
    /// Lease at most this many jobs from the streams this peer may lease
    /// from (the server picks them from its state).
    pub lease_max: u32,
    /// Hand back every lease `peer` holds first (a restarted peer's orphans).
    pub release_orphans: bool,
    /// Hand back first the leases `peer` holds that it does not run,
    /// without counting an attempt: leases granted in an answer that never
    /// reached it (lost on the way, or a leader that committed them and
    /// failed before answering) then go back to their queue at once instead
    /// of waiting out their TTL and costing an attempt. `None`: hand back
    /// nothing (but see `release_orphans`).
    pub reconcile: Option<Reconcile>,
}

/// Which leases a worker keeps when it reconciles ([`WorkRequest::reconcile`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconcile {
    /// The leases (job, fencing token) of the jobs it runs or has a report
    /// of to send: they stay. Another lease of the same job goes.
    #[serde(deserialize_with = "crate::wire::bounded::running_jobs")]
    pub keep: Vec<(JobId, FencingToken)>,
    /// Only a lease granted at or before this log index may go (a lease's
    /// fencing token is the index of the entry that granted it): a later
    /// one may be a grant still on its way to the worker (on a leader, a
    /// submit it fused with a lease for itself). `None`: any.
    pub through: Option<u64>,
}

/// The answer to a [`WorkRequest`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkReply {
    /// Whether the registry knows the peer.
    pub registered: bool,
    /// Leases handed back (with `release_orphans` or `reconcile`).
    pub released: u32,
    /// One outcome per command sent, in order.
    #[serde(deserialize_with = "crate::wire::bounded::worker_outcomes")]
    pub outcomes: Vec<ApplyResult>,
    /// The outcome of the lease, if one was asked for and there was work.
    pub leased: Option<ApplyResult>,
    /// The streams the peer could lease from, with their idle timeouts (ms).
    pub streams: Vec<(StreamName, u64)>,
    /// The state's time once the turn was applied: a renewal's expiry less
    /// this is (at most) the TTL it granted, whatever the worker's clock
    /// says.
    pub now: Timestamp,
}

impl ClientRequest {
    /// A short name of the request's kind, for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientRequest::Write(_) => "write",
            ClientRequest::GetJob(_) => "get-job",
            ClientRequest::JobStatuses(_) => "job-statuses",
            ClientRequest::ListJobs { .. } => "list-jobs",
            ClientRequest::GetStream(_) => "get-stream",
            ClientRequest::ListStreams => "list-streams",
            ClientRequest::HasModule(_) => "has-module",
            ClientRequest::GetModule(_) => "get-module",
            ClientRequest::DataGet { .. } => "data-get",
            ClientRequest::Status => "status",
            ClientRequest::Join { .. } => "join",
            ClientRequest::Leave { .. } => "leave",
            ClientRequest::Forward(_) => "forward",
            ClientRequest::ReadIndex => "read-index",
            ClientRequest::StateDigest => "state-digest",
            ClientRequest::Work(_) => "work",
        }
    }

    /// Check every bound of the vocabulary: a write's command must pass
    /// [`Command::validate`], a list is at most [`limits::MAX_BATCH`] long,
    /// a data-store key is non-empty and bounded.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        match self {
            ClientRequest::Write(cmd) | ClientRequest::Forward(cmd) => client_command(cmd),
            ClientRequest::Work(w) => {
                if w.cmds.len() > limits::MAX_BATCH {
                    return Err(InvalidInput::TooLarge {
                        what: "worker commands",
                        len: w.cmds.len(),
                        max: limits::MAX_BATCH,
                    });
                }
                if let Some(Reconcile { keep, .. }) = &w.reconcile {
                    if keep.len() > limits::MAX_BATCH {
                        return Err(InvalidInput::TooLarge {
                            what: "running jobs",
                            len: keep.len(),
                            max: limits::MAX_BATCH,
                        });
                    }
                }
                w.cmds.iter().try_for_each(client_command)
            }
            ClientRequest::Join { info } => {
                if info.addresses.is_empty() {
                    return Err(InvalidInput::Empty { what: "joining peer's addresses" });
                }
                Command::RegisterPeer { info: info.clone(), role: PeerRole::Learner }.validate()
            }
            ClientRequest::ListJobs { limit, .. } => {
                if *limit as usize > limits::MAX_BATCH {
                    return Err(InvalidInput::TooLarge {
                        what: "job list limit",
                        len: *limit as usize,
                        max: limits::MAX_BATCH,
                    });
                }
                Ok(())
            }
            ClientRequest::JobStatuses(ids) => {
                if ids.len() > limits::MAX_BATCH {
                    return Err(InvalidInput::TooLarge {
                        what: "job status list",
                        len: ids.len(),
                        max: limits::MAX_BATCH,
                    });
                }
                Ok(())
            }
            ClientRequest::DataGet { key, .. } => {
                if key.is_empty() {
                    return Err(InvalidInput::Empty { what: "data-store key" });
                }
                if key.len() > limits::MAX_DATA_KEY {
                    return Err(InvalidInput::TooLarge {
                        what: "data-store key",
                        len: key.len(),
                        max: limits::MAX_DATA_KEY,
                    });
                }
                Ok(())
            }
            ClientRequest::GetJob(_)
            | ClientRequest::GetStream(_)
            | ClientRequest::ListStreams
            | ClientRequest::HasModule(_)
            | ClientRequest::GetModule(_)
            | ClientRequest::Status
            | ClientRequest::Leave { .. }
            | ClientRequest::ReadIndex
            | ClientRequest::StateDigest => Ok(()),
        }
    }
}

/// What `impetus status` shows: the answering peer's view of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The peer that answered.
    pub peer: PeerId,
    pub leader: Option<PeerId>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub peers: Vec<PeerRecord>,
    pub streams: Vec<StreamInfo>,
    /// Raft voters and learners, by peer id. A registered peer in neither is
    /// a worker (or has left).
    pub voters: Vec<PeerId>,
    pub learners: Vec<PeerId>,
    /// The answering replica's time (the cluster's clock): ages such as a
    /// heartbeat's are measured against it, not the reader's clock.
    pub now: Timestamp,
}

impl ClusterStatus {
    /// The role a peer plays in Raft now.
    pub fn role_of(&self, peer: PeerId) -> PeerRole {
        if self.voters.contains(&peer) {
            PeerRole::Voter
        } else if self.learners.contains(&peer) {
            PeerRole::Learner
        } else {
            PeerRole::Worker
        }
    }
}

/// A peer's answer to a [`ClientRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    Applied(ApplyResult),
    Job(Option<JobRecord>),
    JobStatuses(Vec<Option<JobStatus>>),
    Jobs(#[serde(deserialize_with = "crate::wire::bounded::job_list")] Vec<JobRecord>),
    Stream(Option<StreamInfo>),
    Streams(Vec<StreamInfo>),
    HasModule(bool),
    Module(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    Data(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    Status(ClusterStatus),
    Joined { peer: PeerId },
    Left,
    Written { index: u64, result: ApplyResult },
    ReadIndex(u64),
    StateDigest { applied_index: u64, digest: String },
    Work(WorkReply),
    Error(ServiceError),
}

impl ClientResponse {
    /// A short name of the response's kind, for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientResponse::Applied(_) => "applied",
            ClientResponse::Job(_) => "job",
            ClientResponse::JobStatuses(_) => "job-statuses",
            ClientResponse::Jobs(_) => "jobs",
            ClientResponse::Stream(_) => "stream",
            ClientResponse::Streams(_) => "streams",
            ClientResponse::HasModule(_) => "has-module",
            ClientResponse::Module(_) => "module",
            ClientResponse::Data(_) => "data",
            ClientResponse::Status(_) => "status",
            ClientResponse::Joined { .. } => "joined",
            ClientResponse::Left => "left",
            ClientResponse::Written { .. } => "written",
            ClientResponse::ReadIndex(_) => "read-index",
            ClientResponse::StateDigest { .. } => "state-digest",
            ClientResponse::Work(_) => "work",
            ClientResponse::Error(_) => "error",
        }
    }

    /// Check the bounds a client relies on: a module is at most
    /// [`limits::MAX_MODULE_BYTES`], a data value at most
    /// [`limits::MAX_DATA_VALUE`].
    pub fn validate(&self) -> Result<(), InvalidInput> {
        match self {
            ClientResponse::Module(Some(b)) if b.len() > limits::MAX_MODULE_BYTES => {
                Err(InvalidInput::TooLarge { what: "module", len: b.len(), max: limits::MAX_MODULE_BYTES })
            }
            ClientResponse::Data(Some(v)) if v.len() > limits::MAX_DATA_VALUE => {
                Err(InvalidInput::TooLarge { what: "data-store value", len: v.len(), max: limits::MAX_DATA_VALUE })
            }
            _ => Ok(()),
        }
    }
}

/// A command as a client or worker may send it: valid, and not one a
/// leader writes only for itself ([`Command::SubmitRan`]: its results are
/// taken without a fencing token presented, on the strength of the entry
/// that grants the lease; only the peer that ran the jobs may claim that).
fn client_command(cmd: &Command) -> Result<(), InvalidInput> {
    cmd.validate()?;
    let own = |c: &Command| matches!(c, Command::SubmitRan { .. });
    let leader_only = match cmd {
        Command::Batch(cmds) => cmds.iter().any(own),
        c => own(c),
    };
    if leader_only {
        return Err(InvalidInput::Value {
            what: "command",
            reason: "SubmitRan is written by a leader for the jobs it ran itself; submit with Submit".into(),
        });
    }
    Ok(())
}

/// Why a peer could not serve a request (as opposed to a command that was
/// applied and refused by the state machine, which is `Applied(Err(..))`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ServiceError {
    #[error("this peer is not the leader{}", match leader {
        Some(addr) => format!("; the leader is at {addr}"),
        None => "; no leader is known yet (an election may be in progress, retry shortly)".to_owned(),
    })]
    NotLeader { leader: Option<String> },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The wasm module was refused at submit: the peer's validation message.
    #[error("module rejected: {0}")]
    ModuleRejected(String),
    #[error("internal error on the peer: {0}")]
    Internal(String),
}

/// Encode a request as `[CLIENT_API_VERSION, postcard...]`.
pub fn encode_request(req: &ClientRequest) -> Vec<u8> {
    wire::encode(CLIENT_API_VERSION, req)
}

/// Decode and validate a request from untrusted bytes.
pub fn decode_request(bytes: &[u8]) -> Result<ClientRequest, DecodeError> {
    let req: ClientRequest = wire::decode("client request", CLIENT_API_VERSION, bytes, limits::MAX_MESSAGE_BYTES)?;
    req.validate().map_err(|source| DecodeError::Invalid { what: "client request", source })?;
    Ok(req)
}

/// Encode a response as `[CLIENT_API_VERSION, postcard...]`.
pub fn encode_response(resp: &ClientResponse) -> Vec<u8> {
    wire::encode(CLIENT_API_VERSION, resp)
}

/// Decode and validate a response from untrusted bytes.
pub fn decode_response(bytes: &[u8]) -> Result<ClientResponse, DecodeError> {
    let resp: ClientResponse = wire::decode("client response", CLIENT_API_VERSION, bytes, limits::MAX_MESSAGE_BYTES)?;
    resp.validate().map_err(|source| DecodeError::Invalid { what: "client response", source })?;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{ApplyError, NewJob, Outcome};
    use crate::ids::{FencingToken, Timestamp};
    use crate::records::{JobSpec, Lease, StreamProps, StreamStats};
    use proptest::prelude::*;

    fn stream() -> StreamName {
        StreamName::new("s1").unwrap()
    }

    fn job(id: u64) -> JobRecord {
        JobRecord {
            id: JobId(id),
            stream: stream(),
            module: ModuleHash::of(b"m"),
            spec: JobSpec { args: vec!["3".into()], env: vec![("K".into(), "V".into())], input: b"3".to_vec() },
            priority: 2,
            status: JobStatus::Running,
            ready_at: Timestamp(5),
            attempts: 1,
            lease: Some(Lease { peer: PeerId(1), token: FencingToken(9), expires_at: Timestamp(100) }),
            peer: Some(PeerId(1)),
            created_at: Timestamp(1),
            updated_at: Timestamp(2),
            key: None,
            result: None,
            error: None,
            stdout_tail: vec![],
            stderr_tail: b"warn".to_vec(),
        }
    }

    fn requests() -> Vec<ClientRequest> {
        vec![
            ClientRequest::Write(Command::Submit {
                stream: stream(),
                jobs: vec![NewJob {
                    module: ModuleHash::of(b"m"),
                    spec: JobSpec::default(),
                    priority: None,
                    delay_ms: 10,
                    key: None,
                }],
            }),
            ClientRequest::GetJob(JobId(7)),
            ClientRequest::JobStatuses(vec![JobId(7), JobId(9)]),
            ClientRequest::ListJobs {
                stream: Some(stream()),
                status: Some(JobStatus::Dead),
                after: Some(JobId(3)),
                limit: 100,
            },
            ClientRequest::GetStream(stream()),
            ClientRequest::ListStreams,
            ClientRequest::HasModule(ModuleHash::of(b"x")),
            ClientRequest::GetModule(ModuleHash::of(b"x")),
            ClientRequest::DataGet { stream: stream(), key: b"k".to_vec() },
            ClientRequest::Status,
            ClientRequest::Join {
                info: PeerInfo {
                    host: "h".into(),
                    pid: 7,
                    addresses: vec!["/ip4/127.0.0.1/tcp/7421/p2p/12D3KooW".into()],
                    capacity: 4,
                    labels: vec![],
                    seat: crate::records::Seat::Never,
                },
            },
            ClientRequest::Leave { peer: PeerId(3) },
            ClientRequest::Forward(Command::Tick),
            ClientRequest::ReadIndex,
            ClientRequest::StateDigest,
            ClientRequest::Work(WorkRequest {
                peer: PeerId(4),
                cmds: vec![Command::Tick],
                lease_max: 16,
                release_orphans: true,
                reconcile: Some(Reconcile {
                    keep: vec![(JobId(7), FencingToken(31)), (JobId(9), FencingToken(38))],
                    through: Some(40),
                }),
            }),
        ]
    }

    fn responses() -> Vec<ClientResponse> {
        let info = StreamInfo {
            name: stream(),
            props: StreamProps::default(),
            created_at: Timestamp(3),
            stats: StreamStats::default(),
        };
        vec![
            ClientResponse::Applied(Ok(Outcome::StreamDeleted { jobs_removed: 4 })),
            ClientResponse::Applied(Err(ApplyError::UnknownStream(stream()))),
            ClientResponse::Job(Some(job(1))),
            ClientResponse::Job(None),
            ClientResponse::Jobs(vec![job(1), job(2)]),
            ClientResponse::Stream(Some(info.clone())),
            ClientResponse::Streams(vec![info.clone()]),
            ClientResponse::HasModule(true),
            ClientResponse::Module(Some(b"\0asm".to_vec())),
            ClientResponse::Data(None),
            ClientResponse::Status(ClusterStatus {
                peer: PeerId(1),
                leader: Some(PeerId(2)),
                term: 3,
                commit_index: 10,
                applied_index: 9,
                peers: vec![],
                streams: vec![info],
                voters: vec![PeerId(1), PeerId(2)],
                learners: vec![PeerId(3)],
                now: Timestamp(1_000),
            }),
            ClientResponse::Joined { peer: PeerId(4) },
            ClientResponse::JobStatuses(vec![Some(JobStatus::Dead), None]),
            ClientResponse::Left,
            ClientResponse::Written { index: 12, result: Ok(Outcome::Cancelled) },
            ClientResponse::ReadIndex(11),
            ClientResponse::StateDigest { applied_index: 9, digest: "ab".into() },
            ClientResponse::Work(WorkReply {
                registered: true,
                released: 2,
                outcomes: vec![Ok(Outcome::Cancelled)],
                leased: Some(Ok(Outcome::Leased(vec![]))),
                streams: vec![(stream(), 60_000)],
                now: Timestamp(1_000),
            }),
            ClientResponse::Error(ServiceError::NotLeader { leader: Some("/ip4/10.0.0.2/tcp/7420".into()) }),
        ]
    }

    #[test]
    fn requests_and_responses_round_trip() {
        for req in requests() {
            assert_eq!(decode_request(&encode_request(&req)).unwrap(), req);
        }
        for resp in responses() {
            assert_eq!(decode_response(&encode_response(&resp)).unwrap(), resp);
        }
    }

    #[test]
    fn wrong_version_is_a_named_error() {
        let mut bytes = encode_request(&ClientRequest::Status);
        bytes[0] = CLIENT_API_VERSION + 1;
        let err = decode_request(&bytes).unwrap_err();
        let (found, expected) = (CLIENT_API_VERSION + 1, CLIENT_API_VERSION);
        assert!(
            matches!(err, DecodeError::Version { found: f, expected: e, .. } if (f, e) == (found, expected)),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("unsupported client request version {found} (this build speaks version {expected})")
        );

        let mut bytes = encode_response(&ClientResponse::HasModule(false));
        bytes[0] = 0;
        assert_eq!(
            decode_response(&bytes).unwrap_err().to_string(),
            format!("unsupported client response version 0 (this build speaks version {CLIENT_API_VERSION})")
        );
    }

    #[test]
    fn invalid_writes_are_refused_at_decode() {
        let empty_submit = ClientRequest::Write(Command::Submit { stream: stream(), jobs: vec![] });
        let err = decode_request(&encode_request(&empty_submit)).unwrap_err();
        assert_eq!(err.to_string(), "invalid client request: submit batch is empty");

        let big_limit = ClientRequest::ListJobs { stream: None, status: None, after: None, limit: u32::MAX };
        assert!(matches!(decode_request(&encode_request(&big_limit)), Err(DecodeError::Invalid { .. })));

        let empty_key = ClientRequest::DataGet { stream: stream(), key: vec![] };
        assert_eq!(
            decode_request(&encode_request(&empty_key)).unwrap_err().to_string(),
            "invalid client request: data-store key is empty"
        );
    }

    /// A list of ids is eight times its bytes in memory: its length is
    /// bounded while decoding, not after.
    #[test]
    fn job_status_lists_are_bounded_while_decoding() {
        let ids = |n: usize| ClientRequest::JobStatuses((0..n as u64).map(JobId).collect());
        let at = ids(limits::MAX_BATCH);
        assert_eq!(decode_request(&encode_request(&at)).unwrap(), at);
        let over = encode_request(&ids(limits::MAX_BATCH + 1));
        let want = format!(
            "invalid client request: job status list is too large: {} bytes/items, the limit is {}",
            limits::MAX_BATCH + 1,
            limits::MAX_BATCH
        );
        assert_eq!(decode_request(&over).unwrap_err().to_string(), want);
        // The decoder refuses it itself, before `validate`.
        let raw = wire::decode::<ClientRequest>("client request", CLIENT_API_VERSION, &over, limits::MAX_MESSAGE_BYTES);
        assert_eq!(raw.unwrap_err().to_string(), want);
    }

    #[test]
    fn a_client_cannot_send_a_leaders_own_submit_ran() {
        let job = crate::NewJob {
            module: crate::ModuleHash::of(b"m"),
            spec: crate::JobSpec::default(),
            priority: None,
            delay_ms: 0,
            key: None,
        };
        let limits = crate::RunLimits { job_timeout_ms: 1, fuel: None, memory_limit_bytes: 1 };
        let ran = crate::Ran { index: 0, limits, result: b"forged".to_vec(), stderr_tail: vec![] };
        let cmd =
            Command::SubmitRan { stream: stream(), jobs: vec![job], peer: crate::PeerId(1), max: 1, ran: vec![ran] };
        let work = |cmds| {
            ClientRequest::Work(WorkRequest {
                peer: crate::PeerId(1),
                cmds,
                lease_max: 0,
                release_orphans: false,
                reconcile: None,
            })
        };
        for req in [
            ClientRequest::Write(cmd.clone()),
            ClientRequest::Forward(Command::Batch(vec![Command::Tick, cmd.clone()])),
            work(vec![cmd.clone()]),
        ] {
            let err = decode_request(&encode_request(&req)).unwrap_err().to_string();
            assert_eq!(
                err,
                "invalid client request: invalid command: SubmitRan is written by a leader for the jobs it ran \
                 itself; submit with Submit",
                "{}",
                req.kind()
            );
        }
        assert_eq!(cmd.validate(), Ok(()), "valid as a command: the leader writes it");
        // What a peer that lost the lead forwards instead: the submit and its
        // lease, without the results.
        let forwarded = ClientRequest::Forward(cmd.clone().without_results());
        assert_eq!(decode_request(&encode_request(&forwarded)).unwrap(), forwarded);
        let ClientRequest::Forward(Command::Batch(parts)) = forwarded else { panic!("{forwarded:?}") };
        assert!(matches!(parts.as_slice(), [Command::Submit { .. }, Command::Lease { max: 1, .. }]), "{parts:?}");
    }

    #[test]
    fn service_errors_read_clearly() {
        let msgs: Vec<String> = [
            ServiceError::NotLeader { leader: Some("10.0.0.2:7420".into()) },
            ServiceError::NotLeader { leader: None },
            ServiceError::Unavailable("raft is shutting down".into()),
            ServiceError::InvalidRequest("limit too large".into()),
            ServiceError::ModuleRejected("not a wasm module".into()),
            ServiceError::Internal("disk full".into()),
        ]
        .iter()
        .map(|e| e.to_string())
        .collect();
        expect_test::expect![[r#"
            [
                "this peer is not the leader; the leader is at 10.0.0.2:7420",
                "this peer is not the leader; no leader is known yet (an election may be in progress, retry shortly)",
                "service unavailable: raft is shutting down",
                "invalid request: limit too large",
                "module rejected: not a wasm module",
                "internal error on the peer: disk full",
            ]
        "#]]
        .assert_debug_eq(&msgs);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]
        /// Fuzz-style: random bytes never panic either decoder.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
            let mut versioned = bytes.clone();
            versioned.insert(0, CLIENT_API_VERSION);
            if let Ok(req) = decode_request(&versioned) {
                prop_assert!(req.validate().is_ok());
            }
            let _ = decode_response(&versioned);
        }

        /// Mutating a valid encoding never panics, and what decodes is valid.
        #[test]
        fn mutated_messages_never_panic(which in any::<usize>(), pos in any::<usize>(), byte in any::<u8>()) {
            let reqs = requests();
            let mut b = encode_request(&reqs[which % reqs.len()]);
            let i = pos % b.len();
            b[i] = byte;
            if let Ok(req) = decode_request(&b) {
                prop_assert!(req.validate().is_ok());
            }
            let resps = responses();
            let mut b = encode_response(&resps[which % resps.len()]);
            let i = pos % b.len();
            b[i] = byte;
            let _ = decode_response(&b);
        }
    }
}
