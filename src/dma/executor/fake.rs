//! An in-memory stand-in for the kernel: iommufd's IOAS area rules, KVM memory
//! attributes and backing discards, with call counting and fault injection.
//!
//! IOAS rules reproduced (drivers/iommu/iommufd, Linux 7.3):
//! - map (iopt_map_pages → iopt_check_iova): `EINVAL` for a zero length or an IOVA not
//!   aligned to 4 KiB (the iova_alignment of an IOAS with huge pages disabled),
//!   `EOVERFLOW` if `iova + len - 1` wraps, `EEXIST` if any live area intersects the
//!   range; on success inserts exactly one area.
//! - native unmap (`IOMMU_IOAS_UNMAP`: iommufd_ioas_unmap → iopt_unmap_iova →
//!   iopt_unmap_iova_range): `EINVAL` for a zero length; walks the areas intersecting
//!   the range in ascending IOVA order, removing each that lies fully inside; the first
//!   area that sticks out of the range stops the walk with `ENOENT`, the areas removed
//!   before it stay removed; if the walk removed nothing, `ENOENT` (iommufd_ioas_unmap
//!   turns `unmapped == 0` into `ENOENT`). Returns the bytes removed.
//! - cut unmap (compat `VFIO_IOMMU_UNMAP_DMA`: iommufd_vfio_unmap_dma): with huge pages
//!   disabled on the IOAS (the default here), iopt_cut_iova first splits the area holding
//!   `iova + len - 1` after that byte and, when `iova != 0`, the area holding `iova - 1`
//!   after that byte (iopt_area_split: a split point at an area's last byte is a no-op;
//!   `EINVAL` if the new piece start is not page aligned); then iopt_unmap_iova as above,
//!   except that nothing mapped is success with 0 bytes (the compat path does not check
//!   `unmapped`). With huge pages enabled there is no cut, so a range cutting an area
//!   fails `ENOENT` like the native unmap.
//! - native split (`IOMMU_IOAS_SPLIT` of the project's series, [`FakeKernel::with_native_split`]):
//!   a cut unmap that cuts an area is two calls, each counted and each a fault injection
//!   point; one of whole areas (or unmapped IOVA) at both ends is the unmap call alone, as
//!   the kernel executor skips the split there (`Ioas::must_split`). The split
//!   (iopt_split_iova) checks both ends, then splits the area holding `iova - 1` and `iova`
//!   and the one holding `last` and `last + 1`, with huge pages on or off; a fault in it
//!   changes nothing. Then a native unmap of exactly the range (`ENOENT` if nothing was
//!   mapped); a fault there leaves the split done.
//! - zero lengths fail `EINVAL` before any effect (the kernel's compat path may split an
//!   area at `iova` before failing; plans never use zero lengths).
//! - attributes: a set of private GPA ranges (`EINVAL` for zero or unaligned ranges).
//! - discard: a per-region set of discarded offsets.
//! - fault injection: [`FakeKernel::fail_call`] makes call number `n` (0-based, counting
//!   every call of every kind) fail with a chosen errno before it has any effect.

use super::Executor;
use crate::dma::plan::model::{Area, RegionId, PAGE_SIZE};
use crate::dma::plan::ops::{AttributesOp, DiscardOp, MapOp, UnmapKind, UnmapOp};
use crate::dma::plan::outcome::OpError;
use crate::dma::plan::ranges::RangeSet;
use std::collections::BTreeMap;
use std::ops::Range;

/// Call counters of a [`FakeKernel`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FakeCounts {
    /// All calls, failed ones included.
    pub calls: u64,
    /// Successful maps.
    pub maps: u64,
    /// Successful unmaps.
    pub unmaps: u64,
    /// Successful attribute changes.
    pub attribute_changes: u64,
    /// Successful discards.
    pub discards: u64,
    /// Failed calls (injected or by the rules).
    pub failures: u64,
}

/// The fake kernel: an IOAS, a VM's memory attributes and discard records.
///
/// ```
/// use vfio_gmem::dma::{planning::*, *};
/// let mut k = FakeKernel::new();
/// let map = |iova, len| MapOp { region: RegionId(0), backing: Backing::Opaque(0), iova, offset: iova, len };
/// k.map(&map(0, 0x8000)).unwrap();
/// assert_eq!(k.map(&map(0x7000, 0x1000)).unwrap_err().errno, libc::EEXIST);
/// let cut = UnmapOp { iova: 0x2000, len: 0x2000, kind: UnmapKind::Cut, restore: vec![] };
/// assert_eq!(k.unmap(&cut).unwrap(), 0x2000);
/// assert_eq!(k.area_count(), 2);
/// let native = UnmapOp { iova: 0x4000, len: 0x1000, kind: UnmapKind::Native, restore: vec![] };
/// assert_eq!(k.unmap(&native).unwrap_err().errno, libc::ENOENT); // would cut [0x4000, 0x8000)
/// ```
#[derive(Clone, Debug)]
pub struct FakeKernel {
    areas: BTreeMap<u64, Area>,
    private: RangeSet,
    discarded: BTreeMap<RegionId, RangeSet>,
    faults: BTreeMap<u64, i32>,
    counts: FakeCounts,
    peak_areas: usize,
    huge_pages_disabled: bool,
    native_split: bool,
}

impl Default for FakeKernel {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeKernel {
    /// An empty IOAS with huge pages disabled (the cut unmap works), no private pages.
    pub fn new() -> Self {
        FakeKernel {
            areas: BTreeMap::new(),
            private: RangeSet::new(),
            discarded: BTreeMap::new(),
            faults: BTreeMap::new(),
            counts: FakeCounts::default(),
            peak_areas: 0,
            huge_pages_disabled: true,
            native_split: false,
        }
    }

    /// An IOAS with huge pages enabled: the compat unmap cannot cut areas.
    pub fn with_huge_pages() -> Self {
        FakeKernel {
            huge_pages_disabled: false,
            ..Self::new()
        }
    }

    /// An IOAS with huge pages enabled on a kernel with `IOMMU_IOAS_SPLIT`: a cut unmap is
    /// a split call, then a native unmap call (the unmap alone if no area spans an end).
    ///
    /// ```
    /// use vfio_gmem::dma::{planning::*, *};
    /// let mut k = FakeKernel::with_native_split();
    /// let map = MapOp { region: RegionId(0), backing: Backing::Opaque(0), iova: 0, offset: 0, len: 0x8000 };
    /// k.map(&map).unwrap();
    /// let cut = UnmapOp { iova: 0x2000, len: 0x2000, kind: UnmapKind::Cut, restore: vec![] };
    /// k.fail_call(k.calls() + 1, libc::ENOMEM); // the unmap after the split
    /// assert_eq!(k.unmap(&cut).unwrap_err().errno, libc::ENOMEM);
    /// assert_eq!(k.area_count(), 3); // split, nothing unmapped
    /// assert_eq!(k.unmap(&cut).unwrap(), 0x2000);
    /// assert_eq!(k.area_count(), 2);
    /// ```
    pub fn with_native_split() -> Self {
        FakeKernel {
            huge_pages_disabled: false,
            native_split: true,
            ..Self::new()
        }
    }

    /// Makes call number `n` (0-based over all calls) fail with `errno`, without effect.
    pub fn fail_call(&mut self, n: u64, errno: i32) {
        self.faults.insert(n, errno);
    }

    /// Removes every pending injected fault.
    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// Number of calls made so far (the index the next call gets).
    pub fn calls(&self) -> u64 {
        self.counts.calls
    }

    /// Call counters.
    pub fn counts(&self) -> FakeCounts {
        self.counts
    }

    /// Live areas.
    pub fn area_count(&self) -> usize {
        self.areas.len()
    }

    /// Most areas alive at once since creation.
    pub fn peak_areas(&self) -> usize {
        self.peak_areas
    }

    /// Live areas by IOVA.
    pub fn areas(&self) -> impl Iterator<Item = &Area> {
        self.areas.values()
    }

    /// Mapped IOVA ranges, merged.
    pub fn mapped(&self) -> RangeSet {
        self.areas.values().map(|a| a.iova_range()).collect()
    }

    /// True if the page holding `iova` is mapped.
    pub fn is_mapped(&self, iova: u64) -> bool {
        self.areas_in(iova..iova + 1).next().is_some()
    }

    /// GPA ranges whose attribute is private.
    pub fn private(&self) -> &RangeSet {
        &self.private
    }

    /// Discarded offsets of a region's shared backing.
    pub fn discarded(&self, region: RegionId) -> Option<&RangeSet> {
        self.discarded.get(&region)
    }

    fn begin_call(&mut self) -> Result<(), OpError> {
        let n = self.counts.calls;
        self.counts.calls += 1;
        match self.faults.remove(&n) {
            Some(errno) => Err(OpError::from_errno(errno)),
            None => Ok(()),
        }
    }

    fn fail(&mut self, errno: i32) -> OpError {
        self.counts.failures += 1;
        OpError::from_errno(errno)
    }

    fn areas_in(&self, r: Range<u64>) -> impl Iterator<Item = &Area> + '_ {
        let first = match self.areas.range(..r.start).next_back() {
            Some((&k, a)) if a.iova + a.len > r.start => k,
            _ => r.start,
        };
        self.areas
            .range(first..)
            .map(|(_, a)| a)
            .take_while(move |a| a.iova < r.end)
    }

    /// iopt_area_split: splits the area holding `at` so a new area starts at `at + 1`.
    /// True if an area holds both `at` and `at + 1` (a split after `at` would change it).
    fn straddles(&self, at: u64) -> bool {
        self.areas_in(at..at + 1)
            .next()
            .is_some_and(|a| at + 1 != a.iova + a.len)
    }

    /// Why [`Self::split_after`] would refuse, without splitting.
    fn split_refusal(&self, at: u64) -> Option<i32> {
        (self.straddles(at) && (at + 1) % PAGE_SIZE != 0).then_some(libc::EINVAL)
    }

    fn split_after(&mut self, at: u64) -> Result<(), i32> {
        let Some(a) = self.areas_in(at..at + 1).next().copied() else {
            return Ok(());
        };
        let new_start = at + 1;
        if new_start == a.iova + a.len {
            return Ok(());
        }
        if new_start % PAGE_SIZE != 0 {
            return Err(libc::EINVAL);
        }
        let left = Area {
            len: new_start - a.iova,
            ..a
        };
        let right = Area {
            iova: new_start,
            len: a.iova + a.len - new_start,
            region: a.region,
            offset: a.offset + (new_start - a.iova),
        };
        self.areas.insert(left.iova, left);
        self.areas.insert(right.iova, right);
        self.peak_areas = self.peak_areas.max(self.areas.len());
        Ok(())
    }

    /// iopt_unmap_iova_range: removes areas fully inside `[start, last]` in IOVA order
    /// until one sticks out (`Err((ENOENT, bytes so far))`).
    fn unmap_range(&mut self, start: u64, last: u64) -> Result<u64, (i32, u64)> {
        let hit: Vec<Area> = self
            .areas_in(start..last.saturating_add(1))
            .copied()
            .collect();
        let mut bytes = 0;
        for a in hit {
            if a.iova < start || a.iova + a.len - 1 > last {
                return Err((libc::ENOENT, bytes));
            }
            self.areas.remove(&a.iova);
            bytes += a.len;
        }
        Ok(bytes)
    }
}

impl Executor for FakeKernel {
    fn map(&mut self, op: &MapOp) -> Result<(), OpError> {
        self.begin_call()?;
        if op.len == 0 || op.iova % PAGE_SIZE != 0 || op.len % PAGE_SIZE != 0 {
            return Err(self.fail(libc::EINVAL));
        }
        let Some(last) = op.iova.checked_add(op.len - 1) else {
            return Err(self.fail(libc::EOVERFLOW));
        };
        if self
            .areas_in(op.iova..last.saturating_add(1))
            .next()
            .is_some()
        {
            return Err(self.fail(libc::EEXIST));
        }
        self.areas.insert(
            op.iova,
            Area {
                iova: op.iova,
                len: op.len,
                region: op.region,
                offset: op.offset,
            },
        );
        self.peak_areas = self.peak_areas.max(self.areas.len());
        self.counts.maps += 1;
        Ok(())
    }

    fn unmap(&mut self, op: &UnmapOp) -> Result<u64, OpError> {
        self.begin_call()?;
        if op.len == 0 {
            return Err(self.fail(libc::EINVAL));
        }
        let Some(last) = op.iova.checked_add(op.len - 1) else {
            return Err(self.fail(libc::EOVERFLOW));
        };
        let cut = op.kind == UnmapKind::Cut;
        if cut && self.native_split {
            // IOMMU_IOAS_SPLIT: both ends checked before either is split.
            let points: Vec<u64> = [op.iova.checked_sub(1), (last != u64::MAX).then_some(last)]
                .into_iter()
                .flatten()
                .filter(|&p| self.straddles(p))
                .collect();
            if !points.is_empty() {
                if let Some(errno) = points.iter().find_map(|&p| self.split_refusal(p)) {
                    return Err(self.fail(errno));
                }
                for p in points {
                    self.split_after(p).expect("checked");
                }
                // The unmap is a call of its own. With nothing to split (whole areas),
                // the kernel executor issues the unmap alone: one call.
                self.begin_call()?;
            }
            return match self.unmap_range(op.iova, last) {
                Ok(0) => Err(self.fail(libc::ENOENT)),
                Ok(bytes) => {
                    self.counts.unmaps += 1;
                    Ok(bytes)
                }
                Err((errno, _)) => Err(self.fail(errno)),
            };
        }
        if cut && self.huge_pages_disabled {
            let mut points = vec![last];
            if op.iova != 0 {
                points.push(op.iova - 1);
            }
            for p in points {
                if let Err(errno) = self.split_after(p) {
                    return Err(self.fail(errno));
                }
            }
        }
        match self.unmap_range(op.iova, last) {
            Ok(0) if !cut => Err(self.fail(libc::ENOENT)),
            Ok(bytes) => {
                self.counts.unmaps += 1;
                Ok(bytes)
            }
            Err((errno, _)) => Err(self.fail(errno)),
        }
    }

    fn set_attributes(&mut self, op: &AttributesOp) -> Result<(), OpError> {
        self.begin_call()?;
        if op.len == 0 || op.gpa % PAGE_SIZE != 0 || op.len % PAGE_SIZE != 0 {
            return Err(self.fail(libc::EINVAL));
        }
        let r = op.gpa..op.gpa + op.len;
        if op.private {
            self.private.insert(r);
        } else {
            self.private.remove(r);
        }
        self.counts.attribute_changes += 1;
        Ok(())
    }

    fn discard(&mut self, op: &DiscardOp) -> Result<(), OpError> {
        self.begin_call()?;
        if op.len == 0 {
            return Err(self.fail(libc::EINVAL));
        }
        self.discarded
            .entry(op.region)
            .or_default()
            .insert(op.offset..op.offset + op.len);
        self.counts.discards += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::plan::model::Backing;

    fn cut(iova: u64, len: u64) -> UnmapOp {
        UnmapOp {
            iova,
            len,
            kind: UnmapKind::Cut,
            restore: vec![],
        }
    }

    #[test]
    fn native_cut_of_whole_areas_is_one_call() {
        let mut k = FakeKernel::with_native_split();
        k.map(&MapOp {
            region: RegionId(0),
            backing: Backing::Opaque(0),
            iova: 0,
            offset: 0,
            len: 0x8000,
        })
        .unwrap();
        // Inside the area: split, then unmap.
        let c = k.calls();
        assert_eq!(k.unmap(&cut(0x2000, 0x2000)).unwrap(), 0x2000);
        assert_eq!(k.calls() - c, 2);
        // [0x4000, 0x8000) is a whole area now: the unmap alone.
        let c = k.calls();
        assert_eq!(k.unmap(&cut(0x4000, 0x4000)).unwrap(), 0x4000);
        assert_eq!(k.calls() - c, 1);
        // An end in unmapped IOVA after a whole area: the unmap alone too.
        let c = k.calls();
        assert_eq!(k.unmap(&cut(0, 0x4000)).unwrap(), 0x2000);
        assert_eq!(k.calls() - c, 1);
        assert_eq!(k.area_count(), 0);
        // Nothing mapped there any more: ENOENT, from the one call.
        let c = k.calls();
        assert_eq!(
            k.unmap(&cut(0x4000, 0x1000)).unwrap_err().errno,
            libc::ENOENT
        );
        assert_eq!(k.calls() - c, 1);
    }
}
