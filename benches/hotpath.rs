//! The conversion hot path on the host, counted exactly (issue 16): instructions
//! (callgrind) and heap allocations (a counting global allocator) per conversion through
//! `DmaSpace`, on an executor that does nothing, so what is counted is the library's own
//! work outside the kernel calls.
//!
//! Method: each scenario runs in a child process of this binary under
//! `valgrind --tool=callgrind --toggle-collect=*hotpath_measured*`: set-up and warm-up
//! are not counted, only the calls inside `hotpath_measured` (and everything they call).
//! The allocator counts every `alloc`/`realloc` in the same window. Each scenario runs
//! twice, R and 2R rounds, and the difference divided by the operations of R rounds is
//! the figure reported: fixed costs (entering the window, first-use growth) cancel. Both
//! counts are
//! deterministic for a given build, so they are reported exactly and guarded by a budget
//! file (`benches/budget.json`): a scenario over its budget makes the run exit non-zero.
//!
//! Scenarios (steady state: every spot converted twice before counting starts):
//! - `raw_calls`: the baseline in the same run, the executor calls of one conversion
//!   issued directly with ops built beforehand (the floor: what any caller pays);
//! - `space_cut` / `space_granule`: `DmaSpace::convert` of one 8 KiB range (cut) or one
//!   64 KiB granule (per-granule), alternately to private and back, over 64 spots of a
//!   1 GiB region;
//! - `space_cut_64k_areas`: `space_cut` on a fragmented region (every fourth page
//!   private beforehand: 65,537 areas), the area map at scale;
//! - `space_cut_l<N>`: `space_cut` with N in-process conversion listeners that do
//!   nothing (`DmaSpace::add_listener`): the space's own cost of telling them;
//! - `tracker_cut`: the same through `Tracker::convert` (planner, driver, commit only);
//! - `batch_k<K>_<size>`: `DmaSpace::convert_batch` of K single-page ranges spread over
//!   a region of `size` (per batch): scaling in ranges touched vs region size;
//! - `register_<size>_<state>`: `add_region` + `remove_region` of a whole guest
//!   (nothing is touched: the executor maps nothing), per pair.
//!
//! ```sh
//! cargo bench --bench hotpath                                   # table + target/bench/hotpath.json
//! cargo bench --bench hotpath -- --budget benches/budget.json   # and the guard
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde_json::{json, Value};
use vfio_gmem::dma::planning::{
    AttributesOp, Backing, DiscardOp, MapOp, RegionSpec, Tracker, UnmapKind, UnmapOp,
};
use vfio_gmem::dma::{
    ConversionListener, ConversionRequest, DmaSpace, Executor, GuestRegion, ListenerError, OpError,
    PageState, RegionId, SharedMemory, SpaceOptions, Strategy, UserAddress, PAGE_SIZE,
};

/// Counts heap allocations (alloc, alloc_zeroed, realloc) of the whole process.
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to the system allocator unchanged; the counter is a
// relaxed atomic add.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        System.realloc(p, l, n)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// An executor that issues nothing and reports what the kernel would.
struct Null;

impl Executor for Null {
    fn map(&mut self, op: &MapOp) -> Result<(), OpError> {
        black_box(op);
        Ok(())
    }
    fn unmap(&mut self, op: &UnmapOp) -> Result<u64, OpError> {
        Ok(black_box(op).expected_bytes())
    }
    fn set_attributes(&mut self, op: &AttributesOp) -> Result<(), OpError> {
        black_box(op);
        Ok(())
    }
    fn discard(&mut self, op: &DiscardOp) -> Result<(), OpError> {
        black_box(op);
        Ok(())
    }
}

/// A conversion listener that does nothing (the cost measured is the space's).
struct Quiet;

impl ConversionListener for Quiet {
    fn name(&self) -> &str {
        "quiet"
    }
    fn release(&mut self, ranges: &[std::ops::Range<u64>]) -> Result<(), ListenerError> {
        black_box(ranges);
        Ok(())
    }
    fn grant(&mut self, ranges: &[std::ops::Range<u64>]) -> Result<(), ListenerError> {
        black_box(ranges);
        Ok(())
    }
}

const GPA: u64 = 0x1_0000_0000;
const GIB: u64 = 1 << 30;
const SPOTS: u64 = 64;

fn options(strategy: Strategy) -> SpaceOptions {
    SpaceOptions {
        force_strategy: Some(strategy),
        ..SpaceOptions::default()
    }
}

fn region(len: u64, initial: PageState, granule: Option<u64>) -> GuestRegion {
    // SAFETY: the space's executor does nothing with the address: nothing maps it.
    let shared = SharedMemory::Address {
        addr: unsafe { UserAddress::new(0x7f00_0000_0000) },
    };
    let r = GuestRegion::new(GPA, len, shared).convertible(initial);
    match granule {
        Some(g) => r.granule(g),
        None => r,
    }
}

/// What a scenario works on, set up before counting starts.
enum Work {
    Raw {
        ops: Vec<(UnmapOp, AttributesOp, AttributesOp, MapOp)>,
    },
    Space {
        space: DmaSpace,
        spots: Vec<u64>,
        len: u64,
    },
    Tracker {
        mem: Tracker,
        spots: Vec<u64>,
        len: u64,
    },
    Batch {
        space: DmaSpace,
        private: Vec<ConversionRequest>,
        shared: Vec<ConversionRequest>,
    },
    Register {
        space: DmaSpace,
        len: u64,
        initial: PageState,
    },
}

fn spots(region: u64, n: u64) -> Vec<u64> {
    (0..n).map(|i| GPA + i * (region / n)).collect()
}

/// Sets a scenario up and warms it (every spot converted twice).
fn setup(name: &str) -> (Work, u64) {
    let space = |strategy, len, granule| {
        let mut s = DmaSpace::with_executor(Box::new(Null), options(strategy));
        s.add_region(region(len, PageState::Shared, granule))
            .expect("add_region");
        s
    };
    let mut work = match name {
        "raw_calls" => Work::Raw {
            ops: spots(GIB, SPOTS)
                .into_iter()
                .map(|gpa| {
                    let map = MapOp {
                        region: RegionId(0),
                        backing: Backing::Opaque(0),
                        iova: gpa,
                        offset: gpa - GPA,
                        len: 2 * PAGE_SIZE,
                    };
                    let attrs = AttributesOp {
                        gpa,
                        len: 2 * PAGE_SIZE,
                        private: true,
                    };
                    let unmap = UnmapOp {
                        iova: gpa,
                        len: 2 * PAGE_SIZE,
                        kind: UnmapKind::Cut,
                        restore: vec![map.clone()],
                    };
                    (unmap, attrs, attrs.inverse(), map)
                })
                .collect(),
        },
        "space_cut" => Work::Space {
            space: space(Strategy::Cut, GIB, None),
            spots: spots(GIB, SPOTS),
            len: 2 * PAGE_SIZE,
        },
        "space_cut_64k_areas" => {
            // A fragmented guest: every fourth page private, 65,537 areas, before the
            // same conversions as space_cut (the area map's cost at scale).
            let mut s = space(Strategy::Cut, GIB, None);
            for page in (2..GIB / PAGE_SIZE).step_by(4) {
                s.convert(GPA + page * PAGE_SIZE, PAGE_SIZE, PageState::Private, false)
                    .expect("fragment");
            }
            Work::Space {
                space: s,
                spots: spots(GIB, SPOTS),
                len: 2 * PAGE_SIZE,
            }
        }
        _ if name.starts_with("space_cut_l") => {
            let n: usize = name["space_cut_l".len()..].parse().expect("listeners");
            let mut s = space(Strategy::Cut, GIB, None);
            for _ in 0..n {
                s.add_listener(Box::new(Quiet)).expect("add_listener");
            }
            Work::Space {
                space: s,
                spots: spots(GIB, SPOTS),
                len: 2 * PAGE_SIZE,
            }
        }
        "space_granule" => Work::Space {
            space: space(Strategy::PerGranule, GIB, Some(64 << 10)),
            spots: spots(GIB, SPOTS),
            len: 64 << 10,
        },
        "tracker_cut" => {
            let mut mem = Tracker::new();
            let spec = RegionSpec::new(GPA, GIB, Backing::Opaque(0));
            mem.register(spec, &mut Null).expect("register");
            Work::Tracker {
                mem,
                spots: spots(GIB, SPOTS),
                len: 2 * PAGE_SIZE,
            }
        }
        _ if name.starts_with("batch_k") => {
            let (k, size) = name["batch_k".len()..]
                .split_once('_')
                .expect("batch_k<K>_<size>");
            let k: u64 = k.parse().expect("K");
            let size = parse_size(size);
            let reqs = |to| {
                spots(size, k)
                    .into_iter()
                    .map(|gpa| ConversionRequest::new(gpa, PAGE_SIZE, to))
                    .collect()
            };
            Work::Batch {
                space: space(Strategy::Cut, size, None),
                private: reqs(PageState::Private),
                shared: reqs(PageState::Shared),
            }
        }
        _ if name.starts_with("register_") => {
            let (size, state) = name["register_".len()..]
                .split_once('_')
                .expect("size_state");
            Work::Register {
                space: DmaSpace::with_executor(Box::new(Null), options(Strategy::Cut)),
                len: parse_size(size),
                initial: if state == "private" {
                    PageState::Private
                } else {
                    PageState::Shared
                },
            }
        }
        _ => panic!("unknown scenario {name}"),
    };
    let per_round = round(&mut work);
    round(&mut work);
    (work, per_round)
}

fn parse_size(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().expect("size");
    match unit {
        "m" => n << 20,
        "g" => n << 30,
        _ => panic!("size {s}: use <n>m or <n>g"),
    }
}

/// One round of a scenario; returns how many operations it counts as.
fn round(work: &mut Work) -> u64 {
    match work {
        Work::Raw { ops } => {
            for (unmap, to_private, to_shared, map) in ops.iter() {
                Null.unmap(black_box(unmap)).expect("unmap");
                Null.set_attributes(black_box(to_private)).expect("attrs");
                Null.set_attributes(black_box(to_shared)).expect("attrs");
                Null.map(black_box(map)).expect("map");
            }
            2 * ops.len() as u64
        }
        Work::Space { space, spots, len } => {
            for &gpa in spots.iter() {
                for to in [PageState::Private, PageState::Shared] {
                    black_box(space.convert(gpa, *len, to, false).expect("convert"));
                }
            }
            2 * spots.len() as u64
        }
        Work::Tracker { mem, spots, len } => {
            for &gpa in spots.iter() {
                for to in [PageState::Private, PageState::Shared] {
                    black_box(mem.convert(gpa, *len, to, &mut Null).expect("convert"));
                }
            }
            2 * spots.len() as u64
        }
        Work::Batch {
            space,
            private,
            shared,
        } => {
            black_box(space.convert_batch(private).expect("batch"));
            black_box(space.convert_batch(shared).expect("batch"));
            2
        }
        Work::Register {
            space,
            len,
            initial,
        } => {
            let id = space
                .add_region(region(*len, *initial, None))
                .expect("add_region");
            black_box(space.remove_region(id).expect("remove_region"));
            1
        }
    }
}

/// The counted window: callgrind collects only inside this function.
#[inline(never)]
fn hotpath_measured(work: &mut Work, rounds: u64) -> u64 {
    let mut ops = 0;
    for _ in 0..rounds {
        ops += round(work);
    }
    ops
}

/// Child mode: set up, count, print one JSON line.
fn child(name: &str, rounds: u64) {
    // glibc raises its mmap threshold after freeing a large mmapped block, so from the
    // second registration on a 2 MiB bitmap would come from the heap and be zeroed by a
    // memset that the first one (fresh mmap, zero already) did not need: the count would
    // depend on allocation history. A fixed threshold keeps every large block mmapped.
    // SAFETY: mallopt only sets an allocator parameter; called before any counting, with
    // a valid parameter and value.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10) };
    let (mut work, _) = setup(name);
    let before = ALLOCS.load(Relaxed);
    let ops = hotpath_measured(&mut work, rounds);
    let allocs = ALLOCS.load(Relaxed) - before;
    // The steady state held: every spot is back to shared, one area around each.
    if let Work::Space { space, spots, .. } = &work {
        assert!(spots
            .iter()
            .all(|&g| space.page_state(g) == Some(PageState::Shared)));
    }
    println!("{}", json!({"ops": ops, "allocs": allocs}));
}

struct Args {
    /// Accepted for symmetry with scripts/bench; the counts take seconds either way.
    _smoke: bool,
    budget: Option<PathBuf>,
    out: PathBuf,
    only: Option<String>,
}

const SCENARIOS: &[&str] = &[
    "raw_calls",
    "space_cut",
    "space_cut_64k_areas",
    "space_cut_l1",
    "space_cut_l4",
    "space_granule",
    "tracker_cut",
    "batch_k1_256m",
    "batch_k4_256m",
    "batch_k16_256m",
    "batch_k64_256m",
    "batch_k16_16m",
    "batch_k16_1g",
    "batch_k16_64g",
    "register_1g_shared",
    "register_64g_shared",
    "register_1g_private",
    "register_64g_private",
];

/// Runs one scenario under callgrind; returns (instructions, ops, allocs).
fn measure(name: &str, rounds: u64, dir: &std::path::Path) -> (u64, u64, u64) {
    let out = dir.join(format!("callgrind.{name}.out"));
    let exe = std::env::current_exe().expect("current_exe");
    let res = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--toggle-collect=*hotpath_measured*",
            "--dump-instr=no",
        ])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(&exe)
        .args(["--child", name, &rounds.to_string()])
        .output()
        .unwrap_or_else(|e| {
            eprintln!("hotpath: cannot run valgrind ({e}); install it (apt-get install valgrind)");
            std::process::exit(2)
        });
    if !res.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&res.stderr));
        panic!("hotpath: scenario {name} failed under callgrind");
    }
    let line = String::from_utf8_lossy(&res.stdout);
    let v: Value =
        serde_json::from_str(line.trim().lines().last().unwrap_or("")).expect("child JSON");
    let text = std::fs::read_to_string(&out).expect("callgrind output");
    let ir = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
        })
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .expect("callgrind summary line");
    (
        ir,
        v["ops"].as_u64().unwrap(),
        v["allocs"].as_u64().unwrap(),
    )
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = argv.iter().position(|a| a == "--child") {
        child(&argv[i + 1], argv[i + 2].parse().expect("rounds"));
        return;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let mut args = Args {
        _smoke: false,
        budget: None,
        out: target.join("bench/hotpath.json"),
        only: None,
    };
    let mut it = argv.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smoke" => args._smoke = true,
            "--budget" => args.budget = it.next().map(PathBuf::from),
            "--out" => args.out = it.next().map(PathBuf::from).expect("--out PATH"),
            "--only" => args.only = it.next(),
            "--bench" => {}
            other => panic!("hotpath: unknown argument {other}"),
        }
    }
    let dir = args.out.parent().expect("out dir").to_path_buf();
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut rows = Vec::new();
    println!(
        "{:<22} {:>8} {:>14} {:>12} {:>10}",
        "scenario", "ops", "instr/op", "allocs/op", "vs raw"
    );
    let mut raw = None;
    for name in SCENARIOS {
        if matches!(&args.only, Some(o) if *name != "raw_calls" && !o.split(',').any(|x| x == *name))
        {
            continue;
        }
        // The same rounds in smoke runs: per-op counts include a little fixed cost
        // (first-use growth), so the budget compares like with like. Registration of
        // 64 GiB is the slow one under callgrind (a few seconds).
        let rounds = if name.starts_with("register_") { 1 } else { 5 };
        // Two runs, R and 2R rounds: the difference is the steady-state cost of R rounds
        // with every fixed cost (the window's own entry, first-use growth) cancelled.
        let (ir1, ops1, allocs1) = measure(name, rounds, &dir);
        let (ir2, ops2, allocs2) = measure(name, 2 * rounds, &dir);
        let (ir, ops, allocs) = (ir2 - ir1, ops2 - ops1, allocs2.saturating_sub(allocs1));
        let per = ir as f64 / ops as f64;
        let aper = allocs as f64 / ops as f64;
        if *name == "raw_calls" {
            raw = Some(per);
        }
        let ratio = raw.filter(|_| name.starts_with("space_") || name.starts_with("tracker_"));
        println!(
            "{:<22} {:>8} {:>14.1} {:>12.2} {:>10}",
            name,
            ops,
            per,
            aper,
            ratio
                .map(|r| format!("{:.1}x", per / r))
                .unwrap_or_default()
        );
        rows.push(json!({
            "name": name, "ops": ops, "instructions": ir, "allocs": allocs,
            "instructions_per_op": per, "allocs_per_op": aper,
        }));
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&rows).unwrap()).expect("write");
    println!("results: {}", args.out.display());
    if let Some(path) = &args.budget {
        std::process::exit(check_budget(path, &rows));
    }
}

/// Compares every row with its budget; returns the exit code.
fn check_budget(path: &std::path::Path, rows: &[Value]) -> i32 {
    let budget: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("budget file"))
        .expect("budget JSON");
    let mut over = Vec::new();
    for row in rows {
        let name = row["name"].as_str().unwrap();
        let Some(b) = budget.get(name) else { continue };
        for (key, limit) in [
            ("instructions_per_op", "instructions"),
            ("allocs_per_op", "allocs"),
        ] {
            let (Some(got), Some(max)) = (row[key].as_f64(), b[limit].as_f64()) else {
                continue;
            };
            if got > max {
                over.push(format!(
                    "{name}: {got:.1} {limit} per op, budget {max} ({})",
                    path.display()
                ));
            }
        }
    }
    if over.is_empty() {
        println!("hotpath: within budget ({})", path.display());
        0
    } else {
        eprintln!("hotpath: OVER BUDGET: the conversion hot path regressed:");
        for o in &over {
            eprintln!("  {o}");
        }
        eprintln!(
            "  find the new work with `valgrind --tool=callgrind` on the scenario (see \
             benches/hotpath.rs); raise the budget only for a reason written in the commit"
        );
        1
    }
}
