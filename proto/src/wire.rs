//! Versioned encoding of everything that crosses the network or the disk.
//!
//! Format: one version byte, then postcard. Decoding checks the version, the
//! size limit, the postcard structure, and then every rule of the vocabulary
//! ([`Command::validate`]), so bytes from outside become either a valid value
//! or a [`DecodeError`] that names the problem. Never a panic.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::command::Command;
use crate::error::DecodeError;
use crate::limits;

thread_local! {
    /// postcard drops the text of a serde custom error; the validating
    /// `TryFrom` impls leave theirs here so [`decode`] can name the problem.
    static LAST_INVALID: std::cell::RefCell<Option<crate::error::InvalidInput>> = const { std::cell::RefCell::new(None) };
}

pub(crate) fn remember_invalid(e: &crate::error::InvalidInput) {
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

/// `deserialize_with` for the items of a batch (`Command::Batch`,
/// `Outcome::Batch`): refuses a batch deeper than [`MAX_NESTING`] while
/// decoding, by name.
pub(crate) fn bounded_nesting<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    struct Restore(u32);
    impl Drop for Restore {
        fn drop(&mut self) {
            NESTING.set(self.0);
        }
    }
    let depth = NESTING.get();
    if depth >= MAX_NESTING {
        let e = crate::error::InvalidInput::Value {
            what: "batch",
            reason: format!("batches nested more than {MAX_NESTING} deep"),
        };
        remember_invalid(&e);
        return Err(serde::de::Error::custom(e));
    }
    NESTING.set(depth + 1);
    let _restore = Restore(depth);
    <Vec<T> as serde::Deserialize>::deserialize(d)
}

/// Version of the command encoding (Raft log entries, client requests).
/// 2: a `PeerInfo` carries its `Seat`. A peer refuses a log of another
/// version by name instead of misreading it.
pub const COMMAND_VERSION: u8 = 2;
/// Version of the state-machine snapshot encoding. 2: a `PeerRecord`
/// carries its idle slots per stream, its `PeerInfo` its `Seat`.
pub const SNAPSHOT_VERSION: u8 = 2;

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
                "02060701017303",
                "02150200050273310183d9dab06011479163c7c4d5fa735f911bac86729f56aaa115b7eed2eb66e022010133000133010a0000",
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
                "unsupported command version 9 (this build speaks version 2)",
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
