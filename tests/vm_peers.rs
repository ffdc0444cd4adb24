//! A backend process (examples/peer_backend) that is killed or stops answering, with a
//! real `DmaSpace` (iommufd, a SW_PROTECTED VM's attributes, guest_memfd) and the edu
//! device: the next conversion to private fails naming the backend, and the page stays
//! shared and mapped (the device still reaches it: DMA round trip); without the
//! listener, conversions go on and the device is refused the private page.
//! The order while the backend is healthy is `vm_vmm`'s
//! (`a_backend_process_lets_go_before_each_conversion`).

mod support;

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use support::needs::{self, Need};
use support::space::{confidential, dma_refused, dma_works, Confidential, GPA, PAGE};
use support::{run_vm_tests, OrFail};
use vfio_gmem::dma::{PageState, SpaceError, SpaceOptions};
use vfio_gmem::peer::{Peer, PeerError};

const NEEDS: needs::Needs = &[("*", &[Need::Iommufd, Need::PrivateMemory])];
const LEN: u64 = 16 * PAGE;

fn main() {
    needs::declare(NEEDS);
    run_vm_tests(&[
        (
            "a_killed_backend_refuses_private_and_the_page_stays_mapped",
            a_killed_backend_refuses_private_and_the_page_stays_mapped,
        ),
        (
            "a_stopped_backend_times_out_and_the_page_stays_mapped",
            a_stopped_backend_times_out_and_the_page_stays_mapped,
        ),
    ]);
}

/// `target/<profile>/examples/peer_backend` (scripts/vm-test builds the examples).
fn backend_binary() -> Result<PathBuf, Failed> {
    let exe = std::env::current_exe().or_fail("current_exe")?;
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .ok_or("test binary is not in target/<profile>/deps")?
        .join("examples/peer_backend");
    check!(
        bin.exists(),
        "{} is missing; build it on the host: cargo build --examples (scripts/vm-test does)",
        bin.display()
    );
    Ok(bin)
}

/// The space with the edu device, and a backend registered on it.
fn setup() -> Result<(Confidential, Peer, Child), Failed> {
    let c = confidential(SpaceOptions::default(), LEN)?;
    let (peer, theirs) = Peer::pair("backend").or_fail("socket pair")?;
    let child = Command::new(backend_binary()?)
        .args(["--fd", "0", "--no-mark"])
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .spawn()
        .or_fail("starting the backend")?;
    peer.add_region(GPA, LEN, c.shared.file().as_fd(), 0)
        .or_fail("memory table")?;
    let mut c = c;
    c.space
        .add_listener(Box::new(peer.clone()))
        .or_fail("add_listener")?;
    Ok((c, peer, child))
}

fn iova(gpa: u64) -> u64 {
    gpa // the region maps IOVA = GPA
}

/// The conversion to private of page `n` fails with `ListenerRelease` whose source is the
/// `PeerError` `want` accepts; the page is still shared and the device still reaches it.
fn refused_and_still_mapped(
    c: &mut Confidential,
    n: u64,
    want: fn(&PeerError) -> bool,
) -> Result<(), Failed> {
    let gpa = GPA + n * PAGE;
    let err = match c.space.convert(gpa, PAGE, PageState::Private, true) {
        Ok(_) => return Err("the conversion went through without the backend's answer".into()),
        Err(e) => e,
    };
    match &err {
        SpaceError::ListenerRelease { name, source, .. } => {
            check!(name == "backend", "names {name:?}");
            let pe = source
                .downcast_ref::<PeerError>()
                .ok_or("source is not a PeerError")?;
            check!(want(pe), "unexpected cause: {pe:?}");
        }
        other => return Err(format!("expected ListenerRelease, got {other:?}").into()),
    }
    check!(err.to_string().contains("nothing was converted"), "{err}");
    check!(
        c.space.page_state(gpa) == Some(PageState::Shared),
        "the space says {:?}",
        c.space.page_state(gpa)
    );
    dma_works(&c.edu, &mut c.view, (n * PAGE) as usize, iova(gpa), 0x31)?;
    Ok(())
}

/// Without the listener, page `n` converts and the device is refused it.
fn goes_on_without_it(c: &mut Confidential, n: u64) -> Result<(), Failed> {
    let ids: Vec<_> = c.space.listeners().map(|(id, _)| id).collect();
    for id in ids {
        c.space.remove_listener(id);
    }
    let gpa = GPA + n * PAGE;
    c.space
        .convert(gpa, PAGE, PageState::Private, true)
        .or_fail("conversion without the listener")?;
    dma_refused(&c.edu, &mut c.view, (n * PAGE) as usize, iova(gpa))
}

fn a_killed_backend_refuses_private_and_the_page_stays_mapped() -> Result<(), Failed> {
    let (mut c, _peer, mut child) = setup()?;
    // Healthy first: a conversion goes through and the device is refused the page.
    c.space
        .convert(GPA + 2 * PAGE, PAGE, PageState::Private, true)
        .or_fail("conversion with a healthy backend")?;
    dma_refused(
        &c.edu,
        &mut c.view,
        (2 * PAGE) as usize,
        iova(GPA + 2 * PAGE),
    )?;
    child.kill().or_fail("kill")?;
    child.wait().or_fail("wait")?;
    refused_and_still_mapped(&mut c, 3, |e| matches!(e, PeerError::Closed { .. }))?;
    goes_on_without_it(&mut c, 3)
}

fn a_stopped_backend_times_out_and_the_page_stays_mapped() -> Result<(), Failed> {
    let (mut c, peer, mut child) = setup()?;
    peer.set_timeout(Duration::from_millis(500));
    let pid = child.id() as i32;
    // SAFETY: kill(2) takes a pid and a signal number, no memory.
    check!(unsafe { libc::kill(pid, libc::SIGSTOP) } == 0, "SIGSTOP");
    // kill(2) returns before the stop takes effect: wait for state T.
    let t = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).or_fail("stat")?;
        if stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            == Some("T")
        {
            break;
        }
        check!(t.elapsed() < Duration::from_secs(10), "{pid} never stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    let r = refused_and_still_mapped(&mut c, 5, |e| matches!(e, PeerError::Timeout { .. }));
    let waited = t.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    r?;
    check!(
        waited >= Duration::from_millis(500),
        "returned after {waited:?}, before the timeout"
    );
    goes_on_without_it(&mut c, 5)?;
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
