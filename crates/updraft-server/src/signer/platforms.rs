//! Signing platforms: ListSigningPlatforms, GetSigningPlatform, and what each platform
//! signs with. The values are AWS's (see `aws-control-plane.md` §5.1), `category`
//! included: real responses say `"AWS"` although the model's enum only lists `AWSIoT`.

use serde_json::{Map, Value, json};

use super::crypto::Hash;
use super::{Page, page_request, with_token};
use crate::error::{ApiError, ApiResult};
use crate::http::ApiRequest;
use crate::iot::Query;

/// A signing platform.
#[derive(Debug)]
pub struct Platform {
    pub id: &'static str,
    pub display_name: &'static str,
    pub partner: &'static str,
    pub target: &'static str,
    pub category: &'static str,
    pub encryption_algorithms: &'static [&'static str],
    pub default_encryption: &'static str,
    pub hash_algorithms: &'static [&'static str],
    pub default_hash: &'static str,
    pub image_formats: &'static [&'static str],
    pub default_image_format: &'static str,
    pub max_size_mb: u64,
    pub revocation_supported: bool,
    /// Why Updraft cannot sign for this platform, if it cannot.
    pub unsupported: Option<&'static str>,
}

pub const PLATFORMS: &[Platform] = &[
    Platform {
        id: "AmazonFreeRTOS-Default",
        display_name: "Amazon FreeRTOS SHA256-ECDSA",
        partner: "AmazonFreeRTOS",
        target: "SHA256-ECDSA",
        category: "AWS",
        encryption_algorithms: &["ECDSA"],
        default_encryption: "ECDSA",
        hash_algorithms: &["SHA256"],
        default_hash: "SHA256",
        image_formats: &["JSONEmbedded"],
        default_image_format: "JSONEmbedded",
        max_size_mb: 16,
        revocation_supported: false,
        unsupported: None,
    },
    Platform {
        id: "AmazonFreeRTOS-TI-CC3220SF",
        display_name: "Amazon FreeRTOS SHA1-RSA CC3220SF-Format",
        partner: "AmazonFreeRTOS",
        target: "SHA1-RSA-TISHA1",
        category: "AWS",
        encryption_algorithms: &["RSA"],
        default_encryption: "RSA",
        hash_algorithms: &["SHA1"],
        default_hash: "SHA1",
        image_formats: &["JSONEmbedded"],
        default_image_format: "JSONEmbedded",
        max_size_mb: 16,
        revocation_supported: false,
        unsupported: Some(
            "Updraft cannot sign for AmazonFreeRTOS-TI-CC3220SF: it needs RSA PKCS#1 v1.5 signatures over SHA-1, \
             which Updraft's constant-time crypto library (aws-lc-rs) does not make. Sign such images yourself and \
             use customCodeSigning (hashAlgorithm SHA1, signatureAlgorithm RSA).",
        ),
    },
];

pub fn find(id: &str) -> Option<&'static Platform> {
    PLATFORMS.iter().find(|p| p.id == id)
}

impl Platform {
    /// The platform's limit on what it signs, in bytes.
    pub fn max_size(&self) -> u64 {
        self.max_size_mb * 1024 * 1024
    }

    /// The (hash, encryption algorithm) a profile signs with: its overrides, else the
    /// platform's defaults. Overrides were checked against the platform when the profile
    /// was put.
    pub fn algorithms(&self, overrides: Option<&Value>) -> (Hash, &'static str) {
        let config = overrides.and_then(|o| o.get("signingConfiguration"));
        let pick = |member: &str, allowed: &'static [&'static str], default: &'static str| {
            config
                .and_then(|c| c.get(member))
                .and_then(Value::as_str)
                .and_then(|v| allowed.iter().copied().find(|a| *a == v))
                .unwrap_or(default)
        };
        let hash = match pick("hashAlgorithm", self.hash_algorithms, self.default_hash) {
            "SHA1" => Hash::Sha1,
            _ => Hash::Sha256,
        };
        let encryption = pick(
            "encryptionAlgorithm",
            self.encryption_algorithms,
            self.default_encryption,
        );
        (hash, encryption)
    }

    /// Checks a profile's `overrides` member against the platform.
    pub fn check_overrides(&self, overrides: &Value) -> ApiResult<()> {
        let obj = overrides
            .as_object()
            .ok_or_else(|| ApiError::invalid("overrides must be an object."))?;
        for (k, v) in obj {
            match k.as_str() {
                "signingConfiguration" => {
                    let c = v.as_object().ok_or_else(|| {
                        ApiError::invalid("overrides.signingConfiguration must be an object.")
                    })?;
                    for (member, value) in c {
                        let (allowed, all): (&[&str], &[&str]) = match member.as_str() {
                            "encryptionAlgorithm" => {
                                (self.encryption_algorithms, &["RSA", "ECDSA"])
                            }
                            "hashAlgorithm" => (self.hash_algorithms, &["SHA1", "SHA256"]),
                            other => {
                                return Err(ApiError::invalid(format!(
                                    "overrides.signingConfiguration has no member {other}."
                                )));
                            }
                        };
                        let value = value.as_str().unwrap_or_default();
                        if !all.contains(&value) {
                            return Err(ApiError::invalid(format!(
                                "overrides.signingConfiguration.{member} must be one of {}.",
                                all.join(", ")
                            )));
                        }
                        if !allowed.contains(&value) {
                            return Err(ApiError::invalid(format!(
                                "Platform {} does not allow {member} {value}; it allows {}.",
                                self.id,
                                allowed.join(", ")
                            )));
                        }
                    }
                }
                "signingImageFormat" => {
                    let value = v.as_str().unwrap_or_default();
                    if !["JSON", "JSONEmbedded", "JSONDetached"].contains(&value) {
                        return Err(ApiError::invalid(
                            "overrides.signingImageFormat must be one of JSON, JSONEmbedded, JSONDetached.",
                        ));
                    }
                    if !self.image_formats.contains(&value) {
                        return Err(ApiError::invalid(format!(
                            "Platform {} does not support image format {value}; it supports {}.",
                            self.id,
                            self.image_formats.join(", ")
                        )));
                    }
                }
                other => {
                    return Err(ApiError::invalid(format!(
                        "overrides has no member {other}."
                    )));
                }
            }
        }
        Ok(())
    }

    fn json(&self) -> Value {
        json!({
            "platformId": self.id,
            "displayName": self.display_name,
            "partner": self.partner,
            "target": self.target,
            "category": self.category,
            "signingConfiguration": {
                "encryptionAlgorithmOptions": {
                    "allowedValues": self.encryption_algorithms,
                    "defaultValue": self.default_encryption,
                },
                "hashAlgorithmOptions": {
                    "allowedValues": self.hash_algorithms,
                    "defaultValue": self.default_hash,
                },
            },
            "signingImageFormat": {
                "supportedFormats": self.image_formats,
                "defaultFormat": self.default_image_format,
            },
            "maxSizeInMB": self.max_size_mb,
            "revocationSupported": self.revocation_supported,
        })
    }
}

/// GET /signing-platforms
pub(super) async fn list(req: &ApiRequest) -> ApiResult<Value> {
    let q = Query::of(req);
    let page = page_request(&q)?;
    let start = match &page.after {
        Some(after) => after
            .parse::<usize>()
            .map_err(|_| ApiError::invalid("The nextToken is not valid."))?,
        None => 0,
    };
    let matching: Vec<&Platform> = PLATFORMS
        .iter()
        .filter(|p| q.get("category").is_none_or(|c| c == p.category))
        .filter(|p| q.get("partner").is_none_or(|c| c == p.partner))
        .filter(|p| q.get("target").is_none_or(|c| c == p.target))
        .collect();
    let items: Vec<Value> = matching
        .iter()
        .skip(start)
        .take(page.limit)
        .map(|p| p.json())
        .collect();
    let end = start + items.len();
    let page = Page {
        next: (end < matching.len()).then(|| end.to_string()),
        items,
    };
    let mut m = Map::new();
    m.insert("platforms".into(), Value::Array(page.items.clone()));
    Ok(with_token(m, &page))
}

/// GET /signing-platforms/{platformId}
pub(super) async fn get(id: &str) -> ApiResult<Value> {
    find(id)
        .map(Platform::json)
        .ok_or_else(|| ApiError::not_found(format!("The signing platform {id} does not exist.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_platform_signs_ecdsa_sha256() {
        let p = find("AmazonFreeRTOS-Default").expect("platform");
        assert_eq!(p.algorithms(None), (Hash::Sha256, "ECDSA"));
        assert!(p.unsupported.is_none());
        let v = p.json();
        assert_eq!(v["category"], "AWS");
        assert_eq!(v["maxSizeInMB"], 16);
        assert_eq!(
            v["signingConfiguration"]["encryptionAlgorithmOptions"]["defaultValue"],
            "ECDSA"
        );
        assert_eq!(v["signingImageFormat"]["defaultFormat"], "JSONEmbedded");
    }

    #[test]
    fn overrides_must_fit_the_platform() {
        let p = find("AmazonFreeRTOS-Default").expect("platform");
        assert!(
            p.check_overrides(&json!({"signingConfiguration": {"hashAlgorithm": "SHA256"}}))
                .is_ok()
        );
        assert!(
            p.check_overrides(&json!({"signingConfiguration": {"encryptionAlgorithm": "RSA"}}))
                .is_err()
        );
        assert!(
            p.check_overrides(&json!({"signingConfiguration": {"hashAlgorithm": "MD5"}}))
                .is_err()
        );
        assert!(
            p.check_overrides(&json!({"signingImageFormat": "JSONDetached"}))
                .is_err()
        );
        assert!(p.check_overrides(&json!({"bogus": 1})).is_err());
        let ti = find("AmazonFreeRTOS-TI-CC3220SF").expect("platform");
        assert_eq!(ti.algorithms(None), (Hash::Sha1, "RSA"));
        assert!(ti.unsupported.is_some());
    }
}
