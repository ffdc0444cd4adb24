//! QEMU's `edu` device (QEMU's docs/specs/edu.rst) as a [`DmaEngine`]: a 4 KiB buffer at
//! device address [`BUF`], a DMA engine programmed through BAR0 (source, destination,
//! count, command) that polls to completion, and an optional MSI on completion.
//!
//! The register offsets are public for register-level tests of the VFIO layer (BAR
//! access, interrupts, reset), which use [`Edu::bar0`].

use std::borrow::Borrow;
use std::time::{Duration, Instant};

use super::{name_of, BoxedEngine, DmaEngine, Driver, EngineError};
use crate::vfio::{BarMapping, Device, EventFd, IrqKind};

/// PCI vendor id.
pub const VENDOR: u16 = 0x1234;
/// PCI device id.
pub const DEVICE: u16 = 0x11e8;
/// Device-side address of the 4 KiB DMA buffer.
pub const BUF: u64 = 0x40000;
/// Size of the DMA buffer: the largest transfer.
pub const BUF_LEN: u64 = 4096;

/// Identification register: `0xRRrr00ed` (major, minor revision); the low byte is `0xed`.
pub const REG_ID: usize = 0x00;
/// Liveness register: reads back the bitwise inverse of what was written.
pub const REG_LIVENESS: usize = 0x04;
/// Interrupt status register (read).
pub const REG_IRQ_STATUS: usize = 0x24;
/// Interrupt raise register (write: sets these status bits and raises the interrupt).
pub const REG_IRQ_RAISE: usize = 0x60;
/// Interrupt acknowledge register (write: clears these status bits).
pub const REG_IRQ_ACK: usize = 0x64;
const REG_DMA_SRC: usize = 0x80;
const REG_DMA_DST: usize = 0x88;
const REG_DMA_CNT: usize = 0x90;
const REG_DMA_CMD: usize = 0x98;
/// Command bits: start (reads 1 while busy), direction (set: buffer → RAM), raise an
/// interrupt on completion.
const CMD_START: u64 = 1 << 0;
const CMD_TO_RAM: u64 = 1 << 1;
const CMD_IRQ: u64 = 1 << 2;
/// The interrupt status bit edu sets for a finished DMA.
pub const IRQ_DMA: u32 = 0x100;
/// How long a transfer may run before [`EngineError::Timeout`] (TCG is slow; a page
/// takes milliseconds).
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The edu row of [`super::DRIVERS`].
pub const DRIVER: Driver = Driver {
    name: "edu",
    ids: &[(VENDOR, DEVICE)],
    open_owned: open::<Device>,
    open_borrowed: open_ref,
};

fn open<D: Borrow<Device> + Send + 'static>(dev: D) -> Result<BoxedEngine<'static>, EngineError> {
    Ok(Box::new(Edu::new(dev)?))
}

fn open_ref(dev: &Device) -> Result<BoxedEngine<'_>, EngineError> {
    Ok(Box::new(Edu::new(dev)?))
}

/// An edu device attached to an IOMMU context, owned (`Edu<Device>`, the default) or
/// borrowed (`Edu<&Device>`).
pub struct Edu<D: Borrow<Device> = Device> {
    dev: D,
    bar0: BarMapping,
    msi: Option<EventFd>,
}

impl<D: Borrow<Device>> Edu<D> {
    /// Enables bus mastering, maps BAR0 and checks the identification register. The
    /// device must already be attached to its IOMMU context.
    pub fn new(dev: D) -> Result<Self, EngineError> {
        let bar0 = init(dev.borrow())?;
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

    fn stop_msi(&mut self) {
        if self.msi.take().is_some() {
            let _ = self.dev.borrow().disable_irq(IrqKind::Msi);
        }
    }

    fn vfio(&self, op: &'static str) -> impl FnOnce(crate::vfio::VfioError) -> EngineError {
        let device = name_of(&self.dev);
        move |source| EngineError::Vfio { device, op, source }
    }

    fn transfer(&self, src: u64, dst: u64, len: u64, to_ram: bool) -> Result<(), EngineError> {
        if len == 0 || len > BUF_LEN {
            return Err(EngineError::BadLength {
                engine: "edu",
                len,
                max: BUF_LEN,
            });
        }
        self.bar0.write_u64(REG_DMA_SRC, src);
        self.bar0.write_u64(REG_DMA_DST, dst);
        self.bar0.write_u64(REG_DMA_CNT, len);
        let irq = if self.msi.is_some() { CMD_IRQ } else { 0 };
        let dir = if to_ram { CMD_TO_RAM } else { 0 };
        self.bar0.write_u64(REG_DMA_CMD, CMD_START | dir | irq);
        let t0 = Instant::now();
        while self.bar0.read_u64(REG_DMA_CMD) & CMD_START != 0 {
            if t0.elapsed() > TIMEOUT {
                return Err(EngineError::Timeout {
                    device: name_of(&self.dev),
                    after: TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

/// Bus mastering on, BAR0 mapped, identity checked.
fn init(dev: &Device) -> Result<BarMapping, EngineError> {
    let vfio = |op| {
        move |source| EngineError::Vfio {
            device: dev.name().to_string(),
            op,
            source,
        }
    };
    dev.enable_bus_master()
        .map_err(vfio("enabling bus mastering"))?;
    let bar0 = dev.map_bar(0).map_err(vfio("mapping BAR0"))?;
    let id = bar0.read_u32(REG_ID);
    if id & 0xff != 0xed {
        return Err(EngineError::NotThisDevice {
            device: dev.name().to_string(),
            engine: "edu",
            what: format!("BAR0 identification register reads {id:#x}"),
        });
    }
    Ok(bar0)
}

impl<D: Borrow<Device>> DmaEngine for Edu<D> {
    fn name(&self) -> &'static str {
        "edu"
    }

    fn max_transfer(&self) -> u64 {
        BUF_LEN
    }

    fn device(&self) -> &Device {
        self.dev.borrow()
    }

    fn dma_from_ram(&self, iova: u64, len: u64) -> Result<(), EngineError> {
        self.transfer(iova, BUF, len, false)
    }

    fn dma_to_ram(&self, iova: u64, len: u64) -> Result<(), EngineError> {
        self.transfer(BUF, iova, len, true)
    }

    fn enable_completion_msi(&mut self) -> Result<(), EngineError> {
        let dev = self.dev.borrow();
        let info = dev.irq_info(IrqKind::Msi).map_err(self.vfio("MSI info"))?;
        if info.count == 0 || !info.eventfd() {
            return Err(EngineError::Unsupported {
                device: dev.name().to_string(),
                what: format!("edu offers no MSI vector: {info:?}"),
            });
        }
        let ev = EventFd::new().map_err(|source| EngineError::EventFd {
            device: dev.name().to_string(),
            source,
        })?;
        dev.enable_irq(IrqKind::Msi, 0, &[&ev])
            .map_err(self.vfio("enabling MSI"))?;
        self.msi = Some(ev);
        Ok(())
    }

    fn wait_completion_msi(&self, timeout: Duration) -> Result<bool, EngineError> {
        let device = || name_of(&self.dev);
        let ev = self.msi.as_ref().ok_or_else(|| EngineError::Unsupported {
            device: device(),
            what: "completion interrupts are not enabled".into(),
        })?;
        let fired = ev
            .wait_timeout(timeout)
            .map_err(|source| EngineError::EventFd {
                device: device(),
                source,
            })?
            .is_some();
        let status = self.bar0.read_u32(REG_IRQ_STATUS);
        if status != 0 {
            self.bar0.write_u32(REG_IRQ_ACK, status);
        }
        Ok(fired)
    }

    fn reset(&mut self) -> Result<(), EngineError> {
        self.stop_msi();
        self.dev
            .borrow()
            .reset()
            .map_err(self.vfio("resetting the device"))?;
        self.bar0 = init(self.dev.borrow())?;
        Ok(())
    }
}

impl<D: Borrow<Device>> Drop for Edu<D> {
    fn drop(&mut self) {
        self.stop_msi();
    }
}
