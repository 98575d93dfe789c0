//! The checkers that run after the cluster has finished (the invariant
//! checks on every replica's apply run during the run: see `with_invariant_checks`).
//!
//! - **acked-lost**: every acknowledged submit's job exists, under its key, final.
//! - **result**: every Succeeded job has a result, and it is the right one.
//! - **log-audit**: the leader's committed log replayed on a fresh state:
//!   `verify()` after every entry; a completion, failure or renewal is
//!   accepted only with the job's current, live lease (token and peer); a
//!   lease is granted only on a job with no live lease; at most one
//!   accepted completion per job (no result committed twice).
//! - **divergence**: replicas (voters, learners, workers made members)
//!   sampled at the same applied index hold the same snapshot bytes, which
//!   equal the replayed state's at that index, and so does each node's
//!   newest Raft snapshot (built every 40 entries while the node applies
//!   on: a copy on write) at the index it holds; at the end all replicas
//!   at the same applied index are equal.
//! - **double-result**: completions the writers saw accepted, per job, ≤ 1.

use std::collections::{BTreeMap, BTreeSet};

use impetus_proto::{
    ran_results, Command, FencingToken, JobId, JobStatus, Lease, LeaseGrant, Outcome, PeerId, Stamp, StreamName,
    Timestamp,
};
use impetus_queue::State;
use impetus_raft::openraft::{EntryPayload, RaftLogReader};
use impetus_raft::{Entry, NodeId};

use crate::cluster::Node;
use crate::env::expected_result;
use crate::scenario::{hex_short, leader_view, STREAM};
use crate::world::{lock, World};
use crate::Failure;

fn fail(checker: &'static str, message: impl Into<String>) -> Failure {
    Failure { checker, message: message.into() }
}

/// The log replay: no lease granted at `index` while the job held a live one.
fn no_lease_over_a_live_one(
    index: u64,
    now: Timestamp,
    grants: &[LeaseGrant],
    leases_before: &BTreeMap<JobId, Option<Lease>>,
    ended: &BTreeSet<JobId>,
) -> Result<(), Failure> {
    for g in grants.iter().filter(|g| !ended.contains(&g.job)) {
        if let Some(Some(l)) = leases_before.get(&g.job) {
            if l.expires_at > now {
                return Err(fail(
                    "lease-audit",
                    format!(
                        "index {index}: {} leased again while {} held a live lease (token {})",
                        g.job, l.peer, l.token.0
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The log replay: a result committed at `index` for `job` is its first.
fn one_result(index: u64, job: JobId, completions: &mut BTreeMap<JobId, u32>) -> Result<(), Failure> {
    let n = completions.entry(job).or_default();
    *n += 1;
    if *n > 1 {
        return Err(fail("double-result", format!("index {index}: a second result committed for {job}")));
    }
    Ok(())
}

pub(crate) async fn final_checks(world: &World, nodes: &[Node]) -> Result<(), Failure> {
    if let Some((checker, msg)) = lock(&world.audit).violations.first().cloned() {
        return Err(fail(checker, msg));
    }
    let (leader, jobs) = leader_view(world).ok_or_else(|| fail("liveness", "no leader at the end"))?;
    let node = nodes.iter().find(|n| n.id == leader).ok_or_else(|| fail("liveness", "leader is not a node"))?;
    let running = node.running.as_ref().ok_or_else(|| fail("liveness", "leader not running"))?;

    // removed: a peer that learned it was taken out was (ids are issued once).
    let learned = lock(&world.audit).removals_learned.clone();
    for (id, how) in learned {
        let peer = impetus_proto::PeerId(id);
        if running.state.read(|s| !s.peer_id_issued(peer) || s.has_peer(peer)) {
            return Err(fail("removed", format!("n{id} learned {how} that it was taken out, and the registry has it")));
        }
    }

    // acked-lost
    let stream = StreamName::new(STREAM).expect("valid stream name");
    let acked = lock(&world.audit).acked.clone();
    let by_id: BTreeMap<JobId, &impetus_proto::JobRecord> = jobs.iter().map(|j| (j.id, j)).collect();
    for (key, id) in &acked {
        let k = impetus_proto::IdempotencyKey::new(key.clone()).expect("valid key");
        let found = running.state.read(|s| s.job_by_key(&stream, &k));
        if found != Some(*id) {
            return Err(fail(
                "acked-lost",
                format!("submit of key {key} was acknowledged as {id}, but the key now maps to {found:?}"),
            ));
        }
        let Some(job) = by_id.get(id) else {
            return Err(fail("acked-lost", format!("acknowledged {id} (key {key}) does not exist")));
        };
        if job.key.as_ref().map(|k| k.as_str()) != Some(key.as_str()) {
            return Err(fail("acked-lost", format!("acknowledged {id} has key {:?}, expected {key}", job.key)));
        }
    }
    let expected_jobs = u64::from(world.opts.jobs);
    if jobs.len() as u64 != expected_jobs {
        return Err(fail(
            "acked-lost",
            format!("{} jobs exist, {} were submitted (by key)", jobs.len(), expected_jobs),
        ));
    }

    // result
    for j in &jobs {
        if j.status == JobStatus::Succeeded {
            match (&j.result, expected_result(&j.spec.input)) {
                (None, _) => return Err(fail("result", format!("{} Succeeded without a result", j.id))),
                (Some(r), Some(e)) if *r != e => {
                    return Err(fail("result", format!("{} has result {:?}, expected {:?}", j.id, r, e)))
                }
                _ => {}
            }
        }
    }

    // double-result (as the writers saw it)
    if let Some((job, n)) = lock(&world.audit).accepted_completions.iter().find(|(_, &n)| n > 1) {
        return Err(fail("double-result", format!("{job}: {n} completions were accepted")));
    }

    // log-audit and divergence
    let last = running.state.last_applied().map_or(0, |l| l.index);
    let mut reader = node.log.clone();
    let entries = reader
        .try_get_log_entries(..=last)
        .await
        .map_err(|e| fail("log-audit", format!("reading the leader's log: {e}")))?;
    let samples = std::mem::take(&mut lock(&world.audit).samples);
    replay(world, &entries, &samples)?;
    count_workers_made_members(world, &entries);

    // All replicas (workers made members included) equal at the end: any
    // two at the same applied index hold the same state.
    let mut finals: BTreeMap<u64, (NodeId, [u8; 32])> = BTreeMap::new();
    for (id, r) in nodes.iter().filter_map(|n| n.running.as_ref().map(|r| (n.id, r))) {
        let (index, hash) = r.state.read(|s| (s.applied_index(), *blake3::hash(&s.snapshot()).as_bytes()));
        match finals.get(&index) {
            Some((first, h)) if *h != hash => {
                return Err(fail("divergence", format!("n{first} and n{id} differ at applied index {index}")));
            }
            Some(_) => {}
            None => {
                finals.insert(index, (id, hash));
            }
        }
    }
    Ok(())
}

/// How many workers the committed log made learners, and voters.
fn count_workers_made_members(world: &World, entries: &[Entry]) {
    let (mut learners, mut voters) = (BTreeSet::new(), BTreeSet::new());
    for entry in entries {
        if let EntryPayload::Membership(m) = &entry.payload {
            learners.extend(m.nodes().map(|(id, _)| *id).filter(|id| world.is_worker(*id)));
            voters.extend(m.voter_ids().filter(|id| world.is_worker(*id)));
        }
    }
    if !learners.is_empty() {
        world.event(format_args!("workers made learners {learners:?}, voters {voters:?}"));
    }
    let mut a = lock(&world.audit);
    a.workers_learners = learners.len() as u64;
    a.workers_voters = voters.len() as u64;
}

/// A (job, token, peer) presented by a command, with the job's lease before it.
type Presented = (JobId, FencingToken, PeerId, Option<Lease>);

/// Replay the committed log on a fresh state and audit every step.
fn replay(
    world: &World,
    entries: &[Entry],
    samples: &BTreeMap<u64, BTreeMap<NodeId, [u8; 32]>>,
) -> Result<(), Failure> {
    let mut state = State::new();
    state.plant_bug(world.bug().state_bug());
    let first_index = entries.first().map_or(0, |e| e.log_id.index);
    if first_index > 1 {
        return Err(fail("log-audit", format!("the log starts at {first_index}: it was purged")));
    }
    let mut completions: BTreeMap<JobId, u32> = BTreeMap::new();
    let mut normal = std::collections::BTreeSet::new();
    for (expected_index, entry) in (first_index..).zip(entries) {
        let index = entry.log_id.index;
        if index != expected_index {
            return Err(fail("log-audit", format!("log gap: expected index {expected_index}, found {index}")));
        }
        let EntryPayload::Normal(req) = &entry.payload else { continue };
        normal.insert(index);
        let now = req.now.max(state.now());
        let cmds: Vec<&Command> = match &req.cmd {
            Command::Batch(cs) => cs.iter().collect(),
            c => vec![c],
        };
        let before = |state: &State, job: JobId| -> Option<Lease> { state.job(job).and_then(|j| j.lease) };
        // The lease each presented (job, token) saw before this entry.
        let mut presented: Vec<Vec<Presented>> = Vec::new();
        for c in &cmds {
            let items: Vec<Presented> = match c {
                Command::Complete { peer, completions } => {
                    completions.iter().map(|x| (x.job, x.token, *peer, before(&state, x.job))).collect()
                }
                Command::Fail { peer, failures } => {
                    failures.iter().map(|x| (x.job, x.token, *peer, before(&state, x.job))).collect()
                }
                Command::Renew { peer, leases } | Command::Release { peer, leases } => {
                    leases.iter().map(|&(job, t)| (job, t, *peer, before(&state, job))).collect()
                }
                _ => Vec::new(),
            };
            presented.push(items);
        }
        // Leases an accepted command of this entry ended (a release, a
        // result, a failed attempt): no later command of it may present
        // them, and a later lease may grant their jobs again (a worker's
        // turn hands back leases it never got, then leases).
        let mut ended: BTreeSet<JobId> = BTreeSet::new();
        let leases_before: BTreeMap<JobId, Option<Lease>> = state
            .jobs(&impetus_queue::JobFilter { limit: usize::MAX, ..Default::default() })
            .into_iter()
            .map(|j| (j.id, j.lease))
            .collect();
        let result = state.apply(Stamp { index, now: req.now }, &req.cmd);
        if let Err(e) = state.verify() {
            return Err(fail("invariant", format!("replayed state broken after index {index}: {e}")));
        }
        let outcomes: Vec<Option<Outcome>> = match (&req.cmd, result) {
            (Command::Batch(_), Ok(Outcome::Batch(os))) => os.into_iter().map(Result::ok).collect(),
            (_, Ok(o)) => vec![Some(o)],
            (_, Err(_)) => vec![None; cmds.len()],
        };
        for ((c, items), outcome) in cmds.iter().zip(&presented).zip(&outcomes) {
            let accepted: Vec<bool> = match (c, outcome) {
                (Command::Complete { .. }, Some(Outcome::Completed(rs))) => rs.iter().map(Result::is_ok).collect(),
                (Command::Fail { .. }, Some(Outcome::Failed(rs))) => rs.iter().map(Result::is_ok).collect(),
                (Command::Renew { .. }, Some(Outcome::Renewed(rs))) => rs.iter().map(Result::is_ok).collect(),
                (Command::Release { .. }, Some(Outcome::Released(rs))) => rs.iter().map(Result::is_ok).collect(),
                (Command::Lease { .. }, Some(Outcome::Leased(grants))) => {
                    no_lease_over_a_live_one(index, now, grants, &leases_before, &ended)?;
                    Vec::new()
                }
                (Command::SubmitRan { peer, ran, .. }, Some(Outcome::Batch(parts))) => {
                    // Its lease obeys the lease rules; each result it took is
                    // for a new job its own lease granted to the peer that
                    // ran it, and the job's only result.
                    let [submitted, Ok(Outcome::Leased(grants)), completed] = parts.as_slice() else { continue };
                    no_lease_over_a_live_one(index, now, grants, &leases_before, &ended)?;
                    let taken = ran_results(ran.iter().map(|r| r.index), submitted, completed);
                    for (sub, _) in taken.into_iter().filter(|(_, r)| r.is_ok()) {
                        let granted = grants.iter().any(|g| g.job == sub.job && g.token.0 == index);
                        if sub.existing || !granted {
                            return Err(fail(
                                "lease-audit",
                                format!(
                                    "index {index}: a result taken for {} that this entry did not grant to {peer}",
                                    sub.job
                                ),
                            ));
                        }
                        one_result(index, sub.job, &mut completions)?;
                    }
                    Vec::new()
                }
                _ => Vec::new(),
            };
            for ((job, token, peer, lease), ok) in items.iter().zip(accepted) {
                if !ok {
                    continue;
                }
                let valid = !ended.contains(job)
                    && lease.is_some_and(|l| l.token == *token && l.peer == *peer && l.expires_at > now);
                if !valid {
                    return Err(fail(
                        "lease-audit",
                        format!(
                            "index {index}: {} accepted for {job} with token {} from {peer}, but the lease was {lease:?}",
                            crate::world::cmd_name(c),
                            token.0
                        ),
                    ));
                }
                if matches!(c, Command::Complete { .. }) {
                    one_result(index, *job, &mut completions)?;
                }
                if !matches!(c, Command::Renew { .. }) {
                    ended.insert(*job);
                }
            }
        }
        // Voters sampled at this applied index must equal the replay.
        if let Some(at) = samples.get(&state.applied_index()) {
            let mine = *blake3::hash(&state.snapshot()).as_bytes();
            for (node, h) in at {
                if *h != mine {
                    return Err(fail(
                        "divergence",
                        format!(
                            "n{node} at applied index {index} had state {}, the committed log gives {}",
                            hex_short(h),
                            hex_short(&mine)
                        ),
                    ));
                }
            }
        }
    }
    // A voter sampled at an index that is no Normal entry of the final log
    // applied an entry that was later lost.
    if let Some((idx, at)) = samples.iter().find(|(i, _)| **i != 0 && !normal.contains(*i)) {
        let nodes: Vec<&NodeId> = at.keys().collect();
        return Err(fail(
            "divergence",
            format!("voters {nodes:?} applied a command at index {idx}, which the final committed log does not hold"),
        ));
    }
    Ok(())
}
