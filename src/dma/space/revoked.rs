//! Mappings the kernel took away: [`DmaSpace::revoked`].
//!
//! On a kernel that maps guest_memfd by fd+offset (the project's series,
//! kernel/patches/gmem-map-file), guest_memfd revokes the IOMMU mapping of a region
//! before it lets the pages go: someone punched a hole into the file, or one of its pages
//! suffered a memory failure. Devices then fault on the whole area, and the space's
//! records (which still list the area) no longer describe what devices can reach. The
//! space does not paper over it: it reports the area, and the VMM decides (unmap and map
//! again once the file is whole, or stop the guest's device).

use super::core::{DmaSpace, Iommu};
use super::types::{MapPath, SpaceError};

/// An IOMMU area whose pages the kernel revoked.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Revoked {
    /// The region (a [`RegionId`](crate::dma::RegionId)'s number).
    pub region: u64,
    /// First guest physical address of the area.
    pub gpa: u64,
    /// First IOVA of the area.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "region {}: GPA [{:#x}, +{:#x}) at IOVA {:#x} was revoked by the kernel (its file \
             lost pages: a punched hole or a memory failure); devices fault there",
            self.region, self.gpa, self.len, self.iova
        )
    }
}

impl DmaSpace {
    /// The areas of fd+offset regions whose pages the kernel revoked, in IOVA order; empty
    /// if none (always, on kernels that never revoke). One `IOMMU_IOAS_COPY` probe per
    /// area of such a region (see [`crate::iommufd::Ioas::revoked`]); regions mapped by
    /// VA are pinned through the process and never revoked.
    ///
    /// ```no_run
    /// # let space: vfio_gmem::dma::DmaSpace = unimplemented!();
    /// for r in space.revoked()? {
    ///     eprintln!("{r}");
    /// }
    /// # Ok::<(), vfio_gmem::dma::SpaceError>(())
    /// ```
    pub fn revoked(&self) -> Result<Vec<Revoked>, SpaceError> {
        let Iommu::Iommufd { ioas } = &self.iommu else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for area in self.memory.areas() {
            let by_file = self
                .slots
                .get(&area.region)
                .is_some_and(|s| s.path == MapPath::FileOffset);
            if !by_file || !ioas.revoked(area.iova)? {
                continue;
            }
            let gpa = self
                .memory
                .regions()
                .find(|r| r.id == area.region)
                .map(|r| r.gpa_range().start + area.offset)
                .unwrap_or(0);
            let r = Revoked {
                region: area.region.0,
                gpa,
                iova: area.iova,
                len: area.len,
            };
            log::warn!("{r}");
            out.push(r);
        }
        out.sort_by_key(|r| r.iova);
        Ok(out)
    }
}
