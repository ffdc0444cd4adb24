//! Section `paired`: the library against raw ioctl loops for the same seeded churn, step by
//! step, in paired rounds (issue 16).
//!
//! Method. Two sides run side by side in one round, each on its own iommufd and IOAS with
//! its own edu device attached and its own memfd (same layout: the churn's region at
//! `GPA`, IOVA = GPA): every step of the workload is done by both, one right after the
//! other, the side going first alternating from step to step, so that drift (the shared
//! machine, TCG) hits both alike. A round's ratio is the library's summed step time over
//! the raw side's; `rounds` rounds (fresh setups), reported as median, lowest, highest.
//! Pairs:
//! - library cut vs **raw cut replay**: one unmeasured round records, before each step, the
//!   plan the space is about to execute (`space.memory().plan_convert`, the call `convert`
//!   makes); the raw side issues exactly those ops on the raw layer (`raw_loops.rs`):
//!   `IOMMU_IOAS_MAP_FILE` per map, the compat `VFIO_IOMMU_UNMAP_DMA` per cut-unmap, on
//!   an IOAS set up as the space's (compat designation, huge pages off). Same ioctls,
//!   same arguments: the ratio is the library's own overhead;
//! - library per-granule (4 KiB granules, as a space without cutting has them:
//!   `conversions: false`, huge pages on) vs the **raw per-page loop** (QEMU's shape, as
//!   in `conversions`: one `MAP_FILE` per page turning shared, one native unmap per run
//!   of shared pages turning private, default IOAS: huge pages on);
//! - library cut vs the raw per-page loop: what the cut strategy saves.
//!
//! No KVM VM: attribute changes cost the same in every strategy and are left out. Each
//! replayed unmap must remove the bytes planned, and each side's ioctl count is checked
//! against its pair's where they must agree.

use super::*;

/// One kernel call of a recorded plan, as the raw side issues it.
#[derive(Clone, Copy)]
enum RawOp {
    Map { offset: u64, iova: u64, len: u64 },
    CutUnmap { iova: u64, len: u64, expect: u64 },
}

/// A side of a pair: does step `i` of the workload, returns the time its calls took.
trait Side {
    fn step(&mut self, i: usize, s: &Step) -> Res<Duration>;
    fn ioctls(&self) -> u64;
}

/// The library: `DmaSpace::convert`, strategy forced.
struct Library {
    space: DmaSpace,
    _dev: Device,
    start: Stats,
}

impl Library {
    fn new(edu: &Edu, shape: &Shape, strategy: Strategy) -> Res<Self> {
        // The per-granule fallback as a VMM meets it (no cut here: `conversions` off,
        // huge pages on, no compat designation), like the raw per-page loop's IOAS.
        let options = SpaceOptions {
            conversions: strategy == Strategy::Cut,
            force_strategy: Some(strategy),
            ..Default::default()
        };
        let (space, dev) = churn_space(edu, shape, options)?;
        if strategy == Strategy::Cut && space.cut_support() != &vfio_gmem::dma::CutSupport::Verified
        {
            return Err(format!(
                "paired: the raw side replays compat cuts; this kernel's cut is {:?} (run on \
                 the plain test kernel)",
                space.cut_support()
            ));
        }
        let start = *space.totals();
        Ok(Library {
            space,
            _dev: dev,
            start,
        })
    }

    /// The ops of the plan the space is about to execute for `s` (compat cut only).
    fn plan_ops(&self, s: &Step) -> Res<Vec<RawOp>> {
        let plan = self
            .space
            .memory()
            .plan_convert(s.gpa, s.len, s.to)
            .map_err(err("plan"))?;
        let mut out = Vec::new();
        for op in plan.ops() {
            match op {
                Op::Map(m) => out.push(RawOp::Map {
                    offset: m.offset,
                    iova: m.iova,
                    len: m.len,
                }),
                Op::Unmap(u) if u.kind == vfio_gmem::dma::planning::UnmapKind::Cut => {
                    out.push(RawOp::CutUnmap {
                        iova: u.iova,
                        len: u.len,
                        expect: u.expected_bytes(),
                    })
                }
                Op::Unmap(u) => return Err(format!("paired: unexpected native unmap {u:?}")),
                _ => {}
            }
        }
        Ok(out)
    }
}

impl Side for Library {
    fn step(&mut self, _: usize, s: &Step) -> Res<Duration> {
        let t = Instant::now();
        self.space
            .convert(s.gpa, s.len, s.to, false)
            .map_err(err("convert"))?;
        Ok(t.elapsed())
    }
    fn ioctls(&self) -> u64 {
        let t = self.space.totals();
        (t.maps - self.start.maps) + (t.unmaps - self.start.unmaps)
    }
}

/// A raw IOAS with an edu device attached and a memfd of the churn's size.
struct RawIoas {
    iommufd: Arc<Iommufd>,
    ioas: Ioas,
    _dev: Device,
    memfd: Memfd,
    ioctls: u64,
}

impl RawIoas {
    fn new(edu: &Edu, shape: &Shape, compat_cut: bool) -> Res<Self> {
        let iommufd = Arc::new(Iommufd::open().map_err(err("open /dev/iommu"))?);
        let ioas = Ioas::with_record(&iommufd, AreaRecord::Off).map_err(err("IOAS"))?;
        if compat_cut {
            ioas.set_compat().map_err(err("IOMMU_VFIO_IOAS set"))?;
            ioas.set_huge_pages(false)
                .map_err(err("IOMMU_OPTION huge pages off"))?;
        }
        let dev = attach_new(edu, &ioas)?;
        let memfd = Memfd::new("bench-paired-raw", shape.region).map_err(err("memfd"))?;
        memfd
            .allocate(0, shape.region)
            .map_err(err("memfd allocate"))?;
        Ok(RawIoas {
            iommufd,
            ioas,
            _dev: dev,
            memfd,
            ioctls: 0,
        })
    }
}

/// The raw replay of recorded plans.
struct Replay {
    raw: RawIoas,
    ops: Vec<Vec<RawOp>>,
}

impl Side for Replay {
    fn step(&mut self, i: usize, _: &Step) -> Res<Duration> {
        let r = &mut self.raw;
        let (fdi, id, mfd) = (r.iommufd.as_fd(), r.ioas.id(), r.memfd.as_raw_fd());
        let t = Instant::now();
        for op in &self.ops[i] {
            match *op {
                RawOp::Map { offset, iova, len } => {
                    raw_map_file(fdi, id, mfd, offset, iova, len).map_err(err("raw MAP_FILE"))?
                }
                RawOp::CutUnmap { iova, len, expect } => {
                    let n = raw_type1_unmap(fdi, iova, len).map_err(err("raw compat cut"))?;
                    if n != expect {
                        return Err(format!(
                            "raw cut at {iova:#x} removed {n:#x}, planned {expect:#x}"
                        ));
                    }
                }
            }
        }
        let dt = t.elapsed();
        r.ioctls += self.ops[i].len() as u64;
        Ok(dt)
    }
    fn ioctls(&self) -> u64 {
        self.raw.ioctls
    }
}

/// QEMU's shape on raw ioctls: a 4 KiB area per shared page.
struct PerPage {
    raw: RawIoas,
    model: Model,
}

impl Side for PerPage {
    fn step(&mut self, _: usize, s: &Step) -> Res<Duration> {
        let r = &mut self.raw;
        let (fdi, id, mfd) = (r.iommufd.as_fd(), r.ioas.id(), r.memfd.as_raw_fd());
        // The runs to touch come from the model, outside the timing (a VMM knows them).
        let runs = self.model.runs(s.gpa, s.len, s.to == PageState::Private);
        let t = Instant::now();
        for (gpa, len) in runs {
            if s.to == PageState::Shared {
                for p in (gpa..gpa + len).step_by(PAGE_SIZE as usize) {
                    raw_map_file(fdi, id, mfd, p - GPA, p, PAGE_SIZE)
                        .map_err(err("per-page MAP_FILE"))?;
                    r.ioctls += 1;
                }
            } else {
                let n = raw_unmap(fdi, id, gpa, len).map_err(err("per-page UNMAP"))?;
                if n != len {
                    return Err(format!("run unmap removed {n} bytes, not {len}"));
                }
                r.ioctls += 1;
            }
        }
        let dt = t.elapsed();
        self.model.apply(s);
        Ok(dt)
    }
    fn ioctls(&self) -> u64 {
        self.raw.ioctls
    }
}

/// Runs both sides over the workload, step by step, alternating who goes first; returns
/// (library seconds, raw seconds).
fn interleave(lib: &mut dyn Side, raw: &mut dyn Side, steps: &[Step]) -> Res<(f64, f64)> {
    let (mut a, mut b) = (Duration::ZERO, Duration::ZERO);
    for (i, s) in steps.iter().enumerate() {
        if i % 2 == 0 {
            a += lib.step(i, s)?;
            b += raw.step(i, s)?;
        } else {
            b += raw.step(i, s)?;
            a += lib.step(i, s)?;
        }
    }
    Ok((a.as_secs_f64(), b.as_secs_f64()))
}

fn spread(v: &[f64]) -> Value {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(0.0, f64::max);
    json!({"median": median(v), "min": lo, "max": hi, "rounds": v})
}

pub fn paired(edus: &[Edu], sz: &Sizes) -> Res<Value> {
    if edus.len() < 2 {
        return Err("paired: needs two edu devices (one per side)".into());
    }
    let shape = sz.paired;
    let (steps, _) = generate(&shape);
    // The cut plans, recorded once (deterministic: the same on every fresh space).
    let mut recorder = Library::new(&edus[0], &shape, Strategy::Cut)?;
    let mut cut_ops = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        cut_ops.push(recorder.plan_ops(s)?);
        recorder.step(i, s)?;
    }
    drop(recorder);
    let pairs: [(&str, Strategy, bool); 3] = [
        ("library_cut_over_raw_cut_replay", Strategy::Cut, true),
        (
            "library_per_granule_over_raw_per_page",
            Strategy::PerGranule,
            false,
        ),
        ("library_cut_over_raw_per_page", Strategy::Cut, false),
    ];
    let mut ratios = vec![Vec::new(); pairs.len()];
    let mut secs = vec![(Vec::new(), Vec::new()); pairs.len()];
    let mut ioctls = vec![(0, 0); pairs.len()];
    for r in 0..sz.paired_rounds {
        for (k, &(_, strategy, replay)) in pairs.iter().enumerate() {
            let mut lib = Library::new(&edus[0], &shape, strategy)?;
            let (l, w, raw_ioctls) = if replay {
                let mut raw = Replay {
                    raw: RawIoas::new(&edus[1], &shape, true)?,
                    ops: cut_ops.clone(),
                };
                let (l, w) = interleave(&mut lib, &mut raw, &steps)?;
                (l, w, raw.ioctls())
            } else {
                let mut raw = PerPage {
                    raw: RawIoas::new(&edus[1], &shape, false)?,
                    model: Model::new(&shape),
                };
                let (l, w) = interleave(&mut lib, &mut raw, &steps)?;
                (l, w, raw.ioctls())
            };
            if replay && lib.ioctls() != raw_ioctls {
                return Err(format!(
                    "paired: the library issued {} ioctls, its replay {raw_ioctls}",
                    lib.ioctls()
                ));
            }
            ioctls[k] = (lib.ioctls(), raw_ioctls);
            ratios[k].push(l / w);
            secs[k].0.push(l);
            secs[k].1.push(w);
        }
        eprintln!(
            "bench_vm: paired round {r}: {}",
            pairs
                .iter()
                .enumerate()
                .map(|(k, p)| format!("{} {:.3}", p.0, ratios[k][r]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut out = json!({
        "steps": shape.steps,
        "region_bytes": shape.region,
        "pool_bytes": shape.pool,
        "rounds": sz.paired_rounds,
    });
    for (k, p) in pairs.iter().enumerate() {
        out["pairs"][p.0] = json!({
            "ratio": spread(&ratios[k]),
            "library_seconds": spread(&secs[k].0),
            "raw_seconds": spread(&secs[k].1),
            "library_ioctls": ioctls[k].0,
            "raw_ioctls": ioctls[k].1,
        });
    }
    Ok(out)
}
