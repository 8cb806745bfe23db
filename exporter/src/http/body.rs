//! Message bodies, skipped by count: Content-Length, chunked (chunk-size
//! lines must lie in copied bytes; chunk data need not), or until close.

/// Longest chunk-size line (hex size plus extensions).
const MAX_CHUNK_LINE: usize = 1024;

/// A message body being skipped, by how it ends.
#[derive(Debug)]
pub(super) enum Body {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

/// What skipping a body did with the bytes a segment has left.
pub(super) enum BodyStep {
    /// Used all of them; the body goes on.
    Continues(u64),
    /// The body ended after this many of them.
    Ended(u64),
    /// A chunk-size line fell outside the copied bytes or was not one.
    Lost,
}

impl Body {
    /// Bytes that are body for certain from here: the rest of a body of
    /// known length, or of a chunk's data (and its CRLF). Nothing after
    /// them need be copied: the next chunk-size line or head follows.
    pub(super) fn known_left(&self) -> Option<u64> {
        match self {
            Body::Length(left) => Some(*left),
            Body::Chunked(Chunked::Data { remaining }) => Some(*remaining),
            Body::Chunked(_) | Body::UntilClose => None,
        }
    }

    /// Consumes bytes `[0, available)` of which `captured` are known;
    /// adds to `content` the bytes of them that are the body's payload
    /// (chunk-size lines, chunk CRLFs and trailers are framing).
    pub(super) fn advance(
        &mut self,
        available: u64,
        captured: &[u8],
        content: &mut u64,
    ) -> BodyStep {
        match self {
            Body::Length(left) => {
                let take = (*left).min(available);
                *left -= take;
                *content += take;
                if *left == 0 {
                    BodyStep::Ended(take)
                } else {
                    BodyStep::Continues(take)
                }
            }
            Body::Chunked(chunked) => chunked.advance(available, captured, content),
            Body::UntilClose => {
                *content += available;
                BodyStep::Continues(available)
            }
        }
    }
}

/// Incremental chunked-encoding decoder that skips chunk data by count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Chunked {
    /// Reading a chunk-size line (bytes so far).
    SizeLine(Vec<u8>),
    /// Skipping chunk data, then its CRLF (`remaining` includes the 2 bytes).
    Data { remaining: u64 },
    /// After the last chunk: trailer lines until an empty line.
    Trailer { line: Vec<u8> },
}

impl Chunked {
    pub(super) fn new() -> Self {
        Chunked::SizeLine(Vec::new())
    }

    fn advance(&mut self, available: u64, captured: &[u8], content: &mut u64) -> BodyStep {
        let mut pos: u64 = 0;
        while pos < available {
            match self {
                Chunked::Data { remaining } => {
                    let take = (*remaining).min(available - pos);
                    // The chunk's last 2 bytes are its CRLF.
                    *content += take.min(remaining.saturating_sub(2));
                    *remaining -= take;
                    pos += take;
                    if *remaining == 0 {
                        *self = Chunked::SizeLine(Vec::new());
                    }
                }
                Chunked::SizeLine(line) => {
                    if !push_line_byte(line, captured, &mut pos) {
                        return BodyStep::Lost;
                    }
                    if line.ends_with(b"\r\n") {
                        let Some(size) = parse_chunk_size(&line[..line.len() - 2]) else {
                            return BodyStep::Lost;
                        };
                        *self = if size == 0 {
                            Chunked::Trailer { line: Vec::new() }
                        } else {
                            Chunked::Data {
                                remaining: size + 2,
                            }
                        };
                    }
                }
                Chunked::Trailer { line } => {
                    if !push_line_byte(line, captured, &mut pos) {
                        return BodyStep::Lost;
                    }
                    if line.ends_with(b"\r\n") {
                        if line.len() == 2 {
                            return BodyStep::Ended(pos);
                        }
                        line.clear();
                    }
                }
            }
        }
        BodyStep::Continues(available)
    }
}

/// Appends the byte at `pos` to a line being read; false when that byte was
/// not copied or the line is too long to be a chunk line.
fn push_line_byte(line: &mut Vec<u8>, captured: &[u8], pos: &mut u64) -> bool {
    let Some(byte) = captured.get(*pos as usize).copied() else {
        return false;
    };
    if line.len() >= MAX_CHUNK_LINE {
        return false;
    }
    line.push(byte);
    *pos += 1;
    true
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?;
    let digits = std::str::from_utf8(digits).ok()?.trim();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Payload bytes are counted however the body is split across
    /// segments, and chunk framing never is.
    #[test]
    fn chunked_payload_is_counted_without_its_framing() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 0..=body.len() {
            let mut chunked = Body::Chunked(Chunked::new());
            let mut content = 0;
            let (first, second) = body.split_at(split);
            let mut ended = false;
            for part in [first, second] {
                match chunked.advance(part.len() as u64, part, &mut content) {
                    BodyStep::Ended(used) => {
                        assert_eq!(used, part.len() as u64);
                        ended = true;
                    }
                    BodyStep::Continues(_) => {}
                    BodyStep::Lost => panic!("lost at split {split}"),
                }
            }
            assert!(ended, "split {split}");
            assert_eq!(content, 8, "split {split}");
        }
        let mut length = Body::Length(10);
        let mut content = 0;
        assert!(matches!(
            length.advance(4, b"", &mut content),
            BodyStep::Continues(4)
        ));
        assert!(matches!(
            length.advance(9, b"", &mut content),
            BodyStep::Ended(6)
        ));
        assert_eq!(content, 10);
    }
}
