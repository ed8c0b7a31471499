//! The metrics listener: plain HTTP `GET /metrics` (bind it to loopback or
//! a management network: it exposes counts, never VM data or secrets).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::Agent;

/// Longest HTTP request head read from a scraper.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Serve `GET /metrics` on `addr` until the task is dropped.
pub async fn serve(agent: Arc<Agent>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut head = vec![0u8; MAX_REQUEST_HEAD];
            let n = match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut head)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let first = String::from_utf8_lossy(&head[..n]);
            let (status, body) =
                if first.starts_with("GET /metrics ") || first.starts_with("GET /metrics?") {
                    let vms = agent.backend.count().await;
                    let active = agent.sessions.in_flight().await;
                    ("200 OK", agent.metrics.render(vms, active))
                } else {
                    ("404 Not Found", "try /metrics\n".to_owned())
                };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}

/// Bind the metrics listener named in the config.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
