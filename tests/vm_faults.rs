//! Kernel fault injection (VM). Each operation is swept the way the kernel's
//! tools/testing/selftests/iommu/iommufd_fail_nth.c sweeps iommufd: with fail-nth = 1,
//! 2, 3, … the N-th allocation the kernel attempts for this thread fails, until the
//! operation runs without reaching an N-th. After every injected failure:
//! - the operation returned an error, or succeeded because the failure was absorbed;
//! - the library's records (`Ioas::areas()`, the DMA space's areas, page states and
//!   region reports) equal the kernel's: IOMMU areas checked on raw ioctls on a scratch
//!   copy of the IOAS (support/kernel_areas.rs), KVM attributes read back with
//!   KVM_PRE_FAULT_MEMORY (support/kvm_attrs.rs);
//! - the edu device reaches exactly the pages the records call mapped/shared;
//! - the next operations work (the failed one again, then the way back).
//!
//! Two kernel bugs shape the sweep (docs/kernel-facts.md): when the kernel logs a
//! `WARNING:` during the call (virtio-iommu failing an unmap that iommufd cannot
//! handle), what the device reaches is reported instead of asserted and the fixture is
//! rebuilt; and devices are bound outside the sweep (an injected failure in the first
//! open's ACPI `_PRT` evaluation oopses the kernel later).

mod support;

use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use libtest_mimic::Failed;
use support::dma_engine::DmaEngine;
use support::edu::Edu;
use support::fail_nth::{sweep, Called, FailNth, FaultInjection, Injector, SweepReport, REPORTS};
use support::kernel_areas::{raw_unmap_all, KernelAreas};
use support::kvm_attrs::AttributeProbe;
use support::space::{dup, first_edu};
use support::{pci, run_vm_trials, vm_iommu, OrFail, TestFn};
use vfio_gmem::dma::{
    CutSupport, DmaSpace, GuestRegion, MapPath, Outcome, PageState, RegionId, SharedMemory,
    SpaceError, SpaceOptions, Strategy,
};
use vfio_gmem::gmem::{KvmVm, MappedMemory, Memfd, VmType};
use vfio_gmem::iommufd::{Ioas, Iommufd};
use vfio_gmem::mapper::{Access, Iova};
use vfio_gmem::vfio::Device;

fn main() {
    let tests: &[(&'static str, TestFn)] = &[
        ("ioas_map_user", ioas_map_user),
        ("ioas_map_file", ioas_map_file),
        ("ioas_unmap", ioas_unmap),
        ("device_attach", device_attach),
        ("space_attach", space_attach),
        (
            "space_attach_again_after_a_failed_attach",
            space_attach_again_after_a_failed_attach,
        ),
        ("region_add_cut", region_add_cut),
        ("region_add_per_granule", region_add_per_granule),
        ("to_private_cut", to_private_cut),
        ("to_shared_cut", to_shared_cut),
        ("to_private_per_granule", to_private_per_granule),
        ("to_shared_per_granule", to_shared_per_granule),
    ];
    let conclusion = run_vm_trials(tests);
    summary();
    conclusion.exit()
}

const PAGE: u64 = 4096;
const GPA: u64 = 0x1_0000_0000;
/// Pages of the test region (and of the IOAS tests' memfd). Small: under TCG each
/// injection point costs a fresh starting state and several checks.
const PAGES: u64 = 8;
const LEN: u64 = PAGES * PAGE;
/// Sweeps stop with a failure if an operation still reaches injected faults after this
/// many (the selftest uses 1000 for whole scenarios; single operations need far fewer).
const CAP: u32 = 400;

fn summary() {
    let reports = REPORTS.lock().unwrap_or_else(|p| p.into_inner());
    if reports.is_empty() {
        return;
    }
    let iommu = vm_iommu().unwrap_or_default();
    eprintln!("fault injection summary ({iommu}-iommu):");
    for (_, r) in reports.iter() {
        eprintln!(
            "  {:<24} {:>4} injection points: {:>3} errors, {:>3} absorbed, {:>2} kernel WARNs  ({:.1} s)",
            r.op,
            r.points,
            r.errors,
            r.tolerated,
            r.kernel_warnings,
            r.elapsed.as_secs_f64()
        );
    }
    let total: u32 = reports.iter().map(|(_, r)| r.points).sum();
    let warned: u32 = reports.iter().map(|(_, r)| r.kernel_warnings).sum();
    eprintln!(
        "fault injection: {total} injection points covered over {} operations ({iommu}-iommu); \
         records equal the kernel after each; {warned} made the kernel WARN",
        reports.len()
    );
}

fn record(r: SweepReport) {
    eprintln!(
        "{}: {} injection points ({} errors, {} absorbed) in {:.1} s",
        r.op,
        r.points,
        r.errors,
        r.tolerated,
        r.elapsed.as_secs_f64()
    );
    for s in &r.samples {
        eprintln!("  e.g. {s}");
    }
    for s in &r.notes {
        eprintln!("  kernel bug: {s}");
    }
    REPORTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((r.op.clone(), r));
}

/// Fault injection on, and this thread's fail-nth.
fn injection() -> Result<(FaultInjection, FailNth), Failed> {
    let fi = FaultInjection::enable().map_err(|e| format!("fault injection: {e}"))?;
    let nth = FailNth::open().or_fail("open /proc/thread-self/fail-nth")?;
    Ok((fi, nth))
}

fn open_device() -> Result<Device, Failed> {
    let bdf = first_edu()?;
    Device::open_cdev(pci::vfio_cdev(&bdf).or_fail("cdev")?).or_fail("open edu")
}

/// Checks with DMA which of `pages` (page `p` at IOVA `GPA + p`, seen by the CPU at
/// `view[p * PAGE..]`) the device reaches, against `mapped(p)`. edu finishes a DMA on a
/// 100 ms timer, so the check is frugal: the device buffer is loaded from the first page
/// expected mapped (a fresh pattern), then written to every page, whose memory was
/// filled with 0xa5 first: the pattern must land exactly on the pages expected mapped.
/// Returns the mismatches; `strict` fails on the first one instead.
fn check_reach(
    edu: &Edu,
    view: &mut MappedMemory,
    pages: &[u64],
    mapped: impl Fn(u64) -> bool,
    strict: bool,
) -> Result<Vec<String>, Failed> {
    static SEED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
    let seed = SEED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pattern: Vec<u8> = (0..PAGE as usize)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect();
    let at = |p: u64| (p * PAGE) as usize;
    if let Some(&q) = pages.iter().find(|&&p| mapped(p)) {
        view.write(at(q), &pattern).or_fail("write pattern")?;
        edu.dma_from_ram(GPA + q * PAGE, PAGE)
            .or_fail("DMA RAM→device")?;
    }
    let mut wrong = Vec::new();
    for &p in pages {
        view.fill(at(p), PAGE as usize, 0xa5).or_fail("fill")?;
        edu.dma_to_ram(GPA + p * PAGE, PAGE)
            .or_fail("DMA device→RAM")?;
        let after = view.read_vec(at(p), PAGE as usize).or_fail("read")?;
        let landed = after == pattern;
        if !landed && !after.iter().all(|&b| b == 0xa5) {
            return Err(format!("page {p}: memory neither unchanged nor the device's data").into());
        }
        if landed != mapped(p) {
            let what = if mapped(p) {
                format!(
                    "IOVA {:#x} is recorded as mapped, but the device cannot reach it",
                    GPA + p * PAGE
                )
            } else {
                format!(
                    "IOVA {:#x} is recorded as unmapped, but the device wrote to it",
                    GPA + p * PAGE
                )
            };
            if strict {
                return Err(what.into());
            }
            wrong.push(what);
        }
    }
    Ok(wrong)
}

/// [`check_reach`] for a report: after a kernel WARN, what the device reaches is the
/// kernel's word against itself, so it is described, not asserted.
fn observe(
    edu: &Edu,
    view: &mut MappedMemory,
    pages: &[u64],
    mapped: impl Fn(u64) -> bool,
) -> Result<String, Failed> {
    let wrong = check_reach(edu, view, pages, mapped, false)?;
    Ok(if wrong.is_empty() {
        "device reach as recorded".into()
    } else {
        wrong.join("; ")
    })
}

/// The kernel's warning without its CPU and task, for grouping.
fn warning_site(w: &str) -> &str {
    w.split(", CPU#").next().unwrap_or(w)
}

fn spans(ioas: &Ioas) -> Vec<(u64, u64)> {
    ioas.areas().iter().map(|s| (s.iova, s.len)).collect()
}

fn show(areas: &[(u64, u64)]) -> String {
    let v: Vec<String> = areas
        .iter()
        .map(|&(i, l)| format!("[{:#x}, +{}p)", i, l / PAGE))
        .collect();
    v.join(" ")
}

fn ctx<T>(r: Result<T, Failed>, what: &str) -> Result<T, Failed> {
    r.map_err(|e| Failed::from(format!("{what}: {}", e.message().unwrap_or("failed"))))
}

/// The lowest usable IOVA range's first 4 pages, where the space's cut probe maps.
fn probe_window(ioas: &Ioas) -> Result<Range<u64>, Failed> {
    let r = ioas.iova_ranges().or_fail("IOVA ranges")?;
    let start = r
        .ranges
        .iter()
        .map(|r| r.start().next_multiple_of(PAGE))
        .next()
        .ok_or("no usable IOVA range")?;
    Ok(start..start + 4 * PAGE)
}

/// A test fixture that a sweep can rebuild (after a kernel WARN): the old one is
/// dropped before the new one is made, since the device's cdev takes one bound user.
struct Fixture<T> {
    fx: Option<T>,
    make: Box<dyn Fn() -> Result<T, Failed>>,
}

impl<T> Fixture<T> {
    fn new(make: impl Fn() -> Result<T, Failed> + 'static) -> Result<Self, Failed> {
        Ok(Fixture {
            fx: Some(make()?),
            make: Box::new(make),
        })
    }

    fn rebuild(&mut self) -> Result<(), Failed> {
        self.fx = None;
        self.fx = Some((self.make)()?);
        Ok(())
    }
}

impl<T> std::ops::Deref for Fixture<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.fx.as_ref().expect("fixture rebuilt")
    }
}

impl<T> std::ops::DerefMut for Fixture<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.fx.as_mut().expect("fixture rebuilt")
    }
}

// ---------------------------------------------------------------------------------------
// The IOAS layer: map_user, map_file, unmap, device attach.

/// An IOAS with the edu device attached, an 8-page memfd and an anchor area (page 0 at
/// `GPA`) that must survive every failure around it; operations use pages 2..6.
struct IoasFx {
    edu: Edu,
    kernel: KernelAreas,
    ioas: Ioas,
    mem: Memfd,
    view: MappedMemory,
}

impl IoasFx {
    fn new() -> Result<IoasFx, Failed> {
        let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
        let ioas = Ioas::new(&iommufd).or_fail("IOAS")?;
        let dev = open_device()?;
        dev.bind_iommufd(iommufd.as_fd()).or_fail("bind")?;
        dev.attach(ioas.id()).or_fail("attach")?;
        let edu = Edu::new(dev).or_fail("edu")?;
        let mem = Memfd::new("vm-faults", LEN).or_fail("memfd")?;
        let view = mem.mmap().or_fail("mmap")?;
        ioas.map_file(
            Iova::Fixed(GPA),
            mem.file().as_fd(),
            0,
            PAGE,
            Access::READ_WRITE,
        )
        .or_fail("anchor area")?;
        let kernel = KernelAreas::new(iommufd.as_fd(), ioas.id()).or_fail("scratch IOAS")?;
        let fx = IoasFx {
            edu,
            kernel,
            ioas,
            mem,
            view,
        };
        fx.verify("setup")?;
        Ok(fx)
    }

    fn window() -> Range<u64> {
        GPA - 2 * PAGE..GPA + LEN + 2 * PAGE
    }

    /// `Ioas::areas()` equals the kernel's areas.
    fn verify(&self, when: &str) -> Result<(), Failed> {
        let areas = spans(&self.ioas);
        self.kernel.check(&areas, Self::window()).map_err(|e| {
            Failed::from(format!(
                "{when}: Ioas::areas() = {} disagrees with the kernel: {e}",
                show(&areas)
            ))
        })
    }

    fn mapped(&self, p: u64) -> bool {
        let iova = GPA + p * PAGE;
        spans(&self.ioas)
            .iter()
            .any(|&(i, l)| (i..i + l).contains(&iova))
    }

    /// After a kernel WARN: notes what the device reaches (the caller starts over).
    fn after_warning(&mut self, inj: &Injector, warning: &str) -> Result<(), Failed> {
        let mapped: Vec<bool> = (0..PAGES).map(|p| self.mapped(p)).collect();
        let seen = observe(&self.edu, &mut self.view, &[0, 2, 5], |p| {
            mapped[p as usize]
        })?;
        inj.note(format!("{} — then {seen}", warning_site(warning)));
        Ok(())
    }

    /// DMA reaches page `p` (of the memfd, at `GPA + p`) iff the records map it.
    fn sample(&mut self, pages: &[u64]) -> Result<(), Failed> {
        let mapped: Vec<bool> = (0..PAGES).map(|p| self.mapped(p)).collect();
        check_reach(
            &self.edu,
            &mut self.view,
            pages,
            |p| mapped[p as usize],
            true,
        )
        .map(drop)
    }

    fn map_middle(&self, by_va: bool) -> vfio_gmem::iommufd::Result<u64> {
        let (iova, off, len) = (GPA + 2 * PAGE, 2 * PAGE, 4 * PAGE);
        if by_va {
            self.ioas.map_user(
                Iova::Fixed(iova),
                self.view.addr() + off,
                len,
                Access::READ_WRITE,
            )
        } else {
            self.ioas.map_file(
                Iova::Fixed(iova),
                self.mem.file().as_fd(),
                off,
                len,
                Access::READ_WRITE,
            )
        }
    }

    fn unmap_middle(&self) -> Result<(), Failed> {
        let n = self
            .ioas
            .unmap(GPA + 2 * PAGE, 4 * PAGE)
            .or_fail("unmap pages 2..6")?;
        check!(n == 4 * PAGE, "unmap of pages 2..6 removed {n:#x} bytes");
        Ok(())
    }
}

fn called<T, E: std::fmt::Display>(r: &Result<T, E>) -> Called {
    match r {
        Ok(_) => Called::Ok,
        Err(e) => Called::Err(e.to_string()),
    }
}

fn sweep_map(name: &str, by_va: bool) -> Result<(), Failed> {
    let (_fi, nth) = injection()?;
    let mut fx = Fixture::new(IoasFx::new)?;
    let report = sweep(&nth, name, CAP, |inj: &Injector| {
        let r = inj.call(|| fx.map_middle(by_va))?;
        fx.verify("after the injected map")?;
        if let Some(w) = inj.kernel_warning() {
            fx.after_warning(inj, &w)?;
            fx.rebuild()?;
            return Ok(called(&r));
        }
        if r.is_ok() {
            check!(
                fx.ioas.areas().len() == 2,
                "a successful map must add exactly one area: {}",
                show(&spans(&fx.ioas))
            );
        } else {
            check!(
                spans(&fx.ioas) == [(GPA, PAGE)],
                "a failed map must leave only the anchor: {}",
                show(&spans(&fx.ioas))
            );
        }
        fx.sample(&[0, 2, 6])?;
        // Not poisoned: the map works (again), and unmapping it removes exactly it.
        if r.is_err() {
            ctx(
                fx.map_middle(by_va).or_fail("map again"),
                "after a failed map",
            )?;
        }
        fx.unmap_middle()?;
        fx.verify("after unmapping again")?;
        Ok(called(&r))
    })?;
    record(report);
    Ok(())
}

fn ioas_map_user() -> Result<(), Failed> {
    sweep_map("ioas map_user", true)
}

fn ioas_map_file() -> Result<(), Failed> {
    sweep_map("ioas map_file", false)
}

fn ioas_unmap() -> Result<(), Failed> {
    let (_fi, nth) = injection()?;
    let mut fx = Fixture::new(IoasFx::new)?;
    let report = sweep(&nth, "ioas unmap", CAP, |inj: &Injector| {
        fx.map_middle(false).or_fail("map pages 2..6")?;
        fx.verify("before the unmap")?;
        let r = inj.call(|| fx.ioas.unmap(GPA + 2 * PAGE, 4 * PAGE))?;
        fx.verify("after the injected unmap")?;
        if let Some(w) = inj.kernel_warning() {
            fx.after_warning(inj, &w)?;
            fx.rebuild()?;
            return Ok(called(&r));
        }
        if let Ok(n) = r {
            check!(n == 4 * PAGE, "unmap returned {n:#x}");
        }
        fx.sample(&[0, 2, 5])?;
        if r.is_err() {
            ctx(fx.unmap_middle(), "after a failed unmap")?;
            fx.verify("after unmapping again")?;
        }
        Ok(called(&r))
    })?;
    record(report);
    Ok(())
}

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` of a bound device to an IOAS holding two areas: a
/// failed attach leaves the device blocked and the IOAS as it was; attaching again works.
fn device_attach() -> Result<(), Failed> {
    let (_fi, nth) = injection()?;
    let mut fx = Fixture::new(IoasFx::new)?;
    fx.map_middle(true).or_fail("map pages 2..6")?;
    let report = sweep(&nth, "device attach", CAP, |inj: &Injector| {
        fx.edu.device().detach().or_fail("detach")?;
        let r = inj.call(|| fx.edu.device().attach(fx.ioas.id()))?;
        fx.verify("after the injected attach")?;
        if let Some(w) = inj.kernel_warning() {
            fx.after_warning(inj, &w)?;
            fx.rebuild()?;
            fx.map_middle(true).or_fail("map pages 2..6")?;
            return Ok(called(&r));
        }
        if r.is_err() {
            // Not attached: the device reaches nothing.
            let fx = &mut *fx;
            check_reach(&fx.edu, &mut fx.view, &[0, 2], |_| false, true)?;
            ctx(
                fx.edu
                    .device()
                    .attach(fx.ioas.id())
                    .map(drop)
                    .or_fail("attach again"),
                "after a failed attach",
            )?;
        }
        fx.sample(&[0, 1, 5])?;
        Ok(called(&r))
    })?;
    record(report);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The DMA space: attach (with its cut probe), region add, conversions.

/// `DmaSpace::attach` of a bound device: attaches it, probes area cutting. After a
/// failure the same device attaches on a second call; afterwards the IOAS holds nothing
/// (the probe cleaned up) and a region added to the space is reachable by DMA.
fn space_attach() -> Result<(), Failed> {
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
            CutSupport::Verified => {}
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
const MSI_WINDOW: u64 = 0xfee0_0000;

/// `DmaSpace::attach` fails after its bind (an area sits in the device's reserved MSI
/// window); once the area is gone the same device attaches on a second call. The bind
/// cannot be repeated on the same fd (EINVAL), so the second call must not bind again.
fn space_attach_again_after_a_failed_attach() -> Result<(), Failed> {
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
struct SpaceFx {
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
        check!(
            *space.cut_support() == CutSupport::Verified,
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
fn check_outcome<T>(r: &Result<T, SpaceError>) -> Result<(), Failed> {
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

fn sweep_region_add(name: &str, strategy: Strategy) -> Result<(), Failed> {
    let (_fi, nth) = injection()?;
    let mut fx = Fixture::new(move || SpaceFx::new(strategy))?;
    let mut by_va = 0;
    let report = sweep(&nth, name, CAP, |inj: &Injector| {
        fx.remove_region()?;
        fx.verify("without the region")?;
        let r = inj.call(|| fx.add_region())?;
        check_outcome(&r)?;
        if r.is_err() {
            fx.region = None;
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

fn region_add_cut() -> Result<(), Failed> {
    sweep_region_add("region add (cut)", Strategy::Cut)
}

fn region_add_per_granule() -> Result<(), Failed> {
    sweep_region_add("region add (per-granule)", Strategy::PerGranule)
}

/// One conversion swept: `private` pages before, then `pages` converted `to`.
struct Conversion {
    name: &'static str,
    strategy: Strategy,
    /// Page ranges `(first, end)` made private first.
    private: &'static [(u64, u64)],
    pages: Range<u64>,
    to: PageState,
    discard: bool,
    sample: &'static [u64],
}

fn sweep_conversion(c: Conversion) -> Result<(), Failed> {
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
fn to_private_cut() -> Result<(), Failed> {
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
fn to_shared_cut() -> Result<(), Failed> {
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
fn to_private_per_granule() -> Result<(), Failed> {
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
fn to_shared_per_granule() -> Result<(), Failed> {
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
