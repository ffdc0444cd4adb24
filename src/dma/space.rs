//! [`DmaSpace`]: guest memory as devices see it. Owns the IOMMU mappings of a VM's RAM
//! regions and keeps them in step with private/shared conversions.
//!
//! Invariants:
//! - memory is mapped only after a device is attached, so every mapping path was decided
//!   against an IOAS with a real domain (MAP_FILE pins lazily and lies otherwise);
//! - going private: the IOVA is unmapped before KVM flips the attribute and before the
//!   shared backing is discarded; going shared: mapped after the attribute flips;
//! - a page that stays shared is never unmapped (the planner's invariant; `Cut` needs a
//!   compat IOAS with huge pages disabled, verified by [`DmaSpace::attach`]'s probe);
//! - the tracker equals the kernel after every call, successful or not.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::driver::Stats;
use super::error::{DmaError, ExecError, PlanError};
use super::exec::{IommuTarget, RealExecutor};
use super::memory::GuestMemory;
use super::model::{Backing, PageState, RegionId, RegionSpec, Strategy, PAGE_SIZE};
use super::plan::ConversionRequest;
use crate::gmem::{GmemError, KvmAttributes, KvmVm, MappedMemory, Memfd};
use crate::iommufd::{self, Ioas, Iommufd};
use crate::mapper::{Access, Backend, DmaMapper, Iova};

/// Memory whose pages a device may reach while they are shared.
#[derive(Debug)]
pub enum SharedMemory {
    /// A file (memfd, hugetlb memfd, guest_memfd created `MMAP|INIT_SHARED`) from
    /// `offset`. The space keeps this fd (pass a dup) for as long as the region lives.
    File { fd: OwnedFd, offset: u64 },
    /// Memory of this process at `addr`; the caller keeps it mapped while the region lives.
    Address { addr: u64 },
}

/// A guest RAM region to add to a [`DmaSpace`].
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
    pub gpa: u64,
    pub len: u64,
    /// IOVA = GPA + `iova_offset`.
    pub iova_offset: i64,
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

/// Whether this space can cut an area (the primary strategy for convertible memory).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", content = "reason", rename_all = "kebab-case")]
pub enum CutSupport {
    /// Proven on this kernel with a device attached.
    Verified,
    /// Not usable; convertible regions use per-granule areas.
    Unavailable(String),
    /// No device attached yet.
    NotProbed,
}

/// What a region looks like now.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RegionReport {
    pub id: u64,
    pub gpa: u64,
    pub len: u64,
    pub iova: u64,
    pub convertible: bool,
    pub strategy: String,
    #[serde(flatten)]
    pub path: MapPath,
    pub shared_bytes: u64,
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
}

impl Default for SpaceOptions {
    fn default() -> Self {
        SpaceOptions {
            conversions: true,
            force_strategy: None,
        }
    }
}

/// A failed space operation. Every variant says what state things are in.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error("no device is attached to this DMA space; attach one before adding memory (iommufd pins file memory lazily, so a mapping made without a device could not be verified)")]
    NoDevice,
    #[error(transparent)]
    Iommufd(#[from] iommufd::Error),
    #[error(transparent)]
    Gmem(#[from] GmemError),
    #[error("device {device}: {detail}")]
    Attach { device: String, detail: String },
    #[error("{0}; nothing was changed")]
    Plan(#[from] PlanError),
    #[error("{what}: {source}{}", detail.as_ref().map(|d| format!(" — {d}")).unwrap_or_default())]
    Exec {
        what: String,
        detail: Option<String>,
        #[source]
        source: Box<ExecError>,
    },
    #[error("region [{gpa:#x}, +{len:#x}): {why}")]
    BadRegion { gpa: u64, len: u64, why: String },
}

struct Slot {
    /// Keeps the file open while mapped by fd+offset, or for discards.
    _file: Option<OwnedFd>,
    /// Keeps the fallback mapping alive while mapped by VA.
    _mapping: Option<MappedMemory>,
    path: MapPath,
}

enum Iommu {
    Iommufd { ioas: Ioas },
    Mapper(Box<dyn DmaMapper + Send + Sync>),
}

/// A device attached through [`DmaSpace::attach`].
struct Attached {
    /// [`Device::node_id`](crate::vfio::Device): the same for every open of the device.
    node: u64,
    name: String,
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
///   [`Outcome`](super::Outcome)).
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
    iommu: Iommu,
    vm: Option<KvmVm<Arc<VmFd>>>,
    memory: GuestMemory,
    slots: HashMap<RegionId, Slot>,
    cut: CutSupport,
    attached: Vec<Attached>,
    options: SpaceOptions,
    totals: Stats,
}

impl DmaSpace {
    /// A space on a new IOAS of `iommufd`. With `vm`, conversions also set KVM memory
    /// attributes (`KVM_SET_MEMORY_ATTRIBUTES`) in the documented order.
    pub fn iommufd(
        iommufd: &Arc<Iommufd>,
        vm: Option<KvmVm<Arc<VmFd>>>,
        options: SpaceOptions,
    ) -> Result<Self, SpaceError> {
        let ioas = Ioas::new(iommufd)?;
        let mut cut = CutSupport::NotProbed;
        if options.conversions {
            // Both must happen before anything is mapped (the kernel refuses to turn
            // huge pages off once domains hold mappings).
            if let Err(e) = ioas.set_huge_pages(false).and_then(|_| ioas.set_compat()) {
                cut = CutSupport::Unavailable(format!(
                    "cannot prepare a compat IOAS with huge pages off: {e}"
                ));
            }
        }
        Ok(DmaSpace::with(Iommu::Iommufd { ioas }, vm, options, cut))
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

    fn with(
        iommu: Iommu,
        vm: Option<KvmVm<Arc<VmFd>>>,
        options: SpaceOptions,
        cut: CutSupport,
    ) -> Self {
        DmaSpace {
            iommu,
            vm,
            memory: GuestMemory::new(),
            slots: HashMap::new(),
            cut,
            attached: Vec::new(),
            options,
            totals: Stats::default(),
        }
    }

    /// The backend holding the mappings.
    pub fn backend(&self) -> Backend {
        match &self.iommu {
            Iommu::Iommufd { .. } => Backend::Iommufd,
            Iommu::Mapper(m) => m.backend(),
        }
    }

    /// The IOAS, on the iommufd backend.
    pub fn ioas(&self) -> Option<&Ioas> {
        match &self.iommu {
            Iommu::Iommufd { ioas } => Some(ioas),
            Iommu::Mapper(_) => None,
        }
    }

    /// Whether areas can be cut here (probed at the first attach).
    pub fn cut_support(&self) -> &CutSupport {
        &self.cut
    }

    /// Binds `device` to this space's iommufd (unless [`Device::bind_to`] already did)
    /// and attaches it to the IOAS. The first attach probes, with the device's domain in
    /// place, whether areas can be cut. After a failure, calling it again with the same
    /// device retries.
    ///
    /// [`Device::bind_to`]: crate::vfio::Device::bind_to
    pub fn attach(&mut self, device: &crate::vfio::Device) -> Result<(), SpaceError> {
        let Iommu::Iommufd { ioas } = &self.iommu else {
            return Err(SpaceError::Attach {
                device: device.name().to_string(),
                detail: "this space uses a legacy container: add the device's group to the container instead".into(),
            });
        };
        let attach_err = |detail: String| SpaceError::Attach {
            device: device.name().to_string(),
            detail,
        };
        let node = device
            .node_id()
            .map_err(|e| attach_err(format!("cannot stat the device fd: {e}")))?;
        if self.attached.iter().any(|a| a.node == node) {
            return Err(attach_err("already attached to this DMA space".into()));
        }
        // bind_to binds once per device fd: after a failed attach (the bind stays until
        // the fd closes) calling attach again retries the attach alone.
        device
            .bind_to(ioas.iommufd())
            .map_err(|e| attach_err(e.to_string()))?;
        device
            .attach(ioas.id())
            .map_err(|e| attach_err(e.to_string()))?;
        self.attached.push(Attached {
            node,
            name: device.name().to_string(),
        });
        if self.cut == CutSupport::NotProbed {
            self.cut = probe_cut(ioas);
            log::info!("IOAS {}: area cutting {:?}", ioas.id(), self.cut);
        }
        Ok(())
    }

    /// Detaches `device` (attached with [`DmaSpace::attach`]) from this space: its DMA is
    /// blocked from then on; the space's mappings stay for the other devices. The device
    /// stays bound to the space's iommufd (VFIO has no unbind short of closing the fd).
    ///
    /// Detaching is optional before dropping the space: dropping it empties the IOAS if
    /// a device still uses it, so no page stays pinned and no device reaches guest memory
    /// afterwards, whatever the drop order (see the type's docs).
    pub fn detach(&mut self, device: &crate::vfio::Device) -> Result<(), SpaceError> {
        let err = |detail: String| SpaceError::Attach {
            device: device.name().to_string(),
            detail,
        };
        let node = device
            .node_id()
            .map_err(|e| err(format!("cannot stat the device fd: {e}")))?;
        let Some(i) = self.attached.iter().position(|a| a.node == node) else {
            return Err(err("not attached to this DMA space".into()));
        };
        device.detach().map_err(|e| err(e.to_string()))?;
        self.attached.remove(i);
        Ok(())
    }

    /// Names of the devices attached through [`DmaSpace::attach`], in attach order.
    pub fn attached_devices(&self) -> impl Iterator<Item = &str> {
        self.attached.iter().map(|a| a.name.as_str())
    }

    fn has_device(&self) -> bool {
        // A mapper-backed space (legacy container) has its groups' devices set by the
        // caller before the space exists.
        matches!(self.iommu, Iommu::Mapper(_)) || !self.attached.is_empty()
    }

    /// Adds a region and maps its shared pages; returns its id.
    pub fn add_region(&mut self, region: GuestRegion) -> Result<RegionId, SpaceError> {
        if !self.has_device() {
            return Err(SpaceError::NoDevice);
        }
        let strategy = match region.convertible {
            None => Strategy::Whole,
            Some(_) => self.options.force_strategy.unwrap_or(match self.cut {
                CutSupport::Verified => Strategy::Cut,
                _ => Strategy::PerGranule,
            }),
        };
        let bad = |why: String| SpaceError::BadRegion {
            gpa: region.gpa,
            len: region.len,
            why,
        };
        let (backing, slot) = match region.shared {
            SharedMemory::Address { addr } => (
                Backing::Address(addr),
                Slot {
                    _file: None,
                    _mapping: None,
                    path: MapPath::VirtualAddress {
                        reason: "given by address".into(),
                    },
                },
            ),
            SharedMemory::File { fd, offset } => {
                check_backing_file(&fd, offset, region.len).map_err(bad)?;
                match self.file_path(&fd, offset, region.gpa, region.iova_offset)? {
                    Ok(()) => (
                        Backing::File {
                            fd: fd.as_raw_fd(),
                            offset,
                        },
                        Slot {
                            _file: Some(fd),
                            _mapping: None,
                            path: MapPath::FileOffset,
                        },
                    ),
                    Err(reason) => {
                        let len = usize::try_from(region.len)
                            .map_err(|_| bad("too large to mmap".into()))?;
                        let mapping =
                            MappedMemory::map_shared(fd.as_fd(), offset, len).map_err(|e| {
                                bad(format!(
                                    "mmap of the shared backing for the VA fallback failed: {e}"
                                ))
                            })?;
                        log::info!(
                            "GPA [{:#x}, +{:#x}): mapping by VA: {reason}",
                            region.gpa,
                            region.len
                        );
                        (
                            Backing::Address(mapping.addr()),
                            Slot {
                                _file: Some(fd),
                                _mapping: Some(mapping),
                                path: MapPath::VirtualAddress { reason },
                            },
                        )
                    }
                }
            }
        };
        let mut spec = RegionSpec::new(region.gpa, region.len, backing)
            .iova_offset(region.iova_offset)
            .strategy(strategy)
            .granule(region.granule)
            .initial(region.convertible.unwrap_or(PageState::Shared));
        spec.convertible = region.convertible.is_some();
        let plan = self.memory.plan_register(spec)?;
        let id = plan
            .registered_region()
            .expect("a registration plan names its region");
        // The guest's view must agree before devices see anything: private regions are
        // private in KVM first (their plan maps nothing), and shared ones shared — KVM
        // keeps attributes after a region is removed, so a range added again (or one
        // the VMM converted before) may still be private there while the tracker starts
        // it shared (found by tests/vm_faults.rs, which re-adds its region).
        if let (Some(vm), Some(initial)) = (&self.vm, region.convertible) {
            match initial {
                PageState::Private => vm.set_private(region.gpa, region.len)?,
                PageState::Shared if vm.supports_private() => {
                    vm.set_shared(region.gpa, region.len)?
                }
                PageState::Shared => {}
            }
        }
        log::info!(
            "{id}: GPA [{:#x}, +{:#x}) {:?}, {}",
            region.gpa,
            region.len,
            strategy,
            slot.path
        );
        self.slots.insert(id, slot);
        match self.run(
            plan,
            format!(
                "mapping new region GPA [{:#x}, +{:#x})",
                region.gpa, region.len
            ),
        ) {
            Ok(_) => Ok(id),
            Err(e) => {
                self.slots.remove(&id);
                Err(e)
            }
        }
    }

    /// Unmaps a region and forgets it.
    pub fn remove_region(&mut self, id: RegionId) -> Result<Stats, SpaceError> {
        let plan = self.memory.plan_deregister(id)?;
        let stats = self.run(plan, format!("removing {id}"))?;
        self.slots.remove(&id);
        Ok(stats)
    }

    /// Converts `[gpa, gpa+len)` to `to`. Going private: unmap, then KVM attributes,
    /// then (with `discard`) the shared backing is released. Going shared: attributes,
    /// then map. On failure everything is rolled back and the error says so.
    pub fn convert(
        &mut self,
        gpa: u64,
        len: u64,
        to: PageState,
        discard: bool,
    ) -> Result<Stats, SpaceError> {
        let mut req = ConversionRequest::new(gpa, len, to);
        if discard {
            req = req.discard_shared();
        }
        self.convert_batch(&[req])
    }

    /// Converts many ranges as one plan: all unmaps first, then attributes, then maps.
    pub fn convert_batch(&mut self, requests: &[ConversionRequest]) -> Result<Stats, SpaceError> {
        let plan = self.memory.plan_batch(requests)?;
        let what = match requests {
            [r] => format!("converting GPA [{:#x}, +{:#x}) to {}", r.gpa, r.len, r.to),
            _ => format!("converting a batch of {} ranges", requests.len()),
        };
        self.run(plan, what)
    }

    fn run(&mut self, plan: super::plan::Plan, what: String) -> Result<Stats, SpaceError> {
        let iommu = match &self.iommu {
            Iommu::Iommufd { ioas } => IommuTarget::Ioas {
                ioas,
                cut: self.cut == CutSupport::Verified,
            },
            Iommu::Mapper(m) => IommuTarget::Mapper(m.as_ref()),
        };
        let kvm = match &self.vm {
            Some(vm) => KvmAttributes::new(vm),
            None => KvmAttributes::without_vm(),
        };
        let mut exec = RealExecutor {
            iommu,
            kvm,
            last_error: None,
        };
        let result = self.memory.run(plan, &mut exec);
        let detail = exec.last_error.take();
        match result {
            Ok(stats) => {
                self.totals.accumulate(&stats);
                Ok(stats)
            }
            Err(DmaError::Plan(e)) => Err(e.into()),
            Err(DmaError::Exec(source)) => {
                // A failed cut-unmap can leave an area split in the kernel with nothing
                // unmapped; the IOAS learns such boundaries (Ioas::cut_unmap) and the
                // tracker records area boundaries too, so it takes them from the IOAS.
                if let Iommu::Iommufd { ioas } = &self.iommu {
                    for area in ioas.areas() {
                        self.memory.split_area_at(area.iova);
                    }
                }
                self.totals.accumulate(&source.stats);
                Err(SpaceError::Exec {
                    what,
                    detail,
                    source,
                })
            }
        }
    }

    /// Decides whether `fd` can be mapped by fd+offset here: `Ok(Err(reason))` means by
    /// VA. The answer comes from the kernel, with a device attached: one page is mapped
    /// at the region's own IOVA and unmapped again. `Err` if that page stays mapped.
    fn file_path(
        &self,
        fd: &OwnedFd,
        offset: u64,
        gpa: u64,
        iova_offset: i64,
    ) -> Result<Result<(), String>, SpaceError> {
        let Iommu::Iommufd { ioas } = &self.iommu else {
            return Ok(Err(format!(
                "{} maps by virtual address only",
                self.backend()
            )));
        };
        let iova = gpa.wrapping_add_signed(iova_offset);
        Ok(
            match ioas.map_file(
                Iova::Fixed(iova),
                fd.as_fd(),
                offset,
                PAGE_SIZE,
                Access::READ_WRITE,
            ) {
                Ok(_) => {
                    // The probe page must go: no region owns it, so a device could reach it
                    // unseen and the region's own map would collide with it (EEXIST). A
                    // failed unmap used to fall back to VA with the page left mapped (found
                    // by fail-nth injection, tests/vm_faults.rs); unmap does not allocate,
                    // so a failure is transient: retry once, then give up loudly.
                    if let Err(first) = ioas.unmap(iova, PAGE_SIZE) {
                        log::warn!(
                            "unmapping the MAP_FILE probe page at {iova:#x}: {first}; retrying"
                        );
                        ioas.unmap(iova, PAGE_SIZE)
                            .map_err(|e| SpaceError::BadRegion {
                                gpa,
                                len: PAGE_SIZE,
                                why: format!(
                                "the MAP_FILE probe page at IOVA {iova:#x} could not be unmapped \
                                 ({first}; again: {e}); it is still mapped in IOAS {}: unmap it \
                                 through DmaSpace::ioas() before adding the region again",
                                ioas.id()
                            ),
                            })?;
                    }
                    Ok(())
                }
                Err(iommufd::Error::FileNotPinnable { .. }) => {
                    Err("the kernel cannot pin this file for MAP_FILE".into())
                }
                Err(e) if e.errno() == Some(libc::ENOTTY) => {
                    Err("this kernel has no IOMMU_IOAS_MAP_FILE (before 6.13)".into())
                }
                Err(e) => Err(format!("MAP_FILE refused: {e}")),
            },
        )
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
                    id: r.id.0,
                    gpa: r.gpa_range().start,
                    len: r.gpa_range().end - r.gpa_range().start,
                    iova: iova.start,
                    convertible: r.strategy() != Strategy::Whole,
                    strategy: format!("{:?}", r.strategy()).to_lowercase(),
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
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }
}

/// Checks that `fd` is a kind of file guest memory can live in and covers the region.
fn check_backing_file(fd: &OwnedFd, offset: u64, len: u64) -> Result<(), String> {
    let kind = crate::gmem::fdops::guest_memory_kind(fd.as_fd()).map_err(|what| {
        format!(
            "fd {} is {what}; guest memory must be a memfd, a hugetlb memfd or a guest_memfd \
             created with MMAP|INIT_SHARED",
            fd.as_raw_fd()
        )
    })?;
    // /proc/self/fd/N is a magic link: metadata() stats the open file itself.
    let size = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("cannot stat fd {}: {e}", fd.as_raw_fd()))?
        .len();
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(format!(
            "the {kind} file is {size:#x} bytes but the region needs [{offset:#x}, +{len:#x}) of it; \
             grow the file or fix the offset"
        ));
    }
    Ok(())
}

/// Proves on the running kernel that an area can be cut: three pages mapped as one area
/// at the bottom of the usable IOVA space, the middle one cut out, the two pieces then
/// unmapped natively with exact byte counts.
pub(crate) fn probe_cut(ioas: &Ioas) -> CutSupport {
    let run = || -> Result<(), String> {
        let ranges = ioas.iova_ranges().map_err(|e| e.to_string())?;
        let base = ranges
            .ranges
            .iter()
            .map(|r| (r.start().next_multiple_of(PAGE_SIZE), *r.end()))
            .find(|(s, e)| e.saturating_sub(*s) >= 3 * PAGE_SIZE)
            .map(|(s, _)| s)
            .ok_or("no usable IOVA range of 3 pages")?;
        let scratch =
            Memfd::new("vfio-gmem-cut-probe", 3 * PAGE_SIZE).map_err(|e| e.to_string())?;
        ioas.map_file(
            Iova::Fixed(base),
            scratch.file().as_fd(),
            0,
            3 * PAGE_SIZE,
            Access::READ_WRITE,
        )
        .map_err(|e| format!("probe map failed: {e}"))?;
        let result = (|| {
            let cut = ioas
                .cut_unmap(base + PAGE_SIZE, PAGE_SIZE)
                .map_err(|e| e.to_string())?;
            if cut != PAGE_SIZE {
                return Err(format!(
                    "compat unmap of one page inside an area removed {cut} bytes"
                ));
            }
            for piece in [base, base + 2 * PAGE_SIZE] {
                let n = ioas
                    .unmap(piece, PAGE_SIZE)
                    .map_err(|e| format!("the cut left no separate area: {e}"))?;
                if n != PAGE_SIZE {
                    return Err(format!("a cut piece unmapped {n} bytes, not one page"));
                }
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = ioas.unmap_all();
        }
        result
    };
    match run() {
        Ok(()) => CutSupport::Verified,
        Err(reason) => CutSupport::Unavailable(reason),
    }
}
