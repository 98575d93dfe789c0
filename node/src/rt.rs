//! The production runtime: tokio for tasks and timers, the system clock for
//! stamping commands, /proc for the resident set size.

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use impetus_proto::Timestamp;

use crate::peer::Runtime;

#[derive(Clone, Copy, Debug, Default)]
pub struct TokioRuntime;

impl Runtime for TokioRuntime {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Timestamp(ms)
    }

    fn monotonic(&self) -> Duration {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed()
    }

    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send + 'static {
        tokio::time::sleep(d)
    }

    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        tokio::spawn(fut);
    }

    fn rss_bytes(&self) -> u64 {
        rss_bytes()
    }
}

/// Resident set size of this process (Linux: /proc/self/statm), 0 if unknown.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages = statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0);
    pages * 4096
}

/// Aborts its task when dropped: a task that lives as long as its owner.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often [`watch_stalls`] wakes up.
const STALL_PROBE: Duration = Duration::from_millis(50);
/// A wake-up at least this late is logged: the runtime's thread was held.
pub const STALL_WARN: Duration = Duration::from_millis(100);

/// Watch this runtime for stalls: a task that sleeps [`STALL_PROBE`] over
/// and over and warns when it wakes [`STALL_WARN`] or more late. Every
/// request, heartbeat and lease of the peer waited as long, so the warning
/// explains a slow job or a lost election; whether the machine paused too
/// (a VM descheduled, swapping) shows in the logs of its other processes.
/// Runs until its task is aborted (see [`AbortOnDrop`]).
pub fn watch_stalls() -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async {
        loop {
            let asked = Instant::now();
            tokio::time::sleep(STALL_PROBE).await;
            let late = asked.elapsed().saturating_sub(STALL_PROBE);
            if late >= STALL_WARN {
                tracing::warn!(
                    late_ms = late.as_millis() as u64,
                    "this peer's runtime was held up: nothing it serves moved meanwhile"
                );
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_runtime_thread_held_past_the_limit_is_reported_and_a_free_one_is_not() {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let _watch = watch_stalls();

        // Free: the watcher wakes on time, round after round.
        tokio::time::sleep(STALL_PROBE * 4).await;
        assert_eq!(logs.text(), "", "nothing held the runtime");

        // Held: a blocking call on the only thread of the runtime.
        std::thread::sleep(STALL_WARN + Duration::from_millis(100));
        tokio::time::sleep(STALL_PROBE * 2).await;
        let text = logs.text();
        assert!(text.contains("runtime was held up"), "{text}");
        let late: u64 = text
            .split("late_ms=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(late >= STALL_WARN.as_millis() as u64, "{text}");
        assert_eq!(text.matches("held up").count(), 1, "one stall, one warning: {text}");
    }
}
