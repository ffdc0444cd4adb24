//! Where the native split's time goes (issue 15's benchmark question), on the patched
//! kernel in the test VM with an edu device (bound to vfio-pci by the library's binder): the same 64 MiB of a 2 MiB
//! hugetlb memfd is mapped, cut and unmapped on a fresh IOAS with IOMMU huge pages on and
//! off, each phase timed apart:
//!
//! - map: one `IOMMU_IOAS_MAP_FILE` of 64 MiB;
//! - split: `IOMMU_IOAS_SPLIT` around one 4 KiB page in each of 32 distinct 2 MiB pages;
//! - unmap 4K: `IOMMU_IOAS_UNMAP` of those 32 pages (exact areas after the split);
//! - unmap all: the rest.
//!
//! With huge pages on, each split replaces a 2 MiB IOPTE by a 512-entry table (the cut);
//! with huge pages off the IOPTEs are 4 KiB already and the split only divides the area.
//! Rounds alternate the order of the two settings; medians are printed.
//!
//! ```sh
//! cargo build --release --example split_cost
//! scripts/vm-run --patched --edu 1 -- sh -c 'echo 64 > /proc/sys/vm/nr_hugepages &&
//!     target/release/examples/split_cost'
//! ```

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use vfio_gmem::iommufd::{Ioas, Iommufd};
use vfio_gmem::mapper::{Access, Iova};
use vfio_gmem::vfio::Device;

#[path = "bench_vm/devices.rs"]
mod devices;

const LEN: u64 = 64 << 20;
const IOVA: u64 = 1 << 32;
const CUTS: u64 = 32;
const ROUNDS: usize = 7;

/// Seconds per phase: map, split, unmap 4K, unmap all.
fn round(cdev: &Path, huge: bool) -> [f64; 4] {
    let iommufd = Arc::new(Iommufd::open().expect("open /dev/iommu"));
    let ioas = Ioas::new(&iommufd).expect("IOAS");
    ioas.set_huge_pages(huge).expect("huge pages option");
    let dev = Device::open_cdev(cdev).expect("open edu cdev");
    dev.bind_iommufd(iommufd.as_fd()).expect("bind");
    dev.attach(ioas.id()).expect("attach");
    let memfd = vfio_gmem::gmem::Memfd::hugetlb("split_cost", LEN)
        .expect("hugetlb memfd (reserve 2 MiB pages: nr_hugepages)");
    let t = Instant::now();
    ioas.map_file(
        Iova::Fixed(IOVA),
        memfd.file().as_fd(),
        0,
        LEN,
        Access::READ_WRITE,
    )
    .expect("map");
    let map = t.elapsed().as_secs_f64();
    // One 4 KiB page in each of CUTS distinct 2 MiB pages, at varying offsets.
    let pages: Vec<u64> = (0..CUTS)
        .map(|i| IOVA + i * (LEN / CUTS) + ((i * 37) % 512) * 4096)
        .collect();
    let t = Instant::now();
    for &p in &pages {
        ioas.split(p, 4096).expect("split");
    }
    let split = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for &p in &pages {
        ioas.unmap(p, 4096).expect("unmap 4K");
    }
    let unmap4k = t.elapsed().as_secs_f64();
    let t = Instant::now();
    ioas.unmap_all().expect("unmap all");
    let unmap_all = t.elapsed().as_secs_f64();
    dev.detach().expect("detach");
    [map, split, unmap4k, unmap_all]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let cdev = devices::edu_devices()
        .unwrap_or_else(|e| panic!("{e}"))
        .swap_remove(0)
        .cdev;
    let mut rows: [Vec<[f64; 4]>; 2] = [Vec::new(), Vec::new()];
    for r in 0..ROUNDS {
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for huge in order {
            rows[usize::from(huge)].push(round(&cdev, huge));
        }
    }
    println!(
        "64 MiB of a 2 MiB hugetlb memfd, {CUTS} cuts of 4 KiB, median of {ROUNDS} rounds (ms)"
    );
    println!("| IOMMU huge pages | map | split ×{CUTS} | unmap 4K ×{CUTS} | unmap all |");
    println!("|---|---|---|---|---|");
    for huge in [true, false] {
        let r = &rows[usize::from(huge)];
        let m = |i: usize| median(r.iter().map(|x| x[i]).collect()) * 1e3;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            if huge { "on" } else { "off" },
            m(0),
            m(1),
            m(2),
            m(3)
        );
    }
}
