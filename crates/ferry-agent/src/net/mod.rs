//! mTLS connections between agents and from operators: [`client`] opens
//! them, [`server`] accepts them; both end in the same framed halves.

pub mod budget;
pub mod client;
pub mod listen;
pub mod plane;

use ferry_channel::{FrameReader, FrameWriter};
use tokio::io::{BufReader, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

pub use client::{connect, greet, ConnectError};

/// PERF: a read buffer under TLS. rustls reads at most one record (~16 KiB)
/// per `read_tls`, so without it a receiver makes ~80k recv syscalls per GiB
/// of VM state; with 128 KiB about a quarter of that (figures:
/// crates/ferry-channel/examples/pump_bench.rs). Ciphertext only: TLS still
/// authenticates every byte. Zeroed memory of this size is mapped lazily,
/// so an unauthenticated peer costs only the pages it fills.
pub const RECV_BUFFER: usize = 128 * 1024;

/// Either end of an agent connection.
pub type Stream = tokio_rustls::TlsStream<BufReader<TcpStream>>;
pub type Reader = FrameReader<ReadHalf<Stream>>;
pub type Writer = FrameWriter<WriteHalf<Stream>>;
