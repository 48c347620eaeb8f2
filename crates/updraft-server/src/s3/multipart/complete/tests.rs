use super::*;
use crate::s3::multipart::MIN_PART_SIZE;

fn part(n: i64, data: &[u8], alg: Option<Algorithm>) -> UploadPart {
    UploadPart {
        upload_id: "u".into(),
        part_number: n,
        size: data.len() as u64,
        etag: format!("\"{}\"", hex::encode(Md5::digest(data))),
        checksum: alg.map(|a| StoredChecksum {
            algorithm: a.name().into(),
            value: checksum::b64(&a.digest(data)),
        }),
        blob: format!("blobs/{n}"),
        created_ms: 0,
    }
}

fn req(p: &UploadPart) -> CompletePart {
    CompletePart {
        number: p.part_number,
        etag: unquote_etag(&p.etag).to_owned(),
        checksums: Vec::new(),
    }
}

#[test]
fn complete_documents() {
    let doc = br#"<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
        <Part><ETag>&quot;abc&quot;</ETag><PartNumber> 1 </PartNumber><ChecksumCRC32>AAAAAA==</ChecksumCRC32></Part>
        <Part><PartNumber>2</PartNumber><ETag>def</ETag></Part>
    </CompleteMultipartUpload>"#;
    let parts = parse_complete(doc).expect("valid");
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].etag, "abc");
    assert_eq!(parts[0].number, 1);
    assert_eq!(
        parts[0].checksums,
        vec![(Algorithm::Crc32, "AAAAAA==".to_owned())]
    );
    assert_eq!(parts[1].etag, "def");
    for bad in [
        &b"<CompleteMultipartUpload/>"[..],
        b"<CompleteMultipartUpload><Part><ETag>x</ETag></Part></CompleteMultipartUpload>",
        b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber></Part></CompleteMultipartUpload>",
        b"<Other><Part><PartNumber>1</PartNumber><ETag>x</ETag></Part></Other>",
    ] {
        assert_eq!(parse_complete(bad).map_err(|e| e.code).err(), Some("MalformedXML"));
    }
}

#[test]
fn plans_validate_and_derive() {
    let big = vec![7u8; MIN_PART_SIZE as usize];
    let tail = b"tail".to_vec();
    let alg = Some(Algorithm::Crc32);
    let stored = vec![part(1, &big, alg), part(2, &big, alg), part(3, &tail, alg)];
    let all: Vec<CompletePart> = stored.iter().map(req).collect();
    let composite = Some(UploadChecksum {
        alg: Algorithm::Crc32,
        full_object: false,
    });

    let p = plan(composite, &all, &stored).expect("valid");
    assert_eq!(p.size, 2 * MIN_PART_SIZE + 4);
    assert_eq!(p.blobs, vec!["blobs/1", "blobs/2", "blobs/3"]);
    let md5s: Vec<u8> = [&big, &big, &tail]
        .iter()
        .flat_map(|d| Md5::digest(d).to_vec())
        .collect();
    assert_eq!(p.etag, format!("\"{}-3\"", hex::encode(Md5::digest(&md5s))));
    let raws: Vec<Vec<u8>> = [&big, &big, &tail]
        .iter()
        .map(|d| Algorithm::Crc32.digest(d))
        .collect();
    assert_eq!(
        p.checksum.as_ref().map(|c| c.value.clone()),
        Some(checksum::composite(Algorithm::Crc32, &raws))
    );

    // Full-object CRC: the CRC of the whole.
    let full = Some(UploadChecksum {
        alg: Algorithm::Crc32,
        full_object: true,
    });
    let whole = [big.clone(), big.clone(), tail.clone()].concat();
    let p = plan(full, &all, &stored).expect("valid");
    assert_eq!(
        p.checksum.map(|c| c.value),
        Some(checksum::b64(&Algorithm::Crc32.digest(&whole)))
    );

    // A subset of parts is fine; no checksum without an algorithm.
    let p = plan(None, &all[1..], &stored).expect("valid");
    assert_eq!(p.size, MIN_PART_SIZE + 4);
    assert_eq!(p.checksum, None);

    let code = |r: Result<Plan, S3Error>| r.map_err(|e| e.code).err();
    let reversed: Vec<CompletePart> = all.iter().rev().cloned().collect();
    assert_eq!(
        code(plan(composite, &reversed, &stored)),
        Some("InvalidPartOrder")
    );
    let dup = vec![all[0].clone(), all[0].clone()];
    assert_eq!(
        code(plan(composite, &dup, &stored)),
        Some("InvalidPartOrder")
    );
    let mut missing = all.clone();
    missing[2].number = 9;
    assert_eq!(
        code(plan(composite, &missing, &stored)),
        Some("InvalidPart")
    );
    let mut wrong_etag = all.clone();
    wrong_etag[0].etag = "00".into();
    assert_eq!(
        code(plan(composite, &wrong_etag, &stored)),
        Some("InvalidPart")
    );
    let mut wrong_sum = all.clone();
    wrong_sum[0].checksums = vec![(Algorithm::Crc32, "AAAAAA==".into())];
    assert_eq!(
        code(plan(composite, &wrong_sum, &stored)),
        Some("InvalidPart")
    );
    let mut right_sum = all.clone();
    right_sum[2].checksums = vec![(
        Algorithm::Crc32,
        checksum::b64(&Algorithm::Crc32.digest(&tail)),
    )];
    assert!(plan(composite, &right_sum, &stored).is_ok());
    let small = vec![part(1, &tail, None), part(2, &tail, None)];
    let small_req: Vec<CompletePart> = small.iter().map(req).collect();
    assert_eq!(code(plan(None, &small_req, &small)), Some("EntityTooSmall"));
}

async fn keepalive_body(result: Result<String, S3Error>) -> String {
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(120)).await;
        result
    });
    let resp = keepalive_response(task, Duration::from_millis(20));
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn keepalive_streams_whitespace_then_the_document() {
    let body = keepalive_body(Ok("<Done/>".to_owned())).await;
    assert!(body.starts_with(xml::DECLARATION), "{body}");
    let rest = &body[xml::DECLARATION.len()..];
    assert!(
        rest.starts_with(' '),
        "keep-alive spaces expected: {body:?}"
    );
    assert_eq!(rest.trim_start(), "<Done/>");

    let body = keepalive_body(Err(S3Error::internal("boom"))).await;
    let rest = body[xml::DECLARATION.len()..].trim_start();
    assert!(
        rest.starts_with("<Error><Code>InternalError</Code>"),
        "{body}"
    );
}
