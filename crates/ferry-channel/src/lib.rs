//! Ferry's wire framing, shared by the operator API and the peer migration
//! protocol. Both run inside TLS 1.3; this layer only delimits messages.
//!
//! ```text
//!  0        1        2        3        4        5        6        7
//! +--------+--------+--------+--------+--------+--------+--------+--------+
//! |  kind  |   0    |   0    |   0    |      payload length (u32, BE)     |
//! +--------+--------+--------+--------+--------+--------+--------+--------+
//! |  payload (length bytes): JSON control message, or raw VM state bytes  |
//! +-----------------------------------------------------------------------+
//! ```
//!
//! Kinds: 1 = control (a JSON message, at most [`MAX_CONTROL_LEN`]),
//! 2 = data (at most [`MAX_DATA_LEN`]), 3 = end of data (empty). Kind 0 and
//! every other value are invalid, as are non-zero reserved bytes: a frame
//! is refused before a byte of its payload is allocated. The protocol
//! version is carried by the first control message of each connection.
//!
//! [`codec`] is sans-IO (and fuzzable); [`io`] drives it over tokio streams
//! with a timeout on every read and write; [`relay`] carries a VM stream
//! between QEMU and data frames, hashing it; [`fuzz`] holds the fuzz entry
//! points that `fuzz/` (cargo-fuzz) and this crate's unit tests call.

pub mod codec;
pub mod fuzz;
pub mod io;
pub mod relay;

pub use codec::{FrameError, FrameHeader, FrameKind, HEADER_LEN, MAX_CONTROL_LEN, MAX_DATA_LEN};
pub use io::{ChannelError, FrameReader, FrameWriter, Incoming};
pub use relay::{
    QemuSource, ReceivePump, Received, RelayError, SendPump, StreamHasher, StreamSum, SEND_RECORDS,
};
