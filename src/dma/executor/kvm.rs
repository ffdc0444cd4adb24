//! The KVM-attribute and discard half of the kernel executor (crate-private):
//! `KVM_SET_MEMORY_ATTRIBUTES` on the VM, and releasing a region's shared backing
//! (`fallocate(PUNCH_HOLE|KEEP_SIZE)` on a file, `madvise(MADV_REMOVE)` on a mapping).
//!
//! Without a VM, attribute changes are accepted and do nothing (the
//! [`Executor`](super::Executor) contract for VMs without private memory); discards still
//! run.

use std::os::fd::{AsRawFd, BorrowedFd};

use kvm_ioctls::VmFd;

use crate::dma::plan::model::PageState;
use crate::dma::plan::ops::{AttributesOp, DiscardOp};
use crate::gmem::fdops;
use crate::gmem::{GmemError, KvmVm};

/// Where a discard goes: a region's shared memory, resolved from what its space holds.
pub(crate) enum Shared<'a> {
    /// A file, with the file offset of the region's first byte.
    File { fd: BorrowedFd<'a>, offset: u64 },
    /// The address of the region's first byte in a shared mapping of guest memory: built
    /// only from a space's region backing (its own mapping, or a caller's `UserAddress`).
    Address(u64),
}

/// The VM half of a plan's calls.
#[derive(Debug)]
pub(crate) struct Kvm<'a> {
    vm: Option<KvmVm<&'a VmFd>>,
}

impl<'a> Kvm<'a> {
    /// Attribute changes go to `vm`, if any.
    pub(crate) fn new<V: std::borrow::Borrow<VmFd>>(vm: Option<&'a KvmVm<V>>) -> Self {
        Kvm {
            vm: vm.map(KvmVm::borrowed),
        }
    }

    /// True if attribute changes reach a VM.
    pub(crate) fn has_vm(&self) -> bool {
        self.vm.is_some()
    }

    /// Applies `op`.
    pub(crate) fn set_attributes(&self, op: &AttributesOp) -> Result<(), GmemError> {
        match &self.vm {
            Some(vm) => vm.set_memory_attributes(op.gpa, op.len, op.private),
            None => Ok(()),
        }
    }

    /// Sets `[gpa, gpa + len)` to `state` outside a plan: a space's attribute seeding of
    /// a new region and its undo (see `DmaSpace::add_region`).
    pub(crate) fn set_state(&self, gpa: u64, len: u64, state: PageState) -> Result<(), GmemError> {
        self.set_attributes(&AttributesOp {
            gpa,
            len,
            private: state == PageState::Private,
        })
    }

    /// Releases `op`'s range of the region's shared memory `to`: the pages' memory is
    /// freed and they read back as zeros.
    pub(crate) fn discard(&self, to: Shared<'_>, op: &DiscardOp) -> Result<(), GmemError> {
        let len = op.len;
        match to {
            Shared::File { fd, offset: base } => {
                let start = base.checked_add(op.offset).ok_or_else(|| {
                    GmemError::invalid(
                        format!("discard on fd {}", fd.as_raw_fd()),
                        "file offset overflows; check the region's backing offset",
                    )
                })?;
                let what = || {
                    format!(
                        "fd {} [{start:#x}, {:#x})",
                        fd.as_raw_fd(),
                        start.saturating_add(len)
                    )
                };
                fdops::punch_hole(fd, start, len).map_err(|e| {
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
                        format!("{} ({})", what(), fdops::describe_fd(fd)),
                        e,
                        hint,
                    )
                })
            }
            Shared::Address(base) => {
                let start = base
                    .checked_add(op.offset)
                    .filter(|s| s % 4096 == 0 && len % 4096 == 0);
                let Some(start) = start else {
                    return Err(GmemError::invalid(
                        format!("discard at address {base:#x}+{:#x}", op.offset),
                        "madvise(MADV_REMOVE) needs a page-aligned address and length",
                    ));
                };
                let n = usize::try_from(len).map_err(|_| {
                    GmemError::invalid(format!("discard at {start:#x}"), "length too large")
                })?;
                // SAFETY: `Shared::Address` comes from a region's backing: the space's own
                // shared mapping of guest memory, or a caller's `UserAddress`, promised to
                // be guest memory for as long as the region is registered. No Rust
                // reference points into it (devices write it through the IOMMU already);
                // MADV_REMOVE only replaces its content with zeros.
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
        }
    }
}

/// The KVM half of the kernel executor, for the project's VM tests (feature `testing`):
/// the attribute call and a discard of a file, each returning the executor's [`OpError`]
/// (with the explanation as its `source()`). `DmaSpace` is the API.
///
/// [`OpError`]: crate::dma::OpError
#[cfg(feature = "testing")]
#[derive(Debug)]
pub struct KvmAttributes<'a>(Kvm<'a>);

#[cfg(feature = "testing")]
impl<'a> KvmAttributes<'a> {
    /// Attribute changes go to `vm`.
    pub fn new<V: std::borrow::Borrow<VmFd>>(vm: &'a KvmVm<V>) -> Self {
        KvmAttributes(Kvm::new(Some(vm)))
    }

    /// No VM: attribute changes are accepted and ignored.
    pub fn without_vm() -> Self {
        KvmAttributes(Kvm { vm: None })
    }

    /// Applies `op` (the executor's `set_attributes`).
    pub fn set_attributes(&mut self, op: &AttributesOp) -> Result<(), crate::dma::OpError> {
        self.0.set_attributes(op).map_err(into_op_error)
    }

    /// Discards `op`'s range of the file `fd`, whose byte `offset` is the region's first
    /// (the executor's `discard` of a region mapped by fd+offset).
    pub fn discard_file(
        &mut self,
        fd: BorrowedFd<'_>,
        offset: u64,
        op: &DiscardOp,
    ) -> Result<(), crate::dma::OpError> {
        self.0
            .discard(Shared::File { fd, offset }, op)
            .map_err(into_op_error)
    }
}

#[cfg(feature = "testing")]
fn into_op_error(e: GmemError) -> crate::dma::OpError {
    crate::dma::plan::outcome::OpError::with_cause(e.errno(), e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::plan::model::RegionId;
    use crate::gmem::Memfd;

    fn discard_op(offset: u64, len: u64) -> DiscardOp {
        DiscardOp {
            region: RegionId(3),
            backing: crate::dma::plan::model::Backing::Opaque(3),
            gpa: 0x10_0000 + offset,
            offset,
            len,
        }
    }

    #[test]
    fn discard_file_and_address_backings() {
        use std::os::fd::AsFd;
        let mem = Memfd::new("discard", 4 * 4096).unwrap();
        let mut map = mem.mmap().unwrap();
        map.fill(0, 4 * 4096, 0x11).unwrap();
        let k = Kvm::new::<VmFd>(None);
        // The backing starts one page into the file: region offset 0 is file page 1.
        let file = Shared::File {
            fd: mem.as_fd(),
            offset: 4096,
        };
        k.discard(file, &discard_op(0, 4096)).unwrap();
        assert!(map.read_vec(4096, 4096).unwrap().iter().all(|&b| b == 0));
        assert!(map.read_vec(0, 4096).unwrap().iter().all(|&b| b == 0x11));
        // `map` is a shared mapping of guest memory, alive for the call.
        k.discard(Shared::Address(map.addr()), &discard_op(2 * 4096, 4096))
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
    fn discard_refuses_unaligned_and_private_mappings() {
        let k = Kvm::new::<VmFd>(None);
        let e = k
            .discard(Shared::Address(0x1000), &discard_op(1, 4096))
            .unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        // A private anonymous mapping cannot be removed: the hint says what works. (The
        // kernel refuses MADV_REMOVE there, so nothing is released.)
        let v = vec![0u8; 3 * 4096];
        let page = (v.as_ptr() as u64 + 4095) & !4095;
        let m = k
            .discard(Shared::Address(page), &discard_op(0, 4096))
            .unwrap_err()
            .to_string();
        assert!(m.contains("MAP_SHARED"), "{m}");
    }

    #[test]
    fn without_vm_attributes_are_a_no_op() {
        let k = Kvm::new::<VmFd>(None);
        assert!(!k.has_vm());
        let op = AttributesOp {
            gpa: 0,
            len: 4096,
            private: true,
        };
        assert!(k.set_attributes(&op).is_ok());
        assert!(k.set_attributes(&op.inverse()).is_ok());
    }
}
