//! The client protocol over real libp2p on loopback: `impetus_node::net`'s
//! server with an in-memory fake service, driven by `impetus_sdk::Client`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use impetus_node::net::raft_rpc::{P2pConnection, P2pRaftNetwork, RaftReply, RaftRpc};
use impetus_node::net::{ClientService, Handlers, NetConfig, Running as Swarm, Server};
use impetus_proto::api::{ClientRequest, ClientResponse, ClusterStatus, ServiceError};
use impetus_proto::command::{ApplyError, Command, NewJob, Outcome, Submitted};
use impetus_proto::ids::{JobId, ModuleHash, PeerId, StreamName, Timestamp};
use impetus_proto::records::{JobRecord, JobSpec, JobStatus, StreamInfo, StreamProps, StreamStats};
use impetus_raft::openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use impetus_raft::openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use impetus_raft::{Entry, LeaderId, LogId, Payload, PeerNode, TypeConfig, Vote};
use impetus_sdk::{Client, ClientError, MAX_IN_FLIGHT};
use libp2p::Multiaddr;
use tokio::sync::oneshot;

/// A test-only service: jobs in a BTreeMap, every write recorded. A job
/// becomes Succeeded on the third time it is read, so `wait` has to poll.
#[derive(Default)]
struct Fake {
    jobs: Mutex<BTreeMap<JobId, (JobRecord, u32)>>,
    streams: Mutex<BTreeMap<StreamName, StreamInfo>>,
    modules: Mutex<BTreeMap<ModuleHash, Vec<u8>>>,
    writes: Mutex<Vec<Command>>,
    requests: AtomicUsize,
    /// Job reads still to refuse as "unavailable" (an election).
    unavailable: AtomicUsize,
}

fn record(id: JobId, stream: &StreamName, job: &NewJob) -> JobRecord {
    JobRecord {
        id,
        stream: stream.clone(),
        module: job.module,
        spec: job.spec.clone(),
        priority: job.priority.unwrap_or(0),
        status: JobStatus::Queued,
        ready_at: Timestamp(0),
        attempts: 0,
        lease: None,
        peer: None,
        created_at: Timestamp(1),
        updated_at: Timestamp(1),
        key: job.key.clone(),
        result: None,
        error: None,
        stdout_tail: vec![],
        stderr_tail: vec![],
    }
}

impl Fake {
    fn write(&self, cmd: Command) -> Result<Outcome, ApplyError> {
        self.writes.lock().unwrap().push(cmd.clone());
        match cmd {
            Command::CreateStream { name, props } => {
                let mut streams = self.streams.lock().unwrap();
                if streams.contains_key(&name) {
                    return Err(ApplyError::StreamExists(name));
                }
                let info =
                    StreamInfo { name: name.clone(), props, created_at: Timestamp(1), stats: StreamStats::default() };
                streams.insert(name, info);
                Ok(Outcome::StreamCreated)
            }
            Command::PutModule { hash, bytes } => {
                let new = self.modules.lock().unwrap().insert(hash, bytes).is_none();
                Ok(Outcome::ModuleStored { new })
            }
            Command::Submit { stream, jobs } => {
                if !self.streams.lock().unwrap().contains_key(&stream) {
                    return Err(ApplyError::UnknownStream(stream));
                }
                let mut map = self.jobs.lock().unwrap();
                let mut out = vec![];
                for job in &jobs {
                    let id = JobId(map.len() as u64 + 1);
                    map.insert(id, (record(id, &stream, job), 0));
                    out.push(Submitted { job: id, existing: false, status: JobStatus::Queued });
                }
                Ok(Outcome::Submitted(out))
            }
            Command::Cancel { job } => match self.jobs.lock().unwrap().get_mut(&job) {
                Some((rec, _)) => {
                    rec.status = JobStatus::Cancelled;
                    Ok(Outcome::Cancelled)
                }
                None => Err(ApplyError::UnknownJob(job)),
            },
            other => Err(ApplyError::Invalid(format!("the fake does not do {other:?}"))),
        }
    }
}

impl ClientService for Fake {
    async fn handle(&self, req: ClientRequest) -> ClientResponse {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match req {
            ClientRequest::Write(cmd) => ClientResponse::Applied(self.write(cmd)),
            ClientRequest::JobStatuses(_) | ClientRequest::GetJob(_)
                if self.unavailable.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() =>
            {
                ClientResponse::Error(ServiceError::Unavailable("electing a leader".into()))
            }
            ClientRequest::JobStatuses(ids) => {
                let mut jobs = self.jobs.lock().unwrap();
                ClientResponse::JobStatuses(ids.iter().map(|id| jobs.get_mut(id).map(|job| look(job).status)).collect())
            }
            ClientRequest::GetJob(id) => {
                let mut jobs = self.jobs.lock().unwrap();
                ClientResponse::Job(jobs.get_mut(&id).map(|job| look(job).clone()))
            }
            ClientRequest::ListJobs { stream, status, after, limit } => {
                let jobs = self.jobs.lock().unwrap();
                let lower = after.map_or(0, |a| a.0 + 1);
                ClientResponse::Jobs(
                    jobs.range(JobId(lower)..)
                        .map(|(_, (r, _))| r)
                        .filter(|r| stream.as_ref().is_none_or(|s| &r.stream == s))
                        .filter(|r| status.is_none_or(|s| r.status == s))
                        .take(limit as usize)
                        .cloned()
                        .collect(),
                )
            }
            ClientRequest::GetStream(name) => ClientResponse::Stream(self.streams.lock().unwrap().get(&name).cloned()),
            ClientRequest::ListStreams => {
                ClientResponse::Streams(self.streams.lock().unwrap().values().cloned().collect())
            }
            ClientRequest::HasModule(h) => ClientResponse::HasModule(self.modules.lock().unwrap().contains_key(&h)),
            ClientRequest::GetModule(h) => ClientResponse::Module(self.modules.lock().unwrap().get(&h).cloned()),
            ClientRequest::DataGet { .. } => {
                ClientResponse::Error(ServiceError::Unavailable("the fake has no data store".into()))
            }
            ClientRequest::Status => ClientResponse::Status(ClusterStatus {
                peer: PeerId(1),
                leader: Some(PeerId(1)),
                term: 1,
                commit_index: 2,
                applied_index: 2,
                peers: vec![],
                streams: self.streams.lock().unwrap().values().cloned().collect(),
                voters: vec![PeerId(1)],
                now: Timestamp(1_000),
                learners: vec![],
            }),
            other => {
                ClientResponse::Error(ServiceError::InvalidRequest(format!("the fake does not serve {}", other.kind())))
            }
        }
    }
}

struct Running {
    addr: Multiaddr,
    fake: Arc<Fake>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), impetus_node::net::NetError>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let res = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        assert!(matches!(res, Ok(Ok(Ok(())))), "server did not stop cleanly: {res:?}");
    }
}

async fn start(authkey: Option<&str>) -> Running {
    start_with(NetConfig { authkey: authkey.map(str::to_owned), ..loopback() }).await
}

async fn start_with(cfg: NetConfig) -> Running {
    let server = Server::bind(cfg).await.unwrap();
    let addr = server.listen_addr().clone();
    assert!(!addr.to_string().ends_with("/tcp/0"), "{addr}");
    let fake = Arc::new(Fake::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(Arc::clone(&fake), async move {
        let _ = stopped.await;
    }));
    Running { addr, fake, stop: Some(stop), task }
}

/// A network config on a free loopback port.
fn loopback() -> NetConfig {
    NetConfig { listen: "/ip4/127.0.0.1/tcp/0".parse().unwrap(), ..NetConfig::default() }
}

/// Which peer answered a `Status` request; otherwise what came instead.
fn answered_by(r: Result<ClientResponse, impetus_node::net::NetError>) -> Result<PeerId, String> {
    match r {
        Ok(ClientResponse::Status(st)) => Ok(st.peer),
        other => Err(format!("{other:?}")),
    }
}

fn port(addr: &Multiaddr) -> u16 {
    addr.iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(p) => Some(p),
            _ => None,
        })
        .unwrap()
}

fn new_job(input: &str) -> NewJob {
    NewJob {
        module: ModuleHash::of(b"\0asm"),
        spec: JobSpec { args: vec![], env: vec![], input: input.as_bytes().to_vec() },
        priority: None,
        delay_ms: 0,
        key: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_round_trip_through_the_sdk() {
    let server = start(None).await;
    // The "ip:port" form and the multiaddr form both work.
    let client = Client::connect(&format!("127.0.0.1:{}", port(&server.addr)), None).await.unwrap();
    let s = StreamName::new("squares").unwrap();

    client.create_stream(&s, StreamProps::default()).await.unwrap();
    let err = client.create_stream(&s, StreamProps::default()).await.unwrap_err();
    assert!(matches!(&err, ClientError::Apply(ApplyError::StreamExists(n)) if n == &s), "{err:?}");
    assert_eq!(client.stream(&s).await.unwrap().name, s);
    let missing = StreamName::new("missing").unwrap();
    assert!(matches!(client.stream(&missing).await, Err(ClientError::UnknownStream(n)) if n == missing));
    assert_eq!(client.streams().await.unwrap().len(), 1);

    // put_module uploads once, then finds it stored.
    let hash = client.put_module(b"\0asm".to_vec()).await.unwrap();
    assert_eq!(hash, ModuleHash::of(b"\0asm"));
    assert_eq!(client.put_module(b"\0asm".to_vec()).await.unwrap(), hash);
    let puts = server.fake.writes.lock().unwrap().iter().filter(|c| matches!(c, Command::PutModule { .. })).count();
    assert_eq!(puts, 1);
    assert_eq!(client.module(hash).await.unwrap(), Some(b"\0asm".to_vec()));

    let submitted = client.submit(&s, (0..5).map(|i| new_job(&i.to_string())).collect()).await.unwrap();
    let ids: Vec<JobId> = submitted.iter().map(|s| s.job).collect();
    assert_eq!(ids, (1..=5).map(JobId).collect::<Vec<_>>());
    let job = client.job(JobId(2)).await.unwrap();
    assert_eq!((job.id, job.spec.input.as_slice(), job.status), (JobId(2), &b"1"[..], JobStatus::Queued));
    assert!(matches!(client.job(JobId(99)).await, Err(ClientError::UnknownJob(JobId(99)))));

    let listed = client.jobs(Some(&s), None, Some(JobId(2)), 2).await.unwrap();
    assert_eq!(listed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![JobId(3), JobId(4)]);

    client.cancel(JobId(5)).await.unwrap();
    let mut calls = vec![];
    let done = client.wait(&ids, Duration::from_secs(10), |d, t| calls.push((d, t))).await.unwrap();
    assert_eq!(done.iter().map(|j| j.id).collect::<Vec<_>>(), ids);
    assert_eq!(done[4].status, JobStatus::Cancelled);
    assert!(done[..4].iter().all(|j| j.status == JobStatus::Succeeded));
    assert_eq!(done[0].result.as_deref(), Some(&b"0"[..]));
    assert!(calls.len() >= 2, "wait polled {} times: {calls:?}", calls.len());
    assert_eq!(calls.last(), Some(&(5, 5)));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));

    // A job that never finishes: wait times out with a clear error.
    client.submit(&s, vec![new_job("slow")]).await.unwrap();
    let t = Instant::now();
    let err = client.wait(&[JobId(6)], Duration::from_millis(1), |_, _| {}).await;
    // It needs three reads to finish; 1 ms allows at most two polls.
    assert!(matches!(&err, Err(ClientError::Timeout { .. })), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(err.unwrap_err().to_string(), "timed out after 1ms waiting for 1 of 1 jobs to finish");

    // A service error comes back as ClientError::Service.
    let err = client.data_get(&s, b"k").await.unwrap_err();
    assert!(matches!(err, ClientError::Service(ServiceError::Unavailable(_))), "{err:?}");
    assert_eq!(err.to_string(), "service unavailable: the fake has no data store");
    // An invalid request is refused before it is sent.
    let before = server.fake.requests.load(Ordering::Relaxed);
    let err = client.data_get(&s, b"").await.unwrap_err();
    assert_eq!(err.to_string(), "request refused before sending: data-store key is empty");
    assert_eq!(server.fake.requests.load(Ordering::Relaxed), before);

    let status = client.status().await.unwrap();
    assert_eq!((status.leader, status.streams.len()), (Some(PeerId(1)), 1));

    // The multiaddr form.
    let other = Client::connect(&server.addr.to_string(), None).await.unwrap();
    assert_eq!(other.job(JobId(1)).await.unwrap().id, JobId(1));
    assert_eq!(other.peer_id(), client.peer_id());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_requests_are_all_answered() {
    let server = start(None).await;
    let client = Client::connect(&server.addr.to_string(), None).await.unwrap();
    let s = StreamName::new("many").unwrap();
    client.create_stream(&s, StreamProps::default()).await.unwrap();
    let jobs: Vec<NewJob> = (0..500).map(|i| new_job(&format!("input-{i}"))).collect();
    let ids: Vec<JobId> = client.submit(&s, jobs).await.unwrap().into_iter().map(|s| s.job).collect();
    assert_eq!(ids.len(), 500);

    let mut set = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().copied().enumerate() {
        let c = client.clone();
        set.spawn(async move { (i, id, c.request(ClientRequest::GetJob(id)).await) });
    }
    let mut answered = 0;
    while let Some(res) = set.join_next().await {
        let (i, id, resp) = res.unwrap();
        match resp.unwrap() {
            ClientResponse::Job(Some(rec)) => {
                assert_eq!(rec.id, id);
                assert_eq!(rec.spec.input, format!("input-{i}").into_bytes());
            }
            other => panic!("unexpected answer for {id}: {other:?}"),
        }
        answered += 1;
    }
    assert_eq!(answered, 500);
    let opened = client.streams_opened();
    assert!((1..=MAX_IN_FLIGHT as u64).contains(&opened), "{opened} streams for 500 requests");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_addresses_fail_clearly_and_quickly() {
    // A closed port on loopback: refused at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    // A port that accepts TCP but never speaks: only the handshake timeout ends it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = format!("127.0.0.1:{}", silent.local_addr().unwrap().port());

    for target in [addr.as_str(), silent_addr.as_str(), "no-such-host.invalid:7420"] {
        let t = Instant::now();
        let err = Client::connect(target, None).await.unwrap_err();
        let took = t.elapsed();
        assert!(took < Duration::from_secs(3), "{target}: took {took:?}");
        let msg = err.to_string();
        eprintln!("{target} ({took:?}): {msg}");
        assert!(matches!(err, ClientError::Connect { .. }), "{target}: {err:?}");
        assert!(msg.starts_with(&format!("could not connect to {target}: ")), "{msg}");
        assert!(msg.ends_with("(is a peer running? is the authkey right?)"), "{msg}");
    }
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bytes_do_not_crash_the_server() {
    let server = start(None).await;
    let port = port(&server.addr);
    let client = Client::connect(&server.addr.to_string(), None).await.unwrap();
    let s = StreamName::new("s").unwrap();
    client.create_stream(&s, StreamProps::default()).await.unwrap();

    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        // A multistream-select header, then nonsense.
        b"\x13/multistream/1.0.0\n\x07/noise\n\xff\xff\xff\xff\xff\xff".to_vec(),
        // A huge length prefix and a megabyte of noise.
        [&u32::MAX.to_be_bytes()[..], &vec![0xAB; 1 << 20]].concat(),
    ];
    tokio::task::spawn_blocking(move || {
        for bytes in garbage {
            let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
            let _ = sock.write_all(&bytes);
            let _ = sock.shutdown(std::net::Shutdown::Write);
            // The server answers or closes; it must not hang forever.
            let mut sink = Vec::new();
            let _ = sock.read_to_end(&mut sink);
        }
    })
    .await
    .unwrap();

    // The server still serves the existing client and new ones.
    assert_eq!(client.stream(&s).await.unwrap().name, s);
    let fresh = Client::connect(&server.addr.to_string(), None).await.unwrap();
    assert_eq!(fresh.streams().await.unwrap().len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authkey_keeps_out_clients_without_it() {
    let server = start(Some("correct horse")).await;
    let addr = server.addr.to_string();

    for wrong in [Some("battery staple"), None] {
        let t = Instant::now();
        let res = Client::connect(&addr, wrong).await;
        let took = t.elapsed();
        let err = res.expect_err("a client without the right key must not connect");
        eprintln!("authkey {wrong:?} ({took:?}): {err}");
        assert!(took < Duration::from_secs(3), "{wrong:?}: took {took:?}");
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains("is the authkey right?"), "{err}");
    }

    let client = Client::connect(&addr, Some("correct horse")).await.unwrap();
    assert_eq!(client.status().await.unwrap().peer, PeerId(1));

    // A keyed client cannot reach a peer without a key either.
    let open = start(None).await;
    let err = Client::connect(&open.addr.to_string(), Some("correct horse")).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    open.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_an_internal_error() {
    struct Panics;
    impl ClientService for Panics {
        async fn handle(&self, req: ClientRequest) -> ClientResponse {
            match req {
                ClientRequest::Status => panic!("boom"),
                _ => ClientResponse::HasModule(true),
            }
        }
    }
    let server = Server::bind(loopback()).await.unwrap();
    let addr = server.listen_addr().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(Arc::new(Panics), async move {
        let _ = stopped.await;
    }));
    let client = Client::connect(&addr, None).await.unwrap();
    let err = client.status().await.unwrap_err();
    assert!(matches!(&err, ClientError::Service(ServiceError::Internal(m)) if m.contains("panicked")), "{err:?}");
    assert!(client.has_module(ModuleHash::of(b"x")).await.unwrap());
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// The fake's jobs finish after they were looked at three times.
fn look((rec, reads): &mut (JobRecord, u32)) -> &JobRecord {
    *reads += 1;
    if *reads >= 3 && !rec.status.is_final() {
        rec.status = JobStatus::Succeeded;
        rec.result = Some(rec.spec.input.clone());
    }
    rec
}

/// Raft RPCs to one peer ride one long-lived stream: five votes in turn,
/// each answered by the remote handler in order, open a single stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_rpcs_to_one_peer_share_one_stream() {
    let bind = || Server::bind(loopback());
    let (a, b) = (bind().await.unwrap(), bind().await.unwrap());
    let b_addr = b.listen_addr().clone().with(libp2p::multiaddr::Protocol::P2p(b.peer_id()));
    // B grants every vote and remembers the terms it was asked, in order.
    let terms = Arc::new(Mutex::new(Vec::new()));
    let handlers = Arc::new(Handlers::default());
    let seen = terms.clone();
    handlers.set_raft_handler(Arc::new(move |rpc| {
        let reply = match rpc {
            RaftRpc::Vote(req) => {
                seen.lock().unwrap().push(req.vote.leader_id().term);
                RaftReply::Vote(VoteResponse::new(req.vote, None, true))
            }
            other => RaftReply::Error(format!("unexpected {}", other.kind())),
        };
        async move { reply }.boxed()
    }));
    let rb = b.start(handlers);
    let ra = a.start(Arc::new(Handlers::default()));
    let mut conn = P2pRaftNetwork::new(ra.handle.clone()).new_client(2, &PeerNode::new(b_addr.to_string())).await;
    for term in 1..=5 {
        let req = VoteRequest::new(Vote::new(term, 1), None);
        let resp = conn.vote(req, RPCOption::new(Duration::from_secs(5))).await.unwrap();
        assert!(resp.vote_granted, "term {term}: {resp:?}");
        assert_eq!(resp.vote.leader_id().term, term);
    }
    assert_eq!(*terms.lock().unwrap(), [1, 2, 3, 4, 5]);
    assert_eq!(ra.handle.raft_streams_opened(), 1, "one stream carried all five");
    ra.stop().await.unwrap();
    rb.stop().await.unwrap();
}

/// Two bound servers, `b` answering with `handlers`; A's Raft connection to B.
async fn raft_pair(handlers: Handlers) -> (Swarm, Swarm, P2pConnection) {
    let bind = || Server::bind(loopback());
    let (a, b) = (bind().await.unwrap(), bind().await.unwrap());
    let b_addr = b.listen_addr().clone().with(libp2p::multiaddr::Protocol::P2p(b.peer_id()));
    let rb = b.start(Arc::new(handlers));
    let ra = a.start(Arc::new(Handlers::default()));
    let conn = P2pRaftNetwork::new(ra.handle.clone()).new_client(2, &PeerNode::new(b_addr.to_string())).await;
    (ra, rb, conn)
}

/// Connect A to B: a vote by request-response dials (its answer does not matter).
async fn dial(conn: &mut P2pConnection) {
    let _ = conn.vote(VoteRequest::new(Vote::new(1, 1), None), RPCOption::new(Duration::from_secs(5))).await;
}

/// An append of one blank entry at `index` (term 1), after `index - 1`.
fn append_at(index: u64) -> AppendEntriesRequest<TypeConfig> {
    let log_id = |i| LogId::new(LeaderId { term: 1, node_id: 1 }, i);
    AppendEntriesRequest {
        vote: Vote::new_committed(1, 1),
        prev_log_id: (index > 1).then(|| log_id(index - 1)),
        leader_commit: None,
        entries: vec![Entry { log_id: log_id(index), payload: Payload::Blank }],
    }
}

/// A stand-in follower without a Raft: it accepts every append and grants
/// every vote, one RPC at a time, and takes no replication session.
fn one_at_a_time_follower() -> Handlers {
    let handlers = Handlers::default();
    handlers.set_raft_handler(Arc::new(|rpc| {
        let reply = match rpc {
            RaftRpc::Append(_) => RaftReply::Append(AppendEntriesResponse::Success),
            RaftRpc::Vote(req) => RaftReply::Vote(VoteResponse::new(req.vote, None, true)),
            other => RaftReply::Error(format!("unexpected {}", other.kind())),
        };
        async move { reply }.boxed()
    }));
    handlers
}

/// The appends of a replication session are pipelined: the leader sends
/// the next before the previous is answered, and reads the answers in
/// order; a session ends at its first failed result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_of_a_session_are_pipelined_and_end_at_a_conflict() {
    use futures::StreamExt;
    use impetus_raft::openraft::raft::StreamAppendError;

    // B answers nothing before it holds three requests, as a follower
    // whose flush is slow; the fifth conflicts.
    let handlers = Handlers::default();
    handlers.set_append_handler(Arc::new(|requests| {
        requests
            .chunks(3)
            .flat_map(|batch| {
                futures::stream::iter(batch.into_iter().map(|req| {
                    let last = req.entries.last().map(|e| e.log_id);
                    match last {
                        Some(id) if id.index == 5 => Ok(Err(StreamAppendError::Conflict(id))),
                        _ => Ok(Ok(last)),
                    }
                }))
            })
            .boxed()
    }));
    let (ra, rb, mut conn) = raft_pair(handlers).await;
    dial(&mut conn).await;
    let requests = futures::stream::iter((1..=6).map(append_at));
    let replies = tokio::time::timeout(Duration::from_secs(10), async {
        let replies = conn.stream_append(requests, RPCOption::new(Duration::from_secs(5))).await.unwrap();
        replies.collect::<Vec<_>>().await
    })
    .await
    .expect("a session that waits for each reply before the next request never gets one");
    let indexes: Vec<_> = replies
        .iter()
        .map(|r| match r {
            Ok(Ok(id)) => format!("ok {}", id.map_or(0, |id| id.index)),
            Ok(Err(StreamAppendError::Conflict(id))) => format!("conflict {}", id.index),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(indexes, ["ok 1", "ok 2", "ok 3", "ok 4", "conflict 5"]);
    ra.stop().await.unwrap();
    rb.stop().await.unwrap();
}

/// A session to a peer not connected yet sends one append by
/// request-response (which dials) and ends; a session of one append
/// (openraft's heartbeat) takes the Raft stream; a peer whose Raft is not
/// running refuses a session by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_dial_heartbeats_take_the_raft_stream_and_refusals_are_named() {
    use futures::StreamExt;

    // B answers appends one at a time, but has no Raft to take a session.
    let (ra, rb, mut conn) = raft_pair(one_at_a_time_follower()).await;
    let option = || RPCOption::new(Duration::from_secs(5));
    let last_acked = |replies: &[_]| match replies {
        [Ok(Ok(Some(id)))] => Some(LogId::index(id)),
        _ => None,
    };

    let session = futures::stream::iter((1..=3).map(append_at));
    let replies: Vec<_> = conn.stream_append(session, option()).await.unwrap().collect().await;
    assert_eq!(last_acked(&replies), Some(1), "one append, then the session ends: {replies:?}");
    assert_eq!(ra.handle.raft_streams_opened(), 0);

    let heartbeat = futures::stream::once(async { append_at(2) }).boxed();
    let replies: Vec<_> = conn.stream_append(heartbeat, option()).await.unwrap().collect().await;
    assert_eq!(last_acked(&replies), Some(2), "{replies:?}");
    assert_eq!(ra.handle.raft_streams_opened(), 1, "the heartbeat opened the Raft stream");

    let session = futures::stream::iter((3..=4).map(append_at));
    let replies: Vec<_> = conn.stream_append(session, option()).await.unwrap().collect().await;
    let [Err(e)] = &replies[..] else { panic!("{replies:?}") };
    assert!(e.to_string().contains("refused append-entries: raft is not running on this peer yet"), "{e}");
    assert_eq!(ra.handle.raft_streams_opened(), 2, "the session opened a stream of its own");
    ra.stop().await.unwrap();
    rb.stop().await.unwrap();
}

/// A follower that stops answering ends the session with an error once a
/// request has waited the RPC TTL (1 s at least); when the leader drops the
/// session, the follower's side of it ends too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_follower_stops_answering_fails_and_both_ends_close() {
    use futures::StreamExt;
    use std::sync::atomic::AtomicBool;

    struct Ended(Arc<AtomicBool>);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let ended = Arc::new(AtomicBool::new(false));
    let handlers = Handlers::default();
    let flag = ended.clone();
    handlers.set_append_handler(Arc::new(move |requests| {
        // Takes every request, answers none (a follower whose disk hangs).
        let guard = Ended(flag.clone());
        requests
            .filter_map(move |_| {
                let _ = &guard;
                std::future::ready(None)
            })
            .boxed()
    }));
    let (ra, rb, mut conn) = raft_pair(handlers).await;
    dial(&mut conn).await;
    let started = Instant::now();
    let requests = futures::stream::iter((1..=2).map(append_at)).chain(futures::stream::pending());
    let replies: Vec<_> = tokio::time::timeout(Duration::from_secs(10), async {
        conn.stream_append(requests, RPCOption::new(Duration::from_millis(100))).await.unwrap().collect().await
    })
    .await
    .expect("a session that waits for ever");
    let [Err(e)] = &replies[..] else { panic!("{replies:?}") };
    assert!(e.to_string().contains("no progress within 1s"), "{e}");
    assert!(started.elapsed() >= Duration::from_secs(1), "gave up before the TTL: {:?}", started.elapsed());
    let mut closed = false;
    for _ in 0..250 {
        if ended.load(Ordering::SeqCst) {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "the follower still serves a session the leader dropped");
    ra.stop().await.unwrap();
    rb.stop().await.unwrap();
}

/// A follower of an older version, which speaks the Raft stream but not
/// replication sessions: the first session fails by name, and the next
/// ones go one append at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_without_sessions_gets_one_append_at_a_time() {
    use futures::StreamExt;
    use impetus_node::net::raft_rpc::{serve_stream, RAFT_STREAM_PROTOCOL};
    use impetus_sdk::transport::{build_swarm, TransportConfig};
    use libp2p::swarm::SwarmEvent;

    let handlers = Arc::new(one_at_a_time_follower());
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let old_id = keypair.public().to_peer_id();
    let mut old = build_swarm(keypair, &TransportConfig::default(), libp2p_stream::Behaviour::new()).unwrap();
    let mut incoming = old.behaviour().new_control().accept(RAFT_STREAM_PROTOCOL).unwrap();
    let serving = tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            tokio::spawn(serve_stream(peer, stream, handlers.clone()));
        }
    });

    let a = Server::bind(loopback()).await.unwrap().start(Arc::new(Handlers::default()));
    // The old peer dials A, so A is connected to it.
    old.dial(a.handle.local_addr().clone()).unwrap();
    let (connected, is_connected) = oneshot::channel();
    let mut connected = Some(connected);
    let swarm = tokio::spawn(async move {
        loop {
            if let SwarmEvent::ConnectionEstablished { .. } = old.select_next_some().await {
                if let Some(tx) = connected.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), is_connected).await.unwrap().unwrap();
    let old_addr = Multiaddr::empty().with(libp2p::multiaddr::Protocol::P2p(old_id));
    let mut conn = P2pRaftNetwork::new(a.handle.clone()).new_client(2, &PeerNode::new(old_addr.to_string())).await;
    let option = || RPCOption::new(Duration::from_secs(5));
    // A sees the connection a moment after the old peer does: votes (over
    // the Raft stream, which the old peer speaks) succeed from then on.
    let mut voted = false;
    for _ in 0..100 {
        if conn.vote(VoteRequest::new(Vote::new(1, 1), None), option()).await.is_ok() {
            voted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(voted, "A never reached the old peer");

    let session = futures::stream::iter((1..=3).map(append_at));
    let replies: Vec<_> = conn.stream_append(session, option()).await.unwrap().collect().await;
    let [Err(e)] = &replies[..] else { panic!("{replies:?}") };
    assert!(e.to_string().contains("does not speak /impetus/raft-pipeline/1"), "{e}");

    let session = futures::stream::iter((1..=3).map(append_at));
    let replies: Vec<_> = conn.stream_append(session, option()).await.unwrap().collect().await;
    let acked: Vec<_> = replies.iter().map(|r| r.as_ref().ok().and_then(|r| r.clone().ok().flatten())).collect();
    assert_eq!(acked.iter().map(|id| id.map(|id| id.index)).collect::<Vec<_>>(), [Some(1), Some(2), Some(3)]);
    a.stop().await.unwrap();
    swarm.abort();
    serving.abort();
}

/// Client requests ride long-lived streams: requests in turn share one
/// stream, concurrent ones open at most one each, and a client outlives its peer's
/// restart (same identity, same port) by dialing it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streams_are_reused_and_survive_a_peer_restart() {
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let cfg = |listen: &str| NetConfig {
        listen: listen.parse().unwrap(),
        keypair: Some(keypair.clone()),
        ..NetConfig::default()
    };
    let server = start_with(cfg("/ip4/127.0.0.1/tcp/0")).await;
    let client = Client::connect(&server.addr.to_string(), None).await.unwrap();
    let s = StreamName::new("s").unwrap();
    client.create_stream(&s, StreamProps::default()).await.unwrap();
    for _ in 0..20 {
        assert_eq!(client.stream(&s).await.unwrap().name, s);
    }
    assert_eq!(client.streams_opened(), 1, "21 requests in turn, one stream");
    let together = futures::future::join_all((0..8).map(|_| client.stream(&s))).await;
    assert!(together.iter().all(|r| r.as_ref().is_ok_and(|i| i.name == s)), "{together:?}");
    let opened = client.streams_opened();
    assert!(opened <= 8, "8 requests at once opened {opened} streams in all: more than one each");

    // The peer restarts on the same port with the same identity.
    let addr = server.addr.clone();
    server.stop().await;
    let err = client.streams().await.unwrap_err();
    // Not sent, or sent on a pooled stream the peer closed under it.
    assert!(matches!(err, ClientError::Transport(_) | ClientError::Unanswered(_)), "with the peer down: {err:?}");
    let restarted = start_with(cfg(&addr.to_string())).await;
    assert_eq!(restarted.addr, addr);
    // The client dials it again; the fresh fake knows no streams.
    assert_eq!(client.streams().await.unwrap().len(), 0);
    assert!(client.streams_opened() > opened, "a new stream on the new connection");
    restarted.stop().await;
}

/// A peer's requests to another peer (writes forwarded to the leader, a
/// worker's turns) ride a client stream too: requests in turn share one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_between_peers_share_one_client_stream() {
    let b = start(None).await;
    let b_id = Client::connect(&b.addr.to_string(), None).await.unwrap().peer_id();
    let b_addr = b.addr.clone().with(libp2p::multiaddr::Protocol::P2p(b_id));
    let a = Server::bind(loopback()).await.unwrap().start(Arc::new(Handlers::default()));
    for _ in 0..5 {
        match a.handle.client(&b_addr, ClientRequest::Status).await.unwrap() {
            ClientResponse::Status(st) => assert_eq!(st.peer, PeerId(1)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(a.handle.client_streams_opened(), 1, "five requests in turn, one stream");
    // An address without /p2p/ is refused before anything is sent.
    let err = a.handle.client(&b.addr, ClientRequest::Status).await.unwrap_err();
    assert!(err.to_string().contains("has no /p2p/ peer id"), "{err}");
    a.stop().await.unwrap();
    b.stop().await;
}

/// A peer of an older version serves the client protocol only as
/// request-response. A client says so plainly; a peer falls back to
/// request-response and gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_client_streams_is_named_and_falls_back() {
    use futures::StreamExt;
    use impetus_sdk::transport::{build_swarm, client_protocol_behaviour, TransportConfig};
    use libp2p::request_response::{self, ProtocolSupport};
    use libp2p::swarm::SwarmEvent;

    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let old_id = keypair.public().to_peer_id();
    let behaviour = client_protocol_behaviour(ProtocolSupport::Full);
    let mut old = build_swarm(keypair, &TransportConfig::default(), behaviour).unwrap();
    old.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
    let listening = async {
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = old.select_next_some().await {
                break address;
            }
        }
    };
    let addr = tokio::time::timeout(Duration::from_secs(10), listening).await.expect("listening within 10 s");
    let task = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            }) = old.select_next_some().await
            {
                let _ = old.behaviour_mut().send_response(channel, ClientResponse::HasModule(true));
            }
        }
    });

    let client = Client::connect(&addr.to_string(), None).await.unwrap();
    let err = client.has_module(ModuleHash::of(b"x")).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("does not speak /impetus/client-stream/1")),
        "{err:?}"
    );

    let a = Server::bind(loopback()).await.unwrap().start(Arc::new(Handlers::default()));
    let old_addr = addr.with(libp2p::multiaddr::Protocol::P2p(old_id));
    // The first request dials by request-response (the swarm knew no
    // address); the second finds the stream refused and falls back too.
    for _ in 0..2 {
        let resp = a.handle.client(&old_addr, ClientRequest::HasModule(ModuleHash::of(b"x"))).await.unwrap();
        assert_eq!(resp, ClientResponse::HasModule(true));
    }
    assert_eq!(a.handle.client_streams_opened(), 1, "one stream tried, refused");
    a.stop().await.unwrap();
    task.abort();
}

/// A peer's request to another peer ends within its bound in all, with an
/// error that names it: here the address accepts TCP but never speaks, so
/// no connection is made (it used to wait out the handshake, then try
/// request-response dials, each with a bound of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_peer_ends_within_its_bound_in_all() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
    let addr: libp2p::Multiaddr =
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{peer}", silent.local_addr().unwrap().port()).parse().unwrap();
    let a = Server::bind(loopback()).await.unwrap().start(Arc::new(Handlers::default()));
    for limit in [Duration::from_millis(300), Duration::from_millis(2000)] {
        let t = Instant::now();
        let err = a.handle.client_within(&addr, ClientRequest::Status, limit).await.unwrap_err();
        let took = t.elapsed();
        assert!(took >= limit && took < limit + Duration::from_millis(500), "{limit:?}: took {took:?}: {err}");
        assert!(err.to_string().contains(&format!("no answer within {limit:?}")), "{err}");
    }
    a.stop().await.unwrap();
    drop(silent);
}

/// Kademlia: a peer reaches one it was never told about. A joined B (A
/// dialed B, so B saw only A's outbound port); C knows only B. Identify
/// gives B the address A listens on, Kademlia's bootstrap (run when its
/// routing table gains a peer) asks B for the peers closest to C, and C
/// then reaches A by peer id alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_reaches_one_it_was_never_told_about_through_kademlia() {
    use libp2p::multiaddr::Protocol;
    let bind = || async { Server::bind(loopback()).await.unwrap() };
    let b = start(None).await;
    let b_addr =
        b.addr.clone().with(Protocol::P2p(Client::connect(&b.addr.to_string(), None).await.unwrap().peer_id()));
    let (a, c) = (bind().await, bind().await);
    let a_by_id = Multiaddr::empty().with(Protocol::P2p(a.peer_id()));
    let handlers = Handlers::default();
    handlers.set_client(Arc::new(Fake::default()));
    let (a, c) = (a.start(Arc::new(handlers)), c.start(Arc::new(Handlers::default())));

    // C has no address for A.
    let before = c.handle.client_within(&a_by_id, ClientRequest::Status, Duration::from_secs(2)).await;
    assert!(answered_by(before).is_err(), "C reached A before anyone told it of A");
    // A joins B; C meets B.
    assert_eq!(answered_by(a.handle.client(&b_addr, ClientRequest::Status).await), Ok(PeerId(1)));
    assert_eq!(answered_by(c.handle.client(&b_addr, ClientRequest::Status).await), Ok(PeerId(1)));

    let t = Instant::now();
    let reached = loop {
        let r = answered_by(c.handle.client_within(&a_by_id, ClientRequest::Status, Duration::from_secs(1)).await);
        if r.is_ok() || t.elapsed() > Duration::from_secs(15) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reached, Ok(PeerId(1)), "C did not reach A by its peer id within 15 s");
    for s in [a, c] {
        s.stop().await.unwrap();
    }
    b.stop().await;
}

/// Forwards TCP connections from a port of its own to `target`, one pair
/// of tasks per connection. While `frozen`, bytes are read and dropped in
/// both directions, as on a link that went dead with no FIN or RST; the
/// end of the side that dialed in (it closed) is reported on `closed`.
async fn blackhole_proxy(
    target: u16,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Instant>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
            let ((mut in_r, mut in_w), (mut out_r, mut out_w)) = (inbound.into_split(), outbound.into_split());
            let (f1, f2, closed) = (frozen.clone(), frozen.clone(), closed.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = in_r.read(&mut buf).await {
                    if !f1.load(Ordering::SeqCst) && out_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = closed.send(Instant::now());
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = out_r.read(&mut buf).await {
                    if !f2.load(Ordering::SeqCst) && in_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, rx)
}

/// A connection that goes dead without a FIN or RST (a host that lost
/// power, a cut link) is found by a failed ping and closed; the next
/// request dials again instead of waiting on the dead connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_connection_is_closed_by_a_failed_ping_and_the_next_request_dials_again() {
    use impetus_node::net::Liveness;
    use libp2p::multiaddr::Protocol;
    let b = start(None).await;
    let b_id = Client::connect(&b.addr.to_string(), None).await.unwrap().peer_id();
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (proxy, mut closed) = blackhole_proxy(port(&b.addr), frozen.clone()).await;
    let via_proxy: Multiaddr =
        format!("/ip4/127.0.0.1/tcp/{proxy}").parse::<Multiaddr>().unwrap().with(Protocol::P2p(b_id));
    let liveness = Liveness { interval: Duration::from_millis(200), timeout: Duration::from_millis(500) };
    let a = Server::bind(NetConfig { liveness, ..loopback() }).await.unwrap().start(Arc::new(Handlers::default()));
    assert_eq!(answered_by(a.handle.client(&via_proxy, ClientRequest::Status).await), Ok(PeerId(1)));

    // The link goes dead: A closes the connection within a ping's
    // interval and timeout.
    let t = Instant::now();
    frozen.store(true, Ordering::SeqCst);
    let at = tokio::time::timeout(Duration::from_secs(10), closed.recv()).await;
    let took = at.ok().flatten().map(|at| at.duration_since(t));
    assert!(
        took.is_some_and(|d| d >= liveness.timeout && d < Duration::from_secs(3)),
        "A did not close the dead connection within 3 s (closed after {took:?})"
    );

    // The link is back: the next request dials a new connection. (The
    // proxy sees the socket close a moment before A's swarm task hears of
    // it and drops the streams pooled on it: give it that moment.)
    frozen.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = a.handle.client_within(&via_proxy, ClientRequest::Status, Duration::from_secs(5)).await;
    assert_eq!(answered_by(again), Ok(PeerId(1)), "after the close");
    a.stop().await.unwrap();
    b.stop().await;
}

/// `wait` rides out reads refused for a passing reason (an election, a
/// membership change): it asks again until its timeout. Other errors end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_asks_again_when_a_read_is_refused_for_a_passing_reason() {
    let server = start(None).await;
    let client = Client::connect(&server.addr.to_string(), None).await.unwrap();
    let s = StreamName::new("s").unwrap();
    client.create_stream(&s, StreamProps::default()).await.unwrap();
    let ids: Vec<JobId> =
        client.submit(&s, vec![new_job("a"), new_job("b")]).await.unwrap().into_iter().map(|d| d.job).collect();
    server.fake.unavailable.store(5, Ordering::SeqCst);
    let done = client.wait(&ids, Duration::from_secs(10), |_, _| {}).await.unwrap();
    assert!(done.iter().all(|r| r.status == JobStatus::Succeeded), "{done:?}");
    assert_eq!(server.fake.unavailable.load(Ordering::SeqCst), 0, "every refusal was asked again");
    // A job the cluster does not know is not a passing reason.
    let err = client.wait(&[JobId(99)], Duration::from_secs(10), |_, _| {}).await.unwrap_err();
    assert!(err.to_string().contains("vanished"), "{err}");
    server.stop().await;
}
