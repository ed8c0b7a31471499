//! `ferry image`: images a newcomer needs before they have their own. The
//! test guest is built into the binary (crates/ferry-guest); this writes it
//! where an agent's [qemu] images_dir can serve it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Write the test guest (a multiboot kernel that fills, dirties and
    /// checks its memory and reports on its serial console) to FILE. Put it
    /// in the images directory of every host a VM may run on.
    Guest {
        #[arg(long)]
        out: PathBuf,
    },
}

/// A command line for the guest that moves quickly under TCG as well.
pub const GUEST_CMDLINE: &str = "fill_mib=64 dirty=16 hb_ms=100";

pub fn run(cmd: ImageCommand, json: bool) -> Result<ExitCode> {
    let ImageCommand::Guest { out } = cmd;
    ferry_guest::write_image(&out).with_context(|| format!("cannot write {}", out.display()))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if json {
        outln!(
            "{}",
            serde_json::json!({ "image": out, "bytes": ferry_guest::IMAGE.len(), "cmdline": GUEST_CMDLINE })
        );
    } else {
        outln!("wrote the test guest to {} ({} bytes)", out.display(), ferry_guest::IMAGE.len());
        outln!(
            "start it with: ferry vm start --name NAME --memory 256 --kernel {name} --cmdline \
             '{GUEST_CMDLINE}' (add tlbflush=1 on hosts without hardware KVM)"
        );
    }
    Ok(ExitCode::SUCCESS)
}
