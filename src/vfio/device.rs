//! One VFIO device fd, however it was obtained: opened through its cdev
//! (`/dev/vfio/devices/vfioN`, then bound to an iommufd) or handed out by a legacy group
//! (`VFIO_GROUP_GET_DEVICE_FD`). Region, config space, BAR, IRQ and reset operations are
//! the same for both.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, OnceLock, Weak};

use super::error::{Result, VfioError, NO_IRQ_REMAP_HINT};
use super::irq::{irq_set_buf, EventFd, IrqInfo, IrqKind};
use super::region::{parse_region_caps, BarMapping, RegionInfo};
use super::sysfs::{PciSysfs, Viability};
use super::Bdf;
use crate::iommufd::Iommufd;
use crate::sys::{self, vfio_uapi as vu};

/// PCI command register offset and its memory-space / bus-master bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// What VFIO_DEVICE_GET_INFO reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*` (PCI, reset support, ...); see [`DeviceInfo::is_pci`] and
    /// [`DeviceInfo::can_reset`].
    pub flags: u32,
    /// Number of regions (for vfio-pci: BAR0-5, ROM, config space, then device-specific
    /// ones).
    pub num_regions: u32,
    /// Number of IRQ indexes (INTx, MSI, MSI-X, ERR, REQ for vfio-pci).
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// True if VFIO_DEVICE_RESET is supported (the device has a reset method).
    pub fn can_reset(&self) -> bool {
        self.flags & vu::VFIO_DEVICE_FLAGS_RESET != 0
    }
    /// True for a vfio-pci device.
    pub fn is_pci(&self) -> bool {
        self.flags & vu::VFIO_DEVICE_FLAGS_PCI != 0
    }
}

/// A VFIO device.
///
/// ```no_run
/// use std::os::fd::AsFd;
/// use vfio_gmem::vfio::Device;
/// # fn iommufd() -> std::fs::File { unimplemented!() }
/// # let ioas_id = 1;
/// let iommufd = iommufd(); // /dev/iommu, from the iommufd module
/// let dev = Device::open_pci("0000:00:03.0".parse()?)?;
/// let devid = dev.bind_iommufd(iommufd.as_fd())?;
/// dev.attach(ioas_id)?;
/// dev.enable_bus_master()?;
/// let bar0 = dev.map_bar(0)?;
/// println!("devid {devid}, BAR0[0] = {:#x}", bar0.read_u32(0));
/// # Ok::<(), vfio_gmem::vfio::VfioError>(())
/// ```
#[derive(Debug)]
pub struct Device {
    file: File,
    name: String,
    /// The PCI device and sysfs view, when known: used to explain ambiguous errors.
    pci: Option<(PciSysfs, Bdf)>,
    config_offset: OnceLock<u64>,
    /// The iommufd this fd was bound to by [`Device::bind_to`], and the device id. A
    /// bind lasts until the fd is closed; the `Weak` keeps the `Iommufd` allocation
    /// from being reused, so pointer equality identifies it.
    bound_to: OnceLock<(Weak<Iommufd>, u32)>,
}

impl Device {
    /// Opens a VFIO cdev node (`/dev/vfio/devices/vfioN`). The device is unusable until
    /// [`Device::bind_iommufd`].
    ///
    /// ```no_run
    /// let dev = vfio_gmem::vfio::Device::open_cdev("/dev/vfio/devices/vfio0")?;
    /// # Ok::<(), vfio_gmem::vfio::VfioError>(())
    /// ```
    pub fn open_cdev(path: impl AsRef<Path>) -> Result<Device> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                let hint = match e.raw_os_error() {
                    Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                        ": no such VFIO device; the device is not bound to vfio-pci (run `vfio-gmem bind <bdf>`) or is being unbound"
                    }
                    Some(libc::EACCES) | Some(libc::EPERM) => {
                        ": permission denied; run as root or give this user the device node"
                    }
                    _ => "",
                };
                VfioError::Open {
                    path: path.to_path_buf(),
                    hint,
                    source: e,
                }
            })?;
        let mut dev = Device::from_file(file, path.display().to_string());
        // /sys/class/vfio-dev/vfioN/device links to the PCI device.
        let sysfs = PciSysfs::new();
        dev.pci = path
            .file_name()
            .map(|n| {
                sysfs
                    .sys_root()
                    .join("class/vfio-dev")
                    .join(n)
                    .join("device")
            })
            .and_then(|l| std::fs::read_link(l).ok())
            .and_then(|t| t.file_name()?.to_str()?.parse().ok())
            .map(|bdf| (sysfs, bdf));
        Ok(dev)
    }

    /// Opens the cdev of a PCI device bound to vfio-pci, found through sysfs.
    pub fn open_pci(bdf: Bdf) -> Result<Device> {
        Self::open_pci_in(&PciSysfs::new(), bdf)
    }

    /// [`Device::open_pci`] on another sysfs tree.
    pub fn open_pci_in(sysfs: &PciSysfs, bdf: Bdf) -> Result<Device> {
        let info = sysfs.device(bdf)?;
        if !info.is_vfio_bound() {
            return Err(VfioError::NotBoundToVfio {
                bdf,
                driver: info.driver,
            });
        }
        let Some(cdev) = info.vfio_cdev else {
            return Err(VfioError::Unsupported(format!(
                "{bdf} is bound to vfio-pci but has no VFIO cdev (kernel without CONFIG_VFIO_DEVICE_CDEV / CONFIG_IOMMUFD); use the legacy group path (vfio::Group)"
            )));
        };
        let mut dev = Self::open_cdev(cdev)?;
        dev.name = bdf.to_string();
        dev.pci = Some((sysfs.clone(), bdf));
        Ok(dev)
    }

    /// Adopts a device fd obtained elsewhere (passed by a parent process, or from
    /// `VFIO_GROUP_GET_DEVICE_FD`). `name` is used in error messages.
    pub fn from_fd(fd: OwnedFd, name: impl Into<String>) -> Device {
        Self::from_file(File::from(fd), name.into())
    }

    fn from_file(file: File, name: String) -> Device {
        Device {
            file,
            name,
            pci: None,
            config_offset: OnceLock::new(),
            bound_to: OnceLock::new(),
        }
    }

    /// The name used in messages (a BDF or a node path).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_err(&self, op: &'static str, e: io::Error, hint: &'static str) -> VfioError {
        VfioError::ioctl_hint(op, &self.name, e, hint)
    }

    /// Binds this cdev fd to an iommufd context; returns the device id that iommufd
    /// calls (e.g. IOMMU_HWPT_ALLOC, IOMMU_GET_HW_INFO) take.
    pub fn bind_iommufd(&self, iommufd: BorrowedFd<'_>) -> Result<u32> {
        let mut b: vu::vfio_device_bind_iommufd = sys::zeroed();
        b.argsz = std::mem::size_of_val(&b) as u32;
        b.iommufd = iommufd.as_raw_fd();
        sys::ioctl_mut(self.file.as_fd(), sys::VFIO_DEVICE_BIND_IOMMUFD, &mut b).map_err(
            |e| {
                // EPERM has two causes: another owner of the group's DMA (a member on a
                // kernel driver: a non-viable group), or no interrupt remapping.
                if e.raw_os_error() == Some(libc::EPERM) {
                    if let Some(err) = self.non_viable_group() {
                        return err;
                    }
                }
                let hint = match e.raw_os_error() {
                    Some(libc::EPERM) => NO_IRQ_REMAP_HINT,
                    Some(libc::EINVAL) => ": the device is already bound, through this fd or another open of its cdev (VFIO allows one user per device); close the other user first",
                    Some(libc::EBUSY) => ": the device's IOMMU group is open through /dev/vfio/<group> (a legacy VFIO user); close it first",
                    _ => "",
                };
                self.ioctl_err("VFIO_DEVICE_BIND_IOMMUFD", e, hint)
            },
        )?;
        Ok(b.out_devid)
    }

    /// Binds this cdev fd to `iommufd` ([`Device::bind_iommufd`]) unless this method
    /// already did; returns the device id either way.
    ///
    /// The kernel refuses a second bind of the same fd (EINVAL) and offers no unbind
    /// short of closing it, so a caller whose attach failed after the bind (e.g. on a
    /// transient ENOMEM) could otherwise never attach this fd again.
    ///
    /// ```no_run
    /// # let dev: vfio_gmem::vfio::Device = unimplemented!();
    /// let iommufd = std::sync::Arc::new(vfio_gmem::iommufd::Iommufd::open()?);
    /// let id = dev.bind_to(&iommufd)?;
    /// assert_eq!(dev.bind_to(&iommufd)?, id); // no second VFIO_DEVICE_BIND_IOMMUFD
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn bind_to(&self, iommufd: &Arc<Iommufd>) -> Result<u32> {
        if let Some((bound, id)) = self.bound_to.get() {
            if Weak::ptr_eq(bound, &Arc::downgrade(iommufd)) {
                return Ok(*id);
            }
            // Bound to another iommufd: let the kernel refuse it with its explanation.
        }
        let id = self.bind_iommufd(iommufd.as_fd())?;
        let _ = self.bound_to.set((Arc::downgrade(iommufd), id));
        Ok(id)
    }

    /// The group-not-viable error for this device's group, if sysfs shows one.
    fn non_viable_group(&self) -> Option<VfioError> {
        let (sysfs, bdf) = self.pci.as_ref()?;
        let group = sysfs.device(*bdf).ok()?.iommu_group?;
        match sysfs.group_viability(group).ok()? {
            Viability::NotViable { member, driver } => Some(VfioError::GroupNotViable {
                group,
                member,
                driver,
            }),
            Viability::Viable => None,
        }
    }

    /// Attaches the device to an IOAS or HWPT (`pt_id`); returns the id of the HWPT now
    /// in use (an auto-allocated one when `pt_id` is an IOAS). Calling it again while
    /// attached replaces the page table without a detach (no window without DMA mapping).
    pub fn attach(&self, pt_id: u32) -> Result<u32> {
        let mut a: vu::vfio_device_attach_iommufd_pt = sys::zeroed();
        a.argsz = std::mem::size_of_val(&a) as u32;
        a.pt_id = pt_id;
        sys::ioctl_mut(
            self.file.as_fd(),
            sys::VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            &mut a,
        )
        .map_err(|e| self.ioctl_err("VFIO_DEVICE_ATTACH_IOMMUFD_PT", e, ""))?;
        Ok(a.pt_id)
    }

    /// The device number of the VFIO node behind this fd (`st_rdev`): the same for
    /// every open of one device, different between devices.
    pub(crate) fn node_id(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.rdev())
    }

    /// Detaches from the current IOAS/HWPT: all device DMA is blocked afterwards.
    pub fn detach(&self) -> Result<()> {
        let mut d: vu::vfio_device_detach_iommufd_pt = sys::zeroed();
        d.argsz = std::mem::size_of_val(&d) as u32;
        sys::ioctl_mut(
            self.file.as_fd(),
            sys::VFIO_DEVICE_DETACH_IOMMUFD_PT,
            &mut d,
        )
        .map_err(|e| self.ioctl_err("VFIO_DEVICE_DETACH_IOMMUFD_PT", e, ""))?;
        Ok(())
    }

    /// VFIO_DEVICE_GET_INFO.
    pub fn info(&self) -> Result<DeviceInfo> {
        let mut i: vu::vfio_device_info = sys::zeroed();
        i.argsz = std::mem::size_of_val(&i) as u32;
        sys::ioctl_mut(self.file.as_fd(), sys::VFIO_DEVICE_GET_INFO, &mut i)
            .map_err(|e| self.ioctl_err("VFIO_DEVICE_GET_INFO", e, ""))?;
        Ok(DeviceInfo {
            flags: i.flags,
            num_regions: i.num_regions,
            num_irqs: i.num_irqs,
        })
    }

    /// Region info including its capability chain (sparse mmap areas, type, ...).
    ///
    /// ```no_run
    /// # let dev = vfio_gmem::vfio::Device::open_cdev("/dev/vfio/devices/vfio0")?;
    /// let bar0 = dev.region_info(0)?;
    /// println!("BAR0: {:#x} bytes, mmap areas {:?}", bar0.size, bar0.mmap_areas());
    /// # Ok::<(), vfio_gmem::vfio::VfioError>(())
    /// ```
    pub fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let mut r: vu::vfio_region_info = sys::zeroed();
        let fixed = std::mem::size_of_val(&r) as u32;
        r.argsz = fixed;
        r.index = index;
        sys::ioctl_mut(self.file.as_fd(), sys::VFIO_DEVICE_GET_REGION_INFO, &mut r)
            .map_err(|e| self.ioctl_err("VFIO_DEVICE_GET_REGION_INFO", e, ""))?;
        let mut info = RegionInfo {
            index,
            flags: r.flags,
            size: r.size,
            offset: r.offset,
            caps: Vec::new(),
        };
        // The kernel reports the size a capability chain needs in argsz; ask again with
        // a buffer that large.
        if r.flags & vu::VFIO_REGION_INFO_FLAG_CAPS != 0 && r.argsz > fixed {
            let mut buf = vec![0u8; r.argsz as usize];
            buf[0..4].copy_from_slice(&r.argsz.to_ne_bytes());
            buf[8..12].copy_from_slice(&index.to_ne_bytes());
            sys::ioctl_with_buf(
                self.file.as_fd(),
                sys::VFIO_DEVICE_GET_REGION_INFO,
                &mut buf,
            )
            .map_err(|e| self.ioctl_err("VFIO_DEVICE_GET_REGION_INFO (caps)", e, ""))?;
            let cap_offset = u32::from_ne_bytes(buf[12..16].try_into().unwrap());
            info.caps = parse_region_caps(&buf, cap_offset);
        }
        Ok(info)
    }

    /// Reads `buf.len()` bytes at `offset` inside region `index` through the fd.
    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let base = self.region_info(index)?.offset;
        self.file
            .read_exact_at(buf, base + offset)
            .map_err(|e| self.ioctl_err("region read", e, ""))
    }

    /// Writes `data` at `offset` inside region `index` through the fd.
    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let base = self.region_info(index)?.offset;
        self.file
            .write_all_at(data, base + offset)
            .map_err(|e| self.ioctl_err("region write", e, ""))
    }

    fn config_base(&self) -> Result<u64> {
        if let Some(o) = self.config_offset.get() {
            return Ok(*o);
        }
        let o = self.region_info(vu::VFIO_PCI_CONFIG_REGION_INDEX)?.offset;
        Ok(*self.config_offset.get_or_init(|| o))
    }

    /// Reads PCI config space (VFIO virtualizes parts of it, e.g. BARs and MSI).
    pub fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let base = self.config_base()?;
        self.file
            .read_exact_at(buf, base + offset)
            .map_err(|e| self.ioctl_err("config space read", e, ""))
    }

    /// Writes PCI config space.
    pub fn config_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let base = self.config_base()?;
        self.file
            .write_all_at(data, base + offset)
            .map_err(|e| self.ioctl_err("config space write", e, ""))
    }

    /// Reads a little-endian u16 from config space.
    pub fn config_read_u16(&self, offset: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Reads a little-endian u32 from config space.
    pub fn config_read_u32(&self, offset: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian u16 to config space.
    pub fn config_write_u16(&self, offset: u64, value: u16) -> Result<()> {
        self.config_write(offset, &value.to_le_bytes())
    }

    /// Sets memory-space decoding and bus mastering in the PCI command register; DMA is
    /// impossible without the latter.
    pub fn enable_bus_master(&self) -> Result<()> {
        let cmd = self.config_read_u16(PCI_COMMAND)?;
        self.config_write_u16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
    }

    /// Maps BAR `index` (0..=5), only its sparse-mmap areas when the region has them.
    pub fn map_bar(&self, index: u32) -> Result<BarMapping> {
        let info = self.region_info(index)?;
        let areas = info.mmap_areas();
        if areas.is_empty() {
            return Err(VfioError::Unsupported(format!(
                "{}: region {index} cannot be mmap'd (size {:#x}, flags {:#x}); use region_read/region_write",
                self.name, info.size, info.flags
            )));
        }
        BarMapping::new(self.file.as_fd(), info.offset, info.size, areas)
            .map_err(|e| self.ioctl_err("mmap BAR", e, ""))
    }

    /// What the device offers for one interrupt type.
    pub fn irq_info(&self, kind: IrqKind) -> Result<IrqInfo> {
        let mut i: vu::vfio_irq_info = sys::zeroed();
        i.argsz = std::mem::size_of_val(&i) as u32;
        i.index = kind.index();
        sys::ioctl_mut(self.file.as_fd(), sys::VFIO_DEVICE_GET_IRQ_INFO, &mut i)
            .map_err(|e| self.ioctl_err("VFIO_DEVICE_GET_IRQ_INFO", e, ""))?;
        Ok(IrqInfo {
            index: i.index,
            flags: i.flags,
            count: i.count,
        })
    }

    /// Routes vectors `start..start+fds.len()` of `kind` to eventfds (enabling MSI/MSI-X
    /// on the device as a side effect). Replaces any previous routing of those vectors.
    ///
    /// ```no_run
    /// use vfio_gmem::vfio::{Device, EventFd, IrqKind};
    /// # let dev = Device::open_cdev("/dev/vfio/devices/vfio0")?;
    /// let ev = EventFd::new().unwrap();
    /// dev.enable_irq(IrqKind::Msi, 0, &[&ev])?;
    /// // ... the device raises its interrupt ...
    /// let fired = ev.wait_timeout(std::time::Duration::from_secs(1)).unwrap();
    /// dev.disable_irq(IrqKind::Msi)?;
    /// # Ok::<(), vfio_gmem::vfio::VfioError>(())
    /// ```
    pub fn enable_irq(&self, kind: IrqKind, start: u32, fds: &[&EventFd]) -> Result<()> {
        if fds.is_empty() {
            return Err(VfioError::Unsupported(
                "enable_irq needs at least one eventfd; use disable_irq to turn off".into(),
            ));
        }
        let raw: Vec<i32> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
        let mut buf = irq_set_buf(kind.index(), start, &raw, vu::VFIO_IRQ_SET_ACTION_TRIGGER);
        sys::ioctl_with_buf(self.file.as_fd(), sys::VFIO_DEVICE_SET_IRQS, &mut buf).map_err(
            |e| {
                let hint = match e.raw_os_error() {
                    Some(libc::EINVAL) => ": the device may not have that many vectors of this type (see irq_info), or another interrupt type is enabled (disable it first)",
                    _ => "",
                };
                self.ioctl_err("VFIO_DEVICE_SET_IRQS", e, hint)
            },
        )?;
        Ok(())
    }

    /// Turns off every vector of `kind` and releases the eventfds from the kernel side.
    pub fn disable_irq(&self, kind: IrqKind) -> Result<()> {
        let mut buf = irq_set_buf(kind.index(), 0, &[], vu::VFIO_IRQ_SET_ACTION_TRIGGER);
        sys::ioctl_with_buf(self.file.as_fd(), sys::VFIO_DEVICE_SET_IRQS, &mut buf)
            .map_err(|e| self.ioctl_err("VFIO_DEVICE_SET_IRQS (disable)", e, ""))?;
        Ok(())
    }

    /// Unmasks INTx after handling (VFIO masks a level interrupt when it fires).
    pub fn unmask_intx(&self) -> Result<()> {
        let mut buf = irq_set_buf(
            vu::VFIO_PCI_INTX_IRQ_INDEX,
            0,
            &[],
            vu::VFIO_IRQ_SET_ACTION_UNMASK,
        );
        // Unmask takes count 1 with no data.
        buf[16..20].copy_from_slice(&1u32.to_ne_bytes());
        sys::ioctl_with_buf(self.file.as_fd(), sys::VFIO_DEVICE_SET_IRQS, &mut buf)
            .map_err(|e| self.ioctl_err("VFIO_DEVICE_SET_IRQS (unmask)", e, ""))?;
        Ok(())
    }

    /// Resets the device (function-level or another method the kernel found). Retries
    /// briefly while the kernel reports EAGAIN (a reset lock held elsewhere).
    pub fn reset(&self) -> Result<()> {
        let mut tries = 0;
        loop {
            match sys::ioctl_val(self.file.as_fd(), sys::VFIO_DEVICE_RESET, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    let hint = match e.raw_os_error() {
                        Some(libc::ENOTTY) | Some(libc::EINVAL) => ": the device has no usable reset method (see /sys/bus/pci/devices/<bdf>/reset_method, DeviceInfo::can_reset)",
                        _ => "",
                    };
                    return Err(self.ioctl_err("VFIO_DEVICE_RESET", e, hint));
                }
            }
        }
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
