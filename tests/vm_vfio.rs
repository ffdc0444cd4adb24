//! The VFIO layer in the test VM: whole-group bind/unbind with restore, devices through
//! the cdev + iommufd path and through the legacy group + type1 container, proven with
//! the edu DMA engine (DMA both ways, refused DMA after unmap, MSI on completion, reset),
//! and the errors a user meets (unknown device, wrong driver, second user, in use).
//!
//! iommufd is driven with raw ioctls here (tests/support/edu_raw.rs): the library's
//! iommufd layer is written separately.

mod support;

#[path = "vm_vfio/bind.rs"]
mod bind;
#[path = "vm_vfio/cdev.rs"]
mod cdev;
#[path = "vm_vfio/legacy.rs"]
mod legacy;
use bind::*;
use cdev::*;
use legacy::*;

use std::os::fd::AsFd;
use std::time::Duration;

use libtest_mimic::Failed;
use support::edu_raw::{memfd, Mapping, RawIommufd};
use support::needs::{self, Need};
use support::raw::{self as sys, iommufd_uapi as iu};
use support::{pci, run_vm_tests, OrFail};
use vfio_gmem::engine::edu::{self, Edu};
use vfio_gmem::engine::{self, DmaEngine};
use vfio_gmem::mapper::{Access, DmaMapper, Iova, MapError};
use vfio_gmem::vfio::{
    Bdf, Binder, Container, Device, EventFd, Group, IrqKind, PciSysfs, Readiness, VfioError,
};

/// What the running kernel must offer (see `support::needs`); unmet: reported skipped.
const NEEDS: needs::Needs = &[
    ("cdev_dma_round_trip_by_va_and_by_file", &[Need::Iommufd]),
    (
        "cdev_unmapped_iova_leaves_memory_unchanged",
        &[Need::Iommufd],
    ),
    ("cdev_attach_replace_and_detach", &[Need::Iommufd]),
    ("cdev_msi_on_dma_completion", &[Need::Iommufd]),
    ("cdev_intx_and_absent_msix", &[Need::Iommufd]),
    ("cdev_reset", &[Need::Iommufd]),
    ("engine_table_and_contract", &[Need::Iommufd]),
    (
        "cdev_second_user_refused_first_unaffected",
        &[Need::Iommufd],
    ),
    ("cdev_bind_refused_while_group_open", &[Need::Iommufd]),
    ("no_irq_remap_is_explained", &[Need::Iommufd]),
    (
        "non_viable_group_named_then_taken_over_and_restored",
        &[Need::Iommufd],
    ),
];

fn main() {
    needs::declare(NEEDS);
    run_vm_tests(&[
        ("discovery_lists_edu_devices", discovery_lists_edu_devices),
        (
            "bind_unbind_round_trip_restores_drivers",
            bind_unbind_round_trip_restores_drivers,
        ),
        (
            "bind_whole_multi_member_group",
            bind_whole_multi_member_group,
        ),
        (
            "cdev_dma_round_trip_by_va_and_by_file",
            cdev_dma_round_trip_by_va_and_by_file,
        ),
        (
            "cdev_unmapped_iova_leaves_memory_unchanged",
            cdev_unmapped_iova_leaves_memory_unchanged,
        ),
        (
            "cdev_attach_replace_and_detach",
            cdev_attach_replace_and_detach,
        ),
        ("cdev_msi_on_dma_completion", cdev_msi_on_dma_completion),
        ("cdev_intx_and_absent_msix", cdev_intx_and_absent_msix),
        ("cdev_reset", cdev_reset),
        ("engine_table_and_contract", engine_table_and_contract),
        (
            "cdev_second_user_refused_first_unaffected",
            cdev_second_user_refused_first_unaffected,
        ),
        (
            "bad_input_unknown_and_unbound_devices",
            bad_input_unknown_and_unbound_devices,
        ),
        (
            "legacy_dma_round_trip_unmap_and_msi",
            legacy_dma_round_trip_unmap_and_msi,
        ),
        (
            "legacy_second_group_open_refused",
            legacy_second_group_open_refused,
        ),
        (
            "cdev_bind_refused_while_group_open",
            cdev_bind_refused_while_group_open,
        ),
        ("no_irq_remap_is_explained", no_irq_remap_is_explained),
        (
            "non_viable_group_named_then_taken_over_and_restored",
            non_viable_group_named_then_taken_over_and_restored,
        ),
    ]);
}

const PAGE: u64 = 4096;
const IOVA: u64 = 0x1_0000_0000;

fn edus() -> Result<Vec<Bdf>, Failed> {
    let devs = PciSysfs::new().devices().or_fail("list PCI devices")?;
    let v: Vec<Bdf> = devs
        .iter()
        .filter(|d| d.vendor == edu::VENDOR && d.device == edu::DEVICE)
        .map(|d| d.bdf)
        .collect();
    check!(v.len() >= 2, "expected 2 edu devices, found {v:?}");
    Ok(v)
}

/// Binds edu `i` to vfio-pci with the library's binder.
fn bound_edu(i: usize) -> Result<Bdf, Failed> {
    let bdf = edus()?[i];
    Binder::new().bind(bdf).or_fail("bind edu")?;
    Ok(bdf)
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE as usize)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

/// RAM → device → RAM with the RAM overwritten in between: the result proves both DMAs.
fn round_trip(eng: &dyn DmaEngine, ram: &mut [u8], iova: u64, seed: u8) -> Result<(), Failed> {
    let p = pattern(seed);
    ram.copy_from_slice(&p);
    eng.dma_from_ram(iova, PAGE).or_fail("DMA RAM→device")?;
    ram.fill(0x55);
    eng.dma_to_ram(iova, PAGE).or_fail("DMA device→RAM")?;
    check!(
        ram[..] == p[..],
        "{}: DMA round trip at {iova:#x} did not return the pattern",
        eng.name()
    );
    Ok(())
}

/// The device writes to `iova`; the IOMMU must refuse it: `ram` unchanged, fault logged.
fn refused(eng: &dyn DmaEngine, ram: &mut [u8], iova: u64) -> Result<(), Failed> {
    let before = pci::iommu_fault_count();
    ram.fill(0xaa);
    eng.dma_to_ram(iova, PAGE).or_fail("DMA to unmapped IOVA")?;
    check!(
        ram.iter().all(|&b| b == 0xaa),
        "the device wrote through an unmapped IOVA {iova:#x}"
    );
    // The fault log is corroboration, not the proof (memory is), and it is not reliable
    // enough to require: intel-iommu prints faults through a ratelimit (10 per 5 s,
    // drivers/iommu/intel/dmar.c), and virtio-iommu reports them through an event queue
    // that one 4 KiB DMA (a fault per 4 bytes) overflows ("no buffer available").
    let after = pci::iommu_fault_count();
    if after == before {
        eprintln!("note: refused DMA at {iova:#x} left no (unsuppressed) fault in the log");
    }
    Ok(())
}

fn ioas_alloc(iommufd: &RawIommufd) -> Result<u32, Failed> {
    let mut a: iu::iommu_ioas_alloc = sys::zeroed();
    a.size = std::mem::size_of_val(&a) as u32;
    sys::ioctl_mut(iommufd.fd.as_fd(), sys::IOMMU_IOAS_ALLOC, &mut a).or_fail("IOAS_ALLOC")?;
    Ok(a.out_ioas_id)
}

fn ioas_map_va(
    iommufd: &RawIommufd,
    ioas: u32,
    va: u64,
    len: u64,
    iova: u64,
) -> Result<(), Failed> {
    let mut m: iu::iommu_ioas_map = sys::zeroed();
    m.size = std::mem::size_of_val(&m) as u32;
    m.flags = iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
        | iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
        | iu::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
    m.ioas_id = ioas;
    m.user_va = va;
    m.length = len;
    m.iova = iova;
    sys::ioctl_mut(iommufd.fd.as_fd(), sys::IOMMU_IOAS_MAP, &mut m).or_fail("IOMMU_IOAS_MAP")?;
    Ok(())
}

/// edu `i` bound to vfio-pci, opened through its cdev, bound to a fresh iommufd and
/// attached to its IOAS, wrapped in the edu engine.
fn cdev_edu(i: usize) -> Result<(Edu, RawIommufd, Bdf), Failed> {
    let bdf = bound_edu(i)?;
    let iommufd = RawIommufd::open().or_fail("open /dev/iommu + IOAS")?;
    let dev = Device::open_pci(bdf).or_fail("open cdev")?;
    dev.bind_iommufd(iommufd.fd.as_fd())
        .or_fail("bind_iommufd")?;
    dev.attach(iommufd.ioas).or_fail("attach IOAS")?;
    let eng = Edu::new(dev).or_fail("edu engine")?;
    Ok((eng, iommufd, bdf))
}

/// Fails unless `before` equals the system's bindings now.
fn unchanged(before: &pci::BindingSnapshot, what: &str) -> Result<(), Failed> {
    let after = pci::bindings();
    check!(
        *before == after,
        "{what} changed the system: {}",
        pci::binding_diff(before, &after)
    );
    Ok(())
}
