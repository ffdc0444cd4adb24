//! [`KvmVm`]: a KVM VM as far as guest memory is concerned (types, capabilities,
//! memory attributes, guest_memfd creation).

use std::borrow::Borrow;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::raw::c_ulong;

use kvm_bindings::kvm_memory_attributes;
use kvm_ioctls::{Kvm, VmFd};

use super::error::{kvm_err, GmemError};
use super::flags::{GmemFlags, MemoryAttributes, VmType, VmTypes};
use super::guest_memfd::GuestMemfd;
use crate::sys::kvm_gmem as k;

/// Opens `/dev/kvm` with an explained error.
///
/// ```no_run
/// let kvm = vfio_gmem::gmem::open_kvm().unwrap();
/// println!("{}", vfio_gmem::gmem::supported_vm_types(&kvm));
/// ```
pub fn open_kvm() -> Result<Kvm, GmemError> {
    Kvm::new().map_err(|e| GmemError::OpenKvm { source: kvm_err(e) })
}

/// The VM types this KVM can create (`KVM_CAP_VM_TYPES` on `/dev/kvm`).
pub fn supported_vm_types(kvm: &Kvm) -> VmTypes {
    let r = kvm.check_extension_raw(k::KVM_CAP_VM_TYPES as c_ulong);
    VmTypes::from_bits_retain(r.max(0) as u64)
}

/// A KVM VM, owned ([`KvmVm<VmFd>`], the default) or borrowed from a VMM
/// (`KvmVm<&VmFd>`, `KvmVm<Arc<VmFd>>`: anything that is `Borrow<VmFd>`).
///
/// Only the guest-memory side of a VM is covered here; use [`vm_fd`](Self::vm_fd) for the
/// rest (memslots, vCPUs).
///
/// ```no_run
/// use vfio_gmem::gmem::{GmemFlags, KvmVm, VmType};
/// let vm = KvmVm::create(VmType::SwProtected)?;
/// assert!(vm.guest_memfd_flags().contains(GmemFlags::MMAP));
/// let gmem = vm.create_guest_memfd(2 << 20, GmemFlags::MMAP)?;
/// vm.set_private(0x1_0000_0000, 2 << 20)?;
/// # Ok::<(), vfio_gmem::gmem::GmemError>(())
/// ```
#[derive(Debug)]
pub struct KvmVm<V: Borrow<VmFd> = VmFd> {
    vm: V,
    vm_type: Option<VmType>,
}

impl KvmVm<VmFd> {
    /// Opens `/dev/kvm` and creates a VM of `vm_type`.
    pub fn create(vm_type: VmType) -> Result<Self, GmemError> {
        Self::create_with(&open_kvm()?, vm_type)
    }

    /// Creates a VM of `vm_type` through an open `/dev/kvm`.
    pub fn create_with(kvm: &Kvm, vm_type: VmType) -> Result<Self, GmemError> {
        let vm = kvm
            .create_vm_with_type(vm_type.raw())
            .map_err(|e| GmemError::CreateVm {
                vm_type,
                supported: supported_vm_types(kvm),
                source: kvm_err(e),
            })?;
        Ok(KvmVm {
            vm,
            vm_type: Some(vm_type),
        })
    }

    /// Takes a KVM VM file descriptor the VMM (or a privileged helper) opened, e.g. one
    /// received over a unix socket, without tying the caller to this crate's kvm-ioctls
    /// version. Checks that `fd` is a KVM VM (`anon_inode:kvm-vm`); needs `/dev/kvm` for
    /// the vCPU mapping size kvm-ioctls records.
    ///
    /// ```no_run
    /// use std::os::fd::OwnedFd;
    /// use vfio_gmem::gmem::{KvmVm, VmType};
    /// # fn f(received: OwnedFd) -> Result<(), vfio_gmem::gmem::GmemError> {
    /// let vm = KvmVm::from_owned_fd(received, Some(VmType::SwProtected))?.into_shared();
    /// # Ok(()) }
    /// ```
    pub fn from_owned_fd(fd: OwnedFd, vm_type: Option<VmType>) -> Result<Self, GmemError> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        if link != "anon_inode:kvm-vm" {
            return Err(GmemError::invalid(
                format!("fd {}", fd.as_raw_fd()),
                format!(
                    "is {}, not a KVM VM; pass the fd KVM_CREATE_VM returned",
                    if link.is_empty() { "unknown" } else { &link }
                ),
            ));
        }
        let kvm = open_kvm()?;
        kvm.get_vcpu_mmap_size()
            .map_err(|e| GmemError::OpenKvm { source: kvm_err(e) })?;
        // SAFETY: `fd` is an open KVM VM descriptor (checked above) whose ownership moves
        // into the VmFd; the only fallible step before taking it was checked just above.
        let vm = unsafe { kvm.create_vmfd_from_rawfd(fd.into_raw_fd()) }
            .map_err(|e| GmemError::OpenKvm { source: kvm_err(e) })?;
        Ok(KvmVm { vm, vm_type })
    }

    /// The same VM behind an `Arc`, the form a [`DmaSpace`](crate::dma::DmaSpace) takes
    /// (so the VMM can keep using it too).
    pub fn into_shared(self) -> KvmVm<std::sync::Arc<VmFd>> {
        KvmVm {
            vm: std::sync::Arc::new(self.vm),
            vm_type: self.vm_type,
        }
    }
}

impl<V: Borrow<VmFd>> KvmVm<V> {
    /// Wraps a VM the VMM created. `vm_type` only improves messages; pass `None` if
    /// unknown (KVM has no query for it).
    ///
    /// ```no_run
    /// use vfio_gmem::gmem::{KvmVm, VmType};
    /// let kvm = kvm_ioctls::Kvm::new().unwrap();
    /// let vm_fd = kvm.create_vm().unwrap();
    /// let vm = KvmVm::from_vm_fd(&vm_fd, Some(VmType::Default));
    /// println!("accepted gmem flags: {}", vm.guest_memfd_flags());
    /// ```
    pub fn from_vm_fd(vm: V, vm_type: Option<VmType>) -> Self {
        KvmVm { vm, vm_type }
    }

    /// The kvm-ioctls VM.
    pub fn vm_fd(&self) -> &VmFd {
        self.vm.borrow()
    }

    /// Gives the VM back.
    pub fn into_inner(self) -> V {
        self.vm
    }

    /// The type the VM was created with, if known.
    pub fn vm_type(&self) -> Option<VmType> {
        self.vm_type
    }

    /// A borrowing view of this VM.
    pub fn borrowed(&self) -> KvmVm<&VmFd> {
        KvmVm {
            vm: self.vm_fd(),
            vm_type: self.vm_type,
        }
    }

    fn check_extension(&self, cap: u32) -> u64 {
        self.vm_fd().check_extension_raw(cap as c_ulong).max(0) as u64
    }

    /// True if the VM can create guest_memfd files (`KVM_CAP_GUEST_MEMFD`).
    pub fn supports_guest_memfd(&self) -> bool {
        self.check_extension(k::KVM_CAP_GUEST_MEMFD) > 0
    }

    /// The guest_memfd flags this VM accepts (`KVM_CAP_GUEST_MEMFD_FLAGS` on the VM fd).
    /// Empty on kernels before 6.18, which accept no flags.
    pub fn guest_memfd_flags(&self) -> GmemFlags {
        GmemFlags::from_bits_retain(self.check_extension(k::KVM_CAP_GUEST_MEMFD_FLAGS))
    }

    /// The memory attributes this VM supports (`KVM_CAP_MEMORY_ATTRIBUTES` on the VM fd):
    /// `PRIVATE` on VM types with private memory, none on a default VM.
    pub fn memory_attributes(&self) -> MemoryAttributes {
        MemoryAttributes::from_bits_retain(self.check_extension(k::KVM_CAP_MEMORY_ATTRIBUTES))
    }

    /// True if GPA ranges can be made private.
    pub fn supports_private(&self) -> bool {
        self.memory_attributes().contains(MemoryAttributes::PRIVATE)
    }

    /// Sets `[gpa, gpa+len)` private or shared (`KVM_SET_MEMORY_ATTRIBUTES`). `gpa` and
    /// `len` must be 4 KiB aligned. Private on a VM without `PRIVATE` support fails with
    /// [`GmemError::AttributesUnsupported`] before any call.
    pub fn set_memory_attributes(
        &self,
        gpa: u64,
        len: u64,
        private: bool,
    ) -> Result<(), GmemError> {
        let state = if private { "private" } else { "shared" };
        let what = || format!("KVM_SET_MEMORY_ATTRIBUTES {state} on GPA {gpa:#x}+{len:#x}");
        super::fdops::check_range(what, gpa, len, u64::MAX, 4096)?;
        let attributes = if private {
            MemoryAttributes::PRIVATE
        } else {
            MemoryAttributes::empty()
        };
        let supported = self.memory_attributes();
        if !supported.contains(attributes) {
            return Err(GmemError::AttributesUnsupported {
                gpa,
                len,
                private,
                vm_type: self.vm_type,
                supported,
            });
        }
        let arg = kvm_memory_attributes {
            address: gpa,
            size: len,
            attributes: attributes.bits(),
            flags: 0,
        };
        self.vm_fd().set_memory_attributes(arg).map_err(|e| {
            let e = kvm_err(e);
            let hint = match e.raw_os_error() {
                Some(libc::ENOTTY) => "this kernel lacks KVM_SET_MEMORY_ATTRIBUTES (CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES); use a VM type with private memory on a kernel that has it",
                Some(libc::EINVAL) => "the range or attributes are invalid for this VM; check alignment and KVM_CAP_MEMORY_ATTRIBUTES",
                Some(libc::ENOMEM) => "the kernel could not allocate attribute tracking; retry or use a smaller range",
                _ => "",
            };
            if hint.is_empty() {
                GmemError::os("KVM_SET_MEMORY_ATTRIBUTES", what(), e)
            } else {
                GmemError::os_hint("KVM_SET_MEMORY_ATTRIBUTES", what(), e, hint)
            }
        })
    }

    /// Makes `[gpa, gpa+len)` private. See [`set_memory_attributes`](Self::set_memory_attributes).
    pub fn set_private(&self, gpa: u64, len: u64) -> Result<(), GmemError> {
        self.set_memory_attributes(gpa, len, true)
    }

    /// Makes `[gpa, gpa+len)` shared. See [`set_memory_attributes`](Self::set_memory_attributes).
    pub fn set_shared(&self, gpa: u64, len: u64) -> Result<(), GmemError> {
        self.set_memory_attributes(gpa, len, false)
    }

    /// Creates a guest_memfd of `size` bytes bound to this VM. Same as
    /// [`GuestMemfd::create`].
    pub fn create_guest_memfd(&self, size: u64, flags: GmemFlags) -> Result<GuestMemfd, GmemError> {
        GuestMemfd::create(self, size, flags)
    }
}
