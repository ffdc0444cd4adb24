//! A set of disjoint, non-adjacent half-open `u64` ranges.
//!
//! Invariants: stored ranges are non-empty, sorted, pairwise disjoint and never adjacent
//! (inserting `[a,b)` next to `[b,c)` stores `[a,c)`), so iteration yields maximal runs.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

/// Disjoint half-open ranges, merged on insertion.
///
/// ```
/// use vfio_gmem::dma::planning::RangeSet;
/// let mut s = RangeSet::new();
/// s.insert(0..4);
/// s.insert(4..8);
/// s.remove(2..3);
/// assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..2, 3..8]);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// True if the set holds no range.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of maximal ranges.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Sum of the lengths of all ranges.
    pub fn total(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }

    /// Maximal ranges in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
    }

    /// Adds `r`, merging with overlapping or adjacent ranges. Empty ranges are ignored.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // A predecessor that reaches `start` absorbs the new range.
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let covered: Vec<u64> = self.map.range(start..=end).map(|(&s, _)| s).collect();
        for s in covered {
            let e = self.map.remove(&s).expect("key just listed");
            end = end.max(e);
        }
        self.map.insert(start, end);
    }

    /// Removes `r` from the set, splitting ranges that straddle its ends.
    pub fn remove(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let hit: Vec<(u64, u64)> = self
            .overlapping(r.clone())
            .map(|x| (x.start, x.end))
            .collect();
        for (s, e) in hit {
            self.map.remove(&s);
            if s < r.start {
                self.map.insert(s, r.start);
            }
            if e > r.end {
                self.map.insert(r.end, e);
            }
        }
    }

    /// True if every value of `r` is in the set (an empty `r` is contained).
    pub fn contains_range(&self, r: Range<u64>) -> bool {
        if r.start >= r.end {
            return true;
        }
        matches!(self.map.range(..=r.start).next_back(), Some((_, &e)) if e >= r.end)
    }

    /// True if any value of `r` is in the set.
    pub fn intersects(&self, r: Range<u64>) -> bool {
        self.overlapping(r).next().is_some()
    }

    /// Stored ranges that overlap `r`, unclipped, in ascending order.
    pub fn overlapping(&self, r: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let first = match self.map.range(..r.start).next_back() {
            Some((&s, &e)) if e > r.start => s,
            _ => r.start,
        };
        let end = r.end;
        self.map
            .range(first..)
            .take_while(move |(&s, _)| s < end)
            .map(|(&s, &e)| s..e)
            .filter(move |x| x.end > r.start)
    }

    /// Parts of `r` that are in the set, clipped to `r`.
    pub fn clipped(&self, r: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let (lo, hi) = (r.start, r.end);
        self.overlapping(r)
            .map(move |x| x.start.max(lo)..x.end.min(hi))
    }

    /// Parts of `r` that are NOT in the set, in ascending order.
    pub fn gaps(&self, r: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut cursor = r.start;
        for x in self.clipped(r.clone()) {
            if x.start > cursor {
                out.push(cursor..x.start);
            }
            cursor = x.end;
        }
        if cursor < r.end {
            out.push(cursor..r.end);
        }
        out
    }
}

impl fmt::Debug for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&fmt_ranges(self.iter()))
    }
}

impl FromIterator<Range<u64>> for RangeSet {
    fn from_iter<I: IntoIterator<Item = Range<u64>>>(iter: I) -> Self {
        let mut s = RangeSet::new();
        for r in iter {
            s.insert(r);
        }
        s
    }
}

/// Formats a byte range as `[0x1000, 0x3000)`.
pub(crate) fn fmt_range(r: &Range<u64>) -> String {
    format!("[{:#x}, {:#x})", r.start, r.end)
}

/// Formats ranges as a comma-separated list, or `none`.
pub(crate) fn fmt_ranges(it: impl Iterator<Item = Range<u64>>) -> String {
    let v: Vec<String> = it.map(|r| fmt_range(&r)).collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_overlapping_and_adjacent() {
        let s: RangeSet = [10..20, 30..40, 20..25, 5..11, 39..50]
            .into_iter()
            .collect();
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![5..25, 30..50]);
        assert_eq!(s.total(), 40);
    }

    #[test]
    fn remove_splits() {
        let mut s = RangeSet::new();
        s.insert(0..100);
        s.remove(10..20);
        s.remove(90..200);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..10, 20..90]);
        assert!(s.contains_range(20..90));
        assert!(!s.contains_range(5..15));
        assert!(s.intersects(5..15));
        assert!(!s.intersects(10..20));
        assert_eq!(s.gaps(0..100), vec![10..20, 90..100]);
        assert_eq!(s.clipped(5..30).collect::<Vec<_>>(), vec![5..10, 20..30]);
    }
}
