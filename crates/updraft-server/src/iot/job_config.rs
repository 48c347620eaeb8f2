//! The job configuration shapes (presigned URL, rollout, abort, timeout, retry), their
//! model constraints, and the looser `AwsJob*` twins that CreateOTAUpdate takes.
//!
//! Each shape deserializes from the request, is checked by `validate`, and serializes
//! back exactly as DescribeJob returns it.

use serde::{Deserialize, Serialize};
use updraft_protocol::ids::ROLE_ARN;
use updraft_protocol::job::FailureType;

use crate::error::{ApiError, ApiResult};

fn range_i64(field: &str, v: i64, min: i64, max: i64) -> ApiResult<()> {
    if (min..=max).contains(&v) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{field} must be from {min} to {max}, not {v}"
        )))
    }
}

fn range_f64(field: &str, v: f64, min: f64, max: f64) -> ApiResult<()> {
    if v.is_finite() && v >= min && v <= max {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{field} must be from {min} to {max}, not {v}"
        )))
    }
}

fn required<T>(field: &str, v: Option<T>) -> ApiResult<T> {
    v.ok_or_else(|| ApiError::invalid(format!("{field} is required")))
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PresignedUrlConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_sec: Option<i64>,
}

impl PresignedUrlConfig {
    pub fn validate(&self) -> ApiResult<()> {
        if let Some(r) = &self.role_arn {
            ROLE_ARN.check("presignedUrlConfig.roleArn", r)?;
        }
        if let Some(e) = self.expires_in_sec {
            range_i64("presignedUrlConfig.expiresInSec", e, 60, 3600)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateIncreaseCriteria {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_of_notified_things: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_of_succeeded_things: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExponentialRolloutRate {
    pub base_rate_per_minute: Option<i64>,
    pub increment_factor: Option<f64>,
    pub rate_increase_criteria: Option<RateIncreaseCriteria>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobExecutionsRolloutConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_per_minute: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exponential_rate: Option<ExponentialRolloutRate>,
}

impl JobExecutionsRolloutConfig {
    /// `max_per_minute` is 1000 for OTA updates' AwsJobExecutionsRolloutConfig.
    pub fn validate(&self, prefix: &str, max_per_minute: i64) -> ApiResult<()> {
        if let Some(m) = self.maximum_per_minute {
            range_i64(&format!("{prefix}.maximumPerMinute"), m, 1, max_per_minute)?;
        }
        if let Some(e) = &self.exponential_rate {
            let base = required(
                &format!("{prefix}.exponentialRate.baseRatePerMinute"),
                e.base_rate_per_minute,
            )?;
            range_i64(
                &format!("{prefix}.exponentialRate.baseRatePerMinute"),
                base,
                1,
                1000,
            )?;
            let f = required(
                &format!("{prefix}.exponentialRate.incrementFactor"),
                e.increment_factor,
            )?;
            range_f64(
                &format!("{prefix}.exponentialRate.incrementFactor"),
                f,
                1.1,
                5.0,
            )?;
            if (f * 10.0 - (f * 10.0).round()).abs() > 1e-9 {
                return Err(ApiError::invalid(format!(
                    "{prefix}.exponentialRate.incrementFactor allows one decimal place, not {f}"
                )));
            }
            let c = required(
                &format!("{prefix}.exponentialRate.rateIncreaseCriteria"),
                e.rate_increase_criteria.as_ref(),
            )?;
            match (c.number_of_notified_things, c.number_of_succeeded_things) {
                (None, None) => {
                    return Err(ApiError::invalid(format!(
                        "{prefix}.exponentialRate.rateIncreaseCriteria needs numberOfNotifiedThings or numberOfSucceededThings"
                    )));
                }
                (n, s) => {
                    for (name, v) in [
                        ("numberOfNotifiedThings", n),
                        ("numberOfSucceededThings", s),
                    ] {
                        if let Some(v) = v {
                            range_i64(
                                &format!("{prefix}.exponentialRate.rateIncreaseCriteria.{name}"),
                                v,
                                1,
                                i64::from(i32::MAX),
                            )?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AbortCriteria {
    pub failure_type: Option<String>,
    pub action: Option<String>,
    pub threshold_percentage: Option<f64>,
    pub min_number_of_executed_things: Option<i64>,
}

impl AbortCriteria {
    fn validate(&self, prefix: &str) -> ApiResult<()> {
        let ft = required(
            &format!("{prefix}.failureType"),
            self.failure_type.as_deref(),
        )?;
        ft.parse::<FailureType>()
            .map_err(|e| ApiError::invalid(format!("{prefix}.failureType: {e}")))?;
        let action = required(&format!("{prefix}.action"), self.action.as_deref())?;
        if action != "CANCEL" {
            return Err(ApiError::invalid(format!(
                "{prefix}.action: '{action}' is not one of [CANCEL]"
            )));
        }
        let t = required(
            &format!("{prefix}.thresholdPercentage"),
            self.threshold_percentage,
        )?;
        range_f64(&format!("{prefix}.thresholdPercentage"), t, 0.0, 100.0)?;
        if (t * 100.0 - (t * 100.0).round()).abs() > 1e-6 {
            return Err(ApiError::invalid(format!(
                "{prefix}.thresholdPercentage allows two decimal places, not {t}"
            )));
        }
        let m = required(
            &format!("{prefix}.minNumberOfExecutedThings"),
            self.min_number_of_executed_things,
        )?;
        range_i64(
            &format!("{prefix}.minNumberOfExecutedThings"),
            m,
            1,
            i64::from(i32::MAX),
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AbortConfig {
    pub criteria_list: Option<Vec<AbortCriteria>>,
}

impl AbortConfig {
    pub fn validate(&self) -> ApiResult<()> {
        let list = required("abortConfig.criteriaList", self.criteria_list.as_ref())?;
        if list.is_empty() {
            return Err(ApiError::invalid(
                "abortConfig.criteriaList needs at least one criterion",
            ));
        }
        for (i, c) in list.iter().enumerate() {
            c.validate(&format!("abortConfig.criteriaList[{i}]"))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_progress_timeout_in_minutes: Option<i64>,
}

impl TimeoutConfig {
    pub fn validate(&self) -> ApiResult<()> {
        if let Some(t) = self.in_progress_timeout_in_minutes {
            range_i64("timeoutConfig.inProgressTimeoutInMinutes", t, 1, 10080)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryCriteria {
    pub failure_type: Option<String>,
    pub number_of_retries: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobExecutionsRetryConfig {
    pub criteria_list: Option<Vec<RetryCriteria>>,
}

impl JobExecutionsRetryConfig {
    pub fn validate(&self) -> ApiResult<()> {
        let list = required(
            "jobExecutionsRetryConfig.criteriaList",
            self.criteria_list.as_ref(),
        )?;
        if list.is_empty() || list.len() > 2 {
            return Err(ApiError::invalid(
                "jobExecutionsRetryConfig.criteriaList has 1 or 2 criteria",
            ));
        }
        for (i, c) in list.iter().enumerate() {
            let p = format!("jobExecutionsRetryConfig.criteriaList[{i}]");
            let ft = required(&format!("{p}.failureType"), c.failure_type.as_deref())?;
            if !["FAILED", "TIMED_OUT", "ALL"].contains(&ft) {
                return Err(ApiError::invalid(format!(
                    "{p}.failureType: '{ft}' is not one of [FAILED, TIMED_OUT, ALL]"
                )));
            }
            let n = required(&format!("{p}.numberOfRetries"), c.number_of_retries)?;
            range_i64(&format!("{p}.numberOfRetries"), n, 0, 10)?;
        }
        Ok(())
    }
}

/// The validated configuration members of a job, as stored and as DescribeJob shows them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobConfigs {
    pub presigned_url_config: Option<PresignedUrlConfig>,
    pub rollout: Option<JobExecutionsRolloutConfig>,
    pub abort: Option<AbortConfig>,
    pub timeout: Option<TimeoutConfig>,
    pub retry: Option<JobExecutionsRetryConfig>,
}

impl JobConfigs {
    pub fn validate(&self) -> ApiResult<()> {
        if let Some(c) = &self.presigned_url_config {
            c.validate()?;
        }
        if let Some(c) = &self.rollout {
            c.validate("jobExecutionsRolloutConfig", i64::from(i32::MAX))?;
        }
        if let Some(c) = &self.abort {
            c.validate()?;
        }
        if let Some(c) = &self.timeout {
            c.validate()?;
        }
        if let Some(c) = &self.retry {
            c.validate()?;
        }
        Ok(())
    }

    /// Stores the configs into a job's `details` map (absent ones are left as they are).
    pub fn store_into(
        &self,
        details: &mut serde_json::Map<String, serde_json::Value>,
    ) -> ApiResult<()> {
        fn put<T: Serialize>(
            d: &mut serde_json::Map<String, serde_json::Value>,
            key: &str,
            v: &Option<T>,
        ) -> ApiResult<()> {
            if let Some(v) = v {
                let json =
                    serde_json::to_value(v).map_err(|e| ApiError::internal(e.to_string()))?;
                d.insert(key.to_owned(), json);
            }
            Ok(())
        }
        put(details, "presignedUrlConfig", &self.presigned_url_config)?;
        put(details, "jobExecutionsRolloutConfig", &self.rollout)?;
        put(details, "abortConfig", &self.abort)?;
        put(details, "timeoutConfig", &self.timeout)?;
        put(details, "jobExecutionsRetryConfig", &self.retry)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_limits() {
        let ok: JobExecutionsRolloutConfig = serde_json::from_str(
            r#"{"maximumPerMinute":10,"exponentialRate":{"baseRatePerMinute":5,"incrementFactor":1.5,
                "rateIncreaseCriteria":{"numberOfNotifiedThings":3}}}"#,
        )
        .expect("json");
        assert!(ok.validate("r", 1000).is_ok());
        let mut bad = ok.clone();
        bad.maximum_per_minute = Some(0);
        assert!(bad.validate("r", 1000).is_err());
        let mut bad = ok.clone();
        if let Some(e) = bad.exponential_rate.as_mut() {
            e.increment_factor = Some(1.55);
        }
        assert!(bad.validate("r", 1000).is_err());
        let mut bad = ok;
        if let Some(e) = bad.exponential_rate.as_mut() {
            e.rate_increase_criteria = Some(RateIncreaseCriteria::default());
        }
        assert!(bad.validate("r", 1000).is_err());
    }

    #[test]
    fn abort_and_timeout_limits() {
        let c: AbortConfig = serde_json::from_str(
            r#"{"criteriaList":[{"failureType":"FAILED","action":"CANCEL","thresholdPercentage":10.5,"minNumberOfExecutedThings":1}]}"#,
        )
        .expect("json");
        assert!(c.validate().is_ok());
        let bad: AbortConfig = serde_json::from_str(
            r#"{"criteriaList":[{"failureType":"SOMETIMES","action":"CANCEL","thresholdPercentage":10,"minNumberOfExecutedThings":1}]}"#,
        )
        .expect("json");
        assert!(bad.validate().is_err());
        assert!(
            AbortConfig {
                criteria_list: Some(vec![])
            }
            .validate()
            .is_err()
        );
        assert!(
            TimeoutConfig {
                in_progress_timeout_in_minutes: Some(10081)
            }
            .validate()
            .is_err()
        );
        assert!(
            PresignedUrlConfig {
                role_arn: None,
                expires_in_sec: Some(59)
            }
            .validate()
            .is_err()
        );
    }
}
