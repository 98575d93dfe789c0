//! The faults a run may inject, chosen on the command line and driven by the seed.

use std::collections::BTreeSet;
use std::fmt;

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// Random message latency (1–20 ms) instead of a fixed 1 ms.
    Delay,
    /// Requests and responses lost (the sender sees `Unreachable`).
    Drop,
    /// Raft requests delivered twice.
    Dup,
    /// Occasional long delays (50–400 ms), so later messages overtake earlier ones.
    Reorder,
    /// A peer cut off from all others (both ways), later healed.
    Partition,
    /// One direction of one link cut, later healed.
    OneWay,
    /// A peer (sometimes two) crashes, losing unflushed log writes, and restarts.
    Crash,
    /// Per-peer clock skew and jumps of `Runtime::now` (forward and back).
    Clock,
    /// Slow disks: log writes are acknowledged only at a flush 1–40 ms later.
    Disk,
    /// Job attempts that trap.
    Trap,
    /// Job attempts that hang until the job timeout.
    Hang,
    /// Job attempts that finish late (after 1.2–2.5 lease TTLs: they need renewals).
    Slow,
    /// The client resubmits acknowledged batches (idempotency keys) and hops peers.
    Client,
    /// A peer drains and leaves the cluster as `impetus peer leave` does
    /// (at most one per worker, so the voters can be replaced); one whose
    /// leave fails stops anyway and is started again later.
    Leave,
}

impl Fault {
    pub const ALL: [Fault; 14] = [
        Fault::Delay,
        Fault::Drop,
        Fault::Dup,
        Fault::Reorder,
        Fault::Partition,
        Fault::OneWay,
        Fault::Crash,
        Fault::Clock,
        Fault::Disk,
        Fault::Trap,
        Fault::Hang,
        Fault::Slow,
        Fault::Client,
        Fault::Leave,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Delay => "delay",
            Fault::Drop => "drop",
            Fault::Dup => "dup",
            Fault::Reorder => "reorder",
            Fault::Partition => "partition",
            Fault::OneWay => "oneway",
            Fault::Crash => "crash",
            Fault::Clock => "clock",
            Fault::Disk => "disk",
            Fault::Trap => "trap",
            Fault::Hang => "hang",
            Fault::Slow => "slow",
            Fault::Client => "client",
            Fault::Leave => "leave",
        }
    }
}

/// A set of faults: `all`, `none`, or a comma list of [`Fault`] names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Faults(BTreeSet<Fault>);

/// A fault list that names an unknown fault.
#[derive(Debug, thiserror::Error)]
#[error("unknown fault {name:?}; known: all, none, {known}", known = Fault::ALL.map(Fault::name).join(", "))]
pub struct UnknownFault {
    name: String,
}

impl Faults {
    pub fn all() -> Faults {
        Faults(Fault::ALL.into_iter().collect())
    }

    pub fn none() -> Faults {
        Faults(BTreeSet::new())
    }

    pub fn has(&self, f: Fault) -> bool {
        self.0.contains(&f)
    }

    pub fn parse(list: &str) -> Result<Faults, UnknownFault> {
        let mut set = BTreeSet::new();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "all" => set.extend(Fault::ALL),
                "none" => {}
                _ => {
                    let f =
                        Fault::ALL.into_iter().find(|f| f.name() == name).ok_or(UnknownFault { name: name.into() })?;
                    set.insert(f);
                }
            }
        }
        Ok(Faults(set))
    }
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.len() == Fault::ALL.len() {
            return write!(f, "all");
        }
        if self.0.is_empty() {
            return write!(f, "none");
        }
        let names: Vec<&str> = self.0.iter().map(|f| f.name()).collect();
        write!(f, "{}", names.join(","))
    }
}

/// A bug planted on purpose to show the checkers find it (tests only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bug {
    #[default]
    None,
    /// The state machine accepts a stale fencing token.
    StaleToken,
    /// The in-memory log acknowledges appends before they are flushed.
    AckBeforeFlush,
    /// The state machine forgets to requeue a job whose lease expired.
    ForgetRequeue,
}

impl Bug {
    pub const ALL: [Bug; 4] = [Bug::None, Bug::StaleToken, Bug::AckBeforeFlush, Bug::ForgetRequeue];

    pub fn name(self) -> &'static str {
        match self {
            Bug::None => "none",
            Bug::StaleToken => "stale-token",
            Bug::AckBeforeFlush => "ack-before-flush",
            Bug::ForgetRequeue => "forget-requeue",
        }
    }

    pub fn parse(s: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == s)
    }

    pub(crate) fn state_bug(self) -> impetus_queue::PlantedBug {
        match self {
            Bug::StaleToken => impetus_queue::PlantedBug::AcceptStaleToken,
            Bug::ForgetRequeue => impetus_queue::PlantedBug::ForgetExpiredRequeue,
            Bug::None | Bug::AckBeforeFlush => impetus_queue::PlantedBug::None,
        }
    }
}
