//! The peer protocol end to end on the host: a `DmaSpace` (its IOMMU played by the fake
//! kernel) with the reference backend process (`examples/peer_backend`) registered as a
//! listener through a real `SOCK_SEQPACKET` connection, sharing a real memfd.
//!
//! What the backend reaches is read from outside it, in `/proc/<pid>/maps`: after every
//! conversion returns, the memfd pages mapped in the backend are exactly the shared
//! pages (so a conversion to private returned only after the backend's mapping was gone,
//! and pages that stayed shared were never unmapped: the backend's own audit after every
//! request, reflected in its exit status, covers the moments in between). What it wrote
//! is read back through the memfd. A stopped backend (timeout) and a killed one (closed)
//! make the next conversion to private fail with nothing changed.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vfio_gmem::dma::planning::RangeSet;
use vfio_gmem::dma::{
    DmaSpace, FakeKernel, GuestRegion, PageState, SharedMemory, SpaceError, SpaceOptions,
    UserAddress,
};
use vfio_gmem::gmem::Memfd;
use vfio_gmem::peer::{Peer, PeerError};

const P: u64 = 4096;
const GPA: u64 = 0x1_0000_0000;
const LEN: u64 = 2 << 20;

struct Setup {
    space: DmaSpace,
    peer: Peer,
    child: Child,
    memfd: Memfd,
    name: String,
    reaper: Reaper,
}

fn backend_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples/peer_backend");
    assert!(
        bin.exists(),
        "{} is missing: cargo test builds it (cargo build --example peer_backend)",
        bin.display()
    );
    bin
}

fn setup(tag: &str) -> Setup {
    let name = format!("peer-host-{tag}-{}", std::process::id());
    let memfd = Memfd::new(&name, LEN).unwrap();
    let mut space = DmaSpace::with_executor(Box::new(FakeKernel::new()), SpaceOptions::default());
    // SAFETY: the fake kernel never touches the address.
    let shared = SharedMemory::Address {
        addr: unsafe { UserAddress::new(0x7f00_0000_0000) },
    };
    space
        .add_region(GuestRegion::new(GPA, LEN, shared).convertible(PageState::Shared))
        .unwrap();
    let (peer, theirs) = Peer::pair("backend").unwrap();
    let child = Command::new(backend_binary())
        .args(["--fd", "0"])
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    peer.set_timeout(Duration::from_secs(10));
    peer.add_region(GPA, LEN, memfd.file().as_fd(), 0).unwrap();
    space.add_listener(Box::new(peer.clone())).unwrap();
    let reaper = Reaper(Some(child.id() as i32));
    Setup {
        space,
        peer,
        child,
        memfd,
        name,
        reaper,
    }
}

/// The memfd offsets the backend has mapped, from its `/proc/<pid>/maps`.
fn mapped_in_backend(s: &Setup) -> RangeSet {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.child.id())).unwrap();
    let mut set = RangeSet::new();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[5].starts_with(&format!("/memfd:{}", s.name)) {
            continue;
        }
        let (a, b) = f[0].split_once('-').unwrap();
        let len = u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap();
        let off = u64::from_str_radix(f[2], 16).unwrap();
        set.insert(GPA + off..GPA + off + len);
    }
    set
}

fn shared_pages(space: &DmaSpace) -> RangeSet {
    let mut set = RangeSet::new();
    for p in (GPA..GPA + LEN).step_by(P as usize) {
        if space.page_state(p) == Some(PageState::Shared) {
            set.insert(p..p + P);
        }
    }
    set
}

fn assert_backend_maps_exactly_the_shared_pages(s: &Setup) {
    let (mapped, shared) = (mapped_in_backend(s), shared_pages(&s.space));
    assert!(
        mapped == shared,
        "backend maps {mapped:x?}, shared is {shared:x?}"
    );
}

fn mark_at(s: &Setup, gpa: u64) -> Option<u64> {
    let mut m = [0u8; 16];
    s.memfd.file().read_at(&mut m, gpa - GPA).unwrap();
    (&m[..8] == b"peer-wr!").then(|| u64::from_le_bytes(m[8..].try_into().unwrap()))
}

fn clear_marks(s: &Setup) {
    s.memfd
        .file()
        .write_all_at(&vec![0u8; LEN as usize], 0)
        .unwrap();
}

/// Kills the backend when dropped: a test that fails halfway must not leave a stopped
/// backend behind, which would hold the test's stderr (and whatever reads it) open.
struct Reaper(Option<i32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        // SAFETY: kill(2) takes a pid and a signal number, no memory. The child is not
        // reaped while armed (whoever reaps it disarms the reaper first).
        if let Some(pid) = self.0 {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Closes the connection and returns the backend's final JSON line and exit status.
fn finish(s: Setup) -> (String, std::process::ExitStatus) {
    let Setup {
        space,
        peer,
        child,
        mut reaper,
        ..
    } = s;
    drop(space);
    drop(peer);
    let out = child.wait_with_output().unwrap();
    reaper.0 = None; // reaped: its pid may be reused
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status,
    )
}

#[test]
fn the_backend_reaches_exactly_the_shared_pages() {
    let mut s = setup("exact");
    // Registration granted everything: the backend mapped and marked every page.
    assert_backend_maps_exactly_the_shared_pages(&s);
    for p in (GPA..GPA + LEN).step_by(P as usize) {
        assert_eq!(
            mark_at(&s, p),
            Some(p),
            "page {p:#x} was not written by the backend"
        );
    }
    clear_marks(&s);

    s.space
        .convert(GPA + 0x10000, 0x8000, PageState::Private, true)
        .unwrap();
    assert_backend_maps_exactly_the_shared_pages(&s);
    s.space
        .convert(GPA + 0x10000, 0x8000, PageState::Shared, false)
        .unwrap();
    assert_backend_maps_exactly_the_shared_pages(&s);
    // Granted again after the conversion: the backend wrote those pages (and only those).
    for p in (GPA..GPA + LEN).step_by(P as usize) {
        let want = (GPA + 0x10000..GPA + 0x18000).contains(&p).then_some(p);
        assert_eq!(mark_at(&s, p), want, "page {p:#x}");
    }

    // A random run of conversions (each a batch of up to 3 ranges).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _ in 0..150 {
        let len = (1 + rand(32)) * P;
        let gpa = GPA + rand((LEN - len) / P) * P;
        let to = if rand(2) == 0 {
            PageState::Private
        } else {
            PageState::Shared
        };
        let discard = to == PageState::Private && rand(3) == 0;
        s.space.convert(gpa, len, to, discard).unwrap();
        assert_backend_maps_exactly_the_shared_pages(&s);
    }
    let (json, status) = finish(s);
    assert!(status.success(), "the backend's own checks failed: {json}");
    assert!(json.contains("\"failures\":0"), "{json}");
}

/// Waits until the kernel reports `pid` stopped (state `T` in `/proc/<pid>/stat`):
/// `kill(SIGSTOP)` returns before the stop takes effect.
fn wait_until_stopped(pid: i32) {
    let t = std::time::Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // The state follows the parenthesized command name.
        let state = stat.rsplit(')').next().unwrap().split_whitespace().next();
        if state == Some("T") {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{pid} never stopped: {stat}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_stopped_backend_times_out_and_nothing_changes() {
    let mut s = setup("stopped");
    s.peer.set_timeout(Duration::from_millis(300));
    let pid = s.child.id() as i32;
    // SAFETY: kill(2) with a signal number; no memory is passed.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    wait_until_stopped(pid);
    let t = std::time::Instant::now();
    let err = s
        .space
        .convert(GPA, 0x4000, PageState::Private, true)
        .unwrap_err();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "returned after {waited:?}, before the timeout: {err:?}"
    );
    match &err {
        SpaceError::ListenerRelease { name, source, .. } => {
            assert_eq!(name, "backend");
            let pe = source.downcast_ref::<PeerError>().expect("a PeerError");
            assert!(matches!(pe, PeerError::Timeout { .. }), "{pe:?}");
        }
        other => panic!("expected ListenerRelease, got {other:?}"),
    }
    assert!(err.to_string().contains("nothing was converted"), "{err}");
    assert_eq!(s.space.page_state(GPA), Some(PageState::Shared));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    // The late answer must not be taken for the next call's: the connection refuses.
    let err = s
        .space
        .convert(GPA, 0x4000, PageState::Private, false)
        .unwrap_err();
    assert!(err.to_string().contains("out of step"), "{err}");
    assert!(s.peer.is_broken());
    // Without the listener, conversions go on.
    let id = s.space.listeners().next().unwrap().0;
    s.space.remove_listener(id);
    s.space
        .convert(GPA, 0x4000, PageState::Private, false)
        .unwrap();
    let _ = finish(s);
}

#[test]
fn a_killed_backend_refuses_the_next_conversion_to_private() {
    let mut s = setup("killed");
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    s.reaper.0 = None; // reaped: its pid may be reused
    let err = s
        .space
        .convert(GPA + 0x1000, P, PageState::Private, false)
        .unwrap_err();
    match &err {
        SpaceError::ListenerRelease { source, .. } => {
            let pe = source.downcast_ref::<PeerError>().expect("a PeerError");
            assert!(matches!(pe, PeerError::Closed { .. }), "{pe:?}");
        }
        other => panic!("expected ListenerRelease, got {other:?}"),
    }
    assert!(err.to_string().contains("remove its listener"), "{err}");
    assert_eq!(s.space.page_state(GPA + 0x1000), Some(PageState::Shared));
}
