//! Devices through the legacy group + type1 container path, and the two paths' mutual
//! exclusion.

use super::*;

/// edu `i` through the legacy path: its group in a fresh type1v2 container.
pub(crate) fn legacy_edu(i: usize) -> Result<(Edu, Container, Group), Failed> {
    let bdf = bound_edu(i)?;
    let g = PciSysfs::new()
        .device(bdf)
        .or_fail("dev")?
        .iommu_group
        .ok_or("no group")?;
    let container = Container::open().or_fail("open container")?;
    let group = Group::open(g).or_fail("open group")?;
    check!(group.is_viable().or_fail("viable")?, "group not viable");
    container.add_group(&group).or_fail("add group")?;
    check!(
        group.has_container().or_fail("status")?,
        "group has no container"
    );
    let dev = group.device(bdf).or_fail("device fd from group")?;
    Ok((Edu::new(dev).or_fail("edu")?, container, group))
}

pub(crate) fn legacy_dma_round_trip_unmap_and_msi() -> Result<(), Failed> {
    let (mut eng, c, _g) = legacy_edu(1)?;
    let pg = c.iova_pgsizes().or_fail("pgsizes")?;
    check!(pg & PAGE != 0, "4 KiB IOMMU pages unsupported: {pg:#x}");
    let mem = memfd("legacy", 2 * PAGE).or_fail("memfd")?;
    let ram = Mapping::new(&mem, 0, 2 * PAGE as usize).or_fail("mmap")?;
    // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
    // its IOAS/container gone, before the memory is).
    let got = unsafe { c.map_user(Iova::Fixed(IOVA), ram.addr(), 2 * PAGE, Access::READ_WRITE) }
        .or_fail("MAP_DMA")?;
    check!(got == IOVA, "mapped at {got:#x}");
    round_trip(&eng, &mut ram.bytes()[..PAGE as usize], IOVA, 9)?;
    round_trip(&eng, &mut ram.bytes()[PAGE as usize..], IOVA + PAGE, 10)?;
    // What type1 cannot do, it says.
    let e = c.map_file(Iova::Fixed(IOVA), mem.as_fd(), 0, PAGE, Access::READ_WRITE);
    check!(
        matches!(e, Err(MapError::FileMappingUnsupported { .. })),
        "{e:?}"
    );
    // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
    // its IOAS/container gone, before the memory is).
    let e = unsafe { c.map_user(Iova::Any, ram.addr(), PAGE, Access::READ_WRITE) };
    check!(
        matches!(e, Err(MapError::AnyIovaUnsupported { .. })),
        "{e:?}"
    );
    // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
    // its IOAS/container gone, before the memory is).
    let e = unsafe { c.map_user(Iova::Fixed(IOVA), ram.addr(), PAGE, Access::READ_WRITE) };
    check!(
        e.as_ref().err().and_then(MapError::errno) == Some(libc::EEXIST),
        "{e:?}"
    );
    // MSI on completion through a group-obtained device fd.
    eng.enable_completion_msi().or_fail("enable MSI")?;
    eng.dma_to_ram(IOVA, PAGE).or_fail("DMA")?;
    check!(
        eng.wait_completion_msi(Duration::from_secs(10))
            .or_fail("wait")?,
        "no MSI"
    );
    eng.device()
        .disable_irq(IrqKind::Msi)
        .or_fail("disable MSI")?;
    // Unmap: type1 refuses to cut a mapping; whole mappings go; DMA is then refused.
    let e = c.unmap(IOVA, PAGE);
    check!(e.is_err(), "type1 cut a 2-page mapping in half: {e:?}");
    let n = c.unmap(IOVA, 2 * PAGE).or_fail("UNMAP_DMA")?;
    check!(n == 2 * PAGE, "unmapped {n}");
    refused(&eng, &mut ram.bytes()[..PAGE as usize], IOVA)?;
    // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
    // its IOAS/container gone, before the memory is).
    unsafe { c.map_user(Iova::Fixed(IOVA), ram.addr(), PAGE, Access::READ_WRITE) }
        .or_fail("remap")?;
    round_trip(&eng, &mut ram.bytes()[..PAGE as usize], IOVA, 11)?;
    let n = c.unmap_all().or_fail("unmap all")?;
    check!(n == PAGE, "unmap_all reported {n}");
    refused(&eng, &mut ram.bytes()[..PAGE as usize], IOVA)
}

pub(crate) fn legacy_second_group_open_refused() -> Result<(), Failed> {
    let (eng, c, g) = legacy_edu(1)?;
    let mem = memfd("legacy-second", PAGE).or_fail("memfd")?;
    let ram = Mapping::new(&mem, 0, PAGE as usize).or_fail("mmap")?;
    // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
    // its IOAS/container gone, before the memory is).
    unsafe { c.map_user(Iova::Fixed(IOVA), ram.addr(), PAGE, Access::READ_WRITE) }
        .or_fail("MAP_DMA")?;
    round_trip(&eng, ram.bytes(), IOVA, 12)?;
    let before = pci::bindings();
    let e = Group::open(g.id())
        .err()
        .ok_or("second group open succeeded")?;
    check!(
        e.errno() == Some(libc::EBUSY) && e.to_string().contains("one user per group"),
        "{e}"
    );
    check!(
        eng.bar0().read_u32(edu::REG_ID) & 0xff == 0xed,
        "first user lost the device"
    );
    unchanged(&before, "the refused second group open")?;
    // The first user's mapping and DMA are unaffected.
    round_trip(&eng, ram.bytes(), IOVA, 13)
}

/// While a group is open through the legacy path, binding its device's cdev to an iommufd
/// is refused, and the first user keeps the device.
pub(crate) fn cdev_bind_refused_while_group_open() -> Result<(), Failed> {
    let (eng, c, _g) = legacy_edu(1)?;
    let mem = memfd("legacy-cdev", PAGE).or_fail("memfd")?;
    let ram = Mapping::new(&mem, 0, PAGE as usize).or_fail("mmap")?;
    // SAFETY: the mapping this VA points into outlives the IOVA mapping (unmapped, or
    // its IOAS/container gone, before the memory is).
    unsafe { c.map_user(Iova::Fixed(IOVA), ram.addr(), PAGE, Access::READ_WRITE) }
        .or_fail("MAP_DMA")?;
    let before = pci::bindings();
    let bdf = edus()?[1];
    let dev = Device::open_pci(bdf).or_fail("cdev open")?;
    let fd = RawIommufd::open().or_fail("iommufd")?;
    let e = dev
        .bind_iommufd(fd.fd.as_fd())
        .err()
        .ok_or("cdev bind while group open")?;
    check!(e.errno() == Some(libc::EBUSY), "{e}");
    drop(dev);
    check!(
        eng.bar0().read_u32(edu::REG_ID) & 0xff == 0xed,
        "first user lost the device"
    );
    unchanged(&before, "the refused cdev bind")?;
    round_trip(&eng, ram.bytes(), IOVA, 14)
}
