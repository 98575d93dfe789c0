//! The client protocol, served by the peer.

use impetus_proto::api::{ClientRequest, ClientResponse, ClusterStatus, ServiceError};
use impetus_proto::{Command, PeerId};
use impetus_queue::JobFilter;

use super::{Consensus, ConsensusError, JobRunner, Peer, Runtime};

impl From<ConsensusError> for ServiceError {
    fn from(e: ConsensusError) -> ServiceError {
        match e {
            ConsensusError::NotLeader { leader, .. } => ServiceError::NotLeader { leader },
            ConsensusError::Unavailable(why) => ServiceError::Unavailable(why),
        }
    }
}

impl<R: Runtime, C: Consensus, X: JobRunner> Peer<R, C, X> {
    /// Answer one client request.
    pub async fn handle(&self, req: ClientRequest) -> ClientResponse {
        if let Err(e) = req.validate() {
            return ClientResponse::Error(ServiceError::InvalidRequest(e.to_string()));
        }
        let inner = &self.inner;
        let c = &inner.consensus;
        match req {
            ClientRequest::Write(cmd) => {
                if let Command::PutModule { hash, bytes } = &cmd {
                    // Refuse what cannot run before it is stored: not wasm,
                    // not a WASI command, imports we do not provide.
                    if let Err(why) = inner.runner.prepare(*hash, bytes.clone()).await {
                        return ClientResponse::Error(ServiceError::ModuleRejected(why));
                    }
                }
                let (cmd, fused) = self.fuse(cmd).await;
                match self.unfuse(fused, c.write(inner.rt.now(), cmd).await) {
                    Ok(result) => ClientResponse::Applied(result),
                    Err(e) => ClientResponse::Error(e.into()),
                }
            }
            ClientRequest::GetJob(id) => ClientResponse::Job(c.read(|s| s.job(id))),
            ClientRequest::JobStatuses(ids) => ClientResponse::JobStatuses(c.read(|s| s.job_statuses(&ids))),
            ClientRequest::ListJobs { stream, status, after, limit } => {
                // Bounded in bytes too (the page may come back short), so
                // large records are not copied under the read lock only for
                // the answer to be refused as too large.
                let filter = JobFilter {
                    stream: stream.as_ref(),
                    status,
                    after,
                    limit: limit as usize,
                    max_bytes: Some(impetus_queue::LIST_JOBS_BYTES),
                };
                ClientResponse::Jobs(c.read(|s| s.jobs(&filter)))
            }
            ClientRequest::GetStream(name) => ClientResponse::Stream(c.read(|s| s.stream(&name))),
            ClientRequest::ListStreams => ClientResponse::Streams(c.read(|s| s.streams())),
            ClientRequest::HasModule(hash) => ClientResponse::HasModule(c.read(|s| s.has_module(&hash))),
            ClientRequest::GetModule(hash) => ClientResponse::Module(c.read(|s| s.module(&hash).map(<[u8]>::to_vec))),
            ClientRequest::DataGet { stream, key } => {
                ClientResponse::Data(c.read(|s| s.data_get(&stream, &key).map(<[u8]>::to_vec)))
            }
            ClientRequest::StateDigest => {
                // Encoded outside the state's lock (a copy on write).
                let (applied_index, frozen) = c.read(|s| (s.applied_index(), s.freeze()));
                let digest = blake3::hash(&frozen.snapshot()).to_hex().to_string();
                ClientResponse::StateDigest { applied_index, digest }
            }
            ClientRequest::Work(req) => match c.work(inner.rt.now(), req).await {
                Ok(reply) => ClientResponse::Work(reply),
                Err(e) => ClientResponse::Error(e.into()),
            },
            req @ (ClientRequest::Join { .. }
            | ClientRequest::Leave { .. }
            | ClientRequest::Forward(_)
            | ClientRequest::ReadIndex) => ClientResponse::Error(ServiceError::InvalidRequest(format!(
                "{} is served by the cluster layer (impetus_node::cluster), not by a bare peer",
                req.kind()
            ))),
            ClientRequest::Status => {
                let raft = c.status();
                let (peers, streams, now) = c.read(|s| (s.peers(), s.streams(), s.now()));
                ClientResponse::Status(ClusterStatus {
                    peer: inner.id,
                    // Raft node ids are peer ids.
                    leader: raft.leader.map(PeerId),
                    term: raft.term,
                    commit_index: raft.commit_index,
                    applied_index: raft.applied_index,
                    peers,
                    streams,
                    voters: raft.voters.into_iter().map(PeerId).collect(),
                    learners: raft.learners.into_iter().map(PeerId).collect(),
                    now,
                })
            }
        }
    }
}
