//! Where a probe may map: the lowest free page-aligned IOVA range (pure).
//!
//! A probe maps only at a *scratch IOVA*: inside the IOAS's usable ranges and outside
//! every IOVA range a region of the space owns (mapped or not: a private page's IOVA is
//! unmapped but still the region's) and outside the range about to be registered.
//! Lowest first, as the cut probe always mapped before scratch IOVAs existed: at the
//! first attach (no region yet) that is the bottom of the space; later probes land in the
//! first gap below, between or above the regions.

use std::ops::RangeInclusive;

use super::model::PAGE_SIZE;
use super::ranges::RangeSet;

/// The choice among `ranges` (inclusive, ascending): the lowest
/// page-aligned `len` bytes inside one range and outside `avoid`.
pub(crate) fn pick_scratch(
    ranges: &[RangeInclusive<u64>],
    len: u64,
    avoid: &RangeSet,
) -> Option<u64> {
    for r in ranges {
        // Exclusive end, page aligned; an inclusive end of u64::MAX loses the last page.
        let end = r.end().saturating_add(1) & !(PAGE_SIZE - 1);
        let mut start = r.start().next_multiple_of(PAGE_SIZE);
        while start < end && end - start >= len {
            match avoid.overlapping(start..start + len).last() {
                None => return Some(start),
                Some(hit) => match hit.end.checked_next_multiple_of(PAGE_SIZE) {
                    Some(next) => start = next,
                    None => break,
                },
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn set(r: std::ops::Range<u64>) -> RangeSet {
        let mut s = RangeSet::new();
        s.insert(r);
        s
    }

    #[test]
    fn scratch_is_the_lowest_free_aligned_range() {
        let ranges = [0..=0xfedf_ffff, 0xfef0_0000..=0xffff_ffff_ffff];
        let none = RangeSet::new();
        assert_eq!(pick_scratch(&ranges, 3 * P, &none), Some(0));
        // A region at the bottom pushes the probe above it, never into it.
        let low = set(0..0x10_0000);
        assert_eq!(pick_scratch(&ranges, P, &low), Some(0x10_0000));
        // Gaps too small are skipped; the next range up is used.
        let most = set(0x1000..0xfedf_f000);
        assert_eq!(pick_scratch(&ranges, P, &most), Some(0));
        assert_eq!(pick_scratch(&ranges, 2 * P, &most), Some(0xfef0_0000));
        // Unaligned starts are rounded inwards; u64::MAX ends lose the last page only.
        assert_eq!(pick_scratch(&[0x1234..=0x5fff], P, &none), Some(0x2000));
        assert_eq!(pick_scratch(&[0x1234..=0x2233], P, &none), None);
        let all_but_top = set(0..u64::MAX - 2 * P + 1);
        assert_eq!(
            pick_scratch(&[0..=u64::MAX], P, &all_but_top),
            Some(u64::MAX - 2 * P + 1)
        );
        let all = set(0..u64::MAX);
        assert_eq!(pick_scratch(&[0..=u64::MAX], P, &all), None);
    }

    #[test]
    fn scratch_never_overlaps_what_it_must_avoid() {
        // Exhaustive over small layouts: every answer is inside a range, aligned, clear
        // of `avoid`, and no lower aligned candidate was clear.
        let ranges = [0x0..=0x7fff, 0xa000..=0x1_3fff];
        for mask in 0u32..(1 << 20) / 97 {
            let mask = mask * 97;
            let avoid: RangeSet = (0..20u64)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| i * P..(i + 1) * P)
                .collect();
            for len in [P, 2 * P, 3 * P] {
                let got = pick_scratch(&ranges, len, &avoid);
                let clear = |s: u64| {
                    s % P == 0
                        && ranges
                            .iter()
                            .any(|r| *r.start() <= s && s + len - 1 <= *r.end())
                        && !avoid.intersects(s..s + len)
                };
                let best = (0..20u64).map(|i| i * P).find(|&s| clear(s));
                assert_eq!(got, best, "avoid {avoid:?} len {len:#x}");
            }
        }
    }
}
