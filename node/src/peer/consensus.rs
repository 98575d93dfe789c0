//! What the peer needs from Raft: commit a command, read the applied state.

use std::collections::BTreeSet;
use std::future::Future;

use impetus_proto::api::{Reconcile, WorkReply, WorkRequest};
use impetus_proto::{limits, ApplyError, ApplyResult, Command, ModuleHash, Outcome, Timestamp};
use impetus_queue::State;

/// Why a write did not commit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConsensusError {
    #[error("this peer is not the leader (leader: {})", leader.as_deref().unwrap_or("unknown"))]
    NotLeader { leader: Option<String>, leader_id: Option<u64> },
    #[error("consensus unavailable: {0}")]
    Unavailable(String),
}

/// Raft as the peer sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub node: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Raft voters and learners (node ids are peer ids).
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

impl RaftStatus {
    /// This node is a voter.
    pub fn is_voter(&self) -> bool {
        self.voters.contains(&self.node)
    }

    /// This node is a voter or a learner: its replica is the cluster's,
    /// and it hears from the leader (a node outside membership hears from
    /// no one: the leader its Raft names is stale).
    pub fn holds_replica(&self) -> bool {
        self.is_voter() || self.learners.contains(&self.node)
    }

    /// This node leads as a voter of its own configuration (not one taken
    /// out of membership that still names itself leader).
    pub fn leads_as_voter(&self) -> bool {
        self.leader == Some(self.node) && self.is_voter()
    }
}

pub trait Consensus: Send + Sync + 'static {
    /// Commit `cmd` stamped with `now` and return its outcome once applied on
    /// this peer. Acknowledged only after a quorum has flushed it.
    fn write(&self, now: Timestamp, cmd: Command) -> impl Future<Output = Result<ApplyResult, ConsensusError>> + Send;
    /// Read this peer's applied state.
    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T;
    /// The time a write proposed now is stamped with, `wall` being this
    /// peer's clock: `wall` itself unless an implementation keeps the
    /// state's time going while the clock is behind it
    /// (`RaftConsensus`: `leader_stamp`).
    fn stamp(&self, wall: Timestamp) -> Timestamp {
        wall
    }
    fn status(&self) -> RaftStatus;
    /// Whether this peer holds Raft state (a vote, a log or a membership):
    /// a voter or learner, or one restarted on its data. A worker holds none.
    fn holds_state(&self) -> impl Future<Output = bool> + Send;
    /// Bring this replica's applied state up to the leader's commit point
    /// at the time of the call (a linearizable read point). Fails (bounded)
    /// while no leader confirms one; the caller may try again.
    fn catch_up(&self) -> impl Future<Output = Result<(), ConsensusError>> + Send;
    /// A module's bytes by hash, from this peer's replica; an implementation
    /// whose replica may lag (a follower) asks the cluster when it is missing.
    fn module(&self, hash: ModuleHash) -> impl Future<Output = Option<Vec<u8>>> + Send {
        let bytes = self.read(|s| s.module(&hash).map(<[u8]>::to_vec));
        async move { bytes }
    }
    /// One turn of a worker ([`serve_work`] on this peer's state). A peer
    /// that holds no Raft state sends it to the leader instead.
    fn work(&self, now: Timestamp, req: WorkRequest) -> impl Future<Output = Result<WorkReply, ConsensusError>> + Send {
        serve_work(self, now, req)
    }
}

/// One turn of a worker, against `c`'s state: at a peer's start
/// (`release_orphans`), clear the draining mark its last run left and hand
/// back its orphaned leases; asked to `reconcile`, hand back the leases it
/// holds but does not run (granted in an answer it never got); commit the worker's commands, lease up to `lease_max` jobs from
/// the streams it may lease from — all as one entry (group commit). On an
/// idle leader with a deadline due (a delayed job, an expiring lease, a
/// finished job past its stream's retention) a bare
/// `Tick` advances time.
pub async fn serve_work<C: Consensus + ?Sized>(
    c: &C,
    now: Timestamp,
    req: WorkRequest,
) -> Result<WorkReply, ConsensusError> {
    let WorkRequest { peer, cmds, lease_max, release_orphans, reconcile } = req;
    let keep = reconcile.map(|Reconcile { keep, through }| (keep.into_iter().collect::<BTreeSet<_>>(), through));
    // A starting peer the registry does not know is taken for removed
    // (`PeerError::Removed`): say so only from a state caught up to a read
    // point the leader confirms (a leader just elected, a voter's replica,
    // may not have applied all that was committed).
    if release_orphans && !c.read(|s| s.has_peer(peer)) {
        c.catch_up().await?;
    }
    let (registered, drained, held, streams, next_deadline) = c.read(|s| {
        let mut held = if release_orphans || keep.is_some() { s.leases_held_by(peer) } else { Vec::new() };
        if let (false, Some((keep, through))) = (release_orphans, &keep) {
            held.retain(|lease| !keep.contains(lease) && through.is_none_or(|t| lease.1 .0 <= t));
        }
        let drained = release_orphans && s.peer(peer).is_some_and(|p| p.draining);
        (s.has_peer(peer), drained, held, s.leasable_streams_idle(peer), s.poll_timeout())
    });
    // Compared with the time a Tick would carry, not the wall clock: that
    // may be behind the state's time (and then no Tick would ever be due).
    let due = next_deadline.is_some_and(|t| t <= c.stamp(now));
    let released = held.len() as u32;
    let lease = lease_max > 0 && !streams.is_empty();
    let status = c.status();
    let tick = cmds.is_empty() && !lease && held.is_empty() && !drained && due && status.leader == Some(status.node);
    let sent = cmds.len();
    let mut all = Vec::with_capacity(sent + 4);
    if drained {
        all.push(Command::DrainPeer { peer, draining: false });
    }
    if !held.is_empty() {
        all.push(Command::Release { peer, leases: held });
    }
    all.extend(cmds);
    if lease {
        // Every stream this peer may lease from; past a command's bound on
        // a list, none named, which means all of them.
        let names = if streams.len() > limits::MAX_BATCH {
            Vec::new()
        } else {
            streams.iter().map(|(n, _)| n.clone()).collect()
        };
        all.push(Command::Lease { peer, streams: names, max: lease_max });
    }
    if tick {
        all.push(Command::Tick);
    }
    let mut reply =
        WorkReply { registered, released, outcomes: Vec::new(), leased: None, streams, now: Timestamp::ZERO };
    let parts = all.len();
    let mut outcomes: Vec<ApplyResult> = match parts {
        0 => {
            reply.now = c.read(State::now);
            return Ok(reply);
        }
        1 => vec![c.write(now, all.remove(0)).await?],
        _ => match c.write(now, Command::Batch(all)).await? {
            Ok(Outcome::Batch(v)) => v,
            Ok(other) => vec![Err(ApplyError::Invalid(format!("a batch answered {other:?}"))); parts],
            Err(e) => vec![Err(e); parts],
        },
    };
    reply.now = c.read(State::now);
    if drained && !outcomes.is_empty() {
        match outcomes.remove(0) {
            Ok(_) => tracing::info!(%peer, "back from draining: the registry's mark is cleared"),
            Err(e) => tracing::warn!(%peer, error = %e, "clearing the draining mark refused"),
        }
    }
    if released > 0 && !outcomes.is_empty() {
        reply.released = match outcomes.remove(0) {
            // A lease that changed since it was read (expired, completed)
            // is refused alone.
            Ok(Outcome::Released(each)) => each.iter().filter(|r| r.is_ok()).count() as u32,
            Ok(other) => {
                tracing::warn!(%peer, outcome = ?other, "handing back orphaned leases answered out of turn");
                0
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "handing back orphaned leases refused");
                0
            }
        };
    }
    let rest = outcomes.split_off(sent.min(outcomes.len()));
    reply.outcomes = outcomes;
    if lease {
        reply.leased = rest.into_iter().next();
    }
    Ok(reply)
}
