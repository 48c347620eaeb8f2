//! Listings: ListObjectsV2, ListObjects (v1) and ListObjectVersions.

use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::checksum;
use super::xml::XmlWriter;
use super::{Ctx, S3Error, listed, max_param, url_encoding, xml_response};
use crate::store::ObjectVersion;

/// Sorts after every character a key can contain: appended to a common prefix, it
/// makes a cursor that skips everything under that prefix.
const AFTER_ALL: char = '\u{10FFFF}';

/// How many version rows ListObjectVersions reads at most (the store has no marker).
const VERSIONS_SCAN_LIMIT: usize = 100_000;

fn encode_token(cursor: &str) -> String {
    URL_SAFE_NO_PAD.encode(cursor.as_bytes())
}

fn decode_token(token: &str) -> Result<String, S3Error> {
    URL_SAFE_NO_PAD
        .decode(token.trim().trim_end_matches('='))
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| S3Error::invalid_argument("The continuation token provided is incorrect"))
}

/// The common prefix `key` rolls up into under `prefix`/`delimiter`, if any.
fn common_prefix(key: &str, prefix: &str, delimiter: Option<&str>) -> Option<String> {
    let d = delimiter?;
    let rest = key.strip_prefix(prefix)?;
    rest.find(d)
        .map(|i| format!("{prefix}{}", &rest[..i + d.len()]))
}

/// The store cursor for a client-supplied marker: a marker naming a common prefix
/// skips everything under it (the client has seen it rolled up already).
fn marker_cursor(marker: &str, prefix: &str, delimiter: Option<&str>) -> String {
    match common_prefix(marker, prefix, delimiter) {
        Some(cp) if cp == marker => format!("{marker}{AFTER_ALL}"),
        _ => marker.to_owned(),
    }
}

pub(crate) fn checksum_type(value: &str) -> &'static str {
    if checksum::is_composite(value) {
        "COMPOSITE"
    } else {
        "FULL_OBJECT"
    }
}

fn checksum_members(w: &mut XmlWriter, o: &ObjectVersion) {
    if let Some(c) = &o.checksum
        && let Some(alg) = checksum::Algorithm::parse(&c.algorithm)
    {
        w.elem("ChecksumAlgorithm", alg.upper())
            .elem("ChecksumType", checksum_type(&c.value));
    }
}

/// ListObjectsV2 (`v2`) or ListObjects.
pub async fn list_objects(ctx: &Ctx<'_>, v2: bool) -> Result<Response, S3Error> {
    ctx.bucket().await?;
    let q = &ctx.query;
    let url = url_encoding(q)?;
    let prefix = q.get("prefix").unwrap_or("");
    let delimiter = q.get("delimiter").filter(|d| !d.is_empty());
    let max_keys = max_param(q, "max-keys")?;
    let token = if v2 {
        q.get("continuation-token")
    } else {
        None
    };
    let start_after = if v2 { q.get("start-after") } else { None };
    let marker = if v2 { None } else { q.get("marker") };
    let cursor = match (token, start_after, marker) {
        (Some(t), _, _) => Some(decode_token(t)?),
        (None, Some(s), _) => Some(s.to_owned()),
        (None, None, Some(m)) => Some(marker_cursor(m, prefix, delimiter)),
        _ => None,
    };
    let listing = ctx
        .state
        .store
        .list_objects(&ctx.bucket, prefix, delimiter, cursor.as_deref(), max_keys)
        .await?;
    let truncated = listing.next_after.is_some();
    let root = "ListBucketResult";
    let mut w = XmlWriter::new(root);
    w.elem("Name", &ctx.bucket)
        .elem("Prefix", &listed(prefix, url));
    if !v2 {
        w.elem("Marker", &listed(marker.unwrap_or(""), url));
    }
    if let Some(d) = delimiter {
        w.elem("Delimiter", &listed(d, url));
    }
    w.elem("MaxKeys", &max_keys.to_string());
    if url {
        w.elem("EncodingType", "url");
    }
    if v2 {
        let count = listing.objects.len() + listing.common_prefixes.len();
        w.elem("KeyCount", &count.to_string());
    }
    w.elem("IsTruncated", if truncated { "true" } else { "false" });
    if v2 {
        w.opt("ContinuationToken", token);
        if let Some(next) = &listing.next_after {
            w.elem("NextContinuationToken", &encode_token(next));
        }
        if let Some(s) = start_after {
            w.elem("StartAfter", &listed(s, url));
        }
    } else if truncated {
        // The last entry returned, key or common prefix.
        let last_key = listing.objects.last().map(|o| o.key.as_str());
        let last_prefix = listing.common_prefixes.last().map(String::as_str);
        if let Some(last) = last_key.max(last_prefix) {
            w.elem("NextMarker", &listed(last, url));
        }
    }
    let fetch_owner = !v2 || q.get("fetch-owner") == Some("true");
    for o in &listing.objects {
        w.open("Contents")
            .elem("Key", &listed(&o.key, url))
            .elem("LastModified", &crate::clock::iso8601(o.created_ms))
            .elem("ETag", &o.etag);
        checksum_members(&mut w, o);
        w.elem("Size", &o.size.to_string());
        if fetch_owner {
            ctx.owner(&mut w, "Owner");
        }
        w.elem("StorageClass", "STANDARD").close("Contents");
    }
    for p in &listing.common_prefixes {
        w.open("CommonPrefixes")
            .elem("Prefix", &listed(p, url))
            .close("CommonPrefixes");
    }
    Ok(xml_response(w.finish(root)))
}

/// One entry of a version listing.
#[derive(Debug, PartialEq)]
enum Entry<'a> {
    Version(&'a ObjectVersion),
    Prefix(String),
}

/// Applies markers, delimiter roll-up and the page size to versions (ordered by key,
/// newest first). Returns the page and whether more entries follow.
fn page_versions<'a>(
    versions: &'a [ObjectVersion],
    prefix: &str,
    delimiter: Option<&str>,
    key_marker: Option<&str>,
    version_marker: Option<&str>,
    max: usize,
) -> (Vec<Entry<'a>>, bool) {
    let key_marker = key_marker.filter(|k| !k.is_empty());
    let skip_under =
        key_marker.and_then(|m| common_prefix(m, prefix, delimiter).filter(|cp| cp == m));
    // Versions of the marker key after the marker version are still to be listed.
    let version_marker = version_marker.filter(|v| !v.is_empty());
    let mut past_version_marker = false;
    let mut entries: Vec<Entry<'a>> = Vec::new();
    for v in versions {
        if !v.key.starts_with(prefix) {
            continue;
        }
        if let Some(m) = key_marker {
            if let Some(cp) = &skip_under
                && v.key.starts_with(cp.as_str())
            {
                continue;
            }
            if v.key.as_str() < m {
                continue;
            }
            if v.key == m && !past_version_marker {
                past_version_marker = Some(v.version_id.as_str()) == version_marker;
                continue;
            }
        }
        // Keys are sorted, so the keys under one common prefix are contiguous.
        match common_prefix(&v.key, prefix, delimiter) {
            Some(cp) => {
                if entries.last() == Some(&Entry::Prefix(cp.clone())) {
                    continue;
                }
                entries.push(Entry::Prefix(cp));
            }
            None => entries.push(Entry::Version(v)),
        }
        if entries.len() > max {
            break;
        }
    }
    let truncated = entries.len() > max;
    entries.truncate(max);
    (entries, truncated)
}

pub async fn list_versions(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    ctx.bucket().await?;
    let q = &ctx.query;
    let url = url_encoding(q)?;
    let prefix = q.get("prefix").unwrap_or("");
    let delimiter = q.get("delimiter").filter(|d| !d.is_empty());
    let max_keys = max_param(q, "max-keys")?;
    let key_marker = q.get("key-marker");
    let version_marker = q.get("version-id-marker");
    if version_marker.is_some_and(|v| !v.is_empty()) && key_marker.is_none_or(str::is_empty) {
        return Err(S3Error::invalid_argument(
            "A version-id marker cannot be specified without a key marker.",
        ));
    }
    let versions = ctx
        .state
        .store
        .list_object_versions(&ctx.bucket, prefix, VERSIONS_SCAN_LIMIT)
        .await?;
    if versions.len() >= VERSIONS_SCAN_LIMIT {
        tracing::warn!(bucket = %ctx.bucket, "ListObjectVersions read its scan limit; the listing may be incomplete");
    }
    let (entries, truncated) = page_versions(
        &versions,
        prefix,
        delimiter,
        key_marker,
        version_marker,
        max_keys,
    );
    let root = "ListVersionsResult";
    let mut w = XmlWriter::new(root);
    w.elem("Name", &ctx.bucket)
        .elem("Prefix", &listed(prefix, url))
        .elem("KeyMarker", &listed(key_marker.unwrap_or(""), url))
        .elem("VersionIdMarker", version_marker.unwrap_or(""));
    if truncated {
        match entries.last() {
            Some(Entry::Version(v)) => {
                w.elem("NextKeyMarker", &listed(&v.key, url))
                    .elem("NextVersionIdMarker", &v.version_id);
            }
            Some(Entry::Prefix(p)) => {
                w.elem("NextKeyMarker", &listed(p, url));
            }
            None => {}
        }
    }
    w.elem("MaxKeys", &max_keys.to_string());
    if let Some(d) = delimiter {
        w.elem("Delimiter", &listed(d, url));
    }
    if url {
        w.elem("EncodingType", "url");
    }
    w.elem("IsTruncated", if truncated { "true" } else { "false" });
    for e in &entries {
        match e {
            Entry::Version(v) if v.delete_marker => {
                w.open("DeleteMarker");
                w.elem("Key", &listed(&v.key, url))
                    .elem("VersionId", &v.version_id)
                    .elem("IsLatest", if v.is_latest { "true" } else { "false" })
                    .elem("LastModified", &crate::clock::iso8601(v.created_ms));
                ctx.owner(&mut w, "Owner");
                w.close("DeleteMarker");
            }
            Entry::Version(v) => {
                w.open("Version");
                w.elem("Key", &listed(&v.key, url))
                    .elem("VersionId", &v.version_id)
                    .elem("IsLatest", if v.is_latest { "true" } else { "false" })
                    .elem("LastModified", &crate::clock::iso8601(v.created_ms))
                    .elem("ETag", &v.etag);
                checksum_members(&mut w, v);
                w.elem("Size", &v.size.to_string())
                    .elem("StorageClass", "STANDARD");
                ctx.owner(&mut w, "Owner");
                w.close("Version");
            }
            Entry::Prefix(p) => {
                w.open("CommonPrefixes")
                    .elem("Prefix", &listed(p, url))
                    .close("CommonPrefixes");
            }
        }
    }
    Ok(xml_response(w.finish(root)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn v(key: &str, id: &str) -> ObjectVersion {
        ObjectVersion {
            bucket: "b".into(),
            key: key.into(),
            version_id: id.into(),
            delete_marker: false,
            size: 1,
            etag: "\"x\"".into(),
            content_type: None,
            checksum: None,
            metadata: BTreeMap::new(),
            blob: "blobs/x".into(),
            created_ms: 0,
            is_latest: false,
        }
    }

    fn names(entries: &[Entry<'_>]) -> Vec<String> {
        entries
            .iter()
            .map(|e| match e {
                Entry::Version(v) => format!("{}@{}", v.key, v.version_id),
                Entry::Prefix(p) => format!("{p}*"),
            })
            .collect()
    }

    #[test]
    fn tokens_and_markers() {
        let t = encode_token("dir/a b+c\u{10FFFF}");
        assert_eq!(
            decode_token(&t).ok().as_deref(),
            Some("dir/a b+c\u{10FFFF}")
        );
        assert!(decode_token("!!!").is_err());
        assert_eq!(
            common_prefix("a/b/c", "a/", Some("/")).as_deref(),
            Some("a/b/")
        );
        assert_eq!(common_prefix("a/b", "a/", Some("/")), None);
        assert_eq!(common_prefix("a/b/c", "a/", None), None);
        assert_eq!(marker_cursor("a/b/", "a/", Some("/")), "a/b/\u{10FFFF}");
        assert_eq!(marker_cursor("a/b", "a/", Some("/")), "a/b");
        assert_eq!(marker_cursor("a/b/", "a/", None), "a/b/");
        assert_eq!(checksum_type("AAAAAA==-3"), "COMPOSITE");
        assert_eq!(checksum_type("AAAAAA=="), "FULL_OBJECT");
    }

    #[test]
    fn version_pages() {
        let all = vec![
            v("a", "3"),
            v("a", "2"),
            v("a", "1"),
            v("d/x", "1"),
            v("d/y", "1"),
            v("e", "1"),
        ];
        let (p, t) = page_versions(&all, "", None, None, None, 2);
        assert_eq!(names(&p), ["a@3", "a@2"]);
        assert!(t);
        let (p, t) = page_versions(&all, "", None, Some("a"), Some("2"), 2);
        assert_eq!(names(&p), ["a@1", "d/x@1"]);
        assert!(t);
        let (p, t) = page_versions(&all, "", Some("/"), Some("a"), None, 10);
        assert_eq!(names(&p), ["d/*", "e@1"]);
        assert!(!t);
        let (p, _) = page_versions(&all, "", Some("/"), Some("d/"), None, 10);
        assert_eq!(names(&p), ["e@1"]);
        let (p, t) = page_versions(&all, "d/", None, None, None, 1);
        assert_eq!(names(&p), ["d/x@1"]);
        assert!(t);
    }
}
