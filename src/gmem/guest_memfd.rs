//! [`GuestMemfd`]: a guest_memfd file, created through a VM or adopted from the VMM.

use std::borrow::Borrow;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use kvm_bindings::kvm_create_guest_memfd;
use kvm_ioctls::VmFd;

use super::error::{kvm_err, GmemError};
use super::fdops;
use super::flags::GmemFlags;
use super::mmap::MappedMemory;
use super::vm::KvmVm;

/// guest_memfd offsets and lengths are in units of 4 KiB pages.
const GMEM_PAGE: u64 = 4096;

/// A guest_memfd: the file holding a VM's (private, and with `INIT_SHARED`/`MMAP` also
/// shared) guest memory. Bound to the VM that created it; closed on drop.
///
/// ```no_run
/// use vfio_gmem::gmem::{GmemFlags, GuestMemfd, KvmVm, VmType};
/// let vm = KvmVm::create(VmType::Default)?;
/// let gmem = GuestMemfd::create(&vm, 1 << 20, GmemFlags::MMAP | GmemFlags::INIT_SHARED)?;
/// let mut map = gmem.mmap()?;
/// map.write(0, b"guest")?;
/// gmem.punch_hole(0, 4096)?; // page 0 reads back as zeros
/// # Ok::<(), vfio_gmem::gmem::GmemError>(())
/// ```
#[derive(Debug)]
pub struct GuestMemfd {
    file: File,
    size: u64,
    flags: Option<GmemFlags>,
}

impl GuestMemfd {
    /// Creates a guest_memfd of `size` bytes (a non-zero multiple of 4 KiB) for `vm`.
    ///
    /// Flags the VM does not accept (per `KVM_CAP_GUEST_MEMFD_FLAGS`) are refused before
    /// the call with [`GmemError::FlagsRefused`], which lists what the VM accepts.
    pub fn create<V: Borrow<VmFd>>(
        vm: &KvmVm<V>,
        size: u64,
        flags: GmemFlags,
    ) -> Result<Self, GmemError> {
        let what = || format!("guest_memfd of {size:#x} bytes (flags {flags})");
        if size == 0 || size % GMEM_PAGE != 0 {
            return Err(GmemError::invalid(
                format!("creating {}", what()),
                "the size must be a non-zero multiple of 4 KiB",
            ));
        }
        if !vm.supports_guest_memfd() {
            return Err(GmemError::NoGuestMemfd {
                vm_type: vm.vm_type(),
            });
        }
        let accepted = vm.guest_memfd_flags();
        if !accepted.contains(flags) {
            return Err(GmemError::FlagsRefused {
                requested: flags,
                accepted,
                vm_type: vm.vm_type(),
            });
        }
        let arg = kvm_create_guest_memfd {
            size,
            flags: flags.bits(),
            reserved: [0; 6],
        };
        let fd = vm.vm_fd().create_guest_memfd(arg).map_err(|e| {
            let e = kvm_err(e);
            let hint = match e.raw_os_error() {
                Some(libc::ENOMEM) => "not enough memory for the file's metadata",
                Some(libc::EMFILE | libc::ENFILE) => "too many open files (ulimit -n)",
                _ => "check dmesg",
            };
            GmemError::os_hint("KVM_CREATE_GUEST_MEMFD", what(), e, hint)
        })?;
        // SAFETY: KVM_CREATE_GUEST_MEMFD just returned this fd; nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(GuestMemfd {
            file,
            size,
            flags: Some(flags),
        })
    }

    /// Takes over a guest_memfd the VMM created. Fails with [`GmemError::NotGuestMemfd`]
    /// (naming what the fd really is) for any other kind of file. Its creation flags are
    /// unknown; [`adopt_with_flags`](Self::adopt_with_flags) records them if the VMM knows.
    ///
    /// ```no_run
    /// use vfio_gmem::gmem::GuestMemfd;
    /// # let fd: std::os::fd::OwnedFd = todo!();
    /// let gmem = GuestMemfd::adopt(fd)?;
    /// println!("{} bytes", gmem.size());
    /// # Ok::<(), vfio_gmem::gmem::GmemError>(())
    /// ```
    pub fn adopt(fd: OwnedFd) -> Result<Self, GmemError> {
        Self::adopt_inner(fd, None)
    }

    /// Like [`adopt`](Self::adopt), recording the flags the file was created with.
    pub fn adopt_with_flags(fd: OwnedFd, flags: GmemFlags) -> Result<Self, GmemError> {
        Self::adopt_inner(fd, Some(flags))
    }

    fn adopt_inner(fd: OwnedFd, flags: Option<GmemFlags>) -> Result<Self, GmemError> {
        if !fdops::is_guest_memfd(fd.as_fd()) {
            return Err(GmemError::NotGuestMemfd {
                fd: fd.as_raw_fd(),
                actual: fdops::describe_fd(fd.as_fd()),
            });
        }
        let file = File::from(fd);
        let size = file
            .metadata()
            .map_err(|e| GmemError::os("fstat", format!("guest_memfd fd {}", file.as_raw_fd()), e))?
            .len();
        Ok(GuestMemfd { file, size, flags })
    }

    /// True if `fd` is a guest_memfd: it lives on guest_memfd's own filesystem
    /// (`GUEST_MEMFD_MAGIC`; its `/proc/self/fd` link reads `/[kvm-gmem] (deleted)` on 7.3),
    /// or on older kernels its link reads `anon_inode:[kvm-gmem]`.
    ///
    /// ```
    /// let f = std::fs::File::open("/proc/self/stat").unwrap();
    /// assert!(!vfio_gmem::gmem::GuestMemfd::is_guest_memfd(&f));
    /// ```
    pub fn is_guest_memfd(fd: &impl AsFd) -> bool {
        fdops::is_guest_memfd(fd.as_fd())
    }

    /// Size in bytes (fixed at creation).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Creation flags, if known (always for files created by [`create`](Self::create)).
    pub fn flags(&self) -> Option<GmemFlags> {
        self.flags
    }

    /// Maps the whole file shared and read-write. Needs `MMAP`; reading or writing a
    /// page that is private kills the process with `SIGBUS`.
    ///
    /// In Linux 7.3 host access is decided per file, not per page: a file created with
    /// `INIT_SHARED` is host-accessible everywhere, one without it nowhere, whatever
    /// `KVM_SET_MEMORY_ATTRIBUTES` says. On a VM type with private memory (which refuses
    /// `INIT_SHARED`) the shared backing therefore has to be a separate file ([`Memfd`]).
    ///
    /// [`Memfd`]: super::Memfd
    pub fn mmap(&self) -> Result<MappedMemory, GmemError> {
        self.mmap_range(0, self.size)
    }

    /// Maps `[offset, offset+len)` (4 KiB aligned) shared and read-write. See [`mmap`](Self::mmap).
    pub fn mmap_range(&self, offset: u64, len: u64) -> Result<MappedMemory, GmemError> {
        let fd = self.file.as_raw_fd();
        let what = || format!("mmap of guest_memfd fd {fd}");
        fdops::check_range(what, offset, len, self.size, GMEM_PAGE)?;
        if let Some(flags) = self.flags {
            if !flags.contains(GmemFlags::MMAP) {
                return Err(GmemError::MmapNotEnabled {
                    fd,
                    flags: Some(flags),
                });
            }
        }
        let n = usize::try_from(len)
            .map_err(|_| GmemError::invalid(what(), "too large for this address space"))?;
        MappedMemory::map_shared(self.file.as_fd(), offset, n).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENODEV) {
                GmemError::MmapNotEnabled { fd, flags: None }
            } else {
                GmemError::os(
                    "mmap",
                    format!("guest_memfd fd {fd} [{offset:#x}, {:#x})", offset + len),
                    e,
                )
            }
        })
    }

    /// Frees the pages of `[offset, offset+len)` (4 KiB aligned); the file keeps its
    /// size. Shared pages read back as zeros afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), GmemError> {
        let what = || format!("punch_hole on guest_memfd fd {}", self.file.as_raw_fd());
        fdops::check_range(what, offset, len, self.size, GMEM_PAGE)?;
        fdops::punch_hole(self.file.as_fd(), offset, len)
            .map_err(|e| GmemError::os("fallocate(PUNCH_HOLE|KEEP_SIZE)", what(), e))
    }

    /// Allocates the pages of `[offset, offset+len)` (4 KiB aligned) now.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<(), GmemError> {
        let what = || format!("allocate on guest_memfd fd {}", self.file.as_raw_fd());
        fdops::check_range(what, offset, len, self.size, GMEM_PAGE)?;
        fdops::fallocate(self.file.as_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len)
            .map_err(|e| GmemError::os("fallocate(KEEP_SIZE)", what(), e))
    }

    /// Gives up the wrapper, keeping the fd.
    pub fn into_owned_fd(self) -> OwnedFd {
        self.file.into()
    }
}

impl AsFd for GuestMemfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for GuestMemfd {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gmem::Memfd;

    #[test]
    fn adopting_something_else_names_what_it_is() {
        let mem = Memfd::new("not-gmem", 4096).unwrap();
        let fd: OwnedFd = mem.into_file().into();
        let raw = fd.as_raw_fd();
        let e = GuestMemfd::adopt(fd).unwrap_err();
        assert_eq!(e.errno(), libc::EBADF);
        let m = e.to_string();
        assert!(
            m.starts_with(&format!(
                "fd {raw} is not a guest_memfd: it is a memfd (/memfd:not-gmem"
            )),
            "{m}"
        );
        assert!(
            m.ends_with("pass the fd KVM_CREATE_GUEST_MEMFD returned"),
            "{m}"
        );

        let path = std::env::temp_dir().join(format!("vfio-gmem-adopt-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let m = GuestMemfd::adopt(file.into()).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(
            m.contains(&format!("it is the regular file {}", path.display())),
            "{m}"
        );

        let null = File::open("/dev/null").unwrap();
        let m = GuestMemfd::adopt(null.into()).unwrap_err().to_string();
        assert!(m.contains("it is the character device /dev/null"), "{m}");
    }
}
