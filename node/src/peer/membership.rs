//! Membership without an operator: the leader grows the voter set to its
//! target — a worker becomes a learner, a caught-up learner a voter — and
//! replaces voters that stopped answering.
//!
//! [`plan`] is the whole policy, pure (sans-I/O): it looks at a [`View`] of
//! the cluster and returns at most one [`Change`]. [`manage`] is the thin
//! loop that builds the view from a [`Membership`], applies the change and
//! sleeps, through the [`Runtime`] so the simulator can run it.
//!
//! Rules, in order:
//! 1. Only the leader changes membership, one change at a time, and only as
//!    a voter: a leader that is no voter (openraft lets a learner that still
//!    holds an old configuration win an election, found by the simulator)
//!    hands its lead to the answering voter with the longest log.
//! 2. Fewer voters than the target: promote the caught-up learners with
//!    the lowest ids that answered within `fresh_ms` (a learner that
//!    crashed a moment ago still counts as answering until `dead_after_ms`,
//!    and a voter that cannot vote stalls every commit), as many at once as
//!    the target has room for, but never to an even count short of the
//!    target: one voter grows to three in one change, with two learners
//!    ready. Two voters need each other for every commit and survive no
//!    failure; one voter and a learner survive the learner's.
//! 3. A voter silent for `dead_after_ms` (never the leader itself) is
//!    replaced by such a learner; with no learner to take its place it stays
//!    (removing it would shrink the quorum's fault tolerance for nothing).
//! 4. Fewer answering learners than voters missing (below the target, or
//!    silent): an answering worker becomes a learner, so it catches up and
//!    rule 2 or 3 applies: one started with `--voter` ([`Seat::Preferred`])
//!    first, then any other but those started with `--worker`
//!    ([`Seat::Never`]), lowest id first. Other workers hold no Raft state.
//!
//! 5. Nothing else to do: a learner or worker silent for `forget_after_ms`
//!    (10 minutes by default; never a voter, which rule 3 replaces first)
//!    is taken out of membership and the registry, its leases handed back:
//!    a dead peer is not replicated to, nor listed, forever.
//!
//! A peer taken out while it was cut off keeps the configuration it last
//! saw; when it comes back, the registry refuses it, and it learns that it
//! was taken out ([`super::Peer::removed`]; the `impetus peer` process
//! then sets its state aside and joins again as a new peer). Peers leave
//! membership by draining (`impetus peer leave`, SIGTERM), which they see
//! through.
//!
//! Node ids are peer ids from the registry, so they are never reused.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use impetus_proto::{Seat, Timestamp};

use super::{ConsensusError, Runtime};

/// What the leader knows about membership and its followers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub me: u64,
    pub is_leader: bool,
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
    /// The leader's last log index.
    pub last_log: u64,
    /// Per follower: the highest log index it has acknowledged.
    pub matched: BTreeMap<u64, u64>,
    /// Per follower: milliseconds since it last answered the leader.
    pub silent_ms: BTreeMap<u64, u64>,
    /// Registered peers outside membership (draining ones too, so that
    /// one that died draining is forgotten): milliseconds since their last
    /// heartbeat, by the state machine's clock, and whether they may take
    /// a seat.
    pub workers: BTreeMap<u64, (u64, Seat)>,
    /// Registered peers marked draining (leaving), members or not: none is
    /// made a learner, promoted, or handed the lead.
    pub draining: BTreeSet<u64>,
    /// Per worker: milliseconds since this leader saw its heartbeat stamp
    /// change, on the leader's own clock (from when it first looked). A
    /// worker is forgotten only if both measures say it is silent: a
    /// voter's wall clock that jumps ahead moves the state machine's.
    pub workers_quiet_ms: BTreeMap<u64, u64>,
}

/// A membership change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Make these learners voters, in one change (joint consensus when
    /// more than one).
    Promote(BTreeSet<u64>),
    /// Take this learner or worker, silent for at least `after_ms`, out of
    /// membership and the registry: a learner by
    /// `RaftConsensus::remove_peer` (a departure), a worker, no member, out
    /// of the registry alone. Its silence is checked again before.
    Forget { peer: u64, after_ms: u64 },
    /// Swap a silent voter for a learner: `voters - dead + with`.
    Replace { dead: u64, with: u64 },
    /// Add this worker as a learner (it starts to hold Raft state).
    AddLearner(u64),
    /// This leader is no voter: hand the lead to this voter. (openraft lets
    /// a learner that still holds an old configuration win an election, and
    /// keeps it leading; a leader that is no voter changes no membership.)
    HandOver(u64),
}

/// The knobs of [`plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Voters wanted (3 by default; 5 survives two failures).
    pub target_voters: usize,
    /// A voter silent this long is replaced.
    pub dead_after_ms: u64,
    /// A follower within this many entries of the leader's log is caught up.
    pub caught_up_lag: u64,
    /// A learner is promoted only if it answered the leader this recently.
    pub fresh_ms: u64,
    /// A learner or worker silent this long is taken out (0: never).
    pub forget_after_ms: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            target_voters: 3,
            dead_after_ms: 10_000,
            caught_up_lag: 1_000,
            fresh_ms: 1_000,
            forget_after_ms: 600_000,
        }
    }
}

/// The one membership change to make now, if any.
pub fn plan(v: &View, p: &Policy) -> Option<Change> {
    if !v.is_leader {
        return None;
    }
    let answering = |id: &u64| *id == v.me || v.silent_ms.get(id).is_some_and(|ms| *ms < p.dead_after_ms);
    let fresh = |id: &u64| v.silent_ms.get(id).is_some_and(|ms| *ms < p.fresh_ms);
    let staying = |id: &u64| !v.draining.contains(id);
    if !v.voters.contains(&v.me) {
        let matched = |id: &u64| v.matched.get(id).copied().unwrap_or(0);
        // A voter that stays first; a draining one rather than none (this
        // leader changes no membership, so leaves would wait for ever).
        let to =
            v.voters.iter().filter(|id| fresh(id)).max_by_key(|id| (staying(id), matched(id), std::cmp::Reverse(**id)));
        return to.map(|id| Change::HandOver(*id));
    }
    let dead: Vec<u64> = v.voters.iter().copied().filter(|id| *id != v.me && !answering(id)).collect();
    if v.voters.len() < p.target_voters {
        let ready: Vec<u64> = candidates(v, p).take(p.target_voters - v.voters.len()).collect();
        let odd = |n: usize| n % 2 == 1 || n >= p.target_voters;
        // Never stop at an even count short of the target: two voters
        // need each other to commit, so they survive no failure, where one
        // voter and a learner survive the learner's.
        let take = if odd(v.voters.len() + ready.len()) { ready.len() } else { ready.len().saturating_sub(1) };
        if take > 0 {
            return Some(Change::Promote(ready[..take].iter().copied().collect()));
        }
    }
    // A silent voter with no promotion to make (at the target, or a lone
    // learner short of it that would make the count even) gives its seat.
    if let (Some(&dead), Some(with)) = (dead.first(), candidate(v, p)) {
        return Some(Change::Replace { dead, with });
    }
    let missing = p.target_voters.saturating_sub(v.voters.len()) + dead.len();
    let standing_by = v.learners.iter().filter(|id| answering(id) && staying(id)).count();
    if standing_by < missing {
        let worker = v
            .workers
            .iter()
            .filter(|(id, (silent, seat))| *silent < p.dead_after_ms && *seat != Seat::Never && staying(id))
            .min_by_key(|(id, (_, seat))| (*seat, **id));
        if let Some((id, _)) = worker {
            return Some(Change::AddLearner(*id));
        }
    }
    forgotten(v, p).map(|peer| Change::Forget { peer, after_ms: p.forget_after_ms })
}

/// The learner [`plan`] gives a seat to: the first of [`candidates`].
pub fn candidate(v: &View, p: &Policy) -> Option<u64> {
    candidates(v, p).next()
}

/// The learners [`plan`] may promote, lowest id first: each answered
/// within `fresh_ms`, is caught up and is not draining.
pub fn candidates<'v>(v: &'v View, p: &'v Policy) -> impl Iterator<Item = u64> + 'v {
    v.learners.iter().copied().filter(|id| {
        v.silent_ms.get(id).is_some_and(|ms| *ms < p.fresh_ms)
            && v.matched.get(id).is_some_and(|m| v.last_log.saturating_sub(*m) <= p.caught_up_lag)
            && !v.draining.contains(id)
    })
}

/// Whether `id`, a learner or worker, is still silent for `after_ms` in
/// `v` (a [`Change::Forget`] planned from an older view).
pub fn still_silent(v: &View, id: u64, after_ms: u64) -> bool {
    let quiet = v.workers_quiet_ms.get(&id).copied().unwrap_or(0);
    match v.workers.get(&id) {
        Some((silent, _)) => (*silent).min(quiet) >= after_ms,
        None => v.learners.contains(&id) && v.silent_ms.get(&id).is_some_and(|ms| *ms >= after_ms),
    }
}

/// The learner or worker with the lowest id silent for
/// `forget_after_ms`, if that is set. A learner that never answered this
/// leader counts from when the leader first tried it.
fn forgotten(v: &View, p: &Policy) -> Option<u64> {
    if p.forget_after_ms == 0 {
        return None;
    }
    // Never this leader: it is a voter here ([`plan`] handed its lead over
    // otherwise), and voters are neither learners nor workers.
    v.learners.iter().chain(v.workers.keys()).copied().filter(|id| still_silent(v, *id, p.forget_after_ms)).min()
}

/// Raft membership as the manager drives it.
pub trait Membership: Send + Sync + 'static {
    /// The current view; `silent_ms` measured by the implementation.
    fn view(&self) -> View;
    /// Apply a change (waits until it is committed); `now` stamps the
    /// registry writes a departure makes.
    fn change(&self, c: Change, now: Timestamp) -> impl Future<Output = Result<(), ConsensusError>> + Send;
}

impl<M: Membership> Membership for std::sync::Arc<M> {
    fn view(&self) -> View {
        (**self).view()
    }

    fn change(&self, c: Change, now: Timestamp) -> impl Future<Output = Result<(), ConsensusError>> + Send {
        (**self).change(c, now)
    }
}

/// Run [`plan`] every `every` until `stop()` says so.
pub async fn manage<R: Runtime, M: Membership>(rt: R, m: M, policy: Policy, every: Duration, stop: impl Fn() -> bool) {
    while !stop() {
        let view = m.view();
        if let Some(change) = plan(&view, &policy) {
            tracing::info!(?change, voters = ?view.voters, learners = ?view.learners, "membership change");
            if let Err(e) = m.change(change.clone(), rt.now()).await {
                tracing::warn!(?change, error = %e, "membership change failed; will retry");
            }
        }
        rt.sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(voters: &[u64], learners: &[u64]) -> View {
        let all = voters.iter().chain(learners).copied();
        View {
            me: 1,
            is_leader: true,
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            last_log: 5_000,
            matched: all.clone().map(|id| (id, 5_000)).collect(),
            silent_ms: all.map(|id| (id, 50)).collect(),
            workers: BTreeMap::new(),
            workers_quiet_ms: BTreeMap::new(),
            draining: BTreeSet::new(),
        }
    }

    fn forget(peer: u64) -> Option<Change> {
        Some(Change::Forget { peer, after_ms: Policy::default().forget_after_ms })
    }

    fn workers(w: &[(u64, u64, Seat)]) -> BTreeMap<u64, (u64, Seat)> {
        w.iter().map(|&(id, silent, seat)| (id, (silent, seat))).collect()
    }

    #[test]
    fn a_leader_that_is_no_voter_hands_its_lead_to_the_most_caught_up_voter() {
        let mut v = view(&[2, 3, 4], &[1]);
        v.matched.insert(3, 5_000);
        v.matched.insert(2, 4_990);
        v.silent_ms.insert(4, 60_000);
        v.matched.insert(4, 5_000);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::HandOver(3)), "answering, most caught up");
        v.silent_ms.insert(2, 60_000);
        v.silent_ms.insert(3, 60_000);
        assert_eq!(plan(&v, &Policy::default()), None, "no voter answers: wait");
    }

    #[test]
    fn only_the_leader_changes_membership() {
        let v = View { is_leader: false, ..view(&[1], &[2, 3]) };
        assert_eq!(plan(&v, &Policy::default()), None);
    }

    fn promote(ids: &[u64]) -> Option<Change> {
        Some(Change::Promote(ids.iter().copied().collect()))
    }

    #[test]
    fn learners_are_promoted_lowest_id_first_until_the_target() {
        assert_eq!(plan(&view(&[1], &[4, 3, 2]), &Policy::default()), promote(&[2, 3]), "one voter to three at once");
        assert_eq!(plan(&view(&[1, 2], &[3, 4]), &Policy::default()), promote(&[3]));
        assert_eq!(plan(&view(&[1, 2, 3], &[4, 5]), &Policy::default()), None, "3 voters is the default target");
        let five = Policy { target_voters: 5, ..Policy::default() };
        assert_eq!(plan(&view(&[1, 2, 3], &[4, 5]), &five), promote(&[4, 5]));
        assert_eq!(plan(&view(&[1], &[2, 3, 4, 5, 6]), &five), promote(&[2, 3, 4, 5]));
        let four = Policy { target_voters: 4, ..Policy::default() };
        assert_eq!(plan(&view(&[1, 2, 3], &[4]), &four), promote(&[4]), "an even target is reached");
    }

    #[test]
    fn a_silent_voter_short_of_the_target_is_replaced_when_no_promotion_fits() {
        // Target 5, three voters, one silent, one learner: four voters would
        // be even, so the learner takes the silent voter's seat.
        let five = Policy { target_voters: 5, ..Policy::default() };
        let mut v = view(&[1, 2, 3], &[4]);
        v.silent_ms.insert(3, 60_000);
        assert_eq!(plan(&v, &five), Some(Change::Replace { dead: 3, with: 4 }));
    }

    #[test]
    fn voters_never_grow_to_an_even_count_short_of_the_target() {
        // Two voters need each other: one learner ready waits for a second.
        assert_eq!(plan(&view(&[1], &[2]), &Policy::default()), None);
        let five = Policy { target_voters: 5, ..Policy::default() };
        assert_eq!(plan(&view(&[1, 2, 3], &[4]), &five), None);
        assert_eq!(plan(&view(&[1], &[2, 3, 4]), &five), promote(&[2, 3]), "to three, not four");
    }

    #[test]
    fn a_lagging_or_silent_learner_is_not_promoted() {
        let mut v = view(&[1], &[2, 3]);
        v.matched.insert(2, 10);
        v.silent_ms.insert(3, 60_000);
        assert_eq!(plan(&v, &Policy::default()), None);
        v.silent_ms.remove(&3);
        assert_eq!(plan(&v, &Policy::default()), None, "a learner that never answered is not promoted");
    }

    #[test]
    fn a_learner_that_has_not_answered_for_a_moment_waits() {
        let mut v = view(&[1], &[2, 3]);
        v.silent_ms.insert(2, 1_500);
        assert_eq!(plan(&v, &Policy::default()), None, "silent 1.5 s: it may have just crashed");
        v.silent_ms.insert(2, 50);
        assert_eq!(plan(&v, &Policy::default()), promote(&[2, 3]));
    }

    #[test]
    fn a_silent_voter_is_replaced_by_a_healthy_learner() {
        let mut v = view(&[1, 2, 3], &[4]);
        v.silent_ms.insert(2, 10_000);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::Replace { dead: 2, with: 4 }));
        v.learners.clear();
        assert_eq!(plan(&v, &Policy::default()), None, "no one to take its place: keep it");
    }

    #[test]
    fn workers_become_learners_only_while_voters_are_missing() {
        let mut v = view(&[1], &[]);
        v.workers = workers(&[(5, 100, Seat::Any), (2, 60_000, Seat::Any), (4, 100, Seat::Any)]);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::AddLearner(4)), "lowest answering worker");
        v.learners.insert(4);
        v.matched.insert(4, 0);
        v.silent_ms.insert(4, 50);
        v.workers.remove(&4);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::AddLearner(5)), "two voters missing, one learner");
        v.learners.insert(5);
        v.silent_ms.insert(5, 50);
        v.workers.remove(&5);
        assert_eq!(plan(&v, &Policy::default()), None, "both catching up: wait");
        v.matched.insert(4, 5_000);
        assert_eq!(plan(&v, &Policy::default()), None, "one caught up: two voters would need each other");
        v.matched.insert(5, 5_000);
        assert_eq!(plan(&v, &Policy::default()), promote(&[4, 5]));
        let full = View { workers: workers(&[(7, 10, Seat::Any)]), ..view(&[1, 2, 3], &[]) };
        assert_eq!(plan(&full, &Policy::default()), None, "three voters: the rest stay workers");
    }

    #[test]
    fn a_silent_voter_with_no_learner_brings_in_a_worker() {
        let mut v = view(&[1, 2, 3], &[]);
        v.silent_ms.insert(3, 20_000);
        v.workers = workers(&[(6, 100, Seat::Any)]);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::AddLearner(6)));
        v.learners.insert(6);
        v.matched.insert(6, 5_000);
        v.silent_ms.insert(6, 10);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::Replace { dead: 3, with: 6 }));
    }

    #[test]
    fn a_voter_seat_goes_to_a_preferred_worker_first_and_never_to_one_that_refuses() {
        let mut v = view(&[1], &[]);
        v.workers = workers(&[(2, 100, Seat::Never), (3, 100, Seat::Any), (4, 100, Seat::Preferred)]);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::AddLearner(4)), "--voter first");
        v.workers.remove(&4);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::AddLearner(3)), "then any, before a lower --worker");
        v.workers.remove(&3);
        assert_eq!(plan(&v, &Policy::default()), None, "a --worker peer never takes a seat");
        v.workers.insert(5, (60_000, Seat::Preferred));
        assert_eq!(plan(&v, &Policy::default()), None, "nor does a silent one");
    }

    #[test]
    fn a_learner_or_worker_silent_long_enough_is_forgotten_lowest_id_first() {
        let mut v = view(&[1, 2, 3], &[4, 5]);
        v.workers = workers(&[(6, 100, Seat::Any), (7, 599_999, Seat::Any)]);
        v.workers_quiet_ms = [(6, 100), (7, 900_000)].into();
        v.silent_ms.insert(5, 599_999);
        assert_eq!(plan(&v, &Policy::default()), None, "silent, not yet for 10 minutes");
        v.silent_ms.insert(5, 600_000);
        assert_eq!(plan(&v, &Policy::default()), forget(5));
        v.workers.insert(7, (600_000, Seat::Any));
        assert_eq!(plan(&v, &Policy::default()), forget(5), "lowest id first");
        v.silent_ms.insert(5, 10);
        assert_eq!(plan(&v, &Policy::default()), forget(7), "a worker too");
        v.workers_quiet_ms.insert(7, 1_000);
        assert_eq!(plan(&v, &Policy::default()), None, "silent by the state's clock only (a clock that jumped)");
        let never = Policy { forget_after_ms: 0, ..Policy::default() };
        assert_eq!(plan(&v, &never), None, "0: never");
    }

    #[test]
    fn a_silent_voter_is_replaced_not_forgotten_and_growing_comes_first() {
        let mut v = view(&[1, 2, 3], &[]);
        v.silent_ms.insert(3, 3_600_000);
        assert_eq!(plan(&v, &Policy::default()), None, "no one to take its place: the voter stays");
        v.workers = workers(&[(4, 100, Seat::Any), (9, 3_600_000, Seat::Any)]);
        v.workers_quiet_ms = [(9, 3_600_000)].into();
        assert_eq!(plan(&v, &Policy::default()), Some(Change::AddLearner(4)), "a seat to fill before forgetting");
        v.learners.insert(4);
        v.silent_ms.insert(4, 10);
        v.matched.insert(4, 5_000);
        v.workers.remove(&4);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::Replace { dead: 3, with: 4 }));
        let v = View { voters: [1, 2, 4].into(), learners: [3].into(), ..v };
        assert_eq!(plan(&v, &Policy::default()), forget(3), "replaced, then forgotten");
    }

    #[test]
    fn a_draining_peer_gets_no_seat_and_no_lead_and_is_forgotten_if_it_dies() {
        // A learner leaving is not promoted, nor counted as standing by:
        // a worker is brought in instead.
        let mut v = view(&[1, 2], &[3]);
        v.draining.insert(3);
        v.workers = workers(&[(4, 100, Seat::Any)]);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::AddLearner(4)));
        // Nor does it take a silent voter's place.
        let mut v = view(&[1, 2, 3], &[4]);
        v.silent_ms.insert(2, 10_000);
        v.draining.insert(4);
        assert_eq!(plan(&v, &Policy::default()), None);
        v.draining.clear();
        assert_eq!(plan(&v, &Policy::default()), Some(Change::Replace { dead: 2, with: 4 }));
        // A draining worker is never made a learner; once silent long
        // enough (it died draining) it is forgotten like any other.
        let mut v = view(&[1], &[]);
        v.workers = workers(&[(5, 100, Seat::Preferred)]);
        v.draining.insert(5);
        assert_eq!(plan(&v, &Policy::default()), None);
        v.workers.insert(5, (600_000, Seat::Preferred));
        v.workers_quiet_ms.insert(5, 600_000);
        assert_eq!(plan(&v, &Policy::default()), forget(5));
        // A leader that is no voter hands its lead to a voter that stays.
        let mut v = view(&[2, 3], &[1]);
        v.matched.insert(2, 4_000);
        v.draining.insert(3);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::HandOver(2)));
        v.draining.insert(2);
        assert_eq!(plan(&v, &Policy::default()), Some(Change::HandOver(3)), "all draining: one rather than none");
    }

    #[test]
    fn a_forget_is_checked_again_against_the_newer_view() {
        let after = Policy::default().forget_after_ms;
        let mut v = view(&[1, 2, 3], &[4]);
        v.silent_ms.insert(4, after);
        v.workers = workers(&[(6, after, Seat::Any)]);
        v.workers_quiet_ms = [(6, after)].into();
        assert!(still_silent(&v, 4, after) && still_silent(&v, 6, after));
        v.silent_ms.insert(4, 10);
        v.workers.insert(6, (10, Seat::Any));
        assert!(!still_silent(&v, 4, after), "the learner answered meanwhile");
        assert!(!still_silent(&v, 6, after), "the worker's heartbeat came meanwhile");
        assert!(!still_silent(&v, 2, 0), "a voter is never forgotten");
        assert!(!still_silent(&v, 9, 0), "nor a peer gone from the view");
    }

    #[test]
    fn the_leader_never_replaces_itself() {
        let mut v = view(&[1, 2, 3], &[4]);
        v.silent_ms.remove(&1);
        assert_eq!(plan(&v, &Policy::default()), None);
    }
}
