//! [`Memfd`]: anonymous shared memory (shmem or hugetlbfs) used as a shared backing.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::error::GmemError;
use super::fdops;
use super::mmap::MappedMemory;

/// Size of the huge pages [`Memfd::hugetlb`] uses.
pub const HUGE_PAGE_2M: u64 = 2 << 20;

/// An anonymous memory file from `memfd_create(2)`: a shared backing that both the VMM
/// (by `mmap`) and the IOMMU (by `IOMMU_IOAS_MAP_FILE` or by address) can use.
///
/// ```
/// use vfio_gmem::gmem::Memfd;
/// let mem = Memfd::new("guest-ram", 1 << 20).unwrap();
/// assert_eq!(mem.size(), 1 << 20);
/// mem.punch_hole(0, 4096).unwrap();
/// ```
#[derive(Debug)]
pub struct Memfd {
    file: File,
    name: String,
    size: u64,
    page_size: u64,
}

impl Memfd {
    /// A shmem memfd of `size` bytes (pages are allocated on first touch).
    pub fn new(name: &str, size: u64) -> Result<Self, GmemError> {
        Self::create(name, size, false)
    }

    /// A memfd backed by 2 MiB huge pages (`MFD_HUGETLB | MFD_HUGE_2MB`); `size` must be
    /// a multiple of 2 MiB. Pages come from the pool in `/proc/sys/vm/nr_hugepages`;
    /// [`mmap`](Self::mmap) or [`allocate`](Self::allocate) fail with an explained
    /// [`GmemError::NoHugePages`] when it has too few free pages.
    ///
    /// ```no_run
    /// use vfio_gmem::gmem::{Memfd, HUGE_PAGE_2M};
    /// let mem = Memfd::hugetlb("guest-ram", 4 * HUGE_PAGE_2M).unwrap();
    /// mem.allocate(0, mem.size()).unwrap(); // take the pages now, fail early
    /// ```
    pub fn hugetlb(name: &str, size: u64) -> Result<Self, GmemError> {
        Self::create(name, size, true)
    }

    fn create(name: &str, size: u64, huge: bool) -> Result<Self, GmemError> {
        let what = || format!("memfd '{name}'");
        let page_size = if huge { HUGE_PAGE_2M } else { 4096 };
        if size == 0 || size % page_size != 0 {
            return Err(GmemError::invalid(
                format!("creating {}", what()),
                format!(
                    "size {size:#x} must be a non-zero multiple of the page size {page_size:#x}"
                ),
            ));
        }
        let cname = CString::new(name).map_err(|_| {
            GmemError::invalid(
                format!("creating {}", what()),
                "the name contains a NUL byte",
            )
        })?;
        let mut flags = libc::MFD_CLOEXEC;
        if huge {
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            let hint = if huge && e.raw_os_error() == Some(libc::EINVAL) {
                "the kernel has no 2 MiB hugetlb pool (CONFIG_HUGETLBFS off, or no 2 MiB page support)"
            } else {
                "check the open-file limit (ulimit -n)"
            };
            return Err(GmemError::os_hint("memfd_create", what(), e, hint));
        }
        // SAFETY: memfd_create just returned this fd; nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size).map_err(|e| {
            GmemError::os_hint(
                "ftruncate",
                what(),
                e,
                "check RLIMIT_FSIZE and shmem limits",
            )
        })?;
        Ok(Memfd {
            file,
            name: name.to_string(),
            size,
            page_size,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Name given at creation (shown as `/memfd:NAME` in `/proc/*/fd`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// 4 KiB, or 2 MiB for a hugetlb memfd.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// True if backed by huge pages.
    pub fn is_hugetlb(&self) -> bool {
        self.page_size > 4096
    }

    fn huge_pages_error(&self, op: &str, len: u64, e: io::Error) -> GmemError {
        GmemError::NoHugePages {
            what: format!("{op} of memfd '{}'", self.name),
            pages: len.div_ceil(HUGE_PAGE_2M),
            nr_hugepages: fdops::nr_hugepages(),
            source: e,
        }
    }

    /// Maps the whole file shared and read-write.
    pub fn mmap(&self) -> Result<MappedMemory, GmemError> {
        let len = usize::try_from(self.size).map_err(|_| {
            GmemError::invalid(
                format!("mmap of memfd '{}'", self.name),
                "too large for this address space",
            )
        })?;
        MappedMemory::map_shared(self.file.as_fd(), 0, len).map_err(|e| {
            if self.is_hugetlb() && e.raw_os_error() == Some(libc::ENOMEM) {
                self.huge_pages_error("mmap", self.size, e)
            } else {
                GmemError::os(
                    "mmap",
                    format!("memfd '{}' ({} bytes)", self.name, self.size),
                    e,
                )
            }
        })
    }

    /// Frees `[offset, offset+len)`; the file keeps its size and the range reads back as
    /// zeros. On a hugetlb memfd whole huge pages inside the range are freed and partial
    /// ones zeroed.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), GmemError> {
        let what = || format!("punch_hole on memfd '{}'", self.name);
        fdops::check_range(what, offset, len, self.size, 1)?;
        fdops::punch_hole(self.file.as_fd(), offset, len)
            .map_err(|e| GmemError::os("fallocate(PUNCH_HOLE)", what(), e))
    }

    /// Allocates the pages of `[offset, offset+len)` now (`fallocate` mode 0), so a
    /// shortage shows up here rather than as a `SIGBUS` later.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<(), GmemError> {
        let what = || format!("allocate on memfd '{}'", self.name);
        fdops::check_range(what, offset, len, self.size, 1)?;
        fdops::fallocate(self.file.as_fd(), 0, offset, len).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSPC | libc::ENOMEM) if self.is_hugetlb() => {
                self.huge_pages_error("allocate", len, e)
            }
            _ => GmemError::os_hint("fallocate", what(), e, "check free memory and shmem limits"),
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Gives up the wrapper, keeping the file.
    pub fn into_file(self) -> File {
        self.file
    }
}

impl AsFd for Memfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Memfd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_write_punch_read_back_zeros() {
        let mem = Memfd::new("unit", 4 * 4096).unwrap();
        assert!(!mem.is_hugetlb());
        let mut map = mem.mmap().unwrap();
        assert_eq!(map.len(), 4 * 4096);
        map.fill(0, 4 * 4096, 0xa5).unwrap();
        mem.punch_hole(4096, 2 * 4096).unwrap();
        assert!(map.read_vec(0, 4096).unwrap().iter().all(|&b| b == 0xa5));
        assert!(map
            .read_vec(4096, 2 * 4096)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        assert!(map
            .read_vec(3 * 4096, 4096)
            .unwrap()
            .iter()
            .all(|&b| b == 0xa5));
        // The file keeps its size.
        assert_eq!(mem.file().metadata().unwrap().len(), 4 * 4096);
        mem.allocate(0, 4096).unwrap();
    }

    #[test]
    fn memfd_rejects_bad_sizes_and_ranges() {
        let e = Memfd::new("unit", 100).unwrap_err().to_string();
        assert!(
            e.contains("memfd 'unit'") && e.contains("multiple of the page size 0x1000"),
            "{e}"
        );
        let e = Memfd::hugetlb("unit", 4096).unwrap_err().to_string();
        assert!(e.contains("multiple of the page size 0x200000"), "{e}");
        let mem = Memfd::new("unit", 4096).unwrap();
        let e = mem.punch_hole(0, 8192).unwrap_err().to_string();
        assert!(
            e.starts_with("punch_hole on memfd 'unit'") && e.contains("past the end"),
            "{e}"
        );
        assert!(mem.punch_hole(0, 0).is_err());
        let map = mem.mmap().unwrap();
        let mut big = [0u8; 8192];
        assert!(map
            .read(0, &mut big)
            .unwrap_err()
            .to_string()
            .contains("outside its 0x1000 bytes"));
    }
}
