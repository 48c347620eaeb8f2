//! The S3-compatible artifact endpoint (path-style). Placeholder: being written.

use axum::body::Body;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use crate::auth::Principal;
use crate::server::AppState;

/// An S3 error, rendered as S3's XML error document.
#[derive(Debug, Clone)]
pub struct S3Error {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl S3Error {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        S3Error {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for S3Error {
    fn into_response(self) -> Response {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message></Error>",
            self.code, self.message
        );
        (self.status, [("content-type", "application/xml")], body).into_response()
    }
}

pub async fn handle(
    _state: &AppState,
    _principal: &Principal,
    _parts: Parts,
    _body: Body,
) -> Response {
    S3Error::new(
        StatusCode::NOT_IMPLEMENTED,
        "NotImplemented",
        "S3 is not available yet",
    )
    .into_response()
}
