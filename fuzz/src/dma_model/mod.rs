//! Model check of the conversion planner and the plan driver, driven by arbitrary bytes.
//!
//! The bytes choose a region layout (1–5 regions: `Cut`, `PerGranule` with granules of
//! 4–256 KiB, `Whole`; shared or private at start; identity or shuffled IOVAs, negative
//! offsets, addresses near the top of the 64-bit space) and then up to [`MAX_STEPS`]
//! steps: conversion batches (1–6 requests: targeted, nested, adjacent, overlapping,
//! unaligned, out of range, zero or wrapping lengths, discard on shared), region
//! registrations (valid, overlapping, malformed) and removals, each optionally with an
//! executor failure injected at any call, also during the rollback.
//!
//! Everything runs through [`Tracker`]'s planner, [`execute`] and [`FakeKernel`], and
//! is checked against a model that keeps one `bool` per page:
//! - planner errors: exactly the error the model predicts (kind and key fields), and
//!   nothing is called;
//! - after every kernel call (forward and undo): no page private in KVM is mapped, no
//!   page mapped before the step and shared after it is unmapped, every area lies in its
//!   region at the offset matching its IOVA; a discard only hits private, unmapped pages;
//! - after every step: kernel areas == tracker areas; mapped IOVA == the model's shared
//!   pages; KVM attributes == tracker == model; strategy shapes hold (one area per
//!   granule, one area per `Whole` region);
//! - a failed execution fails exactly at the injected call; `RolledBack` leaves the model
//!   state; `NotDiscarded` reaches the new state; `RollbackFailed` reports the touched
//!   pages truthfully and planning the same request again repairs it;
//! - at the end every region is removed and no area is left.
//!
//! Violations panic (a crash for libFuzzer, a failure for the host test).

mod gen;
mod model;
mod watch;
mod world;
#[allow(unused_imports)]
use gen::*;
#[allow(unused_imports)]
use model::*;
#[allow(unused_imports)]
use watch::*;
#[allow(unused_imports)]
use world::*;

use arbitrary::Unstructured;
use std::ops::Range;
use vfio_gmem::dma::planning::{
    execute, Area, AttributesOp, Backing, DiscardOp, MapOp, Op, Plan, RangeSet, RegionSpec,
    Tracker, UnmapOp,
};
use vfio_gmem::dma::{
    ConversionRequest, ExecError, Executor, FakeKernel, OpError, Outcome, PageState, PlanError,
    RegionId, Stats, Strategy, TouchedState, PAGE_SIZE,
};

const P: u64 = PAGE_SIZE;
/// Steps after the layout, at most.
pub const MAX_STEPS: usize = 40;
/// Largest region the model holds, in pages; valid larger specs are not registered.
const MAX_REGION_PAGES: u64 = 256;
/// Regions alive at once, at most (registrations beyond are skipped).
const MAX_REGIONS: usize = 8;
const ERRNOS: [i32; 6] = [
    libc::EIO,
    libc::ENOMEM,
    libc::EFAULT,
    libc::EINVAL,
    libc::ENOENT,
    libc::EEXIST,
];

/// A deliberate executor bug, to prove the checks catch one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// The fake kernel as it is.
    None,
    /// Unmaps report the bytes the plan expects but remove nothing.
    SkipUnmaps,
    /// Attribute changes to shared are acknowledged but not made.
    SkipSharedAttributes,
}

/// What one run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Steps run (layout registrations included).
    pub steps: u64,
    /// Conversion requests generated.
    pub requests: u64,
    /// Conversion batches that reached their new state.
    pub batches: u64,
    /// Requests the planner refused (as the model predicted).
    pub plan_errors: u64,
    /// Regions registered.
    pub registered: u64,
    /// Regions removed.
    pub deregistered: u64,
    /// Executions that failed on an injected fault.
    pub faults: u64,
    /// ... and were rolled back.
    pub rolled_back: u64,
    /// ... and whose rollback failed too (then repaired).
    pub rollback_failed: u64,
    /// ... and failed only in a discard.
    pub not_discarded: u64,
    /// Fake kernel calls, failed and undo calls included.
    pub calls: u64,
}

impl Summary {
    /// Adds `o`'s counters.
    pub fn add(&mut self, o: &Summary) {
        self.steps += o.steps;
        self.requests += o.requests;
        self.batches += o.batches;
        self.plan_errors += o.plan_errors;
        self.registered += o.registered;
        self.deregistered += o.deregistered;
        self.faults += o.faults;
        self.rolled_back += o.rolled_back;
        self.rollback_failed += o.rollback_failed;
        self.not_discarded += o.not_discarded;
        self.calls += o.calls;
    }
}

/// Runs the model check on `data` against the fake kernel.
pub fn run(data: &[u8]) -> Summary {
    run_with(data, Sabotage::None)
}

/// Runs the model check with a deliberately broken executor (see [`Sabotage`]).
pub fn run_with(data: &[u8], sabotage: Sabotage) -> Summary {
    let mut u = Unstructured::new(data);
    let mut w = World {
        mem: Tracker::new(),
        k: FakeKernel::new(),
        model: Model::default(),
        retired: Vec::new(),
        sabotage,
        sum: Summary::default(),
    };
    for spec in gen_layout(&mut u) {
        w.register(spec, None);
    }
    let mut steps = 0;
    while steps < MAX_STEPS && !u.is_empty() {
        steps += 1;
        let fault = gen_fault(&mut u);
        match int(&mut u, 0, 31) {
            0..=23 if !w.model.regions.is_empty() => {
                let reqs = gen_batch(&mut u, &w.model);
                w.batch(reqs, fault);
            }
            24..=26 => {
                let n = w.model.regions.len() as u64;
                if n == 0 || chance(&mut u, 1, 8) {
                    w.deregister_unknown();
                } else {
                    let i = int(&mut u, 0, n - 1) as usize;
                    w.deregister(i, fault);
                }
            }
            _ => {
                let spec = gen_register(&mut u, &w.model, &w.retired);
                if w.model.regions.len() < MAX_REGIONS {
                    w.register(spec, fault);
                }
            }
        }
    }
    // Teardown, as `vfio-gmem assign` does at exit: every region unmapped.
    while !w.model.regions.is_empty() {
        w.deregister(0, None);
    }
    assert_eq!(
        w.k.area_count(),
        0,
        "areas left after removing every region"
    );
    w.sum.calls = w.k.counts().calls;
    w.sum
}

// ------------------------------------------------------------------ byte helpers

fn int(u: &mut Unstructured, lo: u64, hi: u64) -> u64 {
    u.int_in_range(lo..=hi).unwrap_or(lo)
}

fn chance(u: &mut Unstructured, num: u8, den: u8) -> bool {
    u.ratio(num, den).unwrap_or(false)
}

fn any_u64(u: &mut Unstructured) -> u64 {
    u.arbitrary().unwrap_or(0)
}

fn pick<T: Copy>(u: &mut Unstructured, items: &[T]) -> T {
    items[int(u, 0, items.len() as u64 - 1) as usize]
}
