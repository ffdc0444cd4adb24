//! `vfio-gmem bind [--force] BDF...` / `unbind BDF...`: whole IOMMU groups to vfio-pci
//! and back, through the library's [`Binder`] (which records previous drivers for unbind
//! and refuses devices the host uses; `--force` overrides all but the root filesystem's).

use std::collections::BTreeSet;

use anyhow::Context;
use serde::Serialize;
use vfio_gmem::vfio::bind::check_host_uses;
use vfio_gmem::vfio::host::HostUse;
use vfio_gmem::vfio::{Bdf, BindOptions, BindPlan, Binder, MemberAction, PciSysfs, VfioError};

use crate::errors::require_root;
use crate::table::Table;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct MemberRow {
    pub bdf: String,
    pub group: Option<u32>,
    /// `moved`, `already-vfio`, `left`, `restored`, `nothing-to-do`.
    pub action: &'static str,
    /// The driver before (bind) or the recorded previous driver (unbind).
    pub before: Option<String>,
    pub now: Option<String>,
    /// Host uses of this member that `--force` overrode (bind only).
    pub overridden: Vec<HostUse>,
}

/// Checks every device and plans every group before touching anything. Refuses a bridge
/// (never assignable), a group whose members the host uses (mounts, swap, interfaces
/// carrying traffic, the console; `force` overrides all but the root filesystem's device),
/// and a group member not named on the command line that is bound to a host driver: bind
/// moves whole groups, and taking a device from its driver silently is never right.
pub fn plan_all(
    sysfs: &PciSysfs,
    binder: &Binder,
    devices: &[Bdf],
    opts: BindOptions,
) -> anyhow::Result<Vec<(Bdf, BindPlan)>> {
    let named: BTreeSet<Bdf> = devices.iter().copied().collect();
    let mut seen = BTreeSet::new();
    let mut plans = Vec::new();
    for &bdf in devices {
        sysfs.device(bdf)?;
    }
    let inv = binder
        .host()
        .inventory()
        .map_err(|source| VfioError::HostInspection {
            bdf: devices[0],
            source,
        })
        .context("cannot bind")?;
    for &bdf in devices {
        let plan = binder
            .plan_with(bdf, &inv)
            .with_context(|| format!("cannot bind {bdf}"))?;
        if !seen.insert(plan.group) {
            continue;
        }
        check_host_uses(bdf, &plan, opts)?;
        let others: Vec<(Bdf, String)> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                MemberAction::Rebind {
                    bdf: m,
                    from: Some(d),
                    ..
                } if !named.contains(m) => Some((*m, d.clone())),
                _ => None,
            })
            .collect();
        if !others.is_empty() {
            let list: Vec<String> = others
                .iter()
                .map(|(m, d)| format!("{m} (bound to '{d}')"))
                .collect();
            let mut all: Vec<String> = named.iter().map(Bdf::to_string).collect();
            all.extend(others.iter().map(|(m, _)| m.to_string()));
            anyhow::bail!(
                "IOMMU group {} of {bdf} is not viable for VFIO while {} keeps its driver; \
                 binding moves the whole group to vfio-pci, so name every member that has a \
                 driver to confirm: `vfio-gmem bind {}`",
                plan.group,
                list.join(", "),
                all.join(" ")
            );
        }
        plans.push((bdf, plan));
    }
    Ok(plans)
}

/// Binds the planned groups; returns one row per group member.
pub fn bind_with(
    sysfs: &PciSysfs,
    binder: &Binder,
    devices: &[Bdf],
    opts: BindOptions,
) -> anyhow::Result<Vec<MemberRow>> {
    let plans = plan_all(sysfs, binder, devices, opts)?;
    let mut rows = Vec::new();
    for (bdf, plan) in plans {
        // The binder checks the host again under its lock: what it overrides is final.
        let done = binder.bind_with(bdf, opts).map_err(|e| {
            let refused = matches!(e, VfioError::HostInUse { .. });
            let e = anyhow::Error::from(e);
            if refused {
                e
            } else {
                e.context(format!(
                    "binding IOMMU group {} (of {bdf}) to vfio-pci failed; members already moved were given back",
                    plan.group
                ))
            }
        })?;
        for a in &plan.actions {
            let (m, action, before) = match a {
                MemberAction::AlreadyVfio { bdf } => (*bdf, "already-vfio", None),
                MemberAction::Leave { bdf, driver } => (*bdf, "left", driver.clone()),
                MemberAction::Rebind { bdf, from, .. } => (*bdf, "moved", from.clone()),
            };
            let now = sysfs.device(m).ok().and_then(|d| d.driver);
            rows.push(MemberRow {
                bdf: m.to_string(),
                group: Some(plan.group),
                action,
                before,
                now,
                overridden: done
                    .host_uses
                    .iter()
                    .filter(|u| u.device == m)
                    .cloned()
                    .collect(),
            });
        }
    }
    Ok(rows)
}

/// Unbinds each device's group (what `bind` moved); one row per member given back.
pub fn unbind_with(
    sysfs: &PciSysfs,
    binder: &Binder,
    devices: &[Bdf],
) -> anyhow::Result<Vec<MemberRow>> {
    for &bdf in devices {
        sysfs.device(bdf)?;
    }
    let mut rows = Vec::new();
    for &bdf in devices {
        let group = sysfs.device(bdf)?.iommu_group;
        let restored = binder
            .unbind(bdf)
            .with_context(|| format!("cannot unbind {bdf}"))?;
        if restored.is_empty() && !rows.iter().any(|r: &MemberRow| r.bdf == bdf.to_string()) {
            rows.push(MemberRow {
                bdf: bdf.to_string(),
                group,
                action: "nothing-to-do",
                before: None,
                now: sysfs.device(bdf)?.driver,
                overridden: Vec::new(),
            });
        }
        for r in restored {
            rows.push(MemberRow {
                bdf: r.bdf.to_string(),
                group,
                action: "restored",
                before: r.previous,
                now: r.now,
                overridden: Vec::new(),
            });
        }
    }
    Ok(rows)
}

pub fn render(rows: &[MemberRow], unbind: bool) -> String {
    let mut t = Table::new([
        "BDF",
        "GROUP",
        "ACTION",
        if unbind { "RECORDED" } else { "BEFORE" },
        "NOW",
    ]);
    let drv = |d: &Option<String>| d.clone().unwrap_or_else(|| "(none)".into());
    for r in rows {
        t.row([
            r.bdf.clone(),
            r.group.map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
            r.action.to_string(),
            drv(&r.before),
            drv(&r.now),
        ]);
    }
    t.render()
}

fn print(rows: &[MemberRow], unbind: bool, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else {
        print!("{}", render(rows, unbind));
    }
    Ok(())
}

pub fn run_bind(devices: &[Bdf], force: bool, json: bool) -> anyhow::Result<()> {
    require_root("bind", "it changes driver bindings in sysfs")?;
    let rows = bind_with(
        &PciSysfs::new(),
        &Binder::new(),
        devices,
        BindOptions { force },
    )?;
    for u in rows.iter().flat_map(|r| &r.overridden) {
        eprintln!("vfio-gmem: warning: --force overrode a host use: {u}");
    }
    print(&rows, false, json)
}

pub fn run_unbind(devices: &[Bdf], json: bool) -> anyhow::Result<()> {
    require_root("unbind", "it changes driver bindings in sysfs")?;
    let rows = unbind_with(&PciSysfs::new(), &Binder::new(), devices)?;
    print(&rows, true, json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    /// A throwaway sysfs tree with the kernel's layout (directories and symlinks).
    struct Fake(PathBuf);

    impl Fake {
        fn new(tag: &str) -> Fake {
            let root =
                std::env::temp_dir().join(format!("vfio-gmem-cli-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            for d in [
                "sys/bus/pci/devices",
                "sys/bus/pci/drivers",
                "sys/kernel/iommu_groups",
                "dev/vfio",
            ] {
                fs::create_dir_all(root.join(d)).unwrap();
            }
            Fake(root)
        }
        fn sysfs(&self) -> PciSysfs {
            PciSysfs::with_roots(self.0.join("sys"), self.0.join("dev"))
        }
        fn binder(&self) -> Binder {
            Binder::with(self.sysfs(), self.0.join("state"))
        }
        fn device(&self, bdf: &str, class: u32, group: u32, driver: Option<&str>) {
            let sys = self.0.join("sys");
            let dir = sys.join("devices/pci0000:00").join(bdf);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("vendor"), "0x8086\n").unwrap();
            fs::write(dir.join("device"), "0x10d3\n").unwrap();
            fs::write(dir.join("class"), format!("0x{class:06x}\n")).unwrap();
            symlink(&dir, sys.join("bus/pci/devices").join(bdf)).unwrap();
            let g = sys.join("kernel/iommu_groups").join(group.to_string());
            fs::create_dir_all(g.join("devices")).unwrap();
            symlink(&dir, g.join("devices").join(bdf)).unwrap();
            symlink(&g, dir.join("iommu_group")).unwrap();
            if let Some(d) = driver {
                let ddir = sys.join("bus/pci/drivers").join(d);
                fs::create_dir_all(&ddir).unwrap();
                symlink(&ddir, dir.join("driver")).unwrap();
            }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    const NO: BindOptions = BindOptions { force: false };

    #[test]
    fn refuses_a_group_whose_other_member_has_a_driver() {
        let f = Fake::new("sibling");
        f.device("0000:01:00.0", 0x020000, 7, Some("e1000e"));
        f.device("0000:01:00.1", 0x040300, 7, None);
        let e = plan_all(&f.sysfs(), &f.binder(), &[bdf("0000:01:00.1")], NO)
            .unwrap_err()
            .to_string();
        assert!(e.contains("IOMMU group 7"), "{e}");
        assert!(e.contains("0000:01:00.0 (bound to 'e1000e')"), "{e}");
        assert!(
            e.contains("`vfio-gmem bind 0000:01:00.1 0000:01:00.0`"),
            "{e}"
        );
        // Naming both confirms the move.
        let plans = plan_all(
            &f.sysfs(),
            &f.binder(),
            &[bdf("0000:01:00.1"), bdf("0000:01:00.0")],
            NO,
        )
        .unwrap();
        assert_eq!(plans.len(), 1, "one plan per group");
    }

    #[test]
    fn refuses_a_group_held_by_a_bridge_driver() {
        let f = Fake::new("bridge");
        f.device("0000:00:1c.0", 0x060400, 5, Some("shpchp"));
        f.device("0000:02:00.0", 0x020000, 5, None);
        let e = format!(
            "{:#}",
            plan_all(&f.sysfs(), &f.binder(), &[bdf("0000:02:00.0")], NO).unwrap_err()
        );
        assert!(e.contains("cannot bind 0000:02:00.0"), "{e}");
        assert!(e.contains("IOMMU group 5 cannot be assigned"), "{e}");
        assert!(e.contains("bridge 0000:00:1c.0 is bound to shpchp"), "{e}");
        assert!(e.contains("bind never moves a bridge"), "{e}");
        assert!(!e.contains("vfio-gmem bind 0000:00:1c.0"), "{e}");
    }

    #[test]
    fn unknown_device_says_how_to_list() {
        let f = Fake::new("unknown");
        let e = format!(
            "{:#}",
            plan_all(&f.sysfs(), &f.binder(), &[bdf("0000:09:00.0")], NO).unwrap_err()
        );
        assert!(e.contains("no PCI device 0000:09:00.0"), "{e}");
        assert!(e.contains("vfio-gmem list"), "{e}");
        let e = format!(
            "{:#}",
            unbind_with(&f.sysfs(), &f.binder(), &[bdf("0000:09:00.0")]).unwrap_err()
        );
        assert!(e.contains("no PCI device 0000:09:00.0"), "{e}");
    }

    #[test]
    fn renders_rows() {
        let rows = [MemberRow {
            bdf: "0000:00:03.0".into(),
            group: Some(3),
            action: "moved",
            before: None,
            now: Some("vfio-pci".into()),
            overridden: Vec::new(),
        }];
        let r = render(&rows, false);
        assert!(r.starts_with("BDF "), "{r}");
        assert!(
            r.contains("0000:00:03.0  3      moved   (none)  vfio-pci"),
            "{r}"
        );
    }
}
