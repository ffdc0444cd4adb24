//! [`DmaSpace`]: guest memory as devices see it. Owns the IOMMU mappings of a VM's RAM
//! regions and keeps them in step with private/shared conversions.
//!
//! Invariants:
//! - memory is mapped only after a device is attached, so every mapping path was decided
//!   against an IOAS with a real domain (MAP_FILE pins lazily and lies otherwise);
//! - going private: the IOVA is unmapped before KVM flips the attribute and before the
//!   shared backing is discarded; going shared: mapped after the attribute flips;
//! - a page that stays shared is never unmapped (the planner's invariant; `Cut` needs a
//!   compat IOAS with huge pages disabled, verified by [`DmaSpace::attach`]'s probe);
//! - the tracker equals the kernel after every call, successful or not;
//! - conversion listeners release pages going private before the plan runs and are
//!   granted pages going shared after it ran (`listeners`).

mod attach;
mod core;
mod hugetlb;
mod listeners;
pub(crate) mod probe;
mod region;
mod revoked;
mod types;

pub use self::core::DmaSpace;
pub use listeners::{ConversionListener, ListenerError, ListenerId};
pub use revoked::Revoked;
pub use types::{
    CutSupport, GuestRegion, MapPath, RegionReport, SharedMemory, SpaceError, SpaceOptions,
    UserAddress,
};
