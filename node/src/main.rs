//! The `impetus` binary. The peer and the CLI arrive with the issue "One peer,
//! end to end"; until then it says so and exits non-zero.
fn main() -> std::process::ExitCode {
    eprintln!("impetus {}: the peer and CLI are not built yet (see README.md)", env!("CARGO_PKG_VERSION"));
    std::process::ExitCode::from(2)
}
