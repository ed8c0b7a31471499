//! `ferry agent`: the per-host daemon, in the foreground (systemd-friendly).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use ferry_agent::{Agent, AgentConfig};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The agent's TOML configuration (see docs/agent.sample.toml).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: String,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, not in a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn run(args: AgentArgs) -> Result<ExitCode> {
    init_logging(&args.log_format);
    let cfg = AgentConfig::load(&args.config)?;
    let listen = cfg.host.listen;
    let agent = Agent::start(cfg).await.map_err(|e| anyhow::anyhow!(ferry_agent::report(&e)))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    if let Some(addr) = agent.cfg.metrics.listen {
        let l = ferry_agent::metrics_http::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tokio::spawn(ferry_agent::metrics_http::serve(agent.clone(), l));
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }
    {
        let agent = agent.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                let _ = agent.reload_policy().await;
            }
        });
    }
    tracing::info!(host = %agent.host, %listen, backend = agent.backend.name(), accel = agent.backend.accel(), "agent ready");
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    ferry_agent::server::serve(agent.clone(), listener, shutdown).await;
    // Let migrations in flight finish: stopping mid-way would only force the
    // other side into its failure path.
    for _ in 0..600 {
        if agent.sessions.in_flight().await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.stop();
    tracing::info!("agent stopped; VMs keep running");
    Ok(ExitCode::SUCCESS)
}
