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

#[path = "vm_faults/ioas.rs"]
mod ioas;
#[path = "vm_faults/space.rs"]
mod space;
use ioas::*;
use space::*;

use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use libtest_mimic::Failed;
use support::fail_nth::{sweep, Called, FailNth, FaultInjection, Injector, SweepReport, REPORTS};
use support::kernel_areas::{raw_unmap_all, KernelAreas};
use support::kvm_attrs::AttributeProbe;
use support::needs::{self, Need};
use support::space::{dup, first_edu};
use support::{pci, run_vm_trials, vm_iommu, OrFail, TestFn};
use vfio_gmem::dma::{
    CutSupport, DmaSpace, GuestRegion, MapPath, Outcome, PageState, RegionId, SharedMemory,
    SpaceError, SpaceOptions, Strategy,
};
use vfio_gmem::engine::edu::Edu;
use vfio_gmem::engine::DmaEngine;
use vfio_gmem::gmem::{KvmVm, MappedMemory, Memfd, VmType};
use vfio_gmem::iommufd::{Ioas, Iommufd};
use vfio_gmem::mapper::{Access, Iova};
use vfio_gmem::vfio::Device;

/// What the running kernel must offer (see `support::needs`); unmet: reported skipped.
const NEEDS: needs::Needs = &[("*", &[Need::Iommufd, Need::FaultInjection])];

fn main() {
    needs::declare(NEEDS);
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

/// The lowest usable IOVA range's first 4 pages, where the space's probes map (the cut
/// probe at attach, the MAP_FILE probe at each add_region: `dma::probes`; the region
/// sits far above).
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
