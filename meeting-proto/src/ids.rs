//! Identifiers shared by every component.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest meeting id accepted anywhere (bytes). Meeting ids come from join
/// tokens, so they are bounded before they reach any table or packet.
pub const MAX_MEETING_ID_LEN: usize = 64;

/// A meeting, named by the customer's portal (the `mid` claim of a join token).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MeetingId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("meeting id is empty")]
    Empty,
    #[error("meeting id is longer than {MAX_MEETING_ID_LEN} bytes")]
    TooLong,
    #[error("meeting id may only contain ASCII letters, digits, '-', '_' and '.'")]
    BadCharacter,
}

impl MeetingId {
    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(IdError::Empty);
        }
        if id.len() > MAX_MEETING_ID_LEN {
            return Err(IdError::TooLong);
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(IdError::BadCharacter);
        }
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for MeetingId {
    type Error = IdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<MeetingId> for String {
    fn from(value: MeetingId) -> Self {
        value.0
    }
}

impl fmt::Display for MeetingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A participant within one meeting, assigned by the KMS at join.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ParticipantId(pub u64);

impl fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meeting_ids_are_bounded_and_plain() {
        assert!(MeetingId::new("weekly-sync_2.0").is_ok());
        assert_eq!(MeetingId::new(""), Err(IdError::Empty));
        assert_eq!(MeetingId::new("a".repeat(65)), Err(IdError::TooLong));
        assert_eq!(MeetingId::new("a/b"), Err(IdError::BadCharacter));
        assert!(serde_json::from_str::<MeetingId>("\"x y\"").is_err());
    }
}
