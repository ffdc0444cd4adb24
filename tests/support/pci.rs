//! Guest-side PCI helpers for tests: find edu devices and bind them to vfio-pci.

use std::fs;
use std::path::{Path, PathBuf};

pub const EDU_VENDOR: u16 = 0x1234;
pub const EDU_DEVICE: u16 = 0x11e8;

fn read_hex(path: PathBuf) -> Option<u16> {
    let s = fs::read_to_string(path).ok()?;
    u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// BDFs of every edu device, sorted.
pub fn edu_devices() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/bus/pci/devices") {
        for e in rd.flatten() {
            let p = e.path();
            if read_hex(p.join("vendor")) == Some(EDU_VENDOR)
                && read_hex(p.join("device")) == Some(EDU_DEVICE)
            {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// The driver a device is bound to, if any.
pub fn driver(bdf: &str) -> Option<String> {
    let link = fs::read_link(format!("/sys/bus/pci/devices/{bdf}/driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Binds `bdf` to vfio-pci through driver_override (test-only; the library has its own).
pub fn bind_vfio_pci(bdf: &str) -> std::io::Result<()> {
    if driver(bdf).as_deref() == Some("vfio-pci") {
        return Ok(());
    }
    let dev = Path::new("/sys/bus/pci/devices").join(bdf);
    if driver(bdf).is_some() {
        fs::write(dev.join("driver/unbind"), bdf)?;
    }
    fs::write(dev.join("driver_override"), "vfio-pci")?;
    fs::write("/sys/bus/pci/drivers_probe", bdf)?;
    match driver(bdf).as_deref() {
        Some("vfio-pci") => Ok(()),
        other => Err(std::io::Error::other(format!(
            "{bdf} bound to {other:?} after probe, not vfio-pci"
        ))),
    }
}

/// The VFIO cdev node of a vfio-pci bound device (`/dev/vfio/devices/vfioN`).
pub fn vfio_cdev(bdf: &str) -> std::io::Result<PathBuf> {
    let dir = Path::new("/sys/bus/pci/devices").join(bdf).join("vfio-dev");
    if let Some(e) = fs::read_dir(&dir)?.next() {
        return Ok(Path::new("/dev/vfio/devices").join(e?.file_name()));
    }
    Err(std::io::Error::other(format!("{} is empty", dir.display())))
}

/// Count of IOMMU fault lines in the kernel log (DMAR faults or virtio-iommu faults).
pub fn iommu_fault_count() -> usize {
    let out = std::process::Command::new("dmesg")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| {
            l.contains("DMAR: [DMA")
                || l.contains("DMAR: DRHD: handling fault")
                || l.contains("virtio_iommu") && l.contains("fault")
        })
        .count()
}

/// What a refused command must leave alone: every PCI device's driver and
/// driver_override, and the binder's record of previous drivers.
#[derive(Debug, PartialEq, Eq)]
pub struct BindingSnapshot {
    pub devices: Vec<(String, Option<String>, String)>,
    pub records: String,
}

pub fn bindings() -> BindingSnapshot {
    let mut devices: Vec<(String, Option<String>, String)> = fs::read_dir("/sys/bus/pci/devices")
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let bdf = e.file_name().to_string_lossy().into_owned();
                    let over = fs::read_to_string(e.path().join("driver_override"))
                        .unwrap_or_default()
                        .trim()
                        .to_string();
                    let drv = driver(&bdf);
                    (bdf, drv, over)
                })
                .collect()
        })
        .unwrap_or_default();
    devices.sort();
    BindingSnapshot {
        devices,
        records: fs::read_to_string(vfio_gmem::vfio::bind::DEFAULT_STATE_FILE).unwrap_or_default(),
    }
}

/// The differences between two snapshots, for messages.
pub fn binding_diff(a: &BindingSnapshot, b: &BindingSnapshot) -> String {
    let mut out: Vec<String> = a
        .devices
        .iter()
        .zip(&b.devices)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| format!("{x:?} → {y:?}"))
        .collect();
    if a.devices.len() != b.devices.len() {
        out.push(format!("{} → {} devices", a.devices.len(), b.devices.len()));
    }
    if a.records != b.records {
        out.push(format!("records {:?} → {:?}", a.records, b.records));
    }
    out.join("; ")
}
