//! The edu device (QEMU docs/specs/edu.rst) as a [`DmaEngine`], driven through the
//! library's [`Device`]: BAR0 registers, DMA in both directions, MSI on completion.

use std::io;
use std::time::{Duration, Instant};

use vfio_gmem::vfio::{BarMapping, Device, EventFd, IrqKind, PciDevice};

use super::dma_engine::{DmaEngine, EngineDriver};

pub const VENDOR: u16 = 0x1234;
pub const DEVICE: u16 = 0x11e8;
/// Device-side address of edu's 4 KiB DMA buffer.
pub const BUF: u64 = 0x40000;
pub const BUF_LEN: u64 = 4096;

pub const REG_ID: usize = 0x00;
pub const REG_LIVENESS: usize = 0x04;
pub const REG_IRQ_STATUS: usize = 0x24;
pub const REG_IRQ_ACK: usize = 0x64;
const REG_DMA_SRC: usize = 0x80;
const REG_DMA_DST: usize = 0x88;
const REG_DMA_CNT: usize = 0x90;
const REG_DMA_CMD: usize = 0x98;
const CMD_START: u64 = 1 << 0;
const CMD_TO_RAM: u64 = 1 << 1;
const CMD_IRQ: u64 = 1 << 2;
/// The interrupt status bit edu sets for a finished DMA.
pub const IRQ_DMA: u32 = 0x100;

pub const DRIVER: EngineDriver = EngineDriver {
    name: "edu",
    matches: |d: &PciDevice| d.vendor == VENDOR && d.device == DEVICE,
    open: |dev| Ok(Box::new(Edu::new(dev)?)),
};

/// An edu device whose VFIO fd is bound and attached to an IOMMU context.
pub struct Edu {
    dev: Device,
    bar0: BarMapping,
    msi: Option<EventFd>,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Edu {
    /// Enables bus mastering, maps BAR0 and checks the id register.
    pub fn new(dev: Device) -> io::Result<Edu> {
        dev.enable_bus_master().map_err(other)?;
        let bar0 = dev.map_bar(0).map_err(other)?;
        let id = bar0.read_u32(REG_ID);
        if id & 0xff != 0xed {
            return Err(other(format!(
                "{}: BAR0 id reads {id:#x}, not an edu device",
                dev.name()
            )));
        }
        Ok(Edu {
            dev,
            bar0,
            msi: None,
        })
    }

    /// BAR0, for register-level tests.
    pub fn bar0(&self) -> &BarMapping {
        &self.bar0
    }

    fn dma(&self, src: u64, dst: u64, len: u64, to_ram: bool) -> io::Result<()> {
        if len == 0 || len > BUF_LEN {
            return Err(other(format!("edu DMA length {len} not in 1..={BUF_LEN}")));
        }
        self.bar0.write_u64(REG_DMA_SRC, src);
        self.bar0.write_u64(REG_DMA_DST, dst);
        self.bar0.write_u64(REG_DMA_CNT, len);
        let irq = if self.msi.is_some() { CMD_IRQ } else { 0 };
        let dir = if to_ram { CMD_TO_RAM } else { 0 };
        self.bar0.write_u64(REG_DMA_CMD, CMD_START | dir | irq);
        let t0 = Instant::now();
        while self.bar0.read_u64(REG_DMA_CMD) & CMD_START != 0 {
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(other("edu DMA did not complete in 20 s"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl DmaEngine for Edu {
    fn name(&self) -> &'static str {
        "edu"
    }
    fn max_transfer(&self) -> u64 {
        BUF_LEN
    }
    fn device(&self) -> &Device {
        &self.dev
    }
    fn dma_from_ram(&self, iova: u64, len: u64) -> io::Result<()> {
        self.dma(iova, BUF, len, false)
    }
    fn dma_to_ram(&self, iova: u64, len: u64) -> io::Result<()> {
        self.dma(BUF, iova, len, true)
    }
    fn enable_completion_msi(&mut self) -> io::Result<()> {
        let info = self.dev.irq_info(IrqKind::Msi).map_err(other)?;
        if info.count == 0 || !info.eventfd() {
            return Err(other(format!("edu offers no MSI vector: {info:?}")));
        }
        let ev = EventFd::new()?;
        self.dev
            .enable_irq(IrqKind::Msi, 0, &[&ev])
            .map_err(other)?;
        self.msi = Some(ev);
        Ok(())
    }
    fn wait_completion_msi(&self, timeout: Duration) -> io::Result<bool> {
        let ev = self.msi.as_ref().ok_or_else(|| other("MSI not enabled"))?;
        let fired = ev.wait_timeout(timeout)?.is_some();
        let status = self.bar0.read_u32(REG_IRQ_STATUS);
        if status != 0 {
            self.bar0.write_u32(REG_IRQ_ACK, status);
        }
        Ok(fired)
    }
}

impl Drop for Edu {
    fn drop(&mut self) {
        if self.msi.is_some() {
            let _ = self.dev.disable_irq(IrqKind::Msi);
        }
    }
}
