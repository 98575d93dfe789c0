//! One peer on sled: writes, reads, restart, durability of acknowledged writes.
#![cfg(feature = "sled")]

mod common;

use std::time::Duration;

use common::*;
use impetus_raft::openraft::async_runtime::WatchReceiver;
use impetus_raft::openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
use impetus_raft::openraft::type_config::TypeConfigExt;
use impetus_raft::{
    open_sled, raft_config, start_node, start_single, start_single_with, Entry, LeaderId, LogId, PeerNode,
    SledLogStore, TypeConfig,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_survives_restart_with_identical_state() {
    let dir = tempfile::tempdir().unwrap();
    let (raft, state) = start_single(dir.path(), 1, "local-1".into()).await.unwrap();
    let last = populate(&raft, 20).await;
    assert_eq!(state.read(job_count), 20);
    assert_eq!(state.read(|s| s.streams().len()), 1);
    let before = state.snapshot_bytes();
    raft.shutdown().await.unwrap();
    drop(raft);
    drop(state);

    // Reopen the same directory: not re-initialized, everything recovered.
    let (raft, state) = start_single(dir.path(), 1, "local-1".into()).await.unwrap();
    wait_applied(&raft, last).await;
    assert_eq!(state.snapshot_bytes(), before, "state after restart differs");
    assert_eq!(state.read(job_count), 20);
    // The recovered peer is leader again and accepts writes.
    let (idx, _) = write(&raft, 5_000, submit(99)).await;
    assert!(idx > last);
    assert_eq!(state.read(job_count), 21);
    raft.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_is_acknowledged_only_after_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (log, sm) = open_sled::<TypeConfig>(dir.path()).await.unwrap();
    let probe: SledLogStore = log.clone();
    let (raft, _state) = start_node(
        7,
        raft_config(10_000, 100),
        impetus_raft::testing::Router::new(),
        log,
        sm,
        Some(PeerNode::new("local-7")),
    )
    .await
    .unwrap();
    write(&raft, 1_000, put_module()).await;
    write(&raft, 1_001, create_stream()).await;
    for i in 0..10 {
        let flushes = probe.flush_count();
        let (idx, _) = write(&raft, 2_000 + i, submit(i)).await;
        assert!(probe.durable_index() >= idx, "acknowledged index {idx} but only {} is flushed", probe.durable_index());
        assert!(probe.flush_count() > flushes, "no flush between two acknowledged writes");
    }
    raft.shutdown().await.unwrap();
}

fn blank(index: u64) -> Entry {
    Entry { log_id: LogId::new(LeaderId { term: 1, node_id: 1 }, index), payload: impetus_raft::Payload::Blank }
}

/// `append` writes the whole batch, flushes once, then signals; the entries
/// are on disk for a fresh open of the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_flushes_once_per_batch_then_acknowledges() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        let mut log = SledLogStore::<TypeConfig>::open(&db).unwrap();
        let (tx, rx) = TypeConfig::oneshot();
        log.append((1..=100).map(blank), IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        assert_eq!(log.flush_count(), 1, "one flush for a batch of 100");
        assert_eq!(log.durable_index(), 100);

        log.truncate_after(Some(blank(90).log_id)).await.unwrap();
        log.purge(blank(10).log_id).await.unwrap();
        let (tx, rx) = TypeConfig::oneshot();
        log.append((91..=95).map(blank), IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
    }
    let db = sled::open(dir.path()).unwrap();
    let mut log = SledLogStore::<TypeConfig>::open(&db).unwrap();
    assert_eq!(log.index_range().unwrap(), Some((11, 95)));
    assert_eq!(log.purged().unwrap(), Some(blank(10).log_id));
    let got = log.try_get_log_entries(20..=22).await.unwrap();
    assert_eq!(got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![20, 21, 22]);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|l| l.index), Some(95));
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_never_reinitializes() {
    let dir = tempfile::tempdir().unwrap();
    let config = || raft_config(10_000, 100);
    let (raft, _) = start_single_with(dir.path(), 3, "a".into(), config()).await.unwrap();
    let last = populate(&raft, 1).await;
    raft.shutdown().await.unwrap();
    drop(raft);
    // A different address on restart must not create a new membership.
    let (raft, _) = start_single_with(dir.path(), 3, "b".into(), config()).await.unwrap();
    wait_applied(&raft, last).await;
    let m = raft.metrics().borrow_watched().membership_config.clone();
    let nodes: Vec<_> = m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
    assert_eq!(nodes, vec![(3, "a".to_string())]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    raft.shutdown().await.unwrap();
}
