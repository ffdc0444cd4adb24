//! The legacy VFIO user path: a container (`/dev/vfio/vfio`) with the type1v2 IOMMU
//! driver holding the DMA mappings, and groups (`/dev/vfio/<group>`) that hand out device
//! fds. Kernels without iommufd (e.g. Debian's stock kernels) only have this path.
//!
//! Type1 maps by virtual address only and pins every mapped page (counted against
//! RLIMIT_MEMLOCK); it cannot map by fd+offset nor choose IOVAs.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::error::{Result, VfioError, MEMLOCK_HINT, NO_IRQ_REMAP_HINT};
use super::sysfs::{PciSysfs, Viability};
use super::{Bdf, Device};
use crate::mapper::{Access, Backend, DmaMapper, Iova, MapError};
use crate::sys::{self, vfio_uapi as vu};

fn open_node(path: &Path, hint_for: impl Fn(i32) -> &'static str) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| VfioError::Open {
            path: path.to_path_buf(),
            hint: e.raw_os_error().map(&hint_for).unwrap_or(""),
            source: e,
        })
}

/// A VFIO container with the type1v2 IOMMU.
///
/// ```no_run
/// use vfio_gmem::mapper::{Access, DmaMapper, Iova};
/// use vfio_gmem::vfio::{Container, Group};
/// let ram = vfio_gmem::gmem::Memfd::new("guest", 4096)?.mmap()?;
/// let container = Container::open()?;
/// let group = Group::open(3)?;
/// container.add_group(&group)?;
/// let dev = group.device("0000:00:03.0".parse()?)?;
/// // SAFETY: `ram` stays mapped until the container is gone (declared first, dropped last).
/// unsafe { container.map_user(Iova::Fixed(0x1_0000_0000), ram.addr(), 4096, Access::READ_WRITE)? };
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Container {
    file: File,
    /// Set once VFIO_SET_IOMMU succeeded (after the first group joined).
    iommu_set: AtomicBool,
}

impl Container {
    /// Opens `/dev/vfio/vfio` and checks the API version and type1v2 support.
    pub fn open() -> Result<Container> {
        Self::open_at(PciSysfs::new().container_node())
    }

    /// Opens a container node at another path.
    pub fn open_at(path: impl AsRef<Path>) -> Result<Container> {
        let path = path.as_ref();
        let file = open_node(path, |e| {
            match e {
            libc::ENOENT => ": no legacy VFIO container (kernel without CONFIG_VFIO_CONTAINER, or vfio not loaded: modprobe vfio-pci)",
            _ => "",
        }
        })?;
        let c = Container {
            file,
            iommu_set: AtomicBool::new(false),
        };
        let v = c.api_version()?;
        if v != vu::VFIO_API_VERSION as i32 {
            return Err(VfioError::Unsupported(format!(
                "VFIO API version {v}, expected {}",
                vu::VFIO_API_VERSION
            )));
        }
        if !c.check_extension(vu::VFIO_TYPE1v2_IOMMU)? {
            return Err(VfioError::Unsupported(
                "the VFIO container has no type1v2 IOMMU driver (CONFIG_VFIO_IOMMU_TYPE1, or iommufd's compat container without it)".into(),
            ));
        }
        Ok(c)
    }

    /// Takes a container fd another process opened, e.g. one received from
    /// `vfio-gmem helper` ([`crate::handoff`]), with its groups already in it. Checks the
    /// API version; the IOMMU counts as set if `VFIO_IOMMU_GET_INFO` answers.
    ///
    /// ```no_run
    /// use std::os::fd::OwnedFd;
    /// # fn from_helper() -> OwnedFd { unimplemented!() }
    /// let container = vfio_gmem::vfio::Container::from_fd(from_helper())?;
    /// # Ok::<(), vfio_gmem::vfio::VfioError>(())
    /// ```
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Result<Container> {
        let c = Container {
            file: File::from(fd),
            iommu_set: AtomicBool::new(false),
        };
        let v = c.api_version()?;
        if v != vu::VFIO_API_VERSION as i32 {
            return Err(VfioError::Unsupported(format!(
                "VFIO API version {v}, expected {}",
                vu::VFIO_API_VERSION
            )));
        }
        if c.iova_pgsizes().is_ok() {
            c.iommu_set.store(true, Ordering::Release);
        }
        Ok(c)
    }

    /// VFIO_GET_API_VERSION.
    pub fn api_version(&self) -> Result<i32> {
        sys::ioctl_val(self.file.as_fd(), sys::VFIO_GET_API_VERSION, 0)
            .map_err(|e| VfioError::ioctl("VFIO_GET_API_VERSION", "container", e))
    }

    /// VFIO_CHECK_EXTENSION, e.g. `VFIO_TYPE1v2_IOMMU`, `VFIO_UNMAP_ALL`.
    ///
    /// ```no_run
    /// use vfio_bindings::bindings::vfio::VFIO_UNMAP_ALL; // the uAPI constants
    /// let c = vfio_gmem::vfio::Container::open()?;
    /// println!("unmap-all: {}", c.check_extension(VFIO_UNMAP_ALL)?);
    /// # Ok::<(), vfio_gmem::vfio::VfioError>(())
    /// ```
    pub fn check_extension(&self, ext: u32) -> Result<bool> {
        sys::ioctl_val(
            self.file.as_fd(),
            sys::VFIO_CHECK_EXTENSION,
            ext as libc::c_ulong,
        )
        .map(|r| r > 0)
        .map_err(|e| VfioError::ioctl("VFIO_CHECK_EXTENSION", "container", e))
    }

    /// Puts `group` in this container; the first group also selects the type1v2 IOMMU.
    pub fn add_group(&self, group: &Group) -> Result<()> {
        let mut fd: i32 = self.file.as_raw_fd();
        sys::ioctl_mut(group.file.as_fd(), sys::VFIO_GROUP_SET_CONTAINER, &mut fd).map_err(
            |e| {
                let hint = match e.raw_os_error() {
                    Some(libc::EINVAL) => ": the group is already in a container",
                    Some(libc::EPERM) => NO_IRQ_REMAP_HINT,
                    _ => "",
                };
                VfioError::ioctl_hint("VFIO_GROUP_SET_CONTAINER", group.name(), e, hint)
            },
        )?;
        if !self.iommu_set.load(Ordering::Acquire) {
            sys::ioctl_val(
                self.file.as_fd(),
                sys::VFIO_SET_IOMMU,
                vu::VFIO_TYPE1v2_IOMMU as libc::c_ulong,
            )
            .map_err(|e| {
                // Leave the group as we found it: out of the container.
                let _ = sys::ioctl_val(group.file.as_fd(), sys::VFIO_GROUP_UNSET_CONTAINER, 0);
                let hint = match e.raw_os_error() {
                    Some(libc::EPERM) => NO_IRQ_REMAP_HINT,
                    _ => "",
                };
                VfioError::ioctl_hint("VFIO_SET_IOMMU(TYPE1v2)", "container", e, hint)
            })?;
            self.iommu_set.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// IOMMU page sizes the container supports (bitmap), from VFIO_IOMMU_GET_INFO.
    pub fn iova_pgsizes(&self) -> Result<u64> {
        let mut i: vu::vfio_iommu_type1_info = sys::zeroed();
        i.argsz = std::mem::size_of_val(&i) as u32;
        sys::ioctl_mut(self.file.as_fd(), sys::VFIO_IOMMU_GET_INFO, &mut i)
            .map_err(|e| VfioError::ioctl("VFIO_IOMMU_GET_INFO", "container", e))?;
        Ok(i.iova_pgsizes)
    }
}

impl AsFd for Container {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn os_err(op: &'static str, iova: u64, len: u64, e: std::io::Error) -> MapError {
    let hint = match (op, e.raw_os_error()) {
        (_, Some(libc::ENOMEM)) => MEMLOCK_HINT,
        ("VFIO_IOMMU_MAP_DMA", Some(libc::EEXIST)) => ": the range overlaps an existing mapping",
        ("VFIO_IOMMU_MAP_DMA", Some(libc::EINVAL)) => ": iova, va and length must be page aligned, and no group may be in the container yet without an IOMMU set",
        ("VFIO_IOMMU_UNMAP_DMA", Some(libc::EINVAL)) => ": type1 cannot unmap part of a mapping; unmap whole mappings",
        _ => "",
    };
    MapError::Os {
        op,
        iova,
        len,
        hint,
        source: e,
    }
}

impl DmaMapper for Container {
    fn backend(&self) -> Backend {
        Backend::LegacyType1
    }

    fn can_map_file(&self) -> bool {
        false
    }

    unsafe fn map_user(
        &self,
        iova: Iova,
        va: u64,
        len: u64,
        access: Access,
    ) -> Result<u64, MapError> {
        let Iova::Fixed(iova) = iova else {
            return Err(MapError::AnyIovaUnsupported {
                backend: Backend::LegacyType1,
            });
        };
        let mut m: vu::vfio_iommu_type1_dma_map = sys::zeroed();
        m.argsz = std::mem::size_of_val(&m) as u32;
        m.flags = if access.read {
            vu::VFIO_DMA_MAP_FLAG_READ
        } else {
            0
        } | if access.write {
            vu::VFIO_DMA_MAP_FLAG_WRITE
        } else {
            0
        };
        m.vaddr = va;
        m.iova = iova;
        m.size = len;
        sys::ioctl_mut(self.file.as_fd(), sys::VFIO_IOMMU_MAP_DMA, &mut m)
            .map_err(|e| os_err("VFIO_IOMMU_MAP_DMA", iova, len, e))?;
        Ok(iova)
    }

    fn map_file(
        &self,
        _iova: Iova,
        _fd: BorrowedFd<'_>,
        _offset: u64,
        _len: u64,
        _access: Access,
    ) -> Result<u64, MapError> {
        Err(MapError::FileMappingUnsupported {
            backend: Backend::LegacyType1,
        })
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<u64, MapError> {
        let mut u: vu::vfio_iommu_type1_dma_unmap = sys::zeroed();
        u.argsz = std::mem::size_of_val(&u) as u32;
        u.iova = iova;
        u.size = len;
        sys::ioctl_mut(self.file.as_fd(), sys::VFIO_IOMMU_UNMAP_DMA, &mut u)
            .map_err(|e| os_err("VFIO_IOMMU_UNMAP_DMA", iova, len, e))?;
        Ok(u.size)
    }

    fn unmap_all(&self) -> Result<u64, MapError> {
        let mut u: vu::vfio_iommu_type1_dma_unmap = sys::zeroed();
        u.argsz = std::mem::size_of_val(&u) as u32;
        u.flags = vu::VFIO_DMA_UNMAP_FLAG_ALL;
        sys::ioctl_mut(self.file.as_fd(), sys::VFIO_IOMMU_UNMAP_DMA, &mut u)
            .map_err(|e| os_err("VFIO_IOMMU_UNMAP_DMA(ALL)", 0, u64::MAX, e))?;
        Ok(u.size)
    }
}

/// A VFIO group (`/dev/vfio/<n>`): every device of one IOMMU group.
///
/// ```no_run
/// let group = vfio_gmem::vfio::Group::open(3)?;
/// assert!(group.is_viable()?);
/// # Ok::<(), vfio_gmem::vfio::VfioError>(())
/// ```
#[derive(Debug)]
pub struct Group {
    file: File,
    id: u32,
}

impl Group {
    /// Opens group `id` and checks that it is viable.
    pub fn open(id: u32) -> Result<Group> {
        Self::open_in(&PciSysfs::new(), id)
    }

    /// [`Group::open`] with nodes and sysfs from another tree.
    pub fn open_in(sysfs: &PciSysfs, id: u32) -> Result<Group> {
        let path = sysfs.group_node(id);
        let file = open_node(&path, |e| {
            match e {
            libc::ENOENT => ": no such VFIO group node: no member of this IOMMU group is bound to vfio-pci (run `vfio-gmem bind <bdf>`), or the kernel lacks CONFIG_VFIO_GROUP",
            libc::EBUSY => ": the group is already open (another VFIO user, or one of its devices is in use through its cdev); VFIO allows one user per group",
            libc::EPERM | libc::EACCES => ": permission denied; run as root or give this user the group node",
            _ => "",
        }
        })?;
        let g = Group { file, id };
        if !g.is_viable()? {
            return Err(match sysfs.group_viability(id) {
                Ok(Viability::NotViable { member, driver }) => VfioError::GroupNotViable {
                    group: id,
                    member,
                    driver,
                },
                _ => VfioError::Unsupported(format!(
                    "IOMMU group {id} is not viable (a member is bound to a driver that is not vfio-pci); `vfio-gmem list` shows the members"
                )),
            });
        }
        Ok(g)
    }

    /// Takes the fd of group `id` another process opened (e.g. received from
    /// `vfio-gmem helper`, [`crate::handoff`]); checks that it answers
    /// `VFIO_GROUP_GET_STATUS`.
    pub fn from_fd(fd: std::os::fd::OwnedFd, id: u32) -> Result<Group> {
        let g = Group {
            file: File::from(fd),
            id,
        };
        g.status()?;
        Ok(g)
    }

    /// The IOMMU group number.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn name(&self) -> String {
        format!("IOMMU group {}", self.id)
    }

    fn status(&self) -> Result<u32> {
        let mut s: vu::vfio_group_status = sys::zeroed();
        s.argsz = std::mem::size_of_val(&s) as u32;
        sys::ioctl_mut(self.file.as_fd(), sys::VFIO_GROUP_GET_STATUS, &mut s)
            .map_err(|e| VfioError::ioctl("VFIO_GROUP_GET_STATUS", self.name(), e))?;
        Ok(s.flags)
    }

    /// True if every member is bound to vfio-pci, a benign driver, or none.
    pub fn is_viable(&self) -> Result<bool> {
        Ok(self.status()? & vu::VFIO_GROUP_FLAGS_VIABLE != 0)
    }

    /// True once the group is in a container.
    pub fn has_container(&self) -> Result<bool> {
        Ok(self.status()? & vu::VFIO_GROUP_FLAGS_CONTAINER_SET != 0)
    }

    /// A device fd for member `bdf` (the group must be in a container with an IOMMU).
    pub fn device(&self, bdf: Bdf) -> Result<Device> {
        let name = CString::new(bdf.to_string()).expect("BDF has no NUL");
        let mut buf = name.into_bytes_with_nul();
        let fd = sys::ioctl_new_fd(self.file.as_fd(), sys::VFIO_GROUP_GET_DEVICE_FD, &mut buf)
            .map_err(|e| {
                let hint = match e.raw_os_error() {
                    Some(libc::EINVAL) => {
                        ": add the group to a container first (Container::add_group)"
                    }
                    Some(libc::ENODEV) => {
                        ": no such device in this group, or it is not bound to vfio-pci"
                    }
                    _ => "",
                };
                VfioError::ioctl_hint("VFIO_GROUP_GET_DEVICE_FD", bdf.to_string(), e, hint)
            })?;
        Ok(Device::from_fd(fd, bdf.to_string()))
    }
}

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
