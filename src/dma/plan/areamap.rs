//! The tracker's record of live IOMMU areas, ordered by first IOVA.
//!
//! A two-level sorted array: `chunks` holds the areas in ascending runs, `firsts` the
//! first IOVA of each run. Looking an IOVA up is two binary searches over contiguous
//! memory (the run in `firsts`, the area in the run); inserting or removing moves at most
//! one run's tail. A run splits in halves when it outgrows [`AreaMap::max_run`], the
//! larger of [`MIN_RUN`] and √n/4 for n areas: small maps (a guest's usual hundreds of
//! areas) move a few dozen bytes per change, and a map of a million areas still moves
//! O(√n) per change (a split shifts the run heads, about 4√n of them). A conversion touches one or two
//! areas, and this is where the standard library's B-tree spent most of a conversion's
//! instructions (node walks on every range search, rebalancing on every insert and
//! remove).
//!
//! Invariants:
//! - areas are disjoint and strictly ascending by `iova` across all runs, in order;
//! - no run is empty; a run holds at most [`AreaMap::max_run`] areas of the largest the
//!   map has been since it last split (removals do not merge runs);
//! - `firsts[c] == chunks[c][0].iova` for every run `c`;
//! - `len` is the total number of areas.
//!
//! A position ([`Pos`]) is valid until the next change of the map; a change at `p` leaves
//! every position before `p` valid.

use std::fmt;
use std::ops::Range;

use super::model::Area;

/// The smallest limit on a run's length (see [`AreaMap::max_run`]).
const MIN_RUN: usize = 4;

/// Where an area is: run and index in the run (32 bits each: a plan carries one, and
/// 2^32 runs of areas is far beyond any IOVA space's area count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pos {
    chunk: u32,
    index: u32,
}

impl Pos {
    fn new(chunk: usize, index: usize) -> Self {
        Pos {
            chunk: chunk as u32,
            index: index as u32,
        }
    }

    fn chunk(self) -> usize {
        self.chunk as usize
    }

    fn index(self) -> usize {
        self.index as usize
    }
}

/// Live areas keyed by first IOVA.
#[derive(Clone, Default)]
pub(crate) struct AreaMap {
    firsts: Vec<u64>,
    chunks: Vec<Vec<Area>>,
    len: usize,
}

impl fmt::Debug for AreaMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl AreaMap {
    /// Number of areas.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The longest a run may grow before it splits: √n/4 for n areas, at least
    /// [`MIN_RUN`]. Both costs are O(√n): moving a run's tail on every change, moving
    /// the run heads on a split (once per ~√n/8 insertions); the quarter favours the
    /// first, which a steady stream of conversions pays, over the second, which only a
    /// growing map does (measured: `space_cut` and `space_cut_64k_areas` in
    /// benches/hotpath.rs).
    fn max_run(&self) -> usize {
        (self.len.isqrt() / 4).max(MIN_RUN)
    }

    /// Every area, ascending.
    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = &Area> + '_ {
        self.chunks.iter().flatten()
    }

    /// Heap bytes held (capacity, not only what is used).
    pub(crate) fn memory_bytes(&self) -> usize {
        self.firsts.capacity() * std::mem::size_of::<u64>()
            + self.chunks.capacity() * std::mem::size_of::<Vec<Area>>()
            + self
                .chunks
                .iter()
                .map(|c| c.capacity() * std::mem::size_of::<Area>())
                .sum::<usize>()
    }

    /// The area at `p`.
    pub(crate) fn at(&self, p: Pos) -> &Area {
        &self.chunks[p.chunk()][p.index()]
    }

    /// Position of the last area starting below `x`.
    pub(crate) fn last_below(&self, x: u64) -> Option<Pos> {
        let chunk = self.firsts.partition_point(|&f| f < x).checked_sub(1)?;
        // `firsts[chunk] < x`: the run has at least one area below `x`.
        let index = self.chunks[chunk].partition_point(|a| a.iova < x) - 1;
        Some(Pos::new(chunk, index))
    }

    /// The position before `p`, if any.
    pub(crate) fn prev(&self, p: Pos) -> Option<Pos> {
        if p.index > 0 {
            return Some(Pos {
                index: p.index - 1,
                ..p
            });
        }
        let chunk = p.chunk().checked_sub(1)?;
        Some(Pos::new(chunk, self.chunks[chunk].len() - 1))
    }

    /// Areas starting below `x`, descending, with their positions.
    #[cfg(test)]
    pub(crate) fn below(&self, x: u64) -> Below<'_> {
        self.down_from(self.last_below(x))
    }

    /// The area at `from` and those before it, descending, with their positions.
    pub(crate) fn down_from(&self, from: Option<Pos>) -> Below<'_> {
        Below {
            map: self,
            next: from,
        }
    }

    /// Areas whose IOVA range intersects `r`, ascending.
    pub(crate) fn overlapping(&self, r: Range<u64>) -> impl Iterator<Item = &Area> + '_ {
        // From the last area starting at or below `r.start` (it may reach into `r`), or
        // from the first run.
        let start = self
            .last_below(r.start.saturating_add(1))
            .unwrap_or(Pos::new(0, 0));
        let (head, rest) = match self.chunks.get(start.chunk()) {
            Some(run) => (&run[start.index()..], &self.chunks[start.chunk() + 1..]),
            None => (&[][..], &[][..]),
        };
        head.iter()
            .chain(rest.iter().flatten())
            .skip_while(move |a| a.iova + a.len <= r.start)
            .take_while(move |a| a.iova < r.end)
    }

    /// Inserts `a`; returns the area it replaced, one with the same first IOVA.
    pub(crate) fn insert(&mut self, a: Area) -> Option<Area> {
        if self.chunks.is_empty() {
            self.firsts.push(a.iova);
            self.chunks.push(vec![a]);
            self.len = 1;
            return None;
        }
        // The run holding the last area at or below `a.iova`, or the first run.
        let chunk = self
            .firsts
            .partition_point(|&f| f <= a.iova)
            .saturating_sub(1);
        let run = &mut self.chunks[chunk];
        let index = run.partition_point(|x| x.iova < a.iova);
        if let Some(same) = run.get_mut(index).filter(|x| x.iova == a.iova) {
            return Some(std::mem::replace(same, a));
        }
        self.insert_at(Pos::new(chunk, index), a);
        None
    }

    /// Inserts `a` right after position `below`: the last area starting below `a.iova`
    /// (`None` if none does) as [`last_below`](Self::last_below) found it before this
    /// change. No search.
    pub(crate) fn insert_after(&mut self, below: Option<Pos>, a: Area) {
        debug_assert_eq!(
            below,
            self.last_below(a.iova),
            "stale position for {a:?} in {self:?}"
        );
        debug_assert!(self
            .first_from(a.iova)
            .is_none_or(|n| a.iova + a.len <= n.iova));
        match below {
            _ if self.chunks.is_empty() => {
                self.insert(a);
            }
            None => self.insert_at(Pos::new(0, 0), a),
            Some(p) => self.insert_at(
                Pos {
                    index: p.index + 1,
                    ..p
                },
                a,
            ),
        }
    }

    /// The first area starting at or above `x`.
    fn first_from(&self, x: u64) -> Option<&Area> {
        self.overlapping(x..u64::MAX).find(|a| a.iova >= x)
    }

    /// Puts `a` at index `p.index` of run `p.chunk` (which may be one past its end),
    /// splitting the run if it overflows.
    fn insert_at(&mut self, p: Pos, a: Area) {
        if p.index() == 0 {
            self.firsts[p.chunk()] = a.iova;
        }
        self.len += 1;
        let max = self.max_run();
        let run = &mut self.chunks[p.chunk()];
        run.insert(p.index(), a);
        if run.len() > max {
            // Room for the new run to fill up and overflow without growing.
            let mut tail = Vec::with_capacity(max + 1);
            tail.extend(run.drain(run.len() / 2..));
            self.firsts.insert(p.chunk() + 1, tail[0].iova);
            self.chunks.insert(p.chunk() + 1, tail);
        }
    }

    /// Replaces the area at `p` with `a`, which must sort where the old one did (after
    /// the area before `p`, before the one after it).
    pub(crate) fn replace(&mut self, p: Pos, a: Area) {
        debug_assert!(self.prev(p).is_none_or(|q| self.at(q).iova < a.iova));
        debug_assert!(self.chunks[p.chunk()]
            .get(p.index() + 1)
            .or(self.chunks.get(p.chunk() + 1).map(|r| &r[0]))
            .is_none_or(|n| a.iova < n.iova));
        self.chunks[p.chunk()][p.index()] = a;
        if p.index() == 0 {
            self.firsts[p.chunk()] = a.iova;
        }
    }

    /// Removes and returns the area at `p`.
    pub(crate) fn remove_at(&mut self, p: Pos) -> Area {
        let run = &mut self.chunks[p.chunk()];
        let a = run.remove(p.index());
        self.len -= 1;
        if run.is_empty() {
            self.chunks.remove(p.chunk());
            self.firsts.remove(p.chunk());
        } else if p.index() == 0 {
            self.firsts[p.chunk()] = run[0].iova;
        }
        a
    }

    /// Removes the area starting at `iova`, if there is one.
    #[cfg(test)]
    pub(crate) fn remove(&mut self, iova: u64) -> Option<Area> {
        let p = self.last_below(iova.checked_add(1)?)?;
        (self.at(p).iova == iova).then(|| self.remove_at(p))
    }
}

/// Areas below a bound, descending, with their positions (see [`AreaMap::below`]).
pub(crate) struct Below<'a> {
    map: &'a AreaMap,
    next: Option<Pos>,
}

impl<'a> Iterator for Below<'a> {
    type Item = (Pos, &'a Area);

    fn next(&mut self) -> Option<(Pos, &'a Area)> {
        let p = self.next?;
        self.next = self.map.prev(p);
        Some((p, self.map.at(p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::plan::model::RegionId;
    use std::collections::BTreeMap;

    fn area(iova: u64, len: u64) -> Area {
        Area {
            iova,
            len,
            region: RegionId(iova % 3),
            offset: iova / 2,
        }
    }

    fn check(m: &AreaMap, model: &BTreeMap<u64, Area>, peak: usize) {
        assert_eq!(m.len(), model.len());
        assert!(m.iter().eq(model.values()));
        assert_eq!(m.firsts.len(), m.chunks.len());
        for (f, run) in m.firsts.iter().zip(&m.chunks) {
            assert!(!run.is_empty() && run.len() <= (peak.isqrt() / 4).max(MIN_RUN));
            assert_eq!(*f, run[0].iova);
        }
    }

    /// Every query and change agrees with a `BTreeMap` doing the same, over long random
    /// sequences that grow the map past many splits and shrink it back to nothing.
    #[test]
    fn agrees_with_a_btree_map() {
        let mut x: u64 = 5;
        let mut next = |m: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % m
        };
        for round in 0..6 {
            let (mut m, mut model) = (AreaMap::default(), BTreeMap::new());
            let mut peak = 0;
            let span = [64, 400, 5000][round % 3];
            for step in 0..6000 {
                // Areas of length 1 at even keys (disjoint, as the tracker keeps them).
                let k = next(span) * 2;
                let q = next(span * 2 + 2);
                let grow = step < 4000;
                match next(9) {
                    0..=2 if grow => {
                        assert_eq!(m.insert(area(k, 1)), model.insert(k, area(k, 1)));
                    }
                    3 if grow => {
                        // By position, where the key is free.
                        model.entry(k).or_insert_with(|| {
                            m.insert_after(m.last_below(k), area(k, 1));
                            area(k, 1)
                        });
                    }
                    0..=4 => assert_eq!(m.remove(k), model.remove(&k)),
                    5 => {
                        let p = m.last_below(q);
                        let want = model.range(..q).next_back().map(|(_, a)| *a);
                        assert_eq!(p.map(|p| *m.at(p)), want);
                        if let Some(p) = p.filter(|_| next(2) == 0) {
                            let old = *m.at(p);
                            // Same key, new payload.
                            let new = Area { len: 2, ..old };
                            m.replace(p, new);
                            model.insert(old.iova, new);
                            let before = m.prev(p).map(|p| *m.at(p));
                            let want = model.range(..old.iova).next_back().map(|(_, a)| *a);
                            assert_eq!(before, want);
                        }
                    }
                    6 => {
                        let got: Vec<Area> = m
                            .below(q)
                            .map(|(p, a)| {
                                assert_eq!(m.at(p), a);
                                *a
                            })
                            .collect();
                        let want: Vec<Area> = model.range(..q).rev().map(|(_, a)| *a).collect();
                        assert_eq!(got, want);
                    }
                    _ => {
                        let r = q..q + next(40);
                        let got: Vec<Area> = m.overlapping(r.clone()).copied().collect();
                        let want: Vec<Area> = model
                            .values()
                            .filter(|a| a.iova < r.end && a.iova + a.len > r.start)
                            .copied()
                            .collect();
                        assert_eq!(got, want, "step {step} {r:?}");
                    }
                }
                peak = peak.max(model.len());
                if step % 97 == 0 {
                    check(&m, &model, peak);
                }
            }
            while let Some((&k, _)) = model.iter().next() {
                assert_eq!(m.remove(k), model.remove(&k));
            }
            check(&m, &model, peak);
        }
    }
}
