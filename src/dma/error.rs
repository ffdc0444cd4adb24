//! Typed errors of planning and execution. Messages say what went wrong and what to do.

use super::driver::Stats;
use super::model::{RegionId, PAGE_SIZE};
use super::plan::Op;
use super::ranges::{fmt_range, fmt_ranges, RangeSet};
use std::fmt;
use std::io;
use std::ops::Range;

/// A region registration or conversion request the planner refuses. Nothing was planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A GPA, IOVA or length is not a multiple of 4 KiB.
    #[error("{what} {value:#x} is not a multiple of 4 KiB (0x1000); round it to a page boundary")]
    Unaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// A zero length.
    #[error("{what} has zero length; pass at least one 4 KiB page")]
    Empty {
        /// Which request.
        what: &'static str,
    },
    /// `start + len` overflows (GPA or IOVA space).
    #[error("{what} starting at {start:#x} with length {len:#x} wraps past 2^64; use a smaller length or offset")]
    Overflow {
        /// Which address space.
        what: &'static str,
        /// Start.
        start: u64,
        /// Length.
        len: u64,
    },
    /// The granule is not a power of two ≥ 4 KiB or does not divide a PerGranule region.
    #[error("granule {granule:#x} is invalid for a region of length {len:#x}: it must be a power of two of at least 4 KiB and, for PerGranule, divide the region length")]
    InvalidGranule {
        /// Granule.
        granule: u64,
        /// Region length.
        len: u64,
    },
    /// `convertible` contradicts the strategy, or a non-convertible region starts private.
    #[error("{0}")]
    Inconsistent(&'static str),
    /// The new region's GPA range overlaps a registered region.
    #[error("GPA range {} overlaps {existing} at {}; regions must not overlap", fmt_range(.new), fmt_range(.existing_range))]
    GpaOverlap {
        /// New region's GPA range.
        new: Range<u64>,
        /// Region it overlaps.
        existing: RegionId,
        /// That region's GPA range.
        existing_range: Range<u64>,
    },
    /// The new region's IOVA range overlaps a registered region's.
    #[error("IOVA range {} overlaps the IOVAs of {existing} at {}; choose another iova_offset", fmt_range(.new), fmt_range(.existing_range))]
    IovaOverlap {
        /// New region's IOVA range.
        new: Range<u64>,
        /// Region it overlaps.
        existing: RegionId,
        /// That region's IOVA range.
        existing_range: Range<u64>,
    },
    /// A conversion range is not entirely inside registered (possibly adjacent) regions.
    #[error("GPA range {} is not covered by registered regions: {first_gap_page:#x} is in no region{}", fmt_range(.range), match .nearest { Some((id, r)) => format!(" (nearest is {id} at {})", fmt_range(r)), None => "; no region is registered".to_string() })]
    NotCovered {
        /// The request's range.
        range: Range<u64>,
        /// First uncovered GPA.
        first_gap_page: u64,
        /// Nearest region to the uncovered GPA.
        nearest: Option<(RegionId, Range<u64>)>,
    },
    /// A conversion touches a non-convertible (`Whole`) region.
    #[error("GPA range {} touches {region}, which is not convertible; register it as convertible (Cut or PerGranule) to convert its pages", fmt_range(.range))]
    NotConvertible {
        /// The request's range.
        range: Range<u64>,
        /// The region.
        region: RegionId,
    },
    /// A conversion of a PerGranule region is not granule aligned.
    #[error("GPA range {} is not aligned to the {granule:#x}-byte granule of {region} (PerGranule); convert whole granules, e.g. {}", fmt_range(.range), fmt_range(.suggestion))]
    GranuleUnaligned {
        /// The part of the request inside the region.
        range: Range<u64>,
        /// The region.
        region: RegionId,
        /// Its granule.
        granule: u64,
        /// The smallest granule-aligned range covering `range`.
        suggestion: Range<u64>,
    },
    /// A batch asks for the same page to become both private and shared.
    #[error("batch converts GPA range {} both to private and to shared; split the batch", fmt_range(.range))]
    Conflict {
        /// Pages requested both ways.
        range: Range<u64>,
    },
    /// Discard requested on a to-shared conversion.
    #[error("discard requested for GPA range {} that turns shared; only pages turning private can have their shared backing discarded", fmt_range(.range))]
    DiscardOnShared {
        /// The request's range.
        range: Range<u64>,
    },
    /// No region with that id.
    #[error("{0} is not registered")]
    UnknownRegion(RegionId),
    /// The plan was made against an older tracker state.
    #[error(
        "plan was made at tracker generation {plan} but the tracker is at {tracker}; plan again"
    )]
    StalePlan {
        /// Generation the plan was made at.
        plan: u64,
        /// Current generation.
        tracker: u64,
    },
}

pub(crate) fn check_page_aligned(what: &'static str, value: u64) -> Result<(), PlanError> {
    if value % PAGE_SIZE != 0 {
        Err(PlanError::Unaligned { what, value })
    } else {
        Ok(())
    }
}

/// An executor call failed with an OS error number.
///
/// ```
/// use vfio_gmem::dma::OpError;
/// let e = OpError::from_errno(libc::ENOENT);
/// assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", io::Error::from_raw_os_error(*.errno))]
pub struct OpError {
    /// The `errno` value.
    pub errno: i32,
}

impl OpError {
    /// From a raw `errno`.
    pub fn from_errno(errno: i32) -> Self {
        OpError { errno }
    }

    /// The `io::ErrorKind` of the errno.
    pub fn kind(&self) -> io::ErrorKind {
        io::Error::from_raw_os_error(self.errno).kind()
    }
}

impl From<io::Error> for OpError {
    fn from(e: io::Error) -> Self {
        OpError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// State of the pages a failed plan touched, as far as its applied calls determine it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TouchedState {
    /// IOVA ranges that are mapped now.
    pub mapped: RangeSet,
    /// IOVA ranges that are unmapped now.
    pub unmapped: RangeSet,
    /// GPA ranges whose KVM attributes are private now.
    pub private: RangeSet,
    /// GPA ranges whose KVM attributes are shared now.
    pub shared: RangeSet,
}

impl fmt::Display for TouchedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IOVA mapped: {}; IOVA unmapped: {}; GPA private: {}; GPA shared: {}",
            fmt_ranges(self.mapped.iter()),
            fmt_ranges(self.unmapped.iter()),
            fmt_ranges(self.private.iter()),
            fmt_ranges(self.shared.iter())
        )
    }
}

/// Where a failed plan left the system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every applied call was undone: the touched pages are as before the plan.
    RolledBack,
    /// Undoing also failed; rollback stopped at `op` (its index in the plan) to keep every
    /// page safe, and `state` lists what the touched pages are now.
    RollbackFailed {
        /// Index in the plan of the op whose undo failed.
        op: usize,
        /// The undo call that failed.
        undo: Op,
        /// Its error.
        error: OpError,
        /// Current state of the pages the plan touched.
        state: Box<TouchedState>,
    },
    /// Everything but some discards succeeded: these GPA ranges are private (unmapped,
    /// attributes set) but their shared backing still holds memory.
    NotDiscarded {
        /// GPA ranges whose discard failed.
        ranges: RangeSet,
    },
}

/// A plan failed while executing.
///
/// Pass it to [`GuestMemory::reconcile`](crate::dma::GuestMemory::reconcile) so the
/// tracker records the real state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ExecError {
    /// Index in the plan of the op that failed first.
    pub op_index: usize,
    /// That op.
    pub op: Op,
    /// Its error.
    pub error: OpError,
    /// What the system looks like now.
    pub outcome: Outcome,
    /// Counters of the calls made, undo calls included.
    pub stats: Stats,
    /// Calls that took effect, in order (forward and undo), for the tracker to replay.
    pub(crate) applied: Vec<Op>,
}

impl ExecError {
    /// The OS error kind of the first failure.
    pub fn kind(&self) -> io::ErrorKind {
        self.error.kind()
    }

    /// Calls that took effect, in order, including undo calls.
    pub fn applied(&self) -> &[Op] {
        &self.applied
    }

    fn describe(&self) -> String {
        let head = format!("op {} ({}) failed: {}", self.op_index, self.op, self.error);
        match &self.outcome {
            Outcome::RolledBack => {
                format!("{head}; rolled back, the range is in its previous state")
            }
            Outcome::RollbackFailed {
                op,
                undo,
                error,
                state,
            } => format!(
                "{head}; undoing op {op} ({undo}) also failed: {error}; rollback stopped there, \
                 leaving no page reachable by a device while private. Now: {state}. \
                 Call GuestMemory::reconcile to record this state, then convert again to repair"
            ),
            Outcome::NotDiscarded { ranges } => format!(
                "{head}; GPA {} are private and unmapped but their shared backing was not \
                 discarded (still holds memory); retry the discard",
                fmt_ranges(ranges.iter())
            ),
        }
    }
}

/// Either failure of a plan-and-run helper.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// Refused before any call was made.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Failed while running; the tracker was reconciled.
    #[error(transparent)]
    Exec(Box<ExecError>),
}

impl From<ExecError> for DmaError {
    fn from(e: ExecError) -> Self {
        DmaError::Exec(Box::new(e))
    }
}
