//! What the two halves of one connection share: whether the incoming
//! direction failed, and the alert that says why.
//!
//! SECURITY: RFC 8446 §5.2 and §6: a record that fails to decrypt, or any
//! fatal error, terminates the connection, with an alert naming the cause
//! (bad_record_mac for a record that does not authenticate). The halves
//! otherwise never wait on each other, so the reader raises this flag and
//! the writer refuses from then on: nothing more is sent on a connection an
//! attacker has been tampering with but that one alert (as rustls does).

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use rustls::AlertDescription;

/// Raised, with an alert to send back.
const WITH_ALERT: u16 = 0x100;
/// Raised by the peer's own alert: nothing to answer.
const SILENT: u16 = 0x200;

#[derive(Clone, Debug, Default)]
pub(crate) struct IncomingFailed(Arc<AtomicU16>);

impl IncomingFailed {
    /// The incoming direction failed; `alert` is what this side tells the
    /// peer (None when the peer ended it with an alert of its own).
    pub(crate) fn raise(&self, alert: Option<AlertDescription>) {
        let v = match alert {
            Some(a) => WITH_ALERT | u16::from(u8::from(a)),
            None => SILENT,
        };
        // The first cause wins.
        let _ = self.0.compare_exchange(0, v, Ordering::AcqRel, Ordering::Acquire);
    }

    pub(crate) fn is_raised(&self) -> bool {
        self.0.load(Ordering::Acquire) != 0
    }

    /// The alert the writer owes the peer, if any.
    pub(crate) fn alert(&self) -> Option<AlertDescription> {
        let v = self.0.load(Ordering::Acquire);
        (v & WITH_ALERT != 0).then(|| AlertDescription::from((v & 0xff) as u8))
    }
}

/// Make `writer` stop when `reader` fails: the two directions of one
/// connection.
pub(crate) fn link<R, W>(reader: &mut crate::RecordReader<R>, writer: &mut crate::RecordWriter<W>) {
    writer.failed = reader.failed.clone();
}
