//! [`MappedMemory`]: a shared mapping of a file, unmapped on drop.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use super::error::GmemError;

/// A `MAP_SHARED`, read-write mapping of part of a file (memfd, hugetlb memfd or
/// guest_memfd with `MMAP`). Unmapped when dropped.
///
/// The memory is shared with the kernel, devices and the guest, so it is accessed by
/// copying ([`read`](Self::read), [`write`](Self::write)), never through Rust references.
/// Touching a page of a guest_memfd that is private kills the process with `SIGBUS`.
///
/// ```
/// use vfio_gmem::gmem::Memfd;
/// let mem = Memfd::new("doc", 8192).unwrap();
/// let mut map = mem.mmap().unwrap();
/// map.write(4096, b"hello").unwrap();
/// let mut buf = [0u8; 5];
/// map.read(4096, &mut buf).unwrap();
/// assert_eq!(&buf, b"hello");
/// ```
#[derive(Debug)]
pub struct MappedMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; `write` needs `&mut`,
// so safe code cannot race on it from two threads.
unsafe impl Send for MappedMemory {}
// SAFETY: as above; `&self` methods only read.
unsafe impl Sync for MappedMemory {}

impl MappedMemory {
    /// Maps `len` bytes of `fd` from `offset`, shared and read-write.
    pub(crate) fn map_shared(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Self> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh mapping at an address the kernel chooses; it overlaps nothing
        // Rust owns. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(MappedMemory { ptr, len })
    }

    /// Host virtual address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Raw pointer to the first byte (for ioctls that take a user address).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a mapping has at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, op: &str, offset: usize, n: usize) -> Result<(), GmemError> {
        if offset.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(GmemError::invalid(
                format!("{op} of mapping at {:#x}", self.addr()),
                format!(
                    "bytes [{offset:#x}, {:#x}) are outside its {:#x} bytes",
                    offset.saturating_add(n),
                    self.len
                ),
            ));
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes from `offset` into `buf`.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), GmemError> {
        self.check("read", offset, buf.len())?;
        // SAFETY: the source lies inside the live mapping (checked above) and cannot
        // overlap `buf`, which Rust owns.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Reads `len` bytes from `offset` into a new vector.
    pub fn read_vec(&self, offset: usize, len: usize) -> Result<Vec<u8>, GmemError> {
        let mut v = vec![0; len];
        self.read(offset, &mut v)?;
        Ok(v)
    }

    /// Copies `data` to `offset`.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), GmemError> {
        self.check("write", offset, data.len())?;
        // SAFETY: the destination lies inside the live mapping (checked above) and cannot
        // overlap `data`, which Rust owns.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Sets `len` bytes from `offset` to `byte`.
    pub fn fill(&mut self, offset: usize, len: usize, byte: u8) -> Result<(), GmemError> {
        self.check("fill", offset, len)?;
        // SAFETY: the range lies inside the live mapping (checked above).
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), byte, len) };
        Ok(())
    }
}

impl Drop for MappedMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created; nothing borrows it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
