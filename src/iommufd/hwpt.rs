//! Hardware page tables (`IOMMU_HWPT_ALLOC`) and IOMMU hardware info
//! (`IOMMU_GET_HW_INFO`) for a device bound to the iommufd.

use std::os::fd::AsFd;
use std::sync::Arc;

use super::ioas::Ioas;
use super::iommufd::Iommufd;
use super::Result;
use crate::sys::{self, iommufd_uapi as iu};

/// `IOMMU_HWPT_ALLOC` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HwptFlags(pub u32);

impl HwptFlags {
    /// Usable as the parent (stage 2) of a nested HWPT.
    pub const NEST_PARENT: HwptFlags =
        HwptFlags(iu::iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT);
    /// Enforce dirty tracking support on attach.
    pub const DIRTY_TRACKING: HwptFlags =
        HwptFlags(iu::iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING);
}

/// A kernel-managed hardware page table (an `iommu_domain`) filled from an IOAS,
/// destroyed on drop. Devices attach to [`Hwpt::id`] instead of the IOAS id when the VMM
/// wants to choose the domain (e.g. a nesting parent).
///
/// Invariant: the kernel HWPT holds a reference on its IOAS; drop the `Hwpt` (after
/// detaching its devices) before the [`Ioas`], or the IOAS destroy fails with EBUSY.
///
/// ```no_run
/// # let (ioas, dev_id): (vfio_gmem::iommufd::Ioas, u32) = unimplemented!();
/// use vfio_gmem::iommufd::{Hwpt, HwptFlags};
/// let hwpt = Hwpt::alloc(&ioas, dev_id, HwptFlags::default())?;
/// println!("attach the device to pt_id {}", hwpt.id());
/// # Ok::<(), vfio_gmem::iommufd::Error>(())
/// ```
#[derive(Debug)]
pub struct Hwpt {
    iommufd: Arc<Iommufd>,
    id: u32,
}

impl Hwpt {
    /// Allocates a paging HWPT for the bound device `dev_id` (from
    /// `VFIO_DEVICE_BIND_IOMMUFD`), mapping what `ioas` maps.
    ///
    /// ```no_run
    /// # let (ioas, dev_id): (vfio_gmem::iommufd::Ioas, u32) = unimplemented!();
    /// use vfio_gmem::iommufd::{Hwpt, HwptFlags};
    /// let parent = Hwpt::alloc(&ioas, dev_id, HwptFlags::NEST_PARENT)?;
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn alloc(ioas: &Ioas, dev_id: u32, flags: HwptFlags) -> Result<Hwpt> {
        let mut h: iu::iommu_hwpt_alloc = sys::zeroed();
        h.size = size_of_val(&h) as u32;
        h.flags = flags.0;
        h.dev_id = dev_id;
        h.pt_id = ioas.id();
        h.data_type = iu::iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE;
        sys::ioctl_mut(ioas.iommufd().as_fd(), sys::IOMMU_HWPT_ALLOC, &mut h).map_err(|e| {
            super::Error::Ioctl {
                op: "IOMMU_HWPT_ALLOC",
                object: format!("device {dev_id} on IOAS {}", ioas.id()),
                source: e,
            }
        })?;
        Ok(Hwpt {
            iommufd: Arc::clone(ioas.iommufd()),
            id: h.out_hwpt_id,
        })
    }

    /// The object id (a `pt_id` devices can attach to).
    ///
    /// ```no_run
    /// # let hwpt: vfio_gmem::iommufd::Hwpt = unimplemented!();
    /// let pt_id = hwpt.id();
    /// ```
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for Hwpt {
    fn drop(&mut self) {
        if let Err(e) = self.iommufd.destroy(self.id) {
            log::warn!(
                "IOMMU_DESTROY of HWPT {} failed: {e}; detach its devices first",
                self.id
            );
        }
    }
}

/// Which IOMMU driver answered [`Iommufd::hw_info`] and so how to read its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwInfoType {
    /// The driver reports no hardware info (e.g. virtio-iommu).
    None,
    /// Intel VT-d (`IOMMU_HW_INFO_TYPE_INTEL_VTD`); [`HwInfo::vtd`] decodes its data.
    IntelVtd,
    /// Arm SMMUv3.
    ArmSmmuV3,
    /// NVIDIA Tegra241 CMDQV (an SMMUv3 extension).
    Tegra241Cmdqv,
    /// AMD-Vi.
    Amd,
    /// A type this crate does not know (the raw `out_data_type`).
    Other(u32),
}

impl From<u32> for HwInfoType {
    fn from(v: u32) -> Self {
        match v {
            iu::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_NONE => HwInfoType::None,
            iu::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD => HwInfoType::IntelVtd,
            iu::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_ARM_SMMUV3 => HwInfoType::ArmSmmuV3,
            iu::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_TEGRA241_CMDQV => HwInfoType::Tegra241Cmdqv,
            iu::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_AMD => HwInfoType::Amd,
            o => HwInfoType::Other(o),
        }
    }
}

/// The IOMMU behind a bound device, as `IOMMU_GET_HW_INFO` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HwInfo {
    /// Which driver answered, and so how to read `data`.
    pub kind: HwInfoType,
    /// The driver-specific struct (e.g. `struct iommu_hw_info_vtd`), raw.
    pub data: Vec<u8>,
    /// `IOMMU_HW_CAP_*` bits.
    pub capabilities: u64,
    /// PASID width; 0 = no PASID.
    pub max_pasid_log2: u8,
}

impl HwInfo {
    /// True if the IOMMU can track DMA dirty pages for this device.
    ///
    /// ```no_run
    /// # let info: vfio_gmem::iommufd::HwInfo = unimplemented!();
    /// if info.dirty_tracking() { /* live migration can use IOMMU dirty bits */ }
    /// ```
    pub fn dirty_tracking(&self) -> bool {
        self.capabilities & iu::iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING as u64 != 0
    }

    /// The VT-d registers, if this is an Intel IOMMU.
    ///
    /// ```no_run
    /// # let info: vfio_gmem::iommufd::HwInfo = unimplemented!();
    /// if let Some(vtd) = info.vtd() { println!("{}-bit guest address width", vtd.mgaw()); }
    /// ```
    pub fn vtd(&self) -> Option<VtdInfo> {
        if self.kind != HwInfoType::IntelVtd || self.data.len() < 24 {
            return None;
        }
        let u64_at = |o: usize| u64::from_ne_bytes(self.data[o..o + 8].try_into().unwrap());
        Some(VtdInfo {
            flags: u32::from_ne_bytes(self.data[0..4].try_into().unwrap()),
            cap_reg: u64_at(8),
            ecap_reg: u64_at(16),
        })
    }
}

/// Intel VT-d capability registers (VT-d spec 11.4.2/11.4.3), with a few decoded fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdInfo {
    /// `IOMMU_HW_INFO_VTD_*` flags (errata).
    pub flags: u32,
    /// The capability register (`CAP_REG`), raw.
    pub cap_reg: u64,
    /// The extended capability register (`ECAP_REG`), raw.
    pub ecap_reg: u64,
}

impl VtdInfo {
    const fn cap(&self, shift: u32, bits: u32) -> u64 {
        (self.cap_reg >> shift) & ((1 << bits) - 1)
    }
    const fn ecap(&self, bit: u32) -> bool {
        (self.ecap_reg >> bit) & 1 != 0
    }
    /// Maximum guest address width in bits (CAP.MGAW + 1).
    pub const fn mgaw(&self) -> u32 {
        self.cap(16, 6) as u32 + 1
    }
    /// Supported adjusted guest address widths (CAP.SAGAW bitmap: bit1 = 39-bit 3-level,
    /// bit2 = 48-bit 4-level, bit3 = 57-bit 5-level).
    pub const fn sagaw(&self) -> u8 {
        self.cap(8, 5) as u8
    }
    /// Second-level large page sizes (CAP.SLLPS: bit0 = 2 MiB, bit1 = 1 GiB).
    pub const fn super_pages(&self) -> u8 {
        self.cap(34, 4) as u8
    }
    /// Nested translation (ECAP.NEST).
    pub const fn nested(&self) -> bool {
        self.ecap(26)
    }
    /// PASID support (ECAP.PASID).
    pub const fn pasid(&self) -> bool {
        self.ecap(40)
    }
    /// First-level (stage-1) translation (ECAP.FLTS).
    pub const fn first_level(&self) -> bool {
        self.ecap(47)
    }
    /// Second-level (stage-2) translation (ECAP.SLTS).
    pub const fn second_level(&self) -> bool {
        self.ecap(46)
    }
    /// Snoop control: can force coherent DMA (ECAP.SC).
    pub const fn snoop_control(&self) -> bool {
        self.ecap(7)
    }
    /// Interrupt remapping (ECAP.IR).
    pub const fn interrupt_remapping(&self) -> bool {
        self.ecap(3)
    }
}

impl Iommufd {
    /// The IOMMU hardware info behind the bound device `dev_id`.
    ///
    /// ```no_run
    /// # let (iommufd, dev_id): (vfio_gmem::iommufd::Iommufd, u32) = unimplemented!();
    /// let info = iommufd.hw_info(dev_id)?;
    /// println!("{:?}, {} data bytes", info.kind, info.data.len());
    /// # Ok::<(), vfio_gmem::iommufd::Error>(())
    /// ```
    pub fn hw_info(&self, dev_id: u32) -> Result<HwInfo> {
        let mut data = vec![0u8; 64];
        loop {
            let mut h: iu::iommu_hw_info = sys::zeroed();
            h.size = size_of_val(&h) as u32;
            h.dev_id = dev_id;
            sys::get_hw_info(self.as_fd(), &mut h, &mut data).map_err(|e| super::Error::Ioctl {
                op: "IOMMU_GET_HW_INFO",
                object: format!("device {dev_id}"),
                source: e,
            })?;
            let n = h.data_len as usize;
            if n > data.len() {
                // The driver's struct is bigger than our buffer: ask again with room.
                data.resize(n, 0);
                continue;
            }
            data.truncate(n);
            let kind = HwInfoType::from(sys::hw_info_out_type(&h));
            return Ok(HwInfo {
                kind,
                data,
                capabilities: h.out_capabilities,
                max_pasid_log2: h.out_max_pasid_log2,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtd_registers_decode() {
        // QEMU intel-iommu style values: MGAW 48 (47), SAGAW 4-level, 2M+1G pages;
        // ecap with IR, SC, PASID, FLTS, SLTS.
        let cap_reg = (47u64 << 16) | (0b00100 << 8) | (0b0011 << 34);
        let ecap_reg = (1u64 << 3) | (1 << 7) | (1 << 40) | (1 << 46) | (1 << 47);
        let mut data = vec![0u8; 24];
        data[8..16].copy_from_slice(&cap_reg.to_ne_bytes());
        data[16..24].copy_from_slice(&ecap_reg.to_ne_bytes());
        let info = HwInfo {
            kind: HwInfoType::IntelVtd,
            data,
            capabilities: 1,
            max_pasid_log2: 0,
        };
        let v = info.vtd().unwrap();
        assert_eq!(v.mgaw(), 48);
        assert_eq!(v.sagaw(), 0b100);
        assert_eq!(v.super_pages(), 0b11);
        assert!(v.interrupt_remapping() && v.snoop_control() && v.pasid());
        assert!(v.first_level() && v.second_level() && !v.nested());
        assert!(info.dirty_tracking());
        assert_eq!(HwInfoType::from(0), HwInfoType::None);
        assert_eq!(HwInfoType::from(9), HwInfoType::Other(9));
    }
}
