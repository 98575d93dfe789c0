//! The `impetus` binary: the peer and the command line. See `impetus --help`
//! and README.md; the commands live in `cli/`.
use clap::Parser as _;

mod cli;

fn main() -> std::process::ExitCode {
    cli::main(cli::Cli::parse())
}
