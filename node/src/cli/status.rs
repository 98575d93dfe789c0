//! `impetus status [--watch]`: the cluster console (power_mitten style).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use impetus_proto::ids::StreamName;
use impetus_sdk::ClusterStatus;

use super::util::{age, human_ms, Table};
use super::{connect, exit, print_json, Global};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Refresh every second and show throughput (completed jobs per second); Ctrl-C quits.
    #[arg(long)]
    pub watch: bool,
}

/// Completions per second per stream, from two snapshots.
pub type Rates = BTreeMap<StreamName, f64>;

pub async fn run(g: &Global, args: StatusArgs) -> anyhow::Result<u8> {
    let client = connect(g).await?;
    if !args.watch {
        let st = client.status().await.context("asking for the cluster status")?;
        if g.json {
            print_json(&st)?;
        } else {
            print!("{}", render(&st, g, st.now.0, None));
        }
        return Ok(exit::OK);
    }
    let mut prev: Option<(Instant, ClusterStatus)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(exit::OK),
        }
        let st = client.status().await.context("asking for the cluster status")?;
        let now = Instant::now();
        let rates = prev.as_ref().map(|(t, p)| rates(p, &st, now.duration_since(*t)));
        if g.json {
            let r: BTreeMap<String, f64> =
                rates.clone().unwrap_or_default().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            println!("{}", serde_json::json!({"status": st, "completed_per_sec": r}));
        } else {
            // Clear the screen, cursor home.
            print!("\x1b[2J\x1b[H{}", render(&st, g, st.now.0, rates.as_ref()));
            println!("\n(refreshing every second; Ctrl-C quits)");
        }
        prev = Some((now, st));
    }
}

/// Completions per second of each stream between two snapshots.
pub fn rates(before: &ClusterStatus, after: &ClusterStatus, elapsed: Duration) -> Rates {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let old: BTreeMap<&StreamName, u64> = before.streams.iter().map(|s| (&s.name, s.stats.completed_total)).collect();
    after
        .streams
        .iter()
        .map(|s| {
            let delta = s.stats.completed_total.saturating_sub(old.get(&s.name).copied().unwrap_or(0));
            (s.name.clone(), delta as f64 / secs)
        })
        .collect()
}

/// The console: who answered, the leader, the peers, the streams.
pub fn render(st: &ClusterStatus, g: &Global, now: u64, rates: Option<&Rates>) -> String {
    let mut out = format!(
        "cluster via {} ({}): leader {}, term {}, commit {}, applied {}\n\n",
        g.peer,
        st.peer,
        st.leader.map(|l| l.to_string()).unwrap_or_else(|| "none (election?)".into()),
        st.term,
        st.commit_index,
        st.applied_index,
    );
    let mut peers = Table::new(&[
        "PEER",
        "ADDRESS",
        "HOST",
        "PID",
        "RSS MB",
        "ROLE",
        "DRAINING",
        "HEARTBEAT",
        "RUNNING",
        "IDLE SLOTS",
    ]);
    for p in &st.peers {
        // The role in Raft now (voter, learner), or worker.
        let mut role = format!("{:?}", st.role_of(p.id)).to_lowercase();
        if Some(p.id) == st.leader {
            role.push_str(" (leader)");
        }
        match p.info.seat {
            impetus_proto::Seat::Preferred => role.push_str(" (--voter)"),
            impetus_proto::Seat::Never => role.push_str(" (--worker)"),
            impetus_proto::Seat::Any => {}
        }
        if p.id == st.peer {
            role.push_str(" (me)");
        }
        let running = per_stream(&p.leased);
        let addr = p.info.addresses.first().map(|a| a.split("/p2p/").next().unwrap_or(a)).unwrap_or("-");
        peers.row(vec![
            p.id.to_string(),
            addr.to_owned(),
            p.info.host.clone(),
            p.info.pid.to_string(),
            format!("{:.1}", p.rss_bytes as f64 / (1 << 20) as f64),
            role,
            if p.draining { "yes" } else { "no" }.into(),
            format!("{} ago", age(p.last_heartbeat, now)),
            running,
            per_stream(&p.idle),
        ]);
    }
    if peers.is_empty() {
        out.push_str("no peers registered\n");
    } else {
        out.push_str(&peers.render());
    }
    out.push('\n');
    let rate_col = if rates.is_some() { "DONE/S" } else { "COMPLETED" };
    let mut streams = Table::new(&["STREAM", "DEPTH", "RUNNING", "SUCCEEDED", "DEAD", "OLDEST PENDING", rate_col]);
    for s in &st.streams {
        let x = &s.stats;
        let rate = match rates {
            Some(r) => format!("{:.1}", r.get(&s.name).copied().unwrap_or(0.0)),
            None => x.completed_total.to_string(),
        };
        let mut name = s.name.to_string();
        if s.props.paused {
            name.push_str(" (paused)");
        }
        if stranded(s, st) {
            name.push_str(" (pinned to no peer of the cluster)");
        }
        streams.row(vec![
            name,
            (x.queued + x.delayed).to_string(),
            (x.leased + x.running).to_string(),
            x.succeeded.to_string(),
            x.dead.to_string(),
            x.oldest_pending_age_ms.map(human_ms).unwrap_or_else(|| "-".into()),
            rate,
        ]);
    }
    if streams.is_empty() {
        out.push_str("no streams\n");
    } else {
        out.push_str(&streams.render());
    }
    out
}

/// Whether `s` pins its jobs to peers none of which is in the cluster
/// (`st.peers`): nothing may lease them, so they wait until one such peer
/// joins or the pin list changes.
pub fn stranded(s: &impetus_proto::records::StreamInfo, st: &ClusterStatus) -> bool {
    !s.props.pin.is_empty() && !st.peers.iter().any(|p| s.props.pin.contains(&p.id))
}

/// `stream:n stream:n`, or `-` for none.
fn per_stream(counts: &[(StreamName, u32)]) -> String {
    if counts.is_empty() {
        return "-".to_owned();
    }
    counts.iter().map(|(s, n)| format!("{s}:{n}")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use impetus_proto::ids::{PeerId, Timestamp};
    use impetus_proto::records::{PeerInfo, PeerRecord, PeerRole, StreamInfo, StreamProps, StreamStats};

    fn status(completed: u64) -> ClusterStatus {
        let s1 = StreamName::new("s1").unwrap();
        ClusterStatus {
            peer: PeerId(1),
            leader: Some(PeerId(1)),
            term: 2,
            commit_index: 40,
            applied_index: 40,
            peers: vec![PeerRecord {
                id: PeerId(1),
                info: PeerInfo {
                    host: "box".into(),
                    pid: 4242,
                    addresses: vec!["/ip4/127.0.0.1/tcp/7420/p2p/12D3KooW".into()],
                    capacity: 8,
                    labels: vec![],
                    seat: impetus_proto::Seat::Preferred,
                },
                role: PeerRole::Voter,
                draining: false,
                registered_at: Timestamp(1_000),
                last_heartbeat: Timestamp(9_000),
                rss_bytes: 50 << 20,
                leased: vec![(s1.clone(), 3)],
                idle: vec![(s1.clone(), 1)],
            }],
            streams: vec![StreamInfo {
                name: s1,
                props: StreamProps::default(),
                created_at: Timestamp(1_000),
                stats: StreamStats {
                    queued: 5,
                    delayed: 1,
                    running: 3,
                    succeeded: completed,
                    completed_total: completed,
                    ..StreamStats::default()
                },
            }],
            voters: vec![PeerId(1)],
            learners: vec![],
            now: Timestamp(10_000),
        }
    }

    #[test]
    fn the_console_shows_peers_and_streams() {
        let g = crate::cli::Cli::try_parse_from(["impetus", "status"]).unwrap().global;
        expect_test::expect![[r#"
            cluster via 127.0.0.1:7420 (peer-1): leader peer-1, term 2, commit 40, applied 40

            PEER    ADDRESS                  HOST   PID  RSS MB  ROLE                           DRAINING  HEARTBEAT  RUNNING  IDLE SLOTS
            peer-1  /ip4/127.0.0.1/tcp/7420  box   4242    50.0  voter (leader) (--voter) (me)  no           1s ago  s1:3     s1:1

            STREAM  DEPTH  RUNNING  SUCCEEDED  DEAD  OLDEST PENDING  COMPLETED
            s1          6        3         10     0               -         10
        "#]]
        .assert_eq(&render(&status(10), &g, 10_000, None));
        let r = rates(&status(10), &status(30), Duration::from_secs(2));
        assert_eq!(r.values().copied().collect::<Vec<_>>(), vec![10.0]);
        assert!(render(&status(30), &g, 10_000, Some(&r)).contains("DONE/S"));
    }

    #[test]
    fn a_stream_pinned_to_no_peer_of_the_cluster_is_marked() {
        let g = crate::cli::Cli::try_parse_from(["impetus", "status"]).unwrap().global;
        let mut st = status(10);
        st.streams[0].props.pin = [PeerId(1)].into();
        assert!(!stranded(&st.streams[0], &st), "peer-1 is in the cluster");
        assert!(!render(&st, &g, 10_000, None).contains("pinned to no peer"));
        st.streams[0].props.pin = [PeerId(7), PeerId(8)].into();
        assert!(stranded(&st.streams[0], &st));
        assert!(render(&st, &g, 10_000, None).contains("s1 (pinned to no peer of the cluster)"));
    }
}
