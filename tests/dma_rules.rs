//! Unit tests of the planner, driver and fake-kernel rules, one rule per test.

use vfio_gmem::dma::{planning::*, *};

const P: u64 = PAGE_SIZE;
const MIB: u64 = 1 << 20;

fn spec(gpa: u64, len: u64) -> RegionSpec {
    RegionSpec::new(gpa, len, Backing::Opaque(gpa))
}

fn setup(specs: &[RegionSpec]) -> (Tracker, FakeKernel, Vec<RegionId>) {
    let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    let ids = specs
        .iter()
        .map(|s| mem.register(*s, &mut k).expect("register"))
        .collect();
    (mem, k, ids)
}

fn areas(mem: &Tracker) -> Vec<(u64, u64)> {
    mem.areas().map(|a| (a.iova, a.len)).collect()
}

fn fake_areas(k: &FakeKernel) -> Vec<(u64, u64)> {
    k.areas().map(|a| (a.iova, a.len)).collect()
}

fn kinds(plan: &Plan) -> Vec<&'static str> {
    plan.ops()
        .iter()
        .map(|o| match o {
            Op::Map(_) => "map",
            Op::Unmap(UnmapOp {
                kind: UnmapKind::Cut,
                ..
            }) => "cut",
            Op::Unmap(_) => "unmap",
            Op::SetAttributes(a) if a.private => "private",
            Op::SetAttributes(_) => "shared",
            Op::Discard(_) => "discard",
        })
        .collect()
}

fn plan_err(mem: &Tracker, s: RegionSpec) -> PlanError {
    mem.plan_register(s)
        .expect_err("registration must be refused")
}

// ---- registration ----

#[test]
fn register_rejects_unaligned_empty_and_overflowing_regions() {
    let mem = Tracker::new();
    let e = plan_err(&mem, spec(0x800, P));
    assert!(matches!(
        e,
        PlanError::Unaligned {
            what: "region GPA",
            value: 0x800
        }
    ));
    assert!(e.to_string().contains("round it to a page boundary"), "{e}");
    assert!(matches!(
        plan_err(&mem, spec(0, 100)),
        PlanError::Unaligned { .. }
    ));
    assert!(matches!(
        plan_err(&mem, spec(0, 0)),
        PlanError::Empty { .. }
    ));
    assert!(matches!(
        plan_err(&mem, spec(u64::MAX - P + 1, 2 * P)),
        PlanError::Overflow { .. }
    ));
    let neg = spec(0, P).iova_offset(-(P as i64));
    assert!(matches!(plan_err(&mem, neg), PlanError::Overflow { .. }));
    let odd = spec(0, P).iova_offset(0x10);
    assert!(matches!(plan_err(&mem, odd), PlanError::Unaligned { .. }));
}

#[test]
fn register_rejects_bad_granules_and_inconsistent_strategies() {
    let mem = Tracker::new();
    for g in [0, 2048, 3 * P, 5 * P] {
        let e = plan_err(&mem, spec(0, MIB).granule(g));
        assert!(matches!(e, PlanError::InvalidGranule { .. }), "{g}: {e}");
    }
    let e = plan_err(
        &mem,
        spec(0, 3 * P).strategy(Strategy::PerGranule).granule(2 * P),
    );
    assert!(e.to_string().contains("divide the region length"), "{e}");
    let mut s = spec(0, P);
    s.convertible = false;
    assert!(matches!(plan_err(&mem, s), PlanError::Inconsistent(_)));
    let whole_private =
        RegionSpec::non_convertible(0, P, Backing::Opaque(0)).initial(PageState::Private);
    assert!(matches!(
        plan_err(&mem, whole_private),
        PlanError::Inconsistent(_)
    ));
}

#[test]
fn register_rejects_gpa_and_iova_overlap() {
    let (mem, _, ids) = setup(&[spec(MIB, MIB)]);
    let e = plan_err(&mem, spec(MIB + MIB / 2, MIB));
    assert!(
        matches!(e, PlanError::GpaOverlap { existing, .. } if existing == ids[0]),
        "{e}"
    );
    let e = plan_err(
        &mem,
        spec(8 * MIB, MIB).iova_offset(-(7 * MIB as i64) + 4 * P as i64),
    );
    assert!(matches!(e, PlanError::IovaOverlap { .. }), "{e}");
    assert!(e.to_string().contains("choose another iova_offset"));
    // Adjacent in both spaces is fine.
    mem.plan_register(spec(2 * MIB, MIB)).unwrap();
}

#[test]
fn register_maps_by_strategy() {
    let mem = Tracker::new();
    assert_eq!(kinds(&mem.plan_register(spec(0, MIB)).unwrap()), ["map"]);
    let whole = RegionSpec::non_convertible(0, MIB, Backing::Opaque(0));
    assert_eq!(kinds(&mem.plan_register(whole).unwrap()), ["map"]);
    let pg = spec(0, MIB)
        .strategy(Strategy::PerGranule)
        .granule(64 << 10);
    assert_eq!(mem.plan_register(pg).unwrap().ops().len(), 16);
    let private = spec(0, MIB).initial(PageState::Private);
    assert!(mem.plan_register(private).unwrap().is_empty());
    let shifted = mem
        .plan_register(spec(MIB, MIB).iova_offset(-(MIB as i64)))
        .unwrap();
    assert!(
        matches!(&shifted.ops()[0], Op::Map(m) if m.iova == 0 && m.offset == 0 && m.len == MIB)
    );
}

#[test]
fn deregister_unmaps_every_area_in_one_call_and_forgets_the_region() {
    let pg = spec(0, MIB)
        .strategy(Strategy::PerGranule)
        .granule(64 << 10);
    let (mut mem, mut k, ids) = setup(&[pg, spec(MIB, MIB)]);
    mem.convert(0, 64 << 10, PageState::Private, &mut k)
        .unwrap();
    let plan = mem.plan_deregister(ids[0]).unwrap();
    assert_eq!(kinds(&plan), ["unmap"]);
    mem.run(plan, &mut k).unwrap();
    assert!(mem.region(ids[0]).is_none());
    assert_eq!(fake_areas(&k), vec![(MIB, MIB)]);
    assert!(matches!(
        mem.plan_deregister(ids[0]),
        Err(PlanError::UnknownRegion(_))
    ));
}

// ---- conversions: Cut ----

#[test]
fn cut_to_private_cuts_exactly_the_range_then_flips_attributes() {
    let (mut mem, mut k, _) = setup(&[spec(0, MIB)]);
    let plan = mem.plan_convert(4 * P, 2 * P, PageState::Private).unwrap();
    assert_eq!(kinds(&plan), ["cut", "private"]);
    let stats = mem.run(plan, &mut k).unwrap();
    assert_eq!((stats.ioctls, stats.bytes_unmapped), (2, 2 * P));
    assert_eq!((stats.areas_before, stats.areas_after), (1, 2));
    assert_eq!(areas(&mem), vec![(0, 4 * P), (6 * P, MIB - 6 * P)]);
    assert_eq!(fake_areas(&k), areas(&mem));
    assert_eq!(k.private().iter().collect::<Vec<_>>(), vec![4 * P..6 * P]);
}

#[test]
fn cut_to_shared_maps_a_new_area_without_merging() {
    let (mut mem, mut k, _) = setup(&[spec(0, MIB)]);
    mem.convert(4 * P, 2 * P, PageState::Private, &mut k)
        .unwrap();
    let plan = mem.plan_convert(4 * P, 2 * P, PageState::Shared).unwrap();
    assert_eq!(kinds(&plan), ["shared", "map"]);
    mem.run(plan, &mut k).unwrap();
    assert_eq!(
        areas(&mem),
        vec![(0, 4 * P), (4 * P, 2 * P), (6 * P, MIB - 6 * P)]
    );
    assert!(k.private().is_empty());
}

#[test]
fn pages_already_in_target_state_cost_nothing() {
    let (mut mem, mut k, _) = setup(&[spec(0, MIB)]);
    assert!(mem
        .plan_convert(0, MIB, PageState::Shared)
        .unwrap()
        .is_empty());
    mem.convert(8 * P, 8 * P, PageState::Private, &mut k)
        .unwrap();
    assert!(mem
        .plan_convert(10 * P, 2 * P, PageState::Private)
        .unwrap()
        .is_empty());
    // Partly private: one cut over the whole range (the hole is skipped by the kernel),
    // attributes only for the pages that flip.
    let plan = mem.plan_convert(4 * P, 16 * P, PageState::Private).unwrap();
    assert_eq!(kinds(&plan), ["cut", "private", "private"]);
    assert!(
        matches!(&plan.ops()[0], Op::Unmap(u) if u.iova == 4 * P && u.len == 16 * P && u.restore.len() == 2)
    );
    mem.run(plan, &mut k).unwrap();
    assert_eq!(areas(&mem), vec![(0, 4 * P), (20 * P, MIB - 20 * P)]);
    assert_eq!(fake_areas(&k), areas(&mem));
}

#[test]
fn conversion_spanning_adjacent_regions_coalesces() {
    let (mut mem, mut k, _) = setup(&[spec(0, MIB), spec(MIB, MIB)]);
    let plan = mem
        .plan_convert(MIB - 2 * P, 4 * P, PageState::Private)
        .unwrap();
    assert_eq!(kinds(&plan), ["cut", "private"]); // IOVA-contiguous: one cut for both
    mem.run(plan, &mut k).unwrap();
    assert_eq!(
        fake_areas(&k),
        vec![(0, MIB - 2 * P), (MIB + 2 * P, MIB - 2 * P)]
    );

    // Same GPA layout, IOVAs far apart: one cut per region, still one attribute call.
    let (mem2, _, _) = setup(&[spec(0, MIB), spec(MIB, MIB).iova_offset(1 << 30)]);
    let plan = mem2
        .plan_convert(MIB - 2 * P, 4 * P, PageState::Private)
        .unwrap();
    assert_eq!(kinds(&plan), ["cut", "cut", "private"]);
}

#[test]
fn uncovered_ranges_name_the_nearest_region() {
    let (mem, _, ids) = setup(&[spec(0, MIB), spec(4 * MIB, MIB)]);
    let e = mem
        .plan_convert(MIB - P, 2 * P, PageState::Private)
        .unwrap_err();
    match &e {
        PlanError::NotCovered {
            first_gap_page,
            nearest: Some((id, _)),
            ..
        } => {
            assert_eq!((*first_gap_page, *id), (MIB, ids[0]));
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("nearest is region#0"), "{e}");
    let e = mem
        .plan_convert(4 * MIB - P, P, PageState::Private)
        .unwrap_err();
    assert!(matches!(e, PlanError::NotCovered { nearest: Some((id, _)), .. } if id == ids[1]));
    let e = Tracker::new()
        .plan_convert(0, P, PageState::Private)
        .unwrap_err();
    assert!(e.to_string().contains("no region is registered"));
}

#[test]
fn request_validation() {
    let (mem, _, _) = setup(&[spec(0, MIB)]);
    let e = mem.plan_convert(0x800, P, PageState::Private).unwrap_err();
    assert!(matches!(e, PlanError::Unaligned { .. }));
    assert!(matches!(
        mem.plan_convert(0, 0, PageState::Private),
        Err(PlanError::Empty { .. })
    ));
    assert!(matches!(
        mem.plan_convert(P, u64::MAX - P + 1, PageState::Private),
        Err(PlanError::Overflow { .. })
    ));
}

#[test]
fn non_convertible_regions_refuse_conversion() {
    let whole = RegionSpec::non_convertible(MIB, MIB, Backing::Opaque(0));
    let (mem, _, ids) = setup(&[spec(0, MIB), whole]);
    let e = mem
        .plan_convert(MIB - P, 2 * P, PageState::Private)
        .unwrap_err();
    assert!(
        matches!(e, PlanError::NotConvertible { region, .. } if region == ids[1]),
        "{e}"
    );
    assert!(e.to_string().contains("not convertible"));
}

// ---- conversions: PerGranule ----

fn per_granule() -> (Tracker, FakeKernel, Vec<RegionId>) {
    setup(&[spec(0, MIB).strategy(Strategy::PerGranule).granule(16 * P)])
}

#[test]
fn per_granule_requires_granule_alignment_and_suggests_a_range() {
    let (mem, _, _) = per_granule();
    let e = mem
        .plan_convert(8 * P, 16 * P, PageState::Private)
        .unwrap_err();
    match &e {
        PlanError::GranuleUnaligned {
            granule,
            suggestion,
            ..
        } => {
            assert_eq!((*granule, suggestion.clone()), (16 * P, 0..32 * P));
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("0x10000-byte granule"), "{e}");
}

#[test]
fn per_granule_one_native_unmap_per_run_one_map_per_granule() {
    let (mut mem, mut k, _) = per_granule();
    let plan = mem
        .plan_convert(16 * P, 48 * P, PageState::Private)
        .unwrap();
    assert_eq!(kinds(&plan), ["unmap", "private"]);
    assert!(
        matches!(&plan.ops()[0], Op::Unmap(u) if u.restore.len() == 3 && u.expected_bytes() == 48 * P)
    );
    mem.run(plan, &mut k).unwrap();
    assert_eq!(k.area_count(), 16 - 3);
    let plan = mem.plan_convert(0, 64 * P, PageState::Shared).unwrap();
    assert_eq!(kinds(&plan), ["shared", "map", "map", "map"]);
    mem.run(plan, &mut k).unwrap();
    assert_eq!(fake_areas(&k), areas(&mem));
    assert!(k.areas().all(|a| a.len == 16 * P));
}

// ---- batches ----

#[test]
fn batch_orders_unmaps_attributes_maps_discards() {
    let (mut mem, mut k, ids) = setup(&[spec(0, MIB)]);
    mem.convert(0, 4 * P, PageState::Private, &mut k).unwrap();
    let batch = [
        ConversionRequest::new(0, 2 * P, PageState::Shared),
        ConversionRequest::new(16 * P, P, PageState::Private).discard_shared(),
        ConversionRequest::new(17 * P, P, PageState::Private),
        ConversionRequest::new(32 * P, P, PageState::Private),
    ];
    let plan = mem.plan_batch(&batch).unwrap();
    assert_eq!(
        kinds(&plan),
        ["cut", "cut", "private", "private", "shared", "map", "discard"]
    );
    mem.run(plan, &mut k).unwrap();
    assert_eq!(
        k.discarded(ids[0]).unwrap().iter().collect::<Vec<_>>(),
        vec![16 * P..17 * P]
    );
    assert_eq!(fake_areas(&k), areas(&mem));
}

#[test]
fn batch_conflicts_and_discard_on_shared_are_refused() {
    let (mem, _, _) = setup(&[spec(0, MIB)]);
    let e = mem
        .plan_batch(&[
            ConversionRequest::new(0, 4 * P, PageState::Private),
            ConversionRequest::new(2 * P, 4 * P, PageState::Shared),
        ])
        .unwrap_err();
    assert!(
        matches!(e, PlanError::Conflict { ref range } if *range == (2 * P..4 * P)),
        "{e}"
    );
    let e = mem
        .plan_batch(&[ConversionRequest::new(0, P, PageState::Shared).discard_shared()])
        .unwrap_err();
    assert!(matches!(e, PlanError::DiscardOnShared { .. }));
}

// ---- commit protocol ----

#[test]
fn planning_is_pure_and_stale_plans_are_refused() {
    let (mut mem, mut k, _) = setup(&[spec(0, MIB)]);
    let a = mem.plan_convert(0, P, PageState::Private).unwrap();
    let b = mem.plan_convert(P, P, PageState::Private).unwrap();
    assert_eq!(mem.page_state(0), Some(PageState::Shared));
    execute(&a, &mut k).unwrap();
    mem.commit(a).unwrap();
    assert!(matches!(mem.commit(b), Err(PlanError::StalePlan { .. })));
}

#[test]
fn tracker_memory_is_about_one_bit_per_page() {
    let (mem, _, _) = setup(&[spec(0, 256 * MIB)]);
    let bytes = mem.tracker_bytes();
    assert!((8 << 10..(8 << 10) + 1024).contains(&bytes), "{bytes}");
}

// ---- driver: rollback ----

#[test]
fn failed_attribute_call_rolls_the_unmap_back() {
    let (mut mem, mut k, _) = setup(&[spec(0, MIB)]);
    let plan = mem.plan_convert(4 * P, 2 * P, PageState::Private).unwrap();
    k.fail_call(k.calls() + 1, libc::EIO);
    let err = execute(&plan, &mut k).unwrap_err();
    assert_eq!(
        (err.op_index, err.outcome.clone()),
        (1, Outcome::RolledBack)
    );
    assert_eq!(err.error.errno, libc::EIO);
    assert!(err.to_string().contains("rolled back"), "{err}");
    mem.reconcile(plan, &err).unwrap();
    // The restored piece is a new area, as in the kernel.
    assert_eq!(
        fake_areas(&k),
        vec![(0, 4 * P), (4 * P, 2 * P), (6 * P, MIB - 6 * P)]
    );
    assert_eq!(fake_areas(&k), areas(&mem));
    assert_eq!(mem.page_state(4 * P), Some(PageState::Shared));
}

#[test]
fn failed_unmap_without_effect_is_detected_by_eexist() {
    let (mut mem, mut k, _) = setup(&[spec(0, MIB)]);
    let plan = mem.plan_convert(4 * P, 2 * P, PageState::Private).unwrap();
    k.fail_call(k.calls(), libc::EBUSY);
    let err = execute(&plan, &mut k).unwrap_err();
    assert_eq!(err.outcome, Outcome::RolledBack);
    assert_eq!(err.stats.ioctls, 2); // the unmap and one restore map that got EEXIST
    mem.reconcile(plan, &err).unwrap();
    assert_eq!(fake_areas(&k), vec![(0, MIB)]);
    assert_eq!(fake_areas(&k), areas(&mem));
}

#[test]
fn failed_rollback_stops_safely_and_reports_the_state() {
    let (mut mem, mut k, _) = setup(&[spec(0, MIB)]);
    mem.convert(0, 8 * P, PageState::Private, &mut k).unwrap();
    let batch = [
        ConversionRequest::new(0, P, PageState::Shared),
        ConversionRequest::new(4 * P, P, PageState::Shared),
    ];
    let plan = mem.plan_batch(&batch).unwrap();
    assert_eq!(kinds(&plan), ["shared", "shared", "map", "map"]);
    let c = k.calls();
    k.fail_call(c + 3, libc::ENOMEM); // second map
    k.fail_call(c + 4, libc::EIO); // undoing the first map
    let err = execute(&plan, &mut k).unwrap_err();
    let Outcome::RollbackFailed { op, state, .. } = &err.outcome else {
        panic!("{err}")
    };
    assert_eq!(*op, 2);
    assert_eq!(state.mapped.iter().collect::<Vec<_>>(), vec![0..P]);
    assert_eq!(
        state.shared.iter().collect::<Vec<_>>(),
        vec![0..P, 4 * P..5 * P]
    );
    assert!(err.to_string().contains("reconcile"), "{err}");
    mem.reconcile(plan, &err).unwrap();
    assert_eq!(fake_areas(&k), areas(&mem));
    assert_eq!(mem.page_state(4 * P), Some(PageState::Shared)); // shared but unmapped
                                                                // Converting again repairs: only the missing map is issued.
    let plan = mem.plan_batch(&batch).unwrap();
    assert_eq!(kinds(&plan), ["map"]);
    mem.run(plan, &mut k).unwrap();
    assert!(k.is_mapped(4 * P));
}

#[test]
fn failed_discard_leaves_pages_private_and_says_so() {
    let (mut mem, mut k, _) = setup(&[spec(0, MIB)]);
    let plan = mem
        .plan_batch(&[ConversionRequest::new(0, P, PageState::Private).discard_shared()])
        .unwrap();
    k.fail_call(k.calls() + 2, libc::EIO);
    let err = execute(&plan, &mut k).unwrap_err();
    assert!(
        matches!(&err.outcome, Outcome::NotDiscarded { ranges } if ranges.contains_range(0..P) && ranges.total() == P)
    );
    assert!(err.to_string().contains("not discarded"), "{err}");
    mem.reconcile(plan, &err).unwrap();
    assert_eq!(mem.page_state(0), Some(PageState::Private));
    assert!(!k.is_mapped(0));
}

// ---- fake kernel rules ----

fn map_op(iova: u64, len: u64) -> MapOp {
    MapOp {
        region: RegionId(0),
        backing: Backing::Opaque(0),
        iova,
        offset: iova,
        len,
    }
}

fn unmap_op(iova: u64, len: u64, kind: UnmapKind) -> UnmapOp {
    UnmapOp {
        iova,
        len,
        kind,
        restore: vec![],
    }
}

#[test]
fn fake_map_rules() {
    let mut k = FakeKernel::new();
    k.map(&map_op(4 * P, 4 * P)).unwrap();
    for (iova, len) in [(0, 5 * P), (7 * P, P), (5 * P, P)] {
        assert_eq!(k.map(&map_op(iova, len)).unwrap_err().errno, libc::EEXIST);
    }
    assert_eq!(k.map(&map_op(0, 0)).unwrap_err().errno, libc::EINVAL);
    assert_eq!(k.map(&map_op(0x10, P)).unwrap_err().errno, libc::EINVAL);
    k.map(&map_op(0, 4 * P)).unwrap(); // adjacent: a separate area
    assert_eq!((k.area_count(), k.peak_areas()), (2, 2));
}

#[test]
fn fake_native_unmap_rules() {
    let mut k = FakeKernel::new();
    for i in 0..4 {
        k.map(&map_op(i * 4 * P, 4 * P)).unwrap();
    }
    // Nothing mapped there.
    assert_eq!(
        k.unmap(&unmap_op(64 * P, P, UnmapKind::Native))
            .unwrap_err()
            .errno,
        libc::ENOENT
    );
    // Cuts the second area: the first (fully inside) is removed before the walk fails.
    assert_eq!(
        k.unmap(&unmap_op(0, 6 * P, UnmapKind::Native))
            .unwrap_err()
            .errno,
        libc::ENOENT
    );
    assert_eq!(
        fake_areas(&k),
        vec![(4 * P, 4 * P), (8 * P, 4 * P), (12 * P, 4 * P)]
    );
    // Several whole areas (and holes) in one call.
    assert_eq!(
        k.unmap(&unmap_op(0, 12 * P, UnmapKind::Native)).unwrap(),
        8 * P
    );
    assert_eq!(
        k.unmap(&unmap_op(0, 0, UnmapKind::Native))
            .unwrap_err()
            .errno,
        libc::EINVAL
    );
}

#[test]
fn fake_cut_unmap_rules() {
    let mut k = FakeKernel::new();
    k.map(&map_op(0, 8 * P)).unwrap();
    k.map(&map_op(8 * P, 8 * P)).unwrap();
    // Spans two areas and cuts both.
    assert_eq!(
        k.unmap(&unmap_op(6 * P, 4 * P, UnmapKind::Cut)).unwrap(),
        4 * P
    );
    assert_eq!(fake_areas(&k), vec![(0, 6 * P), (10 * P, 6 * P)]);
    let offsets: Vec<u64> = k.areas().map(|a| a.offset).collect();
    assert_eq!(offsets, vec![0, 10 * P]);
    // Nothing mapped: success with 0 bytes (the compat path does not check).
    assert_eq!(k.unmap(&unmap_op(6 * P, 4 * P, UnmapKind::Cut)).unwrap(), 0);
    // IOVA 0: only the end is cut.
    assert_eq!(k.unmap(&unmap_op(0, P, UnmapKind::Cut)).unwrap(), P);
    assert_eq!(fake_areas(&k), vec![(P, 5 * P), (10 * P, 6 * P)]);
    // Huge pages enabled: no cut, so a cutting range fails like the native unmap.
    let mut h = FakeKernel::with_huge_pages();
    h.map(&map_op(0, 8 * P)).unwrap();
    assert_eq!(
        h.unmap(&unmap_op(P, P, UnmapKind::Cut)).unwrap_err().errno,
        libc::ENOENT
    );
}

#[test]
fn fake_fault_injection_fails_the_chosen_call_without_effect() {
    let mut k = FakeKernel::new();
    k.fail_call(1, libc::ENOMEM);
    k.map(&map_op(0, P)).unwrap();
    assert_eq!(k.map(&map_op(P, P)).unwrap_err().errno, libc::ENOMEM);
    assert_eq!(k.area_count(), 1);
    k.map(&map_op(P, P)).unwrap();
    assert_eq!(k.counts().calls, 3);
}

#[test]
fn attribute_and_discard_records() {
    let mut k = FakeKernel::new();
    k.set_attributes(&AttributesOp {
        gpa: 0,
        len: 4 * P,
        private: true,
    })
    .unwrap();
    k.set_attributes(&AttributesOp {
        gpa: P,
        len: P,
        private: false,
    })
    .unwrap();
    assert_eq!(
        k.private().iter().collect::<Vec<_>>(),
        vec![0..P, 2 * P..4 * P]
    );
    let d = DiscardOp {
        region: RegionId(3),
        backing: Backing::Opaque(0),
        gpa: 0,
        offset: 0,
        len: P,
    };
    k.discard(&d).unwrap();
    assert!(k.discarded(RegionId(3)).unwrap().contains_range(0..P));
}
