//! The planner's refusals: typed, each saying what to do.

use std::ops::Range;

use super::model::{RegionId, PAGE_SIZE};
use super::ranges::fmt_range;

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
