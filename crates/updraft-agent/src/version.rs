//! Firmware versions as the reference agent encodes them (`AppVersion32_t`):
//! `major << 24 | minor << 16 | build`, so `0.9.2` is `0x00090002`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// A firmware version. Ordering is numeric, major first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct AppVersion {
    pub major: u8,
    pub minor: u8,
    pub build: u16,
}

impl AppVersion {
    pub const fn new(major: u8, minor: u8, build: u16) -> Self {
        AppVersion {
            major,
            minor,
            build,
        }
    }

    /// The 32-bit word (`AppVersion32_t.u.unsignedVersion32`).
    pub const fn to_u32(self) -> u32 {
        ((self.major as u32) << 24) | ((self.minor as u32) << 16) | self.build as u32
    }

    pub const fn from_u32(v: u32) -> Self {
        AppVersion {
            major: (v >> 24) as u8,
            minor: (v >> 16) as u8,
            build: v as u16,
        }
    }
}

/// `1.2.3`.
impl fmt::Display for AppVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.build)
    }
}

/// A string that is not `major.minor.build` within 255.255.65535.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("'{0}' is not a version major.minor.build (at most 255.255.65535)")]
pub struct BadVersion(pub String);

/// Parses `1.2.3` (a leading `v` is allowed).
impl FromStr for AppVersion {
    type Err = BadVersion;
    fn from_str(s: &str) -> Result<Self, BadVersion> {
        let bad = || BadVersion(s.to_owned());
        let t = s.strip_prefix('v').unwrap_or(s);
        let mut parts = t.split('.');
        let (Some(a), Some(b), Some(c), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !(digits(a) && digits(b) && digits(c)) {
            return Err(bad());
        }
        Ok(AppVersion {
            major: a.parse().map_err(|_| bad())?,
            minor: b.parse().map_err(|_| bad())?,
            build: c.parse().map_err(|_| bad())?,
        })
    }
}

/// Parses an unsigned 32-bit number the way the C agent does (`strtoul(s, &end, 0)` with
/// the whole string consumed): decimal, `0x` hexadecimal, or octal with a leading `0`.
pub fn parse_c_uint(s: &str) -> Option<u32> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_round_trip() {
        let v = AppVersion::new(0, 9, 2);
        assert_eq!(v.to_u32(), 0x0009_0002);
        assert_eq!(AppVersion::from_u32(0x0009_0002), v);
        assert_eq!(
            AppVersion::from_u32(0xffff_ffff).to_string(),
            "255.255.65535"
        );
        assert!(AppVersion::new(1, 0, 0) > AppVersion::new(0, 255, 65535));
        assert!(AppVersion::new(1, 2, 3) < AppVersion::new(1, 2, 4));
    }

    #[test]
    fn parse_and_display() {
        for s in ["0.9.2", "v1.2.3", "255.255.65535"] {
            let v: AppVersion = s.parse().expect("version");
            assert_eq!(v.to_string(), s.trim_start_matches('v'));
        }
        for s in [
            "",
            "1.2",
            "1.2.3.4",
            "256.0.0",
            "1.2.65536",
            "a.b.c",
            "1..2",
            "+1.2.3",
        ] {
            assert!(s.parse::<AppVersion>().is_err(), "{s}");
        }
    }

    #[test]
    fn c_numbers() {
        assert_eq!(parse_c_uint("0x00090002"), Some(0x0009_0002));
        assert_eq!(parse_c_uint("1024"), Some(1024));
        assert_eq!(parse_c_uint("010"), Some(8));
        assert_eq!(parse_c_uint("0"), Some(0));
        assert_eq!(parse_c_uint("0x"), None);
        assert_eq!(parse_c_uint("08"), None);
        assert_eq!(parse_c_uint("-1"), None);
        assert_eq!(parse_c_uint("1.5"), None);
        assert_eq!(parse_c_uint("4294967296"), None);
        assert_eq!(parse_c_uint(""), None);
    }
}
