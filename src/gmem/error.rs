//! Errors of the gmem module. Each names the object involved and says what to do.

use std::io;

use super::flags::{GmemFlags, MemoryAttributes, VmType, VmTypes};

/// A guest_memfd, KVM or shared-backing operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GmemError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {source}; load kvm_intel or kvm_amd and check that this user may open it (group kvm)")]
    OpenKvm {
        /// The OS error.
        source: io::Error,
    },

    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM of type {vm_type} failed: {source}; {}", vm_type_hint(*.vm_type, *.supported))]
    CreateVm {
        /// Requested type.
        vm_type: VmType,
        /// What `KVM_CAP_VM_TYPES` reports.
        supported: VmTypes,
        /// The OS error.
        source: io::Error,
    },

    /// The VM does not support guest_memfd at all.
    #[error("{} has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0); use a kernel with CONFIG_KVM_GUEST_MEMFD (Linux 6.8+; 6.18+ for default VMs)", vm_name(*.vm_type))]
    NoGuestMemfd {
        /// The VM's type, if known.
        vm_type: Option<VmType>,
    },

    /// The VM does not accept some of the requested guest_memfd flags.
    #[error("{}", flags_refused(*.requested, *.accepted, *.vm_type))]
    FlagsRefused {
        /// Flags asked for.
        requested: GmemFlags,
        /// Flags the VM accepts (`KVM_CAP_GUEST_MEMFD_FLAGS`).
        accepted: GmemFlags,
        /// The VM's type, if known.
        vm_type: Option<VmType>,
    },

    /// A size, offset or length the kernel would refuse.
    #[error("{what}: {detail}")]
    InvalidArgument {
        /// The object and operation (e.g. "punch_hole on guest_memfd fd 7").
        what: String,
        /// What is wrong and how to fix it.
        detail: String,
    },

    /// The fd handed to [`GuestMemfd::adopt`](super::GuestMemfd::adopt) is something else.
    #[error(
        "fd {fd} is not a guest_memfd: it is {actual}; pass the fd KVM_CREATE_GUEST_MEMFD returned"
    )]
    NotGuestMemfd {
        /// The fd number.
        fd: i32,
        /// What it really is (from `/proc/self/fd`).
        actual: String,
    },

    /// The guest_memfd was created without `MMAP`.
    #[error("guest_memfd fd {fd} cannot be mapped into the host: it was created without MMAP{}; create it with GmemFlags::MMAP (Linux 6.18+)", match .flags { Some(f) => format!(" (flags {f})"), None => String::new() })]
    MmapNotEnabled {
        /// The fd number.
        fd: i32,
        /// Its creation flags, if known.
        flags: Option<GmemFlags>,
    },

    /// The pool of the hugetlb memfd's huge page size (2 MiB, 1 GiB...) has too few free
    /// pages to back it.
    #[error("no free {} huge pages for {what} ({pages} needed): {source}; reserve them with `echo N > {}` (N = the pages others use + {pages}; now {nr_hugepages}){}", human_page_size(*.page_size), super::fdops::nr_hugepages_path(*.page_size), boot_hint(*.page_size, *.pages))]
    NoHugePages {
        /// The object and operation.
        what: String,
        /// The huge page size of the file (from the file itself: hugetlbfs's block size).
        page_size: u64,
        /// Huge pages of that size the operation needs.
        pages: u64,
        /// Current size of that page size's pool, from
        /// `/sys/kernel/mm/hugepages/hugepages-<N>kB/nr_hugepages`.
        nr_hugepages: String,
        /// The OS error (ENOMEM from mmap, ENOSPC from fallocate), or, when a
        /// [`DmaSpace`](crate::dma::DmaSpace) plan's map of the file ran out of huge pages,
        /// an `io::ErrorKind::OutOfMemory` error wrapping that plan's
        /// [`ExecError`](crate::dma::ExecError) (`get_ref()` and downcast to reach it).
        source: io::Error,
    },

    /// The kernel has no pool of the asked huge page size (`memfd_create` answered
    /// `ENODEV`: e.g. 1 GiB pages on a CPU without `pdpe1gb`).
    #[error("memfd_create of {what} with {} huge pages failed: {source}; this kernel has no {} huge page pool ({} does not exist{}); use a size it has (see /sys/kernel/mm/hugepages/)", human_page_size(*.page_size), human_page_size(*.page_size), super::fdops::nr_hugepages_path(*.page_size), if *.page_size >= 1 << 30 { ": 1 GiB pages need a CPU with pdpe1gb (x86 gbpages)" } else { "" })]
    NoHugePageSize {
        /// The memfd.
        what: String,
        /// The size asked for.
        page_size: u64,
        /// The OS error (`ENODEV`).
        source: io::Error,
    },

    /// `KVM_SET_MEMORY_ATTRIBUTES` asked for an attribute the VM does not support.
    #[error("cannot set GPA [{gpa:#x}, {:#x}) {}: {} supports memory attributes {supported} (KVM_CAP_MEMORY_ATTRIBUTES); private memory needs a VM type with it, e.g. VmType::SwProtected (CONFIG_KVM_SW_PROTECTED_VM) or a confidential type", gpa + len, if *.private { "private" } else { "shared" }, vm_name(*.vm_type))]
    AttributesUnsupported {
        /// First GPA.
        gpa: u64,
        /// Length.
        len: u64,
        /// Target state.
        private: bool,
        /// The VM's type, if known.
        vm_type: Option<VmType>,
        /// What the VM supports.
        supported: MemoryAttributes,
    },

    /// A discard was asked for a backing this module cannot resolve.
    #[error("cannot discard {what}: {detail}")]
    UnsupportedBacking {
        /// The region and range.
        what: String,
        /// Why, and what to register instead.
        detail: String,
    },

    /// Any other system call failure.
    #[error("{op} on {what} failed: {source}{hint}")]
    Os {
        /// The call (e.g. "KVM_CREATE_GUEST_MEMFD", "mmap").
        op: &'static str,
        /// The object and arguments.
        what: String,
        /// The OS error.
        source: io::Error,
        /// "; what to do" or empty.
        hint: String,
    },
}

impl GmemError {
    /// The `errno` that best describes the failure (the kernel's when there was a call).
    pub fn errno(&self) -> i32 {
        match self {
            GmemError::OpenKvm { source }
            | GmemError::CreateVm { source, .. }
            | GmemError::NoHugePages { source, .. }
            | GmemError::NoHugePageSize { source, .. }
            | GmemError::Os { source, .. } => match (source.raw_os_error(), source.kind()) {
                (Some(errno), _) => errno,
                // A wrapped error (e.g. a failed plan's, in `NoHugePages`) keeps its kind.
                (None, io::ErrorKind::OutOfMemory) => libc::ENOMEM,
                (None, _) => libc::EIO,
            },
            GmemError::NoGuestMemfd { .. } => libc::ENOTTY,
            GmemError::MmapNotEnabled { .. } => libc::ENODEV,
            GmemError::NotGuestMemfd { .. } => libc::EBADF,
            GmemError::FlagsRefused { .. }
            | GmemError::InvalidArgument { .. }
            | GmemError::AttributesUnsupported { .. }
            | GmemError::UnsupportedBacking { .. } => libc::EINVAL,
        }
    }

    pub(crate) fn os(op: &'static str, what: impl Into<String>, source: io::Error) -> Self {
        GmemError::Os {
            op,
            what: what.into(),
            source,
            hint: String::new(),
        }
    }

    pub(crate) fn os_hint(
        op: &'static str,
        what: impl Into<String>,
        source: io::Error,
        hint: impl AsRef<str>,
    ) -> Self {
        GmemError::Os {
            op,
            what: what.into(),
            source,
            hint: format!("; {}", hint.as_ref()),
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, detail: impl Into<String>) -> Self {
        GmemError::InvalidArgument {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

/// `kvm_ioctls` errors carry only an errno.
pub(crate) fn kvm_err(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// `2 MiB`, `1 GiB`, `64 KiB`: a page size for messages.
pub(crate) fn human_page_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b % 1024 == 0 => format!("{} KiB", b >> 10),
        b => format!("{b:#x}-byte"),
    }
}

/// For gigantic pages (1 GiB): the pool can rarely grow at run time, once memory is
/// fragmented; the kernel command line reserves them before it is.
fn boot_hint(page_size: u64, pages: u64) -> String {
    if page_size >= 1 << 30 {
        format!(
            "; {} pages rarely come free at run time once memory is fragmented: reserve them \
             at boot with `hugepagesz={}G hugepages={pages}` (or more) on the kernel command line",
            human_page_size(page_size),
            page_size >> 30
        )
    } else {
        String::new()
    }
}

fn vm_name(t: Option<VmType>) -> String {
    match t {
        Some(t) => format!("this {t} VM"),
        None => "this VM".to_string(),
    }
}

fn vm_type_hint(t: VmType, supported: VmTypes) -> String {
    if supported.contains(t) {
        format!("this KVM lists it as supported ({supported}); check dmesg for why KVM refused")
    } else if t == VmType::SwProtected {
        format!("this KVM supports {supported}; SW_PROTECTED needs a kernel with CONFIG_KVM_SW_PROTECTED_VM (and TDP/NPT enabled in kvm_intel/kvm_amd)")
    } else {
        format!("this KVM supports {supported}; pick one of those")
    }
}

fn flags_refused(requested: GmemFlags, accepted: GmemFlags, t: Option<VmType>) -> String {
    let refused = requested.difference(accepted);
    let on = match t {
        Some(t) => format!("a {t} VM"),
        None => "this VM".to_string(),
    };
    let keep = requested.intersection(accepted);
    let fix = if keep.is_empty() {
        "create without flags".to_string()
    } else if keep == GmemFlags::MMAP {
        "create with MMAP only".to_string()
    } else {
        format!("create with {keep}")
    };
    format!(
        "guest_memfd flag {refused} is refused on {on} (EINVAL): it accepts {accepted} \
         (KVM_CAP_GUEST_MEMFD_FLAGS); {fix}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_refused_on_sw_protected_explains_the_fix() {
        let e = GmemError::FlagsRefused {
            requested: GmemFlags::MMAP | GmemFlags::INIT_SHARED,
            accepted: GmemFlags::MMAP,
            vm_type: Some(VmType::SwProtected),
        };
        assert_eq!(
            e.to_string(),
            "guest_memfd flag INIT_SHARED is refused on a SW_PROTECTED VM (EINVAL): it accepts \
             MMAP (KVM_CAP_GUEST_MEMFD_FLAGS); create with MMAP only"
        );
        assert_eq!(e.errno(), libc::EINVAL);
        let e = GmemError::FlagsRefused {
            requested: GmemFlags::MMAP,
            accepted: GmemFlags::empty(),
            vm_type: None,
        };
        let m = e.to_string();
        assert!(m.contains("MMAP is refused on this VM") && m.contains("accepts none"));
        assert!(m.ends_with("create without flags"), "{m}");
    }

    #[test]
    fn messages_name_the_object_and_the_fix() {
        let e = GmemError::CreateVm {
            vm_type: VmType::SwProtected,
            supported: VmTypes::from_bits_retain(1),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        };
        let m = e.to_string();
        assert!(
            m.contains("type SW_PROTECTED") && m.contains("supports DEFAULT"),
            "{m}"
        );
        assert!(m.contains("CONFIG_KVM_SW_PROTECTED_VM"), "{m}");

        let e = GmemError::AttributesUnsupported {
            gpa: 0x1000,
            len: 0x2000,
            private: true,
            vm_type: Some(VmType::Default),
            supported: MemoryAttributes::empty(),
        };
        let m = e.to_string();
        assert!(m.starts_with("cannot set GPA [0x1000, 0x3000) private: this DEFAULT VM supports memory attributes none"), "{m}");
        assert!(m.contains("VmType::SwProtected"), "{m}");

        let e = GmemError::NoHugePages {
            what: "mmap of memfd 'ram'".into(),
            page_size: 2 << 20,
            pages: 2,
            nr_hugepages: "0".into(),
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        };
        let m = e.to_string();
        assert!(
            m.starts_with("no free 2 MiB huge pages for mmap of memfd 'ram' (2 needed)")
                && m.contains(
                    "echo N > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages` (N = the \
                     pages others use + 2; now 0)"
                )
                && !m.contains("at boot"),
            "{m}"
        );
        assert_eq!(e.errno(), libc::ENOMEM);

        let e = GmemError::NoHugePages {
            what: "allocate of memfd 'ram'".into(),
            page_size: 1 << 30,
            pages: 1,
            nr_hugepages: "0".into(),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let m = e.to_string();
        assert!(
            m.starts_with("no free 1 GiB huge pages for allocate of memfd 'ram' (1 needed)")
                && m.contains(
                    "echo N > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages`"
                )
                && m.ends_with(
                    "reserve them at boot with `hugepagesz=1G hugepages=1` (or more) on the \
                     kernel command line"
                ),
            "{m}"
        );
        assert_eq!(e.errno(), libc::ENOSPC);

        // A wrapped error (a DmaSpace plan's) has no raw errno: its kind gives ENOMEM.
        let e = GmemError::NoHugePages {
            what: "mapping new region GPA [0x0, +0x800000)".into(),
            page_size: 2 << 20,
            pages: 4,
            nr_hugepages: "2".into(),
            source: io::Error::new(io::ErrorKind::OutOfMemory, "op 0 (map ...) failed"),
        };
        assert_eq!(e.errno(), libc::ENOMEM);
        assert!(e
            .to_string()
            .contains("(4 needed): op 0 (map ...) failed; reserve"));

        let e = GmemError::NoHugePageSize {
            what: "memfd 'ram'".into(),
            page_size: 1 << 30,
            source: io::Error::from_raw_os_error(libc::ENODEV),
        };
        let m = e.to_string();
        assert!(
            m.contains("this kernel has no 1 GiB huge page pool") && m.contains("pdpe1gb"),
            "{m}"
        );
        assert_eq!(e.errno(), libc::ENODEV);
        assert_eq!(human_page_size(4096), "4 KiB");

        let e = GmemError::MmapNotEnabled {
            fd: 5,
            flags: Some(GmemFlags::INIT_SHARED),
        };
        assert!(e
            .to_string()
            .contains("(flags INIT_SHARED); create it with GmemFlags::MMAP"));
        assert_eq!(e.errno(), libc::ENODEV);
    }
}
