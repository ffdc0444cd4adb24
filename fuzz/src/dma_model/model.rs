//! The model: one `bool` per page per region, and what it predicts of the planner.

#[allow(unused_imports)]
use super::*;

#[derive(Clone, Debug)]
pub(crate) struct MRegion {
    pub(crate) id: RegionId,
    pub(crate) spec: RegionSpec,
    pub(crate) iova: u64,
    /// One entry per page; true = private.
    pub(crate) private: Vec<bool>,
}

impl MRegion {
    pub(crate) fn gpa(&self) -> u64 {
        self.spec.gpa
    }
    pub(crate) fn end(&self) -> u64 {
        self.spec.gpa + self.spec.len
    }
    pub(crate) fn pages(&self) -> u64 {
        self.spec.len / P
    }
    pub(crate) fn iova_range(&self) -> Range<u64> {
        self.iova..self.iova + self.spec.len
    }
    pub(crate) fn page(&self, gpa: u64) -> usize {
        ((gpa - self.gpa()) / P) as usize
    }
    pub(crate) fn view(&self) -> View {
        View {
            id: self.id,
            gpa: self.gpa(),
            iova: self.iova,
            len: self.spec.len,
        }
    }
}

/// Maximal runs of indices whose value is `value`.
pub(crate) fn runs(bits: &[bool], value: bool) -> impl Iterator<Item = Range<u64>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < bits.len() && bits[i] != value {
            i += 1;
        }
        if i == bits.len() {
            return None;
        }
        let s = i;
        while i < bits.len() && bits[i] == value {
            i += 1;
        }
        Some(s as u64..i as u64)
    })
}

/// The page-array model: regions sorted by GPA, one bool per page.
#[derive(Clone, Debug, Default)]
pub(crate) struct Model {
    pub(crate) regions: Vec<MRegion>,
}

impl Model {
    pub(crate) fn region_at(&self, gpa: u64) -> Option<&MRegion> {
        self.regions
            .iter()
            .find(|r| r.gpa() <= gpa && gpa < r.end())
    }

    /// Pages of convertible regions contiguous in GPA from `gpa` on.
    pub(crate) fn convertible_pages_from(&self, gpa: u64) -> u64 {
        let mut at = gpa;
        while let Some(r) = self.region_at(at) {
            if r.spec.strategy == Strategy::Whole {
                break;
            }
            at = r.end();
        }
        (at - gpa) / P
    }

    pub(crate) fn insert(&mut self, r: MRegion) {
        let at = self.regions.partition_point(|x| x.gpa() < r.gpa());
        self.regions.insert(at, r);
    }

    pub(crate) fn remove(&mut self, id: RegionId) {
        self.regions.retain(|r| r.id != id);
    }

    /// IOVA a device can reach: shared pages of convertible regions, all of `Whole` ones.
    pub(crate) fn mapped_iova(&self) -> RangeSet {
        let mut s = RangeSet::new();
        for r in &self.regions {
            for p in runs(&r.private, false) {
                s.insert(r.iova + p.start * P..r.iova + p.end * P);
            }
        }
        s
    }

    pub(crate) fn private_gpa(&self) -> RangeSet {
        let mut s = RangeSet::new();
        for r in &self.regions {
            for p in runs(&r.private, true) {
                s.insert(r.gpa() + p.start * P..r.gpa() + p.end * P);
            }
        }
        s
    }

    pub(crate) fn apply(&mut self, reqs: &[ConversionRequest]) {
        for q in reqs {
            for gpa in (q.gpa..q.gpa + q.len).step_by(P as usize) {
                let r = self
                    .regions
                    .iter_mut()
                    .find(|r| r.gpa() <= gpa && gpa < r.end())
                    .expect("validated request");
                let i = r.page(gpa);
                r.private[i] = q.to == PageState::Private;
            }
        }
    }

    /// The error the planner must give for this batch, as [`error_key`] spells it.
    pub(crate) fn expected_batch_error(&self, reqs: &[ConversionRequest]) -> Option<String> {
        for q in reqs {
            if q.gpa % P != 0 {
                return Some(format!("Unaligned {:#x}", q.gpa));
            }
            if q.len % P != 0 {
                return Some(format!("Unaligned {:#x}", q.len));
            }
            if q.len == 0 {
                return Some("Empty".into());
            }
            let Some(end) = q.gpa.checked_add(q.len) else {
                return Some(format!("Overflow {:#x}+{:#x}", q.gpa, q.len));
            };
            let mut cursor = q.gpa;
            while cursor < end {
                let Some(r) = self.region_at(cursor) else {
                    return Some(format!("NotCovered {cursor:#x}"));
                };
                if r.spec.strategy == Strategy::Whole {
                    return Some(format!("NotConvertible {}", r.id));
                }
                let piece_end = end.min(r.end());
                let g = r.spec.granule;
                if r.spec.strategy == Strategy::PerGranule
                    && ((cursor - r.gpa()) % g != 0 || (piece_end - r.gpa()) % g != 0)
                {
                    return Some(format!("GranuleUnaligned {:?}/{g:#x}", cursor..piece_end));
                }
                cursor = piece_end;
            }
            if q.discard && q.to == PageState::Shared {
                return Some(format!("DiscardOnShared {:?}", q.gpa..end));
            }
        }
        let ranges = |to: PageState| -> Vec<Range<u64>> {
            reqs.iter()
                .filter(|q| q.to == to)
                .map(|q| q.gpa..q.gpa + q.len)
                .collect()
        };
        let shared = ranges(PageState::Shared);
        for p in ranges(PageState::Private) {
            if shared.iter().any(|s| s.start < p.end && p.start < s.end) {
                return Some("Conflict".into());
            }
        }
        None
    }

    /// The error the planner must give for registering `s`, as [`error_key`] spells it.
    pub(crate) fn expected_register_error(&self, s: &RegionSpec) -> Option<String> {
        if s.gpa % P != 0 {
            return Some(format!("Unaligned {:#x}", s.gpa));
        }
        if s.len % P != 0 {
            return Some(format!("Unaligned {:#x}", s.len));
        }
        if s.len == 0 {
            return Some("Empty".into());
        }
        let top = u64::MAX as i128;
        let (gpa, len) = (s.gpa as i128, s.len as i128);
        if gpa + len > top {
            return Some(format!("Overflow {:#x}+{:#x}", s.gpa, s.len));
        }
        let iova = gpa + s.iova_offset as i128;
        if !(0..=top).contains(&iova) {
            return Some(format!("Overflow {:#x}+{:#x}", s.gpa, s.len));
        }
        if iova % P as i128 != 0 {
            return Some(format!("Unaligned {iova:#x}"));
        }
        if iova + len > top {
            return Some(format!("Overflow {iova:#x}+{:#x}", s.len));
        }
        let g = s.granule;
        if !g.is_power_of_two() || g < P || (s.strategy == Strategy::PerGranule && s.len % g != 0) {
            return Some(format!("InvalidGranule {g:#x}"));
        }
        if s.convertible != (s.strategy != Strategy::Whole)
            || (!s.convertible && s.initial == PageState::Private)
        {
            return Some("Inconsistent".into());
        }
        let (gpa, iova, end, iova_end) = (s.gpa, iova as u64, s.gpa + s.len, (iova + len) as u64);
        for r in &self.regions {
            if gpa < r.end() && r.gpa() < end {
                return Some(format!("GpaOverlap {}", r.id));
            }
            let i = r.iova_range();
            if iova < i.end && i.start < iova_end {
                return Some(format!("IovaOverlap {}", r.id));
            }
        }
        None
    }
}

/// The planner's error with the fields the model predicts.
pub(crate) fn error_key(e: &PlanError) -> String {
    match e {
        PlanError::Unaligned { value, .. } => format!("Unaligned {value:#x}"),
        PlanError::Empty { .. } => "Empty".into(),
        PlanError::Overflow { start, len, .. } => format!("Overflow {start:#x}+{len:#x}"),
        PlanError::InvalidGranule { granule, .. } => format!("InvalidGranule {granule:#x}"),
        PlanError::Inconsistent(_) => "Inconsistent".into(),
        PlanError::GpaOverlap { existing, .. } => format!("GpaOverlap {existing}"),
        PlanError::IovaOverlap { existing, .. } => format!("IovaOverlap {existing}"),
        PlanError::NotCovered { first_gap_page, .. } => format!("NotCovered {first_gap_page:#x}"),
        PlanError::NotConvertible { region, .. } => format!("NotConvertible {region}"),
        PlanError::GranuleUnaligned { range, granule, .. } => {
            format!("GranuleUnaligned {range:?}/{granule:#x}")
        }
        PlanError::Conflict { .. } => "Conflict".into(),
        PlanError::DiscardOnShared { range } => format!("DiscardOnShared {range:?}"),
        PlanError::UnknownRegion(id) => format!("UnknownRegion {id}"),
        other => format!("unexpected: {other}"),
    }
}

pub(crate) fn intersect(a: &RangeSet, b: &RangeSet) -> RangeSet {
    a.iter()
        .flat_map(|r| b.clipped(r).collect::<Vec<_>>())
        .collect()
}
