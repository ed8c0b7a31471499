//! What the destination says while the source streams: its messages, and
//! QEMU's post-copy return path riding data frames back.

use std::time::Duration;

use ferry_channel::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::verdict::Answer;
use crate::net::Reader;
use crate::protocol::PeerMessage;
use crate::report::report;

/// A task that is aborted when its handle goes: nothing outlives the step
/// that started it.
pub struct AbortOnDrop<T>(pub JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the destination said, as the watcher read it.
pub type PeerWord = Result<PeerMessage, String>;

/// The destination's next word after a Commit. With post-copy allowed, a
/// PostcopyReady may still be on its way from before QEMU finished: it is
/// stale once the whole stream is committed, and skipped.
pub async fn next_answer(
    rx: &mut mpsc::Receiver<PeerWord>,
    wait: Duration,
    postcopy: bool,
) -> Answer {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Answer::Timeout(wait),
            Ok(None) => return Answer::Closed,
            Ok(Some(Err(why))) => return Answer::Broken(why),
            Ok(Some(Ok(PeerMessage::PostcopyReady { .. }))) if postcopy => continue,
            Ok(Some(Ok(m))) => return Answer::Message(m),
        }
    }
}

/// Read the destination's messages while the source streams. Data frames
/// from it are QEMU's post-copy return path.
pub async fn watch_peer(
    mut reader: Reader,
    tx: mpsc::Sender<PeerWord>,
    mut return_path: Option<OwnedWriteHalf>,
    io_timeout: Duration,
) {
    // The destination may stay silent for the whole transfer.
    reader.set_timeout(Duration::from_secs(24 * 3600));
    loop {
        let msg = match reader.read_frame().await {
            Ok(Incoming::Control(bytes)) => serde_json::from_slice::<PeerMessage>(bytes)
                .map_err(|e| format!("malformed control message: {e}")),
            // SECURITY: bytes from the destination reach this QEMU only as
            // its post-copy return path, and only when post-copy was offered.
            Ok(Incoming::Data(d)) => match return_path.as_mut() {
                Some(w) => match tokio::time::timeout(io_timeout, w.write_all(d)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => Err(format!("source QEMU's return path: {e}")),
                    Err(_) => {
                        Err(format!("source QEMU did not read its return path for {io_timeout:?}"))
                    }
                },
                None => Err("the destination sent VM data without post-copy".to_owned()),
            },
            Ok(Incoming::DataEnd) => Err("the destination sent an end of data".to_owned()),
            Err(e) => Err(report(&e)),
        };
        let stop = msg.is_err();
        if tx.send(msg).await.is_err() || stop {
            return;
        }
    }
}
