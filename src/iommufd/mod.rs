//! iommufd objects: the `/dev/iommu` context, IO address spaces and hardware page tables.
//!
//! One type per kernel object, each a thin safe wrapper over its ioctls (issued through
//! the crate-private `sys` module):
//!
//! | type | kernel object | lifetime |
//! |---|---|---|
//! | [`Iommufd`] | the `/dev/iommu` file (context) | closes with the last `Arc` |
//! | [`Ioas`] | `IOMMU_IOAS_ALLOC` IO address space | `IOMMU_DESTROY` on drop; still attached: emptied at once, destroyed once free ([`Iommufd::reap_orphans`]) |
//! | [`Hwpt`] | `IOMMU_HWPT_ALLOC` hardware page table | `IOMMU_DESTROY` on drop |
//!
//! Failures are [`Error`]s that name the object and say what to do. [`Ioas`] also
//! implements [`crate::mapper::DmaMapper`].
//!
//! ```no_run
//! use std::os::fd::AsFd;
//! use std::sync::Arc;
//! use vfio_gmem::iommufd::Iommufd;
//! use vfio_gmem::mapper::{Access, Iova};
//!
//! let iommufd = Arc::new(Iommufd::open()?);
//! let ioas = iommufd.alloc_ioas()?;
//! ioas.set_huge_pages(false)?; // allow hitless splits later (cut_unmap)
//! ioas.set_compat()?;
//! let ram = vfio_gmem::gmem::Memfd::new("ram", 8 * 4096)?;
//! ioas.map_file(Iova::Fixed(0x1_0000_0000), ram.file().as_fd(), 0, 8 * 4096, Access::READ_WRITE)?;
//! ioas.cut_unmap(0x1_0000_2000, 2 * 4096)?; // pages 2 and 3 go, the rest stays mapped
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// Every public item says what it promises (issue 13); a new undocumented one fails the build.

mod areas;
mod compat;
mod error;
mod hwpt;
mod ioas;
#[allow(clippy::module_inception)]
mod iommufd;
mod probes;
mod revoke;
mod split;

pub use error::{Error, MemlockLimit, Span};
pub use hwpt::{HwInfo, HwInfoType, Hwpt, HwptFlags, VtdInfo};
pub use ioas::{AreaRecord, Ioas, IovaRanges};
pub use iommufd::{Iommufd, RlimitMode};
pub(crate) use probes::{CutProbe, MapFileProbe};

/// Result of iommufd operations.
pub type Result<T> = std::result::Result<T, Error>;
