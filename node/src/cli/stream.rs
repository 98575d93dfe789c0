//! `impetus stream create|list|show|update|pause|resume|delete`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use impetus_proto::ids::{PeerId, StreamName};
use impetus_proto::records::{StreamInfo, StreamPatch, StreamProps};
use impetus_sdk::Client;

use super::util::{
    age, human_ms, human_time, now_ms, parse_duration, parse_optional_duration_ms, parse_optional_u32,
    parse_optional_u64, parse_peer_id, OrNone, Table,
};
use super::{connect, exit, print_json, with_stream_hint, Global};

#[derive(Debug, clap::Subcommand)]
pub enum StreamCommand {
    /// Create a stream; unset properties take their defaults (see `stream show`).
    Create {
        name: StreamName,
        #[command(flatten)]
        props: PropFlags,
    },
    /// List the streams with their job counts.
    List,
    /// Show a stream's properties and statistics.
    Show { name: StreamName },
    /// Change some properties of a stream (the flags given; the others stay).
    Update {
        name: StreamName,
        #[command(flatten)]
        props: PropFlags,
    },
    /// Pause a stream: it accepts jobs but grants no leases.
    Pause { name: StreamName },
    /// Resume a paused stream.
    Resume { name: StreamName },
    /// Delete a stream with its jobs and data (refused while it has live jobs unless --force).
    Delete {
        name: StreamName,
        /// Delete even with queued, delayed or running jobs.
        #[arg(long)]
        force: bool,
    },
}

/// The properties of a stream, as flags (all optional).
#[derive(Debug, Default, clap::Args)]
pub struct PropFlags {
    /// Priority of jobs submitted without one (higher runs first).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Most new leases per second, cluster-wide (`none` = unlimited).
    #[arg(long, value_name = "N", value_parser = parse_optional_u32)]
    pub spawn_frequency: Option<OrNone<u32>>,
    /// Most jobs of this stream one peer runs at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub mpps: Option<u32>,
    /// A peer stops tracking the stream after this long idle.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// How long a lease lives unless renewed.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub lease_ttl: Option<Duration>,
    /// Attempts before a job goes Dead.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: Option<u32>,
    /// Backoff before the first retry (doubles each retry).
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub retry_backoff: Option<Duration>,
    /// Cap of the retry backoff.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub retry_backoff_max: Option<Duration>,
    /// Wall-clock limit of one attempt.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Fuel limit of one attempt (`none` = wall clock only).
    #[arg(long, value_name = "N", value_parser = parse_optional_u64)]
    pub fuel: Option<OrNone<u64>>,
    /// Linear-memory limit of one job, in MiB.
    #[arg(long, value_name = "MB", value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub memory: Option<u64>,
    /// Only these peers run the stream's jobs (repeatable; replaces the list).
    #[arg(long, value_name = "PEER", value_parser = parse_peer_id)]
    pub pin: Vec<PeerId>,
    /// These peers never run the stream's jobs (repeatable; replaces the list).
    #[arg(long, value_name = "PEER", value_parser = parse_peer_id)]
    pub ignore: Vec<PeerId>,
    /// How long a finished job (succeeded, dead, cancelled) and its result
    /// are kept after it finished (`none` = until `jobs purge` or the
    /// stream's deletion; a new stream's: 1d).
    #[arg(long, value_name = "D", value_parser = parse_optional_duration_ms)]
    pub retain: Option<OrNone<u64>>,
}

fn ms(d: Option<Duration>) -> Option<u64> {
    d.map(|d| d.as_millis().min(u64::MAX as u128) as u64)
}

impl PropFlags {
    /// The flags given, as a patch.
    pub fn patch(&self) -> StreamPatch {
        let set = |v: &Vec<PeerId>| (!v.is_empty()).then(|| v.iter().copied().collect::<BTreeSet<_>>());
        StreamPatch {
            default_priority: self.priority,
            spawn_frequency: self.spawn_frequency.map(|l| l.0),
            mpps: self.mpps,
            idle_timeout_ms: ms(self.idle_timeout),
            lease_ttl_ms: ms(self.lease_ttl),
            max_attempts: self.max_attempts,
            retry_backoff_ms: ms(self.retry_backoff),
            retry_backoff_max_ms: ms(self.retry_backoff_max),
            job_timeout_ms: ms(self.timeout),
            fuel: self.fuel.map(|l| l.0),
            memory_limit_bytes: self.memory.map(|mb| mb << 20),
            pin: set(&self.pin),
            ignore: set(&self.ignore),
            paused: None,
            retain_ms: self.retain.map(|r| r.0),
        }
    }
}

pub async fn run(g: &Global, cmd: StreamCommand) -> anyhow::Result<u8> {
    let client = connect(g).await?;
    match cmd {
        StreamCommand::Create { name, props } => {
            let props = StreamProps::default().patched(&props.patch());
            props.validate().map_err(|e| super::BadInput(e.to_string()))?;
            client.create_stream(&name, props).await.with_context(|| format!("creating stream {name}"))?;
            done(g, &name, "created")
        }
        StreamCommand::Update { name, props } => {
            let patch = props.patch();
            if patch == StreamPatch::default() {
                crate::bad_input!(
                    "nothing to update: give at least one property flag (see `impetus stream update --help`)"
                );
            }
            client.update_stream(&name, patch).await.map_err(with_stream_hint)?;
            done(g, &name, "updated")
        }
        StreamCommand::Pause { name } => {
            let patch = StreamPatch { paused: Some(true), ..StreamPatch::default() };
            client.update_stream(&name, patch).await.map_err(with_stream_hint)?;
            done(g, &name, "paused")
        }
        StreamCommand::Resume { name } => {
            let patch = StreamPatch { paused: Some(false), ..StreamPatch::default() };
            client.update_stream(&name, patch).await.map_err(with_stream_hint)?;
            done(g, &name, "resumed")
        }
        StreamCommand::Delete { name, force } => {
            let removed = client.delete_stream(&name, force).await.map_err(with_stream_hint)?;
            if g.json {
                print_json(&serde_json::json!({"stream": name.as_str(), "deleted": true, "jobs_removed": removed}))?;
            } else {
                println!("deleted stream {name} ({removed} jobs removed)");
            }
            Ok(exit::OK)
        }
        StreamCommand::List => list(g, &client).await,
        StreamCommand::Show { name } => {
            let info = client.stream(&name).await.map_err(with_stream_hint)?;
            if g.json {
                print_json(&info)?;
            } else {
                // The cluster's view, for the clock and the peers; without
                // it (an error), this machine's clock and no pin check.
                let st = client.status().await.ok();
                let now = st.as_ref().map_or_else(now_ms, |st| st.now.0);
                let stranded = st.is_some_and(|st| super::status::stranded(&info, &st));
                print!("{}", show(&info, now, stranded));
            }
            Ok(exit::OK)
        }
    }
}

fn done(g: &Global, name: &StreamName, what: &str) -> anyhow::Result<u8> {
    if g.json {
        print_json(&serde_json::json!({"stream": name.as_str(), "result": what}))?;
    } else {
        println!("stream {name} {what}");
    }
    Ok(exit::OK)
}

async fn list(g: &Global, client: &Client) -> anyhow::Result<u8> {
    let streams = client.streams().await.context("listing streams")?;
    if g.json {
        print_json(&streams)?;
    } else if streams.is_empty() {
        println!("no streams (create one with `impetus stream create NAME`)");
    } else {
        print!("{}", list_table(&streams));
    }
    Ok(exit::OK)
}

pub fn list_table(streams: &[StreamInfo]) -> String {
    let mut t = Table::new(&[
        "NAME",
        "QUEUED",
        "DELAYED",
        "RUNNING",
        "SUCCEEDED",
        "DEAD",
        "CANCELLED",
        "OLDEST PENDING",
        "PAUSED",
    ]);
    for s in streams {
        let st = &s.stats;
        t.row(vec![
            s.name.to_string(),
            st.queued.to_string(),
            st.delayed.to_string(),
            (st.leased + st.running).to_string(),
            st.succeeded.to_string(),
            st.dead.to_string(),
            st.cancelled.to_string(),
            st.oldest_pending_age_ms.map(human_ms).unwrap_or_else(|| "-".into()),
            if s.props.paused { "yes" } else { "no" }.into(),
        ]);
    }
    t.render()
}

fn peers(set: &BTreeSet<PeerId>) -> String {
    if set.is_empty() {
        "-".into()
    } else {
        set.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    }
}

/// A stream's properties and statistics, for humans.
/// `stranded`: pinned to no peer of the cluster ([`super::status::stranded`]).
pub fn show(info: &StreamInfo, now: u64, stranded: bool) -> String {
    let p = &info.props;
    let s = &info.stats;
    let rows: Vec<(&str, String)> = vec![
        ("stream", info.name.to_string()),
        ("created", format!("{} ({} ago)", human_time(info.created_at), age(info.created_at, now))),
        ("paused", if p.paused { "yes" } else { "no" }.into()),
        ("default priority", p.default_priority.to_string()),
        ("spawn frequency", p.spawn_frequency.map(|f| format!("{f}/s")).unwrap_or_else(|| "unlimited".into())),
        ("mpps", p.mpps.to_string()),
        ("idle timeout", human_ms(p.idle_timeout_ms)),
        ("lease ttl", human_ms(p.lease_ttl_ms)),
        ("max attempts", p.max_attempts.to_string()),
        ("retry backoff", format!("{} (max {})", human_ms(p.retry_backoff_ms), human_ms(p.retry_backoff_max_ms))),
        ("job timeout", human_ms(p.job_timeout_ms)),
        ("fuel", p.fuel.map(|f| f.to_string()).unwrap_or_else(|| "unlimited".into())),
        ("memory", format!("{} MiB", p.memory_limit_bytes >> 20)),
        ("retain finished", p.retain_ms.map(human_ms).unwrap_or_else(|| "until purged".into())),
        (
            "pin",
            if stranded {
                format!("{} (none is in the cluster: no peer may lease these jobs)", peers(&p.pin))
            } else {
                peers(&p.pin)
            },
        ),
        ("ignore", peers(&p.ignore)),
        ("queued", s.queued.to_string()),
        ("delayed", s.delayed.to_string()),
        ("leased", s.leased.to_string()),
        ("running", s.running.to_string()),
        ("succeeded", s.succeeded.to_string()),
        ("dead", s.dead.to_string()),
        ("cancelled", s.cancelled.to_string()),
        ("oldest pending", s.oldest_pending_age_ms.map(human_ms).unwrap_or_else(|| "-".into())),
        ("submitted (total)", s.submitted_total.to_string()),
        ("completed (total)", s.completed_total.to_string()),
        ("failed attempts", s.failed_attempts_total.to_string()),
        ("expired leases", s.expired_leases_total.to_string()),
        ("forgotten (total)", s.forgotten_total.to_string()),
    ];
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<w$}  {v}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use impetus_proto::ids::Timestamp;
    use impetus_proto::records::StreamStats;

    fn stream(args: &[&str]) -> Result<StreamCommand, clap::Error> {
        let mut v = vec!["impetus", "stream"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v)?.command {
            Command::Stream(s) => Ok(s),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn create_flags_become_props() {
        let StreamCommand::Create { name, props } = stream(&[
            "create",
            "s1",
            "--priority",
            "5",
            "--spawn-frequency",
            "10",
            "--mpps",
            "2",
            "--lease-ttl",
            "10s",
            "--max-attempts",
            "5",
            "--retry-backoff",
            "500ms",
            "--retry-backoff-max",
            "1m",
            "--timeout",
            "2m",
            "--fuel",
            "1000000",
            "--memory",
            "64",
            "--pin",
            "peer-1",
            "--pin",
            "2",
            "--ignore",
            "peer-3",
        ])
        .unwrap() else {
            panic!("not a create")
        };
        assert_eq!(name.as_str(), "s1");
        let p = StreamProps::default().patched(&props.patch());
        assert_eq!(p.default_priority, 5);
        assert_eq!(p.spawn_frequency, Some(10));
        assert_eq!(p.mpps, 2);
        assert_eq!(p.lease_ttl_ms, 10_000);
        assert_eq!(p.max_attempts, 5);
        assert_eq!((p.retry_backoff_ms, p.retry_backoff_max_ms), (500, 60_000));
        assert_eq!(p.job_timeout_ms, 120_000);
        assert_eq!(p.fuel, Some(1_000_000));
        assert_eq!(p.memory_limit_bytes, 64 << 20);
        assert_eq!(p.pin, [PeerId(1), PeerId(2)].into_iter().collect());
        assert_eq!(p.ignore, [PeerId(3)].into_iter().collect());
        assert_eq!(p.idle_timeout_ms, StreamProps::default().idle_timeout_ms);
    }

    #[test]
    fn update_patches_only_what_is_given() {
        let StreamCommand::Update { props, .. } = stream(&["update", "s1", "--fuel", "none"]).unwrap() else {
            panic!("not an update")
        };
        assert_eq!(props.patch(), StreamPatch { fuel: Some(None), ..StreamPatch::default() });
        assert_eq!(PropFlags::default().patch(), StreamPatch::default());
        assert!(stream(&["create", "s1", "--mpps", "0"]).is_err());
        assert!(stream(&["create", "no way"]).is_err());
        assert!(matches!(stream(&["delete", "s1", "--force"]).unwrap(), StreamCommand::Delete { force: true, .. }));
    }

    #[test]
    fn tables_show_counts() {
        let info = StreamInfo {
            name: StreamName::new("s1").unwrap(),
            props: StreamProps::default(),
            created_at: Timestamp(1_000),
            stats: StreamStats {
                queued: 3,
                leased: 1,
                running: 2,
                succeeded: 10,
                oldest_pending_age_ms: Some(2_500),
                ..StreamStats::default()
            },
        };
        expect_test::expect![[r#"
            NAME  QUEUED  DELAYED  RUNNING  SUCCEEDED  DEAD  CANCELLED  OLDEST PENDING  PAUSED
            s1         3        0        3         10     0          0            2.5s  no
        "#]]
        .assert_eq(&list_table(std::slice::from_ref(&info)));
        let text = show(&info, 61_000, false);
        assert!(text.contains("created            1970-01-01 00:00:01.000Z (1m00s ago)"), "{text}");
        assert!(text.contains("spawn frequency    unlimited"), "{text}");
        assert!(text.contains("pin                -\n"), "{text}");
        let pinned = StreamInfo { props: StreamProps { pin: [PeerId(9)].into(), ..info.props.clone() }, ..info };
        let text = show(&pinned, 61_000, true);
        assert!(
            text.contains("pin                peer-9 (none is in the cluster: no peer may lease these jobs)"),
            "{text}"
        );
    }
}
