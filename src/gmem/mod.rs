//! guest_memfd and the KVM glue: VMs and their memory capabilities, guest_memfd creation
//! and adoption, memory attributes, and the shared backings devices map (memfd).
//!
//! One type per kernel object, thin methods, errors that say what to do:
//!
//! | type | kernel object |
//! |---|---|
//! | [`KvmVm`] | a KVM VM fd (owned or borrowed from the VMM): types, caps, `KVM_SET_MEMORY_ATTRIBUTES` |
//! | [`GuestMemfd`] | a guest_memfd (`KVM_CREATE_GUEST_MEMFD`, or adopted) |
//! | [`Memfd`] | a `memfd_create` file, optionally on huge pages (2 MiB or 1 GiB: [`HugePageSize`]) |
//! | [`MappedMemory`] | a shared `mmap` of either file |
//! //!
//! Kernel facts this module relies on (Linux 7.3, virt/kvm/guest_memfd.c, kvm_main.c):
//! - `KVM_CAP_GUEST_MEMFD_FLAGS` on a VM fd reports the accepted flags: `MMAP|INIT_SHARED`
//!   on a default VM, `MMAP` only on VM types with private memory (`SW_PROTECTED`,
//!   confidential types), which refuse `INIT_SHARED` with `EINVAL`;
//! - `KVM_CAP_MEMORY_ATTRIBUTES` on a VM fd is `PRIVATE` only for VM types with private
//!   memory; setting `PRIVATE` elsewhere fails with `EINVAL`;
//! - guest_memfd `fallocate` needs `KEEP_SIZE` and 4 KiB aligned ranges; `mmap` needs the
//!   `MMAP` flag (`ENODEV` otherwise), and faulting a private page raises `SIGBUS`;
//! - whether the host may touch a guest_memfd page is fixed per file by `INIT_SHARED`
//!   (no in-place conversion in 7.3), so VMs with private memory pair guest_memfd with a
//!   separate shared backing ([`Memfd`]) and KVM attributes pick between them;
//! - a guest_memfd lives on its own pseudo filesystem (`GUEST_MEMFD_MAGIC`); its
//!   `/proc/self/fd` link reads `/[kvm-gmem] (deleted)` on 7.3.

mod error;
pub(crate) mod fdops;
mod flags;
mod guest_memfd;
mod memfd;
mod mmap;
mod vm;

pub use error::GmemError;
pub use flags::{GmemFlags, MemoryAttributes, ParseError, VmType, VmTypes};
pub use guest_memfd::GuestMemfd;
pub use memfd::{backing_page_size, HugePageSize, Memfd, HUGE_PAGE_1G, HUGE_PAGE_2M};
pub use mmap::MappedMemory;
pub use vm::{open_kvm, supported_vm_types, KvmVm};
