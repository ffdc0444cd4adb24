//! The VFIO-compat pieces of iommufd that a native user still wants: choosing the
//! context's compat IOAS (`IOMMU_VFIO_IOAS`) and the compat unmap, which is the only
//! mainline way to split an area without a transient unmap.
//!
//! `VFIO_IOMMU_UNMAP_DMA` issued on the iommufd fd itself acts on the compat IOAS. When
//! that IOAS has huge pages disabled, drivers/iommu/iommufd/vfio_compat.c first cuts the
//! areas at both ends of the range (`iopt_cut_iova`) and then unmaps what lies inside, so
//! the pages outside the range stay mapped throughout.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use super::error::{Error, Span};
use super::ioas::Ioas;
use super::iommufd::Iommufd;
use super::Result;
use crate::sys::{self, iommufd_uapi as iu, vfio_uapi as vu};

fn vfio_ioas(fd: &Iommufd, op: u32, ioas_id: u32) -> io::Result<u32> {
    let mut v: iu::iommu_vfio_ioas = sys::zeroed();
    v.size = size_of_val(&v) as u32;
    v.op = op as u16;
    v.ioas_id = ioas_id;
    sys::ioctl_mut(fd.as_fd(), sys::IOMMU_VFIO_IOAS, &mut v)?;
    Ok(v.ioas_id)
}

impl Iommufd {
    /// The id of this context's VFIO-compat IOAS, if one is set.
    ///
    /// ```no_run
    /// let compat: Option<u32> = vfio_gmem::iommufd::Iommufd::open()?.compat_ioas_id()?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn compat_ioas_id(&self) -> Result<Option<u32>> {
        match vfio_ioas(self, iu::iommufd_vfio_ioas_op_IOMMU_VFIO_IOAS_GET, 0) {
            Ok(id) => Ok(Some(id)),
            // ENODEV: no compat IOAS (never set, cleared, or destroyed).
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(self.err("IOMMU_VFIO_IOAS get", e)),
        }
    }

    /// Unsets the compat IOAS (the IOAS itself is not destroyed).
    ///
    /// ```no_run
    /// vfio_gmem::iommufd::Iommufd::open()?.clear_compat_ioas()?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn clear_compat_ioas(&self) -> Result<()> {
        self.compat_epoch.fetch_add(1, Ordering::Relaxed);
        vfio_ioas(self, iu::iommufd_vfio_ioas_op_IOMMU_VFIO_IOAS_CLEAR, 0)
            .map(drop)
            .map_err(|e| self.err("IOMMU_VFIO_IOAS clear", e))
    }
}

impl Ioas {
    /// Makes this IOAS its iommufd's VFIO-compat IOAS (one per iommufd), the one
    /// [`Ioas::cut_unmap`] acts on, replacing whichever IOAS held it: an
    /// [`Ioas::cut_unmap`] on that one fails from then on. [`Ioas::claim_compat`] does not
    /// take it from another IOAS.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// ioas.set_huge_pages(false)?; // before mapping, so areas can be cut later
    /// ioas.set_compat()?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn set_compat(&self) -> Result<()> {
        self.iommufd().compat_epoch.fetch_add(1, Ordering::Relaxed);
        vfio_ioas(
            self.iommufd(),
            iu::iommufd_vfio_ioas_op_IOMMU_VFIO_IOAS_SET,
            self.id(),
        )
        .map(drop)
        .map_err(|e| self.err("IOMMU_VFIO_IOAS set", None, e))
    }

    /// Makes this IOAS its iommufd's VFIO-compat IOAS unless another live IOAS already
    /// is: then [`Error::CompatTaken`] and nothing changes. An IOAS this library dropped
    /// while a device still used it (emptied, waiting to be destroyed) does not count.
    /// Claims through this library are serialized per [`Iommufd`].
    ///
    /// ```no_run
    /// # let (a, b): (vfio_gmem::iommufd::Ioas, vfio_gmem::iommufd::Ioas) = unimplemented!();
    /// a.claim_compat()?;
    /// assert!(b.claim_compat().is_err()); // a keeps it
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn claim_compat(&self) -> Result<()> {
        let fd = self.iommufd();
        let _serial = fd.compat_claim.lock().unwrap_or_else(|p| p.into_inner());
        match fd.compat_ioas_id()? {
            Some(owner) if owner != self.id() && !fd.is_orphan(owner) => Err(Error::CompatTaken {
                ioas: self.id(),
                fd: fd.raw(),
                owner,
            }),
            _ => self.set_compat(),
        }
    }

    /// True if this IOAS is its iommufd's compat IOAS.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// assert!(ioas.is_compat()?);
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn is_compat(&self) -> Result<bool> {
        Ok(self.iommufd().compat_ioas_id()? == Some(self.id()))
    }

    /// Unmaps exactly `[iova, iova+len)`, splitting the areas it cuts, with no moment at
    /// which the pages outside the range are unmapped. Returns the bytes unmapped.
    ///
    /// Needs this IOAS to be the compat IOAS ([`Ioas::set_compat`]) with huge pages
    /// disabled ([`Ioas::set_huge_pages`]`(false)` before mapping); both are checked
    /// first. Cuts must fall on page boundaries. Afterwards the pieces are separate
    /// areas: [`Ioas::unmap`] takes them one by one.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// // Area [0x1_0000_0000, +8 pages) mapped earlier; drop pages 2 and 3 only.
    /// assert_eq!(ioas.cut_unmap(0x1_0000_2000, 0x2000)?, 0x2000);
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn cut_unmap(&self, iova: u64, len: u64) -> Result<u64> {
        let mut areas = self.lock();
        let span = Span::new(iova, len);
        // The preconditions cost two ioctls to check; they are checked once and then
        // trusted until this library changes the compat IOAS or this IOAS's huge pages.
        let epoch = self.iommufd().compat_epoch.load(Ordering::Relaxed) + 1;
        if self.cut_verified.load(Ordering::Relaxed) != epoch {
            let current = self.iommufd().compat_ioas_id()?;
            if current != Some(self.id()) {
                return Err(Error::NotCompatIoas {
                    ioas: self.id(),
                    fd: self.iommufd().raw(),
                    current,
                });
            }
            if self.huge_pages()? {
                return Err(Error::CutNeedsSmallPages {
                    ioas: self.id(),
                    span,
                });
            }
            self.cut_verified.store(epoch, Ordering::Relaxed);
        }
        let Some(last) = iova.checked_add(len.wrapping_sub(1)).filter(|_| len > 0) else {
            return Err(self.err(
                "VFIO_IOMMU_UNMAP_DMA (compat cut)",
                Some(span),
                io::Error::from_raw_os_error(if len == 0 {
                    libc::EINVAL
                } else {
                    libc::EOVERFLOW
                }),
            ));
        };
        let mut u: vu::vfio_iommu_type1_dma_unmap = sys::zeroed();
        u.argsz = size_of_val(&u) as u32;
        u.flags = 0;
        u.iova = iova;
        u.size = len;
        // The kernel cuts at the end of the range first, then at its start
        // (vfio_compat.c: iopt_cut_iova with iovas = { last, iova - 1 }), each split an
        // allocation of its own, and only then unmaps. So a failure can leave the area
        // around the end split although nothing was unmapped: translations unchanged,
        // but the record must learn the new boundary or it no longer equals the kernel
        // (found by fail-nth injection, tests/vm_faults.rs). Each cut this call needed is
        // checked after a failure.
        let cuts = [last.checked_add(1), Some(iova)].map(|c| c.filter(|&at| areas.straddles(at)));
        if let Err(e) = sys::ioctl_mut(self.iommufd().as_fd(), sys::VFIO_IOMMU_UNMAP_DMA, &mut u) {
            for at in cuts.into_iter().flatten() {
                match self.boundary_at(at) {
                    Ok(true) => areas.cut_before(at),
                    Ok(false) => {}
                    // Unknown: keep the uncut record. Translations are the same either
                    // way; a native unmap of one piece alone would then be refused
                    // before the kernel sees it, never issued partially.
                    Err(probe) => log::warn!(
                        "IOAS {}: after a failed cut of {span}, could not learn whether the \
                         kernel split the area at {at:#x}: {probe}",
                        self.id()
                    ),
                }
            }
            return Err(self.err("VFIO_IOMMU_UNMAP_DMA (compat cut)", Some(span), e));
        }
        if u.size == 0 {
            return Err(Error::NotMapped {
                ioas: self.id(),
                span,
                source: None,
            });
        }
        areas.cut_before(iova);
        if let Some(end) = last.checked_add(1) {
            areas.cut_before(end);
        }
        areas.remove_within(iova, last);
        Ok(u.size)
    }

    /// Whether the kernel has an area boundary at `at` (an area ends at `at - 1`, the
    /// next starts at `at`), found without touching this IOAS: the pages on both sides
    /// are copied into a scratch IOAS (`IOMMU_IOAS_COPY` makes one area there per source
    /// area piece), where unmapping the page below `at` succeeds only if an area ends
    /// there, and fails with ENOENT if it would cut one. Both pages must be mapped.
    fn boundary_at(&self, at: u64) -> io::Result<bool> {
        const PAGE: u64 = 4096;
        let scratch = Ioas::new(self.iommufd()).map_err(io::Error::other)?;
        let fd = self.iommufd().as_fd();
        let mut c: iu::iommu_ioas_copy = sys::zeroed();
        c.size = size_of_val(&c) as u32;
        c.flags = iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
            | iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
        c.dst_ioas_id = scratch.id();
        c.src_ioas_id = self.id();
        c.length = 2 * PAGE;
        c.src_iova = at - PAGE;
        c.dst_iova = at - PAGE;
        sys::ioctl_mut(fd, sys::IOMMU_IOAS_COPY, &mut c)?;
        // Raw unmap: the scratch IOAS's own record knows nothing of the copy, and the
        // IOAS is destroyed (with whatever is left in it) when `scratch` drops.
        let mut u: iu::iommu_ioas_unmap = sys::zeroed();
        u.size = size_of_val(&u) as u32;
        u.ioas_id = scratch.id();
        u.iova = at - PAGE;
        u.length = PAGE;
        match sys::ioctl_mut(fd, sys::IOMMU_IOAS_UNMAP, &mut u) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
