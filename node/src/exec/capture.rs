//! Bounded capture of a job's stdout and stderr.
//!
//! [`Capture::head`] keeps the first `cap` bytes (a job's result) and refuses
//! any write past them with an I/O error in the guest, remembering that the
//! output overflowed. [`Capture::tail`] never refuses and keeps the last `cap`
//! bytes (a job's stderr, where the end matters most).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// Largest write permit handed to the guest at once (as wasmtime-wasi's own streams).
const PERMIT: usize = 64 << 10;

#[derive(Debug)]
enum Mode {
    /// Keep the first `cap` bytes; refuse writes past them.
    Head,
    /// Keep the last `cap` bytes; never refuse.
    Tail,
}

#[derive(Debug)]
struct Buf {
    mode: Mode,
    cap: usize,
    data: Vec<u8>,
    /// Set once a write did not fit (head mode only).
    overflowed: bool,
}

impl Buf {
    /// Appends `bytes`. In head mode, a write that does not fit is refused
    /// whole and marks the capture as overflowed.
    fn write(&mut self, bytes: &[u8]) -> Result<(), ()> {
        match self.mode {
            Mode::Head => {
                if self.overflowed || bytes.len() > self.cap - self.data.len() {
                    self.overflowed = true;
                    return Err(());
                }
                self.data.extend_from_slice(bytes);
            }
            Mode::Tail => {
                if bytes.len() >= self.cap {
                    self.data.clear();
                    self.data.extend_from_slice(&bytes[bytes.len() - self.cap..]);
                } else {
                    self.data.extend_from_slice(bytes);
                    // Amortised: trim only once the buffer holds twice the cap.
                    if self.data.len() > self.cap.saturating_mul(2) {
                        let cut = self.data.len() - self.cap;
                        self.data.drain(..cut);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A shared, bounded output buffer that can serve as a WASI stdout or stderr.
#[derive(Clone, Debug)]
pub(crate) struct Capture {
    buf: Arc<Mutex<Buf>>,
}

impl Capture {
    /// Keeps the first `cap` bytes; a write past them fails in the guest.
    pub(crate) fn head(cap: usize) -> Capture {
        Capture::new(Mode::Head, cap)
    }

    /// Keeps the last `cap` bytes; writes never fail.
    pub(crate) fn tail(cap: usize) -> Capture {
        Capture::new(Mode::Tail, cap)
    }

    fn new(mode: Mode, cap: usize) -> Capture {
        Capture { buf: Arc::new(Mutex::new(Buf { mode, cap, data: Vec::new(), overflowed: false })) }
    }

    fn lock(&self) -> MutexGuard<'_, Buf> {
        // A panic while holding this lock cannot leave the buffer inconsistent.
        self.buf.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the guest tried to write past the cap (head mode).
    pub(crate) fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Everything kept: the first `cap` bytes (head) or the last `cap` bytes (tail).
    pub(crate) fn contents(&self) -> Vec<u8> {
        let buf = self.lock();
        let start = match buf.mode {
            Mode::Head => 0,
            Mode::Tail => buf.data.len().saturating_sub(buf.cap),
        };
        buf.data[start..].to_vec()
    }

    /// The last `n` bytes kept.
    pub(crate) fn last(&self, n: usize) -> Vec<u8> {
        let buf = self.lock();
        let keep = match buf.mode {
            Mode::Head => n,
            Mode::Tail => n.min(buf.cap),
        };
        buf.data[buf.data.len().saturating_sub(keep)..].to_vec()
    }

    fn push(&self, bytes: &[u8]) -> Result<(), ()> {
        self.lock().write(bytes)
    }

    /// How many bytes this capture keeps.
    pub(crate) fn cap(&self) -> usize {
        self.lock().cap
    }

    fn overflow_message(&self) -> String {
        format!("output exceeded {} bytes", self.cap())
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes)
            .map_err(|()| StreamError::LastOperationFailed(wasmtime::format_err!("{}", self.overflow_message())))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Never report 0 ("not ready"): that would make a blocking write wait
        // forever. A full head capture refuses the write itself.
        if self.overflowed() {
            Err(StreamError::Closed)
        } else {
            Ok(PERMIT)
        }
    }
}

impl AsyncWrite for Capture {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(match self.push(buf) {
            Ok(()) => Ok(buf.len()),
            Err(()) => Err(io::Error::new(io::ErrorKind::StorageFull, self.overflow_message())),
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_keeps_the_first_bytes_and_refuses_overflow() {
        let c = Capture::head(5);
        assert!(c.push(b"abc").is_ok());
        assert!(c.push(b"def").is_err());
        assert!(c.overflowed());
        assert!(c.push(b"g").is_err(), "once overflowed, always refused");
        assert_eq!(c.contents(), b"abc");
        assert_eq!(c.last(2), b"bc");
    }

    #[test]
    fn head_accepts_exactly_cap_bytes() {
        let c = Capture::head(4);
        assert!(c.push(b"ab").is_ok());
        assert!(c.push(b"cd").is_ok());
        assert!(!c.overflowed());
        assert_eq!(c.contents(), b"abcd");
    }

    #[test]
    fn tail_keeps_the_last_bytes() {
        let c = Capture::tail(4);
        for chunk in [&b"hello "[..], b"world", b"!", b"0123456789"] {
            assert!(c.push(chunk).is_ok());
        }
        assert_eq!(c.contents(), b"6789");
        let c = Capture::tail(4);
        for b in b"abcdefghijk" {
            assert!(c.push(&[*b]).is_ok());
        }
        assert_eq!(c.contents(), b"hijk");
        assert_eq!(c.last(2), b"jk");
        assert!(!c.overflowed());
    }
}
