//! Locked-memory accounting for a VMM without `CAP_IPC_LOCK`: a check before anything is
//! pinned, whose error says which limit to raise and by how much, and what this process
//! has pinned (for "nothing was left pinned").
//!
//! Who is charged (Linux 7.3): iommufd charges each pinned page to the mapping process's
//! *user* (`user_struct::locked_vm`, all processes of the uid together) against the
//! mapping process's `RLIMIT_MEMLOCK` (`IOMMU_OPTION_RLIMIT_MODE` user, the default), or
//! to the process (`mm::locked_vm`) in process mode; legacy type1 charges the process's
//! `mm::locked_vm` (which `mlock` also uses). Both skip the charge for a process with
//! `CAP_IPC_LOCK`. Every pinned page shows in `/proc/<pid>/status` as `VmPin` (iommufd)
//! or `VmLck` (type1).

use std::fmt;

use crate::mapper::Backend;

/// Not enough `RLIMIT_MEMLOCK` for the memory a VMM is about to pin for DMA.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct MemlockShortfall {
    /// Bytes the VMM is about to pin.
    pub pin: u64,
    /// Bytes already charged to the same counter that this process can see (type1: its
    /// `VmLck`; iommufd: its own `VmPin`; other processes of the user are not visible).
    pub already: u64,
    /// The soft limit (bytes).
    pub soft: u64,
    /// The hard limit (bytes).
    pub hard: u64,
    /// Which accounting applies.
    pub backend: Backend,
}

impl MemlockShortfall {
    /// The smallest soft limit that lets the pin succeed.
    pub fn needed(&self) -> u64 {
        self.pin.saturating_add(self.already)
    }

    /// How much the soft limit must grow.
    pub fn raise_by(&self) -> u64 {
        self.needed().saturating_sub(self.soft)
    }
}

/// `N KiB` / `N MiB`, rounded up to whole KiB.
pub fn human(bytes: u64) -> String {
    if bytes == u64::MAX {
        "unlimited".into()
    } else if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

impl fmt::Display for MemlockShortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let need = self.needed();
        let kib = need.div_ceil(1024);
        write!(
            f,
            "pinning {} of guest memory for DMA ({}) needs RLIMIT_MEMLOCK of at least {}",
            human(self.pin),
            self.backend,
            human(need)
        )?;
        if self.already > 0 {
            write!(f, " ({} already charged)", human(self.already))?;
        }
        write!(
            f,
            ", but this process's soft limit is {}: raise RLIMIT_MEMLOCK by {} ",
            human(self.soft),
            human(self.raise_by())
        )?;
        if self.hard < need {
            write!(
                f,
                "(the hard limit is {} too, so root must raise both: `prlimit --pid <vmm> \
                 --memlock={need}:{need}`, LimitMEMLOCK={kib}K in the VMM's systemd unit, or \
                 a memlock line of {kib} in /etc/security/limits.conf)",
                human(self.hard)
            )?;
        } else {
            write!(
                f,
                "(`ulimit -l {kib}` in the shell that starts the VMM, or `prlimit --pid <vmm> \
                 --memlock={need}`)"
            )?;
        }
        match self.backend {
            Backend::Iommufd => f.write_str(
                "; iommufd charges all processes of this user together, so add what the \
                 user's other VMMs pin",
            ),
            Backend::LegacyType1 => {
                f.write_str("; type1 charges this process, mlock()ed memory included")
            }
        }
    }
}

/// What this process has pinned and locked now (`VmPin`, `VmLck` of `/proc/self/status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pinned {
    /// `VmPin` in bytes: pages pinned by iommufd (and other long-term pins).
    pub pinned: u64,
    /// `VmLck` in bytes: `mm::locked_vm` (mlock, legacy type1).
    pub locked: u64,
}

impl Pinned {
    /// Reads `/proc/self/status` (zeroes if unreadable).
    pub fn current() -> Pinned {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Pinned::parse(&status)
    }

    fn parse(status: &str) -> Pinned {
        let kb = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        Pinned {
            pinned: kb("VmPin:"),
            locked: kb("VmLck:"),
        }
    }
}

/// `CAP_IPC_LOCK` (include/uapi/linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;

fn has_cap_ipc_lock(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Checks, before anything is pinned, that this process may pin `pin` more bytes on
/// `backend`. A process with `CAP_IPC_LOCK` is not charged and always passes.
///
/// ```no_run
/// use vfio_gmem::{handoff::check_memlock, mapper::Backend};
/// if let Err(e) = check_memlock(256 << 20, Backend::Iommufd) {
///     eprintln!("{e}"); // says which limit to raise, and by how much
/// }
/// ```
pub fn check_memlock(pin: u64, backend: Backend) -> Result<(), MemlockShortfall> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if has_cap_ipc_lock(&status) {
        return Ok(());
    }
    let (soft, hard) = crate::sys::memlock_limit().unwrap_or((u64::MAX, u64::MAX));
    let now = Pinned::parse(&status);
    let already = match backend {
        Backend::Iommufd => now.pinned,
        Backend::LegacyType1 => now.locked,
    };
    decide(pin, already, soft, hard, backend)
}

fn decide(
    pin: u64,
    already: u64,
    soft: u64,
    hard: u64,
    backend: Backend,
) -> Result<(), MemlockShortfall> {
    let s = MemlockShortfall {
        pin,
        already,
        soft,
        hard,
        backend,
    };
    if soft == u64::MAX || s.needed() <= soft {
        Ok(())
    } else {
        Err(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortfall_says_which_limit_and_how_much() {
        let e = decide(40 << 10, 0, 8 << 10, 8 << 20, Backend::Iommufd).unwrap_err();
        assert_eq!(e.raise_by(), 32 << 10);
        let m = e.to_string();
        assert!(m.contains("raise RLIMIT_MEMLOCK by 32 KiB"), "{m}");
        assert!(m.contains("ulimit -l 40"), "{m}");
        assert!(m.contains("all processes of this user"), "{m}");
        let e = decide(4 << 20, 1 << 20, 1 << 20, 2 << 20, Backend::LegacyType1).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("by 4 MiB") && m.contains("1 MiB already charged"),
            "{m}"
        );
        assert!(
            m.contains("root must raise both") && m.contains("LimitMEMLOCK=5120K"),
            "{m}"
        );
        assert!(decide(8 << 10, 0, 8 << 10, 8 << 10, Backend::Iommufd).is_ok());
        assert!(decide(1 << 40, 0, u64::MAX, u64::MAX, Backend::Iommufd).is_ok());
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tx\nVmLck:\t      8 kB\nVmPin:\t     36 kB\nCapEff:\t0000000000004000\n";
        assert_eq!(
            Pinned::parse(s),
            Pinned {
                pinned: 36 << 10,
                locked: 8 << 10
            }
        );
        assert!(has_cap_ipc_lock(s));
        assert!(!has_cap_ipc_lock("CapEff:\t0000000000000000\n"));
    }
}
