//! Devices in a space, on either IOMMU backend: the backend table, attach (which probes
//! how areas are cut, at the first iommufd attach) and detach.
//!
//! One table row per backend says how a space is created on it and how a PCI device
//! joins it, as the kernel's VFIO selftest library (tools/testing/selftests/vfio/lib)
//! picks its iommu modes from one table: [`DmaSpace::open`] and [`DmaSpace::attach_pci`]
//! look the row up, so a VMM (and the CLI) writes one path for both.

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::core::{Attached, DmaSpace, Iommu};
use super::probe::{probe_cut, probe_cut_on_attach};
use super::types::{CutSupport, SpaceError, SpaceOptions};
use crate::gmem::KvmVm;
use crate::iommufd::{Ioas, Iommufd};
use crate::mapper::Backend;
use crate::vfio::{Bdf, Container, Device, Group, PciSysfs, VfioError};

type Vm = Option<KvmVm<Arc<VmFd>>>;

/// How a space runs on one IOMMU backend.
struct BackendRow {
    backend: Backend,
    /// The node whose presence says the running kernel offers the backend.
    node: &'static str,
    /// A new, empty space on the backend.
    open: fn(Vm, SpaceOptions) -> Result<DmaSpace, SpaceError>,
    /// Opens the VFIO device at a PCI address the backend's way and attaches it.
    attach: fn(&mut DmaSpace, &PciSysfs, Bdf) -> Result<Device, SpaceError>,
}

/// Every backend, preferred first.
const BACKENDS: [BackendRow; 2] = [
    BackendRow {
        backend: Backend::Iommufd,
        node: "/dev/iommu",
        open: open_iommufd,
        attach: attach_cdev,
    },
    BackendRow {
        backend: Backend::LegacyType1,
        node: "/dev/vfio/vfio",
        open: open_legacy,
        attach: attach_group,
    },
];

fn row(backend: Backend) -> &'static BackendRow {
    BACKENDS
        .iter()
        .find(|r| r.backend == backend)
        .expect("every backend has a row")
}

fn open_iommufd(vm: Vm, options: SpaceOptions) -> Result<DmaSpace, SpaceError> {
    DmaSpace::iommufd(&Arc::new(Iommufd::open()?), vm, options)
}

fn open_legacy(vm: Vm, options: SpaceOptions) -> Result<DmaSpace, SpaceError> {
    let container = Container::open()?;
    let cut = CutSupport::Unavailable(format!("{} cannot cut areas", Backend::LegacyType1));
    let iommu = Iommu::Legacy {
        container,
        groups: BTreeMap::new(),
    };
    Ok(DmaSpace::with(iommu, vm, options, cut))
}

/// iommufd: the device's cdev, bound to the space's iommufd and attached to its IOAS.
fn attach_cdev(space: &mut DmaSpace, sysfs: &PciSysfs, bdf: Bdf) -> Result<Device, SpaceError> {
    let device = Device::open_pci_in(sysfs, bdf)?;
    space.attach(&device)?;
    Ok(device)
}

/// Legacy type1: the device's group joins the space's container (once per group), and
/// the device is opened through the group.
fn attach_group(space: &mut DmaSpace, sysfs: &PciSysfs, bdf: Bdf) -> Result<Device, SpaceError> {
    let Iommu::Legacy { container, groups } = &mut space.iommu else {
        unreachable!("the legacy row attaches to legacy spaces only");
    };
    let err = |source: VfioError| SpaceError::Device {
        device: bdf.to_string(),
        source,
    };
    let group = sysfs
        .device(bdf)?
        .iommu_group
        .ok_or(VfioError::NoIommuGroup { bdf })?;
    if let std::collections::btree_map::Entry::Vacant(e) = groups.entry(group) {
        let g = Group::open_in(sysfs, group)?;
        container.add_group(&g).map_err(err)?;
        e.insert(g);
    }
    let device = groups[&group].device(bdf)?;
    let node = device.node_id().map_err(|e| SpaceError::Attach {
        device: device.name().to_string(),
        detail: format!("cannot stat the device fd: {e}"),
    })?;
    // By name, not by node: a device fd from VFIO_GROUP_GET_DEVICE_FD is an anonymous
    // inode, the same one for every device.
    if space.attached.iter().any(|a| a.name == device.name()) {
        return Err(SpaceError::Attach {
            device: device.name().to_string(),
            detail: "already attached to this DMA space".into(),
        });
    }
    space.attached.push(Attached {
        node,
        name: device.name().to_string(),
    });
    Ok(device)
}

impl DmaSpace {
    /// A space on `backend`: a new IOAS on a new `/dev/iommu` context
    /// ([`DmaSpace::iommufd`]), or a new legacy type1 container (`/dev/vfio/vfio`; mapping
    /// by VA, per-granule areas for convertible regions). Devices join with
    /// [`attach_pci`](Self::attach_pci), the same call on both.
    ///
    /// ```no_run
    /// use vfio_gmem::dma::{DmaSpace, SpaceOptions};
    /// use vfio_gmem::mapper::Backend;
    /// use vfio_gmem::vfio::PciSysfs;
    /// let backend = DmaSpace::available_backends().next().ok_or("no VFIO IOMMU backend")?;
    /// let mut space = DmaSpace::open(backend, None, SpaceOptions::default())?;
    /// let device = space.attach_pci(&PciSysfs::new(), "0000:00:03.0".parse()?)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(
        backend: Backend,
        vm: Option<KvmVm<Arc<VmFd>>>,
        options: SpaceOptions,
    ) -> Result<DmaSpace, SpaceError> {
        (row(backend).open)(vm, options)
    }

    /// The backends whose device node exists on this system, preferred first (iommufd,
    /// then legacy type1).
    pub fn available_backends() -> impl Iterator<Item = Backend> {
        BACKENDS
            .iter()
            .filter(|r| std::path::Path::new(r.node).exists())
            .map(|r| r.backend)
    }

    /// Opens the VFIO device at `bdf` (bound to vfio-pci) the way this space's backend
    /// needs and attaches it: on iommufd its cdev, bound and attached to the IOAS (see
    /// [`attach`](Self::attach)); on a legacy container its IOMMU group joins the
    /// container (once per group; the space keeps the group open) and the device is
    /// opened through the group. The caller keeps the returned device.
    ///
    /// A space made with [`with_mapper`](Self::with_mapper) has its devices attached by
    /// the caller and refuses.
    pub fn attach_pci(&mut self, sysfs: &PciSysfs, bdf: Bdf) -> Result<Device, SpaceError> {
        let backend = match self.iommu {
            Iommu::Iommufd { .. } => Backend::Iommufd,
            Iommu::Legacy { .. } => Backend::LegacyType1,
            #[cfg(feature = "testing")]
            Iommu::Executor(_) => {
                return Err(SpaceError::Attach {
                    device: bdf.to_string(),
                    detail: "this space runs its plans on a test executor".into(),
                })
            }
            Iommu::Mapper(_) => {
                return Err(SpaceError::Attach {
                    device: bdf.to_string(),
                    detail: "this space maps through a caller's mapper: attach the device \
                             to it directly"
                        .into(),
                })
            }
        };
        (row(backend).attach)(self, sysfs, bdf)
    }

    /// Binds `device` to this space's iommufd (unless [`Device::bind_to`] already did)
    /// and attaches it to the IOAS. The first attach probes, with the device's domain in
    /// place, whether areas can be cut. After a failure, calling it again with the same
    /// device retries.
    ///
    /// [`Device::bind_to`]: crate::vfio::Device::bind_to
    pub fn attach(&mut self, device: &crate::vfio::Device) -> Result<(), SpaceError> {
        let Iommu::Iommufd { ioas } = &self.iommu else {
            return Err(SpaceError::Attach {
                device: device.name().to_string(),
                detail: "this space uses a legacy container: attach the device with \
                         DmaSpace::attach_pci, which adds its group to the container"
                    .into(),
            });
        };
        let attach_err = |detail: String| SpaceError::Attach {
            device: device.name().to_string(),
            detail,
        };
        let node = device
            .node_id()
            .map_err(|e| attach_err(format!("cannot stat the device fd: {e}")))?;
        if self.attached.iter().any(|a| a.node == node) {
            return Err(attach_err("already attached to this DMA space".into()));
        }
        // bind_to binds once per device fd: after a failed attach (the bind stays until
        // the fd closes) calling attach again retries the attach alone.
        let vfio_err = |source: VfioError| SpaceError::Device {
            device: device.name().to_string(),
            source,
        };
        device.bind_to(ioas.iommufd()).map_err(vfio_err)?;
        device.attach(ioas.id()).map_err(vfio_err)?;
        self.attached.push(Attached {
            node,
            name: device.name().to_string(),
        });
        if self.cut == CutSupport::NotProbed {
            // Nothing is mapped yet (regions need a device), so the probe may still
            // choose the IOAS's huge page setting. The compat cut is the fallback only
            // if this space holds the compat designation.
            let avoid = self.owned_iovas(None);
            let compat = |ioas: &Ioas| match &self.compat_refused {
                Some(why) => CutSupport::Unavailable(why.clone()),
                None => probe_cut(ioas, &avoid),
            };
            self.cut = if self.options.native_split {
                probe_cut_on_attach(ioas, &avoid, &compat)
            } else {
                compat(ioas)
            };
            log::info!("IOAS {}: area cutting {:?}", ioas.id(), self.cut);
        }
        Ok(())
    }

    /// Detaches `device` (attached with [`DmaSpace::attach`]) from this space: its DMA is
    /// blocked from then on; the space's mappings stay for the other devices. The device
    /// stays bound to the space's iommufd (VFIO has no unbind short of closing the fd).
    ///
    /// Detaching is optional before dropping the space: dropping it empties the IOAS if
    /// a device still uses it, so no page stays pinned and no device reaches guest memory
    /// afterwards, whatever the drop order (see the type's docs).
    pub fn detach(&mut self, device: &crate::vfio::Device) -> Result<(), SpaceError> {
        let err = |detail: String| SpaceError::Attach {
            device: device.name().to_string(),
            detail,
        };
        let node = device
            .node_id()
            .map_err(|e| err(format!("cannot stat the device fd: {e}")))?;
        let Some(i) = self.attached.iter().position(|a| a.node == node) else {
            return Err(err("not attached to this DMA space".into()));
        };
        if !matches!(self.iommu, Iommu::Iommufd { .. }) {
            return Err(err(
                "a legacy container keeps its groups' devices until the space is dropped".into(),
            ));
        }
        device.detach().map_err(|source| SpaceError::Device {
            device: device.name().to_string(),
            source,
        })?;
        self.attached.remove(i);
        Ok(())
    }

    /// Names of the devices attached through [`DmaSpace::attach`], in attach order.
    pub fn attached_devices(&self) -> impl Iterator<Item = &str> {
        self.attached.iter().map(|a| a.name.as_str())
    }

    pub(super) fn has_device(&self) -> bool {
        // A space on a caller's mapper (e.g. a legacy container with its groups set) has
        // its devices set by the caller before the space exists.
        #[cfg(feature = "testing")]
        if matches!(self.iommu, Iommu::Executor(_)) {
            return true;
        }
        matches!(self.iommu, Iommu::Mapper(_)) || !self.attached.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_has_one_row_iommufd_first() {
        for b in [Backend::Iommufd, Backend::LegacyType1] {
            assert_eq!(BACKENDS.iter().filter(|r| r.backend == b).count(), 1, "{b}");
            assert_eq!(row(b).backend, b);
        }
        assert_eq!(BACKENDS[0].backend, Backend::Iommufd);
        let nodes: Vec<&str> = BACKENDS.iter().map(|r| r.node).collect();
        assert_eq!(nodes, ["/dev/iommu", "/dev/vfio/vfio"]);
    }
}
