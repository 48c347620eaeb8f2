//! The `afr_ota` job document that CreateOTAUpdate generates and OTA agents parse.
//!
//! Key order and types follow what AWS generates and what the FreeRTOS C agent
//! can parse: numbers are never `null`, absent URLs are `null`, and the
//! signature key is `sig-<hash>-<algorithm>` in lower case.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::job::Protocol;

/// The stored-URL placeholder that the service replaces with a pre-signed URL at delivery.
pub fn presigned_placeholder(region: &str, bucket: &str, key: &str) -> String {
    format!("${{aws:iot:s3-presigned-url:https://s3.{region}.amazonaws.com/{bucket}/{key}}}")
}

/// The authentication scheme devices use for pre-signed HTTP downloads.
pub const AUTH_SCHEME_PRESIGNED: &str = "aws.s3.presigned";

/// One file of an OTA job document.
#[derive(Debug, Clone, PartialEq)]
pub struct OtaFile {
    pub file_path: String,
    pub file_size: u64,
    pub file_id: u32,
    pub cert_file: Option<String>,
    pub file_type: Option<u32>,
    /// The placeholder URL for HTTP delivery, if the update uses HTTP.
    pub update_data_url: Option<String>,
    /// The signature, if any: (`sig-…` key, base64 value).
    pub signature: Option<Signature>,
}

/// A file signature as carried in the document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// Hash algorithm as given (e.g. `SHA256`).
    pub hash_algorithm: Option<String>,
    /// Signature algorithm as given (e.g. `ECDSA`).
    pub signature_algorithm: Option<String>,
    /// The base64 signature.
    pub value: String,
}

impl Signature {
    /// The document key for this signature: `sig-sha256-ecdsa`, or `sig--` without algorithms.
    pub fn key(&self) -> String {
        format!(
            "sig-{}-{}",
            self.hash_algorithm
                .as_deref()
                .unwrap_or("")
                .to_ascii_lowercase(),
            self.signature_algorithm
                .as_deref()
                .unwrap_or("")
                .to_ascii_lowercase()
        )
    }
}

/// An `afr_ota` document.
#[derive(Debug, Clone, PartialEq)]
pub struct OtaJobDocument {
    pub protocols: Vec<Protocol>,
    pub stream_name: Option<String>,
    pub files: Vec<OtaFile>,
}

impl OtaJobDocument {
    /// The document as a JSON value, `{"afr_ota": {...}}`.
    pub fn to_value(&self) -> Value {
        let mut files = Vec::with_capacity(self.files.len());
        for f in &self.files {
            let mut m = Map::new();
            m.insert("filepath".into(), Value::String(f.file_path.clone()));
            m.insert("filesize".into(), Value::from(f.file_size));
            m.insert("fileid".into(), Value::from(f.file_id));
            m.insert(
                "certfile".into(),
                f.cert_file
                    .clone()
                    .map(Value::String)
                    .unwrap_or(Value::Null),
            );
            if let Some(t) = f.file_type {
                m.insert("fileType".into(), Value::from(t));
            }
            match &f.update_data_url {
                Some(url) => {
                    m.insert("update_data_url".into(), Value::String(url.clone()));
                    m.insert(
                        "auth_scheme".into(),
                        Value::String(AUTH_SCHEME_PRESIGNED.into()),
                    );
                }
                None => {
                    m.insert("update_data_url".into(), Value::Null);
                    m.insert("auth_scheme".into(), Value::Null);
                }
            }
            if let Some(sig) = &f.signature {
                m.insert(sig.key(), Value::String(sig.value.clone()));
            }
            files.push(Value::Object(m));
        }
        let mut ota = Map::new();
        ota.insert(
            "protocols".into(),
            Value::Array(
                self.protocols
                    .iter()
                    .map(|p| Value::String(p.as_str().into()))
                    .collect(),
            ),
        );
        if let Some(name) = &self.stream_name {
            ota.insert("streamname".into(), Value::String(name.clone()));
        }
        ota.insert("files".into(), Value::Array(files));
        let mut root = Map::new();
        root.insert("afr_ota".into(), Value::Object(ota));
        Value::Object(root)
    }

    /// The document as the compact JSON text stored with the job.
    pub fn to_json(&self) -> String {
        self.to_value().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_document_matches_aws_shape() {
        let doc = OtaJobDocument {
            protocols: vec![Protocol::Mqtt],
            stream_name: Some("AFR_OTA-1234".into()),
            files: vec![OtaFile {
                file_path: "fw.bin".into(),
                file_size: 624244,
                file_id: 0,
                cert_file: Some("/certs/signer.pem".into()),
                file_type: Some(0),
                update_data_url: None,
                signature: Some(Signature {
                    hash_algorithm: Some("SHA256".into()),
                    signature_algorithm: Some("ECDSA".into()),
                    value: "MEUCIQ==".into(),
                }),
            }],
        };
        let v = doc.to_value();
        let ota = &v["afr_ota"];
        assert_eq!(ota["protocols"], serde_json::json!(["MQTT"]));
        assert_eq!(ota["streamname"], "AFR_OTA-1234");
        let f = &ota["files"][0];
        assert_eq!(f["filepath"], "fw.bin");
        assert_eq!(f["filesize"], 624244);
        assert_eq!(f["fileid"], 0);
        assert_eq!(f["certfile"], "/certs/signer.pem");
        assert_eq!(f["fileType"], 0);
        assert!(f["update_data_url"].is_null());
        assert!(f["auth_scheme"].is_null());
        assert_eq!(f["sig-sha256-ecdsa"], "MEUCIQ==");
    }

    #[test]
    fn http_document_has_placeholder_and_no_stream() {
        let url = presigned_placeholder("us-east-1", "b", "k/fw.bin");
        assert_eq!(
            url,
            "${aws:iot:s3-presigned-url:https://s3.us-east-1.amazonaws.com/b/k/fw.bin}"
        );
        let doc = OtaJobDocument {
            protocols: vec![Protocol::Http],
            stream_name: None,
            files: vec![OtaFile {
                file_path: "fw".into(),
                file_size: 1,
                file_id: 0,
                cert_file: None,
                file_type: None,
                update_data_url: Some(url.clone()),
                signature: Some(Signature {
                    hash_algorithm: None,
                    signature_algorithm: None,
                    value: "AA==".into(),
                }),
            }],
        };
        let v = doc.to_value();
        assert!(v["afr_ota"].get("streamname").is_none());
        assert_eq!(v["afr_ota"]["files"][0]["update_data_url"], url.as_str());
        assert_eq!(v["afr_ota"]["files"][0]["auth_scheme"], "aws.s3.presigned");
        assert_eq!(v["afr_ota"]["files"][0]["sig--"], "AA==");
        assert!(v["afr_ota"]["files"][0].get("fileType").is_none());
    }
}
