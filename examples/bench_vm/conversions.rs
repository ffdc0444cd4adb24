//! Section `conversions`: churn, library cut against the raw per-page baseline and the
//! library forced per-granule.

use super::*;

// Conversions

#[derive(Clone)]
pub struct ConvRow {
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
    pub fn json(&self) -> Value {
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

/// A fresh space as `options` say, on its own iommufd, with `edu` attached and the
/// churn's region added: a memfd (allocated beforehand) at `GPA`, every page private.
pub fn churn_space(edu: &Edu, shape: &Shape, options: SpaceOptions) -> Res<(DmaSpace, Device)> {
    let iommufd = Arc::new(Iommufd::open().map_err(err("open /dev/iommu"))?);
    let mut space = DmaSpace::iommufd(&iommufd, None, options).map_err(err("DmaSpace"))?;
    let dev = Device::open_cdev(&edu.cdev).map_err(err("opening the edu cdev"))?;
    space.attach(&dev).map_err(err("attach"))?;
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
    Ok((space, dev))
}

/// The library on a fresh iommufd: every step through `DmaSpace::convert`; before each
/// step the exact plan the space is about to execute is inspected, and every unmap it
/// contains must cover only pages that are private once the step is done.
pub fn conv_library(edu: &Edu, shape: &Shape, steps: &[Step], strategy: Strategy) -> Res<ConvRow> {
    let options = SpaceOptions {
        conversions: true,
        force_strategy: Some(strategy),
        ..Default::default()
    };
    let (mut space, dev) = churn_space(edu, shape, options)?;
    if strategy == Strategy::Cut {
        if let vfio_gmem::dma::CutSupport::Unavailable(why) = space.cut_support() {
            return Err(format!("cut unavailable: {why}"));
        }
    }
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
pub fn conv_per_page(edu: &Edu, shape: &Shape, steps: &[Step]) -> Res<ConvRow> {
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
pub fn kernel_page_costs(edu: &Edu, len: u64) -> Res<Value> {
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

pub fn conversions(edus: &[Edu], sz: &Sizes) -> Res<Value> {
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
