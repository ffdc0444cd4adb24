//! The mapping experiments: `IOMMU_IOAS_MAP_FILE` of a memfd, a hugetlb memfd and a
//! guest_memfd, and area cutting, on a scratch IOAS; with a device attached when one is
//! given (MAP_FILE pins lazily, so only then is a refusal certain), otherwise inferred and
//! labelled so.

use std::os::fd::AsFd;
use std::sync::Arc;

use super::{free_huge_pages_2m, kernel_version, Answer, Evidence};
use crate::dma::{CutSupport, PAGE_SIZE};
use crate::gmem::{self, GmemFlags, KvmVm, Memfd, VmType, HUGE_PAGE_2M};
use crate::iommufd::{self, Ioas, Iommufd};
use crate::mapper::{Access, Iova};
use crate::vfio::Device;

pub(super) struct MappingAnswers {
    pub(super) memfd: Answer<bool>,
    pub(super) hugetlb: Answer<bool>,
    pub(super) guest_memfd: Answer<bool>,
    pub(super) cut: Answer<bool>,
}

impl MappingAnswers {
    pub(super) fn all_unavailable(why: &str) -> Self {
        MappingAnswers {
            memfd: Answer::unavailable(why),
            hugetlb: Answer::unavailable(why),
            guest_memfd: Answer::unavailable(why),
            cut: Answer::unavailable(why),
        }
    }
}

/// A 2 MiB aligned IOVA with at least 4 MiB usable above it, for the probes.
fn probe_base(ioas: &Ioas) -> Result<u64, String> {
    let ranges = ioas.iova_ranges().map_err(|e| e.to_string())?;
    ranges
        .ranges
        .iter()
        .filter_map(|r| {
            let start = r.start().max(&HUGE_PAGE_2M).next_multiple_of(HUGE_PAGE_2M);
            (r.end().saturating_sub(start) >= 2 * HUGE_PAGE_2M).then_some(start)
        })
        .next()
        .ok_or_else(|| "no usable IOVA range of 4 MiB".to_string())
}

/// Maps `len` bytes of `fd` at `iova` by fd+offset and unmaps them again.
fn try_map_file(ioas: &Ioas, fd: impl AsFd, iova: u64, len: u64) -> Result<(), iommufd::Error> {
    ioas.map_file(Iova::Fixed(iova), fd.as_fd(), 0, len, Access::READ_WRITE)?;
    ioas.unmap(iova, len).map(drop)
}

/// What a MAP_FILE outcome means: `Ok(true)`, refused (`false`), or an unrelated failure.
fn map_file_answer(
    result: Result<(), iommufd::Error>,
    evidence: Evidence,
    what: &str,
) -> Answer<bool> {
    match result {
        Ok(()) => Answer::new(true, evidence),
        Err(e) if e.errno() == Some(libc::ENOTTY) => Answer::observed(false)
            .with_detail("the kernel has no IOMMU_IOAS_MAP_FILE (added in 6.13)"),
        Err(e @ iommufd::Error::FileNotPinnable { .. }) => {
            Answer::new(false, evidence).with_detail(e.to_string())
        }
        Err(e) if e.errno() == Some(libc::EINVAL) => {
            Answer::new(false, evidence).with_detail(e.to_string())
        }
        Err(e) => Answer::unavailable(format!("MAP_FILE of a {what} failed: {e}")),
    }
}

fn hugetlb_memfd() -> Result<Memfd, String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    match free_huge_pages_2m(&meminfo) {
        Some(n) if n >= 1 => {}
        Some(_) => {
            return Err(
                "no free 2 MiB huge pages (reserve one: echo 1 > /proc/sys/vm/nr_hugepages)".into(),
            )
        }
        None => return Err("the default huge page size is not 2 MiB".into()),
    }
    let m = Memfd::hugetlb("vfio-gmem-probe-huge", HUGE_PAGE_2M).map_err(|e| e.to_string())?;
    m.allocate(0, HUGE_PAGE_2M).map_err(|e| e.to_string())?;
    Ok(m)
}

/// A default-VM guest_memfd created `MMAP|INIT_SHARED` (one page).
fn shared_guest_memfd() -> Result<(KvmVm, gmem::GuestMemfd), String> {
    let vm = KvmVm::create(VmType::Default).map_err(|e| e.to_string())?;
    let g = vm
        .create_guest_memfd(PAGE_SIZE, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
        .map_err(|e| e.to_string())?;
    Ok((vm, g))
}

/// Detail prefixes of the cut answer: which mechanism was verified.
pub(super) const NATIVE_SPLIT: &str = "native split (IOMMU_IOAS_SPLIT)";
const COMPAT_CUT: &str = "compat cut (VFIO_IOMMU_UNMAP_DMA on the compat IOAS, huge pages off)";

pub(super) fn probe_mapping_with_device(dev: &Device) -> MappingAnswers {
    let setup = || -> Result<(Arc<Iommufd>, Ioas), String> {
        let fd = Arc::new(Iommufd::open().map_err(|e| e.to_string())?);
        let ioas = Ioas::new(&fd).map_err(|e| e.to_string())?;
        // As a DmaSpace prepared for conversions does: both before anything is mapped.
        ioas.set_huge_pages(false).map_err(|e| e.to_string())?;
        ioas.set_compat().map_err(|e| e.to_string())?;
        dev.bind_iommufd(fd.as_fd()).map_err(|e| e.to_string())?;
        dev.attach(ioas.id()).map_err(|e| e.to_string())?;
        Ok((fd, ioas))
    };
    let (_fd, ioas) = match setup() {
        Ok(x) => x,
        Err(e) => {
            return MappingAnswers::all_unavailable(&format!(
                "cannot attach {} to a probe IOAS: {e}",
                dev.name()
            ))
        }
    };
    let answers = (|| {
        // The mechanism a DmaSpace would pick: native split (huge pages on, then off),
        // else the compat cut.
        let none = crate::dma::planning::RangeSet::new();
        let compat = |ioas: &Ioas| crate::dma::probe_cut(ioas, &none);
        let cut = match crate::dma::probe_cut_on_attach(&ioas, &none, &compat) {
            CutSupport::Verified => Answer::verified(true).with_detail(COMPAT_CUT),
            CutSupport::NativeSplit { huge_pages, why } => {
                Answer::verified(true).with_detail(format!(
                    "{NATIVE_SPLIT}, huge pages {}: {why}",
                    if huge_pages { "on" } else { "off" }
                ))
            }
            CutSupport::Unavailable(why) => Answer::verified(false).with_detail(why),
            CutSupport::NotProbed => Answer::unavailable("not probed"),
        };
        let base = match probe_base(&ioas) {
            Ok(b) => b,
            Err(e) => {
                let mut a = MappingAnswers::all_unavailable(&e);
                a.cut = cut;
                return a;
            }
        };
        let memfd = match Memfd::new("vfio-gmem-probe", PAGE_SIZE) {
            Ok(m) => map_file_answer(
                try_map_file(&ioas, &m, base, PAGE_SIZE),
                Evidence::VerifiedWithDevice,
                "memfd",
            ),
            Err(e) => Answer::unavailable(e.to_string()),
        };
        let hugetlb = match hugetlb_memfd() {
            Ok(m) => map_file_answer(
                try_map_file(&ioas, &m, base, HUGE_PAGE_2M),
                Evidence::VerifiedWithDevice,
                "hugetlb memfd",
            ),
            Err(why) => match memfd.value {
                Some(v) => Answer::inferred(
                    v,
                    format!("not tried ({why}); memfd_pin_folios() pins hugetlb like shmem"),
                ),
                None => Answer::unavailable(why),
            },
        };
        let guest_memfd = match shared_guest_memfd() {
            Ok((_vm, g)) => map_file_answer(
                try_map_file(&ioas, &g, base, PAGE_SIZE),
                Evidence::VerifiedWithDevice,
                "guest_memfd",
            ),
            Err(e) => Answer::unavailable(format!("cannot create a guest_memfd: {e}")),
        };
        MappingAnswers {
            memfd,
            hugetlb,
            guest_memfd,
            cut,
        }
    })();
    if let Err(e) = dev.detach() {
        log::warn!("{}: detach after the probe failed: {e}", dev.name());
    }
    answers
}

const LAZY: &str = "no device attached: MAP_FILE pins lazily, so an IOAS without a domain \
    accepts files the kernel cannot pin; pass a vfio-pci device to verify";

pub(super) fn probe_mapping_without_device(kernel: &str) -> MappingAnswers {
    let setup = || -> Result<Ioas, String> {
        let fd = Arc::new(Iommufd::open().map_err(|e| e.to_string())?);
        let ioas = Ioas::new(&fd).map_err(|e| e.to_string())?;
        ioas.set_huge_pages(false).map_err(|e| e.to_string())?;
        ioas.set_compat().map_err(|e| e.to_string())?;
        Ok(ioas)
    };
    let ioas = match setup() {
        Ok(i) => i,
        Err(e) => return MappingAnswers::all_unavailable(&format!("cannot create an IOAS: {e}")),
    };
    let new_enough = kernel_version(kernel).is_some_and(|v| v >= (6, 13));
    // Without a domain the ioctl still tells whether it exists at all.
    let memfd = match (Memfd::new("vfio-gmem-probe", PAGE_SIZE), probe_base(&ioas)) {
        (Ok(m), Ok(base)) => map_file_answer(
            try_map_file(&ioas, &m, base, PAGE_SIZE),
            Evidence::Inferred(format!(
                "the ioctl accepted a memfd; shmem is pinnable; {LAZY}"
            )),
            "memfd",
        ),
        (Err(e), _) => Answer::unavailable(e.to_string()),
        (_, Err(e)) => Answer::unavailable(e),
    };
    let has_ioctl = memfd.value == Some(true);
    let hugetlb = match memfd.value {
        Some(v) => Answer::inferred(
            v,
            "same pinning path as shmem (memfd_pin_folios()); not tried without a device",
        ),
        None => Answer::unavailable("the memfd probe failed"),
    };
    let guest_memfd = if !has_ioctl {
        Answer::inferred(false, "no working IOMMU_IOAS_MAP_FILE")
    } else {
        Answer::inferred(
            false,
            format!(
                "kernel {}: memfd_pin_folios() pins only shmem and hugetlb files (true up to \
                 at least 7.3); {LAZY}",
                if new_enough {
                    kernel
                } else {
                    "older than 6.13"
                }
            ),
        )
    };
    let cut = match crate::dma::probe_cut(&ioas, &crate::dma::planning::RangeSet::new()) {
        CutSupport::Verified => Answer::inferred(
            true,
            "the compat cut worked on an IOAS without a device; domains were not involved",
        ),
        CutSupport::Unavailable(why) => {
            Answer::inferred(false, format!("failed without a device: {why}"))
        }
        // probe_cut only tries the compat cut.
        CutSupport::NotProbed | CutSupport::NativeSplit { .. } => Answer::unavailable("not probed"),
    };
    MappingAnswers {
        memfd,
        hugetlb,
        guest_memfd,
        cut,
    }
}
