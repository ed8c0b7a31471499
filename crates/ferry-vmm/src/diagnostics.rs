//! Which QMP commands an operator may run on a VM through its agent.
//!
//! The agent holds each VM's only QMP connection, so operators' own QMP
//! tools cannot reach a VM; `ferry vm qmp` passes commands through instead.
//! Whoever can send any QMP command fully controls the VM (`stop`, `quit`,
//! `migrate`, `dump-guest-memory`, `human-monitor-command`), and a migration
//! relies on nobody else steering its QEMUs, so only commands that read are
//! passed: an allowlist, never a denylist, so that commands added by a later
//! QEMU are refused until someone has read them.

use crate::VmmError;

/// QEMU's `query-*` commands report state (QAPI's naming convention for
/// queries). Those of QEMU 7.2, the release Ferry runs, were read for this:
/// none changes the VM (`query-rx-filter` only re-arms its own event).
pub const READ_ONLY_PREFIX: &str = "query-";

/// Read-only commands without the prefix: the VM's QOM tree (names and
/// types of objects and properties, no values) and the list of QOM types.
/// Left out on purpose: `qom-get`, which reads any property's value, and
/// some hold secrets (a `secret` object's `data`); `device-list-properties`
/// and `qom-list-properties`, which instantiate an object of the type asked
/// for and have crashed QEMU for some types, and whose answer `qemu -device
/// TYPE,help` gives on the host anyway.
pub const READ_ONLY_COMMANDS: [&str; 2] = ["qom-list", "qom-list-types"];

/// Longest command name accepted (QEMU's longest is under 40 characters).
const MAX_COMMAND_NAME: usize = 64;

/// The allowlist as operators read it in a refusal.
pub fn read_only_allowlist() -> String {
    let mut s = format!("{READ_ONLY_PREFIX}*");
    for c in READ_ONLY_COMMANDS {
        s.push_str(", ");
        s.push_str(c);
    }
    s
}

/// Ok if `command` may be passed through to a VM's QMP.
pub fn check_read_only(command: &str) -> Result<(), VmmError> {
    let well_formed = (1..=MAX_COMMAND_NAME).contains(&command.len())
        && command.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let allowed = command.strip_prefix(READ_ONLY_PREFIX).is_some_and(|rest| !rest.is_empty())
        || READ_ONLY_COMMANDS.contains(&command);
    if well_formed && allowed {
        return Ok(());
    }
    Err(VmmError::NotReadOnly { command: command.chars().take(MAX_COMMAND_NAME).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_listings_pass() {
        for ok in ["query-status", "query-block", "query-pci", "query-migrate", "qom-list"] {
            assert!(check_read_only(ok).is_ok(), "{ok} refused");
        }
    }

    #[test]
    fn commands_that_act_are_refused_naming_the_allowlist() {
        for bad in [
            "stop",
            "quit",
            "cont",
            "system_reset",
            "migrate",
            "migrate_cancel",
            "human-monitor-command",
            "dump-guest-memory",
            "qom-set",
            "qom-get",
            "device-list-properties",
            "qmp_capabilities",
            "query-",
            "query-status\n{\"execute\":\"quit\"}",
            "Query-status",
            "x-query-roms",
            "",
        ] {
            match check_read_only(bad) {
                Err(e @ VmmError::NotReadOnly { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.ends_with("allowed: query-*, qom-list, qom-list-types"), "{msg}");
                }
                other => panic!("{bad:?} not refused: {other:?}"),
            }
        }
        let long = format!("query-{}", "x".repeat(MAX_COMMAND_NAME));
        assert!(check_read_only(&long).is_err());
    }
}
