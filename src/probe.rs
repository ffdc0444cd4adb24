//! [`Capabilities`]: what this machine's kernel can do for device assignment into
//! guest_memfd-backed guests, each answer labelled with how it was established.
//!
//! Some answers can only be trusted with a device attached: `IOMMU_IOAS_MAP_FILE` pins
//! lazily, so an IOAS without a domain accepts files (guest_memfd included) that the
//! kernel cannot pin, and the failure only shows at attach time. [`Capabilities::probe`]
//! therefore runs the mapping probes against an IOAS with a real device attached when it
//! is given one, and otherwise labels those answers [`Evidence::Inferred`] with the reason.
//!
//! ```no_run
//! use vfio_gmem::probe::Capabilities;
//! use vfio_gmem::vfio::Device;
//! // A device bound to vfio-pci, opened through its cdev and not yet bound to an iommufd.
//! let dev = Device::open_pci("0000:00:03.0".parse()?)?;
//! let caps = Capabilities::probe(Some(&dev));
//! println!("{}", caps.verdict.summary);
//! println!("{}", serde_json::to_string_pretty(&caps)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// Every public item says what it promises (issue 13); a new undocumented one fails the build.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use crate::gmem::{self, KvmVm, VmType};
use crate::vfio::{self, Device};

mod mapping;
mod system;
#[cfg(test)]
mod tests;

use mapping::{
    probe_mapping_with_device, probe_mapping_without_device, MappingAnswers, NATIVE_SPLIT,
};

/// How an answer was established.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "reason", rename_all = "kebab-case")]
pub enum Evidence {
    /// Tried on this kernel with a device attached to the IOAS: the kernel's real answer.
    VerifiedWithDevice,
    /// Read directly from the system (a node exists, an ioctl or capability answered); a
    /// device would not change it.
    Observed,
    /// Deduced without the decisive experiment; the reason says from what.
    Inferred(String),
    /// Could not be determined; the reason says why.
    Unavailable(String),
}

impl Evidence {
    /// A short label for tables: `verified`, `observed`, `inferred`, `unavailable`.
    pub fn label(&self) -> &'static str {
        match self {
            Evidence::VerifiedWithDevice => "verified (device)",
            Evidence::Observed => "observed",
            Evidence::Inferred(_) => "inferred",
            Evidence::Unavailable(_) => "unavailable",
        }
    }

    /// The reason, for inferred and unavailable answers.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Evidence::Inferred(r) | Evidence::Unavailable(r) => Some(r),
            _ => None,
        }
    }
}

/// One answer: a value (absent when [`Evidence::Unavailable`]), how it was established,
/// and a detail line (e.g. the kernel's error for a refused mapping).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Answer<T> {
    /// The answer; `None` only when [`Evidence::Unavailable`].
    pub value: Option<T>,
    /// How the answer was established.
    pub evidence: Evidence,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// A detail line: the kernel's error for a refusal, or why the answer is inferred.
    pub detail: Option<String>,
}

impl<T> Answer<T> {
    fn new(value: T, evidence: Evidence) -> Self {
        Answer {
            value: Some(value),
            evidence,
            detail: None,
        }
    }
    fn observed(value: T) -> Self {
        Self::new(value, Evidence::Observed)
    }
    fn verified(value: T) -> Self {
        Self::new(value, Evidence::VerifiedWithDevice)
    }
    fn inferred(value: T, reason: impl Into<String>) -> Self {
        Self::new(value, Evidence::Inferred(reason.into()))
    }
    fn unavailable(reason: impl Into<String>) -> Self {
        Answer {
            value: None,
            evidence: Evidence::Unavailable(reason.into()),
            detail: None,
        }
    }
    fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

impl<T: Copy> Answer<T> {
    /// The value, if known.
    pub fn get(&self) -> Option<T> {
        self.value
    }
}

impl Answer<bool> {
    /// True only if the value is known to be true.
    pub fn is_true(&self) -> bool {
        self.value == Some(true)
    }
}

impl fmt::Display for Answer<bool> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.value {
            Some(true) => f.write_str("yes"),
            Some(false) => f.write_str("no"),
            None => f.write_str("?"),
        }
    }
}

/// What KVM offers for one VM type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmTypeCaps {
    /// E.g. `DEFAULT`, `SW_PROTECTED`.
    pub vm_type: String,
    /// Whether a VM of this type could be created here.
    pub created: Answer<bool>,
    /// `KVM_CAP_GUEST_MEMFD`.
    pub guest_memfd: Answer<bool>,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`, e.g. `MMAP|INIT_SHARED`.
    pub gmem_flags: Answer<String>,
    /// `KVM_CAP_MEMORY_ATTRIBUTES`, e.g. `PRIVATE`.
    pub memory_attributes: Answer<String>,
}

/// Which mapping path and conversion mechanism guest memory will get on this machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// `iommufd`, `legacy-type1` or `none`.
    pub backend: String,
    /// How a guest_memfd's shared pages reach the IOMMU.
    pub guest_memfd: String,
    /// How a memfd (shmem) shared backing reaches the IOMMU.
    pub memfd: String,
    /// How a hugetlb memfd shared backing reaches the IOMMU.
    pub hugetlb: String,
    /// How private/shared conversions change the IOMMU.
    pub conversions: String,
    /// All of the above on one line.
    pub summary: String,
}

/// The capability report.
#[derive(Clone, Debug, Serialize)]
pub struct Capabilities {
    /// `uname -r`.
    pub kernel: String,
    /// The device the mapping probes ran with, if any.
    pub device: Option<String>,
    /// `/dev/iommu` exists (iommufd).
    pub iommufd: Answer<bool>,
    /// VFIO device cdevs: a registered VFIO device (`/sys/class/vfio-dev/vfioN`) with a
    /// device number; without one registered, inferred from iommufd's absence or unknown.
    pub vfio_cdev: Answer<bool>,
    /// `/dev/vfio/vfio` opens with the expected API version and type1v2.
    pub legacy_type1: Answer<bool>,
    /// An IOMMU is registered (`/sys/class/iommu` is not empty).
    pub iommu_present: Answer<bool>,
    /// `IOMMU_IOAS_MAP_FILE` of a shmem memfd.
    pub map_file_memfd: Answer<bool>,
    /// `IOMMU_IOAS_MAP_FILE` of a 2 MiB hugetlb memfd.
    pub map_file_hugetlb: Answer<bool>,
    /// `IOMMU_IOAS_MAP_FILE` of a guest_memfd (`MMAP|INIT_SHARED`, default VM).
    pub map_file_guest_memfd: Answer<bool>,
    /// Cutting an area in place (iommufd's VFIO-compat unmap with huge pages disabled).
    pub cut_unmap: Answer<bool>,
    /// `/dev/kvm` opens.
    pub kvm: Answer<bool>,
    /// Per VM type KVM reports (`KVM_CAP_VM_TYPES`).
    pub vm_types: Vec<VmTypeCaps>,
    /// Some VM type here has the PRIVATE memory attribute (private memory in KVM, e.g.
    /// SW_PROTECTED); without it conversions exist on the IOMMU side only.
    pub kvm_private_memory: Answer<bool>,
    /// The verdict drawn from the answers above ([`verdict`]).
    pub verdict: Verdict,
}

impl Capabilities {
    /// Probes this machine. With `device` (a VFIO cdev device bound to vfio-pci and not
    /// yet bound to an iommufd), the MAP_FILE and cut probes run on an IOAS the device is
    /// attached to; the device is detached afterwards but stays bound to the probe's
    /// iommufd context, so open it again to use it. Never fails: what cannot be
    /// determined is reported [`Evidence::Unavailable`] with the reason.
    pub fn probe(device: Option<&Device>) -> Capabilities {
        let kernel = kernel_release();
        let iommufd = Answer::observed(Path::new("/dev/iommu").exists());
        let vfio_cdev = system::vfio_cdev_answer(
            &system::vfio_dev_nodes(Path::new("/sys/class/vfio-dev")),
            iommufd.is_true(),
        );
        let legacy_type1 = probe_legacy();
        let iommu_present = Answer::observed(
            std::fs::read_dir("/sys/class/iommu")
                .map(|mut d| d.next().is_some())
                .unwrap_or(false),
        );
        let (kvm, vm_types) = probe_kvm();
        let kvm_private_memory = system::private_memory_answer(&kvm, &vm_types);
        let mapping = if !iommufd.is_true() {
            MappingAnswers::all_unavailable("no /dev/iommu (kernel without CONFIG_IOMMUFD)")
        } else {
            match device {
                Some(dev) => probe_mapping_with_device(dev),
                None => probe_mapping_without_device(&kernel),
            }
        };
        let verdict = verdict(
            &iommufd,
            &legacy_type1,
            &mapping.memfd,
            &mapping.hugetlb,
            &mapping.guest_memfd,
            &mapping.cut,
        );
        Capabilities {
            kernel,
            device: device.map(|d| d.name().to_string()),
            iommufd,
            vfio_cdev,
            legacy_type1,
            iommu_present,
            map_file_memfd: mapping.memfd,
            map_file_hugetlb: mapping.hugetlb,
            map_file_guest_memfd: mapping.guest_memfd,
            cut_unmap: mapping.cut,
            kvm,
            vm_types,
            kvm_private_memory,
            verdict,
        }
    }

    /// The boolean answers in report order, with their names (for tables).
    pub fn answers(&self) -> Vec<(&'static str, &Answer<bool>)> {
        vec![
            ("iommufd (/dev/iommu)", &self.iommufd),
            ("VFIO cdev", &self.vfio_cdev),
            ("legacy VFIO type1", &self.legacy_type1),
            ("IOMMU present", &self.iommu_present),
            ("MAP_FILE memfd", &self.map_file_memfd),
            ("MAP_FILE hugetlb memfd", &self.map_file_hugetlb),
            ("MAP_FILE guest_memfd", &self.map_file_guest_memfd),
            ("area cutting (cut-unmap)", &self.cut_unmap),
            ("KVM (/dev/kvm)", &self.kvm),
            ("KVM private memory", &self.kvm_private_memory),
        ]
    }
}

/// The kernel release (`uname -r`), or `unknown`.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data; uname fills it or fails.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates release within the array.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// `(major, minor)` of a kernel release string such as `7.3.4-1~bpo13+1-amd64`.
///
/// ```
/// use vfio_gmem::probe::kernel_version;
/// assert_eq!(kernel_version("7.3.4-1~bpo13+1-amd64"), Some((7, 3)));
/// assert_eq!(kernel_version("6.13"), Some((6, 13)));
/// assert_eq!(kernel_version("garbage"), None);
/// ```
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Free 2 MiB huge pages, from `/proc/meminfo` text (`HugePages_Free` counts pages of
/// the default size; only trusted when `Hugepagesize` is 2048 kB).
///
/// ```
/// use vfio_gmem::probe::free_huge_pages_2m;
/// let text = "HugePages_Total:       4\nHugePages_Free:        3\nHugepagesize:       2048 kB\n";
/// assert_eq!(free_huge_pages_2m(text), Some(3));
/// assert_eq!(free_huge_pages_2m("Hugepagesize: 1048576 kB\nHugePages_Free: 3\n"), None);
/// ```
pub fn free_huge_pages_2m(meminfo: &str) -> Option<u64> {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    (field("Hugepagesize")? == 2048).then_some(())?;
    field("HugePages_Free")
}

fn probe_legacy() -> Answer<bool> {
    let node = Path::new("/dev/vfio/vfio");
    if !node.exists() {
        return Answer::observed(false).with_detail(
            "no /dev/vfio/vfio (kernel without CONFIG_VFIO_CONTAINER, or vfio not loaded)",
        );
    }
    match vfio::Container::open() {
        Ok(c) => {
            let v = c.api_version().map(|v| v.to_string()).unwrap_or_default();
            Answer::observed(true).with_detail(format!("API version {v}, type1v2 IOMMU"))
        }
        Err(e) if matches!(e, vfio::VfioError::Unsupported(_)) => {
            Answer::observed(false).with_detail(e.to_string())
        }
        Err(e) => Answer::unavailable(format!("cannot open the container: {e}")),
    }
}

fn probe_kvm() -> (Answer<bool>, Vec<VmTypeCaps>) {
    let kvm = match gmem::open_kvm() {
        Ok(k) => k,
        Err(e) => {
            let answer = if Path::new("/dev/kvm").exists() {
                Answer::unavailable(e.to_string())
            } else {
                Answer::observed(false).with_detail("no /dev/kvm")
            };
            return (answer, Vec::new());
        }
    };
    let types = gmem::supported_vm_types(&kvm);
    let mut list: Vec<VmType> = types.iter().collect();
    if list.is_empty() {
        list.push(VmType::Default);
    }
    let caps = list
        .into_iter()
        .map(|t| match KvmVm::create_with(&kvm, t) {
            Ok(vm) => VmTypeCaps {
                vm_type: t.to_string(),
                created: Answer::observed(true),
                guest_memfd: Answer::observed(vm.supports_guest_memfd()),
                gmem_flags: Answer::observed(vm.guest_memfd_flags().to_string()),
                memory_attributes: Answer::observed(vm.memory_attributes().to_string()),
            },
            Err(e) => {
                let why = format!("creating a {t} VM failed: {e}");
                VmTypeCaps {
                    vm_type: t.to_string(),
                    created: Answer::observed(false).with_detail(e.to_string()),
                    guest_memfd: Answer::unavailable(why.clone()),
                    gmem_flags: Answer::unavailable(why.clone()),
                    memory_attributes: Answer::unavailable(why),
                }
            }
        })
        .collect();
    (Answer::observed(true), caps)
}

/// One mapping path from a MAP_FILE answer: `fd+offset`, or the VA fallback and why.
fn path_of(map_file: &Answer<bool>, backend_is_iommufd: bool) -> String {
    if !backend_is_iommufd {
        return "VA (legacy type1 maps by address only)".into();
    }
    let how = match &map_file.evidence {
        Evidence::VerifiedWithDevice => "with a device attached",
        Evidence::Observed => "by the kernel",
        Evidence::Inferred(_) => "inferred, no device",
        Evidence::Unavailable(_) => "not determined",
    };
    match map_file.value {
        Some(true) => format!("fd+offset ({how})"),
        Some(false) => format!("VA fallback (MAP_FILE refused, {how})"),
        None => "VA fallback (MAP_FILE not determined)".into(),
    }
}

/// The verdict from the answers (pure): the backend, then the mapping path of each kind
/// of backing and the conversion mechanism, joined into a one-line summary.
pub fn verdict(
    iommufd: &Answer<bool>,
    legacy: &Answer<bool>,
    memfd: &Answer<bool>,
    hugetlb: &Answer<bool>,
    guest_memfd: &Answer<bool>,
    cut: &Answer<bool>,
) -> Verdict {
    let backend = if iommufd.is_true() {
        "iommufd"
    } else if legacy.is_true() {
        "legacy-type1"
    } else {
        "none"
    };
    if backend == "none" {
        let none = "no IOMMU backend (neither /dev/iommu nor a type1 container)".to_string();
        return Verdict {
            backend: backend.into(),
            guest_memfd: none.clone(),
            memfd: none.clone(),
            hugetlb: none.clone(),
            conversions: none.clone(),
            summary: format!("device assignment impossible here: {none}"),
        };
    }
    let on_iommufd = backend == "iommufd";
    let conversions = match (on_iommufd, cut.value, &cut.evidence) {
        (false, _, _) => "per-granule areas (legacy type1 cannot cut)".to_string(),
        (true, Some(true), Evidence::VerifiedWithDevice) => match cut.detail.as_deref() {
            Some(d) if d.starts_with(NATIVE_SPLIT) => {
                let huge = if d.contains("huge pages on") {
                    "on"
                } else {
                    "off"
                };
                format!("native split verified (huge pages {huge})")
            }
            _ => "cut-unmap verified".to_string(),
        },
        (true, Some(true), _) => "cut-unmap (inferred, no device)".to_string(),
        (true, Some(false), _) => "per-granule areas (cut-unmap refused)".to_string(),
        (true, None, _) => "per-granule areas (cut-unmap not determined)".to_string(),
    };
    let v = Verdict {
        backend: backend.into(),
        guest_memfd: path_of(guest_memfd, on_iommufd),
        memfd: path_of(memfd, on_iommufd),
        hugetlb: path_of(hugetlb, on_iommufd),
        conversions,
        summary: String::new(),
    };
    let summary = format!(
        "{}: guest_memfd: {}; memfd: {}; hugetlb: {}; conversions: {}",
        v.backend, v.guest_memfd, v.memfd, v.hugetlb, v.conversions
    );
    Verdict { summary, ..v }
}
