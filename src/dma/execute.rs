//! Runs a plan against an executor, undoing it on failure.
//!
//! Invariants:
//! - ops run in plan order; discards (irreversible) run after every other op;
//! - when op `k` fails, ops `k-1..=0` are undone in reverse (map ← unmap of the same
//!   area, unmap ← map of each piece it removed, attributes ← the inverse attributes);
//!   if an undo call fails, rollback stops there: every prefix of a plan is a safe state,
//!   so stopping keeps every page safe, and the error lists the touched pages' state;
//! - a failed discard undoes nothing; the other discards still run;
//! - `ExecError::applied` lists exactly the calls that took effect, in order, so
//!   [`Tracker::reconcile`](crate::dma::planning::Tracker::reconcile) replays the truth.

use super::executor::Executor;
use super::plan::buffers::PlanBuffers;
use super::plan::model::{PageState, RegionId, RegionSpec};
use super::plan::ops::{ConversionRequest, MapOp, Op, Plan, UnmapKind, UnmapOp};
use super::plan::outcome::{DmaError, ExecError, OpError, Outcome, Stats, TouchedState};
use super::plan::ranges::RangeSet;
use super::plan::tracker::Tracker;

/// Runs `plan` on `exec`; on failure undoes what ran and describes the result.
///
/// Commit the plan with [`Tracker::commit`](crate::dma::planning::Tracker::commit) on
/// success, or pass the error to
/// [`Tracker::reconcile`](crate::dma::planning::Tracker::reconcile).
///
/// ```
/// use vfio_gmem::dma::{planning::*, *};
/// let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
/// mem.register(RegionSpec::new(0, 1 << 20, Backing::Opaque(0)), &mut k).unwrap();
/// let plan = mem.plan_convert(0, 0x1000, PageState::Private).unwrap();
/// k.fail_call(k.calls() + 1, libc::EIO); // the attribute call fails
/// let err = execute(&plan, &mut k).unwrap_err();
/// assert_eq!(err.outcome, Outcome::RolledBack);
/// mem.reconcile(plan, &err).unwrap();
/// assert_eq!(mem.page_state(0), Some(PageState::Shared));
/// assert!(k.is_mapped(0));
/// ```
#[allow(clippy::result_large_err)] // the error path is cold; callers want the fields
pub fn execute<E: Executor + ?Sized>(plan: &Plan, exec: &mut E) -> Result<Stats, ExecError> {
    let mut stats = Stats::default();
    execute_into(plan, exec, &mut stats)?;
    Ok(stats)
}

/// [`execute`], counting into `stats` (which it resets first).
#[allow(clippy::result_large_err)] // the error path is cold; callers want the fields
pub(crate) fn execute_into<E: Executor + ?Sized>(
    plan: &Plan,
    exec: &mut E,
    stats: &mut Stats,
) -> Result<(), ExecError> {
    *stats = Stats {
        areas_before: plan.areas_before,
        areas_after: plan.areas_after,
        ..Stats::default()
    };
    let mut run = Run { exec, stats };
    for (k, op) in plan.ops.iter().enumerate() {
        if let Op::Discard(_) = op {
            // Discards come last: the rest of the plan is discards.
            return run.discard(plan, k);
        }
        if let Err(error) = run.forward(op) {
            return Err(run.roll_back(plan, k, error));
        }
    }
    Ok(())
}

struct Run<'a, E: ?Sized> {
    exec: &'a mut E,
    stats: &'a mut Stats,
}

impl<E: Executor + ?Sized> Run<'_, E> {
    fn forward(&mut self, op: &Op) -> Result<(), OpError> {
        self.stats.ioctls += 1;
        match op {
            Op::Map(m) => {
                self.exec.map(m)?;
                self.stats.maps += 1;
                self.stats.bytes_mapped += m.len;
            }
            Op::Unmap(u) => {
                let bytes = self.exec.unmap(u)?;
                self.stats.unmaps += 1;
                self.stats.bytes_unmapped += bytes;
                if bytes != u.expected_bytes() {
                    self.stats.unmap_size_mismatches += 1;
                    log::warn!(
                        "{}: kernel unmapped {bytes:#x} bytes, tracker expected {:#x}",
                        op,
                        u.expected_bytes()
                    );
                }
            }
            Op::SetAttributes(a) => {
                self.exec.set_attributes(a)?;
                self.stats.attribute_changes += 1;
            }
            Op::Discard(d) => {
                self.exec.discard(d)?;
                self.stats.discards += 1;
            }
        }
        Ok(())
    }

    /// Runs the discards `plan.ops[first..]` after every other op succeeded: each is
    /// tried; a failure undoes nothing (a discard cannot be undone and every page it
    /// targets is private already).
    #[allow(clippy::result_large_err)] // the error path is cold; callers want the fields
    fn discard(mut self, plan: &Plan, first: usize) -> Result<(), ExecError> {
        let ops = &plan.ops;
        let mut failed: Option<(usize, OpError)> = None;
        let mut not_discarded = RangeSet::new();
        let mut applied_discards = Vec::new();
        for (i, op) in ops.iter().enumerate().skip(first) {
            match self.forward(op) {
                Ok(()) => applied_discards.push(op.clone()),
                Err(e) => {
                    if let Op::Discard(d) = op {
                        not_discarded.insert(d.gpa..d.gpa + d.len);
                    }
                    failed.get_or_insert((i, e));
                }
            }
        }
        let Some((i, error)) = failed else {
            return Ok(());
        };
        let mut applied = ops[..first].to_vec();
        applied.extend(applied_discards);
        Err(ExecError {
            op_index: i,
            op: ops[i].clone(),
            error,
            outcome: Outcome::NotDiscarded {
                ranges: not_discarded,
            },
            applied,
            stats: *self.stats,
        })
    }

    /// Undoes ops `k-1..=0` after op `k` failed with `error`.
    #[cold]
    #[inline(never)]
    fn roll_back(&mut self, plan: &Plan, k: usize, error: OpError) -> ExecError {
        let mut applied = plan.ops[..k].to_vec();
        let mut stopped: Option<(usize, Op, OpError)> = None;

        // A failed unmap may have removed some of its pieces: map each back; EEXIST
        // means the piece is still there. A piece that cannot be mapped is assumed still
        // mapped (the safe assumption: a later conversion to private unmaps it again).
        if let Op::Unmap(u) = &plan.ops[k] {
            for piece in &u.restore {
                match self.undo_call(&Op::Map(piece.clone())) {
                    Ok(()) => {
                        applied.push(Op::Unmap(piece_unmap(piece)));
                        applied.push(Op::Map(piece.clone()));
                    }
                    Err(e) if e.errno == libc::EEXIST => {}
                    Err(e) => {
                        stopped = Some((k, Op::Map(piece.clone()), e));
                        break;
                    }
                }
            }
        }

        if stopped.is_none() {
            'ops: for j in (0..k).rev() {
                for undo in undo_calls(&plan.ops[j]) {
                    match self.undo_call(&undo) {
                        Ok(()) => applied.push(undo),
                        Err(e) => {
                            stopped = Some((j, undo, e));
                            break 'ops;
                        }
                    }
                }
            }
        }

        let outcome = match stopped {
            None => Outcome::RolledBack,
            Some((op, undo, e)) => Outcome::RollbackFailed {
                op,
                undo,
                error: e,
                state: Box::new(touched_state(&applied)),
            },
        };
        ExecError {
            op_index: k,
            op: plan.ops[k].clone(),
            error,
            outcome,
            applied,
            stats: *self.stats,
        }
    }

    fn undo_call(&mut self, op: &Op) -> Result<(), OpError> {
        self.forward(op)
    }
}

/// The unmap that removes exactly one mapped piece.
fn piece_unmap(piece: &MapOp) -> UnmapOp {
    UnmapOp {
        iova: piece.iova,
        len: piece.len,
        kind: UnmapKind::Native,
        restore: vec![piece.clone()],
    }
}

/// Calls that undo `op`, in order.
fn undo_calls(op: &Op) -> Vec<Op> {
    match op {
        Op::Map(m) => vec![Op::Unmap(piece_unmap(m))],
        Op::Unmap(u) => u.restore.iter().cloned().map(Op::Map).collect(),
        Op::SetAttributes(a) => vec![Op::SetAttributes(a.inverse())],
        Op::Discard(_) => Vec::new(),
    }
}

/// Final state of every page the applied calls touched (last call wins).
fn touched_state(applied: &[Op]) -> TouchedState {
    let mut s = TouchedState::default();
    for op in applied {
        match op {
            Op::Map(m) => {
                let r = m.iova..m.iova + m.len;
                s.unmapped.remove(r.clone());
                s.mapped.insert(r);
            }
            Op::Unmap(u) => {
                let r = u.iova..u.iova + u.len;
                s.mapped.remove(r.clone());
                s.unmapped.insert(r);
            }
            Op::SetAttributes(a) => {
                let r = a.gpa..a.gpa + a.len;
                let (to, from) = if a.private {
                    (&mut s.private, &mut s.shared)
                } else {
                    (&mut s.shared, &mut s.private)
                };
                from.remove(r.clone());
                to.insert(r);
            }
            Op::Discard(_) => {}
        }
    }
    s
}

// Plan-execute-record in one call, for callers that need nothing in between.

impl Tracker {
    /// Executes `plan` and records the result: commit on success, reconcile on failure.
    ///
    /// ```
    /// use vfio_gmem::dma::{planning::*, *};
    /// let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    /// let plan = mem.plan_register(RegionSpec::new(0, 8192, Backing::Opaque(0))).unwrap();
    /// let stats = mem.run(plan, &mut k).unwrap();
    /// assert_eq!((stats.maps, stats.areas_after), (1, 1));
    /// ```
    pub fn run<E: Executor + ?Sized>(
        &mut self,
        plan: Plan,
        exec: &mut E,
    ) -> Result<Stats, DmaError> {
        match execute(&plan, exec) {
            Ok(stats) => {
                self.commit(plan)?;
                Ok(stats)
            }
            Err(e) => {
                self.reconcile(plan, &e)?;
                Err(e.into())
            }
        }
    }

    /// [`run`](Self::run) of a plan the caller keeps, giving a successful plan's op list
    /// back to `buffers` (no plan moves on the hot path).
    pub(crate) fn run_recycling<E: Executor + ?Sized>(
        &mut self,
        plan: &mut Plan,
        exec: &mut E,
        buffers: &mut PlanBuffers,
    ) -> Result<Stats, DmaError> {
        let mut stats = Stats::default();
        match execute_into(plan, exec, &mut stats) {
            Ok(()) => {
                self.commit_in_place(plan)?;
                buffers.recycle_from(&mut plan.ops, plan.edit.is_some());
                Ok(stats)
            }
            Err(e) => {
                self.reconcile_in_place(plan, &e)?;
                Err(e.into())
            }
        }
    }

    /// Registers a region and maps its shared pages.
    ///
    /// ```
    /// use vfio_gmem::dma::{planning::*, *};
    /// let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    /// let id = mem.register(RegionSpec::new(0, 1 << 21, Backing::Opaque(0)), &mut k).unwrap();
    /// assert_eq!(mem.region(id).unwrap().gpa_range(), 0..1 << 21);
    /// ```
    pub fn register<E: Executor + ?Sized>(
        &mut self,
        spec: RegionSpec,
        exec: &mut E,
    ) -> Result<RegionId, DmaError> {
        let plan = self.plan_register(spec)?;
        let id = plan.registered_region().expect("registration plan");
        self.run(plan, exec)?;
        Ok(id)
    }

    /// Unmaps a region and forgets it.
    ///
    /// ```
    /// use vfio_gmem::dma::{planning::*, *};
    /// let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    /// let id = mem.register(RegionSpec::new(0, 1 << 21, Backing::Opaque(0)), &mut k).unwrap();
    /// mem.deregister(id, &mut k).unwrap();
    /// assert_eq!(mem.regions().count(), 0);
    /// ```
    pub fn deregister<E: Executor + ?Sized>(
        &mut self,
        id: RegionId,
        exec: &mut E,
    ) -> Result<Stats, DmaError> {
        let plan = self.plan_deregister(id)?;
        self.run(plan, exec)
    }

    /// Converts `[gpa, gpa+len)` to `to`.
    ///
    /// ```
    /// use vfio_gmem::dma::{planning::*, *};
    /// let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    /// mem.register(RegionSpec::new(0, 1 << 21, Backing::Opaque(0)), &mut k).unwrap();
    /// mem.convert(0x3000, 0x1000, PageState::Private, &mut k).unwrap();
    /// assert!(!k.is_mapped(0x3000) && k.is_mapped(0x4000));
    /// ```
    pub fn convert<E: Executor + ?Sized>(
        &mut self,
        gpa: u64,
        len: u64,
        to: PageState,
        exec: &mut E,
    ) -> Result<Stats, DmaError> {
        let plan = self.plan_convert(gpa, len, to)?;
        self.run(plan, exec)
    }

    /// Converts a batch of ranges as one plan.
    ///
    /// ```
    /// use vfio_gmem::dma::{planning::*, *};
    /// let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    /// mem.register(RegionSpec::new(0, 1 << 21, Backing::Opaque(0)), &mut k).unwrap();
    /// let reqs = [ConversionRequest::new(0, 0x1000, PageState::Private),
    ///             ConversionRequest::new(0x8000, 0x1000, PageState::Private)];
    /// let stats = mem.convert_batch(&reqs, &mut k).unwrap();
    /// assert_eq!(stats.unmaps, 2);
    /// ```
    pub fn convert_batch<E: Executor + ?Sized>(
        &mut self,
        requests: &[ConversionRequest],
        exec: &mut E,
    ) -> Result<Stats, DmaError> {
        let plan = self.plan_batch(requests)?;
        self.run(plan, exec)
    }
}
