//! `vfio-gmem list`: PCI devices, their drivers and IOMMU groups, and whether each can be
//! assigned now (and if not, what to do).

use anyhow::Context;
use serde::Serialize;
use vfio_gmem::vfio::{PciDevice, PciSysfs, Readiness};

use crate::table::Table;

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
    pub ready: bool,
    /// Why not ready, and what to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
}

pub fn rows(sysfs: &PciSysfs) -> anyhow::Result<Vec<Row>> {
    let devices = sysfs
        .devices()
        .context("listing PCI devices (is sysfs mounted at /sys?)")?;
    let mut out = Vec::new();
    for d in &devices {
        let members: Vec<String> = match d.iommu_group {
            Some(g) => sysfs
                .group_members(g)
                .with_context(|| format!("IOMMU group {g} of {}", d.bdf))?
                .iter()
                .filter(|m| m.bdf != d.bdf)
                .map(|m| m.bdf.to_string())
                .collect(),
            None => Vec::new(),
        };
        let readiness = sysfs
            .readiness(d.bdf)
            .with_context(|| format!("readiness of {}", d.bdf))?;
        out.push(row(d, members, readiness));
    }
    Ok(out)
}

fn row(d: &PciDevice, group_members: Vec<String>, readiness: Readiness) -> Row {
    let (ready, not_ready) = match readiness {
        Readiness::Ready { .. } => (true, None),
        Readiness::NotReady(why) => (false, Some(why.to_string())),
    };
    Row {
        bdf: d.bdf.to_string(),
        vendor: format!("{:04x}", d.vendor),
        device: format!("{:04x}", d.device),
        class: format!("{:06x}", d.class),
        driver: d.driver.clone(),
        iommu_group: d.iommu_group,
        group_members,
        vfio_cdev: d.vfio_cdev.as_ref().map(|p| p.display().to_string()),
        ready,
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
        "READY",
    ]);
    for r in rows {
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
            match &r.not_ready {
                None => "yes".into(),
                Some(why) => format!("no: {why}"),
            },
        ]);
    }
    t.render()
}

pub fn run(json: bool) -> anyhow::Result<()> {
    let rows = rows(&PciSysfs::new())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render(&rows));
    }
    Ok(())
}
