//! A minimal driver for QEMU's `edu` device (docs/specs/edu.rst): find it, hand it to
//! vfio-pci, and make it copy one page between RAM (by IOVA) and its own 4 KiB buffer.

use std::time::{Duration, Instant};

use vfio_gmem::vfio::{BarMapping, Bdf, Binder, Device, PciSysfs};

pub const VENDOR: u16 = 0x1234;
pub const DEVICE: u16 = 0x11e8;

/// BAR0 registers.
const REG_ID: usize = 0x00; // reads 0x010000ed
const REG_DMA_SRC: usize = 0x80;
const REG_DMA_DST: usize = 0x88;
const REG_DMA_COUNT: usize = 0x90;
const REG_DMA_CMD: usize = 0x98;
/// DMA command bits: start (reads 1 while busy), direction (1 = device buffer → RAM).
const CMD_START: u64 = 1 << 0;
const CMD_TO_RAM: u64 = 1 << 1;
/// The device-side address of edu's buffer.
const DEVICE_BUF: u64 = 0x40000;
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

/// An edu device attached to an IOMMU context.
pub struct Edu {
    bar0: BarMapping,
}

impl Edu {
    /// Turns on bus mastering and maps BAR0. Call after the device is attached.
    pub fn new(dev: &Device) -> Result<Edu, String> {
        dev.enable_bus_master()
            .map_err(|e| format!("enabling bus mastering: {e}"))?;
        let bar0 = dev.map_bar(0).map_err(|e| format!("mapping BAR0: {e}"))?;
        let id = bar0.read_u32(REG_ID);
        if id & 0xff != 0xed {
            return Err(format!("BAR0 id register reads {id:#x}, not edu's"));
        }
        Ok(Edu { bar0 })
    }

    /// RAM at `iova` → the device buffer (one page).
    pub fn read_ram(&self, iova: u64) -> Result<(), String> {
        self.dma(iova, DEVICE_BUF, 0)
    }

    /// The device buffer → RAM at `iova` (one page).
    pub fn write_ram(&self, iova: u64) -> Result<(), String> {
        self.dma(DEVICE_BUF, iova, CMD_TO_RAM)
    }

    /// Starts a transfer and polls until the device is idle. The device reports
    /// completion even when the IOMMU refused the access; callers check memory.
    fn dma(&self, src: u64, dst: u64, dir: u64) -> Result<(), String> {
        self.bar0.write_u64(REG_DMA_SRC, src);
        self.bar0.write_u64(REG_DMA_DST, dst);
        self.bar0.write_u64(REG_DMA_COUNT, PAGE);
        self.bar0.write_u64(REG_DMA_CMD, CMD_START | dir);
        let t0 = Instant::now();
        while self.bar0.read_u64(REG_DMA_CMD) & CMD_START != 0 {
            if t0.elapsed() > Duration::from_secs(20) {
                return Err("edu DMA did not finish within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
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
