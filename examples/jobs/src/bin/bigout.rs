//! Writes N bytes of 'x' to stdout (first argument, default 10 MiB).
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let n: usize = match std::env::args().nth(1).map(|a| a.trim().parse()) {
        None => 10 << 20,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("bigout: bad byte count: {e}");
            return ExitCode::from(2);
        }
    };
    let block = vec![b'x'; 64 << 10];
    let mut out = std::io::stdout().lock();
    let mut left = n;
    while left > 0 {
        let k = left.min(block.len());
        if let Err(e) = out.write_all(&block[..k]) {
            eprintln!("bigout: write failed after {} bytes: {e}", n - left);
            return ExitCode::from(1);
        }
        left -= k;
    }
    if let Err(e) = out.flush() {
        eprintln!("bigout: flush failed: {e}");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
