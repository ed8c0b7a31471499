//! A TCP relay between two agents that a test can cut (every connection
//! through it ends at once) and close (new connections are dropped).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinSet;

#[derive(Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    refusing: AtomicBool,
    cut: watch::Sender<u64>,
    live: Mutex<JoinSet<()>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            refusing: AtomicBool::new(false),
            cut: watch::channel(0).0,
            live: Mutex::new(JoinSet::new()),
        });
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                if s.refusing.load(Ordering::SeqCst) {
                    drop(conn);
                    continue;
                }
                let mut cut = s.cut.subscribe();
                s.live.lock().await.spawn(async move {
                    let Ok(upstream) = TcpStream::connect(target).await else { return };
                    let (mut a, mut b) = (conn, upstream);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, state }
    }

    /// End every connection through the proxy now; returns once they are gone.
    pub async fn cut(&self) {
        self.state.cut.send_modify(|g| *g += 1);
        let mut live = self.state.live.lock().await;
        while live.join_next().await.is_some() {}
    }

    /// Drop (true) or relay (false) new connections.
    pub fn refuse(&self, on: bool) {
        self.state.refusing.store(on, Ordering::SeqCst);
    }
}
