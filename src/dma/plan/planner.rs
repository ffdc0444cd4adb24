//! Pure planning: from the tracker and a request to an ordered [`Plan`]. No I/O.
//!
//! Rules:
//! - to private: one unmap per maximal run of requested IOVA of one unmap kind
//!   (adjacent or overlapping requests, and adjacent regions of the same kind, merge into
//!   one run), trimmed to the first and last mapped pieces inside it; pages already
//!   private inside the run do not split it, since both the native and the cut unmap
//!   skip unmapped holes; a run with nothing mapped issues no unmap. `Cut` regions use
//!   [`UnmapKind::Cut`] (may cut areas at both ends); `PerGranule` regions use
//!   [`UnmapKind::Native`] (their ranges are granule aligned, so they never cut an area);
//! - attributes: one op per maximal GPA run of pages whose attribute flips (across
//!   regions: attributes are per VM);
//! - to shared: one map per maximal unmapped IOVA run inside a region (`Cut`), or per
//!   unmapped granule (`PerGranule`);
//! - pages already in the target state produce no op; the plan is driven by the
//!   attribute bits and the area map separately, so it also repairs a page left mapped
//!   but private (or shared but unmapped) by a failed rollback.

use std::ops::Range;

use super::buffers::{normalize, push_merged, PlanBuffers};
use super::error::{check_page_aligned, PlanError};
use super::model::{Area, Backing, PageState, RegionId, RegionSpec, Strategy, PAGE_SIZE};
use super::ops::{
    AreaEdit, AttributesOp, ConversionRequest, DiscardOp, Edit, MapOp, Op, Plan, RegionChange,
    UnmapKind, UnmapOp,
};
use super::pages::PageBitmap;
use super::region::Region;
use super::tracker::Tracker;

impl Tracker {
    /// Plans registering a region: validates it and maps its shared pages (`Cut`/`Whole`:
    /// one area; `PerGranule`: one area per granule). The tracker assumes the KVM
    /// attributes already match `spec.initial`.
    ///
    /// ```
    /// use vfio_gmem::dma::{planning::*, *};
    /// let mem = Tracker::new();
    /// let spec = RegionSpec::new(0, 64 << 10, Backing::Opaque(0))
    ///     .strategy(Strategy::PerGranule)
    ///     .granule(16 << 10);
    /// let plan = mem.plan_register(spec).unwrap();
    /// assert_eq!(plan.ops().len(), 4);
    /// assert!(mem.plan_register(RegionSpec::new(0x10, 4096, Backing::Opaque(0))).is_err());
    /// ```
    pub fn plan_register(&self, spec: RegionSpec) -> Result<Plan, PlanError> {
        let iova = self.validate_spec(&spec)?;
        let id = RegionId(self.next_id);
        let private = PageBitmap::new(spec.len / PAGE_SIZE, spec.initial == PageState::Private);
        let region = Region {
            id,
            spec,
            iova,
            private,
        };
        let mut ops = Vec::new();
        if spec.initial == PageState::Shared {
            let chunk = match spec.strategy {
                Strategy::PerGranule => spec.granule,
                Strategy::Cut | Strategy::Whole => spec.len,
            };
            for offset in (0..spec.len).step_by(chunk as usize) {
                ops.push(Op::Map(MapOp {
                    region: id,
                    backing: spec.shared,
                    iova: iova + offset,
                    offset,
                    len: chunk,
                }));
            }
        }
        let before = self.areas.len();
        Ok(Plan {
            areas_after: before + ops.len(),
            edit: None,
            ops,
            change: RegionChange::Register(Box::new(region)),
            generation: self.generation,
            areas_before: before,
        })
    }

    /// Checks `spec` as [`plan_register`](Self::plan_register) would (geometry, overlaps
    /// with registered regions), ignoring its backing: callers decide the backing after
    /// this, with kernel calls that must not happen for a region that will be refused.
    pub(crate) fn validate_register(&self, spec: &RegionSpec) -> Result<(), PlanError> {
        self.validate_spec(spec).map(drop)
    }

    fn validate_spec(&self, spec: &RegionSpec) -> Result<u64, PlanError> {
        check_page_aligned("region GPA", spec.gpa)?;
        check_page_aligned("region length", spec.len)?;
        if spec.len == 0 {
            return Err(PlanError::Empty { what: "region" });
        }
        let overflow = |what| PlanError::Overflow {
            what,
            start: spec.gpa,
            len: spec.len,
        };
        let gpa_end = spec
            .gpa
            .checked_add(spec.len)
            .ok_or(overflow("GPA range"))?;
        let iova = spec.iova().ok_or(overflow("IOVA (GPA + iova_offset)"))?;
        check_page_aligned("region IOVA (GPA + iova_offset)", iova)?;
        let iova_end = iova.checked_add(spec.len).ok_or(PlanError::Overflow {
            what: "IOVA range",
            start: iova,
            len: spec.len,
        })?;
        let granule_ok = spec.granule.is_power_of_two()
            && spec.granule >= PAGE_SIZE
            && (spec.strategy != Strategy::PerGranule || spec.len % spec.granule == 0);
        if !granule_ok {
            return Err(PlanError::InvalidGranule {
                granule: spec.granule,
                len: spec.len,
            });
        }
        if spec.convertible != (spec.strategy != Strategy::Whole) {
            return Err(PlanError::Inconsistent(
                "a region is convertible exactly when its strategy is Cut or PerGranule; \
                 use Strategy::Whole only for non-convertible regions",
            ));
        }
        if !spec.convertible && spec.initial == PageState::Private {
            return Err(PlanError::Inconsistent(
                "a non-convertible region must start shared (it is mapped whole); \
                 make it convertible to start private",
            ));
        }
        for r in &self.regions {
            let g = r.gpa_range();
            if spec.gpa < g.end && g.start < gpa_end {
                return Err(PlanError::GpaOverlap {
                    new: spec.gpa..gpa_end,
                    existing: r.id,
                    existing_range: g,
                });
            }
            let i = r.iova_range();
            if iova < i.end && i.start < iova_end {
                return Err(PlanError::IovaOverlap {
                    new: iova..iova_end,
                    existing: r.id,
                    existing_range: i,
                });
            }
        }
        Ok(iova)
    }

    /// Plans removing a region: one native unmap over all its live areas. Attributes
    /// and backing are left alone.
    ///
    /// ```
    /// use vfio_gmem::dma::{planning::*, *};
    /// let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    /// let id = mem.register(RegionSpec::new(0, 1 << 20, Backing::Opaque(0)), &mut k).unwrap();
    /// let plan = mem.plan_deregister(id).unwrap();
    /// execute(&plan, &mut k).unwrap();
    /// mem.commit(plan).unwrap();
    /// assert!(mem.region(id).is_none() && k.area_count() == 0);
    /// ```
    pub fn plan_deregister(&self, id: RegionId) -> Result<Plan, PlanError> {
        let region = self.region(id).ok_or(PlanError::UnknownRegion(id))?;
        let areas: Vec<Area> = self.areas_in(region.iova_range()).copied().collect();
        let mut ops = Vec::new();
        if let (Some(first), Some(last)) = (areas.first(), areas.last()) {
            ops.push(Op::Unmap(UnmapOp {
                iova: first.iova,
                len: last.iova + last.len - first.iova,
                kind: UnmapKind::Native,
                restore: areas
                    .iter()
                    .map(|a| MapOp::from_area(a, region.spec.shared))
                    .collect(),
            }));
        }
        let before = self.areas.len();
        Ok(Plan {
            ops,
            change: RegionChange::Deregister(id),
            generation: self.generation,
            areas_before: before,
            areas_after: before - areas.len(),
            edit: None,
        })
    }

    /// Plans converting `[gpa, gpa+len)` to `to` (no discard).
    ///
    /// ```
    /// use vfio_gmem::dma::{planning::*, *};
    /// let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    /// mem.register(RegionSpec::new(0, 1 << 20, Backing::Opaque(0)), &mut k).unwrap();
    /// let plan = mem.plan_convert(0x1000, 0x3000, PageState::Private).unwrap();
    /// assert!(matches!(plan.ops()[0], Op::Unmap(UnmapOp { iova: 0x1000, len: 0x3000, kind: UnmapKind::Cut, .. })));
    /// assert!(matches!(plan.ops()[1], Op::SetAttributes(AttributesOp { private: true, .. })));
    /// ```
    pub fn plan_convert(&self, gpa: u64, len: u64, to: PageState) -> Result<Plan, PlanError> {
        self.plan_batch(&[ConversionRequest::new(gpa, len, to)])
    }

    /// Plans a batch of conversions as one plan: all unmaps, then attribute changes, then
    /// maps, then discards (discard is irreversible, so it runs last).
    ///
    /// ```
    /// use vfio_gmem::dma::{planning::*, *};
    /// let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    /// mem.register(RegionSpec::new(0, 1 << 20, Backing::Opaque(0)), &mut k).unwrap();
    /// let batch = [
    ///     ConversionRequest::new(0x1000, 0x1000, PageState::Private),
    ///     ConversionRequest::new(0x2000, 0x1000, PageState::Private).discard_shared(),
    /// ];
    /// let plan = mem.plan_batch(&batch).unwrap();
    /// // adjacent requests coalesce: one unmap, one attribute change, one discard
    /// assert_eq!(plan.ops().len(), 3);
    /// ```
    pub fn plan_batch(&self, requests: &[ConversionRequest]) -> Result<Plan, PlanError> {
        self.plan_batch_with(requests, &mut PlanBuffers::default())
    }

    /// [`plan_batch`](Self::plan_batch) working in `b`'s memory: with buffers kept from
    /// earlier plans (and their op lists recycled), a plan allocates nothing.
    pub(crate) fn plan_batch_with(
        &self,
        requests: &[ConversionRequest],
        b: &mut PlanBuffers,
    ) -> Result<Plan, PlanError> {
        // The common case (a guest converts one range at a time) takes a shorter road to
        // the same plan; anything it does not handle takes the general one below.
        if let [req] = requests {
            if let Some(plan) = self.plan_one(req, b)? {
                return Ok(plan);
            }
        }
        self.plan_general(requests, b)
    }

    /// The plan of one request that lies inside one region, as
    /// [`plan_general`](Self::plan_general) would make it, with one region lookup and one
    /// area search; `None` (nothing planned) when the request reaches past its first
    /// page's region or starts outside every region (the general path handles and
    /// reports those).
    fn plan_one(
        &self,
        req: &ConversionRequest,
        b: &mut PlanBuffers,
    ) -> Result<Option<Plan>, PlanError> {
        let Some((index, range)) = self.single_region_request(req)? else {
            return Ok(None);
        };
        let reg = &self.regions[index];
        if req.discard && req.to == PageState::Shared {
            return Err(PlanError::DiscardOnShared { range });
        }
        let before = self.areas.len();
        let mut areas = before as isize;
        let mut ops = std::mem::take(&mut b.ops);
        // Empty: taken from the buffers, where recycling leaves it empty.
        debug_assert!(ops.is_empty());
        let ir = reg.gpa_to_iova(range.start)..reg.gpa_to_iova(range.end);
        let mut area_edit = AreaEdit::None;
        if req.to == PageState::Private {
            let kind = match reg.strategy() {
                Strategy::Cut => UnmapKind::Cut,
                Strategy::PerGranule => UnmapKind::Native,
                Strategy::Whole => unreachable!("validated convertible"),
            };
            if let Some((op, delta, edit)) =
                self.unmap_for(ir.clone(), kind, Some(reg), &mut b.restores)
            {
                areas += delta;
                area_edit = edit;
                ops.push(Op::Unmap(op));
            }
        }
        // Pages whose attribute flips: usually all of the range or none of it; otherwise
        // the runs of one bitmap scan (maximal: no merging needed).
        let private = req.to == PageState::Private;
        let pages =
            (range.start - reg.spec.gpa) / PAGE_SIZE..(range.end - reg.spec.gpa) / PAGE_SIZE;
        match reg.private.uniform(pages) {
            Some(now) if now == private => {}
            Some(_) => ops.push(Op::SetAttributes(AttributesOp {
                gpa: range.start,
                len: range.end - range.start,
                private,
            })),
            None => {
                for f in reg.runs(range.clone(), req.to.flip()) {
                    ops.push(Op::SetAttributes(AttributesOp {
                        gpa: f.start,
                        len: f.end - f.start,
                        private,
                    }));
                }
            }
        }
        if req.to == PageState::Shared {
            let (maps, edit) = self.push_gap_maps(&mut ops, &mut b.gaps, reg, ir);
            area_edit = edit;
            areas += maps;
        } else if req.discard {
            ops.push(discard_op(reg, range.clone()));
        }
        Ok(Some(Plan {
            ops,
            change: RegionChange::None,
            generation: self.generation,
            areas_before: before,
            areas_after: areas as usize,
            edit: Some(Edit {
                tracker: self.instance,
                region: index,
                gpa: range.start,
                end: range.end,
                private: req.to == PageState::Private,
                areas: area_edit,
            }),
        }))
    }

    /// A request's region's index and its range when the request lies inside one region,
    /// checked as [`validate_request`](Self::validate_request) checks it (same errors);
    /// `None` when it does not start inside a region or reaches past the end of its
    /// region.
    fn single_region_request(
        &self,
        req: &ConversionRequest,
    ) -> Result<Option<(usize, Range<u64>)>, PlanError> {
        let Some(index) = self.region_index_at(req.gpa) else {
            return Ok(None);
        };
        let reg = &self.regions[index];
        let end = match req.gpa.checked_add(req.len) {
            Some(end) if end <= reg.spec.gpa + reg.spec.len => end,
            _ => return Ok(None),
        };
        check_page_aligned("conversion GPA", req.gpa)?;
        check_page_aligned("conversion length", req.len)?;
        if req.len == 0 {
            return Err(PlanError::Empty { what: "conversion" });
        }
        let range = req.gpa..end;
        check_piece(reg, range.clone(), &range)?;
        Ok(Some((index, range)))
    }

    /// The general planner: any number of requests over any number of regions.
    fn plan_general(
        &self,
        requests: &[ConversionRequest],
        b: &mut PlanBuffers,
    ) -> Result<Plan, PlanError> {
        let PlanBuffers {
            ops,
            restores,
            to_private,
            to_shared,
            discard,
            cut_iova,
            native_iova,
            flips,
            gaps,
            unmaps,
        } = b;
        to_private.clear();
        to_shared.clear();
        discard.clear();
        for req in requests {
            let r = self.validate_request(req)?;
            if req.discard {
                if req.to == PageState::Shared {
                    return Err(PlanError::DiscardOnShared { range: r });
                }
                discard.push(r.clone());
            }
            match req.to {
                PageState::Private => to_private.push(r),
                PageState::Shared => to_shared.push(r),
            }
        }
        normalize(to_private);
        normalize(to_shared);
        normalize(discard);
        // Both ascending and disjoint: the first overlap, clipped, as a range set says.
        let mut j = 0;
        for r in to_private.iter() {
            while j < to_shared.len() && to_shared[j].end <= r.start {
                j += 1;
            }
            if let Some(x) = to_shared.get(j).filter(|x| x.start < r.end) {
                return Err(PlanError::Conflict {
                    range: x.start.max(r.start)..x.end.min(r.end),
                });
            }
        }

        let before = self.areas.len();
        let mut areas = before as isize;
        let mut ops = std::mem::take(ops);
        ops.clear();

        // 1. Unmaps, by IOVA.
        cut_iova.clear();
        native_iova.clear();
        for r in to_private.iter() {
            for (reg, piece) in self.pieces(r.clone()) {
                let ir = reg.gpa_to_iova(piece.start)..reg.gpa_to_iova(piece.end);
                match reg.strategy() {
                    Strategy::Cut => cut_iova.push(ir),
                    Strategy::PerGranule => native_iova.push(ir),
                    Strategy::Whole => unreachable!("validated convertible"),
                }
            }
        }
        normalize(cut_iova);
        normalize(native_iova);
        unmaps.clear();
        for (set, kind) in [
            (&*cut_iova, UnmapKind::Cut),
            (&*native_iova, UnmapKind::Native),
        ] {
            for ir in set {
                if let Some((op, delta, _)) = self.unmap_for(ir.clone(), kind, None, restores) {
                    areas += delta;
                    unmaps.push(op);
                }
            }
        }
        unmaps.sort_by_key(|u| u.iova);
        ops.extend(unmaps.drain(..).map(Op::Unmap));

        // 2. Attributes: pages that flip, coalesced by GPA (the runs come ascending).
        for (set, to) in [
            (&*to_private, PageState::Private),
            (&*to_shared, PageState::Shared),
        ] {
            flips.clear();
            for r in set {
                for (reg, piece) in self.pieces(r.clone()) {
                    for run in reg.runs(piece, to.flip()) {
                        push_merged(flips, run);
                    }
                }
            }
            ops.extend(flips.iter().map(|f| {
                Op::SetAttributes(AttributesOp {
                    gpa: f.start,
                    len: f.end - f.start,
                    private: to == PageState::Private,
                })
            }));
        }

        // 3. Maps: unmapped IOVA inside pages turning shared.
        for r in to_shared.iter() {
            for (reg, piece) in self.pieces(r.clone()) {
                let ir = reg.gpa_to_iova(piece.start)..reg.gpa_to_iova(piece.end);
                areas += self.push_gap_maps(&mut ops, gaps, reg, ir).0;
            }
        }

        // 4. Discards, per region.
        for r in discard.iter() {
            for (reg, piece) in self.pieces(r.clone()) {
                ops.push(discard_op(reg, piece));
            }
        }

        Ok(Plan {
            ops,
            change: RegionChange::None,
            generation: self.generation,
            areas_before: before,
            areas_after: areas as usize,
            edit: None,
        })
    }

    /// Pushes the maps of the unmapped parts of IOVA range `ir` of `reg`, ascending;
    /// returns how many, and what they do to the area map. `gaps` is working memory.
    fn push_gap_maps(
        &self,
        ops: &mut Vec<Op>,
        gaps: &mut Vec<Range<u64>>,
        reg: &Region,
        ir: Range<u64>,
    ) -> (isize, AreaEdit) {
        let top = self.areas.last_below(ir.end);
        if top.is_none_or(|p| {
            let a = self.areas.at(p);
            a.iova + a.len <= ir.start
        }) {
            // The common case: nothing of the range is mapped, one gap.
            let op = ops.len();
            let maps = push_maps(ops, reg, ir);
            let edit = match maps {
                1 => AreaEdit::Insert { below: top, op },
                _ => AreaEdit::Replay,
            };
            return (maps, edit);
        }
        // The gaps, found top down from there, then mapped bottom up.
        gaps.clear();
        let mut cursor = ir.end;
        for (_, a) in self.areas.down_from(top) {
            let end = a.iova + a.len;
            if end <= ir.start {
                break;
            }
            if end < cursor {
                gaps.push(end..cursor);
            }
            cursor = cursor.min(a.iova);
            if cursor <= ir.start {
                break;
            }
        }
        if cursor > ir.start {
            gaps.push(ir.start..cursor);
        }
        let maps: isize = gaps
            .iter()
            .rev()
            .map(|gap| push_maps(ops, reg, gap.clone()))
            .sum();
        let edit = match maps {
            0 => AreaEdit::None,
            _ => AreaEdit::Replay,
        };
        (maps, edit)
    }

    /// The unmap of the mapped pieces inside IOVA range `ir`, with its area-count delta
    /// and what it does to the area map; its restore list comes from `restores` when one
    /// is kept. `region`, if given, holds all of `ir`.
    #[inline]
    fn unmap_for(
        &self,
        ir: Range<u64>,
        kind: UnmapKind,
        region: Option<&Region>,
        restores: &mut Vec<Vec<MapOp>>,
    ) -> Option<(UnmapOp, isize, AreaEdit)> {
        // One lookup: the areas starting below the range's end, walked down while they
        // reach into it (areas are disjoint, so their ends descend too).
        let top = self.areas.last_below(ir.end)?;
        let a = *self.areas.at(top);
        let a_end = a.iova + a.len;
        if a_end <= ir.start {
            return None;
        }
        let mut restore = restores.pop().unwrap_or_default();
        let mut region = region.filter(|r| r.id == a.region);
        if a.iova <= ir.start {
            // The common case: one area holds the whole mapped part of the range.
            let (s, e) = (ir.start, a_end.min(ir.end));
            debug_assert!(kind == UnmapKind::Cut || (s == a.iova && e == a_end));
            let reg = region.unwrap_or_else(|| self.region(a.region).expect("area of a region"));
            restore.push(piece_map(&a, reg.spec.shared, s..e));
            let added = isize::from(a.iova < ir.start) + isize::from(a_end > ir.end);
            return Some((
                UnmapOp {
                    iova: s,
                    len: e - s,
                    kind,
                    restore,
                },
                added - 1,
                AreaEdit::Cut {
                    at: top,
                    start: s,
                    end: e,
                },
            ));
        }
        let (mut first, mut last) = (None, None);
        let mut count = 0isize;
        for (_, a) in self.areas.down_from(Some(top)) {
            if a.iova + a.len <= ir.start {
                break;
            }
            let s = a.iova.max(ir.start);
            let e = (a.iova + a.len).min(ir.end);
            debug_assert!(
                kind == UnmapKind::Cut || (s == a.iova && e == a.iova + a.len),
                "native unmap {ir:?} would cut {a:?}"
            );
            let reg = match region {
                Some(r) if r.id == a.region => r,
                _ => *region.insert(self.region(a.region).expect("area of a region")),
            };
            restore.push(piece_map(a, reg.spec.shared, s..e));
            last.get_or_insert(*a);
            first = Some(*a);
            count += 1;
        }
        let (Some(first), Some(last)) = (first, last) else {
            unreachable!("the walk starts at an area reaching into the range");
        };
        restore.reverse();
        let added = isize::from(first.iova < ir.start) + isize::from(last.iova + last.len > ir.end);
        let start = restore[0].iova;
        let end = restore.last().map(|m| m.iova + m.len).expect("non-empty");
        Some((
            UnmapOp {
                iova: start,
                len: end - start,
                kind,
                restore,
            },
            added - count,
            AreaEdit::Replay,
        ))
    }

    /// Checks a request and returns its GPA range.
    fn validate_request(&self, req: &ConversionRequest) -> Result<Range<u64>, PlanError> {
        check_page_aligned("conversion GPA", req.gpa)?;
        check_page_aligned("conversion length", req.len)?;
        if req.len == 0 {
            return Err(PlanError::Empty { what: "conversion" });
        }
        let end = req.gpa.checked_add(req.len).ok_or(PlanError::Overflow {
            what: "conversion GPA range",
            start: req.gpa,
            len: req.len,
        })?;
        let range = req.gpa..end;
        let mut cursor = req.gpa;
        while cursor < end {
            let reg = self
                .region_at(cursor)
                .ok_or_else(|| PlanError::NotCovered {
                    range: range.clone(),
                    first_gap_page: cursor,
                    nearest: self.nearest_region(cursor),
                })?;
            let piece_end = end.min(reg.spec.gpa + reg.spec.len);
            check_piece(reg, cursor..piece_end, &range)?;
            cursor = piece_end;
        }
        Ok(range)
    }

    fn nearest_region(&self, gpa: u64) -> Option<(RegionId, Range<u64>)> {
        let i = self.regions.partition_point(|r| r.spec.gpa <= gpa);
        let below = i.checked_sub(1).map(|i| &self.regions[i]);
        let above = self.regions.get(i);
        let dist = |r: &Region| {
            let g = r.gpa_range();
            if gpa < g.start {
                g.start - gpa
            } else {
                gpa - g.end + 1
            }
        };
        [below, above]
            .into_iter()
            .flatten()
            .min_by_key(|r| dist(r))
            .map(|r| (r.id, r.gpa_range()))
    }

    /// Regions overlapping GPA range `r`, each with the part of `r` inside it.
    fn pieces(&self, r: Range<u64>) -> impl Iterator<Item = (&Region, Range<u64>)> + '_ {
        let first = self.region_at(r.start);
        // The common case, one region holding all of `r`, without a second lookup.
        let whole = first.filter(|x| r.end <= x.spec.gpa + x.spec.len);
        let rest = whole.is_none().then(|| {
            let from = first.map(|x| x.spec.gpa).unwrap_or(r.start);
            let lo = self.regions.partition_point(|x| x.spec.gpa < from);
            let hi = self.regions.partition_point(|x| x.spec.gpa < r.end);
            self.regions[lo..hi]
                .iter()
                .map(move |reg| {
                    let g = reg.gpa_range();
                    (reg, r.start.max(g.start)..r.end.min(g.end))
                })
                .filter(|(_, p)| p.start < p.end)
        });
        whole
            .map(|reg| (reg, r.clone()))
            .into_iter()
            .chain(rest.into_iter().flatten())
    }
}

/// Checks that `piece` (the part of request `range` inside `reg`) may convert: the
/// region is convertible and, per granule, the piece is granule aligned.
#[inline]
fn check_piece(reg: &Region, piece: Range<u64>, range: &Range<u64>) -> Result<(), PlanError> {
    if !reg.spec.convertible {
        return Err(PlanError::NotConvertible {
            range: range.clone(),
            region: reg.id,
        });
    }
    if reg.strategy() == Strategy::PerGranule {
        let g = reg.spec.granule;
        let (s, e) = (piece.start - reg.spec.gpa, piece.end - reg.spec.gpa);
        if s % g != 0 || e % g != 0 {
            let base = reg.spec.gpa;
            return Err(PlanError::GranuleUnaligned {
                range: piece,
                region: reg.id,
                granule: g,
                suggestion: base + s / g * g..base + e.div_ceil(g) * g,
            });
        }
    }
    Ok(())
}

/// The map that puts IOVA range `r` of area `a` back (an unmap's restore piece).
#[inline]
fn piece_map(a: &Area, backing: Backing, r: Range<u64>) -> MapOp {
    MapOp {
        region: a.region,
        backing,
        iova: r.start,
        offset: a.offset + (r.start - a.iova),
        len: r.end - r.start,
    }
}

/// The discard of GPA range `r` of `reg`'s shared backing.
fn discard_op(reg: &Region, r: Range<u64>) -> Op {
    Op::Discard(DiscardOp {
        region: reg.id,
        backing: reg.spec.shared,
        gpa: r.start,
        offset: r.start - reg.spec.gpa,
        len: r.end - r.start,
    })
}

/// Pushes the maps of unmapped IOVA range `gap` of `reg` (one, or one per granule);
/// returns how many.
fn push_maps(ops: &mut Vec<Op>, reg: &Region, gap: Range<u64>) -> isize {
    let chunk = match reg.strategy() {
        Strategy::PerGranule => reg.spec.granule,
        _ => gap.end - gap.start,
    };
    let mut n = 0;
    let mut at = gap.start;
    while at < gap.end {
        ops.push(Op::Map(MapOp {
            region: reg.id,
            backing: reg.spec.shared,
            iova: at,
            offset: at - reg.iova,
            len: chunk,
        }));
        n += 1;
        at += chunk;
    }
    n
}

#[cfg(test)]
mod tests;
