//! `DmaSpace` on the host, over the fake kernel: every refused input and every kernel
//! refusal leaves the space, its tracker, the (fake) kernel and this process's fds
//! exactly as they were; concurrent conversions through `Arc<Mutex<DmaSpace>>` lose
//! nothing and leave the tracker equal to the kernel.
//!
//! The fake kernel stands behind the [`DmaMapper`] interface (as a legacy type1 container
//! would), so the space maps by VA with one area per granule and the kernel's answers are
//! iommufd's rules as `FakeKernel` reproduces them (checked against the real kernel by
//! `vm_dma::fake_kernel_rules_match_the_real_kernel`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use vfio_gmem::dma::planning::{Backing, MapOp, UnmapKind, UnmapOp};
use vfio_gmem::dma::{
    ConversionRequest, DmaSpace, Executor, FakeKernel, GuestRegion, Outcome, PageState, PlanError,
    RegionId, SharedMemory, SpaceError, SpaceOptions, Strategy, PAGE_SIZE,
};
use vfio_gmem::gmem::{HugePageSize, Memfd};
use vfio_gmem::mapper::{Access, Backend, DmaMapper, Iova, MapError};

const P: u64 = PAGE_SIZE;
const GPA: u64 = 0x1_0000_0000;

/// The fake kernel as a map/unmap backend. Shared with the test, which reads its areas
/// and injects faults.
struct FakeMapper(Arc<Mutex<FakeKernel>>);

fn os_err(op: &'static str, iova: u64, len: u64, errno: i32) -> MapError {
    MapError::Os {
        op,
        iova,
        len,
        hint: "",
        source: std::io::Error::from_raw_os_error(errno),
    }
}

impl DmaMapper for FakeMapper {
    fn backend(&self) -> Backend {
        Backend::LegacyType1
    }
    fn can_map_file(&self) -> bool {
        false
    }
    unsafe fn map_user(&self, iova: Iova, va: u64, len: u64, _: Access) -> Result<u64, MapError> {
        let Iova::Fixed(iova) = iova else {
            return Err(MapError::AnyIovaUnsupported {
                backend: self.backend(),
            });
        };
        let op = MapOp {
            region: RegionId(0),
            backing: Backing::Address(va),
            iova,
            offset: 0,
            len,
        };
        let mut k = self.0.lock().unwrap();
        k.map(&op)
            .map(|_| iova)
            .map_err(|e| os_err("map", iova, len, e.errno))
    }
    fn map_file(
        &self,
        _: Iova,
        _: BorrowedFd<'_>,
        _: u64,
        _: u64,
        _: Access,
    ) -> Result<u64, MapError> {
        Err(MapError::FileMappingUnsupported {
            backend: self.backend(),
        })
    }
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, MapError> {
        let op = UnmapOp {
            iova,
            len,
            kind: UnmapKind::Native,
            restore: Vec::new(),
        };
        let mut k = self.0.lock().unwrap();
        k.unmap(&op)
            .map_err(|e| os_err("unmap", iova, len, e.errno))
    }
    fn unmap_all(&self) -> Result<u64, MapError> {
        let mut k = self.0.lock().unwrap();
        let spans: Vec<(u64, u64)> = k.areas().map(|a| (a.iova, a.len)).collect();
        let mut bytes = 0;
        for (iova, len) in spans {
            let op = UnmapOp {
                iova,
                len,
                kind: UnmapKind::Native,
                restore: Vec::new(),
            };
            bytes += k
                .unmap(&op)
                .map_err(|e| os_err("unmap", iova, len, e.errno))?;
        }
        Ok(bytes)
    }
}

/// The fd snapshots are process-wide: tests of this file run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

struct Fixture {
    space: DmaSpace,
    kernel: Arc<Mutex<FakeKernel>>,
    memfd: Memfd,
}

fn fixture(options: SpaceOptions) -> Fixture {
    let kernel = Arc::new(Mutex::new(FakeKernel::new()));
    let space = DmaSpace::with_mapper(Box::new(FakeMapper(kernel.clone())), None, options);
    let memfd = Memfd::new("space-host", 256 * P).expect("memfd");
    Fixture {
        space,
        kernel,
        memfd,
    }
}

fn dup(fd: impl AsFd) -> OwnedFd {
    fd.as_fd().try_clone_to_owned().expect("dup")
}

impl Fixture {
    /// A convertible region of `pages` pages at `gpa`, backed from `offset` of the memfd.
    fn add(&mut self, gpa: u64, pages: u64, offset: u64, granule: u64) -> RegionId {
        self.space
            .add_region(
                GuestRegion::new(
                    gpa,
                    pages * P,
                    SharedMemory::File {
                        fd: dup(self.memfd.file()),
                        offset,
                    },
                )
                .convertible(PageState::Shared)
                .granule(granule),
            )
            .expect("add region")
    }

    fn kernel_areas(&self) -> Vec<(u64, u64)> {
        let k = self.kernel.lock().unwrap();
        k.areas().map(|a| (a.iova, a.len)).collect()
    }

    fn tracker_areas(&self) -> Vec<(u64, u64)> {
        self.space
            .memory()
            .areas()
            .map(|a| (a.iova, a.len))
            .collect()
    }

    fn calls(&self) -> u64 {
        self.kernel.lock().unwrap().calls()
    }
}

/// Everything a refused call must leave alone.
#[derive(Debug, PartialEq)]
struct Snapshot {
    regions: String,
    pages: Vec<Option<PageState>>,
    tracker: Vec<(u64, u64)>,
    kernel: Vec<(u64, u64)>,
    fds: Vec<String>,
}

fn open_fds() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            format!("{} -> {target}", e.file_name().to_string_lossy())
        })
        .collect();
    v.sort();
    v
}

fn snapshot(f: &Fixture) -> Snapshot {
    Snapshot {
        regions: format!("{:?}", f.space.regions()),
        pages: (0..300).map(|p| f.space.page_state(GPA + p * P)).collect(),
        tracker: f.tracker_areas(),
        kernel: f.kernel_areas(),
        fds: open_fds(),
    }
}

/// Runs `bad`, which must fail; asserts that nothing changed and no kernel call was made.
fn refused<T: std::fmt::Debug>(
    f: &mut Fixture,
    what: &str,
    bad: impl FnOnce(&mut DmaSpace) -> Result<T, SpaceError>,
) -> SpaceError {
    let (before, calls, totals) = (snapshot(f), f.calls(), *f.space.totals());
    let e = bad(&mut f.space).expect_err(what);
    assert_eq!(snapshot(f), before, "{what}: state changed ({e})");
    assert_eq!(f.calls(), calls, "{what}: a kernel call was made ({e})");
    assert_eq!(*f.space.totals(), totals, "{what}: counters changed");
    e
}

fn file(mem: &std::fs::File, offset: u64) -> SharedMemory {
    SharedMemory::File {
        fd: dup(mem),
        offset,
    }
}

#[test]
fn bad_regions_change_nothing() {
    let _serial = serial();
    let mut f = fixture(SpaceOptions::default());
    f.add(GPA, 16, 0, P);
    f.space
        .convert(GPA + 4 * P, 2 * P, PageState::Private, false)
        .unwrap();
    // The backing the refused regions name; each closure dups it, so the refused call
    // consumes (and must close) exactly the fd it was given.
    let mem = f.memfd.file().try_clone().unwrap();
    let far = GPA + (1 << 30);

    let efd = vfio_gmem::vfio::EventFd::new().unwrap();
    let e = refused(&mut f, "eventfd as guest memory", |s| {
        s.add_region(GuestRegion::new(
            far,
            P,
            SharedMemory::File {
                fd: dup(&efd),
                offset: 0,
            },
        ))
    });
    assert!(
        matches!(&e, SpaceError::BadRegion { why, .. } if why.contains("eventfd") && why.contains("memfd")),
        "{e}"
    );
    let e = refused(&mut f, "file too small", |s| {
        s.add_region(GuestRegion::new(far, 512 * P, file(&mem, 0)))
    });
    assert!(
        e.to_string().contains("grow the file or fix the offset"),
        "{e}"
    );
    let e = refused(&mut f, "offset past the end", |s| {
        s.add_region(GuestRegion::new(far, P, file(&mem, 256 * P)))
    });
    assert!(matches!(e, SpaceError::BadRegion { .. }), "{e}");
    let e = refused(&mut f, "GPA overlap", |s| {
        s.add_region(GuestRegion::new(GPA + 8 * P, 16 * P, file(&mem, 0)))
    });
    assert!(
        matches!(e, SpaceError::Plan(PlanError::GpaOverlap { .. })),
        "{e}"
    );
    let e = refused(&mut f, "IOVA overlap", |s| {
        s.add_region(GuestRegion::new(far, 4 * P, file(&mem, 0)).iova_offset(-(1 << 30)))
    });
    assert!(
        matches!(e, SpaceError::Plan(PlanError::IovaOverlap { .. })),
        "{e}"
    );
    let e = refused(&mut f, "unaligned region", |s| {
        s.add_region(GuestRegion::new(far + 0x800, P, file(&mem, 0)))
    });
    assert!(e.to_string().contains("not a multiple of 4 KiB"), "{e}");
    // A hugetlb memfd (creating and sizing one takes no huge page): regions must be whole
    // huge pages, of the size the file says.
    for (page, len) in [
        (HugePageSize::Size2M, 4 << 20),
        (HugePageSize::Size1G, 1 << 30),
    ] {
        let huge = Memfd::hugetlb_sized("space-host-huge", len, page).unwrap();
        assert_eq!(huge.page_size(), page.bytes());
        for (off, rlen) in [(0, page.bytes() / 2), (page.bytes() / 2, page.bytes() / 2)] {
            let e = refused(&mut f, "partial huge page", |s| {
                s.add_region(GuestRegion::new(far, rlen, file(huge.file(), off)))
            });
            assert!(
                matches!(&e, SpaceError::BadRegion { why, .. }
                    if why.contains(&format!("the hugetlbfs file has {page} pages"))
                        && why.contains("round the region to whole huge pages")),
                "{e}"
            );
        }
    }
    let e = refused(&mut f, "bad granule", |s| {
        s.add_region(
            GuestRegion::new(far, 12 * P, file(&mem, 0))
                .convertible(PageState::Shared)
                .granule(3 * P),
        )
    });
    assert!(
        matches!(e, SpaceError::Plan(PlanError::InvalidGranule { .. })),
        "{e}"
    );
    let e = refused(&mut f, "unknown region", |s| s.remove_region(RegionId(99)));
    assert!(
        matches!(e, SpaceError::Plan(PlanError::UnknownRegion(_))),
        "{e}"
    );
    // The space still works after all that.
    f.space
        .add_region(GuestRegion::new(far, 4 * P, file(&mem, 0)))
        .expect("a good region after the refusals");
}

#[test]
fn bad_conversions_change_nothing() {
    let _serial = serial();
    let mut f = fixture(SpaceOptions::default());
    f.add(GPA, 16, 0, P);
    f.add(GPA + 16 * P, 16, 16 * P, 4 * P); // 16 KiB granules
    let mem = f.memfd.file().try_clone().unwrap();
    f.space
        .add_region(GuestRegion::new(GPA + 64 * P, 4 * P, file(&mem, 64 * P)))
        .unwrap(); // not convertible
    f.space
        .convert(GPA + 2 * P, 3 * P, PageState::Private, false)
        .unwrap();
    let private = ConversionRequest::new;

    let e = refused(&mut f, "outside every region", |s| {
        s.convert(GPA + 40 * P, P, PageState::Private, false)
    });
    assert!(
        matches!(e, SpaceError::Plan(PlanError::NotCovered { .. }))
            && e.to_string().contains("nearest"),
        "{e}"
    );
    let e = refused(&mut f, "straddles a gap", |s| {
        s.convert(GPA + 28 * P, 8 * P, PageState::Private, false)
    });
    assert!(
        matches!(e, SpaceError::Plan(PlanError::NotCovered { .. })),
        "{e}"
    );
    let e = refused(&mut f, "unaligned", |s| {
        s.convert(GPA + 1, P, PageState::Private, false)
    });
    assert!(e.to_string().contains("not a multiple of 4 KiB"), "{e}");
    let e = refused(&mut f, "empty", |s| {
        s.convert(GPA, 0, PageState::Private, false)
    });
    assert!(
        matches!(e, SpaceError::Plan(PlanError::Empty { .. })),
        "{e}"
    );
    let e = refused(&mut f, "granule unaligned", |s| {
        s.convert(GPA + 17 * P, P, PageState::Private, false)
    });
    assert!(
        matches!(e, SpaceError::Plan(PlanError::GranuleUnaligned { .. })),
        "{e}"
    );
    let e = refused(&mut f, "not convertible", |s| {
        s.convert(GPA + 64 * P, P, PageState::Private, false)
    });
    assert!(
        matches!(e, SpaceError::Plan(PlanError::NotConvertible { .. })),
        "{e}"
    );
    let e = refused(&mut f, "discard on shared", |s| {
        s.convert(GPA + 2 * P, P, PageState::Shared, true)
    });
    assert!(
        matches!(e, SpaceError::Plan(PlanError::DiscardOnShared { .. })),
        "{e}"
    );
    let e = refused(&mut f, "conflicting batch", |s| {
        s.convert_batch(&[
            private(GPA + 6 * P, 2 * P, PageState::Private),
            private(GPA + 7 * P, 2 * P, PageState::Shared),
        ])
    });
    assert!(
        matches!(e, SpaceError::Plan(PlanError::Conflict { .. })),
        "{e}"
    );
    let e = refused(&mut f, "batch with one bad range", |s| {
        s.convert_batch(&[
            private(GPA + 8 * P, P, PageState::Private),
            private(GPA + 2 * P, 3 * P, PageState::Shared),
            private(GPA + 1000 * P, P, PageState::Private),
        ])
    });
    assert!(
        matches!(e, SpaceError::Plan(PlanError::NotCovered { .. })),
        "{e}"
    );
}

/// The kernel refuses call k of a conversion, for every k: the space rolls back, the
/// error says so, and space, tracker and kernel are exactly as before.
#[test]
fn kernel_refusal_at_every_call_rolls_back() {
    let _serial = serial();
    let mut f = fixture(SpaceOptions::default());
    f.add(GPA, 32, 0, P);
    f.space
        .convert_batch(&[
            ConversionRequest::new(GPA + 4 * P, 4 * P, PageState::Private),
            ConversionRequest::new(GPA + 20 * P, 2 * P, PageState::Private),
        ])
        .unwrap();
    // Pages 4..8 and 20..22 private; this batch flips 2..6 private (2, 3 turn) and 20..24
    // shared (20, 21 turn): unmaps, then maps.
    let batch = [
        ConversionRequest::new(GPA + 2 * P, 4 * P, PageState::Private),
        ConversionRequest::new(GPA + 20 * P, 4 * P, PageState::Shared),
    ];
    let calls = {
        let mut probe = fixture(SpaceOptions::default());
        probe.add(GPA, 32, 0, P);
        probe
            .space
            .convert_batch(&[
                ConversionRequest::new(GPA + 4 * P, 4 * P, PageState::Private),
                ConversionRequest::new(GPA + 20 * P, 2 * P, PageState::Private),
            ])
            .unwrap();
        let c0 = probe.calls();
        probe.space.convert_batch(&batch).unwrap();
        probe.calls() - c0
    };
    assert!(
        calls >= 3,
        "the batch should take several calls, took {calls}"
    );
    for k in 0..calls {
        let before = snapshot(&f);
        let c0 = f.calls();
        f.kernel.lock().unwrap().fail_call(c0 + k, libc::EIO);
        let e = f.space.convert_batch(&batch).expect_err("injected failure");
        f.kernel.lock().unwrap().clear_faults();
        match &e {
            SpaceError::Exec { source, .. } => assert!(
                matches!(source.outcome, Outcome::RolledBack) && source.error.errno == libc::EIO,
                "call {k}: {e}"
            ),
            other => panic!("call {k}: expected an execution error, got {other}"),
        }
        assert!(e.to_string().contains("rolled back"), "{e}");
        assert_eq!(snapshot(&f), before, "call {k} failed: state changed ({e})");
    }
    f.space
        .convert_batch(&batch)
        .expect("the same batch without faults");
    assert_eq!(f.tracker_areas(), f.kernel_areas());
    assert_eq!(f.space.page_state(GPA + 2 * P), Some(PageState::Private));
    assert_eq!(f.space.page_state(GPA + 21 * P), Some(PageState::Shared));
}

/// Mapping a new region fails at its k-th map: the region is not registered, what was
/// mapped is unmapped, and the fd and mmap the space took for it are released.
#[test]
fn kernel_refusal_while_adding_a_region_leaves_nothing() {
    let _serial = serial();
    let mut f = fixture(SpaceOptions::default());
    f.add(GPA, 8, 0, P);
    let mem = f.memfd.file().try_clone().unwrap();
    for k in [0u64, 1, 5, 7] {
        let c0 = f.calls();
        f.kernel.lock().unwrap().fail_call(c0 + k, libc::ENOMEM);
        let before = snapshot(&f);
        let e = f
            .space
            .add_region(
                GuestRegion::new(GPA + 64 * P, 8 * P, file(&mem, 64 * P))
                    .convertible(PageState::Shared),
            )
            .expect_err("injected failure");
        f.kernel.lock().unwrap().clear_faults();
        assert!(matches!(e, SpaceError::Exec { .. }), "map {k}: {e}");
        assert_eq!(snapshot(&f), before, "map {k} failed: state changed ({e})");
    }
    f.space
        .add_region(
            GuestRegion::new(GPA + 64 * P, 8 * P, file(&mem, 64 * P))
                .convertible(PageState::Shared),
        )
        .expect("the same region without faults");
    assert_eq!(f.tracker_areas(), f.kernel_areas());
}

/// A strategy the backend cannot run (Cut on a type1-like mapper) fails at its first
/// call and changes nothing.
#[test]
fn unsupported_cut_is_refused_and_changes_nothing() {
    let _serial = serial();
    let mut f = fixture(SpaceOptions {
        force_strategy: Some(Strategy::Cut),
        ..Default::default()
    });
    f.add(GPA, 8, 0, P);
    let before = snapshot(&f);
    let e = f
        .space
        .convert(GPA + 2 * P, P, PageState::Private, false)
        .expect_err("cut on a mapper");
    match &e {
        SpaceError::Exec { source, .. } => {
            assert_eq!(source.error.errno, libc::EOPNOTSUPP, "{e}");
            assert!(matches!(source.outcome, Outcome::RolledBack), "{e}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(snapshot(&f), before);
}

/// Four threads convert disjoint and overlapping ranges of one space through
/// `Arc<Mutex<DmaSpace>>`, logging each conversion while they hold the lock. Nothing is
/// lost, each thread's conversions appear in its own order, the final page states equal
/// the log replayed in lock order, and the tracker equals the (fake) kernel.
#[test]
fn concurrent_conversions_equal_the_lock_order_log() {
    let _serial = serial();
    const THREADS: u64 = 4;
    const OPS: u64 = 400;
    const PAGES: u64 = 64;
    let mut f = fixture(SpaceOptions::default());
    f.add(GPA, PAGES, 0, P);
    let Fixture { space, kernel, .. } = f;
    // (thread, sequence, first page, pages, to)
    type Entry = (u64, u64, u64, u64, PageState);
    let shared = Arc::new(Mutex::new((space, Vec::<Entry>::new())));
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let shared = shared.clone();
            s.spawn(move || {
                let mut rng =
                    0x9e37_79b9_7f4a_7c15u64 ^ (t + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                for seq in 0..OPS {
                    // Own zone [t*8, t*8+8) or the common zone [32, 64).
                    let (zone, size) = if next() % 2 == 0 {
                        (t * 8, 8)
                    } else {
                        (32, 32)
                    };
                    let first = zone + next() % size;
                    let pages = 1 + next() % (zone + size - first).min(6);
                    let to = if next() % 2 == 0 {
                        PageState::Private
                    } else {
                        PageState::Shared
                    };
                    let mut guard = shared.lock().unwrap();
                    let (space, log) = &mut *guard;
                    space
                        .convert(GPA + first * P, pages * P, to, false)
                        .expect("conversion");
                    log.push((t, seq, first, pages, to));
                }
            });
        }
    });
    let (space, log) = Arc::into_inner(shared).unwrap().into_inner().unwrap();
    assert_eq!(log.len() as u64, THREADS * OPS, "conversions lost");
    for t in 0..THREADS {
        let seqs: Vec<u64> = log.iter().filter(|e| e.0 == t).map(|e| e.1).collect();
        assert_eq!(
            seqs,
            (0..OPS).collect::<Vec<_>>(),
            "thread {t} out of order"
        );
    }
    let mut model = vec![PageState::Shared; PAGES as usize];
    for &(_, _, first, pages, to) in &log {
        model[first as usize..(first + pages) as usize].fill(to);
    }
    for (p, want) in model.iter().enumerate() {
        assert_eq!(
            space.page_state(GPA + p as u64 * P),
            Some(*want),
            "page {p}"
        );
    }
    let tracker: Vec<(u64, u64)> = space.memory().areas().map(|a| (a.iova, a.len)).collect();
    let k: Vec<(u64, u64)> = kernel
        .lock()
        .unwrap()
        .areas()
        .map(|a| (a.iova, a.len))
        .collect();
    assert_eq!(tracker, k, "tracker differs from the kernel");
    let mapped: Vec<u64> = k.iter().map(|&(iova, _)| (iova - GPA) / P).collect();
    let shared_pages: Vec<u64> = (0..PAGES)
        .filter(|&p| model[p as usize] == PageState::Shared)
        .collect();
    assert_eq!(
        mapped, shared_pages,
        "mapped pages differ from shared pages"
    );
}
