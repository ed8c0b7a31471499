//! Loopback TCP: one sender thread, one receiver thread, 1 MiB writes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use crate::CeilingError;

const IO_CHUNK: usize = 1024 * 1024;

fn io(doing: &'static str) -> impl FnOnce(std::io::Error) -> CeilingError {
    move |source| CeilingError::Tcp { doing, source }
}

/// Bytes per wall-clock second carried from one thread to another.
pub(crate) fn loopback_rate(bytes: usize) -> Result<f64, CeilingError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("binding"))?;
    let addr = listener.local_addr().map_err(io("reading the bound address"))?;
    let receiver = std::thread::spawn(move || -> Result<usize, CeilingError> {
        let (mut s, _) = listener.accept().map_err(io("accepting"))?;
        let mut buf = vec![0u8; IO_CHUNK];
        let mut got = 0;
        loop {
            match s.read(&mut buf).map_err(io("receiving"))? {
                0 => return Ok(got),
                n => got += n,
            }
        }
    });
    let mut s = TcpStream::connect(addr).map_err(io("connecting"))?;
    let buf = vec![0x5au8; IO_CHUNK];
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(IO_CHUNK);
        s.write_all(&buf[..n]).map_err(io("sending"))?;
        left -= n;
    }
    drop(s);
    let got = match receiver.join() {
        Ok(r) => r?,
        Err(_) => return Err(io("receiving")(std::io::Error::other("receiver panicked"))),
    };
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    if got != bytes {
        let msg = format!("received {got} of {bytes} bytes");
        return Err(io("receiving")(std::io::Error::other(msg)));
    }
    Ok(bytes as f64 / secs)
}
