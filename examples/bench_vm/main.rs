//! VM benchmarks: the library against raw ioctl loops and per-page mapping, measured side
//! by side in one run on the real kernel. Needs the test VM (root, /dev/iommu, /dev/kvm,
//! two edu devices); `scripts/bench` builds this in release mode and runs it there.
//!
//! ```sh
//! scripts/vm-run --memory 3G -- target/release/examples/bench_vm --json-stdout
//! scripts/vm-run -- target/release/examples/bench_vm --smoke
//! ```
//!
//! Options: `--smoke` (tiny sizes), `--rounds N` (overhead), `--conv-rounds N`, `--steps N`,
//! `--paired-rounds N`, `--paired-steps N`, `--only SECTIONS`,
//! `--json PATH` (write results), `--json-stdout` (print them between markers).
//!
//! Sections (`--only a,b`): `overhead` (library vs raw ioctl loop, per mapping path and
//! area size), `conversions` (churn: library cut, raw per-page baseline, library forced
//! per-granule), `setup` (1 GiB non-convertible gmem guest, one area vs per page),
//! `paired` (library cut and per-granule against raw replays of the ioctls they issue,
//! and the raw per-page loop: 9 paired rounds of 1000 conversions).
//! Absolute times under TCG mean little; the ratios within one run are the result.
//!
//! Every baseline is written here on the raw oracle (`tests/support/raw.rs`: the same
//! bindings, its own ioctl wrapper), never through the library's mapping code.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vfio_gmem::dma::planning::Op;
use vfio_gmem::dma::{
    DmaSpace, GuestRegion, PageState, SharedMemory, SpaceOptions, Stats, Strategy, PAGE_SIZE,
};
use vfio_gmem::gmem::{GmemFlags, KvmVm, Memfd, VmType};
use vfio_gmem::iommufd::{AreaRecord, Ioas, Iommufd};
use vfio_gmem::mapper::{Access, DmaMapper, Iova};
#[path = "../../tests/support/raw.rs"]
mod raw;
use raw::{self as sys, iommufd_uapi as iu, vfio_uapi as vu};
use vfio_gmem::vfio::{Container, Device, Group};

#[path = "../../benches/support/workload.rs"]
mod workload;

mod conversions;
mod devices;
mod overhead;
mod paired;
mod raw_loops;
mod report;
mod setup;
use conversions::*;
use devices::*;
use overhead::*;
use paired::*;
use raw_loops::*;
use report::*;
use setup::*;
use workload::{generate, Model, Shape, Step, GPA};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Where the overhead and setup benchmarks map (4 GiB: 1 GiB aligned, inside the
/// usable IOVA range of both emulated IOMMUs).
const IOVA: u64 = 0x1_0000_0000;

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

#[derive(Clone, Copy)]
struct Sizes {
    rounds: usize,
    /// (area, total) per case.
    cases: [(u64, u64); 3],
    conv: Shape,
    conv_rounds: usize,
    setup: u64,
    /// The `paired` section's workload and rounds.
    paired: Shape,
    paired_rounds: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let opt = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let smoke = flag("--smoke");
    let mut sz = if smoke {
        Sizes {
            rounds: 2,
            cases: [(4 * KIB, MIB), (2 * MIB, 8 * MIB), (16 * MIB, 16 * MIB)],
            conv: Shape::smoke(),
            conv_rounds: 1,
            setup: 16 * MIB,
            paired: Shape::smoke(),
            paired_rounds: 1,
        }
    } else {
        Sizes {
            rounds: 11,
            cases: [(4 * KIB, 64 * MIB), (2 * MIB, GIB), (GIB, GIB)],
            conv: Shape::full(2000),
            conv_rounds: 3,
            setup: GIB,
            paired: Shape::full(1000),
            paired_rounds: 9,
        }
    };
    if let Some(r) = opt("--rounds").and_then(|s| s.parse().ok()) {
        sz.rounds = r;
    }
    if let Some(r) = opt("--conv-rounds").and_then(|s| s.parse().ok()) {
        sz.conv_rounds = r;
    }
    if let Some(n) = opt("--steps").and_then(|s| s.parse().ok()) {
        sz.conv.steps = n;
    }
    if let Some(r) = opt("--paired-rounds").and_then(|s| s.parse().ok()) {
        sz.paired_rounds = r;
    }
    if let Some(n) = opt("--paired-steps").and_then(|s| s.parse().ok()) {
        sz.paired.steps = n;
    }
    let only = opt("--only").unwrap_or_else(|| "overhead,conversions,paired,setup".into());
    let want = |s: &str| only.split(',').any(|x| x == s);

    let run = || -> Res<Value> {
        let edus = edu_devices()?;
        eprintln!(
            "bench_vm: {} edu device(s): {}",
            edus.len(),
            edus.iter()
                .map(|e| format!("{} (group {})", e.bdf, e.group))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut out = json!({ "machine": machine(), "smoke": smoke });
        if want("overhead") {
            eprintln!("bench_vm: library overhead");
            out["overhead"] = Value::Array(overhead(&edus, &sz)?);
        }
        if want("conversions") {
            eprintln!("bench_vm: conversions");
            out["conversions"] = conversions(&edus, &sz)?;
        }
        if want("paired") {
            eprintln!("bench_vm: paired rounds against raw replays");
            out["paired"] = paired(&edus, &sz)?;
        }
        if want("setup") {
            eprintln!("bench_vm: whole-guest setup");
            out["setup"] = setup(&edus, &sz)?;
        }
        Ok(out)
    };
    match run() {
        Ok(v) => {
            print_tables(&v);
            if flag("--json-stdout") {
                // The guest may not be able to write to the host's tree: the runner
                // script cuts the JSON out of the output between these markers.
                println!("BENCH_JSON_BEGIN");
                println!("{}", serde_json::to_string(&v).unwrap());
                println!("BENCH_JSON_END");
            }
            if let Some(path) = opt("--json") {
                if let Some(dir) = Path::new(&path).parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                if let Err(e) = std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()) {
                    eprintln!("bench_vm: error: writing {path}: {e}");
                    std::process::exit(1);
                }
            }
        }
        Err(e) => {
            eprintln!("bench_vm: error: {e}");
            std::process::exit(1);
        }
    }
}
