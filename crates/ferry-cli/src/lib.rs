//! The `ferry` command line. Each subcommand lives in its own module; this
//! file only defines the command tree and dispatches. Every command that
//! prints a result accepts `--json` for scripts. Command output goes through
//! [`out`] (`outln!`), never `println!`, so that a closed pipe ends a
//! command quietly.
#![deny(clippy::print_stdout)]

#[macro_use]
pub mod out;

pub mod agent_cmd;
pub mod attest;
pub mod audit;
pub mod ca;
pub mod console;
pub mod demo;
pub mod docs;
pub mod host;
pub mod image;
pub mod lab;
pub mod lab_cmd;
pub mod lab_libvirt;
pub mod lab_link;
pub mod lab_netns;
pub mod opclient;
pub mod ops;
pub mod policy;
pub mod procs;
pub mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Ferry: live-migrate virtual machines between hypervisor hosts, securely.
///
/// Every connection is TLS 1.3 with certificates on both sides from the
/// cluster CA; the destination resumes a VM only when the stream it received
/// matches what the source committed to; the source keeps its copy until the
/// destination has signed for it.
/// The exit statuses, shown by `ferry --help` and in the README.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  success
  1  error (the message says what failed and, where it can, what to do)
  2  usage: unknown command, missing or invalid argument
  3  `ferry policy explain`: the request is denied
  4  a migration is in doubt: the VM is paused on the source until `ferry migrations
     resolve ID` asks the destination (or, for a post-copy interrupted after the
     hand-over, runs on the destination until the rest of its memory arrives)

Setting hosts up: docs/deploy.md. Every command: ferry <command> --help.";

#[derive(Debug, Parser)]
#[command(name = "ferry", version, max_term_width = 100, after_help = EXIT_STATUS_HELP)]
pub struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the cluster certificate authority (init, issue, revoke).
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// TPM attestation: enrol a host's AK, measure PCRs, (tests) extend a PCR.
    #[command(subcommand)]
    Attest(attest::AttestCommand),
    /// Read, verify and export the signed audit logs and evidence bundles.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Prepare a hypervisor host: certificate, TPM enrolment, agent.toml.
    #[command(subcommand)]
    Host(host::HostCommand),
    /// Write images to try Ferry with (the test guest).
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Run the per-host agent daemon.
    Agent(agent_cmd::AgentArgs),
    /// Show an agent's status.
    Status(ops::Target),
    /// Start, list and stop VMs on a host.
    #[command(subcommand)]
    Vm(ops::VmCommand),
    /// Live-migrate a VM to another host.
    ///
    /// The source agent authorizes the request (Cedar policy, rate limit,
    /// cooldown), opens TLS 1.3 to the destination and checks that its
    /// certificate names exactly that host, exchanges TPM quotes bound to the
    /// connection with it, and sends a signed offer. The destination checks
    /// replay, policy and capacity, starts QEMU paused and accepts; QEMU's
    /// stream then moves through both agents, hashed. The destination resumes
    /// the VM only when QEMU, the byte count and the digest agree, and signs
    /// a receipt; only then does the source quit its paused copy.
    ///
    /// Any failure before the commit resumes the VM on the source. If the
    /// answer to the commit is lost, the VM stays paused on the source and
    /// the source agent asks the destination again by itself, moving the
    /// copy only on its signed word (a receipt retires it, an abort resumes
    /// it); the command waits a while for that, and exits with status 4
    /// ("in doubt") if the destination still cannot answer.
    ///
    /// Progress (phase, bar, bytes, rate, remaining, dirty rate, iteration,
    /// ETA) is drawn on stderr when it is a terminal.
    Migrate(ops::MigrateArgs),
    /// List, show and resolve migrations.
    #[command(subcommand)]
    Migrations(ops::MigrationsCommand),
    /// Check and explain Cedar policies; reload an agent's policy.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// A local lab: a CA and N agents on loopback.
    #[command(subcommand)]
    Lab(lab_cmd::LabCommand),
    /// Run the whole story once: a lab of two hosts, a guest, a migration, checks.
    Demo(demo::DemoArgs),
    /// Write man pages for ferry and every subcommand into DIR.
    Man {
        #[arg(long, default_value = "man")]
        dir: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

/// Where operator commands find their credentials and agents.
pub fn default_client_config() -> Option<PathBuf> {
    std::env::var_os("FERRY_CLIENT_CONFIG").map(PathBuf::from)
}

pub fn main() -> ExitCode {
    // tss2's own log lines repeat, less clearly, what Ferry's TPM errors say
    // (which TCTI, what was found there); TSS2_LOG=all+warning brings them back.
    // Set before the runtime starts any thread, so nothing reads the
    // environment concurrently.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    let cli = Cli::parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Ca(c) => ca::run(c, json),
            Command::Attest(c) => attest::run(c, json),
            Command::Audit(c) => audit::run(c, json),
            Command::Host(c) => host::run(c, json),
            Command::Image(c) => image::run(c, json),
            Command::Agent(a) => agent_cmd::run(a).await,
            Command::Status(t) => ops::status(t, json).await,
            Command::Vm(c) => ops::vm(c, json).await,
            Command::Migrate(m) => ops::migrate(m, json).await,
            Command::Migrations(c) => ops::migrations(c, json).await,
            Command::Lab(c) => lab_cmd::run(c, json).await,
            Command::Policy(c) => policy::run(c, json).await,
            Command::Demo(d) => demo::run(d, json).await,
            Command::Man { dir } => docs::man(&dir),
            Command::Completions { shell } => docs::completions(shell),
        }
    });
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            if json {
                outln!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(1)
        }
    };
    match out::failure() {
        Some(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            ExitCode::from(1)
        }
        None => code,
    }
}
