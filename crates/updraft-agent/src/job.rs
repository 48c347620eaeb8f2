//! Job messages as the agent receives them — `$next/get/accepted` and `notify-next`
//! (data-plane reference §1.3) — and the `afr_ota` document inside (§3), parsed into
//! `updraft-protocol`'s [`OtaJobDocument`].
//!
//! Parsing accepts what the C agent accepts (§3.4): numbers as JSON integers or as numeric
//! strings (decimal, `0x` hex, leading-`0` octal), `null` for unused strings, extra keys;
//! only `files[0]` is used. It refuses what the C agent refuses: `null`, negative or
//! fractional numbers, a zero file size.

use serde_json::{Map, Value};
use std::collections::BTreeMap;

use updraft_protocol::ExecutionStatus;
use updraft_protocol::job::Protocol;
use updraft_protocol::otadoc::{OtaFile, OtaJobDocument, Signature};
use updraft_protocol::streams::base64_decode;

use crate::error::{Error, JobParseError, OtaError};
use crate::pal::FileContext;
use crate::verify::SIGNATURE_KEY;
use crate::version::{AppVersion, parse_c_uint};

/// The `statusDetails` key that marks a job whose image is under self-test.
pub const SELF_TEST_KEY: &str = "self_test";
/// The `statusDetails` key carrying the version that downloaded the image.
pub const UPDATED_BY_KEY: &str = "updatedBy";

/// What a job message carries.
#[derive(Debug, Clone, PartialEq)]
pub enum JobMessage {
    /// Nothing pending (`{"timestamp":N}`, maybe with the client token).
    NoJob,
    /// A job whose document is not an `afr_ota` document: the application's business.
    Custom { job_id: String, document: Value },
    /// An OTA job.
    Ota(Box<OtaJob>),
}

/// An OTA job execution as delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct OtaJob {
    pub job_id: String,
    /// Which execution of the job this is (a retried job has the same id and a higher
    /// number), when the message says.
    pub execution_number: Option<u64>,
    /// When the execution was queued (`queuedAt`): tells a job deleted and created again
    /// under the same id (its execution numbers start again at 1) from the old one.
    pub queued_at: Option<u64>,
    pub status: Option<ExecutionStatus>,
    pub status_details: BTreeMap<String, String>,
    pub document: OtaJobDocument,
}

/// Where a job's file is downloaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// MQTT Streams: the stream id.
    Stream(String),
    /// HTTP: the pre-signed URL.
    Http(String),
}

/// A refused job message: the code, why, and the job id when it was readable (a job
/// without one cannot be reported on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub job_id: Option<String>,
    pub code: JobParseError,
    pub detail: String,
}

impl From<JobError> for Error {
    fn from(e: JobError) -> Self {
        Error::parse(e.code, e.detail)
    }
}

impl OtaJob {
    /// The first file (the only one the agent uses, as the C agent).
    pub fn file(&self) -> Option<&OtaFile> {
        self.document.files.first()
    }

    /// `statusDetails.self_test`, present while the image is being (or about to be) tested.
    pub fn self_test(&self) -> Option<&str> {
        self.status_details.get(SELF_TEST_KEY).map(String::as_str)
    }

    /// `statusDetails.updatedBy`: the version that downloaded the image (`0x00090002`).
    pub fn updated_by(&self) -> Option<AppVersion> {
        self.status_details
            .get(UPDATED_BY_KEY)
            .and_then(|s| parse_c_uint(s))
            .map(AppVersion::from_u32)
    }

    /// Where the file comes from: the first protocol of `preference` (the agent's enabled
    /// protocols, best first — the C agent's `configOTA_PRIMARY_DATA_PROTOCOL` then the
    /// rest) that the job offers and can be used: MQTT needs a `streamname`, HTTP an
    /// `update_data_url` the service has pre-signed (`https` only when `https` is true, i.e.
    /// a CA is configured).
    ///
    /// Errors: [`OtaError::InvalidDataProtocol`] when no offered protocol is usable.
    pub fn data_source(&self, preference: &[Protocol], https: bool) -> Result<DataSource, Error> {
        let mut why = Vec::new();
        for p in preference {
            if !self.document.protocols.contains(p) {
                continue;
            }
            match p {
                Protocol::Mqtt => match self.document.stream_name.as_deref() {
                    Some(s) if !s.is_empty() => return Ok(DataSource::Stream(s.to_owned())),
                    _ => why.push("MQTT is offered without a streamname".to_owned()),
                },
                Protocol::Http => match self.file().and_then(|f| f.update_data_url.as_deref()) {
                    None | Some("") => why.push("HTTP is offered without update_data_url".into()),
                    Some(u) if u.starts_with("${") => {
                        why.push("update_data_url was not pre-signed by the service".into())
                    }
                    Some(u)
                        if u.get(..8)
                            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
                            && !https =>
                    {
                        why.push("update_data_url is https but no CA is configured".into())
                    }
                    Some(u) => return Ok(DataSource::Http(u.to_owned())),
                },
            }
        }
        if why.is_empty() {
            why.push(format!(
                "the job offers {:?}, this agent takes {preference:?}",
                self.document.protocols
            ));
        }
        Err(Error::agent(OtaError::InvalidDataProtocol, why.join("; ")))
    }

    /// Checks the job's file against what this agent can do and builds the file context.
    ///
    /// Errors: [`JobParseError::ZeroFileSize`], [`JobParseError::NonConformingJobDoc`] (no
    /// `sig-sha256-ecdsa`, no `certfile`), [`JobParseError::BadModelInitParams`] (more than
    /// `max_file_size` bytes).
    pub fn file_context(&self, block_size: u32, max_file_size: u64) -> Result<FileContext, Error> {
        let nonconforming = |d: &str| Error::parse(JobParseError::NonConformingJobDoc, d);
        let file = self
            .file()
            .ok_or_else(|| nonconforming("afr_ota.files is empty"))?;
        if file.file_size == 0 {
            return Err(Error::parse(JobParseError::ZeroFileSize, "filesize is 0"));
        }
        if file.file_size > max_file_size {
            return Err(Error::parse(
                JobParseError::BadModelInitParams,
                format!(
                    "filesize {} is more than the {max_file_size} bytes this agent accepts",
                    file.file_size
                ),
            ));
        }
        let sig = file
            .signature
            .as_ref()
            .filter(|s| s.key() == SIGNATURE_KEY)
            .ok_or_else(|| nonconforming("the file has no sig-sha256-ecdsa signature"))?;
        let signature = base64_decode(&sig.value)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| nonconforming("sig-sha256-ecdsa is not base64"))?;
        let cert_file = file
            .cert_file
            .clone()
            .filter(|c| !c.is_empty() && c != "null")
            .ok_or_else(|| nonconforming("the file has no certfile"))?;
        Ok(FileContext {
            job_id: self.job_id.clone(),
            file_path: file.file_path.clone(),
            file_size: file.file_size,
            file_id: file.file_id,
            file_type: file.file_type.unwrap_or(0),
            cert_file,
            signature,
            block_size,
        })
    }
}

/// Parses a `$next/get/accepted`, `…/{jobId}/get/accepted` or `notify-next` message.
pub fn parse_job_message(payload: &[u8]) -> Result<JobMessage, JobError> {
    let fail = |job_id: Option<&str>, code, detail: String| JobError {
        job_id: job_id.map(str::to_owned),
        code,
        detail,
    };
    let root: Value = serde_json::from_slice(payload).map_err(|e| {
        fail(
            None,
            JobParseError::NonConformingJobDoc,
            format!("not JSON: {e}"),
        )
    })?;
    let Some(root) = root.as_object() else {
        return Err(fail(
            None,
            JobParseError::NonConformingJobDoc,
            "not a JSON object".into(),
        ));
    };
    let Some(execution) = root.get("execution") else {
        return Ok(JobMessage::NoJob);
    };
    let Some(execution) = execution.as_object() else {
        return Err(fail(
            None,
            JobParseError::NonConformingJobDoc,
            "execution is not an object".into(),
        ));
    };
    let Some(job_id) = execution.get("jobId").and_then(Value::as_str) else {
        return Err(fail(
            None,
            JobParseError::NullJob,
            "execution has no jobId".into(),
        ));
    };
    let id = Some(job_id);
    let document = match execution.get("jobDocument") {
        Some(Value::Object(d)) => d,
        Some(Value::String(s)) => {
            // The HTTPS flavour carries the document as a string; accept it here too.
            return match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(d)) => classify(job_id, execution, &d),
                _ => Err(fail(
                    id,
                    JobParseError::NonConformingJobDoc,
                    "jobDocument is not a JSON object".into(),
                )),
            };
        }
        None => {
            return Err(fail(
                id,
                JobParseError::NonConformingJobDoc,
                "execution has no jobDocument".into(),
            ));
        }
        Some(_) => {
            return Err(fail(
                id,
                JobParseError::NonConformingJobDoc,
                "jobDocument is not an object".into(),
            ));
        }
    };
    classify(job_id, execution, document)
}

fn classify(
    job_id: &str,
    execution: &Map<String, Value>,
    document: &Map<String, Value>,
) -> Result<JobMessage, JobError> {
    let Some(ota) = document.get("afr_ota") else {
        return Ok(JobMessage::Custom {
            job_id: job_id.to_owned(),
            document: Value::Object(document.clone()),
        });
    };
    let fail = |detail: String| JobError {
        job_id: Some(job_id.to_owned()),
        code: JobParseError::NonConformingJobDoc,
        detail,
    };
    let document = parse_afr_ota(ota).map_err(fail)?;
    let status = execution
        .get("status")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok());
    let status_details = execution
        .get("statusDetails")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    Ok(JobMessage::Ota(Box::new(OtaJob {
        job_id: job_id.to_owned(),
        execution_number: execution.get("executionNumber").and_then(Value::as_u64),
        queued_at: execution.get("queuedAt").and_then(Value::as_u64),
        status,
        status_details,
        document,
    })))
}

/// A number the way the C agent reads one: a JSON unsigned integer or a numeric string.
fn number(v: &Value, key: &str) -> Result<u64, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("'{key}' must be an unsigned integer, found {n}")),
        Value::String(s) => parse_c_uint(s)
            .map(u64::from)
            .ok_or_else(|| format!("'{key}' is not a number: '{s}'")),
        other => Err(format!("'{key}' must be a number, found {other}")),
    }
}

/// A string, with JSON `null` read as absent (AWS emits `null` for unused strings).
fn opt_string(v: Option<&Value>, key: &str) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("'{key}' must be a string, found {other}")),
    }
}

/// Parses the value of `afr_ota` into the protocol crate's document type.
pub fn parse_afr_ota(ota: &Value) -> Result<OtaJobDocument, String> {
    let ota = ota.as_object().ok_or("afr_ota is not an object")?;
    let protocols = ota
        .get("protocols")
        .and_then(Value::as_array)
        .ok_or("afr_ota.protocols is missing or not an array")?
        .iter()
        .filter_map(|p| p.as_str().and_then(|s| s.parse::<Protocol>().ok()))
        .collect::<Vec<_>>();
    let stream_name = opt_string(ota.get("streamname"), "streamname")?;
    let files = ota
        .get("files")
        .and_then(Value::as_array)
        .ok_or("afr_ota.files is missing or not an array")?;
    let first = files.first().ok_or("afr_ota.files is empty")?;
    Ok(OtaJobDocument {
        protocols,
        stream_name,
        files: vec![parse_file(first)?],
    })
}

fn parse_file(v: &Value) -> Result<OtaFile, String> {
    let f = v.as_object().ok_or("files[0] is not an object")?;
    let required = |key: &str| f.get(key).ok_or_else(|| format!("files[0] has no '{key}'"));
    let file_size = number(required("filesize")?, "filesize")?;
    let file_id = u32::try_from(number(required("fileid")?, "fileid")?)
        .map_err(|_| "'fileid' is out of range".to_owned())?;
    let file_type = f
        .get("fileType")
        .map(|v| number(v, "fileType"))
        .transpose()?
        .map(|t| u32::try_from(t).map_err(|_| "'fileType' is out of range".to_owned()))
        .transpose()?;
    let signature = f
        .iter()
        .find_map(|(k, v)| k.strip_prefix("sig-").map(|rest| (rest, v)))
        .map(|(rest, v)| -> Result<Signature, String> {
            let (hash, alg) = rest.split_once('-').unwrap_or((rest, ""));
            let value = opt_string(Some(v), "sig")?.unwrap_or_default();
            Ok(Signature {
                hash_algorithm: (!hash.is_empty()).then(|| hash.to_ascii_uppercase()),
                signature_algorithm: (!alg.is_empty()).then(|| alg.to_ascii_uppercase()),
                value,
            })
        })
        .transpose()?;
    Ok(OtaFile {
        file_path: opt_string(f.get("filepath"), "filepath")?.unwrap_or_default(),
        file_size,
        file_id,
        cert_file: opt_string(f.get("certfile"), "certfile")?,
        file_type,
        update_data_url: opt_string(f.get("update_data_url"), "update_data_url")?,
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(file: Value) -> Value {
        json!({"clientToken":"0:t","timestamp":1602795143,"execution":{
            "jobId":"AFR_OTA-1","status":"QUEUED","queuedAt":1,"lastUpdatedAt":1,
            "versionNumber":1,"executionNumber":1,
            "jobDocument":{"afr_ota":{"protocols":["MQTT"],"streamname":"AFR_OTA-s",
                "files":[file]}}}})
    }

    fn good_file() -> Value {
        json!({"filepath":"fw.bin","filesize":1000,"fileid":0,"certfile":"/c.pem",
               "update_data_url":null,"auth_scheme":null,"sig-sha256-ecdsa":"MEUCIQ=="})
    }

    fn ota(v: &Value) -> OtaJob {
        match parse_job_message(v.to_string().as_bytes()) {
            Ok(JobMessage::Ota(j)) => *j,
            other => panic!("not an OTA job: {other:?}"),
        }
    }

    #[test]
    fn aws_shaped_document() {
        let j = ota(&doc(good_file()));
        assert_eq!(j.job_id, "AFR_OTA-1");
        assert_eq!(j.status, Some(ExecutionStatus::Queued));
        assert_eq!(j.document.stream_name.as_deref(), Some("AFR_OTA-s"));
        let f = j.file().expect("file");
        assert_eq!((f.file_size, f.file_id, f.file_type), (1000, 0, None));
        assert_eq!(f.cert_file.as_deref(), Some("/c.pem"));
        assert_eq!(f.update_data_url, None);
        let sig = f.signature.as_ref().expect("sig");
        assert_eq!(sig.key(), "sig-sha256-ecdsa");
        let ctx = j.file_context(4096, 1 << 24).expect("context");
        assert_eq!(ctx.signature, vec![0x30, 0x45, 0x02, 0x21]);
        assert_eq!(ctx.cert_file, "/c.pem");
        assert_eq!(j.self_test(), None);
    }

    #[test]
    fn c_agent_number_forms() {
        let mut f = good_file();
        f["filesize"] = json!("0x400");
        f["fileid"] = json!("010");
        f["fileType"] = json!(0);
        let j = ota(&doc(f));
        let file = j.file().expect("file");
        assert_eq!(
            (file.file_size, file.file_id, file.file_type),
            (1024, 8, Some(0))
        );
        for bad in [
            json!(null),
            json!(-1),
            json!(1.5),
            json!("12ab"),
            json!(true),
        ] {
            let mut f = good_file();
            f["filesize"] = bad.clone();
            let e = parse_job_message(doc(f).to_string().as_bytes()).expect_err("bad number");
            assert_eq!(e.code, JobParseError::NonConformingJobDoc, "{bad}");
            assert_eq!(e.job_id.as_deref(), Some("AFR_OTA-1"));
        }
    }

    #[test]
    fn empty_custom_and_broken_messages() {
        assert_eq!(
            parse_job_message(br#"{"clientToken":"0:t","timestamp":1}"#),
            Ok(JobMessage::NoJob)
        );
        assert_eq!(
            parse_job_message(br#"{"timestamp":1}"#),
            Ok(JobMessage::NoJob)
        );
        let custom = json!({"execution":{"jobId":"j","jobDocument":{"operation":"reboot"}}});
        assert!(matches!(
            parse_job_message(custom.to_string().as_bytes()),
            Ok(JobMessage::Custom { job_id, .. }) if job_id == "j"
        ));
        let e = parse_job_message(b"{nope").expect_err("json");
        assert_eq!(
            (e.code, e.job_id),
            (JobParseError::NonConformingJobDoc, None)
        );
        let e = parse_job_message(br#"{"execution":{}}"#).expect_err("no id");
        assert_eq!(e.code, JobParseError::NullJob);
        let e = parse_job_message(br#"{"execution":{"jobId":"j"}}"#).expect_err("no doc");
        assert_eq!(e.job_id.as_deref(), Some("j"));
        let no_files = json!({"execution":{"jobId":"j","jobDocument":{"afr_ota":{
            "protocols":["MQTT"],"files":[]}}}});
        assert!(parse_job_message(no_files.to_string().as_bytes()).is_err());
        // The HTTPS flavour: the document as a string.
        let mut v = doc(good_file());
        let d = v["execution"]["jobDocument"].to_string();
        v["execution"]["jobDocument"] = Value::String(d);
        assert_eq!(ota(&v).job_id, "AFR_OTA-1");
    }

    #[test]
    fn validation_for_this_agent() {
        let check = |f: Value| ota(&doc(f)).file_context(4096, 1 << 20);
        let mut f = good_file();
        f["filesize"] = json!(0);
        assert!(matches!(
            check(f),
            Err(Error::JobParse {
                code: JobParseError::ZeroFileSize,
                ..
            })
        ));
        let mut f = good_file();
        f["filesize"] = json!((1 << 20) + 1);
        assert!(matches!(
            check(f),
            Err(Error::JobParse {
                code: JobParseError::BadModelInitParams,
                ..
            })
        ));
        for (key, value) in [
            ("sig-sha256-ecdsa", Value::Null),
            ("sig-sha256-ecdsa", json!("not base64!")),
            ("certfile", Value::Null),
        ] {
            let mut f = good_file();
            f[key] = value;
            assert!(
                matches!(
                    check(f),
                    Err(Error::JobParse {
                        code: JobParseError::NonConformingJobDoc,
                        ..
                    })
                ),
                "{key}"
            );
        }
        let mut f = good_file();
        let sig = f["sig-sha256-ecdsa"].take();
        f.as_object_mut().expect("obj").remove("sig-sha256-ecdsa");
        f["sig-sha1-rsa"] = sig;
        assert!(check(f).is_err());
    }

    #[test]
    fn protocol_choice_follows_the_preference() {
        let both = [Protocol::Mqtt, Protocol::Http];
        let invalid = |r: Result<DataSource, Error>| {
            matches!(
                r,
                Err(Error::Agent {
                    code: OtaError::InvalidDataProtocol,
                    ..
                })
            )
        };
        let j = ota(&doc(good_file()));
        assert_eq!(
            j.data_source(&both, false).expect("mqtt"),
            DataSource::Stream("AFR_OTA-s".into())
        );
        assert!(invalid(j.data_source(&[Protocol::Http], false)));
        let mut v = doc(good_file());
        v["execution"]["jobDocument"]["afr_ota"]["protocols"] = json!(["MQTT", "HTTP"]);
        v["execution"]["jobDocument"]["afr_ota"]["files"][0]["update_data_url"] =
            json!("http://h:1/b/k?X-Amz-Signature=s");
        let j = ota(&v);
        assert!(matches!(
            j.data_source(&both, false),
            Ok(DataSource::Stream(_))
        ));
        let http_first = [Protocol::Http, Protocol::Mqtt];
        assert_eq!(
            j.data_source(&http_first, false).expect("http"),
            DataSource::Http("http://h:1/b/k?X-Amz-Signature=s".into())
        );
        // HTTP only, without a stream name (AWS's HTTP-only document).
        v["execution"]["jobDocument"]["afr_ota"]["protocols"] = json!(["HTTP"]);
        v["execution"]["jobDocument"]["afr_ota"]
            .as_object_mut()
            .expect("obj")
            .remove("streamname");
        assert!(matches!(
            ota(&v).data_source(&both, false),
            Ok(DataSource::Http(_))
        ));
        assert!(invalid(ota(&v).data_source(&[Protocol::Mqtt], false)));
        // https needs a CA; a placeholder was never pre-signed.
        v["execution"]["jobDocument"]["afr_ota"]["files"][0]["update_data_url"] =
            json!("https://h/b/k");
        assert!(invalid(ota(&v).data_source(&both, false)));
        assert!(matches!(
            ota(&v).data_source(&both, true),
            Ok(DataSource::Http(_))
        ));
        v["execution"]["jobDocument"]["afr_ota"]["files"][0]["update_data_url"] =
            json!("${aws:iot:s3-presigned-url:https://s3.r.amazonaws.com/b/k}");
        assert!(invalid(ota(&v).data_source(&both, true)));
        // MQTT without a stream name.
        let mut v = doc(good_file());
        v["execution"]["jobDocument"]["afr_ota"]
            .as_object_mut()
            .expect("obj")
            .remove("streamname");
        assert!(invalid(ota(&v).data_source(&both, true)));
    }

    #[test]
    fn self_test_details() {
        let mut v = doc(good_file());
        v["execution"]["status"] = json!("IN_PROGRESS");
        v["execution"]["statusDetails"] = json!({"self_test":"ready","updatedBy":"0x00090002"});
        let j = ota(&v);
        assert_eq!(j.self_test(), Some("ready"));
        assert_eq!(j.updated_by(), Some(AppVersion::new(0, 9, 2)));
        assert_eq!(j.status, Some(ExecutionStatus::InProgress));
    }
}
