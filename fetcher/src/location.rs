//! Where a host sits in the network (`--location zone-a/rack-3`): a short path of names, outermost
//! first, that peers send when they register. The supernode prefers parents of the same location
//! and lets about one copy of each piece into a location from outside it. Parsed once, where it
//! enters (a flag, a config key, a peer's registration), so that a bad one is refused by name.

use std::fmt;
use std::sync::Arc;

/// Longest location accepted, in bytes.
pub const MAX_LEN: usize = 128;

/// A validated location; the empty one means unknown (no preference).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location(Arc<str>);

/// Why a location was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error("longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("{0:?} is not allowed (letters, digits, '.', '_', '-', ':' and '/' between names)")]
    BadChar(char),
    #[error("has an empty name (leading, trailing or doubled '/')")]
    EmptyName,
}

impl Location {
    /// Parses `s`: names of letters, digits, `.`, `_`, `-` and `:`, joined by `/`.
    pub fn parse(s: &str) -> Result<Self, LocationError> {
        if s.len() > MAX_LEN {
            return Err(LocationError::TooLong);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')))
        {
            return Err(LocationError::BadChar(c));
        }
        if !s.is_empty() && s.split('/').any(str::is_empty) {
            return Err(LocationError::EmptyName);
        }
        Ok(Self(s.into()))
    }

    /// The location as sent on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for the unknown location.
    pub fn is_unknown(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Location {
    type Err = LocationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for Location {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(|e| serde::de::Error::custom(format!("location {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_joined_by_slashes() {
        assert_eq!(
            Location::parse("zone-a/rack-3").map(|l| l.to_string()),
            Ok("zone-a/rack-3".into())
        );
        assert!(Location::parse("").is_ok_and(|l| l.is_unknown()));
        assert!(Location::parse("dc1:row.2/r_7").is_ok());
    }

    #[test]
    fn refuses_what_is_not_a_location() {
        assert_eq!(Location::parse("a b"), Err(LocationError::BadChar(' ')));
        assert_eq!(Location::parse("rack\n"), Err(LocationError::BadChar('\n')));
        assert_eq!(Location::parse("/rack"), Err(LocationError::EmptyName));
        assert_eq!(Location::parse("a//b"), Err(LocationError::EmptyName));
        assert_eq!(
            Location::parse(&"r".repeat(MAX_LEN + 1)),
            Err(LocationError::TooLong)
        );
        let toml: Result<std::collections::HashMap<String, Location>, _> =
            toml::from_str("location = \"rack 1\"");
        assert!(toml.is_err_and(|e| e.to_string().contains("rack 1")));
    }
}
