//! `ferry man` and `ferry completions`: man pages and shell completions
//! generated from the same clap definition the binary parses with, so they
//! cannot drift from the real flags.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::{out, Cli};

/// Write ferry.1 and one page per subcommand (ferry-migrate.1, ...) to `dir`.
pub fn man(dir: &Path) -> Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cmd = Cli::command();
    let mut written = Vec::new();
    write_page(&cmd, "ferry", dir, &mut written)?;
    for line in &written {
        outln!("{}", line.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn write_page(
    cmd: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    let page = clap_mangen::Man::new(cmd.clone().name(name.to_owned()));
    let mut buf = Vec::new();
    page.render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_page(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

/// Print the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<ExitCode> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "ferry", &mut buf);
    out::write_bytes(&buf);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subcommand_gets_a_man_page() {
        let dir = tempfile::tempdir().unwrap();
        man(dir.path()).unwrap();
        for page in [
            "ferry.1",
            "ferry-migrate.1",
            "ferry-ca-issue-host.1",
            "ferry-audit-verify.1",
            "ferry-policy-explain.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page))
                .unwrap_or_else(|_| panic!("{page} missing"));
            assert!(text.contains(".TH"), "{page} is not a man page");
        }
        let migrate = std::fs::read_to_string(dir.path().join("ferry-migrate.1")).unwrap();
        assert!(migrate.contains("no\\-wait"), "flags missing from the page");
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
