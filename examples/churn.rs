//! Conversion churn on a 256 MiB convertible region: how many ioctls and live IOMMU areas
//! the library's strategies need, against one 4 KiB area per shared page.
//!
//! ```sh
//! cargo run --release --example churn                     # fake kernel (host)
//! scripts/vm-run -- target/release/examples/churn --real  # the real kernel in the VM
//! # the patched kernel, 2 MiB hugetlb backing: native split vs compat cut vs per-page,
//! # with VT-d's leaf IOPTEs by size after each run (debugfs)
//! scripts/vm-run --patched -- sh -c 'echo 160 > /proc/sys/vm/nr_hugepages &&
//!     target/release/examples/churn --real --hugetlb --prefault --rounds 3'
//! ```
//!
//! Options of real runs: `--modes native,compat,perpage` (which, in which order; round r
//! starts r places further along the list, so each mode runs first equally often),
//! `--rounds R` (medians printed), `--prefault` (write the free hugetlb pool once before
//! timing: under TCG the first write to guest RAM after boot is several times slower,
//! and without it the first run of a VM session pays for it), `--phases` (time and count
//! per executor call kind: map, cut-unmap, native unmap; the rest is the library's own).
//!
//! Workload (seeded, reproducible): a confidential guest boots all private, converts a
//! 64 MiB bounce-buffer pool to shared, then performs N random conversions of 4 KiB–2 MiB
//! (both directions, sizes log-uniform, 2 MiB-aligned 1 in 4 times).
//!
//! With `--real`, each strategy runs on a fresh IOAS with an edu device attached (needs
//! the test VM, as root).

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfio_gmem::dma::planning::{Backing, RegionSpec, Tracker};
use vfio_gmem::dma::{
    DmaSpace, FakeKernel, GuestRegion, PageState, SharedMemory, SpaceOptions, Stats, Strategy,
};

#[path = "bench_vm/devices.rs"]
mod devices;

const MIB: u64 = 1 << 20;
const LEN: u64 = 256 * MIB;
const GPA: u64 = 0x1_0000_0000;

/// xorshift64*: small, seeded, good enough for a workload generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// (gpa, len, to) steps after the initial all-private state.
fn workload(n: usize, granule: u64) -> Vec<(u64, u64, PageState)> {
    let mut rng = Rng(0x5eed_cafe);
    let mut steps = vec![(GPA, 64 * MIB, PageState::Shared)];
    for _ in 0..n {
        let pages = 1u64 << rng.below(10); // 4 KiB .. 2 MiB
        let len = (pages * 4096).max(granule);
        let align = if rng.below(4) == 0 {
            2 * MIB
        } else {
            granule.max(4096)
        };
        let gpa = GPA + (rng.below((LEN - len) / align) * align);
        let to = if rng.below(2) == 0 {
            PageState::Private
        } else {
            PageState::Shared
        };
        steps.push((gpa, len, to));
    }
    steps
}

struct Row {
    name: &'static str,
    /// Kernel calls: executor calls, plus one IOMMU_IOAS_SPLIT per cut-unmap that split
    /// an area when the native split serves them (split, then unmap; a cut-unmap of whole
    /// areas is the unmap alone). Counted from the executor's trace (see [`Phases`]).
    ioctls: u64,
    /// Leaf IOPTEs [4 KiB, 2 MiB, 1 GiB] after the run (VT-d debugfs), if readable.
    leaves: Option<[u64; 3]>,
    stats: Stats,
    peak_areas: usize,
    tracker: usize,
    secs: f64,
    /// With `--phases`: time and count per executor call kind (see [`Phases`]).
    phases: PhaseTimes,
}

/// Calls and time per executor call kind.
type PhaseTimes = BTreeMap<&'static str, (u64, Duration)>;

/// With `--phases`: the executor logs every kernel call it issued (target
/// `vfio_gmem::dma::exec`, debug) right after it returned; the time since the previous
/// call (or since the conversion started) is charged to the call's kind. It includes the
/// planning before the call, which the "(library)" line gets back: the conversion time
/// that no call accounts for. A native cut-unmap (split + unmap) is one executor call.
struct Phases {
    state: Mutex<(Option<Instant>, PhaseTimes)>,
}

static PHASES: Phases = Phases {
    state: Mutex::new((None, BTreeMap::new())),
};

impl Phases {
    /// A conversion starts now.
    fn mark(&self) {
        self.state.lock().unwrap().0 = Some(Instant::now());
    }
    fn take(&self) -> PhaseTimes {
        let mut s = self.state.lock().unwrap();
        s.0 = None;
        std::mem::take(&mut s.1)
    }
}

impl log::Log for Phases {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.target() == "vfio_gmem::dma::exec" && m.level() <= log::Level::Debug
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let now = Instant::now();
        let msg = r.args().to_string();
        let kind = if msg.starts_with("IOMMU map") {
            "map"
        } else if msg.starts_with("IOMMU unmap (Cut)") && msg.ends_with("(whole areas: no split)") {
            "unmap (cut, whole)"
        } else if msg.starts_with("IOMMU unmap (Cut)") {
            "unmap (cut)"
        } else if msg.starts_with("IOMMU unmap") {
            "unmap (native)"
        } else if msg.starts_with("KVM") {
            "attributes"
        } else {
            "other"
        };
        let mut s = self.state.lock().unwrap();
        if let Some(last) = s.0 {
            let e = s.1.entry(kind).or_default();
            e.0 += 1;
            e.1 += now - last;
        }
        s.0 = Some(now);
    }
    fn flush(&self) {}
}

fn run_fake(strategy: Strategy, n: usize) -> Row {
    let granule = 4096;
    let mut mem = Tracker::new();
    let mut k = FakeKernel::new();
    let spec = RegionSpec::new(GPA, LEN, Backing::Opaque(0))
        .strategy(strategy)
        .granule(granule)
        .initial(PageState::Private);
    mem.register(spec, &mut k).expect("register");
    let mut total = Stats::default();
    let t0 = Instant::now();
    for (gpa, len, to) in workload(n, granule) {
        total.accumulate(&mem.convert(gpa, len, to, &mut k).expect("convert"));
    }
    Row {
        name: name(strategy),
        ioctls: total.ioctls,
        leaves: None,
        stats: total,
        peak_areas: k.peak_areas(),
        tracker: mem.tracker_bytes(),
        secs: t0.elapsed().as_secs_f64(),
        phases: BTreeMap::new(),
    }
}

fn name(s: Strategy) -> &'static str {
    match s {
        Strategy::Cut => "library: cut-unmap (primary)",
        Strategy::PerGranule => "per-4KiB-page areas (QEMU/CH style)",
        Strategy::Whole => "whole",
    }
}

/// How the real run cuts: the library's choice (native split where the kernel has it),
/// the compat cut only, or per-4 KiB-page areas.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Native,
    Compat,
    PerPage,
}

fn run_real(mode: Mode, n: usize, hugetlb: bool) -> Row {
    use vfio_gmem::dma::CutSupport;
    use vfio_gmem::iommufd::Iommufd;
    use vfio_gmem::vfio::Device;
    let edu = devices::edu_devices()
        .unwrap_or_else(|e| panic!("{e}"))
        .swap_remove(0);
    let (cdev, bdf) = (edu.cdev, edu.bdf.to_string());
    let iommufd = Arc::new(Iommufd::open().expect("open /dev/iommu"));
    let strategy = if mode == Mode::PerPage {
        Strategy::PerGranule
    } else {
        Strategy::Cut
    };
    let options = SpaceOptions {
        conversions: true,
        force_strategy: Some(strategy),
        native_split: mode != Mode::Compat,
    };
    let mut space = DmaSpace::iommufd(&iommufd, None, options).expect("space");
    let dev = Device::open_cdev(&cdev).expect("open edu cdev");
    space.attach(&dev).expect("attach");
    let native = matches!(space.cut_support(), CutSupport::NativeSplit { .. });
    let name = match (mode, native) {
        (Mode::Native, true) => "native split (IOMMU_IOAS_SPLIT)",
        (Mode::Native, false) | (Mode::Compat, _) => "compat cut (VFIO_IOMMU_UNMAP_DMA)",
        (Mode::PerPage, _) => name(Strategy::PerGranule),
    };
    eprintln!("{name}: {:?}", space.cut_support());
    let memfd = if hugetlb {
        vfio_gmem::gmem::Memfd::hugetlb("churn", LEN).expect("hugetlb memfd (reserve huge pages)")
    } else {
        vfio_gmem::gmem::Memfd::new("churn", LEN).expect("memfd")
    };
    let fd = memfd.file().as_fd().try_clone_to_owned().expect("dup");
    space
        .add_region(
            GuestRegion::new(GPA, LEN, SharedMemory::File { fd, offset: 0 })
                .convertible(PageState::Private),
        )
        .expect("add region");
    let mut peak = 0;
    let t0 = Instant::now();
    PHASES.take();
    for (gpa, len, to) in workload(n, 4096) {
        PHASES.mark();
        space.convert(gpa, len, to, false).expect("convert");
        peak = peak.max(space.area_count());
    }
    let secs = t0.elapsed().as_secs_f64();
    let phases = PHASES.take();
    let stats = *space.totals();
    Row {
        name,
        ioctls: stats.ioctls
            + if native && strategy == Strategy::Cut {
                phases.get("unmap (cut)").map_or(0, |p| p.0)
            } else {
                0
            },
        leaves: vtd_leaves(&bdf),
        stats,
        peak_areas: peak,
        tracker: space.tracker_bytes(),
        secs,
        phases: if print_phases() {
            phases
        } else {
            PhaseTimes::new()
        },
    }
}

/// Leaf IOPTEs [4 KiB, 2 MiB, 1 GiB] of the domain attached to `bdf`, from VT-d's debugfs
/// page table dump (CONFIG_INTEL_IOMMU_DEBUGFS): one line per leaf, with its entries along
/// the walk after `|` (3 for a 1 GiB leaf of a 4-level table, 4 for 2 MiB, 5 for 4 KiB).
fn vtd_leaves(bdf: &str) -> Option<[u64; 3]> {
    let path = format!("/sys/kernel/debug/iommu/intel/{bdf}/domain_translation_struct");
    let dump = std::fs::read_to_string(path).ok()?;
    let mut n = [0u64; 3];
    for line in dump.lines() {
        if let Some((_, walk)) = line.split_once('|') {
            match walk.split_whitespace().count() {
                3 => n[2] += 1,
                4 => n[1] += 1,
                5 => n[0] += 1,
                _ => {}
            }
        }
    }
    Some(n)
}

/// Writes every free 2 MiB hugetlb page once (a hugetlb memfd as large as the free pool,
/// allocated, then closed), before any timed run. Under TCG the first write to a
/// guest-physical page since the VM booted is far slower than later ones (the host backs
/// guest RAM lazily), and hugetlb pages are zeroed when a mapping allocates them, so
/// without this the first run of a VM session pays for touching the pool. Returns the
/// seconds it took and the pages touched.
fn prefault_hugetlb_pool() -> (f64, u64) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let free = vfio_gmem::probe::free_huge_pages_2m(&meminfo).unwrap_or(0);
    if free == 0 {
        return (0.0, 0);
    }
    let t = Instant::now();
    let len = free * 2 * MIB;
    let pool = vfio_gmem::gmem::Memfd::hugetlb("churn-prefault", len).expect("hugetlb memfd");
    pool.allocate(0, len)
        .expect("allocate the free hugetlb pool");
    drop(pool);
    (t.elapsed().as_secs_f64(), free)
}

/// Whether `--phases` was given.
fn print_phases() -> bool {
    std::env::args().any(|a| a == "--phases")
}

/// The value after `flag`, if given.
fn arg(flag: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != flag).nth(1)
}

fn print_rows(rows: &[&Row]) {
    println!(
        "{:<38} {:>8} {:>8} {:>8} {:>10} {:>10} {:>8} {:>24}",
        "strategy",
        "ioctls",
        "calls",
        "maps",
        "peak areas",
        "tracker B",
        "seconds",
        "leaf IOPTEs 4K/2M/1G"
    );
    for r in rows {
        let leaves = r
            .leaves
            .map(|l| format!("{}/{}/{}", l[0], l[1], l[2]))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<38} {:>8} {:>8} {:>8} {:>10} {:>10} {:>8.3} {:>24}",
            r.name, r.ioctls, r.stats.ioctls, r.stats.maps, r.peak_areas, r.tracker, r.secs, leaves
        );
        let mut calls = Duration::ZERO;
        for (kind, (count, t)) in &r.phases {
            println!(
                "    {kind:<16} {count:>7} calls {:>9.3} s {:>9.1} us/call",
                t.as_secs_f64(),
                t.as_secs_f64() * 1e6 / *count as f64
            );
            calls += *t;
        }
        if !r.phases.is_empty() {
            println!(
                "    {:<16} {:>7}       {:>9.3} s",
                "(library)",
                "",
                r.secs - calls.as_secs_f64()
            );
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 0 {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

fn main() {
    let real = std::env::args().any(|a| a == "--real");
    let n: usize = arg("-n").and_then(|s| s.parse().ok()).unwrap_or(2000);
    let hugetlb = std::env::args().any(|a| a == "--hugetlb");
    // Real runs: which modes, in which order (round r starts r places further along the
    // list, so with 3 modes and 3 rounds each mode runs once first, second and last).
    let modes: Vec<Mode> = arg("--modes")
        .unwrap_or_else(|| "native,compat,perpage".into())
        .split(',')
        .map(|m| match m {
            "native" => Mode::Native,
            "compat" => Mode::Compat,
            "perpage" => Mode::PerPage,
            other => panic!("--modes: unknown mode {other} (native, compat, perpage)"),
        })
        .collect();
    let rounds: usize = arg("--rounds").and_then(|s| s.parse().ok()).unwrap_or(1);
    // The executor's trace counts the native splits (ioctls) whether or not the phases
    // are printed.
    log::set_logger(&PHASES).expect("logger");
    log::set_max_level(log::LevelFilter::Debug);
    println!(
        "{} kernel, 256 MiB region ({}), {n} random conversions of 4 KiB-2 MiB after a 64 MiB pool",
        if real { "real" } else { "fake" },
        if hugetlb {
            "2 MiB hugetlb memfd"
        } else {
            "memfd"
        }
    );
    if !real {
        let rows = [
            run_fake(Strategy::Cut, n),
            run_fake(Strategy::PerGranule, n),
        ];
        print_rows(&rows.iter().collect::<Vec<_>>());
        let (a, b) = (&rows[0], &rows[1]);
        println!(
            "ratio (per-page / library): ioctls {:.1}x, peak areas {:.1}x, time {:.1}x",
            b.ioctls as f64 / a.ioctls as f64,
            b.peak_areas as f64 / a.peak_areas as f64,
            b.secs / a.secs
        );
        return;
    }
    if hugetlb && std::env::args().any(|a| a == "--prefault") {
        let (secs, pages) = prefault_hugetlb_pool();
        println!("prefault: {pages} free 2 MiB hugetlb pages written once in {secs:.3} s");
    }
    let mut all: Vec<(usize, Row)> = Vec::new();
    for r in 0..rounds {
        let order: Vec<usize> = (0..modes.len()).map(|i| (i + r) % modes.len()).collect();
        println!("round {}", r + 1);
        let rows: Vec<(usize, Row)> = order
            .into_iter()
            .map(|i| (i, run_real(modes[i], n, hugetlb)))
            .collect();
        print_rows(&rows.iter().map(|(_, r)| r).collect::<Vec<_>>());
        all.extend(rows);
    }
    let med: Vec<f64> = (0..modes.len())
        .map(|i| {
            median(
                all.iter()
                    .filter(|(m, _)| *m == i)
                    .map(|(_, r)| r.secs)
                    .collect(),
            )
        })
        .collect();
    println!("median of {rounds} round(s), seconds:");
    for (i, m) in med.iter().enumerate() {
        let name = all.iter().find(|(j, _)| *j == i).expect("a run").1.name;
        println!(
            "    {name:<38} {m:>8.3}  ({:.2}x the first mode)",
            m / med[0]
        );
        let runs: Vec<&Row> = all
            .iter()
            .filter(|(j, _)| *j == i)
            .map(|(_, r)| r)
            .collect();
        let kinds: std::collections::BTreeSet<&str> =
            runs.iter().flat_map(|r| r.phases.keys().copied()).collect();
        for kind in kinds {
            let secs = |r: &&Row| r.phases.get(kind).map_or(0.0, |p| p.1.as_secs_f64());
            println!(
                "        {kind:<16} {:>8.3} s (median)",
                median(runs.iter().map(secs).collect())
            );
        }
    }
}
