//! The iommufd layer against a real kernel (VM): every claim is proved by edu device DMA
//! through the emulated IOMMU (intel-iommu or virtio-iommu).

mod support;

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use libtest_mimic::Failed;
use support::edu_raw::{memfd, Mapping, RawEdu};
use support::needs::{self, Need};
use support::raw::{self as sys, iommufd_uapi as iu};
use support::{pci, run_vm_tests, OrFail};
use vfio_gmem::iommufd::{
    AreaRecord, Error, HwInfoType, Hwpt, HwptFlags, Ioas, Iommufd, RlimitMode, Span,
};
use vfio_gmem::mapper::{Access, Backend, DmaMapper, Iova, MapError};

/// What the running kernel must offer (see `support::needs`); unmet: reported skipped.
const NEEDS: needs::Needs = &[("*", &[Need::Iommufd])];

fn main() {
    needs::declare(NEEDS);
    run_vm_tests(&[
        (
            "va_and_file_round_trip_then_unmapped_refused",
            va_and_file_round_trip_then_unmapped_refused,
        ),
        ("kernel_chosen_iova_and_copy", kernel_chosen_iova_and_copy),
        (
            "partial_unmap_is_refused_and_area_stays_mapped",
            partial_unmap_is_refused_and_area_stays_mapped,
        ),
        (
            "record_off_is_one_ioctl_and_kernel_unmaps_partially",
            record_off_is_one_ioctl_and_kernel_unmaps_partially,
        ),
        (
            "compat_cut_unmap_removes_exactly_the_middle",
            compat_cut_unmap_removes_exactly_the_middle,
        ),
        (
            "map_file_of_guest_memfd_is_explained",
            map_file_of_guest_memfd_is_explained,
        ),
        (
            "hwpt_alloc_attach_and_hw_info",
            hwpt_alloc_attach_and_hw_info,
        ),
        ("memlock_limit_is_explained", memlock_limit_is_explained),
        ("rlimit_mode_and_fd_adoption", rlimit_mode_and_fd_adoption),
    ]);
}

const PAGE: u64 = 4096;
const BASE: u64 = 0x1_0000_0000;

/// Opens /dev/iommu and binds the first edu device to it (not attached).
fn setup() -> Result<(Arc<Iommufd>, RawEdu), Failed> {
    let bdf = pci::edu_devices()
        .into_iter()
        .next()
        .ok_or("no edu device")?;
    pci::bind_vfio_pci(&bdf).or_fail("bind edu to vfio-pci")?;
    let cdev = pci::vfio_cdev(&bdf).or_fail("vfio cdev")?;
    let iommufd = Arc::new(Iommufd::open().or_fail("Iommufd::open")?);
    let edu = RawEdu::open_bound(&cdev, iommufd.as_fd()).or_fail("open edu cdev + bind")?;
    Ok((iommufd, edu))
}

fn vm_pin_kib() -> u64 {
    support::space::status_kib("VmPin")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// RAM → device → RAM through `iova`, with `ram` (what `iova` maps) changed in between.
fn round_trip(edu: &RawEdu, iova: u64, ram: &mut [u8], seed: u8) -> Result<(), Failed> {
    let p = pattern(seed, ram.len());
    ram.copy_from_slice(&p);
    edu.dma_from_ram(iova, ram.len() as u64)
        .or_fail("DMA RAM→device")?;
    ram.fill(0x55);
    edu.dma_to_ram(iova, ram.len() as u64)
        .or_fail("DMA device→RAM")?;
    check!(
        ram[..] == p[..],
        "DMA round trip through IOVA {iova:#x} did not return the pattern"
    );
    Ok(())
}

/// Loads the device buffer with `seed`'s pattern from a mapped page (`src_iova`/`src`).
fn load_device(edu: &RawEdu, src_iova: u64, src: &mut [u8], seed: u8) -> Result<Vec<u8>, Failed> {
    let p = pattern(seed, src.len());
    src.copy_from_slice(&p);
    edu.dma_from_ram(src_iova, src.len() as u64)
        .or_fail("DMA RAM→device")?;
    Ok(p)
}

/// Device → RAM at `iova` whose memory is `ram`: true if the device's bytes (`want`) got
/// there, false if memory kept its 0xaa fill (the IOMMU refused).
fn device_write_lands(
    edu: &RawEdu,
    iova: u64,
    ram: &mut [u8],
    want: &[u8],
) -> Result<bool, Failed> {
    ram.fill(0xaa);
    edu.dma_to_ram(iova, ram.len() as u64)
        .or_fail("DMA device→RAM")?;
    if ram[..] == want[..] {
        Ok(true)
    } else if ram.iter().all(|&b| b == 0xaa) {
        Ok(false)
    } else {
        Err(format!("IOVA {iova:#x}: memory neither unchanged nor the device's data").into())
    }
}

/// Expect an explained iommufd error and return it.
fn expect_err<T: std::fmt::Debug>(r: Result<T, Error>, what: &str) -> Result<Error, Failed> {
    match r {
        Ok(v) => Err(format!("{what}: succeeded ({v:?}), expected an error").into()),
        Err(e) => {
            eprintln!("  {what}: {e}");
            Ok(e)
        }
    }
}

fn va_and_file_round_trip_then_unmapped_refused() -> Result<(), Failed> {
    let (iommufd, edu) = setup()?;
    let ioas = Ioas::new(&iommufd).or_fail("Ioas::new")?;
    edu.attach(ioas.id()).or_fail("attach to IOAS")?;
    let ranges = ioas.iova_ranges().or_fail("iova_ranges")?;
    eprintln!(
        "  IOVA ranges {:x?}, alignment {:#x}",
        ranges.ranges, ranges.alignment
    );
    check!(
        !ranges.ranges.is_empty(),
        "IOMMU_IOAS_IOVA_RANGES returned no range"
    );
    check!(
        ranges
            .ranges
            .iter()
            .any(|r| r.contains(&BASE) && r.contains(&(BASE + 16 * PAGE))),
        "test IOVA {BASE:#x} is outside the usable ranges {:x?}",
        ranges.ranges
    );

    // By VA: a memfd's second page through its mmap.
    let va_mem = memfd("va", 2 * PAGE).or_fail("memfd")?;
    let va_map = Mapping::new(&va_mem, 0, 2 * PAGE as usize).or_fail("mmap")?;
    // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
    // its IOAS/container gone, before the memory is).
    let iova = unsafe {
        ioas.map_user(
            Iova::Fixed(BASE),
            va_map.addr() + PAGE,
            PAGE,
            Access::READ_WRITE,
        )
    }
    .or_fail("map_user")?;
    check!(
        iova == BASE,
        "map_user returned {iova:#x}, asked for {BASE:#x}"
    );
    round_trip(&edu, BASE, &mut va_map.bytes()[PAGE as usize..], 1)?;

    // By fd+offset: another memfd's second page.
    let f_mem = memfd("file", 2 * PAGE).or_fail("memfd")?;
    let f_map = Mapping::new(&f_mem, 0, 2 * PAGE as usize).or_fail("mmap")?;
    let fiova = BASE + 4 * PAGE;
    ioas.map_file(
        Iova::Fixed(fiova),
        f_mem.as_fd(),
        PAGE,
        PAGE,
        Access::READ_WRITE,
    )
    .or_fail("map_file")?;
    round_trip(&edu, fiova, &mut f_map.bytes()[PAGE as usize..], 2)?;

    // Overlap is explained and changes nothing.
    let (areas, pin) = (ioas.areas(), vm_pin_kib());
    let e = expect_err(
        // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
        // its IOAS/container gone, before the memory is).
        unsafe { ioas.map_user(Iova::Fixed(BASE), va_map.addr(), PAGE, Access::READ_WRITE) },
        "overlapping map",
    )?;
    check!(
        matches!(e, Error::Overlap { existing: Some(a), .. } if a == Span::new(BASE, PAGE)),
        "overlap: {e:?}"
    );
    check!(
        e.errno() == Some(libc::EEXIST),
        "overlap errno {:?}",
        e.errno()
    );
    check!(
        ioas.areas() == areas && vm_pin_kib() == pin,
        "the refused overlapping map changed areas {areas:?} → {:?} or VmPin {pin} → {} KiB",
        ioas.areas(),
        vm_pin_kib()
    );
    // The existing mapping still reaches the page it mapped (not the one offered).
    round_trip(&edu, BASE, &mut va_map.bytes()[PAGE as usize..], 4)?;

    // Unmap the VA page; a device write to it must be refused, memory unchanged.
    check!(
        ioas.unmap(BASE, PAGE).or_fail("unmap")? == PAGE,
        "unmap byte count"
    );
    let want = load_device(&edu, fiova, &mut f_map.bytes()[PAGE as usize..], 3)?;
    let faults = pci::iommu_fault_count();
    let landed = device_write_lands(&edu, BASE, &mut va_map.bytes()[PAGE as usize..], &want)?;
    check!(!landed, "device wrote to an unmapped IOVA");
    eprintln!(
        "  IOMMU faults logged: {} → {}",
        faults,
        pci::iommu_fault_count()
    );
    // Unmapping what is no longer there is explained.
    let e = expect_err(ioas.unmap(BASE, PAGE), "unmap of an empty range")?;
    check!(matches!(e, Error::NotMapped { .. }), "{e:?}");

    // The trait view of the same IOAS.
    let m: &dyn DmaMapper = &ioas;
    check!(
        m.backend() == Backend::Iommufd && m.can_map_file(),
        "DmaMapper identity"
    );
    check!(
        m.unmap_all().or_fail("unmap_all")? == PAGE,
        "unmap_all byte count"
    );
    check!(
        ioas.areas().is_empty(),
        "areas left after unmap_all: {:?}",
        ioas.areas()
    );
    Ok(())
}

fn kernel_chosen_iova_and_copy() -> Result<(), Failed> {
    let (iommufd, edu) = setup()?;
    let a = Ioas::new(&iommufd).or_fail("Ioas::new a")?;
    let b = Ioas::new(&iommufd).or_fail("Ioas::new b")?;
    edu.attach(a.id()).or_fail("attach to a")?;
    let mem = memfd("any", PAGE).or_fail("memfd")?;
    let map = Mapping::new(&mem, 0, PAGE as usize).or_fail("mmap")?;
    // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
    // its IOAS/container gone, before the memory is).
    let iova = unsafe { a.map_user(Iova::Any, map.addr(), PAGE, Access::READ_WRITE) }
        .or_fail("map_user(Iova::Any)")?;
    eprintln!("  kernel chose IOVA {iova:#x}");
    let r = a.iova_ranges().or_fail("iova_ranges")?;
    check!(
        r.ranges.iter().any(|x| x.contains(&iova)),
        "chosen IOVA {iova:#x} outside {:x?}",
        r.ranges
    );
    round_trip(&edu, iova, map.bytes(), 4)?;

    // Copy a's area into b at a fixed IOVA, move the device to b, DMA through the copy.
    let biova = b
        .copy_from(&a, iova, PAGE, Iova::Fixed(BASE), Access::READ_WRITE)
        .or_fail("copy_from")?;
    check!(biova == BASE, "copy placed at {biova:#x}");
    edu.attach(b.id()).or_fail("re-attach to b")?; // replaces the attachment
    round_trip(&edu, BASE, map.bytes(), 5)?;
    // b no longer reaches a's IOVA (unless the same): prove on a's IOVA if it differs.
    if iova != BASE {
        let want = load_device(&edu, BASE, map.bytes(), 6)?;
        check!(
            !device_write_lands(&edu, iova, map.bytes(), &want)?,
            "b reached a's IOVA"
        );
    }
    check!(
        b.unmap(BASE, PAGE).or_fail("unmap b")? == PAGE,
        "unmap b bytes"
    );
    edu.detach().or_fail("detach")?;
    check!(
        a.unmap(iova, PAGE).or_fail("unmap a")? == PAGE,
        "unmap a bytes"
    );
    Ok(())
}

fn partial_unmap_is_refused_and_area_stays_mapped() -> Result<(), Failed> {
    let (iommufd, edu) = setup()?;
    let ioas = Ioas::new(&iommufd).or_fail("Ioas::new")?;
    edu.attach(ioas.id()).or_fail("attach")?;
    let mem = memfd("partial", 4 * PAGE).or_fail("memfd")?;
    let map = Mapping::new(&mem, 0, 4 * PAGE as usize).or_fail("mmap")?;
    ioas.map_file(
        Iova::Fixed(BASE),
        mem.as_fd(),
        0,
        4 * PAGE,
        Access::READ_WRITE,
    )
    .or_fail("map_file 4 pages")?;

    // The library refuses before the kernel changes anything, naming the area.
    let areas = ioas.areas();
    let e = expect_err(ioas.unmap(BASE + PAGE, PAGE), "partial unmap")?;
    check!(
        matches!(e, Error::PartialUnmap { area: Some(a), .. } if a == Span::new(BASE, 4 * PAGE)),
        "{e:?}"
    );
    check!(e.errno() == Some(libc::ENOENT), "errno {:?}", e.errno());
    let msg = e.to_string();
    check!(
        msg.contains("does not split areas")
            && msg.contains("split_unmap")
            && msg.contains("cut_unmap"),
        "message: {msg}"
    );
    // Through the trait the same error arrives explained.
    let me: MapError = DmaMapper::unmap(&ioas, BASE + PAGE, PAGE)
        .err()
        .ok_or("trait unmap succeeded")?;
    check!(
        me.errno() == Some(libc::ENOENT) && me.explained::<Error>().is_some(),
        "{me:?}"
    );

    // The kernel itself refuses the cut with ENOENT (raw ioctl, bypassing the check).
    let mut u: iu::iommu_ioas_unmap = sys::zeroed();
    u.size = std::mem::size_of_val(&u) as u32;
    u.ioas_id = ioas.id();
    u.iova = BASE + PAGE;
    u.length = PAGE;
    let r = sys::ioctl_mut(iommufd.as_fd(), sys::IOMMU_IOAS_UNMAP, &mut u);
    check!(
        r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::ENOENT),
        "raw IOMMU_IOAS_UNMAP of a cut: {r:?}, expected ENOENT"
    );

    check!(
        ioas.areas() == areas,
        "refused partial unmaps changed the areas: {areas:?} → {:?}",
        ioas.areas()
    );
    // Still mapped: DMA through every page, including the one asked to go.
    for i in 0..4u64 {
        let page = &mut map.bytes()[(i * PAGE) as usize..((i + 1) * PAGE) as usize];
        round_trip(&edu, BASE + i * PAGE, &mut page[..256], 10 + i as u8)?;
    }
    check!(
        ioas.unmap(BASE, 4 * PAGE).or_fail("whole unmap")? == 4 * PAGE,
        "whole unmap bytes"
    );
    Ok(())
}

/// `AreaRecord::Off`: maps and whole-area unmaps work as with the record, nothing is
/// recorded, and a range that cuts an area reaches the kernel, which unmaps the whole
/// areas before the cut one and then refuses: the documented price of turning it off.
fn record_off_is_one_ioctl_and_kernel_unmaps_partially() -> Result<(), Failed> {
    let (iommufd, edu) = setup()?;
    let ioas = Ioas::with_record(&iommufd, AreaRecord::Off).or_fail("Ioas::with_record")?;
    check!(ioas.area_record() == AreaRecord::Off, "record mode");
    edu.attach(ioas.id()).or_fail("attach")?;
    let mem = memfd("record-off", 4 * PAGE).or_fail("memfd")?;
    let map = Mapping::new(&mem, 0, 4 * PAGE as usize).or_fail("mmap")?;
    let rw = Access::READ_WRITE;
    // Area A = page 0, area B = pages 1..4.
    ioas.map_file(Iova::Fixed(BASE), mem.as_fd(), 0, PAGE, rw)
        .or_fail("map A")?;
    ioas.map_file(Iova::Fixed(BASE + PAGE), mem.as_fd(), PAGE, 3 * PAGE, rw)
        .or_fail("map B")?;
    check!(
        ioas.areas().is_empty(),
        "no record kept: {:?}",
        ioas.areas()
    );
    round_trip(&edu, BASE, &mut map.bytes()[..256], 1)?;

    // Nothing mapped in the range: the kernel's ENOENT, which it also gives for a cut.
    let e = expect_err(ioas.unmap(BASE + 16 * PAGE, PAGE), "unmap of nothing")?;
    check!(matches!(e, Error::UnmapRefused { .. }), "{e:?}");

    // [A, first page of B]: the kernel unmaps A, then refuses to cut B.
    let e = expect_err(ioas.unmap(BASE, 2 * PAGE), "cutting unmap")?;
    check!(matches!(e, Error::UnmapRefused { .. }), "{e:?}");
    check!(e.errno() == Some(libc::ENOENT), "errno {:?}", e.errno());
    // B still works (it loads the device), A is gone (the device's write is refused).
    let b = PAGE as usize;
    let want = load_device(&edu, BASE + PAGE, &mut map.bytes()[b..b + 256], 2)?;
    let reached = device_write_lands(&edu, BASE, &mut map.bytes()[..256], &want)?;
    check!(
        !reached,
        "area A is still mapped after the kernel's partial unmap"
    );
    check!(
        ioas.unmap(BASE + PAGE, 3 * PAGE).or_fail("unmap B")? == 3 * PAGE,
        "unmap B bytes"
    );
    Ok(())
}

fn compat_cut_unmap_removes_exactly_the_middle() -> Result<(), Failed> {
    let (iommufd, edu) = setup()?;
    let ioas = Ioas::new(&iommufd).or_fail("Ioas::new")?;
    check!(
        ioas.huge_pages().or_fail("huge_pages")?,
        "huge pages off by default?"
    );

    // The preconditions are checked and explained.
    let e = expect_err(ioas.cut_unmap(BASE, PAGE), "cut on a non-compat IOAS")?;
    check!(
        matches!(e, Error::NotCompatIoas { current: None, .. }),
        "{e:?}"
    );
    ioas.set_compat().or_fail("set_compat")?;
    check!(
        ioas.is_compat().or_fail("is_compat")?,
        "not compat after set_compat"
    );
    let e = expect_err(ioas.cut_unmap(BASE, PAGE), "cut with huge pages on")?;
    check!(matches!(e, Error::CutNeedsSmallPages { .. }), "{e:?}");

    ioas.set_huge_pages(false)
        .or_fail("set_huge_pages(false)")?;
    check!(
        !ioas.huge_pages().or_fail("huge_pages")?,
        "huge pages still on"
    );
    edu.attach(ioas.id()).or_fail("attach")?;

    let mem = memfd("cut", 8 * PAGE).or_fail("memfd")?;
    let map = Mapping::new(&mem, 0, 8 * PAGE as usize).or_fail("mmap")?;
    ioas.map_file(
        Iova::Fixed(BASE),
        mem.as_fd(),
        0,
        8 * PAGE,
        Access::READ_WRITE,
    )
    .or_fail("map_file 8 pages as one area")?;
    // Too late to turn huge pages off now: explained.
    ioas.set_huge_pages(true).or_fail("set_huge_pages(true)")?;
    let e = expect_err(
        ioas.set_huge_pages(false),
        "disable huge pages while mapped",
    )?;
    check!(matches!(e, Error::HugePagesLocked { .. }), "{e:?}");
    // Re-enabling made the IOAS refuse cuts again; the area itself is unchanged, and
    // turning them off again is what the kernel refuses. Use a fresh IOAS state instead:
    // unmap, disable, map again.
    check!(
        ioas.unmap_all().or_fail("unmap_all")? == 8 * PAGE,
        "unmap_all bytes"
    );
    ioas.set_huge_pages(false)
        .or_fail("set_huge_pages(false) on an empty IOAS")?;
    ioas.map_file(
        Iova::Fixed(BASE),
        mem.as_fd(),
        0,
        8 * PAGE,
        Access::READ_WRITE,
    )
    .or_fail("map_file 8 pages again")?;

    let cut = ioas
        .cut_unmap(BASE + 2 * PAGE, 2 * PAGE)
        .or_fail("cut_unmap pages 2,3")?;
    check!(
        cut == 2 * PAGE,
        "cut_unmap reported {cut:#x} bytes, expected {:#x}",
        2 * PAGE
    );
    check!(
        ioas.areas()
            == vec![
                Span::new(BASE, 2 * PAGE),
                Span::new(BASE + 4 * PAGE, 4 * PAGE)
            ],
        "areas after the cut: {:?}",
        ioas.areas()
    );

    // DMA: the device's data lands on pages 0,1,4..7 and is refused on pages 2,3.
    let mut src = [0u8; 256];
    let src_page = &mut map.bytes()[..256];
    let want = load_device(&edu, BASE, src_page, 20)?;
    src.copy_from_slice(&want);
    for i in 0..8u64 {
        let page = &mut map.bytes()[(i * PAGE) as usize..(i * PAGE) as usize + 256];
        let landed = device_write_lands(&edu, BASE + i * PAGE, page, &src)?;
        let expect = !(2..4).contains(&i);
        check!(
            landed == expect,
            "page {i}: device write landed={landed}, expected {expect}"
        );
    }

    // The pieces are separate areas: native unmaps of exactly them succeed.
    check!(
        ioas.unmap(BASE, 2 * PAGE).or_fail("unmap [0,2)")? == 2 * PAGE,
        "[0,2) bytes"
    );
    check!(
        ioas.unmap(BASE + 4 * PAGE, 4 * PAGE)
            .or_fail("unmap [4,8)")?
            == 4 * PAGE,
        "[4,8) bytes"
    );
    check!(ioas.areas().is_empty(), "areas left: {:?}", ioas.areas());
    iommufd.clear_compat_ioas().or_fail("clear_compat_ioas")?;
    check!(
        iommufd.compat_ioas_id().or_fail("compat id")?.is_none(),
        "compat IOAS still set"
    );
    Ok(())
}

fn map_file_of_guest_memfd_is_explained() -> Result<(), Failed> {
    let (iommufd, edu) = setup()?;
    let ioas = Ioas::new(&iommufd).or_fail("Ioas::new")?;
    edu.attach(ioas.id()).or_fail("attach")?;
    let kvm = kvm_ioctls::Kvm::new().or_fail("open /dev/kvm")?;
    let vm = kvm.create_vm().or_fail("KVM_CREATE_VM")?;
    let gmem = kvm_bindings::kvm_create_guest_memfd {
        size: 2 * PAGE,
        flags: 0,
        reserved: [0; 6],
    };
    let raw = vm
        .create_guest_memfd(gmem)
        .or_fail("KVM_CREATE_GUEST_MEMFD")?;
    // SAFETY: a fresh fd returned by KVM_CREATE_GUEST_MEMFD, owned by nobody else.
    let gmem = unsafe { OwnedFd::from_raw_fd(raw) };

    let pin = vm_pin_kib();
    let e = expect_err(
        ioas.map_file(Iova::Fixed(BASE), gmem.as_fd(), 0, PAGE, Access::READ_WRITE),
        "MAP_FILE of guest_memfd",
    )?;
    check!(vm_pin_kib() == pin, "a refused MAP_FILE left pages pinned");
    let msg = e.to_string();
    if support::patched_kernel() {
        // The patched kernel maps shared guest_memfd by fd+offset, and refuses private
        // memory (this one has no MMAP|INIT_SHARED) with EACCES.
        check!(matches!(e, Error::FilePrivate { .. }), "{e:?}");
        check!(
            msg.contains("guest_memfd") && msg.contains("private to the guest"),
            "message: {msg}"
        );
    } else {
        check!(matches!(e, Error::FileNotPinnable { .. }), "{e:?}");
        check!(
            msg.contains("guest_memfd")
                && msg.contains("cannot pin this file")
                && msg.contains("by VA"),
            "message: {msg}"
        );
    }
    check!(ioas.areas().is_empty(), "a refused map left an area");
    // Nothing partial: the IOVA is still free for a good mapping.
    let mem = memfd("after", PAGE).or_fail("memfd")?;
    let map = Mapping::new(&mem, 0, PAGE as usize).or_fail("mmap")?;
    ioas.map_file(Iova::Fixed(BASE), mem.as_fd(), 0, PAGE, Access::READ_WRITE)
        .or_fail("map_file memfd at the same IOVA")?;
    round_trip(&edu, BASE, &mut map.bytes()[..256], 30)?;
    Ok(())
}

fn hwpt_alloc_attach_and_hw_info() -> Result<(), Failed> {
    let (iommufd, edu) = setup()?;
    let ioas = Ioas::new(&iommufd).or_fail("Ioas::new")?;
    let info = iommufd.hw_info(edu.dev_id).or_fail("hw_info")?;
    eprintln!(
        "  hw info: {:?}, {} bytes, caps {:#x}, pasid {}",
        info.kind,
        info.data.len(),
        info.capabilities,
        info.max_pasid_log2
    );
    match support::vm_iommu().as_deref() {
        Some("intel") => {
            let v = info.vtd().ok_or("intel-iommu without VT-d hw info")?;
            eprintln!(
                "  VT-d cap {:#x} ecap {:#x}: MGAW {} SAGAW {:#b} SL-superpages {:#b} IR {} SC {} nest {}",
                v.cap_reg,
                v.ecap_reg,
                v.mgaw(),
                v.sagaw(),
                v.super_pages(),
                v.interrupt_remapping(),
                v.snoop_control(),
                v.nested()
            );
            check!(v.mgaw() >= 39, "MGAW {} too small", v.mgaw());
        }
        _ => check!(
            info.kind == HwInfoType::None,
            "virtio-iommu reported {:?}",
            info.kind
        ),
    }

    let hwpt = Hwpt::alloc(&ioas, edu.dev_id, HwptFlags::default()).or_fail("Hwpt::alloc")?;
    edu.attach(hwpt.id()).or_fail("attach to HWPT")?;
    let mem = memfd("hwpt", PAGE).or_fail("memfd")?;
    let map = Mapping::new(&mem, 0, PAGE as usize).or_fail("mmap")?;
    // Mapped in the IOAS after the HWPT exists: the HWPT follows its IOAS.
    // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
    // its IOAS/container gone, before the memory is).
    unsafe { ioas.map_user(Iova::Fixed(BASE), map.addr(), PAGE, Access::READ_WRITE) }
        .or_fail("map_user")?;
    round_trip(&edu, BASE, &mut map.bytes()[..256], 40)?;
    edu.detach().or_fail("detach")?;
    drop(hwpt);
    Ok(())
}

/// Drops CAP_IPC_LOCK from the calling thread's effective set (capabilities are
/// per-thread at the syscall level), so iommufd charges pins to RLIMIT_MEMLOCK.
fn drop_ipc_lock_in_this_thread() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut h = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget writes one header and two data structs through valid pointers.
    if unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    d[0].effective &= !(1 << 14); // CAP_IPC_LOCK
                                  // SAFETY: capset reads one header and two data structs through valid pointers.
    if unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn memlock_limit_is_explained() -> Result<(), Failed> {
    let (iommufd, edu) = setup()?;
    let ioas = Ioas::new(&iommufd).or_fail("Ioas::new")?;
    edu.attach(ioas.id()).or_fail("attach")?;
    let len = 64 * PAGE;
    let mem = memfd("memlock", len).or_fail("memfd")?;
    let map = Mapping::new(&mem, 0, len as usize).or_fail("mmap")?;
    let addr = map.addr();

    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let pin = vm_pin_kib();
    // SAFETY: getrlimit/setrlimit read/write one rlimit through valid pointers.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut old) };
    let small = libc::rlimit {
        rlim_cur: 16 * PAGE,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &small) } != 0 {
        return Err("setrlimit RLIMIT_MEMLOCK".into());
    }
    let r = std::thread::scope(|s| {
        s.spawn(|| -> Result<Result<u64, Error>, std::io::Error> {
            drop_ipc_lock_in_this_thread()?;
            // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
            // its IOAS/container gone, before the memory is).
            Ok(unsafe { ioas.map_user(Iova::Fixed(BASE), addr, len, Access::READ_WRITE) })
        })
        .join()
    });
    // SAFETY: as above; restores the original limit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &old) };
    let r = r
        .map_err(|_| "mapping thread panicked")?
        .or_fail("drop CAP_IPC_LOCK")?;
    let e = expect_err(r, "map over RLIMIT_MEMLOCK")?;
    check!(matches!(e, Error::MemlockLimit { .. }), "{e:?}");
    let msg = e.to_string();
    check!(
        msg.contains("RLIMIT_MEMLOCK") && msg.contains("64 KiB"),
        "message: {msg}"
    );
    check!(ioas.areas().is_empty(), "a refused map left an area");
    check!(
        vm_pin_kib() == pin,
        "the refused map left pages pinned: VmPin {pin} → {} KiB",
        vm_pin_kib()
    );
    // With the limit restored (and CAP_IPC_LOCK) the same map works.
    // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
    // its IOAS/container gone, before the memory is).
    unsafe { ioas.map_user(Iova::Fixed(BASE), addr, len, Access::READ_WRITE) }
        .or_fail("map_user after restoring the limit")?;
    round_trip(&edu, BASE, &mut map.bytes()[..256], 50)?;
    Ok(())
}

fn rlimit_mode_and_fd_adoption() -> Result<(), Failed> {
    // Adopt an fd as a helper would hand it over (here: opened by us, passed as OwnedFd).
    let opened: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Iommufd::PATH)
        .or_fail("open /dev/iommu")?
        .into();
    let iommufd = Arc::new(Iommufd::from_fd(opened).or_fail("Iommufd::from_fd")?);
    check!(
        iommufd.rlimit_mode().or_fail("rlimit_mode")? == RlimitMode::User,
        "default RLIMIT mode is not per-user"
    );
    iommufd
        .set_rlimit_mode(RlimitMode::Process)
        .or_fail("set_rlimit_mode(Process)")?;
    check!(
        iommufd.rlimit_mode().or_fail("rlimit_mode")? == RlimitMode::Process,
        "RLIMIT mode did not change"
    );
    // Once an object exists the mode is fixed: explained.
    let ioas = iommufd.alloc_ioas().or_fail("alloc_ioas")?;
    let e = expect_err(
        iommufd.set_rlimit_mode(RlimitMode::User),
        "set RLIMIT mode with an IOAS",
    )?;
    check!(
        matches!(e, Error::RlimitMode { .. }) && e.errno() == Some(libc::EBUSY),
        "{e:?}"
    );
    drop(ioas);
    Ok(())
}
