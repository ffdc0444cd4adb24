//! QEMU's `edu` device (docs/specs/edu.rst) for the reference VMM: find it and hand it to
//! vfio-pci. The DMA engine that makes it copy pages between RAM (by IOVA) and its own
//! 4 KiB buffer is the library's ([`vfio_gmem::engine::edu`]).

use vfio_gmem::engine::edu::{DEVICE, VENDOR};
use vfio_gmem::vfio::{Bdf, Binder, Device, PciSysfs};

pub const PAGE: u64 = 4096;

/// The first edu device in sysfs, or the one named on the command line.
pub fn find(wanted: Option<Bdf>) -> Result<Bdf, String> {
    let devices = PciSysfs::new()
        .devices()
        .map_err(|e| format!("cannot list PCI devices: {e}"))?;
    let edu: Vec<Bdf> = devices
        .iter()
        .filter(|d| d.vendor == VENDOR && d.device == DEVICE)
        .map(|d| d.bdf)
        .collect();
    match wanted {
        Some(b) if edu.contains(&b) => Ok(b),
        Some(b) => Err(format!(
            "{b} is not an edu device (1234:11e8); edu devices here: {}",
            edu.iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => edu.first().copied().ok_or_else(|| {
            "no edu device (PCI 1234:11e8) found; run inside the test VM \
             (scripts/vm-run -- target/debug/examples/reference_vmm) or add \
             `-device edu,dma_mask=0xffffffffffffffff` to QEMU"
                .to_string()
        }),
    }
}

/// Binds `bdf`'s IOMMU group to vfio-pci (through the library's binder, which records the
/// previous drivers) and opens the device's VFIO cdev.
pub fn open(bdf: Bdf) -> Result<Device, String> {
    Binder::new()
        .bind(bdf)
        .map_err(|e| format!("binding {bdf} to vfio-pci: {e}"))?;
    Device::open_pci(bdf).map_err(|e| format!("opening {bdf}'s VFIO cdev: {e}"))
}

/// IOMMU fault lines in the kernel log so far (intel-iommu DMAR faults, virtio-iommu
/// fault events). Printing is rate limited, so a count is corroboration, not proof.
pub fn iommu_fault_lines() -> usize {
    let out = std::process::Command::new("dmesg")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| {
            l.contains("DMAR: [DMA")
                || l.contains("DMAR: DRHD: handling fault")
                || (l.contains("virtio_iommu") && l.contains("fault"))
        })
        .count()
}
