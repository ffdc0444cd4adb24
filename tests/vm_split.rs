//! The native area split (`IOMMU_IOAS_SPLIT`, kernel/patches/iommufd-split) on the real
//! kernel: which cut mechanism a space picks on this kernel and IOMMU, conversions of a
//! 2 MiB-backed (hugetlb memfd) convertible region with edu DMA to the neighbours of each
//! converted range before and after every step, and the leaf IOPTE sizes VT-d ends up
//! with (its page table in debugfs).
//!
//! Expectations by kernel (`uname -r`): the patched kernel (`*-vfio-gmem-patched`) uses
//! the native split, with huge pages on under intel-iommu and off under virtio-iommu (its
//! domain cannot cut a large IOPTE, and the space says so); any other kernel uses the
//! compat cut.

mod support;

use libtest_mimic::Failed;
use support::space::{
    confidential_on, dma_refused, dma_works, round_trip, space_with_edu, Confidential, GPA,
};
use support::{pci, run_vm_tests, OrFail};
use vfio_gmem::dma::{CutSupport, PageState, SpaceOptions};
use vfio_gmem::gmem::Memfd;

const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;
const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

fn main() {
    run_vm_tests(&[
        (
            "cut_mechanism_matches_kernel_and_iommu",
            cut_mechanism_matches_kernel_and_iommu,
        ),
        (
            "hugetlb_conversions_keep_neighbours_reachable",
            hugetlb_conversions_keep_neighbours_reachable,
        ),
        ("vtd_leaf_iopte_sizes", vtd_leaf_iopte_sizes),
        (
            "fake_native_split_matches_the_real_kernel",
            fake_native_split_matches_the_real_kernel,
        ),
    ]);
}

fn patched_kernel() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().ends_with("-vfio-gmem-patched"))
        .unwrap_or(false)
}

fn iommu() -> String {
    std::env::var("VFIO_GMEM_IOMMU").unwrap_or_else(|_| "intel".into())
}

/// Reserves `n` 2 MiB pages for the test's lifetime (restored on drop).
struct HugePages(String);

impl HugePages {
    fn reserve(n: u64) -> Result<Self, Failed> {
        let old = std::fs::read_to_string(NR_HUGEPAGES).or_fail("nr_hugepages")?;
        std::fs::write(NR_HUGEPAGES, n.to_string()).or_fail("reserve huge pages")?;
        Ok(HugePages(old.trim().to_string()))
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, &self.0);
    }
}

/// A confidential region of `len` bytes whose shared backing is a hugetlb memfd (2 MiB
/// pages), every page shared, in a space with the edu device.
type HugeRegion = Confidential;

fn huge_region(len: u64, options: SpaceOptions) -> Result<HugeRegion, Failed> {
    let shared = Memfd::hugetlb("vm-split", len).or_fail("hugetlb memfd")?;
    confidential_on(options, shared)
}

fn cut_mechanism_matches_kernel_and_iommu() -> Result<(), Failed> {
    let _huge = HugePages::reserve(4)?;
    let r = huge_region(2 * HUGE, SpaceOptions::default())?;
    let cut = r.space.cut_support().clone();
    eprintln!("  {} iommu, patched={}: {cut:?}", iommu(), patched_kernel());
    match (patched_kernel(), iommu().as_str(), &cut) {
        (true, "intel", CutSupport::NativeSplit { huge_pages, .. }) => {
            check!(*huge_pages, "intel-iommu must keep huge pages: {cut:?}")
        }
        (true, "virtio", CutSupport::NativeSplit { huge_pages, why }) => check!(
            !*huge_pages && why.contains("cannot cut large IOPTEs"),
            "virtio-iommu must fall back to 4 KiB IOPTEs and say why: {cut:?}"
        ),
        (false, _, CutSupport::Verified) => {}
        _ => return Err(format!("unexpected cut mechanism {cut:?}").into()),
    }
    // The native split needs no compat designation: the space gave it up.
    if matches!(cut, CutSupport::NativeSplit { .. }) {
        let ioas = r.space.ioas().ok_or("no IOAS")?;
        check!(
            !ioas.is_compat().or_fail("compat id")?,
            "a native-split space still holds the compat IOAS"
        );
        check!(
            ioas.huge_pages().or_fail("huge pages")?
                == matches!(
                    cut,
                    CutSupport::NativeSplit {
                        huge_pages: true,
                        ..
                    }
                ),
            "the IOAS's huge page option disagrees with {cut:?}"
        );
    }
    Ok(())
}

/// Round trips through the pages just outside `[off, off+len)` (inside the region).
fn neighbours_work(r: &mut HugeRegion, off: u64, len: u64, total: u64) -> Result<(), Failed> {
    let mut seed = (off / PAGE) as u8;
    for n in [
        off.checked_sub(PAGE),
        Some(off + len).filter(|&e| e < total),
    ]
    .into_iter()
    .flatten()
    {
        seed = seed.wrapping_add(7);
        dma_works(&r.edu, &mut r.view, n as usize, GPA + n, seed)?;
    }
    Ok(())
}

fn hugetlb_conversions_keep_neighbours_reachable() -> Result<(), Failed> {
    let total = 4 * HUGE;
    let _huge = HugePages::reserve(8)?;
    let mut r = huge_region(total, SpaceOptions::default())?;
    eprintln!("  cut mechanism: {:?}", r.space.cut_support());
    check!(
        r.space.cut_support().can_cut()
            && r.space.regions()[0].strategy == vfio_gmem::dma::Strategy::Cut,
        "a convertible region must use a cut mechanism here: {:?}",
        r.space.cut_support()
    );
    // Inside one huge page, across a huge page boundary, a whole huge page, the first and
    // last pages, and a range whose ends are 2 MiB aligned.
    let steps = [
        (HUGE / 2 + PAGE, PAGE),
        (HUGE - 2 * PAGE, 4 * PAGE),
        (2 * HUGE, HUGE),
        (0, PAGE),
        (total - PAGE, PAGE),
        (HUGE + 3 * PAGE, 5 * PAGE),
    ];
    for (i, &(off, len)) in steps.iter().enumerate() {
        neighbours_work(&mut r, off, len, total)?;
        r.space
            .convert(GPA + off, len, PageState::Private, false)
            .or_fail(&format!("step {i}: to private"))?;
        neighbours_work(&mut r, off, len, total)?;
        dma_refused(&r.edu, &mut r.view, off as usize, GPA + off)?;
        dma_refused(
            &r.edu,
            &mut r.view,
            (off + len - PAGE) as usize,
            GPA + off + len - PAGE,
        )?;
        // Earlier steps' ranges came back shared; their pages must still work.
        for &(o, _) in &steps[..i] {
            check!(
                round_trip(&r.edu, &mut r.view, o as usize, GPA + o, i as u8)?,
                "step {i}: page {o:#x} of an earlier step is unreachable"
            );
        }
        r.space
            .convert(GPA + off, len, PageState::Shared, false)
            .or_fail(&format!("step {i}: to shared"))?;
        dma_works(&r.edu, &mut r.view, off as usize, GPA + off, i as u8)?;
        neighbours_work(&mut r, off, len, total)?;
    }
    Ok(())
}

use support::vtd::leaves as vtd_leaves;

fn vtd_leaf_iopte_sizes() -> Result<(), Failed> {
    if iommu() != "intel" || !patched_kernel() {
        eprintln!("  (intel-iommu on the patched kernel only: it has the VT-d debugfs dump)");
        return Ok(());
    }
    let bdf = pci::edu_devices().into_iter().next().ok_or("no edu")?;
    let total = 8 * HUGE;
    let _huge = HugePages::reserve(8)?;
    let mut r = huge_region(total, SpaceOptions::default())?;
    let before = vtd_leaves(&bdf)?;
    check!(
        before[1] == total / HUGE && before[0] == 0,
        "the region should be {} 2 MiB IOPTEs before any conversion: {before:?}",
        total / HUGE
    );
    // Two 4 KiB holes in different huge pages: only those two become 4 KiB tables.
    for off in [HUGE + 5 * PAGE, 5 * HUGE + 100 * PAGE] {
        r.space
            .convert(GPA + off, PAGE, PageState::Private, false)
            .or_fail("to private")?;
    }
    let after = vtd_leaves(&bdf)?;
    eprintln!(
        "  leaf IOPTEs [4K, 2M, 1G]: before {before:?}, after two 4 KiB conversions {after:?}"
    );
    check!(
        after[1] == total / HUGE - 2 && after[0] == 2 * 511,
        "expected {} 2 MiB and 1022 4 KiB IOPTEs: {after:?}",
        total / HUGE - 2
    );
    Ok(())
}

/// The same cut unmaps on the fake kernel's native split model and on the real kernel
/// (`Ioas::split_unmap` with a device attached): same result of each, same areas after.
/// On a kernel without the series the ioctl must be refused with ENOTTY.
fn fake_native_split_matches_the_real_kernel() -> Result<(), Failed> {
    use std::os::fd::AsFd;
    use support::kernel_areas::KernelAreas;
    use vfio_gmem::dma::planning::{Backing, MapOp, UnmapKind, UnmapOp};
    use vfio_gmem::dma::{Executor, FakeKernel, RegionId};
    use vfio_gmem::mapper::{Access, Iova};

    let (space, _edu) = space_with_edu(None, SpaceOptions::default())?;
    let ioas = space.ioas().ok_or("no IOAS")?;
    let base = 0x2_0000_0000u64;
    let pages = 16;
    let memfd = Memfd::new("vm-split-fake", pages * PAGE).or_fail("memfd")?;
    ioas.map_file(
        Iova::Fixed(base),
        memfd.file().as_fd(),
        0,
        pages * PAGE,
        Access::READ_WRITE,
    )
    .or_fail("map")?;
    if !patched_kernel() {
        let e = ioas
            .split(base + PAGE, PAGE)
            .err()
            .ok_or("split worked on plain 7.3")?;
        check!(e.errno() == Some(libc::ENOTTY), "expected ENOTTY: {e}");
        return Ok(());
    }
    let mut fake = FakeKernel::with_native_split();
    fake.map(&MapOp {
        region: RegionId(0),
        backing: Backing::Opaque(0),
        iova: base,
        offset: 0,
        len: pages * PAGE,
    })
    .or_fail("fake map")?;
    // (first page, pages): inside, repeated (nothing left there), at an edge, misaligned
    // (refused before any split), across several pieces.
    let steps: [(u64, u64); 5] = [(2, 2), (2, 2), (0, 1), (7, 1), (0, 16)];
    for (i, &(first, n)) in steps.iter().enumerate() {
        let (iova, len) = (base + first * PAGE, n * PAGE);
        let (iova, len) = if i == 3 {
            (iova + 512, len)
        } else {
            (iova, len)
        };
        let op = UnmapOp {
            iova,
            len,
            kind: UnmapKind::Cut,
            restore: vec![],
        };
        let f = fake.unmap(&op).map_err(|e| e.errno);
        let r = ioas.split_unmap(iova, len).map_err(|e| e.errno());
        eprintln!("  step {i}: [{iova:#x}, +{len:#x}): fake {f:?}, kernel {r:?}");
        check!(
            f.is_ok() == r.is_ok() && (f.is_err() || f.ok() == r.as_ref().ok().copied()),
            "step {i}: fake {f:?} vs kernel {r:?}"
        );
        let expected: Vec<(u64, u64)> = fake.areas().map(|a| (a.iova, a.len)).collect();
        if !expected.is_empty() {
            KernelAreas::new(ioas.iommufd().as_fd(), ioas.id())
                .or_fail("scratch copy")?
                .check(&expected, base..base + pages * PAGE)
                .map_err(|e| format!("step {i}: kernel areas differ from the fake's: {e}"))?;
        }
    }
    Ok(())
}
