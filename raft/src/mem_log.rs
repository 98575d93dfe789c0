//! The Raft log in memory, with a model of what is flushed: for tests and the
//! deterministic simulator.

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;

use crate::{Entry, ImpetusConfig, LogId, Vote};

/// One image of the log: the live one, or the durable one.
#[derive(Clone, Debug, Default)]
struct Image {
    log: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

/// A change to the log, replayed on the durable image at a flush.
#[derive(Debug)]
enum Op {
    Append(Vec<Entry>),
    TruncateAfter(Option<LogId>),
    Purge(LogId),
    Vote(Vote),
    Committed(Option<LogId>),
}

impl Image {
    fn apply(&mut self, op: Op) {
        match op {
            Op::Append(entries) => {
                for e in entries {
                    self.log.insert(e.log_id.index, e);
                }
            }
            Op::TruncateAfter(last) => {
                let from = last.map_or(0, |l| l.index + 1);
                self.log.split_off(&from);
            }
            Op::Purge(upto) => {
                self.log = self.log.split_off(&(upto.index + 1));
                if self.purged.as_ref() < Some(&upto) {
                    self.purged = Some(upto);
                }
            }
            Op::Vote(v) => self.vote = Some(v),
            Op::Committed(c) => self.committed = c,
        }
    }

    fn log_state(&self) -> (Option<LogId>, Option<LogId>) {
        let last = self.log.values().next_back().map(|e| e.log_id).or(self.purged);
        (self.purged, last)
    }
}

struct Inner<C: ImpetusConfig> {
    /// What reads see: every operation so far.
    live: Image,
    /// What survives a crash: the operations up to the last flush.
    durable: Image,
    /// Operations after the last flush (manual-flush mode only).
    unflushed: Vec<Op>,
    /// Append callbacks waiting for the next flush (manual-flush mode only).
    waiting: Vec<IOFlushed<C>>,
    manual_flush: bool,
    flushes: u64,
    /// PLANTED BUG (simulator only): acknowledge appends before they are flushed.
    ack_before_flush: bool,
}

impl<C: ImpetusConfig> Inner<C> {
    fn record(&mut self, op: Op, clone_for_durable: impl FnOnce(&Op) -> Op) {
        let copy = clone_for_durable(&op);
        self.live.apply(op);
        if self.manual_flush {
            self.unflushed.push(copy);
        } else {
            self.durable.apply(copy);
        }
    }

    fn flush(&mut self) {
        for op in self.unflushed.drain(..) {
            self.durable.apply(op);
        }
        self.flushes += 1;
        for cb in self.waiting.drain(..) {
            cb.io_completed(Ok(()));
        }
    }
}

fn copy_op(op: &Op) -> Op {
    match op {
        Op::Append(es) => Op::Append(es.clone()),
        Op::TruncateAfter(l) => Op::TruncateAfter(*l),
        Op::Purge(l) => Op::Purge(*l),
        Op::Vote(v) => Op::Vote(*v),
        Op::Committed(c) => Op::Committed(*c),
    }
}

/// The Raft log in memory.
///
/// Clones share the same log, so a simulated peer can be "restarted" with a
/// clone of its store.
///
/// Durability model, the same as `WalLogStore`'s: a write is durable once
/// flushed, and `append` is acknowledged (its callback called) only after
/// the flush that covers it. By default every append is flushed at once. In
/// manual-flush mode ([`MemLogStore::set_manual_flush`]) writes wait for
/// [`MemLogStore::flush`] (a slow disk), and [`MemLogStore::crash`] loses
/// every write since the last flush, as a power cut would. `save_vote` is
/// always flushed before it returns (openraft requires it).
pub struct MemLogStore<C: ImpetusConfig> {
    inner: Arc<Mutex<Inner<C>>>,
    _config: PhantomData<fn() -> C>,
}

impl<C: ImpetusConfig> Clone for MemLogStore<C> {
    fn clone(&self) -> Self {
        MemLogStore { inner: self.inner.clone(), _config: PhantomData }
    }
}

impl<C: ImpetusConfig> Default for MemLogStore<C> {
    fn default() -> Self {
        MemLogStore::new()
    }
}

impl<C: ImpetusConfig> Debug for MemLogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("MemLogStore")
            .field("entries", &g.live.log.len())
            .field("purged", &g.live.purged)
            .field("unflushed_ops", &g.unflushed.len())
            .field("manual_flush", &g.manual_flush)
            .finish()
    }
}

impl<C: ImpetusConfig> MemLogStore<C> {
    pub fn new() -> MemLogStore<C> {
        MemLogStore {
            inner: Arc::new(Mutex::new(Inner {
                live: Image::default(),
                durable: Image::default(),
                unflushed: Vec::new(),
                waiting: Vec::new(),
                manual_flush: false,
                flushes: 0,
                ack_before_flush: false,
            })),
            _config: PhantomData,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<C>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// In manual mode appends are acknowledged only at [`MemLogStore::flush`];
    /// switching back to automatic flushes what is pending.
    pub fn set_manual_flush(&self, manual: bool) {
        let mut g = self.lock();
        g.manual_flush = manual;
        if !manual {
            g.flush();
        }
    }

    /// Make every write so far durable and acknowledge the waiting appends.
    pub fn flush(&self) {
        self.lock().flush();
    }

    /// Simulate a crash: forget every write since the last flush and drop the
    /// appends waiting for it (never acknowledged). Shut the Raft instance
    /// using this store down first; restart with a clone of the store.
    pub fn crash(&self) {
        let mut g = self.lock();
        g.unflushed.clear();
        g.waiting.clear();
        g.live = g.durable.clone();
    }

    /// Simulator only: PLANTED BUG. In manual-flush mode, acknowledge each
    /// append at once, before it is flushed, so a crash loses acknowledged
    /// writes. Used by the simulator to prove its checkers catch it.
    #[doc(hidden)]
    pub fn plant_ack_before_flush(&self, on: bool) {
        self.lock().ack_before_flush = on;
    }

    /// How many flushes happened (each covers a whole batch of appends).
    pub fn flush_count(&self) -> u64 {
        self.lock().flushes
    }

    /// `(first index, last index)` of the live log, if it has entries.
    pub fn index_range(&self) -> Option<(u64, u64)> {
        let g = self.lock();
        Some((*g.live.log.keys().next()?, *g.live.log.keys().next_back()?))
    }

    /// The last purged log id.
    pub fn purged(&self) -> Option<LogId> {
        self.lock().live.purged
    }
}

impl<C: ImpetusConfig> RaftLogReader<C> for MemLogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let Some(range) = crate::log_range(&range) else { return Ok(Vec::new()) };
        Ok(self.lock().live.log.range(range).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.lock().live.vote)
    }
}

impl<C: ImpetusConfig> RaftLogStorage<C> for MemLogStore<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let (last_purged_log_id, last_log_id) = self.lock().live.log_state();
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let mut g = self.lock();
        g.record(Op::Vote(*vote), copy_op);
        if g.manual_flush {
            g.flush();
        }
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.lock().record(Op::Committed(committed), copy_op);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.lock().live.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut g = self.lock();
        g.record(Op::Append(entries), copy_op);
        if g.manual_flush && g.ack_before_flush {
            // PLANTED BUG (simulator only): acknowledged, but not durable.
            drop(g);
            callback.io_completed(Ok(()));
        } else if g.manual_flush {
            g.waiting.push(callback);
        } else {
            g.flushes += 1;
            drop(g);
            callback.io_completed(Ok(()));
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.lock().record(Op::TruncateAfter(last_log_id), copy_op);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.lock().record(Op::Purge(log_id), copy_op);
        Ok(())
    }
}
