//! Three in-process nodes on MemLogStore: replication, identical state
//! machines, leader failover.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use impetus_raft::openraft::async_runtime::WatchReceiver;
use impetus_raft::openraft::ServerState;
use impetus_raft::testing::Router;
use impetus_raft::{
    raft_config, ImpetusRaft, MemLogStore, MemSnapshotStore, PeerNode, SnapshotStore, StateHandle, StateMachineStore,
    TypeConfig,
};

struct Cluster {
    router: Router<TypeConfig>,
    nodes: BTreeMap<u64, (ImpetusRaft<TypeConfig>, StateHandle)>,
}

async fn start_cluster(snapshot_every: u64) -> Cluster {
    let router = Router::new();
    let mut nodes = BTreeMap::new();
    for id in 1..=3u64 {
        let sm = StateMachineStore::open(SnapshotStore::Memory(MemSnapshotStore::new()))
            .unwrap()
            .with_invariant_checks(true);
        let handle = sm.handle();
        let log = MemLogStore::<TypeConfig>::new();
        // Longer election timeouts than production: the test machine is shared
        // and loaded, and a spurious election would only slow the test.
        let config = impetus_raft::openraft::Config {
            election_timeout_min: 1_000,
            election_timeout_max: 2_000,
            ..raft_config(snapshot_every, 5)
        };
        let config = std::sync::Arc::new(config.validate().unwrap());
        let raft = ImpetusRaft::<TypeConfig>::new(id, config, router.for_node(id), log, sm).await.unwrap();
        router.add(id, raft.clone());
        nodes.insert(id, (raft, handle));
    }
    let members: BTreeMap<u64, PeerNode> = (1..=3).map(|id| (id, PeerNode::new(format!("node-{id}")))).collect();
    nodes[&1].0.initialize(members).await.unwrap();
    Cluster { router, nodes }
}

impl Cluster {
    async fn leader(&self) -> u64 {
        for _ in 0..200 {
            for (id, (raft, _)) in &self.nodes {
                let m = raft.metrics().borrow_watched().clone();
                if m.state == ServerState::Leader && m.current_leader == Some(*id) {
                    return *id;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no leader elected");
    }

    async fn assert_identical_at(&self, index: u64) {
        let mut bytes = BTreeSet::new();
        for (raft, state) in self.nodes.values() {
            wait_applied(raft, index).await;
            bytes.insert(state.snapshot_bytes());
        }
        // Every node stops applying only at the same last index here (no
        // writes in flight), so the bytes must be equal.
        assert_eq!(bytes.len(), 1, "state machines differ at index {index}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_fail_over() {
    let mut cluster = start_cluster(10_000).await;
    let leader = cluster.leader().await;
    let raft = cluster.nodes[&leader].0.clone();
    let last = populate(&raft, 30).await;
    cluster.assert_identical_at(last).await;
    for (_, state) in cluster.nodes.values() {
        assert_eq!(state.read(job_count), 30);
    }

    // Kill the leader: unreachable, then shut down.
    cluster.router.remove(leader);
    let (old, _) = cluster.nodes.remove(&leader).unwrap();
    old.shutdown().await.unwrap();

    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    let raft = cluster.nodes[&new_leader].0.clone();
    let (idx, _) = write(&raft, 50_000, submit(777)).await;
    assert!(idx > last);
    cluster.assert_identical_at(idx).await;
    for (_, state) in cluster.nodes.values() {
        assert_eq!(state.read(job_count), 31);
    }
    for (raft, _) in cluster.nodes.values() {
        raft.shutdown().await.unwrap();
    }
}

/// A follower cut off while the leader snapshots and purges catches up by
/// receiving the snapshot, and ends byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot() {
    let cluster = start_cluster(10).await;
    let leader = cluster.leader().await;
    let follower = *cluster.nodes.keys().find(|&&id| id != leader).unwrap();
    let raft = cluster.nodes[&leader].0.clone();
    populate(&raft, 2).await;
    cluster.router.set_isolated(follower, true);
    let last = submit_many(&raft, 100, 40).await;
    raft.wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.purged.is_some_and(|p| p.index > 10), "leader purged")
        .await
        .unwrap();
    cluster.router.set_isolated(follower, false);
    cluster.assert_identical_at(last).await;
    let f = &cluster.nodes[&follower];
    assert!(f.0.metrics().borrow_watched().snapshot.is_some(), "follower did not install a snapshot");
    assert_eq!(f.1.read(job_count), 42);
    for (raft, _) in cluster.nodes.values() {
        raft.shutdown().await.unwrap();
    }
}
