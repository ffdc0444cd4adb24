//! The conversion workload shared by the host microbenchmarks (benches/planner.rs) and
//! the VM benchmarks (examples/bench_vm/), and a page model to check plans against.
//!
//! Shape, after what a confidential guest does to its memory:
//! - the region starts all private;
//! - at boot the guest converts its bounce-buffer pool (swiotlb) to shared in one call;
//! - then `steps` conversions of 4 KiB–2 MiB (power-of-two sizes, log-uniform), in both
//!   directions. Each step is one of:
//!   - *random* (half of them): anywhere in the region, 2 MiB aligned one time in four,
//!     else aligned to its own size;
//!   - *adjacent* (a quarter): touching the previous step's range on either side, same
//!     direction (a driver growing a buffer);
//!   - *nested* (a quarter): a sub-range of the previous step's range, the opposite
//!     direction (part of a buffer handed back).
//!
//! The generator is seeded and has no dependencies, so every run and every strategy
//! replays exactly the same steps.

#![allow(dead_code)]

use vfio_gmem::dma::planning::PageBitmap;
use vfio_gmem::dma::{PageState, PAGE_SIZE};

/// First GPA of the convertible region (IOVA = GPA).
pub const GPA: u64 = 0x1_0000_0000;
const MIB: u64 = 1 << 20;

/// xorshift64*: small, seeded, good enough for a workload generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub gpa: u64,
    pub len: u64,
    pub to: PageState,
}

/// Parameters of a workload.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Region length (multiple of 2 MiB).
    pub region: u64,
    /// Bounce-buffer pool converted to shared at boot (placed 2 MiB into the region).
    pub pool: u64,
    /// Conversions after boot.
    pub steps: usize,
    pub seed: u64,
}

impl Shape {
    /// The full-size workload: 256 MiB region, 64 MiB pool.
    pub fn full(steps: usize) -> Self {
        Shape {
            region: 256 * MIB,
            pool: 64 * MIB,
            steps,
            seed: 0x5eed_cafe_f00d,
        }
    }

    /// A tiny workload for smoke runs.
    pub fn smoke() -> Self {
        Shape {
            region: 16 * MIB,
            pool: 4 * MIB,
            steps: 100,
            seed: 0x5eed_cafe_f00d,
        }
    }
}

/// Counts of the step kinds a workload contains.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mix {
    pub random: usize,
    pub adjacent: usize,
    pub nested: usize,
}

/// The steps of `shape`: the boot pool conversion first.
pub fn generate(shape: &Shape) -> (Vec<Step>, Mix) {
    let mut rng = Rng::new(shape.seed);
    let end = GPA + shape.region;
    let mut mix = Mix::default();
    let mut steps = vec![Step {
        gpa: GPA + 2 * MIB,
        len: shape.pool,
        to: PageState::Shared,
    }];
    let mut prev = steps[0];
    while steps.len() <= shape.steps {
        let len = PAGE_SIZE << rng.below(10); // 4 KiB ..= 2 MiB
        let step = match rng.below(4) {
            0 | 1 => {
                mix.random += 1;
                let align = if rng.below(4) == 0 { 2 * MIB } else { len };
                let slots = (shape.region - len) / align;
                let to = if rng.below(2) == 0 {
                    PageState::Shared
                } else {
                    PageState::Private
                };
                Step {
                    gpa: GPA + rng.below(slots + 1) * align,
                    len,
                    to,
                }
            }
            2 => {
                // Adjacent: after the previous range if it fits, else before it.
                let gpa = if rng.below(2) == 0 && prev.gpa + prev.len + len <= end {
                    prev.gpa + prev.len
                } else if prev.gpa >= GPA + len {
                    prev.gpa - len
                } else {
                    prev.gpa + prev.len
                };
                if gpa + len > end {
                    continue;
                }
                mix.adjacent += 1;
                Step {
                    gpa,
                    len,
                    to: prev.to,
                }
            }
            _ => {
                // Nested: a page-aligned sub-range of the previous one, turned back.
                let pages = prev.len / PAGE_SIZE;
                let n = 1 + rng.below(pages.min(len / PAGE_SIZE));
                let first = rng.below(pages - n + 1);
                mix.nested += 1;
                Step {
                    gpa: prev.gpa + first * PAGE_SIZE,
                    len: n * PAGE_SIZE,
                    to: prev.to.flip(),
                }
            }
        };
        steps.push(step);
        prev = step;
    }
    (steps, mix)
}

/// The expected page states of the region (set = shared), for checking plans and for
/// the per-page baseline.
pub struct Model {
    pub shared: PageBitmap,
}

impl Model {
    pub fn new(shape: &Shape) -> Self {
        Model {
            shared: PageBitmap::new(shape.region / PAGE_SIZE, false),
        }
    }

    fn pages(&self, gpa: u64, len: u64) -> std::ops::Range<u64> {
        (gpa - GPA) / PAGE_SIZE..(gpa - GPA + len) / PAGE_SIZE
    }

    /// GPA runs of `[gpa, gpa+len)` whose pages are shared (`true`) or private.
    pub fn runs(&self, gpa: u64, len: u64, shared: bool) -> Vec<(u64, u64)> {
        self.shared
            .runs(self.pages(gpa, len), shared)
            .map(|r| (GPA + r.start * PAGE_SIZE, (r.end - r.start) * PAGE_SIZE))
            .collect()
    }

    /// Records a step.
    pub fn apply(&mut self, s: &Step) {
        let r = self.pages(s.gpa, s.len);
        self.shared.set_range(r, s.to == PageState::Shared);
    }

    /// Whether every page of `[gpa, gpa+len)` is private.
    pub fn all_private(&self, gpa: u64, len: u64) -> bool {
        self.shared.count(self.pages(gpa, len), true) == 0
    }

    /// Shared pages in the region.
    pub fn shared_pages(&self) -> u64 {
        self.shared.count(0..self.shared.len(), true)
    }
}
