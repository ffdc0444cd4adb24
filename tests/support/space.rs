//! A `DmaSpace` with the edu device attached, and DMA proofs of what it maps: shared by
//! the VM targets that exercise the DMA space (vm_dma, vm_concurrency, vm_teardown).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::raw::{self as sys, iommufd_uapi as iu};
use libtest_mimic::Failed;
use vfio_gmem::dma::{DmaSpace, GuestRegion, PageState, SharedMemory, SpaceOptions};
use vfio_gmem::gmem::{GmemFlags, GuestMemfd, KvmVm, MappedMemory, Memfd, VmType};
use vfio_gmem::iommufd::Iommufd;
use vfio_gmem::vfio::Device;

use super::{pci, OrFail};
use vfio_gmem::engine::edu::Edu;
use vfio_gmem::engine::DmaEngine;

pub const PAGE: u64 = 4096;
pub const GPA: u64 = 0x1_0000_0000;

/// The first edu device, bound to vfio-pci; returns its BDF.
pub fn first_edu() -> Result<String, Failed> {
    let bdf = pci::edu_devices()
        .into_iter()
        .next()
        .ok_or("no edu device")?;
    pci::bind_vfio_pci(&bdf).or_fail("bind edu to vfio-pci")?;
    Ok(bdf)
}

/// An edu device attached to a fresh space on a fresh iommufd.
pub fn space_with_edu(
    vm: Option<KvmVm<Arc<kvm_ioctls::VmFd>>>,
    options: SpaceOptions,
) -> Result<(DmaSpace, Edu), Failed> {
    let bdf = first_edu()?;
    let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
    let mut space = DmaSpace::iommufd(&iommufd, vm, options).or_fail("create DMA space")?;
    let dev = Device::open_cdev(pci::vfio_cdev(&bdf).or_fail("cdev")?).or_fail("open edu")?;
    space.attach(&dev).or_fail("attach edu")?;
    Ok((space, Edu::new(dev).or_fail("edu driver")?))
}

pub fn arc_vm(vm_type: VmType) -> Result<KvmVm<Arc<kvm_ioctls::VmFd>>, Failed> {
    let vm = KvmVm::create(vm_type).or_fail("create VM")?;
    Ok(KvmVm::from_vm_fd(Arc::new(vm.into_inner()), Some(vm_type)))
}

pub fn dup(fd: impl AsFd) -> Result<OwnedFd, Failed> {
    fd.as_fd().try_clone_to_owned().or_fail("dup fd")
}

/// What [`confidential_setup`] builds.
pub struct Confidential {
    pub space: DmaSpace,
    pub edu: Edu,
    /// The private backing (kept open: it holds the VM too).
    pub private: GuestMemfd,
    pub shared: Memfd,
    pub view: MappedMemory,
}

/// SW_PROTECTED VM: gmem private backing, memfd shared backing, real attributes; one
/// convertible region of `len` bytes at [`GPA`], every page shared.
pub fn confidential(options: SpaceOptions, len: u64) -> Result<Confidential, Failed> {
    let shared = Memfd::new("vm-dma-shared", len).or_fail("memfd")?;
    confidential_on(options, shared)
}

/// [`confidential`] with the caller's shared backing (e.g. a hugetlb memfd), its whole
/// length one region.
pub fn confidential_on(options: SpaceOptions, shared: Memfd) -> Result<Confidential, Failed> {
    let len = shared.size();
    let vm = arc_vm(VmType::SwProtected)?;
    let private = vm
        .create_guest_memfd(len, GmemFlags::MMAP)
        .or_fail("private gmem")?;
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
    Ok(Confidential {
        space,
        edu,
        private,
        shared,
        view,
    })
}

/// [`confidential`] as the tuple older tests use.
pub fn confidential_setup(
    options: SpaceOptions,
    len: u64,
) -> Result<(DmaSpace, Edu, Memfd, MappedMemory), Failed> {
    let c = confidential(options, len)?;
    Ok((c.space, c.edu, c.shared, c.view))
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE as usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// RAM → device → RAM through `iova`, the RAM cleared in between; true if the pattern
/// came back (the page is mapped both ways).
pub fn round_trip(
    edu: &Edu,
    view: &mut MappedMemory,
    off: usize,
    iova: u64,
    seed: u8,
) -> Result<bool, Failed> {
    let pattern = pattern(seed);
    view.write(off, &pattern).or_fail("write pattern")?;
    edu.dma_from_ram(iova, PAGE).or_fail("DMA RAM→device")?;
    view.fill(off, PAGE as usize, 0).or_fail("clear")?;
    edu.dma_to_ram(iova, PAGE).or_fail("DMA device→RAM")?;
    Ok(view.read_vec(off, PAGE as usize).or_fail("read back")? == pattern)
}

/// Proves with DMA that the page at `iova` (seen by the CPU at `view[off..]`) is mapped.
pub fn dma_works(
    edu: &Edu,
    view: &mut MappedMemory,
    off: usize,
    iova: u64,
    seed: u8,
) -> Result<(), Failed> {
    crate::check!(
        round_trip(edu, view, off, iova, seed)?,
        "DMA round trip through IOVA {iova:#x} did not return the pattern"
    );
    Ok(())
}

/// Proves the device cannot write the page at `iova`: memory stays as it was.
pub fn dma_refused(
    edu: &Edu,
    view: &mut MappedMemory,
    off: usize,
    iova: u64,
) -> Result<(), Failed> {
    // Load the device buffer with a pattern that differs from the RAM's.
    view.fill(off, PAGE as usize, 0xa5).or_fail("fill")?;
    edu.dma_to_ram(iova, PAGE).or_fail("DMA device→RAM")?;
    let after = view.read_vec(off, PAGE as usize).or_fail("read")?;
    crate::check!(
        after.iter().all(|&b| b == 0xa5),
        "device wrote IOVA {iova:#x}, which must be unmapped"
    );
    Ok(())
}

/// `IOMMU_IOAS_UNMAP` straight to the kernel (bypassing the library and its trackers):
/// the bytes unmapped, or the errno.
pub fn raw_unmap(iommufd: BorrowedFd<'_>, ioas: u32, iova: u64, len: u64) -> Result<u64, i32> {
    let mut u: iu::iommu_ioas_unmap = sys::zeroed();
    u.size = std::mem::size_of_val(&u) as u32;
    u.ioas_id = ioas;
    u.iova = iova;
    u.length = len;
    sys::ioctl_mut(iommufd, sys::IOMMU_IOAS_UNMAP, &mut u)
        .map(|_| u.length)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// The kernel's view of an IOAS, proven independently of the library: every area the
/// tracker believes in exists in the kernel as exactly that one area (a native unmap of
/// all but its last page is refused, then the exact unmap returns its length), every
/// gap in `[lo, hi)` between them holds nothing (ENOENT), and nothing else is mapped
/// anywhere (an unmap of everything then returns 0). Destroys the mappings it checks.
/// Returns the number of areas checked.
pub fn verify_kernel_areas(
    iommufd: BorrowedFd<'_>,
    ioas: u32,
    tracker: &[(u64, u64)],
    lo: u64,
    hi: u64,
) -> Result<usize, Failed> {
    let mut sorted = tracker.to_vec();
    sorted.sort();
    let mut at = lo;
    for &(iova, len) in sorted.iter().chain(std::iter::once(&(hi, 0))) {
        if iova > at {
            let r = raw_unmap(iommufd, ioas, at, iova - at);
            crate::check!(
                r == Err(libc::ENOENT),
                "gap [{at:#x}, {iova:#x}) should hold nothing: unmap answered {r:?}"
            );
        }
        at = at.max(iova + len);
    }
    for &(iova, len) in &sorted {
        if len > PAGE {
            let r = raw_unmap(iommufd, ioas, iova, len - PAGE);
            crate::check!(
                r == Err(libc::ENOENT),
                "area [{iova:#x}, +{len:#x}): unmapping all but its last page answered {r:?}, \
                 so the kernel's area is not this one"
            );
        }
        let r = raw_unmap(iommufd, ioas, iova, len);
        crate::check!(
            r == Ok(len),
            "area [{iova:#x}, +{len:#x}): exact unmap answered {r:?}"
        );
    }
    let rest = raw_unmap(iommufd, ioas, 0, u64::MAX);
    crate::check!(
        rest == Ok(0),
        "after the tracker's areas, the IOAS still held {rest:?} bytes"
    );
    Ok(sorted.len())
}

/// Open fds of this process: "N -> target", sorted.
pub fn open_fds() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let t = std::fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    format!("{} -> {t}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A `kB` field of /proc/self/status (e.g. `VmPin`, `VmLck`).
pub fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(u64::MAX)
}

/// A `kB` field of /proc/meminfo (e.g. `Shmem`).
pub fn meminfo_kib(field: &str) -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(u64::MAX)
}
