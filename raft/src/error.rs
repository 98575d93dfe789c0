//! Errors of this crate's own API (openraft's errors pass through inside).

use crate::NodeId;

/// Why a Raft node could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// Reading or writing the log or the state machine failed.
    #[error("raft storage: {0}")]
    Storage(#[from] std::io::Error),
    /// sled refused to open or operate on the data directory.
    #[cfg(feature = "sled")]
    #[error("sled database at {path}: {source}")]
    Sled { path: String, source: sled::Error },
    /// The openraft configuration is invalid.
    #[error("raft config: {0}")]
    Config(#[from] openraft::ConfigError),
    /// openraft stopped with a fatal error.
    #[error("raft node {node} stopped: {message}")]
    Fatal { node: NodeId, message: String },
    /// Initializing the one-voter cluster failed.
    #[error("initializing raft node {node}: {message}")]
    Initialize { node: NodeId, message: String },
}
