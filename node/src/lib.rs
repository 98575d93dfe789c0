//! impetus-node: the peer and the `impetus` binary. See ARCHITECTURE.md.
