//! Whole-guest setup of guest_memfd memory for a device: by fd+offset (the patched
//! kernel's `IOMMU_IOAS_MAP_FILE` of the guest_memfd) against by VA (mmap of the
//! guest_memfd, then `IOMMU_IOAS_MAP`, which faults every page in through GUP), on the
//! same kernel, in the same VM session. Run inside the test VM on the patched kernel
//! (`scripts/bench --gmem`); on plain 7.3 the fd+offset side is refused and reported so.
//!
//! Per side and round: a fresh guest_memfd (MMAP|INIT_SHARED) of `--size` bytes on a
//! default VM, mapped at a fixed IOVA of an IOAS with an edu device attached (so pages are
//! pinned at map time), timed from before the mmap (VA side) or the map (fd side) to the
//! map's return; then unmapped and closed, untimed. Also per side: minor page faults of
//! the process (getrusage) and page-table memory (VmPTE) while mapped. Rounds alternate
//! which side goes first; the ratio is the median of the per-round VA/fd time ratios.
//!
//!   bench_gmem_setup [--size BYTES] [--rounds N] [--json-stdout]

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use vfio_gmem::gmem::{GmemFlags, GuestMemfd, KvmVm, MappedMemory, VmType};
use vfio_gmem::iommufd::{Ioas, Iommufd};
use vfio_gmem::mapper::{Access, Iova};
use vfio_gmem::vfio::Device;

#[path = "bench_vm/devices.rs"]
mod devices;

const IOVA: u64 = 0x1_0000_0000;
type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The first edu device, bound to vfio-pci by the library's binder; its VFIO cdev path.
fn edu_cdev() -> Res<PathBuf> {
    Ok(devices::edu_devices()?.swap_remove(0).cdev)
}

fn minor_faults() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_minflt
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    FileOffset,
    Va,
}

struct Sample {
    secs: f64,
    faults: i64,
    pte_kib: u64,
}

fn one(side: Side, vm: &KvmVm, ioas: &Ioas, size: u64) -> Res<Sample> {
    let gmem: GuestMemfd = vm
        .create_guest_memfd(size, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
        .map_err(err("create guest_memfd"))?;
    let (f0, pte0) = (minor_faults(), status_kib("VmPTE"));
    let t = Instant::now();
    let mapping: Option<MappedMemory> = match side {
        Side::FileOffset => {
            ioas.map_file(Iova::Fixed(IOVA), gmem.as_fd(), 0, size, Access::READ_WRITE)
                .map_err(err("IOMMU_IOAS_MAP_FILE of the guest_memfd"))?;
            None
        }
        Side::Va => {
            let m = gmem.mmap().map_err(err("mmap guest_memfd"))?;
            // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
            // its IOAS/container gone, before the memory is).
            unsafe { ioas.map_user(Iova::Fixed(IOVA), m.addr(), size, Access::READ_WRITE) }
                .map_err(err("IOMMU_IOAS_MAP"))?;
            Some(m)
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let s = Sample {
        secs,
        faults: minor_faults() - f0,
        pte_kib: status_kib("VmPTE").saturating_sub(pte0),
    };
    ioas.unmap(IOVA, size).map_err(err("unmap"))?;
    drop(mapping);
    Ok(s)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn run(size: u64, rounds: usize) -> Res<Value> {
    let cdev = edu_cdev()?;
    let iommufd = Arc::new(Iommufd::open().map_err(err("open /dev/iommu"))?);
    let ioas = Ioas::new(&iommufd).map_err(err("IOAS"))?;
    let dev = Device::open_cdev(&cdev).map_err(err("open edu"))?;
    dev.bind_iommufd(iommufd.as_fd()).map_err(err("bind"))?;
    dev.attach(ioas.id()).map_err(err("attach"))?;
    let vm = KvmVm::create(VmType::Default).map_err(err("create VM"))?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();

    // The fd side may be refused (plain 7.3): say so instead of comparing.
    if let Err(e) = one(Side::FileOffset, &vm, &ioas, 2 << 20) {
        return Ok(json!({
            "kernel": release.trim(), "size": size,
            "fd_offset": format!("refused: {e}"),
        }));
    }
    let (mut fd, mut va, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let _ = one(Side::Va, &vm, &ioas, 2 << 20)?; // warm-up, both paths
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            [Side::FileOffset, Side::Va]
        } else {
            [Side::Va, Side::FileOffset]
        };
        let mut pair = [None, None];
        for side in order {
            let s = one(side, &vm, &ioas, size)?;
            pair[(side == Side::Va) as usize] = Some(s);
        }
        let [Some(f), Some(v)] = pair else {
            unreachable!()
        };
        ratios.push(v.secs / f.secs);
        fd.push(f);
        va.push(v);
    }
    let row = |v: &[Sample]| {
        json!({
            "median_s": median(v.iter().map(|s| s.secs).collect()),
            "minor_faults": median(v.iter().map(|s| s.faults as f64).collect()),
            "pte_kib": median(v.iter().map(|s| s.pte_kib as f64).collect()),
        })
    };
    Ok(json!({
        "kernel": release.trim(),
        "size": size,
        "rounds": rounds,
        "fd_offset": row(&fd),
        "va": row(&va),
        "ratio_time_va_over_fd": median(ratios),
    }))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .and_then(|s| s.parse::<u64>().ok())
    };
    let size = opt("--size").unwrap_or(1 << 30);
    let rounds = opt("--rounds").unwrap_or(5) as usize;
    match run(size, rounds) {
        Ok(v) => {
            if args.iter().any(|a| a == "--json-stdout") {
                println!("BENCH_JSON_BEGIN\n{v}\nBENCH_JSON_END");
            }
            println!("{}", serde_json::to_string_pretty(&v).unwrap());
        }
        Err(e) => {
            eprintln!("bench_gmem_setup: {e}");
            std::process::exit(1);
        }
    }
}
