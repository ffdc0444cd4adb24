//! The DMA map/unmap interface shared by both backends: an iommufd IOAS and a legacy VFIO
//! type1 container. Callers pick a backend or let the library pick, and can always see
//! which one serves them and whether it can map by fd+offset.

// Every public item says what it promises (issue 13); a new undocumented one fails the build.

use std::io;
use std::os::fd::BorrowedFd;

/// Which kernel interface holds the IOMMU mappings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// `/dev/iommu` IOAS, devices attached through their VFIO cdev.
    Iommufd,
    /// `/dev/vfio/vfio` container with the type1v2 IOMMU driver, devices through groups.
    LegacyType1,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Iommufd => "iommufd",
            Backend::LegacyType1 => "legacy-type1",
        })
    }
}

/// Where a mapping goes in the IO address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iova {
    /// Exactly this IOVA; fails if anything is mapped there.
    Fixed(u64),
    /// Any free IOVA the kernel chooses (iommufd only); the chosen IOVA is returned.
    Any,
}

/// Device access rights of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The device may read the memory (`IOMMU_IOAS_MAP_READABLE`, `VFIO_DMA_MAP_FLAG_READ`).
    pub read: bool,
    /// The device may write the memory (`IOMMU_IOAS_MAP_WRITEABLE`, `VFIO_DMA_MAP_FLAG_WRITE`).
    pub write: bool,
}

impl Access {
    /// Read and write: what device DMA to guest RAM needs.
    pub const READ_WRITE: Access = Access {
        read: true,
        write: true,
    };
    /// Read only: the device can fetch but never change the memory.
    pub const READ_ONLY: Access = Access {
        read: true,
        write: false,
    };
}

/// A failed map or unmap, with the errno and an explanation of what to do.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The backend maps by virtual address only (legacy type1); nothing was mapped.
    #[error("{backend} cannot map by fd+offset; map the memory by its virtual address instead")]
    FileMappingUnsupported {
        /// The backend that refused.
        backend: Backend,
    },
    /// The backend cannot choose the IOVA ([`Iova::Any`] on legacy type1); nothing was
    /// mapped.
    #[error("{backend} cannot let the kernel choose an IOVA; pass a fixed IOVA")]
    AnyIovaUnsupported {
        /// The backend that refused.
        backend: Backend,
    },
    /// The kernel refused the request; `hint` says what usually causes that errno.
    #[error("{op} [{iova:#x}, +{len:#x}) failed: {source}{hint}")]
    Os {
        /// The request (`VFIO_IOMMU_MAP_DMA`, ...).
        op: &'static str,
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// What to do about it (empty when the errno says nothing specific).
        hint: &'static str,
        #[source]
        /// The kernel's error.
        source: io::Error,
    },
    /// A backend's own typed error, which names the object and explains what to do
    /// (e.g. `iommufd::Error`); `errno` is the OS error behind it, if any.
    #[error("{source}")]
    Explained {
        /// The backend that failed.
        backend: Backend,
        /// The errno behind the failure, if there is one (for callers that branch on it).
        errno: Option<i32>,
        #[source]
        /// The backend's own error.
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl MapError {
    /// The OS error number behind this failure, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            MapError::Os { source, .. } => source.raw_os_error(),
            MapError::Explained { errno, .. } => *errno,
            _ => None,
        }
    }

    /// The backend's typed error behind an [`MapError::Explained`], if it is an `E`.
    pub fn explained<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            MapError::Explained { source, .. } => source.downcast_ref::<E>(),
            _ => None,
        }
    }
}

/// Map/unmap guest memory for device DMA, implemented by `iommufd::Ioas` and
/// `vfio::legacy::Container`.
pub trait DmaMapper {
    /// The backend behind this mapper.
    fn backend(&self) -> Backend;

    /// True if [`DmaMapper::map_file`] can work at all on this backend (the kernel may
    /// still refuse a particular file kind, e.g. guest_memfd).
    fn can_map_file(&self) -> bool;

    /// Maps `len` bytes of this process's memory at `va`; returns the IOVA used. The
    /// kernel pins the pages for as long as they are mapped.
    ///
    /// # Safety
    ///
    /// `[va, va + len)` must stay allocated to this use, and not be handed to anything
    /// else (freed, reused by an allocator, unmapped and mapped again), until the range is
    /// unmapped or the mapper destroyed: devices may read and write it at any moment.
    unsafe fn map_user(
        &self,
        iova: Iova,
        va: u64,
        len: u64,
        access: Access,
    ) -> Result<u64, MapError>;

    /// Maps `len` bytes of `fd` from `offset`; returns the IOVA used.
    fn map_file(
        &self,
        iova: Iova,
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Result<u64, MapError>;

    /// Unmaps whole areas inside `[iova, iova+len)`; returns the number of bytes unmapped.
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, MapError>;

    /// Unmaps everything.
    fn unmap_all(&self) -> Result<u64, MapError>;
}
