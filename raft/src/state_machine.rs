//! The Raft state machine: [`impetus_queue::State`] plus the last applied
//! log id and membership, with snapshots in a [`SnapshotStore`].

use std::fmt;
use std::io;
use std::io::Cursor;
use std::marker::PhantomData;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures::{Stream, TryStreamExt};
use impetus_proto::{ApplyResult, Command, Outcome, Stamp};
use impetus_queue::State;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use crate::snapshot_store::{SnapshotStore, StoredSnapshot};
use crate::{
    invalid_data, Entry, ImpetusConfig, LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership,
    SM_SNAPSHOT_VERSION,
};

/// The applied state of one replica.
///
/// Invariant: `state` is exactly the result of applying, in order, every
/// Normal entry of the log up to and including `last_applied`.
#[derive(Debug)]
pub struct Applied {
    pub state: State,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

impl Applied {
    fn empty() -> Applied {
        Applied { state: State::new(), last_applied: None, membership: StoredMembership::default() }
    }

    /// Apply one log entry; returns what a waiting client receives.
    fn apply_entry(&mut self, entry: Entry, check_invariants: bool, observer: Option<&ApplyObserver>) -> ApplyResult {
        let log_id = entry.log_id;
        let result = match entry.payload {
            EntryPayload::Normal(req) => {
                let stamp = Stamp { index: log_id.index, now: req.now };
                let result = self.state.apply(stamp, &req.cmd);
                if check_invariants {
                    self.state.check_invariants();
                }
                if let Some(observe) = observer {
                    observe(&self.state, &req.cmd, &result);
                }
                result
            }
            // Blank and membership entries change no Impetus state; a
            // responder waiting on one (e.g. change_membership) gets `Ticked`.
            EntryPayload::Blank => Ok(Outcome::Ticked),
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(log_id), m);
                Ok(Outcome::Ticked)
            }
        };
        self.last_applied = Some(log_id);
        result
    }
}

/// Told of every command this replica applies, with the state after it
/// and the outcome (for metrics). Runs under the state's write lock: it
/// must be quick and must not block.
pub type ApplyObserver = Arc<dyn Fn(&State, &Command, &ApplyResult) + Send + Sync>;

/// The body of a snapshot: what a follower receives and what is stored.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// [`State::snapshot`] bytes (as bytes: see [`StoredSnapshot`]'s).
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
}

impl SnapshotBody {
    fn decode(bytes: &[u8]) -> io::Result<SnapshotBody> {
        impetus_proto::wire::decode("state-machine snapshot", SM_SNAPSHOT_VERSION, bytes, usize::MAX)
            .map_err(|e| invalid_data("state-machine snapshot", e))
    }

    /// Decode and restore, checking that the body agrees with `meta`.
    fn restore(meta: &SnapshotMeta, bytes: &[u8]) -> io::Result<Applied> {
        let body = SnapshotBody::decode(bytes)?;
        if body.last_applied != meta.last_log_id || body.membership != meta.last_membership {
            return Err(invalid_data(
                "state-machine snapshot",
                format!(
                    "body is at {:?} but the snapshot meta says {:?}",
                    body.last_applied.map(|l| l.index),
                    meta.last_log_id.map(|l| l.index)
                ),
            ));
        }
        let state = State::restore(&body.state).map_err(|e| invalid_data("state-machine snapshot", e))?;
        Ok(Applied { state, last_applied: body.last_applied, membership: body.membership })
    }
}

impl StoredSnapshot {
    /// The state this snapshot holds, checked as a restore checks it.
    pub fn applied(&self) -> io::Result<Applied> {
        SnapshotBody::restore(&self.meta, &self.data)
    }
}

/// A shared, read-only view of a replica's applied state, for queries.
/// Reads never block Raft for longer than one apply of one entry.
#[derive(Clone)]
pub struct StateHandle(Arc<RwLock<Applied>>);

impl fmt::Debug for StateHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateHandle").field("last_applied", &self.last_applied()).finish()
    }
}

impl StateHandle {
    fn read_guard(&self) -> RwLockReadGuard<'_, Applied> {
        // A panic in `State::apply` is a bug that the tests catch; readers
        // still get the state as it was left.
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_guard(&self) -> RwLockWriteGuard<'_, Applied> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the current state. Do not block inside `f`.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.read_guard().state)
    }

    /// Run `f` on the state with its last applied log id and membership.
    pub fn read_applied<T>(&self, f: impl FnOnce(&Applied) -> T) -> T {
        f(&self.read_guard())
    }

    /// The log id of the last entry applied to the state.
    pub fn last_applied(&self) -> Option<LogId> {
        self.read_guard().last_applied
    }

    /// Simulator only: plant a bug in this replica's state machine (see
    /// `impetus_queue::PlantedBug`). Lost when a snapshot is installed.
    #[doc(hidden)]
    pub fn plant_bug(&self, bug: impetus_queue::PlantedBug) {
        self.write_guard().state.plant_bug(bug);
    }

    /// `State::snapshot()` bytes of the current state: equal on two replicas
    /// at the same applied index.
    pub fn snapshot_bytes(&self) -> Vec<u8> {
        self.read(State::snapshot)
    }
}

/// The openraft state machine of Impetus.
///
/// The state lives in memory and is rebuilt on start from the stored
/// snapshot; openraft then re-applies the committed log entries after the
/// snapshot's last log id (they are never purged before a snapshot covers
/// them). Snapshots are saved durably before openraft learns about them.
pub struct StateMachineStore<C> {
    handle: StateHandle,
    snapshots: SnapshotStore,
    check_invariants: bool,
    observer: Option<ApplyObserver>,
    _config: PhantomData<fn() -> C>,
}

impl<C> fmt::Debug for StateMachineStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("handle", &self.handle)
            .field("snapshots", &self.snapshots)
            .field("check_invariants", &self.check_invariants)
            .finish()
    }
}

impl<C> StateMachineStore<C> {
    /// Open the state machine: restore the stored snapshot if there is one,
    /// else start from an empty [`State`].
    pub fn open(snapshots: SnapshotStore) -> io::Result<StateMachineStore<C>> {
        let applied = match snapshots.load()? {
            Some(stored) => {
                let applied = SnapshotBody::restore(&stored.meta, &stored.data)?;
                tracing::info!(
                    last_applied = ?applied.last_applied.map(|l| l.index),
                    bytes = stored.data.len(),
                    "state machine restored from snapshot"
                );
                applied
            }
            None => Applied::empty(),
        };
        Ok(StateMachineStore {
            handle: StateHandle(Arc::new(RwLock::new(applied))),
            snapshots,
            check_invariants: false,
            observer: None,
            _config: PhantomData,
        })
    }

    /// Tell `observer` of every command applied from now on.
    pub fn with_observer(mut self, observer: ApplyObserver) -> StateMachineStore<C> {
        self.observer = Some(observer);
        self
    }

    /// Call [`State::check_invariants`] after every applied command (tests,
    /// simulator). It panics naming the broken invariant.
    pub fn with_invariant_checks(mut self, on: bool) -> StateMachineStore<C> {
        self.check_invariants = on;
        self
    }

    /// A handle for queries on the applied state.
    pub fn handle(&self) -> StateHandle {
        self.handle.clone()
    }

    fn builder(&self) -> SnapshotBuilder<C> {
        SnapshotBuilder { handle: self.handle.clone(), snapshots: self.snapshots.clone(), _config: PhantomData }
    }
}

/// Builds a snapshot of the applied state and saves it.
pub struct SnapshotBuilder<C> {
    handle: StateHandle,
    snapshots: SnapshotStore,
    _config: PhantomData<fn() -> C>,
}

impl<C> fmt::Debug for SnapshotBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotBuilder").field("handle", &self.handle).finish()
    }
}

impl<C: ImpetusConfig> RaftSnapshotBuilder<C> for SnapshotBuilder<C> {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (meta, data) = crate::off_the_runtime(|| {
            // Under the lock only a copy on write (O(streams + jobs / 1024));
            // the encoding, ~200 ms per million jobs, runs after it is let go,
            // so applies and reads go on meanwhile.
            let (last_applied, membership, frozen) =
                self.handle.read_applied(|a| (a.last_applied, a.membership.clone(), a.state.freeze()));
            let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership.clone() };
            let state = frozen.snapshot();
            drop(frozen); // from here, a write copies nothing
            let body = SnapshotBody { last_applied, membership, state };
            (meta, impetus_proto::wire::encode(SM_SNAPSHOT_VERSION, &body))
        });
        let stored = StoredSnapshot { meta, data };
        self.snapshots.save(&stored).await?;
        tracing::info!(
            last_log_index = ?stored.meta.last_log_id.map(|l| l.index),
            bytes = stored.data.len(),
            "snapshot built and saved"
        );
        Ok(Snapshot { meta: stored.meta, snapshot: Cursor::new(stored.data) })
    }
}

impl<C: ImpetusConfig> RaftStateMachine<C> for StateMachineStore<C> {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder<C>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok(self.handle.read_applied(|a| (a.last_applied, a.membership.clone())))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        tracing::trace!(target: "impetus_latency", "apply starts");
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = entry.log_id.index;
            let result = self.handle.write_guard().apply_entry(entry, self.check_invariants, self.observer.as_ref());
            tracing::trace!(target: "impetus_latency", index, ok = result.is_ok(), "applied");
            if let Some(responder) = responder {
                responder.send(result);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.builder()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapshotData) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let applied = crate::off_the_runtime(|| SnapshotBody::restore(meta, &data))?;
        self.snapshots.save(&StoredSnapshot { meta: meta.clone(), data }).await?;
        tracing::info!(last_log_index = ?meta.last_log_id.map(|l| l.index), "snapshot installed");
        let old = std::mem::replace(&mut *self.handle.write_guard(), applied);
        // Freeing a large state takes a while: not under the lock, nor on
        // the runtime's thread.
        crate::off_the_runtime(|| drop(old));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(crate::off_the_runtime(|| self.snapshots.load())?
            .map(|s| Snapshot { meta: s.meta, snapshot: Cursor::new(s.data) }))
    }
}
