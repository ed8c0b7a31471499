//! Sans-IO frame header codec: bytes in, typed header or error out.

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 8;
/// Largest control message. Control messages are small JSON objects (a VM
/// spec is the biggest); anything larger is an attack or a bug.
pub const MAX_CONTROL_LEN: u32 = 64 * 1024;
/// Largest data frame: big enough to amortise per-frame costs, small enough
/// to bound each reader's buffer.
pub const MAX_DATA_LEN: u32 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Control = 1,
    Data = 2,
    DataEnd = 3,
}

impl FrameKind {
    fn max_len(self) -> u32 {
        match self {
            FrameKind::Control => MAX_CONTROL_LEN,
            FrameKind::Data => MAX_DATA_LEN,
            FrameKind::DataEnd => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid frame kind {0}")]
    InvalidKind(u8),
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    #[error("{kind:?} frame of {len} bytes exceeds the maximum of {max}")]
    TooLong { kind: FrameKind, len: u32, max: u32 },
}

impl FrameHeader {
    pub fn new(kind: FrameKind, len: u32) -> Result<Self, FrameError> {
        let max = kind.max_len();
        if len > max {
            return Err(FrameError::TooLong { kind, len, max });
        }
        Ok(Self { kind, len })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let l = self.len.to_be_bytes();
        [self.kind as u8, 0, 0, 0, l[0], l[1], l[2], l[3]]
    }

    /// Decode and check a header. The length is checked against the kind's
    /// maximum here, so callers may allocate `len` bytes afterwards.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let kind = match b[0] {
            1 => FrameKind::Control,
            2 => FrameKind::Data,
            3 => FrameKind::DataEnd,
            k => return Err(FrameError::InvalidKind(k)),
        };
        if b[1..4] != [0, 0, 0] {
            return Err(FrameError::ReservedNotZero);
        }
        Self::new(kind, u32::from_be_bytes([b[4], b[5], b[6], b[7]]))
    }
}

/// A whole frame found at the front of a buffer: header, payload, bytes used.
pub type SplitFrame<'a> = (FrameHeader, &'a [u8], usize);

/// Split one whole frame off the front of `buf`: `Ok(None)` if more bytes
/// are needed. The entry point for fuzzing the codec.
pub fn split_frame(buf: &[u8]) -> Result<Option<SplitFrame<'_>>, FrameError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let h = FrameHeader::decode(head)?;
    let end = HEADER_LEN + h.len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((h, &buf[HEADER_LEN..end], end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        for (k, l) in
            [(FrameKind::Control, 5), (FrameKind::Data, MAX_DATA_LEN), (FrameKind::DataEnd, 0)]
        {
            let h = FrameHeader::new(k, l).unwrap();
            assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn bad_headers_are_refused_before_allocation() {
        assert_eq!(FrameHeader::decode(&[0, 0, 0, 0, 0, 0, 0, 1]), Err(FrameError::InvalidKind(0)));
        assert_eq!(FrameHeader::decode(&[9, 0, 0, 0, 0, 0, 0, 1]), Err(FrameError::InvalidKind(9)));
        assert_eq!(
            FrameHeader::decode(&[1, 0, 1, 0, 0, 0, 0, 1]),
            Err(FrameError::ReservedNotZero)
        );
        let huge = FrameHeader::decode(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(huge, FrameError::TooLong { kind: FrameKind::Control, .. }));
        assert!(
            FrameHeader::decode(&[3, 0, 0, 0, 0, 0, 0, 1]).is_err(),
            "DataEnd carries no payload"
        );
        let data = (MAX_DATA_LEN + 1).to_be_bytes();
        assert!(FrameHeader::decode(&[2, 0, 0, 0, data[0], data[1], data[2], data[3]]).is_err());
    }

    #[test]
    fn split_needs_whole_frames() {
        let mut buf = FrameHeader::new(FrameKind::Control, 3).unwrap().encode().to_vec();
        assert_eq!(split_frame(&buf[..4]), Ok(None));
        assert_eq!(split_frame(&buf), Ok(None));
        buf.extend_from_slice(b"abcX");
        let (h, payload, used) = split_frame(&buf).unwrap().unwrap();
        assert_eq!((h.kind, payload, used), (FrameKind::Control, &b"abc"[..], 11));
    }

    /// Deterministic pseudo-fuzz: no input may panic the splitter.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u32 = 0x1234_5678;
        for n in 0..20_000usize {
            let len = n % 40;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    // Bias towards small kinds so valid headers occur too.
                    if x.is_multiple_of(3) {
                        (x % 4) as u8
                    } else {
                        (x >> 8) as u8
                    }
                })
                .collect();
            let _ = split_frame(&bytes);
        }
    }
}
