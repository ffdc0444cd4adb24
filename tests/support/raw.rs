//! The raw oracle: iommufd and VFIO ioctls issued straight to the kernel, bypassing the
//! library on purpose (tests compare the library's records with what the kernel holds;
//! benchmarks time the library against the bare calls). Shared by the tests
//! (`support::raw`) and the benchmarks (`#[path]`). Not the library's API: the library's
//! own raw layer is crate-private.

#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

pub use iommufd_bindings::iommufd as iommufd_uapi;
pub use vfio_bindings::bindings::vfio as vfio_uapi;

use iommufd_uapi as iu;

const fn io(nr: u32) -> libc::c_ulong {
    ((b';' as u32) << 8 | nr) as libc::c_ulong
}
const VFIO_BASE: u32 = 100;

pub const IOMMU_DESTROY: libc::c_ulong = io(iu::IOMMUFD_CMD_DESTROY);
pub const IOMMU_IOAS_ALLOC: libc::c_ulong = io(iu::IOMMUFD_CMD_IOAS_ALLOC);
pub const IOMMU_IOAS_COPY: libc::c_ulong = io(iu::IOMMUFD_CMD_IOAS_COPY);
pub const IOMMU_IOAS_MAP: libc::c_ulong = io(iu::IOMMUFD_CMD_IOAS_MAP);
pub const IOMMU_IOAS_MAP_FILE: libc::c_ulong = io(iu::IOMMUFD_CMD_IOAS_MAP_FILE);
pub const IOMMU_IOAS_UNMAP: libc::c_ulong = io(iu::IOMMUFD_CMD_IOAS_UNMAP);
pub const IOMMU_OPTION: libc::c_ulong = io(iu::IOMMUFD_CMD_OPTION);
pub const IOMMU_VFIO_IOAS: libc::c_ulong = io(iu::IOMMUFD_CMD_VFIO_IOAS);
pub const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = io(VFIO_BASE + 8);
pub const VFIO_IOMMU_MAP_DMA: libc::c_ulong = io(VFIO_BASE + 13);
pub const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = io(VFIO_BASE + 14);
pub const VFIO_DEVICE_BIND_IOMMUFD: libc::c_ulong = io(VFIO_BASE + 18);
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: libc::c_ulong = io(VFIO_BASE + 19);
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: libc::c_ulong = io(VFIO_BASE + 20);

/// A binding struct made of integers only: all-zero is a valid value.
///
/// # Safety
/// Implement only for such structs.
pub unsafe trait Pod {}
macro_rules! pod {
    ($($t:ty),* $(,)?) => {$(
        // SAFETY: bindgen-generated repr(C) struct of integer fields only.
        unsafe impl Pod for $t {}
    )*};
}
pod!(
    iu::iommu_destroy,
    iu::iommu_ioas_alloc,
    iu::iommu_ioas_copy,
    iu::iommu_ioas_map,
    iu::iommu_ioas_map_file,
    iu::iommu_ioas_unmap,
    iu::iommu_option,
    iu::iommu_vfio_ioas,
    vfio_uapi::vfio_region_info,
    vfio_uapi::vfio_iommu_type1_dma_map,
    vfio_uapi::vfio_iommu_type1_dma_unmap,
    vfio_uapi::vfio_device_bind_iommufd,
    vfio_uapi::vfio_device_attach_iommufd_pt,
    vfio_uapi::vfio_device_detach_iommufd_pt,
);

/// A zeroed binding struct.
pub fn zeroed<T: Pod>() -> T {
    // SAFETY: Pod types are integer-only repr(C) structs.
    unsafe { std::mem::zeroed() }
}

/// `ioctl(fd, req, arg)`. Test code: the caller pairs each request with its struct and
/// keeps any user address inside it (`user_va`) valid for the call's access, as the
/// kernel documents.
pub fn ioctl_mut<T: Pod>(fd: BorrowedFd<'_>, req: libc::c_ulong, arg: &mut T) -> io::Result<i32> {
    // SAFETY: `arg` is a valid, exclusively borrowed T; the kernel accesses at most
    // size_of::<T>() bytes through it for the requests above, plus the user memory the
    // test itself passed inside it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}
