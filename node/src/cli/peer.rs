//! `impetus peer` (foreground or daemon) and `impetus stop`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use impetus_node::serve::{self, PeerOptions};
use impetus_proto::Seat;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{exit, Global};

/// Most jobs one peer runs at once: its renewals and hand-backs are lists
/// that a command bounds.
const MAX_CAPACITY: i64 = impetus_proto::limits::MAX_BATCH as i64;
/// The peer runtime's threads by default (`--threads`). One: a paced
/// submit's many hand-offs (request → run → Raft → network → answer) then
/// wake no other thread. Measured with 3 peers on 2 cores: p50 submit→done
/// 2.3 → 1.7 ms, throughput unchanged (38k → 41k jobs/s, within noise).
const DEFAULT_THREADS: u16 = 1;

/// The pid file of a daemon peer, inside `--pid-dir`.
pub const PID_FILE: &str = "impetus-peer.pid";
/// The log file of a daemon peer, inside `--log-dir`.
pub const LOG_FILE: &str = "impetus-peer.log";
/// How long `impetus stop` waits for the peer to drain and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
#[command(after_help = "\
The peer runs until SIGINT (Ctrl-C) or SIGTERM, then drains: no new leases, running jobs \
finish (bounded), their results are committed, then it exits. A second signal exits at once.

The first peer started without --join founds a cluster. Peers started with --join (any \
member's address) join it as workers: they run jobs and hold no Raft state. While there are \
fewer voters than --voters (3), the leader makes workers learners, then voters: those started \
with --voter first, never those started with --worker (a peer already a member stays one: \
`impetus peer leave` it first). On a LAN, peers listening on a non-loopback address find each other by mDNS \
with no --join. On SIGTERM a member of a larger cluster also leaves its membership (and \
forgets its Raft state, so a later start joins afresh, through the members it knew: \
DATA_DIR/contacts); a single-peer cluster keeps its data. A peer the cluster took out while \
it was away (`impetus peer leave` asked for it, or it was silent past --forget-after) sets its Raft \
state aside in DATA_DIR/removed-ID and joins again as a new peer. A peer that was in a cluster never founds a new one: remove \
DATA_DIR/contacts for that.

Examples:
  impetus peer                                          127.0.0.1:7420, data in .impetus/peer
  impetus peer --listen 127.0.0.1:7421 --data-dir .impetus/p2 --join 127.0.0.1:7420
  impetus peer --listen 127.0.0.1:7422 --data-dir .impetus/p3 --join 127.0.0.1:7420 --worker
  impetus peer --listen 0.0.0.0:7420 --data-dir /var/lib/impetus --metrics 0.0.0.0:9420
  impetus peer leave --peer 127.0.0.1:7421               drain that peer and take it out
  impetus peer --daemon --pid-dir /run/impetus --log-dir /var/log/impetus
  impetus stop --pid-dir /run/impetus")]
#[command(args_conflicts_with_subcommands = true)]
pub struct PeerArgs {
    #[command(subcommand)]
    pub action: Option<PeerAction>,
    /// Address to listen on: host:port or a multiaddr.
    #[arg(long, default_value = serve::DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: String,
    /// A member of the cluster to join (repeatable; any one that answers will do).
    #[arg(long, value_name = "ADDR")]
    pub join: Vec<String>,
    /// Voters the cluster grows to (odd: 3 survives one failure, 5 two).
    #[arg(long, default_value_t = serve::DEFAULT_VOTERS, value_name = "N", value_parser = parse_voters)]
    pub voters: usize,
    /// Replace a voter that has not answered the leader for this many seconds.
    #[arg(long, default_value_t = serve::DEFAULT_VOTER_TIMEOUT.as_secs(), value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub voter_timeout: u64,
    /// Take a learner or worker that has not answered for this many seconds out of the cluster (0: never); if it comes back, it joins again as a new peer.
    #[arg(long, default_value_t = serve::DEFAULT_FORGET_AFTER.as_secs(), value_name = "SECS")]
    pub forget_after: u64,
    /// mDNS discovery: on by default unless listening on loopback (where libp2p's mDNS cannot run).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub mdns: Option<bool>,
    /// Serve Prometheus metrics at http://ADDR/metrics (host:port).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Where the peer keeps its Raft log, snapshots and identity.
    #[arg(long, default_value = ".impetus/peer", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Jobs run at once on this peer [default: 2 × available cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_CAPACITY))]
    pub capacity: Option<u32>,
    /// Threads for the peer's own work: Raft, the network, client and worker requests (jobs run on threads of their own, one per core). One keeps a request's hand-offs from task to task on one thread; raise it for a peer that serves many clients on many cores.
    #[arg(long, default_value_t = DEFAULT_THREADS, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
    /// Take a voter seat before other workers when one is open.
    #[arg(long, conflicts_with = "worker")]
    pub voter: bool,
    /// Never take a voter seat: only run jobs, hold no Raft state (needs --join or mDNS: it cannot found a cluster).
    #[arg(long)]
    pub worker: bool,
    /// Run in the foreground (the default).
    #[arg(long, conflicts_with = "daemon")]
    pub foreground: bool,
    /// Run in the background: detach, log to <LOG_DIR>/impetus-peer.log, write <PID_DIR>/impetus-peer.pid.
    #[arg(long)]
    pub daemon: bool,
    /// Where --daemon writes its pid file.
    #[arg(long, default_value = ".impetus", value_name = "DIR")]
    pub pid_dir: PathBuf,
    /// Where --daemon writes its log.
    #[arg(long, default_value = ".impetus/log", value_name = "DIR")]
    pub log_dir: PathBuf,
    /// Set by --daemon on the process it starts: start a new session (setsid), ignore SIGHUP.
    #[arg(long, hide = true)]
    pub detached: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum PeerAction {
    /// Ask the peer at --peer to drain (finish or hand back its jobs) and leave the cluster, then exit.
    Leave,
}

fn parse_voters(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ (1 | 3 | 5 | 7)) => Ok(n),
        Ok(n) => Err(format!("{n} voters: use 1, 3, 5 or 7 (an odd number: an even one tolerates no more failures)")),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// The --pid-dir the peer was started with.
    #[arg(long, default_value = ".impetus", value_name = "DIR")]
    pub pid_dir: PathBuf,
}

pub fn run(g: &Global, args: PeerArgs) -> anyhow::Result<u8> {
    if args.forget_after != 0 && args.forget_after < args.voter_timeout {
        // A peer forgotten before a voter would be replaced: a pause (a
        // restart, a slow disk) would cost every peer its id.
        crate::bad_input!(
            "--forget-after {} is shorter than --voter-timeout {}: use 0 (never) or at least the voter timeout",
            args.forget_after,
            args.voter_timeout
        );
    }
    if let Some(PeerAction::Leave) = args.action {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
        return rt.block_on(leave(g));
    }
    if args.daemon {
        return daemonize(g, &args);
    }
    if args.detached {
        // Started by --daemon: leave the caller's session and terminal.
        if let Err(e) = nix::unistd::setsid() {
            tracing::warn!(error = %e, "setsid failed; staying in the caller's session");
        }
    }
    let opts = PeerOptions {
        authkey: g.authkey.clone(),
        capacity: args.capacity.unwrap_or_else(PeerOptions::default_capacity),
        join: args.join,
        voters: args.voters,
        voter_timeout: Duration::from_secs(args.voter_timeout),
        forget_after: Duration::from_secs(args.forget_after),
        mdns: args.mdns,
        metrics: args.metrics,
        seat: match (args.voter, args.worker) {
            (true, _) => Seat::Preferred,
            (_, true) => Seat::Never,
            _ => Seat::Any,
        },
        ..PeerOptions::new(args.listen, args.data_dir)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.threads))
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let shutdown = shutdown_signal(args.detached).context("installing signal handlers")?;
        serve::run_peer(opts, shutdown).await.context("the peer stopped with an error")
    })?;
    Ok(exit::OK)
}

/// `impetus peer leave`: the peer drains, leaves membership and exits.
async fn leave(g: &Global) -> anyhow::Result<u8> {
    use impetus_proto::api::{ClientRequest, ClientResponse};
    let client = super::connect(g).await?;
    let me = client.status().await.context("asking the peer who it is")?.peer;
    match client.request(ClientRequest::Leave { peer: me }).await? {
        ClientResponse::Left => {
            if g.json {
                super::print_json(&serde_json::json!({ "peer": me.0, "leaving": true }))?;
            } else {
                println!("{me} is draining and leaving the cluster; it exits when done");
            }
            Ok(exit::OK)
        }
        ClientResponse::Error(e) => bail!("{me} refused to leave: {e}"),
        other => bail!("{me} answered the leave request with {} (a peer of another version?)", other.kind()),
    }
}

/// A future that resolves on the first SIGINT or SIGTERM. A second one
/// exits the process at once (exit code 130). With `detached`, SIGHUP is
/// ignored (logged).
fn shutdown_signal(detached: bool) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = if detached { Some(signal(SignalKind::hangup())?) } else { None };
    Ok(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!(signal = "SIGTERM", "stopping"); break; }
                _ = int.recv() => { tracing::info!(signal = "SIGINT", "stopping"); break; }
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!(signal = "SIGHUP", "ignored (running as a daemon)");
                }
            }
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal while draining: exiting now");
            std::process::exit(130);
        });
    })
}

/// Start `impetus peer ... --foreground --detached` (which calls `setsid`
/// first: a new session, no terminal) with its output in the log file;
/// write the pid file.
/// The command line `--daemon` starts the peer with: every option of this
/// one (the data directory made absolute), in the foreground, detached. The
/// authkey is not among them: it goes through the environment (`ps` shows
/// a command line). A new `impetus peer` option must be added here; the test
/// `the_daemon_is_started_with_every_option` fails until it is.
fn foreground_args(g: &Global, args: &PeerArgs, data_dir: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = vec!["--log-format".into(), g.log_format.to_string().into()];
    v.extend((0..g.verbose).map(|_| "-v".into()));
    v.extend(["peer", "--foreground", "--detached", "--listen", &args.listen].map(Into::into));
    v.extend(["--data-dir".into(), data_dir.as_os_str().to_owned()]);
    if let Some(c) = args.capacity {
        v.extend(["--capacity".into(), c.to_string().into()]);
    }
    v.extend(["--threads".into(), args.threads.to_string().into()]);
    for j in &args.join {
        v.extend(["--join".into(), j.into()]);
    }
    v.extend(["--voters".into(), args.voters.to_string().into()]);
    v.extend(["--voter-timeout".into(), args.voter_timeout.to_string().into()]);
    v.extend(["--forget-after".into(), args.forget_after.to_string().into()]);
    if let Some(m) = args.mdns {
        v.extend(["--mdns", if m { "on" } else { "off" }].map(Into::into));
    }
    if let Some(m) = &args.metrics {
        v.extend(["--metrics".into(), m.into()]);
    }
    if args.voter {
        v.push("--voter".into());
    }
    if args.worker {
        v.push("--worker".into());
    }
    v
}

fn daemonize(g: &Global, args: &PeerArgs) -> anyhow::Result<u8> {
    let pid_file = args.pid_dir.join(PID_FILE);
    if let Some(pid) = read_pid(&pid_file)? {
        if alive(pid) {
            bail!(
                "a peer is already running with pid {pid} (pid file {}); stop it with `impetus stop`",
                pid_file.display()
            );
        }
    }
    fs::create_dir_all(&args.pid_dir)
        .with_context(|| format!("creating the pid directory {}", args.pid_dir.display()))?;
    fs::create_dir_all(&args.log_dir)
        .with_context(|| format!("creating the log directory {}", args.log_dir.display()))?;
    let log_path = args.log_dir.join(LOG_FILE);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening the log file {}", log_path.display()))?;
    let log_err = log.try_clone().with_context(|| format!("opening the log file {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the impetus executable")?;
    let data_dir = absolute(&args.data_dir)?;

    let mut cmd = Process::new(&exe);
    cmd.args(foreground_args(g, args, &data_dir));
    // The key goes through the environment, not the command line (ps shows that).
    match &g.authkey {
        Some(k) => cmd.env("IMPETUS_AUTHKEY", k),
        None => cmd.env_remove("IMPETUS_AUTHKEY"),
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let pid = child.id();
    // A peer that cannot start (port in use, bad data dir) exits at once: say so.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(500) {
        if let Some(status) = child.try_wait().context("checking the peer process")? {
            bail!("the peer exited at once ({status}); see its log {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fs::write(&pid_file, format!("{pid}\n")).with_context(|| format!("writing the pid file {}", pid_file.display()))?;
    tracing::debug!(pid, log = %log_path.display(), pid_file = %pid_file.display(), "peer started as a daemon");
    if g.json {
        super::print_json(&serde_json::json!({
            "pid": pid,
            "pid_file": pid_file.display().to_string(),
            "log_file": log_path.display().to_string(),
            "listen": args.listen,
        }))?;
    } else {
        println!("{pid}");
        eprintln!("peer started (pid {pid}), listening on {}; log: {}", args.listen, log_path.display());
    }
    Ok(exit::OK)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir().context("reading the current directory")?.join(p))
}

/// The pid in a pid file; `None` if there is no file.
fn read_pid(path: &Path) -> anyhow::Result<Option<i32>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading the pid file {}", path.display())),
    };
    match text.trim().parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(Some(pid)),
        _ => bail!("the pid file {} does not hold a pid: {:?}", path.display(), text.trim()),
    }
}

/// Whether a process exists (signal 0).
fn alive(pid: i32) -> bool {
    // EPERM: it exists but belongs to someone else.
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

pub fn stop(g: &Global, args: StopArgs) -> anyhow::Result<u8> {
    let pid_file = args.pid_dir.join(PID_FILE);
    let Some(pid) = read_pid(&pid_file)? else {
        bail!(
            "no pid file at {}: is a peer running as a daemon with --pid-dir {}?",
            pid_file.display(),
            args.pid_dir.display()
        );
    };
    if !alive(pid) {
        fs::remove_file(&pid_file).with_context(|| format!("removing the stale pid file {}", pid_file.display()))?;
        bail!("stale pid file {}: process {pid} is not running (the pid file was removed)", pid_file.display());
    }
    kill(Pid::from_raw(pid), Signal::SIGTERM).with_context(|| format!("sending SIGTERM to process {pid}"))?;
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("waiting for peer (pid {pid}) to drain and exit"));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    while alive(pid) {
        if started.elapsed() > STOP_TIMEOUT {
            spinner.finish_and_clear();
            bail!(
                "process {pid} did not exit within {}s after SIGTERM; it may still be draining jobs (`kill -9 {pid}` forces it)",
                STOP_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    spinner.finish_and_clear();
    fs::remove_file(&pid_file).with_context(|| format!("removing the pid file {}", pid_file.display()))?;
    if g.json {
        super::print_json(&serde_json::json!({ "stopped": pid }))?;
    } else {
        println!("stopped peer (pid {pid}) in {:.1}s", started.elapsed().as_secs_f64());
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn peer(args: &[&str]) -> PeerArgs {
        let mut v = vec!["impetus", "peer"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Peer(p) => p,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn forgetting_peers_sooner_than_replacing_voters_is_refused_as_bad_usage() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(["impetus", "peer"].iter().chain(args)).unwrap();
            let Command::Peer(a) = cli.command else { panic!("not a peer command") };
            (cli.global, a)
        };
        let (g, a) = parse(&["--voter-timeout", "10", "--forget-after", "3"]);
        let err = run(&g, a).unwrap_err();
        assert_eq!(crate::cli::exit_code_of(&err), 2, "{err:#}");
        assert!(err.to_string().contains("--forget-after 3 is shorter than --voter-timeout 10"), "{err:#}");
    }

    #[test]
    fn peer_defaults() {
        let p = peer(&[]);
        assert_eq!(p.listen, "127.0.0.1:7420");
        assert_eq!(p.data_dir, PathBuf::from(".impetus/peer"));
        assert!(!p.daemon && p.join.is_empty() && p.capacity.is_none());
        let p = peer(&["--daemon", "--pid-dir", "/tmp/p", "--log-dir", "/tmp/l", "--join", "a:1", "--join", "b:2"]);
        assert!(p.daemon);
        assert_eq!(p.join, vec!["a:1", "b:2"]);
        assert!(Cli::try_parse_from(["impetus", "peer", "--daemon", "--foreground"]).is_err());
        assert!(Cli::try_parse_from(["impetus", "peer", "--capacity", "0"]).is_err());
    }

    /// `--daemon` starts the peer with the same options: a flag left out
    /// here once made `--daemon --worker` peers take voter seats.
    #[test]
    fn the_daemon_is_started_with_every_option() {
        let given = [
            "-vv",
            "--log-format",
            "json",
            "peer",
            "--daemon",
            "--pid-dir",
            "/tmp/p",
            "--log-dir",
            "/tmp/l",
            "--listen",
            "127.0.0.1:7521",
            "--join",
            "a:1",
            "--join",
            "b:2",
            "--voters",
            "5",
            "--voter-timeout",
            "7",
            "--forget-after",
            "90",
            "--mdns",
            "off",
            "--metrics",
            "127.0.0.1:9000",
            "--data-dir",
            "/tmp/d",
            "--capacity",
            "3",
            "--threads",
            "2",
            "--worker",
        ];
        let cli = Cli::try_parse_from(std::iter::once("impetus").chain(given)).unwrap();
        let Command::Peer(args) = cli.command else { panic!("not a peer command") };
        let child = foreground_args(&cli.global, &args, Path::new("/tmp/d"));
        let again = Cli::try_parse_from(std::iter::once("impetus".into()).chain(child)).unwrap();
        assert_eq!((again.global.verbose, again.global.log_format), (2, crate::cli::LogFormat::Json));
        let Command::Peer(mut started) = again.command else { panic!("not a peer command") };
        assert!(started.foreground && started.detached && !started.daemon);
        // Only what says how to start differs.
        (started.foreground, started.detached, started.daemon) = (false, false, true);
        (started.pid_dir, started.log_dir) = (args.pid_dir.clone(), args.log_dir.clone());
        assert_eq!(format!("{started:?}"), format!("{args:?}"));

        // Every option of `impetus peer` is one the test above sets (so one
        // added later fails here until `foreground_args` forwards it).
        let set: std::collections::BTreeSet<&str> =
            given.iter().filter_map(|a| a.strip_prefix("--")).chain(["voter", "foreground", "detached"]).collect();
        let cmd = <Cli as clap::CommandFactory>::command();
        let peer = cmd.find_subcommand("peer").unwrap();
        for a in peer.get_arguments().filter(|a| !a.is_global_set()) {
            let long = a.get_long().unwrap_or_default();
            assert!(
                set.contains(long),
                "`impetus peer --{long}` is not checked: forward it in foreground_args, then add it here"
            );
        }
        // --voter is the other seat: forwarded too.
        let voter = Cli::try_parse_from(["impetus", "peer", "--voter"]).unwrap();
        let Command::Peer(v) = voter.command else { panic!("not a peer command") };
        assert!(foreground_args(&voter.global, &v, Path::new("/d")).contains(&"--voter".into()));
    }

    #[test]
    fn pid_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(PID_FILE);
        assert_eq!(read_pid(&f).unwrap(), None);
        fs::write(&f, "1234\n").unwrap();
        assert_eq!(read_pid(&f).unwrap(), Some(1234));
        fs::write(&f, "garbage").unwrap();
        assert!(read_pid(&f).unwrap_err().to_string().contains("does not hold a pid"));
        assert!(alive(std::process::id() as i32));
    }

    #[test]
    fn stop_without_pid_file_is_clear() {
        let dir = tempfile::tempdir().unwrap();
        let g = Cli::try_parse_from(["impetus", "status"]).unwrap().global;
        let err = stop(&g, StopArgs { pid_dir: dir.path().to_path_buf() }).unwrap_err();
        assert!(err.to_string().starts_with("no pid file at "), "{err}");
    }
}
