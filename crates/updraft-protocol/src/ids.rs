//! Identifier and string rules from the AWS IoT service model.
//!
//! The AWS clients only check minimum lengths; everything else (maximum
//! length, pattern) is the server's job, and these functions are where the
//! server does it.

use thiserror::Error;

/// Why a value does not satisfy its model constraint.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    #[error("{field} must be at least {min} characters long")]
    TooShort { field: &'static str, min: usize },
    #[error("{field} must be at most {max} characters long")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} must satisfy the pattern {pattern}")]
    Pattern {
        field: &'static str,
        pattern: &'static str,
    },
}

/// A string constraint: length bounds in characters and an allowed-character rule.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub min: usize,
    pub max: usize,
    pub pattern: &'static str,
    allowed: fn(char) -> bool,
}

impl Rule {
    /// Checks `value` against the rule, naming `field` in the error.
    pub fn check(&self, field: &'static str, value: &str) -> Result<(), IdError> {
        let len = value.chars().count();
        if len < self.min {
            return Err(IdError::TooShort {
                field,
                min: self.min,
            });
        }
        if len > self.max {
            return Err(IdError::TooLong {
                field,
                max: self.max,
            });
        }
        if !value.chars().all(self.allowed) {
            return Err(IdError::Pattern {
                field,
                pattern: self.pattern,
            });
        }
        Ok(())
    }
}

fn alnum_dash_underscore(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

fn thing_name_char(c: char) -> bool {
    alnum_dash_underscore(c) || c == ':'
}

fn uuidish(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

/// `[^\p{C}]+`: no control, format, surrogate, private-use or unassigned characters.
pub fn no_control(c: char) -> bool {
    !(c.is_control()
        || matches!(c as u32,
            0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x08E2 | 0x180E
            | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F
            | 0xFEFF | 0xFFF9..=0xFFFB | 0xE000..=0xF8FF | 0xF0000..=0x10FFFF))
}

fn graph_or_space(c: char) -> bool {
    c == ' ' || (no_control(c) && !c.is_whitespace())
}

fn attribute_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.,@/:#-".contains(c)
}

fn attribute_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.,@/:#=[]-".contains(c)
}

fn reason_code_char(c: char) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'
}

fn any_char(_: char) -> bool {
    true
}

/// jobId: 1..64 `[a-zA-Z0-9_-]+`.
pub const JOB_ID: Rule = Rule {
    min: 1,
    max: 64,
    pattern: "[a-zA-Z0-9_-]+",
    allowed: alnum_dash_underscore,
};
/// otaUpdateId and streamId: 1..128 `[a-zA-Z0-9_-]+`.
pub const OTA_UPDATE_ID: Rule = Rule {
    min: 1,
    max: 128,
    pattern: "[a-zA-Z0-9_-]+",
    allowed: alnum_dash_underscore,
};
pub const STREAM_ID: Rule = OTA_UPDATE_ID;
/// thingName, thingGroupName, thingTypeName, billingGroupName: 1..128 `[a-zA-Z0-9:_-]+`.
pub const THING_NAME: Rule = Rule {
    min: 1,
    max: 128,
    pattern: "[a-zA-Z0-9:_-]+",
    allowed: thing_name_char,
};
pub const THING_GROUP_NAME: Rule = THING_NAME;
/// thingGroupId: 1..128 `[a-zA-Z0-9\-]+`.
pub const THING_GROUP_ID: Rule = Rule {
    min: 1,
    max: 128,
    pattern: "[a-zA-Z0-9\\-]+",
    allowed: uuidish,
};
/// namespaceId: `[a-zA-Z0-9_-]+` (no model length limit; 64 is generous).
pub const NAMESPACE_ID: Rule = Rule {
    min: 1,
    max: 64,
    pattern: "[a-zA-Z0-9_-]+",
    allowed: alnum_dash_underscore,
};
/// description: ≤2028 `[^\p{C}]+`.
pub const DESCRIPTION: Rule = Rule {
    min: 0,
    max: 2028,
    pattern: "[^\\p{C}]+",
    allowed: no_control,
};
/// comment on CancelJob: same as description.
pub const COMMENT: Rule = DESCRIPTION;
/// thingGroupDescription: ≤2028 `[\p{Graph}\x20]*`.
pub const THING_GROUP_DESCRIPTION: Rule = Rule {
    min: 0,
    max: 2028,
    pattern: "[\\p{Graph}\\x20]*",
    allowed: graph_or_space,
};
/// reasonCode on CancelJob: ≤128 `[\p{Upper}\p{Digit}_]+`.
pub const REASON_CODE: Rule = Rule {
    min: 0,
    max: 128,
    pattern: "[\\p{Upper}\\p{Digit}_]+",
    allowed: reason_code_char,
};
/// Thing attribute name: ≤128 `[a-zA-Z0-9_.,@/:#-]+`.
pub const ATTRIBUTE_NAME: Rule = Rule {
    min: 1,
    max: 128,
    pattern: "[a-zA-Z0-9_.,@/:#-]+",
    allowed: attribute_name_char,
};
/// Thing attribute value: ≤800 `[a-zA-Z0-9_.,@/:#=\[\]-]*`.
pub const ATTRIBUTE_VALUE: Rule = Rule {
    min: 0,
    max: 800,
    pattern: "[a-zA-Z0-9_.,@/:#=\\[\\]-]*",
    allowed: attribute_value_char,
};
/// Execution statusDetails key: 1..128 `[a-zA-Z0-9:_-]+`.
pub const DETAILS_KEY: Rule = THING_NAME;
/// Execution statusDetails value: ≥1 `[^\p{C}]+` (1024 is the documented AWS limit).
pub const DETAILS_VALUE: Rule = Rule {
    min: 1,
    max: 1024,
    pattern: "[^\\p{C}]+",
    allowed: no_control,
};
/// roleArn: 20..2048.
pub const ROLE_ARN: Rule = Rule {
    min: 20,
    max: 2048,
    pattern: ".*",
    allowed: any_char,
};
/// A job target ARN: ≤2048.
pub const TARGET_ARN: Rule = Rule {
    min: 1,
    max: 2048,
    pattern: ".*",
    allowed: any_char,
};
/// documentSource: 1..1350.
pub const DOCUMENT_SOURCE: Rule = Rule {
    min: 1,
    max: 1350,
    pattern: ".*",
    allowed: any_char,
};
/// Tag key: 1..128 `^([\p{L}\p{Z}\p{N}_.:/=+\-@]*)$`.
pub const TAG_KEY: Rule = Rule {
    min: 1,
    max: 128,
    pattern: "^([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*)$",
    allowed: tag_key_char,
};
/// Tag value: ≤256.
pub const TAG_VALUE: Rule = Rule {
    min: 0,
    max: 256,
    pattern: ".*",
    allowed: any_char,
};
/// OTA additionalParameters / file attributes values: ≤4096 `[\s\S]*`.
pub const PARAMETER_VALUE: Rule = Rule {
    min: 0,
    max: 4096,
    pattern: "[\\s\\S]*",
    allowed: any_char,
};

fn tag_key_char(c: char) -> bool {
    c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c)
}

/// The job document: ≤32768 characters.
pub const MAX_JOB_DOCUMENT: usize = 32768;

/// A thing name that is also safe to use as an MQTT client id and topic level.
pub fn is_topic_safe(name: &str) -> bool {
    THING_NAME.check("thingName", name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_rules() {
        assert!(JOB_ID.check("jobId", "AFR_OTA-abc_1").is_ok());
        assert_eq!(
            JOB_ID.check("jobId", ""),
            Err(IdError::TooShort {
                field: "jobId",
                min: 1
            })
        );
        assert!(matches!(
            JOB_ID.check("jobId", &"a".repeat(65)),
            Err(IdError::TooLong { max: 64, .. })
        ));
        assert!(matches!(
            JOB_ID.check("jobId", "a:b"),
            Err(IdError::Pattern { .. })
        ));
    }

    #[test]
    fn thing_names_allow_colons_but_not_slashes() {
        assert!(THING_NAME.check("thingName", "dev:1_a-b").is_ok());
        assert!(THING_NAME.check("thingName", "dev/1").is_err());
        assert!(THING_NAME.check("thingName", "dev 1").is_err());
        assert!(!is_topic_safe("a+b"));
    }

    #[test]
    fn descriptions_refuse_control_characters() {
        assert!(DESCRIPTION.check("description", "héllo wörld").is_ok());
        assert!(DESCRIPTION.check("description", "bad\u{7}bell").is_err());
        assert!(
            DESCRIPTION
                .check("description", "zero\u{200B}width")
                .is_err()
        );
        assert!(DESCRIPTION.check("description", &"x".repeat(2029)).is_err());
    }

    #[test]
    fn attribute_rules() {
        assert!(ATTRIBUTE_NAME.check("attributeName", "hw.rev").is_ok());
        assert!(ATTRIBUTE_VALUE.check("attributeValue", "").is_ok());
        assert!(ATTRIBUTE_VALUE.check("attributeValue", "a b").is_err());
        assert!(REASON_CODE.check("reasonCode", "BAD_FW_2").is_ok());
        assert!(REASON_CODE.check("reasonCode", "bad").is_err());
    }
}
