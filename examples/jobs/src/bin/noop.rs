//! Does nothing and exits 0: measures the executor's per-job overhead.
fn main() {}
