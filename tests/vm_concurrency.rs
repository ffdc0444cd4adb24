//! Concurrent conversions on the real kernel (VM): four threads convert disjoint and
//! overlapping ranges of one DmaSpace (shared as `Arc<RwLock<_>>`, the documented
//! contract) while the edu device DMAs without pause into pages that stay shared and an
//! observer thread checks the tracker under the read lock. Run with the cut strategy and
//! with the per-granule fallback.
//!
//! Asserted: no conversion is lost (each thread's log entries, in its own order); the
//! final page states equal the log replayed in lock order; no DMA to a steady page failed
//! or faulted; every page that ended private refuses DMA and every shared one works; the
//! tracker equals the kernel, proven by unmapping through raw ioctls (each area exactly,
//! gaps empty, nothing else left).

mod support;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use support::needs::{self, Need};
use support::space::{self as sp, Confidential, GPA, PAGE};
use support::{pci, run_vm_tests};
use vfio_gmem::dma::{ConversionRequest, CutSupport, DmaSpace, PageState, SpaceOptions, Strategy};

/// What the running kernel must offer (see `support::needs`); unmet: reported skipped.
const NEEDS: needs::Needs = &[("*", &[Need::Iommufd, Need::PrivateMemory])];

fn main() {
    needs::declare(NEEDS);
    run_vm_tests(&[
        ("four_threads_cut_strategy", four_threads_cut_strategy),
        (
            "four_threads_per_granule_fallback",
            four_threads_per_granule_fallback,
        ),
    ]);
}

const THREADS: u64 = 4;
/// Each converter makes at least this many calls, and goes on until the device has made
/// [`DMA_ROUNDS`] round trips, so conversions run during every DMA.
const MIN_OPS: u64 = 500;
/// edu takes ~100 ms per transfer (a QEMU timer): 40 round trips ≈ 8 s.
const DMA_ROUNDS: u64 = 40;
const PAGES: u64 = 72;

/// Thread `t` alone converts pages `[1 + 9t, 9 + 9t)`; every thread converts inside
/// `[37, 53)`; threads 1 and 3 share `[54, 70)`. The other pages never convert: the
/// device DMAs into them throughout, and they sit between converting ranges so that
/// cuts land right next to them.
const STEADY: [u64; 8] = [0, 9, 18, 27, 36, 53, 70, 71];

fn zones(t: u64) -> Vec<(u64, u64)> {
    let mut z = vec![(1 + 9 * t, 8), (37, 16)];
    if t % 2 == 1 {
        z.push((54, 16));
    }
    z
}

/// One successful call, logged while its thread held the lock.
#[derive(Clone, Debug)]
struct Entry {
    thread: u64,
    seq: u64,
    /// (first page, pages, to)
    ranges: Vec<(u64, u64, PageState)>,
}

struct Shared {
    space: DmaSpace,
    log: Vec<Entry>,
}

/// xorshift64: deterministic per thread, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random range inside one of thread `t`'s zones.
fn pick(rng: &mut Rng, t: u64) -> (u64, u64) {
    let z = zones(t);
    let (start, size) = z[rng.below(z.len() as u64) as usize];
    let first = start + rng.below(size);
    let pages = 1 + rng.below((start + size - first).min(8));
    (first, pages)
}

fn state(rng: &mut Rng) -> PageState {
    if rng.below(2) == 0 {
        PageState::Private
    } else {
        PageState::Shared
    }
}

/// What one converter did.
struct Done {
    calls: u64,
    batches: u64,
    discards: u64,
}

/// The converting thread `t`: at least MIN_OPS calls and until `stop`, one in eight a
/// batch of two ranges (its own zone and a common one, so they never conflict), one
/// private conversion in four with discard. Bumps `warmed` once past MIN_OPS.
fn converter(
    t: u64,
    shared: Arc<RwLock<Shared>>,
    stop: Arc<AtomicBool>,
    warmed: Arc<AtomicU64>,
) -> Result<Done, String> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    let (mut batches, mut discards) = (0, 0);
    let mut seq = 0;
    loop {
        if seq == MIN_OPS {
            warmed.fetch_add(1, Ordering::SeqCst);
        }
        if seq >= MIN_OPS && stop.load(Ordering::SeqCst) {
            break;
        }
        let mut reqs = Vec::new();
        if rng.below(8) == 0 {
            let own = zones(t)[0];
            let first = own.0 + rng.below(own.1);
            let pages = 1 + rng.below(own.0 + own.1 - first);
            reqs.push(ConversionRequest::new(
                GPA + first * PAGE,
                pages * PAGE,
                state(&mut rng),
            ));
            let (first, pages) = loop {
                let r = pick(&mut rng, t);
                if r.0 >= 37 {
                    break r;
                }
            };
            reqs.push(ConversionRequest::new(
                GPA + first * PAGE,
                pages * PAGE,
                state(&mut rng),
            ));
            batches += 1;
        } else {
            let (first, pages) = pick(&mut rng, t);
            let to = state(&mut rng);
            let mut r = ConversionRequest::new(GPA + first * PAGE, pages * PAGE, to);
            if to == PageState::Private && rng.below(4) == 0 {
                r = r.discard_shared();
                discards += 1;
            }
            reqs.push(r);
        }
        let mut guard = shared.write().map_err(|_| "lock poisoned")?;
        let g = &mut *guard;
        g.space
            .convert_batch(&reqs)
            .map_err(|e| format!("thread {t} call {seq}: {e}"))?;
        g.log.push(Entry {
            thread: t,
            seq,
            ranges: reqs
                .iter()
                .map(|r| ((r.gpa - GPA) / PAGE, r.len / PAGE, r.to))
                .collect(),
        });
        drop(guard);
        seq += 1;
        if rng.below(4) == 0 {
            std::thread::yield_now();
        }
    }
    Ok(Done {
        calls: seq,
        batches,
        discards,
    })
}

/// Under the read lock: the tracker's areas cover exactly the shared pages.
fn observe(space: &DmaSpace) -> Result<(), String> {
    let mut mapped = vec![false; PAGES as usize];
    for a in space.memory().areas() {
        for p in (a.iova - GPA) / PAGE..(a.iova + a.len - GPA) / PAGE {
            if std::mem::replace(&mut mapped[p as usize], true) {
                return Err(format!("page {p} is in two areas"));
            }
        }
    }
    for (p, &m) in mapped.iter().enumerate() {
        let shared = space.page_state(GPA + p as u64 * PAGE) == Some(PageState::Shared);
        if m != shared {
            return Err(format!("page {p}: mapped {m}, shared {shared}"));
        }
    }
    Ok(())
}

fn run(options: SpaceOptions, want: &str) -> Result<(), Failed> {
    let Confidential {
        space,
        edu,
        private: _private,
        shared: _shared,
        mut view,
    } = sp::confidential(options, PAGES * PAGE)?;
    let strategy = space.regions()[0].strategy.to_string();
    check!(
        strategy == want,
        "region strategy {strategy}, wanted {want}"
    );
    if want == "cut" {
        check!(
            *space.cut_support() == CutSupport::Verified,
            "cut probe: {:?}",
            space.cut_support()
        );
    }
    let shared = Arc::new(RwLock::new(Shared {
        space,
        log: Vec::new(),
    }));
    let done = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let warmed = Arc::new(AtomicU64::new(0));
    let observations = Arc::new(AtomicU64::new(0));
    let faults0 = pci::iommu_fault_count();
    let t0 = Instant::now();

    let converters: Vec<_> = (0..THREADS)
        .map(|t| {
            let shared = shared.clone();
            let (stop, warmed) = (stop.clone(), warmed.clone());
            std::thread::spawn(move || converter(t, shared, stop, warmed))
        })
        .collect();
    let observer = {
        let (shared, done, n) = (shared.clone(), done.clone(), observations.clone());
        std::thread::spawn(move || -> Result<(), String> {
            while !done.load(Ordering::Relaxed) {
                observe(&shared.read().map_err(|_| "lock poisoned")?.space)?;
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        })
    };

    // The device DMAs into the steady pages while the converters run; they stop only
    // after DMA_ROUNDS round trips (and their MIN_OPS calls each).
    let (mut dmas, mut mismatches) = (0u64, Vec::new());
    let calls_at_first_dma = shared.read().map_err(|_| "poisoned")?.log.len();
    while dmas < DMA_ROUNDS || warmed.load(Ordering::SeqCst) < THREADS {
        if converters.iter().any(|h| h.is_finished()) {
            break; // a converter failed: its error is reported below
        }
        let p = STEADY[(dmas % STEADY.len() as u64) as usize];
        if !sp::round_trip(
            &edu,
            &mut view,
            (p * PAGE) as usize,
            GPA + p * PAGE,
            dmas as u8,
        )? {
            mismatches.push(p);
        }
        dmas += 1;
    }
    let calls_during_dma = shared.read().map_err(|_| "poisoned")?.log.len() - calls_at_first_dma;
    stop.store(true, Ordering::SeqCst);
    let mut per_thread = Vec::new();
    let (mut batches, mut discards) = (0, 0);
    for (t, h) in converters.into_iter().enumerate() {
        let d = h.join().map_err(|_| format!("converter {t} panicked"))??;
        per_thread.push(d.calls);
        batches += d.batches;
        discards += d.discards;
    }
    let elapsed = t0.elapsed();
    let faults = pci::iommu_fault_count() - faults0;
    let total: u64 = per_thread.iter().sum();
    done.store(true, Ordering::Relaxed);
    observer.join().map_err(|_| "observer panicked")??;
    let Shared { space, log } = Arc::into_inner(shared)
        .ok_or("space still shared")?
        .into_inner()
        .map_err(|_| "lock poisoned")?;

    eprintln!(
        "{want}: {THREADS} threads × {per_thread:?} calls = {total} ({batches} batches of 2, \
         {discards} with discard) in {:.2} s, {:.0} calls/s; {dmas} DMA round trips to {} \
         steady pages, {calls_during_dma} calls made while they ran, {} mismatches, {faults} \
         IOMMU faults; {} observations under the read lock",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        STEADY.len(),
        mismatches.len(),
        observations.load(Ordering::Relaxed)
    );
    check!(
        dmas >= DMA_ROUNDS && calls_during_dma as u64 >= THREADS * MIN_OPS / 2,
        "too little overlap: {dmas} round trips, {calls_during_dma} calls during them"
    );
    check!(
        mismatches.is_empty(),
        "DMA to steady pages failed during conversions: pages {mismatches:?}"
    );
    check!(
        faults == 0,
        "{faults} IOMMU faults while only steady pages were DMAed"
    );

    // No lost update: every call logged, each thread's calls in its own order.
    check!(
        log.len() as u64 == total,
        "{} log entries, the threads made {total} calls",
        log.len()
    );
    for t in 0..THREADS {
        let seqs: Vec<u64> = log
            .iter()
            .filter(|e| e.thread == t)
            .map(|e| e.seq)
            .collect();
        check!(
            seqs == (0..per_thread[t as usize]).collect::<Vec<_>>(),
            "thread {t}'s calls are missing or out of order in the log"
        );
    }
    // Interleaving actually happened: the log is not one thread after another.
    let switches = log
        .windows(2)
        .filter(|w| w[0].thread != w[1].thread)
        .count();
    eprintln!("{switches} thread switches in the lock-order log");
    check!(
        switches as u64 >= THREADS * 4,
        "only {switches} switches between threads: the calls hardly interleaved"
    );

    // Final states equal the log replayed in lock order.
    let mut model = vec![PageState::Shared; PAGES as usize];
    for e in &log {
        for &(first, pages, to) in &e.ranges {
            model[first as usize..(first + pages) as usize].fill(to);
        }
    }
    for (p, want) in model.iter().enumerate() {
        let got = space.page_state(GPA + p as u64 * PAGE);
        check!(
            got == Some(*want),
            "page {p}: tracker {got:?}, log says {want:?}"
        );
    }
    for p in STEADY {
        check!(
            model[p as usize] == PageState::Shared,
            "steady page {p} converted"
        );
    }
    observe(&space).map_err(|e| format!("final tracker: {e}"))?;

    // DMA: private pages refuse, shared pages work.
    let private: Vec<u64> = (0..PAGES)
        .filter(|&p| model[p as usize] == PageState::Private)
        .collect();
    check!(
        !private.is_empty(),
        "no page ended private; the test proves nothing"
    );
    for p in 0..PAGES {
        let (off, iova) = ((p * PAGE) as usize, GPA + p * PAGE);
        if model[p as usize] == PageState::Private {
            sp::dma_refused(&edu, &mut view, off, iova)?;
        } else {
            sp::dma_works(&edu, &mut view, off, iova, p as u8)?;
        }
    }

    // The kernel holds exactly the tracker's areas.
    let tracker: Vec<(u64, u64)> = space.memory().areas().map(|a| (a.iova, a.len)).collect();
    let ioas = space.ioas().ok_or("iommufd space without IOAS")?;
    let n = sp::verify_kernel_areas(
        ioas.iommufd().as_fd(),
        ioas.id(),
        &tracker,
        GPA,
        GPA + PAGES * PAGE,
    )?;
    eprintln!(
        "final: {} private, {} shared pages; {n} areas, each unmapped exactly by raw ioctl, \
         gaps empty, nothing else mapped",
        private.len(),
        PAGES as usize - private.len()
    );
    // The pages are unmapped now (behind the library's back): DMA to a shared one fails.
    sp::dma_refused(&edu, &mut view, 0, GPA)?;
    drop(edu);
    drop(space);
    Ok(())
}

fn four_threads_cut_strategy() -> Result<(), Failed> {
    run(SpaceOptions::default(), "cut")
}

fn four_threads_per_granule_fallback() -> Result<(), Failed> {
    run(
        SpaceOptions {
            force_strategy: Some(Strategy::PerGranule),
            ..Default::default()
        },
        "pergranule",
    )
}
