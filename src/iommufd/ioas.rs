//! IO address spaces: `IOMMU_IOAS_*` and the per-IOAS huge-pages option.

use std::io;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use super::areas::Areas;
use super::error::{fd_kind, Error, Span};
use super::iommufd::Iommufd;
use super::Result;
use crate::mapper::{Access, Backend, DmaMapper, Iova, MapError};
use crate::sys::{self, iommufd_uapi as iu};

/// The usable IOVA ranges of an IOAS and the alignment every map must honour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IovaRanges {
    /// Inclusive ranges, ascending. Attaching devices narrows them.
    pub ranges: Vec<RangeInclusive<u64>>,
    /// Start and length of every map/copy must be a multiple of this (≤ PAGE_SIZE).
    pub alignment: u64,
}

/// An IO address space (`IOMMU_IOAS_ALLOC`), destroyed on drop. If a device or HWPT
/// still uses it then, it is emptied at once (nothing stays pinned or reachable) and
/// destroyed as soon as it is free ([`Iommufd::reap_orphans`]).
///
/// Devices attach to it (VFIO cdev `ATTACH_IOMMUFD_PT` with [`Ioas::id`]) and see
/// exactly what is mapped in it.
///
/// Invariant (with [`AreaRecord::Kept`], the default): `areas` equals the kernel's areas
/// in this IOAS that were created through this handle, whenever its lock is free; every
/// map/unmap holds the lock across the ioctl. Unmaps are checked against it first, so a
/// range that would cut one of them fails before the kernel changes anything. With
/// [`AreaRecord::Off`] there is no record and no check: each call is one ioctl.
///
/// ```no_run
/// use std::os::fd::AsFd;
/// use std::sync::Arc;
/// use vfio_gmem::iommufd::{Ioas, Iommufd};
/// use vfio_gmem::mapper::{Access, Iova};
/// let ioas = Ioas::new(&Arc::new(Iommufd::open()?))?;
/// let mem = vfio_gmem::gmem::Memfd::new("guest", 4096)?;
/// let iova = ioas.map_file(Iova::Any, mem.file().as_fd(), 0, 4096, Access::READ_WRITE)?;
/// assert_eq!(ioas.unmap(iova, 4096)?, 4096);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Ioas {
    iommufd: Arc<Iommufd>,
    id: u32,
    pub(super) areas: Mutex<Areas>,
    record: AreaRecord,
    /// `compat_epoch + 1` of the iommufd when the cut preconditions (compat IOAS, huge
    /// pages off) were last verified; 0 = not verified.
    pub(super) cut_verified: std::sync::atomic::AtomicU64,
}

/// Whether an [`Ioas`] keeps its own record of the areas it mapped.
///
/// The kernel's `IOMMU_IOAS_UNMAP` walks its range area by area and stops with `ENOENT`
/// at the first area that sticks out, after unmapping the areas before it. The record
/// lets [`Ioas::unmap`] refuse such a range before anything changes. It costs a B-tree
/// update per map and unmap (a few hundred instructions; see BENCHMARKS.md), which is
/// measurable against 4 KiB maps; a caller that keeps its own exact record of what it
/// mapped and only unmaps whole areas can turn it off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AreaRecord {
    /// Keep the record: cutting unmaps are refused up front; [`Ioas::areas`] lists the
    /// areas.
    #[default]
    Kept,
    /// No record: every call is exactly one ioctl. An unmap that cuts an area fails with
    /// [`Error::UnmapRefused`] *after* the kernel unmapped the whole areas before it in
    /// the range; [`Ioas::areas`] is empty.
    Off,
}

fn map_flags(iova: Iova, access: Access) -> u32 {
    let mut f = 0;
    if let Iova::Fixed(_) = iova {
        f |= iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
    }
    if access.read {
        f |= iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
    }
    if access.write {
        f |= iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
    }
    f
}

fn fixed(iova: Iova) -> u64 {
    match iova {
        Iova::Fixed(v) => v,
        Iova::Any => 0,
    }
}

/// Inclusive last IOVA of `[iova, iova+len)`, or the error for an empty/overflowing span.
fn last_of(ioas: u32, op: &'static str, iova: u64, len: u64) -> Result<u64> {
    if len == 0 {
        return Err(Error::Ioctl {
            op,
            object: format!("IOAS {ioas} {}", Span::new(iova, len)),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    iova.checked_add(len - 1).ok_or_else(|| Error::Ioctl {
        op,
        object: format!("IOAS {ioas} [{iova:#x}, +{len:#x})"),
        source: io::Error::from_raw_os_error(libc::EOVERFLOW),
    })
}

impl Ioas {
    /// Allocates an empty IOAS in `iommufd`.
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use vfio_gmem::iommufd::{Ioas, Iommufd};
    /// let ioas = Ioas::new(&Arc::new(Iommufd::open()?))?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn new(iommufd: &Arc<Iommufd>) -> Result<Ioas> {
        Self::with_record(iommufd, AreaRecord::Kept)
    }

    /// Allocates an empty IOAS in `iommufd` that keeps (or not) its own area record.
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use vfio_gmem::iommufd::{AreaRecord, Ioas, Iommufd};
    /// // This caller unmaps exactly the areas it mapped, and nothing else.
    /// let ioas = Ioas::with_record(&Arc::new(Iommufd::open()?), AreaRecord::Off)?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn with_record(iommufd: &Arc<Iommufd>, record: AreaRecord) -> Result<Ioas> {
        iommufd.reap_orphans();
        let mut a: iu::iommu_ioas_alloc = sys::zeroed();
        a.size = size_of_val(&a) as u32;
        sys::ioctl_mut(iommufd.as_fd(), sys::IOMMU_IOAS_ALLOC, &mut a)
            .map_err(|e| iommufd.err("IOMMU_IOAS_ALLOC", e))?;
        Ok(Ioas {
            iommufd: Arc::clone(iommufd),
            id: a.out_ioas_id,
            areas: Mutex::new(Areas::default()),
            record,
            cut_verified: Default::default(),
        })
    }

    /// The object id (the `pt_id` devices attach to).
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// let pt_id: u32 = ioas.id();
    /// ```
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The iommufd this IOAS lives in.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// use std::os::fd::AsFd;
    /// let fd = ioas.iommufd().as_fd(); // what VFIO_DEVICE_BIND_IOMMUFD takes
    /// ```
    pub fn iommufd(&self) -> &Arc<Iommufd> {
        &self.iommufd
    }

    /// The areas mapped through this handle, in IOVA order (after a
    /// [`Ioas::cut_unmap`], the pieces it left); empty with [`AreaRecord::Off`].
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// for a in ioas.areas() { println!("{a}"); }
    /// ```
    pub fn areas(&self) -> Vec<Span> {
        self.lock().spans()
    }

    /// Whether this IOAS keeps an area record.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// use vfio_gmem::iommufd::AreaRecord;
    /// assert_eq!(ioas.area_record(), AreaRecord::Kept);
    /// ```
    pub fn area_record(&self) -> AreaRecord {
        self.record
    }

    /// The record's lock, if this IOAS keeps one.
    fn record(&self) -> Option<MutexGuard<'_, Areas>> {
        (self.record == AreaRecord::Kept).then(|| self.lock())
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Areas> {
        // A panic while holding the lock cannot leave `Areas` half-updated (each update
        // is one BTreeMap operation after the ioctl), so a poisoned lock is still valid.
        self.areas.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn err(&self, op: &'static str, span: Option<Span>, source: io::Error) -> Error {
        Error::Ioctl {
            op,
            object: match span {
                Some(s) => format!("IOAS {} {s}", self.id),
                None => format!("IOAS {}", self.id),
            },
            source,
        }
    }

    /// Maps `len` bytes of this process's memory at `va` (`IOMMU_IOAS_MAP`); returns the
    /// IOVA used (the chosen one for [`Iova::Any`]). The pages are pinned while mapped
    /// and a device attached to this IOAS may read/write them as `access` allows: the
    /// caller keeps that memory mapped and treats it as shared with the device.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// use vfio_gmem::mapper::{Access, Iova};
    /// let ram = vfio_gmem::gmem::Memfd::new("ram", 2 << 20)?.mmap()?;
    /// // SAFETY: `ram` stays mapped (and is used for nothing else) until the unmap below.
    /// unsafe { ioas.map_user(Iova::Fixed(0x1_0000_0000), ram.addr(), 2 << 20, Access::READ_WRITE)? };
    /// ioas.unmap(0x1_0000_0000, 2 << 20)?;
    /// drop(ram);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Safety
    ///
    /// `[va, va + len)` must be memory of this process that stays allocated to this use,
    /// and is not handed to anything else (freed, reused by an allocator, or unmapped and
    /// mapped again), until the range is unmapped or the IOAS destroyed: a device attached
    /// here may read and write it at any moment, behind the compiler's back. Memory mapped
    /// from a file for this purpose (e.g. [`MappedMemory`](crate::gmem::MappedMemory))
    /// kept alive for as long as the mapping is the usual way to meet this.
    pub unsafe fn map_user(&self, iova: Iova, va: u64, len: u64, access: Access) -> Result<u64> {
        let mut areas = self.record();
        let mut m: iu::iommu_ioas_map = sys::zeroed();
        m.size = size_of_val(&m) as u32;
        m.flags = map_flags(iova, access);
        m.ioas_id = self.id;
        m.user_va = va;
        m.length = len;
        m.iova = fixed(iova);
        let span = Span::new(m.iova, len);
        sys::ioctl_mut(self.iommufd.as_fd(), sys::IOMMU_IOAS_MAP, &mut m).map_err(|e| {
            let existing = areas
                .as_ref()
                .and_then(|a| a.overlapping(span.iova, span.end().saturating_sub(1)));
            Error::map("IOMMU_IOAS_MAP", self.id, span, existing, None, e)
        })?;
        if let Some(a) = areas.as_mut() {
            a.insert(m.iova, m.iova + (len - 1));
        }
        Ok(m.iova)
    }

    /// Maps `len` bytes of `fd` from `offset` (`IOMMU_IOAS_MAP_FILE`, Linux ≥ 6.13);
    /// returns the IOVA used. Accepts memfd (shmem, hugetlbfs) and VFIO dma-bufs; other
    /// files (guest_memfd on 7.3) fail with [`Error::FileNotPinnable`] once a device is
    /// attached (without one the kernel pins lazily and the later attach fails instead).
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// # let memfd: std::fs::File = unimplemented!();
    /// use std::os::fd::AsFd;
    /// use vfio_gmem::mapper::{Access, Iova};
    /// let iova = ioas.map_file(Iova::Any, memfd.as_fd(), 0, 1 << 20, Access::READ_WRITE)?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn map_file(
        &self,
        iova: Iova,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Result<u64> {
        let mut areas = self.record();
        let mut m: iu::iommu_ioas_map_file = sys::zeroed();
        m.size = size_of_val(&m) as u32;
        m.flags = map_flags(iova, access);
        m.ioas_id = self.id;
        m.fd = fd.as_raw_fd();
        m.start = offset;
        m.length = len;
        m.iova = fixed(iova);
        let span = Span::new(m.iova, len);
        sys::ioctl_mut(self.iommufd.as_fd(), sys::IOMMU_IOAS_MAP_FILE, &mut m).map_err(|e| {
            let existing = areas
                .as_ref()
                .and_then(|a| a.overlapping(span.iova, span.end().saturating_sub(1)));
            let file = Some((m.fd, fd_kind(m.fd)));
            Error::map("IOMMU_IOAS_MAP_FILE", self.id, span, existing, file, e)
        })?;
        if let Some(a) = areas.as_mut() {
            a.insert(m.iova, m.iova + (len - 1));
        }
        Ok(m.iova)
    }

    /// Unmaps every area inside `[iova, iova+len)` (`IOMMU_IOAS_UNMAP`); returns the
    /// bytes unmapped. The range must not cut an area ([`Error::PartialUnmap`], checked
    /// before anything changes); an empty range is [`Error::NotMapped`].
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// let bytes = ioas.unmap(0x1_0000_0000, 2 << 20)?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn unmap(&self, iova: u64, len: u64) -> Result<u64> {
        if iova == 0 && len == u64::MAX {
            return self.unmap_all();
        }
        let last = last_of(self.id, "IOMMU_IOAS_UNMAP", iova, len)?;
        let span = Span::new(iova, len);
        let Some(mut areas) = self.record() else {
            return self.unmap_unrecorded(span);
        };
        // Unmapping exactly one area is the common case: take it out of the record in
        // one lookup (put back if the kernel refuses). Anything else is checked area by
        // area before the kernel sees it.
        let exact = areas.take_exact(iova, last);
        let tracked = if exact {
            u128::from(len)
        } else {
            areas
                .check_whole(iova, last)
                .map_err(|area| Error::PartialUnmap {
                    ioas: self.id,
                    span,
                    area: Some(area),
                    source: None,
                })?
        };
        let mut u: iu::iommu_ioas_unmap = sys::zeroed();
        u.size = size_of_val(&u) as u32;
        u.ioas_id = self.id;
        u.iova = iova;
        u.length = len;
        if let Err(e) = sys::ioctl_mut(self.iommufd.as_fd(), sys::IOMMU_IOAS_UNMAP, &mut u) {
            if exact {
                areas.insert(iova, last);
            }
            return Err(match e.raw_os_error() {
                // Areas this handle does not know about (e.g. mapped through the
                // VFIO-compat ioctls) are the only way to get here with ENOENT.
                Some(libc::ENOENT) if tracked == 0 => Error::NotMapped {
                    ioas: self.id,
                    span,
                    source: Some(e),
                },
                Some(libc::ENOENT) => Error::PartialUnmap {
                    ioas: self.id,
                    span,
                    area: None,
                    source: Some(e),
                },
                _ => self.err("IOMMU_IOAS_UNMAP", Some(span), e),
            });
        }
        if !exact {
            areas.remove_within(iova, last);
        }
        Ok(u.length)
    }

    /// [`Ioas::unmap`] without a record: one ioctl, nothing checked up front.
    fn unmap_unrecorded(&self, span: Span) -> Result<u64> {
        let mut u: iu::iommu_ioas_unmap = sys::zeroed();
        u.size = size_of_val(&u) as u32;
        u.ioas_id = self.id;
        u.iova = span.iova;
        u.length = span.len;
        match sys::ioctl_mut(self.iommufd.as_fd(), sys::IOMMU_IOAS_UNMAP, &mut u) {
            Ok(_) => Ok(u.length),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(Error::UnmapRefused {
                ioas: self.id,
                span,
                source: e,
            }),
            Err(e) => Err(self.err("IOMMU_IOAS_UNMAP", Some(span), e)),
        }
    }

    /// Unmaps everything in this IOAS; returns the bytes unmapped.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// let bytes = ioas.unmap_all()?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn unmap_all(&self) -> Result<u64> {
        let mut areas = self.lock();
        let mut u: iu::iommu_ioas_unmap = sys::zeroed();
        u.size = size_of_val(&u) as u32;
        u.ioas_id = self.id;
        u.iova = 0;
        u.length = u64::MAX;
        sys::ioctl_mut(self.iommufd.as_fd(), sys::IOMMU_IOAS_UNMAP, &mut u)
            .map_err(|e| self.err("IOMMU_IOAS_UNMAP (all)", None, e))?;
        areas.clear();
        Ok(u.length)
    }

    /// Maps into this IOAS the pages that `[src_iova, src_iova+len)` of `src` maps
    /// (`IOMMU_IOAS_COPY`): no second pin, no second memlock charge. Returns the IOVA
    /// used. Both IOASes must live in the same iommufd.
    ///
    /// ```no_run
    /// # let (a, b): (vfio_gmem::iommufd::Ioas, vfio_gmem::iommufd::Ioas) = unimplemented!();
    /// use vfio_gmem::mapper::{Access, Iova};
    /// let iova = b.copy_from(&a, 0x1_0000_0000, 1 << 20, Iova::Any, Access::READ_WRITE)?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn copy_from(
        &self,
        src: &Ioas,
        src_iova: u64,
        len: u64,
        dst: Iova,
        access: Access,
    ) -> Result<u64> {
        if !Arc::ptr_eq(&self.iommufd, &src.iommufd) {
            return Err(self.err(
                "IOMMU_IOAS_COPY from an IOAS of another iommufd",
                None,
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let src_last = last_of(src.id, "IOMMU_IOAS_COPY", src_iova, len)?;
        // Lock order: ascending IOAS id, so concurrent copies A→B and B→A cannot
        // deadlock; copying within one IOAS takes its lock once.
        let (mut areas, src_areas) = if std::ptr::eq(self, src) {
            (self.lock(), None)
        } else if src.id < self.id {
            let s = src.lock();
            (self.lock(), Some(s))
        } else {
            let d = self.lock();
            (d, Some(src.lock()))
        };
        // A source without a record: the destination records the copy as one area, so
        // it refuses more unmaps than the kernel would need to, never a partial one.
        let pieces = match (&src_areas, src.record) {
            (_, AreaRecord::Off) => vec![(src_iova, src_last)],
            (Some(s), AreaRecord::Kept) => s.pieces(src_iova, src_last),
            (None, AreaRecord::Kept) => areas.pieces(src_iova, src_last),
        };
        let mut c: iu::iommu_ioas_copy = sys::zeroed();
        c.size = size_of_val(&c) as u32;
        c.flags = map_flags(dst, access);
        c.dst_ioas_id = self.id;
        c.src_ioas_id = src.id;
        c.length = len;
        c.dst_iova = fixed(dst);
        c.src_iova = src_iova;
        let span = Span::new(c.dst_iova, len);
        sys::ioctl_mut(self.iommufd.as_fd(), sys::IOMMU_IOAS_COPY, &mut c).map_err(|e| {
            let existing = areas.overlapping(span.iova, span.end().saturating_sub(1));
            Error::map("IOMMU_IOAS_COPY", self.id, span, existing, None, e)
        })?;
        // The destination gets one area per source area piece, at the same offsets.
        for (f, l) in pieces
            .into_iter()
            .filter(|_| self.record == AreaRecord::Kept)
        {
            areas.insert(c.dst_iova + (f - src_iova), c.dst_iova + (l - src_iova));
        }
        Ok(c.dst_iova)
    }

    /// The IOVA ranges devices attached now can use (`IOMMU_IOAS_IOVA_RANGES`). Query
    /// again after every attach/detach.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// let r = ioas.iova_ranges()?;
    /// println!("{:x?} aligned to {:#x}", r.ranges, r.alignment);
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn iova_ranges(&self) -> Result<IovaRanges> {
        let mut buf: Vec<iu::iommu_iova_range> = Vec::new();
        // Ask with the buffer we have; EMSGSIZE reports how many exist. The set can grow
        // between calls (a device detached), so retry until it fits.
        loop {
            let mut r: iu::iommu_ioas_iova_ranges = sys::zeroed();
            r.size = size_of_val(&r) as u32;
            r.ioas_id = self.id;
            match sys::ioas_iova_ranges(self.iommufd.as_fd(), &mut r, &mut buf) {
                Ok(()) => {
                    buf.truncate(r.num_iovas as usize);
                    return Ok(IovaRanges {
                        ranges: buf.iter().map(|x| x.start..=x.last).collect(),
                        alignment: r.out_iova_alignment,
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    let n = r.num_iovas as usize;
                    buf.resize(n, iu::iommu_iova_range { start: 0, last: 0 });
                }
                Err(e) => return Err(self.err("IOMMU_IOAS_IOVA_RANGES", None, e)),
            }
        }
    }

    /// Reserves `ranges` for mapping (`IOMMU_IOAS_ALLOW_IOVAS`): attaching a device that
    /// cannot reach all of them fails, and kernel-chosen IOVAs come from them. Replaces
    /// any previous list; an empty list removes the restriction.
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// ioas.allow_iovas(&[0x1_0000_0000..=0x1_ffff_ffff])?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn allow_iovas(&self, ranges: &[RangeInclusive<u64>]) -> Result<()> {
        let raw: Vec<iu::iommu_iova_range> = ranges
            .iter()
            .map(|r| iu::iommu_iova_range {
                start: *r.start(),
                last: *r.end(),
            })
            .collect();
        let mut a: iu::iommu_ioas_allow_iovas = sys::zeroed();
        a.size = size_of_val(&a) as u32;
        a.ioas_id = self.id;
        sys::ioas_allow_iovas(self.iommufd.as_fd(), &mut a, &raw)
            .map_err(|e| self.err("IOMMU_IOAS_ALLOW_IOVAS", None, e))
    }

    /// Whether the IOMMU may use large pages for contiguous memory in this IOAS
    /// (`IOMMU_OPTION_HUGE_PAGES`; on by default).
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// let on: bool = ioas.huge_pages()?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn huge_pages(&self) -> Result<bool> {
        self.iommufd
            .option(
                iu::iommufd_option_IOMMU_OPTION_HUGE_PAGES,
                false,
                self.id,
                0,
            )
            .map(|v| v != 0)
            .map_err(|e| self.err("IOMMU_OPTION get HUGE_PAGES", None, e))
    }

    /// Enables or disables large IOMMU pages. Disabling (PAGE_SIZE IOPTEs only) is what
    /// lets [`Ioas::cut_unmap`] split areas; it must happen before anything is mapped
    /// while a device is attached ([`Error::HugePagesLocked`]).
    ///
    /// ```no_run
    /// # let ioas: vfio_gmem::iommufd::Ioas = unimplemented!();
    /// ioas.set_huge_pages(false)?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn set_huge_pages(&self, on: bool) -> Result<()> {
        self.cut_verified
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.iommufd
            .option(
                iu::iommufd_option_IOMMU_OPTION_HUGE_PAGES,
                true,
                self.id,
                on as u64,
            )
            .map(drop)
            .map_err(|e| {
                if !on && e.raw_os_error() == Some(libc::EINVAL) {
                    Error::HugePagesLocked {
                        ioas: self.id,
                        source: e,
                    }
                } else {
                    self.err("IOMMU_OPTION set HUGE_PAGES", None, e)
                }
            })
    }
}

impl Drop for Ioas {
    fn drop(&mut self) {
        // Destroying unmaps everything. It fails (EBUSY) while a device or HWPT still
        // uses the IOAS. Dropping the handle still means "these mappings are gone":
        // empty the IOAS at once, so no page stays pinned and no device reaches memory
        // its owner may free next (a VMM unmapping guest RAM right after dropping its DMA
        // space); the empty object is destroyed as soon as it is free (reap_orphans).
        self.iommufd.reap_orphans();
        match self.iommufd.destroy(self.id) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                match self.unmap_all() {
                    Ok(bytes) => log::debug!(
                        "IOAS {} is still attached (a device or HWPT uses it): unmapped its \
                         {bytes:#x} bytes; it is destroyed once free (Iommufd::reap_orphans, \
                         run at every IOAS allocation and drop) or when iommufd fd {} closes",
                        self.id,
                        self.iommufd.raw()
                    ),
                    Err(u) => log::warn!(
                        "IOMMU_DESTROY of IOAS {} on iommufd fd {} failed: {e}, and emptying \
                         it failed too: {u}; its pages stay pinned until its devices close",
                        self.id,
                        self.iommufd.raw()
                    ),
                }
                self.iommufd.orphan(self.id);
            }
            Err(e) => log::warn!(
                "IOMMU_DESTROY of IOAS {} on iommufd fd {} failed: {e}",
                self.id,
                self.iommufd.raw()
            ),
        }
    }
}

/// The backend-neutral view; errors arrive as [`MapError::Explained`] holding an
/// [`Error`].
impl DmaMapper for Ioas {
    fn backend(&self) -> Backend {
        Backend::Iommufd
    }

    fn can_map_file(&self) -> bool {
        true
    }

    unsafe fn map_user(
        &self,
        iova: Iova,
        va: u64,
        len: u64,
        access: Access,
    ) -> std::result::Result<u64, MapError> {
        // SAFETY: the trait method's contract is the inherent one's.
        unsafe { Ioas::map_user(self, iova, va, len, access) }.map_err(Into::into)
    }

    fn map_file(
        &self,
        iova: Iova,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        access: Access,
    ) -> std::result::Result<u64, MapError> {
        Ioas::map_file(self, iova, fd, offset, len, access).map_err(Into::into)
    }

    fn unmap(&self, iova: u64, len: u64) -> std::result::Result<u64, MapError> {
        Ioas::unmap(self, iova, len).map_err(Into::into)
    }

    fn unmap_all(&self) -> std::result::Result<u64, MapError> {
        Ioas::unmap_all(self).map_err(Into::into)
    }
}
