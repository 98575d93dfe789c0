//! Determinism: replicas that apply the same commands hold byte-identical
//! state, and a replica restored from a snapshot continues exactly like one
//! that never snapshotted; a frozen copy (`State::freeze`) keeps the bytes
//! of the moment it was taken.

mod common;

use common::{job, module, name, NOOP};
use impetus_proto::*;
use impetus_queue::State;
use proptest::prelude::*;

/// A stream's retention: none, short enough to forget jobs within a run,
/// or the default.
fn retain() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![Just(None), Just(Some(250)), Just(StreamProps::default().retain_ms)]
}

/// Raw commands, valid or not, over a small space of streams, jobs and peers.
fn command() -> impl Strategy<Value = Command> {
    let stream = prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(name);
    let jid = (0..40u64).prop_map(JobId);
    let peer = (1..4u64).prop_map(PeerId);
    let tok = (0..200u64).prop_map(FencingToken);
    prop_oneof![
        (stream.clone(), retain()).prop_map(|(name, retain_ms)| Command::CreateStream {
            name,
            props: StreamProps { lease_ttl_ms: 300, retry_backoff_ms: 20, retain_ms, ..StreamProps::default() }
        }),
        (stream.clone(), retain()).prop_map(|(name, retain_ms)| Command::UpdateStream {
            name,
            patch: StreamPatch { retain_ms: Some(retain_ms), ..StreamPatch::default() }
        }),
        (stream.clone(), 1..4usize, 0..3i32, prop_oneof![Just(0u64), Just(150)], proptest::option::of(0..5u8))
            .prop_map(|(stream, n, p, delay, key)| Command::Submit {
                stream,
                jobs: (0..n)
                    .map(|i| NewJob {
                        priority: Some(p),
                        delay_ms: delay,
                        key: key.map(|k| IdempotencyKey::new(format!("k{k}-{i}")).unwrap()),
                        ..job("in")
                    })
                    .collect()
            }),
        (peer.clone(), 1..6u32).prop_map(|(peer, max)| Command::Lease { peer, streams: vec![], max }),
        (peer.clone(), jid.clone(), tok.clone()).prop_map(|(peer, job, token)| Command::Complete {
            peer,
            completions: vec![Completion { job, token, result: b"ok".to_vec(), stderr_tail: vec![] }]
        }),
        (peer.clone(), jid.clone(), tok.clone()).prop_map(|(peer, job, token)| Command::Fail {
            peer,
            failures: vec![Failure {
                job,
                token,
                error: ErrorRecord::new(ErrorKind::Trap, "t"),
                stdout_tail: vec![],
                stderr_tail: vec![]
            }]
        }),
        (peer.clone(), jid.clone(), tok)
            .prop_map(|(peer, job, token)| Command::Renew { peer, leases: vec![(job, token)] }),
        jid.clone().prop_map(|job| Command::Cancel { job }),
        jid.prop_map(|job| Command::Retry { job }),
        (stream.clone(), any::<bool>()).prop_map(|(name, force)| Command::DeleteStream { name, force }),
        (stream.clone(), any::<u8>()).prop_map(|(stream, v)| Command::DataPut {
            stream,
            key: vec![v % 4],
            value: vec![v]
        }),
        (stream, prop_oneof![Just(0u64), Just(200)], 1..4u32).prop_map(|(stream, older_than_ms, max)| Command::Purge {
            stream,
            older_than_ms,
            max
        }),
        Just(Command::RegisterPeer { info: PeerInfo::default(), role: PeerRole::Worker }),
        peer.prop_map(|peer| Command::RemovePeer { peer }),
        Just(Command::Tick),
    ]
}

fn replay(state: &mut State, cmds: &[(u64, Command)], first_index: u64) -> Vec<ApplyResult> {
    cmds.iter()
        .enumerate()
        .map(|(i, (now, cmd))| {
            let out = state.apply(Stamp { index: first_index + i as u64, now: Timestamp(*now) }, cmd);
            state.check_invariants();
            out
        })
        .collect()
}

fn with_module() -> State {
    let mut s = State::new();
    s.apply(Stamp { index: 1, now: Timestamp(0) }, &Command::PutModule { hash: module(), bytes: NOOP.to_vec() })
        .unwrap();
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn replicas_agree_and_snapshots_continue_identically(
        steps in proptest::collection::vec((0..200u64, command()), 1..150),
        cut in any::<prop::sample::Index>(),
    ) {
        // Time moves forward in random steps.
        let mut now = 1_000;
        let cmds: Vec<(u64, Command)> = steps.into_iter().map(|(dt, c)| { now += dt; (now, c) }).collect();

        let mut a = with_module();
        let mut b = with_module();
        let out_a = replay(&mut a, &cmds, 2);
        let out_b = replay(&mut b, &cmds, 2);
        prop_assert_eq!(&out_a, &out_b);
        prop_assert_eq!(a.snapshot(), b.snapshot());

        // Snapshot part-way, restore, continue.
        let k = cut.index(cmds.len());
        let mut c = with_module();
        let out_head = replay(&mut c, &cmds[..k], 2);
        let at_cut = c.snapshot();
        let frozen = c.freeze();
        let mut restored = State::restore(&at_cut).expect("own snapshot restores");
        prop_assert_eq!(&restored, &c);
        let out_tail = replay(&mut restored, &cmds[k..], 2 + k as u64);
        // A frozen copy is what the snapshot was when it was taken, however
        // the state went on (its jobs, keys and data are shared until written).
        replay(&mut c, &cmds[k..], 2 + k as u64);
        prop_assert_eq!(frozen.snapshot(), at_cut);
        prop_assert_eq!(c.snapshot(), a.snapshot());
        prop_assert_eq!(out_head.into_iter().chain(out_tail).collect::<Vec<_>>(), out_a);
        prop_assert_eq!(restored.snapshot(), a.snapshot());
        prop_assert_eq!(restored, a);
    }
}

#[test]
fn a_corrupt_snapshot_is_a_clear_error() {
    let mut s = with_module();
    s.apply(
        Stamp { index: 2, now: Timestamp(5) },
        &Command::CreateStream { name: name("s"), props: StreamProps::default() },
    )
    .unwrap();
    let good = s.snapshot();
    assert_eq!(State::restore(&good).unwrap(), s);
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    let e = State::restore(&truncated).unwrap_err().to_string();
    assert!(e.starts_with("malformed snapshot"), "{e}");
    let mut wrong = good;
    wrong[0] = 77;
    assert_eq!(
        State::restore(&wrong).unwrap_err().to_string(),
        format!(
            "unsupported snapshot version 77 (this build speaks version {})",
            impetus_proto::wire::SNAPSHOT_VERSION
        )
    );
}

#[test]
fn a_snapshot_that_breaks_an_invariant_is_refused() {
    // A job whose module is missing: build it through the public API, then
    // drop the module from the encoded bytes by re-encoding without it.
    let mut s = with_module();
    s.apply(
        Stamp { index: 2, now: Timestamp(5) },
        &Command::CreateStream { name: name("s"), props: StreamProps::default() },
    )
    .unwrap();
    s.apply(Stamp { index: 3, now: Timestamp(5) }, &Command::Submit { stream: name("s"), jobs: vec![job("1")] })
        .unwrap();
    let bytes = s.snapshot();
    // The module bytes are the only occurrence of NOOP; corrupt its hash key
    // by flipping one byte of the stored hash.
    let hash = module().0;
    let pos = bytes.windows(32).rposition(|w| w == hash).expect("hash stored");
    let mut bad = bytes.clone();
    bad[pos] ^= 0xff;
    let e = State::restore(&bad).unwrap_err().to_string();
    assert!(e.contains("not stored"), "{e}");
}
