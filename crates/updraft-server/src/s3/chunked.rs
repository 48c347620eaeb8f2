//! Decoder for `Content-Encoding: aws-chunked` bodies with unsigned chunks and trailers
//! (`x-amz-content-sha256: STREAMING-UNSIGNED-PAYLOAD-TRAILER`):
//!
//! ```text
//! <hex-size>[;ext]\r\n<data>\r\n ... 0\r\n<name>:<value>\r\n ... \r\n
//! ```
//!
//! The decoder is incremental: feed it the body as it arrives, and it hands back the
//! payload bytes; [`ChunkedDecoder::finish`] returns the trailers.

use thiserror::Error;

/// Longest chunk-size line or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Most trailer bytes accepted in total.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChunkError {
    #[error("invalid aws-chunked chunk size line '{0}'")]
    BadSize(String),
    #[error("an aws-chunked chunk is not followed by CRLF")]
    MissingCrlf,
    #[error("an aws-chunked framing line is too long")]
    LineTooLong,
    #[error("the aws-chunked body ended before its final chunk")]
    Truncated,
    #[error("malformed trailer: {0}")]
    MalformedTrailer(String),
    #[error("data follows the final aws-chunked chunk")]
    TrailingData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line.
    Size,
    /// Reading chunk data: bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data; how many of its bytes were seen.
    DataEnd(u8),
    /// Reading trailer lines after the zero-size chunk.
    Trailers,
    Done,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    line: Vec<u8>,
    trailer_bytes: usize,
    trailers: Vec<(String, String)>,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size,
            line: Vec::new(),
            trailer_bytes: 0,
            trailers: Vec::new(),
        }
    }

    /// Takes the next piece of the encoded body; appends decoded payload to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), ChunkError> {
        while !input.is_empty() {
            match self.state {
                State::Size | State::Trailers => {
                    let Some(nl) = input.iter().position(|&b| b == b'\n') else {
                        self.push_line(input)?;
                        return Ok(());
                    };
                    self.push_line(&input[..nl])?;
                    input = &input[nl + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    if self.state == State::Size {
                        self.size_line(line)?;
                    } else {
                        self.trailer_line(line)?;
                    }
                }
                State::Data(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataEnd(0)
                    } else {
                        State::Data(left)
                    };
                }
                State::DataEnd(seen) => {
                    let expected = if seen == 0 { b'\r' } else { b'\n' };
                    if input[0] != expected {
                        return Err(ChunkError::MissingCrlf);
                    }
                    input = &input[1..];
                    self.state = if seen == 0 {
                        State::DataEnd(1)
                    } else {
                        State::Size
                    };
                }
                State::Done => {
                    // Tolerate stray line ends after the terminating empty line.
                    if input.iter().all(|b| matches!(b, b'\r' | b'\n')) {
                        return Ok(());
                    }
                    return Err(ChunkError::TrailingData);
                }
            }
        }
        Ok(())
    }

    fn push_line(&mut self, bytes: &[u8]) -> Result<(), ChunkError> {
        if self.line.len() + bytes.len() > MAX_LINE {
            return Err(ChunkError::LineTooLong);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn size_line(&mut self, line: &[u8]) -> Result<(), ChunkError> {
        let text = String::from_utf8_lossy(line);
        // Chunk extensions (`;chunk-signature=...`) are ignored.
        let hex = text.split(';').next().unwrap_or("").trim();
        if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ChunkError::BadSize(text.into_owned()));
        }
        let size =
            u64::from_str_radix(hex, 16).map_err(|_| ChunkError::BadSize(text.into_owned()))?;
        self.state = if size == 0 {
            State::Trailers
        } else {
            State::Data(size)
        };
        Ok(())
    }

    fn trailer_line(&mut self, line: &[u8]) -> Result<(), ChunkError> {
        if line.is_empty() {
            self.state = State::Done;
            return Ok(());
        }
        self.trailer_bytes += line.len();
        if self.trailer_bytes > MAX_TRAILERS {
            return Err(ChunkError::MalformedTrailer(
                "trailers are too large".into(),
            ));
        }
        let text = std::str::from_utf8(line)
            .map_err(|_| ChunkError::MalformedTrailer("trailer is not UTF-8".into()))?;
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| ChunkError::MalformedTrailer(format!("'{text}' has no ':'")))?;
        self.trailers
            .push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        Ok(())
    }

    /// Ends the body: returns the trailers (names lowercased).
    pub fn finish(self) -> Result<Vec<(String, String)>, ChunkError> {
        match self.state {
            State::Done => Ok(self.trailers),
            // Some clients omit the final empty line after the last trailer.
            State::Trailers if self.line.is_empty() => Ok(self.trailers),
            _ => Err(ChunkError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] =
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-amz-checksum-crc32:DUoRhQ==\r\n\r\n";

    type Decoded = (Vec<u8>, Vec<(String, String)>);

    fn decode_in_pieces(body: &[u8], piece: usize) -> Result<Decoded, ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        for p in body.chunks(piece) {
            d.feed(p, &mut out)?;
        }
        Ok((out, d.finish()?))
    }

    #[test]
    fn decodes_data_and_trailer_at_any_split() {
        for piece in [1, 2, 3, 7, BODY.len()] {
            let (data, trailers) = decode_in_pieces(BODY, piece).expect("decodes");
            assert_eq!(data, b"hello world");
            assert_eq!(
                trailers,
                vec![("x-amz-checksum-crc32".to_owned(), "DUoRhQ==".to_owned())]
            );
        }
    }

    #[test]
    fn tolerates_missing_final_empty_line() {
        let body = b"3\r\nabc\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n";
        let (data, trailers) = decode_in_pieces(body, 4).expect("decodes");
        assert_eq!(data, b"abc");
        assert_eq!(trailers.len(), 1);
        let (data, trailers) = decode_in_pieces(b"0\r\n\r\n", 1).expect("empty body");
        assert!(data.is_empty() && trailers.is_empty());
    }

    #[test]
    fn rejects_malformed_bodies() {
        assert!(matches!(
            decode_in_pieces(b"zz\r\nabc", 10),
            Err(ChunkError::BadSize(_))
        ));
        assert_eq!(
            decode_in_pieces(b"3\r\nabcX\r\n0\r\n\r\n", 10),
            Err(ChunkError::MissingCrlf)
        );
        assert_eq!(
            decode_in_pieces(b"5\r\nabc", 10),
            Err(ChunkError::Truncated)
        );
        assert_eq!(
            decode_in_pieces(b"3\r\nabc\r\n", 10),
            Err(ChunkError::Truncated)
        );
        assert!(matches!(
            decode_in_pieces(b"0\r\nno-colon\r\n\r\n", 10),
            Err(ChunkError::MalformedTrailer(_))
        ));
        assert_eq!(
            decode_in_pieces(b"0\r\n\r\nextra", 100),
            Err(ChunkError::TrailingData)
        );
        assert!(matches!(
            decode_in_pieces(b"fffffffffffffffff\r\n", 100),
            Err(ChunkError::BadSize(_))
        ));
        let long = vec![b'1'; MAX_LINE + 1];
        assert_eq!(decode_in_pieces(&long, 100), Err(ChunkError::LineTooLong));
    }
}
