//! The `/dev/iommu` context: owns the fd every iommufd object lives in.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use super::error::Error;
use super::ioas::Ioas;
use super::Result;
use crate::sys::{self, iommufd_uapi as iu};

/// How pinned pages are charged against `RLIMIT_MEMLOCK` (`IOMMU_OPTION_RLIMIT_MODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RlimitMode {
    /// Charged to the user (`user_struct::locked_vm`), like io_uring. The default.
    User,
    /// Charged to the process (`mm::locked_vm`), like VFIO type1.
    Process,
}

/// An open iommufd: `/dev/iommu`, or an fd handed over by a privileged helper.
///
/// Objects ([`Ioas`], [`super::Hwpt`]) keep an `Arc<Iommufd>`, so the fd stays open as
/// long as any of them exists; closing it destroys every object still in it.
///
/// ```no_run
/// use std::sync::Arc;
/// use vfio_gmem::iommufd::Iommufd;
/// let iommufd = Arc::new(Iommufd::open()?);
/// let ioas = iommufd.alloc_ioas()?;
/// println!("IOAS {}", ioas.id());
/// # Ok::<(), vfio_gmem::iommufd::Error>(())
/// ```
#[derive(Debug)]
pub struct Iommufd {
    fd: OwnedFd,
    /// Bumped whenever this library changes the compat IOAS, so an [`Ioas`] knows when
    /// its verified cut preconditions may have gone stale.
    ///
    /// [`Ioas`]: super::Ioas
    pub(super) compat_epoch: std::sync::atomic::AtomicU64,
    /// IOASes dropped while a device still used them (emptied, not yet destroyed).
    orphans: std::sync::Mutex<Vec<u32>>,
    /// Serializes [`Ioas::claim_compat`]'s read-then-set of the compat IOAS.
    ///
    /// [`Ioas::claim_compat`]: super::Ioas::claim_compat
    pub(super) compat_claim: std::sync::Mutex<()>,
}

impl Iommufd {
    /// The device node.
    pub const PATH: &'static str = "/dev/iommu";

    /// Opens `/dev/iommu`.
    ///
    /// ```no_run
    /// let iommufd = vfio_gmem::iommufd::Iommufd::open()?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn open() -> Result<Self> {
        Self::open_path(Self::PATH)
    }

    /// Opens an iommufd device node at `path` (e.g. inside a container's /dev).
    ///
    /// ```no_run
    /// let iommufd = vfio_gmem::iommufd::Iommufd::open_path("/dev/iommu")?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::open(path.to_owned(), e))?;
        Ok(Iommufd {
            fd: file.into(),
            compat_epoch: Default::default(),
            orphans: Default::default(),
            compat_claim: Default::default(),
        })
    }

    /// Adopts an already open iommufd (e.g. received over SCM_RIGHTS from a privileged
    /// helper, so the VMM needs no access to `/dev/iommu`). Fails if `fd` is not one.
    ///
    /// ```no_run
    /// use std::os::fd::OwnedFd;
    /// # fn from_helper() -> OwnedFd { unimplemented!() }
    /// let iommufd = vfio_gmem::iommufd::Iommufd::from_fd(from_helper())?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        let me = Iommufd {
            fd,
            compat_epoch: Default::default(),
            orphans: Default::default(),
            compat_claim: Default::default(),
        };
        // Reading a global option is harmless and only an iommufd answers it.
        me.rlimit_mode().map_err(|e| Error::Ioctl {
            op: "adopt iommufd (IOMMU_OPTION get)",
            object: format!("fd {} (not an iommufd?)", me.fd.as_raw_fd()),
            source: io::Error::from_raw_os_error(e.errno().unwrap_or(libc::ENOTTY)),
        })?;
        Ok(me)
    }

    /// Allocates a new IOAS in this context (same as [`Ioas::new`]).
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// let iommufd = Arc::new(vfio_gmem::iommufd::Iommufd::open()?);
    /// let ioas = iommufd.alloc_ioas()?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn alloc_ioas(self: &Arc<Self>) -> Result<Ioas> {
        Ioas::new(self)
    }

    /// The current memlock accounting mode.
    ///
    /// ```no_run
    /// let mode = vfio_gmem::iommufd::Iommufd::open()?.rlimit_mode()?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn rlimit_mode(&self) -> Result<RlimitMode> {
        let v = self
            .option(iu::iommufd_option_IOMMU_OPTION_RLIMIT_MODE, false, 0, 0)
            .map_err(|e| self.err("IOMMU_OPTION get RLIMIT_MODE", e))?;
        Ok(if v == 0 {
            RlimitMode::User
        } else {
            RlimitMode::Process
        })
    }

    /// Sets the memlock accounting mode. Needs `CAP_SYS_RESOURCE`, and must happen
    /// before any object exists in this iommufd.
    ///
    /// ```no_run
    /// use vfio_gmem::iommufd::{Iommufd, RlimitMode};
    /// Iommufd::open()?.set_rlimit_mode(RlimitMode::Process)?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn set_rlimit_mode(&self, mode: RlimitMode) -> Result<()> {
        let v = match mode {
            RlimitMode::User => 0,
            RlimitMode::Process => 1,
        };
        self.option(iu::iommufd_option_IOMMU_OPTION_RLIMIT_MODE, true, 0, v)
            .map(drop)
            .map_err(|source| Error::RlimitMode {
                fd: self.fd.as_raw_fd(),
                source,
            })
    }

    /// `IOMMU_OPTION`: get (returns the value) or set `val` on `object_id`.
    pub(crate) fn option(
        &self,
        option: u32,
        set: bool,
        object_id: u32,
        val: u64,
    ) -> io::Result<u64> {
        let mut o: iu::iommu_option = sys::zeroed();
        o.size = size_of_val(&o) as u32;
        o.option_id = option;
        o.op = if set {
            iu::iommufd_option_ops_IOMMU_OPTION_OP_SET
        } else {
            iu::iommufd_option_ops_IOMMU_OPTION_OP_GET
        } as u16;
        o.object_id = object_id;
        o.val64 = val;
        sys::ioctl_mut(self.as_fd(), sys::IOMMU_OPTION, &mut o)?;
        Ok(o.val64)
    }

    /// Destroys the IOASes that were dropped while a device still used them (dropping an
    /// [`Ioas`] empties it at once; the kernel object can only go once nothing uses it).
    /// Runs by itself at every [`Ioas::new`] and IOAS drop on this iommufd; closing the
    /// iommufd frees them too. Returns how many are still in use.
    ///
    /// ```no_run
    /// # let iommufd: vfio_gmem::iommufd::Iommufd = unimplemented!();
    /// // after closing the devices of a dropped DmaSpace:
    /// assert_eq!(iommufd.reap_orphans(), 0);
    /// ```
    pub fn reap_orphans(&self) -> usize {
        let mut orphans = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
        orphans.retain(|&id| match self.destroy(id) {
            Ok(()) => {
                log::debug!("IOMMU_DESTROY of orphaned IOAS {id}: done");
                false
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
            // ENOENT: someone else destroyed it; anything else will not get better.
            Err(e) => {
                log::debug!("orphaned IOAS {id}: {e}; forgotten");
                false
            }
        });
        orphans.len()
    }

    /// True if IOAS `id` was dropped through this library and only waits to be destroyed.
    pub(super) fn is_orphan(&self, id: u32) -> bool {
        self.orphans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    /// Records an IOAS that could not be destroyed yet (see [`Iommufd::reap_orphans`]).
    pub(super) fn orphan(&self, id: u32) {
        self.orphans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id);
    }

    /// `IOMMU_DESTROY` of any object id.
    pub(crate) fn destroy(&self, id: u32) -> io::Result<()> {
        let mut d: iu::iommu_destroy = sys::zeroed();
        d.size = size_of_val(&d) as u32;
        d.id = id;
        sys::ioctl_mut(self.as_fd(), sys::IOMMU_DESTROY, &mut d).map(drop)
    }

    /// An [`Error::Ioctl`] naming this fd.
    pub(crate) fn err(&self, op: &'static str, source: io::Error) -> Error {
        Error::Ioctl {
            op,
            object: format!("iommufd fd {}", self.fd.as_raw_fd()),
            source,
        }
    }

    /// The raw fd number, for messages.
    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Iommufd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Iommufd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Iommufd> for OwnedFd {
    fn from(i: Iommufd) -> OwnedFd {
        i.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_missing_node_explains_the_fallback() {
        let e = Iommufd::open_path("/nonexistent/iommu").unwrap_err();
        assert!(matches!(e, Error::NoIommufd { .. }), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/iommu"));
    }

    #[test]
    fn adopting_a_non_iommufd_fd_fails() {
        let f: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let e = Iommufd::from_fd(f).unwrap_err();
        assert!(e.to_string().contains("not an iommufd"), "{e}");
        assert_eq!(e.errno(), Some(libc::ENOTTY));
    }
}
