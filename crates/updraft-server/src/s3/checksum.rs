//! S3's flexible checksums (`x-amz-checksum-*`): CRC32, CRC32C, CRC64NVME, SHA-1 and
//! SHA-256, plus the multipart forms built from part checksums (composite
//! `base64(alg(concat of part checksums))-N`, and full-object CRCs combined from parts).
//!
//! Values travel as base64 of the big-endian checksum bytes.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// A checksum algorithm S3 clients may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Crc32,
    Crc32c,
    Crc64Nvme,
    Sha1,
    Sha256,
}

impl Algorithm {
    pub const ALL: [Algorithm; 5] = [
        Algorithm::Crc32,
        Algorithm::Crc32c,
        Algorithm::Crc64Nvme,
        Algorithm::Sha1,
        Algorithm::Sha256,
    ];

    /// Parses an algorithm name in any case (`CRC32`, `crc64nvme`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s.trim()))
    }

    /// The lowercase name, as stored and as the header suffix.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "crc32",
            Algorithm::Crc32c => "crc32c",
            Algorithm::Crc64Nvme => "crc64nvme",
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha256 => "sha256",
        }
    }

    /// The uppercase name S3 uses in headers and XML (`CRC32`).
    pub fn upper(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "CRC32",
            Algorithm::Crc32c => "CRC32C",
            Algorithm::Crc64Nvme => "CRC64NVME",
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
        }
    }

    /// The header carrying a value of this algorithm.
    pub fn header(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "x-amz-checksum-crc32",
            Algorithm::Crc32c => "x-amz-checksum-crc32c",
            Algorithm::Crc64Nvme => "x-amz-checksum-crc64nvme",
            Algorithm::Sha1 => "x-amz-checksum-sha1",
            Algorithm::Sha256 => "x-amz-checksum-sha256",
        }
    }

    /// The XML member carrying a value of this algorithm (`ChecksumCRC32`).
    pub fn xml_member(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "ChecksumCRC32",
            Algorithm::Crc32c => "ChecksumCRC32C",
            Algorithm::Crc64Nvme => "ChecksumCRC64NVME",
            Algorithm::Sha1 => "ChecksumSHA1",
            Algorithm::Sha256 => "ChecksumSHA256",
        }
    }

    /// Length of a raw checksum value in bytes.
    pub fn raw_len(self) -> usize {
        match self {
            Algorithm::Crc32 | Algorithm::Crc32c => 4,
            Algorithm::Crc64Nvme => 8,
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 => 32,
        }
    }

    /// Whether parts can be combined into a full-object checksum (CRCs only).
    pub fn is_crc(self) -> bool {
        matches!(
            self,
            Algorithm::Crc32 | Algorithm::Crc32c | Algorithm::Crc64Nvme
        )
    }

    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Crc32 => Hasher::Crc32(crc32fast::Hasher::new()),
            Algorithm::Crc32c => Hasher::Crc32c(0),
            Algorithm::Crc64Nvme => Hasher::Crc64Nvme(0),
            Algorithm::Sha1 => Hasher::Sha1(Sha1::new()),
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
        }
    }

    /// Decodes a base64 header/XML value, checking its length.
    pub fn decode(self, value: &str) -> Option<Vec<u8>> {
        B64.decode(value.trim())
            .ok()
            .filter(|raw| raw.len() == self.raw_len())
    }

    /// The checksum of `data` in one go.
    #[cfg(test)]
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        let mut h = self.hasher();
        h.update(data);
        h.finalize()
    }
}

/// An incremental checksum of one [`Algorithm`].
pub enum Hasher {
    Crc32(crc32fast::Hasher),
    Crc32c(u32),
    Crc64Nvme(u64),
    Sha1(Sha1),
    Sha256(Sha256),
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Crc32(h) => h.update(data),
            Hasher::Crc32c(c) => *c = crc32c_update(*c, data),
            Hasher::Crc64Nvme(c) => *c = crc64nvme_update(*c, data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
        }
    }

    /// The raw (big-endian) checksum.
    pub fn finalize(self) -> Vec<u8> {
        match self {
            Hasher::Crc32(h) => h.finalize().to_be_bytes().to_vec(),
            Hasher::Crc32c(c) => c.to_be_bytes().to_vec(),
            Hasher::Crc64Nvme(c) => c.to_be_bytes().to_vec(),
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        }
    }
}

pub fn b64(raw: &[u8]) -> String {
    B64.encode(raw)
}

const fn reflected_table32(poly: u32) -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ poly } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

const fn reflected_table64(poly: u64) -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u64;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ poly } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// CRC-32C (Castagnoli), reflected.
const CRC32C_POLY: u32 = 0x82F6_3B78;
/// CRC-64/NVME, reflected.
const CRC64NVME_POLY: u64 = 0x9A6C_9329_AC4B_C9B5;
static CRC32C_TABLE: [u32; 256] = reflected_table32(CRC32C_POLY);
static CRC64NVME_TABLE: [u64; 256] = reflected_table64(CRC64NVME_POLY);

/// Continues a CRC-32C: `crc` is the checksum of the data so far (0 to start).
pub fn crc32c_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c = CRC32C_TABLE[usize::from((c as u8) ^ b)] ^ (c >> 8);
    }
    !c
}

/// Continues a CRC-64/NVME: `crc` is the checksum of the data so far (0 to start).
pub fn crc64nvme_update(crc: u64, data: &[u8]) -> u64 {
    let mut c = !crc;
    for &b in data {
        c = CRC64NVME_TABLE[usize::from((c as u8) ^ b)] ^ (c >> 8);
    }
    !c
}

fn gf2_times(mat: &[u64], mut vec: u64) -> u64 {
    let mut sum = 0;
    let mut i = 0;
    while vec != 0 {
        if vec & 1 != 0 {
            sum ^= mat[i];
        }
        vec >>= 1;
        i += 1;
    }
    sum
}

fn gf2_square(square: &mut [u64], mat: &[u64]) {
    for (n, s) in square.iter_mut().enumerate() {
        *s = gf2_times(mat, mat[n]);
    }
}

/// zlib's `crc32_combine`, generalised to any reflected CRC whose init and final xor
/// are all ones: the CRC of `A || B` from `crc(A)`, `crc(B)` and `len(B)`.
fn crc_combine(mut crc1: u64, crc2: u64, mut len2: u64, poly: u64, width: usize) -> u64 {
    if len2 == 0 {
        return crc1;
    }
    let mut even = vec![0u64; width];
    let mut odd = vec![0u64; width];
    // The operator for one zero bit.
    odd[0] = poly;
    let mut row = 1u64;
    for o in odd.iter_mut().skip(1) {
        *o = row;
        row <<= 1;
    }
    gf2_square(&mut even, &odd); // two zero bits
    gf2_square(&mut odd, &even); // four zero bits
    loop {
        gf2_square(&mut even, &odd);
        if len2 & 1 != 0 {
            crc1 = gf2_times(&even, crc1);
        }
        len2 >>= 1;
        if len2 == 0 {
            break;
        }
        gf2_square(&mut odd, &even);
        if len2 & 1 != 0 {
            crc1 = gf2_times(&odd, crc1);
        }
        len2 >>= 1;
        if len2 == 0 {
            break;
        }
    }
    crc1 ^ crc2
}

fn be_u64(raw: &[u8]) -> Option<u64> {
    match raw.len() {
        4 => Some(u64::from(u32::from_be_bytes(raw.try_into().ok()?))),
        8 => Some(u64::from_be_bytes(raw.try_into().ok()?)),
        _ => None,
    }
}

/// The full-object CRC of concatenated parts, each given as (raw checksum, size).
/// `None` for non-CRC algorithms or malformed values.
pub fn combine_full(alg: Algorithm, parts: &[(Vec<u8>, u64)]) -> Option<Vec<u8>> {
    let (poly, width) = match alg {
        Algorithm::Crc32 => (0xEDB8_8320u64, 32),
        Algorithm::Crc32c => (u64::from(CRC32C_POLY), 32),
        Algorithm::Crc64Nvme => (CRC64NVME_POLY, 64),
        Algorithm::Sha1 | Algorithm::Sha256 => return None,
    };
    let mut acc = 0u64;
    for (raw, len) in parts {
        if raw.len() != alg.raw_len() {
            return None;
        }
        acc = crc_combine(acc, be_u64(raw)?, *len, poly, width);
    }
    Some(if width == 32 {
        u32::try_from(acc).ok()?.to_be_bytes().to_vec()
    } else {
        acc.to_be_bytes().to_vec()
    })
}

/// The composite checksum of a multipart object: `base64(alg(concat of raw part
/// checksums))-N`.
pub fn composite(alg: Algorithm, parts: &[Vec<u8>]) -> String {
    let mut h = alg.hasher();
    for p in parts {
        h.update(p);
    }
    format!("{}-{}", b64(&h.finalize()), parts.len())
}

/// Whether a stored value is a composite (multipart) checksum.
pub fn is_composite(value: &str) -> bool {
    value.contains('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECK: &[u8] = b"123456789";

    #[test]
    fn check_values() {
        assert_eq!(crc32c_update(0, CHECK), 0xE306_9283);
        assert_eq!(crc64nvme_update(0, CHECK), 0xAE8B_1486_0A79_9888);
        assert_eq!(Algorithm::Crc32.digest(CHECK), 0xCBF4_3926u32.to_be_bytes());
        assert_eq!(
            Algorithm::Crc32c.digest(CHECK),
            0xE306_9283u32.to_be_bytes()
        );
        assert_eq!(
            Algorithm::Crc64Nvme.digest(CHECK),
            0xAE8B_1486_0A79_9888u64.to_be_bytes()
        );
        // Empty input: SHA-256 of "" and CRCs of 0.
        assert_eq!(
            b64(&Algorithm::Sha256.digest(b"")),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(
            b64(&Algorithm::Sha1.digest(b"")),
            "2jmj7l5rSw0yVb/vlWAYkK/YBwk="
        );
        assert_eq!(Algorithm::Crc32c.digest(b""), vec![0, 0, 0, 0]);
    }

    #[test]
    fn incremental_equals_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        for alg in Algorithm::ALL {
            let mut h = alg.hasher();
            for chunk in data.chunks(333) {
                h.update(chunk);
            }
            assert_eq!(h.finalize(), alg.digest(&data), "{}", alg.name());
        }
    }

    #[test]
    fn names_and_decoding() {
        assert_eq!(Algorithm::parse("CRC64NVME"), Some(Algorithm::Crc64Nvme));
        assert_eq!(Algorithm::parse("sha256"), Some(Algorithm::Sha256));
        assert_eq!(Algorithm::parse("md5"), None);
        assert_eq!(Algorithm::Crc32.decode("AAAAAA=="), Some(vec![0; 4]));
        assert_eq!(Algorithm::Crc32.decode("AAAAAAAA"), None);
        assert_eq!(Algorithm::Crc32.decode("not base64!"), None);
    }

    #[test]
    fn full_object_combination() {
        let a: Vec<u8> = (0..7000u32).map(|i| (i % 253) as u8).collect();
        let b: Vec<u8> = (0..5123u32).map(|i| (i * 7 % 241) as u8).collect();
        let c = b"tail".to_vec();
        let whole = [a.clone(), b.clone(), c.clone()].concat();
        for alg in [Algorithm::Crc32, Algorithm::Crc32c, Algorithm::Crc64Nvme] {
            let parts: Vec<(Vec<u8>, u64)> = [&a, &b, &c]
                .iter()
                .map(|p| (alg.digest(p), p.len() as u64))
                .collect();
            assert_eq!(
                combine_full(alg, &parts),
                Some(alg.digest(&whole)),
                "{}",
                alg.name()
            );
        }
        assert_eq!(combine_full(Algorithm::Sha256, &[]), None);
    }

    #[test]
    fn composite_form() {
        let p1 = Algorithm::Crc32.digest(b"hello ");
        let p2 = Algorithm::Crc32.digest(b"world");
        let expected = b64(&Algorithm::Crc32.digest(&[p1.clone(), p2.clone()].concat()));
        let c = composite(Algorithm::Crc32, &[p1, p2]);
        assert_eq!(c, format!("{expected}-2"));
        assert!(is_composite(&c));
        assert!(!is_composite("AAAAAA=="));
    }
}
