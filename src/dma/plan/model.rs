//! Vocabulary of the memory model: pages, regions, backings, strategies and IOMMU areas.
//!
//! Invariants of a registered region: `gpa`, `len` and the IOVA base are multiples of
//! [`PAGE_SIZE`], `len > 0`, neither `gpa + len` nor `iova + len` overflows, `granule` is a
//! power of two ≥ [`PAGE_SIZE`], a `PerGranule` region's `len` is a multiple of its
//! granule, and `convertible == (strategy != Whole)`.

use std::fmt;
use std::ops::Range;

/// Size of the pages the tracker follows (the IOMMU and KVM attribute granularity).
pub const PAGE_SIZE: u64 = 4096;

/// Whether a guest page is visible to the host/devices (shared) or only to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Host-visible; mapped in the IOMMU so devices can reach it.
    Shared,
    /// Guest-private; never mapped in the IOMMU.
    Private,
}

impl PageState {
    /// The other state.
    ///
    /// ```
    /// use vfio_gmem::dma::PageState;
    /// assert_eq!(PageState::Shared.flip(), PageState::Private);
    /// ```
    pub fn flip(self) -> Self {
        match self {
            PageState::Shared => PageState::Private,
            PageState::Private => PageState::Shared,
        }
    }
}

impl fmt::Display for PageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageState::Shared => "shared",
            PageState::Private => "private",
        })
    }
}

/// How a region's shared pages are laid out as IOMMU areas. Shown (and serialized) as
/// `cut`, `pergranule` or `whole`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Each shared run is one area; going private cuts exactly the converted pages out
    /// with the VFIO-compat unmap on an IOAS with huge pages disabled. Areas are never
    /// merged. Needs an executor whose IOAS supports the cut ([`UnmapKind::Cut`]).
    ///
    /// [`UnmapKind::Cut`]: crate::dma::planning::UnmapKind::Cut
    Cut,
    /// One area per granule; conversions must be granule aligned. Works with native
    /// unmap semantics only (legacy type1, or iommufd without the compat path).
    PerGranule,
    /// One area for the whole region, mapped at registration; the region is not
    /// convertible.
    Whole,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Cut => "cut",
            Strategy::PerGranule => "pergranule",
            Strategy::Whole => "whole",
        })
    }
}

/// The caller's description of where a region's host-visible (shared) memory is, for an
/// executor of its own: the planner only copies it into map and discard operations.
///
/// Plans name regions ([`RegionId`]): an executor finds the memory through the region (a
/// [`DmaSpace`](crate::dma::DmaSpace) looks it up in what it owns and registers its
/// regions as `Opaque(0)`). No fd rides in a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backing {
    /// Host virtual address of the region's first byte.
    Address(u64),
    /// A caller-defined token (tests and executors that keep their own tables).
    Opaque(u64),
}

/// Identifier of a registered region, unique for the lifetime of a tracker. Shown as
/// `region#N`, serialized as the number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct RegionId(pub u64);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region#{}", self.0)
    }
}

/// Description of a guest RAM region to register.
///
/// ```
/// use vfio_gmem::dma::{PageState, Strategy, planning::{Backing, RegionSpec}};
/// let spec = RegionSpec::new(0x1_0000_0000, 256 << 20, Backing::Opaque(1))
///     .iova_offset(0x1000_0000)
///     .strategy(Strategy::PerGranule)
///     .granule(2 << 20)
///     .initial(PageState::Private);
/// assert_eq!(spec.iova(), Some(0x1_1000_0000));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// First guest physical address (page aligned).
    pub gpa: u64,
    /// Length in bytes (page aligned, non-zero).
    pub len: u64,
    /// IOVA of byte `gpa` is `gpa + iova_offset` (may be negative).
    pub iova_offset: i64,
    /// Host-visible backing, used by map and discard operations.
    pub shared: Backing,
    /// Private backing (e.g. guest_memfd); carried for executors, unused by the planner.
    pub private: Option<Backing>,
    /// Whether the guest may convert pages of this region.
    pub convertible: bool,
    /// IOMMU layout strategy.
    pub strategy: Strategy,
    /// Granule for [`Strategy::PerGranule`] (power of two ≥ 4 KiB).
    pub granule: u64,
    /// State of every page at registration.
    pub initial: PageState,
}

impl RegionSpec {
    /// A convertible `Cut` region, identity IOVA, 4 KiB granule, all shared.
    pub fn new(gpa: u64, len: u64, shared: Backing) -> Self {
        RegionSpec {
            gpa,
            len,
            iova_offset: 0,
            shared,
            private: None,
            convertible: true,
            strategy: Strategy::Cut,
            granule: PAGE_SIZE,
            initial: PageState::Shared,
        }
    }

    /// A non-convertible region mapped as one area (`Whole`, all shared).
    ///
    /// ```
    /// use vfio_gmem::dma::{Strategy, planning::{Backing, RegionSpec}};
    /// let s = RegionSpec::non_convertible(0, 1 << 20, Backing::Address(0x7f00_0000_0000));
    /// assert!(!s.convertible && s.strategy == Strategy::Whole);
    /// ```
    pub fn non_convertible(gpa: u64, len: u64, shared: Backing) -> Self {
        RegionSpec {
            convertible: false,
            strategy: Strategy::Whole,
            ..RegionSpec::new(gpa, len, shared)
        }
    }

    /// Sets the IOVA offset (IOVA = GPA + offset).
    pub fn iova_offset(mut self, offset: i64) -> Self {
        self.iova_offset = offset;
        self
    }

    /// Sets the strategy; `Whole` also marks the region non-convertible.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self.convertible = strategy != Strategy::Whole;
        self
    }

    /// Sets the granule used by [`Strategy::PerGranule`].
    pub fn granule(mut self, granule: u64) -> Self {
        self.granule = granule;
        self
    }

    /// Sets the state of every page at registration.
    pub fn initial(mut self, state: PageState) -> Self {
        self.initial = state;
        self
    }

    /// Sets the private backing descriptor.
    pub fn private_backing(mut self, backing: Backing) -> Self {
        self.private = Some(backing);
        self
    }

    /// IOVA of the first byte, or `None` if it falls outside `0..2^64`.
    pub fn iova(&self) -> Option<u64> {
        self.gpa.checked_add_signed(self.iova_offset)
    }

    /// GPA range covered.
    pub fn gpa_range(&self) -> Range<u64> {
        self.gpa..self.gpa.saturating_add(self.len)
    }
}

/// A live IOMMU area as the tracker (or the fake kernel) sees it: one successful map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Area {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// Region whose backing the area maps.
    pub region: RegionId,
    /// Offset of the area's first byte within the region.
    pub offset: u64,
}

impl From<&super::ops::MapOp> for Area {
    /// The area a successful map creates.
    fn from(m: &super::ops::MapOp) -> Self {
        Area {
            iova: m.iova,
            len: m.len,
            region: m.region,
            offset: m.offset,
        }
    }
}

impl Area {
    /// IOVA range covered.
    pub fn iova_range(&self) -> Range<u64> {
        self.iova..self.iova + self.len
    }
}
