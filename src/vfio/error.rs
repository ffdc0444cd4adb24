//! Errors of the VFIO layer. Each variant says what happened and what to do about it.

use std::io;
use std::path::PathBuf;

use super::host::{HostError, HostUse, Nature};
use super::Bdf;

/// Why a VFIO or PCI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// A [`BarMapping`](super::BarMapping) access that is misaligned or outside the
    /// mapped areas; nothing was read or written.
    #[error(
        "BAR access of {size} bytes at {offset:#x} is misaligned or outside the mapped \
         areas ({areas}); use Device::region_read/region_write for registers outside them"
    )]
    BarAccess {
        /// Offset of the access in the BAR.
        offset: usize,
        /// Width of the access in bytes.
        size: usize,
        /// The mapped areas, for the message.
        areas: String,
    },

    /// A PCI address that does not parse.
    #[error(transparent)]
    BadBdf(#[from] super::BdfParseError),

    /// No PCI device has this address.
    #[error("no PCI device {bdf} ({path} does not exist); `vfio-gmem list` shows the devices")]
    NoSuchDevice {
        /// The address asked for.
        bdf: Bdf,
        /// The sysfs directory that does not exist.
        path: PathBuf,
    },

    /// The device has no IOMMU group: the IOMMU is off or absent, so VFIO cannot take it.
    #[error("{bdf} has no IOMMU group: the IOMMU is off or absent (boot with intel_iommu=on / amd_iommu=on, or give the VM a virtual IOMMU)")]
    NoIommuGroup {
        /// The device.
        bdf: Bdf,
    },

    /// The device is not bound to vfio-pci, so it has no VFIO node to open.
    #[error("{bdf} is {}, not vfio-pci; run `vfio-gmem bind {bdf}` first", match .driver { Some(d) => format!("bound to {d}"), None => "not bound to any driver".into() })]
    NotBoundToVfio {
        /// The device.
        bdf: Bdf,
        /// Its driver now (`None`: unbound).
        driver: Option<String>,
    },

    /// A bridge in the group is bound to a host driver, which keeps the group non-viable;
    /// bind never moves a bridge, so the group cannot be assigned. Nothing was changed.
    #[error("IOMMU group {group} cannot be assigned: its bridge {member} is bound to {driver}, which keeps the group non-viable, and bind never moves a bridge (the host needs it); assign a device of another IOMMU group, or put the device where it gets a group of its own (another slot, ACS)")]
    BridgeKeepsGroup {
        /// The IOMMU group.
        group: u32,
        /// The bridge.
        member: Bdf,
        /// The bridge's driver.
        driver: String,
    },

    /// A member of the group is bound to a driver that does its own DMA, so VFIO refuses the
    /// whole group until it is moved.
    #[error("IOMMU group {group} is not viable: member {member} is bound to {driver}; bind the whole group with `vfio-gmem bind {member}` or unbind that member")]
    GroupNotViable {
        /// The IOMMU group.
        group: u32,
        /// The first such member, in BDF order.
        member: Bdf,
        /// Its driver.
        driver: String,
    },

    /// The device is not an endpoint VFIO can assign (a bridge, a host bridge...); bind
    /// never moves it.
    #[error("{bdf} is {}: not assignable by nature; bind never moves it (it stays with the host, whatever IOMMU group it shares)", .nature.with_article())]
    NotAssignable {
        /// The device.
        bdf: Bdf,
        /// What it is.
        nature: Nature,
    },

    /// The host uses the device or a member of its group; nothing was changed. See
    /// [`BindOptions::force`](super::BindOptions::force).
    #[error("refusing to bind {bdf}: the host depends on {}: {}. Nothing was changed. {}",
        if uses.iter().all(|u| u.device == *bdf) { "it".to_string() } else { format!("its IOMMU group {group}") },
        uses.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        if *forceable {
            "Stop these uses first (unmount, swapoff, take the interface down) and retry, or override with `vfio-gmem bind --force` if the host can do without them"
        } else {
            "The device the root filesystem lives on is never moved, not even with --force"
        })]
    HostInUse {
        /// The device asked for.
        bdf: Bdf,
        /// Its IOMMU group.
        group: u32,
        /// What the host uses the group's members for.
        uses: Vec<HostUse>,
        /// False when a use cannot be overridden (the root filesystem's device).
        forceable: bool,
    },

    /// The host's uses could not be read, so the device is treated as in use (fail closed);
    /// nothing was changed.
    #[error("cannot tell whether the host uses {bdf}, so it is not moved: {source}")]
    HostInspection {
        /// The device asked for.
        bdf: Bdf,
        #[source]
        /// What could not be read.
        source: HostError,
    },

    /// A VFIO node or device is held open (unbinding it would block until it is closed);
    /// nothing was changed.
    #[error("{what} is in use{}; close it (stop the VMM or test using it) and retry", match .pid { Some(p) => format!(" by pid {p}"), None => String::new() })]
    InUse {
        /// The node or device.
        what: String,
        /// The process holding it, when known.
        pid: Option<u32>,
    },

    /// Opening a VFIO node failed.
    #[error("{path}: {source}{hint}")]
    Open {
        /// The node.
        path: PathBuf,
        /// What usually causes this errno here, and what to do (may be empty).
        hint: &'static str,
        #[source]
        /// The `open(2)` error.
        source: io::Error,
    },

    /// A VFIO ioctl (or `mmap` of a region) failed.
    #[error("{op} on {what}: {source}{hint}")]
    Ioctl {
        /// The request (`VFIO_DEVICE_SET_IRQS`, ...).
        op: &'static str,
        /// The device, group or container it acted on.
        what: String,
        /// What usually causes this errno here, and what to do (may be empty).
        hint: &'static str,
        #[source]
        /// The kernel's error.
        source: io::Error,
    },

    /// Reading or writing a sysfs attribute failed.
    #[error("sysfs {path}: {source}")]
    Sysfs {
        /// The attribute.
        path: PathBuf,
        #[source]
        /// The system error.
        source: io::Error,
    },

    /// The kernel or device lacks what the operation needs; the text says what.
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
