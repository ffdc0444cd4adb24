//! Conversion listeners on the host, over the fake kernel: the order contract (every
//! listener let go before the attribute flips to private and before a discard; granted
//! only pages that are shared and mapped), refusals, kernel failures and rollbacks.
//!
//! The fake kernel and the listeners share one `World`: the executor checks, at every
//! attribute change to private and every discard, that no listener holds any of those
//! pages; each listener checks, when granted pages, that the kernel has them shared and
//! mapped. A violation is recorded, and every test asserts there is none.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use vfio_gmem::dma::planning::{AttributesOp, DiscardOp, MapOp, UnmapOp};
use vfio_gmem::dma::{
    ConversionListener, ConversionRequest, DmaSpace, Executor, FakeKernel, GuestRegion,
    ListenerError, OpError, PageState, SharedMemory, SpaceError, SpaceOptions, UserAddress,
    PAGE_SIZE,
};

const P: u64 = PAGE_SIZE;
const GPA: u64 = 0x1_0000_0000;
const LEN: u64 = 4 << 20;

#[derive(Default)]
struct World {
    kernel: FakeKernel,
    /// What each listener reaches now, by name (page-granular GPA sets).
    held: Vec<(String, vfio_gmem::dma::planning::RangeSet)>,
    log: Vec<String>,
    violations: Vec<String>,
    /// Listeners refuse their next release while this names them.
    refuse_release: Option<String>,
    refuse_grant: Option<String>,
}

impl World {
    fn held_by_anyone(&self, r: Range<u64>) -> Option<&str> {
        self.held
            .iter()
            .find(|(_, s)| s.intersects(r.clone()))
            .map(|(n, _)| n.as_str())
    }
}

type Shared = Arc<Mutex<World>>;

struct Exec(Shared);

impl Executor for Exec {
    fn map(&mut self, op: &MapOp) -> Result<(), OpError> {
        let mut w = self.0.lock().unwrap();
        w.log.push(format!("map {:#x}+{:#x}", op.iova, op.len));
        w.kernel.map(op)
    }
    fn unmap(&mut self, op: &UnmapOp) -> Result<u64, OpError> {
        let mut w = self.0.lock().unwrap();
        w.log.push(format!("unmap {:#x}+{:#x}", op.iova, op.len));
        w.kernel.unmap(op)
    }
    fn set_attributes(&mut self, op: &AttributesOp) -> Result<(), OpError> {
        let mut w = self.0.lock().unwrap();
        let r = op.gpa..op.gpa + op.len;
        if op.private {
            if let Some(n) = w.held_by_anyone(r.clone()) {
                let v = format!("{n} still holds part of {r:x?} when it turns private");
                w.violations.push(v);
            }
        }
        let what = if op.private { "private" } else { "shared" };
        w.log
            .push(format!("attr {what} {:#x}+{:#x}", op.gpa, op.len));
        w.kernel.set_attributes(op)
    }
    fn discard(&mut self, op: &DiscardOp) -> Result<(), OpError> {
        let mut w = self.0.lock().unwrap();
        let r = GPA + op.offset..GPA + op.offset + op.len;
        if let Some(n) = w.held_by_anyone(r.clone()) {
            let v = format!("{n} still holds part of {r:x?} when it is discarded");
            w.violations.push(v);
        }
        w.log
            .push(format!("discard {:#x}+{:#x}", op.offset, op.len));
        w.kernel.discard(op)
    }
}

struct Listener {
    name: String,
    world: Shared,
}

impl Listener {
    fn new(name: &str, world: &Shared) -> Box<Self> {
        world
            .lock()
            .unwrap()
            .held
            .push((name.to_string(), Default::default()));
        Box::new(Listener {
            name: name.to_string(),
            world: world.clone(),
        })
    }
}

impl ConversionListener for Listener {
    fn name(&self) -> &str {
        &self.name
    }
    fn release(&mut self, ranges: &[Range<u64>]) -> Result<(), ListenerError> {
        let mut w = self.world.lock().unwrap();
        w.log.push(format!("{} release {ranges:x?}", self.name));
        if w.refuse_release.as_deref() == Some(&self.name) {
            return Err("device busy".into());
        }
        let i = w.held.iter().position(|(n, _)| *n == self.name).unwrap();
        for r in ranges {
            w.held[i].1.remove(r.clone());
        }
        Ok(())
    }
    fn grant(&mut self, ranges: &[Range<u64>]) -> Result<(), ListenerError> {
        let mut w = self.world.lock().unwrap();
        w.log.push(format!("{} grant {ranges:x?}", self.name));
        for r in ranges {
            let bad = w.kernel.private().intersects(r.clone())
                || (r.start..r.end)
                    .step_by(P as usize)
                    .any(|p| !w.kernel.is_mapped(p));
            if bad {
                let v = format!("{} granted {r:x?} while private or unmapped", self.name);
                w.violations.push(v);
            }
        }
        if w.refuse_grant.as_deref() == Some(&self.name) {
            return Err("cannot mmap".into());
        }
        let i = w.held.iter().position(|(n, _)| *n == self.name).unwrap();
        for r in ranges {
            w.held[i].1.insert(r.clone());
        }
        Ok(())
    }
}

fn setup(listeners: &[&str]) -> (DmaSpace, Shared) {
    let world: Shared = Default::default();
    let mut space = DmaSpace::with_executor(Box::new(Exec(world.clone())), SpaceOptions::default());
    // SAFETY: the fake kernel never touches the address.
    let shared = SharedMemory::Address {
        addr: unsafe { UserAddress::new(0x7f00_0000_0000) },
    };
    space
        .add_region(GuestRegion::new(GPA, LEN, shared).convertible(PageState::Shared))
        .unwrap();
    for n in listeners {
        space.add_listener(Listener::new(n, &world)).unwrap();
    }
    world.lock().unwrap().log.clear();
    (space, world)
}

/// The shared pages of the space, as a set.
fn shared_set(space: &DmaSpace) -> vfio_gmem::dma::planning::RangeSet {
    let mut s = vfio_gmem::dma::planning::RangeSet::new();
    for p in (GPA..GPA + LEN).step_by(P as usize) {
        if space.page_state(p) == Some(PageState::Shared) {
            s.insert(p..p + P);
        }
    }
    s
}

fn assert_in_step(space: &DmaSpace, world: &Shared) {
    let w = world.lock().unwrap();
    assert!(w.violations.is_empty(), "violations: {:?}", w.violations);
    let shared = shared_set(space);
    for (n, held) in &w.held {
        assert!(
            *held == shared,
            "{n} holds {held:x?}, shared is {shared:x?}"
        );
    }
}

#[test]
fn registration_grants_every_shared_page() {
    let (space, world) = setup(&["a"]);
    assert_in_step(&space, &world);
    let w = world.lock().unwrap();
    assert_eq!(w.held[0].1.total(), LEN);
}

#[test]
fn release_before_unmap_and_attributes_grant_after_map() {
    let (mut space, world) = setup(&["a", "b"]);
    space
        .convert(GPA + 0x3000, 0x2000, PageState::Private, true)
        .unwrap();
    let log = std::mem::take(&mut world.lock().unwrap().log);
    let pos = |s: &str| {
        log.iter()
            .position(|l| l.starts_with(s))
            .unwrap_or_else(|| panic!("no {s:?} in {log:?}"))
    };
    assert_eq!(log[0], "a release [100003000..100005000]");
    assert_eq!(log[1], "b release [100003000..100005000]");
    assert!(pos("b release") < pos("unmap"), "{log:?}");
    assert!(pos("unmap") < pos("attr private"), "{log:?}");
    assert!(pos("attr private") < pos("discard"), "{log:?}");
    assert!(!log.iter().any(|l| l.contains("grant")), "{log:?}");
    assert_in_step(&space, &world);

    space
        .convert(GPA + 0x3000, 0x2000, PageState::Shared, false)
        .unwrap();
    let log = std::mem::take(&mut world.lock().unwrap().log);
    let n = log.len();
    assert_eq!(log[n - 2], "a grant [100003000..100005000]", "{log:?}");
    assert_eq!(log[n - 1], "b grant [100003000..100005000]", "{log:?}");
    assert!(
        log[0].starts_with("attr shared") && log[1].starts_with("map"),
        "{log:?}"
    );
    assert!(!log.iter().any(|l| l.contains("release")), "{log:?}");
    assert_in_step(&space, &world);
}

#[test]
fn only_pages_that_change_are_named() {
    let (mut space, world) = setup(&["a"]);
    space
        .convert(GPA + 0x2000, P, PageState::Private, false)
        .unwrap();
    world.lock().unwrap().log.clear();
    // [0x1000, 0x4000) holds one private page in the middle: two shared runs go private.
    space
        .convert(GPA + 0x1000, 0x3000, PageState::Private, false)
        .unwrap();
    let log = std::mem::take(&mut world.lock().unwrap().log);
    assert_eq!(
        log[0],
        "a release [100001000..100002000, 100003000..100004000]"
    );
    // Back to shared from [0, 0x5000): only the three private pages are granted.
    space
        .convert(GPA, 0x5000, PageState::Shared, false)
        .unwrap();
    let log = std::mem::take(&mut world.lock().unwrap().log);
    assert_eq!(
        log.last().unwrap(),
        "a grant [100001000..100004000]",
        "{log:?}"
    );
    // Converting shared pages to shared names nothing and calls no listener.
    space
        .convert(GPA, 0x5000, PageState::Shared, false)
        .unwrap();
    let log = std::mem::take(&mut world.lock().unwrap().log);
    assert!(!log.iter().any(|l| l.starts_with("a ")), "{log:?}");
    assert_in_step(&space, &world);
}

#[test]
fn a_refused_release_converts_nothing_and_gives_back() {
    let (mut space, world) = setup(&["a", "b", "c"]);
    world.lock().unwrap().refuse_release = Some("b".into());
    let calls = world.lock().unwrap().kernel.calls();
    let err = space
        .convert(GPA + 0x10000, 0x4000, PageState::Private, true)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, SpaceError::ListenerRelease { name, .. } if name == "b"),
        "{err:?}"
    );
    assert!(msg.contains("nothing was converted"), "{msg}");
    assert!(
        std::error::Error::source(&err).unwrap().to_string() == "device busy",
        "the listener's error is the source"
    );
    let log = std::mem::take(&mut world.lock().unwrap().log);
    assert_eq!(
        log,
        [
            "a release [100010000..100014000]",
            "b release [100010000..100014000]",
            "a grant [100010000..100014000]",
        ]
    );
    assert_eq!(
        world.lock().unwrap().kernel.calls(),
        calls,
        "no kernel call"
    );
    assert_eq!(space.page_state(GPA + 0x10000), Some(PageState::Shared));
    world.lock().unwrap().refuse_release = None;
    assert_in_step(&space, &world);
}

#[test]
fn a_kernel_failure_after_the_releases_gives_back_what_stays_shared() {
    let (mut space, world) = setup(&["a", "b"]);
    // Fail each call of a to-private conversion in turn (unmap, attributes, discard).
    for nth in 1..=3 {
        {
            let mut w = world.lock().unwrap();
            let next = w.kernel.calls() + nth - 1;
            w.kernel.fail_call(next, libc::EIO);
        }
        let r = space.convert(GPA + 0x40000, 0x8000, PageState::Private, true);
        world.lock().unwrap().kernel.clear_faults();
        let err = r.expect_err("an injected kernel failure fails the conversion");
        assert!(matches!(err, SpaceError::Exec { .. }), "{err:?}");
        assert_in_step(&space, &world);
        // Whatever state the failure left, put it back to shared for the next round.
        space
            .convert(GPA + 0x40000, 0x8000, PageState::Shared, false)
            .unwrap();
        assert_in_step(&space, &world);
    }
}

#[test]
fn a_failed_grant_still_converts_and_grants_the_others() {
    let (mut space, world) = setup(&["a", "b"]);
    space
        .convert(GPA, 0x4000, PageState::Private, false)
        .unwrap();
    world.lock().unwrap().refuse_grant = Some("a".into());
    let err = space
        .convert(GPA, 0x4000, PageState::Shared, false)
        .unwrap_err();
    assert!(
        matches!(&err, SpaceError::ListenerGrant { name, took_effect: true, .. } if name == "a"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("the conversion took effect"),
        "{err}"
    );
    assert_eq!(space.page_state(GPA), Some(PageState::Shared));
    let w = world.lock().unwrap();
    assert!(w.violations.is_empty(), "{:?}", w.violations);
    assert!(
        w.held[1].1.contains_range(GPA..GPA + 0x4000),
        "b was granted"
    );
    assert!(!w.held[0].1.intersects(GPA..GPA + 0x4000), "a was not");
}

#[test]
fn a_refused_registration_is_not_registered() {
    let (mut space, world) = setup(&[]);
    world.lock().unwrap().refuse_grant = Some("x".into());
    let err = space.add_listener(Listener::new("x", &world)).unwrap_err();
    assert!(
        matches!(
            &err,
            SpaceError::ListenerGrant {
                took_effect: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(space.listeners().count(), 0);
}

#[test]
fn removed_listeners_hear_nothing() {
    let (mut space, world) = setup(&["a", "b"]);
    let a = space.listeners().next().unwrap().0;
    assert!(space.remove_listener(a).is_some());
    assert!(space.remove_listener(a).is_none());
    space.convert(GPA, P, PageState::Private, false).unwrap();
    let log = std::mem::take(&mut world.lock().unwrap().log);
    assert!(!log.iter().any(|l| l.starts_with("a ")), "{log:?}");
    assert!(log.iter().any(|l| l.starts_with("b release")), "{log:?}");
}

/// A random workload with refusals and kernel failures: after every call, each listener
/// reaches exactly the shared pages, and no page turned private or was discarded while a
/// listener held it.
#[test]
fn random_conversions_keep_listeners_in_step() {
    let (mut space, world) = setup(&["a", "b", "c"]);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let names = ["a", "b", "c"];
    let (mut ok, mut refused, mut failed) = (0, 0, 0);
    for _ in 0..600 {
        let pages = LEN / P;
        let k = 1 + rand(3);
        let reqs: Vec<ConversionRequest> = (0..k)
            .map(|_| {
                let len = (1 + rand(64)) * P;
                let gpa = GPA + rand(pages - len / P) * P;
                let to = if rand(2) == 0 {
                    PageState::Private
                } else {
                    PageState::Shared
                };
                let r = ConversionRequest::new(gpa, len, to);
                if rand(4) == 0 {
                    r.discard_shared()
                } else {
                    r
                }
            })
            .collect();
        {
            let mut w = world.lock().unwrap();
            match rand(8) {
                0 => w.refuse_release = Some(names[rand(3) as usize].into()),
                1 => {
                    let next = w.kernel.calls() + rand(4);
                    w.kernel.fail_call(next, libc::EIO)
                }
                _ => {}
            }
        }
        match space.convert_batch(&reqs) {
            Ok(_) => ok += 1,
            Err(SpaceError::ListenerRelease { .. }) => refused += 1,
            Err(SpaceError::Plan(_)) => {} // overlapping requests in one batch
            Err(_) => failed += 1,
        }
        {
            let mut w = world.lock().unwrap();
            w.refuse_release = None;
            w.kernel.clear_faults();
        }
        assert_in_step(&space, &world);
    }
    assert!(
        ok > 200 && refused > 10 && failed > 10,
        "{ok} {refused} {failed}"
    );
}
