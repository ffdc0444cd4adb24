//! `vfio-gmem list`: PCI devices, their drivers and IOMMU groups, and what each is for
//! assignment: ready, assignable (and the command that binds it), in use by the host (and
//! what for), not assignable by nature (bridges), or unavailable (and why). It suggests
//! `bind` only for assignable devices.

use anyhow::Context;
use serde::Serialize;
use vfio_gmem::vfio::bind::plan_group;
use vfio_gmem::vfio::host::{HostInspector, HostUse, Inventory, Nature};
use vfio_gmem::vfio::{Bdf, MemberAction, NotReady, PciDevice, PciSysfs, Readiness};

use crate::table::Table;

/// What a device is for assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Bound to vfio-pci in a viable group: `assign` can use it now.
    Ready,
    /// An endpoint nothing on the host depends on: `bind` makes it ready.
    Assignable,
    /// It (or a group member `bind` would move with it) backs something live on the host.
    InUse,
    /// A bridge: never moved (host, ISA/LPC, PCI-to-PCI bridges, root ports).
    NotAssignable,
    /// Cannot be made ready by `bind` as things are (no IOMMU group, a bridge driver
    /// holding the group, no VFIO node).
    Unavailable,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub bdf: String,
    pub vendor: String,
    pub device: String,
    pub class: String,
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// The other members of the IOMMU group.
    pub group_members: Vec<String>,
    pub vfio_cdev: Option<String>,
    /// What the device is by nature (`endpoint`, `host-bridge`, `isa-bridge`, ...).
    pub nature: Nature,
    /// What it is for assignment.
    pub status: Class,
    /// Host uses that make it `in-use`: of the device or of a member bind would move.
    pub host_uses: Vec<HostUse>,
    /// True when `bind --force` would move it anyway (false for the root filesystem's
    /// device); absent unless `in-use`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forceable: Option<bool>,
    /// The command that makes an `assignable` device ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind_command: Option<String>,
    pub ready: bool,
    /// Why not ready, and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
}

pub fn rows(sysfs: &PciSysfs, host: &HostInspector) -> anyhow::Result<Vec<Row>> {
    let devices = sysfs
        .devices()
        .context("listing PCI devices (is sysfs mounted at /sys?)")?;
    let inv = host
        .inventory()
        .context("reading what the host uses its devices for")?;
    let mut out = Vec::new();
    for d in &devices {
        let members = match d.iommu_group {
            Some(g) => sysfs
                .group_members(g)
                .with_context(|| format!("IOMMU group {g} of {}", d.bdf))?,
            None => Vec::new(),
        };
        let readiness = sysfs
            .readiness(d.bdf)
            .with_context(|| format!("readiness of {}", d.bdf))?;
        out.push(row(d, &members, readiness, &inv));
    }
    Ok(out)
}

/// The classification of one device, from its group and the host's uses.
fn classify(
    d: &PciDevice,
    members: &[PciDevice],
    readiness: &Readiness,
    inv: &Inventory,
) -> (Class, Vec<HostUse>, Option<String>, Option<String>) {
    let nature = d.nature();
    if !nature.is_endpoint() {
        let why = format!(
            "{}: not assignable by nature; it stays with the host",
            nature.describe()
        );
        return (Class::NotAssignable, Vec::new(), Some(why), None);
    }
    if matches!(readiness, Readiness::Ready { .. }) {
        return (Class::Ready, Vec::new(), None, None);
    }
    let Some(group) = d.iommu_group else {
        return (
            Class::Unavailable,
            Vec::new(),
            Some(NotReady::NoIommuGroup.to_string()),
            None,
        );
    };
    let plan = match plan_group(group, members) {
        Ok(p) => p,
        Err(e) => return (Class::Unavailable, Vec::new(), Some(e.to_string()), None),
    };
    let uses: Vec<HostUse> = plan.moved().flat_map(|m| inv.uses(m)).collect();
    if !uses.is_empty() {
        let forceable = uses.iter().all(HostUse::overridable);
        let list: Vec<String> = uses
            .iter()
            .map(|u| {
                if u.device == d.bdf {
                    u.what.to_string()
                } else {
                    u.to_string()
                }
            })
            .collect();
        let why = format!(
            "in use by the host: {}; `bind` refuses it{}",
            list.join("; "),
            if forceable {
                " (`--force` overrides)"
            } else {
                ", even with --force (the root filesystem lives on it)"
            }
        );
        return (Class::InUse, uses, Some(why), None);
    }
    if let Readiness::NotReady(NotReady::NoVfioNode { .. }) = readiness {
        return (
            Class::Unavailable,
            Vec::new(),
            Some(readiness_text(readiness)),
            None,
        );
    }
    // Members with a driver that bind would take must be named: bind refuses otherwise.
    let mut named: Vec<Bdf> = vec![d.bdf];
    for a in &plan.actions {
        if let MemberAction::Rebind {
            bdf, from: Some(_), ..
        } = a
        {
            if *bdf != d.bdf {
                named.push(*bdf);
            }
        }
    }
    let cmd = format!(
        "vfio-gmem bind {}",
        named
            .iter()
            .map(Bdf::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let why = match readiness {
        Readiness::NotReady(NotReady::NotBound { driver, .. }) => format!(
            "{}; run `{cmd}`",
            match driver {
                Some(drv) => format!("bound to {drv}, not vfio-pci"),
                None => "not bound to any driver".into(),
            }
        ),
        Readiness::NotReady(NotReady::GroupNotViable { member, driver, .. }) => {
            format!("IOMMU group {group} is not viable: member {member} is bound to {driver}; run `{cmd}`")
        }
        r => format!("{}; run `{cmd}`", readiness_text(r)),
    };
    (Class::Assignable, Vec::new(), Some(why), Some(cmd))
}

fn readiness_text(r: &Readiness) -> String {
    match r {
        Readiness::Ready { .. } => "ready".into(),
        Readiness::NotReady(why) => why.to_string(),
    }
}

fn row(d: &PciDevice, members: &[PciDevice], readiness: Readiness, inv: &Inventory) -> Row {
    let (status, host_uses, not_ready, bind_command) = classify(d, members, &readiness, inv);
    Row {
        bdf: d.bdf.to_string(),
        vendor: format!("{:04x}", d.vendor),
        device: format!("{:04x}", d.device),
        class: format!("{:06x}", d.class),
        driver: d.driver.clone(),
        iommu_group: d.iommu_group,
        group_members: members
            .iter()
            .filter(|m| m.bdf != d.bdf)
            .map(|m| m.bdf.to_string())
            .collect(),
        vfio_cdev: d.vfio_cdev.as_ref().map(|p| p.display().to_string()),
        nature: d.nature(),
        forceable: (status == Class::InUse).then(|| host_uses.iter().all(HostUse::overridable)),
        status,
        host_uses,
        bind_command,
        ready: status == Class::Ready,
        not_ready,
    }
}

pub fn render(rows: &[Row]) -> String {
    let mut t = Table::new([
        "BDF",
        "ID",
        "DRIVER",
        "GROUP",
        "OTHER MEMBERS",
        "VFIO CDEV",
        "STATUS",
    ]);
    for r in rows {
        let status = match r.status {
            Class::Ready => "ready".to_string(),
            Class::Assignable => format!("assignable: {}", r.not_ready.as_deref().unwrap_or("")),
            Class::InUse => r.not_ready.clone().unwrap_or_default(),
            Class::NotAssignable => {
                format!("not assignable: {}", r.not_ready.as_deref().unwrap_or(""))
            }
            Class::Unavailable => format!("unavailable: {}", r.not_ready.as_deref().unwrap_or("")),
        };
        t.row([
            r.bdf.clone(),
            format!("{}:{}", r.vendor, r.device),
            r.driver.clone().unwrap_or_else(|| "-".into()),
            r.iommu_group
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into()),
            if r.group_members.is_empty() {
                "-".into()
            } else {
                r.group_members.join(",")
            },
            r.vfio_cdev.clone().unwrap_or_else(|| "-".into()),
            status,
        ]);
    }
    t.render()
}

pub fn run(json: bool) -> anyhow::Result<()> {
    let rows = rows(&PciSysfs::new(), &HostInspector::new())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render(&rows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_gmem::vfio::host::model::{BlockDev, Mount, Share};

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    fn dev(b: &str, class: u32, driver: Option<&str>, group: Option<u32>) -> PciDevice {
        PciDevice {
            bdf: bdf(b),
            vendor: 0x1af4,
            device: 0x1042,
            class,
            driver: driver.map(str::to_string),
            driver_override: None,
            iommu_group: group,
            vfio_cdev: None,
        }
    }

    fn not_bound(d: &PciDevice) -> Readiness {
        Readiness::NotReady(NotReady::NotBound {
            bdf: d.bdf,
            driver: d.driver.clone(),
        })
    }

    /// vda on 00:04.0 mounted at /mnt; root over 9p from 00:02.0.
    fn inventory() -> Inventory {
        Inventory {
            block: vec![BlockDev {
                name: "vda".into(),
                dev: Some((254, 0)),
                pci: Some(bdf("0000:00:04.0")),
                ..Default::default()
            }],
            mounts: vec![
                Mount {
                    mount_point: "/".into(),
                    fstype: "9p".into(),
                    source: "/dev/root".into(),
                    dev: Some((0, 21)),
                    ..Default::default()
                },
                Mount {
                    mount_point: "/mnt".into(),
                    fstype: "ext2".into(),
                    source: "/dev/vda".into(),
                    dev: Some((254, 0)),
                    ..Default::default()
                },
            ],
            shares: vec![Share {
                fstype: "9p".into(),
                tag: "/dev/root".into(),
                virtio: "virtio0".into(),
                pci: Some(bdf("0000:00:02.0")),
            }],
            ..Default::default()
        }
    }

    fn class_of(
        d: &PciDevice,
        members: &[PciDevice],
    ) -> (Class, Vec<HostUse>, Option<String>, Option<String>) {
        classify(d, members, &not_bound(d), &inventory())
    }

    #[test]
    fn bridges_are_not_assignable_and_get_no_bind_suggestion() {
        for (b, class) in [
            ("0000:00:00.0", 0x060000),
            ("0000:00:1f.0", 0x060100),
            ("0000:00:1c.0", 0x060400),
        ] {
            let d = dev(b, class, None, Some(1));
            let (c, uses, why, cmd) = class_of(&d, std::slice::from_ref(&d));
            assert_eq!((c, uses, cmd), (Class::NotAssignable, vec![], None), "{b}");
            let why = why.unwrap();
            assert!(
                why.contains("not assignable by nature") && !why.contains("vfio-gmem bind"),
                "{why}"
            );
        }
    }

    #[test]
    fn a_device_or_a_member_the_host_uses_is_in_use() {
        let disk = dev("0000:00:04.0", 0x010000, Some("virtio-pci"), Some(4));
        let (c, uses, why, cmd) = class_of(&disk, std::slice::from_ref(&disk));
        assert_eq!((c, uses.len(), cmd), (Class::InUse, 1, None));
        let why = why.unwrap();
        assert!(
            why.starts_with("in use by the host: vda: ext2 mounted at /mnt;"),
            "{why}"
        );
        assert!(
            why.contains("`--force` overrides") && !why.contains("vfio-gmem bind"),
            "{why}"
        );
        // A sibling in the same group: bind would move the disk with it.
        let sib = dev("0000:00:04.1", 0x020000, None, Some(4));
        let (c, _, why, _) = class_of(&sib, &[disk.clone(), sib.clone()]);
        assert_eq!(c, Class::InUse);
        assert!(why
            .unwrap()
            .contains("0000:00:04.0: vda: ext2 mounted at /mnt"));
        // The root filesystem's device: not forceable.
        let root = dev("0000:00:02.0", 0x000200, Some("virtio-pci"), Some(2));
        let (c, uses, why, _) = class_of(&root, std::slice::from_ref(&root));
        assert_eq!(c, Class::InUse);
        assert!(!uses[0].overridable());
        assert!(why.unwrap().contains("even with --force"));
    }

    #[test]
    fn assignable_devices_get_the_bind_command_naming_members_with_drivers() {
        let spare = dev("0000:00:05.0", 0x010000, Some("virtio-pci"), Some(5));
        let other = dev("0000:00:05.1", 0x0c0330, Some("xhci_hcd"), Some(5));
        let bridge = dev("0000:00:1c.0", 0x060400, Some("pcieport"), Some(5));
        let (c, uses, why, cmd) = class_of(&spare, &[spare.clone(), other, bridge]);
        assert_eq!((c, uses), (Class::Assignable, vec![]));
        assert_eq!(
            cmd.as_deref(),
            Some("vfio-gmem bind 0000:00:05.0 0000:00:05.1")
        );
        assert_eq!(
            why.unwrap(),
            "bound to virtio-pci, not vfio-pci; run `vfio-gmem bind 0000:00:05.0 0000:00:05.1`"
        );
        let lone = dev("0000:00:06.0", 0x00ff00, None, None);
        let (c, _, why, cmd) = class_of(&lone, &[]);
        assert_eq!((c, cmd), (Class::Unavailable, None));
        assert!(why.unwrap().contains("no IOMMU group"));
    }
}
