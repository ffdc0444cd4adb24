//! The DMA space on the real kernel (VM): guest memory on guest_memfd and memfd, mapping
//! paths, private/shared conversions, each proven with the edu device's DMA.

mod support;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use libtest_mimic::Failed;
use support::dma_engine::DmaEngine;
use support::edu::Edu;
use support::{pci, run_vm_tests, OrFail};
use vfio_gmem::dma::{
    ConversionRequest, CutSupport, DmaSpace, GuestRegion, MapPath, PageState, SharedMemory,
    SpaceError, SpaceOptions, Strategy,
};
use vfio_gmem::gmem::{GmemFlags, KvmVm, MappedMemory, Memfd, VmType};
use vfio_gmem::iommufd::Iommufd;
use vfio_gmem::vfio::Device;

fn main() {
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
        (
            "conversions_on_a_thread_never_fault_neighbours",
            conversions_on_a_thread_never_fault_neighbours,
        ),
        ("bad_input_changes_nothing", bad_input_changes_nothing),
    ]);
}

const PAGE: u64 = 4096;
const GPA: u64 = 0x1_0000_0000;

/// An edu device attached to a fresh space.
fn space_with_edu(
    vm: Option<KvmVm<Arc<kvm_ioctls::VmFd>>>,
    options: SpaceOptions,
) -> Result<(DmaSpace, Edu), Failed> {
    let bdf = pci::edu_devices()
        .into_iter()
        .next()
        .ok_or("no edu device")?;
    pci::bind_vfio_pci(&bdf).or_fail("bind edu to vfio-pci")?;
    let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
    let mut space = DmaSpace::iommufd(&iommufd, vm, options).or_fail("create DMA space")?;
    let dev = Device::open_cdev(pci::vfio_cdev(&bdf).or_fail("cdev")?).or_fail("open edu")?;
    space.attach(&dev).or_fail("attach edu")?;
    Ok((space, Edu::new(dev).or_fail("edu driver")?))
}

fn arc_vm(vm_type: VmType) -> Result<KvmVm<Arc<kvm_ioctls::VmFd>>, Failed> {
    let vm = KvmVm::create(vm_type).or_fail("create VM")?;
    Ok(KvmVm::from_vm_fd(Arc::new(vm.into_inner()), Some(vm_type)))
}

fn dup(fd: impl AsFd) -> Result<OwnedFd, Failed> {
    fd.as_fd().try_clone_to_owned().or_fail("dup fd")
}

/// Proves with DMA that the page at `iova` (seen by the CPU at `view[off..]`) is mapped:
/// RAM → device → RAM with the RAM changed in between.
fn dma_works(
    edu: &Edu,
    view: &mut MappedMemory,
    off: usize,
    iova: u64,
    seed: u8,
) -> Result<(), Failed> {
    let pattern: Vec<u8> = (0..PAGE as usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    view.write(off, &pattern).or_fail("write pattern")?;
    edu.dma_from_ram(iova, PAGE).or_fail("DMA RAM→device")?;
    view.fill(off, PAGE as usize, 0).or_fail("clear")?;
    edu.dma_to_ram(iova, PAGE).or_fail("DMA device→RAM")?;
    let back = view.read_vec(off, PAGE as usize).or_fail("read back")?;
    check!(
        back == pattern,
        "DMA round trip through IOVA {iova:#x} did not return the pattern"
    );
    Ok(())
}

/// Proves the device cannot write the page at `iova`: memory stays as it was.
fn dma_refused(edu: &Edu, view: &mut MappedMemory, off: usize, iova: u64) -> Result<(), Failed> {
    // Load the device buffer with a pattern that differs from the RAM's.
    view.fill(off, PAGE as usize, 0xa5).or_fail("fill")?;
    edu.dma_to_ram(iova, PAGE).or_fail("DMA device→RAM")?;
    let after = view.read_vec(off, PAGE as usize).or_fail("read")?;
    check!(
        after.iter().all(|&b| b == 0xa5),
        "device wrote IOVA {iova:#x}, which must be unmapped"
    );
    Ok(())
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
        r.id == id.0 && r.strategy == "whole" && r.areas == 1,
        "expected one whole-region area: {r:?}"
    );
    match &r.path {
        MapPath::VirtualAddress { reason } => check!(
            reason.contains("cannot pin"),
            "VA fallback reason: {reason}"
        ),
        p => return Err(format!("guest_memfd must fall back to VA on 7.3, got {p}").into()),
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
    let old = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").or_fail("nr_hugepages")?;
    std::fs::write("/proc/sys/vm/nr_hugepages", "4").or_fail("reserve huge pages")?;
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
    std::fs::write("/proc/sys/vm/nr_hugepages", old.trim()).or_fail("restore nr_hugepages")?;
    result
}

/// SW_PROTECTED VM: gmem private backing, memfd shared backing, real attributes.
fn confidential_setup(
    options: SpaceOptions,
    len: u64,
) -> Result<(DmaSpace, Edu, Memfd, MappedMemory), Failed> {
    let vm = arc_vm(VmType::SwProtected)?;
    let _private = vm
        .create_guest_memfd(len, GmemFlags::MMAP)
        .or_fail("private gmem")?;
    let shared = Memfd::new("vm-dma-shared", len).or_fail("memfd")?;
    let view = shared.mmap().or_fail("mmap")?;
    let (mut space, edu) = space_with_edu(Some(vm), options)?;
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
    Ok((space, edu, shared, view))
}

fn confidential_conversions_cut_exactly() -> Result<(), Failed> {
    let len = 64 * PAGE;
    let (mut space, edu, _shared, mut view) = confidential_setup(SpaceOptions::default(), len)?;
    check!(
        *space.cut_support() == CutSupport::Verified,
        "cut probe: {:?}",
        space.cut_support()
    );
    check!(
        space.regions()[0].strategy == "cut",
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
    let id = vfio_gmem::dma::RegionId(space.regions()[0].id);
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

fn conversions_on_a_thread_never_fault_neighbours() -> Result<(), Failed> {
    let len = 16 * PAGE;
    let (space, edu, _shared, mut view) = confidential_setup(SpaceOptions::default(), len)?;
    let space = Arc::new(Mutex::new(space));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (space, stop) = (space.clone(), stop.clone());
        std::thread::spawn(move || -> Result<u32, String> {
            let mut rounds = 0;
            // Pages 2..=5 and 10..=13 flip; 0, 1, 6..=9, 14, 15 stay shared throughout.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (first, to) in [
                    (2, PageState::Private),
                    (10, PageState::Private),
                    (2, PageState::Shared),
                    (10, PageState::Shared),
                ] {
                    space
                        .lock()
                        .unwrap()
                        .convert(GPA + first * PAGE, 4 * PAGE, to, false)
                        .map_err(|e| e.to_string())?;
                }
                rounds += 1;
            }
            Ok(rounds)
        })
    };
    let mut dmas = 0;
    let t0 = std::time::Instant::now();
    while t0.elapsed().as_secs() < 6 || dmas < 8 {
        for p in [0u64, 7, 15] {
            dma_works(
                &edu,
                &mut view,
                (p * PAGE) as usize,
                GPA + p * PAGE,
                dmas as u8,
            )?;
            dmas += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = worker.join().map_err(|_| "worker panicked")??;
    check!(rounds > 0, "the converting thread made no progress");
    eprintln!("{dmas} DMAs to steady shared pages during {rounds} conversion rounds: all landed");
    let space = space.lock().unwrap();
    for p in 0..16 {
        check!(
            space.page_state(GPA + p * PAGE) == Some(PageState::Shared),
            "page {p} should end shared"
        );
    }
    Ok(())
}

fn err<T>(r: Result<T, SpaceError>) -> String {
    r.err().map(|e| e.to_string()).unwrap_or_default()
}

fn bad_input_changes_nothing() -> Result<(), Failed> {
    let len = 16 * PAGE;
    let (mut space, _edu, shared, _view) = confidential_setup(SpaceOptions::default(), len)?;
    let before = (space.area_count(), space.totals().ioctls);
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
    let efd = vfio_gmem::vfio::EventFd::new().or_fail("eventfd")?;
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
    check!(
        (space.area_count(), space.totals().ioctls) == before,
        "bad input changed state: {before:?} → {:?}",
        (space.area_count(), space.totals().ioctls)
    );
    Ok(())
}
