//! Property tests: random region layouts (adjacent regions, shuffled IOVA offsets, all
//! three strategies) and random conversion sequences (single and batched, 4 KiB–2 MiB,
//! both directions, nested and adjacent), checked against a page-per-bool model.
//!
//! Default case counts keep `cargo test` fast; set `PROPTEST_CASES` for longer runs.

use proptest::prelude::*;
use vfio_gmem::dma::planning::{
    execute, Area, AttributesOp, Backing, Op, Plan, RangeSet, RegionSpec, Tracker,
};
use vfio_gmem::dma::{
    self, ConversionRequest, Executor, FakeKernel, Outcome, PageState, PlanError, RegionId,
    TouchedState, PAGE_SIZE,
};

const P: u64 = PAGE_SIZE;

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------- generators

#[derive(Clone, Debug)]
struct RegionGen {
    gpa_gap: u64,
    units: u64,
    strategy: dma::Strategy,
    granule_pages: u64,
    iova_gap: u64,
    private: bool,
}

#[derive(Clone, Debug)]
struct LayoutGen {
    regions: Vec<RegionGen>,
    iova_order: Vec<usize>,
    iova_base: u64,
}

#[derive(Clone, Debug)]
struct ReqGen {
    region_seed: usize,
    offset_seed: u64,
    pages: u64,
    private: bool,
    discard: bool,
    align: bool,
    flip: bool,
    wild: bool,
}

#[derive(Clone, Debug)]
enum StepGen {
    Batch(Vec<ReqGen>),
    Reregister(usize),
}

fn region_gen() -> impl Strategy<Value = RegionGen> {
    (
        prop_oneof![3 => Just(0u64), 1 => 1u64..8],
        1u64..=24,
        prop_oneof![
            5 => Just(dma::Strategy::Cut),
            4 => Just(dma::Strategy::PerGranule),
            1 => Just(dma::Strategy::Whole)
        ],
        prop_oneof![Just(1u64), Just(2), Just(4), Just(16)],
        prop_oneof![3 => Just(0u64), 1 => 1u64..8],
        any::<bool>(),
    )
        .prop_map(
            |(gpa_gap, units, strategy, g, iova_gap, private)| RegionGen {
                gpa_gap,
                units,
                strategy,
                granule_pages: if strategy == dma::Strategy::PerGranule {
                    g
                } else {
                    1
                },
                iova_gap,
                private: private && strategy != dma::Strategy::Whole,
            },
        )
}

fn layout_gen() -> impl Strategy<Value = LayoutGen> {
    prop::collection::vec(region_gen(), 1..=4).prop_flat_map(|regions| {
        let n = regions.len();
        (
            Just(regions),
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
            prop_oneof![Just(0u64), Just(1u64 << 30)],
        )
            .prop_map(|(regions, iova_order, iova_base)| LayoutGen {
                regions,
                iova_order,
                iova_base,
            })
    })
}

fn req_gen() -> impl Strategy<Value = ReqGen> {
    (
        (any::<usize>(), any::<u64>()),
        prop_oneof![6 => 1u64..=16, 3 => 1u64..=512, 1 => Just(512u64)],
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |((region_seed, offset_seed), pages, private, discard, align, flip, wild)| ReqGen {
                region_seed,
                offset_seed,
                pages,
                private,
                discard,
                align,
                flip,
                wild,
            },
        )
}

fn step_gen() -> impl Strategy<Value = StepGen> {
    prop_oneof![
        6 => req_gen().prop_map(|r| StepGen::Batch(vec![r])),
        3 => prop::collection::vec(req_gen(), 2..=5).prop_map(StepGen::Batch),
        1 => any::<usize>().prop_map(StepGen::Reregister),
    ]
}

// ---------------------------------------------------------------- model

#[derive(Clone, Debug)]
struct MRegion {
    spec: RegionSpec,
    id: RegionId,
    private: Vec<bool>,
}

impl MRegion {
    fn gpa(&self) -> u64 {
        self.spec.gpa
    }
    fn end(&self) -> u64 {
        self.spec.gpa + self.spec.len
    }
    fn iova(&self) -> u64 {
        self.spec.iova().unwrap()
    }
    fn pages(&self) -> u64 {
        self.spec.len / P
    }
}

#[derive(Clone, Debug)]
struct Model {
    regions: Vec<MRegion>,
}

impl Model {
    fn build(l: &LayoutGen) -> Vec<RegionSpec> {
        let mut gpa = 16 * P;
        let mut specs: Vec<RegionSpec> = l
            .regions
            .iter()
            .map(|r| {
                gpa += r.gpa_gap * P;
                let len = r.units * r.granule_pages * P;
                let s = RegionSpec::new(gpa, len, Backing::Opaque(gpa))
                    .strategy(r.strategy)
                    .granule(r.granule_pages * P)
                    .initial(if r.private {
                        PageState::Private
                    } else {
                        PageState::Shared
                    });
                gpa += len;
                s
            })
            .collect();
        let mut iova = l.iova_base;
        for &i in &l.iova_order {
            iova += l.regions[i].iova_gap * P;
            specs[i].iova_offset = iova as i64 - specs[i].gpa as i64;
            iova += specs[i].len;
        }
        specs
    }

    fn region_of(&self, gpa: u64) -> Option<usize> {
        self.regions
            .iter()
            .position(|r| r.gpa() <= gpa && gpa < r.end())
    }

    fn page(&self, gpa: u64) -> Option<(usize, usize)> {
        self.region_of(gpa)
            .map(|i| (i, ((gpa - self.regions[i].gpa()) / P) as usize))
    }

    fn page_at_iova(&self, iova: u64) -> Option<(usize, usize)> {
        self.regions
            .iter()
            .position(|r| r.iova() <= iova && iova < r.iova() + r.spec.len)
            .map(|i| (i, ((iova - self.regions[i].iova()) / P) as usize))
    }

    fn is_private(&self, (ri, pi): (usize, usize)) -> bool {
        self.regions[ri].private[pi]
    }

    fn shared_iova(&self) -> RangeSet {
        let mut s = RangeSet::new();
        for r in &self.regions {
            for (i, &p) in r.private.iter().enumerate() {
                if !p {
                    let a = r.iova() + i as u64 * P;
                    s.insert(a..a + P);
                }
            }
        }
        s
    }

    fn private_gpa(&self) -> RangeSet {
        let mut s = RangeSet::new();
        for r in &self.regions {
            for (i, &p) in r.private.iter().enumerate() {
                if p {
                    let a = r.gpa() + i as u64 * P;
                    s.insert(a..a + P);
                }
            }
        }
        s
    }

    /// Pages of convertible regions contiguous in GPA from `gpa` on.
    fn convertible_span(&self, gpa: u64) -> u64 {
        let mut at = gpa;
        while let Some(i) = self.region_of(at) {
            if self.regions[i].spec.strategy == dma::Strategy::Whole {
                break;
            }
            at = self.regions[i].end();
        }
        (at - gpa) / P
    }

    fn request(&self, g: &ReqGen) -> ConversionRequest {
        let convertible: Vec<&MRegion> = self
            .regions
            .iter()
            .filter(|r| r.spec.strategy != dma::Strategy::Whole)
            .collect();
        let (mut start, mut len);
        if g.wild || convertible.is_empty() {
            // Anywhere from one page before a region to its end, any length: exercises
            // the uncovered / non-convertible / unaligned errors.
            let r = &self.regions[g.region_seed % self.regions.len()];
            start = r.gpa() - P + (g.offset_seed % (r.pages() + 1)) * P;
            len = g.pages * P;
        } else {
            let r = convertible[g.region_seed % convertible.len()];
            start = r.gpa() + (g.offset_seed % r.pages()) * P;
            let span = self.convertible_span(start).min(512);
            len = (1 + (g.pages - 1) % span) * P;
        }
        if g.align {
            if let Some(i) = self.region_of(start) {
                let base = self.regions[i].gpa();
                let gr = self.regions[i].spec.granule;
                start = base + (start - base) / gr * gr;
                len = len.div_ceil(gr) * gr;
            }
        }
        let current = self.page(start).map(|p| self.is_private(p));
        let private = match (g.flip, current) {
            (true, Some(now_private)) => !now_private,
            _ => g.private,
        };
        ConversionRequest {
            gpa: start,
            len,
            to: if private {
                PageState::Private
            } else {
                PageState::Shared
            },
            discard: g.discard && private,
        }
    }

    /// The error the planner must report for this batch, by name, or None.
    fn expected_error(&self, reqs: &[ConversionRequest]) -> Option<&'static str> {
        for q in reqs {
            let end = q.gpa + q.len;
            let mut cursor = q.gpa;
            while cursor < end {
                let Some(i) = self.region_of(cursor) else {
                    return Some("NotCovered");
                };
                let r = &self.regions[i];
                if r.spec.strategy == dma::Strategy::Whole {
                    return Some("NotConvertible");
                }
                let piece_end = end.min(r.end());
                let g = r.spec.granule;
                if r.spec.strategy == dma::Strategy::PerGranule
                    && ((cursor - r.gpa()) % g != 0 || (piece_end - r.gpa()) % g != 0)
                {
                    return Some("GranuleUnaligned");
                }
                cursor = piece_end;
            }
        }
        let to = |s: PageState| -> RangeSet {
            reqs.iter()
                .filter(|q| q.to == s)
                .map(|q| q.gpa..q.gpa + q.len)
                .collect()
        };
        let shared = to(PageState::Shared);
        if to(PageState::Private).iter().any(|r| shared.intersects(r)) {
            return Some("Conflict");
        }
        None
    }

    fn apply(&mut self, reqs: &[ConversionRequest]) {
        for q in reqs {
            for a in (q.gpa..q.gpa + q.len).step_by(P as usize) {
                let (ri, pi) = self.page(a).unwrap();
                self.regions[ri].private[pi] = q.to == PageState::Private;
            }
        }
    }
}

fn error_name(e: &PlanError) -> &'static str {
    match e {
        PlanError::NotCovered { .. } => "NotCovered",
        PlanError::NotConvertible { .. } => "NotConvertible",
        PlanError::GranuleUnaligned { .. } => "GranuleUnaligned",
        PlanError::Conflict { .. } => "Conflict",
        _ => "other",
    }
}

// ---------------------------------------------------------------- checks

struct World {
    mem: Tracker,
    k: FakeKernel,
    model: Model,
}

impl World {
    fn new(l: &LayoutGen) -> World {
        let mut mem = Tracker::new();
        let mut k = FakeKernel::new();
        let regions = Model::build(l)
            .into_iter()
            .map(|spec| {
                // The tracker assumes KVM attributes already match the initial state.
                if spec.initial == PageState::Private {
                    let op = AttributesOp {
                        gpa: spec.gpa,
                        len: spec.len,
                        private: true,
                    };
                    k.set_attributes(&op).unwrap();
                }
                let id = mem.register(spec, &mut k).expect("layout registers");
                let private = vec![spec.initial == PageState::Private; (spec.len / P) as usize];
                MRegion { spec, id, private }
            })
            .collect();
        World {
            mem,
            k,
            model: Model { regions },
        }
    }
}

/// Fake kernel == tracker == model, and each strategy's area shape holds.
fn check_consistent(mem: &Tracker, k: &FakeKernel, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        k.mapped(),
        model.shared_iova(),
        "mapped IOVA != model shared set"
    );
    prop_assert_eq!(k.private(), &model.private_gpa(), "KVM attributes != model");
    let ta: Vec<Area> = mem.areas().copied().collect();
    let ka: Vec<Area> = k.areas().copied().collect();
    prop_assert_eq!(ta, ka, "tracker areas != kernel areas");
    for r in &model.regions {
        for (i, &p) in r.private.iter().enumerate() {
            let want = if p {
                PageState::Private
            } else {
                PageState::Shared
            };
            prop_assert_eq!(mem.page_state(r.gpa() + i as u64 * P), Some(want));
        }
        let areas: Vec<&Area> = mem.areas().filter(|a| a.region == r.id).collect();
        match r.spec.strategy {
            dma::Strategy::Whole => {
                prop_assert_eq!(areas.len(), 1);
                prop_assert_eq!(areas[0].len, r.spec.len);
            }
            dma::Strategy::PerGranule => {
                for a in areas {
                    prop_assert_eq!(a.len, r.spec.granule);
                    prop_assert_eq!(a.offset % r.spec.granule, 0);
                }
            }
            dma::Strategy::Cut => {}
        }
    }
    Ok(())
}

/// Ops are ordered unmaps < private attrs < shared attrs < maps < discards, and no unmap
/// touches a page shared both before and after.
fn check_ops(plan: &Plan, before: &Model, after: &Model) -> Result<(), TestCaseError> {
    let rank = |o: &Op| match o {
        Op::Unmap(_) => 0,
        Op::SetAttributes(a) if a.private => 1,
        Op::SetAttributes(_) => 2,
        Op::Map(_) => 3,
        Op::Discard(_) => 4,
    };
    let ranks: Vec<u8> = plan.ops().iter().map(rank).collect();
    prop_assert!(
        ranks.windows(2).all(|w| w[0] <= w[1]),
        "op order {:?}",
        ranks
    );
    for op in plan.ops() {
        if let Op::Unmap(u) = op {
            for iova in (u.iova..u.iova + u.len).step_by(P as usize) {
                let page = before.page_at_iova(iova);
                prop_assert!(
                    page.is_some(),
                    "unmap {} covers IOVA {:#x} outside regions",
                    op,
                    iova
                );
                let page = page.unwrap();
                prop_assert!(
                    before.is_private(page) || after.is_private(page),
                    "{} unmaps IOVA {:#x}, shared before and after",
                    op,
                    iova
                );
            }
        }
    }
    Ok(())
}

/// No page is both private (KVM) and mapped (IOMMU) in the fake kernel.
fn check_safe(k: &FakeKernel, model: &Model) -> Result<(), TestCaseError> {
    for a in k.areas() {
        let r = model.regions.iter().find(|r| r.id == a.region).unwrap();
        let gpa = r.gpa() + a.offset;
        prop_assert!(
            !k.private().intersects(gpa..gpa + a.len),
            "area {:?} maps private GPA",
            a
        );
    }
    Ok(())
}

fn check_touched(k: &FakeKernel, s: &TouchedState) -> Result<(), TestCaseError> {
    let mapped = k.mapped();
    for r in s.mapped.iter() {
        prop_assert!(mapped.contains_range(r.clone()), "reported mapped {:?}", r);
    }
    for r in s.unmapped.iter() {
        prop_assert!(!mapped.intersects(r.clone()), "reported unmapped {:?}", r);
    }
    for r in s.private.iter() {
        prop_assert!(
            k.private().contains_range(r.clone()),
            "reported private {:?}",
            r
        );
    }
    for r in s.shared.iter() {
        prop_assert!(
            !k.private().intersects(r.clone()),
            "reported shared {:?}",
            r
        );
    }
    Ok(())
}

/// Runs one step on the world; returns the batch and the plan if it was a valid batch.
fn step(
    w: &mut World,
    s: &StepGen,
) -> Result<Option<(Vec<ConversionRequest>, Plan)>, TestCaseError> {
    match s {
        StepGen::Reregister(seed) => {
            let i = seed % w.model.regions.len();
            let r = &mut w.model.regions[i];
            w.mem.deregister(r.id, &mut w.k).unwrap();
            prop_assert!(!w.k.mapped().intersects(r.iova()..r.iova() + r.spec.len));
            // The fake keeps KVM attributes: reset them as a VMM would for fresh memory.
            let op = AttributesOp {
                gpa: r.gpa(),
                len: r.spec.len,
                private: r.spec.initial == PageState::Private,
            };
            w.k.set_attributes(&op).unwrap();
            r.id = w.mem.register(r.spec, &mut w.k).unwrap();
            r.private = vec![r.spec.initial == PageState::Private; r.private.len()];
            check_consistent(&w.mem, &w.k, &w.model)?;
            Ok(None)
        }
        StepGen::Batch(gens) => {
            let reqs: Vec<ConversionRequest> = gens.iter().map(|g| w.model.request(g)).collect();
            let expected = w.model.expected_error(&reqs);
            let plan = match w.mem.plan_batch(&reqs) {
                Ok(p) => p,
                Err(e) => {
                    prop_assert_eq!(Some(error_name(&e)), expected, "{}", e);
                    return Ok(None);
                }
            };
            prop_assert_eq!(expected, None, "planner accepted {:?}", reqs);
            Ok(Some((reqs, plan)))
        }
    }
}

fn commit(w: &mut World, reqs: &[ConversionRequest], plan: Plan) -> Result<(), TestCaseError> {
    let before = w.model.clone();
    w.model.apply(reqs);
    check_ops(&plan, &before, &w.model)?;
    let stats = execute(&plan, &mut w.k).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(stats.ioctls as usize, plan.ops().len());
    prop_assert_eq!(stats.areas_after, w.k.area_count());
    prop_assert_eq!(stats.areas_before, w.mem.area_count());
    w.mem.commit(plan).unwrap();
    check_consistent(&w.mem, &w.k, &w.model)?;
    check_safe(&w.k, &w.model)?;
    for q in reqs.iter().filter(|q| q.discard) {
        for (ri, r) in w.model.regions.iter().enumerate() {
            let (s, e) = (q.gpa.max(r.gpa()), (q.gpa + q.len).min(r.end()));
            if s < e {
                let d = w.k.discarded(w.model.regions[ri].id);
                prop_assert!(d.is_some_and(|d| d.contains_range(s - r.gpa()..e - r.gpa())));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(cases(600))]

    /// After every committed step: kernel == tracker == model; plans never unmap a page
    /// that stays shared; ops are in the safe order.
    #[test]
    fn random_sequences_keep_kernel_tracker_and_model_equal(
        layout in layout_gen(),
        steps in prop::collection::vec(step_gen(), 1..=24),
    ) {
        let mut w = World::new(&layout);
        check_consistent(&w.mem, &w.k, &w.model)?;
        for s in &steps {
            if let Some((reqs, plan)) = step(&mut w, s)? {
                commit(&mut w, &reqs, plan)?;
            }
        }
    }

}

proptest! {
    #![proptest_config(cases(300))]

    /// A failure injected at any op (and optionally at any later call, i.e. during the
    /// rollback) leaves kernel == tracker after reconcile, keeps every page safe, reports
    /// the state truthfully, and planning the same batch again reaches the model state.
    #[test]
    fn injected_failures_roll_back_and_reconcile(
        layout in layout_gen(),
        steps in prop::collection::vec(step_gen(), 1..=8),
        second in prop::option::weighted(0.5, 0u64..12),
        errno in prop_oneof![Just(libc::EIO), Just(libc::ENOMEM), Just(libc::EFAULT)],
    ) {
        let mut w = World::new(&layout);
        for s in &steps {
            let Some((reqs, plan)) = step(&mut w, s)? else { continue };
            let n = plan.ops().len() as u64;
            // All op indices for short plans, an even sample for long ones.
            let picks: Vec<u64> = if n <= 16 { (0..n).collect() } else { (0..16).map(|i| i * (n - 1) / 15).collect() };
            let mut after = w.model.clone();
            after.apply(&reqs);
            for kidx in picks {
                let (mut mem, mut k) = (w.mem.clone(), w.k.clone());
                let base = k.calls();
                k.fail_call(base + kidx, errno);
                if let Some(j) = second {
                    k.fail_call(base + kidx + 1 + j, libc::EIO);
                }
                let err = execute(&plan, &mut k).expect_err("a call was made to fail");
                prop_assert_eq!(err.op_index as u64, kidx);
                prop_assert_eq!(err.error.errno, errno);
                let msg = err.to_string();
                let discard = matches!(plan.ops()[kidx as usize], Op::Discard(_));
                match (&err.outcome, second) {
                    (Outcome::NotDiscarded { .. }, _) => {
                        prop_assert!(discard);
                        prop_assert!(msg.contains("not discarded"), "{}", msg);
                    }
                    (Outcome::RolledBack, _) => {
                        prop_assert!(!discard);
                        prop_assert!(msg.contains("rolled back"), "{}", msg);
                    }
                    (Outcome::RollbackFailed { state, .. }, Some(_)) => {
                        check_touched(&k, state)?;
                        prop_assert!(msg.contains("reconcile"), "{}", msg);
                    }
                    (o, None) => prop_assert!(false, "single fault gave {:?}", o),
                }
                mem.reconcile(plan.clone(), &err).unwrap();
                let ta: Vec<Area> = mem.areas().copied().collect();
                let ka: Vec<Area> = k.areas().copied().collect();
                prop_assert_eq!(ta, ka, "tracker areas != kernel areas after reconcile");
                for r in &w.model.regions {
                    for i in 0..r.pages() {
                        let gpa = r.gpa() + i * P;
                        let kernel_private = k.private().contains_range(gpa..gpa + P);
                        prop_assert_eq!(mem.page_state(gpa) == Some(PageState::Private), kernel_private);
                    }
                }
                check_safe(&k, &w.model)?;
                match &err.outcome {
                    Outcome::RolledBack => {
                        prop_assert_eq!(k.mapped(), w.model.shared_iova());
                        prop_assert_eq!(k.private(), &w.model.private_gpa());
                    }
                    Outcome::NotDiscarded { .. } => {
                        check_consistent(&mem, &k, &after)?;
                    }
                    Outcome::RollbackFailed { .. } => {}
                }
                // Repair: plan the same batch again on the reconciled tracker.
                k.clear_faults();
                let again = mem.plan_batch(&reqs).unwrap();
                execute(&again, &mut k).map_err(|e| TestCaseError::fail(e.to_string()))?;
                mem.commit(again).unwrap();
                check_consistent(&mem, &k, &after)?;
            }
            commit(&mut w, &reqs, plan)?;
        }
    }
}
