//! VM benchmarks: the library against raw ioctl loops and per-page mapping, measured side
//! by side in one run on the real kernel. Needs the test VM (root, /dev/iommu, /dev/kvm,
//! two edu devices); `scripts/bench` builds this in release mode and runs it there.
//!
//! ```sh
//! scripts/vm-run --memory 3G -- target/release/examples/bench_vm --json-stdout
//! scripts/vm-run -- target/release/examples/bench_vm --smoke
//! ```
//!
//! Options: `--smoke` (tiny sizes), `--rounds N` (overhead), `--conv-rounds N`, `--steps N`, `--only SECTIONS`,
//! `--json PATH` (write results), `--json-stdout` (print them between markers).
//!
//! Sections (`--only a,b`): `overhead` (library vs raw ioctl loop, per mapping path and
//! area size), `conversions` (churn: library cut, raw per-page baseline, library forced
//! per-granule), `setup` (1 GiB non-convertible gmem guest, one area vs per page).
//! Absolute times under TCG mean little; the ratios within one run are the result.
//!
//! Every baseline is written here on `vfio_gmem::sys` (the same bindings and ioctl
//! wrappers the library uses), never through the library's mapping code.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vfio_gmem::dma::{
    DmaSpace, GuestRegion, Op, PageState, SharedMemory, SpaceOptions, Stats, Strategy, PAGE_SIZE,
};
use vfio_gmem::gmem::{GmemFlags, KvmVm, Memfd, VmType};
use vfio_gmem::iommufd::{AreaRecord, Ioas, Iommufd};
use vfio_gmem::mapper::{Access, DmaMapper, Iova};
use vfio_gmem::sys::{self, iommufd_uapi as iu, vfio_uapi as vu};
use vfio_gmem::vfio::{Container, Device, Group};

#[path = "../benches/support/workload.rs"]
mod workload;
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

// ---------------------------------------------------------------------------------------
// Devices

/// An edu device bound to vfio-pci.
struct Edu {
    bdf: String,
    cdev: String,
    group: u32,
}

/// Binds every edu device to vfio-pci (driver_override + drivers_probe) and returns them.
fn edu_devices() -> Res<Vec<Edu>> {
    let root = Path::new("/sys/bus/pci/devices");
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(root)
        .map_err(err("reading /sys/bus/pci/devices"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let read = |f: &str| {
            std::fs::read_to_string(p.join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        if read("vendor") != "0x1234" || read("device") != "0x11e8" {
            continue;
        }
        let bdf = p.file_name().unwrap().to_string_lossy().to_string();
        let driver = std::fs::read_link(p.join("driver"))
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().to_string()));
        if driver.as_deref() != Some("vfio-pci") {
            if driver.is_some() {
                std::fs::write(p.join("driver/unbind"), &bdf).map_err(err("unbind"))?;
            }
            std::fs::write(p.join("driver_override"), "vfio-pci")
                .map_err(err("writing driver_override"))?;
            std::fs::write("/sys/bus/pci/drivers_probe", &bdf).map_err(err("drivers_probe"))?;
        }
        let group = std::fs::read_link(p.join("iommu_group"))
            .map_err(err("reading iommu_group"))?
            .file_name()
            .and_then(|n| n.to_str()?.parse().ok())
            .ok_or("bad iommu_group link")?;
        // The cdev appears asynchronously after the bind.
        let mut cdev = None;
        for _ in 0..100 {
            if let Some(v) = std::fs::read_dir(p.join("vfio-dev"))
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok())
            {
                let path = format!("/dev/vfio/devices/{}", v.file_name().to_string_lossy());
                if Path::new(&path).exists() {
                    cdev = Some(path);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let cdev = cdev.ok_or(format!("{bdf}: no VFIO cdev after binding to vfio-pci"))?;
        out.push(Edu { bdf, cdev, group });
    }
    if out.is_empty() {
        return Err(
            "no edu device (vendor 0x1234, device 0x11e8): run inside the test VM (scripts/vm-run)"
                .into(),
        );
    }
    Ok(out)
}

/// A fresh iommufd with `edu` bound and attached to `ioas` built by `make`.
fn attach_new(edu: &Edu, ioas: &Ioas) -> Res<Device> {
    let dev = Device::open_cdev(&edu.cdev).map_err(err("opening the edu cdev"))?;
    dev.bind_iommufd(ioas.iommufd().as_fd())
        .map_err(err("VFIO_DEVICE_BIND_IOMMUFD"))?;
    dev.attach(ioas.id())
        .map_err(err("VFIO_DEVICE_ATTACH_IOMMUFD_PT"))?;
    Ok(dev)
}

// ---------------------------------------------------------------------------------------
// Raw ioctl loops (the baseline): the kernel's own cost, nothing else.

const RW: u32 = iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
    | iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
    | iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;

fn raw_map_file(
    iommufd: BorrowedFd,
    ioas: u32,
    fd: i32,
    off: u64,
    iova: u64,
    len: u64,
) -> io::Result<()> {
    let mut m: iu::iommu_ioas_map_file = sys::zeroed();
    m.size = size_of_val(&m) as u32;
    m.flags = RW;
    m.ioas_id = ioas;
    m.fd = fd;
    m.start = off;
    m.length = len;
    m.iova = iova;
    sys::ioctl_mut(iommufd, sys::IOMMU_IOAS_MAP_FILE, &mut m).map(drop)
}

fn raw_map_va(iommufd: BorrowedFd, ioas: u32, va: u64, iova: u64, len: u64) -> io::Result<()> {
    let mut m: iu::iommu_ioas_map = sys::zeroed();
    m.size = size_of_val(&m) as u32;
    m.flags = RW;
    m.ioas_id = ioas;
    m.user_va = va;
    m.length = len;
    m.iova = iova;
    sys::ioctl_mut(iommufd, sys::IOMMU_IOAS_MAP, &mut m).map(drop)
}

fn raw_unmap(iommufd: BorrowedFd, ioas: u32, iova: u64, len: u64) -> io::Result<u64> {
    let mut u: iu::iommu_ioas_unmap = sys::zeroed();
    u.size = size_of_val(&u) as u32;
    u.ioas_id = ioas;
    u.iova = iova;
    u.length = len;
    sys::ioctl_mut(iommufd, sys::IOMMU_IOAS_UNMAP, &mut u).map(|_| u.length)
}

fn raw_type1_map(container: BorrowedFd, va: u64, iova: u64, len: u64) -> io::Result<()> {
    let mut m: vu::vfio_iommu_type1_dma_map = sys::zeroed();
    m.argsz = size_of_val(&m) as u32;
    m.flags = vu::VFIO_DMA_MAP_FLAG_READ | vu::VFIO_DMA_MAP_FLAG_WRITE;
    m.vaddr = va;
    m.iova = iova;
    m.size = len;
    sys::ioctl_mut(container, sys::VFIO_IOMMU_MAP_DMA, &mut m).map(drop)
}

fn raw_type1_unmap(container: BorrowedFd, iova: u64, len: u64) -> io::Result<u64> {
    let mut u: vu::vfio_iommu_type1_dma_unmap = sys::zeroed();
    u.argsz = size_of_val(&u) as u32;
    u.iova = iova;
    u.size = len;
    sys::ioctl_mut(container, sys::VFIO_IOMMU_UNMAP_DMA, &mut u).map(|_| u.size)
}

// ---------------------------------------------------------------------------------------
// Library overhead

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One side (library or raw) of an overhead case: maps `len` bytes from byte `offset` of
/// the memory at an IOVA, and unmaps.
struct Side<'a> {
    map: Box<dyn Fn(u64, u64, u64) -> Res<()> + 'a>,
    unmap: Box<dyn Fn(u64, u64) -> Res<u64> + 'a>,
}

/// Where the sides map: 4 GiB and 8 GiB (both windows hold up to 1 GiB and are live at
/// the same time); the sides swap windows every round.
const WINDOW: [u64; 2] = [IOVA, 2 * IOVA];

/// One round: both sides map `n` areas of `area` bytes (area `i` from byte `i*area` of
/// the memory), then unmap them. The work is interleaved in chunks of `chunk` areas,
/// library and raw taking turns (and turns at going first), so that drift from the
/// host (TCG, other jobs on the same cores) hits both sides alike; `swap` swaps their IOVA
/// windows. Returns seconds: [map, unmap] for [library, raw].
#[allow(clippy::needless_range_loop)] // phase indexes both the times and the op kind
fn round(sides: [&Side; 2], area: u64, n: u64, chunk: u64, swap: bool) -> Res<[[f64; 2]; 2]> {
    let mut t = [[0f64; 2]; 2];
    for phase in 0..2 {
        let mut c = 0;
        while c * chunk < n {
            let order = if c % 2 == 0 { [0, 1] } else { [1, 0] };
            for s in order {
                let start = Instant::now();
                for i in c * chunk..((c + 1) * chunk).min(n) {
                    let iova = WINDOW[s ^ usize::from(swap)] + i * area;
                    if phase == 0 {
                        (sides[s].map)(iova, i * area, area)?;
                    } else {
                        let got = (sides[s].unmap)(iova, area)?;
                        if got != area {
                            return Err(format!(
                                "unmap of area {i} returned {got} bytes, not {area}"
                            ));
                        }
                    }
                }
                t[s][phase] += start.elapsed().as_secs_f64();
            }
            c += 1;
        }
    }
    Ok(t)
}

#[derive(Clone, Copy)]
struct Sizes {
    rounds: usize,
    /// (area, total) per case.
    cases: [(u64, u64); 3],
    conv: Shape,
    conv_rounds: usize,
    setup: u64,
}

/// Runs one unmeasured warm-up round and `rounds` measured ones; the ratios are the
/// medians of the per-round library/raw ratios (rounds are paired in time).
fn compare(path: &str, lib: &Side, raw: &Side, area: u64, total: u64, rounds: usize) -> Res<Value> {
    let n = total / area;
    // About 1-2 ms of raw work per chunk under TCG.
    let chunk = (256 * KIB / area).clamp(1, 64);
    round([lib, raw], area, n, chunk, false)?;
    let mut samples = Vec::new();
    for r in 0..rounds {
        samples.push(round([lib, raw], area, n, chunk, r % 2 == 1)?);
    }
    let col = |f: &dyn Fn(&[[f64; 2]; 2]) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let lm = col(&|t| t[0][0]);
    let lu = col(&|t| t[0][1]);
    let rm = col(&|t| t[1][0]);
    let ru = col(&|t| t[1][1]);
    let ratio_map = median(&col(&|t| t[0][0] / t[1][0]));
    let ratio_unmap = median(&col(&|t| t[0][1] / t[1][1]));
    let ratio_total = median(&col(&|t| (t[0][0] + t[0][1]) / (t[1][0] + t[1][1])));
    let lt = col(&|t| t[0][0] + t[0][1]);
    let rt = col(&|t| t[1][0] + t[1][1]);
    let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let row = json!({
        "path": path,
        "area_bytes": area,
        "total_bytes": total,
        "areas": n,
        "rounds": rounds,
        "chunk": chunk,
        "lib_map_s": median(&lm), "raw_map_s": median(&rm),
        "lib_unmap_s": median(&lu), "raw_unmap_s": median(&ru),
        "lib_total_s": median(&lt), "raw_total_s": median(&rt),
        "ratio_map": ratio_map,
        "ratio_unmap": ratio_unmap,
        "ratio_total": ratio_total,
        "ratio_total_of_minima": min(&lt) / min(&rt),
        "raw_us_per_op": median(&rt) * 1e6 / (2 * n) as f64,
        "lib_extra_us_per_op": (median(&lt) - median(&rt)) * 1e6 / (2 * n) as f64,
        "samples": {"lib_map": lm, "lib_unmap": lu, "raw_map": rm, "raw_unmap": ru},
    });
    eprintln!(
        "  {path:<22} {:>7} x{n:<6} lib/raw map {:.3} unmap {:.3} total {:.3} (of minima {:.3})",
        size(area),
        ratio_map,
        ratio_unmap,
        ratio_total,
        min(&lt) / min(&rt)
    );
    Ok(row)
}

fn overhead(edus: &[Edu], sz: &Sizes) -> Res<Vec<Value>> {
    let mut rows = Vec::new();
    let max_total = sz.cases.iter().map(|c| c.1).max().unwrap();
    let access = Access::READ_WRITE;

    // iommufd: one IOAS with the device attached, default options (huge pages on), once
    // with the IOAS's area record (the default) and once without.
    for (record, tag) in [(AreaRecord::Kept, ""), (AreaRecord::Off, ", record off")] {
        let iommufd = Arc::new(Iommufd::open().map_err(err("open /dev/iommu"))?);
        let ioas = Ioas::with_record(&iommufd, record).map_err(err("IOAS"))?;
        let _dev = attach_new(&edus[0], &ioas)?;
        let fdi = iommufd.as_fd();
        let id = ioas.id();

        let memfd = Memfd::new("bench-overhead", max_total).map_err(err("memfd"))?;
        memfd
            .allocate(0, max_total)
            .map_err(err("memfd allocate"))?;
        {
            let mfd = memfd.as_fd();
            let lib = Side {
                map: Box::new(|iova, off, len| {
                    ioas.map_file(Iova::Fixed(iova), mfd, off, len, access)
                        .map(drop)
                        .map_err(|e| e.to_string())
                }),
                unmap: Box::new(|iova, len| ioas.unmap(iova, len).map_err(|e| e.to_string())),
            };
            let raw = Side {
                map: Box::new(|iova, off, len| {
                    raw_map_file(fdi, id, mfd.as_raw_fd(), off, iova, len)
                        .map_err(err("raw MAP_FILE"))
                }),
                unmap: Box::new(|iova, len| {
                    raw_unmap(fdi, id, iova, len).map_err(err("raw UNMAP"))
                }),
            };
            for &(area, total) in &sz.cases {
                rows.push(compare(
                    &format!("iommufd MAP_FILE memfd{tag}"),
                    &lib,
                    &raw,
                    area,
                    total,
                    sz.rounds,
                )?);
            }
        }
        {
            let mapping = memfd.mmap().map_err(err("memfd mmap"))?;
            let (lib, raw) = va_sides(&ioas, fdi, id, mapping.addr());
            for &(area, total) in &sz.cases {
                rows.push(compare(
                    &format!("iommufd VA memfd{tag}"),
                    &lib,
                    &raw,
                    area,
                    total,
                    sz.rounds,
                )?);
            }
        }
        drop(memfd);

        let vm = KvmVm::create(VmType::Default).map_err(err("KVM VM"))?;
        let gmem = vm
            .create_guest_memfd(max_total, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
            .map_err(err("guest_memfd"))?;
        gmem.allocate(0, max_total).map_err(err("gmem allocate"))?;
        let mapping = gmem.mmap().map_err(err("gmem mmap"))?;
        let (lib, raw) = va_sides(&ioas, fdi, id, mapping.addr());
        for &(area, total) in &sz.cases {
            rows.push(compare(
                &format!("iommufd VA gmem{tag}"),
                &lib,
                &raw,
                area,
                total,
                sz.rounds,
            )?);
        }
    }

    // Legacy type1 container (VA only), on the second edu device's group.
    {
        let edu = edus.get(1).unwrap_or(&edus[0]);
        let container = Container::open().map_err(err("legacy container"))?;
        let group = Group::open(edu.group).map_err(err("legacy group"))?;
        container
            .add_group(&group)
            .map_err(err("legacy add_group"))?;
        let memfd = Memfd::new("bench-overhead-type1", max_total).map_err(err("memfd"))?;
        memfd
            .allocate(0, max_total)
            .map_err(err("memfd allocate"))?;
        let mapping = memfd.mmap().map_err(err("memfd mmap"))?;
        let va = mapping.addr();
        let cfd = container.as_fd();
        let lib = Side {
            map: Box::new(|iova, off, len| {
                container
                    .map_user(Iova::Fixed(iova), va + off, len, access)
                    .map(drop)
                    .map_err(|e| e.to_string())
            }),
            unmap: Box::new(|iova, len| {
                DmaMapper::unmap(&container, iova, len).map_err(|e| e.to_string())
            }),
        };
        let raw = Side {
            map: Box::new(|iova, off, len| {
                raw_type1_map(cfd, va + off, iova, len).map_err(err("raw MAP_DMA"))
            }),
            unmap: Box::new(|iova, len| {
                raw_type1_unmap(cfd, iova, len).map_err(err("raw UNMAP_DMA"))
            }),
        };
        for &(area, total) in &sz.cases {
            rows.push(compare(
                "type1 VA memfd",
                &lib,
                &raw,
                area,
                total,
                sz.rounds,
            )?);
        }
    }
    Ok(rows)
}

fn va_sides<'a>(ioas: &'a Ioas, fdi: BorrowedFd<'a>, id: u32, va: u64) -> (Side<'a>, Side<'a>) {
    let access = Access::READ_WRITE;
    (
        Side {
            map: Box::new(move |iova, off, len| {
                ioas.map_user(Iova::Fixed(iova), va + off, len, access)
                    .map(drop)
                    .map_err(|e| e.to_string())
            }),
            unmap: Box::new(move |iova, len| ioas.unmap(iova, len).map_err(|e| e.to_string())),
        },
        Side {
            map: Box::new(move |iova, off, len| {
                raw_map_va(fdi, id, va + off, iova, len).map_err(err("raw MAP"))
            }),
            unmap: Box::new(move |iova, len| {
                raw_unmap(fdi, id, iova, len).map_err(err("raw UNMAP"))
            }),
        },
    )
}

// ---------------------------------------------------------------------------------------
// Conversions

#[derive(Clone)]
struct ConvRow {
    name: &'static str,
    iommu_ioctls: u64,
    maps: u64,
    unmaps: u64,
    peak_areas: usize,
    final_areas: usize,
    secs: f64,
    /// Seconds in steps to shared (maps) and to private (unmaps).
    dir_secs: [f64; 2],
    /// Seconds spent planning (library rows), included in `secs`.
    plan_secs: Option<f64>,
    tracker_bytes: Option<usize>,
    unmap_ops_checked: u64,
    transient_unmaps: u64,
}

impl ConvRow {
    fn json(&self) -> Value {
        json!({
            "name": self.name, "iommu_ioctls": self.iommu_ioctls, "maps": self.maps,
            "unmaps": self.unmaps, "peak_areas": self.peak_areas,
            "final_areas": self.final_areas, "seconds": self.secs,
            "plan_seconds": self.plan_secs,
            "to_shared_seconds": self.dir_secs[0], "to_private_seconds": self.dir_secs[1],
            "tracker_bytes": self.tracker_bytes, "unmap_ops_checked": self.unmap_ops_checked,
            "transient_unmaps": self.transient_unmaps,
        })
    }
}

/// The library on a fresh iommufd: every step through `DmaSpace::convert`; before each
/// step the exact plan the space is about to execute is inspected, and every unmap it
/// contains must cover only pages that are private once the step is done.
fn conv_library(edu: &Edu, shape: &Shape, steps: &[Step], strategy: Strategy) -> Res<ConvRow> {
    let iommufd = Arc::new(Iommufd::open().map_err(err("open /dev/iommu"))?);
    let options = SpaceOptions {
        conversions: true,
        force_strategy: Some(strategy),
    };
    let mut space = DmaSpace::iommufd(&iommufd, None, options).map_err(err("DmaSpace"))?;
    let dev = Device::open_cdev(&edu.cdev).map_err(err("opening the edu cdev"))?;
    space.attach(&dev).map_err(err("attach"))?;
    if strategy == Strategy::Cut {
        if let vfio_gmem::dma::CutSupport::Unavailable(why) = space.cut_support() {
            return Err(format!("cut unavailable: {why}"));
        }
    }
    let memfd = Memfd::new("bench-churn", shape.region).map_err(err("memfd"))?;
    memfd
        .allocate(0, shape.region)
        .map_err(err("memfd allocate"))?;
    let fd = memfd.as_fd().try_clone_to_owned().map_err(err("dup"))?;
    space
        .add_region(
            GuestRegion::new(GPA, shape.region, SharedMemory::File { fd, offset: 0 })
                .convertible(PageState::Private),
        )
        .map_err(err("add_region"))?;
    let before = *space.totals();
    let mut model = Model::new(shape);
    let (mut peak, mut checked, mut transient) = (0, 0u64, 0u64);
    let (mut elapsed, mut planning) = (Duration::ZERO, Duration::ZERO);
    let mut by_dir = [Duration::ZERO; 2];
    for s in steps {
        // The same call the space makes inside `convert`: timing it tells how much of
        // the library's time is planning (user space) rather than ioctls.
        let t = Instant::now();
        let plan = space
            .memory()
            .plan_convert(s.gpa, s.len, s.to)
            .map_err(err("plan"))?;
        planning += t.elapsed();
        let t = Instant::now();
        let stats = space
            .convert(s.gpa, s.len, s.to, false)
            .map_err(err("convert"))?;
        let dt = t.elapsed();
        elapsed += dt;
        by_dir[(s.to == PageState::Private) as usize] += dt;
        model.apply(s);
        let mut unmaps = 0;
        for op in plan.ops() {
            if let Op::Unmap(u) = op {
                unmaps += 1;
                checked += 1;
                if !model.all_private(u.iova, u.len) {
                    transient += 1;
                }
            }
        }
        if stats.unmaps != unmaps {
            return Err(format!(
                "the space issued {} unmaps, the inspected plan has {unmaps}",
                stats.unmaps
            ));
        }
        peak = peak.max(space.area_count());
    }
    let t: Stats = *space.totals();
    if t.unmap_size_mismatches != 0 {
        return Err(format!(
            "{} unmaps removed other byte counts than planned",
            t.unmap_size_mismatches
        ));
    }
    let calls = t.ioctls - before.ioctls;
    let (maps, unmaps) = (t.maps - before.maps, t.unmaps - before.unmaps);
    let other = (t.attribute_changes - before.attribute_changes) + (t.discards - before.discards);
    if calls != maps + unmaps + other {
        return Err(format!(
            "{calls} calls but {maps} maps + {unmaps} unmaps + {other} other: some failed"
        ));
    }
    // The tracker must agree with the model: mapped bytes = shared bytes.
    let shared: u64 = space.regions().iter().map(|r| r.shared_bytes).sum();
    if shared != model.shared_pages() * PAGE_SIZE {
        return Err("tracker and model disagree on shared pages".into());
    }
    let row = ConvRow {
        name: match strategy {
            Strategy::Cut => "library cut",
            _ => "library per-granule (forced)",
        },
        iommu_ioctls: maps + unmaps,
        maps,
        unmaps,
        peak_areas: peak,
        final_areas: space.area_count(),
        secs: elapsed.as_secs_f64(),
        dir_secs: [by_dir[0].as_secs_f64(), by_dir[1].as_secs_f64()],
        plan_secs: Some(planning.as_secs_f64()),
        tracker_bytes: Some(space.tracker_bytes()),
        unmap_ops_checked: checked,
        transient_unmaps: transient,
    };
    drop(dev);
    Ok(row)
}

/// The QEMU / cloud-hypervisor strategy on raw ioctls: one 4 KiB area per shared page,
/// mapped page by page when a range turns shared, unmapped one run of shared pages at a
/// time when it turns private (a native unmap removes every page area in the run).
fn conv_per_page(edu: &Edu, shape: &Shape, steps: &[Step]) -> Res<ConvRow> {
    let iommufd = Arc::new(Iommufd::open().map_err(err("open /dev/iommu"))?);
    let ioas = Ioas::new(&iommufd).map_err(err("IOAS"))?;
    let dev = attach_new(edu, &ioas)?;
    let memfd = Memfd::new("bench-churn-raw", shape.region).map_err(err("memfd"))?;
    memfd
        .allocate(0, shape.region)
        .map_err(err("memfd allocate"))?;
    let (fdi, id, mfd) = (iommufd.as_fd(), ioas.id(), memfd.as_raw_fd());
    let mut model = Model::new(shape);
    let (mut maps, mut unmaps, mut areas, mut peak) = (0u64, 0u64, 0usize, 0usize);
    let mut elapsed = Duration::ZERO;
    let mut by_dir = [Duration::ZERO; 2];
    for s in steps {
        let t = Instant::now();
        match s.to {
            PageState::Shared => {
                for (gpa, len) in model.runs(s.gpa, s.len, false) {
                    for p in (gpa..gpa + len).step_by(PAGE_SIZE as usize) {
                        raw_map_file(fdi, id, mfd, p - GPA, p, PAGE_SIZE)
                            .map_err(err("per-page MAP_FILE"))?;
                        maps += 1;
                        areas += 1;
                    }
                }
            }
            PageState::Private => {
                for (gpa, len) in model.runs(s.gpa, s.len, true) {
                    let n = raw_unmap(fdi, id, gpa, len).map_err(err("per-page UNMAP"))?;
                    if n != len {
                        return Err(format!("run unmap removed {n} bytes, not {len}"));
                    }
                    unmaps += 1;
                    areas -= (len / PAGE_SIZE) as usize;
                }
            }
        }
        let dt = t.elapsed();
        elapsed += dt;
        by_dir[(s.to == PageState::Private) as usize] += dt;
        model.apply(s);
        peak = peak.max(areas);
    }
    drop(dev);
    Ok(ConvRow {
        name: "per-page baseline (raw)",
        iommu_ioctls: maps + unmaps,
        maps,
        unmaps,
        peak_areas: peak,
        final_areas: areas,
        secs: elapsed.as_secs_f64(),
        dir_secs: [by_dir[0].as_secs_f64(), by_dir[1].as_secs_f64()],
        plan_secs: None,
        tracker_bytes: None,
        unmap_ops_checked: 0,
        transient_unmaps: 0,
    })
}

/// The kernel's own cost per 4 KiB page, on raw ioctls, for `len` bytes of a memfd:
/// mapped as one area and unmapped, versus mapped page by page and unmapped in one call
/// (the baseline's shape), on an IOAS with huge pages on (default) and off (what the
/// cut strategy needs). Medians of 3 rounds after a warm-up. Any strategy mapping the
/// same pages pays at least the bulk cost per page, which bounds the time ratio.
fn kernel_page_costs(edu: &Edu, len: u64) -> Res<Value> {
    let mut out = json!({});
    for huge in [true, false] {
        let iommufd = Arc::new(Iommufd::open().map_err(err("open /dev/iommu"))?);
        let ioas = Ioas::new(&iommufd).map_err(err("IOAS"))?;
        if !huge {
            ioas.set_huge_pages(false).map_err(err("huge pages off"))?;
        }
        let dev = attach_new(edu, &ioas)?;
        let memfd = Memfd::new("bench-page-cost", len).map_err(err("memfd"))?;
        memfd.allocate(0, len).map_err(err("memfd allocate"))?;
        let (fdi, id, mfd) = (iommufd.as_fd(), ioas.id(), memfd.as_raw_fd());
        let pages = len / PAGE_SIZE;
        let bulk = || -> Res<f64> {
            let t = Instant::now();
            raw_map_file(fdi, id, mfd, 0, IOVA, len).map_err(err("MAP_FILE"))?;
            raw_unmap(fdi, id, IOVA, len).map_err(err("UNMAP"))?;
            Ok(t.elapsed().as_secs_f64() * 1e6 / pages as f64)
        };
        let per_page = || -> Res<f64> {
            let t = Instant::now();
            for p in 0..pages {
                raw_map_file(fdi, id, mfd, p * PAGE_SIZE, IOVA + p * PAGE_SIZE, PAGE_SIZE)
                    .map_err(err("MAP_FILE"))?;
            }
            raw_unmap(fdi, id, IOVA, len).map_err(err("UNMAP"))?;
            Ok(t.elapsed().as_secs_f64() * 1e6 / pages as f64)
        };
        bulk()?;
        per_page()?;
        let (mut b, mut p) = (vec![], vec![]);
        for _ in 0..3 {
            b.push(bulk()?);
            p.push(per_page()?);
        }
        let key = if huge {
            "huge_pages_on"
        } else {
            "huge_pages_off"
        };
        out[key] = json!({
            "bulk_us_per_page": median(&b),
            "per_page_areas_us_per_page": median(&p),
        });
        drop(dev);
    }
    out["bytes"] = json!(len);
    Ok(out)
}

fn conversions(edus: &[Edu], sz: &Sizes) -> Res<Value> {
    let shape = sz.conv;
    let (steps, mix) = generate(&shape);
    // Rounds rotate the order of the three runs; times are medians over rounds, time
    // ratios medians of the per-round ratios. Counts are the same every round.
    let mut rounds: Vec<[ConvRow; 3]> = Vec::new();
    for r in 0..sz.conv_rounds {
        let mut row: [Option<ConvRow>; 3] = [None, None, None];
        for k in 0..3 {
            let which = (k + r) % 3;
            row[which] = Some(match which {
                0 => conv_library(&edus[0], &shape, &steps, Strategy::Cut)?,
                1 => conv_per_page(&edus[0], &shape, &steps)?,
                _ => conv_library(&edus[0], &shape, &steps, Strategy::PerGranule)?,
            });
        }
        rounds.push(row.map(Option::unwrap));
    }
    let time_ratio = |a: usize, b: usize| {
        median(
            &rounds
                .iter()
                .map(|x| x[a].secs / x[b].secs)
                .collect::<Vec<_>>(),
        )
    };
    let (base_over_cut, gran_over_cut) = (time_ratio(1, 0), time_ratio(2, 0));
    let merged: Vec<ConvRow> = (0..3)
        .map(|i| {
            let med = |f: &dyn Fn(&ConvRow) -> f64| {
                median(&rounds.iter().map(|x| f(&x[i])).collect::<Vec<_>>())
            };
            ConvRow {
                secs: med(&|r| r.secs),
                dir_secs: [med(&|r| r.dir_secs[0]), med(&|r| r.dir_secs[1])],
                plan_secs: rounds[0][i]
                    .plan_secs
                    .map(|_| med(&|r| r.plan_secs.unwrap_or(0.0))),
                ..rounds[0][i].clone()
            }
        })
        .collect();
    for x in &rounds {
        for i in 0..3 {
            if (x[i].iommu_ioctls, x[i].peak_areas)
                != (merged[i].iommu_ioctls, merged[i].peak_areas)
            {
                return Err(format!("{}: counts differ between rounds", x[i].name));
            }
        }
    }
    let all_secs: Vec<Vec<f64>> = (0..3)
        .map(|i| rounds.iter().map(|x| x[i].secs).collect())
        .collect();
    let [cut, base, gran] = [&merged[0], &merged[1], &merged[2]];
    let costs = kernel_page_costs(&edus[0], shape.pool)?;
    if cut.final_areas > base.final_areas
        || rounds
            .iter()
            .any(|x| x[0].transient_unmaps + x[2].transient_unmaps != 0)
    {
        return Err("library plans unmapped pages that stay shared".into());
    }
    let ratio = |a: f64, b: f64| a / b;
    let tracker = cut.tracker_bytes.unwrap_or(0);
    let pages = shape.region / PAGE_SIZE;
    let bitmap = pages.div_ceil(64) * 8;
    let area_bytes = tracker as u64 - bitmap;
    let per_gib = bitmap * (GIB / shape.region) + area_bytes;
    Ok(json!({
        "region_bytes": shape.region,
        "pool_bytes": shape.pool,
        "steps": shape.steps,
        "mix": {"random": mix.random, "adjacent": mix.adjacent, "nested": mix.nested},
        "rounds": sz.conv_rounds,
        "rows": [cut.json(), base.json(), gran.json()],
        "seconds_per_round": all_secs,
        "ratios_baseline_over_cut": {
            "ioctls": ratio(base.iommu_ioctls as f64, cut.iommu_ioctls as f64),
            "peak_areas": ratio(base.peak_areas as f64, cut.peak_areas as f64),
            "time": base_over_cut,
        },
        "ratios_pergranule_over_cut": {
            "ioctls": ratio(gran.iommu_ioctls as f64, cut.iommu_ioctls as f64),
            "peak_areas": ratio(gran.peak_areas as f64, cut.peak_areas as f64),
            "time": gran_over_cut,
        },
        "kernel_page_costs": costs,
        "transient_unmaps": rounds.iter().map(|x| x[0].transient_unmaps + x[2].transient_unmaps).sum::<u64>(),
        "unmap_ops_checked": rounds.iter().map(|x| x[0].unmap_ops_checked + x[2].unmap_ops_checked).sum::<u64>(),
        "tracker": {
            "bytes": tracker,
            "bitmap_bytes": bitmap,
            "area_and_region_bytes": area_bytes,
            "final_areas": cut.final_areas,
            "bits_per_page_bitmap": (bitmap * 8) as f64 / pages as f64,
            "bytes_per_gib_with_these_areas": per_gib,
        },
    }))
}

// ---------------------------------------------------------------------------------------
// Whole-guest setup

fn setup(edus: &[Edu], sz: &Sizes) -> Res<Value> {
    let len = sz.setup;
    let vm = KvmVm::create(VmType::Default).map_err(err("KVM VM"))?;
    let gmem = vm
        .create_guest_memfd(len, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
        .map_err(err("guest_memfd"))?;
    gmem.allocate(0, len).map_err(err("gmem allocate"))?;

    // Library: open, attach, add the region (it probes MAP_FILE, falls back to VA).
    let t0 = Instant::now();
    let iommufd = Arc::new(Iommufd::open().map_err(err("open /dev/iommu"))?);
    let options = SpaceOptions {
        conversions: false,
        force_strategy: None,
    };
    let mut space = DmaSpace::iommufd(&iommufd, None, options).map_err(err("DmaSpace"))?;
    let dev = Device::open_cdev(&edus[0].cdev).map_err(err("opening the edu cdev"))?;
    space.attach(&dev).map_err(err("attach"))?;
    let fd = gmem.as_fd().try_clone_to_owned().map_err(err("dup"))?;
    space
        .add_region(GuestRegion::new(
            IOVA,
            len,
            SharedMemory::File { fd, offset: 0 },
        ))
        .map_err(err("add_region"))?;
    let lib_s = t0.elapsed().as_secs_f64();
    let lib_areas = space.area_count();
    let path = space
        .regions()
        .first()
        .map(|r| r.path.to_string())
        .unwrap_or_default();
    drop(dev);
    drop(space);

    // Per page, raw: open, attach, mmap, one IOMMU_IOAS_MAP per 4 KiB page.
    let t0 = Instant::now();
    let iommufd = Arc::new(Iommufd::open().map_err(err("open /dev/iommu"))?);
    let ioas = Ioas::new(&iommufd).map_err(err("IOAS"))?;
    let dev = attach_new(&edus[0], &ioas)?;
    let mapping = gmem.mmap().map_err(err("gmem mmap"))?;
    let (fdi, id, va) = (iommufd.as_fd(), ioas.id(), mapping.addr());
    for off in (0..len).step_by(PAGE_SIZE as usize) {
        raw_map_va(fdi, id, va + off, IOVA + off, PAGE_SIZE).map_err(err("per-page MAP"))?;
    }
    let raw_s = t0.elapsed().as_secs_f64();
    let raw_areas = len / PAGE_SIZE;
    drop(dev);
    let row = json!({
        "guest_bytes": len,
        "library": {"seconds": lib_s, "areas": lib_areas, "path": path, "ioctls_map": 1},
        "per_page": {"seconds": raw_s, "areas": raw_areas, "ioctls_map": raw_areas},
        "ratio_time": raw_s / lib_s,
        "ratio_areas": raw_areas as f64 / lib_areas as f64,
    });
    Ok(row)
}

// ---------------------------------------------------------------------------------------
// Output

fn size(b: u64) -> String {
    if b >= GIB && b % GIB == 0 {
        format!("{}GiB", b / GIB)
    } else if b >= MIB && b % MIB == 0 {
        format!("{}MiB", b / MIB)
    } else {
        format!("{}KiB", b / KIB)
    }
}

fn print_tables(v: &Value) {
    let iommu = v["machine"]["iommu"].as_str().unwrap_or("?");
    if let Some(rows) = v["overhead"].as_array() {
        println!("\n## Library overhead vs raw ioctl loop (IOMMU: {iommu}; median of {} rounds; ratio = library / raw, goal <= 1.05)",
            rows.first().map(|r| r["rounds"].clone()).unwrap_or_default());
        println!(
            "{:<24} {:>6} {:>7} {:>7} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8}",
            "path",
            "area",
            "total",
            "areas",
            "lib ms",
            "raw ms",
            "map x",
            "unmap x",
            "total x",
            "raw us/op"
        );
        for r in rows {
            println!(
                "{:<24} {:>6} {:>7} {:>7} {:>10.1} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>8.1}",
                r["path"].as_str().unwrap_or(""),
                size(r["area_bytes"].as_u64().unwrap_or(0)),
                size(r["total_bytes"].as_u64().unwrap_or(0)),
                r["areas"],
                r["lib_total_s"].as_f64().unwrap_or(0.0) * 1e3,
                r["raw_total_s"].as_f64().unwrap_or(0.0) * 1e3,
                r["ratio_map"].as_f64().unwrap_or(0.0),
                r["ratio_unmap"].as_f64().unwrap_or(0.0),
                r["ratio_total"].as_f64().unwrap_or(0.0),
                r["raw_us_per_op"].as_f64().unwrap_or(0.0),
            );
        }
    }
    let c = &v["conversions"];
    if c.is_object() {
        println!(
            "\n## Conversions (IOMMU: {iommu}; {} region, {} pool at boot, {} steps: {} random, {} adjacent, {} nested; times: median of {} rounds)",
            size(c["region_bytes"].as_u64().unwrap_or(0)),
            size(c["pool_bytes"].as_u64().unwrap_or(0)),
            c["steps"], c["mix"]["random"], c["mix"]["adjacent"], c["mix"]["nested"], c["rounds"]
        );
        println!(
            "{:<30} {:>12} {:>8} {:>7} {:>10} {:>9} {:>9} {:>10}",
            "strategy",
            "IOMMU ioctls",
            "maps",
            "unmaps",
            "peak areas",
            "seconds",
            "planning",
            "tracker B"
        );
        for r in c["rows"].as_array().into_iter().flatten() {
            println!(
                "{:<30} {:>12} {:>8} {:>7} {:>10} {:>9.3} {:>9} {:>10}",
                r["name"].as_str().unwrap_or(""),
                r["iommu_ioctls"].to_string(),
                r["maps"].to_string(),
                r["unmaps"].to_string(),
                r["peak_areas"].to_string(),
                r["seconds"].as_f64().unwrap_or(0.0),
                r["plan_seconds"]
                    .as_f64()
                    .map(|x| format!("{x:.3}"))
                    .unwrap_or("-".into()),
                r["tracker_bytes"]
                    .as_u64()
                    .map(|b| b.to_string())
                    .unwrap_or("-".into()),
            );
        }
        let b = &c["ratios_baseline_over_cut"];
        let g = &c["ratios_pergranule_over_cut"];
        println!(
            "per-page baseline / library cut: ioctls {:.1}x (goal >= 10), peak areas {:.1}x, time {:.2}x (goal >= 5)",
            b["ioctls"].as_f64().unwrap_or(0.0), b["peak_areas"].as_f64().unwrap_or(0.0), b["time"].as_f64().unwrap_or(0.0)
        );
        println!(
            "library per-granule / library cut: ioctls {:.1}x, peak areas {:.1}x, time {:.2}x",
            g["ioctls"].as_f64().unwrap_or(0.0),
            g["peak_areas"].as_f64().unwrap_or(0.0),
            g["time"].as_f64().unwrap_or(0.0)
        );
        let k = &c["kernel_page_costs"];
        let us = |a: &str, b: &str| k[a][b].as_f64().unwrap_or(0.0);
        println!(
            "kernel cost per 4 KiB page (raw, map+unmap of {}): one area {:.2} us (huge pages on) / {:.2} us (off); \
             4 KiB areas {:.2} us (on) / {:.2} us (off); bound on time ratio per-page(on)/one-area(off): {:.1}x",
            size(k["bytes"].as_u64().unwrap_or(0)),
            us("huge_pages_on", "bulk_us_per_page"), us("huge_pages_off", "bulk_us_per_page"),
            us("huge_pages_on", "per_page_areas_us_per_page"), us("huge_pages_off", "per_page_areas_us_per_page"),
            us("huge_pages_on", "per_page_areas_us_per_page") / us("huge_pages_off", "bulk_us_per_page"),
        );
        for r in c["rows"].as_array().into_iter().flatten() {
            println!(
                "  {:<30} to-shared {:.3} s, to-private {:.3} s",
                r["name"].as_str().unwrap_or(""),
                r["to_shared_seconds"].as_f64().unwrap_or(0.0),
                r["to_private_seconds"].as_f64().unwrap_or(0.0)
            );
        }
        println!(
            "transient unmaps of shared pages: {} (checked {} unmap ops of the library's plans)",
            c["transient_unmaps"], c["unmap_ops_checked"]
        );
        let t = &c["tracker"];
        println!(
            "tracker: {} B for {} ({} B bitmap = {:.2} bit/page, {} B for {} areas + region); per GiB with these areas: {} B",
            t["bytes"], size(c["region_bytes"].as_u64().unwrap_or(0)), t["bitmap_bytes"],
            t["bits_per_page_bitmap"].as_f64().unwrap_or(0.0), t["area_and_region_bytes"],
            t["final_areas"], t["bytes_per_gib_with_these_areas"]
        );
    }
    let s = &v["setup"];
    if s.is_object() {
        println!(
            "\n## Whole-guest setup (IOMMU: {iommu}; {} non-convertible gmem MMAP|INIT_SHARED, attach + map)",
            size(s["guest_bytes"].as_u64().unwrap_or(0))
        );
        println!(
            "library: {:.3} s, {} area(s), {} | per 4 KiB page: {:.3} s, {} areas | ratio time {:.1}x, areas {:.0}x",
            s["library"]["seconds"].as_f64().unwrap_or(0.0), s["library"]["areas"],
            s["library"]["path"].as_str().unwrap_or(""),
            s["per_page"]["seconds"].as_f64().unwrap_or(0.0), s["per_page"]["areas"],
            s["ratio_time"].as_f64().unwrap_or(0.0), s["ratio_areas"].as_f64().unwrap_or(0.0)
        );
    }
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let cpus = read("/proc/cpuinfo")
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "guest_cpu": cpu,
        "guest_cpus": cpus,
        "guest_mem_mib": mem_kib / 1024,
        "iommu": std::env::var("VFIO_GMEM_IOMMU").unwrap_or_else(|_| "unknown".into()),
    })
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
        }
    } else {
        Sizes {
            rounds: 11,
            cases: [(4 * KIB, 64 * MIB), (2 * MIB, GIB), (GIB, GIB)],
            conv: Shape::full(2000),
            conv_rounds: 3,
            setup: GIB,
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
    let only = opt("--only").unwrap_or_else(|| "overhead,conversions,setup".into());
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
