//! The real executor: a plan's map/unmap calls go to an iommufd IOAS (or any
//! [`DmaMapper`]), its attribute and discard calls to KVM and the backing files.
//!
//! Invariant: each method issues exactly one kernel call (the driver counts them), and the
//! explanation of a failure is kept for the caller, since [`OpError`] carries only errno.
//! Each call that succeeds is logged at `debug` level (target `vfio_gmem::dma::exec`), in
//! the order issued, so a VMM can trace what reached the kernel.

use std::os::fd::BorrowedFd;

use super::error::OpError;
use super::executor::Executor;
use super::model::Backing;
use super::plan::{AttributesOp, DiscardOp, MapOp, UnmapKind, UnmapOp};
use crate::gmem::KvmAttributes;
use crate::iommufd::Ioas;
use crate::mapper::{Access, DmaMapper, Iova};

/// Where map/unmap calls go.
pub(crate) enum IommuTarget<'a> {
    /// An iommufd IOAS; `cut` is true when it is a verified compat IOAS with huge pages
    /// disabled, so [`UnmapKind::Cut`] may be issued.
    Ioas { ioas: &'a Ioas, cut: bool },
    /// Any other mapper (legacy type1 container): native unmap only.
    Mapper(&'a dyn DmaMapper),
}

pub(crate) struct RealExecutor<'a> {
    pub iommu: IommuTarget<'a>,
    pub kvm: KvmAttributes<'a>,
    /// The explained error of the last failed call.
    pub last_error: Option<String>,
}

impl RealExecutor<'_> {
    fn fail(&mut self, errno: i32, text: String) -> OpError {
        log::warn!("{text}");
        self.last_error = Some(text);
        OpError::from_errno(errno)
    }

    fn mapper(&self) -> &dyn DmaMapper {
        match self.iommu {
            IommuTarget::Ioas { ioas, .. } => ioas,
            IommuTarget::Mapper(m) => m,
        }
    }
}

fn errno_of(e: &crate::mapper::MapError) -> i32 {
    e.errno().unwrap_or(libc::EIO)
}

impl Executor for RealExecutor<'_> {
    fn map(&mut self, op: &MapOp) -> Result<(), OpError> {
        let iova = Iova::Fixed(op.iova);
        let rw = Access::READ_WRITE;
        let r = match op.backing {
            Backing::File { fd, offset } => {
                // SAFETY: the region's owner keeps `fd` open while the region is
                // registered (DmaSpace owns a dup of it); used for this call only.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                self.mapper()
                    .map_file(iova, fd, offset + op.offset, op.len, rw)
            }
            Backing::Address(va) => self.mapper().map_user(iova, va + op.offset, op.len, rw),
            Backing::Opaque(_) => {
                return Err(self.fail(
                    libc::EINVAL,
                    format!("{}: opaque backing cannot be mapped", op.region),
                ))
            }
        };
        r.map(drop)
            .map_err(|e| self.fail(errno_of(&e), e.to_string()))?;
        log::debug!("IOMMU map IOVA [{:#x}, +{:#x})", op.iova, op.len);
        Ok(())
    }

    fn unmap(&mut self, op: &UnmapOp) -> Result<u64, OpError> {
        let r = match (op.kind, &self.iommu) {
            (UnmapKind::Cut, IommuTarget::Ioas { ioas, cut: true }) => ioas
                .cut_unmap(op.iova, op.len)
                .map_err(|e| (e.errno().unwrap_or(libc::EIO), e.to_string())),
            (UnmapKind::Cut, _) => Err((
                libc::EOPNOTSUPP,
                format!(
                    "cut-unmap of [{:#x}, +{:#x}) needs a verified compat IOAS",
                    op.iova, op.len
                ),
            )),
            (UnmapKind::Native, _) => self
                .mapper()
                .unmap(op.iova, op.len)
                .map_err(|e| (errno_of(&e), e.to_string())),
        };
        let bytes = r.map_err(|(errno, text)| self.fail(errno, text))?;
        log::debug!(
            "IOMMU unmap ({:?}) IOVA [{:#x}, +{:#x}): {bytes:#x} bytes",
            op.kind,
            op.iova,
            op.len
        );
        Ok(bytes)
    }

    fn set_attributes(&mut self, op: &AttributesOp) -> Result<(), OpError> {
        self.kvm.try_set_attributes(op).map_err(|e| {
            let errno = e.errno();
            self.fail(errno, e.to_string())
        })?;
        if self.kvm.vm().is_some() {
            let to = if op.private { "private" } else { "shared" };
            log::debug!("KVM attributes GPA [{:#x}, +{:#x}) {to}", op.gpa, op.len);
        }
        Ok(())
    }

    fn discard(&mut self, op: &DiscardOp) -> Result<(), OpError> {
        self.kvm.try_discard(op).map_err(|e| {
            let errno = e.errno();
            self.fail(errno, e.to_string())
        })?;
        log::debug!("discard shared backing GPA [{:#x}, +{:#x})", op.gpa, op.len);
        Ok(())
    }
}
