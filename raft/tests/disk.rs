//! One peer on its data directory: writes, reads, restart, durability of
//! acknowledged writes, moving an old sled log into the WAL.
#![cfg(feature = "sled")]

mod common;

use std::time::Duration;

use common::*;
use impetus_raft::openraft::async_runtime::WatchReceiver;
use impetus_raft::{
    open_stores, raft_config, start_node, start_single, start_single_with, PeerNode, TypeConfig, WalLogStore,
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
    let (log, sm) = open_stores::<TypeConfig>(dir.path()).await.unwrap();
    let probe: WalLogStore = log.clone();
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
