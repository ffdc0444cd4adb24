//! The harness proof's view of the edu device, written on raw ioctls (the `sys` layer
//! only), independent of the library's higher layers: iommufd + VFIO cdev + BAR0 MMIO.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;

use super::raw::{self as sys, iommufd_uapi as iu, vfio_uapi as vu};

pub const EDU_BUF: u64 = 0x40000;
const REG_ID: usize = 0x00;
const REG_DMA_SRC: usize = 0x80;
const REG_DMA_DST: usize = 0x88;
const REG_DMA_CNT: usize = 0x90;
const REG_DMA_CMD: usize = 0x98;
const CMD_START: u64 = 1;
const CMD_TO_RAM: u64 = 2;

/// A mapped region of memory (BAR or memfd), unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    pub fn new(fd: &impl AsRawFd, offset: u64, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping chosen by the kernel; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as i64,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(p.cast()).unwrap(),
            len,
        })
    }
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    pub fn read_u32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len);
        // SAFETY: in bounds of the mapping (asserted), aligned register offset.
        unsafe { self.ptr.as_ptr().add(off).cast::<u32>().read_volatile() }
    }
    pub fn write_u64(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len);
        // SAFETY: in bounds of the mapping (asserted), aligned register offset.
        unsafe { self.ptr.as_ptr().add(off).cast::<u64>().write_volatile(v) }
    }
    pub fn read_u64(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len);
        // SAFETY: in bounds of the mapping (asserted), aligned register offset.
        unsafe { self.ptr.as_ptr().add(off).cast::<u64>().read_volatile() }
    }
    #[allow(clippy::mut_from_ref)]
    pub fn bytes(&self) -> &mut [u8] {
        // SAFETY: the mapping is valid for len bytes for the lifetime of self; tests
        // access it from one thread at a time.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap and are unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

pub fn memfd(name: &str, len: u64) -> io::Result<File> {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated name; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len)?;
    Ok(f)
}

/// /dev/iommu with one IOAS.
pub struct RawIommufd {
    pub fd: OwnedFd,
    pub ioas: u32,
}

impl RawIommufd {
    pub fn open() -> io::Result<Self> {
        let fd: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/iommu")?
            .into();
        let mut a: iu::iommu_ioas_alloc = sys::zeroed();
        a.size = std::mem::size_of_val(&a) as u32;
        sys::ioctl_mut(fd.as_fd(), sys::IOMMU_IOAS_ALLOC, &mut a)?;
        Ok(RawIommufd {
            fd,
            ioas: a.out_ioas_id,
        })
    }
    pub fn map_file(&self, file: &File, start: u64, len: u64, iova: u64) -> io::Result<()> {
        let mut m: iu::iommu_ioas_map_file = sys::zeroed();
        m.size = std::mem::size_of_val(&m) as u32;
        m.flags = iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
            | iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
            | iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
        m.ioas_id = self.ioas;
        m.fd = file.as_raw_fd();
        m.start = start;
        m.length = len;
        m.iova = iova;
        sys::ioctl_mut(self.fd.as_fd(), sys::IOMMU_IOAS_MAP_FILE, &mut m).map(drop)
    }
    pub fn unmap(&self, iova: u64, len: u64) -> io::Result<u64> {
        let mut u: iu::iommu_ioas_unmap = sys::zeroed();
        u.size = std::mem::size_of_val(&u) as u32;
        u.ioas_id = self.ioas;
        u.iova = iova;
        u.length = len;
        sys::ioctl_mut(self.fd.as_fd(), sys::IOMMU_IOAS_UNMAP, &mut u)?;
        Ok(u.length)
    }
}

/// An edu device opened through its VFIO cdev, bound to an iommufd and attached to an IOAS.
pub struct RawEdu {
    pub dev: File,
    pub bar0: Mapping,
    /// The iommufd device id from VFIO_DEVICE_BIND_IOMMUFD.
    pub dev_id: u32,
}

impl RawEdu {
    pub fn open(cdev: &Path, iommufd: &RawIommufd) -> io::Result<Self> {
        let edu = Self::open_bound(cdev, iommufd.fd.as_fd())?;
        edu.attach(iommufd.ioas)?;
        Ok(edu)
    }

    /// Opens the cdev and binds it to `iommufd` (any iommufd fd, e.g. the library's);
    /// not attached yet: see [`RawEdu::attach`].
    pub fn open_bound(cdev: &Path, iommufd: BorrowedFd<'_>) -> io::Result<Self> {
        let dev = OpenOptions::new().read(true).write(true).open(cdev)?;
        let mut b: vu::vfio_device_bind_iommufd = sys::zeroed();
        b.argsz = std::mem::size_of_val(&b) as u32;
        b.iommufd = iommufd.as_raw_fd();
        sys::ioctl_mut(dev.as_fd(), sys::VFIO_DEVICE_BIND_IOMMUFD, &mut b)?;
        let dev_id = b.out_devid;

        let bar0 = region(&dev, vu::VFIO_PCI_BAR0_REGION_INDEX)?;
        let bar0 = Mapping::new(&dev, bar0.offset, bar0.size as usize)?;
        // Enable memory decoding and bus mastering in the PCI command register.
        let cfg = region(&dev, vu::VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut cmd = [0u8; 2];
        dev.read_exact_at(&mut cmd, cfg.offset + 4)?;
        let v = u16::from_le_bytes(cmd) | 0x6;
        dev.write_all_at(&v.to_le_bytes(), cfg.offset + 4)?;
        let edu = RawEdu { dev, bar0, dev_id };
        let id = edu.bar0.read_u32(REG_ID);
        if id & 0xff != 0xed {
            return Err(io::Error::other(format!(
                "BAR0 id register reads {id:#x}, not an edu device"
            )));
        }
        Ok(edu)
    }

    /// Attaches the bound device to an IOAS or HWPT id.
    pub fn attach(&self, pt_id: u32) -> io::Result<()> {
        let mut at: vu::vfio_device_attach_iommufd_pt = sys::zeroed();
        at.argsz = std::mem::size_of_val(&at) as u32;
        at.pt_id = pt_id;
        sys::ioctl_mut(
            self.dev.as_fd(),
            sys::VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            &mut at,
        )
        .map(drop)
    }

    /// Detaches the device from its IOAS/HWPT.
    pub fn detach(&self) -> io::Result<()> {
        let mut d: vu::vfio_device_detach_iommufd_pt = sys::zeroed();
        d.argsz = std::mem::size_of_val(&d) as u32;
        sys::ioctl_mut(self.dev.as_fd(), sys::VFIO_DEVICE_DETACH_IOMMUFD_PT, &mut d).map(drop)
    }

    fn dma(&self, src: u64, dst: u64, len: u64, to_ram: bool) -> io::Result<()> {
        self.bar0.write_u64(REG_DMA_SRC, src);
        self.bar0.write_u64(REG_DMA_DST, dst);
        self.bar0.write_u64(REG_DMA_CNT, len);
        self.bar0
            .write_u64(REG_DMA_CMD, CMD_START | if to_ram { CMD_TO_RAM } else { 0 });
        let t0 = std::time::Instant::now();
        while self.bar0.read_u64(REG_DMA_CMD) & CMD_START != 0 {
            if t0.elapsed().as_secs() > 20 {
                return Err(io::Error::other("edu DMA did not complete in 20 s"));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }
    /// RAM (at `iova`) → the device's 4 KiB buffer.
    pub fn dma_from_ram(&self, iova: u64, len: u64) -> io::Result<()> {
        self.dma(iova, EDU_BUF, len, false)
    }
    /// The device's buffer → RAM (at `iova`).
    pub fn dma_to_ram(&self, iova: u64, len: u64) -> io::Result<()> {
        self.dma(EDU_BUF, iova, len, true)
    }
}

pub struct RegionInfo {
    pub offset: u64,
    pub size: u64,
}

pub fn region(dev: &File, index: u32) -> io::Result<RegionInfo> {
    let mut r: vu::vfio_region_info = sys::zeroed();
    r.argsz = std::mem::size_of_val(&r) as u32;
    r.index = index;
    sys::ioctl_mut(dev.as_fd(), sys::VFIO_DEVICE_GET_REGION_INFO, &mut r)?;
    Ok(RegionInfo {
        offset: r.offset,
        size: r.size,
    })
}
