//! The two fake QEMUs: a source writing incompressible bytes into a unix
//! socket, a destination reading them; each reports its own CPU time so the
//! agents' share can be told apart.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

/// What the fake source QEMU writes per call (QEMU flushes up to 64 iovecs).
const FEED_WRITE: usize = 256 * 1024;
/// What the fake destination QEMU reads per call (QEMUFile's IO_BUF_SIZE).
const SINK_READ: usize = 32 * 1024;

pub fn rusage(who: libc::c_int) -> f64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; getrusage only writes it.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub fn set_buf(fd: &impl std::os::fd::AsRawFd, opt: libc::c_int, size: usize) {
    set_opt(fd, libc::SOL_SOCKET, opt, size);
}

pub fn set_opt(fd: &impl std::os::fd::AsRawFd, level: libc::c_int, opt: libc::c_int, value: usize) {
    let v = value as libc::c_int;
    // SAFETY: a valid fd and a c_int option value of the stated length.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt {level}/{opt}");
}

/// The source QEMU: connects to `path` and writes `total` bytes of `data`
/// (cyclically). `sndbuf` sets its socket's send buffer, which bounds how
/// much one read on the agent's side can return. Returns its CPU seconds.
pub fn feeder(
    path: PathBuf,
    total: u64,
    data: Arc<Vec<u8>>,
    sndbuf: Option<usize>,
) -> JoinHandle<f64> {
    std::thread::Builder::new()
        .name("qemu-src".into())
        .spawn(move || {
            let mut s = UnixStream::connect(&path).unwrap();
            if let Some(size) = sndbuf {
                set_buf(&s, libc::SO_SNDBUF, size);
            }
            let mut left = total;
            let mut off = 0usize;
            while left > 0 {
                let n = (left as usize).min(FEED_WRITE);
                if off + n > data.len() {
                    off = 0;
                }
                s.write_all(&data[off..off + n]).unwrap();
                off += n;
                left -= n as u64;
            }
            drop(s);
            rusage(libc::RUSAGE_THREAD)
        })
        .unwrap()
}

/// The destination QEMU: accepts one connection and reads it to the end.
/// Returns (bytes, its CPU seconds).
pub fn sink(l: UnixListener) -> JoinHandle<(u64, f64)> {
    std::thread::Builder::new()
        .name("qemu-dst".into())
        .spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; SINK_READ];
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            (got, rusage(libc::RUSAGE_THREAD))
        })
        .unwrap()
}
