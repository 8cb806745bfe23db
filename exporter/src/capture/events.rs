//! Events as the kernel side writes them to the ring buffer, decoded
//! without copying: a header, then the captured prefix of a buffer.

use exporter_common::{EVENT_HEADER_LEN, EventHeader, EventKind};

/// One event as read from the ring buffer.
#[derive(Clone, Copy, Debug)]
pub struct RawEvent<'a> {
    pub kind: EventKind,
    pub header: EventHeader,
    /// The copied prefix of the syscall's buffer.
    pub data: &'a [u8],
}

impl RawEvent<'_> {
    /// The listening fd the connection was accepted on, when this is its
    /// first event and the kernel saw the accept.
    pub fn accepted_on(&self) -> Option<u32> {
        match self.kind {
            EventKind::Read | EventKind::Write if self.header.aux > 0 => Some(self.header.aux - 1),
            _ => None,
        }
    }

    /// The local port of the connection's socket, when the kernel read it.
    pub fn local_port(&self) -> Option<u16> {
        u16::try_from(self.header.local_port)
            .ok()
            .filter(|&port| port != 0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("event claims {claimed} captured bytes but carries {carried}")]
    Length { claimed: u32, carried: usize },
    #[error("unknown event kind {0}")]
    Kind(u32),
}

/// Reads an event the kernel wrote: a header, then the copied bytes.
pub fn decode_event(bytes: &[u8]) -> Result<RawEvent<'_>, DecodeError> {
    if bytes.len() < EVENT_HEADER_LEN {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked; EventHeader is plain old data; unaligned read.
    let header: EventHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let carried = bytes.len() - EVENT_HEADER_LEN;
    let captured = header.captured_len as usize;
    if captured > carried {
        return Err(DecodeError::Length {
            claimed: header.captured_len,
            carried,
        });
    }
    let kind = EventKind::from_u32(header.kind).ok_or(DecodeError::Kind(header.kind))?;
    Ok(RawEvent {
        kind,
        header,
        data: &bytes[EVENT_HEADER_LEN..EVENT_HEADER_LEN + captured],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_bytes(header: EventHeader, data: &[u8]) -> Vec<u8> {
        [&header.to_bytes()[..], data].concat()
    }

    #[test]
    fn decodes_header_and_captured_prefix() {
        let header = EventHeader {
            kind: EventKind::Read as u32,
            tgid: 7,
            fd: 9,
            seq: 3,
            conn_id: 11,
            timestamp_ns: 13,
            byte_count: 1000,
            offset: 17,
            captured_len: 5,
            aux: 0,
            handshake_ns: 19,
            local_port: 8000,
            _pad: 0,
        };
        let bytes = event_bytes(header, b"GET /");
        let event = decode_event(&bytes).expect("valid event");
        assert_eq!(event.kind, EventKind::Read);
        assert_eq!(event.header, header);
        assert_eq!(event.data, b"GET /");
        assert_eq!(event.local_port(), Some(8000));
    }

    #[test]
    fn rejects_events_that_lie_about_their_length() {
        let header = EventHeader {
            kind: 2,
            captured_len: 50,
            ..EventHeader::default()
        };
        let bytes = event_bytes(header, b"short");
        assert_eq!(
            decode_event(&bytes).err(),
            Some(DecodeError::Length {
                claimed: 50,
                carried: 5
            })
        );
        assert_eq!(
            decode_event(&bytes[..10]).err(),
            Some(DecodeError::Short(10))
        );
        let unknown = event_bytes(
            EventHeader {
                kind: 99,
                ..EventHeader::default()
            },
            b"",
        );
        assert_eq!(decode_event(&unknown).err(), Some(DecodeError::Kind(99)));
    }
}
