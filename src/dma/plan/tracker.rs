//! The tracker: registered regions, per-page KVM attribute state and live IOMMU areas.
//!
//! Invariants:
//! - regions are disjoint in GPA and in IOVA; kept sorted by first GPA (a guest has a
//!   handful: a sorted array is both the smallest and the fastest map for them);
//! - a region's bitmap has one bit per page, set = private attribute;
//! - `areas` is keyed by first IOVA, areas are disjoint, each lies inside one region's
//!   IOVA range and records the offset within that region it maps;
//! - after a successful plan, for every convertible region a page is mapped iff it is
//!   shared, and a `Whole` region is mapped entirely; a failed rollback can leave
//!   exceptions, which [`Tracker::reconcile`] records truthfully and a later
//!   conversion repairs (planning looks at attributes and mappings separately);
//! - the tracker changes only in `commit`/`reconcile` (and `split_area_at`, which
//!   records a cut a failed call left in the kernel), each bumping `generation`.

use std::ops::Range;

use super::areamap::{AreaMap, Pos};
use super::error::PlanError;
use super::model::{Area, PageState, RegionId, PAGE_SIZE};
use super::ops::{AreaEdit, Edit, Op, Plan, RegionChange};
use super::outcome::{ExecError, Outcome};
use super::region::Region;

/// Tracker of one guest's RAM regions in one IOVA space (one IOAS or container).
///
/// Planning methods take `&self` and return a [`Plan`]; the tracker changes only when a
/// plan is committed (after `execute` (the driver) succeeded) or reconciled
/// (after it failed).
///
/// ```
/// use vfio_gmem::dma::{planning::*, *};
/// let mut mem = Tracker::new();
/// let mut kernel = FakeKernel::new();
/// let id = mem.register(RegionSpec::new(0, 1 << 20, Backing::Opaque(0)), &mut kernel).unwrap();
/// let plan = mem.plan_convert(0x4000, 0x2000, PageState::Private).unwrap();
/// let stats = execute(&plan, &mut kernel).unwrap();
/// mem.commit(plan).unwrap();
/// assert_eq!(stats.ioctls, 2); // one cut-unmap, one attribute change
/// assert_eq!(mem.page_state(0x4000), Some(PageState::Private));
/// assert_eq!(mem.area_count(), 2);
/// # let _ = id;
/// ```
#[derive(Debug)]
pub struct Tracker {
    pub(crate) regions: Vec<Region>,
    pub(crate) areas: AreaMap,
    pub(crate) next_id: u64,
    pub(crate) generation: u64,
    /// Unique per tracker value, clones included: a plan's [`Edit`] is applied only by
    /// the tracker that planned it (at the plan's generation, its state is exactly the
    /// one planned against); any other tracker replays the plan's ops.
    pub(crate) instance: u64,
}

/// Source of [`Tracker::instance`] values.
static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn next_instance() -> u64 {
    INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            regions: Vec::new(),
            areas: AreaMap::default(),
            next_id: 0,
            generation: 0,
            instance: next_instance(),
        }
    }
}

impl Clone for Tracker {
    /// A copy of the state with an instance of its own (see [`Tracker::commit`]).
    fn clone(&self) -> Self {
        Tracker {
            regions: self.regions.clone(),
            areas: self.areas.clone(),
            next_id: self.next_id,
            generation: self.generation,
            instance: next_instance(),
        }
    }
}

impl Tracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counter bumped by every commit or reconcile.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Registered regions, by GPA.
    pub fn regions(&self) -> impl Iterator<Item = &Region> {
        self.regions.iter()
    }

    /// The region with this id.
    pub fn region(&self, id: RegionId) -> Option<&Region> {
        self.regions.iter().find(|r| r.id == id)
    }

    /// The region containing `gpa`.
    pub fn region_at(&self, gpa: u64) -> Option<&Region> {
        self.region_index_at(gpa).map(|i| &self.regions[i])
    }

    /// Index in `regions` of the region containing `gpa`.
    pub(crate) fn region_index_at(&self, gpa: u64) -> Option<usize> {
        let i = match self.regions.as_slice() {
            // One region (the common guest) needs no search.
            [_] => 0,
            v => v.partition_point(|r| r.spec.gpa <= gpa).checked_sub(1)?,
        };
        let r = &self.regions[i];
        (r.spec.gpa <= gpa && gpa < r.spec.gpa + r.spec.len).then_some(i)
    }

    /// State of the page containing `gpa`, if registered.
    pub fn page_state(&self, gpa: u64) -> Option<PageState> {
        self.region_at(gpa).map(|r| r.page_state(gpa))
    }

    /// Live IOMMU areas, by IOVA.
    pub fn areas(&self) -> impl Iterator<Item = &Area> {
        self.areas.iter()
    }

    /// Number of live IOMMU areas.
    pub fn area_count(&self) -> usize {
        self.areas.len()
    }

    /// Approximate heap bytes used by the tracker (bitmaps plus area and region maps).
    pub fn tracker_bytes(&self) -> usize {
        let region_entry = std::mem::size_of::<Region>();
        self.areas.memory_bytes()
            + self
                .regions
                .iter()
                .map(|r| region_entry + r.private.memory_bytes())
                .sum::<usize>()
    }

    /// Areas whose IOVA range intersects `r`, ascending.
    pub(crate) fn areas_in(&self, r: Range<u64>) -> impl Iterator<Item = &Area> + '_ {
        self.areas.overlapping(r)
    }

    /// Records a plan that `execute` (the driver) ran to completion.
    ///
    /// The plan must be of this tracker's state: made by this tracker, or by a clone at
    /// the same generation that has not changed since (a plan of another generation is
    /// refused with [`PlanError::StalePlan`]).
    pub fn commit(&mut self, mut plan: Plan) -> Result<(), PlanError> {
        self.commit_in_place(&mut plan)
    }

    /// [`commit`](Self::commit) without taking the plan: its region change is taken out,
    /// its op list left for reuse.
    pub(crate) fn commit_in_place(&mut self, plan: &mut Plan) -> Result<(), PlanError> {
        self.check_generation(plan)?;
        if let Some(edit) = plan.edit.as_ref().filter(|e| e.tracker == self.instance) {
            self.apply_edit(&plan.ops, edit);
            return Ok(());
        }
        let change = std::mem::replace(&mut plan.change, RegionChange::None);
        self.apply(change, &plan.ops, true);
        Ok(())
    }

    /// Records what a failed plan really did, from the calls that took effect.
    ///
    /// After `RolledBack` the tracker is unchanged but for area boundaries the undo
    /// created (a restored piece of a cut area is a separate area, as in the kernel).
    pub fn reconcile(&mut self, mut plan: Plan, err: &ExecError) -> Result<(), PlanError> {
        self.reconcile_in_place(&mut plan, err)
    }

    /// [`reconcile`](Self::reconcile) without taking the plan (its region change is
    /// taken out).
    pub(crate) fn reconcile_in_place(
        &mut self,
        plan: &mut Plan,
        err: &ExecError,
    ) -> Result<(), PlanError> {
        self.check_generation(plan)?;
        let complete = matches!(err.outcome, Outcome::NotDiscarded { .. });
        let change = std::mem::replace(&mut plan.change, RegionChange::None);
        // What the applied calls did, replayed (the plan's edit assumed all of it ran).
        self.apply(change, &err.applied, complete);
        Ok(())
    }

    fn check_generation(&self, plan: &Plan) -> Result<(), PlanError> {
        if plan.generation != self.generation {
            return Err(PlanError::StalePlan {
                plan: plan.generation,
                tracker: self.generation,
            });
        }
        Ok(())
    }

    /// Records `change` and replays `ops`.
    fn apply(&mut self, change: RegionChange, ops: &[Op], complete: bool) {
        let (mut registered, mut deregistered) = (None, None);
        match change {
            RegionChange::Register(r) => {
                registered = Some(r.id);
                self.next_id = self.next_id.max(r.id.0 + 1);
                let at = self.regions.partition_point(|x| x.spec.gpa < r.spec.gpa);
                self.regions.insert(at, *r);
            }
            RegionChange::Deregister(id) => deregistered = Some(id),
            RegionChange::None => {}
        }
        for op in ops {
            self.apply_op(op);
        }
        let drop_region = match (registered, deregistered) {
            (Some(id), _) if !complete => Some(id).filter(|&id| !self.has_areas(id)),
            (_, Some(id)) if complete || !self.has_areas(id) => Some(id),
            _ => None,
        };
        if let Some(id) = drop_region {
            self.regions.retain(|r| r.id != id);
        }
        self.generation += 1;
    }

    /// Records a successful plan from the edit its planner computed (see [`Edit`]): the
    /// same result as replaying its ops, with no search.
    fn apply_edit(&mut self, ops: &[Op], edit: &Edit) {
        match edit.areas {
            AreaEdit::None => {}
            AreaEdit::Replay => {
                for op in ops {
                    if let Op::Map(_) | Op::Unmap(_) = op {
                        self.apply_op(op);
                    }
                }
            }
            AreaEdit::Cut { at, start, end } => self.cut_area(at, start..end),
            AreaEdit::Insert { below, op } => {
                let Op::Map(m) = &ops[op] else {
                    unreachable!("an insert edit names a map op");
                };
                self.areas.insert_after(below, Area::from(m));
            }
        }
        let reg = &mut self.regions[edit.region];
        debug_assert!(reg.spec.gpa <= edit.gpa && edit.end <= reg.spec.gpa + reg.spec.len);
        let base = reg.spec.gpa;
        reg.private.set_range(
            (edit.gpa - base) / PAGE_SIZE..(edit.end - base) / PAGE_SIZE,
            edit.private,
        );
        self.generation += 1;
    }

    /// Removes IOVA range `r` from the area at `at`, which holds all of it: what is left
    /// of the area on either side stays (the kernel's cut).
    fn cut_area(&mut self, at: Pos, r: Range<u64>) {
        let a = *self.areas.at(at);
        let a_end = a.iova + a.len;
        debug_assert!(
            a.iova <= r.start && r.start < r.end && r.end <= a_end,
            "{a:?} {r:?}"
        );
        let right = Area {
            iova: r.end,
            len: a_end - r.end,
            offset: a.offset + (r.end - a.iova),
            ..a
        };
        match (a.iova < r.start, a_end > r.end) {
            (false, false) => {
                self.areas.remove_at(at);
            }
            (false, true) => self.areas.replace(at, right),
            (true, keep_right) => {
                self.areas.replace(
                    at,
                    Area {
                        len: r.start - a.iova,
                        ..a
                    },
                );
                if keep_right {
                    self.areas.insert_after(Some(at), right);
                }
            }
        }
    }

    fn has_areas(&self, id: RegionId) -> bool {
        self.region(id)
            .map(|r| self.areas_in(r.iova_range()).next().is_some())
            .unwrap_or(false)
    }

    /// Records one op.
    fn apply_op(&mut self, op: &Op) {
        match op {
            Op::Map(m) => {
                let prev = self.areas.insert(Area::from(m));
                debug_assert!(prev.is_none(), "tracker mapped {m:?} twice");
            }
            Op::Unmap(u) => {
                let r = u.iova..u.iova + u.len;
                let top = self.areas.last_below(r.end);
                self.remove_areas(r, top);
            }
            Op::SetAttributes(a) => {
                let r = a.gpa..a.gpa + a.len;
                // Most attribute ops lie inside one region: no walk over the others.
                if let Some(reg) = self
                    .region_index_at(r.start)
                    .map(|i| &mut self.regions[i])
                    .filter(|reg| r.end <= reg.spec.gpa + reg.spec.len)
                {
                    let base = reg.spec.gpa;
                    reg.private.set_range(
                        (r.start - base) / PAGE_SIZE..(r.end - base) / PAGE_SIZE,
                        a.private,
                    );
                    return;
                }
                for reg in self.regions.iter_mut() {
                    let g = reg.gpa_range();
                    let (s, e) = (r.start.max(g.start), r.end.min(g.end));
                    if s < e {
                        let base = reg.spec.gpa;
                        reg.private
                            .set_range((s - base) / PAGE_SIZE..(e - base) / PAGE_SIZE, a.private);
                    }
                }
            }
            Op::Discard(_) => {}
        }
    }

    /// Splits the area holding both `at - 1` and `at` so that a piece starts at `at`, as
    /// the kernel does when a failed cut-unmap made one of its cuts (the IOAS learns
    /// that, see [`crate::iommufd::Ioas::cut_unmap`]). Returns whether an area was split;
    /// a split changes the tracker, so it bumps the generation.
    pub(crate) fn split_area_at(&mut self, at: u64) -> bool {
        let Some(p) = self.areas.last_below(at) else {
            return false;
        };
        let a = *self.areas.at(p);
        if a.iova + a.len <= at {
            return false;
        }
        let head = at - a.iova;
        self.areas.replace(p, Area { len: head, ..a });
        self.areas.insert(Area {
            iova: at,
            len: a.len - head,
            offset: a.offset + head,
            ..a
        });
        self.generation += 1;
        true
    }

    /// Removes `r` from the area map, keeping the parts of areas outside it (the kernel's
    /// cut-then-unmap; for native unmaps the range never cuts, so this is plain removal).
    /// `top` is the last area starting below `r.end`.
    fn remove_areas(&mut self, r: Range<u64>, top: Option<Pos>) {
        // Top down from the last area starting below the end, while areas reach into
        // `r` (their ends descend too: areas are disjoint). A left piece keeps its key and
        // ends at `r.start`; a right piece starts at `r.end`, where nothing else starts.
        let mut at = top;
        while let Some(p) = at {
            let whole = *self.areas.at(p);
            let end = whole.iova + whole.len;
            if end <= r.start {
                break;
            }
            // Still valid after `p` is replaced or removed: only what follows `p` moves.
            let before = self.areas.prev(p);
            let right = (end > r.end).then(|| Area {
                iova: r.end,
                len: end - r.end,
                offset: whole.offset + (r.end - whole.iova),
                ..whole
            });
            if whole.iova < r.start {
                self.areas.replace(
                    p,
                    Area {
                        len: r.start - whole.iova,
                        ..whole
                    },
                );
                if let Some(right) = right {
                    self.areas.insert(right);
                }
                break;
            }
            match right {
                Some(right) => self.areas.replace(p, right),
                None => {
                    self.areas.remove_at(p);
                }
            }
            if whole.iova == r.start {
                // Nothing below this area reaches into `r`.
                break;
            }
            at = before;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::executor::fake::FakeKernel;
    use crate::dma::plan::model::Backing;
    use crate::dma::plan::model::RegionSpec;

    #[test]
    fn split_area_at_keeps_offsets_and_bumps_the_generation() {
        let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
        let spec = RegionSpec::new(0x10_0000, 16 * PAGE_SIZE, Backing::Opaque(0));
        mem.register(spec, &mut k).unwrap();
        let generation = mem.generation();
        assert!(!mem.split_area_at(0x10_0000), "a boundary already");
        assert!(!mem.split_area_at(0x20_0000), "outside every area");
        assert!(mem.split_area_at(0x10_0000 + 6 * PAGE_SIZE));
        let areas: Vec<(u64, u64, u64)> = mem.areas().map(|a| (a.iova, a.len, a.offset)).collect();
        assert_eq!(
            areas,
            vec![
                (0x10_0000, 6 * PAGE_SIZE, 0),
                (0x10_0000 + 6 * PAGE_SIZE, 10 * PAGE_SIZE, 6 * PAGE_SIZE)
            ]
        );
        assert_eq!(mem.generation(), generation + 1);
        assert!(!mem.split_area_at(0x10_0000 + 6 * PAGE_SIZE));
    }
}
