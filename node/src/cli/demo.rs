//! `impetus demo`: the helloworld of impetus v2 on a local peer. Starts a
//! peer as a child process, runs 100 jobs square(i), prints their total.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use impetus_proto::command::NewJob;
use impetus_proto::ids::StreamName;
use impetus_proto::records::{JobSpec, JobStatus, StreamProps};
use impetus_sdk::Client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::submit::{describe_failure, progress_bar, put_module};
use super::{exit, Global};

const DEFAULT_MODULE: &str = "examples/jobs/wasm/square.wasm";
const STREAM: &str = "helloworld";
const JOBS: u64 = 100;
/// How long the peer has to answer after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the 100 jobs may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Failed jobs whose error record is printed.
const SHOW_FAILURES: u64 = 3;
/// How long the peer has to drain and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Starts `impetus peer` on a free port of 127.0.0.1 with its data in a temporary directory, \
creates the stream helloworld, submits 100 jobs square(i) for i in 0..99 (the input is i), \
waits for them and prints `Total: 328350` and `Errors: 0`, then stops the peer. \
Exits 0 only when the total is right and no job failed.")]
pub struct DemoArgs {
    /// The square module [default: examples/jobs/wasm/square.wasm; build it with `just jobs`].
    #[arg(long, value_name = "PATH")]
    pub module: Option<PathBuf>,
    /// Keep the temporary directory (the peer's data and log).
    #[arg(long)]
    pub keep: bool,
}

/// The module to run: the flag, or the default relative to the current
/// directory, or to this source tree.
fn module_path(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    let candidates: Vec<PathBuf> = match flag {
        Some(p) => vec![p.to_path_buf()],
        None => {
            vec![PathBuf::from(DEFAULT_MODULE), Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(DEFAULT_MODULE)]
        }
    };
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    crate::bad_input!(
        "the demo module {} is missing: build the example jobs with `just jobs` (or `examples/jobs/build.sh`)",
        candidates[0].display()
    )
}

/// The peer child process; killed if dropped while still running.
#[derive(Debug)]
struct PeerChild {
    child: Child,
    log: PathBuf,
}

impl PeerChild {
    fn running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait().context("checking the peer process")? {
            bail!("the peer exited ({status}){}", log_tail(&self.log));
        }
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit (bounded).
    fn stop(mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let pid = Pid::from_raw(self.child.id() as i32);
        if self.child.try_wait().context("checking the peer process")?.is_none() {
            kill(pid, Signal::SIGTERM).context("sending SIGTERM to the peer")?;
        }
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the peer")? {
                if !status.success() {
                    bail!("the peer did not shut down cleanly ({status}){}", log_tail(&self.log));
                }
                return Ok(started.elapsed());
            }
            if started.elapsed() > STOP_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!(
                    "the peer did not exit within {}s of SIGTERM; killed it{}",
                    STOP_TIMEOUT.as_secs(),
                    log_tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PeerChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            format!("; the end of its log ({}):\n{tail}", path.display())
        }
        Err(_) => String::new(),
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr().context("finding a free port on 127.0.0.1")?.port())
}

fn start_peer(g: &Global, dir: &Path, listen: &str) -> anyhow::Result<PeerChild> {
    let exe = std::env::current_exe().context("finding the impetus executable")?;
    let log = dir.join("peer.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Process::new(&exe);
    cmd.arg("--log-format").arg(g.log_format.to_string());
    for _ in 0..g.verbose {
        cmd.arg("-v");
    }
    cmd.args(["peer", "--foreground", "--listen", listen])
        .arg("--data-dir")
        .arg(dir.join("peer"))
        .env_remove("IMPETUS_AUTHKEY")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    let child = cmd.spawn().with_context(|| format!("starting {} peer", exe.display()))?;
    tracing::info!(pid = child.id(), %listen, "demo peer started");
    Ok(PeerChild { child, log })
}

/// Connect and ask for the status until the peer answers (bounded).
async fn wait_ready(peer: &mut PeerChild, addr: &str) -> anyhow::Result<Client> {
    let started = Instant::now();
    let mut last_err = String::new();
    while started.elapsed() < START_TIMEOUT {
        peer.running()?;
        match Client::connect(addr, None).await {
            Ok(c) => match c.status().await {
                Ok(st) if st.leader.is_some() => return Ok(c),
                Ok(_) => last_err = "no leader yet".into(),
                Err(e) => last_err = e.to_string(),
            },
            Err(e) => last_err = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the peer did not answer within {}s (last: {last_err}){}", START_TIMEOUT.as_secs(), log_tail(&peer.log))
}

pub async fn run(g: &Global, args: DemoArgs) -> anyhow::Result<u8> {
    let module = module_path(args.module.as_deref())?;
    let bytes = std::fs::read(&module).with_context(|| format!("reading {}", module.display()))?;
    let tmp = tempfile::Builder::new().prefix("impetus-demo-").tempdir().context("creating a temporary directory")?;
    let addr = format!("127.0.0.1:{}", free_port()?);
    println!("starting a peer on {addr} (data in {})", tmp.path().display());
    let mut peer = start_peer(g, tmp.path(), &addr)?;

    let outcome = drive(&mut peer, &addr, &module, bytes).await;
    // Stop the peer whatever happened: SIGTERM, drain, clean exit.
    let stopped = tokio::task::block_in_place(|| peer.stop());
    let dir = args.keep.then(|| tmp.keep());
    let code = outcome?;
    let took = stopped?;
    println!("peer stopped cleanly in {:.1}s", took.as_secs_f64());
    if let Some(d) = dir {
        println!("kept {}", d.display());
    }
    Ok(code)
}

async fn drive(peer: &mut PeerChild, addr: &str, module: &Path, bytes: Vec<u8>) -> anyhow::Result<u8> {
    let client = wait_ready(peer, addr).await?;
    let stream = StreamName::new(STREAM).context("the demo stream name")?;
    client.create_stream(&stream, StreamProps::default()).await.context("creating the stream helloworld")?;
    let hash = put_module(&client, module, bytes).await?;
    let jobs: Vec<NewJob> = (0..JOBS)
        .map(|i| NewJob {
            module: hash,
            spec: JobSpec { input: i.to_string().into_bytes(), ..JobSpec::default() },
            priority: None,
            delay_ms: 0,
            key: None,
        })
        .collect();
    let started = Instant::now();
    let submitted = client.submit(&stream, jobs).await.context("submitting the demo jobs")?;
    println!("submitted {} jobs square(i) to stream {STREAM}", submitted.len());
    let ids: Vec<_> = submitted.iter().map(|s| s.job).collect();
    let bar = progress_bar(ids.len() as u64);
    let waited = client.wait(&ids, RUN_TIMEOUT, |done, _| bar.set_position(done as u64)).await;
    bar.finish_and_clear();
    let records = waited.context("waiting for the demo jobs")?;
    let elapsed = started.elapsed();

    let mut total: i128 = 0;
    let mut errors = 0u64;
    let mut bad_results = 0u64;
    let mut by_peer: BTreeMap<String, u64> = BTreeMap::new();
    for r in &records {
        match (&r.status, &r.result) {
            (JobStatus::Succeeded, Some(res)) => match String::from_utf8_lossy(res).trim().parse::<i128>() {
                Ok(n) => total += n,
                Err(_) => {
                    bad_results += 1;
                    eprintln!("{}: result {:?} is not a number", r.id, String::from_utf8_lossy(res));
                }
            },
            _ => {
                errors += 1;
                if errors <= SHOW_FAILURES {
                    eprintln!("{}", describe_failure(r));
                }
            }
        }
        *by_peer.entry(r.peer.map(|p| p.to_string()).unwrap_or_else(|| "no peer".into())).or_default() += 1;
    }
    if errors > SHOW_FAILURES {
        eprintln!("... and {} more failed jobs", errors - SHOW_FAILURES);
    }
    let expected: i128 = (0..JOBS as i128).map(|i| i * i).sum();
    println!("Total: {total}");
    println!("Errors: {errors}");
    for (p, n) in &by_peer {
        println!("  {p} ran {n} jobs");
    }
    println!("{} jobs in {:.2}s", records.len(), elapsed.as_secs_f64());
    if errors > 0 || bad_results > 0 || total != expected {
        eprintln!("demo FAILED: expected Total: {expected} and Errors: 0");
        return Ok(exit::FAILED);
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_module_says_how_to_build_it() {
        let err = module_path(Some(Path::new("/nonexistent/square.wasm"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the demo module /nonexistent/square.wasm is missing: build the example jobs with `just jobs` (or `examples/jobs/build.sh`)"
        );
        assert_eq!(crate::cli::exit_code_of(&err), exit::USAGE);
    }

    #[test]
    fn the_expected_total_is_the_seeds_one() {
        assert_eq!((0..JOBS as i128).map(|i| i * i).sum::<i128>(), 328_350);
    }

    #[test]
    fn free_ports_are_found() {
        assert!(free_port().unwrap() > 0);
    }
}
