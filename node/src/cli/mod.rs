//! The `impetus` command line: argument parsing (clap), logging, exit codes,
//! and one module per command. Every client command goes through the one
//! client implementation, [`impetus_sdk::Client`].

use std::fmt;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use impetus_sdk::{Client, ClientError};

mod demo;
mod jobs;
mod peer;
mod results;
mod status;
mod stream;
mod submit;
pub mod util;

/// Exit codes: what the shell sees.
pub mod exit {
    /// The command did what it was asked.
    pub const OK: u8 = 0;
    /// The command failed or was refused (a job ended Dead, a stream is missing, ...).
    pub const FAILED: u8 = 1;
    /// Bad usage or input (clap's own errors exit with 2 too).
    pub const USAGE: u8 = 2;
    /// No peer could be reached: nothing was sent.
    pub const UNREACHABLE: u8 = 3;
    /// The request went out but no answer came: it may have been carried
    /// out (a submit sent again without `--key` could run twice).
    pub const UNANSWERED: u8 = 4;
}

const AFTER_HELP: &str = "\
Exit codes: 0 ok, 1 the command failed (a job ended Dead, a refusal), 2 bad usage or input, \
3 no peer could be reached (nothing was sent), 4 the request went out but no answer came (it may have \
been carried out: look before sending it again, or use --key).

Start here:
  impetus demo                                   run the helloworld on a local 3-peer cluster
  impetus peer &                                 start a peer on 127.0.0.1:7420
  impetus stream create s1                       create a stream
  impetus submit job.wasm --stream s1 --input 7 --wait
  impetus status                                 the cluster console";

/// Impetus: a distributed job-processing cluster. Jobs are WebAssembly
/// (WASI command) modules; streams are replicated priority queues.
#[derive(Debug, Parser)]
#[command(name = "impetus", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// The peer to talk to: host:port or a multiaddr.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "IMPETUS_PEER",
        default_value = "127.0.0.1:7420",
        value_name = "ADDR"
    )]
    pub peer: String,
    /// The cluster's pre-shared key (private network); every peer and client must use the same.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "IMPETUS_AUTHKEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub authkey: Option<String>,
    /// Log format on stderr.
    #[arg(long, global = true, help_heading = "Global options", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More logs on stderr (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, help_heading = "Global options", action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Machine-readable JSON on stdout instead of text.
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a peer (in the foreground, or as a daemon with --daemon).
    Peer(peer::PeerArgs),
    /// Stop a peer started with `impetus peer --daemon`.
    Stop(peer::StopArgs),
    /// Submit jobs: one, or one per line of a file / per file of a directory.
    Submit(submit::SubmitArgs),
    /// Create, list, show, change, pause, resume and delete streams.
    #[command(subcommand)]
    Stream(stream::StreamCommand),
    /// List, show, cancel and retry jobs.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Write a stream's results to DIR/S.ok and its dead jobs to DIR/S.err (JSON lines).
    Results(results::ResultsArgs),
    /// The cluster console: peers, leader, streams, depths and rates.
    Status(status::StatusArgs),
    /// Run the helloworld: a local cluster of 3 peer processes, 100 jobs square(i), their total.
    Demo(demo::DemoArgs),
}

impl Command {
    /// Logs shown by default: a peer tells what it does, a client only warns.
    pub fn default_log_level(&self) -> &'static str {
        match self {
            // `impetus peer leave` is a client of the peer it asks.
            Command::Peer(p) if p.action.is_some() => "warn",
            Command::Peer(_) => "info",
            _ => "warn",
        }
    }
}

/// Set up logging on stderr: `RUST_LOG` if set, else the command's default
/// level raised by each `-v`.
pub fn init_logging(global: &Global, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let levels = ["error", "warn", "info", "debug", "trace"];
    let base = levels.iter().position(|l| *l == default_level).unwrap_or(1);
    let level = levels[(base + global.verbose as usize).min(levels.len() - 1)];
    // Raft's own info logs are chatty: quiet unless asked for with -v.
    let directives = if global.verbose == 0 { format!("{level},openraft=warn") } else { level.to_owned() };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match global.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Err(e) = result {
        eprintln!("warning: could not set up logging: {e}");
    }
}

/// Run a parsed command line; returns the exit code (errors are printed).
pub fn main(cli: Cli) -> ExitCode {
    init_logging(&cli.global, cli.command.default_log_level());
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code_of(&e))
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let g = cli.global;
    match cli.command {
        // These manage processes and build their own runtime, or none.
        Command::Peer(args) => peer::run(&g, args),
        Command::Stop(args) => peer::stop(&g, args),
        Command::Demo(args) => runtime()?.block_on(demo::run(&g, args)),
        Command::Submit(args) => runtime()?.block_on(submit::run(&g, args)),
        Command::Stream(cmd) => runtime()?.block_on(stream::run(&g, cmd)),
        Command::Jobs(cmd) => runtime()?.block_on(jobs::run(&g, cmd)),
        Command::Results(args) => runtime()?.block_on(results::run(&g, args)),
        Command::Status(args) => runtime()?.block_on(status::run(&g, args)),
    }
}

/// The runtime of client commands.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Bad usage or input found after parsing (a missing file, a bad line):
/// exits with [`exit::USAGE`].
#[derive(Debug)]
pub struct BadInput(pub String);

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Return a [`BadInput`] error.
#[macro_export]
macro_rules! bad_input {
    ($($t:tt)*) => { return Err(anyhow::Error::new($crate::cli::BadInput(format!($($t)*)))) };
}

/// The exit code of an error: 3 when no peer could be reached, 2 for bad
/// input, 1 otherwise.
pub fn exit_code_of(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.downcast_ref::<BadInput>().is_some() {
            return exit::USAGE;
        }
        if let Some(ce) = cause.downcast_ref::<ClientError>() {
            // Part submitted, the rest unanswered: the rest may be in too.
            let ce = match ce {
                ClientError::PartlySubmitted { error, .. } if matches!(**error, ClientError::Unanswered(_)) => error,
                other => other,
            };
            return match ce {
                ClientError::Connect { .. } | ClientError::Transport(_) => exit::UNREACHABLE,
                ClientError::Unanswered(_) => exit::UNANSWERED,
                ClientError::Invalid(_) => exit::USAGE,
                _ => exit::FAILED,
            };
        }
    }
    exit::FAILED
}

/// Connect to the peer of the global options.
pub async fn connect(g: &Global) -> anyhow::Result<Client> {
    Ok(Client::connect(&g.peer, g.authkey.as_deref()).await?)
}

/// Turn "stream S does not exist" into an error with the way out.
pub fn with_stream_hint(e: ClientError) -> anyhow::Error {
    let unknown = match &e {
        ClientError::UnknownStream(s) => Some(s.clone()),
        ClientError::Apply(impetus_proto::command::ApplyError::UnknownStream(s)) => Some(s.clone()),
        _ => None,
    };
    match unknown {
        Some(s) => anyhow::anyhow!("stream {s} does not exist; create it with `impetus stream create {s}`"),
        None => anyhow::Error::new(e),
    }
}

/// Print a value as pretty JSON on stdout.
pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v).context("encoding JSON")?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_anywhere() {
        let cli = Cli::try_parse_from(["impetus", "stream", "list", "--peer", "10.0.0.1:7420", "--json"]).unwrap();
        assert_eq!(cli.global.peer, "10.0.0.1:7420");
        assert!(cli.global.json);
        let cli = Cli::try_parse_from(["impetus", "-vv", "--log-format", "json", "status"]).unwrap();
        assert_eq!(cli.global.verbose, 2);
        assert_eq!(cli.global.log_format, LogFormat::Json);
        assert_eq!(cli.command.default_log_level(), "warn");
    }

    #[test]
    fn a_peer_logs_what_it_does_and_a_client_only_warns() {
        let level = |args: &[&str]| Cli::try_parse_from(args).unwrap().command.default_log_level();
        assert_eq!(level(&["impetus", "peer", "--listen", "127.0.0.1:7501"]), "info");
        assert_eq!(level(&["impetus", "peer", "leave"]), "warn", "`peer leave` is a client");
    }

    #[test]
    fn usage_errors_exit_with_2() {
        let err = Cli::try_parse_from(["impetus", "submit", "x.wasm"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["impetus", "frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn errors_map_to_exit_codes() {
        let unreachable =
            anyhow::Error::new(ClientError::Connect { addr: "x".into(), reason: "refused".into() }).context("status");
        assert_eq!(exit_code_of(&unreachable), exit::UNREACHABLE);
        let unanswered = anyhow::Error::new(ClientError::Unanswered("reset".into())).context("submit");
        assert_eq!(exit_code_of(&unanswered), exit::UNANSWERED, "it may have been carried out");
        let part = |error| ClientError::PartlySubmitted { submitted: vec![], total: 2, error: Box::new(error) };
        let partly = anyhow::Error::new(part(ClientError::Unanswered("reset".into())));
        assert_eq!(exit_code_of(&partly), exit::UNANSWERED, "the rest may be in too");
        let refused = anyhow::Error::new(part(ClientError::Transport("down".into())));
        assert_eq!(exit_code_of(&refused), exit::FAILED, "some are in: not 'nothing was sent'");
        let bad: anyhow::Error = anyhow::Error::new(BadInput("no such file".into())).context("reading x");
        assert_eq!(exit_code_of(&bad), exit::USAGE);
        let failed = anyhow::anyhow!("refused");
        assert_eq!(exit_code_of(&failed), exit::FAILED);
        let s = impetus_proto::ids::StreamName::new("s1").unwrap();
        let hinted = with_stream_hint(ClientError::UnknownStream(s));
        assert_eq!(format!("{hinted:#}"), "stream s1 does not exist; create it with `impetus stream create s1`");
        assert_eq!(exit_code_of(&hinted), exit::FAILED);
    }
}
