//! Sleeps N milliseconds (first argument, else stdin, else 100), then prints "slept N".
use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let text = match std::env::args().nth(1) {
        Some(arg) => arg,
        None => {
            let mut s = String::new();
            let _ = std::io::stdin().read_to_string(&mut s);
            if s.trim().is_empty() {
                "100".to_owned()
            } else {
                s
            }
        }
    };
    let Ok(ms) = text.trim().parse::<u64>() else {
        eprintln!("sleep: {:?} is not a number of milliseconds", text.trim());
        return ExitCode::from(2);
    };
    std::thread::sleep(std::time::Duration::from_millis(ms));
    println!("slept {ms}");
    ExitCode::SUCCESS
}
