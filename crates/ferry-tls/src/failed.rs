//! What the two halves of one connection share: whether the incoming
//! direction failed.
//!
//! SECURITY: RFC 8446 §5.2 and §6: a record that fails to decrypt, or any
//! fatal error, terminates the connection. The halves otherwise never wait
//! on each other, so the reader raises this flag and the writer refuses
//! from then on: nothing more is sent on a connection an attacker has been
//! tampering with (as rustls would do).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Default)]
pub(crate) struct IncomingFailed(Arc<AtomicBool>);

impl IncomingFailed {
    pub(crate) fn raise(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub(crate) fn is_raised(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Make `writer` stop when `reader` fails: the two directions of one
/// connection.
pub(crate) fn link<R, W>(reader: &mut crate::RecordReader<R>, writer: &mut crate::RecordWriter<W>) {
    writer.failed = reader.failed.clone();
}
