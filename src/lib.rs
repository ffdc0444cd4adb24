//! # vfio-gmem
//!
//! Pass PCI devices through to guests whose memory lives in guest_memfd, and keep the
//! IOMMU exactly in step with the guest's private/shared conversions.
//!
//! Layers, bottom up:
//!
//! | module | responsibility |
//! |---|---|
//! | [`sys`] | raw uAPI: binding re-exports, ioctl numbers, the only `ioctl(2)` calls |
//! | [`mapper`] | the map/unmap interface both backends implement |
//! | [`iommufd`] | `/dev/iommu`, IOAS, HWPT: one type per kernel object |
//! | [`vfio`] | PCI discovery and binding, VFIO cdev devices, legacy group/container |
//! | [`gmem`] | guest_memfd creation/adoption and the KVM glue (memory attributes) |
//! | [`dma`] | guest memory model, the pure conversion planner, executors, the DMA space |
//! | [`probe`] | the capability report: what this kernel can do, and how each answer is known |
//! | [`control`] | the line protocol of `vfio-gmem assign` |

pub mod control;
pub mod dma;
pub mod gmem;
pub mod iommufd;
pub mod mapper;
pub mod probe;
pub mod sys;
pub mod vfio;
