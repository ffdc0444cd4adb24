//! Errors of the VFIO layer. Each variant says what happened and what to do about it.

use std::io;
use std::path::PathBuf;

use super::Bdf;

/// Why a VFIO or PCI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error(transparent)]
    BadBdf(#[from] super::BdfParseError),

    #[error("no PCI device {bdf} ({path} does not exist); `vfio-gmem list` shows the devices")]
    NoSuchDevice { bdf: Bdf, path: PathBuf },

    #[error("{bdf} has no IOMMU group: the IOMMU is off or absent (boot with intel_iommu=on / amd_iommu=on, or give the VM a virtual IOMMU)")]
    NoIommuGroup { bdf: Bdf },

    #[error("{bdf} is {}, not vfio-pci; run `vfio-gmem bind {bdf}` first", match .driver { Some(d) => format!("bound to {d}"), None => "not bound to any driver".into() })]
    NotBoundToVfio { bdf: Bdf, driver: Option<String> },

    #[error("IOMMU group {group} is not viable: member {member} is bound to {driver}; bind the whole group with `vfio-gmem bind {member}` or unbind that member")]
    GroupNotViable {
        group: u32,
        member: Bdf,
        driver: String,
    },

    #[error("{what} is in use{}; close it (stop the VMM or test using it) and retry", match .pid { Some(p) => format!(" by pid {p}"), None => String::new() })]
    InUse { what: String, pid: Option<u32> },

    #[error("{path}: {source}{hint}")]
    Open {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("{op} on {what}: {source}{hint}")]
    Ioctl {
        op: &'static str,
        what: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("sysfs {path}: {source}")]
    Sysfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{0}")]
    Unsupported(String),
}

impl VfioError {
    /// The OS error number behind this failure, if any.
    ///
    /// ```
    /// use vfio_gmem::vfio::VfioError;
    /// let e = VfioError::Unsupported("x".into());
    /// assert_eq!(e.errno(), None);
    /// ```
    pub fn errno(&self) -> Option<i32> {
        match self {
            VfioError::Open { source, .. }
            | VfioError::Ioctl { source, .. }
            | VfioError::Sysfs { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub(crate) fn sysfs(path: impl Into<PathBuf>, source: io::Error) -> Self {
        VfioError::Sysfs {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn ioctl(op: &'static str, what: impl Into<String>, source: io::Error) -> Self {
        VfioError::Ioctl {
            op,
            what: what.into(),
            hint: "",
            source,
        }
    }

    pub(crate) fn ioctl_hint(
        op: &'static str,
        what: impl Into<String>,
        source: io::Error,
        hint: &'static str,
    ) -> Self {
        VfioError::Ioctl {
            op,
            what: what.into(),
            hint,
            source,
        }
    }
}

/// Result alias of the VFIO layer.
pub type Result<T, E = VfioError> = std::result::Result<T, E>;

/// Hint for EPERM from VFIO_DEVICE_BIND_IOMMUFD / group attach without interrupt remapping.
pub(crate) const NO_IRQ_REMAP_HINT: &str = ": the kernel refuses device assignment without \
    interrupt remapping (a device could forge MSIs to any CPU/vector), and this platform \
    appears to lack it. If you accept that risk (trusted device, e.g. a test VM with \
    virtio-iommu), boot with iommufd.allow_unsafe_interrupts=1 (cdev path) or \
    vfio_iommu_type1.allow_unsafe_interrupts=1 (legacy path). If the platform does remap \
    interrupts, another owner holds the device's IOMMU group instead";

/// Hint for ENOMEM from type1 DMA mapping, which pins pages against RLIMIT_MEMLOCK.
pub(crate) const MEMLOCK_HINT: &str = ": type1 pins every mapped page and counts it against \
    RLIMIT_MEMLOCK; raise the limit to cover all mapped memory (ulimit -l, systemd \
    LimitMEMLOCK=, or run as root with CAP_IPC_LOCK)";
