//! Exits with the code given as the first argument (default 3), saying so on stderr.
fn main() {
    let code: i32 = std::env::args().nth(1).and_then(|a| a.trim().parse().ok()).unwrap_or(3);
    eprintln!("exiting with {code}");
    std::process::exit(code);
}
