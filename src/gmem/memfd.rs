//! [`Memfd`]: anonymous shared memory (shmem or hugetlbfs) used as a shared backing.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::error::{human_page_size, GmemError};
use super::fdops;
use super::mmap::MappedMemory;

/// Size of the huge pages [`Memfd::hugetlb`] uses.
pub const HUGE_PAGE_2M: u64 = 2 << 20;

/// Size of gigantic pages ([`HugePageSize::Size1G`]).
pub const HUGE_PAGE_1G: u64 = 1 << 30;

/// The huge page size of a hugetlb memfd ([`Memfd::hugetlb_sized`]); each size has its
/// own pool (`/sys/kernel/mm/hugepages/hugepages-<N>kB/nr_hugepages`).
///
/// ```
/// use vfio_gmem::gmem::HugePageSize;
/// assert_eq!(HugePageSize::Size1G.bytes(), 1 << 30);
/// assert_eq!(HugePageSize::from_bytes(2 << 20), Some(HugePageSize::Size2M));
/// assert_eq!(HugePageSize::Size1G.to_string(), "1 GiB");
/// assert_eq!(
///     HugePageSize::Size1G.pool(),
///     "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
/// );
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HugePageSize {
    /// 2 MiB pages (`MFD_HUGE_2MB`), the x86 default huge page size.
    #[default]
    Size2M,
    /// 1 GiB pages (`MFD_HUGE_1GB`); best reserved at boot (`hugepagesz=1G hugepages=N`).
    Size1G,
}

impl HugePageSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::Size2M => HUGE_PAGE_2M,
            HugePageSize::Size1G => HUGE_PAGE_1G,
        }
    }

    /// The size of `bytes`, if it is one of these.
    pub fn from_bytes(bytes: u64) -> Option<Self> {
        match bytes {
            HUGE_PAGE_2M => Some(HugePageSize::Size2M),
            HUGE_PAGE_1G => Some(HugePageSize::Size1G),
            _ => None,
        }
    }

    /// The sysfs file holding this size's pool size.
    pub fn pool(self) -> String {
        fdops::nr_hugepages_path(self.bytes())
    }

    fn memfd_flag(self) -> libc::c_uint {
        match self {
            HugePageSize::Size2M => libc::MFD_HUGE_2MB,
            HugePageSize::Size1G => libc::MFD_HUGE_1GB,
        }
    }
}

impl std::fmt::Display for HugePageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&human_page_size(self.bytes()))
    }
}

/// The size of the pages behind `fd`, as the file says: a hugetlbfs file's huge page size
/// (its filesystem's block size, e.g. 1 GiB for a `MFD_HUGE_1GB` memfd or a file on a
/// `pagesize=1G` mount), 4 KiB for other files (shmem memfd, guest_memfd).
///
/// ```
/// use vfio_gmem::gmem::{backing_page_size, Memfd};
/// let mem = Memfd::new("ram", 1 << 20).unwrap();
/// assert_eq!(backing_page_size(mem.file()).unwrap(), 4096);
/// ```
pub fn backing_page_size(fd: impl AsFd) -> Result<u64, GmemError> {
    let fd = fd.as_fd();
    fdops::backing_page_size(fd).map_err(|e| {
        GmemError::os(
            "fstatfs",
            format!("fd {} ({})", fd.as_raw_fd(), fdops::describe_fd(fd)),
            e,
        )
    })
}

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
        Self::create(name, size, None)
    }

    /// A memfd backed by 2 MiB huge pages (`MFD_HUGETLB | MFD_HUGE_2MB`); `size` must be
    /// a multiple of 2 MiB. [`hugetlb_sized`](Self::hugetlb_sized) with
    /// [`HugePageSize::Size2M`].
    ///
    /// ```no_run
    /// use vfio_gmem::gmem::{Memfd, HUGE_PAGE_2M};
    /// let mem = Memfd::hugetlb("guest-ram", 4 * HUGE_PAGE_2M).unwrap();
    /// mem.allocate(0, mem.size()).unwrap(); // take the pages now, fail early
    /// ```
    pub fn hugetlb(name: &str, size: u64) -> Result<Self, GmemError> {
        Self::hugetlb_sized(name, size, HugePageSize::Size2M)
    }

    /// A memfd backed by huge pages of `page` size (`MFD_HUGETLB | MFD_HUGE_2MB` or
    /// `MFD_HUGE_1GB`); `size` must be a multiple of it. Pages come from that size's pool
    /// ([`HugePageSize::pool`]); [`mmap`](Self::mmap) or [`allocate`](Self::allocate) fail
    /// with an explained [`GmemError::NoHugePages`] when it has too few free pages, and
    /// creation fails with [`GmemError::NoHugePageSize`] if the kernel has no such pool.
    /// [`page_size`](Self::page_size) is read back from the file.
    ///
    /// ```no_run
    /// use vfio_gmem::gmem::{HugePageSize, Memfd};
    /// // needs a reserved 1 GiB page (kernel command line `hugepagesz=1G hugepages=1`)
    /// let mem = Memfd::hugetlb_sized("guest-ram", 1 << 30, HugePageSize::Size1G).unwrap();
    /// assert_eq!(mem.page_size(), 1 << 30);
    /// mem.allocate(0, mem.size()).unwrap();
    /// ```
    pub fn hugetlb_sized(name: &str, size: u64, page: HugePageSize) -> Result<Self, GmemError> {
        Self::create(name, size, Some(page))
    }

    fn create(name: &str, size: u64, huge: Option<HugePageSize>) -> Result<Self, GmemError> {
        let what = || format!("memfd '{name}'");
        let page_size = huge.map_or(4096, HugePageSize::bytes);
        if size == 0 || size % page_size != 0 {
            return Err(GmemError::invalid(
                format!("creating {}", what()),
                format!(
                    "size {size:#x} must be a non-zero multiple of the page size {page_size:#x} ({})",
                    human_page_size(page_size)
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
        if let Some(page) = huge {
            flags |= libc::MFD_HUGETLB | page.memfd_flag();
        }
        // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match (huge, e.raw_os_error()) {
                // hugetlb_file_setup(): no hstate of that size.
                (Some(page), Some(libc::ENODEV)) => GmemError::NoHugePageSize {
                    what: what(),
                    page_size: page.bytes(),
                    source: e,
                },
                (Some(_), Some(libc::EINVAL)) => GmemError::os_hint(
                    "memfd_create",
                    what(),
                    e,
                    "the kernel has no hugetlb memfd (CONFIG_HUGETLBFS off)",
                ),
                _ => GmemError::os_hint(
                    "memfd_create",
                    what(),
                    e,
                    "check the open-file limit (ulimit -n)",
                ),
            });
        }
        // SAFETY: memfd_create just returned this fd; nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // The page size as the file says (hugetlbfs's block size), not as asked.
        let page_size = backing_page_size(&file)?;
        if huge.is_some_and(|p| p.bytes() != page_size) {
            return Err(GmemError::invalid(
                format!("creating {}", what()),
                format!(
                    "the kernel gave the file {} pages, not the {} asked for",
                    human_page_size(page_size),
                    human_page_size(huge.map_or(0, HugePageSize::bytes))
                ),
            ));
        }
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

    /// 4 KiB, or the huge page size of a hugetlb memfd (2 MiB, 1 GiB), as read from the
    /// file when it was created.
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
            page_size: self.page_size,
            pages: len.div_ceil(self.page_size),
            nr_hugepages: fdops::nr_hugepages(self.page_size),
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
    /// ones zeroed (hugetlbfs cannot free part of a huge page: a 4 KiB hole in a 1 GiB
    /// page zeroes those 4 KiB and frees nothing; the page goes back to its pool only when
    /// all of it is punched).
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

    fn mem_page_size_of_shmem() -> u64 {
        let mem = Memfd::new("unit", 4096).unwrap();
        assert_eq!(mem.page_size(), 4096);
        backing_page_size(mem.file()).unwrap()
    }

    #[test]
    fn huge_page_sizes() {
        assert_eq!(HugePageSize::default(), HugePageSize::Size2M);
        assert_eq!(
            HugePageSize::from_bytes(1 << 30),
            Some(HugePageSize::Size1G)
        );
        assert_eq!(HugePageSize::from_bytes(4096), None);
        assert_eq!(HugePageSize::Size2M.to_string(), "2 MiB");
        assert_eq!(
            HugePageSize::Size2M.pool(),
            "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
        );
    }

    #[test]
    fn memfd_rejects_bad_sizes_and_ranges() {
        let e = Memfd::new("unit", 100).unwrap_err().to_string();
        assert!(
            e.contains("memfd 'unit'") && e.contains("multiple of the page size 0x1000"),
            "{e}"
        );
        let e = Memfd::hugetlb("unit", 4096).unwrap_err().to_string();
        assert!(
            e.contains("multiple of the page size 0x200000 (2 MiB)"),
            "{e}"
        );
        // Checked before any kernel call: no 1 GiB pool needed to refuse it.
        let e = Memfd::hugetlb_sized("unit", HUGE_PAGE_2M, HugePageSize::Size1G)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("multiple of the page size 0x40000000 (1 GiB)"),
            "{e}"
        );
        assert_eq!(mem_page_size_of_shmem(), 4096);
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
