//! Discovery and binding: whole-group bind/unbind with restore, the errors a user meets
//! (unknown or unbound device, no interrupt remapping), a non-viable group taken over and
//! restored.

use super::*;

pub(crate) fn discovery_lists_edu_devices() -> Result<(), Failed> {
    let s = PciSysfs::new();
    for bdf in edus()? {
        let d = s.device(bdf).or_fail("device")?;
        check!(d.class == 0x00ff00, "edu class {:#x}", d.class);
        let g = d.iommu_group.ok_or("edu has no IOMMU group")?;
        let members = s.group_members(g).or_fail("group members")?;
        check!(
            members.iter().any(|m| m.bdf == bdf),
            "{bdf} not among its group's members"
        );
        // Found through the plugin table by id.
        let drv = engine::driver_for(&d).ok_or("no DMA engine matches edu")?;
        check!(drv.name == "edu", "engine {}", drv.name);
    }
    // The group of the ICH9 functions has three members.
    let lpc: Bdf = "0000:00:1f.0".parse().unwrap();
    let g = s
        .device(lpc)
        .or_fail("00:1f.0")?
        .iommu_group
        .ok_or("no group")?;
    check!(
        s.group_members(g).or_fail("members")?.len() == 3,
        "ICH9 group is not 3 functions"
    );
    Ok(())
}

pub(crate) fn bind_unbind_round_trip_restores_drivers() -> Result<(), Failed> {
    let binder = Binder::new();
    let s = PciSysfs::new();
    // edu: unbound before, vfio-pci while bound, unbound after.
    let bdf = edus()?[1];
    let _ = binder.unbind(bdf);
    check!(
        s.device(bdf).or_fail("dev")?.driver.is_none(),
        "edu should start unbound"
    );
    binder.bind(bdf).or_fail("bind")?;
    let d = s.device(bdf).or_fail("dev")?;
    // A cdev exactly when the kernel has iommufd (CONFIG_VFIO_DEVICE_CDEV needs it):
    // Debian's kernel registers vfio-dev/vfioN without a device node.
    let cdev_expected = Need::Iommufd.unmet().is_none();
    check!(
        d.is_vfio_bound() && d.vfio_cdev.is_some() == cdev_expected,
        "after bind (cdev expected: {cdev_expected}): {d:?}"
    );
    if let Some(cdev) = &d.vfio_cdev {
        check!(cdev.exists(), "{} does not exist", cdev.display());
    }
    check!(
        matches!(
            s.readiness(bdf).or_fail("readiness")?,
            Readiness::Ready { .. }
        ),
        "not ready"
    );
    let state = std::fs::read_to_string(binder.state_file()).or_fail("state file")?;
    check!(
        state.contains(&format!("{bdf}\t-\t-")),
        "state file lacks {bdf}: {state:?}"
    );
    binder.bind(bdf).or_fail("second bind is a no-op")?;
    let restored = binder.unbind(bdf).or_fail("unbind")?;
    check!(
        restored.len() == 1 && restored[0].now.is_none(),
        "restored {restored:?}"
    );
    let d = s.device(bdf).or_fail("dev")?;
    check!(
        d.driver.is_none() && d.driver_override.is_none(),
        "after unbind: {d:?}"
    );

    // The watchdog has a real driver: bind takes it, unbind (from a fresh Binder, as
    // another process would) gives it back.
    let wd: Bdf = "0000:00:02.0".parse().unwrap();
    let before = s.device(wd).or_fail("watchdog")?.driver;
    check!(before.is_some(), "the watchdog should have a driver");
    binder.bind(wd).or_fail("bind watchdog")?;
    check!(
        s.device(wd).or_fail("wd")?.is_vfio_bound(),
        "watchdog not on vfio-pci"
    );
    let restored = Binder::new().unbind(wd).or_fail("unbind watchdog")?;
    check!(
        restored[0].previous == before,
        "recorded {:?}, was {before:?}",
        restored[0].previous
    );
    let after = s.device(wd).or_fail("wd")?.driver;
    check!(
        after == before,
        "watchdog driver {after:?} after unbind, was {before:?}"
    );
    Ok(())
}

pub(crate) fn bind_whole_multi_member_group() -> Result<(), Failed> {
    let s = PciSysfs::new();
    let smbus: Bdf = "0000:00:1f.3".parse().unwrap();
    let binder = Binder::new();
    let group = s
        .device(smbus)
        .or_fail("smbus")?
        .iommu_group
        .ok_or("smbus has no IOMMU group")?;
    let before: Vec<(Bdf, Option<String>)> = s
        .group_members(group)
        .or_fail("members")?
        .into_iter()
        .map(|m| (m.bdf, m.driver))
        .collect();
    // A modular kernel (Debian's) binds lpc_ich to the LPC bridge: the group cannot be
    // made viable without moving a bridge, which bind never does.
    let lpc = before.iter().find(|(b, _)| b.to_string() == "0000:00:1f.0");
    if let Some((_, Some(driver))) = lpc {
        let e = match binder.bind(smbus) {
            Err(e) => e,
            Ok(plan) => {
                return Err(format!("bound a group whose bridge has {driver}: {plan:?}").into())
            }
        };
        check!(
            matches!(e, VfioError::BridgeKeepsGroup { .. })
                && !e.to_string().contains("vfio-gmem bind 0000:00:1f.0"),
            "refusal: {e}"
        );
        let after: Vec<(Bdf, Option<String>)> = s
            .group_members(group)
            .or_fail("members")?
            .into_iter()
            .map(|m| (m.bdf, m.driver))
            .collect();
        check!(
            after == before,
            "a refused bind changed the group: {before:?} -> {after:?}"
        );
        return Ok(());
    }
    let plan = binder.bind(smbus).or_fail("bind ICH9 group via 00:1f.3")?;
    let members = s.group_members(plan.group).or_fail("members")?;
    check!(members.len() == 3, "members {members:?}");
    // Endpoints move; the LPC bridge (00:1f.0) is never moved: it stays without a
    // driver, which leaves the group viable.
    for m in &members {
        if m.nature().is_endpoint() {
            check!(
                m.is_vfio_bound(),
                "{} not on vfio-pci after a whole-group bind",
                m.bdf
            );
        } else {
            check!(
                m.driver.is_none() && m.driver_override.is_none(),
                "the bridge {} was moved: {m:?}",
                m.bdf
            );
        }
    }
    check!(
        members.iter().filter(|m| !m.nature().is_endpoint()).count() == 1,
        "the ICH9 group has one bridge (the LPC): {members:?}"
    );
    let restored = binder.unbind(smbus).or_fail("unbind group")?;
    check!(restored.len() == 2, "restored {restored:?}");
    // Each member is back where it was: the test kernel has no driver for them (none);
    // a modular kernel (Debian's) may have loaded its own driver on the device's uevent
    // meanwhile (lpc_ich, i2c_i801), which is where it would be without us. Never
    // vfio-pci, never an override left behind.
    let modular = std::path::Path::new("/proc/modules").exists();
    for m in s.group_members(plan.group).or_fail("members")? {
        let was = before
            .iter()
            .find(|(b, _)| *b == m.bdf)
            .and_then(|(_, d)| d.clone());
        check!(
            m.driver_override.is_none()
                && m.driver.as_deref() != Some("vfio-pci")
                && (m.driver == was || (modular && was.is_none())),
            "{} after unbind (driver before bind: {was:?}): {m:?}",
            m.bdf
        );
    }
    Ok(())
}

pub(crate) fn bad_input_unknown_and_unbound_devices() -> Result<(), Failed> {
    // edu #2 left unbound (this kernel binds nothing to edu by default).
    let bdf = edus()?[1];
    let _ = Binder::new().unbind(bdf);
    let before = pci::bindings();
    let e = "00:09".parse::<Bdf>().err().ok_or("bad BDF accepted")?;
    check!(e.to_string().contains("0000:00:03.0"), "{e}");
    let nobody: Bdf = "0000:00:1e.0".parse().unwrap();
    let e = Device::open_pci(nobody)
        .err()
        .ok_or("opened a missing device")?;
    check!(matches!(e, VfioError::NoSuchDevice { .. }), "{e}");
    let e = Binder::new()
        .bind(nobody)
        .err()
        .ok_or("bound a missing device")?;
    check!(matches!(e, VfioError::NoSuchDevice { .. }), "{e}");
    let e = Device::open_pci(bdf)
        .err()
        .ok_or("opened an unbound device")?;
    check!(
        matches!(e, VfioError::NotBoundToVfio { driver: None, .. })
            && e.to_string().contains(&format!("vfio-gmem bind {bdf}")),
        "{e}"
    );
    // No group node while nothing in the group is bound to vfio-pci.
    let g = PciSysfs::new()
        .device(bdf)
        .or_fail("dev")?
        .iommu_group
        .ok_or("no group")?;
    let e = Group::open(g)
        .err()
        .ok_or("opened a group with no vfio member")?;
    check!(e.to_string().contains("vfio-gmem bind"), "{e}");
    unchanged(&before, "refused opens and binds")?;
    // The watchdog is bound to its own driver: readiness names it.
    let wd: Bdf = "0000:00:02.0".parse().unwrap();
    match PciSysfs::new().readiness(wd).or_fail("readiness")? {
        Readiness::NotReady(why) => {
            check!(why.to_string().contains("not vfio-pci"), "{why}")
        }
        r => return Err(format!("watchdog ready? {r:?}").into()),
    }
    Ok(())
}

/// Without interrupt remapping (virtio-iommu on x86) and without the unsafe-interrupts
/// override, both paths refuse the device with EPERM; the error must explain why and what
/// the override risks. Only meaningful when the VM runs with the override turned off:
///   scripts/vm-run --iommu virtio --append "iommufd.allow_unsafe_interrupts=0
///   vfio_iommu_type1.allow_unsafe_interrupts=0" -- <vm_vfio binary> no_irq_remap
/// Elsewhere it checks that the override or remapping is in place and binding works.
pub(crate) fn no_irq_remap_is_explained() -> Result<(), Failed> {
    let param = |m: &str| {
        std::fs::read_to_string(format!(
            "/sys/module/{m}/parameters/allow_unsafe_interrupts"
        ))
        .map(|s| s.trim() == "Y")
        .unwrap_or(false)
    };
    let unsafe_ok = param("iommufd");
    let virtio = support::vm_iommu().as_deref() == Some("virtio");
    let bdf = bound_edu(0)?;
    let before = pci::bindings();
    let iommufd = RawIommufd::open().or_fail("iommufd")?;
    let dev = Device::open_pci(bdf).or_fail("open cdev")?;
    let r = dev.bind_iommufd(iommufd.fd.as_fd());
    if virtio && !unsafe_ok {
        let e = r
            .err()
            .ok_or("bind succeeded without interrupt remapping")?;
        check!(e.errno() == Some(libc::EPERM), "{e}");
        check!(
            e.to_string().contains("iommufd.allow_unsafe_interrupts=1"),
            "{e}"
        );
        eprintln!("cdev: {e}");
        drop(dev);
        let g = PciSysfs::new()
            .device(bdf)
            .or_fail("dev")?
            .iommu_group
            .ok_or("group")?;
        let c = Container::open().or_fail("container")?;
        let grp = Group::open(g).or_fail("group")?;
        if !param("vfio_iommu_type1") {
            let e = c.add_group(&grp).err().ok_or("type1 attach succeeded")?;
            check!(e.errno() == Some(libc::EPERM), "{e}");
            check!(
                e.to_string()
                    .contains("vfio_iommu_type1.allow_unsafe_interrupts=1"),
                "{e}"
            );
            eprintln!("legacy: {e}");
        }
        unchanged(&before, "the refused binds")?;
    } else {
        r.or_fail("bind with remapping or the override")?;
    }
    Ok(())
}

pub(crate) fn sysfs_write(path: String, value: &str) -> Result<(), Failed> {
    std::fs::write(&path, value).or_fail(&format!("write {value:?} to {path}"))
}

/// Forces `driver` onto `bdf` the way a user would: driver_override + drivers_probe.
pub(crate) fn force_driver(bdf: &str, driver: &str) -> Result<(), Failed> {
    sysfs_write(
        format!("/sys/bus/pci/devices/{bdf}/driver_override"),
        driver,
    )?;
    sysfs_write("/sys/bus/pci/drivers_probe".into(), bdf)?;
    let now = pci::driver(bdf);
    check!(
        now.as_deref() == Some(driver),
        "{bdf} took {now:?}, not {driver}"
    );
    Ok(())
}

/// A real non-viable group: the ICH9 group (00:1f.0 LPC, 00:1f.2 SATA, 00:1f.3 SMBus) with
/// the SMBus function forced onto iosf_mbi_pci (a built-in driver whose probe only
/// enables the device, and which is not driver_managed_dma) and SATA on vfio-pci.
pub(crate) fn non_viable_group_named_then_taken_over_and_restored() -> Result<(), Failed> {
    let (lpc, sata, smbus) = ("0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3");
    force_driver(smbus, "iosf_mbi_pci")?;
    force_driver(sata, "vfio-pci")?;
    let s = PciSysfs::new();
    let sata_bdf: Bdf = sata.parse().unwrap();
    let g = s
        .device(sata_bdf)
        .or_fail("sata")?
        .iommu_group
        .ok_or("no group")?;
    let before = pci::bindings();
    let r = s.readiness(sata_bdf).or_fail("readiness")?;
    let Readiness::NotReady(why) = r else {
        return Err(format!("non-viable group reported ready: {r:?}").into());
    };
    check!(
        why.to_string()
            .contains(&format!("{smbus} is bound to iosf_mbi_pci")),
        "{why}"
    );
    // The kernel agrees (VFIO_GROUP_GET_STATUS), and the error names the member.
    let e = Group::open(g).err().ok_or("opened a non-viable group")?;
    check!(
        matches!(&e, VfioError::GroupNotViable { member, driver, .. }
            if member.to_string() == smbus && driver == "iosf_mbi_pci"),
        "{e}"
    );
    // The cdev path refuses too.
    let dev = Device::open_pci(sata_bdf).or_fail("open sata cdev")?;
    let fd = RawIommufd::open().or_fail("iommufd")?;
    let e = dev
        .bind_iommufd(fd.fd.as_fd())
        .err()
        .ok_or("bound a device of a non-viable group")?;
    check!(
        matches!(&e, VfioError::GroupNotViable { member, .. } if member.to_string() == smbus),
        "cdev bind in a non-viable group: {e}"
    );
    drop(dev);
    unchanged(&before, "the refusals of a non-viable group")?;
    // bind takes the whole group over, recording iosf_mbi_pci and its override ...
    let plan = Binder::new().bind(sata_bdf).or_fail("bind the group")?;
    check!(plan.group == g, "plan for group {}", plan.group);
    for m in s.group_members(g).or_fail("members")? {
        if m.nature().is_endpoint() {
            check!(m.is_vfio_bound(), "{} on {:?} after bind", m.bdf, m.driver);
        } else {
            check!(
                m.driver.is_none(),
                "the LPC bridge {} was moved to {:?}",
                m.bdf,
                m.driver
            );
        }
    }
    drop(Group::open(g).or_fail("group viable after bind")?);
    // ... and unbind restores it: SMBus back on iosf_mbi_pci with its override, LPC
    // unbound as it was, SATA (bound by hand, no record) handed to the kernel's choice.
    let restored = Binder::new().unbind(sata_bdf).or_fail("unbind the group")?;
    check!(restored.len() == 2, "restored {restored:?}");
    let sm = s.device(smbus.parse().unwrap()).or_fail("smbus")?;
    check!(
        sm.driver.as_deref() == Some("iosf_mbi_pci")
            && sm.driver_override.as_deref() == Some("iosf_mbi_pci"),
        "SMBus after unbind: {sm:?}"
    );
    check!(pci::driver(lpc).is_none(), "LPC has {:?}", pci::driver(lpc));
    check!(
        pci::driver(sata).is_none(),
        "SATA has {:?}",
        pci::driver(sata)
    );
    // Leave the group as the VM booted.
    sysfs_write(format!("/sys/bus/pci/devices/{smbus}/driver/unbind"), smbus)?;
    sysfs_write(
        format!("/sys/bus/pci/devices/{smbus}/driver_override"),
        "\n",
    )?;
    Ok(())
}
