//! Device interrupts: what a device offers (VFIO_DEVICE_GET_IRQ_INFO) and eventfds that
//! VFIO signals when an interrupt fires (VFIO_DEVICE_SET_IRQS).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::sys::vfio_uapi as vu;

/// A PCI interrupt type, i.e. a VFIO IRQ index of a vfio-pci device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqKind {
    /// Legacy line interrupt (`VFIO_PCI_INTX_IRQ_INDEX`), level-triggered, one vector.
    Intx,
    /// MSI (`VFIO_PCI_MSI_IRQ_INDEX`).
    Msi,
    /// MSI-X (`VFIO_PCI_MSIX_IRQ_INDEX`).
    Msix,
    /// AER error notification.
    Err,
    /// Device release request (the host wants the device back).
    Req,
}

impl IrqKind {
    /// The VFIO IRQ index.
    ///
    /// ```
    /// use vfio_gmem::vfio::IrqKind;
    /// assert_eq!(IrqKind::Msi.index(), 1);
    /// ```
    pub fn index(self) -> u32 {
        match self {
            IrqKind::Intx => vu::VFIO_PCI_INTX_IRQ_INDEX,
            IrqKind::Msi => vu::VFIO_PCI_MSI_IRQ_INDEX,
            IrqKind::Msix => vu::VFIO_PCI_MSIX_IRQ_INDEX,
            IrqKind::Err => vu::VFIO_PCI_ERR_IRQ_INDEX,
            IrqKind::Req => vu::VFIO_PCI_REQ_IRQ_INDEX,
        }
    }
}

/// What a device offers for one IRQ index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// The VFIO IRQ index ([`IrqKind::index`]).
    pub index: u32,
    /// `VFIO_IRQ_INFO_*` flags: see [`IrqInfo::eventfd`] and [`IrqInfo::automasked`].
    pub flags: u32,
    /// Number of vectors (0: the device does not have this interrupt type).
    pub count: u32,
}

impl IrqInfo {
    /// True if VFIO can signal this interrupt through an eventfd.
    pub fn eventfd(&self) -> bool {
        self.flags & vu::VFIO_IRQ_INFO_EVENTFD != 0
    }
    /// True for level interrupts VFIO masks on delivery (INTx): unmask after handling.
    pub fn automasked(&self) -> bool {
        self.flags & vu::VFIO_IRQ_INFO_AUTOMASKED != 0
    }
}

/// An eventfd counter (`eventfd(2)`), non-blocking, close-on-exec.
///
/// ```no_run
/// use vfio_gmem::vfio::EventFd;
/// let ev = EventFd::new()?;
/// ev.signal()?;
/// assert_eq!(ev.wait_timeout(std::time::Duration::from_secs(1))?, Some(1));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct EventFd(File);

impl EventFd {
    /// A new eventfd with count 0.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions; it returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(EventFd(File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Adds 1 to the counter.
    pub fn signal(&self) -> io::Result<()> {
        (&self.0).write_all(&1u64.to_ne_bytes())
    }

    /// Reads and resets the counter; `None` if it is 0.
    pub fn take(&self) -> io::Result<Option<u64>> {
        // An eventfd read is all 8 bytes or EAGAIN (count 0, non-blocking).
        let mut buf = [0u8; 8];
        match (&self.0).read_exact(&mut buf) {
            Ok(()) => Ok(Some(u64::from_ne_bytes(buf))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits up to `timeout` for the counter to become non-zero, then takes it.
    pub fn wait_timeout(&self, timeout: Duration) -> io::Result<Option<u64>> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.take()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Builds a VFIO_DEVICE_SET_IRQS argument: the fixed header followed by `fds` as s32.
/// An empty `fds` with `DATA_NONE` and count 0 disables the whole index.
pub(crate) fn irq_set_buf(index: u32, start: u32, fds: &[i32], action: u32) -> Vec<u8> {
    let header = std::mem::size_of::<vu::vfio_irq_set>();
    let mut buf = vec![0u8; header + 4 * fds.len()];
    let data = if fds.is_empty() {
        vu::VFIO_IRQ_SET_DATA_NONE
    } else {
        vu::VFIO_IRQ_SET_DATA_EVENTFD
    };
    let fields = [
        buf.len() as u32,
        data | action,
        index,
        start,
        fds.len() as u32,
    ];
    for (i, v) in fields.iter().enumerate() {
        buf[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    for (i, fd) in fds.iter().enumerate() {
        buf[header + i * 4..header + i * 4 + 4].copy_from_slice(&fd.to_ne_bytes());
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_set_layout_matches_the_uapi() {
        let b = irq_set_buf(1, 0, &[7, 9], vu::VFIO_IRQ_SET_ACTION_TRIGGER);
        assert_eq!(std::mem::size_of::<vu::vfio_irq_set>(), 20);
        let w = |i: usize| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(
            [w(0), w(1), w(2), w(3), w(4), w(5), w(6)],
            [
                28,
                vu::VFIO_IRQ_SET_DATA_EVENTFD | vu::VFIO_IRQ_SET_ACTION_TRIGGER,
                1,
                0,
                2,
                7,
                9
            ]
        );
        let off = irq_set_buf(2, 0, &[], vu::VFIO_IRQ_SET_ACTION_TRIGGER);
        assert_eq!(off.len(), 20);
    }

    #[test]
    fn eventfd_counts() {
        let e = EventFd::new().unwrap();
        assert_eq!(e.take().unwrap(), None);
        e.signal().unwrap();
        e.signal().unwrap();
        assert_eq!(e.wait_timeout(Duration::from_millis(10)).unwrap(), Some(2));
        assert_eq!(e.wait_timeout(Duration::from_millis(1)).unwrap(), None);
    }
}
