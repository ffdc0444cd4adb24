//! Typed iommufd errors. Each names the kernel object involved (IOAS id, IOVA range, fd)
//! and says what to do about it; [`Error::errno`] still exposes the raw errno.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::mapper::{Backend, MapError};

/// A half-open IOVA span `[iova, iova + len)`, as it appears in error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// First byte.
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Span {
    /// The span `[iova, iova + len)`.
    pub const fn new(iova: u64, len: u64) -> Self {
        Span { iova, len }
    }
    /// One past the last byte (saturating at `u64::MAX`).
    pub const fn end(&self) -> u64 {
        self.iova.saturating_add(self.len)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.iova, self.end())
    }
}

/// The process's `RLIMIT_MEMLOCK` when a pin failed, for the explanation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemlockLimit {
    /// Soft limit in bytes; `None` if it could not be read, `Some(u64::MAX)` = unlimited.
    pub soft: Option<u64>,
}

impl MemlockLimit {
    /// Reads the current soft limit of this process.
    pub fn current() -> Self {
        MemlockLimit {
            soft: crate::sys::memlock_limit().ok().map(|(soft, _)| soft),
        }
    }
}

impl fmt::Display for MemlockLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.soft {
            None => f.write_str("unknown"),
            Some(u64::MAX) => f.write_str("unlimited"),
            Some(b) if b % (1 << 20) == 0 => write!(f, "{} MiB", b >> 20),
            Some(b) => write!(f, "{} KiB", b >> 10),
        }
    }
}

/// A failed iommufd operation. Nothing was changed unless the variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/iommu` does not exist.
    #[error(
        "cannot open {}: no such device node; this kernel lacks CONFIG_IOMMUFD (or the \
         iommufd module is not loaded). Fall back to the legacy VFIO type1 container \
         (/dev/vfio/vfio), or boot a kernel with CONFIG_IOMMUFD=y and CONFIG_VFIO_DEVICE_CDEV=y",
        path.display()
    )]
    NoIommufd {
        /// The device node that was opened (`/dev/iommu`).
        path: PathBuf,
        #[source]
        /// The `open(2)` error (`ENOENT`/`ENODEV`/`ENXIO`).
        source: io::Error,
    },

    /// Opening `/dev/iommu` was refused.
    #[error(
        "cannot open {}: permission denied; run as root (or a user with access to the node), \
         or have a privileged helper open it and pass the fd in (Iommufd::from_fd)",
        path.display()
    )]
    OpenDenied {
        /// The device node that was opened (`/dev/iommu`).
        path: PathBuf,
        #[source]
        /// The `open(2)` error (`EACCES`/`EPERM`).
        source: io::Error,
    },

    /// Opening `/dev/iommu` failed for another reason.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The device node that was opened (`/dev/iommu`).
        path: PathBuf,
        #[source]
        /// The `open(2)` error.
        source: io::Error,
    },

    /// A fixed-IOVA map (or copy) overlaps an existing area (`EEXIST`).
    #[error(
        "IOAS {ioas}: cannot map {span}: it overlaps {}; unmap that area first or map at a \
         free IOVA (or let the kernel choose one with Iova::Any)",
        match existing { Some(a) => format!("the mapped area {a}"), None => "an existing mapping".into() }
    )]
    Overlap {
        /// The IOAS id the request named.
        ioas: u32,
        /// The range asked for.
        span: Span,
        /// The recorded area it overlaps, when the IOAS keeps an area record.
        existing: Option<Span>,
        #[source]
        /// The kernel's `EEXIST`.
        source: io::Error,
    },

    /// A native unmap range cuts through an area (`ENOENT`). Nothing was unmapped.
    #[error(
        "IOAS {ioas}: cannot unmap {span}: it cuts the area {}, and IOMMU_IOAS_UNMAP does \
         not split areas. Unmap whole areas as they were mapped, or split hitlessly: \
         Ioas::split_unmap where the kernel has IOMMU_IOAS_SPLIT (`vfio-gmem probe` says), \
         else Ioas::cut_unmap on a compat IOAS whose huge pages were disabled before \
         mapping",
        match area { Some(a) => a.to_string(), None => "mapped there".into() }
    )]
    PartialUnmap {
        /// The IOAS id the request named.
        ioas: u32,
        /// The range asked for.
        span: Span,
        /// The recorded area it cuts, when known.
        area: Option<Span>,
        #[source]
        /// The kernel's `ENOENT`, or `None` when the area record refused the range before
        /// any kernel call.
        source: Option<io::Error>,
    },

    /// `ENOENT` from `IOMMU_IOAS_UNMAP` on an IOAS without an area record
    /// ([`super::AreaRecord::Off`]): nothing was mapped in the range, or the range cuts an
    /// area and the kernel unmapped the whole areas before it. The kernel does not say
    /// which.
    #[error(
        "IOAS {ioas}: the kernel refused to unmap {span}: nothing is mapped there, or the \
         range cuts an area, and then the whole areas before that one are now unmapped. \
         This IOAS keeps no area record (AreaRecord::Off), so the range was not checked \
         first; unmap whole areas exactly as they were mapped"
    )]
    UnmapRefused {
        /// The IOAS id the request named.
        ioas: u32,
        /// The range asked for.
        span: Span,
        #[source]
        /// The kernel's `ENOENT`.
        source: io::Error,
    },

    /// Nothing is mapped in the range (`ENOENT` from `IOMMU_IOAS_UNMAP`).
    #[error("IOAS {ioas}: nothing is mapped in {span}")]
    NotMapped {
        /// The IOAS id the request named.
        ioas: u32,
        /// The range asked for.
        span: Span,
        #[source]
        /// The kernel's `ENOENT`, or `None` when the area record answered without a call.
        source: Option<io::Error>,
    },

    /// Pinning the pages went over the memlock limit (`ENOMEM`/`EPERM` while mapping).
    #[error(
        "IOAS {ioas}: cannot pin {len} bytes for {span}: most likely over RLIMIT_MEMLOCK (soft \
         limit {limit}); iommufd charges every pinned page to it. Raise the limit (ulimit -l, \
         prlimit --memlock, LimitMEMLOCK= for a systemd unit) to cover all guest memory \
         mapped for DMA, or run with CAP_IPC_LOCK",
        len = span.len
    )]
    MemlockLimit {
        /// The IOAS id the request named.
        ioas: u32,
        /// The range whose pages could not be pinned.
        span: Span,
        /// The process's memlock limit when the pin failed.
        limit: MemlockLimit,
        #[source]
        /// The kernel's `ENOMEM` or `EPERM`.
        source: io::Error,
    },

    /// `IOMMU_IOAS_MAP_FILE` refused the file kind (`EINVAL`, e.g. guest_memfd on 7.3).
    #[error(
        "IOAS {ioas}: cannot map fd {fd} ({kind}) by fd+offset at {span}: the kernel cannot \
         pin this file (IOMMU_IOAS_MAP_FILE takes memfd/shmem, hugetlbfs and VFIO dma-bufs). \
         Map its mmap by VA (map_user) instead"
    )]
    FileNotPinnable {
        /// The IOAS id the request named.
        ioas: u32,
        /// The file descriptor passed to the kernel (borrowed for the call only).
        fd: RawFd,
        /// What the file is (`memfd`, `guest_memfd`, `hugetlbfs`...), as far as the library
        /// could tell.
        kind: String,
        /// Where it was to be mapped.
        span: Span,
        #[source]
        /// The kernel's `EINVAL`.
        source: io::Error,
    },

    /// `IOMMU_IOAS_MAP_FILE` of memory the host may not access (`EACCES`): a guest_memfd
    /// whose pages are private, on a kernel that maps guest_memfd by fd+offset (the
    /// project's kernel series). Nothing was mapped.
    #[error(
        "IOAS {ioas}: cannot map fd {fd} ({kind}) at {span}: its memory is private to the \
         guest, and neither the host nor its devices may reach it. Map shared memory \
         instead: a guest_memfd created with GUEST_MEMFD_FLAG_MMAP|INIT_SHARED, or a memfd"
    )]
    FilePrivate {
        /// The IOAS id the request named.
        ioas: u32,
        /// The file descriptor passed to the kernel (borrowed for the call only).
        fd: RawFd,
        /// What the file is (`memfd`, `guest_memfd`, `hugetlbfs`...), as far as the library
        /// could tell.
        kind: String,
        /// Where it was to be mapped.
        span: Span,
        #[source]
        /// The kernel's `EACCES`.
        source: io::Error,
    },

    /// `cut_unmap` on an IOAS that is not the iommufd's compat IOAS.
    #[error(
        "IOAS {ioas}: not the VFIO-compat IOAS of iommufd fd {fd} (that is {}); \
         VFIO_IOMMU_UNMAP_DMA would act on another IOAS. Call Ioas::set_compat first",
        match current { Some(c) => format!("IOAS {c}"), None => "unset".into() }
    )]
    NotCompatIoas {
        /// The IOAS id the request named.
        ioas: u32,
        /// The iommufd the IOAS belongs to.
        fd: RawFd,
        /// The IOAS that is the compat IOAS now, if any.
        current: Option<u32>,
    },

    /// [`Ioas::claim_compat`](super::Ioas::claim_compat) found another live IOAS already
    /// holding the iommufd's single compat designation; nothing was changed.
    #[error(
        "IOAS {ioas}: iommufd fd {fd} already has IOAS {owner} as its VFIO-compat IOAS, and \
         there is one per iommufd (it is the only IOAS whose areas the kernel can cut); left \
         as it is. Open /dev/iommu again (a separate Iommufd) for another IOAS that must cut \
         areas, or drop the IOAS that holds it first"
    )]
    CompatTaken {
        /// The IOAS that asked for the designation.
        ioas: u32,
        /// The iommufd both IOASes belong to.
        fd: RawFd,
        /// The IOAS that holds the designation.
        owner: u32,
    },

    /// `cut_unmap` on an IOAS with huge pages enabled: the kernel would not cut.
    #[error(
        "IOAS {ioas}: cannot cut {span}: huge pages are enabled on this IOAS, so the kernel \
         will not split areas. Disable them (Ioas::set_huge_pages(false)) right after \
         creating the IOAS, before anything is mapped"
    )]
    CutNeedsSmallPages {
        /// The (compat) IOAS asked to cut.
        ioas: u32,
        /// The range to cut out.
        span: Span,
    },

    /// Huge pages cannot be disabled once an attached domain holds mappings (`EINVAL`).
    #[error(
        "IOAS {ioas}: cannot disable huge pages: a device is attached and areas are mapped. \
         Disable them before mapping (right after creating the IOAS)"
    )]
    HugePagesLocked {
        /// The IOAS id the request named.
        ioas: u32,
        #[source]
        /// The kernel's `EINVAL` from `IOMMU_OPTION_HUGE_PAGES`.
        source: io::Error,
    },

    /// `IOMMU_OPTION_RLIMIT_MODE` set after objects exist (`EBUSY`) or without privilege.
    #[error(
        "iommufd fd {fd}: cannot set the RLIMIT mode: {}",
        if source.raw_os_error() == Some(libc::EBUSY) {
            "objects already exist in this iommufd; set it right after opening"
        } else if source.raw_os_error() == Some(libc::EPERM) {
            "needs CAP_SYS_RESOURCE"
        } else {
            "the kernel refused it"
        }
    )]
    RlimitMode {
        /// The iommufd.
        fd: RawFd,
        #[source]
        /// The kernel's error (`EBUSY`, `EPERM`, ...).
        source: io::Error,
    },

    /// Any other failed request, naming the object it acted on.
    #[error("{op} on {object}: {source}")]
    Ioctl {
        /// The request (`IOMMU_IOAS_ALLOC`, `IOMMU_HWPT_ALLOC`, ...).
        op: &'static str,
        /// The object it acted on (`IOAS 3`, `iommufd fd 7`, ...).
        object: String,
        #[source]
        /// The kernel's error.
        source: io::Error,
    },
}

impl Error {
    /// The OS error number behind this failure, if there is one.
    pub fn errno(&self) -> Option<i32> {
        use Error::*;
        match self {
            NoIommufd { source, .. }
            | OpenDenied { source, .. }
            | Open { source, .. }
            | Overlap { source, .. }
            | MemlockLimit { source, .. }
            | FileNotPinnable { source, .. }
            | FilePrivate { source, .. }
            | HugePagesLocked { source, .. }
            | RlimitMode { source, .. }
            | Ioctl { source, .. } => source.raw_os_error(),
            PartialUnmap { source, .. } | NotMapped { source, .. } => Some(
                source
                    .as_ref()
                    .and_then(|s| s.raw_os_error())
                    .unwrap_or(libc::ENOENT),
            ),
            UnmapRefused { source, .. } => source.raw_os_error(),
            NotCompatIoas { .. } => Some(libc::ENODEV),
            CompatTaken { .. } => Some(libc::EBUSY),
            CutNeedsSmallPages { .. } => Some(libc::EINVAL),
        }
    }

    /// Classifies an open(2) failure of `path`.
    pub(crate) fn open(path: PathBuf, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENXIO) | Some(libc::ENODEV) => {
                Error::NoIommufd { path, source }
            }
            Some(libc::EACCES) | Some(libc::EPERM) => Error::OpenDenied { path, source },
            _ => Error::Open { path, source },
        }
    }

    /// Classifies a failed map (`MAP`, `MAP_FILE` or `COPY`) of `span` in `ioas`.
    /// `existing` is a tracked area overlapping `span`, if any; `file` the fd and its
    /// kind for `MAP_FILE`.
    pub(crate) fn map(
        op: &'static str,
        ioas: u32,
        span: Span,
        existing: Option<Span>,
        file: Option<(RawFd, String)>,
        source: io::Error,
    ) -> Self {
        match source.raw_os_error() {
            Some(libc::EEXIST) => Error::Overlap {
                ioas,
                span,
                existing,
                source,
            },
            Some(libc::ENOMEM) | Some(libc::EPERM) => Error::MemlockLimit {
                ioas,
                span,
                limit: MemlockLimit::current(),
                source,
            },
            Some(libc::EACCES) if file.is_some() => {
                let (fd, kind) = file.unwrap_or_default();
                Error::FilePrivate {
                    ioas,
                    fd,
                    kind,
                    span,
                    source,
                }
            }
            Some(libc::EINVAL) if file.is_some() => {
                let (fd, kind) = file.unwrap_or_default();
                Error::FileNotPinnable {
                    ioas,
                    fd,
                    kind,
                    span,
                    source,
                }
            }
            _ => Error::Ioctl {
                op,
                object: format!("IOAS {ioas} {span}"),
                source,
            },
        }
    }
}

/// The iommufd backend reports its explained errors through the mapper interface.
impl From<Error> for MapError {
    fn from(e: Error) -> Self {
        MapError::Explained {
            backend: Backend::Iommufd,
            errno: e.errno(),
            source: Box::new(e),
        }
    }
}

/// Describes what an fd refers to, from its `/proc/self/fd` link (e.g.
/// `anon_inode:[kvm-gmem]`, `/memfd:ram (deleted)`).
pub(crate) fn fd_kind(fd: RawFd) -> String {
    match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(p) => {
            let s = p.to_string_lossy().into_owned();
            if s.contains("kvm-gmem") {
                format!("guest_memfd {s}")
            } else {
                s
            }
        }
        Err(_) => "unknown file".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(e: i32) -> io::Error {
        io::Error::from_raw_os_error(e)
    }

    #[test]
    fn open_errors_explain_the_fallback_and_privilege() {
        let e = Error::open("/dev/iommu".into(), os(libc::ENOENT));
        assert!(matches!(e, Error::NoIommufd { .. }));
        let m = e.to_string();
        assert!(
            m.contains("CONFIG_IOMMUFD") && m.contains("legacy VFIO type1"),
            "{m}"
        );
        let e = Error::open("/dev/iommu".into(), os(libc::EACCES));
        let m = e.to_string();
        assert!(m.contains("root") && m.contains("helper"), "{m}");
        assert_eq!(e.errno(), Some(libc::EACCES));
        assert!(matches!(
            Error::open("/dev/iommu".into(), os(libc::EIO)),
            Error::Open { .. }
        ));
    }

    #[test]
    fn map_errors_are_classified_by_errno() {
        let span = Span::new(0x1000, 0x2000);
        let e = Error::map(
            "MAP",
            3,
            span,
            Some(Span::new(0, 0x2000)),
            None,
            os(libc::EEXIST),
        );
        let m = e.to_string();
        assert!(
            m.contains("IOAS 3") && m.contains("[0x1000, 0x3000)"),
            "{m}"
        );
        assert!(m.contains("overlaps the mapped area [0x0, 0x2000)"), "{m}");

        let e = Error::map("MAP", 3, span, None, None, os(libc::ENOMEM));
        let m = e.to_string();
        assert!(matches!(e, Error::MemlockLimit { .. }));
        assert!(
            m.contains("RLIMIT_MEMLOCK") && m.contains("ulimit -l"),
            "{m}"
        );
        assert_eq!(e.errno(), Some(libc::ENOMEM));

        let e = Error::map(
            "MAP_FILE",
            4,
            span,
            None,
            Some((7, "guest_memfd anon_inode:[kvm-gmem]".into())),
            os(libc::EINVAL),
        );
        let m = e.to_string();
        assert!(m.contains("fd 7") && m.contains("guest_memfd"), "{m}");
        assert!(
            m.contains("cannot pin this file") && m.contains("by VA"),
            "{m}"
        );

        // EINVAL on a plain MAP is not blamed on the file.
        let e = Error::map("MAP", 4, span, None, None, os(libc::EINVAL));
        assert!(matches!(e, Error::Ioctl { .. }));
        assert!(e.to_string().starts_with("MAP on IOAS 4 [0x1000, 0x3000)"));
    }

    #[test]
    fn partial_unmap_names_the_area_and_the_ways_out() {
        let e = Error::PartialUnmap {
            ioas: 2,
            span: Span::new(0x2000, 0x1000),
            area: Some(Span::new(0, 0x8000)),
            source: None,
        };
        let m = e.to_string();
        assert!(m.contains("cuts the area [0x0, 0x8000)"), "{m}");
        assert!(m.contains("does not split areas"), "{m}");
        assert!(m.contains("split_unmap") && m.contains("cut_unmap"), "{m}");
        assert_eq!(e.errno(), Some(libc::ENOENT));
    }

    #[test]
    fn memlock_limit_formats() {
        assert_eq!(
            MemlockLimit {
                soft: Some(8 << 20)
            }
            .to_string(),
            "8 MiB"
        );
        assert_eq!(
            MemlockLimit {
                soft: Some(64 << 10)
            }
            .to_string(),
            "64 KiB"
        );
        assert_eq!(
            MemlockLimit {
                soft: Some(u64::MAX)
            }
            .to_string(),
            "unlimited"
        );
        assert!(MemlockLimit::current().soft.is_some());
    }

    #[test]
    fn map_error_keeps_errno_and_message() {
        let e: MapError = Error::NotMapped {
            ioas: 1,
            span: Span::new(0, 0x1000),
            source: None,
        }
        .into();
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert_eq!(e.to_string(), "IOAS 1: nothing is mapped in [0x0, 0x1000)");
    }
}
