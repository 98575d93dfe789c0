//! What bounds a paced job on this machine, measured apart from Impetus:
//! the network stack the peers use against plain TCP, and the disk alone and
//! as three replicas on one machine share it. Printed beside the targets, so a miss
//! can be told apart from a slow machine.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, StreamProtocol, Swarm};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The echo protocol of [`echo_server`].
const ECHO: StreamProtocol = StreamProtocol::new("/impetus-bench/echo/1");
/// Bytes per probe message: about an append of one small entry.
const MESSAGE: usize = 200;
/// The spacing of the paced phase.
const GAP: Duration = Duration::from_millis(5);

/// A swarm built as the peers build theirs (the SDK's transport: TCP,
/// noise, yamux) with libp2p-stream on it.
fn swarm() -> Result<Swarm<libp2p_stream::Behaviour>> {
    let cfg = impetus_sdk::transport::TransportConfig::default();
    Ok(impetus_sdk::transport::build_swarm(Keypair::generate_ed25519(), &cfg, libp2p_stream::Behaviour::new())?)
}

/// `--echo-server`: the other end of [`network_round_trips`], run by this
/// bench binary as a child process. Prints `LIBP2P-ADDR TCP-ADDR` on one
/// line, echoes every message on both, and exits when stdin closes (its
/// parent is gone).
pub async fn echo_server() -> Result<()> {
    let mut sw = swarm()?;
    sw.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    let mut incoming = sw.behaviour().new_control().accept(ECHO)?;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tcp_addr = tcp.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0u8; MESSAGE];
                while s.read_exact(&mut buf).await.is_ok() && s.write_all(&buf).await.is_ok() {}
            });
        }
    });
    tokio::spawn(async move {
        while let Some((_, mut s)) = incoming.next().await {
            tokio::spawn(async move {
                let mut buf = [0u8; MESSAGE];
                while s.read_exact(&mut buf).await.is_ok() && s.write_all(&buf).await.is_ok() && s.flush().await.is_ok()
                {
                }
            });
        }
    });
    tokio::spawn(async {
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        std::process::exit(0);
    });
    loop {
        if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } = sw.select_next_some().await {
            let me = *sw.local_peer_id();
            println!("{address}/p2p/{me} {tcp_addr}");
            std::io::stdout().flush()?;
        }
    }
}

/// The echo server child, killed on drop.
struct Echo(Child);

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Round trips of a 200-byte message to an echo server in another process,
/// one every 5 ms as in the paced phase: on a libp2p stream over the peers'
/// transport, and on plain TCP (`TCP_NODELAY`), alternating. µs, in the
/// order measured.
/// A paced job crosses the stream transport four times (client → leader →
/// follower → leader → client): two of these round trips.
pub async fn network_round_trips(count: usize) -> Result<(Vec<u64>, Vec<u64>)> {
    let exe = std::env::current_exe()?;
    let mut child = Echo(
        Command::new(exe)
            .arg("--echo-server")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the echo server")?,
    );
    let stdout = child.0.stdout.take().context("the echo server's stdout")?;
    let read = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    // On a timeout the child is killed (dropped), which ends the read.
    let line =
        tokio::time::timeout(Duration::from_secs(10), read).await.context("the echo server did not start")???;
    let mut parts = line.split_whitespace();
    let (Some(addr), Some(tcp_addr)) = (parts.next(), parts.next()) else {
        bail!("the echo server printed {line:?}, not its two addresses")
    };
    let addr: Multiaddr = addr.parse()?;
    let Some(Protocol::P2p(peer)) = addr.iter().last() else { bail!("no peer id in {addr}") };
    let mut sw = swarm()?;
    let mut control = sw.behaviour().new_control();
    sw.dial(addr)?;
    let driver = tokio::spawn(async move {
        loop {
            sw.select_next_some().await;
        }
    });
    let mut stream = tokio::time::timeout(Duration::from_secs(10), control.open_stream(peer, ECHO)).await??;
    let mut tcp = tokio::net::TcpStream::connect(tcp_addr).await?;
    tcp.set_nodelay(true)?;
    let out = [7u8; MESSAGE];
    let mut back = [0u8; MESSAGE];
    let (mut p2p, mut raw) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for _ in 0..count {
        let t = Instant::now();
        stream.write_all(&out).await?;
        stream.flush().await?;
        stream.read_exact(&mut back).await?;
        p2p.push(t.elapsed().as_micros() as u64);
        tokio::time::sleep(GAP).await;
        let t = Instant::now();
        tcp.write_all(&out).await?;
        tcp.read_exact(&mut back).await?;
        raw.push(t.elapsed().as_micros() as u64);
        tokio::time::sleep(GAP).await;
    }
    driver.abort();
    drop(child);
    Ok((p2p, raw))
}

/// A 4 KiB write + `fdatasync` in `dir`, back to back (what every Raft
/// flush pays at least), 50 times. µs, in the order measured.
pub fn fsync(dir: &Path) -> Result<Vec<u64>> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let mut v = Vec::with_capacity(50);
    for _ in 0..50 {
        let t = Instant::now();
        f.write_all(&[7u8; 4096])?;
        f.sync_data()?;
        v.push(t.elapsed().as_micros() as u64);
    }
    std::fs::remove_file(&path)?;
    Ok(v)
}

/// The disk as a replicated write uses it: three writers (a leader and two
/// followers sharing this disk) each append 300 bytes and `fdatasync`, all
/// released at once, every 5 ms, `rounds` times. Returns, per round, the
/// time until the second sync finished (what a commit of 2 of 3 waits for),
/// and every single sync, µs, in the order measured.
pub fn quorum_flush(dir: &Path, rounds: usize) -> Result<(Vec<u64>, Vec<u64>)> {
    let start = Arc::new(Barrier::new(3));
    let writers: Vec<_> = (0..3)
        .map(|i| {
            let path = dir.join(format!("fsync-probe-{i}"));
            let start = start.clone();
            // A writer that fails still meets the others at every round,
            // so that none waits for it for ever.
            std::thread::spawn(move || -> std::io::Result<Vec<(Instant, Instant)>> {
                let mut f = std::fs::File::create(&path);
                let mut v = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    start.wait();
                    if let Ok(file) = &mut f {
                        let t = Instant::now();
                        match file.write_all(&[7u8; 300]).and_then(|()| file.sync_data()) {
                            Ok(()) => v.push((t, Instant::now())),
                            Err(e) => f = Err(e),
                        }
                    }
                    std::thread::sleep(GAP);
                }
                f?;
                std::fs::remove_file(&path)?;
                Ok(v)
            })
        })
        .collect();
    let mut runs = Vec::new();
    for w in writers {
        runs.push(w.join().map_err(|_| anyhow::anyhow!("an fsync probe panicked"))??);
    }
    let (mut second, mut each) = (Vec::with_capacity(rounds), Vec::with_capacity(3 * rounds));
    for r in 0..rounds {
        let began = runs.iter().map(|v| v[r].0).min().context("three writers")?;
        let mut ends: Vec<u64> = runs.iter().map(|v| v[r].1.duration_since(began).as_micros() as u64).collect();
        ends.sort_unstable();
        second.push(ends[1]);
        each.extend(runs.iter().map(|v| v[r].1.duration_since(v[r].0).as_micros() as u64));
    }
    Ok((second, each))
}

/// The floor of a paced job's latency on this machine, sample by sample:
/// two stream round trips (client → leader → client, leader → follower →
/// leader) and a commit's wait for the disk: the two round trips are
/// samples half the run apart, the disk's from its own probe (the probes
/// ran apart in time, so the draws are independent). Nothing else a job needs (its run, the Raft and task
/// hand-offs) is in it. µs, sorted.
pub fn paced_floor(stream_rtt: &[u64], quorum_flush: &[u64]) -> Vec<u64> {
    let (n, q) = (stream_rtt.len(), quorum_flush.len());
    if n == 0 || q == 0 {
        return Vec::new();
    }
    let mut floor: Vec<u64> =
        (0..n.max(q)).map(|i| stream_rtt[i % n] + stream_rtt[(i + n / 2) % n] + quorum_flush[i % q]).collect();
    floor.sort_unstable();
    floor
}

/// The machine's own pauses while the peers run: a thread that sleeps 1 ms
/// over and over and notes each wake-up over 10 ms late (a VM descheduled by
/// its host, a stalled page fault), and the CPU time the host stole
/// (`/proc/stat`). A paced job slow at the same moment as a hiccup was held up
/// by the machine, not by Impetus.
pub struct Hiccups {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(u64, u64)>>,
    steal: u64,
}

/// The longest a [`Hiccups`] meter runs: it stops by itself past this.
const HICCUP_LIMIT: Duration = Duration::from_secs(600);

/// The machine's CPU time so far, in clock ticks, as `/proc/stat`'s `cpu`
/// line gives it: user, nice, system, idle, iowait, irq, softirq, steal, ...
pub fn cpu_ticks() -> Vec<u64> {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = s.lines().next().unwrap_or_default();
    line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect()
}

/// Clock ticks the host stole from this VM so far.
fn steal_ticks() -> u64 {
    cpu_ticks().get(7).copied().unwrap_or(0)
}

impl Hiccups {
    pub fn start() -> Hiccups {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (started, mut late) = (Instant::now(), Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed() < HICCUP_LIMIT {
                let t = Instant::now();
                std::thread::sleep(Duration::from_millis(1));
                let over = t.elapsed().saturating_sub(Duration::from_millis(1));
                if over > Duration::from_millis(10) {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    late.push((now.as_millis() as u64, over.as_micros() as u64));
                }
            }
            late
        });
        Hiccups { stop, thread, steal: steal_ticks() }
    }

    /// Stop; the wake-ups over 10 ms late (UTC ms when noticed, µs late) and
    /// the seconds stolen meanwhile.
    pub fn finish(self) -> (Vec<(u64, u64)>, f64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let late = self.thread.join().unwrap_or_default();
        (late, steal_ticks().saturating_sub(self.steal) as f64 / 100.0)
    }
}
