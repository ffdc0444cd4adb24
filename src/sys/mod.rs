//! Raw uAPI: binding re-exports, ioctl request numbers and the thin `ioctl` wrappers, and
//! the rtnetlink dump (`netlink`) the host-use inspection lists addresses with.
//!
//! Invariant: every `unsafe` block that issues an ioctl (or, in `unix_socket`, a socket
//! call) lives in this module. Each wrapper
//! fixes the argument type for one request number, so callers stay in safe code.

pub mod ioctl;
pub mod iommufd_bufs;
pub mod kvm_gmem;
pub mod netlink;
pub mod unix_socket;

pub use iommufd_bindings::iommufd as iommufd_uapi;
pub use vfio_bindings::bindings::vfio as vfio_uapi;

pub use ioctl::*;
pub use iommufd_bufs::*;
