//! Setup and conversion cost of a 1 GiB convertible region whose shared backing is one
//! 1 GiB huge page, against the same region on 512 pages of 2 MiB, on the real kernel
//! with an edu device attached (run in the test VM, as root):
//!
//! ```sh
//! cargo build --release --examples
//! scripts/vm-run --memory 4G --append hugepagesz=1G --append hugepages=1 -- sh -c \
//!     'echo 512 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages &&
//!      target/release/examples/hugetlb_1g --rounds 5'
//! ```
//!
//! Per round and page size (the order alternates by round): a fresh hugetlb memfd,
//! `allocate` of all of it (the kernel zeroes the huge pages: timed apart, it is the
//! page's cost, not the mapping's), then `DmaSpace::add_region` of the whole file (the
//! MAP_FILE probe and the MAP_FILE pin of 1 GiB: "setup"), then single conversions inside
//! a huge page: 4 KiB to private and back, 2 MiB (aligned) to private and back; then the
//! region is removed. The space (one, edu attached) picks its cut mechanism at attach:
//! the compat cut on plain 7.3 (IOAS with 4 KiB IOPTEs), the native split with huge pages
//! on the patched kernel under intel-iommu. Medians over the rounds are printed.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use vfio_gmem::dma::{DmaSpace, GuestRegion, PageState, SharedMemory, SpaceOptions};
use vfio_gmem::gmem::{HugePageSize, Memfd};
use vfio_gmem::iommufd::Iommufd;
use vfio_gmem::vfio::Device;

#[path = "bench_vm/devices.rs"]
mod devices;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const GPA: u64 = 0x1_0000_0000;

/// Milliseconds of each step, in order: allocate, setup, 4K private, 4K shared,
/// 2M private, 2M shared, teardown.
const STEPS: [&str; 7] = [
    "allocate (zero pages)",
    "setup (add_region)",
    "4 KiB -> private",
    "4 KiB -> shared",
    "2 MiB -> private",
    "2 MiB -> shared",
    "remove_region",
];

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn round(space: &mut DmaSpace, page: HugePageSize) -> Result<[f64; 7], String> {
    let mut out = [0.0; 7];
    let mem = Memfd::hugetlb_sized("hugetlb-1g-bench", GIB, page).map_err(|e| e.to_string())?;
    let t = Instant::now();
    mem.allocate(0, GIB).map_err(|e| e.to_string())?;
    out[0] = ms(t);
    let fd = mem
        .file()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    let id = space
        .add_region(
            GuestRegion::new(GPA, GIB, SharedMemory::File { fd, offset: 0 })
                .convertible(PageState::Shared),
        )
        .map_err(|e| e.to_string())?;
    out[1] = ms(t);
    // Inside a huge page of either size: 4 KiB in the middle of a 2 MiB block, and an
    // aligned 2 MiB block (a whole page of the 2 MiB backing, part of the 1 GiB page).
    let small = GPA + 300 * MIB + 3 * 4096;
    let big = GPA + 512 * MIB;
    for (i, (gpa, len, to)) in [
        (small, 4096, PageState::Private),
        (small, 4096, PageState::Shared),
        (big, 2 * MIB, PageState::Private),
        (big, 2 * MIB, PageState::Shared),
    ]
    .into_iter()
    .enumerate()
    {
        let t = Instant::now();
        space
            .convert(gpa, len, to, false)
            .map_err(|e| e.to_string())?;
        out[2 + i] = ms(t);
    }
    let t = Instant::now();
    space.remove_region(id).map_err(|e| e.to_string())?;
    out[6] = ms(t);
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut rounds = 5;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or("--rounds N")?
            }
            _ => {
                return Err(format!(
                    "unknown argument {a}; usage: hugetlb_1g [--rounds N]"
                ))
            }
        }
    }
    let edu = devices::edu_devices()?.swap_remove(0);
    let iommufd = Arc::new(Iommufd::open().map_err(|e| e.to_string())?);
    let mut space =
        DmaSpace::iommufd(&iommufd, None, SpaceOptions::default()).map_err(|e| e.to_string())?;
    let dev = Device::open_cdev(&edu.cdev).map_err(|e| e.to_string())?;
    space.attach(&dev).map_err(|e| e.to_string())?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "kernel {}, {}-iommu, cut: {:?}",
        kernel.trim(),
        std::env::var("VFIO_GMEM_IOMMU").unwrap_or_default(),
        space.cut_support()
    );
    let sizes = [HugePageSize::Size1G, HugePageSize::Size2M];
    let mut times: Vec<Vec<[f64; 7]>> = vec![Vec::new(), Vec::new()];
    for r in 0..rounds {
        for k in 0..2 {
            let i = (k + r) % 2; // alternate which size goes first
            times[i].push(round(&mut space, sizes[i])?);
        }
    }
    println!(
        "1 GiB region, {rounds} rounds, median ms: {:<24} {:>12} {:>12} {:>8}",
        "step", "1 GiB pages", "2 MiB pages", "ratio"
    );
    for (s, name) in STEPS.iter().enumerate() {
        let m: Vec<f64> = times
            .iter()
            .map(|t| median(t.iter().map(|r| r[s]).collect()))
            .collect();
        println!(
            "{:<24} {:>12.3} {:>12.3} {:>8.2}",
            name,
            m[0],
            m[1],
            m[0] / m[1]
        );
    }
    Ok(())
}
