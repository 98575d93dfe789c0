//! Prints its arguments ("arg: ...") and environment ("env: K=V"), one per line.
fn main() {
    for arg in std::env::args() {
        println!("arg: {arg}");
    }
    for (k, v) in std::env::vars() {
        println!("env: {k}={v}");
    }
}
