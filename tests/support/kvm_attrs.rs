//! Reads KVM's private/shared attribute of guest pages, independently of the library.
//!
//! KVM has no "get memory attributes" ioctl (7.3). `KVM_PRE_FAULT_MEMORY` on a vCPU
//! faults a GPA in as the guest would, private or shared according to the attribute
//! (arch/x86/kvm/mmu/mmu.c, `kvm_arch_vcpu_pre_fault_memory`). On a memslot *without*
//! guest_memfd a private page cannot be served: the call fails with EFAULT
//! (`kvm_mmu_faultin_pfn_private`), while a shared page is faulted in from the memslot's
//! userspace mapping and the call succeeds. One call per page reads the attribute.

use std::io;
use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_pre_fault_memory, kvm_userspace_memory_region, KVM_CAP_PRE_FAULT_MEMORY};
use kvm_ioctls::{VcpuFd, VmFd};

/// `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)`.
const KVM_PRE_FAULT_MEMORY: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<kvm_pre_fault_memory>() as libc::c_ulong) << 16)
    | ((kvm_bindings::KVMIO as libc::c_ulong) << 8)
    | 0xd5;

pub struct AttributeProbe {
    vcpu: VcpuFd,
}

impl AttributeProbe {
    /// Adds memslot `slot` = `[gpa, gpa+len)` backed by this process's memory at
    /// `userspace_addr` (no guest_memfd) and creates vCPU 0. `Err` says why the probe is
    /// unavailable (e.g. no two-dimensional paging: KVM_CAP_PRE_FAULT_MEMORY = 0).
    ///
    /// # Safety
    /// `userspace_addr` must stay a read-write mapping of `len` bytes while the VM lives.
    pub unsafe fn new(
        vm: &VmFd,
        slot: u32,
        gpa: u64,
        len: u64,
        userspace_addr: u64,
    ) -> Result<AttributeProbe, String> {
        if vm.check_extension_raw(KVM_CAP_PRE_FAULT_MEMORY.into()) <= 0 {
            return Err("KVM_CAP_PRE_FAULT_MEMORY is 0 (no TDP in this guest)".into());
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr,
        };
        // SAFETY: the caller keeps `userspace_addr` mapped for `len` bytes while the VM
        // lives (this function's contract); KVM reaches it through mmu notifiers.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        let vcpu = vm.create_vcpu(0).map_err(|e| format!("create vCPU: {e}"))?;
        Ok(AttributeProbe { vcpu })
    }

    /// True if KVM holds the page at `gpa` private.
    pub fn is_private(&self, gpa: u64) -> io::Result<bool> {
        let mut range = kvm_pre_fault_memory {
            gpa,
            size: 4096,
            ..Default::default()
        };
        // SAFETY: KVM_PRE_FAULT_MEMORY takes a pointer to a kvm_pre_fault_memory, which
        // `range` is, valid and exclusively borrowed for the call.
        let r = unsafe {
            libc::ioctl(
                self.vcpu.as_raw_fd(),
                KVM_PRE_FAULT_MEMORY as _,
                &mut range as *mut kvm_pre_fault_memory,
            )
        };
        if r == 0 {
            return Ok(false);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EFAULT) => Ok(true),
            _ => Err(io::Error::other(format!(
                "KVM_PRE_FAULT_MEMORY at GPA {gpa:#x}: {e}"
            ))),
        }
    }
}
