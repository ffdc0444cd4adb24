//! The IOAS's own record of the areas it mapped, mirroring the kernel's `iopt_area`s.
//!
//! The kernel's `IOMMU_IOAS_UNMAP` walks the range area by area and fails with `ENOENT`
//! at the first area that sticks out, after having unmapped the ones before it. Checking
//! the range against this record first lets [`super::Ioas::unmap`] refuse a cutting unmap
//! before anything changes, and name the area it would cut.
//!
//! Invariants:
//! - areas are disjoint and non-empty, each stored as `(first, last)` with `last` the
//!   inclusive last IOVA (so an area may end at `u64::MAX`);
//! - `chunks` holds them in ascending order: every chunk is non-empty, holds at most `B`
//!   areas sorted by `first` (its live part `v[dead..]`; `v` only grows past its
//!   capacity with no dead prefix), and all of them lie before every area of the next
//!   chunk;
//! - no two adjacent chunks both hold fewer than `B / 4` areas, so there are at most
//!   `8 n / B + 1` chunks for `n` areas.
//!
//! Costs, for `n` areas: appending after the last area, and taking out the first or the
//! last, are O(1) amortized; any other insert or exact removal is O(log n + B); the range
//! operations are O(log n + B + k) for `k` areas in the range.

use std::fmt;

use super::error::Span;

/// Areas per chunk at most.
const CHUNK: usize = 64;

/// Up to `B` areas, sorted: `v[dead..]` (the dead prefix makes taking out the first O(1)).
#[derive(Clone, Default)]
struct Chunk {
    dead: usize,
    v: Vec<(u64, u64)>,
}

impl std::ops::Deref for Chunk {
    type Target = [(u64, u64)];
    fn deref(&self) -> &Self::Target {
        &self.v[self.dead..]
    }
}

impl std::ops::DerefMut for Chunk {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.v[self.dead..]
    }
}

impl Chunk {
    fn with_capacity(n: usize) -> Self {
        Chunk {
            dead: 0,
            v: Vec::with_capacity(n),
        }
    }

    /// Drops the dead prefix if `v` would otherwise have to grow.
    fn make_room(&mut self) {
        if self.dead > 0 && self.v.len() == self.v.capacity() {
            self.v.drain(..self.dead);
            self.dead = 0;
        }
    }

    fn push(&mut self, area: (u64, u64)) {
        self.make_room();
        self.v.push(area);
    }

    /// Inserts at index `j`, moving the shorter side.
    fn insert(&mut self, j: usize, area: (u64, u64)) {
        if self.dead > 0 && j <= self.len() / 2 {
            let d = self.dead;
            self.v.copy_within(d..d + j, d - 1);
            self.v[d - 1 + j] = area;
            self.dead = d - 1;
        } else {
            self.make_room();
            self.v.insert(self.dead + j, area);
        }
    }

    /// Removes index `j`, moving the shorter side.
    fn remove(&mut self, j: usize) {
        let d = self.dead;
        if j == 0 {
            self.dead = d + 1;
        } else if j + 1 == self.len() {
            self.v.pop();
        } else if j < self.len() / 2 {
            self.v.copy_within(d..d + j, d + 1);
            self.dead = d + 1;
        } else {
            self.v.remove(d + j);
        }
    }

    fn split_off(&mut self, at: usize) -> Chunk {
        Chunk {
            dead: 0,
            v: self.v.split_off(self.dead + at),
        }
    }

    fn drain(&mut self, r: std::ops::Range<usize>) -> std::vec::Drain<'_, (u64, u64)> {
        self.v.drain(self.dead + r.start..self.dead + r.end)
    }

    fn append(&mut self, other: &Chunk) {
        self.make_room();
        self.v.extend_from_slice(other);
    }
}

#[derive(Clone)]
pub(crate) struct Areas<const B: usize = CHUNK> {
    chunks: Vec<Chunk>,
}

impl Default for Areas {
    fn default() -> Self {
        Self::empty()
    }
}

impl<const B: usize> PartialEq for Areas<B> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl<const B: usize> Eq for Areas<B> {}

impl<const B: usize> fmt::Debug for Areas<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// `[first, last]` as a span (the length saturates for the full 2^64 range).
fn span(first: u64, last: u64) -> Span {
    Span::new(first, (last - first).saturating_add(1))
}

fn bytes(first: u64, last: u64) -> u128 {
    (last - first) as u128 + 1
}

impl<const B: usize> Areas<B> {
    const fn empty() -> Self {
        Areas { chunks: Vec::new() }
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.chunks.iter().flat_map(|ch| ch.iter()).copied()
    }

    /// Position (chunk, index) of the last area starting at or before `x`.
    fn last_at_or_before(&self, x: u64) -> Option<(usize, usize)> {
        let c = self
            .chunks
            .partition_point(|ch| ch[0].0 <= x)
            .checked_sub(1)?;
        Some((c, self.chunks[c].partition_point(|e| e.0 <= x) - 1))
    }

    /// Position of the first area starting at or after `x` (possibly one past the end of
    /// a chunk, or chunk `chunks.len()`).
    fn first_at_or_after(&self, x: u64) -> (usize, usize) {
        match self.last_at_or_before(x) {
            Some((c, j)) if self.chunks[c][j].0 == x => (c, j),
            Some((c, j)) => (c, j + 1),
            None => (0, 0),
        }
    }

    /// The areas from position `(c, j)` on, in order.
    fn from(&self, c: usize, j: usize) -> impl Iterator<Item = (u64, u64)> + '_ {
        let (head, rest) = match self.chunks.get(c..).and_then(|s| s.split_first()) {
            Some((h, rest)) => (Some(&h[j..]), rest),
            None => (None, &[][..]),
        };
        head.into_iter()
            .flatten()
            .chain(rest.iter().flat_map(|ch| ch.iter()))
            .copied()
    }

    /// Areas that intersect `[first, last]`, in IOVA order.
    fn intersecting(&self, first: u64, last: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        // The area starting at or before `first` may reach into the range; every other
        // intersecting area starts inside it.
        let (c, j) = match self.last_at_or_before(first) {
            Some((c, j)) if self.chunks[c][j].1 >= first => (c, j),
            Some((c, j)) => (c, j + 1),
            None => (0, 0),
        };
        self.from(c, j).take_while(move |&(f, _)| f <= last)
    }

    /// Puts `area` at index `j` of chunk `c`, splitting the chunk if it overflows.
    fn insert_at(&mut self, c: usize, j: usize, area: (u64, u64)) {
        let ch = &mut self.chunks[c];
        ch.insert(j, area);
        if ch.len() > B {
            let tail = ch.split_off(ch.len() / 2);
            self.chunks.insert(c + 1, tail);
        }
    }

    /// Restores the chunk invariants after chunk `c` shrank (it may be empty): drops it if
    /// empty, merges it with its smaller neighbour while it is short and they fit in one.
    fn settle(&mut self, mut c: usize) {
        loop {
            let len = self.chunks[c].len();
            if len == 0 {
                self.chunks.remove(c);
                if self.chunks.is_empty() {
                    return;
                }
                c = c.saturating_sub(1);
                continue;
            }
            if len >= B / 4 {
                return;
            }
            let right = (c + 1 < self.chunks.len()).then_some(c + 1);
            let other = match (c.checked_sub(1), right) {
                (Some(l), Some(r)) if self.chunks[l].len() <= self.chunks[r].len() => l,
                (_, Some(r)) => r,
                (Some(l), None) => l,
                (None, None) => return,
            };
            if len + self.chunks[other].len() > B {
                return;
            }
            let lo = c.min(other);
            let moved = self.chunks.remove(lo + 1);
            self.chunks[lo].append(&moved);
            c = lo;
        }
    }

    /// The first area overlapping `[first, last]`, if any.
    pub fn overlapping(&self, first: u64, last: u64) -> Option<Span> {
        self.intersecting(first, last)
            .next()
            .map(|(f, l)| span(f, l))
    }

    /// Checks that every area meeting `[first, last]` lies inside it. `Ok(bytes)` is what
    /// an unmap of the range would remove; `Err(area)` names the first area it would cut.
    pub fn check_whole(&self, first: u64, last: u64) -> Result<u128, Span> {
        let mut total = 0u128;
        for (f, l) in self.intersecting(first, last) {
            if f < first || l > last {
                return Err(span(f, l));
            }
            total += bytes(f, l);
        }
        Ok(total)
    }

    /// True if `[first, last]` is exactly one recorded area. Then no other area meets
    /// the range (areas are disjoint), so it is what [`Areas::check_whole`] would accept
    /// with `last - first + 1` bytes, at the cost of one lookup.
    #[cfg(test)]
    pub fn is_exact(&self, first: u64, last: u64) -> bool {
        self.last_at_or_before(first)
            .is_some_and(|(c, j)| self.chunks[c][j] == (first, last))
    }

    /// If `[first, last]` is exactly one recorded area, forgets it and returns true (what
    /// [`Areas::is_exact`] followed by a removal does, in one traversal); otherwise
    /// changes nothing.
    pub fn take_exact(&mut self, first: u64, last: u64) -> bool {
        let area = (first, last);
        let (Some(head), Some(tail)) = (self.chunks.first(), self.chunks.last()) else {
            return false;
        };
        let (c, j) = if head.first() == Some(&area) {
            (0, 0)
        } else if tail.last() == Some(&area) {
            (self.chunks.len() - 1, tail.len() - 1)
        } else {
            match self.last_at_or_before(first) {
                Some((c, j)) if self.chunks[c][j] == area => (c, j),
                _ => return false,
            }
        };
        self.chunks[c].remove(j);
        if self.chunks[c].len() < B / 4 {
            self.settle(c);
        }
        true
    }

    /// Records a new area. The kernel accepted it, so it cannot overlap a recorded one.
    pub fn insert(&mut self, first: u64, last: u64) {
        debug_assert!(first <= last && self.overlapping(first, last).is_none());
        match self.chunks.last_mut() {
            // After every recorded area: append.
            Some(tail) if tail[tail.len() - 1].0 < first => {
                if tail.len() < B {
                    tail.push((first, last));
                } else {
                    self.push_chunk(first, last);
                }
            }
            Some(_) => {
                let c = self
                    .chunks
                    .partition_point(|ch| ch[0].0 < first)
                    .saturating_sub(1);
                let j = self.chunks[c].partition_point(|e| e.0 < first);
                self.insert_at(c, j, (first, last));
            }
            None => self.push_chunk(first, last),
        }
    }

    fn push_chunk(&mut self, first: u64, last: u64) {
        let mut ch = Chunk::with_capacity(B);
        ch.push((first, last));
        self.chunks.push(ch);
    }

    /// Forgets every area inside `[first, last]`; returns their total size.
    pub fn remove_within(&mut self, first: u64, last: u64) -> u128 {
        // The areas inside form a run: from the first starting at or after `first`, while
        // they end by `last`.
        let (c0, mut j) = self.first_at_or_after(first);
        let mut c = c0;
        let mut total = 0u128;
        while let Some(ch) = self.chunks.get_mut(c) {
            let k = ch[j..].iter().take_while(|&&(_, l)| l <= last).count();
            let through = j + k == ch.len();
            total += ch.drain(j..j + k).map(|(f, l)| bytes(f, l)).sum::<u128>();
            if !through {
                break;
            }
            c += 1;
            j = 0;
        }
        if total == 0 {
            return 0;
        }
        // Chunks c0..c were drained through their end: the emptied ones are contiguous.
        let lo = if self.chunks[c0].is_empty() {
            c0
        } else {
            c0 + 1
        };
        if lo < c {
            self.chunks.drain(lo..c);
        }
        if lo < self.chunks.len() {
            self.settle(lo);
        }
        if lo > 0 && lo - 1 < self.chunks.len() {
            self.settle(lo - 1);
        }
        total
    }

    /// True if one area holds both `at - 1` and `at` (a cut at `at` would split it).
    pub fn straddles(&self, at: u64) -> bool {
        at != 0
            && self
                .last_at_or_before(at - 1)
                .is_some_and(|(c, j)| self.chunks[c][j].1 >= at)
    }

    /// Splits the area containing both `at - 1` and `at`, so that a new area starts at
    /// `at` (what `iopt_area_split` does). No-op if no area straddles `at`.
    pub fn cut_before(&mut self, at: u64) {
        if at == 0 {
            return;
        }
        if let Some((c, j)) = self.last_at_or_before(at - 1) {
            let l = self.chunks[c][j].1;
            if l >= at {
                self.chunks[c][j].1 = at - 1;
                self.insert_at(c, j + 1, (at, l));
            }
        }
    }

    /// The pieces of recorded areas that cover `[first, last]`, clipped to it, in order
    /// (what `IOMMU_IOAS_COPY` turns into areas of the destination).
    pub fn pieces(&self, first: u64, last: u64) -> Vec<(u64, u64)> {
        self.intersecting(first, last)
            .map(|(f, l)| (f.max(first), l.min(last)))
            .collect()
    }

    /// Forgets everything; returns the total size.
    pub fn clear(&mut self) -> u128 {
        let n = self.iter().map(|(f, l)| bytes(f, l)).sum();
        self.chunks.clear();
        n
    }

    /// All areas as spans, in IOVA order.
    pub fn spans(&self) -> Vec<Span> {
        self.iter().map(|(f, l)| span(f, l)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The record as it was kept before the chunks: one `BTreeMap` from first to last
    /// IOVA. [`Areas`] must answer exactly as it does.
    #[derive(Default)]
    struct Model {
        map: BTreeMap<u64, u64>,
    }

    impl Model {
        /// Areas that intersect `[first, last]`, in IOVA order.
        fn intersecting(&self, first: u64, last: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
            // The area starting at or before `first` may reach into the range; every other
            // intersecting area starts inside it.
            let before = self
                .map
                .range(..=first)
                .next_back()
                .filter(|&(_, &l)| l >= first)
                .map(|(&f, &l)| (f, l));
            let inside = self
                .map
                .range((
                    std::ops::Bound::Excluded(first),
                    std::ops::Bound::Included(last),
                ))
                .map(|(&f, &l)| (f, l));
            before.into_iter().chain(inside)
        }

        /// The first area overlapping `[first, last]`, if any.
        pub fn overlapping(&self, first: u64, last: u64) -> Option<Span> {
            self.intersecting(first, last)
                .next()
                .map(|(f, l)| span(f, l))
        }

        /// Checks that every area meeting `[first, last]` lies inside it. `Ok(bytes)` is what
        /// an unmap of the range would remove; `Err(area)` names the first area it would cut.
        pub fn check_whole(&self, first: u64, last: u64) -> Result<u128, Span> {
            let mut bytes = 0u128;
            for (f, l) in self.intersecting(first, last) {
                if f < first || l > last {
                    return Err(span(f, l));
                }
                bytes += (l - f) as u128 + 1;
            }
            Ok(bytes)
        }

        /// True if `[first, last]` is exactly one recorded area. Then no other area meets
        /// the range (areas are disjoint), so it is what [`Model::check_whole`] would accept
        /// with `last - first + 1` bytes, at the cost of one lookup.
        pub fn is_exact(&self, first: u64, last: u64) -> bool {
            self.map.get(&first) == Some(&last)
        }

        /// If `[first, last]` is exactly one recorded area, forgets it and returns true (what
        /// [`Model::is_exact`] followed by a removal does, in one traversal); otherwise
        /// changes nothing.
        pub fn take_exact(&mut self, first: u64, last: u64) -> bool {
            match self.map.remove(&first) {
                Some(l) if l == last => true,
                Some(l) => {
                    self.map.insert(first, l);
                    false
                }
                None => false,
            }
        }

        /// Records a new area. The kernel accepted it, so it cannot overlap a recorded one.
        pub fn insert(&mut self, first: u64, last: u64) {
            debug_assert!(first <= last && self.overlapping(first, last).is_none());
            self.map.insert(first, last);
        }

        /// Forgets every area inside `[first, last]`; returns their total size.
        pub fn remove_within(&mut self, first: u64, last: u64) -> u128 {
            let inside: Vec<(u64, u64)> = self
                .intersecting(first, last)
                .filter(|&(f, l)| f >= first && l <= last)
                .collect();
            inside
                .into_iter()
                .map(|(f, l)| {
                    self.map.remove(&f);
                    (l - f) as u128 + 1
                })
                .sum()
        }

        /// Splits the area containing both `at - 1` and `at`, so that a new area starts at
        /// `at` (what `iopt_area_split` does). No-op if no area straddles `at`.
        pub fn cut_before(&mut self, at: u64) {
            if at == 0 {
                return;
            }
            if let Some((&f, &l)) = self.map.range(..at).next_back() {
                if l >= at {
                    self.map.insert(f, at - 1);
                    self.map.insert(at, l);
                }
            }
        }

        /// The pieces of recorded areas that cover `[first, last]`, clipped to it, in order
        /// (what `IOMMU_IOAS_COPY` turns into areas of the destination).
        pub fn pieces(&self, first: u64, last: u64) -> Vec<(u64, u64)> {
            self.intersecting(first, last)
                .map(|(f, l)| (f.max(first), l.min(last)))
                .collect()
        }

        /// Forgets everything; returns the total size.
        pub fn clear(&mut self) -> u128 {
            let n = self.map.iter().map(|(&f, &l)| (l - f) as u128 + 1).sum();
            self.map.clear();
            n
        }

        /// All areas as spans, in IOVA order.
        pub fn spans(&self) -> Vec<Span> {
            self.map.iter().map(|(&f, &l)| span(f, l)).collect()
        }
    }

    const P: u64 = 0x1000;

    #[test]
    fn whole_unmap_and_cuts() {
        let mut a = Areas::default();
        a.insert(0, 8 * P - 1);
        a.insert(16 * P, 17 * P - 1);
        assert_eq!(a.check_whole(2 * P, 4 * P - 1), Err(Span::new(0, 8 * P)));
        assert_eq!(a.check_whole(0, 20 * P), Ok(9 * P as u128));
        assert_eq!(a.check_whole(9 * P, 10 * P), Ok(0));
        assert_eq!(a.overlapping(7 * P, 7 * P), Some(Span::new(0, 8 * P)));

        assert!(a.is_exact(16 * P, 17 * P - 1));
        assert!(!a.is_exact(16 * P, 18 * P - 1));
        assert!(!a.is_exact(0, 4 * P - 1));
        assert!(!a.take_exact(0, 4 * P - 1));
        assert!(a.take_exact(16 * P, 17 * P - 1));
        assert!(!a.is_exact(16 * P, 17 * P - 1));
        a.insert(16 * P, 17 * P - 1);

        assert!(a.straddles(2 * P) && a.straddles(7 * P));
        assert!(!a.straddles(0) && !a.straddles(8 * P) && !a.straddles(16 * P));
        assert!(!a.straddles(12 * P));

        // The compat cut: pieces [0,2) [2,4) [4,8), then the middle goes.
        a.cut_before(2 * P);
        a.cut_before(4 * P);
        assert_eq!(a.remove_within(2 * P, 4 * P - 1), 2 * P as u128);
        assert_eq!(a.check_whole(0, 2 * P - 1), Ok(2 * P as u128));
        assert_eq!(a.check_whole(4 * P, 8 * P - 1), Ok(4 * P as u128));
        assert_eq!(
            a.spans(),
            vec![
                Span::new(0, 2 * P),
                Span::new(4 * P, 4 * P),
                Span::new(16 * P, P)
            ]
        );
        assert_eq!(
            a.pieces(P, 5 * P - 1),
            vec![(P, 2 * P - 1), (4 * P, 5 * P - 1)]
        );
        assert_eq!(a.clear(), 7 * P as u128);
    }

    #[test]
    fn area_at_the_top_of_the_address_space() {
        let mut a = Areas::default();
        a.insert(u64::MAX - P + 1, u64::MAX);
        assert_eq!(a.check_whole(0, u64::MAX), Ok(P as u128));
        a.cut_before(u64::MAX);
        assert_eq!(a.spans().len(), 2);
        assert_eq!(a.remove_within(0, u64::MAX), P as u128);
    }

    proptest! {
        /// Whatever is cut, the record stays disjoint and covers the same bytes.
        #[test]
        fn cuts_keep_coverage(areas in prop::collection::vec((0u64..64, 1u64..8), 1..8),
                              cuts in prop::collection::vec(0u64..80, 0..8)) {
            let mut a = Areas::default();
            for (start, len) in areas {
                let (f, l) = (start * P, (start + len) * P - 1);
                if a.overlapping(f, l).is_none() {
                    a.insert(f, l);
                }
            }
            let before = a.check_whole(0, u64::MAX).unwrap();
            for c in cuts {
                a.cut_before(c * P);
            }
            prop_assert_eq!(a.check_whole(0, u64::MAX).unwrap(), before);
            let s = a.spans();
            for w in s.windows(2) {
                prop_assert!(w[0].end() <= w[1].iova);
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        TakeExact(u64, u64),
        Overlapping(u64, u64),
        CheckWhole(u64, u64),
        RemoveWithin(u64, u64),
        CutBefore(u64),
        Pieces(u64, u64),
        IsExact(u64, u64),
        Clear,
    }

    /// Domain of the generated IOVAs: `[base, base + SPAN)`.
    const SPAN: u64 = 512;

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..SPAN, 0..SPAN).prop_map(|(a, b)| (a.min(b), a.max(b)));
        let small = (0..SPAN, 0u64..6).prop_map(|(f, n)| (f, (f + n).min(SPAN - 1)));
        prop_oneof![
            12 => small.clone().prop_map(|(f, l)| Op::Insert(f, l)),
            6 => small.clone().prop_map(|(f, l)| Op::TakeExact(f, l)),
            2 => range.clone().prop_map(|(f, l)| Op::Overlapping(f, l)),
            2 => range.clone().prop_map(|(f, l)| Op::CheckWhole(f, l)),
            1 => small.clone().prop_map(|(f, l)| Op::RemoveWithin(f, l)),
            1 => range.clone().prop_map(|(f, l)| Op::RemoveWithin(f, l)),
            3 => (0..SPAN + 1).prop_map(Op::CutBefore),
            1 => range.prop_map(|(f, l)| Op::Pieces(f, l)),
            2 => small.prop_map(|(f, l)| Op::IsExact(f, l)),
            1 => Just(Op::Clear),
        ]
    }

    impl<const B: usize> Areas<B> {
        /// Panics unless the chunk invariants of the module doc hold.
        fn check_invariants(&self) {
            for ch in &self.chunks {
                assert!(
                    !ch.is_empty() && ch.len() <= B,
                    "chunk of {} areas",
                    ch.len()
                );
            }
            for w in self.chunks.windows(2) {
                assert!(
                    w[0].len() >= B / 4 || w[1].len() >= B / 4,
                    "two short chunks"
                );
            }
            let all: Vec<_> = self.iter().collect();
            for (f, l) in &all {
                assert!(f <= l);
            }
            for w in all.windows(2) {
                assert!(
                    w[0].1 < w[1].0,
                    "{:?} and {:?} overlap or are out of order",
                    w[0],
                    w[1]
                );
            }
        }
    }

    /// Runs `ops` (offset by `base`) on a fresh [`Areas`] with chunks of `B` and on the
    /// model, comparing every answer and the whole record after each step.
    fn run<const B: usize>(base: u64, ops: &[Op]) -> Result<(), TestCaseError> {
        let mut a = Areas::<B>::empty();
        let mut m = Model::default();
        for op in ops {
            match *op {
                Op::Insert(f, l) => {
                    let (f, l) = (base + f, base + l);
                    // The kernel refuses overlapping maps: only disjoint areas are recorded.
                    if m.overlapping(f, l).is_none() {
                        a.insert(f, l);
                        m.insert(f, l);
                    }
                }
                Op::TakeExact(f, l) => {
                    prop_assert_eq!(
                        a.take_exact(base + f, base + l),
                        m.take_exact(base + f, base + l)
                    )
                }
                Op::Overlapping(f, l) => {
                    prop_assert_eq!(
                        a.overlapping(base + f, base + l),
                        m.overlapping(base + f, base + l)
                    )
                }
                Op::CheckWhole(f, l) => {
                    prop_assert_eq!(
                        a.check_whole(base + f, base + l),
                        m.check_whole(base + f, base + l)
                    )
                }
                Op::RemoveWithin(f, l) => prop_assert_eq!(
                    a.remove_within(base + f, base + l),
                    m.remove_within(base + f, base + l)
                ),
                Op::CutBefore(at) => {
                    a.cut_before(base.wrapping_add(at));
                    m.cut_before(base.wrapping_add(at));
                }
                Op::Pieces(f, l) => {
                    prop_assert_eq!(a.pieces(base + f, base + l), m.pieces(base + f, base + l))
                }
                Op::IsExact(f, l) => {
                    prop_assert_eq!(
                        a.is_exact(base + f, base + l),
                        m.is_exact(base + f, base + l)
                    )
                }
                Op::Clear => prop_assert_eq!(a.clear(), m.clear()),
            }
            a.check_invariants();
            prop_assert_eq!(a.spans(), m.spans());
        }
        prop_assert_eq!(a.check_whole(0, u64::MAX), m.check_whole(0, u64::MAX));
        Ok(())
    }

    proptest! {
        /// Random sequences of every operation answer as the `BTreeMap` model does, with
        /// chunks small enough to split and merge often and with the production size, at
        /// the bottom and at the top of the address space.
        #[test]
        fn matches_the_btreemap_model(top in any::<bool>(),
                                      ops in prop::collection::vec(op(), 1..400)) {
            let base = if top { u64::MAX - (SPAN - 1) } else { 0 };
            run::<4>(base, &ops)?;
            run::<8>(base, &ops)?;
            run::<CHUNK>(base, &ops)?;
        }
    }
}
