//! Device regions (BARs, config space, ROM...): their info, capability chains, and
//! mmap of BARs honoring sparse-mmap areas.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use crate::sys::vfio_uapi as vu;

/// One mmap-able window of a region (offsets relative to the region start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseArea {
    /// Offset from the start of the region.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

/// A capability from a region's info chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionCap {
    /// Only these areas may be mmap'd (e.g. a BAR holding the MSI-X table).
    SparseMmap(Vec<SparseArea>),
    /// Device-specific region type.
    Type {
        /// `VFIO_REGION_TYPE_*`.
        ty: u32,
        /// The type's subtype.
        subtype: u32,
    },
    /// The MSI-X table in this BAR may be mmap'd.
    MsixMappable,
    /// A capability this crate does not decode.
    Other {
        /// Capability id.
        id: u16,
        /// Capability version.
        version: u16,
    },
}

/// What VFIO_DEVICE_GET_REGION_INFO reports for one region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region index (`VFIO_PCI_BAR0_REGION_INDEX`... for vfio-pci).
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`: readable, writable, mmap-able, has capabilities.
    pub flags: u32,
    /// Size in bytes (0: the device does not implement this region).
    pub size: u64,
    /// Offset of the region in the device fd (for pread/pwrite/mmap).
    pub offset: u64,
    /// The capability chain, decoded.
    pub caps: Vec<RegionCap>,
}

impl RegionInfo {
    /// True if the region can be read through the device fd.
    pub fn readable(&self) -> bool {
        self.flags & vu::VFIO_REGION_INFO_FLAG_READ != 0
    }
    /// True if the region can be written through the device fd.
    pub fn writable(&self) -> bool {
        self.flags & vu::VFIO_REGION_INFO_FLAG_WRITE != 0
    }
    /// True if (parts of) the region can be mmap'd.
    pub fn mmappable(&self) -> bool {
        self.flags & vu::VFIO_REGION_INFO_FLAG_MMAP != 0
    }
    /// The areas an mmap may cover: the sparse-mmap list if present, else the whole
    /// region if it is mmap-able, else none.
    ///
    /// ```
    /// use vfio_gmem::vfio::{RegionInfo, RegionCap, SparseArea};
    /// let r = RegionInfo { index: 0, flags: 0x7, size: 0x4000, offset: 0, caps: vec![
    ///     RegionCap::SparseMmap(vec![SparseArea { offset: 0x2000, size: 0x2000 }])] };
    /// assert_eq!(r.mmap_areas(), vec![SparseArea { offset: 0x2000, size: 0x2000 }]);
    /// ```
    pub fn mmap_areas(&self) -> Vec<SparseArea> {
        if !self.mmappable() {
            return Vec::new();
        }
        for cap in &self.caps {
            if let RegionCap::SparseMmap(areas) = cap {
                return areas.iter().copied().filter(|a| a.size > 0).collect();
            }
        }
        vec![SparseArea {
            offset: 0,
            size: self.size,
        }]
    }
}

const CAP_HEADER: usize = 8;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Decodes a VFIO info capability chain. `buf` is the whole info buffer (offsets in the
/// chain are from its start), `first` the offset of the first header (0 = none). Stops at
/// a zero `next`, an out-of-bounds or truncated entry, or a cycle (offsets must grow).
pub fn parse_region_caps(buf: &[u8], first: u32) -> Vec<RegionCap> {
    let mut caps = Vec::new();
    let mut off = first as usize;
    let mut last = 0usize;
    while off != 0 && off > last && off + CAP_HEADER <= buf.len() {
        let (Some(id), Some(version), Some(next)) =
            (u16_at(buf, off), u16_at(buf, off + 2), u32_at(buf, off + 4))
        else {
            break;
        };
        let body = off + CAP_HEADER;
        let cap = match id as u32 {
            vu::VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
                let n = u32_at(buf, body).unwrap_or(0) as usize;
                let areas = (0..n)
                    .map_while(|i| {
                        let a = body + 8 + i * 16;
                        Some(SparseArea {
                            offset: u64_at(buf, a)?,
                            size: u64_at(buf, a + 8)?,
                        })
                    })
                    .collect();
                RegionCap::SparseMmap(areas)
            }
            vu::VFIO_REGION_INFO_CAP_TYPE => match (u32_at(buf, body), u32_at(buf, body + 4)) {
                (Some(ty), Some(subtype)) => RegionCap::Type { ty, subtype },
                _ => break,
            },
            vu::VFIO_REGION_INFO_CAP_MSIX_MAPPABLE => RegionCap::MsixMappable,
            _ => RegionCap::Other { id, version },
        };
        caps.push(cap);
        last = off;
        off = next as usize;
    }
    caps
}

/// A BAR mapped into this process: the whole BAR, or only its sparse-mmap areas (the rest
/// of the range stays reserved and inaccessible). Unmapped on drop.
///
/// `read_*`/`write_*` panic, like slice indexing, on an offset that is misaligned or not
/// inside a mapped area (a driver bug); `try_read_*`/`try_write_*` return
/// [`VfioError::BarAccess`](super::VfioError::BarAccess) instead, for offsets that come
/// from outside. Use [`Device::region_read`](super::Device::region_read) for registers
/// outside the areas.
///
/// ```no_run
/// use vfio_gmem::vfio::Device;
/// let dev = Device::open_cdev("/dev/vfio/devices/vfio0")?;
/// // ... bind to iommufd and attach first ...
/// let bar0 = dev.map_bar(0)?;
/// let id = bar0.read_u32(0);
/// bar0.write_u32(4, !id);
/// # Ok::<(), vfio_gmem::vfio::VfioError>(())
/// ```
#[derive(Debug)]
pub struct BarMapping {
    base: NonNull<u8>,
    len: usize,
    areas: Vec<SparseArea>,
}

impl BarMapping {
    /// Maps `areas` of the region at `region_offset` of `fd`. Invariant on success: every
    /// area lies inside `[0, len)` and is mapped read/write at `base + area.offset`.
    pub(crate) fn new(
        fd: BorrowedFd<'_>,
        region_offset: u64,
        region_size: u64,
        areas: Vec<SparseArea>,
    ) -> io::Result<Self> {
        let len = usize::try_from(region_size).map_err(|_| io::Error::other("BAR too large"))?;
        for a in &areas {
            let end = a.offset.checked_add(a.size);
            if end.is_none_or(|e| e > region_size) || a.offset % page_size() != 0 {
                return Err(io::Error::other(format!(
                    "sparse area {:#x}+{:#x} outside the {region_size:#x}-byte region or unaligned",
                    a.offset, a.size
                )));
            }
        }
        if len == 0 || areas.is_empty() {
            return Err(io::Error::other("region has nothing to mmap"));
        }
        let base = mmio::reserve(len)?;
        let map = BarMapping { base, len, areas };
        for a in &map.areas {
            mmio::map_fixed(
                fd.as_raw_fd(),
                map.base,
                a.offset as usize,
                a.size as usize,
                region_offset + a.offset,
            )?;
        }
        Ok(map)
    }

    /// Length of the mapped range (the region size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping (never: construction refuses empty regions).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The areas that are accessible.
    pub fn areas(&self) -> &[SparseArea] {
        &self.areas
    }

    /// True if `[offset, offset+size)` lies inside one mapped area.
    pub fn is_mapped(&self, offset: usize, size: usize) -> bool {
        let (o, s) = (offset as u64, size as u64);
        self.areas
            .iter()
            .any(|a| o >= a.offset && o + s <= a.offset + a.size)
    }

    fn checked(&self, offset: usize, size: usize) -> Result<(), super::VfioError> {
        if offset % size == 0 && self.is_mapped(offset, size) {
            Ok(())
        } else {
            Err(super::VfioError::BarAccess {
                offset,
                size,
                areas: self
                    .areas
                    .iter()
                    .map(|a| format!("[{:#x}, {:#x})", a.offset, a.offset + a.size))
                    .collect::<Vec<_>>()
                    .join(" "),
            })
        }
    }

    fn check(&self, offset: usize, size: usize) {
        if let Err(e) = self.checked(offset, size) {
            panic!("{e}");
        }
    }

    /// Volatile 32-bit read at `offset`, or an error for a bad offset.
    pub fn try_read_u32(&self, offset: usize) -> Result<u32, super::VfioError> {
        self.checked(offset, 4)?;
        Ok(mmio::read::<u32>(self.base, offset))
    }
    /// Volatile 32-bit write at `offset`, or an error for a bad offset.
    pub fn try_write_u32(&self, offset: usize, value: u32) -> Result<(), super::VfioError> {
        self.checked(offset, 4)?;
        mmio::write::<u32>(self.base, offset, value);
        Ok(())
    }
    /// Volatile 64-bit read at `offset`, or an error for a bad offset.
    pub fn try_read_u64(&self, offset: usize) -> Result<u64, super::VfioError> {
        self.checked(offset, 8)?;
        Ok(mmio::read::<u64>(self.base, offset))
    }
    /// Volatile 64-bit write at `offset`, or an error for a bad offset.
    pub fn try_write_u64(&self, offset: usize, value: u64) -> Result<(), super::VfioError> {
        self.checked(offset, 8)?;
        mmio::write::<u64>(self.base, offset, value);
        Ok(())
    }

    /// Volatile 32-bit read at `offset`.
    pub fn read_u32(&self, offset: usize) -> u32 {
        self.check(offset, 4);
        mmio::read::<u32>(self.base, offset)
    }
    /// Volatile 32-bit write at `offset`.
    pub fn write_u32(&self, offset: usize, value: u32) {
        self.check(offset, 4);
        mmio::write::<u32>(self.base, offset, value)
    }
    /// Volatile 64-bit read at `offset`.
    pub fn read_u64(&self, offset: usize) -> u64 {
        self.check(offset, 8);
        mmio::read::<u64>(self.base, offset)
    }
    /// Volatile 64-bit write at `offset`.
    pub fn write_u64(&self, offset: usize, value: u64) {
        self.check(offset, 8);
        mmio::write::<u64>(self.base, offset, value)
    }
}

// SAFETY: a BarMapping owns its address range outright (no aliasing Rust references
// exist into it) and unmaps it from Drop, so moving it to another thread is sound. It is
// deliberately not Sync: concurrent MMIO from several threads needs the caller's design.
unsafe impl Send for BarMapping {}

impl Drop for BarMapping {
    fn drop(&mut self) {
        mmio::unmap(self.base, self.len);
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// The only unsafe code of BAR access. Invariant (upheld by `BarMapping`): `base` points
/// to a live reservation of `len` bytes owned by one `BarMapping`, and reads/writes are
/// only issued for aligned offsets inside an area mapped by `map_fixed`.
mod mmio {
    use std::io;
    use std::ptr::NonNull;

    pub(super) fn reserve(len: usize) -> io::Result<NonNull<u8>> {
        // SAFETY: a fresh private PROT_NONE mapping at an address of the kernel's choice;
        // no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))
    }

    pub(super) fn map_fixed(
        fd: i32,
        base: NonNull<u8>,
        offset: usize,
        len: usize,
        file_offset: u64,
    ) -> io::Result<()> {
        // SAFETY: [base+offset, +len) lies inside our own reservation (checked by the
        // caller), so MAP_FIXED replaces only memory this BarMapping owns.
        let p = unsafe {
            libc::mmap(
                base.as_ptr().add(offset).cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                file_offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(super) fn unmap(base: NonNull<u8>, len: usize) {
        // SAFETY: the reservation (and every area mapped over it) is ours and is
        // unmapped exactly once, from Drop.
        unsafe { libc::munmap(base.as_ptr().cast(), len) };
    }

    pub(super) fn read<T: Copy>(base: NonNull<u8>, offset: usize) -> T {
        // SAFETY: the caller checked that offset is aligned for T and inside a mapped
        // area; MMIO must be accessed with a single volatile access of the right width.
        unsafe { base.as_ptr().add(offset).cast::<T>().read_volatile() }
    }

    pub(super) fn write<T: Copy>(base: NonNull<u8>, offset: usize, value: T) {
        // SAFETY: as for `read`.
        unsafe { base.as_ptr().add(offset).cast::<T>().write_volatile(value) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(buf: &mut Vec<u8>, off: usize, bytes: &[u8]) {
        if buf.len() < off + bytes.len() {
            buf.resize(off + bytes.len(), 0);
        }
        buf[off..off + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn decodes_a_chain_with_sparse_mmap_type_and_unknown_caps() {
        let mut b = vec![0u8; 32]; // the fixed vfio_region_info part
                                   // sparse mmap at 32: id 1, v1, next 80; 2 areas.
        put(&mut b, 32, &1u16.to_ne_bytes());
        put(&mut b, 34, &1u16.to_ne_bytes());
        put(&mut b, 36, &80u32.to_ne_bytes());
        put(&mut b, 40, &2u32.to_ne_bytes());
        put(&mut b, 48, &0u64.to_ne_bytes());
        put(&mut b, 56, &0x1000u64.to_ne_bytes());
        put(&mut b, 64, &0x3000u64.to_ne_bytes());
        put(&mut b, 72, &0x1000u64.to_ne_bytes());
        // type at 80, next 96.
        put(&mut b, 80, &2u16.to_ne_bytes());
        put(&mut b, 84, &96u32.to_ne_bytes());
        put(&mut b, 88, &0x8000_8086u32.to_ne_bytes());
        put(&mut b, 92, &3u32.to_ne_bytes());
        // unknown id 77 at 96, next 112; msix-mappable at 112, end.
        put(&mut b, 96, &77u16.to_ne_bytes());
        put(&mut b, 98, &2u16.to_ne_bytes());
        put(&mut b, 100, &112u32.to_ne_bytes());
        put(&mut b, 112, &3u16.to_ne_bytes());
        put(&mut b, 116, &0u32.to_ne_bytes());
        let caps = parse_region_caps(&b, 32);
        assert_eq!(
            caps,
            [
                RegionCap::SparseMmap(vec![
                    SparseArea {
                        offset: 0,
                        size: 0x1000
                    },
                    SparseArea {
                        offset: 0x3000,
                        size: 0x1000
                    },
                ]),
                RegionCap::Type {
                    ty: 0x8000_8086,
                    subtype: 3
                },
                RegionCap::Other { id: 77, version: 2 },
                RegionCap::MsixMappable,
            ]
        );
    }

    #[test]
    fn stops_on_cycles_and_truncation() {
        let mut b = vec![0u8; 48];
        put(&mut b, 32, &3u16.to_ne_bytes());
        put(&mut b, 36, &32u32.to_ne_bytes()); // points at itself
        assert_eq!(parse_region_caps(&b, 32), [RegionCap::MsixMappable]);
        assert_eq!(parse_region_caps(&b, 44), []); // header would run past the end
        assert_eq!(parse_region_caps(&b, 0), []);
        // sparse cap claiming 5 areas but holding none: decoded as far as the buffer goes.
        let mut c = vec![0u8; 48];
        put(&mut c, 32, &1u16.to_ne_bytes());
        put(&mut c, 40, &5u32.to_ne_bytes());
        assert_eq!(parse_region_caps(&c, 32), [RegionCap::SparseMmap(vec![])]);
    }

    #[test]
    fn mmap_areas_follow_flags_and_sparse_cap() {
        let mut r = RegionInfo {
            index: 0,
            flags: 0x3,
            size: 0x1000,
            offset: 0,
            caps: vec![],
        };
        assert!(r.mmap_areas().is_empty());
        r.flags |= vu::VFIO_REGION_INFO_FLAG_MMAP;
        assert_eq!(
            r.mmap_areas(),
            [SparseArea {
                offset: 0,
                size: 0x1000
            }]
        );
    }

    #[test]
    fn bar_mapping_over_a_memfd_checks_bounds_and_unmaps() {
        let name = std::ffi::CString::new("bar").unwrap();
        // SAFETY: valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by this test.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(0x4000).unwrap();
        use std::os::fd::AsFd;
        let areas = vec![SparseArea {
            offset: 0x2000,
            size: 0x1000,
        }];
        let m = BarMapping::new(file.as_fd(), 0, 0x4000, areas).unwrap();
        m.write_u64(0x2008, 0x1122_3344_5566_7788);
        assert_eq!(m.read_u32(0x2008), 0x5566_7788);
        assert!(!m.is_mapped(0x1000, 4));
        assert!(std::panic::catch_unwind(|| m.read_u32(0x1000)).is_err());
        assert!(std::panic::catch_unwind(|| m.read_u32(0x2002)).is_err());
        let e = m.try_read_u32(0x1000).unwrap_err().to_string();
        assert!(e.contains("at 0x1000") && e.contains("region_read"), "{e}");
        assert!(m.try_write_u64(0x2004, 1).is_err());
        let bad = vec![SparseArea {
            offset: 0x3000,
            size: 0x2000,
        }];
        assert!(BarMapping::new(file.as_fd(), 0, 0x4000, bad).is_err());
    }
}
