//! Client protocol cost on loopback: one `impetus_sdk::Client`, one server
//! with a trivial service. Sequential p50/p99 latency, then requests/s with
//! 64 in flight; without and with an authkey (pnet).
//!
//! `cargo bench -p impetus-node --no-default-features --features net --bench net`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use impetus_node::net::{ClientService, NetConfig, Server};
use impetus_proto::api::{ClientRequest, ClientResponse};
use impetus_proto::ids::ModuleHash;
use impetus_sdk::Client;

const SEQUENTIAL: usize = 5_000;
const IN_FLIGHT: usize = 64;
const CONCURRENT_TOTAL: usize = 50_000;

struct Trivial;

impl ClientService for Trivial {
    async fn handle(&self, _req: ClientRequest) -> ClientResponse {
        ClientResponse::HasModule(true)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

async fn run(authkey: Option<&str>) {
    let cfg = NetConfig {
        listen: "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr"),
        authkey: authkey.map(str::to_owned),
        ..NetConfig::default()
    };
    let server = Server::bind(cfg).await.expect("bind");
    let addr = server.listen_addr().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(Arc::new(Trivial), async move {
        let _ = stopped.await;
    }));
    let client = Client::connect(&addr, authkey).await.expect("connect");
    let req = ClientRequest::HasModule(ModuleHash::of(b"bench"));
    let label = if authkey.is_some() { "pnet" } else { "plain" };

    for _ in 0..500 {
        client.request(req.clone()).await.expect("warm-up request");
    }
    let mut lat = Vec::with_capacity(SEQUENTIAL);
    for _ in 0..SEQUENTIAL {
        let t = Instant::now();
        client.request(req.clone()).await.expect("request");
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "{label:5} sequential   n={SEQUENTIAL}: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );

    let left = Arc::new(AtomicUsize::new(CONCURRENT_TOTAL));
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let c = client.clone();
        let left = Arc::clone(&left);
        let req = req.clone();
        set.spawn(async move {
            while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
                c.request(req.clone()).await.expect("request");
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task");
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{label:5} {IN_FLIGHT} in flight n={CONCURRENT_TOTAL}: {:.0} requests/s ({secs:.2} s)",
        CONCURRENT_TOTAL as f64 / secs
    );
    let _ = stop.send(());
    task.await.expect("server task").expect("server");
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        run(None).await;
        run(Some("bench-key")).await;
    });
}
