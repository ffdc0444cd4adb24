//! File-descriptor helpers shared by guest_memfd and memfd: fallocate, identification.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::error::GmemError;

/// Filesystem magic of the guest_memfd pseudo filesystem (include/uapi/linux/magic.h).
pub(crate) const GUEST_MEMFD_MAGIC: i64 = 0x474d_454d;

/// What `/proc/self/fd/N` links to for a guest_memfd on kernels where it was a plain
/// anonymous inode (6.8 - 6.17). Kernels with guest_memfd's own filesystem (7.3 measured)
/// show `/[kvm-gmem] (deleted)` instead, so the filesystem magic is checked first.
pub(crate) const GUEST_MEMFD_LINK: &str = "anon_inode:[kvm-gmem]";

/// `fallocate(2)` with `mode`.
pub(crate) fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: plain system call on a borrowed, open fd; no memory is passed.
    let r = unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, l) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Frees `[offset, offset+len)` of a file, keeping its size; reads return zeros after.
pub(crate) fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        fd,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// The link target of `/proc/self/fd/N`, or a note on why it is unknown.
pub(crate) fn fd_link(fd: BorrowedFd<'_>) -> String {
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(p) => p.to_string_lossy().into_owned(),
        Err(e) => format!("(unreadable /proc/self/fd link: {e})"),
    }
}

/// `fstatfs(2)` of the file behind `fd`.
fn statfs(fd: BorrowedFd<'_>) -> io::Result<libc::statfs> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes a full `struct statfs` into the pointer on success.
    let r = unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: initialized by the successful call above.
    Ok(unsafe { st.assume_init() })
}

/// The filesystem magic of the file behind `fd`.
pub(crate) fn fs_magic(fd: BorrowedFd<'_>) -> io::Result<i64> {
    #[allow(clippy::unnecessary_cast)] // f_type is not i64 on every architecture
    Ok(statfs(fd)?.f_type as i64)
}

/// The size of the pages backing the file behind `fd`, as the file itself says: for a
/// hugetlbfs file (a hugetlb memfd, or a file on a hugetlbfs mount) `f_bsize` of its
/// filesystem, which is the huge page size of its pool (2 MiB, 1 GiB...); 4 KiB for
/// anything else (shmem, guest_memfd).
pub(crate) fn backing_page_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = statfs(fd)?;
    #[allow(clippy::unnecessary_cast)] // f_type and f_bsize differ in type by architecture
    if st.f_type as i64 == HUGETLBFS_MAGIC {
        let bsize = st.f_bsize as u64;
        if bsize.is_power_of_two() && bsize > 4096 {
            return Ok(bsize);
        }
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("hugetlbfs reports a block size of {bsize:#x}, not a huge page size"),
        ));
    }
    Ok(4096)
}

/// True if `fd` is a guest_memfd: its filesystem is guest_memfd's own (`GUEST_MEMFD_MAGIC`)
/// or, on older kernels, its link names the `[kvm-gmem]` anonymous inode.
pub(crate) fn is_guest_memfd(fd: BorrowedFd<'_>) -> bool {
    fs_magic(fd).ok() == Some(GUEST_MEMFD_MAGIC) || fd_link(fd) == GUEST_MEMFD_LINK
}

/// A human description of what `fd` is, for messages.
pub(crate) fn describe_fd(fd: BorrowedFd<'_>) -> String {
    let link = fd_link(fd);
    if link.starts_with("/memfd:") {
        return format!("a memfd ({link})");
    }
    if link.starts_with("anon_inode:") || link.contains(":[") {
        return link;
    }
    let kind = match std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            let t = m.file_type();
            if t.is_file() {
                "the regular file"
            } else if t.is_dir() {
                "the directory"
            } else if t.is_char_device() {
                "the character device"
            } else if t.is_block_device() {
                "the block device"
            } else {
                "the special file"
            }
        }
        Err(_) => "the file",
    };
    format!("{kind} {link}")
}

/// Checks that `[offset, offset+len)` is non-empty, inside `size` and, if `align` > 1,
/// aligned to it.
pub(crate) fn check_range(
    what: impl FnOnce() -> String,
    offset: u64,
    len: u64,
    size: u64,
    align: u64,
) -> Result<(), GmemError> {
    let detail = if len == 0 {
        "the length is zero; pass at least one page".to_string()
    } else if offset.checked_add(len).is_none_or(|end| end > size) {
        format!(
            "range [{offset:#x}, {:#x}) goes past the end of the file ({size:#x} bytes)",
            offset.saturating_add(len)
        )
    } else if align > 1 && (offset % align != 0 || len % align != 0) {
        format!(
            "offset {offset:#x} and length {len:#x} must be multiples of {align:#x}; round them to that boundary"
        )
    } else {
        return Ok(());
    };
    Err(GmemError::invalid(what(), detail))
}

/// The sysfs file holding the size of the pool of `page_size` huge pages, e.g.
/// `/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages` for 1 GiB pages (present
/// with or without sysctl, and for every supported size, unlike `/proc/sys/vm/nr_hugepages`,
/// which is the default size's only).
pub(crate) fn nr_hugepages_path(page_size: u64) -> String {
    format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages",
        page_size / 1024
    )
}

/// The current content of `page_size`'s pool size (for messages).
pub(crate) fn nr_hugepages(page_size: u64) -> String {
    std::fs::read_to_string(nr_hugepages_path(page_size))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

/// Huge pages of `page_size`'s pool that a new allocation could take now:
/// `free_hugepages - resv_hugepages` (free pages promised to reservations are not
/// available); `None` if the pool's sysfs files cannot be read.
pub(crate) fn available_huge_pages(page_size: u64) -> Option<u64> {
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page_size / 1024);
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{dir}/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("free_hugepages")?.saturating_sub(read("resv_hugepages")?))
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
pub(crate) const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// What kind of guest-memory file `fd` is (`memfd/shmem`, `hugetlbfs`, `guest_memfd`), or
/// a description of what it is instead.
pub(crate) fn guest_memory_kind(fd: BorrowedFd<'_>) -> Result<&'static str, String> {
    match fs_magic(fd) {
        Ok(TMPFS_MAGIC) => Ok("shmem"),
        Ok(HUGETLBFS_MAGIC) => Ok("hugetlbfs"),
        Ok(GUEST_MEMFD_MAGIC) => Ok("guest_memfd"),
        _ if is_guest_memfd(fd) => Ok("guest_memfd"),
        _ => Err(describe_fd(fd)),
    }
}
