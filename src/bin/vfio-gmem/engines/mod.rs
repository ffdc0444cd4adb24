//! DMA engines: devices `selftest` knows how to make read and write RAM by IOVA, so that
//! what the IOMMU lets through can be proven with real DMA. One trait, one small driver
//! per device model, chosen by PCI vendor/device id.

mod edu;

use std::io;

use vfio_gmem::vfio::{Device, PciDevice};

/// A device that copies between its own buffer and RAM addressed by IOVA.
pub trait DmaEngine {
    /// The model's name.
    fn name(&self) -> &'static str;
    /// The largest transfer, in bytes.
    fn max_transfer(&self) -> u64;
    /// RAM at `iova` → the device's buffer. Returns once the device reports completion,
    /// which it also does when the IOMMU refused the access.
    fn dma_from_ram(&self, iova: u64, len: u64) -> io::Result<()>;
    /// The device's buffer → RAM at `iova`.
    fn dma_to_ram(&self, iova: u64, len: u64) -> io::Result<()>;
}

/// How to recognise and start one engine.
pub struct EngineDriver {
    pub name: &'static str,
    /// `vendor:device` for messages.
    pub id: &'static str,
    pub matches: fn(&PciDevice) -> bool,
    /// Takes a device already attached to its IOMMU context; enables bus mastering,
    /// maps what it needs and checks it is the expected device.
    pub open: fn(&Device) -> io::Result<Box<dyn DmaEngine>>,
}

/// Every engine the CLI knows.
pub const ENGINES: &[EngineDriver] = &[edu::DRIVER];

/// The engine driver for a PCI device, if any.
pub fn driver_for(dev: &PciDevice) -> Option<&'static EngineDriver> {
    ENGINES.iter().find(|d| (d.matches)(dev))
}

/// `edu (1234:11e8)`, ... for messages.
pub fn known() -> String {
    ENGINES
        .iter()
        .map(|e| format!("{} ({})", e.name, e.id))
        .collect::<Vec<_>>()
        .join(", ")
}
