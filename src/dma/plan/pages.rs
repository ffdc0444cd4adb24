//! One bit per 4 KiB page, packed in `u64` words.
//!
//! Invariants: bit `i` lives in `words[i / 64]` at position `i % 64`; bits at or past
//! `len` are always zero, so word-level scans need no tail masking on read.

use std::ops::Range;

/// A fixed-length bitmap indexed by page number within a region.
///
/// ```
/// use vfio_gmem::dma::planning::PageBitmap;
/// let mut b = PageBitmap::new(200, false);
/// b.set_range(10..70, true);
/// assert_eq!(b.runs(0..200, true).collect::<Vec<_>>(), vec![10..70]);
/// assert_eq!(b.runs(0..200, false).collect::<Vec<_>>(), vec![0..10, 70..200]);
/// assert_eq!(b.count(0..200, true), 60);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    len: u64,
}

impl PageBitmap {
    /// A bitmap of `len` bits, all set to `value`.
    pub fn new(len: u64, value: bool) -> Self {
        let n = len.div_ceil(64) as usize;
        if !value {
            return PageBitmap {
                words: vec![0; n],
                len,
            };
        }
        // All ones in one fill, then the bits past `len` cleared (the invariant).
        let mut words = vec![u64::MAX; n];
        if let (Some(last), tail @ 1..) = (words.last_mut(), len % 64) {
            *last = (1u64 << tail) - 1;
        }
        PageBitmap { words, len }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes used by the words.
    pub fn memory_bytes(&self) -> usize {
        self.words.capacity() * std::mem::size_of::<u64>()
    }

    /// Value of bit `i`. Panics if `i >= len`.
    pub fn get(&self, i: u64) -> bool {
        assert!(i < self.len, "bit {i} out of range {}", self.len);
        self.words[(i / 64) as usize] >> (i % 64) & 1 == 1
    }

    /// Sets bits `r` to `value`. Panics if `r` reaches past `len`.
    #[inline(always)]
    pub fn set_range(&mut self, r: Range<u64>, value: bool) {
        assert!(r.end <= self.len, "range end {} past {}", r.end, self.len);
        if let Some((w, mask)) = one_word(&r) {
            // The common case (a conversion of a few pages): one word, one store.
            if value {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
            return;
        }
        self.set_words(r, value);
    }

    /// [`set_range`](Self::set_range) across words.
    fn set_words(&mut self, r: Range<u64>, value: bool) {
        let mut i = r.start;
        while i < r.end {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (r.end - (i - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if value {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
            i = i - lo + hi;
        }
    }

    /// First index in `from..end` whose bit equals `value`, or `end`.
    pub fn find(&self, from: u64, end: u64, value: bool) -> u64 {
        let mut i = from;
        while i < end {
            let w = (i / 64) as usize;
            let word = if value { self.words[w] } else { !self.words[w] };
            let word = word >> (i % 64);
            if word != 0 {
                return (i + u64::from(word.trailing_zeros())).min(end);
            }
            i = (i / 64 + 1) * 64;
        }
        end
    }

    /// Maximal runs of bits equal to `value` inside `r`, ascending.
    pub fn runs(&self, r: Range<u64>, value: bool) -> impl Iterator<Item = Range<u64>> + '_ {
        let end = r.end.min(self.len);
        let mut cursor = r.start;
        std::iter::from_fn(move || {
            let s = self.find(cursor, end, value);
            if s >= end {
                return None;
            }
            let e = self.find(s, end, !value);
            cursor = e;
            Some(s..e)
        })
    }

    /// `Some(v)` if every bit of the non-empty range `r` is `v`, `None` if they differ.
    #[inline]
    pub fn uniform(&self, r: Range<u64>) -> Option<bool> {
        if let Some((w, mask)) = one_word(&r) {
            return match self.words[w] & mask {
                0 => Some(false),
                bits if bits == mask => Some(true),
                _ => None,
            };
        }
        let first = self.get(r.start);
        (self.find(r.start, r.end, !first) >= r.end).then_some(first)
    }

    /// Number of bits equal to `value` inside `r`.
    pub fn count(&self, r: Range<u64>, value: bool) -> u64 {
        self.runs(r, value).map(|x| x.end - x.start).sum()
    }
}

/// Word index and bit mask of `r` when it is non-empty and lies inside one word.
#[inline(always)]
fn one_word(r: &Range<u64>) -> Option<(usize, u64)> {
    let len = r.end.checked_sub(r.start).filter(|&n| n > 0)?;
    let w = r.start / 64;
    if (r.end - 1) / 64 != w {
        return None;
    }
    Some((w as usize, (u64::MAX >> (64 - len)) << (r.start % 64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_scan_across_words() {
        let mut b = PageBitmap::new(300, true);
        b.set_range(63..129, false);
        assert!(b.get(62) && !b.get(63) && !b.get(128) && b.get(129));
        assert_eq!(b.runs(0..300, false).collect::<Vec<_>>(), vec![63..129]);
        assert_eq!(b.runs(100..300, true).collect::<Vec<_>>(), vec![129..300]);
        assert_eq!(b.count(0..300, true), 300 - 66);
        assert_eq!(b.find(0, 300, false), 63);
        assert_eq!(b.find(129, 300, false), 300);
    }

    #[test]
    fn a_full_bitmap_has_no_bits_past_its_length() {
        for len in [0, 1, 63, 64, 65, 300] {
            let b = PageBitmap::new(len, true);
            assert_eq!(b.count(0..len, true), len);
            assert_eq!(b, {
                let mut x = PageBitmap::new(len, false);
                x.set_range(0..len, true);
                x
            });
        }
    }

    #[test]
    fn matches_naive_model() {
        let mut b = PageBitmap::new(130, false);
        let mut m = [false; 130];
        let mut x: u64 = 7;
        for _ in 0..500 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let s = (x >> 33) % 130;
            let e = s + (x >> 20) % (130 - s + 1);
            let v = x & 1 == 1;
            b.set_range(s..e, v);
            m[s as usize..e as usize].iter_mut().for_each(|p| *p = v);
            for (i, &mv) in m.iter().enumerate() {
                assert_eq!(b.get(i as u64), mv);
            }
            assert_eq!(
                b.count(0..130, true),
                m.iter().filter(|&&p| p).count() as u64
            );
        }
    }
}
