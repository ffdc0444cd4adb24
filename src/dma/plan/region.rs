//! A registered region as the tracker records it: its spec and one attribute bit per page.

use std::ops::Range;

use super::model::{PageState, RegionId, RegionSpec, Strategy, PAGE_SIZE};
use super::pages::PageBitmap;

/// A registered region: its spec and the attribute bit of each page.
#[derive(Clone, Debug)]
pub struct Region {
    /// Identifier.
    pub id: RegionId,
    /// The spec it was registered with.
    pub spec: RegionSpec,
    /// First IOVA.
    pub iova: u64,
    /// One bit per page; set = private.
    pub(crate) private: PageBitmap,
}

impl Region {
    /// GPA range.
    pub fn gpa_range(&self) -> Range<u64> {
        self.spec.gpa..self.spec.gpa + self.spec.len
    }

    /// IOVA range.
    pub fn iova_range(&self) -> Range<u64> {
        self.iova..self.iova + self.spec.len
    }

    /// IOVA of a GPA inside the region.
    pub fn gpa_to_iova(&self, gpa: u64) -> u64 {
        gpa - self.spec.gpa + self.iova
    }

    /// State of the page holding `gpa` (must be inside the region).
    pub fn page_state(&self, gpa: u64) -> PageState {
        if self.private.get((gpa - self.spec.gpa) / PAGE_SIZE) {
            PageState::Private
        } else {
            PageState::Shared
        }
    }

    /// Maximal GPA runs inside `r` (clipped to the region) whose pages are in `state`.
    pub fn runs(&self, r: Range<u64>, state: PageState) -> impl Iterator<Item = Range<u64>> + '_ {
        let g = self.gpa_range();
        let (s, e) = (r.start.max(g.start), r.end.min(g.end));
        let base = self.spec.gpa;
        let pages = if s < e {
            (s - base) / PAGE_SIZE..(e - base) / PAGE_SIZE
        } else {
            0..0
        };
        self.private
            .runs(pages, state == PageState::Private)
            .map(move |p| base + p.start * PAGE_SIZE..base + p.end * PAGE_SIZE)
    }

    /// Strategy shortcut.
    pub fn strategy(&self) -> Strategy {
        self.spec.strategy
    }
}
