//! The control plane's error model: one table of AWS error codes and HTTP
//! statuses, rendered in one place in the shape of the request's protocol
//! ([`ErrorShape`]): rest-json (`x-amzn-ErrorType` header + `{"message": ...}` body),
//! signer's rest-json (the body also names the `code`), or json 1.1 (`__type`).

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::store::StoreError;

macro_rules! error_codes {
    ($($variant:ident => ($name:literal, $status:literal)),+ $(,)?) => {
        /// An AWS error code and the HTTP status it travels with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode { $($variant),+ }

        impl ErrorCode {
            /// The code as botocore matches it (`x-amzn-ErrorType`).
            pub fn name(self) -> &'static str {
                match self { $(ErrorCode::$variant => $name),+ }
            }

            /// The HTTP status AWS sends with this code.
            pub fn status(self) -> StatusCode {
                let code = match self { $(ErrorCode::$variant => $status),+ };
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    };
}

error_codes! {
    InvalidRequest => ("InvalidRequestException", 400),
    Throttling => ("ThrottlingException", 400),
    Unauthorized => ("UnauthorizedException", 401),
    CertificateState => ("CertificateStateException", 406),
    ResourceNotFound => ("ResourceNotFoundException", 404),
    ResourceAlreadyExists => ("ResourceAlreadyExistsException", 409),
    VersionConflict => ("VersionConflictException", 409),
    DeleteConflict => ("DeleteConflictException", 409),
    InvalidStateTransition => ("InvalidStateTransitionException", 409),
    Conflict => ("ConflictException", 409),
    LimitExceeded => ("LimitExceededException", 410),
    InternalFailure => ("InternalFailureException", 500),
    ServiceUnavailable => ("ServiceUnavailableException", 503),
    NotImplemented => ("NotImplementedException", 501),
    // iot-jobs-data's own statuses.
    TerminalState => ("TerminalStateException", 410),
    DataPlaneThrottling => ("ThrottlingException", 429),
    // Authentication failures, as AWS's rest-json front door reports them.
    MissingAuthenticationToken => ("MissingAuthenticationTokenException", 403),
    UnrecognizedClient => ("UnrecognizedClientException", 403),
    InvalidSignature => ("InvalidSignatureException", 403),
    IncompleteSignature => ("IncompleteSignatureException", 403),
    // signer (rest-json; every error body also carries `code`).
    Validation => ("ValidationException", 400),
    AccessDenied => ("AccessDeniedException", 403),
    ServiceLimitExceeded => ("ServiceLimitExceededException", 402),
    TooManyRequests => ("TooManyRequestsException", 429),
    InternalServiceError => ("InternalServiceErrorException", 500),
    // acm (json 1.1: client errors are all 400, the code travels in `__type`).
    AcmValidation => ("ValidationException", 400),
    AcmResourceNotFound => ("ResourceNotFoundException", 400),
    ResourceInUse => ("ResourceInUseException", 400),
    InvalidArn => ("InvalidArnException", 400),
    InvalidParameter => ("InvalidParameterException", 400),
    InvalidTag => ("InvalidTagException", 400),
    TooManyTags => ("TooManyTagsException", 400),
    InvalidArgs => ("InvalidArgsException", 400),
    AcmLimitExceeded => ("LimitExceededException", 400),
    AcmConflict => ("ConflictException", 400),
    Serialization => ("SerializationException", 400),
    UnknownOperation => ("UnknownOperationException", 400),
}

/// The error shapes of the protocols Updraft speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// rest-json as iot and iot-jobs-data send it: `{"message"}` and `x-amzn-ErrorType`.
    RestJson,
    /// rest-json as signer sends it: `{"message", "code"}` and `x-amzn-ErrorType`.
    Signer,
    /// json 1.1 (acm): `{"__type", "message"}`, `application/x-amz-json-1.1`.
    Json11,
}

/// The content type of json 1.1 responses.
pub const JSON11: &str = "application/x-amz-json-1.1";

/// An error answered to a control-plane client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Extra body members some error shapes carry (`resourceId`, `resourceArn`).
    pub extra: Vec<(&'static str, String)>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            extra: Vec::new(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ResourceNotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InternalFailure, message)
    }

    /// A 409 ResourceAlreadyExistsException naming the resource.
    pub fn already_exists(message: impl Into<String>, id: &str, arn: Option<String>) -> Self {
        let mut e = Self::new(ErrorCode::ResourceAlreadyExists, message);
        e.extra.push(("resourceId", id.to_owned()));
        if let Some(arn) = arn {
            e.extra.push(("resourceArn", arn));
        }
        e
    }

    fn body(&self, shape: ErrorShape) -> Value {
        let mut m = Map::new();
        if shape == ErrorShape::Json11 {
            m.insert("__type".into(), Value::String(self.code.name().into()));
        }
        m.insert("message".into(), Value::String(self.message.clone()));
        if shape == ErrorShape::Signer {
            m.insert("code".into(), Value::String(self.code.name().into()));
        }
        for (k, v) in &self.extra {
            m.insert((*k).into(), Value::String(v.clone()));
        }
        Value::Object(m)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.name(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// The error as a response in the shape of the protocol the request used.
    pub fn into_response_as(self, shape: ErrorShape) -> Response {
        if self.code.status().is_server_error() {
            tracing::error!(code = self.code.name(), message = %self.message, "request failed");
        }
        let mut resp = (self.code.status(), axum::Json(self.body(shape))).into_response();
        if let Ok(v) = HeaderValue::from_str(self.code.name()) {
            resp.headers_mut().insert("x-amzn-ErrorType", v);
        }
        if shape == ErrorShape::Json11 {
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static(JSON11));
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_as(ErrorShape::RestJson)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::not_found(what),
            StoreError::AlreadyExists(what) => {
                ApiError::new(ErrorCode::ResourceAlreadyExists, what)
            }
            StoreError::VersionConflict(what) => ApiError::new(ErrorCode::VersionConflict, what),
            StoreError::Conflict(what) => ApiError::new(ErrorCode::DeleteConflict, what),
            StoreError::InvalidState(what) => {
                ApiError::new(ErrorCode::InvalidStateTransition, what)
            }
            StoreError::LimitExceeded(what) => ApiError::new(ErrorCode::LimitExceeded, what),
            StoreError::Invalid(what) => ApiError::invalid(what),
            StoreError::Database(e) => ApiError::internal(format!("database error: {e}")),
            StoreError::Sqlite(e) => ApiError::internal(format!("database error: {e}")),
            StoreError::Corrupt(what) => {
                ApiError::internal(format!("stored data is unreadable: {what}"))
            }
        }
    }
}

impl From<updraft_protocol::IdError> for ApiError {
    fn from(e: updraft_protocol::IdError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_model() {
        assert_eq!(ErrorCode::Throttling.status(), StatusCode::BAD_REQUEST);
        assert_eq!(ErrorCode::LimitExceeded.status(), StatusCode::GONE);
        assert_eq!(ErrorCode::VersionConflict.status(), StatusCode::CONFLICT);
        assert_eq!(ErrorCode::InvalidSignature.status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn signer_and_json11_shapes() {
        async fn body_of(resp: Response) -> Value {
            let bytes = axum::body::to_bytes(resp.into_body(), 4096)
                .await
                .expect("body");
            serde_json::from_slice(&bytes).expect("json")
        }
        let signer =
            ApiError::new(ErrorCode::Validation, "bad").into_response_as(ErrorShape::Signer);
        assert_eq!(signer.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            signer
                .headers()
                .get("x-amzn-ErrorType")
                .and_then(|v| v.to_str().ok()),
            Some("ValidationException")
        );
        assert_eq!(
            body_of(signer).await,
            serde_json::json!({"message": "bad", "code": "ValidationException"})
        );
        let acm = ApiError::new(ErrorCode::AcmResourceNotFound, "gone")
            .into_response_as(ErrorShape::Json11);
        assert_eq!(acm.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            acm.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some(JSON11)
        );
        assert_eq!(
            body_of(acm).await,
            serde_json::json!({"__type": "ResourceNotFoundException", "message": "gone"})
        );
        // iot's shape is unchanged: no `code`, no `__type`.
        let iot = ApiError::not_found("x").into_response();
        assert_eq!(iot.status(), StatusCode::NOT_FOUND);
        assert_eq!(body_of(iot).await, serde_json::json!({"message": "x"}));
    }

    #[test]
    fn renders_header_and_body() {
        let resp = ApiError::already_exists("exists", "t1", Some("arn:x".into())).into_response();
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert_eq!(
            resp.headers()
                .get("x-amzn-ErrorType")
                .and_then(|v| v.to_str().ok()),
            Some("ResourceAlreadyExistsException")
        );
    }
}
