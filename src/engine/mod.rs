//! DMA engines: small drivers that make an assigned device read and write RAM by IOVA on
//! request, so that what the IOMMU lets through can be *proven* with real DMA rather than
//! inferred from the mapping calls' return values.
//!
//! **Advanced tier.** A VMM does not need this module to pass devices through; it is the
//! library's home for the device drivers that its tests, the CLI's `selftest` and the
//! examples use, in the style of the kernel VFIO selftests' `lib/drivers/`: one operations
//! trait ([`DmaEngine`]), one plugin per device model (today [`edu`], QEMU's educational
//! device), chosen by one table ([`DRIVERS`]: PCI vendor/device → driver). A VMM may use it
//! for a start-up check of its own DMA space on a device it knows.
//!
//! Adding a device model: a module implementing [`DmaEngine`] and a [`Driver`] row in
//! [`DRIVERS`]; nothing else names device models.
//!
//! The raw oracle the tests check the library against (`tests/support/edu_raw.rs`) is
//! deliberately *not* built on this module: it drives the same device with its own raw
//! ioctls, so that a bug here or in [`crate::vfio`] cannot hide itself.
//!
//! # What the operations prove
//!
//! An engine reports that a transfer **completed** when the device says it is done. On
//! the devices modelled here that is *not* proof that the IOMMU let the accesses through:
//! a transfer whose reads or writes the IOMMU refused completes just the same (the
//! refusal shows up, at most, as a rate-limited IOMMU fault line in the kernel log). What
//! a transfer proves is read from memory afterwards:
//!
//! - a round trip ([`DmaEngine::dma_from_ram`] of a fresh pattern, RAM cleared,
//!   [`DmaEngine::dma_to_ram`]) that brings the pattern back proves that the device could
//!   read *and* write the range;
//! - a [`DmaEngine::dma_to_ram`] of a device buffer holding data that differs from RAM,
//!   after which RAM is unchanged, proves that the write was refused.
//!
//! A **timeout** ([`EngineError::Timeout`]) means the device did not report completion in
//! time: the transfer may still land later, the engine's state is unknown, and it must be
//! [reset](DmaEngine::reset) or dropped before it is trusted again.

// Every public item says what it promises (issue 13); a new undocumented one fails the build.

pub mod edu;

use std::borrow::Borrow;
use std::time::Duration;

use crate::vfio::{Device, PciDevice, VfioError};

/// Why an engine operation failed. A failed operation started no transfer, except
/// [`EngineError::Timeout`], whose transfer is in an unknown state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A VFIO operation on the device failed (bus mastering, BAR mapping, interrupts,
    /// reset); `op` names it.
    #[error("{device}: {op}: {source}")]
    Vfio {
        /// The device's name (a BDF or a cdev path).
        device: String,
        /// What the engine was doing.
        op: &'static str,
        /// The library's error.
        #[source]
        source: VfioError,
    },
    /// The device does not identify as the model this engine drives.
    #[error("{device}: {what}; this is not a device the {engine} engine drives")]
    NotThisDevice {
        /// The device's name.
        device: String,
        /// The engine's name.
        engine: &'static str,
        /// What was read instead.
        what: String,
    },
    /// A transfer length the engine cannot move in one go; nothing was started.
    #[error("{engine} transfers 1..={max} bytes, not {len}")]
    BadLength {
        /// The engine's name.
        engine: &'static str,
        /// The length asked for.
        len: u64,
        /// [`DmaEngine::max_transfer`].
        max: u64,
    },
    /// The device did not report completion within `after`. The transfer may still
    /// land; reset the engine ([`DmaEngine::reset`]) or drop it.
    #[error("{device}: DMA still running after {after:?}")]
    Timeout {
        /// The device's name.
        device: String,
        /// How long the engine waited.
        after: Duration,
    },
    /// The engine or device cannot do this (e.g. no MSI vector, or interrupts not
    /// enabled before waiting for one).
    #[error("{device}: {what}")]
    Unsupported {
        /// The device's name.
        device: String,
        /// What is missing.
        what: String,
    },
    /// An eventfd operation failed.
    #[error("{device}: eventfd: {source}")]
    EventFd {
        /// The device's name.
        device: String,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

/// A device that copies between its own memory and RAM addressed by IOVA.
///
/// Every operation needs the device attached to an IOMMU context (an iommufd IOAS or
/// HWPT, or a legacy container); IOVAs are addresses in that context. Transfers are
/// synchronous: an operation returns when the device reports completion (see the
/// [module documentation](self) for what completion proves).
pub trait DmaEngine {
    /// The model's name, as in [`Driver::name`].
    fn name(&self) -> &'static str;

    /// The largest single transfer in bytes; longer ones are refused with
    /// [`EngineError::BadLength`] before anything is started.
    fn max_transfer(&self) -> u64;

    /// The VFIO device the engine drives (for device-level operations: info, detach,
    /// interrupts the engine does not use).
    fn device(&self) -> &Device;

    /// RAM at `[iova, iova + len)` → the device's memory. Returns once the device reports
    /// completion, which it also does when the IOMMU refused the reads; what the device's
    /// memory then holds is unspecified.
    fn dma_from_ram(&self, iova: u64, len: u64) -> Result<(), EngineError>;

    /// The device's memory → RAM at `[iova, iova + len)`. Returns once the device reports
    /// completion, which it also does when the IOMMU refused the writes: RAM left
    /// unchanged is how a refusal shows.
    fn dma_to_ram(&self, iova: u64, len: u64) -> Result<(), EngineError>;

    /// RAM → RAM through the device's memory: [`DmaEngine::dma_from_ram`] of `src_iova`,
    /// then [`DmaEngine::dma_to_ram`] of `dst_iova`, with their guarantees.
    fn copy(&self, src_iova: u64, dst_iova: u64, len: u64) -> Result<(), EngineError> {
        self.dma_from_ram(src_iova, len)?;
        self.dma_to_ram(dst_iova, len)
    }

    /// Routes the completion interrupt to an eventfd (MSI), so that each later transfer
    /// signals it. [`EngineError::Unsupported`] if the engine or device cannot.
    fn enable_completion_msi(&mut self) -> Result<(), EngineError> {
        Err(EngineError::Unsupported {
            device: self.device().name().to_string(),
            what: format!("the {} engine has no completion interrupt", self.name()),
        })
    }

    /// Waits up to `timeout` for one completion interrupt, acknowledges it on the device
    /// (whether or not it arrived in time) and returns whether it fired.
    /// [`EngineError::Unsupported`] unless [`DmaEngine::enable_completion_msi`] succeeded.
    fn wait_completion_msi(&self, timeout: Duration) -> Result<bool, EngineError> {
        let _ = timeout;
        Err(EngineError::Unsupported {
            device: self.device().name().to_string(),
            what: "completion interrupts are not enabled".into(),
        })
    }

    /// Resets the device (`VFIO_DEVICE_RESET`) and brings the engine back to the state
    /// [`Driver::open`] left it in: bus mastering on, identity checked, interrupts off
    /// (enable them again if needed). The way back after [`EngineError::Timeout`]. The
    /// device's memory is not preserved. Mappings in the IOMMU context are untouched.
    ///
    /// A device without a reset method (see [`DeviceInfo::can_reset`]) fails with
    /// [`EngineError::Vfio`] naming it; the engine then stays as it was, except that
    /// interrupts are off.
    ///
    /// [`DeviceInfo::can_reset`]: crate::vfio::DeviceInfo::can_reset
    fn reset(&mut self) -> Result<(), EngineError>;
}

/// A [`DmaEngine`] that owns or borrows its device; `'d` is the borrow's lifetime
/// (`'static` for an owned device).
pub type BoxedEngine<'d> = Box<dyn DmaEngine + Send + 'd>;

/// One row of [`DRIVERS`]: how to recognise and start one engine.
#[derive(Debug)]
pub struct Driver {
    /// The model's name (`edu`).
    pub name: &'static str,
    /// The PCI `(vendor, device)` ids this driver takes.
    pub ids: &'static [(u16, u16)],
    open_owned: fn(Device) -> Result<BoxedEngine<'static>, EngineError>,
    open_borrowed: for<'d> fn(&'d Device) -> Result<BoxedEngine<'d>, EngineError>,
}

impl Driver {
    /// Whether this driver takes the PCI device with these ids.
    pub fn matches(&self, vendor: u16, device: u16) -> bool {
        self.ids.contains(&(vendor, device))
    }

    /// `vendor:device` ids as `lspci -n` prints them (`1234:11e8`), comma-separated.
    pub fn ids_string(&self) -> String {
        self.ids
            .iter()
            .map(|(v, d)| format!("{v:04x}:{d:04x}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Starts the engine on `dev`, which it then owns. The device must already be
    /// attached to its IOMMU context; the driver enables bus mastering, maps what it
    /// needs and checks the device's identity ([`EngineError::NotThisDevice`]).
    pub fn open(&self, dev: Device) -> Result<BoxedEngine<'static>, EngineError> {
        (self.open_owned)(dev)
    }

    /// [`Driver::open`] on a device the caller keeps (to detach it later, say).
    pub fn open_borrowed<'d>(&self, dev: &'d Device) -> Result<BoxedEngine<'d>, EngineError> {
        (self.open_borrowed)(dev)
    }
}

/// Every engine the library knows: the one table that maps PCI ids to drivers.
pub const DRIVERS: &[Driver] = &[edu::DRIVER];

/// The driver for a PCI device, if any ([`DRIVERS`] by vendor/device id).
pub fn driver_for(dev: &PciDevice) -> Option<&'static Driver> {
    driver_for_ids(dev.vendor, dev.device)
}

/// The driver for PCI ids `(vendor, device)`, if any.
pub fn driver_for_ids(vendor: u16, device: u16) -> Option<&'static Driver> {
    DRIVERS.iter().find(|d| d.matches(vendor, device))
}

/// `edu (1234:11e8)`, ...: the known engines, for messages.
pub fn known() -> String {
    DRIVERS
        .iter()
        .map(|d| format!("{} ({})", d.name, d.ids_string()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The device's name, however the engine holds it (owned or borrowed: one implementation
/// serves both).
fn name_of<D: Borrow<Device>>(dev: &D) -> String {
    dev.borrow().name().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_maps_ids_to_drivers() {
        let d = driver_for_ids(edu::VENDOR, edu::DEVICE).expect("edu is in the table");
        assert_eq!(d.name, "edu");
        assert_eq!(d.ids_string(), "1234:11e8");
        assert!(driver_for_ids(edu::VENDOR, 0x11e9).is_none());
        assert!(driver_for_ids(0x8086, edu::DEVICE).is_none());
        assert_eq!(known(), "edu (1234:11e8)");
        // One row per id: the table never has two drivers for one device.
        for (i, a) in DRIVERS.iter().enumerate() {
            for b in &DRIVERS[i + 1..] {
                assert!(
                    a.ids.iter().all(|id| !b.ids.contains(id)),
                    "{} and {} share an id",
                    a.name,
                    b.name
                );
            }
        }
    }

    #[test]
    fn opening_a_non_vfio_fd_fails_without_panicking() {
        // /dev/null is no VFIO device: the config-space access for bus mastering fails
        // and the error names the step.
        let f = std::fs::File::open("/dev/null").unwrap();
        let dev = Device::from_fd(f.into(), "null");
        let e = DRIVERS[0]
            .open(dev)
            .err()
            .expect("opening /dev/null as edu");
        assert!(
            matches!(
                e,
                EngineError::Vfio {
                    op: "enabling bus mastering",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string().starts_with("null: enabling bus mastering: "),
            "{e}"
        );
    }
}
