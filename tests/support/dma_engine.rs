//! DMA engines for tests: small drivers that make a device read and write memory through
//! the IOMMU on request, so tests can prove what a mapping lets through. One trait, one
//! implementation per device model (edu today; e.g. QEMU's igb could be added), picked by
//! PCI vendor/device id from [`ENGINES`].

use std::io;
use std::time::Duration;

use vfio_gmem::vfio::{Device, PciDevice};

/// A device that copies between its own memory and RAM addressed by IOVA.
pub trait DmaEngine {
    /// The engine's name (for messages).
    fn name(&self) -> &'static str;
    /// The largest single transfer, in bytes.
    fn max_transfer(&self) -> u64;
    /// The underlying VFIO device.
    fn device(&self) -> &Device;
    /// RAM at `iova` → the device's memory. Returns when the device reports completion
    /// (which it does even if the IOMMU refused the reads).
    fn dma_from_ram(&self, iova: u64, len: u64) -> io::Result<()>;
    /// The device's memory → RAM at `iova`.
    fn dma_to_ram(&self, iova: u64, len: u64) -> io::Result<()>;
    /// Copies RAM to RAM through the device's memory.
    fn copy(&self, src_iova: u64, dst_iova: u64, len: u64) -> io::Result<()> {
        self.dma_from_ram(src_iova, len)?;
        self.dma_to_ram(dst_iova, len)
    }
    /// Routes the completion interrupt to an eventfd (MSI), so that the next transfers
    /// signal it; `Unsupported` if the engine cannot.
    fn enable_completion_msi(&mut self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{}: no completion interrupt", self.name()),
        ))
    }
    /// Waits for one completion interrupt, acknowledges it on the device, and returns
    /// true; false on timeout.
    fn wait_completion_msi(&self, _timeout: Duration) -> io::Result<bool> {
        Ok(false)
    }
}

/// How to recognise and start one engine.
pub struct EngineDriver {
    pub name: &'static str,
    pub matches: fn(&PciDevice) -> bool,
    /// Takes a device already bound to its IOMMU context (attached), enables bus
    /// mastering, maps what it needs and checks it is the expected device.
    pub open: fn(Device) -> io::Result<Box<dyn DmaEngine>>,
}

/// Every engine tests know about.
pub const ENGINES: &[EngineDriver] = &[super::edu::DRIVER];

/// The engine driver for a PCI device, if any.
pub fn driver_for(dev: &PciDevice) -> Option<&'static EngineDriver> {
    ENGINES.iter().find(|d| (d.matches)(dev))
}
