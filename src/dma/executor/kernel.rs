//! The kernel executor (crate-private): a plan's map/unmap calls go to an iommufd IOAS
//! (or any [`DmaMapper`]), its attribute and discard calls to KVM and the backing files
//! ([`super::kvm`]). Plans name regions; the executor finds each region's shared memory
//! in what the [`DmaSpace`](crate::dma::DmaSpace) owns ([`RegionBacking`]), so no fd
//! number rides in a plan and no fd is borrowed from a number.
//!
//! Invariant: each method issues exactly one kernel call (the driver counts them). A call
//! that fails returns an [`OpError`] whose `source()` is the typed [`KernelError`]
//! explaining it. Each call that succeeds is logged at `debug` level (target
//! [`LOG_TARGET`], `vfio_gmem::dma::exec`, pinned: it is documented in the README and
//! does not follow this file around), in the order issued, so a VMM can trace what
//! reached the kernel.

use std::os::fd::{AsFd, OwnedFd};

use super::kvm::{Kvm, Shared};
use super::Executor;
use crate::dma::plan::model::RegionId;
use crate::dma::plan::ops::{AttributesOp, DiscardOp, MapOp, UnmapKind, UnmapOp};
use crate::dma::plan::outcome::OpError;
use crate::gmem::{GmemError, MappedMemory};
use crate::iommufd::{self, Ioas};
use crate::mapper::{Access, DmaMapper, Iova, MapError};

/// The log target of every kernel call the executor issues (documented in the README's
/// VMM guide; the reference VMM's trace filters on it).
pub(crate) const LOG_TARGET: &str = "vfio_gmem::dma::exec";

/// How an [`UnmapKind::Cut`] reaches the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CutMode {
    /// Not at all (no verified mechanism).
    None,
    /// The compat `VFIO_IOMMU_UNMAP_DMA` ([`Ioas::cut_unmap`]): a verified compat IOAS
    /// with huge pages disabled.
    Compat,
    /// `IOMMU_IOAS_SPLIT` then `IOMMU_IOAS_UNMAP` ([`Ioas::split_unmap`]): two ioctls for
    /// one executor call, the one exception to the one-call rule above. Only where an
    /// area of the IOAS's record spans an end of the range ([`Ioas::must_split`]); a
    /// range of whole areas is one `IOMMU_IOAS_UNMAP`.
    Split,
}

/// Where map/unmap calls go.
pub(crate) enum IommuTarget<'a> {
    /// An iommufd IOAS; `cut` says how [`UnmapKind::Cut`] is issued.
    Ioas { ioas: &'a Ioas, cut: CutMode },
    /// Any other mapper (legacy type1 container): native unmap only.
    Mapper(&'a dyn DmaMapper),
}

/// A region's shared memory as its space holds it, for as long as the region is
/// registered: what a map or discard of the region resolves to.
#[derive(Debug)]
pub(crate) enum RegionBacking {
    /// Mapped by fd+offset (`IOMMU_IOAS_MAP_FILE`); discarded by punching the file.
    File {
        /// The space's own fd of the file.
        file: OwnedFd,
        /// File offset of the region's first byte.
        offset: u64,
    },
    /// Mapped by the address of the space's own shared mapping of `file` (the VA
    /// fallback); discarded with `MADV_REMOVE` on the mapping.
    Mapping {
        /// Kept open with the mapping.
        _file: OwnedFd,
        /// The mapping of the region's bytes, first byte first.
        mapping: MappedMemory,
    },
    /// Mapped by an address the caller gave with
    /// [`UserAddress::new`](crate::dma::UserAddress::new)'s promise; discarded with
    /// `MADV_REMOVE`.
    User(u64),
}

impl RegionBacking {
    /// The address of the region's first byte, if mapped by VA.
    pub(crate) fn address(&self) -> Option<u64> {
        match self {
            RegionBacking::File { .. } => None,
            RegionBacking::Mapping { mapping, .. } => Some(mapping.addr()),
            RegionBacking::User(addr) => Some(*addr),
        }
    }

    /// Where a discard of the region's shared memory goes.
    fn target(&self) -> Shared<'_> {
        match self {
            RegionBacking::File { file, offset } => Shared::File {
                fd: file.as_fd(),
                offset: *offset,
            },
            RegionBacking::Mapping { mapping, .. } => Shared::Address(mapping.addr()),
            RegionBacking::User(addr) => Shared::Address(*addr),
        }
    }
}

/// Why a kernel call of a plan failed: the `source()` of the [`OpError`] the kernel
/// executor returns.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KernelError {
    /// A map or native unmap refused by the IOMMU backend.
    #[error(transparent)]
    Map(#[from] MapError),
    /// A cut (compat unmap or native split) refused by iommufd.
    #[error(transparent)]
    Iommufd(#[from] iommufd::Error),
    /// An attribute change or discard refused by KVM or the backing file.
    #[error(transparent)]
    Gmem(#[from] GmemError),
    /// The plan cuts an area but this space has no verified way to.
    #[error("cut-unmap of [{iova:#x}, +{len:#x}) needs a verified compat IOAS or native split")]
    NoCut {
        /// First IOVA.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// The plan names a region whose backing the space does not hold.
    #[error("{0}: no backing is registered for this region")]
    UnknownRegion(RegionId),
}

impl KernelError {
    fn errno(&self) -> i32 {
        match self {
            KernelError::Map(e) => e.errno().unwrap_or(libc::EIO),
            KernelError::Iommufd(e) => e.errno().unwrap_or(libc::EIO),
            KernelError::Gmem(e) => e.errno(),
            KernelError::NoCut { .. } => libc::EOPNOTSUPP,
            KernelError::UnknownRegion(_) => libc::EINVAL,
        }
    }
}

/// The executor's answer for a failed call: logged (`warn`), then kept as the typed
/// `source()` of the errno the driver works with.
fn fail(e: impl Into<KernelError>) -> OpError {
    let e = e.into();
    log::warn!(target: LOG_TARGET, "{e}");
    OpError::with_cause(e.errno(), e)
}

/// The route of a space's plan calls to the kernel.
pub(crate) struct KernelExecutor<'a> {
    iommu: IommuTarget<'a>,
    kvm: Kvm<'a>,
    backings: &'a dyn Fn(RegionId) -> Option<&'a RegionBacking>,
}

impl<'a> KernelExecutor<'a> {
    /// An executor whose calls go to `iommu` and `kvm`, finding regions' memory through
    /// `backings`.
    pub(crate) fn new(
        iommu: IommuTarget<'a>,
        kvm: Kvm<'a>,
        backings: &'a dyn Fn(RegionId) -> Option<&'a RegionBacking>,
    ) -> Self {
        KernelExecutor {
            iommu,
            kvm,
            backings,
        }
    }

    fn mapper(&self) -> &dyn DmaMapper {
        match self.iommu {
            IommuTarget::Ioas { ioas, .. } => ioas,
            IommuTarget::Mapper(m) => m,
        }
    }

    fn backing(&self, region: RegionId) -> Result<&'a RegionBacking, KernelError> {
        (self.backings)(region).ok_or(KernelError::UnknownRegion(region))
    }

    fn try_map(&self, op: &MapOp) -> Result<(), KernelError> {
        let iova = Iova::Fixed(op.iova);
        let rw = Access::READ_WRITE;
        match self.backing(op.region)? {
            RegionBacking::File { file, offset } => {
                self.mapper()
                    .map_file(iova, file.as_fd(), offset + op.offset, op.len, rw)?;
            }
            backing => {
                let va = backing.address().expect("mapped by address");
                // SAFETY: the address is the space's own mapping of the region's shared
                // backing (kept in its slot while the region lives) or a caller's
                // `UserAddress`, whose unsafe constructor promised the same for as long
                // as the region is registered; plans run only while it is.
                unsafe { self.mapper().map_user(iova, va + op.offset, op.len, rw) }?;
            }
        }
        Ok(())
    }

    /// The bytes unmapped, and whether a native cut needed no split (whole areas).
    fn try_unmap(&self, op: &UnmapOp) -> Result<(u64, bool), KernelError> {
        Ok(match (op.kind, &self.iommu) {
            (UnmapKind::Cut, IommuTarget::Ioas { ioas, cut }) if *cut != CutMode::None => {
                if *cut == CutMode::Compat {
                    (ioas.cut_unmap(op.iova, op.len)?, false)
                } else if ioas.must_split(op.iova, op.len) {
                    (ioas.split_unmap(op.iova, op.len)?, false)
                } else {
                    // Both ends already on area boundaries (or unmapped IOVA): the split
                    // would change nothing, so this is one ioctl, as the compat cut is.
                    let n = ioas.unmap(op.iova, op.len)?;
                    if n == 0 {
                        return Err(iommufd::Error::NotMapped {
                            ioas: ioas.id(),
                            span: iommufd::Span::new(op.iova, op.len),
                            source: None,
                        }
                        .into());
                    }
                    (n, true)
                }
            }
            (UnmapKind::Cut, _) => {
                return Err(KernelError::NoCut {
                    iova: op.iova,
                    len: op.len,
                })
            }
            (UnmapKind::Native, _) => (self.mapper().unmap(op.iova, op.len)?, false),
        })
    }
}

impl Executor for KernelExecutor<'_> {
    fn map(&mut self, op: &MapOp) -> Result<(), OpError> {
        self.try_map(op).map_err(fail)?;
        log::debug!(
            target: LOG_TARGET,
            "IOMMU map IOVA [{:#x}, +{:#x})",
            op.iova,
            op.len
        );
        Ok(())
    }

    fn unmap(&mut self, op: &UnmapOp) -> Result<u64, OpError> {
        let (bytes, whole) = self.try_unmap(op).map_err(fail)?;
        log::debug!(
            target: LOG_TARGET,
            "IOMMU unmap ({:?}) IOVA [{:#x}, +{:#x}): {bytes:#x} bytes{}",
            op.kind,
            op.iova,
            op.len,
            if whole { " (whole areas: no split)" } else { "" }
        );
        Ok(bytes)
    }

    fn set_attributes(&mut self, op: &AttributesOp) -> Result<(), OpError> {
        self.kvm.set_attributes(op).map_err(fail)?;
        if self.kvm.has_vm() {
            let to = if op.private { "private" } else { "shared" };
            log::debug!(
                target: LOG_TARGET,
                "KVM attributes GPA [{:#x}, +{:#x}) {to}",
                op.gpa,
                op.len
            );
        }
        Ok(())
    }

    fn discard(&mut self, op: &DiscardOp) -> Result<(), OpError> {
        let backing = self.backing(op.region).map_err(fail)?;
        self.kvm.discard(backing.target(), op).map_err(fail)?;
        log::debug!(
            target: LOG_TARGET,
            "discard shared backing GPA [{:#x}, +{:#x})",
            op.gpa,
            op.len
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_target_is_the_documented_one() {
        let readme = include_str!("../../../README.md");
        assert!(readme.contains(&format!("target `{LOG_TARGET}`")));
        assert_eq!(LOG_TARGET, "vfio_gmem::dma::exec");
    }

    #[test]
    fn failures_keep_their_typed_source() {
        use std::error::Error;
        let e = fail(KernelError::NoCut {
            iova: 0x1000,
            len: 0x2000,
        });
        assert_eq!(e.errno, libc::EOPNOTSUPP);
        let cause = e.source().expect("a source");
        assert!(cause.to_string().contains("needs a verified compat IOAS"));
        assert!(cause.downcast_ref::<KernelError>().is_some());
    }
}
