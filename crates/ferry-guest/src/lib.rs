//! A tiny multiboot test guest for exercising live migration under QEMU.
//!
//! [`IMAGE`] is a 32-bit multiboot kernel (built from `guest/` by `build.rs`)
//! that fills guest RAM with verifiable, incompressible pages, keeps dirtying
//! them at a fixed rate, verifies them continuously and prints one line per
//! event on COM1. Boot it with
//!
//! ```text
//! qemu-system-x86_64 -machine q35 -accel tcg -m 256 -display none -serial stdio \
//!     -kernel ferry-guest.elf -append "fill_mib=64 dirty=64 hb_ms=10"
//! ```
//!
//! and read its serial output with [`parse_line`]. See the crate README for
//! the memory layout and the exact line formats.

use std::path::Path;

mod line;

pub use line::{parse_line, GuestLine};

/// The guest kernel: an ELF32 multiboot image for QEMU's `-kernel`.
pub const IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest.elf"));

/// Physical address of page 0 of the filled area (pages follow densely;
/// the marker page, if any, is page `fill_mib * 256`).
pub const FILL_BASE: u64 = 0x40_0000;

/// Word 0 of filled page `p` is `p ^ PAGE_MAGIC` (see the README for the
/// rest of the page layout).
pub const PAGE_MAGIC: u32 = 0xFE44_A5E7;

/// Longest marker the guest accepts (it keeps it in a fixed buffer).
pub const MARKER_MAX: usize = 64;

/// Longest vTPM marker: it is the digest extended into PCR 16, zero-padded.
pub const TPM_MARKER_MAX: usize = 32;

/// PCR 16 after the guest extended it once, from its reset value, with
/// `marker`: SHA-256(32 zero bytes ‖ marker zero-padded to 32 bytes), in
/// lowercase hex, as the guest prints it in its `TPM` lines.
pub fn expected_pcr16(marker: &str) -> String {
    let mut digest = [0u8; 32];
    let n = marker.len().min(TPM_MARKER_MAX);
    digest[..n].copy_from_slice(&marker.as_bytes()[..n]);
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update([0u8; 32]);
    h.update(digest);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes [`IMAGE`] to `path`, because QEMU wants the kernel as a file.
pub fn write_image(path: &Path) -> std::io::Result<()> {
    std::fs::write(path, IMAGE)
}

/// The guest's parameters, rendered by [`GuestParams::cmdline`] into the
/// multiboot command line (QEMU's `-append`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestParams {
    /// MiB of RAM to fill, starting at 4 MiB; the guest reports `ERROR` and
    /// halts if that (plus one marker page) does not fit in its RAM.
    pub fill_mib: u32,
    /// Pages dirtied per millisecond of guest (virtual) time.
    pub dirty_pages_per_ms: u32,
    /// Interval between `HB` lines, in ms of guest time (at least 1).
    pub heartbeat_ms: u32,
    /// A string written repeatedly into a page after the filled area, so a
    /// capture of an unencrypted migration stream contains it in clear text.
    /// 1..=64 printable ASCII characters, no spaces.
    pub marker: Option<String>,
    /// Drop the TLB entry of each page before dirtying it. Needed only under
    /// TCG, where QEMU 7.2 can miss writes made through a TLB entry it did
    /// not reset after a dirty-bitmap sync (docs/known-issues.md); a guest
    /// that does this exercises Ferry, not that QEMU defect.
    pub tlb_flush: bool,
    /// Use the VM's vTPM (a `tpm-crb` device): at boot, extend PCR 16 with
    /// this marker (1..=32 printable ASCII, no spaces) and increment an NV
    /// counter (defined on first use); print a `TPM` line then and every
    /// `tpm_ms` ms.
    pub tpm_marker: Option<String>,
    /// How often the guest reads PCR 16 and the counter again (ms, 0 = only at boot).
    pub tpm_ms: u32,
}

impl Default for GuestParams {
    fn default() -> Self {
        Self {
            fill_mib: 64,
            dirty_pages_per_ms: 64,
            heartbeat_ms: 10,
            marker: None,
            tlb_flush: false,
            tpm_marker: None,
            tpm_ms: 1000,
        }
    }
}

impl GuestParams {
    /// Checks what the guest would otherwise reject at boot (and a marker the
    /// command line could not carry), so callers can fail early.
    pub fn validate(&self) -> Result<(), String> {
        if self.fill_mib == 0 {
            return Err("fill_mib must be at least 1".into());
        }
        if self.heartbeat_ms == 0 {
            return Err("heartbeat_ms must be at least 1".into());
        }
        if let Some(m) = &self.marker {
            if m.is_empty() || m.len() > MARKER_MAX {
                return Err(format!("marker must be 1..={MARKER_MAX} bytes"));
            }
            // The command line is split on spaces and has no quoting.
            if !m.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("marker must be printable ASCII without spaces".into());
            }
        }
        if let Some(m) = &self.tpm_marker {
            if m.is_empty() || m.len() > TPM_MARKER_MAX || !m.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!(
                    "tpm_marker must be 1..={TPM_MARKER_MAX} printable ASCII bytes, no spaces"
                ));
            }
        }
        Ok(())
    }

    /// The multiboot command line for these parameters.
    ///
    /// # Panics
    /// If [`GuestParams::validate`] fails: such a command line would make the
    /// guest halt with `ERROR` (or silently change the marker).
    pub fn cmdline(&self) -> String {
        if let Err(e) = self.validate() {
            panic!("invalid GuestParams: {e}");
        }
        let mut s = format!(
            "fill_mib={} dirty={} hb_ms={}",
            self.fill_mib, self.dirty_pages_per_ms, self.heartbeat_ms
        );
        if let Some(m) = &self.marker {
            s.push_str(" marker=");
            s.push_str(m);
        }
        if self.tlb_flush {
            s.push_str(" tlbflush=1");
        }
        if let Some(m) = &self.tpm_marker {
            s.push_str(&format!(" tpm={m} tpm_ms={}", self.tpm_ms));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cmdline() {
        assert_eq!(GuestParams::default().cmdline(), "fill_mib=64 dirty=64 hb_ms=10");
    }

    #[test]
    fn cmdline_with_marker() {
        let p = GuestParams {
            fill_mib: 512,
            dirty_pages_per_ms: 0,
            heartbeat_ms: 5,
            marker: Some("FERRY-SECRET-42".into()),
            tlb_flush: false,
            ..GuestParams::default()
        };
        assert_eq!(p.cmdline(), "fill_mib=512 dirty=0 hb_ms=5 marker=FERRY-SECRET-42");
    }

    #[test]
    fn rejects_what_the_guest_would_reject() {
        let bad = |f: fn(&mut GuestParams)| {
            let mut p = GuestParams::default();
            f(&mut p);
            p.validate().expect_err("should be invalid")
        };
        bad(|p| p.fill_mib = 0);
        bad(|p| p.heartbeat_ms = 0);
        bad(|p| p.marker = Some(String::new()));
        bad(|p| p.marker = Some("two words".into()));
        bad(|p| p.marker = Some("é".into()));
        bad(|p| p.marker = Some("x".repeat(MARKER_MAX + 1)));
        bad(|p| p.tpm_marker = Some(String::new()));
        bad(|p| p.tpm_marker = Some("x".repeat(TPM_MARKER_MAX + 1)));
        bad(|p| p.tpm_marker = Some("a b".into()));
        let ok = GuestParams { marker: Some("x".repeat(MARKER_MAX)), ..GuestParams::default() };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn cmdline_with_tpm_and_the_pcr_it_expects() {
        let p = GuestParams { tpm_marker: Some("FERRY-TPM-1".into()), ..GuestParams::default() };
        assert_eq!(p.cmdline(), "fill_mib=64 dirty=64 hb_ms=10 tpm=FERRY-TPM-1 tpm_ms=1000");
        // What the guest printed under QEMU 7.2 with swtpm 0.7.1.
        assert_eq!(
            expected_pcr16("FERRY-TPM-1"),
            "b3944faeb5d731612a8eac187a50b7fffffa65c3d72c306495410fabb72b62fc"
        );
    }

    #[test]
    #[should_panic(expected = "invalid GuestParams")]
    fn cmdline_panics_on_invalid() {
        let p = GuestParams { marker: Some("a b".into()), ..GuestParams::default() };
        let _ = p.cmdline();
    }

    fn le16(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn image_is_elf32_i386_executable() {
        assert_eq!(&IMAGE[..4], b"\x7fELF");
        assert_eq!(IMAGE[4], 1, "ELFCLASS32: QEMU's multiboot loader refuses ELF64");
        assert_eq!(IMAGE[5], 1, "little endian");
        assert_eq!(le16(IMAGE, 16), 2, "ET_EXEC");
        assert_eq!(le16(IMAGE, 18), 3, "EM_386");
        let entry = le32(IMAGE, 24);
        assert!((0x10_0000..0x20_0000).contains(&entry), "entry {entry:#x}");
    }

    #[test]
    fn image_has_multiboot_header_in_first_8k() {
        const MAGIC: u32 = 0x1BAD_B002;
        let window = &IMAGE[..IMAGE.len().min(8192)];
        let at = (0..window.len().saturating_sub(11))
            .step_by(4)
            .find(|&i| le32(window, i) == MAGIC)
            .expect("no multiboot magic in the first 8 KiB");
        let flags = le32(window, at + 4);
        let sum = MAGIC.wrapping_add(flags).wrapping_add(le32(window, at + 8));
        assert_eq!(sum, 0, "multiboot checksum");
        // Bit 16 would make QEMU use the a.out fields instead of the ELF.
        assert_eq!(flags & (1 << 16), 0);
        assert_ne!(flags & 2, 0, "the guest needs the memory size");
    }

    #[test]
    fn write_image_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("g.elf");
        write_image(&path).expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), IMAGE);
    }
}
