//! The Updraft server: AWS IoT's OTA control plane, an S3-compatible artifact
//! endpoint, and the store they share. See `docs/ARCHITECTURE.md`.

pub mod acm;
pub mod artifacts;
pub mod auth;
pub mod clock;
pub mod config;
pub mod dataplane;
pub mod error;
pub mod http;
pub mod iot;
pub mod mqtt;
pub mod s3;
pub mod server;
pub mod signer;
pub mod store;
pub mod tls;

#[cfg(test)]
mod test_support;
