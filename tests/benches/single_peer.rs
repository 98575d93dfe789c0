//! `just bench peer`: one real `impetus peer` (release build) on 127.0.0.1,
//! driven through the SDK. Prints a table:
//! - end-to-end throughput of no-op wasm jobs (submit → run → result
//!   committed, every Raft write flushed);
//! - submit→done latency p50/p99 at a paced 200 jobs/s, as a client sees
//!   it: from sending the submit to knowing the job succeeded
//!   (`submit_until_done`);
//! - the peer's idle RSS and its RSS after the run.
#![allow(clippy::print_stdout)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use impetus_proto::{JobSpec, ModuleHash, NewJob, StreamName, StreamProps};
use impetus_sdk::Client;
use impetus_tests::{free_port, release_bin, rss_of, submit_until_done, wasm};

fn job(module: ModuleHash) -> NewJob {
    NewJob { module, spec: JobSpec::default(), priority: None, delay_ms: 0, key: None }
}

async fn wait_drained(c: &Client, s: &StreamName, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let st = c.stream(s).await?.stats;
        if st.live() == 0 {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("stream {s} not drained after {limit:?}: {st:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let bin = release_bin()?;
    let noop = std::fs::read(wasm("noop"))?;
    let dir = tempfile::tempdir()?;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(&bin)
        .args(["peer", "--listen", &addr, "--capacity", "64", "--data-dir"])
        .arg(dir.path().join("peer"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the peer")?;
    let pid = child.id();
    let result = run(&addr, pid, noop, quick).await;
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = child.wait();
    result
}

async fn run(addr: &str, pid: u32, noop: Vec<u8>, quick: bool) -> Result<()> {
    let start = Instant::now();
    let c = loop {
        match Client::connect(addr, None).await {
            Ok(c) if c.status().await.is_ok() => break c,
            _ if start.elapsed() > Duration::from_secs(30) => bail!("peer did not start"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_of(pid);
    let module = c.put_module(noop).await?;
    let s = StreamName::new("bench")?;
    c.create_stream(&s, StreamProps { mpps: 1024, ..StreamProps::default() }).await?;

    // Throughput: submit in batches of 500 from 4 concurrent submitters.
    let n: usize = if quick { 5_000 } else { 50_000 };
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (c, s) = (c.clone(), s.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / 4 / 500 {
                c.submit(&s, (0..500).map(|_| job(module)).collect()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let submitted = t.elapsed();
    wait_drained(&c, &s, Duration::from_secs(600)).await?;
    let total = t.elapsed();
    let loaded_rss = rss_of(pid);
    let st = c.stream(&s).await?.stats;
    if st.succeeded != n as u64 {
        bail!("only {} of {n} jobs succeeded: {st:?}", st.succeeded);
    }

    // Latency at a paced 200 jobs/s.
    let paced = StreamName::new("paced")?;
    c.create_stream(&paced, StreamProps::default()).await?;
    let count = if quick { 200 } else { 1_000 };
    let mut subs = Vec::with_capacity(count);
    let t0 = Instant::now();
    for i in 0..count {
        let due = Duration::from_millis(5 * i as u64);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let (c, paced) = (c.clone(), paced.clone());
        subs.push(tokio::spawn(async move { submit_until_done(&c, &paced, job(module)).await }));
    }
    // µs from sending the submit to reading the result.
    let mut lat = Vec::with_capacity(count);
    for s in subs {
        lat.push(s.await??.2);
    }
    lat.sort_unstable();
    let ms = |us: u64| format!("{:.1}", us as f64 / 1e3);

    println!("impetus single-peer benchmark (release, one peer, every Raft write flushed)");
    println!("{:<52} {:>14}", "measure", "value");
    println!("{:<52} {:>14.0}", format!("no-op jobs end to end, {n} jobs (jobs/s)"), n as f64 / total.as_secs_f64());
    println!("{:<52} {:>14.0}", "  of which submit acknowledged (jobs/s)", n as f64 / submitted.as_secs_f64());
    println!("{:<52} {:>11} ms", "submit→done p50 at 200 jobs/s (sent → known done)", ms(percentile(&lat, 0.50)));
    println!("{:<52} {:>11} ms", "submit→done p99 at 200 jobs/s (sent → known done)", ms(percentile(&lat, 0.99)));
    println!("{:<52} {:>11.1} MB", "idle RSS of the peer", idle_rss as f64 / 1e6);
    println!("{:<52} {:>11.1} MB", "RSS after the throughput run", loaded_rss as f64 / 1e6);
    Ok(())
}
