//! The edu devices the benchmarks attach, handed to vfio-pci by the library's
//! [`Binder`](vfio_gmem::vfio::Binder) (whole IOMMU group, previous drivers recorded so
//! that `vfio-gmem unbind` restores them). Shared with the other VM examples (`#[path]`).

use std::path::PathBuf;
use std::time::Duration;

use vfio_gmem::engine::edu;
use vfio_gmem::iommufd::Ioas;
use vfio_gmem::vfio::{Bdf, Binder, Device, PciSysfs, Readiness};

/// An edu device bound to vfio-pci.
#[allow(dead_code)] // not every example reads every field
pub struct Edu {
    pub bdf: Bdf,
    pub cdev: PathBuf,
    pub group: u32,
}

/// Binds every edu device to vfio-pci (those not bound yet) and returns them in BDF order.
pub fn edu_devices() -> Result<Vec<Edu>, String> {
    let sysfs = PciSysfs::new();
    let binder = Binder::new();
    let mut out = Vec::new();
    let devices = sysfs
        .devices()
        .map_err(|e| format!("listing PCI devices: {e}"))?;
    for d in devices
        .iter()
        .filter(|d| d.vendor == edu::VENDOR && d.device == edu::DEVICE)
    {
        if !d.is_vfio_bound() {
            binder
                .bind(d.bdf)
                .map_err(|e| format!("binding {} to vfio-pci: {e}", d.bdf))?;
        }
        // The cdev may appear after the bind returns: wait up to 2 s.
        let mut ready = None;
        for _ in 0..100 {
            match sysfs.readiness(d.bdf) {
                Ok(Readiness::Ready {
                    group,
                    cdev: Some(cdev),
                    ..
                }) => {
                    ready = Some((group, cdev));
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let (group, cdev) = ready.ok_or_else(|| {
            format!(
                "{}: no VFIO cdev after binding to vfio-pci ({:?})",
                d.bdf,
                sysfs.readiness(d.bdf)
            )
        })?;
        out.push(Edu {
            bdf: d.bdf,
            cdev,
            group,
        });
    }
    if out.is_empty() {
        return Err(format!(
            "no edu device (vendor {:#06x}, device {:#06x}): run inside the test VM (scripts/vm-run)",
            edu::VENDOR,
            edu::DEVICE
        ));
    }
    Ok(out)
}

/// A fresh device fd for `edu`, bound to `ioas`'s iommufd and attached to it.
#[allow(dead_code)] // bench_vm only
pub fn attach_new(edu: &Edu, ioas: &Ioas) -> Result<Device, String> {
    use std::os::fd::AsFd;
    let dev = Device::open_cdev(&edu.cdev).map_err(|e| format!("opening the edu cdev: {e}"))?;
    dev.bind_iommufd(ioas.iommufd().as_fd())
        .map_err(|e| format!("VFIO_DEVICE_BIND_IOMMUFD: {e}"))?;
    dev.attach(ioas.id())
        .map_err(|e| format!("VFIO_DEVICE_ATTACH_IOMMUFD_PT: {e}"))?;
    Ok(dev)
}
