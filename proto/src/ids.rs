//! Validated identifiers and names.
//!
//! Every name that enters the system from outside goes through a constructor
//! here; serde deserialization goes through the same checks
//! (`#[serde(try_from = ...)]`), so a decoded command never holds an invalid
//! name.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::InvalidInput;
use crate::limits;

/// Milliseconds since the UNIX epoch, stamped into commands by the leader.
/// The state machine never reads a clock: this is its only notion of time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    pub fn saturating_add_ms(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

macro_rules! u64_id {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

u64_id!(
    /// A job's id, assigned by the state machine in log order (dense, increasing).
    JobId,
    "job-"
);
u64_id!(
    /// A peer's id. Assigned once by the state machine and never reused.
    PeerId,
    "peer-"
);
u64_id!(
    /// The Raft log index of the command that granted a lease. A renewal,
    /// completion or failure must present the token of the job's current
    /// lease; anything else is stale and rejected.
    FencingToken,
    "token-"
);

/// A stream's name: 1..=64 characters of `[A-Za-z0-9_.-]`, starting with a
/// letter or digit.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamName(String);

impl StreamName {
    pub fn new(name: impl Into<String>) -> Result<StreamName, InvalidInput> {
        let name = name.into();
        validate_name("stream name", &name, limits::MAX_STREAM_NAME)?;
        Ok(StreamName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate_name(what: &'static str, name: &str, max: usize) -> Result<(), InvalidInput> {
    if name.is_empty() {
        return Err(InvalidInput::Name { what, name: name.to_owned(), reason: "it is empty" });
    }
    if name.len() > max {
        return Err(InvalidInput::Name {
            what,
            name: truncate_for_display(name),
            reason: "it is longer than 64 characters",
        });
    }
    let first_ok = name.as_bytes()[0].is_ascii_alphanumeric();
    if !first_ok {
        return Err(InvalidInput::Name {
            what,
            name: name.to_owned(),
            reason: "it must start with a letter or a digit",
        });
    }
    if name.chars().any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(InvalidInput::Name {
            what,
            name: truncate_for_display(name),
            reason: "only letters, digits, '_', '-' and '.' are allowed",
        });
    }
    Ok(())
}

fn truncate_for_display(s: &str) -> String {
    s.chars().take(80).collect()
}

impl TryFrom<String> for StreamName {
    type Error = InvalidInput;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        StreamName::new(value).inspect_err(crate::wire::remember_invalid)
    }
}

impl From<StreamName> for String {
    fn from(value: StreamName) -> String {
        value.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::str::FromStr for StreamName {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StreamName::new(s)
    }
}

/// A client-chosen idempotency key: 1..=128 bytes of printable ASCII.
/// Submitting twice with the same key to the same stream returns the first job.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn new(key: impl Into<String>) -> Result<IdempotencyKey, InvalidInput> {
        let key = key.into();
        if key.is_empty() || key.len() > limits::MAX_IDEMPOTENCY_KEY {
            return Err(InvalidInput::TooLarge {
                what: "idempotency key",
                len: key.len(),
                max: limits::MAX_IDEMPOTENCY_KEY,
            });
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidInput::Name {
                what: "idempotency key",
                name: truncate_for_display(&key),
                reason: "only printable ASCII without spaces is allowed",
            });
        }
        Ok(IdempotencyKey(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = InvalidInput;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        IdempotencyKey::new(value).inspect_err(crate::wire::remember_invalid)
    }
}

impl From<IdempotencyKey> for String {
    fn from(value: IdempotencyKey) -> String {
        value.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The content hash (BLAKE3) of a wasm module. Modules are stored once per hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModuleHash(pub [u8; 32]);

impl ModuleHash {
    pub fn of(bytes: &[u8]) -> ModuleHash {
        ModuleHash(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Result<ModuleHash, InvalidInput> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| InvalidInput::Name {
            what: "module hash",
            name: truncate_for_display(s),
            reason: "it must be 64 hex digits",
        })?;
        Ok(ModuleHash(out))
    }
}

impl fmt::Display for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleHash({})", &self.to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_are_checked() {
        assert!(StreamName::new("s1").is_ok());
        assert!(StreamName::new("crawl.v2_en-US").is_ok());
        assert!(StreamName::new("a".repeat(64)).is_ok());

        let errs: Vec<String> = ["", "-lead", "has space", "slash/no", "ünï", &"a".repeat(65)]
            .iter()
            .map(|n| StreamName::new(*n).unwrap_err().to_string())
            .collect();
        expect_test::expect![[r#"
            [
                "invalid stream name \"\": it is empty",
                "invalid stream name \"-lead\": it must start with a letter or a digit",
                "invalid stream name \"has space\": only letters, digits, '_', '-' and '.' are allowed",
                "invalid stream name \"slash/no\": only letters, digits, '_', '-' and '.' are allowed",
                "invalid stream name \"ünï\": it must start with a letter or a digit",
                "invalid stream name \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\": it is longer than 64 characters",
            ]
        "#]]
        .assert_debug_eq(&errs);
    }

    #[test]
    fn invalid_stream_name_is_refused_by_the_decoder() {
        let bytes = postcard::to_allocvec(&"bad name").unwrap();
        assert!(postcard::from_bytes::<StreamName>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&"good").unwrap();
        assert_eq!(postcard::from_bytes::<StreamName>(&bytes).unwrap().as_str(), "good");
    }

    #[test]
    fn module_hash_round_trips_through_hex() {
        let h = ModuleHash::of(b"\0asm");
        assert_eq!(ModuleHash::from_hex(&h.to_hex()).unwrap(), h);
        assert!(ModuleHash::from_hex("zz").is_err());
    }
}
