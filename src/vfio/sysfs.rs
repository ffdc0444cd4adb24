//! PCI discovery from sysfs: devices, drivers, IOMMU groups, VFIO nodes, and whether a
//! device is ready to be assigned.
//!
//! Every path is built from a configurable sysfs root (default `/sys`) and dev root
//! (default `/dev`), so the logic runs unchanged on a fake tree in tests.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::error::{Result, VfioError};
use super::host::Nature;
use super::Bdf;

/// Drivers that may own a group member without making the group unusable for VFIO: they
/// do not do DMA on their own (the kernel marks them `driver_managed_dma`).
pub const BENIGN_DRIVERS: &[&str] = &["pcieport", "pci-stub"];

/// The vfio-pci driver's name in sysfs.
pub const VFIO_PCI: &str = "vfio-pci";

/// True for vfio-pci and its variant drivers (e.g. `mlx5_vfio_pci`).
///
/// ```
/// use vfio_gmem::vfio::sysfs::is_vfio_driver;
/// assert!(is_vfio_driver("vfio-pci"));
/// assert!(is_vfio_driver("mlx5_vfio_pci"));
/// assert!(!is_vfio_driver("e1000e"));
/// ```
pub fn is_vfio_driver(name: &str) -> bool {
    name == VFIO_PCI || name.ends_with("_vfio_pci") || name.ends_with("-vfio-pci")
}

/// A view of PCI devices in a sysfs tree.
///
/// ```no_run
/// use vfio_gmem::vfio::PciSysfs;
/// for dev in PciSysfs::new().devices()? {
///     println!("{} {:04x}:{:04x} {:?}", dev.bdf, dev.vendor, dev.device, dev.driver);
/// }
/// # Ok::<(), vfio_gmem::vfio::VfioError>(())
/// ```
#[derive(Clone, Debug)]
pub struct PciSysfs {
    sys: PathBuf,
    dev: PathBuf,
}

impl Default for PciSysfs {
    fn default() -> Self {
        Self::new()
    }
}

/// What sysfs says about one PCI device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDevice {
    /// Its PCI address.
    pub bdf: Bdf,
    /// PCI vendor id.
    pub vendor: u16,
    /// PCI device id.
    pub device: u16,
    /// 24-bit class code (base class, subclass, prog-if).
    pub class: u32,
    /// Bound driver, if any.
    pub driver: Option<String>,
    /// `driver_override`, if set.
    pub driver_override: Option<String>,
    /// Its IOMMU group number; `None` without an IOMMU.
    pub iommu_group: Option<u32>,
    /// `/dev/vfio/devices/vfioN` when bound to a VFIO driver on a cdev-capable kernel.
    pub vfio_cdev: Option<PathBuf>,
}

impl PciDevice {
    /// True if the driver is vfio-pci or a vfio-pci variant.
    pub fn is_vfio_bound(&self) -> bool {
        self.driver.as_deref().is_some_and(is_vfio_driver)
    }
    /// True if this member leaves its group viable: VFIO-bound, unbound, or benign.
    pub fn is_viable_member(&self) -> bool {
        match self.driver.as_deref() {
            None => true,
            Some(d) => is_vfio_driver(d) || BENIGN_DRIVERS.contains(&d),
        }
    }
    /// True for a PCI-to-PCI bridge (class 0x0604); bridges stay with their driver.
    pub fn is_bridge(&self) -> bool {
        self.class >> 8 == 0x0604
    }
    /// What the device is by nature; only endpoints are ever moved to vfio-pci.
    pub fn nature(&self) -> Nature {
        Nature::of_class(self.class)
    }
}

/// Whether an IOMMU group can be used by VFIO as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Viability {
    /// No member is bound to a driver that does its own DMA: VFIO accepts the group.
    Viable,
    /// The first member (in BDF order) bound to a driver that does its own DMA.
    NotViable {
        /// The member.
        member: Bdf,
        /// Its driver.
        driver: String,
    },
}

/// Whether a device can be opened through VFIO now, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The device can be opened now.
    Ready {
        /// Its IOMMU group.
        group: u32,
        /// The cdev node, if the kernel has VFIO cdev support.
        cdev: Option<PathBuf>,
        /// The legacy group node `/dev/vfio/<group>`, if present.
        group_node: Option<PathBuf>,
    },
    /// Why it cannot be opened now.
    NotReady(NotReady),
}

/// Why a device is not ready to assign.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// The device is not an endpoint VFIO can assign.
    #[error("{bdf} is {}: not assignable by nature; it stays with the host", .nature.with_article())]
    NotAssignable {
        /// The device.
        bdf: Bdf,
        /// What it is.
        nature: Nature,
    },
    /// The device has no IOMMU group.
    #[error("no IOMMU group (IOMMU off or absent: boot with intel_iommu=on / amd_iommu=on)")]
    NoIommuGroup,
    /// The device is not bound to vfio-pci.
    #[error("{}; run `vfio-gmem bind {bdf}`", match .driver { Some(d) => format!("bound to {d}, not vfio-pci"), None => "not bound to any driver".to_string() })]
    NotBound {
        /// The device.
        bdf: Bdf,
        /// Its driver now (`None`: unbound).
        driver: Option<String>,
    },
    /// A member of its group is bound to a driver that does its own DMA.
    #[error("IOMMU group {group} is not viable: member {member} is bound to {driver}; run `vfio-gmem bind {member}` or unbind it")]
    GroupNotViable {
        /// The IOMMU group.
        group: u32,
        /// The member.
        member: Bdf,
        /// Its driver.
        driver: String,
    },
    /// Bound to vfio-pci, but the kernel offers no VFIO node for it.
    #[error("bound to vfio-pci but neither /dev/vfio/devices/vfioN nor /dev/vfio/{group} exists (kernel without VFIO cdev and group support?)")]
    NoVfioNode {
        /// The IOMMU group.
        group: u32,
    },
}

impl PciSysfs {
    /// The live system: `/sys` and `/dev`.
    pub fn new() -> Self {
        Self::with_roots("/sys", "/dev")
    }

    /// A tree rooted elsewhere (tests): `<sys>/bus/pci/devices/...`, `<dev>/vfio/...`.
    ///
    /// ```
    /// use vfio_gmem::vfio::PciSysfs;
    /// let fake = PciSysfs::with_roots("/tmp/fake/sys", "/tmp/fake/dev");
    /// assert!(fake.device_dir("0000:00:03.0".parse().unwrap()).starts_with("/tmp/fake/sys"));
    /// ```
    pub fn with_roots(sys: impl Into<PathBuf>, dev: impl Into<PathBuf>) -> Self {
        PciSysfs {
            sys: sys.into(),
            dev: dev.into(),
        }
    }

    /// The sysfs root.
    pub fn sys_root(&self) -> &Path {
        &self.sys
    }

    /// `<sys>/bus/pci/devices/<bdf>`.
    pub fn device_dir(&self, bdf: Bdf) -> PathBuf {
        self.sys.join("bus/pci/devices").join(bdf.to_string())
    }

    /// `<sys>/bus/pci/drivers/<name>`.
    pub fn driver_dir(&self, name: &str) -> PathBuf {
        self.sys.join("bus/pci/drivers").join(name)
    }

    /// `<sys>/bus/pci/drivers_probe`.
    pub fn drivers_probe(&self) -> PathBuf {
        self.sys.join("bus/pci/drivers_probe")
    }

    /// `<dev>/vfio/<group>`: the legacy group node.
    pub fn group_node(&self, group: u32) -> PathBuf {
        self.dev.join("vfio").join(group.to_string())
    }

    /// `<dev>/vfio/vfio`: the legacy container node.
    pub fn container_node(&self) -> PathBuf {
        self.dev.join("vfio/vfio")
    }

    /// Every PCI device, sorted by address.
    pub fn devices(&self) -> Result<Vec<PciDevice>> {
        let dir = self.sys.join("bus/pci/devices");
        self.devices_in(&dir)
    }

    /// One device; [`VfioError::NoSuchDevice`] if sysfs has no such address.
    ///
    /// ```no_run
    /// use vfio_gmem::vfio::PciSysfs;
    /// let d = PciSysfs::new().device("0000:00:03.0".parse()?)?;
    /// println!("group {:?}, driver {:?}", d.iommu_group, d.driver);
    /// # Ok::<(), vfio_gmem::vfio::VfioError>(())
    /// ```
    pub fn device(&self, bdf: Bdf) -> Result<PciDevice> {
        let dir = self.device_dir(bdf);
        if !dir.exists() {
            return Err(VfioError::NoSuchDevice { bdf, path: dir });
        }
        let hex = |name: &str| -> Result<u32> {
            let p = dir.join(name);
            let s = fs::read_to_string(&p).map_err(|e| VfioError::sysfs(&p, e))?;
            u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).map_err(|_| {
                VfioError::sysfs(&p, io::Error::other(format!("not hex: {:?}", s.trim())))
            })
        };
        let driver_override = fs::read_to_string(dir.join("driver_override"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s != "(null)");
        Ok(PciDevice {
            bdf,
            vendor: hex("vendor")? as u16,
            device: hex("device")? as u16,
            class: hex("class")?,
            driver: link_name(&dir.join("driver")),
            driver_override,
            iommu_group: link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok()),
            vfio_cdev: self.cdev_of(&dir),
        })
    }

    /// The VFIO cdev of a device: `vfio-dev/vfioN` with a device number (`dev`). Kernels
    /// without `CONFIG_VFIO_DEVICE_CDEV` (Debian's) register `vfioN` too, with no `dev` and
    /// no node in /dev.
    fn cdev_of(&self, dir: &Path) -> Option<PathBuf> {
        let rd = fs::read_dir(dir.join("vfio-dev")).ok()?;
        let mut names: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().join("dev").exists())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.starts_with("vfio"))
            .collect();
        names.sort();
        names.first().map(|n| self.dev.join("vfio/devices").join(n))
    }

    /// Members of an IOMMU group, sorted; non-PCI members are skipped.
    pub fn group_members(&self, group: u32) -> Result<Vec<PciDevice>> {
        let dir = self
            .sys
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        self.devices_in(&dir)
    }

    /// The devices named by the entries of `dir` (a directory of BDF links), sorted.
    fn devices_in(&self, dir: &Path) -> Result<Vec<PciDevice>> {
        let rd = fs::read_dir(dir).map_err(|e| VfioError::sysfs(dir, e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| VfioError::sysfs(dir, e))?;
            if let Some(bdf) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(self.device(bdf)?);
            }
        }
        out.sort_by_key(|d| d.bdf);
        Ok(out)
    }

    /// Whether `group` can be used by VFIO as it is now.
    pub fn group_viability(&self, group: u32) -> Result<Viability> {
        Ok(viability_of(&self.group_members(group)?))
    }

    /// Whether `bdf` can be opened through VFIO now, or why not.
    ///
    /// ```no_run
    /// use vfio_gmem::vfio::{PciSysfs, Readiness};
    /// match PciSysfs::new().readiness("0000:00:03.0".parse()?)? {
    ///     Readiness::Ready { cdev, .. } => println!("ready, cdev {cdev:?}"),
    ///     Readiness::NotReady(why) => println!("not ready: {why}"),
    /// }
    /// # Ok::<(), vfio_gmem::vfio::VfioError>(())
    /// ```
    pub fn readiness(&self, bdf: Bdf) -> Result<Readiness> {
        let dev = self.device(bdf)?;
        if !dev.nature().is_endpoint() {
            return Ok(Readiness::NotReady(NotReady::NotAssignable {
                bdf,
                nature: dev.nature(),
            }));
        }
        let Some(group) = dev.iommu_group else {
            return Ok(Readiness::NotReady(NotReady::NoIommuGroup));
        };
        if !dev.is_vfio_bound() {
            return Ok(Readiness::NotReady(NotReady::NotBound {
                bdf,
                driver: dev.driver,
            }));
        }
        if let Viability::NotViable { member, driver } = self.group_viability(group)? {
            return Ok(Readiness::NotReady(NotReady::GroupNotViable {
                group,
                member,
                driver,
            }));
        }
        let group_node = Some(self.group_node(group)).filter(|p| p.exists());
        if dev.vfio_cdev.is_none() && group_node.is_none() {
            return Ok(Readiness::NotReady(NotReady::NoVfioNode { group }));
        }
        Ok(Readiness::Ready {
            group,
            cdev: dev.vfio_cdev,
            group_node,
        })
    }
}

/// The viability rule on a list of members: the first member whose driver does its own DMA
/// makes the group unusable.
pub fn viability_of(members: &[PciDevice]) -> Viability {
    match members.iter().find(|m| !m.is_viable_member()) {
        None => Viability::Viable,
        Some(m) => Viability::NotViable {
            member: m.bdf,
            driver: m.driver.clone().unwrap_or_default(),
        },
    }
}

/// The last component of a symlink's target, if the link exists.
fn link_name(link: &Path) -> Option<String> {
    let target = fs::read_link(link).ok()?;
    Some(target.file_name()?.to_str()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::testing::{touch, FakeSysfs};

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    /// Group 3: edu at 00:03.0 (vfio-pci, vfio0). Group 4: edu at 00:04.0 (unbound).
    /// Group 7: NIC 01:00.0 on e1000e + its audio-like sibling 01:00.1 (vfio-pci) +
    /// a bridge 00:1c.0 on pcieport. 00:1f.0 has no IOMMU group.
    fn tree() -> FakeSysfs {
        let f = FakeSysfs::new("sysfs");
        f.add("0000:00:03.0", 0x1234, 0x11e8, 0x00ff00, Some(3));
        f.set_driver("0000:00:03.0", Some("vfio-pci"), Some(0));
        f.add("0000:00:04.0", 0x1234, 0x11e8, 0x00ff00, Some(4));
        f.add("0000:01:00.0", 0x8086, 0x10d3, 0x020000, Some(7));
        f.set_driver("0000:01:00.0", Some("e1000e"), None);
        f.add("0000:01:00.1", 0x8086, 0x10d4, 0x040300, Some(7));
        f.set_driver("0000:01:00.1", Some("vfio-pci"), Some(1));
        f.add("0000:00:1c.0", 0x8086, 0x2948, 0x060400, Some(7));
        f.set_driver("0000:00:1c.0", Some("pcieport"), None);
        f.add("0000:00:1f.0", 0x8086, 0x2918, 0x060100, None);
        touch(&f.path("dev/vfio/3"));
        f
    }

    #[test]
    fn lists_devices_with_ids_class_driver_group_and_cdev() {
        let f = tree();
        let devs = f.sysfs().devices().unwrap();
        let names: Vec<String> = devs.iter().map(|d| d.bdf.to_string()).collect();
        assert_eq!(
            names,
            [
                "0000:00:03.0",
                "0000:00:04.0",
                "0000:00:1c.0",
                "0000:00:1f.0",
                "0000:01:00.0",
                "0000:01:00.1"
            ]
        );
        let edu = &devs[0];
        assert_eq!(
            (edu.vendor, edu.device, edu.class),
            (0x1234, 0x11e8, 0x00ff00)
        );
        assert_eq!(edu.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(edu.iommu_group, Some(3));
        assert_eq!(edu.vfio_cdev, Some(f.path("dev/vfio/devices/vfio0")));
        assert_eq!(edu.driver_override, None);
        assert!(edu.is_vfio_bound());
        let unbound = &devs[1];
        assert_eq!(
            (unbound.driver.as_deref(), unbound.vfio_cdev.as_ref()),
            (None, None)
        );
        assert!(devs[2].is_bridge());
        assert_eq!(devs[3].iommu_group, None);
        // Without CONFIG_VFIO_DEVICE_CDEV: bound to vfio-pci, no cdev.
        f.remove_cdev_number("0000:00:03.0");
        let edu = f.sysfs().device("0000:00:03.0".parse().unwrap()).unwrap();
        assert!(edu.is_vfio_bound());
        assert_eq!(edu.vfio_cdev, None);
    }

    #[test]
    fn unknown_device_is_a_clear_error() {
        let f = tree();
        let e = f.sysfs().device(bdf("0000:09:00.0")).unwrap_err();
        assert!(matches!(e, VfioError::NoSuchDevice { .. }), "{e}");
        assert!(e.to_string().contains("0000:09:00.0"), "{e}");
    }

    #[test]
    fn group_members_and_viability() {
        let f = tree();
        let s = f.sysfs();
        let members: Vec<String> = s
            .group_members(7)
            .unwrap()
            .iter()
            .map(|d| d.bdf.to_string())
            .collect();
        assert_eq!(members, ["0000:00:1c.0", "0000:01:00.0", "0000:01:00.1"]);
        assert_eq!(s.group_viability(3).unwrap(), Viability::Viable);
        assert_eq!(s.group_viability(4).unwrap(), Viability::Viable);
        assert_eq!(
            s.group_viability(7).unwrap(),
            Viability::NotViable {
                member: bdf("0000:01:00.0"),
                driver: "e1000e".into()
            }
        );
        // pci-stub and pcieport are benign; unbinding the NIC makes group 7 viable.
        f.set_driver("0000:01:00.0", Some("pci-stub"), None);
        assert_eq!(s.group_viability(7).unwrap(), Viability::Viable);
    }

    #[test]
    fn readiness_explains_each_reason() {
        let f = tree();
        let s = f.sysfs();
        match s.readiness(bdf("0000:00:03.0")).unwrap() {
            Readiness::Ready {
                group,
                cdev,
                group_node,
            } => {
                assert_eq!(group, 3);
                assert_eq!(cdev, Some(f.path("dev/vfio/devices/vfio0")));
                assert_eq!(group_node, Some(f.path("dev/vfio/3")));
            }
            r => panic!("{r:?}"),
        }
        let r = s.readiness(bdf("0000:00:04.0")).unwrap();
        let Readiness::NotReady(why) = r else {
            panic!("{r:?}")
        };
        assert!(
            why.to_string().contains("vfio-gmem bind 0000:00:04.0"),
            "{why}"
        );
        let r = s.readiness(bdf("0000:01:00.1")).unwrap();
        let Readiness::NotReady(why) = r else {
            panic!("{r:?}")
        };
        assert!(
            why.to_string().contains("0000:01:00.0 is bound to e1000e"),
            "{why}"
        );
        // The LPC bridge is not assignable by nature; the message suggests no bind.
        let r = s.readiness(bdf("0000:00:1f.0")).unwrap();
        assert_eq!(
            r,
            Readiness::NotReady(NotReady::NotAssignable {
                bdf: bdf("0000:00:1f.0"),
                nature: Nature::IsaBridge
            })
        );
        let Readiness::NotReady(why) = r else {
            unreachable!()
        };
        assert!(!why.to_string().contains("vfio-gmem bind"), "{why}");
        f.add("0000:02:00.0", 0x8086, 0x10d3, 0x020000, None);
        let r = s.readiness(bdf("0000:02:00.0")).unwrap();
        assert_eq!(r, Readiness::NotReady(NotReady::NoIommuGroup));
        // vfio-bound, viable, but no node at all.
        f.set_driver("0000:00:04.0", Some("vfio-pci"), None);
        let r = s.readiness(bdf("0000:00:04.0")).unwrap();
        assert_eq!(r, Readiness::NotReady(NotReady::NoVfioNode { group: 4 }));
    }
}
