//! Guest memory model, the pure conversion planner and the executors that apply plans.
//!
//! Split of responsibilities:
//! - [`GuestMemory`] tracks regions, one attribute bit per 4 KiB page and the live IOMMU
//!   areas; its `plan_*` methods are pure (`&self`, no I/O) and return a [`Plan`];
//! - [`execute`] runs a plan through an [`Executor`] (the only place calls are issued)
//!   and rolls back on failure;
//! - [`GuestMemory::commit`] / [`GuestMemory::reconcile`] record what really happened.
//!
//! Plan shape (fewer calls is the performance goal): all unmaps, then attribute changes
//! (to private, then to shared), then maps, then discards. One unmap per maximal IOVA run
//! of pages turning private (a `Cut` unmap may remove or cut several areas; a native one
//! removes several whole areas); one attribute call per maximal GPA run that flips; one
//! map per unmapped run (`Cut`) or granule (`PerGranule`).
//!
//! Invariants across the module: the tracker changes only on commit/reconcile; a plan
//! never unmaps a page that stays shared; a page's KVM attribute turns private only after
//! every device mapping of it is gone, and a page is mapped only after it turned shared.
//!
//! [`FakeKernel`] reproduces the kernel's rules for tests and benchmarks.

mod apply;
mod driver;
mod error;
mod exec;
mod executor;
mod fake;
mod memory;
mod model;
mod pages;
mod plan;
mod planner;
mod ranges;
mod space;

pub use driver::{execute, Stats};
pub use error::{DmaError, ExecError, OpError, Outcome, PlanError, TouchedState};
pub use executor::Executor;
pub use fake::{FakeCounts, FakeKernel};
pub use memory::{GuestMemory, Region};
pub use model::{Area, Backing, PageState, RegionId, RegionSpec, Strategy, PAGE_SIZE};
pub use pages::PageBitmap;
pub use plan::{AttributesOp, ConversionRequest, DiscardOp, MapOp, Op, Plan, UnmapKind, UnmapOp};
pub use ranges::RangeSet;
pub(crate) use space::probe_cut;
pub use space::{
    CutSupport, DmaSpace, GuestRegion, MapPath, RegionReport, SharedMemory, SpaceError,
    SpaceOptions,
};
