//! The [`DmaSpace`] itself: what it owns, how it is created, and what it reports.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::types::{CutSupport, MapPath, RegionReport, SpaceError, SpaceOptions};
use crate::dma::executor::kernel::RegionBacking;
#[cfg(feature = "testing")]
use crate::dma::executor::Executor;
use crate::dma::plan::buffers::PlanBuffers;
use crate::dma::plan::model::{PageState, RegionId, Strategy};
use crate::dma::plan::outcome::Stats;
use crate::dma::plan::ranges::RangeSet;
use crate::dma::plan::tracker::Tracker;
use crate::gmem::KvmVm;
use crate::iommufd::{Ioas, Iommufd};
use crate::mapper::{Backend, DmaMapper};
use crate::vfio::{Container, Group};

/// What the space holds for a region while it is registered.
pub(super) struct Slot {
    /// The region's shared memory: the executor maps and discards through it.
    pub(super) backing: RegionBacking,
    pub(super) path: MapPath,
}

pub(super) enum Iommu {
    Iommufd {
        ioas: Ioas,
    },
    /// A legacy type1 container the space opened, with the groups its devices joined
    /// through (kept open while the space lives; dropped after the container).
    Legacy {
        container: Container,
        groups: BTreeMap<u32, Group>,
    },
    /// A caller's mapper: devices were attached by the caller.
    Mapper(Box<dyn DmaMapper + Send + Sync>),
    /// An executor standing in for every kernel call of the space's plans (feature
    /// `testing`): host benchmarks and tests of the space's own work.
    #[cfg(feature = "testing")]
    Executor(Box<dyn Executor + Send + Sync>),
}

/// A device attached through [`DmaSpace::attach`].
pub(super) struct Attached {
    /// [`Device::node_id`](crate::vfio::Device): the same for every open of the device.
    pub(super) node: u64,
    pub(super) name: String,
}

/// Guest memory as devices see it.
///
/// ```no_run
/// use std::os::fd::OwnedFd;
/// use vfio_gmem::dma::{DmaSpace, GuestRegion, PageState, SharedMemory, SpaceOptions};
/// use vfio_gmem::gmem::Memfd;
/// use vfio_gmem::iommufd::Iommufd;
/// use vfio_gmem::vfio::Device;
/// let iommufd = std::sync::Arc::new(Iommufd::open()?);
/// let mut space = DmaSpace::iommufd(&iommufd, None, SpaceOptions::default())?;
/// let dev = Device::open_cdev("/dev/vfio/devices/vfio0")?;
/// space.attach(&dev)?;
/// let shared = Memfd::new("guest-shared", 1 << 30)?;
/// let fd: OwnedFd = shared.file().try_clone()?.into();
/// space.add_region(GuestRegion::new(0, 1 << 30, SharedMemory::File { fd, offset: 0 })
///     .convertible(PageState::Shared))?;
/// space.convert(0x10_0000, 0x4000, PageState::Private, false)?; // unmapped first
/// space.convert(0x10_0000, 0x4000, PageState::Shared, false)?;  // mapped after
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Threads, and what holds under concurrency
///
/// `DmaSpace` is `Send + Sync` (asserted at compile time). Everything that changes it
/// takes `&mut self` — [`attach`](Self::attach), [`detach`](Self::detach),
/// [`add_region`](Self::add_region), [`remove_region`](Self::remove_region),
/// [`convert`](Self::convert), [`convert_batch`](Self::convert_batch) — and everything
/// that reads it takes `&self`. A VMM whose vCPU threads handle conversion exits shares
/// one space as `Arc<Mutex<DmaSpace>>` (or `Arc<RwLock<_>>` to let [`page_state`]
/// queries run in parallel). With that lock:
///
/// - **Atomic calls, in lock order.** Each call runs to completion (or full rollback)
///   while the lock is held, so calls are linearized in lock-acquisition order: a
///   page's state is the `to` of the last *successful* call, in that order, that covered
///   it. Overlapping conversions from different threads do not interleave and none is
///   lost; a failed call changes nothing (or its error says exactly what it left:
///   [`Outcome`](crate::dma::Outcome)).
/// - **Tracker equals kernel between calls.** Whenever the lock is free, the areas the
///   space records are exactly the areas in the kernel's IOAS, and each page is mapped
///   iff it is shared.
/// - **No hiccup for untouched pages.** A page that is shared before and after a call is
///   never unmapped, not even for a moment, so devices DMA to such pages concurrently
///   with conversions elsewhere, without taking the lock (devices never do).
/// - **Safe order inside a call.** Going private, the IOMMU mapping is gone before KVM
///   flips the attribute and before the shared backing is discarded; going shared, the
///   mapping appears only after the attribute flipped. A thread that sees a conversion
///   to private return knows no device can reach those pages any more.
/// - **Not covered:** ordering against the guest (resume the vCPU only after the call
///   returns) and between different spaces.
///
/// Dropping the space destroys its IOAS; if a device is still attached (dropped after
/// the space, or never [`detach`](Self::detach)ed), the IOAS is emptied instead, so no
/// page stays pinned and no device reaches guest memory after the drop, in any drop
/// order; the empty IOAS is destroyed once the device lets go of it
/// ([`Iommufd::reap_orphans`](crate::iommufd::Iommufd::reap_orphans)).
///
/// [`page_state`]: Self::page_state
pub struct DmaSpace {
    pub(super) iommu: Iommu,
    pub(super) vm: Option<KvmVm<Arc<VmFd>>>,
    pub(super) memory: Tracker,
    pub(super) slots: HashMap<RegionId, Slot>,
    pub(super) cut: CutSupport,
    pub(super) attached: Vec<Attached>,
    pub(super) options: SpaceOptions,
    pub(super) totals: Stats,
    /// GPAs this space made private in KVM that belong to no region any more: KVM keeps
    /// attributes after a region is removed, so a region added there later starts from
    /// them (and a refused add must put them back).
    pub(super) kvm_residue: RangeSet,
    /// Why this space could not claim the iommufd's compat designation at creation
    /// (another IOAS holds it): it may still split natively, but never cuts through
    /// the compat IOAS.
    pub(super) compat_refused: Option<String>,
    /// The planner's working memory, reused by every conversion (no allocation per call).
    pub(super) buffers: PlanBuffers,
    /// Parties told of conversions besides the IOMMU ([`ConversionListener`](crate::dma::ConversionListener)).
    pub(super) listeners: super::listeners::Listeners,
}

impl DmaSpace {
    /// A space on a new IOAS of `iommufd`. With `vm`, conversions also set KVM memory
    /// attributes (`KVM_SET_MEMORY_ATTRIBUTES`) in the documented order.
    ///
    /// With [`SpaceOptions::conversions`], the space claims the iommufd's VFIO-compat
    /// designation for its IOAS, which is what lets it cut areas on a kernel without the
    /// native split ([`CutSupport`]). An iommufd has one: if another space (or anything
    /// else) on the same `iommufd` holds it, this space does not take it away; on such a
    /// kernel it keeps huge pages on and its convertible regions use per-granule areas,
    /// and [`cut_support`](Self::cut_support) says why after the first attach. Open
    /// `/dev/iommu` once per convertible space for each to cut there. A space that splits
    /// natively gives the designation back at its first attach: any number of them
    /// convert on one iommufd.
    pub fn iommufd(
        iommufd: &Arc<Iommufd>,
        vm: Option<KvmVm<Arc<VmFd>>>,
        options: SpaceOptions,
    ) -> Result<Self, SpaceError> {
        let ioas = Ioas::new(iommufd)?;
        let mut cut = CutSupport::NotProbed;
        let mut compat_refused = None;
        if options.conversions {
            // Both must happen before anything is mapped (the kernel refuses to turn
            // huge pages off once domains hold mappings). The claim comes first: a space
            // that cannot cut through the compat IOAS keeps huge pages.
            if let Err(e) = ioas.claim_compat() {
                compat_refused = Some(format!(
                    "{e}; convertible regions of this space use per-granule areas"
                ));
            } else if let Err(e) = ioas.set_huge_pages(false) {
                cut = CutSupport::Unavailable(format!(
                    "cannot turn IOMMU huge pages off on IOAS {}: {e}",
                    ioas.id()
                ));
                // Hand the designation back: this IOAS cannot use it.
                if let Err(e) = iommufd.clear_compat_ioas() {
                    log::warn!(
                        "IOAS {}: giving back the compat designation: {e}",
                        ioas.id()
                    );
                }
            }
        }
        let mut space = DmaSpace::with(Iommu::Iommufd { ioas }, vm, options, cut);
        space.compat_refused = compat_refused;
        Ok(space)
    }

    /// A space on another mapper, e.g. a legacy VFIO type1 container with its groups
    /// already set: devices are attached by the caller; mapping is by VA with
    /// per-granule areas for convertible regions.
    pub fn with_mapper(
        mapper: Box<dyn DmaMapper + Send + Sync>,
        vm: Option<KvmVm<Arc<VmFd>>>,
        options: SpaceOptions,
    ) -> Self {
        let cut = CutSupport::Unavailable(format!("{} cannot cut areas", mapper.backend()));
        DmaSpace::with(Iommu::Mapper(mapper), vm, options, cut)
    }

    /// A space whose plans run on `exec` (e.g. [`FakeKernel`](crate::dma::FakeKernel) or
    /// an executor that does nothing) instead of the kernel, with cutting verified: what
    /// the host benchmarks measure is the space's own work per call (feature `testing`,
    /// not part of the stable API). Devices count as attached; regions map by VA.
    #[cfg(feature = "testing")]
    pub fn with_executor(exec: Box<dyn Executor + Send + Sync>, options: SpaceOptions) -> Self {
        DmaSpace::with(Iommu::Executor(exec), None, options, CutSupport::Verified)
    }

    pub(super) fn with(
        iommu: Iommu,
        vm: Option<KvmVm<Arc<VmFd>>>,
        options: SpaceOptions,
        cut: CutSupport,
    ) -> Self {
        DmaSpace {
            iommu,
            vm,
            memory: Tracker::new(),
            slots: HashMap::new(),
            cut,
            attached: Vec::new(),
            options,
            totals: Stats::default(),
            kvm_residue: RangeSet::new(),
            compat_refused: None,
            buffers: PlanBuffers::default(),
            listeners: Default::default(),
        }
    }

    /// The backend holding the mappings.
    pub fn backend(&self) -> Backend {
        match &self.iommu {
            Iommu::Iommufd { .. } => Backend::Iommufd,
            Iommu::Legacy { .. } => Backend::LegacyType1,
            Iommu::Mapper(m) => m.backend(),
            #[cfg(feature = "testing")]
            Iommu::Executor(_) => Backend::Iommufd,
        }
    }

    /// The IOAS, on the iommufd backend.
    pub fn ioas(&self) -> Option<&Ioas> {
        match &self.iommu {
            Iommu::Iommufd { ioas } => Some(ioas),
            Iommu::Legacy { .. } | Iommu::Mapper(_) => None,
            #[cfg(feature = "testing")]
            Iommu::Executor(_) => None,
        }
    }

    /// Whether areas can be cut here (probed at the first attach).
    pub fn cut_support(&self) -> &CutSupport {
        &self.cut
    }

    /// Reports every region.
    pub fn regions(&self) -> Vec<RegionReport> {
        let mut out: Vec<RegionReport> = self
            .memory
            .regions()
            .map(|r| {
                let shared: u64 = r
                    .runs(r.gpa_range(), PageState::Shared)
                    .map(|x| x.end - x.start)
                    .sum();
                let iova = r.iova_range();
                RegionReport {
                    id: r.id,
                    gpa: r.gpa_range().start,
                    len: r.gpa_range().end - r.gpa_range().start,
                    iova: iova.start,
                    convertible: r.strategy() != Strategy::Whole,
                    strategy: r.strategy(),
                    path: self
                        .slots
                        .get(&r.id)
                        .map(|s| s.path.clone())
                        .unwrap_or(MapPath::FileOffset),
                    shared_bytes: shared,
                    private_bytes: (iova.end - iova.start) - shared,
                    areas: self.memory.areas().filter(|a| a.region == r.id).count(),
                }
            })
            .collect();
        out.sort_by_key(|r| r.gpa);
        out
    }

    /// The page state at `gpa`, if inside a region.
    pub fn page_state(&self, gpa: u64) -> Option<PageState> {
        self.memory.page_state(gpa)
    }

    /// Live IOMMU areas.
    pub fn area_count(&self) -> usize {
        self.memory.area_count()
    }

    /// Counters summed over every operation so far.
    pub fn totals(&self) -> &Stats {
        &self.totals
    }

    /// Bytes used by the shared/private tracker (bitmaps and area records).
    pub fn tracker_bytes(&self) -> usize {
        self.memory.tracker_bytes()
    }

    /// The planner's view, for inspection.
    pub fn memory(&self) -> &Tracker {
        &self.memory
    }
}
