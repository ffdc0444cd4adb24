//! What a VM test needs from the running kernel beyond VFIO type1, vfio-pci and KVM, which
//! every kernel the tests boot has (the test kernel built in, Debian's own as modules).
//!
//! A test whose need is unmet is not run: it is reported as ignored, and a line
//! `skipped: NAME: REASON` on stderr says why. libtest counts it under "ignored", never
//! under "passed". Each need is checked here, apart from the library, from the kernel's
//! own nodes and ioctls.

use std::path::Path;
use std::sync::OnceLock;

/// Needs per test name (`"*"`: every test of the target).
pub type Needs = &'static [(&'static str, &'static [Need])];

static DECLARED: OnceLock<Needs> = OnceLock::new();

/// Declares the target's needs; call before `run_vm_tests`.
pub fn declare(needs: Needs) {
    let _ = DECLARED.set(needs);
}

/// What [`declare`] set (nothing: no needs).
pub fn declared() -> Needs {
    DECLARED.get().copied().unwrap_or(&[])
}

/// A kernel feature some VM tests need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// iommufd (`/dev/iommu`, `CONFIG_IOMMUFD`) and with it VFIO cdevs.
    Iommufd,
    /// A KVM VM type with private memory: `KVM_X86_SW_PROTECTED_VM` listed in
    /// `KVM_CAP_VM_TYPES` (`CONFIG_KVM_SW_PROTECTED_VM`).
    PrivateMemory,
    /// fail-nth fault injection (`CONFIG_FAULT_INJECTION`, `/proc/thread-self/fail-nth`).
    FaultInjection,
    /// A kernel without iommufd (Debian's): for tests of what the tool does there.
    NoIommufd,
    /// A kernel without a private-memory VM type (Debian's), likewise.
    NoPrivateMemory,
}

impl Need {
    /// `None` if this kernel has it; else why not.
    pub fn unmet(self) -> Option<String> {
        match self {
            Need::Iommufd => (!Path::new("/dev/iommu").exists())
                .then(|| "no /dev/iommu: the kernel has no iommufd (CONFIG_IOMMUFD)".to_string()),
            Need::PrivateMemory => match kvm_vm_types() {
                Ok(types) if types & (1 << 1) != 0 => None,
                Ok(types) => Some(format!(
                    "no KVM VM type with private memory: KVM_CAP_VM_TYPES is {types:#x}, \
                     without SW_PROTECTED (CONFIG_KVM_SW_PROTECTED_VM)"
                )),
                Err(e) => Some(format!("cannot ask KVM for its VM types: {e}")),
            },
            Need::FaultInjection => {
                (!Path::new("/proc/thread-self/fail-nth").exists()).then(|| {
                    "no /proc/thread-self/fail-nth: the kernel has no fault injection \
                     (CONFIG_FAULT_INJECTION, CONFIG_FAILSLAB)"
                        .to_string()
                })
            }
            Need::NoIommufd => Need::Iommufd.unmet().is_none().then(|| {
                "this kernel has iommufd; the test checks a kernel without it (scripts/vm-test \
                 --stock)"
                    .to_string()
            }),
            Need::NoPrivateMemory => Need::PrivateMemory.unmet().is_none().then(|| {
                "this kernel has a SW_PROTECTED VM; the test checks a kernel without one \
                 (scripts/vm-test --stock)"
                    .to_string()
            }),
        }
    }
}

/// `KVM_CAP_VM_TYPES` of `/dev/kvm`, asked directly (kvm-ioctls), not through the library.
fn kvm_vm_types() -> Result<u64, String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let r = kvm.check_extension_raw(kvm_bindings::KVM_CAP_VM_TYPES as _);
    Ok(r.max(0) as u64)
}

/// The first unmet need of a test, given the needs of the whole target (`"*"`) and of
/// single tests by name.
pub fn skip_reason(name: &str, needs: &[(&str, &[Need])]) -> Option<String> {
    needs
        .iter()
        .filter(|(n, _)| *n == "*" || *n == name)
        .flat_map(|(_, list)| list.iter())
        .find_map(|n| n.unmet())
}
