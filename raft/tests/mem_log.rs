//! MemLogStore's durability model: manual flush and crash.

use impetus_raft::openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
use impetus_raft::openraft::type_config::TypeConfigExt;
use impetus_raft::{Entry, LeaderId, LogId, MemLogStore, Payload, TypeConfig};

fn blank(index: u64) -> Entry {
    Entry { log_id: LogId::new(LeaderId { term: 1, node_id: 1 }, index), payload: Payload::Blank }
}

#[tokio::test]
async fn crash_loses_only_unflushed_writes_and_acks_wait_for_flush() {
    let mut log = MemLogStore::<TypeConfig>::new();
    let (tx, rx) = TypeConfig::oneshot();
    log.append((1..=5).map(blank), IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap(); // auto mode: acknowledged at once
    assert_eq!(log.flush_count(), 1);

    log.set_manual_flush(true);
    let (tx, mut rx) = TypeConfig::oneshot();
    log.append((6..=8).map(blank), IOFlushed::signal(tx)).await.unwrap();
    assert!(rx.try_recv().is_err(), "acknowledged before the flush");
    // Reads see unflushed entries.
    assert_eq!(log.index_range(), Some((1, 8)));
    log.flush();
    rx.await.unwrap().unwrap();

    let (tx, mut rx) = TypeConfig::oneshot();
    log.append((9..=10).map(blank), IOFlushed::signal(tx)).await.unwrap();
    log.truncate_after(Some(blank(7).log_id)).await.unwrap();
    assert_eq!(log.index_range(), Some((1, 7)));
    log.crash();
    assert!(rx.try_recv().is_err(), "a write lost in the crash was acknowledged");
    // Back to the flushed image: 1..=8, the truncation was not flushed either.
    assert_eq!(log.index_range(), Some((1, 8)));
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_log_id.map(|l| l.index), Some(8));

    log.purge(blank(3).log_id).await.unwrap();
    log.flush();
    log.crash();
    assert_eq!(log.index_range(), Some((4, 8)));
    assert_eq!(log.purged(), Some(blank(3).log_id));
    let got = log.try_get_log_entries(..).await.unwrap();
    assert_eq!(got.len(), 5);
}

/// Odd ranges read nothing and never panic (the same rule as the WAL's).
#[tokio::test]
async fn odd_ranges_read_nothing() {
    use std::ops::Bound::{Excluded, Included};
    let mut log = MemLogStore::<TypeConfig>::new();
    let (tx, rx) = TypeConfig::oneshot();
    log.append((1..=5).map(blank), IOFlushed::signal(tx)).await.unwrap();
    rx.await.unwrap().unwrap();
    assert!(log.try_get_log_entries((Excluded(3), Excluded(3))).await.unwrap().is_empty());
    assert!(log.try_get_log_entries((Included(4), Excluded(0))).await.unwrap().is_empty());
    assert_eq!(log.try_get_log_entries((Excluded(2), Included(4))).await.unwrap().len(), 2);
}
