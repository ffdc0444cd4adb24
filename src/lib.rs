//! # vfio-gmem
//!
//! Pass PCI devices through to guests whose memory lives in guest_memfd, and keep the
//! IOMMU exactly in step with the guest's private/shared conversions.
//!
//! Layers, bottom up:
//!
//! | module | responsibility |
//! |---|---|
//! | `sys` (crate-private) | raw uAPI: binding re-exports, ioctl numbers, the only `ioctl(2)` calls |
//! | [`mapper`] | the map/unmap interface both backends implement |
//! | [`iommufd`] | `/dev/iommu`, IOAS, HWPT: one type per kernel object |
//! | [`vfio`] | PCI discovery and binding, VFIO cdev devices, legacy group/container |
//! | [`gmem`] | guest_memfd creation/adoption and the KVM glue (memory attributes) |
//! | [`dma`] | guest memory model, the pure conversion planner, executors, the DMA space |
//! | [`probe`] | the capability report: what this kernel can do, and how each answer is known |
//! | [`engine`] | advanced tier: device DMA engines (edu) that prove with real DMA what a mapping lets through |
//! | [`handoff`] | a privileged helper hands VFIO/iommufd fds to an unprivileged VMM (`SCM_RIGHTS`) |

#![deny(missing_docs)]
pub mod dma;
pub mod engine;
pub mod gmem;
pub mod handoff;
pub mod iommufd;
pub mod mapper;
pub mod peer;
pub mod probe;
pub(crate) mod sys;
pub mod vfio;

/// Compile-time proof of the thread-safety contract documented in the README ("Threads")
/// and on [`dma::DmaSpace`]: these types are `Send + Sync` (or, for `BarMapping`, `Send`
/// only). Removing one of these bounds breaks the build here, not a VMM.
mod thread_safety {
    use crate::{dma, gmem, iommufd, vfio};

    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}

    const _: () = {
        // Shared behind Arc<Mutex<_>> / Arc<RwLock<_>>; mutation takes &mut self.
        send_sync::<dma::DmaSpace>();
        send_sync::<dma::planning::Tracker>();
        #[cfg(feature = "testing")]
        send_sync::<dma::FakeKernel>();
        // Errors cross threads (anyhow, join handles).
        send_sync::<dma::SpaceError>();
        send_sync::<dma::planning::DmaError>();
        send_sync::<iommufd::Error>();
        send_sync::<vfio::VfioError>();
        send_sync::<gmem::GmemError>();
        // Kernel objects: ioctls take &self; Ioas serializes map/unmap internally.
        send_sync::<iommufd::Iommufd>();
        send_sync::<iommufd::Ioas>();
        send_sync::<iommufd::Hwpt>();
        send_sync::<vfio::Device>();
        send_sync::<vfio::Container>();
        send_sync::<vfio::Group>();
        send_sync::<vfio::EventFd>();
        send_sync::<vfio::PciSysfs>();
        send_sync::<vfio::Binder>();
        send_sync::<gmem::KvmVm>();
        send_sync::<gmem::KvmVm<std::sync::Arc<kvm_ioctls::VmFd>>>();
        send_sync::<gmem::GuestMemfd>();
        send_sync::<gmem::Memfd>();
        send_sync::<gmem::MappedMemory>();
        // MMIO registers: one thread at a time (Mutex it, or map the BAR per thread).
        send::<vfio::BarMapping>();
    };
}
