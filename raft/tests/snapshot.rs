//! Snapshots are taken every N entries, the log behind them is purged, and a
//! restart recovers the identical state from the snapshot plus the log.
#![cfg(feature = "sled")]

mod common;

use std::time::Duration;

use common::*;
use impetus_raft::{open_stores, raft_config, start_node, PeerNode, TypeConfig};

async fn start(dir: &std::path::Path) -> (impetus_raft::Raft, impetus_raft::StateHandle, impetus_raft::WalLogStore) {
    let (log, sm) = open_stores::<TypeConfig>(dir).await.unwrap();
    let probe = log.clone();
    let sm = sm.with_invariant_checks(true);
    // A snapshot every 20 entries, keep 5 entries behind it.
    let (raft, state) =
        start_node(1, raft_config(20, 5), impetus_raft::testing::Router::new(), log, sm, Some(PeerNode::new("p1")))
            .await
            .unwrap();
    (raft, state, probe)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_purges_log_and_restart_recovers_identical_state() {
    let dir = tempfile::tempdir().unwrap();
    let (raft, state, log) = start(dir.path()).await;
    let last = populate(&raft, 60).await;
    assert!(last >= 60);

    // Wait until a snapshot covers at least index 40 and the log behind it is purged.
    let m = raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.snapshot.is_some_and(|s| s.index >= 40) && m.purged.is_some(), "snapshot and purge")
        .await
        .expect("snapshot taken and log purged");
    let snap_index = m.snapshot.unwrap().index;
    let purged = m.purged.unwrap().index;
    assert!(purged > 0 && purged <= snap_index, "purged {purged}, snapshot {snap_index}");
    // max_in_snapshot_log_to_keep = 5: everything older than snapshot-5 goes.
    assert!(purged + 5 >= snap_index, "purged {purged} lags snapshot {snap_index}");

    // The purge reached sled (purge is not flushed by itself; shutdown first).
    let before = state.snapshot_bytes();
    let jobs = state.read(job_count);
    assert_eq!(jobs, 60);
    raft.shutdown().await.unwrap();
    let (first, last_on_disk) = log.index_range().expect("log not empty");
    assert!(first > 1, "log was not purged: first index {first}");
    assert_eq!(last_on_disk, last.max(last_on_disk));
    assert!(log.purged().is_some());
    drop((raft, state, log));

    // Restart: snapshot + remaining log give the identical state.
    let (raft, state, log) = start(dir.path()).await;
    let restored_at = state.last_applied().map(|l| l.index).unwrap_or(0);
    assert!(restored_at >= snap_index, "restored from snapshot at {restored_at}");
    wait_applied(&raft, last).await;
    assert_eq!(state.snapshot_bytes(), before);
    assert_eq!(state.read(job_count), 60);
    // And it keeps working.
    write(&raft, 9_000, submit(1_000)).await;
    assert_eq!(state.read(job_count), 61);
    raft.shutdown().await.unwrap();
    drop(log);
}
