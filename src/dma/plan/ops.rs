//! Operations a plan is made of, and the plan itself.
//!
//! Invariants of every plan the planner emits (checked by the property tests):
//! - op order is unmaps, attribute changes to private, attribute changes to shared, maps,
//!   discards; every prefix of that sequence is a safe state (no page is private in KVM
//!   while a device can still reach it, no page is mapped before it is shared);
//! - no unmap covers a page that is shared both before and after the plan;
//! - every `Unmap::restore` lists exactly the mapped pieces inside the unmap range, so
//!   mapping them back undoes the unmap.

use std::fmt;

use super::areamap::Pos;
use super::model::{Area, Backing, PageState, RegionId};
use super::ranges::fmt_range;
use super::region::Region;

/// Map `len` bytes of a region's shared backing at `iova` as one new IOMMU area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapOp {
    /// Region whose shared backing is mapped.
    pub region: RegionId,
    /// That region's shared backing (copied so executors need no region table).
    pub backing: Backing,
    /// First IOVA of the new area.
    pub iova: u64,
    /// Offset within the region (and thus within `backing`) of the first byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl MapOp {
    pub(crate) fn from_area(a: &Area, backing: Backing) -> Self {
        MapOp {
            region: a.region,
            backing,
            iova: a.iova,
            offset: a.offset,
            len: a.len,
        }
    }
}

/// Which unmap ioctl an [`UnmapOp`] needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnmapKind {
    /// `IOMMU_IOAS_UNMAP` (or type1 `VFIO_IOMMU_UNMAP_DMA`): removes every area fully
    /// inside the range; the range never cuts an area in plans.
    Native,
    /// iommufd's compat `VFIO_IOMMU_UNMAP_DMA` on an IOAS with huge pages disabled: cuts
    /// the areas at both ends of the range, then removes everything inside.
    Cut,
}

/// Remove the IOMMU translations of `[iova, iova+len)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmapOp {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// Which ioctl semantics the range relies on.
    pub kind: UnmapKind,
    /// The mapped pieces inside the range, ascending; mapping them undoes this op. Their
    /// total length is the byte count the kernel should report.
    pub restore: Vec<MapOp>,
}

impl UnmapOp {
    /// Bytes the kernel is expected to report as unmapped.
    #[inline]
    pub fn expected_bytes(&self) -> u64 {
        self.restore.iter().map(|m| m.len).sum()
    }
}

/// Set KVM memory attributes of `[gpa, gpa+len)` (`KVM_SET_MEMORY_ATTRIBUTES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttributesOp {
    /// First GPA.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// `true`: private; `false`: shared.
    pub private: bool,
}

impl AttributesOp {
    /// The op that undoes this one (every page it covers flips).
    pub fn inverse(&self) -> Self {
        AttributesOp {
            private: !self.private,
            ..*self
        }
    }
}

/// Release the shared backing of `[offset, offset+len)` within a region (irreversible).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardOp {
    /// Region whose shared backing is discarded.
    pub region: RegionId,
    /// That region's shared backing.
    pub backing: Backing,
    /// GPA of the first byte (for reports).
    pub gpa: u64,
    /// Offset within the region.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// One executor call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// See [`MapOp`].
    Map(MapOp),
    /// See [`UnmapOp`].
    Unmap(UnmapOp),
    /// See [`AttributesOp`].
    SetAttributes(AttributesOp),
    /// See [`DiscardOp`].
    Discard(DiscardOp),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Map(m) => write!(
                f,
                "map IOVA {} from {} offset {:#x}",
                fmt_range(&(m.iova..m.iova + m.len)),
                m.region,
                m.offset
            ),
            Op::Unmap(u) => write!(
                f,
                "{} unmap IOVA {}",
                match u.kind {
                    UnmapKind::Native => "native",
                    UnmapKind::Cut => "cut",
                },
                fmt_range(&(u.iova..u.iova + u.len))
            ),
            Op::SetAttributes(a) => write!(
                f,
                "set GPA {} {}",
                fmt_range(&(a.gpa..a.gpa + a.len)),
                if a.private { "private" } else { "shared" }
            ),
            Op::Discard(d) => write!(
                f,
                "discard {} offset {}",
                d.region,
                fmt_range(&(d.offset..d.offset + d.len))
            ),
        }
    }
}

/// One conversion of a batch.
///
/// ```
/// use vfio_gmem::dma::{ConversionRequest, PageState};
/// let r = ConversionRequest::new(0x20_0000, 0x1000, PageState::Private).discard_shared();
/// assert!(r.discard);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConversionRequest {
    /// First GPA (page aligned).
    pub gpa: u64,
    /// Length in bytes (page aligned, non-zero).
    pub len: u64,
    /// Target state.
    pub to: PageState,
    /// After going private, discard the shared backing of every page of the request
    /// (pages already private included). Only with `to: Private`. The range reads back
    /// as zeros afterwards; its memory is freed where the backing can free it: shmem and
    /// guest_memfd per 4 KiB page, hugetlbfs per whole huge page only (a discard inside a
    /// 2 MiB or 1 GiB page zeroes the range and frees nothing, as `fallocate(PUNCH_HOLE)`
    /// does on hugetlbfs).
    pub discard: bool,
}

impl ConversionRequest {
    /// A conversion without discard.
    pub fn new(gpa: u64, len: u64, to: PageState) -> Self {
        ConversionRequest {
            gpa,
            len,
            to,
            discard: false,
        }
    }

    /// Also discard the shared backing of the pages (to-private only).
    pub fn discard_shared(mut self) -> Self {
        self.discard = true;
        self
    }
}

/// What committing a plan does to the region table besides replaying its ops.
#[derive(Clone, Debug)]
pub(crate) enum RegionChange {
    None,
    Register(Box<Region>),
    Deregister(RegionId),
}

/// An ordered list of operations plus what the tracker must record once they ran.
///
/// Produced by the planning methods of [`Tracker`](crate::dma::planning::Tracker), run by
/// `execute` (the driver), then passed back to
/// [`Tracker::commit`](crate::dma::planning::Tracker::commit) (or
/// [`Tracker::reconcile`](crate::dma::planning::Tracker::reconcile) after a failure).
#[derive(Clone, Debug)]
pub struct Plan {
    pub(crate) ops: Vec<Op>,
    pub(crate) change: RegionChange,
    pub(crate) generation: u64,
    pub(crate) areas_before: usize,
    pub(crate) areas_after: usize,
    /// What committing the plan changes in the tracker, worked out by the planner for
    /// one request inside one region (the common conversion); `None` for other plans,
    /// whose commit replays their ops.
    pub(crate) edit: Option<Edit>,
}

/// The tracker change a successful plan makes, computed by the planner: commit applies
/// it without replaying the ops one by one or searching the area map. Valid only for the
/// tracker that planned it, at the plan's generation (commit checks both; any other
/// tracker replays the ops).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Edit {
    /// The planning tracker's instance: no other tracker applies the edit.
    pub(crate) tracker: u64,
    /// Index of the request's region in the tracker's region list.
    pub(crate) region: usize,
    /// GPA range of that region whose pages end up in the target state.
    pub(crate) gpa: u64,
    pub(crate) end: u64,
    /// The target state: private (`true`) or shared.
    pub(crate) private: bool,
    /// What happens to the area map.
    pub(crate) areas: AreaEdit,
}

/// The area-map part of an [`Edit`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum AreaEdit {
    /// The plan maps and unmaps nothing.
    None,
    /// Replay the plan's map and unmap ops.
    Replay,
    /// IOVA `[start, end)` leaves the area at `at`, which holds all of it.
    Cut { at: Pos, start: u64, end: u64 },
    /// The area of map op `op` goes right after `below` (the last area starting below
    /// it; `None`: first).
    Insert { below: Option<Pos>, op: usize },
}

impl Plan {
    /// The operations, in execution order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// True if executing the plan issues no call.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Live IOMMU areas before the plan.
    pub fn areas_before(&self) -> usize {
        self.areas_before
    }

    /// Live IOMMU areas once the plan has run.
    pub fn areas_after(&self) -> usize {
        self.areas_after
    }

    /// The id the region gets if this is a registration plan.
    pub fn registered_region(&self) -> Option<RegionId> {
        match &self.change {
            RegionChange::Register(r) => Some(r.id),
            _ => None,
        }
    }
}
