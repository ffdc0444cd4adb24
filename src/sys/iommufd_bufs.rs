//! iommufd requests whose argument struct carries a pointer to a second buffer
//! (`IOMMU_IOAS_IOVA_RANGES`, `IOMMU_IOAS_ALLOW_IOVAS`, `IOMMU_GET_HW_INFO`), and the
//! memlock limit query used by error messages.
//!
//! Invariant: each wrapper writes the embedded pointer and element count itself, from a
//! borrowed slice, so the kernel can only touch memory the caller lent for the call.

use std::io;
use std::os::fd::BorrowedFd;

use super::ioctl::{ioctl_mut, IOMMU_GET_HW_INFO, IOMMU_IOAS_ALLOW_IOVAS, IOMMU_IOAS_IOVA_RANGES};
use super::iommufd_uapi as iu;

/// `IOMMU_IOAS_IOVA_RANGES` into `out`. `arg.allowed_iovas`/`num_iovas` are set from
/// `out`; on return `arg.num_iovas` is the total the kernel has (which may exceed
/// `out.len()`: the error is then `EMSGSIZE` and `out` holds the first `out.len()`).
pub fn ioas_iova_ranges(
    fd: BorrowedFd<'_>,
    arg: &mut iu::iommu_ioas_iova_ranges,
    out: &mut [iu::iommu_iova_range],
) -> io::Result<()> {
    arg.num_iovas =
        u32::try_from(out.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    arg.allowed_iovas = if out.is_empty() {
        0
    } else {
        out.as_mut_ptr() as u64
    };
    // The kernel writes at most num_iovas elements through allowed_iovas, which is `out`.
    ioctl_mut(fd, IOMMU_IOAS_IOVA_RANGES, arg).map(drop)
}

/// `IOMMU_IOAS_ALLOW_IOVAS` with the ranges in `ranges` (read by the kernel only).
pub fn ioas_allow_iovas(
    fd: BorrowedFd<'_>,
    arg: &mut iu::iommu_ioas_allow_iovas,
    ranges: &[iu::iommu_iova_range],
) -> io::Result<()> {
    arg.num_iovas =
        u32::try_from(ranges.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    arg.allowed_iovas = if ranges.is_empty() {
        0
    } else {
        ranges.as_ptr() as u64
    };
    // The kernel only reads num_iovas elements from allowed_iovas, which is `ranges`.
    ioctl_mut(fd, IOMMU_IOAS_ALLOW_IOVAS, arg).map(drop)
}

/// `IOMMU_GET_HW_INFO` with `data` as the type-specific output buffer. On return
/// `arg.data_len` is the length the kernel supports (it fills at most `data.len()`).
pub fn get_hw_info(
    fd: BorrowedFd<'_>,
    arg: &mut iu::iommu_hw_info,
    data: &mut [u8],
) -> io::Result<()> {
    arg.data_len =
        u32::try_from(data.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    arg.data_uptr = if data.is_empty() {
        0
    } else {
        data.as_mut_ptr() as u64
    };
    // The kernel writes at most data_len bytes through data_uptr, which is `data`.
    ioctl_mut(fd, IOMMU_GET_HW_INFO, arg).map(drop)
}

/// `out_data_type` of `IOMMU_GET_HW_INFO`'s in/out type union.
pub fn hw_info_out_type(h: &iu::iommu_hw_info) -> u32 {
    // SAFETY: both members of the union are u32, so either reading is a valid value.
    unsafe { h.__bindgen_anon_1.out_data_type }
}

/// The soft and hard `RLIMIT_MEMLOCK` of this process, in bytes (`u64::MAX` = unlimited).
pub fn memlock_limit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct through the valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}
