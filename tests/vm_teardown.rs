//! Teardown on the real kernel (VM): dropping every object, in every order, leaves no fd,
//! no pinned page and no log warning behind, and the device works again; a process that
//! held the device with memory mapped and was SIGKILLed leaves the device reusable and
//! its pinned memory freed.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use support::needs::{self, Need};
use support::raw::{self as sys, iommufd_uapi as iu};
use support::space::{self as sp, GPA, PAGE};
use support::{pci, run_vm_tests, OrFail};
use vfio_gmem::dma::{DmaSpace, GuestRegion, PageState, SharedMemory, SpaceOptions};
use vfio_gmem::engine::edu::Edu;
use vfio_gmem::engine::DmaEngine;
use vfio_gmem::gmem::{GmemFlags, Memfd, VmType};
use vfio_gmem::iommufd::Iommufd;
use vfio_gmem::vfio::Device;

const BIN: &str = env!("CARGO_BIN_EXE_vfio-gmem");

/// What the running kernel must offer (see `support::needs`); unmet: reported skipped.
const NEEDS: needs::Needs = &[
    ("*", &[Need::Iommufd]),
    (
        "drop_in_every_order_leaves_no_fds_pins_or_warnings",
        &[Need::PrivateMemory],
    ),
    (
        "killed_assign_process_releases_device_and_pins",
        &[Need::PrivateMemory],
    ),
];

fn main() {
    needs::declare(NEEDS);
    install_logger();
    run_vm_tests(&[
        (
            "drop_in_every_order_leaves_no_fds_pins_or_warnings",
            drop_in_every_order_leaves_no_fds_pins_or_warnings,
        ),
        (
            "killed_assign_process_releases_device_and_pins",
            killed_assign_process_releases_device_and_pins,
        ),
    ]);
}

/// Every log record of the library, captured.
static LOGS: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        LOGS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((r.level(), r.args().to_string()));
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture;

fn install_logger() {
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Debug);
}

fn take_logs() -> Vec<(log::Level, String)> {
    std::mem::take(&mut *LOGS.lock().unwrap_or_else(|p| p.into_inner()))
}

/// `IOMMU_DESTROY` of an object id, raw: Ok if it existed and was free, else the errno.
fn raw_destroy(iommufd: BorrowedFd<'_>, id: u32) -> Result<(), i32> {
    let mut d: iu::iommu_destroy = sys::zeroed();
    d.size = std::mem::size_of_val(&d) as u32;
    d.id = id;
    sys::ioctl_mut(iommufd, sys::IOMMU_DESTROY, &mut d)
        .map(drop)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))
}

#[derive(Clone, Copy, Debug)]
/// What goes first at teardown.
enum Order {
    /// The device closes first (it detaches), then the space.
    Device,
    /// The space drops while the device is still attached (the old warning).
    Space,
    /// `DmaSpace::detach`, then the space, then the device.
    Detach,
}

fn fd_diff(before: &[String], after: &[String]) -> String {
    let (b, a): (BTreeSet<_>, BTreeSet<_>) = (before.iter().collect(), after.iter().collect());
    format!(
        "opened {:?}, closed {:?}",
        a.difference(&b).collect::<Vec<_>>(),
        b.difference(&a).collect::<Vec<_>>()
    )
}

/// One full life: Iommufd, KvmVm, GuestMemfd, memfd, DmaSpace, Device; conversions; DMA;
/// then everything dropped in `order`. Returns the debug lines about teardown.
fn one_life(order: Order, round: u8) -> Result<(), Failed> {
    let len = 64 * PAGE;
    let pin0 = sp::status_kib("VmPin");
    let bdf = sp::first_edu()?;
    let iommufd = Arc::new(Iommufd::open().or_fail("open /dev/iommu")?);
    let vm = sp::arc_vm(VmType::SwProtected)?;
    let gmem = vm
        .create_guest_memfd(len, GmemFlags::MMAP)
        .or_fail("private gmem")?;
    let shared = Memfd::new("teardown-shared", len).or_fail("memfd")?;
    let mut view = shared.mmap().or_fail("mmap")?;
    let mut space =
        DmaSpace::iommufd(&iommufd, Some(vm), SpaceOptions::default()).or_fail("space")?;
    let dev = Device::open_cdev(pci::vfio_cdev(&bdf).or_fail("cdev")?).or_fail("open edu")?;
    space.attach(&dev).or_fail("attach")?;
    let edu = Edu::new(dev).or_fail("edu")?;
    space
        .add_region(
            GuestRegion::new(
                GPA,
                len,
                SharedMemory::File {
                    fd: sp::dup(shared.file())?,
                    offset: 0,
                },
            )
            .convertible(PageState::Shared),
        )
        .or_fail("add region")?;
    space
        .convert(GPA + 8 * PAGE, 8 * PAGE, PageState::Private, true)
        .or_fail("convert")?;
    sp::dma_works(&edu, &mut view, 0, GPA, round)?;
    sp::dma_refused(&edu, &mut view, (8 * PAGE) as usize, GPA + 8 * PAGE)?;
    let pinned = sp::status_kib("VmPin");
    check!(
        pinned >= pin0 + 56 * 4,
        "expected ≥ 224 KiB pinned while mapped, VmPin {pin0} → {pinned} KiB"
    );
    let ioas = space.ioas().ok_or("no IOAS")?.id();
    let fd = iommufd.as_fd();
    match order {
        Order::Device => {
            drop(edu);
            drop(space);
            let r = raw_destroy(fd, ioas);
            check!(
                r == Err(libc::ENOENT),
                "IOAS {ioas} should be gone after the space dropped: destroy answered {r:?}"
            );
        }
        Order::Space => {
            drop(space);
            // The device is still open and was never detached: the IOAS is emptied, so
            // nothing stays pinned and the device reaches nothing.
            let pin = sp::status_kib("VmPin");
            check!(
                pin == pin0,
                "space dropped with the device attached: VmPin {pin0} → {pin} KiB (pages still pinned)"
            );
            sp::dma_refused(&edu, &mut view, 0, GPA)?;
            let r = sp::raw_unmap(fd, ioas, 0, u64::MAX);
            check!(r == Ok(0), "the IOAS left behind holds {r:?} bytes");
            let r = raw_destroy(fd, ioas);
            check!(
                r == Err(libc::EBUSY),
                "the IOAS should linger while the device uses it: destroy answered {r:?}"
            );
            check!(iommufd.reap_orphans() == 1, "the IOAS is not an orphan");
            drop(edu);
            // Once the device is closed, the library destroys the orphan.
            check!(
                iommufd.reap_orphans() == 0,
                "the orphaned IOAS is still pending after its device closed"
            );
            let r = raw_destroy(fd, ioas);
            check!(
                r == Err(libc::ENOENT),
                "the orphaned IOAS should be destroyed: destroy answered {r:?}"
            );
        }
        Order::Detach => {
            space.detach(edu.device()).or_fail("detach")?;
            check!(
                space.attached_devices().count() == 0,
                "still listed as attached"
            );
            sp::dma_refused(&edu, &mut view, 0, GPA)?;
            let e = space.detach(edu.device()).err().ok_or("second detach")?;
            check!(e.to_string().contains("not attached"), "{e}");
            drop(space);
            let r = raw_destroy(fd, ioas);
            check!(
                r == Err(libc::ENOENT),
                "IOAS {ioas} should be gone after detach + drop: destroy answered {r:?}"
            );
            drop(edu);
        }
    }
    drop((view, shared, gmem, iommufd));
    Ok(())
}

/// Dropping every object (DmaSpace, device, Iommufd, KvmVm, GuestMemfd, memfd) in three
/// orders: fds and VmPin back to their baseline, no warning logged, the device works again.
fn drop_in_every_order_leaves_no_fds_pins_or_warnings() -> Result<(), Failed> {
    let (fds0, pin0) = (sp::open_fds(), sp::status_kib("VmPin"));
    take_logs();
    let orders = [Order::Device, Order::Space, Order::Detach];
    for (round, order) in orders.into_iter().enumerate() {
        one_life(order, round as u8)
            .map_err(|e| format!("{order:?}: {}", e.message().unwrap_or_default()))?;
        let (fds, pin) = (sp::open_fds(), sp::status_kib("VmPin"));
        check!(
            fds == fds0,
            "{order:?}: fds changed: {}",
            fd_diff(&fds0, &fds)
        );
        check!(
            pin == pin0,
            "{order:?}: VmPin {pin0} KiB before, {pin} KiB after"
        );
        let logs = take_logs();
        let loud: Vec<_> = logs
            .iter()
            .filter(|(l, _)| *l <= log::Level::Warn)
            .collect();
        check!(loud.is_empty(), "{order:?}: teardown logged {loud:?}");
        let emptied = logs
            .iter()
            .any(|(_, m)| m.contains("is still attached") && m.contains("unmapped"));
        check!(
            emptied == matches!(order, Order::Space),
            "{order:?}: the 'still attached, emptied' path ran: {emptied}"
        );
        eprintln!(
            "{order:?}: {} fds, VmPin {pin} KiB as before; {} log records, none above debug",
            fds.len(),
            logs.len()
        );
    }
    // And once more, to show the device is fine after all that.
    let (mut space, edu, _shared, mut view) =
        sp::confidential_setup(SpaceOptions::default(), 16 * PAGE)?;
    space
        .convert(GPA, PAGE, PageState::Private, false)
        .or_fail("convert")?;
    sp::dma_works(&edu, &mut view, PAGE as usize, GPA + PAGE, 9)?;
    sp::dma_refused(&edu, &mut view, 0, GPA)?;
    Ok(())
}

/// Starts `vfio-gmem assign` on `bdf` with `args`, waits for its ready event, sends
/// `commands` and waits for their answers. Returns the child and its stdout (keep it
/// open: the child would get SIGPIPE otherwise).
fn assign(
    bdf: &str,
    args: &[&str],
    commands: &[&str],
) -> Result<(std::process::Child, BufReader<std::process::ChildStdout>), Failed> {
    let mut child = Command::new(BIN)
        .args(["assign", bdf, "--json", "--gpa", "0x100000000"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .or_fail("spawn vfio-gmem assign")?;
    let mut out = BufReader::new(child.stdout.take().ok_or("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line).or_fail("ready event")?;
    check!(
        line.contains("\"ready\""),
        "assign did not get ready: {line:?}"
    );
    let stdin = child.stdin.as_mut().ok_or("stdin")?;
    for c in commands {
        writeln!(stdin, "{c}").or_fail("command")?;
        line.clear();
        out.read_line(&mut line).or_fail("answer")?;
        check!(line.contains("\"ok\":true"), "{c}: {line:?}");
    }
    Ok((child, out))
}

/// A `vfio-gmem assign` process holds the device attached with memory mapped (pinned);
/// it is SIGKILLed. The device must be usable by this process right after, and the
/// memory the child had pinned freed (its shmem pages return: a leaked pin keeps them).
fn killed_assign_process_releases_device_and_pins() -> Result<(), Failed> {
    let bdf = sp::first_edu()?;
    let (fds0, pin0) = (sp::open_fds(), sp::status_kib("VmPin"));
    let mib = 32u64;
    for (what, args, commands) in [
        (
            "memfd, all mapped",
            vec!["--backing", "memfd", "--memory", "32M"],
            vec![],
        ),
        (
            "confidential, half shared",
            vec!["--confidential", "--memory", "64M"],
            vec!["shared 0x100000000 32M", "private 0x100000000 4K"],
        ),
    ] {
        let shmem0 = sp::meminfo_kib("Shmem");
        let (mut child, stdout) = assign(&bdf, &args, &commands)?;
        let held = sp::meminfo_kib("Shmem");
        check!(
            held >= shmem0 + (mib - 1) * 1024,
            "{what}: the child's mapping should pin ~{mib} MiB of shmem: Shmem {shmem0} → {held} KiB"
        );
        // While the child lives, the device is taken.
        let other = Iommufd::open().or_fail("iommufd")?;
        let dev = Device::open_pci(bdf.parse().or_fail("bdf")?).or_fail("second open")?;
        let e = dev
            .bind_iommufd(other.as_fd())
            .err()
            .ok_or("the device was free while assign held it")?;
        check!(e.to_string().contains("already bound"), "{e}");
        drop((dev, other));

        let t0 = Instant::now();
        child.kill().or_fail("SIGKILL")?;
        let status = child.wait().or_fail("wait")?;
        check!(
            std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL),
            "{what}: child ended with {status:?}"
        );
        drop(stdout);
        // The child's files are released when it dies; give deferred work a moment.
        let mut shmem = sp::meminfo_kib("Shmem");
        while shmem > shmem0 + 1024 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
            shmem = sp::meminfo_kib("Shmem");
        }
        check!(
            shmem <= shmem0 + 1024,
            "{what}: Shmem {shmem0} KiB before the child, {held} KiB while it held the device, \
             {shmem} KiB 10 s after SIGKILL: its pinned pages were not released"
        );
        // The device is usable here at once.
        let (mut space, edu, _shared, mut view) =
            sp::confidential_setup(SpaceOptions::default(), 16 * PAGE)?;
        sp::dma_works(&edu, &mut view, 0, GPA, 3)?;
        space
            .convert(GPA, PAGE, PageState::Private, false)
            .or_fail("convert")?;
        sp::dma_refused(&edu, &mut view, 0, GPA)?;
        drop((space, edu, view));
        eprintln!(
            "{what}: Shmem {shmem0} → {held} KiB while assigned → {shmem} KiB {} ms after \
             SIGKILL; device reused, DMA works",
            t0.elapsed().as_millis()
        );
    }
    let (fds, pin) = (sp::open_fds(), sp::status_kib("VmPin"));
    check!(fds == fds0, "fds changed: {}", fd_diff(&fds0, &fds));
    check!(pin == pin0, "VmPin {pin0} KiB before, {pin} KiB after");
    Ok(())
}
