//! The baseline: raw ioctl loops on the raw oracle (`tests/support/raw.rs`), the kernel's
//! own cost and nothing else.

use super::*;

// Raw ioctl loops (the baseline): the kernel's own cost, nothing else.

pub const RW: u32 = iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
    | iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
    | iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;

pub fn raw_map_file(
    iommufd: BorrowedFd,
    ioas: u32,
    fd: i32,
    off: u64,
    iova: u64,
    len: u64,
) -> io::Result<()> {
    let mut m: iu::iommu_ioas_map_file = sys::zeroed();
    m.size = size_of_val(&m) as u32;
    m.flags = RW;
    m.ioas_id = ioas;
    m.fd = fd;
    m.start = off;
    m.length = len;
    m.iova = iova;
    sys::ioctl_mut(iommufd, sys::IOMMU_IOAS_MAP_FILE, &mut m).map(drop)
}

pub fn raw_map_va(iommufd: BorrowedFd, ioas: u32, va: u64, iova: u64, len: u64) -> io::Result<()> {
    let mut m: iu::iommu_ioas_map = sys::zeroed();
    m.size = size_of_val(&m) as u32;
    m.flags = RW;
    m.ioas_id = ioas;
    m.user_va = va;
    m.length = len;
    m.iova = iova;
    sys::ioctl_mut(iommufd, sys::IOMMU_IOAS_MAP, &mut m).map(drop)
}

pub fn raw_unmap(iommufd: BorrowedFd, ioas: u32, iova: u64, len: u64) -> io::Result<u64> {
    let mut u: iu::iommu_ioas_unmap = sys::zeroed();
    u.size = size_of_val(&u) as u32;
    u.ioas_id = ioas;
    u.iova = iova;
    u.length = len;
    sys::ioctl_mut(iommufd, sys::IOMMU_IOAS_UNMAP, &mut u).map(|_| u.length)
}

pub fn raw_type1_map(container: BorrowedFd, va: u64, iova: u64, len: u64) -> io::Result<()> {
    let mut m: vu::vfio_iommu_type1_dma_map = sys::zeroed();
    m.argsz = size_of_val(&m) as u32;
    m.flags = vu::VFIO_DMA_MAP_FLAG_READ | vu::VFIO_DMA_MAP_FLAG_WRITE;
    m.vaddr = va;
    m.iova = iova;
    m.size = len;
    sys::ioctl_mut(container, sys::VFIO_IOMMU_MAP_DMA, &mut m).map(drop)
}

pub fn raw_type1_unmap(container: BorrowedFd, iova: u64, len: u64) -> io::Result<u64> {
    let mut u: vu::vfio_iommu_type1_dma_unmap = sys::zeroed();
    u.argsz = size_of_val(&u) as u32;
    u.iova = iova;
    u.size = len;
    sys::ioctl_mut(container, sys::VFIO_IOMMU_UNMAP_DMA, &mut u).map(|_| u.size)
}
