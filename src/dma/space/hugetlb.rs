//! Huge pages running out while a plan maps a hugetlbfs-backed region: the kernel's
//! `ENOMEM` turned into [`GmemError::NoHugePages`] naming the pool. Failure path only
//! (kept out of `region.rs`, whose code generation the conversion hot path depends on).

use std::os::fd::AsFd;

use super::core::DmaSpace;
use super::types::SpaceError;
use crate::dma::executor::kernel::RegionBacking;
use crate::dma::plan::model::PAGE_SIZE;
use crate::dma::plan::ops::Op;
use crate::dma::plan::outcome::{ExecError, Outcome};
use crate::gmem::{fdops, GmemError};

impl DmaSpace {
    /// The error of a plan that failed in the kernel while doing `what`:
    /// [`GmemError::NoHugePages`] wrapping `source` if the plan ran out of huge pages
    /// (see [`huge_page_shortage`]), else [`SpaceError::Exec`].
    #[cold]
    #[inline(never)]
    pub(super) fn exec_error(&self, what: String, source: Box<ExecError>) -> SpaceError {
        match self.huge_page_shortage(&source) {
            Some((page_size, pages)) => SpaceError::Gmem(GmemError::NoHugePages {
                what: format!(
                    "{what} (rolled back: nothing was changed, though the file keeps any huge \
                     pages it got before the pool ran out)"
                ),
                page_size,
                pages,
                nr_hugepages: fdops::nr_hugepages(page_size),
                source: std::io::Error::new(std::io::ErrorKind::OutOfMemory, *source),
            }),
            None => SpaceError::Exec { what, source },
        }
    }

    /// If `err` is a map of a hugetlbfs-backed region that ran out of huge pages (see
    /// [`huge_page_shortage`]): the file's page size and the huge pages the map needs.
    /// Reads the file's page size and its pool's free pages; failure path only.
    fn huge_page_shortage(&self, err: &ExecError) -> Option<(u64, u64)> {
        let Op::Map(map) = &err.op else {
            return None;
        };
        let fd = match &self.slots.get(&map.region)?.backing {
            RegionBacking::File { file, .. } => file.as_fd(),
            RegionBacking::Mapping { _file, .. } => _file.as_fd(),
            RegionBacking::User(_) => return None,
        };
        let page_size = fdops::backing_page_size(fd).ok()?;
        let available = (page_size > PAGE_SIZE)
            .then(|| fdops::available_huge_pages(page_size))
            .flatten();
        huge_page_shortage(&err.op, err.error.errno, &err.outcome, page_size, available)
            .map(|pages| (page_size, pages))
    }
}

/// A refused registration that ran out of huge pages needs all of its file's pages, not
/// only those of the map that failed (a per-granule registration fails at one granule).
#[cold]
pub(super) fn whole_region_needed(mut e: SpaceError, len: u64) -> SpaceError {
    if let SpaceError::Gmem(GmemError::NoHugePages {
        page_size, pages, ..
    }) = &mut e
    {
        *pages = (*pages).max(len.div_ceil(*page_size));
    }
    e
}

/// Decides whether a plan that failed at `failed` with `errno` and left `outcome` ran out
/// of huge pages: `Some(pages)`, the huge pages the failed map spans, if `failed` is a map
/// of a region whose shared backing is a hugetlbfs file of `page_size` pages, the kernel
/// answered `ENOMEM` (pinning a hugetlb file allocates its pages from the pool:
/// `MAP_FILE` of a file whose pool has some but too few free pages, or a re-map after a
/// discard gave pages back that something else took), the plan was rolled back, and the
/// pool (`available` pages free for a new allocation, read after the failure; `None`:
/// unknown) lacks that many. A pool with enough pages left means the `ENOMEM` came from
/// elsewhere (the memlock limit), and the plan's own error stays.
pub(super) fn huge_page_shortage(
    failed: &Op,
    errno: i32,
    outcome: &Outcome,
    page_size: u64,
    available: Option<u64>,
) -> Option<u64> {
    let Op::Map(map) = failed else {
        return None;
    };
    if errno != libc::ENOMEM || page_size <= PAGE_SIZE || *outcome != Outcome::RolledBack {
        return None;
    }
    // The region starts on a huge page of its file (add_region checks it), so its
    // offsets count huge pages from a boundary.
    let pages = (map.offset + map.len).div_ceil(page_size) - map.offset / page_size;
    match available {
        Some(free) if free >= pages => None,
        _ => Some(pages),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::plan::model::{Backing, RegionId};
    use crate::dma::plan::ops::{MapOp, UnmapKind, UnmapOp};
    use crate::dma::plan::outcome::OpError;
    use crate::dma::plan::ranges::RangeSet;

    const HUGE: u64 = 2 << 20;
    const GIB: u64 = 1 << 30;

    fn map(offset: u64, len: u64) -> Op {
        Op::Map(MapOp {
            region: RegionId(1),
            backing: Backing::Opaque(0),
            iova: 1 << 40,
            offset,
            len,
        })
    }

    #[test]
    fn a_rolled_back_enomem_map_of_a_hugetlb_file_short_of_pages_is_the_pool() {
        let rolled = Outcome::RolledBack;
        // A registration of 8 MiB of 2 MiB pages, the pool with 2 free, 0 or unknown.
        for available in [Some(0), Some(2), Some(3), None] {
            assert_eq!(
                huge_page_shortage(&map(0, 8 << 20), libc::ENOMEM, &rolled, HUGE, available),
                Some(4),
                "{available:?}"
            );
        }
        // Pages spanned, not bytes: 4 KiB inside one page, 4 KiB straddling two, 1 GiB.
        let e = libc::ENOMEM;
        assert_eq!(
            huge_page_shortage(&map(HUGE + 4096, 4096), e, &rolled, HUGE, Some(0)),
            Some(1)
        );
        assert_eq!(
            huge_page_shortage(&map(HUGE - 4096, 8192), e, &rolled, HUGE, Some(1)),
            Some(2)
        );
        assert_eq!(
            huge_page_shortage(&map(0, GIB), e, &rolled, GIB, Some(0)),
            Some(1)
        );
    }

    #[test]
    fn anything_else_keeps_the_plans_own_error() {
        let rolled = Outcome::RolledBack;
        let m = map(0, 8 << 20);
        // Another errno, a 4 KiB file (shmem, guest_memfd), enough free pages (the
        // ENOMEM was the memlock limit).
        assert_eq!(
            huge_page_shortage(&m, libc::EFAULT, &rolled, HUGE, Some(0)),
            None
        );
        assert_eq!(
            huge_page_shortage(&m, libc::ENOMEM, &rolled, PAGE_SIZE, None),
            None
        );
        assert_eq!(
            huge_page_shortage(&m, libc::ENOMEM, &rolled, HUGE, Some(4)),
            None
        );
        // Not a map.
        let unmap = Op::Unmap(UnmapOp {
            iova: 1 << 40,
            len: HUGE,
            kind: UnmapKind::Native,
            restore: Vec::new(),
        });
        assert_eq!(
            huge_page_shortage(&unmap, libc::ENOMEM, &rolled, HUGE, Some(0)),
            None
        );
        // Not rolled back: the plan's error says what it left.
        for outcome in [
            Outcome::RollbackFailed {
                op: 0,
                undo: unmap.clone(),
                error: OpError::from_errno(libc::EIO),
                state: Box::default(),
            },
            Outcome::NotDiscarded {
                ranges: RangeSet::default(),
            },
        ] {
            assert_eq!(
                huge_page_shortage(&m, libc::ENOMEM, &outcome, HUGE, Some(0)),
                None
            );
        }
    }
}
