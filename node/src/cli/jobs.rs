//! `impetus jobs list|show|cancel|retry|purge`.

use anyhow::Context as _;
use impetus_proto::ids::{JobId, StreamName};
use impetus_proto::records::{JobRecord, JobStatus};
use impetus_sdk::ClientError;

use super::util::{bytes_for_humans, human_time, json_bytes, parse_duration, parse_job_id, snippet, Table};
use super::{connect, exit, print_json, with_stream_hint, Global};

#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// List jobs, ordered by id.
    List {
        /// Only jobs of this stream.
        #[arg(long, short = 's', value_name = "S")]
        stream: Option<StreamName>,
        /// Only jobs with this status.
        #[arg(long, value_enum)]
        status: Option<JobStatus>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=impetus_proto::limits::MAX_BATCH as i64))]
        limit: u32,
        /// Only jobs after this id (to page: the last id of the previous page).
        #[arg(long, value_name = "ID", value_parser = parse_job_id)]
        after: Option<JobId>,
    },
    /// Show everything about a job: status, attempts, times, input, result, error record.
    Show {
        #[arg(value_parser = parse_job_id, value_name = "ID")]
        id: JobId,
    },
    /// Cancel a job that has not finished.
    Cancel {
        #[arg(value_parser = parse_job_id, value_name = "ID")]
        id: JobId,
    },
    /// Requeue a Dead or Cancelled job, with its attempts reset.
    Retry {
        #[arg(value_parser = parse_job_id, value_name = "ID")]
        id: JobId,
    },
    /// Forget a stream's finished jobs (succeeded, dead, cancelled) and their results, to reclaim memory; live jobs stay.
    #[command(after_help = "Examples:
  impetus jobs purge --stream s1                     every finished job of s1
  impetus jobs purge --stream s1 --older-than 24h    those finished a day ago or more

A purged job is gone: its result can no longer be read, a dead one can no
longer be retried, and its idempotency key may be used again. A stream also
forgets its finished jobs by itself once its retention has passed
(`impetus stream update S --retain D`, a day by default).")]
    Purge {
        #[arg(long, short = 's', value_name = "S")]
        stream: StreamName,
        /// Only jobs whose last change is at least this old (500ms, 2s, 1m, 1h).
        #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
        older_than: std::time::Duration,
    },
}

fn job_error(e: ClientError) -> anyhow::Error {
    with_stream_hint(e)
}

pub async fn run(g: &Global, cmd: JobsCommand) -> anyhow::Result<u8> {
    let client = connect(g).await?;
    match cmd {
        JobsCommand::List { stream, status, limit, after } => {
            if let Some(s) = &stream {
                client.stream(s).await.map_err(with_stream_hint)?;
            }
            let jobs = client.jobs(stream.as_ref(), status, after, limit).await.context("listing jobs")?;
            if g.json {
                let v: Vec<_> = jobs.iter().map(job_json).collect();
                print_json(&v)?;
            } else if jobs.is_empty() {
                println!("no jobs");
            } else {
                print!("{}", list_table(&jobs));
            }
        }
        JobsCommand::Show { id } => {
            let job = client.job(id).await.map_err(job_error)?;
            if g.json {
                print_json(&job_json(&job))?;
            } else {
                print!("{}", show(&job));
            }
        }
        JobsCommand::Cancel { id } => {
            client.cancel(id).await.map_err(job_error).with_context(|| format!("cancelling {id}"))?;
            if g.json {
                print_json(&serde_json::json!({"id": id.0, "result": "cancelled"}))?;
            } else {
                println!("{id} cancelled");
            }
        }
        JobsCommand::Purge { stream, older_than } => {
            let purged = client.purge(&stream, older_than).await.map_err(with_stream_hint).with_context(|| {
                format!("purging {stream} (jobs purged before the error stay purged; run it again to go on)")
            })?;
            if g.json {
                print_json(&serde_json::json!({"stream": stream.to_string(), "purged": purged}))?;
            } else {
                println!("{purged} finished jobs of {stream} purged");
            }
        }
        JobsCommand::Retry { id } => {
            client.retry(id).await.map_err(job_error).with_context(|| format!("retrying {id}"))?;
            if g.json {
                print_json(&serde_json::json!({"id": id.0, "result": "requeued"}))?;
            } else {
                println!("{id} requeued");
            }
        }
    }
    Ok(exit::OK)
}

pub fn list_table(jobs: &[JobRecord]) -> String {
    let mut t = Table::new(&["ID", "STREAM", "STATUS", "ATTEMPTS", "PEER", "PRIORITY", "UPDATED", "RESULT/ERROR"]);
    for j in jobs {
        let outcome = match (&j.result, &j.error) {
            (Some(r), _) => snippet(r, 40),
            (None, Some(e)) => snippet(e.error.as_bytes(), 40),
            _ => String::new(),
        };
        t.row(vec![
            j.id.to_string(),
            j.stream.to_string(),
            j.status.to_string(),
            j.attempts.to_string(),
            j.peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            j.priority.to_string(),
            human_time(j.updated_at),
            outcome,
        ]);
    }
    t.render()
}

/// Everything about a job, for humans.
pub fn show(j: &JobRecord) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("job", j.id.to_string()),
        ("stream", j.stream.to_string()),
        ("status", j.status.to_string()),
        ("attempts", j.attempts.to_string()),
        ("priority", j.priority.to_string()),
        ("module", j.module.to_string()),
        ("peer", j.peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into())),
        ("created", human_time(j.created_at)),
        ("updated", human_time(j.updated_at)),
        ("ready at", human_time(j.ready_at)),
    ];
    if let Some(l) = &j.lease {
        rows.push(("lease", format!("{} {} until {}", l.peer, l.token, human_time(l.expires_at))));
    }
    if let Some(k) = &j.key {
        rows.push(("key", k.as_str().to_owned()));
    }
    rows.push(("args", format!("{:?}", j.spec.args)));
    rows.push((
        "env",
        if j.spec.env.is_empty() {
            "-".into()
        } else {
            j.spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        },
    ));
    rows.push(("input", bytes_for_humans(&j.spec.input).trim_end().to_owned()));
    if let Some(r) = &j.result {
        rows.push(("result", bytes_for_humans(r).trim_end().to_owned()));
    }
    if let Some(e) = &j.error {
        rows.push(("error kind", format!("{:?}", e.kind)));
        rows.push(("error", e.error.clone()));
        if !e.name.is_empty() {
            rows.push(("error name", e.name.clone()));
        }
        if let Some(l) = e.line {
            rows.push(("error line", l.to_string()));
        }
        if let Some(s) = &e.statement {
            rows.push(("error statement", s.clone()));
        }
    }
    if !j.stdout_tail.is_empty() {
        rows.push(("stdout tail", bytes_for_humans(&j.stdout_tail).trim_end().to_owned()));
    }
    if !j.stderr_tail.is_empty() {
        rows.push(("stderr tail", bytes_for_humans(&j.stderr_tail).trim_end().to_owned()));
    }
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        // Multi-line values are indented under their label.
        let v = v.replace('\n', &format!("\n{:w$}  ", ""));
        out.push_str(&format!("{k:<w$}  {v}\n"));
    }
    out
}

/// A job as JSON: bytes as text (or `_b64`), the error record with the seeds' field names.
pub fn job_json(j: &JobRecord) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    o.insert("id".into(), j.id.0.into());
    o.insert("stream".into(), j.stream.as_str().into());
    o.insert("status".into(), j.status.to_string().into());
    o.insert("module".into(), j.module.to_string().into());
    o.insert("priority".into(), j.priority.into());
    o.insert("attempts".into(), j.attempts.into());
    o.insert("peer".into(), j.peer.map(|p| p.0).into());
    o.insert("created_at".into(), j.created_at.0.into());
    o.insert("updated_at".into(), j.updated_at.0.into());
    o.insert("ready_at".into(), j.ready_at.0.into());
    o.insert("key".into(), j.key.as_ref().map(|k| k.as_str().to_owned()).into());
    o.insert("args".into(), j.spec.args.clone().into());
    o.insert("env".into(), j.spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().into());
    json_bytes(&mut o, "input", &j.spec.input);
    if let Some(r) = &j.result {
        json_bytes(&mut o, "result", r);
    }
    if let Some(e) = &j.error {
        o.insert("error".into(), super::results::error_json(e));
    }
    if let Some(l) = &j.lease {
        o.insert(
            "lease".into(),
            serde_json::json!({"peer": l.peer.0, "token": l.token.0, "expires_at": l.expires_at.0}),
        );
    }
    json_bytes(&mut o, "stdout_tail", &j.stdout_tail);
    json_bytes(&mut o, "stderr_tail", &j.stderr_tail);
    serde_json::Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn jobs_list_parses() {
        let cli = Cli::try_parse_from([
            "impetus", "jobs", "list", "--stream", "s1", "--status", "dead", "--limit", "5", "--after", "job-9",
        ])
        .unwrap();
        let Command::Jobs(JobsCommand::List { stream, status, limit, after }) = cli.command else {
            panic!("not jobs list")
        };
        assert_eq!(stream.map(|s| s.to_string()), Some("s1".into()));
        assert_eq!(status, Some(JobStatus::Dead));
        assert_eq!(limit, 5);
        assert_eq!(after, Some(JobId(9)));
        assert!(Cli::try_parse_from(["impetus", "jobs", "list", "--status", "bogus"]).is_err());
        assert!(Cli::try_parse_from(["impetus", "jobs", "list", "--limit", "0"]).is_err());
        assert!(Cli::try_parse_from(["impetus", "jobs", "show", "x"]).is_err());
        let cli = Cli::try_parse_from(["impetus", "jobs", "retry", "17"]).unwrap();
        assert!(matches!(cli.command, Command::Jobs(JobsCommand::Retry { id: JobId(17) })));
    }

    #[test]
    fn show_prints_the_error_record() {
        let mut j = crate::cli::results::tests::record(3, JobStatus::Dead);
        j.stderr_tail = b"square: \"x\" is not an integer\n".to_vec();
        expect_test::expect![[r#"
            job          job-3
            stream       s1
            status       Dead
            attempts     3
            priority     0
            module       83d9dab06011479163c7c4d5fa735f911bac86729f56aaa115b7eed2eb66e022
            peer         peer-1
            created      1970-01-01 00:00:00.010Z
            updated      1970-01-01 00:00:00.020Z
            ready at     1970-01-01 00:00:00.010Z
            args         ["-v"]
            env          -
            input        x
            error kind   Exit(2)
            error        exit code 2
            error name   square.wasm
            stderr tail  square: "x" is not an integer
        "#]]
        .assert_eq(&show(&j));
        let v = job_json(&j);
        assert_eq!(v["error"]["linenumber"], serde_json::Value::Null);
        assert_eq!(v["input"], "x");
    }
}
