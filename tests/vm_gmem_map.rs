//! guest_memfd mapped for devices by fd+offset, and revoked by the kernel (VM).
//!
//! On the project's patched kernel (kernel/patches/gmem-map-file), `IOMMU_IOAS_MAP_FILE`
//! accepts a guest_memfd whose memory is shared, and guest_memfd revokes the mapping
//! before it lets a page go (punched hole, memory failure). On plain 7.3 the same
//! calls take the VA fallback, and nothing revokes anything. Each test asserts what the
//! running kernel must do (`support::patched_kernel()`), so a patched kernel that falls
//! back to VA fails, and every claim is proven with the edu device's DMA.

mod support;

use std::os::fd::{AsFd, AsRawFd};

use libtest_mimic::Failed;
use support::space::{arc_vm, dup, space_with_edu, status_kib, GPA, PAGE};
use support::{patched_kernel, pci, run_vm_tests, OrFail};
use vfio_gmem::dma::{DmaSpace, GuestRegion, MapPath, SharedMemory, SpaceOptions};
use vfio_gmem::engine::edu::Edu;
use vfio_gmem::gmem::{GmemFlags, GuestMemfd, KvmVm, MappedMemory, Memfd, VmType};

use vfio_gmem::engine::DmaEngine;

fn main() {
    run_vm_tests(&[
        (
            "gmem_maps_by_fd_offset_without_a_user_mapping",
            maps_without_a_user_mapping,
        ),
        ("punched_hole_revokes_the_mapping", punched_hole_revokes),
        ("memory_failure_revokes_the_mapping", memory_failure_revokes),
        ("private_gmem_is_refused_nothing_mapped", private_refused),
        ("closing_everything_releases_every_pin", teardown_unpins),
    ]);
}

/// GPA of the staging memfd the tests load the device's buffer from and read it into.
const STAGE_GPA: u64 = GPA + (1 << 30);
const GMEM_LEN: u64 = 16 * PAGE;

/// A default VM, a shared guest_memfd region at [`GPA`] and a memfd staging page at
/// [`STAGE_GPA`] (the CPU's window on what the device reads and writes), edu attached.
struct Fixture {
    space: DmaSpace,
    edu: Edu,
    gmem: GuestMemfd,
    stage: MappedMemory,
    _stage_file: Memfd,
    _vm: KvmVm<std::sync::Arc<kvm_ioctls::VmFd>>,
}

fn fixture() -> Result<Fixture, Failed> {
    let vm = arc_vm(VmType::Default)?;
    let gmem = vm
        .create_guest_memfd(GMEM_LEN, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
        .or_fail("create guest_memfd")?;
    let (mut space, edu) = space_with_edu(
        None,
        SpaceOptions {
            conversions: false,
            ..Default::default()
        },
    )?;
    let stage_file = Memfd::new("stage", PAGE).or_fail("memfd")?;
    let stage = stage_file.mmap().or_fail("mmap stage")?;
    space
        .add_region(GuestRegion::new(
            STAGE_GPA,
            PAGE,
            SharedMemory::File {
                fd: dup(stage_file.file())?,
                offset: 0,
            },
        ))
        .or_fail("add staging region")?;
    add_gmem(&mut space, &gmem)?;
    Ok(Fixture {
        space,
        edu,
        gmem,
        stage,
        _stage_file: stage_file,
        _vm: vm,
    })
}

fn add_gmem(space: &mut DmaSpace, gmem: &GuestMemfd) -> Result<(), Failed> {
    space
        .add_region(GuestRegion::new(
            GPA,
            GMEM_LEN,
            SharedMemory::File {
                fd: dup(gmem)?,
                offset: 0,
            },
        ))
        .or_fail("add guest_memfd region")?;
    Ok(())
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE as usize)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// The device copies `data` (through the staging page) to `iova`.
fn device_write(fx: &mut Fixture, iova: u64, data: &[u8]) -> Result<(), Failed> {
    fx.stage.write(0, data).or_fail("write stage")?;
    fx.edu
        .dma_from_ram(STAGE_GPA, PAGE)
        .or_fail("DMA stage→device")?;
    fx.edu.dma_to_ram(iova, PAGE).or_fail("DMA device→iova")
}

/// The device copies the page at `iova` to the staging page; returns what arrived there.
fn device_read(fx: &mut Fixture, iova: u64) -> Result<Vec<u8>, Failed> {
    fx.stage.fill(0, PAGE as usize, 0).or_fail("clear stage")?;
    fx.edu.dma_from_ram(iova, PAGE).or_fail("DMA iova→device")?;
    fx.edu
        .dma_to_ram(STAGE_GPA, PAGE)
        .or_fail("DMA device→stage")?;
    fx.stage.read_vec(0, PAGE as usize).or_fail("read stage")
}

/// What the CPU sees in page `page` of the guest_memfd (mmapped here, after the fact).
fn file_page(gmem: &GuestMemfd, page: u64) -> Result<Vec<u8>, Failed> {
    let m = gmem
        .mmap_range(page * PAGE, PAGE)
        .or_fail("mmap gmem page")?;
    m.read_vec(0, PAGE as usize).or_fail("read gmem page")
}

fn gmem_path(space: &DmaSpace) -> MapPath {
    space
        .regions()
        .into_iter()
        .find(|r| r.gpa == GPA)
        .map(|r| r.path)
        .expect("the guest_memfd region")
}

fn expect_path(space: &DmaSpace) -> Result<(), Failed> {
    let path = gmem_path(space);
    if patched_kernel() {
        check!(
            path == MapPath::FileOffset,
            "the patched kernel must map guest_memfd by fd+offset, got {path}"
        );
    } else {
        check!(
            matches!(&path, MapPath::VirtualAddress { reason } if reason.contains("cannot pin")),
            "plain 7.3 refuses guest_memfd in MAP_FILE: VA fallback expected, got {path}"
        );
    }
    Ok(())
}

fn maps_without_a_user_mapping() -> Result<(), Failed> {
    let mut fx = fixture()?;
    expect_path(&fx.space)?;
    // The device writes page 3 and reads it back: on the patched kernel nothing in this
    // process has ever mapped the guest_memfd (the space maps by fd, the test only has
    // the staging memfd mapped), so the pages exist because MAP_FILE allocated them.
    let p = pattern(3);
    device_write(&mut fx, GPA + 3 * PAGE, &p)?;
    check!(
        device_read(&mut fx, GPA + 3 * PAGE)? == p,
        "DMA round trip through guest_memfd page 3 did not return the pattern"
    );
    // And it is the file's own page the device wrote.
    check!(
        file_page(&fx.gmem, 3)? == p,
        "the device's write is not in guest_memfd page 3"
    );
    check!(
        file_page(&fx.gmem, 4)?.iter().all(|&b| b == 0),
        "page 4 must be untouched (zero)"
    );
    check!(
        fx.space.revoked().or_fail("revoked")?.is_empty(),
        "nothing was revoked"
    );
    Ok(())
}

fn punched_hole_revokes() -> Result<(), Failed> {
    let mut fx = fixture()?;
    expect_path(&fx.space)?;
    let old = pattern(9);
    for page in [2, 5] {
        device_write(&mut fx, GPA + page * PAGE, &old)?;
    }
    // A misbehaving VMM punches page 2 out of the file without unmapping it first.
    fx.gmem.punch_hole(2 * PAGE, PAGE).or_fail("punch page 2")?;
    let faults = pci::iommu_fault_count();
    let new = pattern(200);
    if patched_kernel() {
        let revoked = fx.space.revoked().or_fail("revoked")?;
        check!(
            revoked.len() == 1 && revoked[0].gpa == GPA && revoked[0].len == GMEM_LEN,
            "the whole guest_memfd area must be reported revoked: {revoked:?}"
        );
        // The device reaches neither the punched page nor its neighbours: the design
        // revokes the whole area.
        for page in [2, 5] {
            device_write(&mut fx, GPA + page * PAGE, &new)?;
        }
        check!(
            pci::iommu_fault_count() >= faults + 2,
            "the device's writes to the revoked area must fault at the IOMMU"
        );
        check!(
            file_page(&fx.gmem, 2)?.iter().all(|&b| b == 0),
            "the punched page is a fresh zero page: the device's write must not land"
        );
        check!(
            file_page(&fx.gmem, 5)? == old,
            "page 5 must keep its old content: the write must not land"
        );
        // The area stays until unmapped; mapping the region again works.
        let id = fx
            .space
            .regions()
            .into_iter()
            .find(|r| r.gpa == GPA)
            .map(|r| r.id)
            .ok_or("region")?;
        fx.space
            .remove_region(id)
            .or_fail("remove revoked region")?;
        add_gmem(&mut fx.space, &fx.gmem)?;
        check!(
            fx.space.revoked().or_fail("revoked")?.is_empty(),
            "a fresh mapping is not revoked"
        );
        device_write(&mut fx, GPA + 2 * PAGE, &new)?;
        check!(
            file_page(&fx.gmem, 2)? == new,
            "after mapping again the device writes the file's new page 2"
        );
    } else {
        // Plain 7.3 has no revoke: by VA, the process mapping keeps the punched page
        // reachable until the VMM unmaps (what the kernel series exists to prevent).
        check!(
            fx.space.revoked().or_fail("revoked")?.is_empty(),
            "plain 7.3 never revokes"
        );
        device_write(&mut fx, GPA + 5 * PAGE, &new)?;
        check!(
            file_page(&fx.gmem, 5)? == new,
            "plain 7.3: page 5 stays mapped"
        );
    }
    Ok(())
}

/// Poisons page `page` of `gmem` with MADV_HWPOISON from a child process (the poisoning
/// process may be killed with SIGBUS); returns the child's madvise errno (0 = success).
fn poison_in_child(gmem: &GuestMemfd, page: u64) -> Result<i32, Failed> {
    let fd = gmem.as_fd().as_raw_fd();
    // SAFETY: the child only makes raw system calls (mmap, a store into the fresh
    // mapping, madvise) and _exit()s; it touches no Rust state and allocates nothing.
    let pid = unsafe { libc::fork() };
    check!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: see above; the mapping is one page of a file created with MMAP.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                (page * PAGE) as libc::off_t,
            );
            if p == libc::MAP_FAILED {
                libc::_exit(100);
            }
            *(p as *mut u8) = 1;
            let r = libc::madvise(p, PAGE as usize, libc::MADV_HWPOISON);
            libc::_exit(if r == 0 { 0 } else { *libc::__errno_location() });
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    check!(r == pid, "waitpid failed");
    if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        check!(code != 100, "the child could not mmap the guest_memfd");
        return Ok(code);
    }
    // Killed by the poison (SIGBUS): the madvise went through.
    Ok(0)
}

fn memory_failure_revokes() -> Result<(), Failed> {
    let mut fx = fixture()?;
    expect_path(&fx.space)?;
    let old = pattern(17);
    device_write(&mut fx, GPA + 7 * PAGE, &old)?;
    let errno = poison_in_child(&fx.gmem, 7)?;
    if !patched_kernel() {
        // The plain kernel (CONFIG_MEMORY_FAILURE on, as in the patched one) maps the
        // region by VA: the IOMMU pins the page, memory_failure() cannot take it back
        // (EBUSY, or the poisoning child killed), and nothing is revoked.
        check!(
            errno == 0 || errno == libc::EBUSY,
            "plain kernel: MADV_HWPOISON failed with errno {errno}"
        );
        let revoked = fx.space.revoked().or_fail("revoked")?;
        check!(
            revoked.is_empty(),
            "plain kernel: a VA-pinned region is never revoked: {revoked:?}"
        );
        eprintln!("  plain kernel: MADV_HWPOISON errno {errno}, the pinned page stays mapped");
        return Ok(());
    }
    // EBUSY: the page is poisoned but memory_failure() could not recover it (the
    // child's own mapping still referenced it); the revoke has happened either way.
    check!(
        errno == 0 || errno == libc::EBUSY,
        "MADV_HWPOISON failed with errno {errno}"
    );
    eprintln!("  MADV_HWPOISON: errno {errno}");
    let revoked = fx.space.revoked().or_fail("revoked")?;
    check!(
        revoked.len() == 1 && revoked[0].gpa == GPA,
        "the poisoned page's area must be reported revoked: {revoked:?}"
    );
    let faults = pci::iommu_fault_count();
    device_write(&mut fx, GPA + 6 * PAGE, &pattern(99))?;
    check!(
        pci::iommu_fault_count() > faults,
        "a write to the revoked area must fault at the IOMMU"
    );
    check!(
        file_page(&fx.gmem, 6)?.iter().all(|&b| b == 0),
        "page 6 must stay zero: the write must not land"
    );
    // The poisoned page cannot be mapped again: the region's new mapping is refused.
    let id = fx
        .space
        .regions()
        .into_iter()
        .find(|r| r.gpa == GPA)
        .map(|r| r.id)
        .ok_or("region")?;
    fx.space
        .remove_region(id)
        .or_fail("remove revoked region")?;
    let again = fx.space.add_region(GuestRegion::new(
        GPA,
        GMEM_LEN,
        SharedMemory::File {
            fd: dup(&fx.gmem)?,
            offset: 0,
        },
    ));
    check!(
        again.is_err(),
        "mapping a range with a poisoned page must fail: {:?}",
        fx.space.regions()
    );
    eprintln!("  re-map with a poisoned page: {}", again.unwrap_err());
    Ok(())
}

fn private_refused() -> Result<(), Failed> {
    let vm = arc_vm(VmType::Default)?;
    let (mut space, _edu) = space_with_edu(None, SpaceOptions::default())?;
    let pin = status_kib("VmPin");
    for flags in [GmemFlags::empty(), GmemFlags::MMAP] {
        let gmem = vm
            .create_guest_memfd(GMEM_LEN, flags)
            .or_fail("create guest_memfd")?;
        let e = space
            .add_region(GuestRegion::new(
                GPA,
                GMEM_LEN,
                SharedMemory::File {
                    fd: dup(&gmem)?,
                    offset: 0,
                },
            ))
            .err()
            .ok_or(format!(
                "a private guest_memfd ({flags:?}) must be refused: {:?}",
                space.regions()
            ))?;
        let msg = e.to_string();
        eprintln!("  {flags:?}: {msg}");
        if patched_kernel() {
            check!(
                msg.contains("private to the guest"),
                "the patched kernel refuses private memory with EACCES: {msg}"
            );
        }
        check!(space.regions().is_empty(), "a region was left behind");
        let ioas = space.ioas().ok_or("iommufd space")?;
        check!(ioas.areas().is_empty(), "areas left: {:?}", ioas.areas());
        // The kernel agrees: nothing is mapped at the region's IOVA.
        let raw = support::space::raw_unmap(ioas.iommufd().as_fd(), ioas.id(), 0, u64::MAX);
        check!(raw == Ok(0), "the kernel still maps something: {raw:?}");
    }
    check!(
        status_kib("VmPin") == pin,
        "a refused map left pages pinned"
    );
    Ok(())
}

fn teardown_unpins() -> Result<(), Failed> {
    let pin = status_kib("VmPin");
    let mut fx = fixture()?;
    let p = pattern(5);
    device_write(&mut fx, GPA + PAGE, &p)?;
    check!(device_read(&mut fx, GPA + PAGE)? == p, "round trip");
    let held = status_kib("VmPin");
    // The staging page and the 16 guest_memfd pages are pinned while mapped.
    check!(
        held >= pin + (GMEM_LEN + PAGE) / 1024,
        "VmPin {held} KiB while mapped: expected at least {} KiB",
        pin + (GMEM_LEN + PAGE) / 1024
    );
    drop(fx);
    check!(
        status_kib("VmPin") == pin,
        "VmPin {} KiB after closing everything, {pin} KiB before",
        status_kib("VmPin")
    );
    Ok(())
}
