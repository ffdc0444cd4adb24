//! Errors of the peer protocol: what a message got wrong, and what a connection failed at.

use std::io;
use std::ops::Range;

/// A message that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the part being read needs.
    #[error(
        "message of {len} bytes is too short (needs {need}); the peer speaks another protocol"
    )]
    Short {
        /// Bytes present.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The payload is not the size the header or the request says.
    #[error("payload of {got} bytes where {said} were expected; the peer speaks another protocol")]
    Size {
        /// Bytes expected.
        said: usize,
        /// Bytes present.
        got: usize,
    },
    /// Another protocol version.
    #[error("protocol version {0}, this library speaks 1; update the older side")]
    Version(u32),
    /// A request number this library does not know.
    #[error("unknown request {0}")]
    UnknownRequest(u32),
    /// A range that is empty or wraps around.
    #[error("range at GPA {gpa:#x} of {len:#x} bytes is empty or wraps around")]
    Range {
        /// First GPA.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// More ranges than one message may carry.
    #[error("{0} ranges in one message (at most {max})", max = super::wire::MAX_RANGES)]
    TooManyRanges(usize),
}

/// A failed peer operation, on either side of the connection.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A socket call failed.
    #[error("peer {name:?}: {what}: {source}")]
    Io {
        /// The peer's name.
        name: String,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The other side closed the connection (or exited).
    #[error("peer {name:?} closed the connection; if it is gone, remove its listener (DmaSpace::remove_listener) — while it is registered, conversions to private are refused, since nothing proves it let go")]
    Closed {
        /// The peer's name.
        name: String,
    },
    /// No reply within the timeout.
    #[error("peer {name:?} did not answer {request} within {ms} ms; the connection is out of step and refuses every further call (remove the listener, reconnect)")]
    Timeout {
        /// The peer's name.
        name: String,
        /// The request left unanswered.
        request: &'static str,
        /// The timeout.
        ms: u64,
    },
    /// An earlier timeout or protocol error left the connection out of step.
    #[error("peer {name:?}: the connection is out of step after an earlier failure; remove the listener and reconnect")]
    Broken {
        /// The peer's name.
        name: String,
    },
    /// A message did not decode, or was not the reply expected.
    #[error("peer {name:?}: {detail}")]
    Protocol {
        /// The peer's name.
        name: String,
        /// What was wrong.
        detail: String,
        /// The decoding error, if any.
        #[source]
        source: Option<WireError>,
    },
    /// The peer answered with an error.
    #[error("peer {name:?} refused {request}: {source}")]
    Refused {
        /// The peer's name.
        name: String,
        /// The request refused.
        request: &'static str,
        /// The errno it answered with.
        #[source]
        source: io::Error,
    },
    /// The backend's own check before answering failed (answered as the request's
    /// failure).
    #[error("the backend's check before answering failed: {source}")]
    CheckFailed {
        /// What the check reported.
        #[source]
        source: io::Error,
    },
    /// A GPA range outside every region the backend was given.
    #[error("GPA [{:#x}, {:#x}) is not in a region of this backend; the VMM sends ADD_MEM_REG first", .range.start, .range.end)]
    NotInRegion {
        /// The range.
        range: Range<u64>,
    },
    /// An access to a page this backend may not reach (private, or never granted).
    #[error("GPA [{:#x}, {:#x}) is not granted to this backend (private or not yet shared)", .range.start, .range.end)]
    NotGranted {
        /// The range.
        range: Range<u64>,
    },
    /// A region that overlaps another, or is not page aligned.
    #[error("region [{gpa:#x}, +{size:#x}): {why}")]
    BadRegion {
        /// First GPA.
        gpa: u64,
        /// Length.
        size: u64,
        /// What is wrong.
        why: &'static str,
    },
}
