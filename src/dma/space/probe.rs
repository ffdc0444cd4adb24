//! What a space learns from the kernel before it maps: which cut mechanism it uses
//! (decided at its first attach), and whether a file can be mapped by fd+offset. The
//! kernel calls are [`Ioas`] methods (`probe_cut`, `probe_map_file`); here is the policy:
//! where they may map ([`scratch`](crate::dma::plan::scratch)), in which order, and what
//! the answers mean for the space.
//!
//! The cut mechanism, with the device's IOMMU domain in place and nothing mapped yet:
//!
//! 1. native split (`IOMMU_IOAS_SPLIT`, the project's kernel series) with huge pages on:
//!    every attached IOMMU page table can cut a large IOPTE (x86 generic_pt formats);
//! 2. native split with huge pages off: the kernel has the ioctl but a domain cannot cut
//!    large IOPTEs (`EOPNOTSUPP`, e.g. virtio-iommu), so the IOAS uses 4 KiB IOPTEs;
//! 3. the compat cut ([`probe_cut`]): a kernel without the series (`ENOTTY`), if the
//!    space holds the compat designation.
//!
//! 1 and 2 need no compat designation, so a space that gets them gives up the iommufd's
//! compat IOAS, and any number of spaces on one iommufd can convert.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use super::types::CutSupport;
use crate::dma::plan::model::PAGE_SIZE;
use crate::dma::plan::ranges::RangeSet;
use crate::dma::plan::scratch::pick_scratch;
use crate::gmem::Memfd;
use crate::iommufd::{CutProbe, Ioas, MapFileProbe};

/// The lowest `len` bytes of usable IOVA space that overlap nothing in `avoid`.
fn scratch_iova(ioas: &Ioas, len: u64, avoid: &RangeSet) -> Result<u64, String> {
    let ranges = ioas.iova_ranges().map_err(|e| e.to_string())?;
    pick_scratch(&ranges.ranges, len, avoid)
        .ok_or_else(|| format!("no {len:#x}-byte IOVA range is free of the space's regions"))
}

/// Runs the cut probe `how` at a scratch IOVA outside `avoid`, on a scratch memfd.
fn probe(ioas: &Ioas, how: CutProbe, avoid: &RangeSet) -> Result<(), (Option<i32>, String)> {
    let plain = |e: String| (None, e);
    let base = scratch_iova(ioas, 3 * PAGE_SIZE, avoid).map_err(plain)?;
    let name = match how {
        CutProbe::Compat => "vfio-gmem-cut-probe",
        CutProbe::Split => "vfio-gmem-split-probe",
    };
    let scratch = Memfd::new(name, 3 * PAGE_SIZE).map_err(|e| plain(e.to_string()))?;
    ioas.probe_cut(how, base, scratch.file().as_fd())
        .map_err(|e| (e.errno, e.why))
}

/// Proves on the running kernel that an area can be cut through the compat IOAS.
pub(crate) fn probe_cut(ioas: &Ioas, avoid: &RangeSet) -> CutSupport {
    match probe(ioas, CutProbe::Compat, avoid) {
        Ok(()) => CutSupport::Verified,
        Err((_, reason)) => CutSupport::Unavailable(reason),
    }
}

/// The cut mechanism for `ioas` (nothing mapped yet, a device attached); leaves the IOAS's
/// huge page setting as the chosen mechanism needs it. `compat` is the fallback: the
/// compat cut's probe, or why this space may not use it. Probes map only outside `avoid`.
pub(crate) fn probe_cut_on_attach(
    ioas: &Ioas,
    avoid: &RangeSet,
    compat: &dyn Fn(&Ioas) -> CutSupport,
) -> CutSupport {
    // A kernel without the series answers ENOTTY even with nothing mapped (with the
    // series, a split of unmapped IOVA is a no-op): then nothing else is tried or changed.
    if let Err(e) = ioas.split(0, PAGE_SIZE) {
        if e.errno() == Some(libc::ENOTTY) {
            return compat(ioas);
        }
    }
    let huge_before = ioas.huge_pages().unwrap_or(false);
    let on = ioas
        .set_huge_pages(true)
        .map_err(|e| (None, format!("cannot turn huge pages on: {e}")))
        .and_then(|()| probe(ioas, CutProbe::Split, avoid));
    let native_off = match on {
        Ok(()) => {
            release_compat(ioas);
            return CutSupport::NativeSplit {
                huge_pages: true,
                why: "IOMMU_IOAS_SPLIT works with huge pages on: every attached IOMMU page \
                      table cuts large IOPTEs in place"
                    .into(),
            };
        }
        Err((Some(libc::EOPNOTSUPP), why)) => {
            let off = ioas
                .set_huge_pages(false)
                .map_err(|e| (None, e.to_string()))
                .and_then(|()| probe(ioas, CutProbe::Split, avoid));
            match off {
                Ok(()) => {
                    release_compat(ioas);
                    return CutSupport::NativeSplit {
                        huge_pages: false,
                        why: format!(
                            "an attached IOMMU page table cannot cut large IOPTEs ({why}); \
                             IOMMU_IOAS_SPLIT with huge pages off"
                        ),
                    };
                }
                Err((_, e)) => {
                    format!("native split refused with huge pages on ({why}) and off ({e})")
                }
            }
        }
        Err((Some(libc::ENOTTY), _)) => "the kernel has no IOMMU_IOAS_SPLIT".to_string(),
        Err((_, why)) => format!("native split failed: {why}"),
    };
    if let Err(e) = ioas.set_huge_pages(huge_before) {
        return CutSupport::Unavailable(format!(
            "{native_off}; cannot restore the IOAS's huge page setting: {e}"
        ));
    }
    log::info!("IOAS {}: {native_off}; trying the compat cut", ioas.id());
    match compat(ioas) {
        CutSupport::Unavailable(why) => CutSupport::Unavailable(format!("{native_off}; {why}")),
        other => other,
    }
}

/// Gives up the iommufd's compat IOAS if `ioas` holds it: with the native split it is not
/// needed, and another space may want it.
fn release_compat(ioas: &Ioas) {
    if ioas.is_compat().unwrap_or(false) {
        if let Err(e) = ioas.iommufd().clear_compat_ioas() {
            log::warn!(
                "IOAS {}: could not give up the compat designation: {e}",
                ioas.id()
            );
        }
    }
}

/// Why a MAP_FILE probe could not conclude.
pub(crate) enum FileProbeError {
    /// No scratch IOVA, or the probe's IOVA query failed: nothing was mapped.
    NoScratch(String),
    /// The probe page could not be unmapped again and stays mapped at `iova`.
    Stuck { iova: u64, why: String },
    /// The file's memory is private to the guest (`EACCES` from a kernel that maps
    /// guest_memfd): no path may map it, by VA neither. Nothing was mapped.
    Private(String),
}

/// Decides whether `fd` can be mapped by fd+offset here: `Ok(Err(reason))` means by VA.
/// The answer comes from the kernel, with a device attached: one page of the file is
/// mapped at a scratch IOVA outside `avoid` and unmapped again.
pub(crate) fn probe_map_file(
    ioas: &Ioas,
    fd: &OwnedFd,
    offset: u64,
    avoid: &RangeSet,
) -> Result<Result<(), String>, FileProbeError> {
    let iova = scratch_iova(ioas, PAGE_SIZE, avoid).map_err(FileProbeError::NoScratch)?;
    match ioas.probe_map_file(iova, fd.as_fd(), offset) {
        MapFileProbe::Works => Ok(Ok(())),
        MapFileProbe::Refused(why) => Ok(Err(why)),
        MapFileProbe::Private(e) => Err(FileProbeError::Private(e.to_string())),
        MapFileProbe::Stuck(why) => Err(FileProbeError::Stuck { iova, why }),
    }
}

/// Checks that `fd` is a kind of file guest memory can live in and covers the region.
pub(crate) fn check_backing_file(fd: &OwnedFd, offset: u64, len: u64) -> Result<(), String> {
    let kind = crate::gmem::fdops::guest_memory_kind(fd.as_fd()).map_err(|what| {
        format!(
            "fd {} is {what}; guest memory must be a memfd, a hugetlb memfd or a guest_memfd \
             created with MMAP|INIT_SHARED",
            fd.as_raw_fd()
        )
    })?;
    // /proc/self/fd/N is a magic link: metadata() stats the open file itself.
    let size = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("cannot stat fd {}: {e}", fd.as_raw_fd()))?
        .len();
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(format!(
            "the {kind} file is {size:#x} bytes but the region needs [{offset:#x}, +{len:#x}) of it; \
             grow the file or fix the offset"
        ));
    }
    // A hugetlbfs file is made of whole huge pages, of the size the file says (its
    // filesystem's block size): a region must be too, or its VA fallback could not be
    // mapped (hugetlbfs mmap refuses partial pages) and its pages would be shared with
    // a neighbour's.
    let page = crate::gmem::fdops::backing_page_size(fd.as_fd())
        .map_err(|e| format!("cannot read the page size of fd {}: {e}", fd.as_raw_fd()))?;
    if page > PAGE_SIZE && (offset % page != 0 || len % page != 0) {
        let human = crate::gmem::HugePageSize::from_bytes(page)
            .map_or_else(|| format!("{page:#x}-byte"), |p| p.to_string());
        return Err(format!(
            "the {kind} file has {human} pages: the region's file offset {offset:#x} and \
             length {len:#x} must be multiples of {page:#x}; round the region to whole huge \
             pages (conversions inside them stay 4 KiB granular)"
        ));
    }
    Ok(())
}
