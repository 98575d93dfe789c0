//! Hard bounds on everything that enters the system. Checked at decode and at
//! apply, so no client can make a peer allocate without limit.

/// Longest stream name, in bytes.
pub const MAX_STREAM_NAME: usize = 64;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;
/// Largest job input (stdin), in bytes.
pub const MAX_INPUT_BYTES: usize = 1 << 20;
/// Largest job result (stdout) kept, in bytes.
pub const MAX_RESULT_BYTES: usize = 1 << 20;
/// Largest stdout/stderr tail kept with a job, in bytes.
pub const MAX_TAIL_BYTES: usize = 16 << 10;
/// Largest wasm module, in bytes.
pub const MAX_MODULE_BYTES: usize = 32 << 20;
/// Most arguments plus environment variables of one job.
pub const MAX_ARGS: usize = 256;
/// Longest single argument, environment name or value, in bytes.
pub const MAX_ARG_BYTES: usize = 4096;
/// Most items (jobs, leases, completions, sub-commands) in one batch command.
pub const MAX_BATCH: usize = 10_000;
/// Largest data-store key, in bytes.
pub const MAX_DATA_KEY: usize = 1024;
/// Largest data-store value, in bytes.
pub const MAX_DATA_VALUE: usize = 1 << 20;
/// Longest text field of an error record, in bytes.
pub const MAX_ERROR_TEXT: usize = 4096;
/// Most pinned or ignored peers of one stream, and labels of one peer.
pub const MAX_PEER_LIST: usize = 256;
/// Largest encoded command or message accepted from the network, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 48 << 20;
