//! How a migration moves its VM state: how many streams and whether
//! post-copy may take over. Parsed once, from the config, an operator's
//! request or a peer's offer, into values that cannot hold a bad
//! combination; everything downstream takes a [`TransferPlan`].

use serde::{Deserialize, Serialize};

/// Most streams one migration may use (the main stream + QEMU multifd channels).
pub const MAX_STREAMS: u8 = 8;

/// Why a plan was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{0} streams asked for; 1..={MAX_STREAMS} allowed")]
    Streams(u8),
    #[error(
        "post-copy cannot be combined with several streams (QEMU multifd): QEMU 7.2 \
         destinations crash on it; use --streams 1 with --postcopy"
    )]
    PostcopyWithMultifd,
}

/// 1 to [`MAX_STREAMS`] data streams: 1, or 1 + QEMU multifd channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Streams(u8);

impl Streams {
    pub const ONE: Streams = Streams(1);

    pub fn get(self) -> u8 {
        self.0
    }

    /// QEMU multifd channels: every stream but the main one.
    pub fn multifd_channels(self) -> u8 {
        self.0 - 1
    }

    /// The indices of the streams that join the migration on connections of
    /// their own (the main stream, index 0, rides the control connection).
    pub fn joined(self) -> std::ops::Range<u8> {
        1..self.0
    }
}

impl TryFrom<u8> for Streams {
    type Error = PlanError;
    fn try_from(n: u8) -> Result<Self, PlanError> {
        if (1..=MAX_STREAMS).contains(&n) {
            Ok(Streams(n))
        } else {
            Err(PlanError::Streams(n))
        }
    }
}

impl From<Streams> for u8 {
    fn from(s: Streams) -> u8 {
        s.0
    }
}

impl Default for Streams {
    fn default() -> Self {
        Streams::ONE
    }
}

/// A migration's transfer: validated once, then trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferPlan {
    streams: Streams,
    postcopy: bool,
}

impl TransferPlan {
    pub fn new(streams: u8, postcopy: bool) -> Result<Self, PlanError> {
        let streams = Streams::try_from(streams)?;
        // QEMU 7.2 destinations hit an assertion with both (docs/known-issues.md).
        if postcopy && streams.get() > 1 {
            return Err(PlanError::PostcopyWithMultifd);
        }
        Ok(Self { streams, postcopy })
    }

    pub fn streams(self) -> Streams {
        self.streams
    }

    pub fn postcopy(self) -> bool {
        self.postcopy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_checked_once() {
        assert_eq!(TransferPlan::new(0, false), Err(PlanError::Streams(0)));
        assert_eq!(TransferPlan::new(MAX_STREAMS + 1, false), Err(PlanError::Streams(9)));
        assert_eq!(TransferPlan::new(2, true), Err(PlanError::PostcopyWithMultifd));
        let p = TransferPlan::new(4, false).unwrap();
        assert_eq!((p.streams().get(), p.streams().multifd_channels()), (4, 3));
        assert_eq!(p.streams().joined().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(TransferPlan::new(1, true).unwrap().postcopy());
        assert!(serde_json::from_str::<Streams>("9").is_err());
        assert_eq!(serde_json::from_str::<Streams>("3").unwrap().get(), 3);
    }
}
