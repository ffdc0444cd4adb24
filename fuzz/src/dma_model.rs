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
//! Everything runs through [`GuestMemory`]'s planner, [`execute`] and [`FakeKernel`], and
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

use arbitrary::Unstructured;
use std::ops::Range;
use vfio_gmem::dma::{
    execute, Area, AttributesOp, Backing, ConversionRequest, DiscardOp, ExecError, Executor,
    FakeKernel, GuestMemory, MapOp, Op, OpError, Outcome, PageState, Plan, PlanError, RangeSet,
    RegionId, RegionSpec, Stats, Strategy, TouchedState, UnmapOp, PAGE_SIZE,
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
        mem: GuestMemory::new(),
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

// ------------------------------------------------------------------ model

#[derive(Clone, Debug)]
struct MRegion {
    id: RegionId,
    spec: RegionSpec,
    iova: u64,
    /// One entry per page; true = private.
    private: Vec<bool>,
}

impl MRegion {
    fn gpa(&self) -> u64 {
        self.spec.gpa
    }
    fn end(&self) -> u64 {
        self.spec.gpa + self.spec.len
    }
    fn pages(&self) -> u64 {
        self.spec.len / P
    }
    fn iova_range(&self) -> Range<u64> {
        self.iova..self.iova + self.spec.len
    }
    fn page(&self, gpa: u64) -> usize {
        ((gpa - self.gpa()) / P) as usize
    }
    fn view(&self) -> View {
        View {
            id: self.id,
            gpa: self.gpa(),
            iova: self.iova,
            len: self.spec.len,
        }
    }
}

/// Maximal runs of indices whose value is `value`.
fn runs(bits: &[bool], value: bool) -> impl Iterator<Item = Range<u64>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < bits.len() && bits[i] != value {
            i += 1;
        }
        if i == bits.len() {
            return None;
        }
        let s = i;
        while i < bits.len() && bits[i] == value {
            i += 1;
        }
        Some(s as u64..i as u64)
    })
}

/// The page-array model: regions sorted by GPA, one bool per page.
#[derive(Clone, Debug, Default)]
struct Model {
    regions: Vec<MRegion>,
}

impl Model {
    fn region_at(&self, gpa: u64) -> Option<&MRegion> {
        self.regions
            .iter()
            .find(|r| r.gpa() <= gpa && gpa < r.end())
    }

    /// Pages of convertible regions contiguous in GPA from `gpa` on.
    fn convertible_pages_from(&self, gpa: u64) -> u64 {
        let mut at = gpa;
        while let Some(r) = self.region_at(at) {
            if r.spec.strategy == Strategy::Whole {
                break;
            }
            at = r.end();
        }
        (at - gpa) / P
    }

    fn insert(&mut self, r: MRegion) {
        let at = self.regions.partition_point(|x| x.gpa() < r.gpa());
        self.regions.insert(at, r);
    }

    fn remove(&mut self, id: RegionId) {
        self.regions.retain(|r| r.id != id);
    }

    /// IOVA a device can reach: shared pages of convertible regions, all of `Whole` ones.
    fn mapped_iova(&self) -> RangeSet {
        let mut s = RangeSet::new();
        for r in &self.regions {
            for p in runs(&r.private, false) {
                s.insert(r.iova + p.start * P..r.iova + p.end * P);
            }
        }
        s
    }

    fn private_gpa(&self) -> RangeSet {
        let mut s = RangeSet::new();
        for r in &self.regions {
            for p in runs(&r.private, true) {
                s.insert(r.gpa() + p.start * P..r.gpa() + p.end * P);
            }
        }
        s
    }

    fn apply(&mut self, reqs: &[ConversionRequest]) {
        for q in reqs {
            for gpa in (q.gpa..q.gpa + q.len).step_by(P as usize) {
                let r = self
                    .regions
                    .iter_mut()
                    .find(|r| r.gpa() <= gpa && gpa < r.end())
                    .expect("validated request");
                let i = r.page(gpa);
                r.private[i] = q.to == PageState::Private;
            }
        }
    }

    /// The error the planner must give for this batch, as [`error_key`] spells it.
    fn expected_batch_error(&self, reqs: &[ConversionRequest]) -> Option<String> {
        for q in reqs {
            if q.gpa % P != 0 {
                return Some(format!("Unaligned {:#x}", q.gpa));
            }
            if q.len % P != 0 {
                return Some(format!("Unaligned {:#x}", q.len));
            }
            if q.len == 0 {
                return Some("Empty".into());
            }
            let Some(end) = q.gpa.checked_add(q.len) else {
                return Some(format!("Overflow {:#x}+{:#x}", q.gpa, q.len));
            };
            let mut cursor = q.gpa;
            while cursor < end {
                let Some(r) = self.region_at(cursor) else {
                    return Some(format!("NotCovered {cursor:#x}"));
                };
                if r.spec.strategy == Strategy::Whole {
                    return Some(format!("NotConvertible {}", r.id));
                }
                let piece_end = end.min(r.end());
                let g = r.spec.granule;
                if r.spec.strategy == Strategy::PerGranule
                    && ((cursor - r.gpa()) % g != 0 || (piece_end - r.gpa()) % g != 0)
                {
                    return Some(format!("GranuleUnaligned {:?}/{g:#x}", cursor..piece_end));
                }
                cursor = piece_end;
            }
            if q.discard && q.to == PageState::Shared {
                return Some(format!("DiscardOnShared {:?}", q.gpa..end));
            }
        }
        let ranges = |to: PageState| -> Vec<Range<u64>> {
            reqs.iter()
                .filter(|q| q.to == to)
                .map(|q| q.gpa..q.gpa + q.len)
                .collect()
        };
        let shared = ranges(PageState::Shared);
        for p in ranges(PageState::Private) {
            if shared.iter().any(|s| s.start < p.end && p.start < s.end) {
                return Some("Conflict".into());
            }
        }
        None
    }

    /// The error the planner must give for registering `s`, as [`error_key`] spells it.
    fn expected_register_error(&self, s: &RegionSpec) -> Option<String> {
        if s.gpa % P != 0 {
            return Some(format!("Unaligned {:#x}", s.gpa));
        }
        if s.len % P != 0 {
            return Some(format!("Unaligned {:#x}", s.len));
        }
        if s.len == 0 {
            return Some("Empty".into());
        }
        let top = u64::MAX as i128;
        let (gpa, len) = (s.gpa as i128, s.len as i128);
        if gpa + len > top {
            return Some(format!("Overflow {:#x}+{:#x}", s.gpa, s.len));
        }
        let iova = gpa + s.iova_offset as i128;
        if !(0..=top).contains(&iova) {
            return Some(format!("Overflow {:#x}+{:#x}", s.gpa, s.len));
        }
        if iova % P as i128 != 0 {
            return Some(format!("Unaligned {iova:#x}"));
        }
        if iova + len > top {
            return Some(format!("Overflow {iova:#x}+{:#x}", s.len));
        }
        let g = s.granule;
        if !g.is_power_of_two() || g < P || (s.strategy == Strategy::PerGranule && s.len % g != 0) {
            return Some(format!("InvalidGranule {g:#x}"));
        }
        if s.convertible != (s.strategy != Strategy::Whole)
            || (!s.convertible && s.initial == PageState::Private)
        {
            return Some("Inconsistent".into());
        }
        let (gpa, iova, end, iova_end) = (s.gpa, iova as u64, s.gpa + s.len, (iova + len) as u64);
        for r in &self.regions {
            if gpa < r.end() && r.gpa() < end {
                return Some(format!("GpaOverlap {}", r.id));
            }
            let i = r.iova_range();
            if iova < i.end && i.start < iova_end {
                return Some(format!("IovaOverlap {}", r.id));
            }
        }
        None
    }
}

/// The planner's error with the fields the model predicts.
fn error_key(e: &PlanError) -> String {
    match e {
        PlanError::Unaligned { value, .. } => format!("Unaligned {value:#x}"),
        PlanError::Empty { .. } => "Empty".into(),
        PlanError::Overflow { start, len, .. } => format!("Overflow {start:#x}+{len:#x}"),
        PlanError::InvalidGranule { granule, .. } => format!("InvalidGranule {granule:#x}"),
        PlanError::Inconsistent(_) => "Inconsistent".into(),
        PlanError::GpaOverlap { existing, .. } => format!("GpaOverlap {existing}"),
        PlanError::IovaOverlap { existing, .. } => format!("IovaOverlap {existing}"),
        PlanError::NotCovered { first_gap_page, .. } => format!("NotCovered {first_gap_page:#x}"),
        PlanError::NotConvertible { region, .. } => format!("NotConvertible {region}"),
        PlanError::GranuleUnaligned { range, granule, .. } => {
            format!("GranuleUnaligned {range:?}/{granule:#x}")
        }
        PlanError::Conflict { .. } => "Conflict".into(),
        PlanError::DiscardOnShared { range } => format!("DiscardOnShared {range:?}"),
        PlanError::UnknownRegion(id) => format!("UnknownRegion {id}"),
        other => format!("unexpected: {other}"),
    }
}

fn intersect(a: &RangeSet, b: &RangeSet) -> RangeSet {
    a.iter()
        .flat_map(|r| b.clipped(r).collect::<Vec<_>>())
        .collect()
}

// ------------------------------------------------------------------ generators

/// 1–5 regions, adjacent or with gaps, at the bottom, the middle or the top of the GPA
/// space, with identity or shuffled IOVAs.
fn gen_layout(u: &mut Unstructured) -> Vec<RegionSpec> {
    let n = int(u, 1, 5) as usize;
    let shapes: Vec<(RegionSpec, u64)> = (0..n)
        .map(|_| {
            let gap = if chance(u, 2, 3) { 0 } else { int(u, 1, 8) * P };
            (gen_shape(u, 0), gap)
        })
        .collect();
    let span: u64 = shapes.iter().map(|(s, g)| s.len + g).sum();
    let top = (u64::MAX - span) & !(P - 1);
    let base = match int(u, 0, 5) {
        0 => 0,
        1 => 16 * P,
        2 => 1 << 32,
        3 => 1 << 52,
        4 => top,
        _ => top + P, // the last region wraps past 2^64
    };
    let mut gpa = base;
    let mut specs: Vec<RegionSpec> = shapes
        .into_iter()
        .map(|(s, gap)| {
            gpa = gpa.wrapping_add(gap);
            let spec = RegionSpec { gpa, ..s };
            gpa = gpa.wrapping_add(s.len);
            spec
        })
        .collect();
    if chance(u, 1, 2) {
        // Shuffled IOVAs: regions in another order, packed from a base of their own.
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, int(u, 0, i as u64) as usize);
        }
        let mut iova = match int(u, 0, 3) {
            0 => 0,
            1 => 1 << 30,
            2 => (u64::MAX - span) & !(P - 1),
            _ => (base / 2) & !(P - 1),
        };
        for i in order {
            if chance(u, 1, 3) {
                iova = iova.wrapping_add(int(u, 1, 8) * P);
            }
            let offset = iova as i128 - specs[i].gpa as i128;
            specs[i].iova_offset = i64::try_from(offset).unwrap_or(0);
            iova = iova.wrapping_add(specs[i].len);
        }
    }
    for s in &mut specs {
        if chance(u, 1, 32) {
            s.iova_offset = s.iova_offset.wrapping_add(int(u, 1, P - 1) as i64);
        }
    }
    specs
}

/// A region of random strategy, granule, size and initial state at `gpa`.
fn gen_shape(u: &mut Unstructured, gpa: u64) -> RegionSpec {
    let strategy = match int(u, 0, 19) {
        0..=8 => Strategy::Cut,
        9..=16 => Strategy::PerGranule,
        _ => Strategy::Whole,
    };
    let (granule, pages) = match strategy {
        Strategy::PerGranule => {
            let gp = pick(u, &[1u64, 2, 4, 8, 16, 64]);
            let units = int(u, 1, (MAX_REGION_PAGES / gp).min(16));
            (gp * P, units * gp)
        }
        _ => {
            let pages = match int(u, 0, 7) {
                0..=5 => int(u, 1, 32),
                6 => int(u, 33, 128),
                _ => int(u, 129, MAX_REGION_PAGES),
            };
            (pick(u, &[1u64, 1, 2, 512]) * P, pages)
        }
    };
    let initial = if strategy != Strategy::Whole && chance(u, 1, 2) {
        PageState::Private
    } else {
        PageState::Shared
    };
    RegionSpec::new(gpa, pages * P, Backing::Opaque(gpa))
        .strategy(strategy)
        .granule(granule)
        .initial(initial)
}

/// A registration: a removed region again, a new one past the others, one overlapping
/// an existing region in GPA or IOVA, or a malformed spec.
fn gen_register(u: &mut Unstructured, model: &Model, retired: &[RegionSpec]) -> RegionSpec {
    match int(u, 0, 7) {
        0..=2 if !retired.is_empty() => {
            let mut s = retired[int(u, 0, retired.len() as u64 - 1) as usize];
            if s.convertible && chance(u, 1, 2) {
                s.initial = s.initial.flip();
            }
            s
        }
        0..=5 => {
            let gpa_end = model.regions.iter().map(|r| r.end()).max().unwrap_or(0);
            let iova_end = model
                .regions
                .iter()
                .map(|r| r.iova_range().end)
                .max()
                .unwrap_or(0);
            let gpa = gpa_end.wrapping_add(int(u, 0, 4) * P);
            let mut s = gen_shape(u, gpa);
            let iova = iova_end.max(gpa).wrapping_add(int(u, 0, 2) * P);
            s.iova_offset = i64::try_from(iova as i128 - gpa as i128).unwrap_or(0);
            s
        }
        6 if !model.regions.is_empty() => {
            let r = &model.regions[int(u, 0, model.regions.len() as u64 - 1) as usize];
            let mut s = gen_shape(u, r.gpa());
            let shift = int(u, 0, r.pages() + 1) * P;
            if chance(u, 1, 2) {
                // Overlaps in GPA.
                s.gpa = r.gpa().wrapping_add(shift).wrapping_sub(P);
                s.shared = Backing::Opaque(s.gpa);
            } else {
                // Free GPA (past everything), IOVA inside `r`'s.
                s.gpa = model.regions.iter().map(|r| r.end()).max().unwrap_or(0);
                let iova = r.iova.wrapping_add(shift).wrapping_sub(P);
                s.iova_offset = (iova as i128 - s.gpa as i128) as i64;
            }
            s
        }
        _ => {
            let mut s = gen_shape(u, 0);
            s.gpa = any_u64(u);
            if chance(u, 1, 2) {
                s.gpa &= !(P - 1);
            }
            if chance(u, 1, 2) {
                s.len = any_u64(u);
            }
            if chance(u, 1, 3) {
                s.iova_offset = u.arbitrary().unwrap_or(0);
            }
            if chance(u, 1, 3) {
                s.granule = any_u64(u);
            }
            if chance(u, 1, 4) {
                s.convertible = !s.convertible;
            }
            if chance(u, 1, 4) {
                s.initial = s.initial.flip();
            }
            s
        }
    }
}

/// Mostly valid: `[gpa, gpa+len)` aligned to the granule of the `PerGranule` region it
/// starts in and trimmed to the convertible memory from there on (regions adjacent in
/// GPA included).
fn tidy(model: &Model, mut gpa: u64, len: u64) -> (u64, u64) {
    let Some(r) = model.region_at(gpa) else {
        return (gpa, len);
    };
    let g = match r.spec.strategy {
        Strategy::PerGranule => r.spec.granule,
        _ => P,
    };
    gpa = r.gpa() + (gpa - r.gpa()) / g * g;
    let span = model.convertible_pages_from(gpa);
    if span == 0 {
        return (gpa, len);
    }
    let pages = 1 + (len / P).saturating_sub(1) % span;
    (gpa, (pages * P).div_ceil(g) * g)
}

/// 1–6 requests; later ones often relative to the one before (same, nested, adjacent,
/// overlapping).
fn gen_batch(u: &mut Unstructured, model: &Model) -> Vec<ConversionRequest> {
    let n = match int(u, 0, 7) {
        0..=3 => 1,
        4..=6 => int(u, 2, 3),
        _ => int(u, 4, 6),
    };
    let mut reqs: Vec<ConversionRequest> = Vec::new();
    for _ in 0..n {
        let q = gen_request(u, model, reqs.last());
        reqs.push(q);
    }
    reqs
}

fn gen_request(
    u: &mut Unstructured,
    model: &Model,
    prev: Option<&ConversionRequest>,
) -> ConversionRequest {
    let kind = int(u, 0, 127);
    let (mut gpa, mut len) = if model.regions.is_empty() || kind >= 126 {
        // Anywhere, any length.
        let mut gpa = any_u64(u);
        let mut len = any_u64(u);
        if chance(u, 1, 2) {
            gpa &= !(P - 1);
        }
        if chance(u, 1, 2) {
            len = int(u, 0, 64) * P;
        }
        if chance(u, 1, 2) {
            len &= !(P - 1);
        }
        (gpa, len)
    } else if let (80..=125, Some(p)) = (kind, prev) {
        let pages = (p.len / P).clamp(1, 4 * MAX_REGION_PAGES);
        match int(u, 0, 4) {
            // the same range
            0 => (p.gpa, p.len),
            // nested
            1 => {
                let s = int(u, 0, pages - 1);
                (p.gpa.wrapping_add(s * P), int(u, 1, pages - s) * P)
            }
            // adjacent after
            2 => (p.gpa.wrapping_add(p.len), int(u, 1, 16) * P),
            // adjacent before
            3 => {
                let l = int(u, 1, 16) * P;
                (p.gpa.wrapping_sub(l), l)
            }
            // overlapping, shifted
            _ => (p.gpa.wrapping_add(int(u, 1, pages) * P), p.len),
        }
    } else {
        // Inside a region (mostly a convertible one; or one page before it), mostly
        // granule aligned.
        let convertible: Vec<&MRegion> = model
            .regions
            .iter()
            .filter(|r| r.spec.strategy != Strategy::Whole)
            .collect();
        let r = if !convertible.is_empty() && chance(u, 7, 8) {
            convertible[int(u, 0, convertible.len() as u64 - 1) as usize]
        } else {
            &model.regions[int(u, 0, model.regions.len() as u64 - 1) as usize]
        };
        let mut gpa = r.gpa() + int(u, 0, r.pages() - 1) * P;
        if chance(u, 1, 64) {
            gpa = r.gpa().wrapping_sub(P);
        }
        let pages = match int(u, 0, 9) {
            0..=5 => int(u, 1, 8),
            6..=8 => int(u, 1, 64),
            _ => int(u, 1, 4 * MAX_REGION_PAGES),
        };
        (gpa, pages * P)
    };
    if chance(u, 31, 32) {
        (gpa, len) = tidy(model, gpa, len);
    }
    // Malformed now and then: unaligned, empty, wrapping past 2^64.
    match int(u, 0, 127) {
        0 => gpa = gpa.wrapping_add(int(u, 1, P - 1)),
        1 => len = len.wrapping_add(int(u, 1, P - 1)),
        2 => len = 0,
        3 => {
            len = (u64::MAX - gpa)
                .wrapping_add(1)
                .wrapping_add(int(u, 0, 4) * P)
        }
        _ => {}
    }
    let to = match int(u, 0, 3) {
        _ if prev.is_some() && (80..=125).contains(&kind) && chance(u, 7, 8) => {
            prev.map(|p| p.to).unwrap_or(PageState::Private)
        }
        0 => PageState::Private,
        1 => PageState::Shared,
        // the other state than the first page's
        _ => match model.region_at(gpa) {
            Some(r) if r.private[r.page(gpa)] => PageState::Shared,
            _ => PageState::Private,
        },
    };
    let discard = if to == PageState::Private {
        chance(u, 1, 4)
    } else {
        chance(u, 1, 64)
    };
    ConversionRequest {
        gpa,
        len,
        to,
        discard,
    }
}

#[derive(Clone, Copy, Debug)]
struct Fault {
    /// Plan op index (mod the plan length + 1; the extra value means "after the plan").
    at: u64,
    errno: i32,
    /// Calls after the first fault at which a second one hits (during the rollback).
    second: Option<(u64, i32)>,
}

fn gen_fault(u: &mut Unstructured) -> Option<Fault> {
    if !chance(u, 1, 4) {
        return None;
    }
    let at = int(u, 0, 255);
    let errno = pick(u, &ERRNOS);
    let second = if chance(u, 1, 2) {
        Some((int(u, 0, 15), pick(u, &ERRNOS)))
    } else {
        None
    };
    Some(Fault { at, errno, second })
}

// ------------------------------------------------------------------ the watched kernel

#[derive(Clone, Copy, Debug)]
struct View {
    id: RegionId,
    gpa: u64,
    iova: u64,
    len: u64,
}

/// The fake kernel behind an executor that checks the safety invariants after every call.
struct Watch<'a> {
    k: &'a mut FakeKernel,
    views: Vec<View>,
    /// IOVA that must stay mapped throughout (mapped before, shared after).
    keep: RangeSet,
    sabotage: Sabotage,
}

impl Watch<'_> {
    fn view(&self, id: RegionId) -> View {
        *self
            .views
            .iter()
            .find(|v| v.id == id)
            .unwrap_or_else(|| panic!("kernel area of unknown {id}"))
    }

    /// Every invariant over the whole kernel state (before and after a plan).
    fn check_all(&self, when: &str) {
        let mapped = self.k.mapped();
        for r in self.keep.iter() {
            assert!(
                mapped.contains_range(r.clone()),
                "{when}: IOVA {r:?}, mapped before and shared after, is unmapped"
            );
        }
        for a in self.k.areas() {
            let v = self.view(a.region);
            assert!(
                a.iova >= v.iova && a.iova + a.len <= v.iova + v.len,
                "{when}: area {a:?} outside its region {v:?}"
            );
            assert_eq!(
                a.iova - v.iova,
                a.offset,
                "{when}: area {a:?} maps the wrong offset"
            );
            let gpa = v.gpa + a.offset;
            assert!(
                !self.k.private().intersects(gpa..gpa + a.len),
                "{when}: area {a:?} maps a page private in KVM ({:?})",
                self.k.private()
            );
        }
    }

    /// True if any page of the IOVA range is mapped.
    fn any_mapped(&self, r: Range<u64>) -> bool {
        r.step_by(P as usize).any(|iova| self.k.is_mapped(iova))
    }
}

/// Each call is checked where it can have an effect (its own range), so a plan of many
/// calls stays cheap to watch; [`Watch::check_all`] runs before and after the plan.
impl Executor for Watch<'_> {
    fn map(&mut self, op: &MapOp) -> Result<(), OpError> {
        let r = self.k.map(op);
        if r.is_ok() {
            let v = self.view(op.region);
            assert!(
                op.iova >= v.iova
                    && op.iova + op.len <= v.iova + v.len
                    && op.iova - v.iova == op.offset,
                "{op:?} maps outside its region {v:?} or the wrong offset"
            );
            let gpa = v.gpa + op.offset;
            assert!(
                !self.k.private().intersects(gpa..gpa + op.len),
                "{op:?} maps a page private in KVM ({:?})",
                self.k.private()
            );
        }
        r
    }

    fn unmap(&mut self, op: &UnmapOp) -> Result<u64, OpError> {
        if self.sabotage == Sabotage::SkipUnmaps {
            return Ok(op.expected_bytes());
        }
        let r = self.k.unmap(op);
        for piece in self.keep.clipped(op.iova..op.iova + op.len) {
            assert!(
                piece
                    .clone()
                    .step_by(P as usize)
                    .all(|iova| self.k.is_mapped(iova)),
                "{op:?} unmaps IOVA in {piece:?}, mapped before and shared after"
            );
        }
        r
    }

    fn set_attributes(&mut self, op: &AttributesOp) -> Result<(), OpError> {
        if self.sabotage == Sabotage::SkipSharedAttributes && !op.private {
            return Ok(());
        }
        let r = self.k.set_attributes(op);
        if r.is_ok() && op.private {
            for v in &self.views {
                let (s, e) = (op.gpa.max(v.gpa), (op.gpa + op.len).min(v.gpa + v.len));
                if s < e {
                    let iova = v.iova + (s - v.gpa)..v.iova + (e - v.gpa);
                    assert!(
                        !self.any_mapped(iova.clone()),
                        "{op:?} makes GPA [{s:#x}, {e:#x}) private while IOVA {iova:x?} is mapped"
                    );
                }
            }
        }
        r
    }

    fn discard(&mut self, op: &DiscardOp) -> Result<(), OpError> {
        let v = self.view(op.region);
        let gpa = v.gpa + op.offset;
        assert_eq!(gpa, op.gpa, "discard {op:?}: GPA and offset disagree");
        assert!(
            self.k.private().contains_range(gpa..gpa + op.len),
            "discard {op:?} of pages not private in KVM"
        );
        let iova = v.iova + op.offset;
        assert!(
            !self.any_mapped(iova..iova + op.len),
            "discard {op:?} of pages still mapped"
        );
        self.k.discard(op)
    }
}

// ------------------------------------------------------------------ the world

struct World {
    mem: GuestMemory,
    k: FakeKernel,
    model: Model,
    /// Specs of removed regions, for registering them again.
    retired: Vec<RegionSpec>,
    sabotage: Sabotage,
    sum: Summary,
}

/// A fault as injected: op index, errno, and whether a second one may hit the rollback.
type Injected = Option<(u64, i32, bool)>;

impl World {
    /// Runs `plan` through the watched kernel with `fault` injected.
    fn exec(
        &mut self,
        plan: &Plan,
        keep: RangeSet,
        extra: Option<View>,
        fault: Option<Fault>,
    ) -> (Result<Stats, ExecError>, Injected) {
        self.k.clear_faults();
        let n = plan.ops().len() as u64;
        let mut injected = None;
        if let Some(f) = fault {
            let at = f.at % (n + 1);
            if at < n {
                let base = self.k.calls();
                self.k.fail_call(base + at, f.errno);
                if let Some((j, errno)) = f.second {
                    self.k.fail_call(base + at + 1 + j, errno);
                }
                injected = Some((at, f.errno, f.second.is_some()));
            }
        }
        let mut views: Vec<View> = self.model.regions.iter().map(MRegion::view).collect();
        views.extend(extra);
        let mut watch = Watch {
            k: &mut self.k,
            views,
            keep,
            sabotage: self.sabotage,
        };
        watch.check_all("before the plan");
        let r = execute(plan, &mut watch);
        watch.check_all("after the plan");
        self.k.clear_faults();
        (r, injected)
    }

    fn check_success(&self, plan: &Plan, stats: &Stats, injected: Injected) {
        if let Some((at, errno, _)) = injected {
            panic!("op {at} was made to fail with errno {errno}, yet the plan succeeded");
        }
        assert_eq!(stats.ioctls, plan.ops().len() as u64, "calls != ops");
        assert_eq!(
            stats.unmap_size_mismatches, 0,
            "kernel unmapped other byte counts"
        );
        assert_eq!(plan.areas_after(), self.k.area_count(), "plan's area count");
    }

    /// Checks a failed execution against the fault injected, then reconciles.
    fn failed(&mut self, plan: Plan, e: &ExecError, injected: Injected) {
        let (at, errno, second) =
            injected.unwrap_or_else(|| panic!("plan failed without an injected fault: {e}"));
        assert_eq!(e.op_index as u64, at, "failed at another op: {e}");
        assert_eq!(e.error.errno, errno, "failed with another errno: {e}");
        let msg = e.to_string();
        self.sum.faults += 1;
        match &e.outcome {
            Outcome::RolledBack => {
                assert!(msg.contains("rolled back"), "{msg}");
                self.sum.rolled_back += 1;
            }
            Outcome::NotDiscarded { .. } => {
                assert!(matches!(plan.ops()[at as usize], Op::Discard(_)), "{msg}");
                assert!(msg.contains("not discarded"), "{msg}");
                self.sum.not_discarded += 1;
            }
            Outcome::RollbackFailed { state, .. } => {
                assert!(second, "a single fault left a failed rollback: {msg}");
                check_touched(&self.k, state);
                assert!(msg.contains("reconcile"), "{msg}");
                self.sum.rollback_failed += 1;
            }
        }
        self.mem.reconcile(plan, e).expect("reconcile a fresh plan");
        let ta: Vec<Area> = self.mem.areas().copied().collect();
        let ka: Vec<Area> = self.k.areas().copied().collect();
        assert_eq!(
            ta, ka,
            "tracker areas != kernel areas after reconcile: {msg}"
        );
        for r in self.mem.regions() {
            let tracker: RangeSet = r.runs(r.gpa_range(), PageState::Private).collect();
            let kernel: RangeSet = self.k.private().clipped(r.gpa_range()).collect();
            assert_eq!(
                tracker, kernel,
                "tracker attributes != KVM after reconcile: {msg}"
            );
        }
    }

    fn batch(&mut self, reqs: Vec<ConversionRequest>, fault: Option<Fault>) {
        self.sum.steps += 1;
        self.sum.requests += reqs.len() as u64;
        let expected = self.model.expected_batch_error(&reqs);
        let (generation, calls) = (self.mem.generation(), self.k.calls());
        let plan = match self.mem.plan_batch(&reqs) {
            Err(e) => {
                assert_eq!(
                    Some(error_key(&e)),
                    expected,
                    "planner refused {reqs:x?}: {e}"
                );
                assert!(!e.to_string().is_empty());
                assert_eq!((self.mem.generation(), self.k.calls()), (generation, calls));
                self.sum.plan_errors += 1;
                return;
            }
            Ok(p) => p,
        };
        assert_eq!(expected, None, "planner accepted {reqs:x?}");
        assert_eq!(plan.areas_before(), self.mem.area_count());
        let mut after = self.model.clone();
        after.apply(&reqs);
        let keep = intersect(&self.k.mapped(), &after.mapped_iova());
        let (r, injected) = self.exec(&plan, keep, None, fault);
        match r {
            Ok(stats) => {
                self.check_success(&plan, &stats, injected);
                self.mem.commit(plan).expect("commit a fresh plan");
                self.model = after;
                self.check_discards(&reqs, &RangeSet::new());
                self.sum.batches += 1;
            }
            Err(e) => {
                self.failed(plan, &e, injected);
                match &e.outcome {
                    Outcome::RolledBack => self.check_world("rolled back batch"),
                    Outcome::NotDiscarded { ranges } => {
                        self.model = after;
                        self.check_discards(&reqs, ranges);
                        self.sum.batches += 1;
                    }
                    Outcome::RollbackFailed { .. } => {
                        let again = self
                            .mem
                            .plan_batch(&reqs)
                            .expect("the batch plans again after a failed rollback");
                        let keep = intersect(&self.k.mapped(), &after.mapped_iova());
                        let (r, _) = self.exec(&again, keep, None, None);
                        let stats = r.unwrap_or_else(|e| panic!("repair failed: {e}"));
                        self.check_success(&again, &stats, None);
                        self.mem.commit(again).expect("commit a fresh plan");
                        self.model = after;
                        self.sum.batches += 1;
                    }
                }
            }
        }
        self.check_world("batch");
    }

    /// Every discard requested and not reported failed reached the kernel.
    fn check_discards(&self, reqs: &[ConversionRequest], failed: &RangeSet) {
        for q in reqs.iter().filter(|q| q.discard) {
            for r in &self.model.regions {
                let (s, e) = (q.gpa.max(r.gpa()), (q.gpa + q.len).min(r.end()));
                if s >= e {
                    continue;
                }
                let done = self.k.discarded(r.id);
                for g in failed.gaps(s..e) {
                    let off = g.start - r.gpa()..g.end - r.gpa();
                    assert!(
                        done.is_some_and(|d| d.contains_range(off.clone())),
                        "discard of {} offsets {off:x?} missing",
                        r.id
                    );
                }
            }
        }
    }

    fn register(&mut self, spec: RegionSpec, fault: Option<Fault>) {
        self.sum.steps += 1;
        let expected = self.model.expected_register_error(&spec);
        if expected.is_none() && spec.len / P > MAX_REGION_PAGES {
            return; // valid, but too large for the page-array model
        }
        let (generation, calls) = (self.mem.generation(), self.k.calls());
        let plan = match self.mem.plan_register(spec) {
            Err(e) => {
                assert_eq!((self.mem.generation(), self.k.calls()), (generation, calls));
                assert_eq!(
                    Some(error_key(&e)),
                    expected,
                    "planner refused {spec:x?}: {e}"
                );
                assert!(!e.to_string().is_empty());
                self.sum.plan_errors += 1;
                return;
            }
            Ok(p) => p,
        };
        assert_eq!(expected, None, "planner accepted {spec:x?}");
        let id = plan.registered_region().expect("a registration plan");
        assert!(self.mem.region(id).is_none(), "{id} reused");
        // The tracker assumes the KVM attributes already match the initial state.
        let private = spec.initial == PageState::Private;
        self.k
            .set_attributes(&AttributesOp {
                gpa: spec.gpa,
                len: spec.len,
                private,
            })
            .expect("set initial attributes");
        let new = MRegion {
            id,
            spec,
            iova: spec.iova().expect("validated"),
            private: vec![private; (spec.len / P) as usize],
        };
        let view = new.view();
        let mut after = self.model.clone();
        after.insert(new);
        let keep = self.k.mapped();
        let (r, injected) = self.exec(&plan, keep, Some(view), fault);
        match r {
            Ok(stats) => {
                self.check_success(&plan, &stats, injected);
                self.mem.commit(plan).expect("commit a fresh plan");
                self.model = after;
                self.sum.registered += 1;
            }
            Err(e) => {
                self.failed(plan, &e, injected);
                match &e.outcome {
                    Outcome::RolledBack => {
                        assert!(
                            self.mem.region(id).is_none(),
                            "rolled back {id} still registered"
                        );
                    }
                    Outcome::NotDiscarded { .. } => panic!("a registration has no discard: {e}"),
                    Outcome::RollbackFailed { .. } => {
                        // Some areas stayed: the tracker keeps the region; remove it.
                        if self.mem.region(id).is_some() {
                            let plan = self.mem.plan_deregister(id).expect("registered");
                            let keep = self.model.mapped_iova();
                            let (r, _) = self.exec(&plan, keep, Some(view), None);
                            let stats = r.unwrap_or_else(|e| panic!("cleanup failed: {e}"));
                            self.check_success(&plan, &stats, None);
                            self.mem.commit(plan).expect("commit a fresh plan");
                        }
                        assert!(self.mem.region(id).is_none());
                    }
                }
            }
        }
        self.check_world("register");
    }

    fn deregister_unknown(&mut self) {
        self.sum.steps += 1;
        let id = RegionId(u64::MAX);
        let e = self.mem.plan_deregister(id).expect_err("no such region");
        assert_eq!(error_key(&e), format!("UnknownRegion {id}"));
    }

    fn deregister(&mut self, i: usize, fault: Option<Fault>) {
        self.sum.steps += 1;
        let r = self.model.regions[i].clone();
        let plan = self.mem.plan_deregister(r.id).expect("registered");
        let mut after = self.model.clone();
        after.remove(r.id);
        let keep = intersect(&self.k.mapped(), &after.mapped_iova());
        let (res, injected) = self.exec(&plan, keep, None, fault);
        let done = match res {
            Ok(stats) => {
                self.check_success(&plan, &stats, injected);
                self.mem.commit(plan).expect("commit a fresh plan");
                true
            }
            Err(e) => {
                self.failed(plan, &e, injected);
                match &e.outcome {
                    Outcome::RolledBack => {
                        assert!(
                            self.mem.region(r.id).is_some(),
                            "rolled back, yet {} is gone",
                            r.id
                        );
                        false
                    }
                    Outcome::NotDiscarded { .. } => panic!("a removal has no discard: {e}"),
                    Outcome::RollbackFailed { .. } => {
                        if self.mem.region(r.id).is_some() {
                            let plan = self.mem.plan_deregister(r.id).expect("registered");
                            let keep = intersect(&self.k.mapped(), &after.mapped_iova());
                            let (res, _) = self.exec(&plan, keep, None, None);
                            let stats = res.unwrap_or_else(|e| panic!("cleanup failed: {e}"));
                            self.check_success(&plan, &stats, None);
                            self.mem.commit(plan).expect("commit a fresh plan");
                        }
                        true
                    }
                }
            }
        };
        if done {
            assert!(self.mem.region(r.id).is_none(), "{} still registered", r.id);
            self.model = after;
            self.retired.push(r.spec);
            self.sum.deregistered += 1;
        }
        self.check_world("deregister");
    }

    /// Kernel == tracker == model.
    fn check_world(&self, step: &str) {
        let ta: Vec<Area> = self.mem.areas().copied().collect();
        let ka: Vec<Area> = self.k.areas().copied().collect();
        assert_eq!(ta, ka, "{step}: tracker areas != kernel areas");
        assert_eq!(
            self.k.mapped(),
            self.model.mapped_iova(),
            "{step}: mapped IOVA != the model's shared pages"
        );
        let tracker: Vec<(RegionId, Range<u64>, Range<u64>)> = self
            .mem
            .regions()
            .map(|r| (r.id, r.gpa_range(), r.iova_range()))
            .collect();
        let model: Vec<(RegionId, Range<u64>, Range<u64>)> = self
            .model
            .regions
            .iter()
            .map(|r| (r.id, r.gpa()..r.end(), r.iova_range()))
            .collect();
        assert_eq!(tracker, model, "{step}: tracker regions != model regions");
        let model_private = self.model.private_gpa();
        let kernel_private: RangeSet = self
            .model
            .regions
            .iter()
            .flat_map(|r| {
                self.k
                    .private()
                    .clipped(r.gpa()..r.end())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            kernel_private, model_private,
            "{step}: KVM attributes != model"
        );
        let tracker_private: RangeSet = self
            .mem
            .regions()
            .flat_map(|r| {
                r.runs(r.gpa_range(), PageState::Private)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            tracker_private, model_private,
            "{step}: tracker attributes != model"
        );
        for r in &self.model.regions {
            let areas: Vec<&Area> = self.k.areas().filter(|a| a.region == r.id).collect();
            match r.spec.strategy {
                Strategy::Whole => assert!(
                    areas.len() == 1 && areas[0].len == r.spec.len,
                    "{step}: Whole {} has areas {areas:?}",
                    r.id
                ),
                Strategy::PerGranule => {
                    for a in areas {
                        assert!(
                            a.len == r.spec.granule && a.offset % r.spec.granule == 0,
                            "{step}: area {a:?} of {} is not one granule",
                            r.id
                        );
                    }
                }
                Strategy::Cut => {}
            }
        }
    }
}

/// The state a failed rollback reports is the kernel's.
fn check_touched(k: &FakeKernel, s: &TouchedState) {
    let mapped = k.mapped();
    for r in s.mapped.iter() {
        assert!(mapped.contains_range(r.clone()), "reported mapped {r:?}");
    }
    for r in s.unmapped.iter() {
        assert!(!mapped.intersects(r.clone()), "reported unmapped {r:?}");
    }
    for r in s.private.iter() {
        assert!(
            k.private().contains_range(r.clone()),
            "reported private {r:?}"
        );
    }
    for r in s.shared.iter() {
        assert!(!k.private().intersects(r.clone()), "reported shared {r:?}");
    }
}
