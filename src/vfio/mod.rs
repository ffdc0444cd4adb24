//! VFIO device assignment: PCI discovery and driver binding, VFIO devices (opened through
//! their cdev and bound to iommufd, or through a legacy group), and the legacy
//! group/container (type1) path.
//!
//! | file | what |
//! |---|---|
//! | `bdf` | [`Bdf`] PCI addresses |
//! | `sysfs` | [`PciSysfs`]: devices, drivers, IOMMU groups, readiness |
//! | `bind` | [`Binder`]: whole-group vfio-pci binding with restore |
//! | `host` | [`host::HostInspector`]: what the host uses each device for (mounts, swap, interfaces, console), the rules `bind` applies |
//! | `device` | [`Device`]: one VFIO device fd, however it was obtained |
//! | `region` | [`RegionInfo`], capability chains, [`BarMapping`] |
//! | `irq` | [`IrqInfo`], [`EventFd`], INTx/MSI/MSI-X eventfd wiring |
//! | `legacy` | [`Container`], [`Group`]: `/dev/vfio/vfio` type1v2 + `/dev/vfio/<group>` |

// Every public item says what it promises (issue 13); a new undocumented one fails the build.

mod bdf;
pub mod bind;
mod device;
mod error;
pub mod host;
mod irq;
pub mod legacy;
mod region;
pub mod sysfs;
#[cfg(test)]
mod testing;

pub use bdf::{Bdf, BdfParseError};
pub use bind::{BindOptions, BindPlan, Binder, MemberAction, Previous, Restored};
pub use device::{Device, DeviceInfo};
pub use error::{Result, VfioError};
pub use irq::{EventFd, IrqInfo, IrqKind};
pub use legacy::{Container, Group};
pub use region::{BarMapping, RegionCap, RegionInfo, SparseArea};
pub use sysfs::{NotReady, PciDevice, PciSysfs, Readiness, Viability};
