//! impetus-raft: openraft type config, log and state-machine storage (sled on
//! disk, in memory for tests and the simulator), snapshots.
//!
//! Filled by the issue "One peer, end to end".
