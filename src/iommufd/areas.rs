//! The IOAS's own record of the areas it mapped, mirroring the kernel's `iopt_area`s.
//!
//! The kernel's `IOMMU_IOAS_UNMAP` walks the range area by area and fails with `ENOENT`
//! at the first area that sticks out, after having unmapped the ones before it. Checking
//! the range against this record first lets [`super::Ioas::unmap`] refuse a cutting unmap
//! before anything changes, and name the area it would cut.
//!
//! Invariant: areas are disjoint, non-empty, keyed by first IOVA with the inclusive last
//! IOVA as value (so an area may end at `u64::MAX`).

use std::collections::BTreeMap;

use super::error::Span;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Areas {
    map: BTreeMap<u64, u64>,
}

/// `[first, last]` as a span (the length saturates for the full 2^64 range).
fn span(first: u64, last: u64) -> Span {
    Span::new(first, (last - first).saturating_add(1))
}

impl Areas {
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
    /// the range (areas are disjoint), so it is what [`Areas::check_whole`] would accept
    /// with `last - first + 1` bytes, at the cost of one lookup.
    pub fn is_exact(&self, first: u64, last: u64) -> bool {
        self.map.get(&first) == Some(&last)
    }

    /// Forgets the area starting at `first` (the fast path after [`Areas::is_exact`]).
    pub fn remove_at(&mut self, first: u64) {
        self.map.remove(&first);
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

    /// True if one area holds both `at - 1` and `at` (a cut at `at` would split it).
    pub fn straddles(&self, at: u64) -> bool {
        at != 0
            && self
                .map
                .range(..at)
                .next_back()
                .is_some_and(|(_, &l)| l >= at)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
}
