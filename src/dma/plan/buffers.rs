//! Buffers the planner fills instead of allocating (pure: plain memory handed in).
//!
//! A caller that plans often (a [`DmaSpace`](crate::dma::DmaSpace) converting pages)
//! keeps one [`PlanBuffers`] and gives back each plan's op list once the plan is
//! recorded ([`PlanBuffers::recycle_from`]), so a steady-state conversion allocates nothing:
//! the op list, the unmaps' restore lists and the planner's working range lists are
//! reused. A caller without one gets fresh buffers per plan (the public `plan_*`).

use std::ops::Range;

use super::ops::{MapOp, Op, UnmapOp};

/// Reusable working memory of the planner.
#[derive(Debug, Default)]
pub(crate) struct PlanBuffers {
    /// The next plan's op list (empty, with capacity).
    pub(crate) ops: Vec<Op>,
    /// Empty restore lists of earlier unmaps, with capacity.
    pub(crate) restores: Vec<Vec<MapOp>>,
    pub(crate) to_private: Vec<Range<u64>>,
    pub(crate) to_shared: Vec<Range<u64>>,
    pub(crate) discard: Vec<Range<u64>>,
    pub(crate) cut_iova: Vec<Range<u64>>,
    pub(crate) native_iova: Vec<Range<u64>>,
    pub(crate) flips: Vec<Range<u64>>,
    pub(crate) gaps: Vec<Range<u64>>,
    pub(crate) unmaps: Vec<UnmapOp>,
}

impl PlanBuffers {
    /// Takes back a recorded plan's op list, leaving it empty: its memory serves the
    /// next plan. `single`: the plan is of one request inside one region (it has an
    /// [`Edit`](super::ops::Edit)), so only its first op can be an unmap.
    #[inline]
    pub(crate) fn recycle_from(&mut self, ops: &mut Vec<Op>, single: bool) {
        if single {
            // A single-request plan has at most one unmap, first.
            if let Some(Op::Unmap(u)) = ops.first_mut() {
                self.keep_restore(&mut u.restore);
            }
        } else {
            for op in ops.iter_mut() {
                if let Op::Unmap(u) = op {
                    self.keep_restore(&mut u.restore);
                }
            }
        }
        ops.clear();
        if ops.capacity() > self.ops.capacity() {
            std::mem::swap(&mut self.ops, ops);
        }
    }

    /// Keeps an unmap's restore list (emptied) for a later unmap.
    #[inline]
    fn keep_restore(&mut self, restore: &mut Vec<MapOp>) {
        let mut restore = std::mem::take(restore);
        restore.clear();
        self.restores.push(restore);
    }
}

/// Sorts `v` by start and merges overlapping or adjacent ranges in place, leaving the
/// maximal runs a [`RangeSet`](super::ranges::RangeSet) of the same ranges would hold.
pub(crate) fn normalize(v: &mut Vec<Range<u64>>) {
    match v.len() {
        0 => return,
        1 => {
            if v[0].start >= v[0].end {
                v.clear();
            }
            return;
        }
        _ => v.sort_unstable_by_key(|r| r.start),
    }
    let mut out = 0;
    for i in 0..v.len() {
        let r = v[i].clone();
        if r.start >= r.end {
            continue;
        }
        if out > 0 && v[out - 1].end >= r.start {
            v[out - 1].end = v[out - 1].end.max(r.end);
        } else {
            v[out] = r;
            out += 1;
        }
    }
    v.truncate(out);
}

/// Appends `r` to ranges in ascending order, merging it with the last if they touch.
pub(crate) fn push_merged(v: &mut Vec<Range<u64>>, r: Range<u64>) {
    match v.last_mut() {
        Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
        _ => v.push(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::plan::ranges::RangeSet;

    #[test]
    fn normalize_matches_the_range_set() {
        let mut x: u64 = 11;
        for _ in 0..2000 {
            let mut v = Vec::new();
            for _ in 0..(x % 7) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let s = (x >> 40) % 64;
                let e = s + (x >> 20) % 9;
                v.push(s..e);
            }
            x = x.wrapping_add(3);
            let set: RangeSet = v.iter().cloned().collect();
            normalize(&mut v);
            assert_eq!(v, set.iter().collect::<Vec<_>>());
        }
    }
}
