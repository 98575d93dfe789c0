//! Prometheus metrics for one peer, served over HTTP at `GET /metrics`.
//!
//! Exported:
//! - [`Metrics`]: the live metrics this peer updates as it works ([`Metrics::job_finished`],
//!   [`Metrics::leases_granted`]), and [`Metrics::render`], which writes them in the OpenMetrics text format
//!   together with gauges computed from a [`Snapshot`] of the cluster state.
//! - [`Snapshot`]: what `render` reads besides the live metrics: this peer's id, its Raft status and the streams.
//! - [`serve`]: an HTTP/1 server answering `GET /metrics` with whatever its render closure returns.
//! - [`METRICS_PATH`] and [`CONTENT_TYPE`]: the path served and the content type of the answer.
//!
//! The snapshot metrics are built afresh on every render, so they show exactly the snapshot given: a stream
//! deleted between two scrapes is absent from the second. Every family is written in a fixed order (streams in
//! the order of the snapshot), so two renders of the same state are byte-identical.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use impetus_proto::{ran_results, ApplyResult, Command, JobId, Outcome, StreamInfo, StreamStats};
use impetus_queue::State;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{EncodeCounterValue, EncodeGaugeValue, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::peer::RaftStatus;

/// The path [`serve`] answers on.
pub const METRICS_PATH: &str = "/metrics";

/// The content type of a [`serve`] answer: [`Metrics::render`] writes OpenMetrics text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the `impetus_job_run_seconds` buckets: from a few milliseconds to an hour.
const JOB_SECONDS_BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// Upper bounds of the `impetus_job_latency_seconds` buckets: from the
/// millisecond the state machine's clock counts to a day.
const LATENCY_SECONDS_BUCKETS: [f64; 18] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0];

/// The jobs that `cmd` ended in success, as `result` says: accepted
/// completions, results written with their submit, and those in a batch.
fn succeeded(cmd: &Command, result: &ApplyResult) -> Vec<JobId> {
    match (cmd, result) {
        (Command::Complete { completions, .. }, Ok(Outcome::Completed(rs))) => {
            completions.iter().zip(rs).filter(|(_, r)| r.is_ok()).map(|(c, _)| c.job).collect()
        }
        (Command::SubmitRan { ran, .. }, Ok(Outcome::Batch(parts))) => match parts.as_slice() {
            [submitted, _, completed] => ran_results(ran.iter().map(|r| r.index), submitted, completed)
                .into_iter()
                .filter(|(_, r)| r.is_ok())
                .map(|(s, _)| s.job)
                .collect(),
            _ => Vec::new(),
        },
        (Command::Batch(cmds), Ok(Outcome::Batch(outcomes))) => {
            cmds.iter().zip(outcomes).flat_map(|(c, o)| succeeded(c, o)).collect()
        }
        _ => Vec::new(),
    }
}

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`serve`] waits for open connections to finish once shut down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A peer's metrics: the live ones it updates as it works, rendered with gauges from a [`Snapshot`].
///
/// Cheap to share behind an `Arc`: every method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    /// Holds the live metrics below (clones sharing their values).
    registry: Registry,
    jobs_run: ByOutcome,
    job_seconds: Histogram,
    job_latency: Histogram,
    leases: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Metrics with every live counter at zero.
    pub fn new() -> Metrics {
        let jobs_run = ByOutcome::default();
        let job_seconds = Histogram::new(JOB_SECONDS_BUCKETS);
        let leases = Counter::default();
        let mut registry = Registry::default();
        registry.register("impetus_jobs_run", "Jobs this peer ran to the end, by outcome", jobs_run.clone());
        registry.register_with_unit(
            "impetus_job_run",
            "How long the jobs this peer ran took",
            Unit::Seconds,
            job_seconds.clone(),
        );
        registry.register("impetus_leases_granted", "Job leases granted to this peer", leases.clone());
        let job_latency = Histogram::new(LATENCY_SECONDS_BUCKETS);
        registry.register_with_unit(
            "impetus_job_latency",
            "Submit to success of the jobs this replica applied, by the cluster's clock (a worker has none)",
            Unit::Seconds,
            job_latency.clone(),
        );
        Metrics { registry, jobs_run, job_seconds, job_latency, leases }
    }

    /// A job this peer ran finished: `outcome` is "succeeded" or "failed"; `seconds` is how long it ran
    /// (a negative or NaN duration counts as zero).
    pub fn job_finished(&self, outcome: &str, seconds: f64) {
        self.jobs_run.inc(outcome);
        self.job_seconds.observe(seconds.max(0.0));
    }

    /// This replica applied `cmd` with `result`; `state` is the state after
    /// it. Each job it ended in success adds its submit → success time (the
    /// leader's stamps on the two entries) to `impetus_job_latency_seconds`.
    pub fn applied(&self, state: &State, cmd: &Command, result: &ApplyResult) {
        for job in succeeded(cmd, result) {
            if let Some((created, done)) = state.job_times(job) {
                self.job_latency.observe(done.since(created) as f64 / 1e3);
            }
        }
    }

    /// This peer was granted `n` leases.
    pub fn leases_granted(&self, n: u64) {
        self.leases.inc_by(n);
    }

    /// The OpenMetrics text exposition: the live metrics, then gauges computed from `snap`, then one `# EOF`.
    pub fn render(&self, snap: &Snapshot<'_>) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail, and our metrics never return errors of their own.
        if let Err(error) = encode_all(&mut out, &self.registry, &snapshot_registry(snap)) {
            tracing::error!(%error, "encoding metrics failed");
        }
        out
    }
}

/// The cluster state [`Metrics::render`] turns into gauges.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot<'a> {
    /// This peer's id.
    pub peer: u64,
    /// This peer's view of Raft.
    pub raft: &'a RaftStatus,
    /// The streams and their job counts, in the order they are to be listed.
    pub streams: &'a [StreamInfo],
    /// Raft streams and replication sessions this peer opened (while they
    /// stay up, one of each per target and leadership; a count that keeps
    /// climbing means they keep failing).
    pub raft_streams_opened: u64,
    /// Client streams this peer opened to other peers (forwarded writes,
    /// a worker's turns; one per request in flight to a peer at its
    /// busiest, as they are reused).
    pub client_streams_opened: u64,
}

fn encode_all(out: &mut String, live: &Registry, snapshot: &Registry) -> std::fmt::Result {
    encode_registry(out, live)?;
    encode_registry(out, snapshot)?;
    encode_eof(out)
}

/// A registry holding the gauges and counters computed from `snap`, for one render.
fn snapshot_registry(snap: &Snapshot<'_>) -> Registry {
    let mut r = Registry::default();
    let raft = snap.raft;
    r.register("impetus_peer_id", "This peer's id", ConstGauge::new(snap.peer));
    r.register("impetus_raft_term", "The Raft term this peer is in", ConstGauge::new(raft.term));
    r.register(
        "impetus_raft_leader",
        "The Raft leader's node id, 0 if none is known",
        ConstGauge::new(raft.leader.unwrap_or(0)),
    );
    let is_leader = u64::from(raft.leader == Some(raft.node));
    r.register("impetus_raft_is_leader", "1 if this peer is the Raft leader, else 0", ConstGauge::new(is_leader));
    r.register(
        "impetus_raft_commit_index",
        "The last Raft log index known committed",
        ConstGauge::new(raft.commit_index),
    );
    r.register(
        "impetus_raft_applied_index",
        "The last Raft log index this peer applied",
        ConstGauge::new(raft.applied_index),
    );
    r.register(
        "impetus_raft_streams_opened",
        "Raft streams and replication sessions this peer opened to other peers",
        ConstCounter::new(snap.raft_streams_opened),
    );
    r.register(
        "impetus_client_streams_opened",
        "Client streams this peer opened to other peers",
        ConstCounter::new(snap.client_streams_opened),
    );

    let streams = snap.streams;
    let mut jobs = Rows::new(MetricType::Gauge);
    for s in streams {
        let st = &s.stats;
        let statuses = [
            ("queued", st.queued),
            ("delayed", st.delayed),
            ("leased", st.leased),
            ("running", st.running),
            ("succeeded", st.succeeded),
            ("dead", st.dead),
            ("cancelled", st.cancelled),
        ];
        for (status, n) in statuses {
            jobs.push(vec![label("stream", &s.name), label("status", status)], n);
        }
    }
    r.register("impetus_stream_jobs", "Jobs in a stream, by status", jobs);
    r.register_with_unit(
        "impetus_stream_oldest_pending_age",
        "Age of a stream's oldest queued or delayed job, 0 if there is none",
        Unit::Seconds,
        per_stream(streams, MetricType::Gauge, |s| s.stats.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0),
    );
    let counter = |f: fn(&StreamStats) -> u64| per_stream(streams, MetricType::Counter, move |s| f(&s.stats));
    r.register("impetus_stream_submitted", "Jobs ever submitted to a stream", counter(|s| s.submitted_total));
    r.register("impetus_stream_completed", "Jobs of a stream ever completed", counter(|s| s.completed_total));
    r.register(
        "impetus_stream_failed_attempts",
        "Failed attempts at a stream's jobs",
        counter(|s| s.failed_attempts_total),
    );
    r.register(
        "impetus_stream_leases_expired",
        "Leases on a stream's jobs that expired",
        counter(|s| s.expired_leases_total),
    );
    r.register(
        "impetus_stream_forgotten",
        "Finished jobs of a stream forgotten (past its retention, or purged)",
        counter(|s| s.forgotten_total),
    );
    r
}

/// One row per stream, labelled `stream`.
fn per_stream<V>(streams: &[StreamInfo], kind: MetricType, value: impl Fn(&StreamInfo) -> V) -> Rows<V> {
    let mut rows = Rows::new(kind);
    for s in streams {
        rows.push(vec![label("stream", &s.name)], value(s));
    }
    rows
}

/// A label with its value escaped for the text format (prometheus_client writes values verbatim).
fn label(key: &'static str, value: impl std::fmt::Display) -> (&'static str, String) {
    let raw = value.to_string();
    let mut escaped = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    (key, escaped)
}

type Labels = Vec<(&'static str, String)>;

/// A metric family written in the order its rows were pushed (prometheus_client's `Family` is a hash map).
#[derive(Debug)]
struct Rows<V> {
    kind: MetricType,
    rows: Vec<(Labels, V)>,
}

impl<V> Rows<V> {
    fn new(kind: MetricType) -> Rows<V> {
        Rows { kind, rows: Vec::new() }
    }

    fn push(&mut self, labels: Labels, value: V) {
        self.rows.push((labels, value));
    }
}

impl<V: EncodeCounterValue + EncodeGaugeValue + Debug> EncodeMetric for Rows<V> {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> std::fmt::Result {
        for (labels, value) in &self.rows {
            let mut row = encoder.encode_family(labels)?;
            match self.kind {
                MetricType::Counter => row.encode_counter::<NoLabelSet, V, u64>(value, None)?,
                _ => row.encode_gauge(value)?,
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.kind
    }
}

/// Counters labelled `outcome`, written in name order. Clones share the counts.
#[derive(Clone, Debug, Default)]
struct ByOutcome(Arc<Mutex<BTreeMap<String, u64>>>);

impl ByOutcome {
    fn inc(&self, outcome: &str) {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match counts.get_mut(outcome) {
            Some(n) => *n += 1,
            None => {
                counts.insert(outcome.to_owned(), 1);
            }
        }
    }
}

impl EncodeMetric for ByOutcome {
    fn encode(&self, encoder: MetricEncoder<'_>) -> std::fmt::Result {
        let mut rows = Rows::new(MetricType::Counter);
        for (outcome, n) in self.0.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            rows.push(vec![label("outcome", outcome)], *n);
        }
        rows.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Serve `GET /metrics` (OpenMetrics text from `render`, content type [`CONTENT_TYPE`]) on `listener` until
/// `shutdown` resolves. Any other path is 404 with a short body naming the right path; another method on
/// `/metrics` is 405.
///
/// Each connection is served in its own task. Errors on one connection (or a failed `accept`) are logged and
/// never stop the server. Once `shutdown` resolves no connection is accepted, open ones are closed after their
/// current response, and any still open after a few seconds are dropped; then this returns `Ok(())`.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, path = METRICS_PATH, "serving metrics"),
        Err(error) => tracing::info!(%error, path = METRICS_PATH, "serving metrics (local address unknown)"),
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(joined) = conns.join_next(), if !conns.is_empty() => log_join(joined),
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    conns.spawn(serve_connection(stream, remote, render.clone(), stop_rx.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    stop_tx.send_replace(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(joined) = conns.join_next().await {
            log_join(joined);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(open = conns.len(), "metrics: dropping connections still open at shutdown");
        conns.abort_all();
    }
    tracing::info!("metrics server stopped");
    Ok(())
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        tracing::error!(%error, "metrics: connection task failed");
    }
}

/// Serve one connection until the client is done or `stop` turns true (then finish the current response).
async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let response = respond(&req, render.as_ref());
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    // Resolves once `serve` stops (or is gone); the watch guard is dropped before the select finishes.
    let stopped = async {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(error) = result {
        tracing::warn!(%remote, %error, "metrics: connection failed");
    }
}

fn respond(req: &Request<Incoming>, render: &(dyn Fn() -> String + Send + Sync)) -> Response<Full<Bytes>> {
    if req.uri().path() != METRICS_PATH {
        return text(StatusCode::NOT_FOUND, "not found: metrics are served at GET /metrics\n");
    }
    if req.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use GET /metrics\n");
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from(render())));
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use expect_test::expect;
    use impetus_proto::{StreamName, StreamProps, Timestamp};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn stream(name: &str, stats: StreamStats) -> StreamInfo {
        StreamInfo {
            name: StreamName::new(name).unwrap(),
            props: StreamProps::default(),
            created_at: Timestamp::ZERO,
            stats,
        }
    }

    fn streams() -> Vec<StreamInfo> {
        vec![
            stream(
                "emails",
                StreamStats {
                    queued: 3,
                    delayed: 1,
                    leased: 2,
                    running: 2,
                    succeeded: 40,
                    dead: 1,
                    cancelled: 0,
                    oldest_pending_age_ms: Some(1500),
                    submitted_total: 49,
                    completed_total: 41,
                    failed_attempts_total: 5,
                    expired_leases_total: 2,
                    forgotten_total: 3,
                },
            ),
            stream(
                "thumbs.v2",
                StreamStats { succeeded: 7, submitted_total: 7, completed_total: 7, ..Default::default() },
            ),
        ]
    }

    fn leader() -> RaftStatus {
        RaftStatus { node: 2, leader: Some(2), term: 7, commit_index: 120, applied_index: 118, ..Default::default() }
    }

    /// The value of sample `name` in a rendered page.
    fn sample(page: &str, name: &str) -> Option<f64> {
        page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn job_latency_counts_each_success_from_its_submit_to_its_result() {
        use impetus_proto::{Completion, JobSpec, ModuleHash, NewJob, PeerInfo, PeerRole, Stamp};
        let mut st = State::new();
        let mut index = 0;
        let mut at = |ms: u64, cmd: &Command| {
            index += 1;
            st.apply(Stamp { index, now: Timestamp(ms) }, cmd)
        };
        let Ok(Outcome::PeerRegistered { peer }) =
            at(1_000, &Command::RegisterPeer { info: PeerInfo::default(), role: PeerRole::Voter })
        else {
            panic!("not registered")
        };
        let bytes = b"\0asm module".to_vec();
        let module = ModuleHash::of(&bytes);
        at(1_000, &Command::PutModule { hash: module, bytes }).unwrap();
        let name = StreamName::new("s").unwrap();
        at(1_000, &Command::CreateStream { name: name.clone(), props: StreamProps::default() }).unwrap();
        let job = NewJob { module, spec: JobSpec::default(), priority: None, delay_ms: 0, key: None };
        at(1_000, &Command::Submit { stream: name.clone(), jobs: vec![job; 2] }).unwrap();
        let Ok(Outcome::Leased(grants)) = at(1_200, &Command::Lease { peer, streams: vec![name], max: 2 }) else {
            panic!("not leased")
        };
        // One good result, one with a stale token, in one batch.
        let done = |g: &impetus_proto::LeaseGrant, token| Command::Complete {
            peer,
            completions: vec![Completion { job: g.job, token, result: b"ok".to_vec(), stderr_tail: vec![] }],
        };
        let stale = impetus_proto::FencingToken(grants[1].token.0 - 1);
        let batch = Command::Batch(vec![done(&grants[0], grants[0].token), done(&grants[1], stale)]);
        let result = at(1_250, &batch);

        let metrics = Metrics::new();
        metrics.applied(&st, &batch, &result);
        let (raft, streams) = (leader(), Vec::new());
        let page = metrics.render(&Snapshot {
            peer: 2,
            raft: &raft,
            streams: &streams,
            raft_streams_opened: 0,
            client_streams_opened: 0,
        });
        assert_eq!(sample(&page, "impetus_job_latency_seconds_count"), Some(1.0), "{page}");
        assert_eq!(sample(&page, "impetus_job_latency_seconds_sum"), Some(0.25), "{page}");
        assert_eq!(sample(&page, r#"impetus_job_latency_seconds_bucket{le="0.25"}"#), Some(1.0), "{page}");
        assert_eq!(sample(&page, r#"impetus_job_latency_seconds_bucket{le="0.1"}"#), Some(0.0), "{page}");
    }

    #[test]
    fn render_known_snapshot() {
        let metrics = Metrics::new();
        metrics.job_finished("succeeded", 0.2);
        metrics.job_finished("succeeded", 3.0);
        metrics.job_finished("failed", 0.04);
        metrics.leases_granted(3);
        metrics.leases_granted(2);
        let (raft, streams) = (leader(), streams());
        let out = metrics.render(&Snapshot {
            peer: 2,
            raft: &raft,
            streams: &streams,
            raft_streams_opened: 2,
            client_streams_opened: 3,
        });

        assert!(out.ends_with("\n# EOF\n"), "{out}");
        assert_eq!(out.matches("# EOF").count(), 1, "{out}");
        // Everything but the histogram's buckets, which are many.
        let shown: Vec<&str> = out
            .lines()
            .filter(|l| {
                !l.starts_with("impetus_job_run_seconds_bucket") && !l.starts_with("impetus_job_latency_seconds_bucket")
            })
            .collect();
        expect![[r##"
            # HELP impetus_jobs_run Jobs this peer ran to the end, by outcome.
            # TYPE impetus_jobs_run counter
            impetus_jobs_run_total{outcome="failed"} 1
            impetus_jobs_run_total{outcome="succeeded"} 2
            # HELP impetus_job_run_seconds How long the jobs this peer ran took.
            # TYPE impetus_job_run_seconds histogram
            # UNIT impetus_job_run_seconds seconds
            impetus_job_run_seconds_sum 3.24
            impetus_job_run_seconds_count 3
            # HELP impetus_leases_granted Job leases granted to this peer.
            # TYPE impetus_leases_granted counter
            impetus_leases_granted_total 5
            # HELP impetus_job_latency_seconds Submit to success of the jobs this replica applied, by the cluster's clock (a worker has none).
            # TYPE impetus_job_latency_seconds histogram
            # UNIT impetus_job_latency_seconds seconds
            impetus_job_latency_seconds_sum 0.0
            impetus_job_latency_seconds_count 0
            # HELP impetus_peer_id This peer's id.
            # TYPE impetus_peer_id gauge
            impetus_peer_id 2
            # HELP impetus_raft_term The Raft term this peer is in.
            # TYPE impetus_raft_term gauge
            impetus_raft_term 7
            # HELP impetus_raft_leader The Raft leader's node id, 0 if none is known.
            # TYPE impetus_raft_leader gauge
            impetus_raft_leader 2
            # HELP impetus_raft_is_leader 1 if this peer is the Raft leader, else 0.
            # TYPE impetus_raft_is_leader gauge
            impetus_raft_is_leader 1
            # HELP impetus_raft_commit_index The last Raft log index known committed.
            # TYPE impetus_raft_commit_index gauge
            impetus_raft_commit_index 120
            # HELP impetus_raft_applied_index The last Raft log index this peer applied.
            # TYPE impetus_raft_applied_index gauge
            impetus_raft_applied_index 118
            # HELP impetus_raft_streams_opened Raft streams and replication sessions this peer opened to other peers.
            # TYPE impetus_raft_streams_opened counter
            impetus_raft_streams_opened_total 2
            # HELP impetus_client_streams_opened Client streams this peer opened to other peers.
            # TYPE impetus_client_streams_opened counter
            impetus_client_streams_opened_total 3
            # HELP impetus_stream_jobs Jobs in a stream, by status.
            # TYPE impetus_stream_jobs gauge
            impetus_stream_jobs{stream="emails",status="queued"} 3
            impetus_stream_jobs{stream="emails",status="delayed"} 1
            impetus_stream_jobs{stream="emails",status="leased"} 2
            impetus_stream_jobs{stream="emails",status="running"} 2
            impetus_stream_jobs{stream="emails",status="succeeded"} 40
            impetus_stream_jobs{stream="emails",status="dead"} 1
            impetus_stream_jobs{stream="emails",status="cancelled"} 0
            impetus_stream_jobs{stream="thumbs.v2",status="queued"} 0
            impetus_stream_jobs{stream="thumbs.v2",status="delayed"} 0
            impetus_stream_jobs{stream="thumbs.v2",status="leased"} 0
            impetus_stream_jobs{stream="thumbs.v2",status="running"} 0
            impetus_stream_jobs{stream="thumbs.v2",status="succeeded"} 7
            impetus_stream_jobs{stream="thumbs.v2",status="dead"} 0
            impetus_stream_jobs{stream="thumbs.v2",status="cancelled"} 0
            # HELP impetus_stream_oldest_pending_age_seconds Age of a stream's oldest queued or delayed job, 0 if there is none.
            # TYPE impetus_stream_oldest_pending_age_seconds gauge
            # UNIT impetus_stream_oldest_pending_age_seconds seconds
            impetus_stream_oldest_pending_age_seconds{stream="emails"} 1.5
            impetus_stream_oldest_pending_age_seconds{stream="thumbs.v2"} 0.0
            # HELP impetus_stream_submitted Jobs ever submitted to a stream.
            # TYPE impetus_stream_submitted counter
            impetus_stream_submitted_total{stream="emails"} 49
            impetus_stream_submitted_total{stream="thumbs.v2"} 7
            # HELP impetus_stream_completed Jobs of a stream ever completed.
            # TYPE impetus_stream_completed counter
            impetus_stream_completed_total{stream="emails"} 41
            impetus_stream_completed_total{stream="thumbs.v2"} 7
            # HELP impetus_stream_failed_attempts Failed attempts at a stream's jobs.
            # TYPE impetus_stream_failed_attempts counter
            impetus_stream_failed_attempts_total{stream="emails"} 5
            impetus_stream_failed_attempts_total{stream="thumbs.v2"} 0
            # HELP impetus_stream_leases_expired Leases on a stream's jobs that expired.
            # TYPE impetus_stream_leases_expired counter
            impetus_stream_leases_expired_total{stream="emails"} 2
            impetus_stream_leases_expired_total{stream="thumbs.v2"} 0
            # HELP impetus_stream_forgotten Finished jobs of a stream forgotten (past its retention, or purged).
            # TYPE impetus_stream_forgotten counter
            impetus_stream_forgotten_total{stream="emails"} 3
            impetus_stream_forgotten_total{stream="thumbs.v2"} 0
            # EOF
        "##]].assert_eq(&(shown.join("\n") + "\n"));
        assert!(out.contains("impetus_job_run_seconds_bucket{le=\"0.05\"} 1\n"), "{out}");
        assert!(out.contains("impetus_job_run_seconds_bucket{le=\"5.0\"} 3\n"), "{out}");
        assert!(out.contains("impetus_job_run_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert_eq!(
            out,
            metrics.render(&Snapshot {
                peer: 2,
                raft: &raft,
                streams: &streams,
                raft_streams_opened: 2,
                client_streams_opened: 3
            })
        );

        // A stream gone from the snapshot is gone from the output; a follower is not the leader.
        let follower = RaftStatus { node: 3, leader: None, ..leader() };
        let out = metrics.render(&Snapshot {
            peer: 3,
            raft: &follower,
            streams: &streams[1..],
            raft_streams_opened: 2,
            client_streams_opened: 3,
        });
        assert!(!out.contains("emails"), "{out}");
        assert!(out.contains("impetus_stream_jobs{stream=\"thumbs.v2\",status=\"succeeded\"} 7\n"), "{out}");
        assert!(out.contains("impetus_raft_is_leader 0\n"), "{out}");
        assert!(out.contains("impetus_raft_leader 0\n"), "{out}");
        assert_eq!(out.matches("# EOF").count(), 1, "{out}");
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("k", "a\"b\\c\nd"), ("k", "a\\\"b\\\\c\\nd".to_owned()));
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let exchange = async {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            conn.write_all(request.as_bytes()).await.unwrap();
            let mut response = Vec::new();
            conn.read_to_end(&mut response).await.unwrap();
            String::from_utf8(response).unwrap()
        };
        tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("HTTP exchange timed out")
    }

    #[tokio::test]
    async fn serves_metrics_and_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.leases_granted(1);
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
            let (raft, streams) = (leader(), streams());
            metrics.render(&Snapshot {
                peer: 2,
                raft: &raft,
                streams: &streams,
                raft_streams_opened: 2,
                client_streams_opened: 3,
            })
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, render, async {
            let _ = stopped.await;
        }));

        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(&format!("content-type: {CONTENT_TYPE}\r\n")), "{ok}");
        let body = ok.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
        assert!(body.contains("impetus_raft_term 7\n"), "{body}");
        assert!(body.contains("impetus_leases_granted_total 1\n"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");

        let missing = get(addr, "/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404 Not Found\r\n"), "{missing}");
        assert!(missing.contains("/metrics"), "{missing}");

        stop.send(()).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), server).await.expect("serve did not stop");
        result.unwrap().unwrap();
    }
}
