//! Job status reports, byte for byte the reference C agent's (`ota_mqtt.c`, data-plane
//! reference §4.4), so tools and dashboards read one format for every agent:
//!
//! | situation | payload (QoS) |
//! |---|---|
//! | progress | `{"status":"IN_PROGRESS","statusDetails":{"receive":"17/256"}}` (0) |
//! | downloaded and verified | `{"status":"IN_PROGRESS","statusDetails":{"self_test":"ready","updatedBy":"0x00090002"}}` (1) |
//! | new image under test | `{"status":"IN_PROGRESS","statusDetails":{"self_test":"active","updatedBy":"0x00090003"}}` (1) |
//! | accepted | `{"status":"SUCCEEDED","statusDetails":{"reason":"accepted  v0.9.3","updatedBy":"  v0.9.2"}}` (1) |
//! | rejected / aborted | `{"status":"FAILED","statusDetails":{"reason":"rejected: 0x0000000f"}}` (1) |
//! | numeric failure | `{"status":"FAILED","statusDetails":{"reason":"0xe3000000: 0xfffffffe"}}` (1) |
//!
//! Hex fields are 8 lower-case digits. One difference: the C agent prints a version
//! component of 0 as nothing (`"accepted  v.9.3"`, a bug in `stringBuilderUInt32Decimal`);
//! this agent prints `0`, which is what the template (`%u`) and the reference mean.

use crate::version::AppVersion;

/// MQTT delivery for a report: progress is QoS 0, everything else QoS 1 (as in C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportQos {
    AtMostOnce,
    AtLeastOnce,
}

/// The C agent's `self_test` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfTest {
    /// Downloaded and verified by the old image; about to activate.
    Ready,
    /// The new image runs and passed the version check; under test.
    Active,
}

/// Why a job failed, for `"<reason>: 0x%08x"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    Rejected,
    Aborted,
}

/// One status report: the payload for `$aws/things/{t}/jobs/{jobId}/update`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub payload: String,
    pub qos: ReportQos,
}

const IN_PROGRESS: &str = r#"{"status":"IN_PROGRESS","statusDetails":{"#;
const FAILED: &str = r#"{"status":"FAILED","statusDetails":{"#;
const SUCCEEDED: &str = r#"{"status":"SUCCEEDED","statusDetails":{"#;

/// `{"receive":"k/N"}`: `received` of `total` blocks.
pub fn receive(received: u64, total: u64) -> Report {
    Report {
        payload: format!(r#"{IN_PROGRESS}"receive":"{received}/{total}"}}}}"#),
        qos: ReportQos::AtMostOnce,
    }
}

/// `{"self_test":"ready"|"active","updatedBy":"0x%08x"}` with the running version.
pub fn self_test(stage: SelfTest, running: AppVersion) -> Report {
    let stage = match stage {
        SelfTest::Ready => "ready",
        SelfTest::Active => "active",
    };
    Report {
        payload: format!(
            r#"{IN_PROGRESS}"self_test":"{stage}","updatedBy":"0x{:08x}"}}}}"#,
            running.to_u32()
        ),
        qos: ReportQos::AtLeastOnce,
    }
}

/// The status an application reports for a job that is not an OTA job (the agent hands
/// those to the application: [`crate::JobEvent::ParseCustomJob`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CustomJobStatus {
    InProgress,
    Succeeded,
    Failed,
    /// The device will not run the job.
    Rejected,
}

impl CustomJobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CustomJobStatus::InProgress => "IN_PROGRESS",
            CustomJobStatus::Succeeded => "SUCCEEDED",
            CustomJobStatus::Failed => "FAILED",
            CustomJobStatus::Rejected => "REJECTED",
        }
    }

    /// Whether the job is over for this device (the agent then asks for the next one).
    pub fn is_terminal(self) -> bool {
        self != CustomJobStatus::InProgress
    }
}

/// `{"status":..., "statusDetails":{...}}` for a custom job (QoS 1).
pub fn custom(
    status: CustomJobStatus,
    details: &std::collections::BTreeMap<String, String>,
) -> Report {
    let body = if details.is_empty() {
        serde_json::json!({ "status": status.as_str() })
    } else {
        serde_json::json!({ "status": status.as_str(), "statusDetails": details })
    };
    Report {
        payload: body.to_string(),
        qos: ReportQos::AtLeastOnce,
    }
}

/// `{"reason":"accepted  v1.2.3","updatedBy":"  v1.2.2"}`: the new running version, and the
/// version that downloaded it.
pub fn accepted(new: AppVersion, updated_by: AppVersion) -> Report {
    Report {
        payload: format!(
            r#"{SUCCEEDED}"reason":"accepted  v{new}","updatedBy":"  v{updated_by}"}}}}"#
        ),
        qos: ReportQos::AtLeastOnce,
    }
}

/// `{"reason":"rejected: 0x%08x"}` / `{"reason":"aborted: 0x%08x"}`.
pub fn failed(reason: FailReason, code: u32) -> Report {
    let reason = match reason {
        FailReason::Rejected => "rejected",
        FailReason::Aborted => "aborted",
    };
    Report {
        payload: format!(r#"{FAILED}"reason":"{reason}: 0x{code:08x}"}}}}"#),
        qos: ReportQos::AtLeastOnce,
    }
}

/// `{"reason":"0x%08x: 0x%08x"}`: an error code and a sub-code (PAL status and ingest
/// result, or `OtaErrJobParserError` and the parse error, ...).
pub fn failed_with_value(code: u32, sub: u32) -> Report {
    Report {
        payload: format!(r#"{FAILED}"reason":"0x{code:08x}: 0x{sub:08x}"}}}}"#),
        qos: ReportQos::AtLeastOnce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{IngestResult, JobParseError, OtaError, PalStatus};

    #[test]
    fn custom_job_reports() {
        let r = custom(CustomJobStatus::InProgress, &Default::default());
        assert_eq!(r.payload, r#"{"status":"IN_PROGRESS"}"#);
        let details =
            std::collections::BTreeMap::from([("reason".to_owned(), "no \"x\"".to_owned())]);
        let r = custom(CustomJobStatus::Rejected, &details);
        let v: serde_json::Value = serde_json::from_str(&r.payload).expect("json");
        assert_eq!(v["status"], "REJECTED");
        assert_eq!(v["statusDetails"]["reason"], "no \"x\"");
        assert_eq!(r.qos, ReportQos::AtLeastOnce);
        assert!(!CustomJobStatus::InProgress.is_terminal());
        assert!(CustomJobStatus::Failed.is_terminal());
    }

    #[test]
    fn exact_templates() {
        let cases = [
            (
                receive(17, 256),
                r#"{"status":"IN_PROGRESS","statusDetails":{"receive":"17/256"}}"#,
                ReportQos::AtMostOnce,
            ),
            (
                self_test(SelfTest::Ready, AppVersion::new(0, 9, 2)),
                r#"{"status":"IN_PROGRESS","statusDetails":{"self_test":"ready","updatedBy":"0x00090002"}}"#,
                ReportQos::AtLeastOnce,
            ),
            (
                self_test(SelfTest::Active, AppVersion::new(0, 9, 3)),
                r#"{"status":"IN_PROGRESS","statusDetails":{"self_test":"active","updatedBy":"0x00090003"}}"#,
                ReportQos::AtLeastOnce,
            ),
            (
                accepted(AppVersion::new(0, 9, 3), AppVersion::new(0, 9, 2)),
                r#"{"status":"SUCCEEDED","statusDetails":{"reason":"accepted  v0.9.3","updatedBy":"  v0.9.2"}}"#,
                ReportQos::AtLeastOnce,
            ),
            (
                failed(FailReason::Rejected, OtaError::DowngradeNotAllowed.code()),
                r#"{"status":"FAILED","statusDetails":{"reason":"rejected: 0x0000000f"}}"#,
                ReportQos::AtLeastOnce,
            ),
            (
                failed(FailReason::Aborted, OtaError::UserAbort.code()),
                r#"{"status":"FAILED","statusDetails":{"reason":"aborted: 0x00000013"}}"#,
                ReportQos::AtLeastOnce,
            ),
            (
                failed_with_value(
                    PalStatus::SignatureCheckFailed.code() << 24,
                    IngestResult::SigCheckFail.code() as u32,
                ),
                r#"{"status":"FAILED","statusDetails":{"reason":"0xe3000000: 0xfffffffe"}}"#,
                ReportQos::AtLeastOnce,
            ),
            (
                failed_with_value(
                    OtaError::JobParserError.code(),
                    JobParseError::ZeroFileSize.code() as u32,
                ),
                r#"{"status":"FAILED","statusDetails":{"reason":"0x0000000c: 0x00000003"}}"#,
                ReportQos::AtLeastOnce,
            ),
        ];
        for (report, payload, qos) in cases {
            assert_eq!(report.payload, payload);
            assert_eq!(report.qos, qos);
            assert!(report.payload.len() <= 128, "C buffer is 128 bytes");
            let v: serde_json::Value = serde_json::from_str(&report.payload).expect("json");
            assert!(v["statusDetails"].is_object());
        }
        let widest = accepted(
            AppVersion::new(255, 255, 65535),
            AppVersion::new(255, 255, 65535),
        );
        assert!(widest.payload.len() <= 128);
    }
}
