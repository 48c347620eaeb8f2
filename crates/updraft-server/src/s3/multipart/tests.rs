use super::*;

#[test]
fn upload_checksum_rules() {
    let parse = |a, k| UploadChecksum::from_headers(a, k).map_err(|e| e.code);
    assert_eq!(parse(None, None), Ok(None));
    assert_eq!(
        parse(Some("CRC32"), None),
        Ok(Some(UploadChecksum {
            alg: Algorithm::Crc32,
            full_object: false
        }))
    );
    assert_eq!(
        parse(Some("CRC64NVME"), None),
        Ok(Some(UploadChecksum {
            alg: Algorithm::Crc64Nvme,
            full_object: true
        }))
    );
    assert_eq!(
        parse(Some("crc32c"), Some("FULL_OBJECT")).map(|u| u.map(|u| u.full_object)),
        Ok(Some(true))
    );
    assert_eq!(
        parse(Some("SHA256"), Some("FULL_OBJECT")),
        Err("InvalidRequest")
    );
    assert_eq!(
        parse(Some("CRC64NVME"), Some("COMPOSITE")),
        Err("InvalidRequest")
    );
    assert_eq!(parse(None, Some("COMPOSITE")), Err("InvalidRequest"));
    assert_eq!(parse(Some("MD5"), None), Err("InvalidRequest"));
    for uc in [
        UploadChecksum {
            alg: Algorithm::Sha1,
            full_object: false,
        },
        UploadChecksum {
            alg: Algorithm::Crc32c,
            full_object: true,
        },
    ] {
        assert_eq!(UploadChecksum::decode(Some(&uc.encode())), Some(uc));
    }
    assert_eq!(UploadChecksum::decode(None), None);
}
