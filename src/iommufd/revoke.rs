//! Whether the pages behind an area were revoked by their file.
//!
//! On a kernel with the project's guest_memfd series (kernel/patches/gmem-map-file),
//! guest_memfd revokes an `IOMMU_IOAS_MAP_FILE` mapping before it lets the pages go: a
//! hole punched into the mapped range, or a memory failure on one of its pages, unmaps the
//! whole area from every domain. The area itself stays until it is unmapped, so nothing
//! in the IOAS's area list changes; what does change is that the pages can no longer be
//! copied: `IOMMU_IOAS_COPY` of a revoked area fails with `ENODEV`. That is the probe
//! used here. Kernels without the series never revoke a file mapping (a punched memfd
//! page stays pinned and mapped), and the probe answers `false` there.

use super::error::Error;
use super::ioas::Ioas;
use super::Result;
use crate::mapper::{Access, Iova};

const PAGE: u64 = 4096;

impl Ioas {
    /// Whether the area holding `iova` was revoked by its file. Copies one page of it
    /// into a scratch IOAS with no device (nothing is pinned) and drops the copy again.
    /// Fails if `iova` is not mapped.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// if ioas.revoked(0x1_0000_0000)? {
    ///     eprintln!("guest_memfd took the pages away: devices no longer reach them");
    /// }
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn revoked(&self, iova: u64) -> Result<bool> {
        let scratch = Ioas::new(self.iommufd())?;
        let page = iova & !(PAGE - 1);
        match scratch.copy_from(self, page, PAGE, Iova::Any, Access::READ_ONLY) {
            Ok(_) => Ok(false),
            Err(e @ Error::Ioctl { .. }) if e.errno() == Some(libc::ENODEV) => Ok(true),
            Err(e) => Err(e),
        }
    }
}
