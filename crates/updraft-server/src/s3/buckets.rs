//! Bucket operations: ListBuckets, CreateBucket, HeadBucket, DeleteBucket,
//! GetBucketLocation, Put/GetBucketVersioning.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;

use super::xml::{self, XmlWriter};
use super::{Ctx, S3Error, body, empty_response, put_header, xml_response};
use crate::store::{Bucket, StoreError, Versioning};

/// S3's bucket naming rules (the general-purpose bucket subset that matters here).
pub fn valid_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    if !(3..=63).contains(&b.len()) {
        return false;
    }
    let edge_ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !b.iter().all(|&c| edge_ok(c) || c == b'.' || c == b'-') {
        return false;
    }
    if !edge_ok(b[0]) || !edge_ok(b[b.len() - 1]) {
        return false;
    }
    if name.contains("..") || name.contains(".-") || name.contains("-.") {
        return false;
    }
    // Not formatted as an IP address.
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() == 4 && parts.iter().all(|p| p.parse::<u8>().is_ok()) {
        return false;
    }
    !(name.starts_with("xn--")
        || name.starts_with("sthree-")
        || name.ends_with("-s3alias")
        || name.ends_with("--ol-s3"))
}

pub async fn list_buckets(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    let buckets = ctx.state.store.list_buckets().await?;
    let prefix = ctx.query.get("prefix").unwrap_or("");
    let mut w = XmlWriter::new("ListAllMyBucketsResult");
    ctx.owner(&mut w, "Owner");
    w.open("Buckets");
    for b in buckets.iter().filter(|b| b.name.starts_with(prefix)) {
        w.open("Bucket")
            .elem("Name", &b.name)
            .elem("CreationDate", &crate::clock::iso8601(b.created_ms))
            .elem("BucketRegion", &ctx.state.region)
            .close("Bucket");
    }
    w.close("Buckets");
    if !prefix.is_empty() {
        w.elem("Prefix", prefix);
    }
    Ok(xml_response(w.finish("ListAllMyBucketsResult")))
}

pub async fn create_bucket(ctx: &Ctx<'_>, body: Body) -> Result<Response, S3Error> {
    if !valid_bucket_name(&ctx.bucket) {
        return Err(S3Error::new(
            StatusCode::BAD_REQUEST,
            "InvalidBucketName",
            "The specified bucket is not valid.",
        ));
    }
    // An optional CreateBucketConfiguration: read (and verified), then ignored, but it
    // must at least be XML.
    let doc = body::read_small(ctx, body, body::Flexible::Body(None)).await?;
    if !doc.iter().all(u8::is_ascii_whitespace) {
        xml::parse(&doc).map_err(S3Error::malformed_xml)?;
    }
    let bucket = Bucket {
        name: ctx.bucket.clone(),
        versioning: Versioning::Unversioned,
        created_ms: crate::clock::now_ms(),
    };
    match ctx.state.store.create_bucket(&bucket).await {
        Ok(()) => {}
        Err(StoreError::AlreadyExists(_)) => {
            return Err(S3Error::new(
                StatusCode::CONFLICT,
                "BucketAlreadyOwnedByYou",
                "Your previous request to create the named bucket succeeded and you already own it.",
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let mut resp = empty_response(StatusCode::OK);
    put_header(resp.headers_mut(), "location", &format!("/{}", ctx.bucket));
    Ok(resp)
}

pub async fn head_bucket(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    ctx.bucket().await?;
    let mut resp = empty_response(StatusCode::OK);
    put_header(resp.headers_mut(), "x-amz-bucket-region", &ctx.state.region);
    Ok(resp)
}

pub async fn delete_bucket(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    match ctx.state.store.delete_bucket(&ctx.bucket).await {
        Ok(()) => Ok(empty_response(StatusCode::NO_CONTENT)),
        Err(StoreError::NotFound(_)) => Err(S3Error::no_such_bucket(&ctx.bucket)),
        Err(StoreError::Conflict(_)) => Err(S3Error::new(
            StatusCode::CONFLICT,
            "BucketNotEmpty",
            "The bucket you tried to delete is not empty",
        )),
        Err(e) => Err(e.into()),
    }
}

pub async fn get_location(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    ctx.bucket().await?;
    // us-east-1 is reported as an empty constraint, as S3 does.
    let region = if ctx.state.region == "us-east-1" {
        ""
    } else {
        ctx.state.region.as_str()
    };
    Ok(xml_response(format!(
        "<LocationConstraint xmlns=\"{}\">{}</LocationConstraint>",
        xml::NS,
        xml::escape(region)
    )))
}

/// The `Status` of a `VersioningConfiguration` document.
fn parse_versioning(doc: &[u8]) -> Result<Versioning, S3Error> {
    let root = xml::parse(doc).map_err(S3Error::malformed_xml)?;
    if root.name != "VersioningConfiguration" {
        return Err(S3Error::malformed_xml("expected <VersioningConfiguration>"));
    }
    match root.child_text("Status").map(str::trim) {
        Some("Enabled") => Ok(Versioning::Enabled),
        Some("Suspended") => Ok(Versioning::Suspended),
        _ => Err(S3Error::malformed_xml(
            "<Status> must be Enabled or Suspended",
        )),
    }
}

pub async fn put_versioning(ctx: &Ctx<'_>, body: Body) -> Result<Response, S3Error> {
    let doc = body::read_small(ctx, body, body::Flexible::Body(None)).await?;
    let status = parse_versioning(&doc)?;
    match ctx
        .state
        .store
        .set_bucket_versioning(&ctx.bucket, status)
        .await
    {
        Ok(()) => Ok(empty_response(StatusCode::OK)),
        Err(StoreError::NotFound(_)) => Err(S3Error::no_such_bucket(&ctx.bucket)),
        Err(e) => Err(e.into()),
    }
}

pub async fn get_versioning(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    let bucket = ctx.bucket().await?;
    let mut w = XmlWriter::new("VersioningConfiguration");
    if bucket.versioning != Versioning::Unversioned {
        w.elem("Status", bucket.versioning.as_str());
    }
    Ok(xml_response(w.finish("VersioningConfiguration")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names() {
        for ok in ["fw", "firmware", "my-bucket.v2", "a1b", "123"] {
            assert_eq!(valid_bucket_name(ok), ok.len() >= 3, "{ok}");
        }
        for bad in [
            "Upper",
            "-lead",
            "trail-",
            "a..b",
            "a.-b",
            "192.168.1.1",
            "under_score",
            "xn--abc",
            &"a".repeat(64),
        ] {
            assert!(!valid_bucket_name(bad), "{bad}");
        }
    }

    #[test]
    fn versioning_documents() {
        let doc = br#"<?xml version="1.0"?><VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
            <Status> Enabled </Status></VersioningConfiguration>"#;
        assert_eq!(parse_versioning(doc).ok(), Some(Versioning::Enabled));
        let doc = b"<VersioningConfiguration><Status>Suspended</Status><MfaDelete>Disabled</MfaDelete></VersioningConfiguration>";
        assert_eq!(parse_versioning(doc).ok(), Some(Versioning::Suspended));
        for bad in [
            &b"<VersioningConfiguration><Status>On</Status></VersioningConfiguration>"[..],
            b"<VersioningConfiguration/>",
            b"<Other><Status>Enabled</Status></Other>",
            b"not xml",
        ] {
            assert_eq!(
                parse_versioning(bad).map_err(|e| e.code).err(),
                Some("MalformedXML")
            );
        }
    }
}
