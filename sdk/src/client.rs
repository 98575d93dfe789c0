//! [`Client`]: the one client of an Impetus cluster (the CLI and applications
//! use it). It talks to one peer over libp2p; the peer forwards writes to
//! the leader.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use impetus_proto::api::{ClientRequest, ClientResponse, ClusterStatus, ServiceError};
use impetus_proto::command::{ApplyError, Command, NewJob, Outcome, Submitted};
use impetus_proto::error::InvalidInput;
use impetus_proto::ids::{JobId, ModuleHash, StreamName};
use impetus_proto::limits;
use impetus_proto::records::{JobRecord, JobStatus, StreamInfo, StreamPatch, StreamProps};
use impetus_proto::wire;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::identity::Keypair;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, DialError, FromSwarm, NetworkBehaviour, SwarmEvent, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{oneshot, Semaphore};

use crate::stream::{StreamError, StreamPool, CLIENT_STREAM_PROTOCOL};
use crate::transport::{self, TransportConfig, REQUEST_TIMEOUT};

/// Most requests one client keeps in flight on its connection (each on a
/// stream of its own); more wait their turn. Below
/// [`transport::MAX_CONCURRENT_STREAMS`] so the peer never drops a stream
/// for being at capacity.
pub const MAX_IN_FLIGHT: usize = crate::stream::MAX_POOLED_STREAMS;

/// How long [`Client::connect`] waits for the connection and handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Room left in a submit request for everything but the jobs themselves.
const SUBMIT_OVERHEAD: usize = 64 << 10;
/// Most commands one [`Client::purge`] sends (of `MAX_BATCH` jobs each:
/// a billion jobs), so jobs that keep finishing cannot keep it going.
const PURGE_ROUNDS: usize = 100_000;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not connect to {addr}: {reason} (is a peer running? is the authkey right?)")]
    Connect { addr: String, reason: String },
    /// The request was not sent (no connection could be had): nothing
    /// happened.
    #[error("connection to the peer failed: {0}")]
    Transport(String),
    /// The request went out but the connection failed before its answer:
    /// a write may have been carried out (send it again only with an
    /// idempotency key, or look first).
    #[error("{0}; the request went out, so it may have been carried out")]
    Unanswered(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("request refused before sending: {0}")]
    Invalid(#[from] InvalidInput),
    #[error("stream {0} does not exist")]
    UnknownStream(StreamName),
    #[error("{0} does not exist")]
    UnknownJob(JobId),
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A submit split in batches failed after some of them were
    /// committed: those jobs stay submitted (sending them again without
    /// idempotency keys would submit them twice).
    #[error("{} of {total} jobs were submitted (ids {}..={}) before the rest failed: {error}",
        submitted.len(), first_id(submitted), last_id(submitted))]
    PartlySubmitted { submitted: Vec<Submitted>, total: usize, error: Box<ClientError> },
}

fn first_id(s: &[Submitted]) -> String {
    s.first().map_or_else(String::new, |s| s.job.to_string())
}

fn last_id(s: &[Submitted]) -> String {
    s.last().map_or_else(String::new, |s| s.job.to_string())
}

impl ClientError {
    /// Whether the same request may succeed if sent again shortly: the
    /// cluster is electing a leader or changing membership, or the
    /// connection dropped. A read is always safe to send again.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClientError::Transport(_)
                | ClientError::Unanswered(_)
                | ClientError::Service(ServiceError::NotLeader { .. } | ServiceError::Unavailable(_))
        )
    }
}

/// How long [`Client::wait`] goes on polling when no poll is answered
/// (each fails for a passing reason): past it, it returns the last error.
pub const WAIT_UNANSWERED: Duration = Duration::from_secs(30);

/// The outcome of [`Client::data_cas`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CasOutcome {
    /// Whether the compare-and-set took effect.
    pub swapped: bool,
    /// The value stored now.
    pub current: Option<Vec<u8>>,
}

/// A connection to one peer. Cheap to clone. Requests go over pooled
/// long-lived streams ([`crate::stream`]), straight from the caller's task;
/// a background task drives the libp2p connection (and re-dials it if it
/// drops). The task ends when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Arc<StreamPool>,
    in_flight: Semaphore,
    addr: Multiaddr,
    peer: PeerId,
    /// Dropped with the last clone of the client: the connection task ends.
    _stop: oneshot::Sender<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl Client {
    /// Connect to the peer at `addr` (`127.0.0.1:7420`, `host:port` or a
    /// multiaddr `/ip4/../tcp/..`), with the cluster's `authkey` if it has
    /// one. Fails within about [`CONNECT_TIMEOUT`] if no peer answers.
    pub async fn connect(addr: &str, authkey: Option<&str>) -> Result<Client, ClientError> {
        let cfg = TransportConfig {
            authkey: authkey.map(str::to_owned),
            handshake_timeout: CONNECT_TIMEOUT,
            ..TransportConfig::default()
        };
        Client::connect_with(addr, cfg).await
    }

    /// [`Client::connect`] with an explicit transport configuration.
    pub async fn connect_with(addr: &str, cfg: TransportConfig) -> Result<Client, ClientError> {
        let connect_err = |reason: String| ClientError::Connect { addr: addr.to_owned(), reason };
        let target = transport::resolve_addr(addr).await.map_err(connect_err)?;
        let behaviour = ClientBehaviour { streams: libp2p_stream::Behaviour::new(), redial: Redial::default() };
        let mut swarm = transport::build_swarm(Keypair::generate_ed25519(), &cfg, behaviour)
            .map_err(|e| connect_err(e.to_string()))?;

        let opts = DialOpts::unknown_peer_id().address(target.clone()).build();
        let dial = opts.connection_id();
        swarm.dial(opts).map_err(|e| connect_err(e.to_string()))?;
        // The transport bounds the handshake; this bounds everything else.
        let wait = cfg.handshake_timeout + Duration::from_millis(500);
        let peer = tokio::time::timeout(wait, async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, connection_id, .. } if connection_id == dial => {
                        return Ok(peer_id);
                    }
                    SwarmEvent::OutgoingConnectionError { connection_id, error, .. } if connection_id == dial => {
                        return Err(describe_dial_error(&error, cfg.handshake_timeout));
                    }
                    other => tracing::trace!(event = ?other, "swarm event while connecting"),
                }
            }
        })
        .await
        .map_err(|_| connect_err(format!("no handshake within {wait:?}")))?
        .map_err(connect_err)?;

        // Re-dial this address if the connection drops (idle timeout).
        swarm.behaviour_mut().redial.target = Some((peer, target.clone()));
        tracing::debug!(%peer, addr = %target, "connected");
        let pool = Arc::new(StreamPool::new(swarm.behaviour().streams.new_control(), peer));
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(drive(swarm, peer, target.clone(), pool.clone(), stopped));
        let shared = Shared { pool, in_flight: Semaphore::new(MAX_IN_FLIGHT), addr: target, peer, _stop: stop };
        Ok(Client { shared: Arc::new(shared) })
    }

    /// The address this client is connected to.
    pub fn addr(&self) -> &Multiaddr {
        &self.shared.addr
    }

    /// How many streams this client has opened: one per request it had in
    /// flight at its busiest, as streams are reused.
    pub fn streams_opened(&self) -> u64 {
        self.shared.pool.opened()
    }

    /// The libp2p identity of the peer this client talks to.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer
    }

    /// Send one request and wait for its answer (at most [`REQUEST_TIMEOUT`]).
    /// The request is validated first. A `ClientResponse::Error` is returned
    /// as is; the typed helpers turn it into [`ClientError::Service`].
    pub async fn request(&self, req: ClientRequest) -> Result<ClientResponse, ClientError> {
        req.validate()?;
        let shared = &self.shared;
        // The semaphore is never closed.
        let _permit = shared.in_flight.acquire().await.map_err(|e| ClientError::Transport(e.to_string()))?;
        tracing::trace!(kind = req.kind(), "request");
        shared.pool.request(&req, REQUEST_TIMEOUT).await.map_err(|e| stream_error(e, &shared.addr))
    }

    /// Commit a command through the peer and return its outcome; a refused
    /// command is [`ClientError::Apply`].
    pub async fn write(&self, cmd: Command) -> Result<Outcome, ClientError> {
        match self.request(ClientRequest::Write(cmd)).await? {
            ClientResponse::Applied(Ok(outcome)) => Ok(outcome),
            ClientResponse::Applied(Err(e)) => Err(ClientError::Apply(e)),
            other => Err(unexpected("write", other)),
        }
    }

    /// Send a query and hand its answer to `pick`; an `Error` answer is
    /// [`ClientError::Service`], an answer `pick` does not want is a protocol error.
    async fn query<T>(
        &self,
        req: ClientRequest,
        pick: impl FnOnce(ClientResponse) -> Option<T>,
    ) -> Result<T, ClientError> {
        let what = req.kind();
        match self.request(req).await? {
            ClientResponse::Error(e) => Err(ClientError::Service(e)),
            resp => {
                let kind = resp.kind();
                pick(resp).ok_or_else(|| {
                    ClientError::Protocol(format!("the peer answered a {what} request with a {kind} response"))
                })
            }
        }
    }

    pub async fn create_stream(&self, name: &StreamName, props: StreamProps) -> Result<(), ClientError> {
        match self.write(Command::CreateStream { name: name.clone(), props }).await? {
            Outcome::StreamCreated => Ok(()),
            other => Err(unexpected_outcome("create-stream", &other)),
        }
    }

    pub async fn update_stream(&self, name: &StreamName, patch: StreamPatch) -> Result<(), ClientError> {
        match self.write(Command::UpdateStream { name: name.clone(), patch }).await? {
            Outcome::StreamUpdated => Ok(()),
            other => Err(unexpected_outcome("update-stream", &other)),
        }
    }

    /// Delete a stream; returns how many jobs went with it.
    pub async fn delete_stream(&self, name: &StreamName, force: bool) -> Result<u64, ClientError> {
        match self.write(Command::DeleteStream { name: name.clone(), force }).await? {
            Outcome::StreamDeleted { jobs_removed } => Ok(jobs_removed),
            other => Err(unexpected_outcome("delete-stream", &other)),
        }
    }

    pub async fn streams(&self) -> Result<Vec<StreamInfo>, ClientError> {
        self.query(ClientRequest::ListStreams, |r| match r {
            ClientResponse::Streams(s) => Some(s),
            _ => None,
        })
        .await
    }

    /// One stream; [`ClientError::UnknownStream`] if it does not exist.
    pub async fn stream(&self, name: &StreamName) -> Result<StreamInfo, ClientError> {
        self.query(ClientRequest::GetStream(name.clone()), |r| match r {
            ClientResponse::Stream(s) => Some(s),
            _ => None,
        })
        .await?
        .ok_or_else(|| ClientError::UnknownStream(name.clone()))
    }

    /// Store a wasm module; the upload is skipped when the cluster has it.
    pub async fn put_module(&self, bytes: Vec<u8>) -> Result<ModuleHash, ClientError> {
        let hash = ModuleHash::of(&bytes);
        if self.has_module(hash).await? {
            tracing::debug!(module = %hash, "module already stored, upload skipped");
            return Ok(hash);
        }
        match self.write(Command::PutModule { hash, bytes }).await? {
            Outcome::ModuleStored { .. } => Ok(hash),
            other => Err(unexpected_outcome("put-module", &other)),
        }
    }

    pub async fn has_module(&self, hash: ModuleHash) -> Result<bool, ClientError> {
        self.query(ClientRequest::HasModule(hash), |r| match r {
            ClientResponse::HasModule(b) => Some(b),
            _ => None,
        })
        .await
    }

    /// The bytes of a stored module, if any.
    pub async fn module(&self, hash: ModuleHash) -> Result<Option<Vec<u8>>, ClientError> {
        self.query(ClientRequest::GetModule(hash), |r| match r {
            ClientResponse::Module(m) => Some(m),
            _ => None,
        })
        .await
    }

    /// Submit jobs to a stream, in batches of at most [`limits::MAX_BATCH`]
    /// jobs and [`limits::MAX_MESSAGE_BYTES`] bytes. Returns one entry per
    /// job, in order. Batches are committed one after the other: if one
    /// fails after others were committed, the error is
    /// [`ClientError::PartlySubmitted`], which carries the jobs that stay
    /// submitted (use idempotency keys to retry the rest safely).
    pub async fn submit(&self, stream: &StreamName, jobs: Vec<NewJob>) -> Result<Vec<Submitted>, ClientError> {
        let total = jobs.len();
        let mut out = Vec::with_capacity(total);
        for batch in split_batches(jobs, limits::MAX_BATCH, limits::MAX_MESSAGE_BYTES - SUBMIT_OVERHEAD) {
            let n = batch.len();
            let failed = match self.write(Command::Submit { stream: stream.clone(), jobs: batch }).await {
                Ok(Outcome::Submitted(s)) if s.len() == n => {
                    out.extend(s);
                    continue;
                }
                Ok(Outcome::Submitted(s)) => {
                    ClientError::Protocol(format!("submitted {n} jobs but the peer answered for {}", s.len()))
                }
                Ok(other) => unexpected_outcome("submit", &other),
                Err(e) => e,
            };
            if out.is_empty() {
                return Err(failed);
            }
            return Err(ClientError::PartlySubmitted { submitted: out, total, error: Box::new(failed) });
        }
        Ok(out)
    }

    /// One job; [`ClientError::UnknownJob`] if it does not exist.
    pub async fn job(&self, id: JobId) -> Result<JobRecord, ClientError> {
        self.query(ClientRequest::GetJob(id), |r| match r {
            ClientResponse::Job(j) => Some(j),
            _ => None,
        })
        .await?
        .ok_or(ClientError::UnknownJob(id))
    }

    /// Jobs ordered by id, after `after`, at most `limit` (≤ [`limits::MAX_BATCH`]).
    /// The peer returns fewer when their records pass its byte budget (large
    /// inputs or results): a short page is not the last; page on from its
    /// last id until a page comes back empty.
    pub async fn jobs(
        &self,
        stream: Option<&StreamName>,
        status: Option<JobStatus>,
        after: Option<JobId>,
        limit: u32,
    ) -> Result<Vec<JobRecord>, ClientError> {
        let req = ClientRequest::ListJobs { stream: stream.cloned(), status, after, limit };
        self.query(req, |r| match r {
            ClientResponse::Jobs(j) => Some(j),
            _ => None,
        })
        .await
    }

    /// Wait until every job in `ids` is final (Succeeded, Dead or
    /// Cancelled), polling with a backoff from 5 ms to 200 ms, and return
    /// their records in the order of `ids`. `progress(done, total)` is called
    /// after every poll. A read refused for a passing reason
    /// ([`ClientError::is_transient`]: an election, a membership change) is
    /// asked again, but not for ever: when no poll has been answered for
    /// [`WAIT_UNANSWERED`] (the peer died, the cluster lost its quorum),
    /// the last such error is returned. Fails with [`ClientError::Timeout`]
    /// after `timeout`.
    pub async fn wait(
        &self,
        ids: &[JobId],
        timeout: Duration,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<JobRecord>, ClientError> {
        const MIN_BACKOFF: Duration = Duration::from_millis(5);
        const MAX_BACKOFF: Duration = Duration::from_millis(200);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending: BTreeSet<JobId> = ids.iter().copied().collect();
        let total = pending.len();
        let mut done: BTreeMap<JobId, JobRecord> = BTreeMap::new();
        let mut backoff = MIN_BACKOFF;
        let mut answered_at = tokio::time::Instant::now();
        let timed_out = |pending: usize| ClientError::Timeout {
            what: format!("{pending} of {total} jobs to finish"),
            after: timeout,
        };
        loop {
            // One status request per MAX_BATCH pending jobs; full records
            // only once a job is final.
            let ids: Vec<JobId> = pending.iter().copied().collect();
            let poll = futures::stream::iter(ids.chunks(limits::MAX_BATCH).map(<[JobId]>::to_vec).collect::<Vec<_>>())
                .map(|chunk| async move { self.job_statuses(&chunk).await.map(|st| chunk.into_iter().zip(st)) })
                .buffer_unordered(4)
                .collect::<Vec<_>>();
            let mut polled = tokio::time::timeout_at(deadline, poll).await.map_err(|_| timed_out(pending.len()))?;
            if polled.iter().any(Result::is_ok) {
                answered_at = tokio::time::Instant::now();
            } else if answered_at.elapsed() >= WAIT_UNANSWERED {
                if let Some(Err(e)) = polled.pop() {
                    tracing::warn!(error = %e, pending = pending.len(), "no answer while waiting for jobs; giving up");
                    return Err(e);
                }
            }
            let mut finished = Vec::new();
            // A read that failed for a passing reason (an election, a
            // membership change) is asked again next round.
            for chunk in polled.into_iter().filter(|c| !c.as_ref().is_err_and(ClientError::is_transient)) {
                for (id, status) in chunk? {
                    match status {
                        Some(s) if s.is_final() => finished.push(id),
                        Some(_) => {}
                        None => return Err(vanished(id)),
                    }
                }
            }
            let records = futures::stream::iter(finished)
                .map(|id| self.job(id))
                .buffer_unordered(MAX_IN_FLIGHT / 2)
                .collect::<Vec<_>>();
            let records = tokio::time::timeout_at(deadline, records).await.map_err(|_| timed_out(pending.len()))?;
            let before = pending.len();
            for rec in records.into_iter().filter(|r| !r.as_ref().is_err_and(ClientError::is_transient)) {
                let rec = rec?;
                pending.remove(&rec.id);
                done.insert(rec.id, rec);
            }
            progress(done.len(), total);
            if pending.is_empty() {
                break;
            }
            backoff = if pending.len() < before { MIN_BACKOFF } else { (backoff * 2).min(MAX_BACKOFF) };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(timed_out(pending.len()));
            }
            tokio::time::sleep_until((now + backoff).min(deadline)).await;
        }
        ids.iter().map(|id| done.get(id).cloned().ok_or_else(|| vanished(*id))).collect()
    }

    /// The status of each job in `ids` (at most `limits::MAX_BATCH`), in
    /// order; `None` for a job the cluster does not know.
    pub async fn job_statuses(&self, ids: &[JobId]) -> Result<Vec<Option<JobStatus>>, ClientError> {
        self.query(ClientRequest::JobStatuses(ids.to_vec()), |r| match r {
            ClientResponse::JobStatuses(s) => Some(s),
            _ => None,
        })
        .await
    }

    pub async fn cancel(&self, id: JobId) -> Result<(), ClientError> {
        match self.write(Command::Cancel { job: id }).await? {
            Outcome::Cancelled => Ok(()),
            other => Err(unexpected_outcome("cancel", &other)),
        }
    }

    /// Forget the finished jobs (Succeeded, Dead, Cancelled) of `stream`
    /// whose last change is at least `older_than` old, with their results
    /// and idempotency keys; live jobs and the stream's totals stay.
    /// Returns how many went. Runs as commands of at most
    /// [`limits::MAX_BATCH`] jobs each; if one fails, those before it are
    /// purged (purging again goes on from there).
    pub async fn purge(&self, stream: &StreamName, older_than: Duration) -> Result<u64, ClientError> {
        let older_than_ms = u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX);
        let max = limits::MAX_BATCH as u32;
        let mut purged = 0;
        // Bounded: each round but the last forgets `max` jobs.
        for _ in 0..PURGE_ROUNDS {
            let cmd = Command::Purge { stream: stream.clone(), older_than_ms, max };
            match self.write(cmd).await? {
                Outcome::Purged { jobs_removed } => {
                    purged += jobs_removed;
                    if jobs_removed < u64::from(max) {
                        break;
                    }
                }
                other => return Err(unexpected_outcome("purge", &other)),
            }
        }
        Ok(purged)
    }

    /// Requeue a Dead or Cancelled job with its attempts reset.
    pub async fn retry(&self, id: JobId) -> Result<(), ClientError> {
        match self.write(Command::Retry { job: id }).await? {
            Outcome::Retried => Ok(()),
            other => Err(unexpected_outcome("retry", &other)),
        }
    }

    pub async fn data_get(&self, stream: &StreamName, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.query(ClientRequest::DataGet { stream: stream.clone(), key: key.to_vec() }, |r| match r {
            ClientResponse::Data(d) => Some(d),
            _ => None,
        })
        .await
    }

    pub async fn data_put(&self, stream: &StreamName, key: &[u8], value: Vec<u8>) -> Result<(), ClientError> {
        match self.write(Command::DataPut { stream: stream.clone(), key: key.to_vec(), value }).await? {
            Outcome::DataWritten => Ok(()),
            other => Err(unexpected_outcome("data-put", &other)),
        }
    }

    pub async fn data_delete(&self, stream: &StreamName, key: &[u8]) -> Result<(), ClientError> {
        match self.write(Command::DataDelete { stream: stream.clone(), key: key.to_vec() }).await? {
            Outcome::DataWritten => Ok(()),
            other => Err(unexpected_outcome("data-delete", &other)),
        }
    }

    /// Set `key` to `new` (delete it when `None`) only if its value is
    /// `expected` (`None` = absent).
    pub async fn data_cas(
        &self,
        stream: &StreamName,
        key: &[u8],
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<CasOutcome, ClientError> {
        let cmd = Command::DataCas { stream: stream.clone(), key: key.to_vec(), expected, new };
        match self.write(cmd).await? {
            Outcome::DataCas { swapped, current } => Ok(CasOutcome { swapped, current }),
            other => Err(unexpected_outcome("data-cas", &other)),
        }
    }

    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        self.query(ClientRequest::Status, |r| match r {
            ClientResponse::Status(s) => Some(s),
            _ => None,
        })
        .await
    }
}

fn unexpected(what: &str, resp: ClientResponse) -> ClientError {
    match resp {
        ClientResponse::Error(e) => ClientError::Service(e),
        other => ClientError::Protocol(format!("the peer answered a {what} request with a {} response", other.kind())),
    }
}

fn unexpected_outcome(what: &str, outcome: &Outcome) -> ClientError {
    ClientError::Protocol(format!("the peer answered {what} with the outcome {outcome:?}"))
}

/// The root cause of a failed dial, without libp2p's nesting; a stalled
/// handshake (the usual sign of a wrong authkey) is named as such.
fn describe_dial_error(e: &DialError, timeout: Duration) -> String {
    let root = match e {
        DialError::Transport(errs) => match errs.first() {
            Some((_, te)) => {
                let mut cur: &dyn std::error::Error = te;
                while let Some(next) = cur.source() {
                    cur = next;
                }
                cur.to_string()
            }
            None => e.to_string(),
        },
        other => other.to_string(),
    };
    if root.to_lowercase().contains("timeout") || root.to_lowercase().contains("timed out") {
        format!("handshake failed: no answer within {timeout:?}")
    } else {
        root
    }
}

/// Split jobs into batches of at most `max_jobs` jobs and about `max_bytes`
/// encoded bytes each (a single job always gets a batch of its own).
fn split_batches(jobs: Vec<NewJob>, max_jobs: usize, max_bytes: usize) -> Vec<Vec<NewJob>> {
    let mut batches = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0usize;
    for job in jobs {
        // The exact postcard size of the job (the version byte aside).
        let size = wire::encode(0, &job).len();
        if !current.is_empty() && (current.len() >= max_jobs || bytes + size > max_bytes) {
            batches.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(job);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// The client's swarm: streams, and the address to re-dial.
#[derive(NetworkBehaviour)]
struct ClientBehaviour {
    streams: libp2p_stream::Behaviour,
    redial: Redial,
}

/// Gives the swarm the client's one peer address when a stream is opened
/// after the connection dropped (libp2p-stream keeps no addresses).
#[derive(Default)]
struct Redial {
    target: Option<(PeerId, Multiaddr)>,
}

impl NetworkBehaviour for Redial {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(match &self.target {
            Some((p, addr)) if peer == Some(*p) => vec![addr.clone()],
            _ => vec![],
        })
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm<'_>) {}

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// The background task: drives the connection until the client is dropped;
/// streams idle in the pool die with their connection.
async fn drive(
    mut swarm: Swarm<ClientBehaviour>,
    peer: PeerId,
    addr: Multiaddr,
    pool: Arc<StreamPool>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => break,
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionClosed { cause, num_established, .. } => {
                    tracing::debug!(%peer, %addr, cause = ?cause, "connection closed");
                    if num_established == 0 {
                        pool.clear();
                    }
                }
                other => tracing::trace!(event = ?other, "swarm event"),
            },
        }
    }
    tracing::debug!(%peer, "client task stopped");
}

fn stream_error(e: StreamError, addr: &Multiaddr) -> ClientError {
    match e {
        StreamError::Unsupported(_) => ClientError::Protocol(format!(
            "the peer at {addr} does not speak {CLIENT_STREAM_PROTOCOL} (a different Impetus version?)"
        )),
        StreamError::Open(e) => ClientError::Transport(format!("cannot reach {addr}: {e}")),
        StreamError::TooLarge { .. } => ClientError::Protocol(e.to_string()),
        StreamError::Timeout(after) => ClientError::Timeout { what: format!("an answer from {addr}"), after },
        StreamError::BadAnswer(e) => ClientError::Protocol(format!("bad answer from {addr}: {e}")),
        StreamError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            ClientError::Protocol(format!("bad answer from {addr}: {e}"))
        }
        StreamError::Io(e) => {
            ClientError::Unanswered(format!("the connection to {addr} failed before the answer arrived: {e}"))
        }
    }
}

/// A job waited for is no longer in the cluster.
fn vanished(id: JobId) -> ClientError {
    ClientError::Protocol(format!(
        "{id} vanished while waiting (purged, forgotten past its stream's retention, or its stream deleted)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use impetus_proto::records::JobSpec;

    fn job(input: usize) -> NewJob {
        NewJob {
            module: ModuleHash::of(b"m"),
            spec: JobSpec { input: vec![7; input], ..JobSpec::default() },
            priority: None,
            delay_ms: 0,
            key: None,
        }
    }

    #[test]
    fn batches_respect_count_and_size() {
        let by_count = split_batches((0..25).map(|_| job(1)).collect(), 10, usize::MAX);
        assert_eq!(by_count.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 10, 5]);

        let by_size = split_batches((0..10).map(|_| job(1000)).collect(), 100, 3500);
        assert!(by_size.iter().all(|b| b.iter().map(|j| wire::encode(0, j).len()).sum::<usize>() <= 3500));
        assert_eq!(by_size.iter().map(Vec::len).sum::<usize>(), 10);
        assert_eq!(by_size.len(), 4);

        // One job over the budget still goes, alone.
        let big = split_batches(vec![job(10), job(5000), job(10)], 100, 1000);
        assert_eq!(big.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1]);
        assert!(split_batches(vec![], 10, 10).is_empty());
    }

    #[test]
    fn errors_read_clearly() {
        let e = ClientError::Connect { addr: "127.0.0.1:1".into(), reason: "connection refused".into() };
        assert_eq!(
            e.to_string(),
            "could not connect to 127.0.0.1:1: connection refused (is a peer running? is the authkey right?)"
        );
        let e = unexpected("get-job", ClientResponse::HasModule(true));
        assert_eq!(e.to_string(), "protocol error: the peer answered a get-job request with a has-module response");
        let e = unexpected("get-job", ClientResponse::Error(ServiceError::Unavailable("no quorum".into())));
        assert!(matches!(e, ClientError::Service(ServiceError::Unavailable(_))));
    }
}
