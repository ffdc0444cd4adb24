//! The values a [`DmaSpace`](super::DmaSpace) takes and reports: regions to add, their
//! shared memory, options, reports and errors.

use std::os::fd::OwnedFd;

use crate::dma::plan::error::PlanError;
use crate::dma::plan::model::{PageState, RegionId, Strategy, PAGE_SIZE};
use crate::dma::plan::outcome::ExecError;
use crate::gmem::GmemError;
use crate::iommufd;
use crate::vfio::VfioError;

/// Memory whose pages a device may reach while they are shared.
#[derive(Debug)]
pub enum SharedMemory {
    /// A file (memfd, hugetlb memfd, guest_memfd created `MMAP|INIT_SHARED`) from
    /// `offset`. The space keeps this fd (pass a dup) for as long as the region lives.
    File {
        /// The file (the space keeps it open while the region lives).
        fd: OwnedFd,
        /// File offset of the region's first byte.
        offset: u64,
    },
    /// Memory of this process (see [`UserAddress`] for what the caller promises).
    Address {
        /// The address of the region's first byte.
        addr: UserAddress,
    },
}

/// The address of memory in this process that devices may be given, by the promise made
/// in [`UserAddress::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserAddress(u64);

impl UserAddress {
    /// Wraps `addr` for [`SharedMemory::Address`].
    ///
    /// # Safety
    ///
    /// The region's whole range from `addr` must stay allocated to guest memory (not
    /// freed, reused by an allocator, or unmapped and mapped again) for as long as the
    /// region is registered in a space: attached devices may read and write it at any
    /// moment. A dedicated `mmap` of the shared backing kept for that long meets this.
    pub unsafe fn new(addr: u64) -> Self {
        UserAddress(addr)
    }

    /// The address.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// A guest RAM region to add to a [`DmaSpace`](crate::dma::DmaSpace).
///
/// ```
/// use vfio_gmem::dma::{GuestRegion, PageState, SharedMemory};
/// # fn f(memfd: std::os::fd::OwnedFd) {
/// let region = GuestRegion::new(0x1_0000_0000, 256 << 20, SharedMemory::File { fd: memfd, offset: 0 })
///     .convertible(PageState::Private);
/// # }
/// ```
#[derive(Debug)]
pub struct GuestRegion {
    /// First guest physical address (4 KiB aligned).
    pub gpa: u64,
    /// Length in bytes (4 KiB aligned, non-zero).
    pub len: u64,
    /// IOVA = GPA + `iova_offset`.
    pub iova_offset: i64,
    /// The shared backing devices reach while pages are shared. The private side
    /// (guest_memfd) is the VMM's: the space never maps it, and learns of it only
    /// through the KVM attributes it sets.
    pub shared: SharedMemory,
    /// Whether the guest may convert pages; `None` = not convertible (all shared).
    pub convertible: Option<PageState>,
    /// Granule of the per-granule fallback strategy (power of two ≥ 4 KiB).
    pub granule: u64,
}

impl GuestRegion {
    /// A non-convertible, all-shared region at identity IOVA.
    pub fn new(gpa: u64, len: u64, shared: SharedMemory) -> Self {
        GuestRegion {
            gpa,
            len,
            iova_offset: 0,
            shared,
            convertible: None,
            granule: PAGE_SIZE,
        }
    }
    /// Makes the region convertible, starting with every page in `initial`.
    pub fn convertible(mut self, initial: PageState) -> Self {
        self.convertible = Some(initial);
        self
    }
    /// Places the region at IOVA = GPA + `offset`.
    pub fn iova_offset(mut self, offset: i64) -> Self {
        self.iova_offset = offset;
        self
    }
    /// Sets the per-granule fallback's granule.
    pub fn granule(mut self, granule: u64) -> Self {
        self.granule = granule;
        self
    }
}

/// How a region's shared pages reach the IOMMU.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "path", rename_all = "kebab-case")]
pub enum MapPath {
    /// `IOMMU_IOAS_MAP_FILE`: by fd+offset, no process mapping involved.
    FileOffset,
    /// By the virtual address of a mapping (`IOMMU_IOAS_MAP` / `VFIO_IOMMU_MAP_DMA`).
    VirtualAddress {
        /// Why not by fd+offset.
        reason: String,
    },
}

impl std::fmt::Display for MapPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MapPath::FileOffset => f.write_str("fd+offset"),
            MapPath::VirtualAddress { reason } => write!(f, "VA ({reason})"),
        }
    }
}

/// Whether this space can cut an area (the primary strategy for convertible memory), and
/// how. Probed at the first attach in this order: native split with huge pages on, native
/// split with huge pages off, compat cut; the first that works on the running kernel wins.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "kebab-case")]
pub enum CutSupport {
    /// The compat cut (`VFIO_IOMMU_UNMAP_DMA` on the iommufd's compat IOAS, huge pages
    /// off), proven on this kernel with a device attached.
    Verified,
    /// The native split (`IOMMU_IOAS_SPLIT`, the project's kernel series), proven on this
    /// kernel with a device attached: no compat designation, so any number of spaces on
    /// one iommufd can convert. `huge_pages`: the IOAS keeps large IOPTEs (every attached
    /// IOMMU page table can cut them); if false, `why` says why they are off.
    NativeSplit {
        /// Whether the IOAS keeps huge pages (large IOPTEs).
        huge_pages: bool,
        /// Why huge pages are off, or why the native split is used at all.
        why: String,
    },
    /// Not usable; convertible regions use per-granule areas.
    Unavailable(String),
    /// No device attached yet.
    NotProbed,
}

/// What a region looks like now.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RegionReport {
    /// The region.
    pub id: RegionId,
    /// First guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// First IOVA.
    pub iova: u64,
    /// Whether its pages can convert.
    pub convertible: bool,
    /// How its shared pages are laid out as areas.
    pub strategy: Strategy,
    /// How its shared pages reach the IOMMU (serialized flat: `path`, `reason`).
    #[serde(flatten)]
    pub path: MapPath,
    /// Bytes now shared (mapped).
    pub shared_bytes: u64,
    /// Bytes now private (unmapped).
    pub private_bytes: u64,
    /// Live IOMMU areas of this region.
    pub areas: usize,
}

/// Options fixed when a space is created.
#[derive(Clone, Debug)]
pub struct SpaceOptions {
    /// Prepare for convertible regions: disable IOMMU huge pages and make the IOAS the
    /// iommufd's VFIO-compat IOAS so areas can be cut. Off: huge pages stay on and
    /// convertible regions use per-granule areas.
    pub conversions: bool,
    /// Force a strategy for convertible regions (benchmarks, tests).
    pub force_strategy: Option<Strategy>,
    /// Use the native split (`IOMMU_IOAS_SPLIT`) where the kernel has it (default). Off:
    /// only the compat cut is tried (benchmarks, comparisons).
    pub native_split: bool,
}

impl CutSupport {
    /// True if areas can be cut (natively or through the compat IOAS).
    pub fn can_cut(&self) -> bool {
        matches!(self, CutSupport::Verified | CutSupport::NativeSplit { .. })
    }
}

impl Default for SpaceOptions {
    fn default() -> Self {
        SpaceOptions {
            conversions: true,
            force_strategy: None,
            native_split: true,
        }
    }
}

/// A failed space operation. Every variant says what state things are in.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// A region was added before any device was attached.
    #[error("no device is attached to this DMA space; attach one before adding memory (iommufd pins file memory lazily, so a mapping made without a device could not be verified)")]
    NoDevice,
    /// An iommufd call outside a plan failed (creating the IOAS, opening `/dev/iommu`).
    #[error(transparent)]
    Iommufd(#[from] iommufd::Error),
    /// A KVM call outside a plan failed (seeding a new region's attributes).
    #[error(transparent)]
    Gmem(#[from] GmemError),
    /// A device cannot be attached or detached here; `detail` says why and what to do.
    #[error("device {device}: {detail}")]
    Attach {
        /// The device.
        device: String,
        /// Why, and what to do.
        detail: String,
    },
    /// A VFIO call for a device failed: opening it or its group, binding, attaching,
    /// detaching.
    #[error("device {device}: {source}")]
    Device {
        /// The device (its name, or PCI address).
        device: String,
        /// The VFIO error.
        #[source]
        source: VfioError,
    },
    /// Opening the backend or finding a device failed.
    #[error(transparent)]
    Vfio(#[from] VfioError),
    /// The planner refused the request before any kernel call.
    #[error("{0}; nothing was changed")]
    Plan(#[from] PlanError),
    #[error("{what}: {source}{}", source.error.cause().map(|d| format!(" — {d}")).unwrap_or_default())]
    /// A plan failed in the kernel: rolled back, or the error says what it left.
    Exec {
        /// What the space was doing.
        what: String,
        /// What failed and what it left; its `error`'s `source()` is the kernel's
        /// explanation (shown after " — ").
        #[source]
        source: Box<ExecError>,
    },
    /// A region's backing is unusable (wrong kind of file, too short, private, or the
    /// MAP_FILE probe could not conclude); `why` says what to do.
    #[error("region [{gpa:#x}, +{len:#x}): {why}")]
    BadRegion {
        /// First GPA of the region.
        gpa: u64,
        /// Its length.
        len: u64,
        /// What is wrong and what to do.
        why: String,
    },
    /// A conversion listener refused to release pages going private
    /// ([`ConversionListener::release`](crate::dma::ConversionListener::release)): nothing
    /// was converted, every page is as before, and the listeners that had released were
    /// granted the pages back.
    #[error("conversion listener {name:?} did not release GPA {ranges}: {source}; nothing was converted (the pages stay shared)")]
    ListenerRelease {
        /// The listener's name.
        name: String,
        /// The ranges it was asked to release.
        ranges: String,
        /// Its error.
        #[source]
        source: crate::dma::ListenerError,
    },
    /// A conversion listener could not take shared pages
    /// ([`ConversionListener::grant`](crate::dma::ConversionListener::grant)). With
    /// `took_effect`, the conversion to shared happened (KVM and devices see the pages
    /// shared; the other listeners were granted them) and only this listener does not
    /// reach them; without, the listener was not registered.
    #[error("conversion listener {name:?} could not take shared GPA {ranges}: {source}; {}", if *took_effect { "the conversion took effect: the pages are shared and mapped for devices, this listener does not reach them" } else { "the listener was not registered" })]
    ListenerGrant {
        /// The listener's name.
        name: String,
        /// The ranges it was granted.
        ranges: String,
        /// Whether the conversion (or registration) went through regardless.
        took_effect: bool,
        /// Its error.
        #[source]
        source: crate::dma::ListenerError,
    },
    /// A refused [`DmaSpace::add_region`](crate::dma::DmaSpace::add_region) whose KVM attributes could not be set back.
    #[error(
        "{source}; and KVM's memory attributes were not restored: GPA {ranges} were {state} \
         before this call, are {now} now, and setting them {state} again failed ({restore}); \
         set them with KvmVm::set_{state} before the guest touches them"
    )]
    AttributesNotRestored {
        /// Why the region was refused.
        #[source]
        source: Box<SpaceError>,
        /// The GPA ranges left in the wrong state.
        ranges: String,
        /// The state they were in before the call.
        state: PageState,
        /// The state they are in now.
        now: PageState,
        /// Why setting them back failed.
        restore: GmemError,
    },
}
