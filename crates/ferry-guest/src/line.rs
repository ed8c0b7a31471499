//! Parsing the guest's serial output: one event per line.

/// One line printed by the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    /// `READY fill_mib=N pages=P`: the fill is done and dirtying starts.
    Ready { fill_mib: u32, pages: u32 },
    /// `HB seq=N dirtied=D`: seq grows by one per heartbeat; dirtied is the
    /// total of page dirtyings since READY.
    Heartbeat { seq: u64, dirtied: u64 },
    /// `SWEEP pass=K pages=P errors=E`: a full verification pass over all
    /// pages finished; E pages were bad during that pass.
    Sweep { pass: u64, pages: u32, errors: u32 },
    /// `CORRUPT page=P`: page P failed a check (printed once per page).
    Corrupt { page: u32 },
    /// `TPM pcr16=HEX nv=N`: what the guest read from its vTPM: PCR 16 of
    /// the SHA-256 bank (64 lowercase hex digits) and its NV counter.
    Tpm { pcr16: String, nv: u64 },
    /// Anything else (`ERROR ...`, `WARN ...`, `INJECT ...`, firmware noise)
    /// or a known keyword with malformed fields, trimmed of the line ending.
    Other(String),
}

/// Parses one line of guest output (with or without its line ending).
pub fn parse_line(line: &str) -> GuestLine {
    let line = line.trim_end_matches(['\r', '\n']);
    parse_known(line).unwrap_or_else(|| GuestLine::Other(line.to_string()))
}

fn parse_known(line: &str) -> Option<GuestLine> {
    let mut words = line.split(' ');
    let keyword = words.next()?;
    let fields: Vec<(&str, &str)> = words.map(|w| w.split_once('=')).collect::<Option<_>>()?;
    // Exactly the expected keys in the expected order: the guest never
    // varies them, so anything else is not one of its event lines.
    let get = |keys: &[&str]| -> Option<Vec<&str>> {
        if fields.len() != keys.len() || fields.iter().zip(keys).any(|((k, _), key)| k != key) {
            return None;
        }
        Some(fields.iter().map(|(_, v)| *v).collect())
    };
    let line = match keyword {
        "READY" => {
            let v = get(&["fill_mib", "pages"])?;
            GuestLine::Ready { fill_mib: num(v[0])?, pages: num(v[1])? }
        }
        "HB" => {
            let v = get(&["seq", "dirtied"])?;
            GuestLine::Heartbeat { seq: num(v[0])?, dirtied: num(v[1])? }
        }
        "SWEEP" => {
            let v = get(&["pass", "pages", "errors"])?;
            GuestLine::Sweep { pass: num(v[0])?, pages: num(v[1])?, errors: num(v[2])? }
        }
        "CORRUPT" => GuestLine::Corrupt { page: num(get(&["page"])?[0])? },
        "TPM" => {
            let v = get(&["pcr16", "nv"])?;
            let hex =
                v[0].len() == 64 && v[0].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            GuestLine::Tpm { pcr16: hex.then(|| v[0].to_owned())?, nv: num(v[1])? }
        }
        _ => return None,
    };
    Some(line)
}

/// Plain decimal only (`str::parse` would also accept a leading `+`).
fn num<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other(s: &str) -> GuestLine {
        GuestLine::Other(s.to_string())
    }

    #[test]
    fn parses_every_event() {
        assert_eq!(
            parse_line("READY fill_mib=64 pages=16384\n"),
            GuestLine::Ready { fill_mib: 64, pages: 16384 }
        );
        assert_eq!(
            parse_line("HB seq=18446744073709551615 dirtied=0"),
            GuestLine::Heartbeat { seq: u64::MAX, dirtied: 0 }
        );
        assert_eq!(
            parse_line("SWEEP pass=3 pages=8192 errors=1\r\n"),
            GuestLine::Sweep { pass: 3, pages: 8192, errors: 1 }
        );
        assert_eq!(parse_line("CORRUPT page=4096"), GuestLine::Corrupt { page: 4096 });
        let pcr = "b3944faeb5d731612a8eac187a50b7fffffa65c3d72c306495410fabb72b62fc";
        assert_eq!(
            parse_line(&format!("TPM pcr16={pcr} nv=3\n")),
            GuestLine::Tpm { pcr16: pcr.into(), nv: 3 }
        );
    }

    #[test]
    fn everything_else_is_other() {
        for s in [
            "ERROR fill_mib=300 exceeds RAM ram_mib=255",
            "WARN unknown option foo=1",
            "INJECT page=1024 word=100",
            "",
            "READY",
            "READY fill_mib=64",
            "READY pages=1 fill_mib=64",
            "READY fill_mib=64 pages=1 extra=2",
            "READY fill_mib=64 pages=-1",
            "READY fill_mib=64 pages=+1",
            "READY fill_mib=64 pages=4294967296",
            "HB seq=1  dirtied=2",
            "HB seq=1 dirtied",
            "CORRUPT page=",
            "ready fill_mib=1 pages=256",
            "TPM ERROR pcr_read rc=0x00000101",
            "TPM pcr16=00 nv=1",
            "TPM pcr16=B3944FAEB5D731612A8EAC187A50B7FFFFFA65C3D72C306495410FABB72B62FC nv=1",
            "TPM nv=1 pcr16=b3944faeb5d731612a8eac187a50b7fffffa65c3d72c306495410fabb72b62fc",
        ] {
            assert_eq!(parse_line(s), other(s), "{s:?}");
        }
        assert_eq!(parse_line("WARN x\r\n"), other("WARN x"));
    }
}
