//! libvirt's RPC framing: every message is a 4-byte big-endian length that
//! counts itself, a 24-byte header (program, version, procedure, type,
//! serial, status) and an XDR body.

/// Length word plus header.
pub const HEADER_LEN: usize = 28;
/// libvirt's own ceiling for one message (`VIR_NET_MESSAGE_MAX`).
pub const LIBVIRT_MESSAGE_MAX: usize = 32 * 1024 * 1024;

/// The main API program (`REMOTE_PROGRAM`).
pub const REMOTE_PROGRAM: u32 = 0x2000_8086;
/// Keepalive pings and pongs (`KEEPALIVE_PROGRAM`, "keep").
pub const KEEPALIVE_PROGRAM: u32 = 0x6b65_6570;

/// What a message is (`virNetMessageType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Call,
    Reply,
    /// An asynchronous message (events, keepalive).
    Message,
    Stream,
    CallWithFds,
    ReplyWithFds,
    StreamHole,
    Unknown(i32),
}

impl MessageType {
    fn from_wire(v: i32) -> Self {
        match v {
            0 => Self::Call,
            1 => Self::Reply,
            2 => Self::Message,
            3 => Self::Stream,
            4 => Self::CallWithFds,
            5 => Self::ReplyWithFds,
            6 => Self::StreamHole,
            other => Self::Unknown(other),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The whole message's length, this word included.
    pub len: u32,
    pub program: u32,
    pub version: u32,
    pub procedure: i32,
    pub kind: MessageType,
    pub serial: u32,
    /// 0 = OK, 1 = error, 2 = continue (streams).
    pub status: i32,
}

impl Header {
    /// The header at the start of a whole message.
    pub fn parse(message: &[u8]) -> Option<Header> {
        if message.len() < HEADER_LEN {
            return None;
        }
        let word = |i: usize| {
            u32::from_be_bytes([message[i], message[i + 1], message[i + 2], message[i + 3]])
        };
        Some(Header {
            len: word(0),
            program: word(4),
            version: word(8),
            procedure: word(12) as i32,
            kind: MessageType::from_wire(word(16) as i32),
            serial: word(20),
            status: word(24) as i32,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a libvirt message claims {len} bytes, more than the {max} allowed")]
    TooLong { len: usize, max: usize },
    #[error("a libvirt message claims {len} bytes, less than its own header")]
    TooShort { len: usize },
}

/// Cuts a byte stream into whole messages, refusing any longer than `max`
/// before buffering it.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    max: usize,
}

impl Framer {
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max: max.min(LIBVIRT_MESSAGE_MAX) }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received that do not yet form a whole message.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(len) = self.buf.get(..4) else { return Ok(None) };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len < HEADER_LEN {
            return Err(FrameError::TooShort { len });
        }
        if len > self.max {
            return Err(FrameError::TooLong { len, max: self.max });
        }
        if self.buf.len() < len {
            return Ok(None);
        }
        let rest = self.buf.split_off(len);
        Ok(Some(std::mem::replace(&mut self.buf, rest)))
    }
}

/// Builds a message (tests and the rogue-peer harness speak libvirt too).
pub fn message(
    program: u32,
    procedure: i32,
    kind: MessageType,
    serial: u32,
    body: &[u8],
) -> Vec<u8> {
    let kind = match kind {
        MessageType::Call => 0,
        MessageType::Reply => 1,
        MessageType::Message => 2,
        MessageType::Stream => 3,
        MessageType::CallWithFds => 4,
        MessageType::ReplyWithFds => 5,
        MessageType::StreamHole => 6,
        MessageType::Unknown(v) => v,
    };
    let len = (HEADER_LEN + body.len()) as u32;
    // Both programs are at version 1.
    let version = 1u32;
    let mut m = Vec::with_capacity(len as usize);
    for w in [len, program, version, procedure as u32, kind as u32, serial, 0] {
        m.extend_from_slice(&w.to_be_bytes());
    }
    m.extend_from_slice(body);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_messages_come_out_one_at_a_time_however_the_bytes_arrive() {
        let a = message(REMOTE_PROGRAM, 66, MessageType::Call, 0, &[]);
        let b = message(REMOTE_PROGRAM, 60, MessageType::Call, 1, &[0, 0, 0, 10]);
        let stream: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        let mut f = Framer::new(1024);
        for chunk in stream.chunks(5) {
            f.push(chunk);
        }
        assert_eq!(f.next_message().unwrap().unwrap(), a);
        let got = f.next_message().unwrap().unwrap();
        let h = Header::parse(&got).unwrap();
        assert_eq!((h.procedure, h.serial, h.kind, h.len), (60, 1, MessageType::Call, 32));
        assert_eq!(f.next_message().unwrap(), None);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn an_oversized_or_undersized_length_is_refused_before_buffering() {
        let mut f = Framer::new(1024);
        f.push(&4096u32.to_be_bytes());
        assert_eq!(f.next_message(), Err(FrameError::TooLong { len: 4096, max: 1024 }));
        let mut f = Framer::new(1024);
        f.push(&8u32.to_be_bytes());
        assert_eq!(f.next_message(), Err(FrameError::TooShort { len: 8 }));
    }

    #[test]
    fn a_partial_message_waits() {
        let m = message(KEEPALIVE_PROGRAM, 1, MessageType::Message, 0, &[]);
        let mut f = Framer::new(1024);
        f.push(&m[..10]);
        assert_eq!(f.next_message(), Ok(None));
        f.push(&m[10..]);
        assert_eq!(f.next_message(), Ok(Some(m)));
    }
}
