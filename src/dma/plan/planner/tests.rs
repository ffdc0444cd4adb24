//! Tests of the planner: the single-request road against the general one, and a plan's
//! edit against replaying its ops.

use super::*;
use crate::dma::execute::execute;
use crate::dma::executor::fake::FakeKernel;
use crate::dma::plan::model::Backing;

/// The single-request road gives exactly the general planner's plan or error, on
/// trackers of every kind of region in random states, for random requests (aligned or
/// not, inside one region, across regions, outside every region, empty, overflowing).
#[test]
fn the_single_request_road_plans_what_the_general_planner_plans() {
    const P: u64 = PAGE_SIZE;
    let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    let regions = [
        RegionSpec::new(0x10_0000, 64 * P, Backing::Opaque(1)),
        // Adjacent to the first in GPA: requests may span both.
        RegionSpec::new(0x10_0000 + 64 * P, 64 * P, Backing::Opaque(2))
            .strategy(Strategy::PerGranule)
            .granule(4 * P)
            .initial(PageState::Private),
        RegionSpec::new(0x40_0000, 32 * P, Backing::Opaque(3)).iova_offset(0x1000_0000),
        RegionSpec::non_convertible(0x80_0000, 16 * P, Backing::Opaque(4)),
    ];
    for spec in regions {
        mem.register(spec, &mut k).unwrap();
    }
    let mut x: u64 = 7;
    let mut next = |m: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % m
    };
    let (mut fast, mut errors) = (0, 0);
    let mut b = PlanBuffers::default();
    for step in 0..4000 {
        let base = [
            0x10_0000,
            0x10_0000 + 64 * P,
            0x40_0000,
            0x80_0000,
            0x20_0000,
        ][next(5) as usize];
        let mut gpa = base + next(80) * P;
        let mut len = (1 + next(24)) * P;
        match next(16) {
            0 => gpa += 0x10,
            1 => len += 0x800,
            2 => len = 0,
            3 => gpa = u64::MAX - P + 1,
            _ => {}
        }
        let to = if next(2) == 0 {
            PageState::Private
        } else {
            PageState::Shared
        };
        let mut req = ConversionRequest::new(gpa, len, to);
        if next(4) == 0 {
            req = req.discard_shared();
        }
        let general = mem.plan_general(&[req], &mut PlanBuffers::default());
        match mem.plan_one(&req, &mut b) {
            Ok(Some(plan)) => {
                fast += 1;
                let g = general
                    .as_ref()
                    .expect("the general planner accepts it too");
                assert_eq!(plan.ops, g.ops, "step {step}: {req:?}");
                assert_eq!(
                    (plan.areas_before, plan.areas_after, plan.generation),
                    (g.areas_before, g.areas_after, g.generation),
                    "step {step}: {req:?}"
                );
                let mut plan = plan;
                b.recycle_from(&mut plan.ops, true);
            }
            Ok(None) => {}
            Err(e) => {
                errors += 1;
                assert_eq!(Err(e), general.map(drop), "step {step}: {req:?}");
            }
        }
        // Move the state on through the general road (the one compared against).
        if let Ok(plan) = mem.plan_batch(&[req]) {
            mem.run(plan, &mut k).unwrap();
        }
    }
    assert!(fast > 400 && errors > 200, "fast {fast}, errors {errors}");
}

/// Committing a single-request plan through the edit its planner computed leaves the
/// tracker exactly as replaying its ops does (areas, attribute bits, generation), over
/// random conversions of cut and per-granule regions.
#[test]
fn a_plans_edit_records_what_replaying_its_ops_records() {
    const P: u64 = PAGE_SIZE;
    let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    mem.register(
        RegionSpec::new(0x10_0000, 256 * P, Backing::Opaque(1)),
        &mut k,
    )
    .unwrap();
    mem.register(
        RegionSpec::new(0x40_0000, 64 * P, Backing::Opaque(2))
            .strategy(Strategy::PerGranule)
            .granule(4 * P),
        &mut k,
    )
    .unwrap();
    let mut x: u64 = 3;
    let mut next = |m: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % m
    };
    let mut kinds = std::collections::BTreeSet::new();
    for step in 0..3000 {
        let req = if next(3) == 0 {
            ConversionRequest::new(0x40_0000 + next(16) * 4 * P, (1 + next(3)) * 4 * P, {
                [PageState::Private, PageState::Shared][next(2) as usize]
            })
        } else {
            ConversionRequest::new(0x10_0000 + next(240) * P, (1 + next(16)) * P, {
                [PageState::Private, PageState::Shared][next(2) as usize]
            })
        };
        let Ok(plan) = mem.plan_batch(&[req]) else {
            continue;
        };
        let edit = plan
            .edit
            .expect("a single request inside a region has an edit");
        kinds.insert(
            format!("{:?}", edit.areas)
                .split([' ', '{'])
                .next()
                .unwrap()
                .to_owned(),
        );
        let mut replayed = mem.clone();
        let mut plain = plan.clone();
        plain.edit = None;
        execute(&plan, &mut k).unwrap();
        replayed.commit(plain).unwrap();
        mem.commit(plan).unwrap();
        assert_eq!(
            mem.areas().collect::<Vec<_>>(),
            replayed.areas().collect::<Vec<_>>(),
            "step {step}: {req:?}"
        );
        for (a, b) in mem.regions().zip(replayed.regions()) {
            assert_eq!(a.private, b.private, "step {step}: {req:?}");
        }
        assert_eq!(mem.generation(), replayed.generation());
    }
    // Every kind of edit was exercised.
    assert_eq!(kinds.len(), 4, "{kinds:?}");
}

/// A plan's edit is applied only by the tracker that planned it: a clone replays the
/// plan's ops (same result when it is still at the plan's state), and a clone that
/// diverged to the same generation does not apply positions of another state.
#[test]
fn only_the_planning_tracker_applies_a_plans_edit() {
    const P: u64 = PAGE_SIZE;
    let (mut mem, mut k) = (Tracker::new(), FakeKernel::new());
    mem.register(
        RegionSpec::new(0x10_0000, 64 * P, Backing::Opaque(1)),
        &mut k,
    )
    .unwrap();
    let plan = mem
        .plan_convert(0x10_0000 + 8 * P, P, PageState::Private)
        .unwrap();
    let mut same = mem.clone();
    same.commit(plan.clone()).unwrap();
    mem.commit(plan).unwrap();
    assert_eq!(
        mem.areas().collect::<Vec<_>>(),
        same.areas().collect::<Vec<_>>()
    );
    // Two trackers diverge to the same generation; a plan of one committed to the
    // other records what its ops say (a cut of page 30), not its edit's position (the
    // area holding page 30 in the planning tracker is another one in this).
    let mut other = mem.clone();
    let a = mem
        .plan_convert(0x10_0000 + 20 * P, P, PageState::Private)
        .unwrap();
    mem.commit(a).unwrap();
    let b = other
        .plan_convert(0x10_0000 + 40 * P, 2 * P, PageState::Private)
        .unwrap();
    other.commit(b).unwrap();
    assert_eq!(mem.generation(), other.generation());
    let c = mem
        .plan_convert(0x10_0000 + 30 * P, P, PageState::Private)
        .unwrap();
    other.commit(c).unwrap();
    assert_eq!(
        other.page_state(0x10_0000 + 30 * P),
        Some(PageState::Private)
    );
    let pages: Vec<(u64, u64)> = other
        .areas()
        .map(|a| ((a.iova - 0x10_0000) / P, (a.iova + a.len - 0x10_0000) / P))
        .collect();
    assert_eq!(pages, [(0, 8), (9, 30), (31, 40), (42, 64)]);
}
