//! Versioned encoding of everything that crosses the network or the disk.
//!
//! Format: one version byte, then postcard. Decoding checks the version, the
//! size limit, the postcard structure, and then every rule of the vocabulary
//! ([`Command::validate`]), so bytes from outside become either a valid value
//! or a [`DecodeError`] that names the problem. Never a panic.

use std::collections::BTreeSet;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::command::Command;
use crate::error::{DecodeError, InvalidInput};
use crate::limits;

thread_local! {
    /// postcard drops the text of a serde custom error; the validating
    /// `TryFrom` impls leave theirs here so [`decode`] can name the problem.
    static LAST_INVALID: std::cell::RefCell<Option<InvalidInput>> = const { std::cell::RefCell::new(None) };
}

pub(crate) fn remember_invalid(e: &InvalidInput) {
    LAST_INVALID.with(|l| *l.borrow_mut() = Some(e.clone()));
}

/// Most batches inside batches a decoder follows. Derived serde recursion
/// has no bound of its own: a frame of a few hundred KB of batches nested
/// in batches would overflow the decoding thread's stack (an abort, not an
/// error). The vocabulary nests two deep at most (the outcome of a
/// `SubmitRan` in a batch's), so a bound of four refuses only forgeries.
pub const MAX_NESTING: u32 = 4;

thread_local! {
    /// How many batches the decoder on this thread is inside.
    static NESTING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The items of a batch (`Command::Batch`, `Outcome::Batch`), bounded in
/// length like any list ([`BoundedList`]) and in depth: a batch deeper than
/// [`MAX_NESTING`] is refused while decoding, by name.
fn bounded_nesting<'de, D, L>(d: D, what: &'static str, max: usize) -> Result<L, D::Error>
where
    D: Deserializer<'de>,
    L: BoundedList<'de>,
{
    struct Restore(u32);
    impl Drop for Restore {
        fn drop(&mut self) {
            NESTING.set(self.0);
        }
    }
    let depth = NESTING.get();
    if depth >= MAX_NESTING {
        return Err(refuse(InvalidInput::Value {
            what: "batch",
            reason: format!("batches nested more than {MAX_NESTING} deep"),
        }));
    }
    NESTING.set(depth + 1);
    let _restore = Restore(depth);
    L::deserialize_bounded(d, what, max)
}

/// A serde error for `e`, left for [`decode`] to name.
fn refuse<E: de::Error>(e: InvalidInput) -> E {
    remember_invalid(&e);
    E::custom(e)
}

/// A list whose length is bounded while it is decoded, not after: an item
/// can take far more memory than its bytes on the wire (a `Command::Tick`
/// is one byte, a `Command` many times that), so a frame within
/// [`limits::MAX_MESSAGE_BYTES`] could otherwise claim gigabytes. A length
/// over the bound is refused before any item is read when the decoder tells
/// it (postcard does, unless it claims more items than bytes are left),
/// else at the first item past the bound; no more than the bound is
/// allocated ahead of the items.
pub(crate) trait BoundedList<'de>: Sized {
    fn deserialize_bounded<D: Deserializer<'de>>(d: D, what: &'static str, max: usize) -> Result<Self, D::Error>;
}

/// The collections a [`BoundedSeq`] fills.
trait Collect<T> {
    fn with_capacity(n: usize) -> Self;
    fn add(&mut self, item: T);
}

impl<T> Collect<T> for Vec<T> {
    fn with_capacity(n: usize) -> Self {
        Vec::with_capacity(n)
    }
    fn add(&mut self, item: T) {
        self.push(item);
    }
}

impl<T: Ord> Collect<T> for BTreeSet<T> {
    fn with_capacity(_: usize) -> Self {
        BTreeSet::new()
    }
    fn add(&mut self, item: T) {
        self.insert(item);
    }
}

struct BoundedSeq<C, T> {
    what: &'static str,
    max: usize,
    out: PhantomData<fn() -> (C, T)>,
}

impl<'de, C: Collect<T>, T: Deserialize<'de>> Visitor<'de> for BoundedSeq<C, T> {
    type Value = C;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} of at most {} items", self.what, self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<C, A::Error> {
        let hint = seq.size_hint();
        if let Some(len) = hint.filter(|&len| len > self.max) {
            return Err(refuse(InvalidInput::TooLarge { what: self.what, len, max: self.max }));
        }
        // What the bound allows, and no more than 1 MiB ahead of the items
        // that fill it (as serde's own `Vec` does).
        let ahead = (1 << 20) / std::mem::size_of::<T>().max(1);
        let mut out = C::with_capacity(hint.unwrap_or(0).min(ahead));
        let mut len = 0;
        while let Some(item) = seq.next_element()? {
            len += 1;
            if len > self.max {
                return Err(refuse(InvalidInput::TooLarge { what: self.what, len, max: self.max }));
            }
            out.add(item);
        }
        Ok(out)
    }
}

impl<'de, T: Deserialize<'de>> BoundedList<'de> for Vec<T> {
    fn deserialize_bounded<D: Deserializer<'de>>(d: D, what: &'static str, max: usize) -> Result<Self, D::Error> {
        d.deserialize_seq(BoundedSeq { what, max, out: PhantomData })
    }
}

impl<'de, T: Deserialize<'de> + Ord> BoundedList<'de> for BTreeSet<T> {
    fn deserialize_bounded<D: Deserializer<'de>>(d: D, what: &'static str, max: usize) -> Result<Self, D::Error> {
        d.deserialize_seq(BoundedSeq { what, max, out: PhantomData })
    }
}

/// An optional list (a [`crate::records::StreamPatch`]'s): bounded when present.
impl<'de, L: BoundedList<'de>> BoundedList<'de> for Option<L> {
    fn deserialize_bounded<D: Deserializer<'de>>(d: D, what: &'static str, max: usize) -> Result<Self, D::Error> {
        struct Maybe<L> {
            what: &'static str,
            max: usize,
            out: PhantomData<fn() -> L>,
        }
        impl<'de, L: BoundedList<'de>> Visitor<'de> for Maybe<L> {
            type Value = Option<L>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an optional {} of at most {} items", self.what, self.max)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                L::deserialize_bounded(d, self.what, self.max).map(Some)
            }
        }
        d.deserialize_option(Maybe { what, max, out: PhantomData })
    }
}

fn bounded_length<'de, D, L>(d: D, what: &'static str, max: usize) -> Result<L, D::Error>
where
    D: Deserializer<'de>,
    L: BoundedList<'de>,
{
    L::deserialize_bounded(d, what, max)
}

/// `deserialize_with` functions, one per list that arrives from outside
/// (client and worker requests, Raft log entries, outcomes in replies),
/// each with the name and the bound its `validate` checks (which still
/// does, after decoding).
pub(crate) mod bounded {
    use super::{bounded_length, bounded_nesting, BoundedList, Deserializer};
    use crate::limits;

    macro_rules! bounded_lists {
        ($($name:ident = $how:ident($what:literal, $max:ident);)*) => {$(
            #[doc = concat!("`deserialize_with` for the ", $what, ": at most [`limits::", stringify!($max), "`] items.")]
            pub(crate) fn $name<'de, D, L>(d: D) -> Result<L, D::Error>
            where
                D: Deserializer<'de>,
                L: BoundedList<'de>,
            {
                $how(d, $what, limits::$max)
            }
        )*};
    }

    bounded_lists! {
        command_batch = bounded_nesting("command batch", MAX_BATCH);
        outcome_batch = bounded_nesting("outcome batch", MAX_BATCH);
        submit_batch = bounded_length("submit batch", MAX_BATCH);
        ran_jobs = bounded_length("ran jobs", MAX_BATCH);
        lease_streams = bounded_length("lease streams", MAX_BATCH);
        lease_list = bounded_length("lease list", MAX_BATCH);
        completion_batch = bounded_length("completion batch", MAX_BATCH);
        failure_batch = bounded_length("failure batch", MAX_BATCH);
        submitted_jobs = bounded_length("submitted jobs", MAX_BATCH);
        lease_grants = bounded_length("lease grants", MAX_BATCH);
        renewal_results = bounded_length("renewal results", MAX_BATCH);
        completion_results = bounded_length("completion results", MAX_BATCH);
        failure_results = bounded_length("failure results", MAX_BATCH);
        release_results = bounded_length("release results", MAX_BATCH);
        worker_commands = bounded_length("worker commands", MAX_BATCH);
        worker_outcomes = bounded_length("worker outcomes", MAX_BATCH);
        job_status_list = bounded_length("job status list", MAX_BATCH);
        job_list = bounded_length("job list", MAX_BATCH);
        running_jobs = bounded_length("running jobs", MAX_BATCH);
        args_and_env = bounded_length("arguments and environment", MAX_ARGS);
        peer_addresses = bounded_length("peer addresses", MAX_BATCH);
        peer_labels = bounded_length("peer labels", MAX_PEER_LIST);
        pin_list = bounded_length("pin list", MAX_PEER_LIST);
        ignore_list = bounded_length("ignore list", MAX_PEER_LIST);
    }
}

/// Version of the command encoding (Raft log entries, client requests).
/// 2: a `PeerInfo` carries its `Seat`; 3: `StreamProps` and `StreamPatch`
/// carry `retain_ms`. A peer refuses a log of another version by name
/// instead of misreading it.
pub const COMMAND_VERSION: u8 = 3;
/// Version of the state-machine snapshot encoding. 2: a `PeerRecord`
/// carries its idle slots per stream, its `PeerInfo` its `Seat`. 3: a
/// stream carries its last grant's token (the lease order's tie-break). 4:
/// its properties carry `retain_ms` and its stats `forgotten_total`, and
/// the job table is its jobs with the runs of empty slots between them
/// (forgotten ids take no room).
pub const SNAPSHOT_VERSION: u8 = 4;

/// Encode a value as `[version, postcard...]`.
pub fn encode<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let out = vec![version];
    // Serializing our own in-memory types into a Vec cannot fail: postcard
    // only errors on unsupported serde features, which our types do not use.
    match postcard::to_extend(value, out) {
        Ok(v) => v,
        Err(e) => panic!("postcard failed to serialize an impetus type: {e}"),
    }
}

/// Decode `[version, postcard...]`, refusing another version, trailing bytes
/// and anything over `max` bytes.
pub fn decode<T: DeserializeOwned>(
    what: &'static str,
    version: u8,
    bytes: &[u8],
    max: usize,
) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge { len: bytes.len(), max });
    }
    let (&found, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if found != version {
        return Err(DecodeError::Version { what, found, expected: version });
    }
    LAST_INVALID.with(|l| l.borrow_mut().take());
    let (value, rest) = postcard::take_from_bytes(body).map_err(|source| {
        match (&source, LAST_INVALID.with(|l| l.borrow_mut().take())) {
            (postcard::Error::SerdeDeCustom, Some(invalid)) => DecodeError::Invalid { what, source: invalid },
            _ => DecodeError::Malformed { what, source },
        }
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed { what, source: postcard::Error::DeserializeBadEncoding });
    }
    Ok(value)
}

pub fn encode_command(cmd: &Command) -> Vec<u8> {
    encode(COMMAND_VERSION, cmd)
}

/// Decode and validate a command from untrusted bytes.
pub fn decode_command(bytes: &[u8]) -> Result<Command, DecodeError> {
    let cmd: Command = decode("command", COMMAND_VERSION, bytes, limits::MAX_MESSAGE_BYTES)?;
    cmd.validate().map_err(|source| DecodeError::Invalid { what: "command", source })?;
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{NewJob, Outcome};
    use crate::ids::{ModuleHash, StreamName};
    use crate::records::JobSpec;
    use proptest::prelude::*;

    fn submit() -> Command {
        Command::Submit {
            stream: StreamName::new("s1").unwrap(),
            jobs: vec![NewJob {
                module: ModuleHash::of(b"m"),
                spec: JobSpec { args: vec!["3".into()], env: vec![], input: b"3".to_vec() },
                priority: Some(5),
                delay_ms: 0,
                key: None,
            }],
        }
    }

    #[test]
    fn commands_round_trip() {
        let cmd = submit();
        assert_eq!(decode_command(&encode_command(&cmd)).unwrap(), cmd);
    }

    /// Entries on disk outlive a build: a command's bytes never change
    /// meaning (variants are encoded by position; new ones go last).
    #[test]
    fn the_bytes_of_a_command_keep_their_meaning() {
        let lease = Command::Lease { peer: crate::PeerId(7), streams: vec![StreamName::new("s").unwrap()], max: 3 };
        let batch = Command::Batch(vec![Command::Tick, submit()]);
        let hex = |c: &Command| encode_command(c).iter().map(|b| format!("{b:02x}")).collect::<String>();
        expect_test::expect![[r#"
            [
                "03060701017303",
                "03150200050273310183d9dab06011479163c7c4d5fa735f911bac86729f56aaa115b7eed2eb66e022010133000133010a0000",
            ]
        "#]]
        .assert_debug_eq(&[hex(&lease), hex(&batch)]);
    }

    #[test]
    fn malformed_bytes_are_named_errors() {
        let good = encode_command(&submit());
        let mut wrong_version = good.clone();
        wrong_version[0] = 9;
        let mut trailing = good.clone();
        trailing.push(0);
        let cases: Vec<String> = [&[][..], &wrong_version, &good[..good.len() - 1], &trailing]
            .iter()
            .map(|b| decode_command(b).unwrap_err().to_string())
            .collect();
        expect_test::expect![[r#"
            [
                "empty message: expected a version byte",
                "unsupported command version 9 (this build speaks version 3)",
                "malformed command: Hit the end of buffer, expected more data",
                "malformed command: The original data was not well encoded",
            ]
        "#]]
        .assert_debug_eq(&cases);
    }

    #[test]
    fn invalid_stream_name_inside_a_command_is_refused() {
        // Build the bytes of a CreateStream by hand with a bad name.
        #[derive(serde::Serialize)]
        enum Shadow {
            #[allow(dead_code)]
            Tick,
            CreateStream {
                name: String,
                props: crate::records::StreamProps,
            },
        }
        let bytes =
            encode(COMMAND_VERSION, &Shadow::CreateStream { name: "no spaces".into(), props: Default::default() });
        let err = decode_command(&bytes).unwrap_err().to_string();
        assert!(err.contains("invalid stream name \"no spaces\""), "{err}");
    }

    /// Batches nested far deeper than the stack could follow are refused
    /// by name while decoding, not followed until the thread aborts.
    #[test]
    fn deeply_nested_batches_are_refused_not_followed() {
        // `Batch([Batch([])])` shows the bytes of a batch of one batch.
        let two = encode_command(&Command::Batch(vec![Command::Batch(vec![])]));
        let (version, tag) = (two[0], two[1]);
        assert_eq!(&two[..], &[version, tag, 1, tag, 0], "a batch is its tag, a length, then its items");
        let mut deep = vec![version];
        for _ in 0..200_000 {
            deep.extend([tag, 1]);
        }
        deep.extend([tag, 0]);
        let err = decode_command(&deep).unwrap_err().to_string();
        assert_eq!(err, format!("invalid command: invalid batch: batches nested more than {MAX_NESTING} deep"));
        // Decoding goes on as before afterwards, on this thread too.
        assert_eq!(decode_command(&encode_command(&submit())).unwrap(), submit());
        let err = decode_command(&two).unwrap_err().to_string();
        assert_eq!(err, "invalid command: invalid command batch: batches do not nest", "validate's rule, as before");
        // An outcome nests two deep (a SubmitRan's in a batch's): it decodes.
        let outcome = Outcome::Batch(vec![Ok(Outcome::Batch(vec![Ok(Outcome::Ticked)]))]);
        let back: Outcome = decode("outcome", 1, &encode(1, &outcome), usize::MAX).unwrap();
        assert_eq!(back, outcome);
    }

    /// postcard's length prefix (LEB128).
    fn varint(mut n: usize, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push(n as u8 | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    /// A batch of 50 million Ticks fits in one frame (a Tick is one byte)
    /// but would take gigabytes as commands: it is refused by its length
    /// before its items are read. A length longer than the bytes left
    /// (postcard gives no hint then) is refused at the first item past the
    /// bound, or at the end of the bytes.
    #[test]
    fn a_batch_of_fifty_million_ticks_is_refused_at_once() {
        let one = encode_command(&Command::Batch(vec![Command::Tick]));
        let (version, tag) = (one[0], one[1]);
        assert_eq!(one, [version, tag, 1, 0], "a batch is its tag, a length, then its items");
        let (n, max) = (50_000_000, limits::MAX_BATCH);
        let batch = |ticks: usize| {
            let mut b = vec![version, tag];
            varint(n, &mut b);
            b.resize(b.len() + ticks, 0);
            b
        };
        let too_large = |len: usize| {
            Ok(format!("invalid command: command batch is too large: {len} bytes/items, the limit is {max}"))
        };
        for (bytes, want) in [
            (batch(max + 1), too_large(max + 1)),
            (batch(n), too_large(n)),
            (batch(1), Err("malformed command: Hit the end of buffer, expected more data".to_owned())),
        ] {
            assert!(bytes.len() <= limits::MAX_MESSAGE_BYTES, "within the frame limit");
            let start = std::time::Instant::now();
            let err = decode_command(&bytes).unwrap_err();
            assert!(start.elapsed() < std::time::Duration::from_secs(1), "{:?}", start.elapsed());
            let err = match err {
                DecodeError::Invalid { .. } => Ok(err.to_string()),
                _ => Err(err.to_string()),
            };
            assert_eq!(err, want);
        }
        // The same in a worker's request: its commands come after its peer.
        let req = crate::api::WorkRequest {
            peer: crate::PeerId(4),
            cmds: vec![],
            lease_max: 0,
            release_orphans: false,
            reconcile: None,
        };
        let empty = crate::api::encode_request(&crate::api::ClientRequest::Work(req));
        assert_eq!(empty[2..], [4, 0, 0, 0, 0], "peer, no commands, lease_max, release_orphans, reconcile");
        let mut work = empty[..3].to_vec();
        varint(n, &mut work);
        work.resize(work.len() + n, 0);
        let err = crate::api::decode_request(&work).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("invalid client request: worker commands is too large: {n} bytes/items, the limit is {max}")
        );
    }

    /// Each bounded list decodes at its bound and is refused one past it,
    /// by the decoder itself (no `validate`), by the name `validate` uses.
    #[test]
    fn lists_decode_at_their_bound_and_are_refused_past_it() {
        fn raw<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) -> Result<(), String> {
            let back: T =
                decode("value", 1, &encode(1, value), limits::MAX_MESSAGE_BYTES).map_err(|e| e.to_string())?;
            assert_eq!(&back, value);
            Ok(())
        }
        fn too_large(what: &str, max: usize) -> Result<(), String> {
            Err(format!("invalid value: {what} is too large: {} bytes/items, the limit is {max}", max + 1))
        }
        let peers = |n: usize| (0..n as u64).map(crate::PeerId).collect::<std::collections::BTreeSet<_>>();
        let stream = || StreamName::new("s").unwrap();
        let args = |n: usize| JobSpec { args: vec![String::new(); n], ..JobSpec::default() };
        let env = |n: usize| JobSpec { env: vec![(String::new(), String::new()); n], ..JobSpec::default() };
        let pin = |n| Command::CreateStream {
            name: stream(),
            props: crate::records::StreamProps { pin: peers(n), ..Default::default() },
        };
        let patch = |n| Command::UpdateStream {
            name: stream(),
            patch: crate::records::StreamPatch { ignore: Some(peers(n)), ..Default::default() },
        };
        let labels = |n| crate::records::PeerInfo { labels: vec![String::new(); n], ..Default::default() };
        let renew =
            |n| Command::Renew { peer: crate::PeerId(1), leases: vec![(crate::JobId(1), crate::FencingToken(1)); n] };
        let completed = |n| Outcome::Completed(vec![Ok(()); n]);
        let (peer_list, args_max, batch) = (limits::MAX_PEER_LIST, limits::MAX_ARGS, limits::MAX_BATCH);
        for (at, over, want) in [
            (raw(&args(args_max)), raw(&args(args_max + 1)), too_large("arguments and environment", args_max)),
            (raw(&env(args_max)), raw(&env(args_max + 1)), too_large("arguments and environment", args_max)),
            (raw(&pin(peer_list)), raw(&pin(peer_list + 1)), too_large("pin list", peer_list)),
            (raw(&patch(peer_list)), raw(&patch(peer_list + 1)), too_large("ignore list", peer_list)),
            (raw(&labels(peer_list)), raw(&labels(peer_list + 1)), too_large("peer labels", peer_list)),
            (raw(&renew(batch)), raw(&renew(batch + 1)), too_large("lease list", batch)),
            (raw(&completed(batch)), raw(&completed(batch + 1)), too_large("completion results", batch)),
        ] {
            assert_eq!(at, Ok(()));
            assert_eq!(over, want);
        }
        // An absent optional list decodes as before.
        raw(&patch(0)).unwrap();
        raw(&Command::UpdateStream { name: stream(), patch: Default::default() }).unwrap();
    }

    #[test]
    fn over_large_input_is_refused() {
        let mut cmd = submit();
        if let Command::Submit { jobs, .. } = &mut cmd {
            jobs[0].spec.input = vec![0; limits::MAX_INPUT_BYTES + 1];
        }
        let err = decode_command(&encode_command(&cmd)).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "invalid command: job input is too large: {} bytes/items, the limit is {}",
                limits::MAX_INPUT_BYTES + 1,
                limits::MAX_INPUT_BYTES
            )
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]
        /// Fuzz-style: random bytes never panic the decoder.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_command(&bytes);
            let mut versioned = bytes.clone();
            versioned.insert(0, COMMAND_VERSION);
            let _ = decode_command(&versioned);
        }

        /// Mutating a valid encoding never panics the decoder either.
        #[test]
        fn mutated_commands_never_panic(pos in any::<usize>(), byte in any::<u8>()) {
            let mut b = encode_command(&submit());
            let i = pos % b.len();
            b[i] = byte;
            if let Ok(cmd) = decode_command(&b) {
                prop_assert!(cmd.validate().is_ok());
            }
        }
    }

    /// Byte fields are written as one block (`serde_bytes`), which in
    /// postcard is the same bytes as a sequence of `u8`: logs, snapshots
    /// and peers from before read the same.
    #[test]
    fn byte_fields_encode_as_a_plain_sequence_of_bytes() {
        #[derive(serde::Serialize)]
        struct Plain {
            args: Vec<String>,
            env: Vec<(String, String)>,
            input: Vec<u8>,
        }
        let spec = JobSpec { args: vec!["a".into()], env: vec![], input: vec![0, 1, 127, 128, 200, 255] };
        let plain = Plain { args: spec.args.clone(), env: vec![], input: spec.input.clone() };
        assert_eq!(encode(1, &spec), encode(1, &plain));
        let back: JobSpec = postcard::from_bytes(&encode(1, &plain)[1..]).unwrap();
        assert_eq!(back, spec);
    }
}
