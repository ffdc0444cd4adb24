//! Conversion churn on a 256 MiB convertible region: how many ioctls and live IOMMU areas
//! the library's strategies need, against one 4 KiB area per shared page.
//!
//! ```sh
//! cargo run --release --example churn                     # fake kernel (host)
//! scripts/vm-run -- target/release/examples/churn --real  # the real kernel in the VM
//! ```
//!
//! Workload (seeded, reproducible): a confidential guest boots all private, converts a
//! 64 MiB bounce-buffer pool to shared, then performs N random conversions of 4 KiB–2 MiB
//! (both directions, sizes log-uniform, 2 MiB-aligned 1 in 4 times).
//!
//! With `--real`, each strategy runs on a fresh IOAS with an edu device attached (needs
//! the test VM, as root).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use vfio_gmem::dma::{
    Backing, DmaSpace, FakeKernel, GuestMemory, GuestRegion, PageState, RegionSpec, SharedMemory,
    SpaceOptions, Stats, Strategy,
};

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
    stats: Stats,
    peak_areas: usize,
    tracker: usize,
    secs: f64,
}

fn run_fake(strategy: Strategy, n: usize) -> Row {
    let granule = 4096;
    let mut mem = GuestMemory::new();
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
        stats: total,
        peak_areas: k.peak_areas(),
        tracker: mem.tracker_bytes(),
        secs: t0.elapsed().as_secs_f64(),
    }
}

fn name(s: Strategy) -> &'static str {
    match s {
        Strategy::Cut => "library: cut-unmap (primary)",
        Strategy::PerGranule => "per-4KiB-page areas (QEMU/CH style)",
        Strategy::Whole => "whole",
    }
}

fn run_real(strategy: Strategy, n: usize) -> Row {
    use vfio_gmem::iommufd::Iommufd;
    use vfio_gmem::vfio::Device;
    let bdf = find_edu().expect("no edu device bound to vfio-pci (run in the test VM)");
    let iommufd = Arc::new(Iommufd::open().expect("open /dev/iommu"));
    let options = SpaceOptions {
        conversions: true,
        force_strategy: Some(strategy),
    };
    let mut space = DmaSpace::iommufd(&iommufd, None, options).expect("space");
    let dev = Device::open_cdev(&bdf).expect("open edu cdev");
    space.attach(&dev).expect("attach");
    let memfd = vfio_gmem::gmem::Memfd::new("churn", LEN).expect("memfd");
    let fd = memfd.file().as_fd().try_clone_to_owned().expect("dup");
    space
        .add_region(
            GuestRegion::new(GPA, LEN, SharedMemory::File { fd, offset: 0 })
                .convertible(PageState::Private),
        )
        .expect("add region");
    let mut peak = 0;
    let t0 = Instant::now();
    for (gpa, len, to) in workload(n, 4096) {
        space.convert(gpa, len, to, false).expect("convert");
        peak = peak.max(space.area_count());
    }
    let secs = t0.elapsed().as_secs_f64();
    Row {
        name: name(strategy),
        stats: *space.totals(),
        peak_areas: peak,
        tracker: space.tracker_bytes(),
        secs,
    }
}

/// The cdev of the first edu device bound to vfio-pci.
fn find_edu() -> Option<String> {
    for e in std::fs::read_dir("/sys/bus/pci/devices").ok()?.flatten() {
        let p = e.path();
        let id = |f: &str| {
            std::fs::read_to_string(p.join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        if id("vendor") == "0x1234" && id("device") == "0x11e8" {
            if let Some(v) = std::fs::read_dir(p.join("vfio-dev")).ok()?.flatten().next() {
                return Some(format!(
                    "/dev/vfio/devices/{}",
                    v.file_name().to_string_lossy()
                ));
            }
        }
    }
    None
}

fn main() {
    let real = std::env::args().any(|a| a == "--real");
    let n: usize = std::env::args()
        .skip_while(|a| a != "-n")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let run = if real { run_real } else { run_fake };
    println!(
        "{} kernel, 256 MiB region, {n} random conversions of 4 KiB-2 MiB after a 64 MiB pool",
        if real { "real" } else { "fake" }
    );
    let rows = [run(Strategy::Cut, n), run(Strategy::PerGranule, n)];
    println!(
        "{:<38} {:>10} {:>10} {:>12} {:>12} {:>9}",
        "strategy", "ioctls", "maps", "peak areas", "tracker B", "seconds"
    );
    for r in &rows {
        println!(
            "{:<38} {:>10} {:>10} {:>12} {:>12} {:>9.3}",
            r.name, r.stats.ioctls, r.stats.maps, r.peak_areas, r.tracker, r.secs
        );
    }
    let (a, b) = (&rows[0], &rows[1]);
    println!(
        "ratio (per-page / library): ioctls {:.1}x, peak areas {:.1}x, time {:.1}x",
        b.stats.ioctls as f64 / a.stats.ioctls as f64,
        b.peak_areas as f64 / a.peak_areas as f64,
        b.secs / a.secs
    );
}
