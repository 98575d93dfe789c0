//! `impetus submit`: one job, or a batch (one per line, one per file).

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use impetus_proto::command::{NewJob, Submitted};
use impetus_proto::ids::{IdempotencyKey, StreamName};
use impetus_proto::records::{JobRecord, JobSpec, JobStatus};
use impetus_sdk::{Client, ClientError, ServiceError};

use super::util::{json_bytes, parse_duration, parse_env};
use super::{connect, exit, with_stream_hint, Global};
use crate::bad_input;

/// How long `--wait` waits when no `--timeout` is given.
const DEFAULT_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, clap::Args)]
#[command(after_help = "\
The module must be a WASI preview-1 command (wasm32-wasip1). Its stdin is the job's input, \
its stdout the result; exit code 0 is success.

Examples:
  impetus submit square.wasm --stream s1 --input 7 --wait       prints 49
  impetus submit square.wasm --stream s1 --inputs numbers.txt   one job per line
  impetus submit job.wasm --stream s1 --input-dir data/ --wait  one job per file
  impetus submit job.wasm --stream s1 --env MODE=fast -- --verbose file.txt")]
#[command(group(clap::ArgGroup::new("source").args(["input", "input_file", "inputs", "input_dir"])))]
pub struct SubmitArgs {
    /// The wasm module (a WASI command).
    #[arg(value_name = "JOB.wasm")]
    pub module: PathBuf,
    /// The stream to submit to (it must exist: `impetus stream create S`).
    #[arg(long, short = 's', value_name = "S")]
    pub stream: StreamName,
    /// The job's input (stdin), as text.
    #[arg(long, value_name = "TEXT")]
    pub input: Option<String>,
    /// The job's input (stdin) from a file; `-` reads stdin.
    #[arg(long, value_name = "FILE|-")]
    pub input_file: Option<PathBuf>,
    /// Batch: one job per non-empty line of FILE (`-` = stdin); the line is its input.
    #[arg(long, value_name = "FILE")]
    pub inputs: Option<PathBuf>,
    /// Batch: one job per file of DIR, in name order; the file is its input.
    #[arg(long, value_name = "DIR")]
    pub input_dir: Option<PathBuf>,
    /// An environment variable of the job (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Priority (higher runs first) [default: the stream's].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Not ready before this long from now (500ms, 2s, 1m; a plain number is ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub delay: Option<Duration>,
    /// Idempotency key: resubmitting with the same key returns the same job (while the job
    /// is kept: its stream's retention). In a batch, job i gets the key K-i.
    #[arg(long, value_name = "K")]
    pub key: Option<String>,
    /// Wait for the jobs to finish and print their results.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (exit 1).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "wait")]
    pub timeout: Option<Duration>,
    /// Arguments of the job (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

/// Read a file, naming it in the error; a missing file is bad input.
pub fn read_input_file(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).context("reading stdin")?;
        return Ok(buf);
    }
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bad_input!("reading {what} {}: no such file", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("reading {what} {}", path.display())),
    }
}

/// The inputs of the jobs to submit, one per job.
fn inputs(args: &SubmitArgs) -> anyhow::Result<Vec<Vec<u8>>> {
    if let Some(text) = &args.input {
        return Ok(vec![text.as_bytes().to_vec()]);
    }
    if let Some(f) = &args.input_file {
        return Ok(vec![read_input_file(f, "the input file")?]);
    }
    if let Some(f) = &args.inputs {
        let bytes = read_input_file(f, "the inputs file")?;
        let jobs = split_lines(&bytes);
        if jobs.is_empty() {
            bad_input!("the inputs file {} has no non-empty line: nothing to submit", f.display());
        }
        return Ok(jobs);
    }
    if let Some(dir) = &args.input_dir {
        let mut files = Vec::new();
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bad_input!("reading the input directory {}: no such directory", dir.display())
            }
            Err(e) => return Err(e).with_context(|| format!("reading the input directory {}", dir.display())),
        };
        for entry in rd {
            let entry = entry.with_context(|| format!("reading the input directory {}", dir.display()))?;
            let path = entry.path();
            if path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        if files.is_empty() {
            bad_input!("the input directory {} holds no file: nothing to submit", dir.display());
        }
        return files.iter().map(|f| read_input_file(f, "the input file")).collect();
    }
    Ok(vec![Vec::new()])
}

/// The non-empty lines of a batch file (without their line ending).
pub fn split_lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .map(<[u8]>::to_vec)
        .collect()
}

/// Build the jobs: the same module, args, env, priority, delay; one input each.
fn build_jobs(
    args: &SubmitArgs,
    module: impetus_proto::ids::ModuleHash,
    inputs: Vec<Vec<u8>>,
) -> anyhow::Result<Vec<NewJob>> {
    let batch = inputs.len() > 1;
    let delay_ms = args.delay.map(|d| d.as_millis() as u64).unwrap_or(0);
    inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| {
            let key = match &args.key {
                None => None,
                Some(k) => {
                    let k = if batch { format!("{k}-{i}") } else { k.clone() };
                    match IdempotencyKey::new(k) {
                        Ok(k) => Some(k),
                        Err(e) => bad_input!("{e}"),
                    }
                }
            };
            let spec = JobSpec { args: args.args.clone(), env: args.env.clone(), input };
            if let Err(e) = spec.validate() {
                bad_input!("job {i}: {e}");
            }
            Ok(NewJob { module, spec, priority: args.priority, delay_ms, key })
        })
        .collect()
}

/// Store the module; a refusal (not wasm, not a command) is shown as the peer's message.
pub async fn put_module(
    client: &Client,
    path: &Path,
    bytes: Vec<u8>,
) -> anyhow::Result<impetus_proto::ids::ModuleHash> {
    match client.put_module(bytes).await {
        Ok(h) => Ok(h),
        Err(ClientError::Service(ServiceError::ModuleRejected(msg))) => {
            anyhow::bail!("the peer refused the module {}: {msg}", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("storing the module {}", path.display())),
    }
}

pub async fn run(g: &Global, args: SubmitArgs) -> anyhow::Result<u8> {
    let module_bytes = read_input_file(&args.module, "the module")?;
    let inputs = inputs(&args)?;
    let client = connect(g).await?;
    client.stream(&args.stream).await.map_err(with_stream_hint)?;
    let module = put_module(&client, &args.module, module_bytes).await?;
    let jobs = build_jobs(&args, module, inputs)?;
    let submitted = match client.submit(&args.stream, jobs).await {
        Ok(submitted) => submitted,
        // Those jobs stay submitted: say which, then fail.
        Err(ClientError::PartlySubmitted { submitted, total, error }) => {
            print_submitted(g, &submitted)?;
            let e = ClientError::PartlySubmitted { submitted, total, error };
            return Err(anyhow::Error::new(e).context("the submit stopped part way (the ids above are submitted)"));
        }
        Err(e) => return Err(with_stream_hint(e)),
    };
    tracing::debug!(stream = %args.stream, jobs = submitted.len(), %module, "submitted");

    if !args.wait {
        print_submitted(g, &submitted)?;
        return Ok(exit::OK);
    }

    let records = wait_for(&client, &submitted, args.timeout.unwrap_or(DEFAULT_WAIT)).await?;
    print_results(g, &submitted, &records)
}

/// The ids of submitted jobs, one per line (or a JSON array).
fn print_submitted(g: &Global, submitted: &[Submitted]) -> anyhow::Result<()> {
    if g.json {
        let v: Vec<_> = submitted
            .iter()
            .map(|s| serde_json::json!({"id": s.job.0, "existing": s.existing, "status": s.status.to_string()}))
            .collect();
        return super::print_json(&v);
    }
    for s in submitted {
        // A short job may already be done: its submit's entry held its result.
        let done = if s.status == JobStatus::Succeeded { " (done)" } else { "" };
        if s.existing {
            println!("{} (existing){done}", s.job);
        } else {
            println!("{}{done}", s.job);
        }
    }
    Ok(())
}

/// Wait for jobs, with a progress bar when there is more than one.
pub async fn wait_for(client: &Client, submitted: &[Submitted], timeout: Duration) -> anyhow::Result<Vec<JobRecord>> {
    let ids: Vec<_> = submitted.iter().map(|s| s.job).collect();
    let bar = if ids.len() > 1 { progress_bar(ids.len() as u64) } else { indicatif::ProgressBar::hidden() };
    let records = client
        .wait(&ids, timeout, |done, _| bar.set_position(done as u64))
        .await
        .with_context(|| format!("waiting for {} job(s)", ids.len()));
    bar.finish_and_clear();
    records
}

pub fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} jobs ({per_sec})")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// The error record of a Dead job, for stderr.
pub fn describe_failure(rec: &JobRecord) -> String {
    let mut s = format!("{} is {} after {} attempt(s)", rec.id, rec.status, rec.attempts);
    if let Some(e) = &rec.error {
        s.push_str(&format!("\n  kind: {:?}\n  error: {}", e.kind, e.error));
        if !e.name.is_empty() {
            s.push_str(&format!("\n  name: {}", e.name));
        }
        if let Some(l) = e.line {
            s.push_str(&format!("\n  line: {l}"));
        }
        if let Some(st) = &e.statement {
            s.push_str(&format!("\n  statement: {st}"));
        }
    }
    let stderr = String::from_utf8_lossy(&rec.stderr_tail);
    if !stderr.trim().is_empty() && rec.error.as_ref().is_none_or(|e| e.error.trim() != stderr.trim()) {
        s.push_str(&format!("\n  stderr: {}", String::from_utf8_lossy(&rec.stderr_tail).trim_end()));
    }
    s
}

fn print_results(g: &Global, submitted: &[Submitted], records: &[JobRecord]) -> anyhow::Result<u8> {
    let failed = records.iter().filter(|r| r.status != JobStatus::Succeeded).count();
    if g.json {
        let v: Vec<_> = submitted
            .iter()
            .zip(records)
            .map(|(s, r)| {
                let mut o = serde_json::Map::new();
                o.insert("id".into(), r.id.0.into());
                o.insert("existing".into(), s.existing.into());
                o.insert("status".into(), r.status.to_string().into());
                if let Some(res) = &r.result {
                    json_bytes(&mut o, "result", res);
                }
                if let Some(e) = &r.error {
                    o.insert("error".into(), super::results::error_json(e));
                }
                serde_json::Value::Object(o)
            })
            .collect();
        super::print_json(&v)?;
    } else {
        let mut out = std::io::stdout().lock();
        let single = records.len() == 1;
        for r in records {
            match (&r.status, &r.result) {
                (JobStatus::Succeeded, Some(res)) if single => out.write_all(res).context("writing to stdout")?,
                (JobStatus::Succeeded, res) => {
                    let text = String::from_utf8_lossy(res.as_deref().unwrap_or_default()).into_owned();
                    writeln!(out, "{}\t{}", r.id, text.trim_end()).context("writing to stdout")?;
                }
                _ => {}
            }
        }
        out.flush().context("writing to stdout")?;
    }
    for r in records.iter().filter(|r| r.status != JobStatus::Succeeded) {
        eprintln!("{}", describe_failure(r));
    }
    if failed > 0 {
        if records.len() > 1 {
            eprintln!("{failed} of {} jobs did not succeed", records.len());
        }
        return Ok(exit::FAILED);
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn submit(args: &[&str]) -> Result<SubmitArgs, clap::Error> {
        let mut v = vec!["impetus", "submit"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v)?.command {
            Command::Submit(s) => Ok(s),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn submit_parses_everything() {
        let s = submit(&[
            "sq.wasm",
            "--stream",
            "s1",
            "--input",
            "7",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--priority",
            "-3",
            "--delay",
            "2s",
            "--key",
            "k1",
            "--wait",
            "--timeout",
            "1m",
            "--",
            "--flag",
            "arg",
        ])
        .unwrap();
        assert_eq!(s.module, PathBuf::from("sq.wasm"));
        assert_eq!(s.stream.as_str(), "s1");
        assert_eq!(s.input.as_deref(), Some("7"));
        assert_eq!(s.env, vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]);
        assert_eq!(s.priority, Some(-3));
        assert_eq!(s.delay, Some(Duration::from_secs(2)));
        assert_eq!(s.timeout, Some(Duration::from_secs(60)));
        assert_eq!(s.args, vec!["--flag", "arg"]);
        assert!(s.wait);
    }

    #[test]
    fn submit_refuses_bad_usage() {
        // Two input sources.
        assert!(submit(&["m.wasm", "--stream", "s1", "--input", "1", "--inputs", "f"]).is_err());
        // A bad stream name, env, delay; --timeout without --wait.
        assert!(submit(&["m.wasm", "--stream", "bad name"]).is_err());
        assert!(submit(&["m.wasm", "--stream", "s1", "--env", "NOEQUALS"]).is_err());
        assert!(submit(&["m.wasm", "--stream", "s1", "--delay", "5 parsecs"]).is_err());
        assert!(submit(&["m.wasm", "--stream", "s1", "--timeout", "1s"]).is_err());
        assert!(submit(&["m.wasm"]).is_err());
    }

    #[test]
    fn batch_lines_skip_blank_ones() {
        assert_eq!(split_lines(b"1\n\n2\r\n  \n3"), vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
        assert!(split_lines(b"\n\n").is_empty());
    }

    #[test]
    fn batch_keys_are_numbered() {
        let s = submit(&["m.wasm", "--stream", "s1", "--key", "run7", "--delay", "500ms"]).unwrap();
        let m = impetus_proto::ids::ModuleHash::of(b"m");
        let jobs = build_jobs(&s, m, vec![b"a".to_vec(), b"b".to_vec()]).unwrap();
        let keys: Vec<_> = jobs.iter().map(|j| j.key.as_ref().map(|k| k.as_str().to_owned())).collect();
        assert_eq!(keys, vec![Some("run7-0".to_owned()), Some("run7-1".to_owned())]);
        assert_eq!(jobs[0].delay_ms, 500);
        let one = build_jobs(&s, m, vec![b"a".to_vec()]).unwrap();
        assert_eq!(one[0].key.as_ref().map(|k| k.as_str()), Some("run7"));
        let bad = submit(&["m.wasm", "--stream", "s1", "--key", "has space"]).unwrap();
        let err = build_jobs(&bad, m, vec![vec![]]).unwrap_err();
        assert_eq!(crate::cli::exit_code_of(&err), exit::USAGE);
    }

    #[test]
    fn a_missing_module_is_bad_input() {
        let err = read_input_file(Path::new("/nonexistent/job.wasm"), "the module").unwrap_err();
        assert_eq!(err.to_string(), "reading the module /nonexistent/job.wasm: no such file");
        assert_eq!(crate::cli::exit_code_of(&err), exit::USAGE);
    }
}
