//! Reads an integer from the first argument, or from stdin if there is none,
//! and prints its square. Bad input: a message on stderr and exit code 2.
use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let text = match std::env::args().nth(1) {
        Some(arg) => arg,
        None => {
            let mut s = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                eprintln!("square: cannot read stdin: {e}");
                return ExitCode::from(2);
            }
            s
        }
    };
    let n: i128 = match text.trim().parse() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("square: {:?} is not an integer: {e}", text.trim());
            return ExitCode::from(2);
        }
    };
    match n.checked_mul(n) {
        Some(sq) => {
            println!("{sq}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("square: {n} squared overflows");
            ExitCode::from(2)
        }
    }
}
