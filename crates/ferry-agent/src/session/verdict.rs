//! What a committed source may believe. After its Commit the source copy is
//! paused, and only the destination's signed word moves it: a Receipt for
//! exactly what was committed retires it, a signed Abort resumes it, and
//! anything else leaves it in doubt. Pure functions: the signature checks
//! come in as closures, so every case is a unit test.

use std::time::Duration;

use ferry_audit::Signed;
use ferry_channel::StreamSum;
use ferry_session::{DestinationOutcome, Event};
use ferry_types::HostName;

use crate::error::Error;
use crate::evidence::{AbortBody, StreamBody};
use crate::notary::EvidenceError;
use crate::protocol::PeerMessage;

/// The destination's next word after a Commit, as it arrived.
#[derive(Debug)]
pub enum Answer {
    Message(PeerMessage),
    /// The connection failed (the reason).
    Broken(String),
    Closed,
    Timeout(Duration),
}

/// What the source may do with its copy.
#[derive(Debug)]
pub enum Verdict {
    /// A valid Receipt for exactly what was committed, and what it says.
    Completed { signed: Signed, body: StreamBody },
    /// A valid signed Abort: the destination will never run the VM.
    Aborted { reason: String, signed: Signed },
    /// Neither: the copy stays paused and the destination is asked again.
    InDoubt(Error),
}

/// Classify the answer to a Commit for `committed`.
pub fn after_commit(
    host: &HostName,
    answer: Answer,
    committed: StreamSum,
    check_receipt: impl FnOnce(&Signed) -> Result<StreamBody, EvidenceError>,
    check_abort: impl FnOnce(&Signed) -> Result<AbortBody, EvidenceError>,
) -> Verdict {
    let evidence = |kind, source| Error::Evidence { host: host.clone(), kind, source };
    match answer {
        Answer::Message(PeerMessage::Receipt { signed }) => match check_receipt(&signed) {
            Ok(body) => match same_sum(&body, committed) {
                Ok(()) => Verdict::Completed { signed, body },
                Err(e) => Verdict::InDoubt(evidence("receipt", e)),
            },
            Err(e) => Verdict::InDoubt(evidence("receipt", e)),
        },
        // SECURITY: a paused copy resumes only on the destination's signed
        // promise never to run the VM: an unsigned Abort (or one that does
        // not verify) after the Commit is not that promise.
        Answer::Message(PeerMessage::Abort { reason, signed: Some(signed), .. }) => {
            match check_abort(&signed) {
                Ok(_) => Verdict::Aborted { reason, signed },
                Err(e) => Verdict::InDoubt(evidence("abort", e)),
            }
        }
        Answer::Message(PeerMessage::Abort { signed: None, .. }) => {
            Verdict::InDoubt(Error::Unexpected {
                host: host.clone(),
                step: "commit",
                got: "an unsigned abort",
            })
        }
        Answer::Message(other) => Verdict::InDoubt(Error::Unexpected {
            host: host.clone(),
            step: "commit",
            got: other.name(),
        }),
        Answer::Broken(why) => Verdict::InDoubt(Error::Lost { host: host.clone(), why }),
        Answer::Closed => {
            Verdict::InDoubt(Error::Lost { host: host.clone(), why: "it closed".into() })
        }
        Answer::Timeout(after) => {
            Verdict::InDoubt(Error::Silent { host: host.clone(), what: "receipt", after })
        }
    }
}

fn same_sum(body: &StreamBody, want: StreamSum) -> Result<(), EvidenceError> {
    if body.bytes == want.bytes && body.digest == want.digest {
        Ok(())
    } else {
        Err(EvidenceError::WrongSum {
            bytes: body.bytes,
            digest: body.digest,
            want_bytes: want.bytes,
            want_digest: want.digest,
        })
    }
}

/// The checks a query reply's signed word must pass, by outcome.
pub struct ReplyChecks<R, H, A>
where
    R: FnOnce(&Signed) -> Result<StreamBody, EvidenceError>,
    H: FnOnce(&Signed) -> Result<StreamBody, EvidenceError>,
    A: FnOnce(&Signed) -> Result<AbortBody, EvidenceError>,
{
    /// A Receipt by the destination for this migration (any connection).
    pub receipt: R,
    /// A post-copy hand-over by the destination for this migration.
    pub handover: H,
    /// An Abort by the destination bound to the query's own connection.
    pub abort: A,
}

/// What an in-doubt source may believe of its destination's answer.
/// `committed` is what this host committed to (the switchover's sum for a
/// post-copy). Err leaves the migration in doubt (the next attempt asks
/// again).
pub fn after_query<R, H, A>(
    host: &HostName,
    outcome: DestinationOutcome,
    signed: Option<Signed>,
    committed: StreamSum,
    checks: ReplyChecks<R, H, A>,
) -> Result<(Event, Option<Signed>), Error>
where
    R: FnOnce(&Signed) -> Result<StreamBody, EvidenceError>,
    H: FnOnce(&Signed) -> Result<StreamBody, EvidenceError>,
    A: FnOnce(&Signed) -> Result<AbortBody, EvidenceError>,
{
    let evidence = |kind, source| Error::Evidence { host: host.clone(), kind, source };
    let unsigned =
        || Error::Unexpected { host: host.clone(), step: "query", got: "an unsigned answer" };
    let event = Event::Resolved(outcome);
    match outcome {
        DestinationOutcome::InProgress => Ok((event, None)),
        // SECURITY: "completed" is believed only with the destination's
        // signed receipt for exactly what this host committed.
        DestinationOutcome::Completed => {
            let signed = signed.ok_or_else(unsigned)?;
            let body = (checks.receipt)(&signed).map_err(|e| evidence("receipt", e))?;
            same_sum(&body, committed).map_err(|e| evidence("receipt", e))?;
            Ok((event, Some(signed)))
        }
        DestinationOutcome::PostcopyActive => {
            let signed = signed.ok_or_else(unsigned)?;
            let body = (checks.handover)(&signed).map_err(|e| evidence("handover", e))?;
            same_sum(&body, committed).map_err(|e| evidence("handover", e))?;
            Ok((event, Some(signed)))
        }
        // SECURITY: resuming here is safe only if the destination never
        // runs the VM; it signs that, bound to this query's connection so
        // an old answer cannot be replayed.
        DestinationOutcome::Aborted | DestinationOutcome::Unknown => {
            let signed = signed.ok_or_else(unsigned)?;
            (checks.abort)(&signed).map_err(|e| evidence("abort", e))?;
            Ok((event, Some(signed)))
        }
    }
}

#[cfg(test)]
#[path = "verdict_tests.rs"]
mod tests;
