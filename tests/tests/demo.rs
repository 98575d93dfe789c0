//! `impetus demo`, the README's first command, through the real binary: it
//! starts 3 peer processes, runs the helloworld across them, prints the
//! total and who ran what, and stops them.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use impetus_tests::{impetus_bin, output_within, wasm};

#[test]
fn the_demo_runs_the_helloworld_on_three_local_peers() {
    let mut cmd = Command::new(impetus_bin());
    cmd.env_remove("IMPETUS_AUTHKEY").args(["demo", "--module"]).arg(wasm("square"));
    let out = output_within(cmd, Duration::from_secs(300)).unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the demo failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"Total: 328350"), "{stdout}");
    assert!(lines.contains(&"Errors: 0"), "{stdout}");
    assert_eq!(lines.iter().filter(|l| l.contains(": founds the cluster") || l.contains(": joins through")).count(), 3);
    // "peer-N ran K jobs": the 100 jobs, each counted once, by the peers
    // of this cluster only.
    let ran: BTreeMap<&str, u64> = lines
        .iter()
        .filter_map(|l| {
            let (peer, rest) = l.split_once(" ran ")?;
            Some((peer, rest.strip_suffix(" jobs")?.parse().ok()?))
        })
        .collect();
    assert!(!ran.is_empty() && ran.len() <= 3, "{ran:?}\n{stdout}");
    assert_eq!(ran.values().sum::<u64>(), 100, "{ran:?}");
    assert!(stdout.contains("3 peers stopped cleanly"), "{stdout}");
}
