//! [`KvmAttributes`]: the KVM-attribute and discard half of a [`dma::Executor`].
//!
//! The real executor combines it with an iommufd or legacy map/unmap half: its
//! `set_attributes` and `discard` methods forward here.
//!
//! [`dma::Executor`]: crate::dma::Executor

use std::os::fd::BorrowedFd;

use kvm_ioctls::VmFd;

use super::error::{log_and_errno, GmemError};
use super::fdops;
use super::vm::KvmVm;
use crate::dma::{AttributesOp, Backing, DiscardOp, OpError};

/// Issues the attribute changes and discards of a plan.
///
/// - `set_attributes`: `KVM_SET_MEMORY_ATTRIBUTES` on the VM; without a VM it does
///   nothing (the [`Executor`](crate::dma::Executor) contract for VMs without private
///   memory).
/// - `discard`: `fallocate(PUNCH_HOLE|KEEP_SIZE)` for [`Backing::File`],
///   `madvise(MADV_REMOVE)` for [`Backing::Address`]; [`Backing::Opaque`] is refused.
///
/// The `try_*` methods return the explained [`GmemError`]; the plain ones return the
/// executor's [`OpError`] and log the explanation (`log::warn!`).
///
/// ```no_run
/// use vfio_gmem::dma::{AttributesOp, OpError};
/// use vfio_gmem::gmem::{KvmAttributes, KvmVm, VmType};
/// let vm = KvmVm::create(VmType::SwProtected).unwrap();
/// let mut kvm = KvmAttributes::new(&vm);
/// kvm.set_attributes(&AttributesOp { gpa: 0, len: 4096, private: true })?;
/// # Ok::<(), OpError>(())
/// ```
///
/// # Backings
/// The fd number in [`Backing::File`] and the address in [`Backing::Address`] are the
/// registrant's promise: the fd stays open and the address stays a shared mapping of
/// guest memory for as long as the region is registered (the IOMMU maps them too).
#[derive(Debug)]
pub struct KvmAttributes<'a> {
    vm: Option<KvmVm<&'a VmFd>>,
}

impl<'a> KvmAttributes<'a> {
    /// Attribute changes go to `vm`.
    pub fn new<V: std::borrow::Borrow<VmFd>>(vm: &'a KvmVm<V>) -> Self {
        KvmAttributes {
            vm: Some(vm.borrowed()),
        }
    }

    /// No VM: attribute changes are accepted and ignored; discards still run.
    ///
    /// ```
    /// use vfio_gmem::dma::AttributesOp;
    /// let mut k = vfio_gmem::gmem::KvmAttributes::without_vm();
    /// k.set_attributes(&AttributesOp { gpa: 0, len: 4096, private: true }).unwrap();
    /// ```
    pub fn without_vm() -> Self {
        KvmAttributes { vm: None }
    }

    /// The VM, if any.
    pub fn vm(&self) -> Option<&KvmVm<&'a VmFd>> {
        self.vm.as_ref()
    }

    /// Applies `op`, returning the explained error.
    pub fn try_set_attributes(&self, op: &AttributesOp) -> Result<(), GmemError> {
        match &self.vm {
            Some(vm) => vm.set_memory_attributes(op.gpa, op.len, op.private),
            None => Ok(()),
        }
    }

    /// Applies `op` ([`Executor::set_attributes`](crate::dma::Executor::set_attributes)).
    pub fn set_attributes(&mut self, op: &AttributesOp) -> Result<(), OpError> {
        self.try_set_attributes(op)
            .map_err(|e| log_and_errno("set_attributes", e))
    }

    /// Discards `op`'s range, returning the explained error.
    pub fn try_discard(&self, op: &DiscardOp) -> Result<(), GmemError> {
        discard_backing(op.backing, op.offset, op.len).map_err(|e| match e {
            GmemError::UnsupportedBacking { detail, .. } => GmemError::UnsupportedBacking {
                what: format!(
                    "GPA [{:#x}, {:#x}) of {}",
                    op.gpa,
                    op.gpa + op.len,
                    op.region
                ),
                detail,
            },
            other => other,
        })
    }

    /// Discards `op`'s range ([`Executor::discard`](crate::dma::Executor::discard)).
    pub fn discard(&mut self, op: &DiscardOp) -> Result<(), OpError> {
        self.try_discard(op)
            .map_err(|e| log_and_errno("discard", e))
    }
}

/// Releases `[offset, offset+len)` of a region's shared backing: the pages' memory is
/// freed and they read back as zeros.
///
/// See [`KvmAttributes`] for what `backing` must refer to.
pub fn discard_backing(backing: Backing, offset: u64, len: u64) -> Result<(), GmemError> {
    match backing {
        Backing::File { fd, offset: base } => {
            let start = base.checked_add(offset).ok_or_else(|| {
                GmemError::invalid(
                    format!("discard on fd {fd}"),
                    "file offset overflows; check the region's backing offset",
                )
            })?;
            let what = || format!("fd {fd} [{start:#x}, {:#x})", start.saturating_add(len));
            if fd < 0 {
                return Err(GmemError::invalid(
                    format!("discard on {}", what()),
                    "negative fd; register the region with an open file",
                ));
            }
            // SAFETY: only used for the fallocate call below; an fd number that is not
            // (or no longer) the registered file is the registrant's broken promise and
            // makes the call fail or punch the wrong file, never touch Rust memory.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            fdops::punch_hole(borrowed, start, len).map_err(|e| {
                let hint = match e.raw_os_error() {
                    Some(libc::EOPNOTSUPP) => {
                        "this file type cannot punch holes; back the region with a memfd or guest_memfd"
                    }
                    Some(libc::EBADF) => "the fd is closed; keep the backing open while the region is registered",
                    Some(libc::EINVAL) => "guest_memfd needs 4 KiB aligned offsets and lengths",
                    _ => "check the region's backing",
                };
                GmemError::os_hint(
                    "fallocate(PUNCH_HOLE|KEEP_SIZE)",
                    format!("{} ({})", what(), fdops::describe_fd(borrowed)),
                    e,
                    hint,
                )
            })
        }
        Backing::Address(base) => {
            let start = base
                .checked_add(offset)
                .filter(|s| s % 4096 == 0 && len % 4096 == 0);
            let Some(start) = start else {
                return Err(GmemError::invalid(
                    format!("discard at address {base:#x}+{offset:#x}"),
                    "madvise(MADV_REMOVE) needs a page-aligned address and length",
                ));
            };
            let n = usize::try_from(len).map_err(|_| {
                GmemError::invalid(format!("discard at {start:#x}"), "length too large")
            })?;
            // SAFETY: the registrant promised [start, start+len) is a shared mapping of
            // guest memory that no Rust reference points into (devices write it through
            // the IOMMU already); MADV_REMOVE only replaces its content with zeros.
            let r = unsafe { libc::madvise(start as *mut libc::c_void, n, libc::MADV_REMOVE) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                return Err(GmemError::os_hint(
                    "madvise(MADV_REMOVE)",
                    format!("address range [{start:#x}, {:#x})", start + len),
                    e,
                    "the range must be a MAP_SHARED mapping of a memfd, shmem or hugetlbfs file",
                ));
            }
            Ok(())
        }
        Backing::Opaque(token) => Err(GmemError::UnsupportedBacking {
            what: format!("opaque backing {token}"),
            detail: "an Opaque backing has no file or address to release; register the region \
                     with Backing::File or Backing::Address"
                .to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::RegionId;
    use crate::gmem::Memfd;

    fn discard_op(backing: Backing, offset: u64, len: u64) -> DiscardOp {
        DiscardOp {
            region: RegionId(3),
            backing,
            gpa: 0x10_0000 + offset,
            offset,
            len,
        }
    }

    #[test]
    fn discard_file_and_address_backings() {
        let mem = Memfd::new("discard", 4 * 4096).unwrap();
        let mut map = mem.mmap().unwrap();
        map.fill(0, 4 * 4096, 0x11).unwrap();
        let mut k = KvmAttributes::without_vm();
        // The backing starts one page into the file: region offset 0 is file page 1.
        k.discard(&discard_op(mem.backing(4096), 0, 4096)).unwrap();
        assert!(map.read_vec(4096, 4096).unwrap().iter().all(|&b| b == 0));
        assert!(map.read_vec(0, 4096).unwrap().iter().all(|&b| b == 0x11));
        k.discard(&discard_op(map.backing(), 2 * 4096, 4096))
            .unwrap();
        assert!(map
            .read_vec(2 * 4096, 4096)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        assert!(map
            .read_vec(3 * 4096, 4096)
            .unwrap()
            .iter()
            .all(|&b| b == 0x11));
    }

    #[test]
    fn discard_refuses_opaque_and_unaligned() {
        let k = KvmAttributes::without_vm();
        let e = k
            .try_discard(&discard_op(Backing::Opaque(9), 0, 4096))
            .unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with("cannot discard GPA [0x100000, 0x101000) of region#3"),
            "{m}"
        );
        assert!(m.contains("Backing::File or Backing::Address"), "{m}");
        let mut k = k;
        assert_eq!(
            k.discard(&discard_op(Backing::Address(0x1000), 1, 4096)),
            Err(OpError::from_errno(libc::EINVAL))
        );
        // A private anonymous mapping cannot be removed: the hint says what works.
        let v = vec![0u8; 3 * 4096];
        let page = (v.as_ptr() as u64 + 4095) & !4095;
        let m = discard_backing(Backing::Address(page), 0, 4096)
            .unwrap_err()
            .to_string();
        assert!(m.contains("MAP_SHARED"), "{m}");
    }

    #[test]
    fn without_vm_attributes_are_a_no_op() {
        let mut k = KvmAttributes::without_vm();
        assert!(k.vm().is_none());
        let op = AttributesOp {
            gpa: 0,
            len: 4096,
            private: true,
        };
        assert_eq!(k.set_attributes(&op), Ok(()));
        assert_eq!(k.set_attributes(&op.inverse()), Ok(()));
    }
}
