//! Section `overhead`: the library against the raw ioctl loop, per mapping path and area
//! size.

use super::*;

// Library overhead

pub fn median(v: &[f64]) -> f64 {
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
pub struct Side<'a> {
    map: Box<dyn Fn(u64, u64, u64) -> Res<()> + 'a>,
    unmap: Box<dyn Fn(u64, u64) -> Res<u64> + 'a>,
}

/// Where the sides map: 4 GiB and 8 GiB (both windows hold up to 1 GiB and are live at
/// the same time); the sides swap windows every round.
pub const WINDOW: [u64; 2] = [IOVA, 2 * IOVA];

/// One round: both sides map `n` areas of `area` bytes (area `i` from byte `i*area` of
/// the memory), then unmap them. The work is interleaved in chunks of `chunk` areas,
/// library and raw taking turns (and turns at going first), so that drift from the
/// host (TCG, other jobs on the same cores) hits both sides alike; `swap` swaps their IOVA
/// windows. Returns seconds: [map, unmap] for [library, raw].
#[allow(clippy::needless_range_loop)] // phase indexes both the times and the op kind
pub fn round(sides: [&Side; 2], area: u64, n: u64, chunk: u64, swap: bool) -> Res<[[f64; 2]; 2]> {
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

/// Runs one unmeasured warm-up round and `rounds` measured ones; the ratios are the
/// medians of the per-round library/raw ratios (rounds are paired in time).
pub fn compare(
    path: &str,
    lib: &Side,
    raw: &Side,
    area: u64,
    total: u64,
    rounds: usize,
) -> Res<Value> {
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

pub fn overhead(edus: &[Edu], sz: &Sizes) -> Res<Vec<Value>> {
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
                // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
                // its IOAS/container gone, before the memory is).
                unsafe { container.map_user(Iova::Fixed(iova), va + off, len, access) }
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

pub fn va_sides<'a>(ioas: &'a Ioas, fdi: BorrowedFd<'a>, id: u32, va: u64) -> (Side<'a>, Side<'a>) {
    let access = Access::READ_WRITE;
    (
        Side {
            map: Box::new(move |iova, off, len| {
                // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
                // its IOAS/container gone, before the memory is).
                unsafe { ioas.map_user(Iova::Fixed(iova), va + off, len, access) }
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
