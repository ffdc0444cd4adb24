//! Guest memory as devices see it: [`DmaSpace`] (the VMM tier, at this module's root)
//! and the pure conversion planner it runs on ([`planning`], the advanced tier).
//!
//! Vocabulary (ranges are half-open, `[start, end)`, in bytes, 4 KiB aligned):
//! - **space**: a [`DmaSpace`], one IOAS (or legacy container) and the regions in it;
//! - **region**: a GPA range of guest RAM with one shared backing, at IOVA = GPA + offset;
//!   convertible or not;
//! - **tracker**: the planner's record ([`planning::Tracker`]) of regions, one
//!   private/shared bit per page and the live areas;
//! - **area**: one IOMMU mapping as the kernel holds it (what one map call created, or
//!   a piece of it after a cut); **run**: a maximal range of pages in one state;
//! - **granule**: the unit of the per-granule strategy (one area each);
//! - **cut**: removing part of an area, leaving the rest mapped with no gap in time;
//!   needs the **compat IOAS** (the iommufd's single VFIO-compat IOAS, huge pages off);
//! - **strategy**: how a region's shared pages become areas ([`Strategy`]).
//!
//! The tree shows where the purity boundary is:
//!
//! | path | role | pure |
//! |---|---|---|
//! | `plan/` | the tracker, the planner (`plan_*`, `&self`, no I/O), plan data, outcomes | yes |
//! | `execute.rs` | runs a plan through an executor in order, rolls back on failure | yes, given the executor |
//! | `executor/` | the `Executor` interface; `kernel` (crate-private: iommufd or legacy map/unmap, KVM attributes, discards), `fake` (feature `testing`) | no |
//! | `space/` | [`DmaSpace`]: owns the kernel objects and regions' backings; every kernel call it makes goes through `executor::kernel` or an object method | no |
//!
//! Imports go one way: `space` → `execute` → `executor` → `plan`, and nothing in `plan/`
//! imports anything outside it (a unit test reads the `use` lines and fails on a circle).
//! The tracker's `commit` / `reconcile` record what really happened.
//!
//! Kernel calls of a space take one route: every map, unmap, attribute change and
//! discard is a plan op issued by `executor::kernel` (logged in order at target
//! `vfio_gmem::dma::exec`), which finds a region's memory in what the space owns (plans
//! name regions, never fds). What is not a plan op is a method of the kernel object it
//! concerns: creating the IOAS and choosing its huge-page and compat settings, attaching
//! and detaching devices (`vfio`), the cut and MAP_FILE probes (`Ioas::probe_*`,
//! crate-private), the revocation check (`Ioas::revoked`). The one KVM call outside a
//! plan, seeding a new convertible region's attributes, goes through the executor's KVM
//! half before the plan runs (its undo depends on what KVM held before, which no plan op
//! can express).
//!
//! Plan shape (fewer calls is the performance goal): all unmaps, then attribute changes
//! (to private, then to shared), then maps, then discards. One unmap per maximal run of
//! *requested* IOVA of one unmap kind (adjacent or overlapping requests merge into one
//! run; pages already private inside a run do not split it, since both unmaps skip
//! unmapped holes), spanning from the run's first mapped page to its last; a run with
//! nothing mapped issues none. A `Cut` unmap may remove or cut several areas; a native
//! one removes several whole areas. One attribute call per maximal GPA run that flips;
//! one map per unmapped run (`Cut`) or granule (`PerGranule`).
//!
//! Invariants across the module: the tracker changes only on commit/reconcile; a plan
//! never unmaps a page that stays shared; a page's KVM attribute turns private only after
//! every device mapping of it is gone, and a page is mapped only after it turned shared.
//!
//! `FakeKernel` (feature `testing`) reproduces the kernel's rules for tests and
//! benchmarks; with `execute`, `Executor` and `KvmAttributes` it is not part of the
//! stable API.

mod execute;
mod executor;
#[cfg(test)]
mod import_graph;
mod plan;
mod space;

/// The fake kernel, for the project's tests and benchmarks (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub use executor::fake::{FakeCounts, FakeKernel};
/// The KVM half of the kernel executor, for the project's VM tests (feature `testing`).
#[cfg(feature = "testing")]
pub use executor::kvm::KvmAttributes;
/// The executor interface, for the project's tests (feature `testing`).
#[cfg(feature = "testing")]
pub use executor::Executor;
pub use plan::error::PlanError;
pub use plan::model::{PageState, RegionId, Strategy, PAGE_SIZE};
pub use plan::ops::ConversionRequest;
pub use plan::outcome::{ExecError, OpError, Outcome, Stats, TouchedState};
pub(crate) use space::probe::{probe_cut, probe_cut_on_attach};
pub use space::{
    ConversionListener, CutSupport, DmaSpace, GuestRegion, ListenerError, ListenerId, MapPath,
    RegionReport, Revoked, SharedMemory, SpaceError, SpaceOptions, UserAddress,
};

/// The advanced tier: the pure planner [`DmaSpace`] runs on, for VMMs that drive their
/// own executor or inspect plans ([`DmaSpace::memory`]). Everything here is computation on
/// the tracker's state, no I/O.
pub mod planning {
    /// The plan driver, for the project's tests and fuzz targets (feature `testing`).
    #[cfg(feature = "testing")]
    pub use super::execute::execute;
    pub use super::plan::model::{Area, Backing, RegionSpec};
    pub use super::plan::ops::{AttributesOp, DiscardOp, MapOp, Op, Plan, UnmapKind, UnmapOp};
    pub use super::plan::outcome::DmaError;
    pub use super::plan::pages::PageBitmap;
    pub use super::plan::ranges::RangeSet;
    pub use super::plan::region::Region;
    pub use super::plan::tracker::Tracker;
}
