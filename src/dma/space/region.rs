//! Regions and conversions: adding and removing guest RAM, converting pages, and running
//! the plans that do it through the kernel executor.

use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};

use super::core::{DmaSpace, Iommu, Slot};
use super::probe::{check_backing_file, probe_map_file, FileProbeError};
use super::types::{CutSupport, GuestRegion, MapPath, SharedMemory, SpaceError};
use crate::dma::executor::kernel::{CutMode, IommuTarget, KernelExecutor, RegionBacking};
use crate::dma::executor::kvm::Kvm;
use crate::dma::plan::model::{Backing, PageState, RegionId, RegionSpec, Strategy};
use crate::dma::plan::ops::{ConversionRequest, Op, Plan, UnmapKind};
use crate::dma::plan::outcome::{DmaError, ExecError, Stats};
use crate::dma::plan::ranges::{fmt_ranges, RangeSet};
use crate::gmem::MappedMemory;
use crate::iommufd::Ioas;

impl DmaSpace {
    /// Adds a region and maps its shared pages; returns its id.
    ///
    /// Everything that can be checked without the kernel (alignment, overlaps with
    /// other regions, the backing file) is checked before any kernel call. A call the
    /// kernel refuses is rolled back: the IOAS is as it was, and so are KVM's memory
    /// attributes of the range as far as this space set them (it remembers the private
    /// pages of regions it removed; attributes the VMM set on the VM fd itself are not
    /// known to it), or the error says exactly what it left. A hugetlbfs file whose pool
    /// runs out of free pages while the region is mapped gets
    /// [`GmemError::NoHugePages`] naming the pool (as does a conversion back to shared
    /// that needs a huge page again).
    pub fn add_region(&mut self, region: GuestRegion) -> Result<RegionId, SpaceError> {
        if !self.has_device() {
            return Err(SpaceError::NoDevice);
        }
        let strategy = match region.convertible {
            None => Strategy::Whole,
            Some(_) => self
                .options
                .force_strategy
                .unwrap_or(if self.cut.can_cut() {
                    Strategy::Cut
                } else {
                    Strategy::PerGranule
                }),
        };
        // The plan names the region; the kernel executor finds its memory in the slot.
        let mut spec = RegionSpec::new(region.gpa, region.len, Backing::Opaque(0))
            .iova_offset(region.iova_offset)
            .strategy(strategy)
            .granule(region.granule)
            .initial(region.convertible.unwrap_or(PageState::Shared));
        spec.convertible = region.convertible.is_some();
        // Refuse overlaps and bad geometry before the kernel sees anything (the MAP_FILE
        // probe below maps a page of the new file).
        self.memory.validate_register(&spec)?;
        let bad = |why: String| SpaceError::BadRegion {
            gpa: region.gpa,
            len: region.len,
            why,
        };
        let slot = match region.shared {
            SharedMemory::Address { addr } => Slot {
                backing: RegionBacking::User(addr.get()),
                path: MapPath::VirtualAddress {
                    reason: "given by address".into(),
                },
            },
            SharedMemory::File { fd, offset } => {
                check_backing_file(&fd, offset, region.len).map_err(bad)?;
                match self.file_path(&fd, offset, &spec)? {
                    Ok(()) => Slot {
                        backing: RegionBacking::File { file: fd, offset },
                        path: MapPath::FileOffset,
                    },
                    Err(reason) => {
                        let len = usize::try_from(region.len)
                            .map_err(|_| bad("too large to mmap".into()))?;
                        let mapping =
                            MappedMemory::map_shared(fd.as_fd(), offset, len).map_err(|e| {
                                va_fallback_error(&fd, (region.gpa, region.len), &reason, e)
                            })?;
                        log::info!(
                            "GPA [{:#x}, +{:#x}): mapping by VA: {reason}",
                            region.gpa,
                            region.len
                        );
                        Slot {
                            backing: RegionBacking::Mapping { _file: fd, mapping },
                            path: MapPath::VirtualAddress { reason },
                        }
                    }
                }
            }
        };
        let plan = self.memory.plan_register(spec)?;
        let id = plan
            .registered_region()
            .expect("a registration plan names its region");
        let gpa = region.gpa..region.gpa + region.len;
        let undo = self.seed_attributes(gpa.clone(), region.convertible)?;
        log::info!(
            "{id}: GPA [{:#x}, +{:#x}) {:?}, {}",
            region.gpa,
            region.len,
            strategy,
            slot.path
        );
        self.slots.insert(id, slot);
        match self.run(plan, || {
            format!(
                "mapping new region GPA [{:#x}, +{:#x})",
                region.gpa, region.len
            )
        }) {
            Ok(_) => {
                // The region's tracker knows its pages' attributes from now on.
                self.kvm_residue.remove(gpa);
                Ok(id)
            }
            Err(e) => {
                self.slots.remove(&id);
                let e = super::hugetlb::whole_region_needed(e, region.len);
                Err(self.restore_attributes(undo, e))
            }
        }
    }

    /// Brings KVM's attributes of a new convertible region to its initial state before
    /// devices see anything: private regions are private in KVM first (their plan maps
    /// nothing), and shared ones shared, since KVM keeps attributes after a region is
    /// removed (found by tests/vm_faults.rs, which re-adds its region). Returns what to
    /// set back if the registration fails: the ranges that were in the other state.
    ///
    /// The one documented exception to "every kernel call is a plan op": the seeding is
    /// not in the registration plan because its undo is not the op's inverse (it depends
    /// on what KVM held before, which only the space's residue knows). It still takes
    /// the executor's route to KVM ([`Kvm::set_state`]), before the plan runs.
    fn seed_attributes(
        &self,
        gpa: Range<u64>,
        initial: Option<PageState>,
    ) -> Result<Option<AttributeUndo>, SpaceError> {
        let (Some(vm), Some(initial)) = (&self.vm, initial) else {
            return Ok(None);
        };
        let kvm = Kvm::new(Some(vm));
        let len = gpa.end - gpa.start;
        Ok(match initial {
            PageState::Private => {
                kvm.set_state(gpa.start, len, PageState::Private)?;
                // As far as this space knows, only its residue was private before.
                Some(AttributeUndo {
                    to: PageState::Shared,
                    ranges: self.kvm_residue.gaps(gpa),
                })
            }
            PageState::Shared if vm.supports_private() => {
                kvm.set_state(gpa.start, len, PageState::Shared)?;
                Some(AttributeUndo {
                    to: PageState::Private,
                    ranges: self.kvm_residue.clipped(gpa).collect(),
                })
            }
            PageState::Shared => None,
        })
    }

    /// Puts back the attributes [`seed_attributes`](Self::seed_attributes) changed, after
    /// the registration failed with `err`.
    fn restore_attributes(&self, undo: Option<AttributeUndo>, err: SpaceError) -> SpaceError {
        let (Some(undo), Some(vm)) = (undo, &self.vm) else {
            return err;
        };
        let kvm = Kvm::new(Some(vm));
        for r in &undo.ranges {
            if let Err(restore) = kvm.set_state(r.start, r.end - r.start, undo.to) {
                return SpaceError::AttributesNotRestored {
                    source: Box::new(err),
                    ranges: fmt_ranges(undo.ranges.iter().cloned()),
                    state: undo.to,
                    now: undo.to.flip(),
                    restore,
                };
            }
        }
        err
    }

    /// Every IOVA range a region owns (mapped or not), and `new`'s: where probes must not
    /// map.
    pub(super) fn owned_iovas(&self, new: Option<&RegionSpec>) -> RangeSet {
        let mut owned: RangeSet = self.memory.regions().map(|r| r.iova_range()).collect();
        if let Some((iova, spec)) = new.and_then(|s| Some((s.iova()?, s))) {
            owned.insert(iova..iova.saturating_add(spec.len));
        }
        owned
    }

    /// Decides whether `fd` can be mapped by fd+offset here: `Ok(Err(reason))` means by
    /// VA. The kernel answers, with a device attached (see [`probe_map_file`]).
    fn file_path(
        &self,
        fd: &OwnedFd,
        offset: u64,
        spec: &RegionSpec,
    ) -> Result<Result<(), String>, SpaceError> {
        let Iommu::Iommufd { ioas } = &self.iommu else {
            return Ok(Err(format!(
                "{} maps by virtual address only",
                self.backend()
            )));
        };
        probe_map_file(ioas, fd, offset, &self.owned_iovas(Some(spec))).map_err(|e| {
            let why = match e {
                FileProbeError::Private(why) => why,
                FileProbeError::NoScratch(why) => format!(
                    "cannot probe whether the kernel maps this file by fd+offset: {why}; \
                     nothing was changed"
                ),
                FileProbeError::Stuck { iova, why } => format!(
                    "the MAP_FILE probe page at IOVA {iova:#x} could not be unmapped ({why}); \
                     it is still mapped in IOAS {}: unmap it through DmaSpace::ioas() before \
                     adding the region again",
                    ioas.id()
                ),
            };
            SpaceError::BadRegion {
                gpa: spec.gpa,
                len: spec.len,
                why,
            }
        })
    }

    /// Unmaps a region and forgets it. KVM keeps the attributes of its pages; the space
    /// remembers which it made private, for a region added there later.
    pub fn remove_region(&mut self, id: RegionId) -> Result<Stats, SpaceError> {
        let plan = self.memory.plan_deregister(id)?;
        let private: Vec<Range<u64>> = match (&self.vm, self.memory.region(id)) {
            (Some(vm), Some(r)) if vm.supports_private() => {
                r.runs(r.gpa_range(), PageState::Private).collect()
            }
            _ => Vec::new(),
        };
        let stats = self.run(plan, || format!("removing {id}"))?;
        self.slots.remove(&id);
        for r in private {
            self.kvm_residue.insert(r);
        }
        Ok(stats)
    }

    /// Converts `[gpa, gpa+len)` to `to`. Going private: unmap, then KVM attributes,
    /// then (with `discard`) the shared backing is released. Going shared: attributes,
    /// then map. On failure everything is rolled back and the error says so.
    #[inline]
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
        if !self.listeners.is_empty() {
            return self.convert_with_listeners(requests);
        }
        // The plan stays where the planner wrote it (no moves on the hot path).
        let mut planned = self.memory.plan_batch_with(requests, &mut self.buffers);
        let plan = match &mut planned {
            Ok(plan) => plan,
            Err(_) => {
                let Err(e) = planned else {
                    unreachable!("matched as an error")
                };
                return Err(e.into());
            }
        };
        // The error's context is written only if there is an error.
        self.run_in_place(plan, || match requests {
            [r] => format!("converting GPA [{:#x}, +{:#x}) to {}", r.gpa, r.len, r.to),
            _ => format!("converting a batch of {} ranges", requests.len()),
        })
    }

    /// Runs `plan` and records it; `what` describes it in the error, if one is returned.
    pub(super) fn run(
        &mut self,
        plan: Plan,
        what: impl FnOnce() -> String,
    ) -> Result<Stats, SpaceError> {
        let mut plan = plan;
        self.run_in_place(&mut plan, what)
    }

    /// [`run`](Self::run) of a plan the caller keeps (its op list goes back to the
    /// space's buffers).
    fn run_in_place(
        &mut self,
        plan: &mut Plan,
        what: impl FnOnce() -> String,
    ) -> Result<Stats, SpaceError> {
        let iommu = match &mut self.iommu {
            Iommu::Iommufd { ioas } => IommuTarget::Ioas {
                ioas: &*ioas,
                cut: match self.cut {
                    CutSupport::Verified => CutMode::Compat,
                    CutSupport::NativeSplit { .. } => CutMode::Split,
                    _ => CutMode::None,
                },
            },
            Iommu::Legacy { container, .. } => IommuTarget::Mapper(&*container),
            Iommu::Mapper(m) => IommuTarget::Mapper(&**m),
            #[cfg(feature = "testing")]
            Iommu::Executor(exec) => {
                let result = self
                    .memory
                    .run_recycling(plan, exec.as_mut(), &mut self.buffers);
                return self.record(result, what);
            }
        };
        let slots = &self.slots;
        let backings = |id| slots.get(&id).map(|s: &Slot| &s.backing);
        let mut exec = KernelExecutor::new(iommu, Kvm::new(self.vm.as_ref()), &backings);
        let result = self
            .memory
            .run_recycling(plan, &mut exec, &mut self.buffers);
        self.record(result, what)
    }

    /// Counts what a plan run did and turns its failure into the space's error.
    #[inline]
    fn record(
        &mut self,
        result: Result<Stats, DmaError>,
        what: impl FnOnce() -> String,
    ) -> Result<Stats, SpaceError> {
        match result {
            Ok(stats) => {
                self.totals.accumulate(&stats);
                Ok(stats)
            }
            Err(e) => Err(self.record_failure(e, what)),
        }
    }

    /// The failing half of [`record`](Self::record); `what` names the run.
    #[cold]
    #[inline(never)]
    fn record_failure(&mut self, e: DmaError, what: impl FnOnce() -> String) -> SpaceError {
        match e {
            DmaError::Plan(e) => e.into(),
            DmaError::Exec(source) => {
                self.notice_lost_compat(&source);
                // A failed cut-unmap can leave an area split in the kernel with nothing
                // unmapped; the IOAS learns such boundaries (Ioas::cut_unmap) and the
                // tracker records area boundaries too, so it takes them from the IOAS's
                // own record (no kernel call).
                if let Iommu::Iommufd { ioas } = &self.iommu {
                    for area in ioas.areas() {
                        self.memory.split_area_at(area.iova);
                    }
                }
                self.totals.accumulate(&source.stats);
                self.exec_error(what(), source)
            }
        }
    }

    /// A cut that failed with ENODEV found this IOAS no longer the compat IOAS: something
    /// outside this space set another one on the same iommufd (e.g. `Ioas::set_compat`).
    /// From then on [`cut_support`](Self::cut_support) says so instead of `Verified`.
    fn notice_lost_compat(&mut self, err: &ExecError) {
        let cut_failed = matches!(&err.op, Op::Unmap(u) if u.kind == UnmapKind::Cut);
        if cut_failed && err.error.errno == libc::ENODEV && self.cut == CutSupport::Verified {
            let ioas = self.ioas().map(Ioas::id).unwrap_or_default();
            self.cut = CutSupport::Unavailable(format!(
                "IOAS {ioas} stopped being its iommufd's VFIO-compat IOAS (something else on \
                 the same iommufd took the designation), so areas cannot be cut any more; \
                 convertible regions added from now on use per-granule areas, and regions \
                 that cut cannot convert: remove and add them again"
            ));
            log::warn!("{:?}", self.cut);
        }
    }
}

/// Why the VA fallback's `mmap` of `fd`, the shared backing of region `[gpa, +len)`,
/// failed (the kernel did not map it by fd+offset: `reason`). A hugetlbfs file answers `ENOMEM` when its pool
/// lacks free pages (MAP_FILE, which pins the same pages, was refused first): then the
/// error is [`GmemError::NoHugePages`](crate::gmem::GmemError::NoHugePages) for the
/// file's own page size, naming its pool.
fn va_fallback_error(
    fd: &OwnedFd,
    (gpa, len): (u64, u64),
    reason: &str,
    e: std::io::Error,
) -> SpaceError {
    use std::os::fd::AsRawFd;
    let page = crate::gmem::fdops::backing_page_size(fd.as_fd()).unwrap_or(0);
    if page > crate::dma::plan::model::PAGE_SIZE && e.raw_os_error() == Some(libc::ENOMEM) {
        return SpaceError::Gmem(crate::gmem::GmemError::NoHugePages {
            what: format!(
                "the shared backing (fd {}) of region [{:#x}, +{:#x}) (nothing was changed)",
                fd.as_raw_fd(),
                gpa,
                len
            ),
            page_size: page,
            pages: len.div_ceil(page),
            nr_hugepages: crate::gmem::fdops::nr_hugepages(page),
            source: e,
        });
    }
    SpaceError::BadRegion {
        gpa,
        len,
        why: format!(
            "mmap of the shared backing for the VA fallback failed: {e} (it was not mapped by \
             fd+offset: {reason}); nothing was changed"
        ),
    }
}

/// Attribute changes to undo if a registration fails.
struct AttributeUndo {
    to: PageState,
    ranges: Vec<Range<u64>>,
}
