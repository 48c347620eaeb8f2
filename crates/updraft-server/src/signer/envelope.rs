//! The signed object signer writes for the AmazonFreeRTOS platforms (image format
//! `JSONEmbedded`): one JSON document holding the payload and its signature,
//!
//! ```text
//! {"rawPayloadSize":70001,"signature":"MEUCIQ…","signatureAlgorithm":"SHA256withECDSA","payload":"<base64>"}
//! ```
//!
//! in that key order, as AWS writes it. Devices never see this document: an OTA update
//! delivers the raw payload, with the signature in the job document.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use thiserror::Error;

use super::crypto::Hash;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvelopeError {
    #[error("the signed object is not a signer JSON document: {0}")]
    Json(String),
    #[error("the signed object's {0} is not valid base64")]
    Base64(&'static str),
    #[error("the signed object says rawPayloadSize {said} but carries {actual} bytes")]
    Size { said: u64, actual: u64 },
}

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub payload: Vec<u8>,
    /// The DER signature.
    pub signature: Vec<u8>,
    pub signature_algorithm: String,
}

/// The envelope's name for a signature algorithm: `SHA256withECDSA`, `SHA256withRSA`.
pub fn algorithm_name(hash: Hash, encryption: &str) -> String {
    format!("{}with{}", hash.name(), encryption)
}

/// The envelope of `payload` signed with `signature` (DER).
pub fn encode(payload: &[u8], signature: &[u8], hash: Hash, encryption: &str) -> Vec<u8> {
    // Every value is a number or base64 text, so no JSON escaping is needed and the key
    // order can be AWS's.
    format!(
        "{{\"rawPayloadSize\":{},\"signature\":\"{}\",\"signatureAlgorithm\":\"{}\",\"payload\":\"{}\"}}",
        payload.len(),
        B64.encode(signature),
        algorithm_name(hash, encryption),
        B64.encode(payload)
    )
    .into_bytes()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    raw_payload_size: u64,
    signature: String,
    signature_algorithm: String,
    payload: String,
}

/// Reads an envelope, checking that the payload has the size it claims.
pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
    let w: Wire = serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Json(e.to_string()))?;
    let payload = B64
        .decode(w.payload.as_bytes())
        .map_err(|_| EnvelopeError::Base64("payload"))?;
    let signature = B64
        .decode(w.signature.as_bytes())
        .map_err(|_| EnvelopeError::Base64("signature"))?;
    let actual = payload.len() as u64;
    if actual != w.raw_payload_size {
        return Err(EnvelopeError::Size {
            said: w.raw_payload_size,
            actual,
        });
    }
    Ok(Envelope {
        payload,
        signature,
        signature_algorithm: w.signature_algorithm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_in_aws_key_order() {
        let bytes = encode(
            b"\x00\x01firmware",
            &[0x30, 0x06, 1, 2],
            Hash::Sha256,
            "ECDSA",
        );
        let text = String::from_utf8(bytes.clone()).expect("utf8");
        assert_eq!(
            text,
            "{\"rawPayloadSize\":10,\"signature\":\"MAYBAg==\",\"signatureAlgorithm\":\"SHA256withECDSA\",\"payload\":\"AAFmaXJtd2FyZQ==\"}"
        );
        let e = decode(&bytes).expect("decode");
        assert_eq!(e.payload, b"\x00\x01firmware");
        assert_eq!(e.signature, [0x30, 0x06, 1, 2]);
        assert_eq!(e.signature_algorithm, "SHA256withECDSA");
    }

    #[test]
    fn lies_and_garbage_are_refused() {
        let short =
            br#"{"rawPayloadSize":9,"signature":"AA==","signatureAlgorithm":"x","payload":"AAAA"}"#;
        assert_eq!(
            decode(short),
            Err(EnvelopeError::Size { said: 9, actual: 3 })
        );
        assert!(matches!(decode(b"firmware"), Err(EnvelopeError::Json(_))));
        let bad =
            br#"{"rawPayloadSize":1,"signature":"AA==","signatureAlgorithm":"x","payload":"***"}"#;
        assert_eq!(decode(bad), Err(EnvelopeError::Base64("payload")));
    }
}
