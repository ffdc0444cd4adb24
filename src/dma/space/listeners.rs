//! Conversion listeners: parties other than the IOMMU that reach guest memory — a
//! vhost-user-style backend process, an emulated device's worker thread, a migration
//! reader — and so must let go of a page before it turns private, exactly like a device.
//!
//! Vocabulary: a listener **releases** ranges (it stops reaching them and returns only
//! once nothing of its own does) and is **granted** ranges (they are shared now: it may
//! reach them). Ranges are GPA ranges, page aligned, ascending, never overlapping.
//!
//! Invariants (the IOMMU's contract, extended to every listener):
//! - to private: every listener has released the range's shared pages, and said so by
//!   returning `Ok`, before the plan runs, that is before the IOMMU unmap, before KVM
//!   flips the attribute and before the shared backing is discarded;
//! - to shared: listeners are granted the range only after the plan ran to completion
//!   (attribute shared, IOMMU mapped);
//! - a listener is never granted a page that is private, and never asked to release a
//!   page that stays shared: only the pages that change are named;
//! - a release that fails stops the conversion before any kernel call: the listeners
//!   that had already released are granted the same ranges again (reverse order), and
//!   every page is as it was;
//! - a plan that fails after the releases is rolled back by the executor (or, if only a
//!   discard failed, took effect); listeners are then granted exactly the pages the call
//!   named that are shared afterwards, none that the failure left private.

use std::fmt;
use std::ops::Range;

use super::core::DmaSpace;
use super::types::SpaceError;
use crate::dma::plan::model::PageState;
use crate::dma::plan::ops::ConversionRequest;
use crate::dma::plan::outcome::Stats;
use crate::dma::plan::tracker::Tracker;

/// The error a listener returns: anything that says why (kept as the space error's source).
pub type ListenerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A party that reaches guest memory by its own means and must follow conversions.
///
/// Register one with [`DmaSpace::add_listener`]. The space calls it while it converts,
/// with the space's `&mut self` held, so calls to one listener never overlap.
///
/// ```
/// use std::ops::Range;
/// use vfio_gmem::dma::{ConversionListener, ListenerError};
///
/// /// Keeps a mapping of the shared pages it serves (here: only their list).
/// struct Backend { mapped: Vec<Range<u64>> }
///
/// impl ConversionListener for Backend {
///     fn name(&self) -> &str { "backend" }
///     fn release(&mut self, ranges: &[Range<u64>]) -> Result<(), ListenerError> {
///         // munmap() each range here, then return: the space flips them private after.
///         self.mapped.retain(|m| !ranges.iter().any(|r| r.start < m.end && m.start < r.end));
///         Ok(())
///     }
///     fn grant(&mut self, ranges: &[Range<u64>]) -> Result<(), ListenerError> {
///         self.mapped.extend(ranges.iter().cloned()); // mmap() them here
///         Ok(())
///     }
/// }
/// ```
pub trait ConversionListener: Send + Sync {
    /// A short name for errors and logs (e.g. `"virtiofsd"`).
    fn name(&self) -> &str;

    /// `ranges` are about to turn private: stop reaching them. Return `Ok` only once
    /// nothing of this listener can read or write them any more (mappings removed, work
    /// in flight on them finished). An `Err` refuses the conversion: nothing changes.
    fn release(&mut self, ranges: &[Range<u64>]) -> Result<(), ListenerError>;

    /// `ranges` are shared now (KVM attribute shared, devices mapped): this listener may
    /// reach them. Also called to give back what [`release`](Self::release) took when the
    /// conversion fails, and once at registration with every shared page of the space.
    fn grant(&mut self, ranges: &[Range<u64>]) -> Result<(), ListenerError>;
}

/// Identifies a registered listener ([`DmaSpace::add_listener`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerId(u64);

impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "listener#{}", self.0)
    }
}

/// The listeners of a space, in registration order.
#[derive(Default)]
pub(super) struct Listeners {
    list: Vec<(ListenerId, Box<dyn ConversionListener>)>,
    next: u64,
    /// Reused range lists (no allocation per conversion once warm).
    release: Vec<Range<u64>>,
    grant: Vec<Range<u64>>,
}

impl Listeners {
    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Grants `ranges` to listeners `..upto` (all if `None`), in reverse order; failures
    /// are logged (the pages are shared either way: a listener that cannot take them only
    /// reaches less).
    fn grant_back(&mut self, ranges: &[Range<u64>], upto: Option<usize>) {
        if ranges.is_empty() {
            return;
        }
        let n = upto.unwrap_or(self.list.len());
        for (id, l) in self.list[..n].iter_mut().rev() {
            if let Err(e) = l.grant(ranges) {
                log::warn!(
                    "{id} ({}): granting back GPA {} after a failed conversion: {e}",
                    l.name(),
                    fmt_ranges(ranges)
                );
            }
        }
    }
}

/// `ranges` as `[a, b) [c, d)`.
pub(crate) fn fmt_ranges(ranges: &[Range<u64>]) -> String {
    let mut s = String::new();
    for r in ranges {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&format!("[{:#x}, {:#x})", r.start, r.end));
    }
    s
}

/// Appends to `out` the runs of pages in `state` inside `r`, across regions, merging
/// adjacent runs.
fn runs_into(memory: &Tracker, r: Range<u64>, state: PageState, out: &mut Vec<Range<u64>>) {
    for region in memory.regions() {
        for run in region.runs(r.clone(), state) {
            match out.last_mut() {
                Some(last) if last.end == run.start => last.end = run.end,
                _ => out.push(run),
            }
        }
    }
}

/// Sorts and merges `v` in place.
fn normalize(v: &mut Vec<Range<u64>>) {
    v.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v.drain(..) {
        match out.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    *v = out;
}

impl DmaSpace {
    /// Registers a listener of this space's conversions and returns its id.
    ///
    /// The listener is first granted every page that is shared now (all regions, in GPA
    /// order), so it starts in step; if that fails, it is not registered. From then on,
    /// each conversion to private asks it to release the pages that turn private before
    /// anything else happens, and each conversion to shared grants it the pages after
    /// they are shared and mapped (the module's invariants: `dma` docs, "Listeners").
    /// Regions added later are not granted to it: it learns of their pages as they
    /// convert (or the VMM tells it).
    ///
    /// ```
    /// # #[cfg(feature = "testing")] {
    /// use std::ops::Range;
    /// use vfio_gmem::dma::*;
    /// struct Log(Vec<String>);
    /// impl ConversionListener for Log {
    ///     fn name(&self) -> &str { "log" }
    ///     fn release(&mut self, r: &[Range<u64>]) -> Result<(), ListenerError> {
    ///         self.0.push(format!("release {r:x?}")); Ok(())
    ///     }
    ///     fn grant(&mut self, r: &[Range<u64>]) -> Result<(), ListenerError> {
    ///         self.0.push(format!("grant {r:x?}")); Ok(())
    ///     }
    /// }
    /// let mut space = DmaSpace::with_executor(Box::new(FakeKernel::new()), SpaceOptions::default());
    /// let id = space.add_listener(Box::new(Log(vec![])))?;
    /// // ... add regions, convert ...
    /// let log = space.remove_listener(id).unwrap();
    /// # }
    /// # Ok::<(), vfio_gmem::dma::SpaceError>(())
    /// ```
    pub fn add_listener(
        &mut self,
        mut listener: Box<dyn ConversionListener>,
    ) -> Result<ListenerId, SpaceError> {
        let mut shared = Vec::new();
        for region in self.memory.regions() {
            let g = region.gpa_range();
            runs_into(&self.memory, g, PageState::Shared, &mut shared);
        }
        normalize(&mut shared);
        if !shared.is_empty() {
            listener
                .grant(&shared)
                .map_err(|source| SpaceError::ListenerGrant {
                    name: listener.name().to_string(),
                    ranges: fmt_ranges(&shared),
                    took_effect: false,
                    source,
                })?;
        }
        let id = ListenerId(self.listeners.next);
        self.listeners.next += 1;
        self.listeners.list.push((id, listener));
        Ok(id)
    }

    /// Unregisters a listener and hands it back (`None` if `id` is not registered). The
    /// space stops telling it anything; what it still reaches is its own business.
    pub fn remove_listener(&mut self, id: ListenerId) -> Option<Box<dyn ConversionListener>> {
        let i = self.listeners.list.iter().position(|(l, _)| *l == id)?;
        Some(self.listeners.list.remove(i).1)
    }

    /// The names of the registered listeners, in registration (and release) order.
    pub fn listeners(&self) -> impl Iterator<Item = (ListenerId, &str)> {
        self.listeners.list.iter().map(|(id, l)| (*id, l.name()))
    }

    /// [`convert_batch`](Self::convert_batch) with listeners registered: releases first,
    /// grants after (module docs).
    pub(super) fn convert_with_listeners(
        &mut self,
        requests: &[ConversionRequest],
    ) -> Result<Stats, SpaceError> {
        // Plan first: a request the planner refuses bothers no listener.
        let plan = self.memory.plan_batch_with(requests, &mut self.buffers)?;

        let mut release = std::mem::take(&mut self.listeners.release);
        let mut grant = std::mem::take(&mut self.listeners.grant);
        release.clear();
        grant.clear();
        for r in requests {
            let range = r.gpa..r.gpa + r.len;
            match r.to {
                PageState::Private => {
                    runs_into(&self.memory, range, PageState::Shared, &mut release)
                }
                PageState::Shared => runs_into(&self.memory, range, PageState::Private, &mut grant),
            }
        }
        if requests.len() > 1 {
            normalize(&mut release);
            normalize(&mut grant);
        }

        let result = self.release_then_run(plan, requests, &release, &grant);
        self.listeners.release = release;
        self.listeners.grant = grant;
        result
    }

    fn release_then_run(
        &mut self,
        plan: crate::dma::plan::ops::Plan,
        requests: &[ConversionRequest],
        release: &[Range<u64>],
        grant: &[Range<u64>],
    ) -> Result<Stats, SpaceError> {
        if !release.is_empty() {
            for i in 0..self.listeners.list.len() {
                let (id, l) = &mut self.listeners.list[i];
                log::debug!("{id} ({}): release GPA {}", l.name(), fmt_ranges(release));
                if let Err(source) = l.release(release) {
                    let name = l.name().to_string();
                    self.listeners.grant_back(release, Some(i));
                    return Err(SpaceError::ListenerRelease {
                        name,
                        ranges: fmt_ranges(release),
                        source,
                    });
                }
            }
        }

        let result = self.run(plan, || match requests {
            [r] => format!("converting GPA [{:#x}, +{:#x}) to {}", r.gpa, r.len, r.to),
            _ => format!("converting a batch of {} ranges", requests.len()),
        });

        match result {
            Ok(stats) => {
                // Every listener is granted, even after one failed: the pages are shared.
                let mut failed = None;
                if !grant.is_empty() {
                    for (id, l) in self.listeners.list.iter_mut() {
                        log::debug!("{id} ({}): grant GPA {}", l.name(), fmt_ranges(grant));
                        if let Err(source) = l.grant(grant) {
                            failed.get_or_insert((l.name().to_string(), source));
                        }
                    }
                }
                match failed {
                    None => Ok(stats),
                    Some((name, source)) => Err(SpaceError::ListenerGrant {
                        name,
                        ranges: fmt_ranges(grant),
                        took_effect: true,
                        source,
                    }),
                }
            }
            Err(e) => {
                // The tracker holds the truth after the failure: every page this call
                // named that is shared now is granted (released pages the rollback kept
                // shared, and pages going shared whose part of the plan took effect, as
                // when only a discard failed); no page that is private.
                let mut back = Vec::new();
                for r in release.iter().chain(grant) {
                    runs_into(&self.memory, r.clone(), PageState::Shared, &mut back);
                }
                normalize(&mut back);
                self.listeners.grant_back(&back, None);
                Err(e)
            }
        }
    }
}
