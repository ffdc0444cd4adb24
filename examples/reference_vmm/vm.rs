//! The KVM side: a `KVM_X86_SW_PROTECTED_VM`, its memory (guest_memfd for private pages,
//! a memfd for shared pages), two memslots and one real-mode vCPU.
//!
//! Guest physical layout:
//!
//! | GPA | memslot | private backing | shared backing |
//! |---|---|---|---|
//! | `[0, RAM)` | 0 | guest_memfd `[0, RAM)` | memfd `[0, RAM)` |
//! | `[RAM, RAM + WINDOW_LEN)` | 1 | none | memfd `[RAM, …)` |
//!
//! Slot 1 stands for memory a VMM gives no private backing: a private access there is
//! one KVM cannot serve, and the one way a SW_PROTECTED guest gets `KVM_EXIT_MEMORY_FAULT`.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::KVM_CAP_EXIT_HYPERCALL;
use kvm_bindings::{kvm_enable_cap, kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vfio_gmem::gmem::{GmemFlags, GuestMemfd, KvmVm, MappedMemory, Memfd, VmType};

use crate::guest::{CODE, KVM_HC_MAP_GPA_RANGE, STACK, WINDOW};

/// The shared memfd's name (a backend's `/proc/<pid>/maps` shows `/memfd:<name>`).
pub const SHARED_NAME: &str = "reference-vmm-shared";
/// RAM with a private backing.
pub const RAM: u64 = WINDOW;
/// The window without one.
pub const WINDOW_LEN: u64 = 0x1000;
/// Everything the guest has: one DMA region.
pub const TOTAL: u64 = RAM + WINDOW_LEN;

pub struct Vm {
    /// The VM fd, shared with the DMA space (which sets memory attributes through it).
    pub fd: Arc<VmFd>,
    /// Private memory; KVM reads it, the host cannot (no `MMAP` flag).
    pub gmem: GuestMemfd,
    /// Shared memory, and the host's view of it.
    pub shared: Memfd,
    pub view: MappedMemory,
}

impl Vm {
    /// The VM as the library sees it.
    pub fn kvm_vm(&self) -> KvmVm<Arc<VmFd>> {
        KvmVm::from_vm_fd(self.fd.clone(), Some(VmType::SwProtected))
    }
}

/// Creates the VM and its memory; no vCPU yet. `kvm`: a `/dev/kvm` received from the
/// helper (else this process opens it).
pub fn create(kvm: Option<&Kvm>) -> Result<Vm, String> {
    let vm = match kvm {
        Some(kvm) => KvmVm::create_with(kvm, VmType::SwProtected),
        None => KvmVm::create(VmType::SwProtected),
    }
    .map_err(|e| {
        format!(
            "creating a KVM_X86_SW_PROTECTED_VM: {e}\n  \
             (needs /dev/kvm, root, and a kernel with CONFIG_KVM_SW_PROTECTED_VM; \
             inside the test VM: scripts/vm-run -- target/debug/examples/reference_vmm)"
        )
    })?;
    if !vm.supports_private() {
        return Err("this VM has no PRIVATE memory attribute (KVM_CAP_MEMORY_ATTRIBUTES)".into());
    }
    let hypercalls = vm
        .vm_fd()
        .check_extension_raw(KVM_CAP_EXIT_HYPERCALL.into());
    if hypercalls < 0 || hypercalls & (1 << KVM_HC_MAP_GPA_RANGE) == 0 {
        return Err(format!(
            "KVM cannot forward KVM_HC_MAP_GPA_RANGE to userspace \
             (KVM_CAP_EXIT_HYPERCALL = {hypercalls:#x}); a kernel ≥ 6.0 on x86 has it"
        ));
    }
    // The guest's conversion requests exit to us instead of failing with -KVM_ENOSYS.
    vm.vm_fd()
        .enable_cap(&kvm_enable_cap {
            cap: KVM_CAP_EXIT_HYPERCALL,
            args: [1 << KVM_HC_MAP_GPA_RANGE, 0, 0, 0],
            ..Default::default()
        })
        .map_err(|e| format!("enabling KVM_CAP_EXIT_HYPERCALL: {e}"))?;

    // No MMAP flag: the memslot then takes shared pages from userspace_addr (the memfd)
    // and only private pages from the guest_memfd.
    let gmem = vm
        .create_guest_memfd(RAM, GmemFlags::empty())
        .map_err(|e| format!("creating the guest_memfd: {e}"))?;
    let shared =
        Memfd::new(SHARED_NAME, TOTAL).map_err(|e| format!("creating the shared memfd: {e}"))?;
    let view = shared
        .mmap()
        .map_err(|e| format!("mapping the shared memfd: {e}"))?;

    let slots = [(0, 0, RAM, KVM_MEM_GUEST_MEMFD), (1, RAM, WINDOW_LEN, 0)];
    for (slot, gpa, len, flags) in slots {
        let region = kvm_userspace_memory_region2 {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: view.addr() + gpa,
            guest_memfd_offset: gpa,
            guest_memfd: if flags != 0 {
                gmem.as_raw_fd() as u32
            } else {
                0
            },
            ..Default::default()
        };
        // SAFETY: `view` maps [gpa, gpa+len) of the memfd read-write and lives in `Vm`
        // with the VM fd; the vCPU only runs while `Vm` is alive. KVM reaches the memory
        // through the mapping (mmu notifiers), never by keeping a stale pointer.
        unsafe { vm.vm_fd().set_user_memory_region2(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION2 slot {slot}: {e}"))?;
    }
    Ok(Vm {
        fd: Arc::new(vm.into_inner()),
        gmem,
        shared,
        view,
    })
}

/// Loads `code` at [`CODE`] (through the shared view: code pages stay shared) and
/// creates vCPU 0 in real mode with flat segments, about to execute it.
pub fn load_and_create_vcpu(vm: &mut Vm, code: &[u8]) -> Result<VcpuFd, String> {
    vm.view
        .write(CODE as usize, code)
        .map_err(|e| format!("loading the guest program: {e}"))?;
    let vcpu = vm
        .fd
        .create_vcpu(0)
        .map_err(|e| format!("creating vCPU 0: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    // Reset state is real mode with CS at 0xffff0000; make every segment base 0.
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = CODE;
    regs.rsp = STACK;
    regs.rflags = 0x2; // bit 1 is always set; interrupts off
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    Ok(vcpu)
}
