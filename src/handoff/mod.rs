//! Handing VFIO/iommufd fds from a privileged helper to an unprivileged VMM.
//!
//! In production a VMM does not run as root. A helper (`vfio-gmem helper`, as root) binds
//! the devices to vfio-pci, and for each VMM that connects to its unix socket checks the
//! peer's credentials (`SO_PEERCRED`) against the uids/gids and devices it was told to
//! allow, opens `/dev/iommu` and the devices' VFIO cdevs (or, on kernels without iommufd,
//! a legacy container with the devices' groups in it), optionally `/dev/kvm`, and passes
//! the fds (`SCM_RIGHTS`). The VMM builds its [`DmaSpace`](crate::dma::DmaSpace) on them
//! like on fds it opened itself.
//!
//! - [`Handoff`]: the VMM's side, a few lines (see its example).
//! - [`protocol`]: the messages; [`Policy`] and [`Leases`]: the helper's decisions;
//!   [`Listener`] and [`Connection`]: the helper's socket.
//! - [`check_memlock`]: the locked-memory check an unprivileged VMM runs before pinning,
//!   whose error names the limit to raise and by how much.
//!
//! The trust model and the protocol are written down in `docs/unprivileged.md`.

mod client;
mod error;
mod memlock;
mod policy;
pub mod protocol;
mod server;

pub use client::Handoff;
pub use error::{HandoffError, ProtocolError};
pub use memlock::{check_memlock, human, MemlockShortfall, Pinned};
pub use policy::{LeaseId, Leases, PeerCred, Policy};
pub use protocol::{FdRole, Refusal, Reply, Request, PROTOCOL_VERSION};
pub use server::{Connection, Listener};
