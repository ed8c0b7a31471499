//! Plain QEMU processes and a blocking QMP client, for control experiments.
#![allow(unused_imports)]
use super::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A blocking QMP client for QEMU processes the test starts itself.
pub struct SyncQmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl SyncQmp {
    pub fn connect(path: &Path) -> SyncQmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP {} never came up: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut q =
            SyncQmp { reader: std::io::BufReader::new(s.try_clone().expect("clone")), writer: s };
        let greeting = q.line();
        assert!(greeting.get("QMP").is_some(), "not a QMP greeting: {greeting}");
        q.cmd("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn line(&mut self) -> Value {
        use std::io::BufRead;
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad QMP line {l:?}: {e}"))
    }

    /// Run a command; panics on a QMP error.
    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        let msg = serde_json::json!({"execute": execute, "arguments": arguments});
        writeln!(self.writer, "{msg}").expect("QMP write");
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            panic!("QMP {execute} failed: {v}");
        }
    }
}

/// A QEMU started by the test (not by an agent); killed on drop.
pub struct PlainQemu {
    pub child: std::process::Child,
    pub qmp: SyncQmp,
    pub serial: PathBuf,
}

impl PlainQemu {
    /// `qemu-system-x86_64` with the test guest, as scripts/bench.py starts it;
    /// `incoming` adds `-incoming defer -S`.
    pub fn start(
        dir: &Path,
        name: &str,
        memory_mib: u32,
        append: &str,
        incoming: bool,
    ) -> PlainQemu {
        let kernel = dir.join("ferry-guest.elf");
        if !kernel.exists() {
            ferry_guest::write_image(&kernel).expect("guest image");
        }
        let qmp_path = dir.join(format!("{name}.qmp"));
        let serial = dir.join(format!("{name}.serial"));
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", &memory_mib.to_string()])
            .args(["-display", "none", "-nodefaults", "-no-user-config"])
            .arg("-kernel")
            .arg(&kernel)
            .args(["-append", append])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if incoming {
            c.args(["-incoming", "defer", "-S"]);
        }
        let child = c.spawn().expect("spawn qemu-system-x86_64");
        let qmp = SyncQmp::connect(&qmp_path);
        PlainQemu { child, qmp, serial }
    }

    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }
}

impl Drop for PlainQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
