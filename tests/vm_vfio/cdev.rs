//! Devices through the cdev + iommufd path, proven with the edu DMA engine: DMA both
//! ways, refused DMA after unmap, attach/replace/detach, interrupts, reset, a second user.

use super::*;

pub(crate) fn cdev_dma_round_trip_by_va_and_by_file() -> Result<(), Failed> {
    let (eng, iommufd, _) = cdev_edu(0)?;
    let info = eng.device().info().or_fail("device info")?;
    check!(info.is_pci() && info.num_regions >= 9, "info {info:?}");
    let bar0 = eng.device().region_info(0).or_fail("BAR0 info")?;
    check!(bar0.size == 1 << 20 && bar0.mmappable(), "BAR0 {bar0:?}");
    // By VA: a memfd mapping in this process.
    let mem = memfd("va", 2 * PAGE).or_fail("memfd")?;
    let ram = Mapping::new(&mem, 0, 2 * PAGE as usize).or_fail("mmap")?;
    ioas_map_va(&iommufd, iommufd.ioas, ram.addr(), PAGE, IOVA)?;
    round_trip(&eng, &mut ram.bytes()[..PAGE as usize], IOVA, 1)?;
    // By fd+offset: the memfd's second page.
    iommufd
        .map_file(&mem, PAGE, PAGE, IOVA + PAGE)
        .or_fail("MAP_FILE")?;
    round_trip(&eng, &mut ram.bytes()[PAGE as usize..], IOVA + PAGE, 2)?;
    // Device-to-device copy through RAM pages: page 0 → page 1.
    let p = pattern(3);
    ram.bytes()[..PAGE as usize].copy_from_slice(&p);
    eng.copy(IOVA, IOVA + PAGE, PAGE).or_fail("copy")?;
    check!(
        ram.bytes()[PAGE as usize..] == p[..],
        "copy through the device failed"
    );
    Ok(())
}

pub(crate) fn cdev_unmapped_iova_leaves_memory_unchanged() -> Result<(), Failed> {
    let (eng, iommufd, _) = cdev_edu(0)?;
    let mem = memfd("unmap", PAGE).or_fail("memfd")?;
    let ram = Mapping::new(&mem, 0, PAGE as usize).or_fail("mmap")?;
    ioas_map_va(&iommufd, iommufd.ioas, ram.addr(), PAGE, IOVA)?;
    round_trip(&eng, ram.bytes(), IOVA, 4)?;
    let n = iommufd.unmap(IOVA, PAGE).or_fail("unmap")?;
    check!(n == PAGE, "unmapped {n}");
    refused(&eng, ram.bytes(), IOVA)
}

pub(crate) fn cdev_attach_replace_and_detach() -> Result<(), Failed> {
    let (eng, iommufd, _) = cdev_edu(0)?;
    let mem = memfd("replace", PAGE).or_fail("memfd")?;
    let ram = Mapping::new(&mem, 0, PAGE as usize).or_fail("mmap")?;
    ioas_map_va(&iommufd, iommufd.ioas, ram.addr(), PAGE, IOVA)?;
    let empty = ioas_alloc(&iommufd)?;
    // Replace: attach to an empty IOAS without detaching; DMA is refused there.
    eng.device()
        .attach(empty)
        .or_fail("attach (replace) to empty IOAS")?;
    refused(&eng, ram.bytes(), IOVA)?;
    // And back: the mapping in the first IOAS works again.
    eng.device()
        .attach(iommufd.ioas)
        .or_fail("attach (replace) back")?;
    round_trip(&eng, ram.bytes(), IOVA, 5)?;
    eng.device().detach().or_fail("detach")?;
    refused(&eng, ram.bytes(), IOVA)?;
    eng.device()
        .attach(iommufd.ioas)
        .or_fail("attach after detach")?;
    round_trip(&eng, ram.bytes(), IOVA, 6)
}

pub(crate) fn cdev_msi_on_dma_completion() -> Result<(), Failed> {
    let (mut eng, iommufd, _) = cdev_edu(0)?;
    let msi = eng.device().irq_info(IrqKind::Msi).or_fail("MSI info")?;
    check!(msi.count >= 1 && msi.eventfd(), "MSI info {msi:?}");
    let mem = memfd("msi", PAGE).or_fail("memfd")?;
    let ram = Mapping::new(&mem, 0, PAGE as usize).or_fail("mmap")?;
    ioas_map_va(&iommufd, iommufd.ioas, ram.addr(), PAGE, IOVA)?;
    eng.enable_completion_msi().or_fail("enable MSI")?;
    for round in 0..2 {
        eng.dma_to_ram(IOVA, PAGE).or_fail("DMA")?;
        let fired = eng
            .wait_completion_msi(Duration::from_secs(10))
            .or_fail("wait")?;
        check!(fired, "no MSI on DMA completion (round {round})");
        let status = eng.bar0().read_u32(edu::REG_IRQ_STATUS);
        check!(status == 0, "irq status {status:#x} after ack");
    }
    // Without the irq bit nothing fires: disable and check the eventfd stays quiet.
    eng.device()
        .disable_irq(IrqKind::Msi)
        .or_fail("disable MSI")?;
    Ok(())
}

pub(crate) fn cdev_intx_and_absent_msix() -> Result<(), Failed> {
    let (eng, _iommufd, _) = cdev_edu(0)?;
    let dev = eng.device();
    let intx = dev.irq_info(IrqKind::Intx).or_fail("INTx info")?;
    check!(
        intx.count == 1 && intx.eventfd() && intx.automasked(),
        "INTx info {intx:?}"
    );
    let ev = EventFd::new().or_fail("eventfd")?;
    dev.enable_irq(IrqKind::Intx, 0, &[&ev])
        .or_fail("enable INTx")?;
    for round in 0..2 {
        // edu's 0x60 register raises its interrupt with the written bits as status.
        eng.bar0().write_u32(0x60, 0x1);
        let fired = ev.wait_timeout(Duration::from_secs(10)).or_fail("wait")?;
        check!(fired.is_some(), "no INTx (round {round})");
        eng.bar0().write_u32(edu::REG_IRQ_ACK, 0x1);
        // VFIO masked the level interrupt when it fired: unmask for the next one.
        dev.unmask_intx().or_fail("unmask INTx")?;
    }
    dev.disable_irq(IrqKind::Intx).or_fail("disable INTx")?;
    // edu has no MSI-X: the info says so and enabling it fails with an explanation.
    let msix = dev.irq_info(IrqKind::Msix).or_fail("MSI-X info")?;
    check!(msix.count == 0, "edu MSI-X count {}", msix.count);
    let e = dev
        .enable_irq(IrqKind::Msix, 0, &[&ev])
        .err()
        .ok_or("MSI-X enabled")?;
    check!(e.to_string().contains("irq_info"), "unclear: {e}");
    Ok(())
}

pub(crate) fn cdev_reset() -> Result<(), Failed> {
    let (eng, iommufd, bdf) = cdev_edu(0)?;
    let info = eng.device().info().or_fail("info")?;
    let methods = std::fs::read_to_string(format!("/sys/bus/pci/devices/{bdf}/reset_method"))
        .unwrap_or_default();
    // Liveness register: reads back the inverse of what was written.
    eng.bar0().write_u32(edu::REG_LIVENESS, 0x1234_5678);
    check!(
        eng.bar0().read_u32(edu::REG_LIVENESS) == !0x1234_5678u32,
        "liveness"
    );
    // VFIO reports a reset exactly when the kernel found a reset method for the device.
    check!(
        info.can_reset() != methods.trim().is_empty(),
        "can_reset {} but reset_method {methods:?}",
        info.can_reset()
    );
    let r = eng.device().reset();
    if info.can_reset() {
        r.or_fail("reset")?;
        eprintln!(
            "edu reset ({methods:?}): liveness now {:#x}",
            eng.bar0().read_u32(edu::REG_LIVENESS)
        );
    } else {
        // edu is a conventional PCI function on the root bus: no FLR, no PM reset, no
        // bus reset. VFIO must say so rather than pretend.
        let e = r
            .err()
            .ok_or("reset succeeded on a device without a reset method")?;
        check!(
            e.to_string().contains("reset method"),
            "unclear reset error: {e}"
        );
        eprintln!("edu has no reset method ({methods:?}): {e}");
    }
    // Usable afterwards either way. Reset clears bus mastering: enable it again.
    eng.device().enable_bus_master().or_fail("bus master")?;
    check!(
        eng.bar0().read_u32(edu::REG_ID) & 0xff == 0xed,
        "id after reset"
    );
    let mem = memfd("reset", PAGE).or_fail("memfd")?;
    let ram = Mapping::new(&mem, 0, PAGE as usize).or_fail("mmap")?;
    ioas_map_va(&iommufd, iommufd.ioas, ram.addr(), PAGE, IOVA)?;
    round_trip(&eng, ram.bytes(), IOVA, 7)
}

pub(crate) fn cdev_second_user_refused_first_unaffected() -> Result<(), Failed> {
    let (eng, iommufd, bdf) = cdev_edu(0)?;
    let mem = memfd("second", PAGE).or_fail("memfd")?;
    let ram = Mapping::new(&mem, 0, PAGE as usize).or_fail("mmap")?;
    ioas_map_va(&iommufd, iommufd.ioas, ram.addr(), PAGE, IOVA)?;
    let before = pci::bindings();
    // A second open of the cdev succeeds (the kernel only checks at bind time) ...
    let second = Device::open_pci(bdf).or_fail("second open")?;
    let other = RawIommufd::open().or_fail("second iommufd")?;
    // ... and the bind is refused with an explanation.
    let e = second
        .bind_iommufd(other.fd.as_fd())
        .err()
        .ok_or("second bind succeeded")?;
    check!(e.to_string().contains("already bound"), "unclear: {e}");
    drop(second);
    // The legacy group is held while a cdev user is bound.
    let g = PciSysfs::new()
        .device(bdf)
        .or_fail("dev")?
        .iommu_group
        .ok_or("no group")?;
    let e = Group::open(g)
        .err()
        .ok_or("group open succeeded while the cdev is bound")?;
    check!(
        e.errno() == Some(libc::EBUSY) && e.to_string().contains("already open"),
        "{e}"
    );
    // Unbinding a device in use is refused before anything changes.
    let e = Binder::new()
        .unbind(bdf)
        .err()
        .ok_or("unbind of an open device succeeded")?;
    check!(
        matches!(e, VfioError::InUse { pid: Some(p), .. } if p == std::process::id()),
        "expected in use by this pid: {e}"
    );
    check!(
        PciSysfs::new().device(bdf).or_fail("dev")?.is_vfio_bound(),
        "driver changed"
    );
    unchanged(&before, "the refused second user and unbind")?;
    // The first user is unaffected.
    round_trip(&eng, ram.bytes(), IOVA, 8)
}

/// The library's engine contract on a real device: the table finds edu and opens it
/// (owned and borrowed); lengths the engine cannot move are refused before anything
/// starts; waiting for a completion interrupt before enabling one is refused; `reset`
/// either resets (then the engine works again with interrupts off) or says why not (and
/// the engine still works).
pub(crate) fn engine_table_and_contract() -> Result<(), Failed> {
    let bdf = bound_edu(0)?;
    let pci_dev = PciSysfs::new().device(bdf).or_fail("sysfs")?;
    let drv = engine::driver_for(&pci_dev).ok_or("no driver for edu in engine::DRIVERS")?;
    check!(
        drv.name == "edu" && drv.matches(edu::VENDOR, edu::DEVICE),
        "driver {drv:?}"
    );
    check!(
        engine::driver_for_ids(edu::VENDOR, edu::DEVICE + 1).is_none(),
        "a driver matched an unknown id"
    );
    let iommufd = RawIommufd::open().or_fail("open /dev/iommu + IOAS")?;
    let dev = Device::open_pci(bdf).or_fail("open cdev")?;
    dev.bind_iommufd(iommufd.fd.as_fd())
        .or_fail("bind_iommufd")?;
    dev.attach(iommufd.ioas).or_fail("attach IOAS")?;
    let mem = memfd("engine", PAGE).or_fail("memfd")?;
    let ram = Mapping::new(&mem, 0, PAGE as usize).or_fail("mmap")?;
    ioas_map_va(&iommufd, iommufd.ioas, ram.addr(), PAGE, IOVA)?;
    {
        let borrowed = drv.open_borrowed(&dev).or_fail("open_borrowed")?;
        round_trip(borrowed.as_ref(), ram.bytes(), IOVA, 21)?;
    }
    let mut eng = drv.open(dev).or_fail("open")?;
    check!(
        eng.max_transfer() == edu::BUF_LEN,
        "max {}",
        eng.max_transfer()
    );
    for len in [0, edu::BUF_LEN + 1] {
        ram.bytes().fill(0x3c);
        match eng.dma_to_ram(IOVA, len) {
            Err(engine::EngineError::BadLength { len: l, .. }) if l == len => {}
            other => return Err(format!("length {len}: {other:?}").into()),
        }
        check!(
            ram.bytes().iter().all(|&b| b == 0x3c),
            "a refused length {len} moved data"
        );
    }
    match eng.wait_completion_msi(Duration::from_millis(10)) {
        Err(engine::EngineError::Unsupported { .. }) => {}
        other => return Err(format!("wait without MSI: {other:?}").into()),
    }
    eng.enable_completion_msi().or_fail("enable MSI")?;
    eng.dma_to_ram(IOVA, PAGE).or_fail("DMA")?;
    check!(
        eng.wait_completion_msi(Duration::from_secs(10))
            .or_fail("wait")?,
        "no MSI on completion"
    );
    let can_reset = eng.device().info().or_fail("info")?.can_reset();
    match eng.reset() {
        Ok(()) => {
            check!(
                can_reset,
                "reset succeeded on a device without a reset method"
            );
            match eng.wait_completion_msi(Duration::from_millis(10)) {
                Err(engine::EngineError::Unsupported { .. }) => {}
                other => return Err(format!("MSI still on after reset: {other:?}").into()),
            }
        }
        Err(e) => {
            check!(!can_reset, "reset failed on a device that can reset: {e}");
            check!(
                e.to_string().contains("reset method"),
                "unclear reset error: {e}"
            );
            eprintln!("engine reset refused as expected: {e}");
        }
    }
    round_trip(eng.as_ref(), ram.bytes(), IOVA, 22)
}
