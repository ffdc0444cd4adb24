//! Fault sweeps of the IOAS layer: map_user, map_file, unmap, device attach.

use super::*;

// The IOAS layer: map_user, map_file, unmap, device attach.

/// An IOAS with the edu device attached, an 8-page memfd and an anchor area (page 0 at
/// `GPA`) that must survive every failure around it; operations use pages 2..6.
pub(crate) struct IoasFx {
    edu: Edu,
    kernel: KernelAreas,
    ioas: Ioas,
    mem: Memfd,
    view: MappedMemory,
}

impl IoasFx {
    fn new() -> Result<IoasFx, Failed> {
        let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
        let ioas = Ioas::new(&iommufd).or_fail("IOAS")?;
        let dev = open_device()?;
        dev.bind_iommufd(iommufd.as_fd()).or_fail("bind")?;
        dev.attach(ioas.id()).or_fail("attach")?;
        let edu = Edu::new(dev).or_fail("edu")?;
        let mem = Memfd::new("vm-faults", LEN).or_fail("memfd")?;
        let view = mem.mmap().or_fail("mmap")?;
        ioas.map_file(
            Iova::Fixed(GPA),
            mem.file().as_fd(),
            0,
            PAGE,
            Access::READ_WRITE,
        )
        .or_fail("anchor area")?;
        let kernel = KernelAreas::new(iommufd.as_fd(), ioas.id()).or_fail("scratch IOAS")?;
        let fx = IoasFx {
            edu,
            kernel,
            ioas,
            mem,
            view,
        };
        fx.verify("setup")?;
        Ok(fx)
    }

    fn window() -> Range<u64> {
        GPA - 2 * PAGE..GPA + LEN + 2 * PAGE
    }

    /// `Ioas::areas()` equals the kernel's areas.
    fn verify(&self, when: &str) -> Result<(), Failed> {
        let areas = spans(&self.ioas);
        self.kernel.check(&areas, Self::window()).map_err(|e| {
            Failed::from(format!(
                "{when}: Ioas::areas() = {} disagrees with the kernel: {e}",
                show(&areas)
            ))
        })
    }

    fn mapped(&self, p: u64) -> bool {
        let iova = GPA + p * PAGE;
        spans(&self.ioas)
            .iter()
            .any(|&(i, l)| (i..i + l).contains(&iova))
    }

    /// After a kernel WARN: notes what the device reaches (the caller starts over).
    fn after_warning(&mut self, inj: &Injector, warning: &str) -> Result<(), Failed> {
        let mapped: Vec<bool> = (0..PAGES).map(|p| self.mapped(p)).collect();
        let seen = observe(&self.edu, &mut self.view, &[0, 2, 5], |p| {
            mapped[p as usize]
        })?;
        inj.note(format!("{} — then {seen}", warning_site(warning)));
        Ok(())
    }

    /// DMA reaches page `p` (of the memfd, at `GPA + p`) iff the records map it.
    fn sample(&mut self, pages: &[u64]) -> Result<(), Failed> {
        let mapped: Vec<bool> = (0..PAGES).map(|p| self.mapped(p)).collect();
        check_reach(
            &self.edu,
            &mut self.view,
            pages,
            |p| mapped[p as usize],
            true,
        )
        .map(drop)
    }

    fn map_middle(&self, by_va: bool) -> vfio_gmem::iommufd::Result<u64> {
        let (iova, off, len) = (GPA + 2 * PAGE, 2 * PAGE, 4 * PAGE);
        if by_va {
            // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
            // its IOAS/container gone, before the memory is).
            unsafe {
                self.ioas.map_user(
                    Iova::Fixed(iova),
                    self.view.addr() + off,
                    len,
                    Access::READ_WRITE,
                )
            }
        } else {
            self.ioas.map_file(
                Iova::Fixed(iova),
                self.mem.file().as_fd(),
                off,
                len,
                Access::READ_WRITE,
            )
        }
    }

    fn unmap_middle(&self) -> Result<(), Failed> {
        let n = self
            .ioas
            .unmap(GPA + 2 * PAGE, 4 * PAGE)
            .or_fail("unmap pages 2..6")?;
        check!(n == 4 * PAGE, "unmap of pages 2..6 removed {n:#x} bytes");
        Ok(())
    }
}

pub(crate) fn called<T, E: std::fmt::Display>(r: &Result<T, E>) -> Called {
    match r {
        Ok(_) => Called::Ok,
        Err(e) => Called::Err(e.to_string()),
    }
}

pub(crate) fn sweep_map(name: &str, by_va: bool) -> Result<(), Failed> {
    let (_fi, nth) = injection()?;
    let mut fx = Fixture::new(IoasFx::new)?;
    let report = sweep(&nth, name, CAP, |inj: &Injector| {
        let r = inj.call(|| fx.map_middle(by_va))?;
        fx.verify("after the injected map")?;
        if let Some(w) = inj.kernel_warning() {
            fx.after_warning(inj, &w)?;
            fx.rebuild()?;
            return Ok(called(&r));
        }
        if r.is_ok() {
            check!(
                fx.ioas.areas().len() == 2,
                "a successful map must add exactly one area: {}",
                show(&spans(&fx.ioas))
            );
        } else {
            check!(
                spans(&fx.ioas) == [(GPA, PAGE)],
                "a failed map must leave only the anchor: {}",
                show(&spans(&fx.ioas))
            );
        }
        fx.sample(&[0, 2, 6])?;
        // Not poisoned: the map works (again), and unmapping it removes exactly it.
        if r.is_err() {
            ctx(
                fx.map_middle(by_va).or_fail("map again"),
                "after a failed map",
            )?;
        }
        fx.unmap_middle()?;
        fx.verify("after unmapping again")?;
        Ok(called(&r))
    })?;
    record(report);
    Ok(())
}

pub(crate) fn ioas_map_user() -> Result<(), Failed> {
    sweep_map("ioas map_user", true)
}

pub(crate) fn ioas_map_file() -> Result<(), Failed> {
    sweep_map("ioas map_file", false)
}

pub(crate) fn ioas_unmap() -> Result<(), Failed> {
    let (_fi, nth) = injection()?;
    let mut fx = Fixture::new(IoasFx::new)?;
    let report = sweep(&nth, "ioas unmap", CAP, |inj: &Injector| {
        fx.map_middle(false).or_fail("map pages 2..6")?;
        fx.verify("before the unmap")?;
        let r = inj.call(|| fx.ioas.unmap(GPA + 2 * PAGE, 4 * PAGE))?;
        fx.verify("after the injected unmap")?;
        if let Some(w) = inj.kernel_warning() {
            fx.after_warning(inj, &w)?;
            fx.rebuild()?;
            return Ok(called(&r));
        }
        if let Ok(n) = r {
            check!(n == 4 * PAGE, "unmap returned {n:#x}");
        }
        fx.sample(&[0, 2, 5])?;
        if r.is_err() {
            ctx(fx.unmap_middle(), "after a failed unmap")?;
            fx.verify("after unmapping again")?;
        }
        Ok(called(&r))
    })?;
    record(report);
    Ok(())
}

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` of a bound device to an IOAS holding two areas: a
/// failed attach leaves the device blocked and the IOAS as it was; attaching again works.
pub(crate) fn device_attach() -> Result<(), Failed> {
    let (_fi, nth) = injection()?;
    let mut fx = Fixture::new(IoasFx::new)?;
    fx.map_middle(true).or_fail("map pages 2..6")?;
    let report = sweep(&nth, "device attach", CAP, |inj: &Injector| {
        fx.edu.device().detach().or_fail("detach")?;
        let r = inj.call(|| fx.edu.device().attach(fx.ioas.id()))?;
        fx.verify("after the injected attach")?;
        if let Some(w) = inj.kernel_warning() {
            fx.after_warning(inj, &w)?;
            fx.rebuild()?;
            fx.map_middle(true).or_fail("map pages 2..6")?;
            return Ok(called(&r));
        }
        if r.is_err() {
            // Not attached: the device reaches nothing.
            let fx = &mut *fx;
            check_reach(&fx.edu, &mut fx.view, &[0, 2], |_| false, true)?;
            ctx(
                fx.edu
                    .device()
                    .attach(fx.ioas.id())
                    .map(drop)
                    .or_fail("attach again"),
                "after a failed attach",
            )?;
        }
        fx.sample(&[0, 1, 5])?;
        Ok(called(&r))
    })?;
    record(report);
    Ok(())
}
