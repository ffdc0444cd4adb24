//! The DMA space on the real kernel (VM): guest memory on guest_memfd and memfd, mapping
//! paths, private/shared conversions, each proven with the edu device's DMA.

mod support;

use std::os::fd::AsFd;

use libtest_mimic::Failed;
use support::needs::{self, Need};
use support::space::{
    arc_vm, confidential_setup, dma_refused, dma_works, dup, space_with_edu, GPA, PAGE,
};
use support::{pci, run_vm_tests, OrFail};
use vfio_gmem::dma::{
    ConversionRequest, DmaSpace, GuestRegion, MapPath, PageState, SharedMemory, SpaceError,
    SpaceOptions, Strategy,
};
use vfio_gmem::engine::edu::Edu;
use vfio_gmem::gmem::{GmemFlags, Memfd, VmType};

/// What the running kernel must offer (see `support::needs`); unmet: reported skipped.
const NEEDS: needs::Needs = &[
    ("gmem_init_shared_whole_region_maps_by_va", &[Need::Iommufd]),
    ("memfd_region_maps_by_fd_offset", &[Need::Iommufd]),
    ("hugetlb_region_maps_by_fd_offset", &[Need::Iommufd]),
    (
        "confidential_conversions_cut_exactly",
        &[Need::Iommufd, Need::PrivateMemory],
    ),
    (
        "per_granule_fallback_conversions",
        &[Need::Iommufd, Need::PrivateMemory],
    ),
    (
        "bad_input_changes_nothing",
        &[Need::Iommufd, Need::PrivateMemory],
    ),
    ("fake_kernel_rules_match_the_real_kernel", &[Need::Iommufd]),
    (
        "kernel_failure_mid_batch_rolls_back",
        &[Need::Iommufd, Need::PrivateMemory],
    ),
];

fn main() {
    needs::declare(NEEDS);
    run_vm_tests(&[
        (
            "gmem_init_shared_whole_region_maps_by_va",
            gmem_init_shared_whole_region_maps_by_va,
        ),
        (
            "memfd_region_maps_by_fd_offset",
            memfd_region_maps_by_fd_offset,
        ),
        (
            "hugetlb_region_maps_by_fd_offset",
            hugetlb_region_maps_by_fd_offset,
        ),
        (
            "confidential_conversions_cut_exactly",
            confidential_conversions_cut_exactly,
        ),
        (
            "per_granule_fallback_conversions",
            per_granule_fallback_conversions,
        ),
        ("bad_input_changes_nothing", bad_input_changes_nothing),
        (
            "fake_kernel_rules_match_the_real_kernel",
            fake_kernel_rules_match_the_real_kernel,
        ),
        (
            "legacy_container_space_maps_by_va_per_granule",
            legacy_container_space_maps_by_va_per_granule,
        ),
        (
            "kernel_failure_mid_batch_rolls_back",
            kernel_failure_mid_batch_rolls_back,
        ),
    ]);
}

fn gmem_init_shared_whole_region_maps_by_va() -> Result<(), Failed> {
    let vm = arc_vm(VmType::Default)?;
    let len = 2 << 20;
    let gmem = vm
        .create_guest_memfd(len, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
        .or_fail("gmem")?;
    let mut view = gmem.mmap().or_fail("mmap gmem")?;
    let (mut space, edu) = space_with_edu(
        Some(vm),
        SpaceOptions {
            conversions: false,
            ..Default::default()
        },
    )?;
    let id = space
        .add_region(GuestRegion::new(
            GPA,
            len,
            SharedMemory::File {
                fd: dup(&gmem)?,
                offset: 0,
            },
        ))
        .or_fail("add region")?;
    let r = &space.regions()[0];
    check!(
        r.id == id && r.strategy == Strategy::Whole && r.areas == 1,
        "expected one whole-region area: {r:?}"
    );
    // The patched kernel (kernel/patches/gmem-map-file) maps it by fd+offset; plain 7.3
    // refuses guest_memfd in MAP_FILE and the space falls back to VA.
    match &r.path {
        MapPath::FileOffset if support::patched_kernel() => {}
        MapPath::VirtualAddress { reason } if !support::patched_kernel() => check!(
            reason.contains("cannot pin"),
            "VA fallback reason: {reason}"
        ),
        p => {
            return Err(format!(
                "guest_memfd path {p} is wrong for this kernel (patched: {})",
                support::patched_kernel()
            )
            .into())
        }
    }
    dma_works(&edu, &mut view, 0, GPA, 1)?;
    dma_works(&edu, &mut view, (len - PAGE) as usize, GPA + len - PAGE, 2)?;
    check!(
        matches!(
            space.convert(GPA, PAGE, PageState::Private, false),
            Err(SpaceError::Plan(_))
        ),
        "a non-convertible region must refuse conversions"
    );
    Ok(())
}

fn memfd_region_maps_by_fd_offset() -> Result<(), Failed> {
    let len = 1 << 20;
    let memfd = Memfd::new("vm-dma", 2 * len).or_fail("memfd")?;
    let mut view = memfd.mmap().or_fail("mmap")?;
    let (mut space, edu) = space_with_edu(None, SpaceOptions::default())?;
    // The region starts `len` bytes into the file and sits at IOVA = GPA + 1 GiB.
    space
        .add_region(
            GuestRegion::new(
                GPA,
                len,
                SharedMemory::File {
                    fd: dup(memfd.file())?,
                    offset: len,
                },
            )
            .iova_offset(1 << 30),
        )
        .or_fail("add region")?;
    let r = &space.regions()[0];
    check!(
        r.path == MapPath::FileOffset,
        "memfd should map by fd+offset, got {}",
        r.path
    );
    check!(r.iova == GPA + (1 << 30), "IOVA offset not applied: {r:?}");
    dma_works(
        &edu,
        &mut view,
        len as usize + 3 * PAGE as usize,
        r.iova + 3 * PAGE,
        3,
    )?;
    Ok(())
}

fn hugetlb_region_maps_by_fd_offset() -> Result<(), Failed> {
    let old = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
        .or_fail("nr_hugepages")?;
    std::fs::write(
        "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
        "4",
    )
    .or_fail("reserve huge pages")?;
    let result = (|| {
        let len = 4 << 20;
        let memfd = Memfd::hugetlb("vm-dma-huge", len).or_fail("hugetlb memfd")?;
        let mut view = memfd.mmap().or_fail("mmap")?;
        let (mut space, edu) = space_with_edu(None, SpaceOptions::default())?;
        space
            .add_region(
                GuestRegion::new(
                    GPA,
                    len,
                    SharedMemory::File {
                        fd: dup(memfd.file())?,
                        offset: 0,
                    },
                )
                .convertible(PageState::Shared),
            )
            .or_fail("add region")?;
        check!(
            space.regions()[0].path == MapPath::FileOffset,
            "hugetlb memfd should map by fd+offset"
        );
        // Cut a 4 KiB page out of the middle of a 2 MiB huge page.
        let boundary = GPA + (2 << 20);
        space
            .convert(boundary + PAGE, PAGE, PageState::Private, false)
            .or_fail("convert inside a huge page")?;
        dma_refused(&edu, &mut view, (2 << 20) + PAGE as usize, boundary + PAGE)?;
        dma_works(&edu, &mut view, (2 << 20) as usize, boundary, 4)?;
        dma_works(
            &edu,
            &mut view,
            (2 << 20) + 2 * PAGE as usize,
            boundary + 2 * PAGE,
            5,
        )?;
        Ok(())
    })();
    std::fs::write(
        "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
        old.trim(),
    )
    .or_fail("restore nr_hugepages")?;
    result
}

fn confidential_conversions_cut_exactly() -> Result<(), Failed> {
    let len = 64 * PAGE;
    let (mut space, edu, _shared, mut view) = confidential_setup(SpaceOptions::default(), len)?;
    check!(
        space.cut_support().can_cut(),
        "cut probe: {:?}",
        space.cut_support()
    );
    check!(
        space.regions()[0].strategy == Strategy::Cut,
        "convertible region should use the cut strategy"
    );
    let at = |p: u64| (p * PAGE) as usize;

    // Sizes and alignments: 1 page, 3 pages at an odd offset, 8 pages spanning earlier cuts.
    for (first, pages) in [(5u64, 1u64), (9, 3), (20, 8)] {
        let stats = space
            .convert(GPA + first * PAGE, pages * PAGE, PageState::Private, false)
            .or_fail("to private")?;
        check!(stats.unmaps == 1, "one cut-unmap per run, got {stats:?}");
        check!(
            space.page_state(GPA + first * PAGE) == Some(PageState::Private),
            "tracker not private"
        );
        dma_refused(&edu, &mut view, at(first), GPA + first * PAGE)?;
        dma_refused(
            &edu,
            &mut view,
            at(first + pages - 1),
            GPA + (first + pages - 1) * PAGE,
        )?;
        // Neighbours stay reachable.
        dma_works(
            &edu,
            &mut view,
            at(first - 1),
            GPA + (first - 1) * PAGE,
            first as u8,
        )?;
        dma_works(
            &edu,
            &mut view,
            at(first + pages),
            GPA + (first + pages) * PAGE,
            pages as u8,
        )?;
    }
    // Back to shared: DMA works again.
    space
        .convert(GPA + 9 * PAGE, 3 * PAGE, PageState::Shared, false)
        .or_fail("to shared")?;
    dma_works(&edu, &mut view, at(10), GPA + 10 * PAGE, 7)?;
    // Discard: the shared backing's pages read back as zero.
    view.fill(at(30), 2 * PAGE as usize, 0x77).or_fail("fill")?;
    space
        .convert(GPA + 30 * PAGE, 2 * PAGE, PageState::Private, true)
        .or_fail("to private with discard")?;
    let z = view.read_vec(at(30), 2 * PAGE as usize).or_fail("read")?;
    check!(
        z.iter().all(|&b| b == 0),
        "discarded pages must read back as zero"
    );
    // A batch: three ranges, one plan, unmaps first.
    let reqs = [
        ConversionRequest::new(GPA + 40 * PAGE, PAGE, PageState::Private),
        ConversionRequest::new(GPA + 42 * PAGE, 2 * PAGE, PageState::Private),
        ConversionRequest::new(GPA + 9 * PAGE, PAGE, PageState::Private),
    ];
    let stats = space.convert_batch(&reqs).or_fail("batch")?;
    check!(
        stats.unmaps == 3 && stats.attribute_changes == 3,
        "batch stats {stats:?}"
    );
    dma_refused(&edu, &mut view, at(42), GPA + 42 * PAGE)?;
    dma_works(&edu, &mut view, at(41), GPA + 41 * PAGE, 9)?;
    // Teardown unmaps exactly what is left.
    let id = space.regions()[0].id;
    space.remove_region(id).or_fail("remove region")?;
    check!(space.area_count() == 0, "areas left after removal");
    dma_refused(&edu, &mut view, at(0), GPA)?;
    Ok(())
}

fn per_granule_fallback_conversions() -> Result<(), Failed> {
    let len = 32 * PAGE;
    let options = SpaceOptions {
        force_strategy: Some(Strategy::PerGranule),
        ..Default::default()
    };
    let (mut space, edu, _shared, mut view) = confidential_setup(options, len)?;
    check!(
        space.area_count() == 32,
        "one area per 4 KiB granule, got {}",
        space.area_count()
    );
    space
        .convert(GPA + 4 * PAGE, 4 * PAGE, PageState::Private, false)
        .or_fail("to private")?;
    check!(space.area_count() == 28, "four granules unmapped");
    dma_refused(&edu, &mut view, (5 * PAGE) as usize, GPA + 5 * PAGE)?;
    dma_works(&edu, &mut view, (8 * PAGE) as usize, GPA + 8 * PAGE, 1)?;
    space
        .convert(GPA + 4 * PAGE, 4 * PAGE, PageState::Shared, false)
        .or_fail("to shared")?;
    dma_works(&edu, &mut view, (5 * PAGE) as usize, GPA + 5 * PAGE, 2)?;
    Ok(())
}

fn err<T>(r: Result<T, SpaceError>) -> String {
    r.err().map(|e| e.to_string()).unwrap_or_default()
}

fn bad_input_changes_nothing() -> Result<(), Failed> {
    let len = 16 * PAGE;
    let (mut space, edu, shared, mut view) = confidential_setup(SpaceOptions::default(), len)?;
    space
        .convert(GPA + 4 * PAGE, 2 * PAGE, PageState::Private, false)
        .or_fail("pages 4, 5 private")?;
    // Everything the refusals must leave alone: counters, regions, page states, the
    // tracker's areas, this process's fds and pinned pages.
    let state = |space: &DmaSpace| {
        (
            space.area_count(),
            space.totals().ioctls,
            format!("{:?}", space.regions()),
            (0..17)
                .map(|p| space.page_state(GPA + p * PAGE))
                .collect::<Vec<_>>(),
            space
                .memory()
                .areas()
                .map(|a| (a.iova, a.len))
                .collect::<Vec<_>>(),
            support::space::open_fds(),
            support::space::status_kib("VmPin"),
        )
    };
    let efd = vfio_gmem::vfio::EventFd::new().or_fail("eventfd")?;
    let before = state(&space);
    let e = err(space.convert(GPA + len, PAGE, PageState::Private, false));
    check!(e.contains("region"), "outside any region: {e}");
    let e = err(space.convert(GPA + 1, PAGE, PageState::Private, false));
    check!(e.contains("not a multiple of 4 KiB"), "unaligned: {e}");
    let e = err(space.add_region(GuestRegion::new(
        GPA + PAGE,
        PAGE,
        SharedMemory::File {
            fd: dup(shared.file())?,
            offset: 0,
        },
    )));
    check!(
        e.to_lowercase().contains("overlap"),
        "overlapping region: {e}"
    );
    // A batch whose second range is outside: nothing of the first range happens either.
    let reqs = [
        ConversionRequest::new(GPA, PAGE, PageState::Private),
        ConversionRequest::new(GPA + 2 * len, PAGE, PageState::Private),
    ];
    let e = err(space.convert_batch(&reqs));
    check!(!e.is_empty(), "a batch with a bad range must fail");
    check!(
        space.page_state(GPA) == Some(PageState::Shared),
        "first range of a failed batch changed"
    );
    // Wrong fd type: an eventfd cannot back guest memory.
    let e = err(space.add_region(GuestRegion::new(
        GPA + 2 * len,
        PAGE,
        SharedMemory::File {
            fd: dup(&efd)?,
            offset: 0,
        },
    )));
    check!(
        !e.is_empty(),
        "an eventfd must not be accepted as guest memory"
    );
    eprintln!("wrong fd type: {e}");
    let after = state(&space);
    check!(
        after == before,
        "bad input changed state: {before:?} → {after:?}"
    );
    // And the kernel agrees: the device still reaches page 3 and not page 4.
    dma_works(&edu, &mut view, (3 * PAGE) as usize, GPA + 3 * PAGE, 3)?;
    dma_refused(&edu, &mut view, (4 * PAGE) as usize, GPA + 4 * PAGE)?;
    Ok(())
}

/// One step of the rule check: the same call on the fake and on the kernel.
#[derive(Clone, Copy, Debug)]
enum Step {
    Map(u64, u64),
    Native(u64, u64),
    Cut(u64, u64),
}

/// The kernel side of the rule check, on raw ioctls (not the library's wrappers, which
/// refuse some calls before the kernel sees them).
struct RawKernel {
    iommufd: support::edu_raw::RawIommufd,
    memfd: std::fs::File,
}

impl RawKernel {
    fn call(&self, step: Step) -> Result<u64, i32> {
        use support::raw::{self as sys, vfio_uapi as vu};
        let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(-1);
        match step {
            Step::Map(p, n) => self
                .iommufd
                .map_file(&self.memfd, p * PAGE, n * PAGE, GPA + p * PAGE)
                .map(|_| 0)
                .map_err(errno),
            Step::Native(p, n) => self.iommufd.unmap(GPA + p * PAGE, n * PAGE).map_err(errno),
            Step::Cut(p, n) => {
                let mut u: vu::vfio_iommu_type1_dma_unmap = sys::zeroed();
                u.argsz = std::mem::size_of_val(&u) as u32;
                u.iova = GPA + p * PAGE;
                u.size = n * PAGE;
                sys::ioctl_mut(self.iommufd.fd.as_fd(), sys::VFIO_IOMMU_UNMAP_DMA, &mut u)
                    .map(|_| u.size)
                    .map_err(errno)
            }
        }
    }
}

fn fake_call(fake: &mut vfio_gmem::dma::FakeKernel, step: Step) -> Result<u64, i32> {
    use vfio_gmem::dma::planning::{Backing, MapOp, UnmapKind, UnmapOp};
    use vfio_gmem::dma::{Executor, RegionId};
    let map = |p: u64, n: u64| MapOp {
        region: RegionId(0),
        backing: Backing::Opaque(0),
        iova: GPA + p * PAGE,
        offset: p * PAGE,
        len: n * PAGE,
    };
    let unmap = |p: u64, n: u64, kind| UnmapOp {
        iova: GPA + p * PAGE,
        len: n * PAGE,
        kind,
        restore: Vec::new(),
    };
    match step {
        Step::Map(p, n) => fake.map(&map(p, n)).map(|_| 0),
        Step::Native(p, n) => fake.unmap(&unmap(p, n, UnmapKind::Native)),
        Step::Cut(p, n) => fake.unmap(&unmap(p, n, UnmapKind::Cut)),
    }
    .map_err(|e| e.errno)
}

/// The fake kernel the planner's property tests trust must answer every call exactly as
/// iommufd does: overlap, cutting native unmaps (with their partial effect), cut-unmaps,
/// unmaps of nothing. Each step's result (bytes or errno) is compared.
fn fake_kernel_rules_match_the_real_kernel() -> Result<(), Failed> {
    use support::edu_raw::{memfd, RawEdu, RawIommufd};
    use support::raw::{self as sys, iommufd_uapi as iu};
    let bdf = pci::edu_devices()
        .into_iter()
        .nth(1)
        .or_else(|| pci::edu_devices().into_iter().next())
        .ok_or("no edu")?;
    pci::bind_vfio_pci(&bdf).or_fail("bind")?;
    let iommufd = RawIommufd::open().or_fail("iommufd")?;
    // Compat IOAS with huge pages off, as the Cut strategy uses it.
    let mut o: iu::iommu_option = sys::zeroed();
    o.size = std::mem::size_of_val(&o) as u32;
    o.option_id = iu::iommufd_option_IOMMU_OPTION_HUGE_PAGES;
    o.op = iu::iommufd_option_ops_IOMMU_OPTION_OP_SET as u16;
    o.object_id = iommufd.ioas;
    o.val64 = 0;
    sys::ioctl_mut(iommufd.fd.as_fd(), sys::IOMMU_OPTION, &mut o).or_fail("huge pages off")?;
    let mut v: iu::iommu_vfio_ioas = sys::zeroed();
    v.size = std::mem::size_of_val(&v) as u32;
    v.ioas_id = iommufd.ioas;
    v.op = iu::iommufd_vfio_ioas_op_IOMMU_VFIO_IOAS_SET as u16;
    sys::ioctl_mut(iommufd.fd.as_fd(), sys::IOMMU_VFIO_IOAS, &mut v).or_fail("set compat")?;
    let _edu = RawEdu::open(&pci::vfio_cdev(&bdf).or_fail("cdev")?, &iommufd).or_fail("attach")?;
    let kernel = RawKernel {
        iommufd,
        memfd: memfd("rules", 64 * PAGE).or_fail("memfd")?,
    };
    let mut fake = vfio_gmem::dma::FakeKernel::new();
    use Step::*;
    let script = [
        Map(0, 8),
        Map(4, 1),
        Native(2, 2),
        Cut(2, 2),
        Cut(2, 2),
        Native(2, 2),
        Native(0, 8),
        Map(0, 1),
        Map(1, 1),
        Map(2, 1),
        Native(0, 3),
        Map(10, 2),
        Map(12, 2),
        Native(11, 3),
        Native(10, 4),
        Map(20, 1),
        Map(21, 2),
        Native(20, 2),
        Native(20, 1),
        Native(21, 2),
        Map(30, 8),
        Cut(29, 2),
        Cut(37, 3),
        Native(31, 6),
        Cut(30, 1),
        Map(40, 4),
        Map(44, 4),
        Cut(42, 4),
        Native(40, 2),
        Native(46, 2),
        Cut(40, 8),
    ];
    for (i, step) in script.into_iter().enumerate() {
        let (k, f) = (kernel.call(step), fake_call(&mut fake, step));
        check!(k == f, "step {i} {step:?}: kernel {k:?}, fake {f:?}");
    }
    eprintln!("{} calls: fake == kernel at every step", script.len());
    Ok(())
}

/// The legacy VFIO type1 backend behind the same DmaSpace: VA mappings only, one area per
/// granule, conversions proven with DMA through a device fd from the group.
fn legacy_container_space_maps_by_va_per_granule() -> Result<(), Failed> {
    use vfio_gmem::mapper::Backend;
    use vfio_gmem::vfio::{Bdf, Container, Group, PciSysfs};
    let bdf = pci::edu_devices()
        .into_iter()
        .next()
        .ok_or("no edu device")?;
    pci::bind_vfio_pci(&bdf).or_fail("bind edu to vfio-pci")?;
    let bdf: Bdf = bdf.parse().or_fail("bdf")?;
    let group_id = PciSysfs::new()
        .device(bdf)
        .or_fail("sysfs")?
        .iommu_group
        .ok_or("no IOMMU group")?;
    let group = Group::open(group_id).or_fail("open group")?;
    let container = Container::open().or_fail("open container")?;
    container.add_group(&group).or_fail("add group")?;
    let edu = Edu::new(group.device(bdf).or_fail("device fd")?).or_fail("edu")?;

    let len = 16 * PAGE;
    // Debian's kernel has no SW_PROTECTED VM: the IOMMU half alone, as the CLI does there.
    let vm = match Need::PrivateMemory.unmet() {
        None => Some(arc_vm(VmType::SwProtected)?),
        Some(why) => {
            eprintln!("note: without a KVM VM ({why}): conversions on the IOMMU only");
            None
        }
    };
    let shared = Memfd::new("vm-dma-legacy", len).or_fail("memfd")?;
    let mut view = shared.mmap().or_fail("mmap")?;
    let mut space = DmaSpace::with_mapper(Box::new(container), vm, SpaceOptions::default());
    check!(
        space.backend() == Backend::LegacyType1,
        "backend {}",
        space.backend()
    );
    space
        .add_region(
            GuestRegion::new(
                GPA,
                len,
                SharedMemory::File {
                    fd: dup(shared.file())?,
                    offset: 0,
                },
            )
            .convertible(PageState::Shared),
        )
        .or_fail("add region")?;
    let r = &space.regions()[0];
    check!(
        matches!(r.path, MapPath::VirtualAddress { .. }) && r.strategy == Strategy::PerGranule,
        "legacy region {r:?}"
    );
    check!(r.areas == 16, "one area per 4 KiB granule, got {}", r.areas);
    // The space maps its own mmap of the memfd; the test's view is a second mapping of
    // the same pages, so DMA results show up there.
    space
        .convert(GPA + 4 * PAGE, 2 * PAGE, PageState::Private, false)
        .or_fail("to private")?;
    dma_refused(&edu, &mut view, (4 * PAGE) as usize, GPA + 4 * PAGE)?;
    dma_works(&edu, &mut view, (6 * PAGE) as usize, GPA + 6 * PAGE, 1)?;
    space
        .convert(GPA + 4 * PAGE, 2 * PAGE, PageState::Shared, false)
        .or_fail("to shared")?;
    dma_works(&edu, &mut view, (4 * PAGE) as usize, GPA + 4 * PAGE, 2)?;
    drop(space);
    drop(group);
    Ok(())
}

/// The kernel refuses the last call of a batch (an obstacle mapped at the IOVA the batch
/// wants to map): everything the batch did is undone, the error says so, DMA shows the
/// pages as before, and the same batch succeeds once the obstacle is gone.
fn kernel_failure_mid_batch_rolls_back() -> Result<(), Failed> {
    use vfio_gmem::dma::Outcome;
    use vfio_gmem::mapper::{Access, Iova};
    let len = 16 * PAGE;
    let (mut space, edu, _shared, mut view) = confidential_setup(SpaceOptions::default(), len)?;
    space
        .convert(GPA + 10 * PAGE, PAGE, PageState::Private, false)
        .or_fail("page 10 private")?;
    let obstacle = Memfd::new("obstacle", PAGE).or_fail("memfd")?;
    let ioas = space.ioas().ok_or("iommufd space has an IOAS")?;
    ioas.map_file(
        Iova::Fixed(GPA + 10 * PAGE),
        obstacle.file().as_fd(),
        0,
        PAGE,
        Access::READ_WRITE,
    )
    .or_fail("obstacle")?;
    let areas = space.area_count();
    let reqs = [
        ConversionRequest::new(GPA + 3 * PAGE, PAGE, PageState::Private),
        ConversionRequest::new(GPA + 10 * PAGE, PAGE, PageState::Shared),
    ];
    match space.convert_batch(&reqs) {
        Err(SpaceError::Exec { source, .. }) => {
            check!(
                matches!(source.outcome, Outcome::RolledBack),
                "outcome {:?}",
                source.outcome
            );
            check!(
                source.error.errno == libc::EEXIST,
                "expected EEXIST from the map, got {}",
                source.error
            );
            eprintln!(
                "mid-batch failure reported as: {}",
                source
                    .error
                    .cause()
                    .map(|c| c.to_string())
                    .unwrap_or_default()
            );
        }
        other => {
            return Err(format!(
                "the batch should fail on the obstacle: {:?}",
                other.map(|_| ())
            )
            .into())
        }
    }
    check!(
        space.page_state(GPA + 3 * PAGE) == Some(PageState::Shared),
        "page 3 not rolled back to shared"
    );
    check!(
        space.page_state(GPA + 10 * PAGE) == Some(PageState::Private),
        "page 10 not rolled back to private"
    );
    // Page 3 was cut out of its area and mapped back as its own: two more areas.
    check!(
        space.area_count() == areas + 2,
        "areas {areas} → {}",
        space.area_count()
    );
    dma_works(&edu, &mut view, (3 * PAGE) as usize, GPA + 3 * PAGE, 3)?;
    let ioas = space.ioas().ok_or("IOAS")?;
    ioas.unmap(GPA + 10 * PAGE, PAGE)
        .or_fail("remove obstacle")?;
    space
        .convert_batch(&reqs)
        .or_fail("the same batch without the obstacle")?;
    dma_refused(&edu, &mut view, (3 * PAGE) as usize, GPA + 3 * PAGE)?;
    dma_works(&edu, &mut view, (10 * PAGE) as usize, GPA + 10 * PAGE, 10)?;
    Ok(())
}
