//! A fake sysfs tree for host tests: devices, drivers, IOMMU groups and vfio-dev nodes
//! laid out as the kernel does, with symlinks where the kernel has symlinks.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::PciSysfs;

pub(crate) struct FakeSysfs {
    pub root: PathBuf,
}

impl FakeSysfs {
    pub fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!(
            "vfio-gmem-fake-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
        fs::create_dir_all(root.join("sys/bus/pci/drivers")).unwrap();
        fs::create_dir_all(root.join("sys/kernel/iommu_groups")).unwrap();
        fs::create_dir_all(root.join("dev/vfio/devices")).unwrap();
        fs::write(root.join("sys/bus/pci/drivers_probe"), "").unwrap();
        FakeSysfs { root }
    }

    pub fn sysfs(&self) -> PciSysfs {
        PciSysfs::with_roots(self.root.join("sys"), self.root.join("dev"))
    }

    fn sys(&self) -> PathBuf {
        self.root.join("sys")
    }

    /// Adds a device; `group` links it into `kernel/iommu_groups/<n>/devices`.
    pub fn add(&self, bdf: &str, vendor: u16, device: u16, class: u32, group: Option<u32>) {
        let real = self.sys().join("devices/pci0000:00").join(bdf);
        fs::create_dir_all(&real).unwrap();
        fs::write(real.join("vendor"), format!("0x{vendor:04x}\n")).unwrap();
        fs::write(real.join("device"), format!("0x{device:04x}\n")).unwrap();
        fs::write(real.join("class"), format!("0x{class:06x}\n")).unwrap();
        fs::write(real.join("driver_override"), "(null)\n").unwrap();
        symlink(&real, self.sys().join("bus/pci/devices").join(bdf)).unwrap();
        if let Some(g) = group {
            let gdir = self.sys().join("kernel/iommu_groups").join(g.to_string());
            fs::create_dir_all(gdir.join("devices")).unwrap();
            symlink(&real, gdir.join("devices").join(bdf)).unwrap();
            symlink(
                format!("../../../kernel/iommu_groups/{g}"),
                real.join("iommu_group"),
            )
            .unwrap();
        }
    }

    /// Binds a device to `driver` (symlink only), and for vfio-pci adds `vfio-dev/vfioN`.
    pub fn set_driver(&self, bdf: &str, driver: Option<&str>, vfio_index: Option<u32>) {
        let real = self.sys().join("devices/pci0000:00").join(bdf);
        let _ = fs::remove_file(real.join("driver"));
        let _ = fs::remove_dir_all(real.join("vfio-dev"));
        if let Some(d) = driver {
            let ddir = self.sys().join("bus/pci/drivers").join(d);
            fs::create_dir_all(&ddir).unwrap();
            symlink(&ddir, real.join("driver")).unwrap();
        }
        if let Some(n) = vfio_index {
            let node = real.join("vfio-dev").join(format!("vfio{n}"));
            fs::create_dir_all(&node).unwrap();
            // The device number: present only on kernels with CONFIG_VFIO_DEVICE_CDEV.
            fs::write(node.join("dev"), format!("511:{n}\n")).unwrap();
        }
    }

    /// As a kernel without `CONFIG_VFIO_DEVICE_CDEV` (Debian's) shows a vfio-pci device:
    /// `vfio-dev/vfioN` is registered, without a device number.
    pub fn remove_cdev_number(&self, bdf: &str) {
        let real = self.sys().join("devices/pci0000:00").join(bdf);
        for e in fs::read_dir(real.join("vfio-dev")).unwrap().flatten() {
            let _ = fs::remove_file(e.path().join("dev"));
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl Drop for FakeSysfs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

pub(crate) fn touch(p: &Path) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, "").unwrap();
}
