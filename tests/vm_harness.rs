//! The harness's own proof (VM): the kernel has iommufd and VFIO cdev, and the edu device's
//! DMA through the emulated IOMMU shows exactly what is mapped.

mod support;

use libtest_mimic::Failed;
use support::edu_raw::{memfd, Mapping, RawEdu, RawIommufd};
use support::needs::{self, Need};
use support::{pci, run_vm_tests, OrFail};

/// What the running kernel must offer (see `support::needs`); unmet: reported skipped.
const NEEDS: needs::Needs = &[("*", &[Need::Iommufd])];

fn main() {
    needs::declare(NEEDS);
    run_vm_tests(&[
        (
            "kernel_has_iommufd_vfio_and_kvm",
            kernel_has_iommufd_vfio_and_kvm,
        ),
        (
            "edu_dma_through_map_file_then_refused_after_unmap",
            edu_dma_through_map_file_then_refused_after_unmap,
        ),
    ]);
}

fn kernel_has_iommufd_vfio_and_kvm() -> Result<(), Failed> {
    for p in ["/dev/iommu", "/dev/vfio/vfio", "/dev/kvm"] {
        check!(
            std::path::Path::new(p).exists(),
            "{p} is missing in the test VM"
        );
    }
    check!(
        !pci::edu_devices().is_empty(),
        "no edu device in the test VM"
    );
    Ok(())
}

const IOVA: u64 = 0x1_0000_0000;
const PAGE: usize = 4096;

fn edu_dma_through_map_file_then_refused_after_unmap() -> Result<(), Failed> {
    let bdf = pci::edu_devices()
        .into_iter()
        .next()
        .ok_or("no edu device")?;
    pci::bind_vfio_pci(&bdf).or_fail("bind edu to vfio-pci")?;
    let cdev = pci::vfio_cdev(&bdf).or_fail("vfio cdev")?;
    let iommufd = RawIommufd::open().or_fail("open /dev/iommu + IOAS_ALLOC")?;
    let edu = RawEdu::open(&cdev, &iommufd).or_fail("open edu cdev, bind, attach")?;

    let mem = memfd("proof", 2 * PAGE as u64).or_fail("memfd")?;
    let ram = Mapping::new(&mem, 0, 2 * PAGE).or_fail("mmap memfd")?;
    // Map the memfd's second page by fd+offset.
    iommufd
        .map_file(&mem, PAGE as u64, PAGE as u64, IOVA)
        .or_fail("IOMMU_IOAS_MAP_FILE")?;
    let page = &mut ram.bytes()[PAGE..];

    // RAM → device → RAM, with the RAM changed in between: the result proves both DMAs.
    let pattern: Vec<u8> = (0..PAGE).map(|i| (i * 7 + 3) as u8).collect();
    page.copy_from_slice(&pattern);
    edu.dma_from_ram(IOVA, PAGE as u64)
        .or_fail("DMA RAM→device")?;
    page.fill(0x55);
    edu.dma_to_ram(IOVA, PAGE as u64)
        .or_fail("DMA device→RAM")?;
    check!(
        page[..] == pattern[..],
        "DMA round trip through the mapping did not return the pattern"
    );

    let unmapped = iommufd
        .unmap(IOVA, PAGE as u64)
        .or_fail("IOMMU_IOAS_UNMAP")?;
    check!(
        unmapped == PAGE as u64,
        "unmap reported {unmapped} bytes, expected {PAGE}"
    );

    // After the unmap the IOMMU must refuse the device's write: memory stays unchanged.
    let faults_before = pci::iommu_fault_count();
    page.fill(0xaa);
    edu.dma_to_ram(IOVA, PAGE as u64)
        .or_fail("DMA device→RAM after unmap")?;
    check!(
        page.iter().all(|&b| b == 0xaa),
        "device wrote to an unmapped IOVA: the IOMMU did not refuse it"
    );
    let faults_after = pci::iommu_fault_count();
    check!(
        faults_after > faults_before,
        "no IOMMU fault logged for the refused DMA ({faults_before} → {faults_after})"
    );
    Ok(())
}
