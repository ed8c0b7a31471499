//! QEMU's migration return path (destination to source), read so that its
//! last message can be held. Each message is a big-endian u16 type, a u16
//! payload length and the payload. Outside post-copy the destination sends
//! PONG (answering the source's ping) and, once it has loaded the whole
//! stream, SHUT; the source QEMU completes only after SHUT arrives.

const MSG_SHUT: u16 = 1;
const MSG_PONG: u16 = 2;
const HEADER: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnEvent {
    /// A whole message to pass on now.
    Pass(Vec<u8>),
    /// SHUT: `loaded` when the destination loaded everything (value 0);
    /// its bytes are to be held until the gate opens.
    Shut { loaded: bool, bytes: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReturnPathError {
    #[error(
        "the destination QEMU sent return-path message type {kind}, which only post-copy uses"
    )]
    Unexpected { kind: u16 },
    #[error("the destination QEMU sent {len} bytes after its final SHUT")]
    AfterShut { len: usize },
    #[error("a return-path {kind} message of {len} bytes is malformed")]
    Malformed { kind: &'static str, len: u16 },
}

#[derive(Debug, Default)]
pub struct ReturnPathScanner {
    buf: Vec<u8>,
    shut: bool,
}

impl ReturnPathScanner {
    /// Feed bytes read from the destination QEMU; get whole messages back.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<ReturnEvent>, ReturnPathError> {
        if self.shut && !bytes.is_empty() {
            return Err(ReturnPathError::AfterShut { len: bytes.len() });
        }
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while self.buf.len() >= HEADER {
            let kind = u16::from_be_bytes([self.buf[0], self.buf[1]]);
            let len = u16::from_be_bytes([self.buf[2], self.buf[3]]);
            let whole = HEADER + len as usize;
            match kind {
                MSG_PONG | MSG_SHUT if len != 4 => {
                    let kind = if kind == MSG_PONG { "PONG" } else { "SHUT" };
                    return Err(ReturnPathError::Malformed { kind, len });
                }
                MSG_PONG | MSG_SHUT => {}
                kind => return Err(ReturnPathError::Unexpected { kind }),
            }
            if self.buf.len() < whole {
                break;
            }
            let rest = self.buf.split_off(whole);
            let message = std::mem::replace(&mut self.buf, rest);
            if kind == MSG_SHUT {
                let value = u32::from_be_bytes([message[4], message[5], message[6], message[7]]);
                self.shut = true;
                if !self.buf.is_empty() {
                    return Err(ReturnPathError::AfterShut { len: self.buf.len() });
                }
                events.push(ReturnEvent::Shut { loaded: value == 0, bytes: message });
            } else {
                events.push(ReturnEvent::Pass(message));
            }
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PONG: [u8; 8] = [0, 2, 0, 4, 0, 0, 0, 1];
    const SHUT: [u8; 8] = [0, 1, 0, 4, 0, 0, 0, 0];

    #[test]
    fn pong_passes_and_shut_is_held_however_the_bytes_are_cut() {
        let all: Vec<u8> = PONG.iter().chain(SHUT.iter()).copied().collect();
        for cut in 1..all.len() {
            let mut s = ReturnPathScanner::default();
            let mut events = s.push(&all[..cut]).unwrap();
            events.extend(s.push(&all[cut..]).unwrap());
            assert_eq!(
                events,
                vec![
                    ReturnEvent::Pass(PONG.to_vec()),
                    ReturnEvent::Shut { loaded: true, bytes: SHUT.to_vec() }
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_failed_load_is_reported_as_such() {
        let mut s = ReturnPathScanner::default();
        let events = s.push(&[0, 1, 0, 4, 0, 0, 0, 1]).unwrap();
        assert!(matches!(events[..], [ReturnEvent::Shut { loaded: false, .. }]));
    }

    #[test]
    fn postcopy_messages_bytes_after_shut_and_odd_lengths_are_refused() {
        let mut s = ReturnPathScanner::default();
        assert_eq!(s.push(&[0, 4, 0, 12]), Err(ReturnPathError::Unexpected { kind: 4 }));
        let mut s = ReturnPathScanner::default();
        s.push(&SHUT).unwrap();
        assert_eq!(s.push(&PONG), Err(ReturnPathError::AfterShut { len: 8 }));
        let mut s = ReturnPathScanner::default();
        assert!(matches!(s.push(&[0, 2, 0, 9]), Err(ReturnPathError::Malformed { .. })));
    }
}
