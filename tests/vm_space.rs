//! `DmaSpace` contract regressions on the real kernel (VM), each proven with the edu
//! device's DMA or with KVM's own view: bugs an outside acceptance check found (issue 12).
//!
//! - two spaces on one iommufd: the compat designation (what lets a space cut areas) is
//!   claimed once, never taken from a space that holds it;
//! - a refused `add_region` leaves KVM's attributes as they were;
//! - a refused `add_region` reaches no kernel code at all (validated first). Where the
//!   MAP_FILE probe maps (outside every region's IOVAs) is checked by the unit tests of
//!   `dma::probes` and by vm_faults' probe-window check under fault injection.

mod support;

use std::os::fd::AsFd;
use std::sync::Arc;

use libtest_mimic::Failed;
use support::fail_nth::{FailNth, FaultInjection};
use support::kvm_attrs::AttributeProbe;
use support::space::{dma_refused, dma_works, dup, GPA, PAGE};
use support::{pci, run_vm_tests, OrFail};
use vfio_gmem::dma::{
    CutSupport, DmaSpace, GuestRegion, PageState, SharedMemory, SpaceError, SpaceOptions, Strategy,
};
use vfio_gmem::engine::edu::Edu;
use vfio_gmem::gmem::{KvmVm, MappedMemory, Memfd, VmType};
use vfio_gmem::iommufd::Iommufd;
use vfio_gmem::mapper::{Access, Iova};
use vfio_gmem::vfio::Device;

fn main() {
    run_vm_tests(&[
        (
            "two_spaces_share_an_iommufd_one_cuts",
            two_spaces_share_an_iommufd_one_cuts,
        ),
        (
            "refused_add_region_restores_kvm_attributes",
            refused_add_region_restores_kvm_attributes,
        ),
        (
            "overlapping_add_region_reaches_no_kernel_code",
            overlapping_add_region_reaches_no_kernel_code,
        ),
        ("a_vm_given_as_an_fd_converts", a_vm_given_as_an_fd_converts),
    ]);
}

/// Every edu device bound to vfio-pci and opened through its cdev.
fn edu_devices(n: usize) -> Result<Vec<Device>, Failed> {
    let bdfs = pci::edu_devices();
    check!(bdfs.len() >= n, "{n} edu devices needed, found {bdfs:?}");
    bdfs.iter()
        .take(n)
        .map(|bdf| {
            pci::bind_vfio_pci(bdf).or_fail("bind edu to vfio-pci")?;
            Device::open_cdev(pci::vfio_cdev(bdf).or_fail("cdev")?).or_fail("open edu")
        })
        .collect()
}

fn file_region(memfd: &Memfd, len: u64) -> Result<GuestRegion, Failed> {
    Ok(GuestRegion::new(
        GPA,
        len,
        SharedMemory::File {
            fd: dup(memfd.file())?,
            offset: 0,
        },
    )
    .convertible(PageState::Shared))
}

struct Side {
    space: DmaSpace,
    edu: Edu,
    _shared: Memfd,
    view: MappedMemory,
}

/// A convertible 16-page region at [`GPA`] in `space`, with `dev` attached.
fn side(mut space: DmaSpace, dev: Device, name: &str) -> Result<Side, Failed> {
    space.attach(&dev).or_fail("attach")?;
    let shared = Memfd::new(name, 16 * PAGE).or_fail("memfd")?;
    let view = shared.mmap().or_fail("mmap")?;
    space
        .add_region(file_region(&shared, 16 * PAGE)?)
        .or_fail("add region")?;
    Ok(Side {
        space,
        edu: Edu::new(dev).or_fail("edu")?,
        _shared: shared,
        view,
    })
}

fn two_spaces_share_an_iommufd_one_cuts() -> Result<(), Failed> {
    let mut devs = edu_devices(2)?;
    let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
    let opts = SpaceOptions::default;
    let s1 = DmaSpace::iommufd(&iommufd, None, opts()).or_fail("space 1")?;
    let mut a = side(s1, devs.remove(0), "space-1")?;
    // A kernel with the native split (the project's series) cuts without the compat
    // designation: then every space on the iommufd cuts. Without it, the first space
    // holds the designation and a second one must not take it away.
    let native = matches!(a.space.cut_support(), CutSupport::NativeSplit { .. });
    check!(
        native || *a.space.cut_support() == CutSupport::Verified,
        "space 1: {:?}",
        a.space.cut_support()
    );
    let s2 = DmaSpace::iommufd(&iommufd, None, opts()).or_fail("space 2")?;
    let mut b = side(s2, devs.remove(0), "space-2")?;
    if native {
        check!(
            matches!(b.space.cut_support(), CutSupport::NativeSplit { .. }),
            "with the native split every space cuts; space 2: {:?}",
            b.space.cut_support()
        );
    } else {
        let why = match b.space.cut_support() {
            CutSupport::Unavailable(why) => why.clone(),
            other => return Err(format!("space 2 must say it cannot cut: {other:?}").into()),
        };
        check!(
            why.contains("compat") && why.contains("per-granule"),
            "space 2's reason should name the compat IOAS and the fallback: {why}"
        );
        check!(
            b.space.regions()[0].strategy == Strategy::PerGranule,
            "space 2's convertible region: {:?}",
            b.space.regions()[0]
        );
    }
    check!(
        a.space.cut_support().can_cut(),
        "space 1 after space 2: {:?}",
        a.space.cut_support()
    );
    // Both convert, each proven by its own device.
    let at = |p: u64| (p * PAGE) as usize;
    for (s, first, pages) in [(&mut a, 4u64, 2u64), (&mut b, 9, 1)] {
        s.space
            .convert(GPA + first * PAGE, pages * PAGE, PageState::Private, false)
            .or_fail("to private")?;
        dma_refused(&s.edu, &mut s.view, at(first), GPA + first * PAGE)?;
        dma_works(
            &s.edu,
            &mut s.view,
            at(first - 1),
            GPA + (first - 1) * PAGE,
            3,
        )?;
        let next = first + pages;
        dma_works(&s.edu, &mut s.view, at(next), GPA + next * PAGE, 4)?;
    }
    if native {
        return Ok(());
    }
    // Something takes the designation from space 1 behind its back: its next cut fails
    // with the real cause (not the rollback's EEXIST), is rolled back, and cut_support()
    // stops claiming Verified.
    b.space
        .ioas()
        .ok_or("no IOAS")?
        .set_compat()
        .or_fail("steal")?;
    let e = match a
        .space
        .convert(GPA + 12 * PAGE, PAGE, PageState::Private, false)
    {
        Err(e) => e.to_string(),
        Ok(s) => return Err(format!("a cut on a stolen compat IOAS succeeded: {s:?}").into()),
    };
    check!(
        e.contains("VFIO-compat") && !e.contains("exists") && !e.contains("overlaps"),
        "the error must name the lost compat IOAS, not the rollback: {e}"
    );
    check!(
        matches!(a.space.cut_support(), CutSupport::Unavailable(w) if w.contains("compat")),
        "space 1 after the steal: {:?}",
        a.space.cut_support()
    );
    check!(
        a.space.page_state(GPA + 12 * PAGE) == Some(PageState::Shared),
        "the failed conversion must leave the page shared"
    );
    dma_works(&a.edu, &mut a.view, at(12), GPA + 12 * PAGE, 5)?;
    Ok(())
}

fn refused_add_region_restores_kvm_attributes() -> Result<(), Failed> {
    let len = 16 * PAGE;
    let vm = Arc::new(
        KvmVm::create(VmType::SwProtected)
            .or_fail("SW_PROTECTED VM")?
            .into_inner(),
    );
    let shared = Memfd::new("vm-space-attrs", len).or_fail("memfd")?;
    let mut view = shared.mmap().or_fail("mmap")?;
    // SAFETY: `view` maps `len` bytes read-write and outlives `attrs` (dropped first, in
    // reverse declaration order); nothing runs the vCPU.
    let attrs = unsafe { AttributeProbe::new(&vm, 0, GPA, len, view.addr()) }
        .map_err(|why| format!("KVM's attributes cannot be read here: {why}"))?;
    let private_pages = |attrs: &AttributeProbe| -> Result<Vec<u64>, Failed> {
        (0..16u64)
            .filter_map(|p| match attrs.is_private(GPA + p * PAGE) {
                Ok(true) => Some(Ok(p)),
                Ok(false) => None,
                Err(e) => Some(Err(Failed::from(format!("read attribute: {e}")))),
            })
            .collect()
    };
    let kvm = KvmVm::from_vm_fd(vm.clone(), Some(VmType::SwProtected));
    let dev = edu_devices(1)?.remove(0);
    let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
    let mut space =
        DmaSpace::iommufd(&iommufd, Some(kvm), SpaceOptions::default()).or_fail("space")?;
    space.attach(&dev).or_fail("attach")?;
    let edu = Edu::new(dev).or_fail("edu")?;

    let id = space
        .add_region(file_region(&shared, len)?)
        .or_fail("add")?;
    space
        .convert(GPA + 4 * PAGE, 4 * PAGE, PageState::Private, false)
        .or_fail("to private")?;
    space.remove_region(id).or_fail("remove")?;
    let before = private_pages(&attrs)?;
    check!(
        before == [4, 5, 6, 7],
        "KVM keeps the removed region's private pages: {before:?}"
    );

    // An obstacle at the region's IOVA: the kernel refuses the registration's map.
    let obstacle = Memfd::new("vm-space-obstacle", PAGE).or_fail("memfd")?;
    let ioas = space.ioas().ok_or("no IOAS")?;
    ioas.map_file(
        Iova::Fixed(GPA + 12 * PAGE),
        obstacle.file().as_fd(),
        0,
        PAGE,
        Access::READ_WRITE,
    )
    .or_fail("map the obstacle")?;
    let e = match space.add_region(file_region(&shared, len)?) {
        Err(e) => e,
        Ok(id) => return Err(format!("added {id} over an obstacle").into()),
    };
    check!(
        matches!(e, SpaceError::Exec { .. }),
        "the kernel's refusal, rolled back: {e}"
    );
    let after = private_pages(&attrs)?;
    check!(
        after == before,
        "a refused add_region changed KVM's attributes: private pages {before:?} -> {after:?} ({e})"
    );
    check!(space.regions().is_empty(), "no region after the refusal");
    space
        .ioas()
        .ok_or("no IOAS")?
        .unmap(GPA + 12 * PAGE, PAGE)
        .or_fail("remove the obstacle")?;
    dma_refused(&edu, &mut view, 0, GPA)?;

    // Without the obstacle the same registration works and makes every page shared.
    space
        .add_region(file_region(&shared, len)?)
        .or_fail("add again")?;
    let now = private_pages(&attrs)?;
    check!(now.is_empty(), "a shared region, yet private pages {now:?}");
    dma_works(&edu, &mut view, (5 * PAGE) as usize, GPA + 5 * PAGE, 6)?;
    Ok(())
}

/// A space with the edu attached and one convertible region whose first 4 pages are
/// private (their IOVAs unmapped but the region's).
fn space_with_private_head() -> Result<(DmaSpace, Edu, Memfd, MappedMemory), Failed> {
    let dev = edu_devices(1)?.remove(0);
    let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
    let mut space = DmaSpace::iommufd(&iommufd, None, SpaceOptions::default()).or_fail("space")?;
    space.attach(&dev).or_fail("attach")?;
    let shared = Memfd::new("vm-space-a", 16 * PAGE).or_fail("memfd")?;
    let view = shared.mmap().or_fail("mmap")?;
    space
        .add_region(file_region(&shared, 16 * PAGE)?)
        .or_fail("add")?;
    space
        .convert(GPA, 4 * PAGE, PageState::Private, false)
        .or_fail("to private")?;
    Ok((space, Edu::new(dev).or_fail("edu")?, shared, view))
}

fn overlapping_add_region_reaches_no_kernel_code() -> Result<(), Failed> {
    let (mut space, _edu, _shared, _view) = space_with_private_head()?;
    let other = Memfd::new("vm-space-b", 8 * PAGE).or_fail("memfd")?;
    let region = GuestRegion::new(
        GPA + 2 * PAGE,
        8 * PAGE,
        SharedMemory::File {
            fd: dup(other.file())?,
            offset: 0,
        },
    );
    // fail-nth = 1: the first fault-injection check of this thread in any syscall (an
    // allocation: a MAP_FILE probe, a /proc lookup) consumes it.
    let _fi = FaultInjection::enable().map_err(|e| format!("fault injection: {e}"))?;
    let nth = FailNth::open().or_fail("fail-nth")?;
    nth.arm(1).or_fail("arm")?;
    let r = space.add_region(region);
    let reached_kernel = nth.disarm().or_fail("disarm")?;
    let e = match r {
        Err(e) => e.to_string(),
        Ok(id) => return Err(format!("an overlapping region was added: {id}").into()),
    };
    check!(e.contains("overlaps"), "refused for the overlap: {e}");
    check!(
        !reached_kernel,
        "a region the planner refuses must be refused before any kernel call ({e})"
    );
    Ok(())
}

/// A VM fd from elsewhere (another kvm-ioctls, a privileged helper) drives a space's
/// conversions; an fd that is not a KVM VM is refused with the reason.
fn a_vm_given_as_an_fd_converts() -> Result<(), Failed> {
    let memfd = Memfd::new("not-a-vm", PAGE).or_fail("memfd")?;
    let e = match KvmVm::from_owned_fd(dup(memfd.file())?, None) {
        Err(e) => e.to_string(),
        Ok(_) => return Err("a memfd was taken for a KVM VM".into()),
    };
    check!(e.contains("not a KVM VM"), "{e}");
    let created = KvmVm::create(VmType::SwProtected).or_fail("VM")?;
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: `created` keeps the VM fd open across this borrow (dup'd at once).
    let fd = dup(unsafe { BorrowedFd::borrow_raw(created.vm_fd().as_raw_fd()) })?;
    let vm = KvmVm::from_owned_fd(fd, Some(VmType::SwProtected))
        .or_fail("VM from an fd")?
        .into_shared();
    check!(vm.supports_private(), "the adopted VM lost its type");
    let dev = edu_devices(1)?.remove(0);
    let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
    let space = DmaSpace::iommufd(&iommufd, Some(vm), SpaceOptions::default()).or_fail("space")?;
    let mut s = side(space, dev, "vm-from-fd")?;
    s.space
        .convert(GPA + 2 * PAGE, PAGE, PageState::Private, false)
        .or_fail("to private through the adopted VM")?;
    dma_refused(&s.edu, &mut s.view, (2 * PAGE) as usize, GPA + 2 * PAGE)?;
    // The attribute call went through the adopted fd (a SW_PROTECTED VM takes it; a wrong
    // fd would have failed the conversion), and the VMM's own handle still works.
    s.space
        .convert(GPA + 2 * PAGE, PAGE, PageState::Shared, false)
        .or_fail("back to shared")?;
    dma_works(&s.edu, &mut s.view, (2 * PAGE) as usize, GPA + 2 * PAGE, 9)?;
    created
        .set_private(GPA + 3 * PAGE, PAGE)
        .or_fail("the VMM's own handle")?;
    Ok(())
}
