//! Amazon Resource Names for the resources Updraft serves.

use std::fmt;
use thiserror::Error;

/// The IoT resource kinds Updraft names with ARNs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    Thing,
    ThingGroup,
    Job,
    OtaUpdate,
    Stream,
    Cert,
}

impl ResourceKind {
    /// The resource-type segment used in the ARN (`thing/...`).
    pub fn segment(self) -> &'static str {
        match self {
            ResourceKind::Thing => "thing",
            ResourceKind::ThingGroup => "thinggroup",
            ResourceKind::Job => "job",
            ResourceKind::OtaUpdate => "otaupdate",
            ResourceKind::Stream => "stream",
            ResourceKind::Cert => "cert",
        }
    }

    fn from_segment(s: &str) -> Option<Self> {
        Some(match s {
            "thing" => ResourceKind::Thing,
            "thinggroup" => ResourceKind::ThingGroup,
            "job" => ResourceKind::Job,
            "otaupdate" => ResourceKind::OtaUpdate,
            "stream" => ResourceKind::Stream,
            "cert" => ResourceKind::Cert,
            _ => return None,
        })
    }
}

/// An `arn:aws:iot:{region}:{account}:{kind}/{name}` ARN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arn {
    pub region: String,
    pub account: String,
    pub kind: ResourceKind,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArnError {
    #[error("'{0}' is not a valid ARN")]
    Malformed(String),
    #[error("'{0}' is not an AWS IoT ARN")]
    NotIot(String),
    #[error("ARN resource type '{0}' is not supported here")]
    UnknownKind(String),
}

impl Arn {
    pub fn new(region: &str, account: &str, kind: ResourceKind, name: &str) -> Self {
        Arn {
            region: region.to_owned(),
            account: account.to_owned(),
            kind,
            name: name.to_owned(),
        }
    }

    /// Parses an IoT ARN. The partition may be any `aws*` partition.
    pub fn parse(s: &str) -> Result<Self, ArnError> {
        let mut parts = s.splitn(6, ':');
        let (Some("arn"), Some(partition), Some(service), Some(region), Some(account), Some(res)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(ArnError::Malformed(s.to_owned()));
        };
        if !partition.starts_with("aws") {
            return Err(ArnError::Malformed(s.to_owned()));
        }
        if service != "iot" {
            return Err(ArnError::NotIot(s.to_owned()));
        }
        let Some((kind, name)) = res.split_once('/') else {
            return Err(ArnError::Malformed(s.to_owned()));
        };
        let kind = ResourceKind::from_segment(kind)
            .ok_or_else(|| ArnError::UnknownKind(kind.to_owned()))?;
        if name.is_empty() {
            return Err(ArnError::Malformed(s.to_owned()));
        }
        Ok(Arn {
            region: region.to_owned(),
            account: account.to_owned(),
            kind,
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for Arn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "arn:aws:iot:{}:{}:{}/{}",
            self.region,
            self.account,
            self.kind.segment(),
            self.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let arn = Arn::new("us-east-1", "123456789012", ResourceKind::ThingGroup, "g1");
        let text = arn.to_string();
        assert_eq!(text, "arn:aws:iot:us-east-1:123456789012:thinggroup/g1");
        assert_eq!(Arn::parse(&text), Ok(arn));
    }

    #[test]
    fn rejects_non_iot_and_garbage() {
        assert!(matches!(Arn::parse("thing/x"), Err(ArnError::Malformed(_))));
        assert!(matches!(
            Arn::parse("arn:aws:s3:::bucket/key"),
            Err(ArnError::NotIot(_))
        ));
        assert!(matches!(
            Arn::parse("arn:aws:iot:r:1:policy/p"),
            Err(ArnError::UnknownKind(_))
        ));
        assert!(matches!(
            Arn::parse("arn:aws:iot:r:1:thing/"),
            Err(ArnError::Malformed(_))
        ));
    }
}
