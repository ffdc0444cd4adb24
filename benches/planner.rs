//! Host microbenchmarks of the planning logic alone (no kernel): how long the planner
//! takes to plan conversions, register a large region and replay the churn workload
//! against the fake kernel. Regressions here show up without the test VM.
//!
//! ```sh
//! cargo bench --bench planner            # full (about half a minute)
//! cargo bench --bench planner -- --test  # each benchmark once (smoke)
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use vfio_gmem::dma::planning::{Backing, PageBitmap, RegionSpec, Tracker};
use vfio_gmem::dma::{FakeKernel, PageState, Strategy, PAGE_SIZE};

#[path = "support/workload.rs"]
mod workload;
use workload::{generate, Shape, Step, GPA};

const STEPS: usize = 2000;

/// A tracker and fake kernel with the region registered, after replaying `steps`.
fn replayed(strategy: Strategy, steps: &[Step]) -> (Tracker, FakeKernel) {
    let shape = Shape::full(STEPS);
    let mut mem = Tracker::new();
    let mut k = FakeKernel::new();
    let spec = RegionSpec::new(GPA, shape.region, Backing::Opaque(0))
        .strategy(strategy)
        .initial(PageState::Private);
    mem.register(spec, &mut k).expect("register");
    for s in steps {
        mem.convert(s.gpa, s.len, s.to, &mut k).expect("convert");
    }
    (mem, k)
}

fn name(s: Strategy) -> &'static str {
    match s {
        Strategy::Cut => "cut",
        Strategy::PerGranule => "per_granule",
        Strategy::Whole => "whole",
    }
}

/// Planning one conversion against a churned tracker (the next 200 steps of the workload,
/// planned but not applied; the time reported is for all 200).
fn plan_convert(c: &mut Criterion) {
    let (steps, _) = generate(&Shape::full(STEPS));
    let (done, next) = steps.split_at(steps.len() - 200);
    for strategy in [Strategy::Cut, Strategy::PerGranule] {
        let (mem, _) = replayed(strategy, done);
        c.bench_function(&format!("plan_convert_x200/{}", name(strategy)), |b| {
            b.iter(|| {
                for s in next {
                    black_box(mem.plan_convert(s.gpa, s.len, s.to).expect("plan"));
                }
            })
        });
    }
}

/// The whole churn workload (boot pool + 2000 conversions on 256 MiB): plan, execute on
/// the fake kernel, commit.
fn replay(c: &mut Criterion) {
    let (steps, _) = generate(&Shape::full(STEPS));
    for strategy in [Strategy::Cut, Strategy::PerGranule] {
        let (fresh, k) = replayed(strategy, &[]);
        c.bench_function(&format!("replay_churn/{}", name(strategy)), |b| {
            b.iter_batched(
                || (fresh.clone(), k.clone()),
                |(mut mem, mut k)| {
                    for s in &steps {
                        black_box(mem.convert(s.gpa, s.len, s.to, &mut k).expect("convert"));
                    }
                    (mem, k)
                },
                BatchSize::LargeInput,
            )
        });
    }
}

/// Registering a 1 GiB guest: one area (non-convertible) or one per 4 KiB page
/// (convertible, all shared, per-granule fallback).
fn register(c: &mut Criterion) {
    let len = 1u64 << 30;
    c.bench_function("plan_register_1GiB/whole", |b| {
        let mem = Tracker::new();
        b.iter(|| {
            black_box(
                mem.plan_register(RegionSpec::non_convertible(GPA, len, Backing::Opaque(0)))
                    .expect("plan"),
            )
        })
    });
    c.bench_function("plan_register_1GiB/cut_shared", |b| {
        let mem = Tracker::new();
        b.iter(|| {
            black_box(
                mem.plan_register(
                    RegionSpec::new(GPA, len, Backing::Opaque(0))
                        .strategy(Strategy::Cut)
                        .initial(PageState::Shared),
                )
                .expect("plan"),
            )
        })
    });
}

/// Scanning a churned 1 GiB bitmap for shared runs (what every plan does over its range).
fn bitmap(c: &mut Criterion) {
    let pages = (1u64 << 30) / PAGE_SIZE;
    let mut b = PageBitmap::new(pages, true);
    let mut rng = workload::Rng::new(7);
    for _ in 0..20_000 {
        let n = 1 + rng.below(512);
        let at = rng.below(pages - n);
        b.set_range(at..at + n, rng.below(2) == 0);
    }
    c.bench_function("bitmap_runs_1GiB", |bch| {
        bch.iter(|| black_box(b.runs(0..pages, false).count()))
    });
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = plan_convert, replay, register, bitmap
}
criterion_main!(benches);
