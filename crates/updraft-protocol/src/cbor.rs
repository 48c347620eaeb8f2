//! A minimal, strict CBOR (RFC 8949) reader and writer, enough for the Streams messages.
//!
//! The reader is a pull parser over a borrowed buffer: definite-length strings
//! are returned as borrowed slices, indefinite-length ones are concatenated
//! into a buffer that can never be larger than the input. It accepts unsigned
//! and negative integers, byte and text strings, arrays and maps (definite and
//! indefinite length), tags, booleans, null, undefined, simple values and
//! floats (floats and tags can only be skipped).
//!
//! The reader faces untrusted devices, so it is strict and never panics:
//! truncated input, trailing bytes, lengths larger than the remaining input,
//! nesting deeper than [`MAX_DEPTH`], reserved encodings and non-UTF-8 text are
//! all typed errors.
//!
//! The writer always uses the shortest integer and length encodings.

use std::borrow::Cow;
use thiserror::Error;

/// The deepest nesting of arrays, maps and tags the reader accepts.
pub const MAX_DEPTH: usize = 16;

const BREAK: u8 = 0xFF;

/// Why an input is not acceptable CBOR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CborError {
    #[error("the input ends inside an item")]
    Truncated,
    #[error("{0} bytes follow the item")]
    TrailingBytes(usize),
    #[error("items are nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("a length of {len} exceeds the {remaining} bytes left in the input")]
    LengthTooLarge { len: u64, remaining: usize },
    #[error("a text string is not valid UTF-8")]
    InvalidUtf8,
    #[error("reserved additional information value {0}")]
    Reserved(u8),
    #[error("major type {0} cannot have an indefinite length")]
    IllegalIndefinite(u8),
    #[error("a break code outside an indefinite-length item")]
    UnexpectedBreak,
    #[error("a chunk of an indefinite-length string is not a definite string of the same type")]
    BadChunk,
    #[error("a two-byte simple value below 32")]
    BadSimple,
    #[error("expected {expected}, found {found}")]
    Unexpected {
        expected: &'static str,
        found: &'static str,
    },
}

type Result<T> = std::result::Result<T, CborError>;

/// The type of the next data item, as seen by [`Reader::peek_kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Unsigned,
    Negative,
    Bytes,
    Text,
    Array,
    Map,
    Tag,
    Bool,
    Null,
    Undefined,
    Simple,
    Float,
    Break,
}

impl Kind {
    /// A human-readable name, used in [`CborError::Unexpected`].
    pub fn name(self) -> &'static str {
        match self {
            Kind::Unsigned => "an unsigned integer",
            Kind::Negative => "a negative integer",
            Kind::Bytes => "a byte string",
            Kind::Text => "a text string",
            Kind::Array => "an array",
            Kind::Map => "a map",
            Kind::Tag => "a tag",
            Kind::Bool => "a boolean",
            Kind::Null => "null",
            Kind::Undefined => "undefined",
            Kind::Simple => "a simple value",
            Kind::Float => "a float",
            Kind::Break => "a break code",
        }
    }
}

/// One initial byte plus its argument; `arg` is `None` for an indefinite length.
#[derive(Debug, Clone, Copy)]
struct Head {
    major: u8,
    info: u8,
    arg: Option<u64>,
}

impl Head {
    fn kind(self) -> Kind {
        match (self.major, self.info) {
            (0, _) => Kind::Unsigned,
            (1, _) => Kind::Negative,
            (2, _) => Kind::Bytes,
            (3, _) => Kind::Text,
            (4, _) => Kind::Array,
            (5, _) => Kind::Map,
            (6, _) => Kind::Tag,
            (_, 20 | 21) => Kind::Bool,
            (_, 22) => Kind::Null,
            (_, 23) => Kind::Undefined,
            (_, 25..=27) => Kind::Float,
            (_, 31) => Kind::Break,
            _ => Kind::Simple,
        }
    }
}

/// A pull parser over one CBOR-encoded buffer.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
    depth: usize,
}

impl<'a> Reader<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Reader {
            input,
            pos: 0,
            depth: 0,
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.input.len().saturating_sub(self.pos)
    }

    /// Succeeds when the whole input has been consumed.
    pub fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(CborError::TrailingBytes(n)),
        }
    }

    fn byte(&mut self) -> Result<u8> {
        let b = *self.input.get(self.pos).ok_or(CborError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8]> {
        let remaining = self.remaining();
        let n = usize::try_from(len)
            .ok()
            .filter(|n| *n <= remaining)
            .ok_or(CborError::LengthTooLarge { len, remaining })?;
        let slice = self
            .input
            .get(self.pos..self.pos + n)
            .ok_or(CborError::Truncated)?;
        self.pos += n;
        Ok(slice)
    }

    fn fixed(&mut self, n: usize) -> Result<u64> {
        let mut v = 0u64;
        for _ in 0..n {
            v = (v << 8) | u64::from(self.byte()?);
        }
        Ok(v)
    }

    fn read_head(&mut self) -> Result<Head> {
        let initial = self.byte()?;
        let major = initial >> 5;
        let info = initial & 0x1f;
        let arg = match info {
            0..=23 => Some(u64::from(info)),
            24 => Some(self.fixed(1)?),
            25 => Some(self.fixed(2)?),
            26 => Some(self.fixed(4)?),
            27 => Some(self.fixed(8)?),
            28..=30 => return Err(CborError::Reserved(info)),
            _ => None,
        };
        match (major, info, arg) {
            (0 | 1 | 6, 31, _) => Err(CborError::IllegalIndefinite(major)),
            (7, 24, Some(v)) if v < 32 => Err(CborError::BadSimple),
            _ => Ok(Head { major, info, arg }),
        }
    }

    /// The type of the next item, without consuming it.
    pub fn peek_kind(&self) -> Result<Kind> {
        let mut probe = self.clone();
        probe.read_head().map(Head::kind)
    }

    fn expect_head(&mut self, kind: Kind) -> Result<Head> {
        let head = self.read_head()?;
        if head.kind() == kind {
            Ok(head)
        } else {
            Err(CborError::Unexpected {
                expected: kind.name(),
                found: head.kind().name(),
            })
        }
    }

    /// Consumes a break code if one is next.
    pub fn take_break(&mut self) -> Result<bool> {
        match self.input.get(self.pos) {
            Some(&BREAK) => {
                self.pos += 1;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => Err(CborError::Truncated),
        }
    }

    /// An unsigned integer (major type 0).
    pub fn read_uint(&mut self) -> Result<u64> {
        let head = self.expect_head(Kind::Unsigned)?;
        head.arg.ok_or(CborError::IllegalIndefinite(0))
    }

    /// An unsigned or negative integer.
    pub fn read_int(&mut self) -> Result<i128> {
        let head = self.read_head()?;
        match (head.kind(), head.arg) {
            (Kind::Unsigned, Some(v)) => Ok(i128::from(v)),
            (Kind::Negative, Some(v)) => Ok(-1 - i128::from(v)),
            (kind, _) => Err(CborError::Unexpected {
                expected: "an integer",
                found: kind.name(),
            }),
        }
    }

    /// `true` or `false`.
    pub fn read_bool(&mut self) -> Result<bool> {
        let head = self.expect_head(Kind::Bool)?;
        Ok(head.info == 21)
    }

    /// `null`.
    pub fn read_null(&mut self) -> Result<()> {
        self.expect_head(Kind::Null).map(|_| ())
    }

    fn string_body(&mut self, head: Head) -> Result<Cow<'a, [u8]>> {
        let text = head.major == 3;
        match head.arg {
            Some(len) => {
                let bytes = self.take(len)?;
                if text && std::str::from_utf8(bytes).is_err() {
                    return Err(CborError::InvalidUtf8);
                }
                Ok(Cow::Borrowed(bytes))
            }
            None => {
                let mut out = Vec::new();
                while !self.take_break()? {
                    let chunk = self.read_head()?;
                    let Some(len) = chunk.arg.filter(|_| chunk.major == head.major) else {
                        return Err(CborError::BadChunk);
                    };
                    let bytes = self.take(len)?;
                    if text && std::str::from_utf8(bytes).is_err() {
                        return Err(CborError::InvalidUtf8);
                    }
                    out.extend_from_slice(bytes);
                }
                Ok(Cow::Owned(out))
            }
        }
    }

    /// A byte string, definite (borrowed) or indefinite (concatenated).
    pub fn read_bytes(&mut self) -> Result<Cow<'a, [u8]>> {
        let head = self.expect_head(Kind::Bytes)?;
        self.string_body(head)
    }

    /// A text string, definite (borrowed) or indefinite (concatenated).
    pub fn read_text(&mut self) -> Result<Cow<'a, str>> {
        let head = self.expect_head(Kind::Text)?;
        match self.string_body(head)? {
            Cow::Borrowed(b) => std::str::from_utf8(b)
                .map(Cow::Borrowed)
                .map_err(|_| CborError::InvalidUtf8),
            Cow::Owned(v) => String::from_utf8(v)
                .map(Cow::Owned)
                .map_err(|_| CborError::InvalidUtf8),
        }
    }

    /// A map key: `Some(text)` for a text key, `None` (after skipping it) for any other key.
    pub fn read_key(&mut self) -> Result<Option<Cow<'a, str>>> {
        if self.peek_kind()? == Kind::Text {
            self.read_text().map(Some)
        } else {
            self.skip().map(|_| None)
        }
    }

    /// An array header: `Some(len)` or `None` for an indefinite length.
    ///
    /// Prefer [`Reader::read_array`], which also tracks nesting and the break code.
    pub fn read_array_header(&mut self) -> Result<Option<u64>> {
        let head = self.expect_head(Kind::Array)?;
        self.check_count(head.arg, 1)
    }

    /// A map header: `Some(pairs)` or `None` for an indefinite length.
    ///
    /// Prefer [`Reader::read_map`], which also tracks nesting and the break code.
    pub fn read_map_header(&mut self) -> Result<Option<u64>> {
        let head = self.expect_head(Kind::Map)?;
        self.check_count(head.arg, 2)
    }

    /// Every item takes at least one byte, so a count the input cannot hold is refused up front.
    fn check_count(&self, count: Option<u64>, items_each: u64) -> Result<Option<u64>> {
        if let Some(n) = count {
            let remaining = self.remaining();
            if n.saturating_mul(items_each) > remaining as u64 {
                return Err(CborError::LengthTooLarge { len: n, remaining });
            }
        }
        Ok(count)
    }

    fn enter(&mut self) -> Result<()> {
        if self.depth >= MAX_DEPTH {
            return Err(CborError::TooDeep);
        }
        self.depth += 1;
        Ok(())
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }

    /// Reads a map (definite or indefinite), calling `entry` once per pair.
    ///
    /// `entry` must consume exactly one key and one value (see [`Reader::read_key`]).
    pub fn read_map<E, F>(&mut self, mut entry: F) -> std::result::Result<(), E>
    where
        E: From<CborError>,
        F: FnMut(&mut Reader<'a>) -> std::result::Result<(), E>,
    {
        let len = self.read_map_header()?;
        self.enter()?;
        self.each(len, &mut entry)?;
        self.leave();
        Ok(())
    }

    /// Reads an array (definite or indefinite), calling `item` once per element.
    ///
    /// `item` must consume exactly one value.
    pub fn read_array<E, F>(&mut self, mut item: F) -> std::result::Result<(), E>
    where
        E: From<CborError>,
        F: FnMut(&mut Reader<'a>) -> std::result::Result<(), E>,
    {
        let len = self.read_array_header()?;
        self.enter()?;
        self.each(len, &mut item)?;
        self.leave();
        Ok(())
    }

    fn each<E, F>(&mut self, len: Option<u64>, f: &mut F) -> std::result::Result<(), E>
    where
        E: From<CborError>,
        F: FnMut(&mut Reader<'a>) -> std::result::Result<(), E>,
    {
        match len {
            Some(n) => {
                for _ in 0..n {
                    f(self)?;
                }
            }
            None => {
                while !self.take_break()? {
                    f(self)?;
                }
            }
        }
        Ok(())
    }

    /// Skips one complete item of any type, validating it on the way.
    pub fn skip(&mut self) -> Result<()> {
        let head = self.read_head()?;
        match head.kind() {
            Kind::Bytes | Kind::Text => self.string_body(head).map(|_| ()),
            Kind::Array | Kind::Map => {
                let each = if head.major == 5 { 2 } else { 1 };
                let len = self.check_count(head.arg, each)?;
                self.enter()?;
                match len {
                    Some(n) => {
                        for _ in 0..n.saturating_mul(each) {
                            self.skip()?;
                        }
                    }
                    None => {
                        while !self.take_break()? {
                            for _ in 0..each {
                                self.skip()?;
                            }
                        }
                    }
                }
                self.leave();
                Ok(())
            }
            Kind::Tag => {
                self.enter()?;
                self.skip()?;
                self.leave();
                Ok(())
            }
            Kind::Break => Err(CborError::UnexpectedBreak),
            _ => Ok(()),
        }
    }

    /// Checks that `input` is exactly one well-formed item.
    pub fn validate(input: &[u8]) -> Result<()> {
        let mut r = Reader::new(input);
        r.skip()?;
        r.finish()
    }
}

/// Builds CBOR into a byte vector, always with the shortest encodings.
#[derive(Debug, Clone, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Writer::default()
    }

    pub fn with_capacity(capacity: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(capacity),
        }
    }

    fn head(&mut self, major: u8, arg: u64) -> &mut Self {
        let m = major << 5;
        if arg < 24 {
            self.buf.push(m | arg as u8);
        } else if let Ok(v) = u8::try_from(arg) {
            self.buf.extend_from_slice(&[m | 24, v]);
        } else if let Ok(v) = u16::try_from(arg) {
            self.buf.push(m | 25);
            self.buf.extend_from_slice(&v.to_be_bytes());
        } else if let Ok(v) = u32::try_from(arg) {
            self.buf.push(m | 26);
            self.buf.extend_from_slice(&v.to_be_bytes());
        } else {
            self.buf.push(m | 27);
            self.buf.extend_from_slice(&arg.to_be_bytes());
        }
        self
    }

    pub fn uint(&mut self, v: u64) -> &mut Self {
        self.head(0, v)
    }

    pub fn int(&mut self, v: i64) -> &mut Self {
        match u64::try_from(v) {
            Ok(u) => self.head(0, u),
            // -1 - v for negative v, computed without overflow.
            Err(_) => self.head(1, !(v as u64)),
        }
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.head(2, b.len() as u64);
        self.buf.extend_from_slice(b);
        self
    }

    pub fn text(&mut self, s: &str) -> &mut Self {
        self.head(3, s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    /// A definite-length array header; `len` items must follow.
    pub fn array(&mut self, len: u64) -> &mut Self {
        self.head(4, len)
    }

    /// A definite-length map header; `pairs` key/value pairs must follow.
    pub fn map(&mut self, pairs: u64) -> &mut Self {
        self.head(5, pairs)
    }

    /// Starts an indefinite-length array; close it with [`Writer::end`].
    pub fn begin_array(&mut self) -> &mut Self {
        self.buf.push(0x9F);
        self
    }

    /// Starts an indefinite-length map; close it with [`Writer::end`].
    pub fn begin_map(&mut self) -> &mut Self {
        self.buf.push(0xBF);
        self
    }

    /// The break code closing an indefinite-length item.
    pub fn end(&mut self) -> &mut Self {
        self.buf.push(BREAK);
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.buf.push(if v { 0xF5 } else { 0xF4 });
        self
    }

    pub fn null(&mut self) -> &mut Self {
        self.buf.push(0xF6);
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fixed-seed xorshift64 generator for property-style tests.
    pub(crate) struct XorShift(pub u64);

    impl XorShift {
        pub(crate) fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        pub(crate) fn bytes(&mut self, max_len: usize) -> Vec<u8> {
            let len = (self.next_u64() % (max_len as u64 + 1)) as usize;
            (0..len).map(|_| self.next_u64() as u8).collect()
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn writer_uses_shortest_encodings() {
        let mut w = Writer::new();
        w.uint(0)
            .uint(23)
            .uint(24)
            .uint(255)
            .uint(256)
            .uint(65535)
            .uint(65536)
            .uint(u32::MAX as u64 + 1);
        assert_eq!(
            w.as_bytes(),
            hex("00 17 1818 18ff 190100 19ffff 1a00010000 1b0000000100000000").as_slice()
        );
        let mut w = Writer::new();
        w.int(-1).int(-24).int(-25).int(i64::MIN).int(5);
        assert_eq!(w.into_bytes(), hex("20 37 3818 3b7fffffffffffffff 05"));
        let mut w = Writer::new();
        w.text("a").bytes(&[1, 2]).bool(true).bool(false).null();
        assert_eq!(w.into_bytes(), hex("6161 420102 f5 f4 f6"));
    }

    #[test]
    fn reads_integers() {
        let data = hex("00 17 1818 190400 1b ffffffffffffffff 20 3bffffffffffffffff");
        let mut r = Reader::new(&data);
        assert_eq!(r.read_uint(), Ok(0));
        assert_eq!(r.read_uint(), Ok(23));
        assert_eq!(r.read_uint(), Ok(24));
        assert_eq!(r.read_int(), Ok(1024));
        assert_eq!(r.read_uint(), Ok(u64::MAX));
        assert_eq!(r.read_int(), Ok(-1));
        assert_eq!(r.read_int(), Ok(-1 - i128::from(u64::MAX)));
        assert_eq!(r.finish(), Ok(()));
        // Non-preferred encodings are still well-formed.
        assert_eq!(Reader::new(&hex("1b0000000000000005")).read_uint(), Ok(5));
    }

    #[test]
    fn type_mismatch_is_typed() {
        let data = hex("20");
        assert_eq!(
            Reader::new(&data).read_uint(),
            Err(CborError::Unexpected {
                expected: "an unsigned integer",
                found: "a negative integer"
            })
        );
        assert!(matches!(
            Reader::new(&hex("6161")).read_bytes(),
            Err(CborError::Unexpected { .. })
        ));
        assert!(matches!(
            Reader::new(&hex("f6")).read_int(),
            Err(CborError::Unexpected { .. })
        ));
    }

    #[test]
    fn definite_strings_are_borrowed() {
        let data = hex("43010203 63616263");
        let mut r = Reader::new(&data);
        assert!(matches!(r.read_bytes(), Ok(Cow::Borrowed(&[1, 2, 3]))));
        assert!(matches!(r.read_text(), Ok(Cow::Borrowed("abc"))));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn indefinite_strings_are_concatenated() {
        let data = hex("5f 4201 02 41 03 40 ff 7f 6261 62 61 63 ff 5f ff");
        let mut r = Reader::new(&data);
        assert_eq!(r.read_bytes().expect("bytes").as_ref(), &[1, 2, 3]);
        assert_eq!(r.read_text().expect("text").as_ref(), "abc");
        assert_eq!(r.read_bytes().expect("empty").as_ref(), &[] as &[u8]);
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn indefinite_string_chunks_must_match() {
        // A text chunk inside a byte string, a nested indefinite chunk, an integer chunk.
        for bad in ["5f 6161 ff", "5f 5f ff ff", "5f 01 ff", "7f 4161 ff"] {
            assert_eq!(
                Reader::validate(&hex(bad)),
                Err(CborError::BadChunk),
                "{bad}"
            );
        }
        assert_eq!(
            Reader::new(&hex("5f 6161 ff")).read_bytes(),
            Err(CborError::BadChunk)
        );
    }

    #[test]
    fn rejects_invalid_utf8() {
        assert_eq!(
            Reader::new(&hex("62c328")).read_text(),
            Err(CborError::InvalidUtf8)
        );
        // Each chunk of an indefinite text string must be valid on its own.
        assert_eq!(
            Reader::validate(&hex("7f 61c3 61a9 ff")),
            Err(CborError::InvalidUtf8)
        );
        assert_eq!(Reader::validate(&hex("62c3a9")), Ok(()));
    }

    #[test]
    fn reads_definite_and_indefinite_maps_and_arrays() {
        for data in [
            "a2 6161 01 6162 82 02 03",
            "bf 6161 01 6162 9f 02 03 ff ff",
            "bf 6161 01 6162 82 02 03 ff",
            "a2 6161 01 6162 9f 02 03 ff",
        ] {
            let data = hex(data);
            let mut r = Reader::new(&data);
            let mut a = None;
            let mut b = Vec::new();
            r.read_map(|r| -> Result<()> {
                match r.read_key()?.as_deref() {
                    Some("a") => a = Some(r.read_uint()?),
                    Some("b") => r.read_array(|r| -> Result<()> {
                        b.push(r.read_uint()?);
                        Ok(())
                    })?,
                    _ => r.skip()?,
                }
                Ok(())
            })
            .expect("map");
            assert_eq!(r.finish(), Ok(()));
            assert_eq!(a, Some(1));
            assert_eq!(b, vec![2, 3]);
        }
    }

    #[test]
    fn non_text_keys_are_skipped() {
        let data = hex("a2 01 02 6161 03");
        let mut r = Reader::new(&data);
        let mut keys = Vec::new();
        r.read_map(|r| -> Result<()> {
            keys.push(r.read_key()?.map(|k| k.into_owned()));
            r.skip()
        })
        .expect("map");
        assert_eq!(keys, vec![None, Some("a".to_owned())]);
    }

    #[test]
    fn skips_every_supported_type() {
        let data = hex(concat!(
            "bf",
            "6161 f4",
            "6162 f5",
            "6163 f6",
            "6164 f7",
            "6165 f0",
            "6166 f820",
            "6167 f93c00",
            "6168 fa3f800000",
            "6169 fb3ff0000000000000",
            "616a c1 1a514b67b0",
            "616b 5f 41 00 ff",
            "616c a1 00 80",
            "616d 29",
            "ff"
        ));
        assert_eq!(Reader::validate(&data), Ok(()));
    }

    #[test]
    fn rejects_truncation_and_trailing_bytes() {
        assert_eq!(Reader::validate(&[]), Err(CborError::Truncated));
        assert_eq!(Reader::validate(&hex("19 04")), Err(CborError::Truncated));
        assert_eq!(
            Reader::validate(&hex("bf 6161 01")),
            Err(CborError::Truncated)
        );
        assert_eq!(
            Reader::validate(&hex("01 02")),
            Err(CborError::TrailingBytes(1))
        );
    }

    #[test]
    fn rejects_lengths_beyond_the_input() {
        assert_eq!(
            Reader::validate(&hex("5a ffffffff 00")),
            Err(CborError::LengthTooLarge {
                len: 0xffff_ffff,
                remaining: 1
            })
        );
        assert!(matches!(
            Reader::validate(&hex("7b ffffffffffffffff")),
            Err(CborError::LengthTooLarge { .. })
        ));
        // An array or map claiming more items than bytes left.
        assert!(matches!(
            Reader::validate(&hex("9b 00000000ffffffff 00")),
            Err(CborError::LengthTooLarge { .. })
        ));
        assert!(matches!(
            Reader::validate(&hex("a2 00 00 00")),
            Err(CborError::LengthTooLarge { .. })
        ));
    }

    #[test]
    fn rejects_deep_nesting() {
        let ok: Vec<u8> = std::iter::repeat_n(0x81, MAX_DEPTH).chain([0x00]).collect();
        assert_eq!(Reader::validate(&ok), Ok(()));
        let deep: Vec<u8> = std::iter::repeat_n(0x81, MAX_DEPTH + 1)
            .chain([0x00])
            .collect();
        assert_eq!(Reader::validate(&deep), Err(CborError::TooDeep));
        let deep_indef: Vec<u8> = std::iter::repeat_n(0x9f, 1000).collect();
        assert_eq!(Reader::validate(&deep_indef), Err(CborError::TooDeep));
        let tags: Vec<u8> = std::iter::repeat_n(0xc6, 1000).collect();
        assert_eq!(Reader::validate(&tags), Err(CborError::TooDeep));
        // Depth counted through read_map as well.
        let mut r = Reader::new(&deep);
        fn nest(r: &mut Reader<'_>) -> Result<()> {
            if r.peek_kind()? == Kind::Array {
                r.read_array(nest)
            } else {
                r.skip()
            }
        }
        assert_eq!(nest(&mut r), Err(CborError::TooDeep));
    }

    #[test]
    fn rejects_malformed_heads() {
        assert_eq!(Reader::validate(&hex("1c")), Err(CborError::Reserved(28)));
        assert_eq!(Reader::validate(&hex("fe")), Err(CborError::Reserved(30)));
        assert_eq!(
            Reader::validate(&hex("1f")),
            Err(CborError::IllegalIndefinite(0))
        );
        assert_eq!(
            Reader::validate(&hex("3f")),
            Err(CborError::IllegalIndefinite(1))
        );
        assert_eq!(
            Reader::validate(&hex("df 00")),
            Err(CborError::IllegalIndefinite(6))
        );
        assert_eq!(
            Reader::validate(&hex("ff")),
            Err(CborError::UnexpectedBreak)
        );
        assert_eq!(Reader::validate(&hex("f8 10")), Err(CborError::BadSimple));
        // A break in the value position of an indefinite map.
        assert_eq!(
            Reader::validate(&hex("bf 6161 ff")),
            Err(CborError::UnexpectedBreak)
        );
        // A break inside a definite array.
        assert_eq!(
            Reader::validate(&hex("82 00 ff")),
            Err(CborError::UnexpectedBreak)
        );
    }

    #[test]
    fn writer_output_round_trips() {
        let mut w = Writer::new();
        w.begin_map()
            .text("f")
            .uint(7)
            .text("n")
            .int(-300)
            .text("r")
            .array(2)
            .map(1)
            .text("z")
            .uint(1 << 40)
            .begin_array()
            .bytes(&[0xAB; 300])
            .end()
            .end();
        let data = w.into_bytes();
        assert_eq!(Reader::validate(&data), Ok(()));
        let mut r = Reader::new(&data);
        let mut seen = Vec::new();
        r.read_map(|r| -> Result<()> {
            let key = r.read_key()?.map(|k| k.into_owned()).unwrap_or_default();
            match key.as_str() {
                "f" => seen.push(i128::from(r.read_uint()?)),
                "n" => seen.push(r.read_int()?),
                _ => r.skip()?,
            }
            Ok(())
        })
        .expect("map");
        assert_eq!(seen, vec![7, -300]);
    }

    #[test]
    fn no_panic_on_prefixes_and_noise() {
        let valid = hex("bf 6161 82 01 5f 41 00 ff 6162 7f 6161 ff 6163 a1 20 f6 ff");
        assert_eq!(Reader::validate(&valid), Ok(()));
        for end in 0..valid.len() {
            assert!(Reader::validate(&valid[..end]).is_err(), "prefix {end}");
        }
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..20_000 {
            let noise = rng.bytes(64);
            let _ = Reader::validate(&noise);
            let mut r = Reader::new(&noise);
            let _ = r.read_map(|r| -> Result<()> {
                let _ = r.read_key()?;
                r.skip()
            });
        }
        // Mutations of a valid message.
        for _ in 0..20_000 {
            let mut m = valid.clone();
            let i = (rng.next_u64() as usize) % m.len();
            m[i] = rng.next_u64() as u8;
            let _ = Reader::validate(&m);
        }
    }
}
