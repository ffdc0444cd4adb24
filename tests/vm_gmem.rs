//! guest_memfd, memory attributes and shared backings against the real KVM (VM): what
//! each VM type accepts, mapping and hole punching, adoption, hugetlb memfds.

mod support;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use kvm_bindings::{kvm_create_guest_memfd, kvm_memory_attributes};
use libtest_mimic::Failed;
use support::needs::{self, Need};
use support::space::{dma_works, dup, space_with_edu, GPA};
use support::{run_vm_tests, OrFail};
use vfio_gmem::dma::planning::Op;
use vfio_gmem::dma::planning::{AttributesOp, Backing, DiscardOp};
use vfio_gmem::dma::{
    ExecError, GuestRegion, KvmAttributes, OpError, Outcome, PageState, RegionId, SharedMemory,
    SpaceError, SpaceOptions,
};
use vfio_gmem::gmem::{
    open_kvm, supported_vm_types, GmemError, GmemFlags, GuestMemfd, KvmVm, Memfd, MemoryAttributes,
    VmType, HUGE_PAGE_2M,
};

/// What the running kernel must offer (see `support::needs`); unmet: reported skipped.
const NEEDS: needs::Needs = &[
    (
        "kvm_reports_flags_and_attributes_per_vm_type",
        &[Need::PrivateMemory],
    ),
    (
        "sw_protected_accepts_mmap_refuses_init_shared",
        &[Need::PrivateMemory],
    ),
    (
        "memory_attributes_private_then_shared",
        &[Need::PrivateMemory],
    ),
];

fn main() {
    needs::declare(NEEDS);
    run_vm_tests(&[
        ("kvm_reports_flags_and_attributes_per_vm_type", reports_caps),
        (
            "default_vm_gmem_mmap_write_read_punch_hole",
            default_vm_gmem,
        ),
        (
            "sw_protected_accepts_mmap_refuses_init_shared",
            sw_protected_flags,
        ),
        ("memory_attributes_private_then_shared", memory_attributes),
        ("adopt_gmem_and_reject_other_fds", adopt),
        ("hugetlb_memfd_with_and_without_reserved_pages", hugetlb),
        (
            "hugetlb_pool_with_too_few_free_pages_is_explained",
            hugetlb_pool_short,
        ),
    ]);
}

const PAGE: usize = 4096;

fn reports_caps() -> Result<(), Failed> {
    let kvm = open_kvm().or_fail("open /dev/kvm")?;
    let types = supported_vm_types(&kvm);
    println!("KVM_CAP_VM_TYPES = {:#x} ({types})", types.bits());
    check!(
        types.contains(VmType::Default) && types.contains(VmType::SwProtected),
        "expected DEFAULT and SW_PROTECTED in {types}"
    );
    for (t, flags, attrs) in [
        (
            VmType::Default,
            GmemFlags::MMAP | GmemFlags::INIT_SHARED,
            MemoryAttributes::empty(),
        ),
        (
            VmType::SwProtected,
            GmemFlags::MMAP,
            MemoryAttributes::PRIVATE,
        ),
    ] {
        let vm = KvmVm::create_with(&kvm, t).or_fail("create VM")?;
        let got_flags = vm.guest_memfd_flags();
        let got_attrs = vm.memory_attributes();
        println!(
            "{t} VM: KVM_CAP_GUEST_MEMFD = {}, KVM_CAP_GUEST_MEMFD_FLAGS = {got_flags} ({:#x}), \
             KVM_CAP_MEMORY_ATTRIBUTES = {got_attrs} ({:#x})",
            vm.supports_guest_memfd(),
            got_flags.bits(),
            got_attrs.bits()
        );
        check!(vm.supports_guest_memfd(), "{t} VM: no guest_memfd");
        check!(
            got_flags == flags,
            "{t} VM accepts {got_flags}, expected {flags}"
        );
        check!(
            got_attrs == attrs,
            "{t} VM attributes {got_attrs}, expected {attrs}"
        );
        check!(
            vm.supports_private() == (t == VmType::SwProtected),
            "supports_private wrong for {t}"
        );
    }
    Ok(())
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn default_vm_gmem() -> Result<(), Failed> {
    let vm = KvmVm::create(VmType::Default).or_fail("create default VM")?;
    let gmem = vm
        .create_guest_memfd(4 * PAGE as u64, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
        .or_fail("create gmem MMAP|INIT_SHARED")?;
    check!(gmem.size() == 4 * PAGE as u64, "size {}", gmem.size());
    let mut map = gmem.mmap().or_fail("mmap gmem")?;
    for p in 0..4 {
        map.write(p * PAGE, &pattern(p as u8)).or_fail("write")?;
    }
    // A second mapping sees the same file content.
    let other = gmem
        .mmap_range(PAGE as u64, PAGE as u64)
        .or_fail("mmap page 1")?;
    check!(
        other.read_vec(0, PAGE).or_fail("read")? == pattern(1),
        "second mapping of page 1 differs"
    );
    for p in 0..4 {
        check!(
            map.read_vec(p * PAGE, PAGE).or_fail("read")? == pattern(p as u8),
            "page {p} did not read back"
        );
    }

    gmem.punch_hole(PAGE as u64, PAGE as u64)
        .or_fail("punch_hole page 1")?;
    check!(
        map.read_vec(PAGE, PAGE)
            .or_fail("read")?
            .iter()
            .all(|&b| b == 0),
        "page 1 not zero after punch_hole"
    );
    // Through the executor half: discard page 3 of the region's file.
    let mut k = KvmAttributes::new(&vm);
    k.discard_file(
        gmem.as_fd(),
        0,
        &DiscardOp {
            region: RegionId(0),
            backing: Backing::Opaque(0),
            gpa: 0,
            offset: 3 * PAGE as u64,
            len: PAGE as u64,
        },
    )
    .or_fail("discard page 3")?;
    check!(
        map.read_vec(3 * PAGE, PAGE)
            .or_fail("read")?
            .iter()
            .all(|&b| b == 0),
        "page 3 not zero after discard"
    );
    for p in [0usize, 2] {
        check!(
            map.read_vec(p * PAGE, PAGE).or_fail("read")? == pattern(p as u8),
            "page {p} changed by a punch elsewhere"
        );
    }
    let e = gmem.punch_hole(100, PAGE as u64).unwrap_err();
    println!("unaligned punch_hole: {e}");
    check!(e.to_string().contains("multiples of 0x1000"), "{e}");

    // Without MMAP the file cannot be mapped: explained before the call, and the kernel
    // agrees (ENODEV) for an adopted fd whose flags are unknown.
    let plain = vm
        .create_guest_memfd(PAGE as u64, GmemFlags::INIT_SHARED)
        .or_fail("create gmem INIT_SHARED")?;
    let e = plain.mmap().unwrap_err();
    println!("mmap without MMAP: {e}");
    check!(matches!(e, GmemError::MmapNotEnabled { .. }), "{e}");
    let adopted = GuestMemfd::adopt(plain.into_owned_fd()).or_fail("adopt")?;
    let e = adopted.mmap().unwrap_err();
    println!("mmap of adopted gmem without MMAP: {e}");
    check!(
        matches!(e, GmemError::MmapNotEnabled { flags: None, .. }),
        "{e}"
    );
    Ok(())
}

fn sw_protected_flags() -> Result<(), Failed> {
    let vm = KvmVm::create(VmType::SwProtected).or_fail("create SW_PROTECTED VM")?;
    let gmem = vm
        .create_guest_memfd(2 * PAGE as u64, GmemFlags::MMAP)
        .or_fail("create gmem MMAP")?;
    check!(
        gmem.flags() == Some(GmemFlags::MMAP),
        "flags {:?}",
        gmem.flags()
    );
    let map = gmem.mmap().or_fail("mmap SW_PROTECTED gmem")?;
    check!(map.len() == 2 * PAGE, "len {}", map.len());
    // Pages start private: touching them would SIGBUS, so the test only maps.
    gmem.punch_hole(0, PAGE as u64).or_fail("punch_hole")?;

    let fds = support::space::open_fds();
    let e = vm
        .create_guest_memfd(2 * PAGE as u64, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
        .unwrap_err();
    println!("SW_PROTECTED MMAP|INIT_SHARED: {e}");
    check!(
        support::space::open_fds() == fds,
        "the refused guest_memfd left an fd open"
    );
    check!(
        e.to_string()
            .starts_with("guest_memfd flag INIT_SHARED is refused on a SW_PROTECTED VM (EINVAL)")
            && e.to_string().ends_with("create with MMAP only"),
        "unexpected message: {e}"
    );
    // Nothing changed: the VM still creates the guest_memfd it accepts.
    vm.create_guest_memfd(PAGE as u64, GmemFlags::MMAP)
        .or_fail("MMAP guest_memfd after the refusal")?;
    // The kernel itself refuses it too (the check above is not stricter than KVM).
    let raw = vm.vm_fd().create_guest_memfd(kvm_create_guest_memfd {
        size: PAGE as u64,
        flags: (GmemFlags::MMAP | GmemFlags::INIT_SHARED).bits(),
        reserved: [0; 6],
    });
    check!(
        matches!(&raw, Err(e) if e.errno() == libc::EINVAL),
        "kernel answered {raw:?} to INIT_SHARED on SW_PROTECTED, expected EINVAL"
    );
    Ok(())
}

fn memory_attributes() -> Result<(), Failed> {
    const GPA: u64 = 0x1_0000_0000;
    let len = 16 * PAGE as u64;
    let vm = KvmVm::create(VmType::SwProtected).or_fail("create SW_PROTECTED VM")?;
    vm.set_private(GPA, len).or_fail("set private")?;
    vm.set_shared(GPA + PAGE as u64, PAGE as u64)
        .or_fail("set one page shared")?;
    vm.set_shared(GPA, len).or_fail("set shared")?;
    // The same through the executor half.
    let mut k = KvmAttributes::new(&vm);
    let op = AttributesOp {
        gpa: GPA,
        len,
        private: true,
    };
    k.set_attributes(&op).or_fail("executor private")?;
    k.set_attributes(&op.inverse()).or_fail("executor shared")?;
    let e = vm.set_private(GPA + 1, len).unwrap_err();
    println!("unaligned attributes: {e}");
    check!(e.to_string().contains("multiples of 0x1000"), "{e}");
    // Nothing changed: the same range still converts both ways.
    vm.set_private(GPA, len)
        .or_fail("private after the refusal")?;
    vm.set_shared(GPA, len)
        .or_fail("shared after the refusal")?;

    let def = KvmVm::create(VmType::Default).or_fail("create default VM")?;
    let fds = support::space::open_fds();
    let e = def.set_private(GPA, len).unwrap_err();
    println!("default VM private: {e}");
    check!(
        matches!(e, GmemError::AttributesUnsupported { .. })
            && e.to_string()
                .contains("this DEFAULT VM supports memory attributes none"),
        "{e}"
    );
    check!(
        KvmAttributes::new(&def).set_attributes(&op) == Err(OpError::from_errno(libc::EINVAL)),
        "executor on a default VM did not fail with EINVAL"
    );
    check!(
        support::space::open_fds() == fds,
        "refused attributes opened or closed an fd"
    );
    // The kernel agrees: PRIVATE on a default VM is EINVAL.
    let raw = def.vm_fd().set_memory_attributes(kvm_memory_attributes {
        address: GPA,
        size: len,
        attributes: MemoryAttributes::PRIVATE.bits(),
        flags: 0,
    });
    check!(
        matches!(&raw, Err(e) if e.errno() == libc::EINVAL),
        "kernel answered {raw:?} to PRIVATE on a default VM, expected EINVAL"
    );
    match def.set_shared(GPA, len) {
        Ok(()) => println!("default VM shared: accepted (no attribute bits)"),
        Err(e) => println!("default VM shared: {e}"),
    }
    Ok(())
}

fn adopt() -> Result<(), Failed> {
    let vm = KvmVm::create(VmType::Default).or_fail("create default VM")?;
    let gmem = vm
        .create_guest_memfd(8 * PAGE as u64, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
        .or_fail("create gmem")?;
    let link =
        std::fs::read_link(format!("/proc/self/fd/{}", gmem.as_raw_fd())).or_fail("readlink")?;
    println!("guest_memfd /proc/self/fd link: {}", link.display());
    check!(GuestMemfd::is_guest_memfd(&gmem), "is_guest_memfd false");
    let fd: OwnedFd = gmem.into_owned_fd();
    let raw = fd.as_raw_fd();
    let adopted = GuestMemfd::adopt_with_flags(fd, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
        .or_fail("adopt gmem")?;
    check!(adopted.as_raw_fd() == raw, "fd changed");
    check!(
        adopted.size() == 8 * PAGE as u64,
        "adopted size {}",
        adopted.size()
    );
    let mut map = adopted.mmap().or_fail("mmap adopted")?;
    map.write(0, b"adopted").or_fail("write")?;
    check!(
        map.read_vec(0, 7).or_fail("read")? == b"adopted",
        "read back"
    );

    // Refused adoptions change nothing: the file keeps its size and contents, and the
    // fd handed over is closed, not leaked.
    let mem = Memfd::new("not-gmem", PAGE as u64).or_fail("memfd")?;
    let mut view = mem.mmap().or_fail("mmap memfd")?;
    view.write(0, b"keep").or_fail("write")?;
    let fds = support::space::open_fds();
    let given: OwnedFd = mem.file().try_clone().or_fail("dup")?.into();
    let e = GuestMemfd::adopt(given).unwrap_err();
    println!("adopt memfd: {e}");
    check!(
        e.to_string().contains("it is a memfd (/memfd:not-gmem"),
        "{e}"
    );
    check!(
        support::space::open_fds() == fds,
        "the refused adoption leaked or closed an fd"
    );
    check!(
        mem.file().metadata().or_fail("stat")?.len() == PAGE as u64
            && view.read_vec(0, 4).or_fail("read")? == b"keep",
        "the refused adoption changed the memfd"
    );
    let kvm = std::fs::File::open("/dev/kvm").or_fail("open /dev/kvm")?;
    let e = GuestMemfd::adopt(kvm.into()).unwrap_err();
    println!("adopt /dev/kvm: {e}");
    check!(
        e.to_string()
            .contains("it is the character device /dev/kvm"),
        "{e}"
    );
    let path = std::env::temp_dir().join("vfio-gmem-vm-adopt");
    let file = std::fs::File::create(&path).or_fail("create file")?;
    let e = GuestMemfd::adopt(file.into()).unwrap_err();
    let _ = std::fs::remove_file(&path);
    println!("adopt regular file: {e}");
    check!(e.to_string().contains("it is the regular file"), "{e}");
    Ok(())
}

/// Sets the 2 MiB pool's size (sysfs: present even on kernels without sysctl) and puts
/// the old value back on drop.
struct HugePages(String);

impl HugePages {
    const PATH: &'static str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

    fn set(n: u64) -> Result<Self, Failed> {
        let old = std::fs::read_to_string(Self::PATH).or_fail("read nr_hugepages")?;
        std::fs::write(Self::PATH, n.to_string()).or_fail("write nr_hugepages")?;
        Ok(HugePages(old.trim().to_string()))
    }

    fn now() -> String {
        std::fs::read_to_string(Self::PATH)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// The pool's `free_hugepages`.
    fn free() -> Result<u64, Failed> {
        let path = Self::PATH.replace("nr_hugepages", "free_hugepages");
        std::fs::read_to_string(&path)
            .or_fail(&path)?
            .trim()
            .parse()
            .or_fail(&path)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

fn hugetlb() -> Result<(), Failed> {
    let size = 2 * HUGE_PAGE_2M;
    {
        let _none = HugePages::set(0)?;
        let mem = Memfd::hugetlb("huge-none", size).or_fail("memfd hugetlb")?;
        check!(mem.page_size() == HUGE_PAGE_2M, "page size");
        let e = mem.mmap().unwrap_err();
        println!("hugetlb mmap without reserved pages: {e}");
        check!(
            matches!(e, GmemError::NoHugePages { .. })
                && e.to_string()
                    .contains("echo N > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
            "{e}"
        );
        let e = mem.allocate(0, size).unwrap_err();
        println!("hugetlb allocate without reserved pages: {e}");
        check!(matches!(e, GmemError::NoHugePages { .. }), "{e}");
        // Nothing changed: the pool and the file are as they were.
        check!(
            HugePages::now() == "0" && mem.file().metadata().or_fail("stat")?.len() == size,
            "the refusals changed the pool ({}) or the file",
            HugePages::now()
        );
    }
    let _two = HugePages::set(2)?;
    check!(
        HugePages::now() == "2",
        "could not reserve 2 huge pages (nr_hugepages = {})",
        HugePages::now()
    );
    let mem = Memfd::hugetlb("huge-two", size).or_fail("memfd hugetlb")?;
    let mut map = mem.mmap().or_fail("mmap hugetlb memfd")?;
    let step = HUGE_PAGE_2M as usize;
    map.write(0, &pattern(1)).or_fail("write")?;
    map.write(step, &pattern(2)).or_fail("write")?;
    check!(
        map.read_vec(step, PAGE).or_fail("read")? == pattern(2),
        "read back"
    );
    mem.punch_hole(HUGE_PAGE_2M, HUGE_PAGE_2M)
        .or_fail("punch second huge page")?;
    check!(
        map.read_vec(step, PAGE)
            .or_fail("read")?
            .iter()
            .all(|&b| b == 0),
        "second huge page not zero after punch_hole"
    );
    check!(
        map.read_vec(0, PAGE).or_fail("read")? == pattern(1),
        "first huge page changed"
    );
    mem.allocate(0, size).or_fail("allocate both huge pages")?;
    Ok(())
}

/// The plan's ExecError, kept inside `NoHugePages`'s source: the failed op is a map and
/// the plan was rolled back.
fn rolled_back_map_inside(e: &SpaceError) -> Result<(), Failed> {
    let SpaceError::Gmem(g @ GmemError::NoHugePages { source, .. }) = e else {
        return Err(format!("not NoHugePages: {e:?}").into());
    };
    let exec = source
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<ExecError>())
        .ok_or_else(|| {
            format!("NoHugePages's source does not hold the plan's error: {source:?}")
        })?;
    check!(
        matches!(exec.op, Op::Map(_))
            && exec.error.errno == libc::ENOMEM
            && exec.outcome == Outcome::RolledBack
            && g.errno() == libc::ENOMEM,
        "the plan's error: {exec:?}, errno {}",
        g.errno()
    );
    Ok(())
}

/// A 2 MiB pool with some but too few free pages: `add_region` of an 8 MiB hugetlb memfd
/// with 2 pages free (the MAP_FILE probe's one page succeeds, the full map fails with
/// ENOMEM), then a conversion back to shared after a discard gave a page back that
/// something else took. Both get `NoHugePages` naming the pool, rolled back.
fn hugetlb_pool_short() -> Result<(), Failed> {
    const SIZE: u64 = 4 * HUGE_PAGE_2M;
    let pool_path = HugePages::PATH;
    let region = |mem: &Memfd| -> Result<GuestRegion, Failed> {
        Ok(GuestRegion::new(
            GPA,
            SIZE,
            SharedMemory::File {
                fd: dup(mem.file())?,
                offset: 0,
            },
        )
        .convertible(PageState::Shared))
    };
    {
        let _two = HugePages::set(2)?;
        check!(
            HugePages::now() == "2" && HugePages::free()? == 2,
            "could not reserve 2 free huge pages (nr_hugepages = {})",
            HugePages::now()
        );
        let mem = Memfd::hugetlb("huge-short", SIZE).or_fail("memfd hugetlb")?;
        let (mut space, _edu) = space_with_edu(None, SpaceOptions::default())?;
        let e = space.add_region(region(&mem)?).unwrap_err();
        println!("add_region with 2 of 4 huge pages free: {e}");
        check!(
            matches!(
                &e,
                SpaceError::Gmem(GmemError::NoHugePages { page_size, pages: 4, .. })
                    if *page_size == HUGE_PAGE_2M
            ),
            "{e:?}"
        );
        let m = e.to_string();
        check!(
            m.starts_with(&format!(
                "no free 2 MiB huge pages for mapping new region GPA [{GPA:#x}, +{SIZE:#x}) \
                 (rolled back: nothing was changed"
            )) && m.contains("pool ran out) (4 needed): op 0 (map IOVA")
                && m.contains(&format!(
                    "echo N > {pool_path}` (N = the pages others use + 4; now 2)"
                )),
            "{m}"
        );
        rolled_back_map_inside(&e)?;
        check!(
            space.regions().is_empty()
                && space.area_count() == 0
                && space.ioas().map(|i| i.areas().len()) == Some(0),
            "the refused region left state behind: {:?}, {} areas",
            space.regions(),
            space.area_count()
        );
        check!(
            HugePages::now() == "2",
            "the pool changed: {}",
            HugePages::now()
        );
        println!(
            "  free 2 MiB pages while the refused file is open: {}",
            HugePages::free()?
        );
        drop(space);
        drop(mem);
        // The pages the failed pin put into the file go back with it.
        check!(
            HugePages::free()? == 2,
            "{} of 2 pages free after the file closed",
            HugePages::free()?
        );
    }

    // Enough pages: the region maps; a discard frees a page, something else takes it,
    // and converting the range back to shared needs it again.
    let _four = HugePages::set(4)?;
    check!(
        HugePages::free()? == 4,
        "could not reserve 4 free huge pages"
    );
    let mem = Memfd::hugetlb("huge-short", SIZE).or_fail("memfd hugetlb")?;
    let (mut space, edu) = space_with_edu(None, SpaceOptions::default())?;
    space
        .add_region(region(&mem)?)
        .or_fail("add_region with 4 free pages")?;
    let mut view = mem.mmap().or_fail("mmap")?;
    let step = HUGE_PAGE_2M;
    space
        .convert(GPA + step, step, PageState::Private, true)
        .or_fail("convert the second huge page private, discarding it")?;
    check!(HugePages::free()? == 1, "the discard freed no huge page");
    let hog = Memfd::hugetlb("huge-hog", HUGE_PAGE_2M).or_fail("memfd hugetlb")?;
    hog.allocate(0, HUGE_PAGE_2M)
        .or_fail("take the freed page")?;
    check!(HugePages::free()? == 0, "the pool still has free pages");
    let (areas, regions) = (space.area_count(), format!("{:?}", space.regions()));
    let e = space
        .convert(GPA + step, step, PageState::Shared, false)
        .unwrap_err();
    println!("convert to shared with no free page: {e}");
    check!(
        matches!(
            &e,
            SpaceError::Gmem(GmemError::NoHugePages { page_size, pages: 1, .. })
                if *page_size == HUGE_PAGE_2M
        ),
        "{e:?}"
    );
    let m = e.to_string();
    check!(
        m.starts_with(&format!(
            "no free 2 MiB huge pages for converting GPA [{:#x}, +{step:#x}) to shared \
             (rolled back: nothing was changed",
            GPA + step
        )) && m.contains("pool ran out) (1 needed): ")
            && m.contains(&format!("echo N > {pool_path}`")),
        "{m}"
    );
    rolled_back_map_inside(&e)?;
    check!(
        space.page_state(GPA + step) == Some(PageState::Private)
            && space.area_count() == areas
            && format!("{:?}", space.regions()) == regions
            && HugePages::now() == "4",
        "the refused conversion changed state: {:?}, {} areas",
        space.page_state(GPA + step),
        space.area_count()
    );
    // The neighbours are still reachable (the converted page is not touched through the
    // view: faulting it would need a huge page).
    let iova = |off: u64| GPA + off;
    dma_works(&edu, &mut view, 0, iova(0), 1)?;
    dma_works(&edu, &mut view, 2 * step as usize, iova(2 * step), 2)?;
    // With the page back in the pool the same conversion goes through.
    drop(hog);
    space
        .convert(GPA + step, step, PageState::Shared, false)
        .or_fail("convert to shared once a page is free")?;
    dma_works(&edu, &mut view, step as usize, iova(step), 3)?;
    Ok(())
}
