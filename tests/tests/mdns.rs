//! Two real `impetus` peers, each in its own network namespace joined by a
//! veth pair, started with no `--join`: they must find each other by mDNS
//! and form ONE Raft cluster. libp2p's mDNS never runs on loopback, hence
//! the namespaces; they also keep every packet off the machine's real
//! interfaces. Needs root (it creates namespaces); without them it fails
//! saying so.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use impetus_tests::{impetus_bin, wait_for};
use serde_json::Value;

/// Time the peers get to discover each other, elect a leader and agree.
const CLUSTER_LIMIT: Duration = Duration::from_secs(60);
/// Bound on one CLI command or `ip` invocation.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);
const PORT: u16 = 7420;

fn ip_bin() -> &'static str {
    if Path::new("/usr/sbin/ip").exists() {
        "/usr/sbin/ip"
    } else {
        "ip"
    }
}

/// What a bounded command printed, and whether it succeeded.
struct Ran {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
}

/// Run `cmd` to completion, killing it after `limit`.
fn run_bounded(cmd: Command, limit: Duration) -> std::io::Result<Ran> {
    let r = impetus_tests::run_bounded(cmd, limit)?;
    let (stdout, stderr) =
        (String::from_utf8_lossy(&r.stdout).into_owned(), String::from_utf8_lossy(&r.stderr).into_owned());
    Ok(match r.status {
        Some(s) => Ran { ok: s.success(), status: s.to_string(), stdout, stderr },
        None => Ran { ok: false, status: format!("killed after {limit:?}"), stdout, stderr },
    })
}

/// Run `ip ARGS`; panic with `what` and `ip`'s output if it fails.
#[track_caller]
fn ip(args: &[&str], what: &str) {
    let mut cmd = Command::new(ip_bin());
    cmd.args(args);
    let r = run_bounded(cmd, COMMAND_LIMIT).unwrap_or_else(|e| panic!("{what}: could not run {}: {e}", ip_bin()));
    assert!(r.ok, "{what}: `ip {}` failed ({}): {}{}", args.join(" "), r.status, r.stdout, r.stderr);
}

/// One peer process, started inside a namespace.
struct Peer {
    ns: String,
    addr: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Peer {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        format!("--- last log lines of the peer at {} in {} ({}) ---\n{tail}", self.addr, self.ns, self.log.display())
    }

    /// `impetus --peer ADDR ARGS...`, run inside this peer's namespace.
    fn cli(&self, args: &[&str]) -> Ran {
        let mut cmd = Command::new(ip_bin());
        cmd.args(["netns", "exec", &self.ns]).arg(impetus_bin()).args(["--peer", &self.addr]).args(args);
        run_bounded(cmd, COMMAND_LIMIT).expect("running the impetus CLI through `ip netns exec`")
    }

    /// Panic (with the log) if the process has exited.
    fn assert_running(&mut self) {
        let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            panic!("the peer at {} exited early ({status})\n{}", self.addr, self.log_tail());
        }
    }
}

/// The namespaces, veth pair and peer processes of one test. Dropping it
/// (also while a failed assertion unwinds) kills the peers and deletes the
/// namespaces, which removes the veth pair with them.
struct Lab {
    namespaces: Vec<String>,
    peers: Vec<Peer>,
}

impl Lab {
    fn logs(&self) -> String {
        self.peers.iter().map(Peer::log_tail).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.peers {
            if let Some(mut child) = p.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for ns in &self.namespaces {
            let mut cmd = Command::new(ip_bin());
            cmd.args(["netns", "delete", ns]);
            match run_bounded(cmd, COMMAND_LIMIT) {
                Ok(r) if r.ok => {}
                Ok(r) => eprintln!("warning: could not delete network namespace {ns}: {}{}", r.stdout, r.stderr),
                Err(e) => eprintln!("warning: could not delete network namespace {ns}: {e}"),
            }
        }
    }
}

/// Set up two namespaces linked by a veth pair: `10.199.X.1/24` in the
/// first, `10.199.X.2/24` in the second. Fails clearly if namespaces are
/// not available.
fn lab() -> (Lab, [String; 2]) {
    let pid = std::process::id();
    let x = pid % 250 + 1;
    let ns = [format!("impetus-mdns-{pid}-a"), format!("impetus-mdns-{pid}-b")];
    let veth = [format!("imv{pid}a"), format!("imv{pid}b")];
    let ips = [format!("10.199.{x}.1"), format!("10.199.{x}.2")];
    let mut lab = Lab { namespaces: vec![], peers: vec![] };
    for n in &ns {
        let mut cmd = Command::new(ip_bin());
        cmd.args(["netns", "add", n]);
        let r = run_bounded(cmd, COMMAND_LIMIT);
        match r {
            Ok(r) if r.ok => lab.namespaces.push(n.clone()),
            Ok(r) => panic!(
                "network namespaces are unavailable: `{} netns add {n}` failed ({}): {}{}\n\
                 this test needs root (CAP_SYS_ADMIN) and iproute2 to create its own network namespaces",
                ip_bin(),
                r.status,
                r.stdout.trim(),
                r.stderr.trim()
            ),
            Err(e) => panic!(
                "network namespaces are unavailable: could not run `{} netns add {n}`: {e}\n\
                 this test needs root (CAP_SYS_ADMIN) and iproute2 to create its own network namespaces",
                ip_bin()
            ),
        }
    }
    // The veth pair is created with its ends already inside the namespaces:
    // it never appears in the machine's own namespace.
    ip(
        &["link", "add", &veth[0], "netns", &ns[0], "type", "veth", "peer", "name", &veth[1], "netns", &ns[1]],
        "creating the veth pair",
    );
    for i in 0..2 {
        ip(&["-n", &ns[i], "addr", "add", &format!("{}/24", ips[i]), "dev", &veth[i]], "addressing the veth");
        ip(&["-n", &ns[i], "link", "set", "dev", &veth[i], "multicast", "on"], "enabling multicast");
        ip(&["-n", &ns[i], "link", "set", "dev", &veth[i], "up"], "bringing the veth up");
        ip(&["-n", &ns[i], "link", "set", "dev", "lo", "up"], "bringing lo up");
    }
    (lab, ips)
}

/// Start `impetus peer` on `ip:PORT` inside `ns`, with no `--join`.
fn start_peer(lab: &mut Lab, ns: &str, ip: &str, data_dir: &Path) {
    let addr = format!("{ip}:{PORT}");
    let log = data_dir.with_extension("log");
    let log_file = std::fs::File::create(&log).expect("creating the peer's log file");
    let child = Command::new(ip_bin())
        .args(["netns", "exec", ns])
        .arg(impetus_bin())
        .args(["peer", "--listen", &addr, "--mdns", "on", "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "info,libp2p_mdns=debug,openraft=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawning `ip netns exec ... impetus peer`");
    lab.peers.push(Peer { ns: ns.to_owned(), addr, log, child: Some(child) });
}

/// A peer's `status --json`, if it answers.
fn status(p: &Peer) -> Option<Value> {
    let r = p.cli(&["status", "--json"]);
    if !r.ok {
        return None;
    }
    serde_json::from_str(&r.stdout).ok()
}

fn ids(v: &Value) -> BTreeSet<u64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

fn peer_ids(st: &Value) -> BTreeSet<u64> {
    st["peers"].as_array().map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect()).unwrap_or_default()
}

/// Both statuses describe one cluster of the two of them: two registered
/// peers, one leader both agree on, the same membership.
fn one_cluster(a: &Value, b: &Value) -> bool {
    let (Some(me_a), Some(me_b)) = (a["peer"].as_u64(), b["peer"].as_u64()) else { return false };
    let (Some(leader_a), Some(leader_b)) = (a["leader"].as_u64(), b["leader"].as_u64()) else { return false };
    let both: BTreeSet<u64> = [me_a, me_b].into();
    me_a != me_b
        && peer_ids(a) == both
        && peer_ids(b) == both
        && leader_a == leader_b
        && both.contains(&leader_a)
        && a["term"] == b["term"]
        && ids(&a["voters"]) == ids(&b["voters"])
        && ids(&a["learners"]) == ids(&b["learners"])
        && ids(&a["voters"]).contains(&leader_a)
}

#[test]
fn two_peers_without_join_find_each_other_by_mdns_and_form_one_cluster() {
    let bin = impetus_bin(); // build before the clock of any wait starts
    assert!(bin.exists());
    let dir = tempfile::tempdir().unwrap();
    let (mut lab, ips) = lab();
    let namespaces = lab.namespaces.clone();
    start_peer(&mut lab, &namespaces[0], &ips[0], &dir.path().join("a"));
    start_peer(&mut lab, &namespaces[1], &ips[1], &dir.path().join("b"));
    let started = Instant::now();

    let mut last = (None, None);
    let agreed = wait_for(CLUSTER_LIMIT, || {
        for p in &mut lab.peers {
            p.assert_running();
        }
        let a = status(&lab.peers[0]);
        let b = status(&lab.peers[1]);
        let done = matches!((&a, &b), (Some(a), Some(b)) if one_cluster(a, b));
        last = (a, b);
        done.then_some(())
    });
    let show = |v: &Option<Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "no answer".into());
    assert!(
        agreed.is_some(),
        "the two peers did not form one cluster within {CLUSTER_LIMIT:?}\n\
         last status via {}: {}\nlast status via {}: {}\n{}",
        lab.peers[0].addr,
        show(&last.0),
        lab.peers[1].addr,
        show(&last.1),
        lab.logs()
    );
    let (a, b) = (last.0.clone().unwrap(), last.1.clone().unwrap());
    eprintln!(
        "one cluster after {:?}: leader {}, term {}, voters {}, learners {}",
        started.elapsed(),
        a["leader"],
        a["term"],
        a["voters"],
        a["learners"]
    );
    assert_eq!(peer_ids(&a), peer_ids(&b));
    // They found each other by mDNS: nothing else told them where to look.
    assert!(
        lab.peers.iter().any(|p| std::fs::read_to_string(&p.log).unwrap_or_default().contains("found a peer by mDNS")),
        "neither peer logged an mDNS discovery\n{}",
        lab.logs()
    );

    // One replicated state: a stream created through the second peer is
    // listed by the first.
    let r = lab.peers[1].cli(&["stream", "create", "s1"]);
    assert!(
        r.ok,
        "`stream create s1` via {} failed ({}): {}{}\n{}",
        lab.peers[1].addr,
        r.status,
        r.stdout,
        r.stderr,
        lab.logs()
    );
    let mut listed = String::new();
    let seen = wait_for(Duration::from_secs(20), || {
        let r = lab.peers[0].cli(&["stream", "list", "--json"]);
        listed = format!("({}) {}{}", r.status, r.stdout, r.stderr);
        let v: Value = serde_json::from_str(&r.stdout).ok()?;
        v.as_array()?.iter().any(|s| s["name"] == "s1").then_some(())
    });
    assert!(
        seen.is_some(),
        "stream s1, created via {}, is not listed via {}; last answer: {listed}\n{}",
        lab.peers[1].addr,
        lab.peers[0].addr,
        lab.logs()
    );
    eprintln!("test done after {:?}", started.elapsed());
    if std::env::var_os("IMPETUS_TEST_SHOW_LOGS").is_some() {
        eprintln!("{}", lab.logs());
    }
}
