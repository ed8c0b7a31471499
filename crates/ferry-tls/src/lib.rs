//! Ferry's TLS 1.3 record layer, after rustls's handshake.
//!
//! rustls authenticates the peer and negotiates the keys; Ferry reads what
//! it needs from the handshake (peer certificate, channel binding) and then
//! [`take_over`]s the connection: a [`RecordReader`] and a [`RecordWriter`]
//! own the socket's two directions and protect records with the same keys,
//! nonces and wire format rustls would use. What that buys is the data
//! path: records are opened where they arrive and sealed where the data was
//! read ([`RecordBatch`]), with no copy and no allocation per record, and
//! the two directions never wait on each other's lock.
//!
//! What this layer does not do: key updates (a connection ends with
//! [`RecordError::KeyExhausted`] before a key reaches its suite's
//! confidentiality limit, 2^24 records for AES-GCM: 256 GiB of full records
//! each way), renegotiation or post-handshake messages of any kind (refused),
//! TLS 1.2. Alerts are honoured: close_notify ends a stream cleanly, any
//! other alert is an error, and a TCP end without close_notify is a
//! truncation, never a clean end. A failed record ends the connection in
//! both directions: the writer sends the fatal alert RFC 8446 names
//! (bad_record_mac for a record that does not authenticate) and then
//! refuses.

mod batch;
mod failed;
pub mod fuzz;
pub mod keys;
mod reader;
mod takeover;
mod writer;

pub use batch::RecordBatch;
pub use keys::{Suite, MAX_PLAINTEXT};
pub use reader::{RecordReader, READ_BUFFER};
pub use takeover::{take_over, Paced, TakeOverError, TcpReader, TcpWriter};
pub use writer::RecordWriter;

/// Record-layer failures. Decryption failures and alerts are reported as
/// the `rustls::Error` rustls would have given, inside an `io::Error`.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RecordError {
    #[error("a {suite} key of {len} bytes was refused")]
    BadKey { suite: &'static str, len: usize },
    #[error("the negotiated cipher suite has no record protection here")]
    UnsupportedSuite,
    #[error("record type {0} where TLS 1.3 allows only application data (23)")]
    UnexpectedRecordType(u8),
    #[error("record version {0:#06x}, expected 0x0303")]
    BadVersion(u16),
    #[error("record of {0} bytes exceeds TLS 1.3's maximum")]
    RecordOverflow(usize),
    #[error("record of {0} bytes is too short to hold a content type and a tag")]
    RecordTooShort(usize),
    #[error("buffer of {0} bytes does not hold exactly one record")]
    NoRoom(usize),
    #[error("record with no content type (padding only)")]
    NoContentType,
    #[error("inner content type {0} is not data, alert or handshake")]
    UnexpectedInnerType(u8),
    #[error("alert of {0} bytes (alerts have 2)")]
    BadAlert(usize),
    #[error(
        "post-handshake message of type {0} (key update or ticket): this record layer does not \
         renegotiate keys"
    )]
    PostHandshake(u8),
    #[error(
        "the {direction} key has protected {limit} records, its cipher's confidentiality limit, \
         and this record layer cannot update keys: the connection must end (with AES-GCM one \
         connection carries at most about 250 GB each way; spread larger transfers over more \
         streams)"
    )]
    KeyExhausted { direction: &'static str, limit: u64 },
    #[error("sealing a record failed")]
    SealFailed,
    #[error("the peer ended the connection without a TLS close_notify (truncated)")]
    Truncated,
    #[error("the connection was closed for sending (close_notify sent)")]
    Closed,
    #[error("an earlier write was interrupted inside a record; the connection is unusable")]
    Torn,
    #[error(
        "the peer's records failed authentication or were malformed: TLS 1.3 ends the \
         connection in both directions"
    )]
    IncomingFailed,
}

impl From<RecordError> for std::io::Error {
    fn from(e: RecordError) -> Self {
        let kind = match e {
            RecordError::Truncated => std::io::ErrorKind::UnexpectedEof,
            RecordError::Closed | RecordError::Torn | RecordError::IncomingFailed => {
                std::io::ErrorKind::BrokenPipe
            }
            _ => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, e)
    }
}

#[cfg(test)]
mod halves_tests;
