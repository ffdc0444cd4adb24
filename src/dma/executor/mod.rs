//! The executor interface: one method per kind of kernel call a plan can make.
//!
//! Contract for implementors: a call that returns `Err` must have had no effect, except
//! where a method documents otherwise (the driver copes with the exceptions listed).

#[cfg(any(test, feature = "testing"))]
pub(crate) mod fake;
pub(crate) mod kernel;
pub(crate) mod kvm;

use super::plan::ops::{AttributesOp, DiscardOp, MapOp, UnmapOp};
use super::plan::outcome::OpError;

/// Issues the kernel calls of a [`Plan`](crate::dma::planning::Plan). Implemented by the iommufd,
/// legacy type1 and KVM executors, and by [`FakeKernel`](crate::dma::FakeKernel).
///
/// ```
/// use vfio_gmem::dma::{planning::*, *};
/// /// Counts calls, does nothing.
/// struct Dry(u32);
/// impl Executor for Dry {
///     fn map(&mut self, _: &MapOp) -> Result<(), OpError> { self.0 += 1; Ok(()) }
///     fn unmap(&mut self, op: &UnmapOp) -> Result<u64, OpError> { self.0 += 1; Ok(op.expected_bytes()) }
///     fn set_attributes(&mut self, _: &AttributesOp) -> Result<(), OpError> { self.0 += 1; Ok(()) }
///     fn discard(&mut self, _: &DiscardOp) -> Result<(), OpError> { self.0 += 1; Ok(()) }
/// }
/// let mem = Tracker::new();
/// let plan = mem.plan_register(RegionSpec::new(0, 4096, Backing::Opaque(0))).unwrap();
/// let mut dry = Dry(0);
/// execute(&plan, &mut dry).unwrap();
/// assert_eq!(dry.0, 1);
/// ```
pub trait Executor {
    /// Creates one IOMMU area mapping `op.len` bytes of the region's shared backing,
    /// starting `op.offset` bytes into the region, at `op.iova`.
    ///
    /// iommufd: `IOMMU_IOAS_MAP` (VA) or `IOMMU_IOAS_MAP_FILE` with
    /// `IOMMU_IOAS_MAP_FIXED_IOVA`; legacy: `VFIO_IOMMU_MAP_DMA`. The kernel fails with
    /// `EEXIST` if any existing area overlaps the range (iopt_check_iova) and inserts
    /// nothing on failure.
    fn map(&mut self, op: &MapOp) -> Result<(), OpError>;

    /// Removes the translations of `[op.iova, op.iova + op.len)` and returns the bytes
    /// the kernel reports as unmapped.
    ///
    /// - [`UnmapKind::Native`](crate::dma::planning::UnmapKind::Native): `IOMMU_IOAS_UNMAP`
    ///   (iopt_unmap_iova) or legacy `VFIO_IOMMU_UNMAP_DMA`: removes every area fully
    ///   inside the range; fails `ENOENT` if the range cuts an area (areas before the
    ///   cut one, in IOVA order, are already gone then) or, for `IOMMU_IOAS_UNMAP`, if
    ///   it covers no area.
    /// - [`UnmapKind::Cut`](crate::dma::planning::UnmapKind::Cut): `VFIO_IOMMU_UNMAP_DMA` on the
    ///   iommufd fd whose compat IOAS has huge pages disabled (iommufd_vfio_unmap_dma):
    ///   iopt_cut_iova splits the areas holding `iova - 1`/`iova` and
    ///   `iova + len - 1`/`iova + len`, then iopt_unmap_iova removes everything inside;
    ///   returns 0 bytes, not an error, if nothing was mapped there.
    ///
    /// If this fails after a partial effect, the driver maps each `op.restore` piece
    /// back and treats `EEXIST` as "this piece was never removed".
    fn unmap(&mut self, op: &UnmapOp) -> Result<u64, OpError>;

    /// Sets the KVM memory attributes of a GPA range (`KVM_SET_MEMORY_ATTRIBUTES` with
    /// or without `KVM_MEMORY_ATTRIBUTE_PRIVATE`). An executor without a VM fd returns
    /// `Ok(())` and does nothing.
    fn set_attributes(&mut self, op: &AttributesOp) -> Result<(), OpError>;

    /// Releases the shared backing of a region range (`fallocate(PUNCH_HOLE)` on a file,
    /// `madvise(MADV_REMOVE)` on a mapping). Irreversible; the driver runs it last.
    fn discard(&mut self, op: &DiscardOp) -> Result<(), OpError>;
}

impl<E: Executor + ?Sized> Executor for &mut E {
    fn map(&mut self, op: &MapOp) -> Result<(), OpError> {
        (**self).map(op)
    }
    fn unmap(&mut self, op: &UnmapOp) -> Result<u64, OpError> {
        (**self).unmap(op)
    }
    fn set_attributes(&mut self, op: &AttributesOp) -> Result<(), OpError> {
        (**self).set_attributes(op)
    }
    fn discard(&mut self, op: &DiscardOp) -> Result<(), OpError> {
        (**self).discard(op)
    }
}
