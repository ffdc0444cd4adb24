//! `--peer BACKEND`: a backend process (`examples/peer_backend`) that maps guest memory
//! itself, registered on the DMA space as a conversion listener through the peer
//! protocol, and watched from outside (its `/proc/<pid>/maps`).

use std::ops::Range;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};

use vfio_gmem::dma::{ConversionListener, DmaSpace, ListenerError, PageState};
use vfio_gmem::peer::Peer;

use crate::exits::Story;
use crate::{trace, vm};

/// The backend process and the VMM's handle on its connection.
pub struct Backend {
    child: Child,
    /// Kept so the connection closes (and the backend exits) only at `finish`.
    peer: Peer,
}

/// The peer as registered: records each call in the trace, in order with the kernel's.
struct Traced(Peer);

impl ConversionListener for Traced {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn release(&mut self, ranges: &[Range<u64>]) -> Result<(), ListenerError> {
        let r = self.0.release(ranges);
        trace::note(format!("backend released {}", fmt(ranges)));
        r.map_err(Into::into)
    }
    fn grant(&mut self, ranges: &[Range<u64>]) -> Result<(), ListenerError> {
        let r = self.0.grant(ranges);
        trace::note(format!("backend granted {}", fmt(ranges)));
        r.map_err(Into::into)
    }
}

fn fmt(ranges: &[Range<u64>]) -> String {
    let v: Vec<String> = ranges
        .iter()
        .map(|r| format!("GPA [{:#x}, +{:#x})", r.start, r.end - r.start))
        .collect();
    v.join(" ")
}

/// Starts the backend, sends it the shared memfd as the one region, and registers it.
pub fn start(
    binary: &str,
    space: &mut DmaSpace,
    vm: &vm::Vm,
    story: &Story,
) -> Result<Backend, String> {
    let (peer, theirs) = Peer::pair("backend").map_err(|e| e.to_string())?;
    let child = Command::new(binary)
        // No marks: this guest checks its own memory's contents.
        .args(["--fd", "0", "--no-mark"])
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the backend {binary}: {e}"))?;
    peer.add_region(0, vm::TOTAL, vm.shared.file().as_fd(), 0)
        .map_err(|e| format!("sending the memory table: {e}"))?;
    space
        .add_listener(Box::new(Traced(peer.clone())))
        .map_err(|e| format!("registering the backend: {e}"))?;
    story.line(
        "setup",
        format!(
            "backend process {} ({binary}): memory table GPA [0x0, {:#x}) = the shared memfd; registered as a conversion listener",
            child.id(),
            vm::TOTAL
        ),
    );
    Ok(Backend { child, peer })
}

impl Backend {
    /// The GPAs of the shared memfd mapped in the backend, from its `/proc/<pid>/maps`.
    fn mapped(&self) -> Result<Vec<Range<u64>>, String> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.child.id()))
            .map_err(|e| format!("reading the backend's maps: {e}"))?;
        let mut v = Vec::new();
        for line in maps.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || !f[5].starts_with(&format!("/memfd:{}", vm::SHARED_NAME)) {
                continue;
            }
            let hex = |s: &str| u64::from_str_radix(s, 16).unwrap_or(0);
            let (a, b) = f[0].split_once('-').unwrap_or(("0", "0"));
            let off = hex(f[2]);
            v.push(off..off + hex(b) - hex(a));
        }
        v.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in v {
            match merged.last_mut() {
                Some(l) if l.end == r.start => l.end = r.end,
                _ => merged.push(r),
            }
        }
        Ok(merged)
    }

    /// Checks that the backend maps exactly the shared pages, no private one.
    pub fn check_in_step(&self, space: &DmaSpace, story: &mut Story) {
        let mut shared: Vec<Range<u64>> = Vec::new();
        for p in (0..vm::TOTAL).step_by(4096) {
            if space.page_state(p) == Some(PageState::Shared) {
                match shared.last_mut() {
                    Some(l) if l.end == p => l.end = p + 4096,
                    _ => shared.push(p..p + 4096),
                }
            }
        }
        match self.mapped() {
            Ok(mapped) => story.check(
                mapped == shared,
                format!(
                    "the backend maps exactly the shared pages ({}; its /proc/pid/maps: {})",
                    fmt(&shared),
                    fmt(&mapped)
                ),
            ),
            Err(e) => story.check(false, e),
        }
    }

    /// Unregisters the backend, closes the connection and checks its own verdict.
    pub fn finish(self, space: &mut DmaSpace, story: &mut Story) {
        let ids: Vec<_> = space.listeners().map(|(id, _)| id).collect();
        for id in ids {
            space.remove_listener(id);
        }
        drop(self.peer);
        match self.child.wait_with_output() {
            Ok(out) => {
                let counts = String::from_utf8_lossy(&out.stdout);
                story.line("backend", counts.trim());
                story.check(
                    out.status.success(),
                    format!(
                        "the backend exited with {} (its own checks: released pages unreadable before each answer, reachable iff granted after every request)",
                        out.status
                    ),
                );
            }
            Err(e) => story.check(false, format!("waiting for the backend: {e}")),
        }
    }
}
