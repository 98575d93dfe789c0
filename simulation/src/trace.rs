//! The event trace of one run: hashed as it grows (the determinism check
//! compares hashes), with the last events kept for a failure report.

use std::collections::VecDeque;
use std::sync::Mutex;

use openraft_rt_sim::SimInstant;

/// How many recent events a failure report shows.
pub const KEEP_EVENTS: usize = 30;

#[derive(Debug)]
pub(crate) struct Trace {
    inner: Mutex<Inner>,
    /// Also print every event to stderr (`--print-trace`).
    print: bool,
}

#[derive(Debug)]
struct Inner {
    hasher: blake3::Hasher,
    last: VecDeque<String>,
    count: u64,
}

/// Virtual milliseconds since the start of the run (0 outside the runtime).
pub(crate) fn vnow_ms() -> u64 {
    SimInstant::try_now().map_or(0, |i| i.elapsed_since_start().as_millis() as u64)
}

impl Trace {
    pub fn new(print: bool) -> Trace {
        let inner = Mutex::new(Inner { hasher: blake3::Hasher::new(), last: VecDeque::new(), count: 0 });
        Trace { inner, print }
    }

    /// Record one event, stamped with the virtual time.
    pub fn event(&self, what: impl std::fmt::Display) {
        let line = format!("{:>7}ms {what}", vnow_ms());
        if self.print {
            tracing::info!(target: "impetus_simulation::trace", "{line}");
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.hasher.update(line.as_bytes());
        g.hasher.update(b"\n");
        g.count += 1;
        if g.last.len() == KEEP_EVENTS {
            g.last.pop_front();
        }
        g.last.push_back(line);
    }

    /// Fold raw bytes into the hash without an event line (e.g. a scheduler trace).
    pub fn absorb(&self, bytes: &[u8]) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).hasher.update(bytes);
    }

    pub fn hash_hex(&self) -> String {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).hasher.finalize().to_hex().to_string()
    }

    pub fn last(&self) -> Vec<String> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).last.iter().cloned().collect()
    }

    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).count
    }
}
