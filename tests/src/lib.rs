//! impetus-tests: end-to-end tests that start real `impetus` processes on
//! 127.0.0.1. This library holds what they share: building and finding the
//! binary and the example jobs, starting and killing peers, running CLI
//! commands. Every wait is bounded; every process is killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => root().join("target"),
    }
}

/// The `impetus` binary, built (once per test process) with the same cargo
/// and profile as the tests, so it is never stale.
pub fn impetus_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = cargo_build(&["--quiet", "-p", "impetus-node", "--bin", "impetus"])
            .status()
            .expect("running cargo build for the impetus binary");
        assert!(status.success(), "building the impetus binary failed");
        let bin = target_dir().join("debug").join("impetus");
        assert!(bin.exists(), "no binary at {}", bin.display());
        bin
    })
}

/// `cargo build ARGS` in the workspace, without the variables cargo sets for the
/// test or bench running it (`CARGO_PKG_*`, `CARGO_MANIFEST_*`,
/// `LD_LIBRARY_PATH`, ...): build scripts that watch them would run again,
/// and the outer build would then rebuild everything above them.
fn cargo_build(args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").args(args).current_dir(root());
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let ours = key.starts_with("CARGO_") && !matches!(key, "CARGO_HOME" | "CARGO_TARGET_DIR");
        if ours || matches!(key, "LD_LIBRARY_PATH" | "OUT_DIR") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// The release `impetus` binary, built first (for the benchmarks); or the
/// one `IMPETUS_BIN` names, to compare two builds with the same bench.
pub fn release_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("IMPETUS_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("IMPETUS_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let ok = cargo_build(&["--quiet", "--release", "-p", "impetus-node", "--bin", "impetus"]).status()?.success();
    if !ok {
        bail!("building the release binary failed");
    }
    Ok(target_dir().join("release/impetus"))
}

/// Resident memory of process `pid`, in bytes (0 if it is gone).
pub fn rss_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// An example job's wasm file, building the examples once if needed.
pub fn wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = root().join("examples/jobs/wasm").join(format!("{name}.wasm"));
    if !path.exists() {
        BUILT.get_or_init(|| {
            let status = Command::new("bash")
                .arg(root().join("examples/jobs/build.sh"))
                .current_dir(root())
                .status()
                .expect("running examples/jobs/build.sh");
            assert!(status.success(), "building the example jobs failed");
        });
    }
    assert!(path.exists(), "no example job {}", path.display());
    path
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A running `impetus peer` process on loopback.
#[derive(Debug)]
pub struct PeerProc {
    child: Option<Child>,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    extra: Vec<String>,
    /// The `--authkey` among the extra arguments, for this peer's CLI calls.
    authkey: Option<String>,
}

impl PeerProc {
    /// Start a peer on a free port with its data in `data_dir`.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Result<PeerProc> {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut p = PeerProc {
            child: None,
            addr,
            data_dir: data_dir.to_path_buf(),
            log: data_dir.with_extension("log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            authkey: extra.windows(2).find(|w| w[0] == "--authkey").map(|w| w[1].to_owned()),
        };
        p.spawn()?;
        Ok(p)
    }

    fn spawn(&mut self) -> Result<()> {
        self.launch()?;
        self.wait_ready(Duration::from_secs(30))
    }

    /// Start the process, without waiting for it to answer.
    fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(impetus_bin())
            .arg("peer")
            .args(["--listen", &self.addr, "--data-dir"])
            .arg(&self.data_dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning impetus peer")?;
        self.child = Some(child);
        Ok(())
    }

    /// Wait until the peer answers `status`.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("peer exited with {status} before it was ready; log:\n{}", self.log_text());
                }
            }
            let out = self.cli(&["status", "--json"]);
            if out.status.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("peer at {} not ready after {limit:?}; log:\n{}", self.addr, self.log_text())
    }

    /// Run `impetus --peer ADDR ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(impetus_bin());
        if let Some(k) = &self.authkey {
            cmd.env("IMPETUS_AUTHKEY", k);
        }
        cmd.args(["--peer", &self.addr]).args(args);
        output_within(cmd, CLI_LIMIT).unwrap_or_else(|e| panic!("impetus {args:?}: {e}"))
    }

    /// Run a CLI command that must succeed; return its stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "impetus {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGKILL the process (no chance to clean up), and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait (bounded) for the process to exit by itself; its exit status,
    /// or `None` if it still runs after `limit` (or was never started).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait (bounded) for a clean exit. Returns whether it exited 0.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut child) = self.child.take() else { return Ok(false) };
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("peer did not stop within 30 s after SIGTERM")
    }

    /// Start the peer again on the same address and data dir.
    pub fn restart(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "restart of a running peer");
        self.spawn()
    }

    /// Replace the extra arguments the next (re)start passes.
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Start the peer again on the same address and data dir, without
    /// waiting for it to answer (peers that need each other to start).
    pub fn relaunch(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "restart of a running peer");
        self.launch()
    }

    /// Send `sig` (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let ok =
                Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().is_ok_and(|s| s.success());
            assert!(ok, "kill -{sig} {pid} failed");
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Poll `f` every 50 ms until it returns `Some`, at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Submit `job` to `s` and read its status until it has succeeded
/// (bounded, 10 s). Returns its id, and the µs from sending the submit to
/// its acknowledgement and to knowing it succeeded (from the
/// acknowledgement, or the first status read that says so): what a client
/// waits for.
pub async fn submit_until_done(
    c: &impetus_sdk::Client,
    s: &impetus_proto::StreamName,
    job: impetus_proto::NewJob,
) -> Result<(impetus_proto::JobId, u64, u64)> {
    let t = Instant::now();
    let subs = c.submit(s, vec![job]).await?;
    let ack = t.elapsed().as_micros() as u64;
    let sub = subs.first().context("a submit of one job answered no job")?;
    let id = sub.job;
    if sub.status == impetus_proto::JobStatus::Succeeded {
        // Done in the entry that submitted it: the acknowledgement says so.
        return Ok((id, ack, ack));
    }
    while t.elapsed() < Duration::from_secs(10) {
        match c.job_statuses(&[id]).await?.first() {
            Some(Some(impetus_proto::JobStatus::Succeeded)) => return Ok((id, ack, t.elapsed().as_micros() as u64)),
            Some(Some(st)) if st.is_final() => bail!("paced job {id} ended {st:?}"),
            _ => tokio::task::yield_now().await,
        }
    }
    bail!("paced job {id} not done 10 s after its submit")
}

/// Longest a CLI command of a test may run.
pub const CLI_LIMIT: Duration = Duration::from_secs(120);

/// What a command run by [`run_bounded`] printed, and how it ended:
/// `status` is `None` when it was killed past its limit.
#[derive(Debug)]
pub struct Bounded {
    pub status: Option<std::process::ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Run `cmd` to its end and collect its output, killing it after `limit`
/// (what it printed until then is kept).
pub fn run_bounded(mut cmd: Command, limit: Duration) -> std::io::Result<Bounded> {
    use std::io::Read;
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let join = |t: std::thread::JoinHandle<Vec<u8>>| t.join().unwrap_or_default();
    Ok(Bounded { status, stdout: join(stdout), stderr: join(stderr) })
}

/// Run `cmd` to its end and collect its output, as `Command::output` does,
/// but kill it and fail if it runs past `limit`.
pub fn output_within(cmd: Command, limit: Duration) -> Result<Output> {
    let ran = run_bounded(cmd, limit)?;
    match ran.status {
        Some(status) => Ok(Output { status, stdout: ran.stdout, stderr: ran.stderr }),
        None => bail!("still running after {limit:?}: killed; stderr:\n{}", String::from_utf8_lossy(&ran.stderr)),
    }
}

/// GET `path` from `addr` over plain HTTP/1.0; the body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not HTTP: {resp}"));
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "{head}");
    body.to_string()
}

/// The value of the one sample `name` (with its labels) in a Prometheus text page.
pub fn sample(page: &str, name: &str) -> f64 {
    let found: Vec<f64> =
        page.lines().filter_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).collect();
    assert_eq!(found.len(), 1, "one sample {name} in:\n{page}");
    found[0]
}
