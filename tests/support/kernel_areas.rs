//! The kernel's areas of an IOAS, checked on raw ioctls (independent of the library's
//! records) without disturbing them.
//!
//! `IOMMU_IOAS_COPY` of a mapped range into a scratch IOAS (same iommufd, no device)
//! recreates there one area per source area piece, boundaries included
//! (iopt_get_pages + iopt_map_pages); it fails with ENOENT if any page of the range is
//! unmapped. The destructive part of the check then runs on the scratch copy:
//! `IOMMU_IOAS_UNMAP` of exactly an expected area returns its length only if no kernel
//! area sticks out of it, and unmapping all of it but its last page fails with ENOENT
//! (nothing changed) only if no kernel area boundary lies inside it.

use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::raw::{self as sys, iommufd_uapi as iu};

const PAGE: u64 = 4096;

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// `IOMMU_IOAS_UNMAP` on raw ioctls; returns the bytes unmapped.
pub fn raw_unmap(fd: BorrowedFd<'_>, ioas: u32, iova: u64, len: u64) -> io::Result<u64> {
    let mut u: iu::iommu_ioas_unmap = sys::zeroed();
    u.size = size_of_val(&u) as u32;
    u.ioas_id = ioas;
    u.iova = iova;
    u.length = len;
    sys::ioctl_mut(fd, sys::IOMMU_IOAS_UNMAP, &mut u)?;
    Ok(u.length)
}

/// Unmaps everything in `ioas`; returns the bytes that were mapped (0 if none).
pub fn raw_unmap_all(fd: BorrowedFd<'_>, ioas: u32) -> io::Result<u64> {
    match raw_unmap(fd, ioas, 0, u64::MAX) {
        Err(e) if errno(&e) == libc::ENOENT => Ok(0),
        r => r,
    }
}

/// A scratch IOAS in the iommufd of the IOAS under check.
pub struct KernelAreas {
    fd: OwnedFd,
    ioas: u32,
    scratch: u32,
}

impl KernelAreas {
    pub fn new(iommufd: BorrowedFd<'_>, ioas: u32) -> io::Result<KernelAreas> {
        let fd = iommufd.try_clone_to_owned()?;
        let mut a: iu::iommu_ioas_alloc = sys::zeroed();
        a.size = size_of_val(&a) as u32;
        sys::ioctl_mut(fd.as_fd(), sys::IOMMU_IOAS_ALLOC, &mut a)?;
        Ok(KernelAreas {
            fd,
            ioas,
            scratch: a.out_ioas_id,
        })
    }

    fn copy(&self, iova: u64, len: u64) -> io::Result<()> {
        let mut c: iu::iommu_ioas_copy = sys::zeroed();
        c.size = size_of_val(&c) as u32;
        c.flags = iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
            | iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
        c.dst_ioas_id = self.scratch;
        c.src_ioas_id = self.ioas;
        c.length = len;
        c.dst_iova = iova;
        c.src_iova = iova;
        sys::ioctl_mut(self.fd.as_fd(), sys::IOMMU_IOAS_COPY, &mut c).map(drop)
    }

    /// Checks that inside `window` the kernel has exactly the areas `expected`
    /// (`(iova, len)`, ascending, disjoint, inside `window`): same boundaries, every page
    /// of every area mapped, every other page of the window unmapped. Issues about
    /// `areas + 2 * runs + unmapped pages + 1` ioctls; changes nothing in the IOAS.
    pub fn check(&self, expected: &[(u64, u64)], window: Range<u64>) -> Result<(), String> {
        let result = self.check_inner(expected, window);
        // Empty the scratch IOAS whatever happened; after a passing check it must
        // already be empty.
        let left = raw_unmap_all(self.fd.as_fd(), self.scratch)
            .map_err(|e| format!("emptying the scratch IOAS: {e}"))?;
        result?;
        if left != 0 {
            return Err(format!(
                "the scratch copy held {left:#x} bytes beyond the expected areas"
            ));
        }
        Ok(())
    }

    fn check_inner(&self, expected: &[(u64, u64)], window: Range<u64>) -> Result<(), String> {
        let show = |a: &(u64, u64)| format!("[{:#x}, {:#x})", a.0, a.0 + a.1);
        for w in expected.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(format!(
                    "expected areas overlap: {} {}",
                    show(&w[0]),
                    show(&w[1])
                ));
            }
        }
        if let Some(a) = expected
            .iter()
            .find(|a| a.0 < window.start || a.0 + a.1 > window.end)
        {
            return Err(format!(
                "expected area {} outside the checked window",
                show(a)
            ));
        }
        // Copy each maximal run of adjacent expected areas: proves every page mapped.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &(iova, len) in expected {
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == iova => r.1 += len,
                _ => runs.push((iova, len)),
            }
        }
        for r in &runs {
            self.copy(r.0, r.1).map_err(|e| {
                format!(
                    "expected {} mapped, but the kernel cannot copy it: {e}",
                    show(r)
                )
            })?;
        }
        // Boundaries, on the copy.
        let fd = self.fd.as_fd();
        for a in expected {
            if a.1 > PAGE {
                match raw_unmap(fd, self.scratch, a.0, a.1 - PAGE) {
                    Err(e) if errno(&e) == libc::ENOENT => {}
                    r => {
                        return Err(format!(
                            "expected one area {}, but the kernel has an area boundary inside it \
                             (unmapping all but its last page gave {r:?})",
                            show(a)
                        ))
                    }
                }
            }
            match raw_unmap(fd, self.scratch, a.0, a.1) {
                Ok(n) if n == a.1 => {}
                // Unmapping all but the last page removed whole kernel areas before
                // failing on the one that sticks out: a boundary inside.
                Ok(n) if n < a.1 => {
                    return Err(format!(
                        "expected one area {}, but the kernel has an area boundary inside \
                         it at {:#x}",
                        show(a),
                        a.0 + a.1 - n
                    ))
                }
                r => {
                    return Err(format!(
                        "expected area {}, but unmapping exactly it from the kernel's copy gave \
                         {r:?} (a kernel area sticks out of it, or part of it is missing)",
                        show(a)
                    ))
                }
            }
        }
        // Every other page of the window is unmapped: a one-page copy fails with ENOENT.
        let mut next = expected.iter().peekable();
        let mut p = window.start;
        while p < window.end {
            if let Some(&&(iova, len)) = next.peek() {
                if p >= iova {
                    p = iova + len;
                    next.next();
                    continue;
                }
            }
            match self.copy(p, PAGE) {
                Err(e) if errno(&e) == libc::ENOENT => {}
                Ok(()) => {
                    return Err(format!(
                        "IOVA {p:#x} is mapped in the kernel but in no expected area"
                    ))
                }
                Err(e) => return Err(format!("copying IOVA {p:#x}: {e}")),
            }
            p += PAGE;
        }
        Ok(())
    }
}

impl Drop for KernelAreas {
    fn drop(&mut self) {
        let mut d: iu::iommu_destroy = sys::zeroed();
        d.size = size_of_val(&d) as u32;
        d.id = self.scratch;
        let _ = sys::ioctl_mut(self.fd.as_fd(), sys::IOMMU_DESTROY, &mut d);
    }
}
