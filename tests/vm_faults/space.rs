//! Fault sweeps of the DMA space: attach (with its cut probe), region add, conversions.

use super::*;

// The DMA space: attach (with its cut probe), region add, conversions.

/// `DmaSpace::attach` of a bound device: attaches it, probes area cutting. After a
/// failure the same device attaches on a second call; afterwards the IOAS holds nothing
/// (the probe cleaned up) and a region added to the space is reachable by DMA.
pub(crate) fn space_attach() -> Result<(), Failed> {
    let (_fi, nth) = injection()?;
    let mem = Memfd::new("vm-faults-attach", 4 * PAGE).or_fail("memfd")?;
    let mut view = mem.mmap().or_fail("mmap")?;
    let mut degraded = 0;
    let report = sweep(&nth, "space attach", CAP, |inj: &Injector| {
        let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
        let mut space =
            DmaSpace::iommufd(&iommufd, None, SpaceOptions::default()).or_fail("space")?;
        let dev = open_device()?;
        // The bind (the device's first open: pci_enable_device) stays outside the sweep:
        // on 7.3 an injected failure in its ACPI _PRT evaluation corrupts ACPICA
        // reference counts ("Could not update object reference count") and the kernel
        // oopses in acpi_ut_update_object_reference when the fd closes.
        dev.bind_to(&iommufd).or_fail("bind")?;
        let r = inj.call(|| space.attach(&dev))?;
        if r.is_err() {
            ctx(
                space.attach(&dev).or_fail("attach again"),
                "after a failed attach",
            )?;
        }
        let ioas = space.ioas().ok_or("iommufd space without IOAS")?;
        let kernel = KernelAreas::new(iommufd.as_fd(), ioas.id()).or_fail("scratch")?;
        check!(
            ioas.areas().is_empty(),
            "areas after attach: {}",
            show(&spans(ioas))
        );
        kernel
            .check(&[], probe_window(ioas)?)
            .map_err(|e| format!("the cut probe left something mapped: {e}"))?;
        let left = raw_unmap_all(iommufd.as_fd(), ioas.id()).or_fail("unmap all")?;
        check!(left == 0, "the IOAS held {left:#x} bytes after attach");
        if let Some(w) = inj.kernel_warning() {
            // Inside the cut probe (its scratch memfd is not observable from here); this
            // space is dropped with its domain.
            inj.note(format!("{} — during the cut probe", warning_site(&w)));
            return Ok(called(&r));
        }
        match space.cut_support() {
            CutSupport::Verified | CutSupport::NativeSplit { .. } => {}
            CutSupport::Unavailable(why) if !inj.injected() => {
                return Err(format!("cut probe failed without an injected fault: {why}").into())
            }
            CutSupport::Unavailable(why) => {
                // An injected failure inside the probe: the space falls back to
                // per-granule areas, which is safe; say so.
                degraded += 1;
                if degraded == 1 {
                    eprintln!("  cut probe failed under injection (fallback): {why}");
                }
            }
            CutSupport::NotProbed => return Err("attached but not probed".into()),
        }
        space
            .add_region(
                GuestRegion::new(
                    GPA,
                    4 * PAGE,
                    SharedMemory::File {
                        fd: dup(mem.file())?,
                        offset: 0,
                    },
                )
                .convertible(PageState::Shared),
            )
            .or_fail("add a region after the attach")?;
        let edu = Edu::new(dev).or_fail("edu")?;
        check_reach(&edu, &mut view, &[1], |_| true, true)?;
        Ok(called(&r))
    })?;
    eprintln!("space attach: {degraded} injected failures left the space without area cutting");
    record(report);
    Ok(())
}

/// The x86 MSI window, reserved for every device behind intel-iommu and virtio-iommu.
pub(crate) const MSI_WINDOW: u64 = 0xfee0_0000;

/// `DmaSpace::attach` fails after its bind (an area sits in the device's reserved MSI
/// window); once the area is gone the same device attaches on a second call. The bind
/// cannot be repeated on the same fd (EINVAL), so the second call must not bind again.
pub(crate) fn space_attach_again_after_a_failed_attach() -> Result<(), Failed> {
    let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
    let mut space = DmaSpace::iommufd(&iommufd, None, SpaceOptions::default()).or_fail("space")?;
    let dev = open_device()?;
    let mem = Memfd::new("vm-faults-retry", 4 * PAGE).or_fail("memfd")?;
    let mut view = mem.mmap().or_fail("mmap")?;
    let ioas = space.ioas().ok_or("no IOAS")?;
    ioas.map_file(
        Iova::Fixed(MSI_WINDOW),
        mem.file().as_fd(),
        0,
        PAGE,
        Access::READ_WRITE,
    )
    .or_fail("obstacle in the MSI window")?;
    let e = match space.attach(&dev) {
        Ok(()) => return Err("attach must fail while the MSI window is mapped".into()),
        Err(e) => e.to_string(),
    };
    eprintln!("first attach: {e}");
    let ioas = space.ioas().ok_or("no IOAS")?;
    ioas.unmap(MSI_WINDOW, PAGE)
        .or_fail("remove the obstacle")?;
    space
        .attach(&dev)
        .or_fail("attach again with the same device")?;
    let ioas = space.ioas().ok_or("no IOAS")?;
    let ranges = ioas.iova_ranges().or_fail("IOVA ranges")?;
    check!(
        !ranges.ranges.iter().any(|r| r.contains(&MSI_WINDOW)),
        "the MSI window should be reserved once the device is attached: {:x?}",
        ranges.ranges
    );
    space
        .add_region(
            GuestRegion::new(
                GPA,
                4 * PAGE,
                SharedMemory::File {
                    fd: dup(mem.file())?,
                    offset: 0,
                },
            )
            .convertible(PageState::Shared),
        )
        .or_fail("add a region")?;
    let edu = Edu::new(dev).or_fail("edu")?;
    check_reach(&edu, &mut view, &[2], |_| true, true)?;
    Ok(())
}

/// A SW_PROTECTED VM, an 8-page memfd region at `GPA` (convertible, initially shared)
/// in a space with the edu device attached, and the independent views of the kernel.
pub(crate) struct SpaceFx {
    attrs: Option<AttributeProbe>,
    edu: Edu,
    kernel: KernelAreas,
    space: DmaSpace,
    region: Option<RegionId>,
    view: MappedMemory,
    shared: Memfd,
    _vm: Arc<VmFd>,
    probe_window: Range<u64>,
}

impl SpaceFx {
    fn new(strategy: Strategy) -> Result<SpaceFx, Failed> {
        let vm = KvmVm::create(VmType::SwProtected).or_fail("create VM")?;
        let vm = Arc::new(vm.into_inner());
        let shared = Memfd::new("vm-faults-shared", LEN).or_fail("memfd")?;
        let view = shared.mmap().or_fail("mmap")?;
        // SAFETY: `view` maps LEN bytes read-write and outlives the probe (field order:
        // the probe drops first); nothing runs the vCPU.
        let attrs = match unsafe { AttributeProbe::new(&vm, 0, GPA, LEN, view.addr()) } {
            Ok(p) => Some(p),
            Err(why) => {
                eprintln!("KVM attributes not checked: {why}");
                None
            }
        };
        let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
        let options = SpaceOptions {
            force_strategy: Some(strategy),
            ..Default::default()
        };
        let kvm = KvmVm::from_vm_fd(vm.clone(), Some(VmType::SwProtected));
        let mut space = DmaSpace::iommufd(&iommufd, Some(kvm), options).or_fail("space")?;
        let dev = open_device()?;
        space.attach(&dev).or_fail("attach")?;
        // The compat cut on the plain kernel, the native split on the patched one: the
        // sweep covers whichever this kernel's spaces use.
        check!(
            matches!(
                space.cut_support(),
                CutSupport::Verified | CutSupport::NativeSplit { .. }
            ),
            "cut probe: {:?}",
            space.cut_support()
        );
        let edu = Edu::new(dev).or_fail("edu")?;
        let ioas = space.ioas().ok_or("no IOAS")?;
        let kernel = KernelAreas::new(iommufd.as_fd(), ioas.id()).or_fail("scratch IOAS")?;
        let probe_window = probe_window(ioas)?;
        let mut fx = SpaceFx {
            attrs,
            edu,
            kernel,
            space,
            region: None,
            view,
            shared,
            _vm: vm,
            probe_window,
        };
        fx.add_region().or_fail("add region")?;
        fx.verify("setup")?;
        Ok(fx)
    }

    /// Pages KVM holds private, read from KVM itself; `None` without the attribute probe.
    fn kvm_private_pages(&self) -> Result<Option<Vec<u64>>, Failed> {
        let Some(attrs) = &self.attrs else {
            return Ok(None);
        };
        let mut private = Vec::new();
        for p in 0..PAGES {
            if attrs
                .is_private(GPA + p * PAGE)
                .or_fail("read KVM attribute")?
            {
                private.push(p);
            }
        }
        Ok(Some(private))
    }

    fn add_region(&mut self) -> Result<RegionId, SpaceError> {
        let fd = self
            .shared
            .file()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| SpaceError::BadRegion {
                gpa: GPA,
                len: LEN,
                why: format!("dup: {e}"),
            })?;
        let id = self.space.add_region(
            GuestRegion::new(GPA, LEN, SharedMemory::File { fd, offset: 0 })
                .convertible(PageState::Shared),
        )?;
        self.region = Some(id);
        Ok(id)
    }

    /// Removes the region; the kernel must then hold nothing at all in the IOAS.
    fn remove_region(&mut self) -> Result<(), Failed> {
        if let Some(id) = self.region.take() {
            self.space.remove_region(id).or_fail("remove region")?;
        }
        let ioas = self.space.ioas().ok_or("no IOAS")?;
        check!(
            ioas.areas().is_empty() && self.space.area_count() == 0,
            "areas recorded after removing the region: {}",
            show(&spans(ioas))
        );
        let left = raw_unmap_all(ioas.iommufd().as_fd(), ioas.id()).or_fail("unmap all")?;
        check!(
            left == 0,
            "the kernel still mapped {left:#x} bytes after the region was removed"
        );
        Ok(())
    }

    /// Fresh region (one area, or one per granule, all shared), then `private` ranges
    /// (page indices) converted.
    fn reset(&mut self, private: &[(u64, u64)]) -> Result<(), Failed> {
        self.remove_region()?;
        self.add_region().or_fail("add region")?;
        for &(first, end) in private {
            self.convert(first..end, PageState::Private, false)
                .or_fail("starting state")?;
        }
        self.verify("starting state")
    }

    fn convert(
        &mut self,
        pages: Range<u64>,
        to: PageState,
        discard: bool,
    ) -> Result<vfio_gmem::dma::Stats, SpaceError> {
        let (gpa, len) = (GPA + pages.start * PAGE, (pages.end - pages.start) * PAGE);
        self.space.convert(gpa, len, to, discard)
    }

    /// The space's records against each other and against the kernel.
    fn verify(&self, when: &str) -> Result<(), Failed> {
        let fail = |what: String| Failed::from(format!("{when}: {what}"));
        let ioas = self.space.ioas().ok_or("no IOAS")?;
        let lib = spans(ioas);
        let mem: Vec<(u64, u64)> = self
            .space
            .memory()
            .areas()
            .map(|a| (a.iova, a.len))
            .collect();
        if lib != mem {
            return Err(fail(format!(
                "Ioas::areas() = {} but the space's tracker has {}",
                show(&lib),
                show(&mem)
            )));
        }
        self.kernel
            .check(&lib, GPA - 2 * PAGE..GPA + LEN + 2 * PAGE)
            .map_err(|e| {
                fail(format!(
                    "records {} disagree with the kernel: {e}",
                    show(&lib)
                ))
            })?;
        if !self.probe_window.contains(&(GPA - 2 * PAGE)) {
            self.kernel
                .check(&[], self.probe_window.clone())
                .map_err(|e| fail(format!("cut-probe window: {e}")))?;
        }
        let reports = self.space.regions();
        let areas_reported: usize = reports.iter().map(|r| r.areas).sum();
        if areas_reported != self.space.area_count() || self.space.area_count() != lib.len() {
            return Err(fail(format!(
                "region reports count {areas_reported} areas, area_count() {}, the IOAS {}",
                self.space.area_count(),
                lib.len()
            )));
        }
        let Some(_) = self.region else {
            return if reports.is_empty() {
                Ok(())
            } else {
                Err(fail(format!(
                    "regions reported without a region: {reports:?}"
                )))
            };
        };
        if reports.len() != 1 {
            return Err(fail(format!("one region expected: {reports:?}")));
        }
        let mut shared = 0;
        for p in 0..PAGES {
            let (gpa, iova) = (GPA + p * PAGE, GPA + p * PAGE);
            let state = self
                .space
                .page_state(gpa)
                .ok_or_else(|| fail(format!("page {p} in no region")))?;
            let mapped = lib.iter().any(|&(i, l)| (i..i + l).contains(&iova));
            if mapped != (state == PageState::Shared) {
                return Err(fail(format!(
                    "page {p} is {state} but {} in the IOMMU",
                    if mapped { "mapped" } else { "not mapped" }
                )));
            }
            if let Some(attrs) = &self.attrs {
                let private = attrs.is_private(gpa).or_fail("read KVM attribute")?;
                if private != (state == PageState::Private) {
                    return Err(fail(format!(
                        "page {p} is {state} in the tracker but {} in KVM",
                        if private { "private" } else { "shared" }
                    )));
                }
            }
            if state == PageState::Shared {
                shared += PAGE;
            }
        }
        if reports[0].shared_bytes != shared || reports[0].private_bytes != LEN - shared {
            return Err(fail(format!(
                "region report {:?} but {shared:#x} bytes are shared",
                reports[0]
            )));
        }
        Ok(())
    }

    /// After a kernel WARN: notes what the device reaches (the caller starts over).
    fn after_warning(&mut self, inj: &Injector, warning: &str) -> Result<(), Failed> {
        let shared: Vec<bool> = (0..PAGES)
            .map(|p| self.space.page_state(GPA + p * PAGE) == Some(PageState::Shared))
            .collect();
        let all: Vec<u64> = (0..PAGES).collect();
        let seen = observe(&self.edu, &mut self.view, &all, |p| shared[p as usize])?;
        inj.note(format!("{} — then {seen}", warning_site(warning)));
        Ok(())
    }

    /// DMA reaches page `p` iff the tracker says it is shared.
    fn sample(&mut self, pages: &[u64]) -> Result<(), Failed> {
        let shared: Vec<bool> = (0..PAGES)
            .map(|p| self.space.page_state(GPA + p * PAGE) == Some(PageState::Shared))
            .collect();
        check_reach(
            &self.edu,
            &mut self.view,
            pages,
            |p| shared[p as usize],
            true,
        )
        .map(drop)
    }
}

/// A failed space call must say the range is in its previous state (one injected fault
/// cannot also break the rollback) or, for discards, what was not discarded.
pub(crate) fn check_outcome<T>(r: &Result<T, SpaceError>) -> Result<(), Failed> {
    if let Err(SpaceError::Exec { source, .. }) = r {
        check!(
            matches!(
                source.outcome,
                Outcome::RolledBack | Outcome::NotDiscarded { .. }
            ),
            "unexpected outcome after one injected fault: {:?}",
            source.outcome
        );
    }
    Ok(())
}

pub(crate) fn err_text<T>(r: &Result<T, SpaceError>) -> String {
    match r {
        Ok(_) => "succeeded".into(),
        Err(e) => e.to_string(),
    }
}

pub(crate) fn sweep_region_add(name: &str, strategy: Strategy) -> Result<(), Failed> {
    let (_fi, nth) = injection()?;
    let mut fx = Fixture::new(move || SpaceFx::new(strategy))?;
    let mut by_va = 0;
    let report = sweep(&nth, name, CAP, |inj: &Injector| {
        // From the second round on the region had pages 2 and 3 private when removed:
        // KVM keeps them, and a failed add must leave them so.
        fx.remove_region()?;
        fx.verify("without the region")?;
        let kvm_before = fx.kvm_private_pages()?;
        let r = inj.call(|| fx.add_region())?;
        check_outcome(&r)?;
        if r.is_err() {
            fx.region = None;
            let now = fx.kvm_private_pages()?;
            check!(
                now == kvm_before,
                "a failed region add changed KVM's attributes: private pages {kvm_before:?} \
                 before, {now:?} after ({})",
                err_text(&r)
            );
        }
        fx.verify("after the injected region add")?;
        if let Some(w) = inj.kernel_warning() {
            fx.after_warning(inj, &w)?;
            fx.rebuild()?;
            return Ok(called(&r));
        }
        let path = r.is_ok().then(|| fx.space.regions()[0].path.clone());
        if let Some(MapPath::VirtualAddress { reason }) = path {
            // The fd+offset probe failed: the space maps the memfd by VA instead, which
            // is as safe; without an injected fault it must not happen.
            check!(
                inj.injected(),
                "memfd mapped by VA without an injected fault: {reason}"
            );
            by_va += 1;
            if by_va == 1 {
                eprintln!("  MAP_FILE probe failed under injection, mapped by VA: {reason}");
            }
        }
        fx.sample(&[0, 7])?;
        if r.is_err() {
            ctx(fx.add_region().or_fail("add again"), "after a failed add")?;
            fx.verify("after adding again")?;
        }
        fx.convert(2..4, PageState::Private, false)
            .or_fail("convert after the add")?;
        fx.verify("after converting")?;
        Ok(called(&r))
    })?;
    fx.remove_region()?;
    eprintln!("{name}: {by_va} injected failures made the region map by VA");
    record(report);
    Ok(())
}

pub(crate) fn region_add_cut() -> Result<(), Failed> {
    sweep_region_add("region add (cut)", Strategy::Cut)
}

pub(crate) fn region_add_per_granule() -> Result<(), Failed> {
    sweep_region_add("region add (per-granule)", Strategy::PerGranule)
}

/// One conversion swept: `private` pages before, then `pages` converted `to`.
pub(crate) struct Conversion {
    name: &'static str,
    strategy: Strategy,
    /// Page ranges `(first, end)` made private first.
    private: &'static [(u64, u64)],
    pages: Range<u64>,
    to: PageState,
    discard: bool,
    sample: &'static [u64],
}

pub(crate) fn sweep_conversion(c: Conversion) -> Result<(), Failed> {
    let (_fi, nth) = injection()?;
    let strategy = c.strategy;
    let mut fx = Fixture::new(move || SpaceFx::new(strategy))?;
    let report = sweep(&nth, c.name, CAP, |inj: &Injector| {
        fx.reset(c.private)?;
        let r = inj.call(|| fx.convert(c.pages.clone(), c.to, c.discard))?;
        check_outcome(&r)?;
        fx.verify("after the injected conversion")?;
        if let Some(w) = inj.kernel_warning() {
            fx.after_warning(inj, &w)?;
            fx.rebuild()?;
            return Ok(called(&r));
        }
        fx.sample(c.sample)?;
        // Not poisoned: the conversion (again), then back.
        if r.is_err() {
            ctx(
                fx.convert(c.pages.clone(), c.to, false)
                    .or_fail("convert again"),
                "after a failed conversion",
            )?;
            fx.verify("after converting again")?;
        }
        for p in c.pages.clone() {
            check!(
                fx.space.page_state(GPA + p * PAGE) == Some(c.to),
                "page {p} not {} after the conversion",
                c.to
            );
        }
        fx.convert(c.pages.clone(), c.to.flip(), false)
            .or_fail("convert back")?;
        fx.verify("after converting back")?;
        Ok(called(&r))
    })?;
    fx.remove_region()?;
    record(report);
    Ok(())
}

/// Two pages cut out of the middle of the region's one area: the kernel splits it
/// twice; then KVM allocates attribute storage (nothing else in the VM is private).
pub(crate) fn to_private_cut() -> Result<(), Failed> {
    sweep_conversion(Conversion {
        name: "to private (cut)",
        strategy: Strategy::Cut,
        private: &[],
        pages: 2..4,
        to: PageState::Private,
        discard: false,
        sample: &[1, 2, 4],
    })
}

/// Two private runs become shared: two maps, the second failing undoes the first.
pub(crate) fn to_shared_cut() -> Result<(), Failed> {
    sweep_conversion(Conversion {
        name: "to shared (cut)",
        strategy: Strategy::Cut,
        private: &[(1, 3), (4, 6)],
        pages: 1..6,
        to: PageState::Shared,
        discard: false,
        sample: &[0, 1, 4],
    })
}

/// Four granules (one already private) become private, their shared copy discarded.
pub(crate) fn to_private_per_granule() -> Result<(), Failed> {
    sweep_conversion(Conversion {
        name: "to private (per-granule)",
        strategy: Strategy::PerGranule,
        private: &[(3, 4)],
        pages: 2..6,
        to: PageState::Private,
        discard: true,
        sample: &[1, 2, 6],
    })
}

/// Four granules become shared: four maps.
pub(crate) fn to_shared_per_granule() -> Result<(), Failed> {
    sweep_conversion(Conversion {
        name: "to shared (per-granule)",
        strategy: Strategy::PerGranule,
        private: &[(2, 6)],
        pages: 2..6,
        to: PageState::Shared,
        discard: false,
        sample: &[1, 5, 6],
    })
}
