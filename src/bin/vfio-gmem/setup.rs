//! Shared by `assign` and `selftest`: checks the devices, creates the guest memory, opens
//! the IOMMU backend, attaches the devices and maps the memory; tears it all down again.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;
use vfio_gmem::dma::{DmaSpace, GuestRegion, PageState, RegionId, SharedMemory, SpaceOptions};
use vfio_gmem::gmem::{
    self, GmemFlags, GuestMemfd, HugePageSize, KvmVm, MappedMemory, Memfd, VmType, VmTypes,
};
use vfio_gmem::vfio::{Bdf, Device, PciDevice, PciSysfs, Readiness};

use crate::errors::usage;
use crate::progress::with_spinner;
use crate::table::human_bytes;
use crate::{BackingArg, IommuArg};

/// The IOMMU interface in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Iommufd,
    Legacy,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Iommufd => "iommufd",
            Backend::Legacy => "legacy type1 container",
        })
    }
}

impl Backend {
    /// The library's name for it.
    pub fn library(self) -> vfio_gmem::mapper::Backend {
        match self {
            Backend::Iommufd => vfio_gmem::mapper::Backend::Iommufd,
            Backend::Legacy => vfio_gmem::mapper::Backend::LegacyType1,
        }
    }
}

/// `auto` → iommufd if `/dev/iommu` exists, else legacy.
pub fn resolve_iommu(arg: IommuArg, dev_iommu_exists: bool) -> Backend {
    match arg {
        IommuArg::Iommufd => Backend::Iommufd,
        IommuArg::Legacy => Backend::Legacy,
        IommuArg::Auto if dev_iommu_exists => Backend::Iommufd,
        IommuArg::Auto => Backend::Legacy,
    }
}

/// How the guest memory is laid out.
#[derive(Clone, Debug)]
pub struct Layout {
    pub size: u64,
    pub gpa: u64,
    pub backing: BackingArg,
    /// `--huge-page-size`: only with `--backing hugetlb` (2 MiB when not given).
    pub huge_page: Option<HugePageSize>,
    /// SW_PROTECTED VM, gmem private + memfd shared, KVM attributes follow conversions.
    pub confidential: bool,
    /// Convertible with this initial state even without a confidential VM (selftest:
    /// IOMMU-side conversions of a shared guest_memfd, no KVM attributes).
    pub convertible: Option<PageState>,
}

impl Layout {
    /// Checks combinations clap cannot; failures are usage errors.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let (Some(page), false) = (self.huge_page, self.backing == BackingArg::Hugetlb) {
            return Err(usage(format!(
                "--huge-page-size {} applies to --backing hugetlb only (--backing {} has no \
                 huge pages); drop --huge-page-size or add --backing hugetlb",
                match page {
                    HugePageSize::Size1G => "1G",
                    _ => "2M",
                },
                match self.backing {
                    BackingArg::Gmem => "gmem",
                    BackingArg::Memfd => "memfd",
                    BackingArg::Hugetlb => "hugetlb",
                }
            )));
        }
        if let Some(page) = self.huge_page_size() {
            if self.size % page.bytes() != 0 {
                return Err(usage(format!(
                    "--memory {:#x}: hugetlb backing with {page} pages needs a multiple of {page} \
                     (e.g. --memory {})",
                    self.size,
                    human_bytes(self.size.next_multiple_of(page.bytes()))
                        .replace(' ', "")
                        .replace("iB", "")
                )));
            }
        }
        if self.gpa.checked_add(self.size).is_none() {
            return Err(usage("--gpa + --memory overflows 64 bits"));
        }
        Ok(())
    }

    /// The huge page size of the shared memory, if it is a hugetlb memfd.
    pub fn huge_page_size(&self) -> Option<HugePageSize> {
        (self.backing == BackingArg::Hugetlb).then(|| self.huge_page.unwrap_or_default())
    }

    fn initial(&self) -> Option<PageState> {
        if self.confidential {
            // Confidential guests start with all memory private and share buffers
            // explicitly, so devices see nothing until the guest shares it.
            Some(self.convertible.unwrap_or(PageState::Private))
        } else {
            self.convertible
        }
    }
}

/// The shared backing's file.
pub enum SharedFile {
    Gmem(GuestMemfd),
    Memfd(Memfd),
}

impl SharedFile {
    fn dup(&self) -> std::io::Result<OwnedFd> {
        match self {
            SharedFile::Gmem(g) => g.as_fd().try_clone_to_owned(),
            SharedFile::Memfd(m) => m.as_fd().try_clone_to_owned(),
        }
    }
    /// Page size of the file, as it says (hugetlbfs's block size; 4 KiB otherwise).
    fn page_size(&self) -> anyhow::Result<u64> {
        Ok(match self {
            SharedFile::Gmem(g) => gmem::backing_page_size(g)?,
            SharedFile::Memfd(m) => m.page_size(),
        })
    }
    /// A CPU view of the shared backing.
    pub fn mmap(&self) -> anyhow::Result<MappedMemory> {
        Ok(match self {
            SharedFile::Gmem(g) => g.mmap()?,
            SharedFile::Memfd(m) => m.mmap()?,
        })
    }
}

/// What the session's memory is, for reports.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryInfo {
    pub gpa: u64,
    pub size: u64,
    pub vm_type: Option<String>,
    pub shared_backing: String,
    /// Page size of the shared backing, read from its file (4096; 2 MiB or 1 GiB for a
    /// hugetlb memfd).
    pub page_size: u64,
    pub private_backing: Option<String>,
    pub convertible: bool,
    pub initial: Option<String>,
    /// KVM's PRIVATE attribute follows conversions (a VM type with private memory).
    pub kvm_private_memory: bool,
    /// What this layout could not do here, and what it does instead.
    pub note: Option<String>,
}

/// The start of [`MemoryInfo::note`] when `--confidential` finds no private-memory VM.
pub const IOMMU_ONLY: &str =
    "no KVM private memory on this kernel: conversions exercised on the IOMMU only";

/// The VM type `--confidential` uses: SW_PROTECTED, the one VM type with private memory
/// that needs no hardware and no launch flow; or why there is none (`kvm` is what
/// `KVM_CAP_VM_TYPES` says, or why KVM could not be asked). SEV-SNP and TDX VMs need a
/// firmware launch flow this tool does not drive.
pub fn private_vm_type(kvm: Result<VmTypes, String>) -> Result<VmType, String> {
    let types = kvm.map_err(|e| format!("KVM is not usable: {e}"))?;
    if types.contains(VmType::SwProtected) {
        return Ok(VmType::SwProtected);
    }
    let others: Vec<String> = types
        .iter()
        .filter(|t| !matches!(t, VmType::Default))
        .map(|t| t.to_string())
        .collect();
    let mut why =
        format!("KVM creates {types}; SW_PROTECTED needs a kernel with CONFIG_KVM_SW_PROTECTED_VM");
    if !others.is_empty() {
        why.push_str(&format!(
            "; {} need a firmware launch flow vfio-gmem does not drive",
            others.join(", ")
        ));
    }
    Err(why)
}

pub struct Session {
    pub backend: Backend,
    pub space: DmaSpace,
    pub devices: Vec<(PciDevice, Device)>,
    pub shared: SharedFile,
    pub memory: MemoryInfo,
    pub region: Option<RegionId>,
    _private: Option<GuestMemfd>,
}

/// Looks each device up and checks it can be assigned with `backend`.
pub fn check_devices(
    sysfs: &PciSysfs,
    bdfs: &[Bdf],
    backend: Backend,
) -> anyhow::Result<Vec<PciDevice>> {
    let mut out: Vec<PciDevice> = Vec::new();
    for &bdf in bdfs {
        if out.iter().any(|d| d.bdf == bdf) {
            return Err(usage(format!("{bdf} is named twice")));
        }
        let dev = sysfs.device(bdf)?;
        match sysfs.readiness(bdf)? {
            Readiness::NotReady(why) => {
                anyhow::bail!("{bdf} cannot be assigned: {why}")
            }
            Readiness::Ready {
                cdev, group_node, ..
            } => match backend {
                Backend::Iommufd if cdev.is_none() => anyhow::bail!(
                    "{bdf} has no VFIO cdev (/dev/vfio/devices/vfioN): this kernel lacks \
                     CONFIG_VFIO_DEVICE_CDEV; use --iommu legacy"
                ),
                Backend::Legacy if group_node.is_none() => anyhow::bail!(
                    "{bdf}: no /dev/vfio/<group> node: this kernel lacks CONFIG_VFIO_GROUP; \
                     use --iommu iommufd"
                ),
                _ => {}
            },
        }
        out.push(dev);
    }
    Ok(out)
}

fn arc_vm(t: VmType) -> anyhow::Result<KvmVm<Arc<kvm_ioctls::VmFd>>> {
    let vm = KvmVm::create(t).with_context(|| format!("creating a {t} VM"))?;
    Ok(KvmVm::from_vm_fd(Arc::new(vm.into_inner()), Some(t)))
}

impl Session {
    /// Sets everything up; on failure, whatever was created is dropped (closing fds
    /// releases devices and mappings).
    pub fn open(bdfs: &[Bdf], iommu: IommuArg, layout: &Layout) -> anyhow::Result<Session> {
        layout.validate()?;
        let backend = resolve_iommu(iommu, Path::new("/dev/iommu").exists());
        if backend == Backend::Iommufd && !Path::new("/dev/iommu").exists() {
            anyhow::bail!("--iommu iommufd: /dev/iommu does not exist (kernel without CONFIG_IOMMUFD); use --iommu legacy");
        }
        let sysfs = PciSysfs::new();
        let pci = check_devices(&sysfs, bdfs, backend)?;
        let size = layout.size;

        // Guest memory.
        let initial = layout.initial();
        let huge_page = layout.huge_page_size();
        let shared_memfd = |huge: bool| -> anyhow::Result<Memfd> {
            match huge_page.filter(|_| huge) {
                Some(page) => {
                    let m = Memfd::hugetlb_sized("vfio-gmem-guest-shared", size, page)?;
                    with_spinner(
                        &format!("reserving {} of {page} huge pages", human_bytes(size)),
                        || m.allocate(0, size),
                    )?;
                    Ok(m)
                }
                None => Ok(Memfd::new("vfio-gmem-guest-shared", size)?),
            }
        };
        // "hugetlb memfd (1 GiB pages)", the page size as the file says.
        let describe = |m: &Memfd| {
            if m.is_hugetlb() {
                format!("hugetlb memfd ({} pages)", human_bytes(m.page_size()))
            } else {
                "memfd".to_string()
            }
        };
        let private_vm = if layout.confidential {
            private_vm_type(
                gmem::open_kvm()
                    .map(|k| gmem::supported_vm_types(&k))
                    .map_err(|e| e.to_string()),
            )
        } else {
            Err(String::new())
        };
        let (vm, shared, private, info) = if let (true, Err(why)) =
            (layout.confidential, &private_vm)
        {
            // No VM with private memory: the same layout without KVM. Conversions unmap
            // and map the IOMMU in the same order; "private" pages are simply unmapped
            // (and punched out of the memfd with `discard`).
            let huge = layout.backing == BackingArg::Hugetlb;
            let shared = shared_memfd(huge)?;
            let info = MemoryInfo {
                gpa: layout.gpa,
                size,
                vm_type: None,
                shared_backing: describe(&shared),
                page_size: shared.page_size(),
                private_backing: None,
                convertible: true,
                initial: initial.map(|s| s.to_string()),
                kvm_private_memory: false,
                note: Some(format!("{IOMMU_ONLY} ({why})")),
            };
            (None, SharedFile::Memfd(shared), None, info)
        } else if layout.confidential {
            let vm = arc_vm(VmType::SwProtected)?;
            if !vm.supports_private() {
                anyhow::bail!("--confidential: this KVM's SW_PROTECTED VM has no PRIVATE memory attribute (CONFIG_KVM_SW_PROTECTED_VM)");
            }
            let private = vm
                .create_guest_memfd(size, GmemFlags::MMAP)
                .context("creating the private guest_memfd")?;
            let huge = layout.backing == BackingArg::Hugetlb;
            let shared = shared_memfd(huge)?;
            let info = MemoryInfo {
                gpa: layout.gpa,
                size,
                vm_type: Some("SW_PROTECTED".into()),
                shared_backing: describe(&shared),
                page_size: shared.page_size(),
                private_backing: Some("guest_memfd (MMAP)".into()),
                convertible: true,
                initial: initial.map(|s| s.to_string()),
                kvm_private_memory: true,
                note: None,
            };
            (Some(vm), SharedFile::Memfd(shared), Some(private), info)
        } else {
            let (vm, shared, desc) = match layout.backing {
                BackingArg::Gmem => {
                    let vm = arc_vm(VmType::Default)?;
                    let g = vm
                        .create_guest_memfd(size, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
                        .context("creating the guest_memfd")?;
                    (
                        Some(vm),
                        SharedFile::Gmem(g),
                        "guest_memfd (MMAP|INIT_SHARED)".to_string(),
                    )
                }
                BackingArg::Memfd | BackingArg::Hugetlb => {
                    let m = shared_memfd(layout.backing == BackingArg::Hugetlb)?;
                    let desc = describe(&m);
                    (None, SharedFile::Memfd(m), desc)
                }
            };
            let info = MemoryInfo {
                gpa: layout.gpa,
                size,
                vm_type: vm.as_ref().map(|_| "DEFAULT".to_string()),
                shared_backing: desc,
                page_size: shared.page_size()?,
                private_backing: None,
                convertible: initial.is_some(),
                initial: initial.map(|s| s.to_string()),
                kvm_private_memory: false,
                note: None,
            };
            // A default VM has no PRIVATE attribute: conversions stay IOMMU-side only.
            (None, shared, None, info)
        };
        // Keep the default VM alive through its guest_memfd (the file holds a reference).

        // IOMMU backend and devices.
        let options = SpaceOptions {
            conversions: initial.is_some(),
            ..Default::default()
        };
        // One path for both backends: the library's backend table opens the space and
        // attaches each device the backend's way (cdev + IOAS, or group + container).
        let mut space = DmaSpace::open(backend.library(), vm, options)
            .with_context(|| format!("opening the {backend} IOMMU backend"))?;
        let mut devices = Vec::new();
        for d in pci {
            let dev = space
                .attach_pci(&sysfs, d.bdf)
                .with_context(|| format!("attaching {}", d.bdf))?;
            devices.push((d, dev));
        }

        // Map the memory.
        let fd = shared
            .dup()
            .context("duplicating the shared backing's fd")?;
        let mut region = GuestRegion::new(layout.gpa, size, SharedMemory::File { fd, offset: 0 });
        if let Some(state) = initial {
            region = region.convertible(state);
        }
        let id = with_spinner(
            &format!("mapping {} of guest memory", human_bytes(size)),
            || space.add_region(region),
        )
        .with_context(|| {
            format!(
                "mapping guest memory GPA [{:#x}, +{})",
                layout.gpa,
                human_bytes(size)
            )
        })?;
        Ok(Session {
            backend,
            space,
            devices,
            shared,
            memory: info,
            region: Some(id),
            _private: private,
        })
    }

    /// Unmaps the memory and detaches the devices; returns a one-line summary.
    pub fn teardown(mut self) -> anyhow::Result<String> {
        let mut unmapped = 0;
        if let Some(id) = self.region.take() {
            let stats = with_spinner("unmapping guest memory", || self.space.remove_region(id))
                .context("unmapping guest memory")?;
            unmapped = stats.bytes_unmapped;
        }
        let mut detached = 0;
        if self.backend == Backend::Iommufd {
            for (d, dev) in &self.devices {
                self.space
                    .detach(dev)
                    .with_context(|| format!("detaching {}", d.bdf))?;
                detached += 1;
            }
        }
        let n = self.devices.len();
        drop(self);
        Ok(format!(
            "unmapped {}, released {n} device(s){}",
            human_bytes(unmapped),
            if detached > 0 { " (detached)" } else { "" }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_iommufd_when_dev_iommu_exists() {
        assert_eq!(resolve_iommu(IommuArg::Auto, true), Backend::Iommufd);
        assert_eq!(resolve_iommu(IommuArg::Auto, false), Backend::Legacy);
        assert_eq!(resolve_iommu(IommuArg::Legacy, true), Backend::Legacy);
        assert_eq!(resolve_iommu(IommuArg::Iommufd, false), Backend::Iommufd);
    }

    #[test]
    fn hugetlb_needs_2m_multiples_as_a_usage_error() {
        let l = Layout {
            size: 4096,
            gpa: 0,
            backing: BackingArg::Hugetlb,
            huge_page: None,
            confidential: false,
            convertible: None,
        };
        let e = l.validate().unwrap_err();
        assert_eq!(crate::errors::exit_code(&e), crate::errors::EXIT_USAGE);
        assert!(e.to_string().contains("multiple of 2 MiB"), "{e}");
        assert_eq!(l.huge_page_size(), Some(HugePageSize::Size2M));
    }

    #[test]
    fn huge_page_size_is_for_hugetlb_only_and_divides_the_memory() {
        let l = Layout {
            size: 3 << 29, // 1.5 GiB: whole 2 MiB pages, not whole 1 GiB pages
            gpa: 1 << 32,
            backing: BackingArg::Hugetlb,
            huge_page: Some(HugePageSize::Size1G),
            confidential: false,
            convertible: None,
        };
        let e = l.validate().unwrap_err();
        assert_eq!(crate::errors::exit_code(&e), crate::errors::EXIT_USAGE);
        assert_eq!(
            e.to_string(),
            "--memory 0x60000000: hugetlb backing with 1 GiB pages needs a multiple of 1 GiB \
             (e.g. --memory 2G)"
        );
        let ok = Layout {
            size: 2 << 30,
            ..l.clone()
        };
        ok.validate().unwrap();
        assert_eq!(ok.huge_page_size(), Some(HugePageSize::Size1G));
        for backing in [BackingArg::Gmem, BackingArg::Memfd] {
            let l = Layout {
                backing,
                ..ok.clone()
            };
            let e = l.validate().unwrap_err();
            assert_eq!(crate::errors::exit_code(&e), crate::errors::EXIT_USAGE);
            assert!(
                e.to_string()
                    .starts_with("--huge-page-size 1G applies to --backing hugetlb only")
                    && e.to_string()
                        .ends_with("drop --huge-page-size or add --backing hugetlb"),
                "{e}"
            );
            assert_eq!(l.huge_page_size(), None);
        }
    }

    #[test]
    fn confidential_uses_sw_protected_or_says_why_not() {
        let t = |bits| Ok(VmTypes::from_bits_retain(bits));
        assert_eq!(private_vm_type(t(0b11)), Ok(VmType::SwProtected));
        // Debian's kernel: DEFAULT only.
        let why = private_vm_type(t(0b1)).unwrap_err();
        assert!(
            why.starts_with("KVM creates DEFAULT; SW_PROTECTED needs")
                && why.contains("CONFIG_KVM_SW_PROTECTED_VM"),
            "{why}"
        );
        // An SNP host without SW_PROTECTED: named, and why it is not used.
        let why = private_vm_type(t(0b1_0001)).unwrap_err();
        assert!(
            why.contains("SNP (type 4) need a firmware launch flow"),
            "{why}"
        );
        let why = private_vm_type(Err("cannot open /dev/kvm".into())).unwrap_err();
        assert_eq!(why, "KVM is not usable: cannot open /dev/kvm");
    }

    #[test]
    fn confidential_starts_private() {
        let l = Layout {
            size: 1 << 20,
            gpa: 0,
            backing: BackingArg::Gmem,
            huge_page: None,
            confidential: true,
            convertible: None,
        };
        assert_eq!(l.initial(), Some(PageState::Private));
        let plain = Layout {
            confidential: false,
            ..l
        };
        assert_eq!(plain.initial(), None);
    }
}
