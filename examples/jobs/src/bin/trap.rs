//! Traps: executes the wasm `unreachable` instruction.
fn main() {
    eprintln!("about to trap");
    fail_here();
}

#[inline(never)]
fn fail_here() {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}
