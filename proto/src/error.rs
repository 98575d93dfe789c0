//! Errors of the shared vocabulary: invalid input and undecodable bytes.

/// Input that breaks a rule of the vocabulary: a bad name, an over-large field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("invalid {what} {name:?}: {reason}")]
    Name { what: &'static str, name: String, reason: &'static str },
    #[error("{what} is too large: {len} bytes/items, the limit is {max}")]
    TooLarge { what: &'static str, len: usize, max: usize },
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("invalid {what}: {reason}")]
    Value { what: &'static str, reason: String },
}

/// Bytes that are not a valid message of this version.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message: expected a version byte")]
    Empty,
    #[error("unsupported {what} version {found} (this build speaks version {expected})")]
    Version { what: &'static str, found: u8, expected: u8 },
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed {what}: {source}")]
    Malformed { what: &'static str, source: postcard::Error },
    #[error("invalid {what}: {source}")]
    Invalid { what: &'static str, source: InvalidInput },
}
