//! The native area split (`IOMMU_IOAS_SPLIT`) of the project's kernel series
//! (kernel/patches/iommufd-split): the areas at both ends of a range are split so that a
//! native `IOMMU_IOAS_UNMAP` of exactly that range succeeds, with no moment at which any
//! other IOVA is unmapped, on any IOAS (no compat designation) and with huge pages on
//! where every attached IOMMU page table can cut a large IOPTE without a break in
//! translation (generic_pt formats of x86 IOMMUs).
//!
//! Kernel answers, all of which change nothing:
//! - `ENOTTY`: the kernel has no such ioctl (a kernel without the series);
//! - `EOPNOTSUPP`: an attached domain cannot cut a large IOPTE (e.g. virtio-iommu) while
//!   huge pages are on, or the area is a DMABUF;
//! - `EBUSY`: an in-kernel access pins the area; `EINVAL`: a misaligned end.

use std::os::fd::AsFd;

use super::error::{Error, Span};
use super::ioas::Ioas;
use super::Result;
use crate::sys;

impl Ioas {
    /// Splits the areas spanning the ends of `[iova, iova+len)` (`IOMMU_IOAS_SPLIT`, a
    /// kernel with the project's series) so that [`Ioas::unmap`] of exactly the range
    /// works. No translation changes. Ends on area boundaries or unmapped IOVA need
    /// nothing. Errors carry the kernel's errno ([`Error::errno`]), see the module docs.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// // Area [0x1_0000_0000, +2 MiB) mapped earlier (a 2 MiB IOPTE); drop pages 2 and 3.
    /// ioas.split(0x1_0000_2000, 0x2000)?;
    /// assert_eq!(ioas.unmap(0x1_0000_2000, 0x2000)?, 0x2000);
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn split(&self, iova: u64, len: u64) -> Result<()> {
        let mut areas = self.lock();
        let span = Span::new(iova, len);
        let mut s = sys::iommu_ioas_split {
            size: size_of::<sys::iommu_ioas_split>() as u32,
            ioas_id: self.id(),
            iova,
            length: len,
            ..Default::default()
        };
        sys::ioctl_mut(self.iommufd().as_fd(), sys::IOMMU_IOAS_SPLIT, &mut s)
            .map_err(|e| self.err("IOMMU_IOAS_SPLIT", Some(span), e))?;
        areas.cut_before(iova);
        if let Some(end) = iova.checked_add(len) {
            areas.cut_before(end);
        }
        Ok(())
    }

    /// Whether a native cut-unmap of `[iova, iova+len)` needs [`Ioas::split`] first: an
    /// area of this handle's record holds both sides of one of the range's ends. Without
    /// a record ([`AreaRecord::Off`](super::AreaRecord::Off)) the answer is unknown: true.
    /// Areas mapped into this IOAS other than through this handle are not in the record
    /// (the invariant on [`Ioas`]); a range cutting one of those is refused by the unmap.
    pub(crate) fn must_split(&self, iova: u64, len: u64) -> bool {
        if self.area_record() == super::AreaRecord::Off {
            return true;
        }
        let areas = self.lock();
        areas.straddles(iova)
            || iova
                .checked_add(len)
                .is_some_and(|end| areas.straddles(end))
    }

    /// Unmaps exactly `[iova, iova+len)`: [`Ioas::split`] at its ends, then
    /// [`Ioas::unmap`]. Returns the bytes unmapped. If the unmap fails after the split,
    /// the split stays (translations unchanged) and this handle's record knows it.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// assert_eq!(ioas.split_unmap(0x1_0000_2000, 0x2000)?, 0x2000);
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn split_unmap(&self, iova: u64, len: u64) -> Result<u64> {
        self.split(iova, len)?;
        let n = self.unmap(iova, len)?;
        if n == 0 {
            return Err(Error::NotMapped {
                ioas: self.id(),
                span: Span::new(iova, len),
                source: None,
            });
        }
        Ok(n)
    }
}
