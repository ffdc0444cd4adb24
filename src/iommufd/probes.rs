//! Probes of what this IOAS can do, answered by the kernel (crate-private): can an area be
//! cut (the compat `VFIO_IOMMU_UNMAP_DMA`, or the native `IOMMU_IOAS_SPLIT`), and does
//! `IOMMU_IOAS_MAP_FILE` take a given file. Both need a device attached (MAP_FILE pins
//! lazily and accepts unpinnable files while no domain exists).
//!
//! Each probe maps only at the IOVA its caller chose (one that no mapping of the caller
//! owns) and unmaps everything it mapped before returning, or says that it could not.

use std::os::fd::BorrowedFd;

use super::{Error, Ioas};
use crate::mapper::{Access, Iova};

const PAGE: u64 = 4096;

/// Why a probe said no.
#[derive(Debug)]
pub(crate) struct ProbeFailed {
    /// The kernel's errno of the cut (or split) itself, if that was the call that failed.
    pub errno: Option<i32>,
    /// What happened, in words (a space reports it as why areas cannot be cut).
    pub why: String,
}

impl ProbeFailed {
    fn plain(why: impl Into<String>) -> Self {
        ProbeFailed {
            errno: None,
            why: why.into(),
        }
    }
}

/// How an area is cut in [`Ioas::probe_cut`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CutProbe {
    /// `VFIO_IOMMU_UNMAP_DMA` on the compat IOAS ([`Ioas::cut_unmap`]).
    Compat,
    /// `IOMMU_IOAS_SPLIT` ([`Ioas::split`]), then a native unmap of the piece.
    Split,
}

/// What [`Ioas::probe_map_file`] learned.
#[derive(Debug)]
pub(crate) enum MapFileProbe {
    /// Mapped and unmapped again: the file can be mapped by fd+offset.
    Works,
    /// Refused; the reason says why (map it by VA).
    Refused(String),
    /// The file's memory is private to the guest (`EACCES` from a kernel that maps
    /// guest_memfd): no path may map it, by VA neither. Nothing was mapped.
    Private(Error),
    /// The probe page could not be unmapped again and stays mapped at the probe IOVA.
    Stuck(String),
}

impl Ioas {
    /// Proves on the running kernel that an area can be cut: three pages of `scratch` (a
    /// file of at least three pages) mapped as one area at `iova`, the middle one cut out
    /// as `how` says, then the pieces unmapped natively with exact byte counts. Whatever
    /// is left of the three pages is unmapped on failure.
    pub(crate) fn probe_cut(
        &self,
        how: CutProbe,
        iova: u64,
        scratch: BorrowedFd<'_>,
    ) -> Result<(), ProbeFailed> {
        self.map_file(Iova::Fixed(iova), scratch, 0, 3 * PAGE, Access::READ_WRITE)
            .map_err(|e| ProbeFailed::plain(format!("probe map failed: {e}")))?;
        let result = self.cut_and_unmap(how, iova);
        if result.is_err() {
            // Whatever of the probe's three pages is left; nothing else lives there.
            let _ = self.unmap(iova, 3 * PAGE);
            for page in 0..3 {
                let _ = self.unmap(iova + page * PAGE, PAGE);
            }
        }
        result
    }

    fn cut_and_unmap(&self, how: CutProbe, base: u64) -> Result<(), ProbeFailed> {
        let pieces: &[(u64, &str)] = match how {
            CutProbe::Compat => {
                let cut = self
                    .cut_unmap(base + PAGE, PAGE)
                    .map_err(|e| ProbeFailed::plain(e.to_string()))?;
                if cut != PAGE {
                    return Err(ProbeFailed::plain(format!(
                        "compat unmap of one page inside an area removed {cut} bytes"
                    )));
                }
                &[(base, "a cut piece"), (base + 2 * PAGE, "a cut piece")]
            }
            CutProbe::Split => {
                self.split(base + PAGE, PAGE).map_err(|e| ProbeFailed {
                    errno: e.errno(),
                    why: format!("IOMMU_IOAS_SPLIT: {e}"),
                })?;
                &[
                    (base + PAGE, "the split-out page"),
                    (base, "the lower piece"),
                    (base + 2 * PAGE, "the upper piece"),
                ]
            }
        };
        for &(iova, what) in pieces {
            let n = self.unmap(iova, PAGE).map_err(|e| {
                ProbeFailed::plain(match how {
                    CutProbe::Compat => format!("the cut left no separate area: {e}"),
                    CutProbe::Split => format!("after the split, {what} did not unmap: {e}"),
                })
            })?;
            if n != PAGE {
                return Err(ProbeFailed::plain(format!(
                    "{what} unmapped {n} bytes, not one page"
                )));
            }
        }
        Ok(())
    }

    /// Whether `fd` from `offset` can be mapped by fd+offset: one page of it mapped at
    /// `iova` and unmapped again.
    pub(crate) fn probe_map_file(
        &self,
        iova: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> MapFileProbe {
        match self.map_file(Iova::Fixed(iova), fd, offset, PAGE, Access::READ_WRITE) {
            Ok(_) => {
                // The probe page must go: nothing owns it, so a device could reach it
                // unseen. A failed unmap used to fall back to VA with the page left mapped
                // (found by fail-nth injection, tests/vm_faults.rs); unmap does not
                // allocate, so a failure is transient: retry once, then give up loudly.
                if let Err(first) = self.unmap(iova, PAGE) {
                    log::warn!("unmapping the MAP_FILE probe page at {iova:#x}: {first}; retrying");
                    if let Err(e) = self.unmap(iova, PAGE) {
                        return MapFileProbe::Stuck(format!("{first}; again: {e}"));
                    }
                }
                MapFileProbe::Works
            }
            Err(Error::FileNotPinnable { .. }) => {
                MapFileProbe::Refused("the kernel cannot pin this file for MAP_FILE".into())
            }
            Err(e @ Error::FilePrivate { .. }) => MapFileProbe::Private(e),
            Err(e) if e.errno() == Some(libc::ENOTTY) => {
                MapFileProbe::Refused("this kernel has no IOMMU_IOAS_MAP_FILE (before 6.13)".into())
            }
            Err(e) => MapFileProbe::Refused(format!("MAP_FILE refused: {e}")),
        }
    }
}
