//! ioctl request numbers for iommufd and VFIO, and typed wrappers around `ioctl(2)`.
//!
//! iommufd and VFIO both use `_IO(';', nr)` requests whose argument is a pointer to a
//! struct that starts with a `size` (iommufd) or `argsz` (VFIO) field; the kernel reads at
//! most that many bytes and writes back only within them.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::iommufd_uapi as iu;
use super::vfio_uapi as vu;

/// `_IO(type, nr)`: no direction bits, no size bits.
pub const fn io(ty: u8, nr: u32) -> libc::c_ulong {
    (((ty as u32) << 8) | nr) as libc::c_ulong
}

/// The ioctl type character shared by iommufd (`IOMMUFD_TYPE`) and VFIO (`VFIO_TYPE`).
pub const SEMICOLON: u8 = b';';
const VFIO_BASE: u32 = 100;

macro_rules! iommufd_req {
    ($($name:ident = $cmd:expr;)*) => {$(
        pub const $name: libc::c_ulong = io(SEMICOLON, $cmd as u32);
    )*};
}
iommufd_req! {
    IOMMU_DESTROY = iu::IOMMUFD_CMD_DESTROY;
    IOMMU_IOAS_ALLOC = iu::IOMMUFD_CMD_IOAS_ALLOC;
    IOMMU_IOAS_ALLOW_IOVAS = iu::IOMMUFD_CMD_IOAS_ALLOW_IOVAS;
    IOMMU_IOAS_COPY = iu::IOMMUFD_CMD_IOAS_COPY;
    IOMMU_IOAS_IOVA_RANGES = iu::IOMMUFD_CMD_IOAS_IOVA_RANGES;
    IOMMU_IOAS_MAP = iu::IOMMUFD_CMD_IOAS_MAP;
    IOMMU_IOAS_MAP_FILE = iu::IOMMUFD_CMD_IOAS_MAP_FILE;
    IOMMU_IOAS_UNMAP = iu::IOMMUFD_CMD_IOAS_UNMAP;
    IOMMU_OPTION = iu::IOMMUFD_CMD_OPTION;
    IOMMU_VFIO_IOAS = iu::IOMMUFD_CMD_VFIO_IOAS;
    IOMMU_HWPT_ALLOC = iu::IOMMUFD_CMD_HWPT_ALLOC;
    IOMMU_GET_HW_INFO = iu::IOMMUFD_CMD_GET_HW_INFO;
    IOMMU_IOAS_SPLIT = IOMMUFD_CMD_IOAS_SPLIT;
}

/// `IOMMUFD_CMD_IOAS_SPLIT` of the project's kernel series (kernel/patches/iommufd-split);
/// no published binding crate has it. A kernel without the series answers `ENOTTY`.
pub const IOMMUFD_CMD_IOAS_SPLIT: u32 = 0x96;

/// `struct iommu_ioas_split` (include/uapi/linux/iommufd.h of the series): split the
/// areas at both ends of `[iova, iova + length)` without changing any translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct iommu_ioas_split {
    /// `sizeof(struct iommu_ioas_split)`.
    pub size: u32,
    /// Must be 0.
    pub flags: u32,
    /// The IOAS.
    pub ioas_id: u32,
    /// Must be 0.
    pub __reserved: u32,
    /// First IOVA of the range.
    pub iova: u64,
    /// Bytes in the range.
    pub length: u64,
}

macro_rules! vfio_req {
    ($($name:ident = $off:expr;)*) => {$(
        pub const $name: libc::c_ulong = io(SEMICOLON, VFIO_BASE + $off);
    )*};
}
vfio_req! {
    VFIO_GET_API_VERSION = 0;
    VFIO_CHECK_EXTENSION = 1;
    VFIO_SET_IOMMU = 2;
    VFIO_GROUP_GET_STATUS = 3;
    VFIO_GROUP_SET_CONTAINER = 4;
    VFIO_GROUP_UNSET_CONTAINER = 5;
    VFIO_GROUP_GET_DEVICE_FD = 6;
    VFIO_DEVICE_GET_INFO = 7;
    VFIO_DEVICE_GET_REGION_INFO = 8;
    VFIO_DEVICE_GET_IRQ_INFO = 9;
    VFIO_DEVICE_SET_IRQS = 10;
    VFIO_DEVICE_RESET = 11;
    VFIO_IOMMU_GET_INFO = 12;
    VFIO_IOMMU_MAP_DMA = 13;
    VFIO_IOMMU_UNMAP_DMA = 14;
    VFIO_DEVICE_BIND_IOMMUFD = 18;
    VFIO_DEVICE_ATTACH_IOMMUFD_PT = 19;
    VFIO_DEVICE_DETACH_IOMMUFD_PT = 20;
}

/// A uAPI argument struct: plain old data whose every bit pattern is valid.
///
/// # Safety
/// Implement only for `#[repr(C)]` binding structs without pointers that the kernel
/// dereferences beyond what the request's documentation allows, and whose all-zero and
/// kernel-written bit patterns are valid values.
pub unsafe trait UapiArg {}

macro_rules! uapi_arg {
    ($($t:ty),* $(,)?) => {$(
        // SAFETY: bindgen-generated repr(C) struct of integer fields only.
        unsafe impl UapiArg for $t {}
    )*};
}
uapi_arg!(
    iu::iommu_destroy,
    iu::iommu_ioas_alloc,
    iu::iommu_ioas_allow_iovas,
    iu::iommu_ioas_copy,
    iu::iommu_ioas_iova_ranges,
    iu::iommu_ioas_map,
    iu::iommu_ioas_map_file,
    iu::iommu_ioas_unmap,
    iu::iommu_option,
    iu::iommu_vfio_ioas,
    iu::iommu_hwpt_alloc,
    iu::iommu_hw_info,
    iommu_ioas_split,
    vu::vfio_group_status,
    vu::vfio_device_info,
    vu::vfio_region_info,
    vu::vfio_irq_info,
    vu::vfio_iommu_type1_info,
    vu::vfio_iommu_type1_dma_map,
    vu::vfio_iommu_type1_dma_unmap,
    vu::vfio_device_bind_iommufd,
    vu::vfio_device_attach_iommufd_pt,
    vu::vfio_device_detach_iommufd_pt,
);

// SAFETY: a plain integer; VFIO_GROUP_SET_CONTAINER takes a pointer to the container fd.
unsafe impl UapiArg for i32 {}

/// Returns a zeroed uAPI struct.
pub fn zeroed<T: UapiArg>() -> T {
    // SAFETY: UapiArg types are integer-only repr(C) structs; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Issues `req` with a pointer to `arg`, which the kernel may read and update.
///
/// Embedded user pointers (e.g. `iommu_ioas_map::user_va`, `iommu_hw_info::data_uptr`)
/// are the caller's contract: they must point to memory valid for the access the request
/// makes. Use [`ioctl_with_buf`] for requests that write through an embedded pointer.
pub fn ioctl_mut<T: UapiArg>(
    fd: BorrowedFd<'_>,
    req: libc::c_ulong,
    arg: &mut T,
) -> io::Result<i32> {
    // SAFETY: `arg` is a valid, exclusively borrowed T for the call; the request numbers
    // in this module take a pointer to exactly the struct their uAPI documents, and the
    // kernel accesses at most size_of::<T>() bytes through it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Issues `req` with no argument or an integer argument.
pub fn ioctl_val(fd: BorrowedFd<'_>, req: libc::c_ulong, val: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: requests passed here take an integer (or nothing); no memory is accessed.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, val) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Issues `req` with a pointer to a byte buffer that starts with a uAPI header (`argsz`
/// first) followed by variable-length data the kernel may fill (capability chains, ranges,
/// IRQ eventfd arrays). The buffer's length bounds every kernel access.
pub fn ioctl_with_buf(fd: BorrowedFd<'_>, req: libc::c_ulong, buf: &mut [u8]) -> io::Result<i32> {
    // SAFETY: `buf` is valid for writes of buf.len() bytes; the callers set the header's
    // size/argsz field to at most buf.len(), which bounds what the kernel touches.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, buf.as_mut_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Issues `req` with a byte buffer (see [`ioctl_with_buf`]) for a request that returns a
/// new file descriptor on success (VFIO_GROUP_GET_DEVICE_FD), and takes ownership of it.
pub fn ioctl_new_fd(
    fd: BorrowedFd<'_>,
    req: libc::c_ulong,
    buf: &mut [u8],
) -> io::Result<std::os::fd::OwnedFd> {
    let r = ioctl_with_buf(fd, req, buf)?;
    // SAFETY: on success these requests return a fresh descriptor that nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_uapi_headers() {
        // Values from include/uapi/linux/{iommufd,vfio}.h (7.3).
        assert_eq!(IOMMU_IOAS_ALLOC, 0x3b81);
        assert_eq!(IOMMU_IOAS_MAP, 0x3b85);
        assert_eq!(IOMMU_IOAS_UNMAP, 0x3b86);
        assert_eq!(IOMMU_IOAS_MAP_FILE, 0x3b8f);
        assert_eq!(IOMMU_IOAS_SPLIT, 0x3b96);
        assert_eq!(size_of::<iommu_ioas_split>(), 32);
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 0x3b76);
    }
}
