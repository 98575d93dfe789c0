//! [`Consensus`] and [`Membership`] on openraft: writes go through
//! `client_write`, reads come from the applied state handle, membership
//! changes through `add_learner`/`change_membership`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use impetus_proto::{ApplyResult, Command, PeerId, Seat, Timestamp};
use impetus_queue::State;
use impetus_raft::openraft::async_runtime::WatchReceiver;
use impetus_raft::openraft::error::{ClientWriteError, LinearizableReadError, RaftError};
use impetus_raft::openraft::{AsyncRuntime, ChangeMembers, Instant, RaftTypeConfig, ReadPolicy};
use impetus_raft::{ImpetusConfig, ImpetusRaft, PeerNode, Request, StateHandle};

use crate::peer::membership::{candidate, still_silent, Change, Membership, Policy, View};
use crate::peer::{Consensus, ConsensusError, RaftStatus};

/// One Raft member and its applied state.
pub struct RaftConsensus<C: ImpetusConfig> {
    raft: ImpetusRaft<C>,
    state: StateHandle,
    node: u64,
    /// When this leader first saw each follower without an acknowledgement
    /// (per term): a follower that never answers is silent since then.
    unacked_since: Mutex<BTreeMap<(u64, u64), Instant_<C>>>,
    /// Per worker: its last heartbeat stamp as last seen, and when this
    /// peer saw it change. Silence measured on this clock does not jump
    /// with a voter's wall clock (the state machine's time is the largest
    /// any leader stamped).
    heartbeat_seen: Mutex<BTreeMap<u64, (Timestamp, Instant_<C>)>>,
    /// One membership change at a time from this peer (joins, promotions,
    /// departures): openraft refuses a change while another is in flight.
    changing: tokio::sync::Mutex<()>,
    /// The clock writes are stamped by when this peer's wall clock is
    /// behind the state's time ([`leader_stamp`]), and when it was set.
    stamp_floor: Mutex<Option<StampFloor>>,
    /// The origin of this peer's monotonic time for [`leader_stamp`].
    born: Instant_<C>,
}

/// The state's time when a leader found its wall clock behind it, and the
/// leader's monotonic time then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StampFloor {
    state: Timestamp,
    at: Duration,
}

/// The time a leader stamps a write with: its wall clock `wall`, unless
/// that is behind the state's time `state_now` (a former leader's clock
/// ran ahead, or this one's stepped back): then the state's time as it was
/// first found ahead, advanced by half the monotonic time `mono` elapsed
/// since (re-founded if the state's time has passed that too).
///
/// The state machine keeps the largest stamp, so stamping the wall clock
/// would stop the state's time until the wall clock caught up: no lease
/// would expire, no delayed job come due, for as long as the clocks
/// differ. Stamping on at full pace would keep the offset for ever (the
/// wall clock would never catch up). At half pace, time goes on (a lease
/// lasts at most twice its TTL) and the wall clock catches up, in twice
/// the offset. (Workers renew on their own clocks, so an offset between
/// the state's time and theirs costs no lease.)
fn leader_stamp(wall: Timestamp, state_now: Timestamp, floor: &mut Option<StampFloor>, mono: Duration) -> Timestamp {
    if wall >= state_now {
        *floor = None;
        return wall;
    }
    let ran = |f: &StampFloor| {
        let ms = u64::try_from(mono.saturating_sub(f.at).as_millis()).unwrap_or(u64::MAX);
        f.state.saturating_add_ms(ms / 2)
    };
    match floor {
        Some(f) if ran(f) >= state_now => ran(f),
        _ => {
            *floor = Some(StampFloor { state: state_now, at: mono });
            state_now
        }
    }
}

/// How long a linearizable read waits for a quorum to confirm the leader.
const READ_INDEX_WAIT: Duration = Duration::from_secs(3);

/// How long a membership change waits for the one in flight to finish.
const CHANGE_WAIT: Duration = Duration::from_secs(10);
/// How long [`Consensus::catch_up`] waits for the replica to apply up to
/// the read point.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

impl<C: ImpetusConfig> std::fmt::Debug for RaftConsensus<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftConsensus").field("node", &self.node).finish_non_exhaustive()
    }
}

/// The openraft runtime of `C` and its instant type: time and sleeps go
/// through it, so the simulator runs this code on its own clock.
type Rt<C> = <C as RaftTypeConfig>::AsyncRuntime;
type Instant_<C> = <Rt<C> as AsyncRuntime>::Instant;

fn write_error<C: ImpetusConfig>(e: RaftError<C, ClientWriteError<C>>) -> ConsensusError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ConsensusError::NotLeader { leader: f.leader_node.map(|n| n.addr.clone()), leader_id: f.leader_id }
        }
        e => ConsensusError::Unavailable(e.to_string()),
    }
}

impl<C: ImpetusConfig> RaftConsensus<C> {
    pub fn new(raft: ImpetusRaft<C>, state: StateHandle, node: u64) -> RaftConsensus<C> {
        RaftConsensus {
            raft,
            state,
            node,
            unacked_since: Mutex::new(BTreeMap::new()),
            heartbeat_seen: Mutex::new(BTreeMap::new()),
            changing: tokio::sync::Mutex::new(()),
            stamp_floor: Mutex::new(None),
            born: Instant_::<C>::now(),
        }
    }

    pub fn raft(&self) -> &ImpetusRaft<C> {
        &self.raft
    }

    pub fn state(&self) -> &StateHandle {
        &self.state
    }

    /// The addresses membership records for every node, in id order.
    pub fn member_addrs(&self) -> Vec<String> {
        let m = self.raft.metrics().borrow_watched().membership_config.clone();
        m.membership().nodes().map(|(_, n)| n.addr.clone()).collect()
    }

    /// The address membership records for node `id`.
    pub fn member_addr(&self, id: u64) -> Option<String> {
        self.raft.metrics().borrow_watched().membership_config.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// [`Consensus::write`], also returning the entry's log index.
    ///
    /// A command that breaks a rule of the vocabulary is refused here, as
    /// applying it would refuse it, and never written: replicas decode the
    /// log with every list bounded (`impetus_proto::wire`), so an entry past
    /// a bound would stop replication and restarts. (Index 0: not written.)
    pub async fn write_indexed(&self, now: Timestamp, cmd: Command) -> Result<(u64, ApplyResult), ConsensusError> {
        if let Err(e) = cmd.validate() {
            tracing::warn!(error = %e, "a command that breaks a bound refused before the log");
            return Ok((0, Err(e.into())));
        }
        let now = Consensus::stamp(self, now);
        tracing::trace!(target: crate::LATENCY, "write proposed");
        let resp = self.raft.client_write(Request { now, cmd }).await.map_err(write_error)?;
        tracing::trace!(target: crate::LATENCY, index = resp.log_id.index(), "write applied");
        Ok((resp.log_id.index(), resp.data))
    }

    /// Run one membership change, retrying (bounded) while one from an
    /// earlier leader is still in flight. The caller holds `changing`.
    async fn retrying<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ConsensusError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, RaftError<C, ClientWriteError<C>>>>,
    {
        let deadline = Instant_::<C>::now() + CHANGE_WAIT;
        loop {
            match f().await {
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))
                    if Instant_::<C>::now() < deadline =>
                {
                    tracing::debug!(what, error = %e, "membership change must wait");
                    Rt::<C>::sleep(Duration::from_millis(50)).await;
                }
                other => return other.map_err(write_error),
            }
        }
    }

    /// The membership as it is now, read after the changes before it
    /// (`changing` held): a change computed from an older view could undo
    /// one made meanwhile. `NotLeader` if this peer no longer leads as a
    /// voter (it took itself out): it changes nothing then.
    fn view_to_change(&self) -> Result<View, ConsensusError> {
        let v = self.view();
        if v.is_leader && v.voters.contains(&self.node) {
            Ok(v)
        } else {
            Err(ConsensusError::NotLeader { leader: None, leader_id: None })
        }
    }

    /// Take `id` out of membership: out of the voters (a caught-up learner
    /// takes its place if there is one), then out of the nodes.
    pub async fn remove_member(&self, id: u64) -> Result<(), ConsensusError> {
        // Bounded: a change in flight waits for as long as a member its
        // quorum needs is down (joint consensus), and the caller is an
        // operator's `peer leave` that deserves an answer.
        let deadline = Instant_::<C>::now() + CHANGE_WAIT;
        let _one_at_a_time = loop {
            if let Ok(one) = self.changing.try_lock() {
                break one;
            }
            if Instant_::<C>::now() >= deadline {
                return Err(ConsensusError::Unavailable(format!(
                    "another membership change is still in flight after {CHANGE_WAIT:?} (it may need a member \
                     that is down); try again"
                )));
            }
            Rt::<C>::sleep(Duration::from_millis(50)).await;
        };
        let view = self.view_to_change()?;
        if view.voters.contains(&id) {
            let mut voters = view.voters.clone();
            voters.remove(&id);
            if voters.is_empty() {
                return Err(ConsensusError::Unavailable("the last voter cannot leave".into()));
            }
            // Its seat to the learner the policy would promote, if there is
            // one; else to any staying learner it replicates to rather than
            // none, or the voters left (with a silent one among them) might
            // make no majority that answers, the change itself included.
            let with = candidate(&view, &Policy::default()).or_else(|| {
                view.learners.iter().copied().find(|l| view.matched.contains_key(l) && !view.draining.contains(l))
            });
            if let Some(with) = with {
                voters.insert(with);
            }
            let change = ChangeMembers::ReplaceAllVoters(voters);
            self.retrying("remove voter", || self.raft.change_membership(change.clone(), false)).await?;
        }
        let still_there = self.raft.metrics().borrow_watched().membership_config.membership().get_node(&id).is_some();
        if still_there {
            let change = ChangeMembers::RemoveNodes(BTreeSet::from([id]));
            self.retrying("remove node", || self.raft.change_membership(change.clone(), false)).await?;
        }
        Ok(())
    }

    /// On the leader: take `peer` out of membership, then out of the
    /// registry, the registry write going through `cluster` (which forwards
    /// it to the next leader when `peer` is this one and leads no more).
    /// In that order: a peer stopped between the two steps is either still
    /// a member and registered (it left nothing), or a registered worker,
    /// never a member the registry does not know (which would register a
    /// second id when it starts again). Its leases go back to the queue
    /// with its registry entry; it has drained already.
    /// Call it on the leader: the registry is read from this replica.
    pub async fn remove_peer(
        &self,
        cluster: &impl Consensus,
        now: Timestamp,
        peer: PeerId,
    ) -> Result<(), ConsensusError> {
        // Marked draining first (its own mark may have failed): the
        // membership manager adds no draining peer back meanwhile.
        if self.read(|s| s.peer(peer).is_some_and(|p| !p.draining)) {
            let _ = cluster.write(now, Command::DrainPeer { peer, draining: true }).await?;
        }
        self.remove_member(peer.0).await?;
        if self.read(|s| s.peer(peer).is_some()) {
            // `UnknownPeer`: removed meanwhile (a retried leave); done either way.
            let _ = cluster.write(now, Command::RemovePeer { peer }).await?;
        }
        Ok(())
    }

    /// The leader's linearizable read index: everything committed before
    /// this call is at or below it.
    pub async fn read_index(&self) -> Result<u64, ConsensusError> {
        let deadline = Instant_::<C>::now() + READ_INDEX_WAIT;
        let res = loop {
            match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
                // No quorum answered this round (a slow follower): ask again.
                Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(e)))
                    if Instant_::<C>::now() < deadline =>
                {
                    tracing::debug!(error = %e, "read index: no quorum yet");
                    Rt::<C>::sleep(Duration::from_millis(20)).await;
                }
                other => break other,
            }
        };
        match res {
            Ok(read) => Ok(read.index()),
            Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                Err(ConsensusError::NotLeader { leader: f.leader_node.map(|n| n.addr.clone()), leader_id: f.leader_id })
            }
            Err(e) => Err(ConsensusError::Unavailable(e.to_string())),
        }
    }

    /// Wait (at most `timeout`) until this replica has applied `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), ConsensusError> {
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "read your writes")
            .await
            .map(|_| ())
            .map_err(|e| ConsensusError::Unavailable(format!("this replica did not apply index {index}: {e}")))
    }

    /// The applied index and a BLAKE3 digest of the applied state.
    pub fn digest(&self) -> (u64, String) {
        // Encoded outside the state's lock (a copy on write).
        let (index, frozen) = self.state.read(|s| (s.applied_index(), s.freeze()));
        (index, blake3::hash(&frozen.snapshot()).to_hex().to_string())
    }
}

/// Whether this peer (`status.node`; node ids are peer ids), drained and
/// stopping, should leave the cluster: a worker (no Raft membership)
/// leaves the registry, a member leaves if another voter remains; the last
/// voter stays, it holds the cluster's data.
pub fn should_leave(status: &RaftStatus) -> bool {
    !status.holds_replica() || status.voters.iter().any(|v| *v != status.node)
}

impl<C: ImpetusConfig> Consensus for RaftConsensus<C> {
    async fn write(&self, now: Timestamp, cmd: Command) -> Result<ApplyResult, ConsensusError> {
        self.write_indexed(now, cmd).await.map(|(_, r)| r)
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        self.state.read(f)
    }

    /// [`leader_stamp`] on this peer's clocks.
    fn stamp(&self, wall: Timestamp) -> Timestamp {
        let state_now = self.state.read(State::now);
        let mono = Instant_::<C>::now() - self.born;
        let mut floor = self.stamp_floor.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamped = leader_stamp(wall, state_now, &mut floor, mono);
        if stamped != wall {
            tracing::debug!(
                wall = wall.0,
                stamped = stamped.0,
                "the wall clock is behind the state's time: stamping on from it"
            );
        }
        stamped
    }

    async fn holds_state(&self) -> bool {
        // Asks the Raft core, so the answer reflects the loaded storage (its
        // metrics may not have been published yet right after a start).
        match self.raft.is_initialized().await {
            Ok(initialized) => initialized,
            Err(e) => {
                tracing::warn!(error = %e, "could not ask Raft whether it holds state; taking it as none");
                false
            }
        }
    }

    /// Only the leader has a read point of its own; elsewhere this fails
    /// with `NotLeader` (a peer that can reach the leader uses
    /// `ClusterConsensus`).
    async fn catch_up(&self) -> Result<(), ConsensusError> {
        let index = self.read_index().await?;
        self.wait_applied(index, CATCH_UP_WAIT).await
    }

    fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        RaftStatus {
            node: self.node,
            leader: m.current_leader,
            term: m.current_term,
            commit_index: m.cluster_committed.map(|l| l.index()).unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index()).unwrap_or(0),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
        }
    }
}

/// A registered non-member as the membership view reads it: id, last
/// heartbeat stamp, ms since it (state machine clock), seat.
type Heartbeat = (u64, Timestamp, u64, Seat);

impl<C: ImpetusConfig> Membership for RaftConsensus<C> {
    fn view(&self) -> View {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let mut v = View {
            me: self.node,
            is_leader: m.current_leader == Some(self.node) && m.state.is_leader(),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            last_log: m.last_log_index.unwrap_or(0),
            ..View::default()
        };
        if !v.is_leader {
            return v;
        }
        let (heartbeats, draining): (Vec<Heartbeat>, BTreeSet<u64>) = self.state.read(|s| {
            let now = s.now();
            let peers = s.peers();
            let draining = peers.iter().filter(|p| p.draining).map(|p| p.id.0).collect();
            let heartbeats = peers
                .into_iter()
                .filter(|p| !v.voters.contains(&p.id.0) && !v.learners.contains(&p.id.0))
                .map(|p| (p.id.0, p.last_heartbeat, now.since(p.last_heartbeat), p.info.seat))
                .collect();
            (heartbeats, draining)
        });
        v.draining = draining;
        let at = Instant_::<C>::now();
        if let Ok(mut seen) = self.heartbeat_seen.lock() {
            seen.retain(|id, _| heartbeats.iter().any(|h| h.0 == *id));
            for &(id, stamp, _, _) in &heartbeats {
                let entry = seen.entry(id).or_insert((stamp, at));
                if entry.0 != stamp {
                    *entry = (stamp, at);
                }
                v.workers_quiet_ms.insert(id, (at - entry.1).as_millis() as u64);
            }
        }
        v.workers = heartbeats.into_iter().map(|(id, _, silent, seat)| (id, (silent, seat))).collect();
        for (id, matched) in m.replication.iter().flatten() {
            v.matched.insert(*id, matched.as_ref().map(|l| l.index()).unwrap_or(0));
        }
        let now = Instant_::<C>::now();
        let term: u64 = m.current_term;
        let Ok(mut unacked) = self.unacked_since.lock() else { return v };
        for (id, acked) in m.heartbeat.iter().flatten() {
            let since = match acked {
                Some(at) => {
                    unacked.remove(&(term, *id));
                    **at
                }
                None => *unacked.entry((term, *id)).or_insert(now),
            };
            v.silent_ms.insert(*id, (now - since).as_millis() as u64);
        }
        unacked.retain(|(t, _), _| *t == term);
        v
    }

    /// Planned from a view read before the lock: checked again under it,
    /// against the view after the changes made meanwhile (a departure's
    /// above all: the peer leaving must not be added back).
    async fn change(&self, c: Change, now: Timestamp) -> Result<(), ConsensusError> {
        let stale = || ConsensusError::Unavailable(format!("{c:?} no longer fits the membership; planned again"));
        if let Change::Forget { peer: id, after_ms } = c {
            // Still a learner or worker (not promoted meanwhile), still
            // silent (checked under the lock, against the view after the
            // changes before it). One that answers again just after this
            // is refused, learns that it was taken out, and joins again as
            // a new peer.
            let one_at_a_time = self.changing.lock().await;
            let v = self.view_to_change()?;
            if !still_silent(&v, id, after_ms) {
                return Err(stale());
            }
            if v.workers.contains_key(&id) {
                // No member: out of the registry alone. (A draining mark
                // first would stay behind if the rest failed.)
                tracing::warn!(peer = id, "a worker silent too long is taken out of the cluster");
                let _ = self.write(now, Command::RemovePeer { peer: PeerId(id) }).await?;
                return Ok(());
            }
            // `remove_peer` takes the lock itself.
            drop(one_at_a_time);
            tracing::warn!(peer = id, "a learner silent too long is taken out of the cluster");
            return self.remove_peer(self, now, PeerId(id)).await;
        }
        if let Change::HandOver(to) = c {
            tracing::info!(to, "this leader is no voter: it hands its lead over");
            return self
                .raft
                .trigger()
                .transfer_leader(to)
                .await
                .map_err(|e| ConsensusError::Unavailable(e.to_string()));
        }
        let one_at_a_time = self.changing.lock().await;
        let view = self.view_to_change()?;
        let members = match c {
            Change::AddLearner(id) => {
                if !view.workers.contains_key(&id) || view.draining.contains(&id) {
                    return Err(stale());
                }
                let addr = self.state.read(|s| s.peer(PeerId(id)).and_then(|p| p.info.addresses.first().cloned()));
                let Some(addr) = addr else {
                    return Err(ConsensusError::Unavailable(format!("worker {id} has no address to reach it at")));
                };
                let node = PeerNode { addr };
                self.retrying("add learner", || self.raft.add_learner(id, node.clone(), false)).await?;
                drop(one_at_a_time);
                return Ok(());
            }
            Change::Promote(ids)
                if !ids.is_empty()
                    && ids.iter().all(|id| view.learners.contains(id) && !view.draining.contains(id)) =>
            {
                ChangeMembers::AddVoterIds(ids)
            }
            Change::Replace { dead, with }
                if view.voters.contains(&dead) && view.learners.contains(&with) && !view.draining.contains(&with) =>
            {
                let mut voters = view.voters;
                voters.remove(&dead);
                voters.insert(with);
                ChangeMembers::ReplaceAllVoters(voters)
            }
            Change::Promote(_) | Change::Replace { .. } | Change::HandOver(_) | Change::Forget { .. } => {
                return Err(stale())
            }
        };
        // `retain = true`: a replaced voter stays a learner, so it catches up
        // and can serve again if it was only slow; the policy replaces it
        // again only if it is needed.
        self.retrying("membership policy", || self.raft.change_membership(members.clone(), true)).await?;
        drop(one_at_a_time);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_leader_stamps_its_wall_clock_when_it_is_not_behind_the_state() {
        let mut floor = None;
        assert_eq!(leader_stamp(Timestamp(1_000), Timestamp(900), &mut floor, MS(5)), Timestamp(1_000));
        assert_eq!(leader_stamp(Timestamp(1_000), Timestamp(1_000), &mut floor, MS(6)), Timestamp(1_000));
        assert_eq!(floor, None);
    }

    #[test]
    fn a_leader_whose_clock_is_behind_the_state_stamps_on_from_the_state_time() {
        // A former leader's clock ran an hour ahead: the state's time is there.
        let (hour, mut floor) = (3_600_000, None);
        let state = Timestamp(10_000 + hour);
        assert_eq!(leader_stamp(Timestamp(10_000), state, &mut floor, MS(50)), state);
        // 30 s later (monotonic), the wall clock is still behind: time moves 15 s.
        let later = Timestamp(25_000 + hour);
        assert_eq!(leader_stamp(Timestamp(40_000), state, &mut floor, MS(30_050)), later);
        // The state took that stamp; later writes go on from the same floor.
        let then = leader_stamp(Timestamp(42_000), later, &mut floor, MS(32_050));
        assert_eq!(then, Timestamp(26_000 + hour));
        // Another leader meanwhile pushed the state further still: founded again there.
        let further = Timestamp(50_000 + 2 * hour);
        assert_eq!(leader_stamp(Timestamp(43_000), further, &mut floor, MS(33_050)), further);
        assert_eq!(leader_stamp(Timestamp(45_000), further, &mut floor, MS(35_050)), further.saturating_add_ms(1_000));
        // The wall clock catches up: it is stamped again, and the floor forgotten.
        let caught_up = Timestamp(60_000 + 2 * hour);
        assert_eq!(leader_stamp(caught_up, further, &mut floor, MS(36_050)), caught_up);
        assert_eq!(floor, None);
    }

    #[test]
    fn the_wall_clock_catches_up_with_a_state_time_ahead_of_it() {
        // The state's time a minute ahead; writes every 100 ms.
        let (mut floor, mut state) = (None, Timestamp(160_000));
        let mut caught_up_at = None;
        for step in 1..=2_000u64 {
            let (wall, mono) = (Timestamp(100_000 + step * 100), MS(step * 100));
            let stamp = leader_stamp(wall, state, &mut floor, mono);
            assert!(stamp >= state && stamp.since(state) <= 100, "step {step}: {stamp} after {state}");
            state = stamp;
            if stamp == wall && caught_up_at.is_none() {
                caught_up_at = Some(step);
            }
        }
        // At half pace the minute is made up in about two minutes.
        let at = caught_up_at.expect("the wall clock never caught up");
        assert!((1_190..=1_210).contains(&at), "caught up at step {at}");
        assert_eq!(floor, None);
    }

    #[test]
    fn stamps_never_go_back_while_the_wall_clock_steps_back() {
        let (mut floor, mut state, mut mono) = (None, Timestamp(100_000), MS(0));
        // The wall clock runs at 10 ms a step but jumps back by up to 30 s,
        // then forward again, over and over.
        for step in 0..1_000u64 {
            mono += MS(10);
            let wall = Timestamp(100_000 + step * 10 - (step % 7) * 5_000);
            let stamp = leader_stamp(wall, state, &mut floor, mono);
            assert!(stamp >= state, "step {step}: stamped {stamp} behind the state's {state}");
            state = state.max(stamp);
        }
        // Never frozen: 10 s of monotonic time moved the state's time at
        // least half that far, whatever the wall clock did.
        assert!(state.since(Timestamp(100_000)) >= 5_000, "the state's time moved only to {state}");
    }
}
