use std::cell::RefCell;
use std::collections::BTreeMap;

use super::*;
use crate::vfio::testing::FakeSysfs;

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// A model of the kernel's driver core: `driver_override` wins at probe time (if that
/// driver is loaded), otherwise the device's default driver.
#[derive(Default)]
struct Kernel {
    driver: RefCell<BTreeMap<Bdf, Option<String>>>,
    over: RefCell<BTreeMap<Bdf, Option<String>>>,
    default: BTreeMap<Bdf, String>,
    /// Probing this device with vfio-pci fails (e.g. the device refuses).
    refuse_vfio: Option<Bdf>,
    /// Drivers that are not loaded: an override naming one binds nothing.
    missing: Vec<&'static str>,
    log: RefCell<Vec<String>>,
}

impl Kernel {
    fn with(devs: &[(&str, Option<&str>)]) -> Self {
        let mut k = Kernel::default();
        for (b, d) in devs {
            k.driver.borrow_mut().insert(bdf(b), d.map(str::to_string));
            if let Some(d) = d {
                k.default.insert(bdf(b), d.to_string());
            }
        }
        k
    }
    fn drv(&self, b: &str) -> Option<String> {
        self.driver.borrow()[&bdf(b)].clone()
    }
}

impl DriverOps for Kernel {
    fn driver(&self, b: Bdf) -> Result<Option<String>> {
        Ok(self.driver.borrow()[&b].clone())
    }
    fn set_override(&self, b: Bdf, d: Option<&str>) -> Result<()> {
        self.log.borrow_mut().push(format!("override {b} {d:?}"));
        self.over.borrow_mut().insert(b, d.map(str::to_string));
        Ok(())
    }
    fn unbind(&self, b: Bdf) -> Result<()> {
        self.log.borrow_mut().push(format!("unbind {b}"));
        self.driver.borrow_mut().insert(b, None);
        Ok(())
    }
    fn probe(&self, b: Bdf) -> Result<()> {
        self.log.borrow_mut().push(format!("probe {b}"));
        let over = self.over.borrow().get(&b).cloned().flatten();
        let pick = match over {
            Some(d) if d == VFIO_PCI && self.refuse_vfio == Some(b) => None,
            Some(d) if self.missing.contains(&d.as_str()) => None,
            Some(d) => Some(d),
            None => self.default.get(&b).cloned(),
        };
        self.driver.borrow_mut().insert(b, pick);
        Ok(())
    }
}

fn dev(b: &str, class: u32, driver: Option<&str>) -> PciDevice {
    PciDevice {
        bdf: bdf(b),
        vendor: 0x1234,
        device: 0x11e8,
        class,
        driver: driver.map(str::to_string),
        driver_override: None,
        iommu_group: Some(7),
        vfio_cdev: None,
    }
}

fn state_in(f: &FakeSysfs) -> StateFile {
    StateFile::load(&f.path("run/previous-drivers")).unwrap()
}

#[test]
fn plan_moves_endpoints_and_leaves_bridges_and_benign_drivers() {
    let members = [
        dev("0000:00:1c.0", 0x060400, Some("pcieport")),
        dev("0000:01:00.0", 0x020000, Some("e1000e")),
        dev("0000:01:00.1", 0x040300, None),
        dev("0000:01:00.2", 0x0c0330, Some("vfio-pci")),
        dev("0000:01:00.3", 0x0c0330, Some("pci-stub")),
    ];
    let plan = plan_group(7, &members).unwrap();
    assert_eq!(
        plan.actions,
        [
            MemberAction::Leave {
                bdf: bdf("0000:00:1c.0"),
                driver: Some("pcieport".into())
            },
            MemberAction::Rebind {
                bdf: bdf("0000:01:00.0"),
                from: Some("e1000e".into()),
                from_override: None,
            },
            MemberAction::Rebind {
                bdf: bdf("0000:01:00.1"),
                from: None,
                from_override: None,
            },
            MemberAction::AlreadyVfio {
                bdf: bdf("0000:01:00.2")
            },
            MemberAction::Leave {
                bdf: bdf("0000:01:00.3"),
                driver: Some("pci-stub".into())
            },
        ]
    );
}

#[test]
fn plan_refuses_a_bridge_with_a_dma_capable_driver() {
    let members = [
        dev("0000:00:1c.0", 0x060400, Some("shpchp-like")),
        dev("0000:01:00.0", 0x020000, None),
    ];
    let e = plan_group(7, &members).unwrap_err();
    assert!(
        e.to_string()
            .contains("its bridge 0000:00:1c.0 is bound to shpchp-like"),
        "{e}"
    );
    // Never suggests binding the bridge itself.
    assert!(
        !e.to_string().contains("vfio-gmem bind 0000:00:1c.0"),
        "{e}"
    );
}

#[test]
fn bind_records_previous_drivers_and_unbind_restores_them() {
    let f = FakeSysfs::new("bind-rt");
    let k = Kernel::with(&[("0000:01:00.0", Some("e1000e")), ("0000:01:00.1", None)]);
    let members = [
        dev("0000:01:00.0", 0x020000, Some("e1000e")),
        dev("0000:01:00.1", 0x040300, None),
    ];
    let plan = plan_group(7, &members).unwrap();
    let mut st = state_in(&f);
    apply_bind(&k, &plan, &mut st).unwrap();
    assert_eq!(k.drv("0000:01:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(k.drv("0000:01:00.1").as_deref(), Some("vfio-pci"));
    // Another process reads the records back from the file.
    let text = fs::read_to_string(f.path("run/previous-drivers")).unwrap();
    assert_eq!(text, "0000:01:00.0\te1000e\t-\n0000:01:00.1\t-\t-\n");
    let st2 = state_in(&f);
    for b in ["0000:01:00.0", "0000:01:00.1"] {
        let prev = st2.get(bdf(b)).cloned();
        restore(&k, bdf(b), Some("vfio-pci"), prev.as_ref()).unwrap();
    }
    assert_eq!(k.drv("0000:01:00.0").as_deref(), Some("e1000e"));
    assert_eq!(k.drv("0000:01:00.1"), None);
    assert_eq!(k.over.borrow()[&bdf("0000:01:00.0")], None);
}

#[test]
fn failed_member_rolls_back_the_members_already_moved() {
    let f = FakeSysfs::new("bind-rollback");
    let mut k = Kernel::with(&[
        ("0000:01:00.0", Some("e1000e")),
        ("0000:01:00.1", Some("snd_hda_intel")),
    ]);
    k.refuse_vfio = Some(bdf("0000:01:00.1"));
    let members = [
        dev("0000:01:00.0", 0x020000, Some("e1000e")),
        dev("0000:01:00.1", 0x040300, Some("snd_hda_intel")),
    ];
    let plan = plan_group(7, &members).unwrap();
    let mut st = state_in(&f);
    let e = apply_bind(&k, &plan, &mut st).unwrap_err();
    assert!(e.to_string().contains("0000:01:00.1"), "{e}");
    assert_eq!(k.drv("0000:01:00.0").as_deref(), Some("e1000e"));
    assert_eq!(k.drv("0000:01:00.1").as_deref(), Some("snd_hda_intel"));
    assert!(
        k.over.borrow().values().all(Option::is_none),
        "{:?}",
        k.over.borrow()
    );
    assert_eq!(
        fs::read_to_string(f.path("run/previous-drivers")).unwrap(),
        ""
    );
}

#[test]
fn restore_falls_back_to_the_kernels_choice_when_the_driver_is_gone() {
    let mut k = Kernel::with(&[("0000:01:00.0", Some("e1000e"))]);
    k.missing.push("gone_module");
    k.driver
        .borrow_mut()
        .insert(bdf("0000:01:00.0"), Some("vfio-pci".into()));
    let prev = Previous {
        driver: Some("gone_module".into()),
        driver_override: None,
    };
    restore(&k, bdf("0000:01:00.0"), Some("vfio-pci"), Some(&prev)).unwrap();
    assert_eq!(k.drv("0000:01:00.0").as_deref(), Some("e1000e"));
    assert_eq!(k.over.borrow()[&bdf("0000:01:00.0")], None);
}

#[test]
fn restore_puts_back_a_driver_that_owned_the_device_through_an_override() {
    // 01:00.0's default would be none; the user had forced "stub_like" with an override.
    let k = Kernel::with(&[("0000:01:00.0", None)]);
    k.driver
        .borrow_mut()
        .insert(bdf("0000:01:00.0"), Some("vfio-pci".into()));
    let prev = Previous {
        driver: Some("stub_like".into()),
        driver_override: Some("stub_like".into()),
    };
    restore(&k, bdf("0000:01:00.0"), Some("vfio-pci"), Some(&prev)).unwrap();
    assert_eq!(k.drv("0000:01:00.0").as_deref(), Some("stub_like"));
    assert_eq!(
        k.over.borrow()[&bdf("0000:01:00.0")].as_deref(),
        Some("stub_like")
    );
}

#[test]
fn state_file_round_trips_and_ignores_garbage_lines() {
    let m = parse_state(
        "0000:00:03.0\te1000e\t-\nnonsense\n0000:00:04.0\t-\n00:05.0\n0000:00:02.0\ti6300ESB timer\tpci-stub\n",
    );
    assert_eq!(m.len(), 3);
    let wd = &m[&bdf("0000:00:02.0")];
    assert_eq!(wd.driver.as_deref(), Some("i6300ESB timer"));
    assert_eq!(wd.driver_override.as_deref(), Some("pci-stub"));
    assert_eq!(m[&bdf("0000:00:03.0")].driver.as_deref(), Some("e1000e"));
    assert_eq!(m[&bdf("0000:00:04.0")], Previous::default());
    assert_eq!(parse_state(&format_state(&m)), m);
}

#[test]
fn binder_unbind_of_an_unbound_device_changes_nothing() {
    let f = FakeSysfs::new("binder-noop");
    f.add("0000:00:04.0", 0x1234, 0x11e8, 0x00ff00, Some(4));
    let b = Binder::with(f.sysfs(), f.path("run/previous-drivers"));
    assert_eq!(b.unbind(bdf("0000:00:04.0")).unwrap(), vec![]);
    let e = b.bind(bdf("0000:00:09.0")).unwrap_err();
    assert!(matches!(e, VfioError::NoSuchDevice { .. }), "{e}");
}

/// Every file, directory and symlink under `root` (contents and link targets), except
/// the binder's lock file (a lock, not state).
fn tree(root: &std::path::Path) -> BTreeMap<String, String> {
    fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel.ends_with(".lock") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let v = if meta.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if meta.is_dir() {
                walk(&p, root, out);
                "dir".into()
            } else {
                std::fs::read_to_string(&p).unwrap_or_else(|_| "<binary>".into())
            };
            out.insert(rel, v);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn refused_binds_change_nothing_in_sysfs_or_the_records() {
    let f = FakeSysfs::new("bind-refused");
    // Group 5: a bridge held by a DMA-capable driver (non-viable) and an endpoint.
    f.add("0000:00:1c.0", 0x8086, 0x1234, 0x060400, Some(5));
    f.set_driver("0000:00:1c.0", Some("shpchp-like"), None);
    f.add("0000:02:00.0", 0x8086, 0x10d3, 0x020000, Some(5));
    f.set_driver("0000:02:00.0", Some("e1000e"), None);
    // A device without an IOMMU group.
    f.add("0000:03:00.0", 0x8086, 0x10d3, 0x020000, None);
    // An earlier bind's record that must survive.
    std::fs::create_dir_all(f.path("run")).unwrap();
    std::fs::write(f.path("run/previous-drivers"), "0000:00:04.0\t-\t-\n").unwrap();
    let b = Binder::with(f.sysfs(), f.path("run/previous-drivers"));
    let before = tree(&f.root);
    for (what, target) in [
        ("non-viable group", "0000:02:00.0"),
        ("no IOMMU group", "0000:03:00.0"),
        ("unknown device", "0000:09:00.0"),
    ] {
        let e = b.bind(bdf(target)).unwrap_err();
        assert_eq!(tree(&f.root), before, "{what}: bind changed the tree ({e})");
    }
    assert!(b
        .bind(bdf("0000:02:00.0"))
        .unwrap_err()
        .to_string()
        .contains("shpchp-like"));
}

/// A fake host whose 00:04.0 disk (vda) is mounted, 00:05.0 disk (vdb) is not, 00:02.0
/// backs the root filesystem over 9p, and 00:00.0 / 00:1f.0 are the host and LPC bridges.
fn host_fixture() -> (FakeSysfs, Binder) {
    use std::os::unix::fs::symlink;
    let f = FakeSysfs::new("bind-host");
    f.add("0000:00:00.0", 0x8086, 0x29c0, 0x060000, Some(0));
    f.add("0000:00:1f.0", 0x8086, 0x2918, 0x060100, Some(9));
    f.add("0000:00:02.0", 0x1af4, 0x1049, 0x000200, Some(2));
    f.set_driver("0000:00:02.0", Some("virtio-pci"), None);
    for (b, name, dev, g) in [
        ("0000:00:04.0", "vda", "254:0", 4),
        ("0000:00:05.0", "vdb", "254:16", 5),
    ] {
        f.add(b, 0x1af4, 0x1042, 0x010000, Some(g));
        f.set_driver(b, Some("virtio-pci"), None);
        let real = f
            .path("sys/devices/pci0000:00")
            .join(b)
            .join("virtio1/block")
            .join(name);
        fs::create_dir_all(real.join("holders")).unwrap();
        fs::write(real.join("dev"), dev).unwrap();
        fs::create_dir_all(f.path("sys/class/block")).unwrap();
        symlink(&real, f.path("sys/class/block").join(name)).unwrap();
    }
    let v = f.path("sys/devices/pci0000:00/0000:00:02.0/virtio0");
    fs::create_dir_all(&v).unwrap();
    fs::write(v.join("mount_tag"), "/dev/root").unwrap();
    fs::create_dir_all(f.path("sys/bus/virtio/devices")).unwrap();
    symlink(&v, f.path("sys/bus/virtio/devices/virtio0")).unwrap();
    fs::create_dir_all(f.path("proc/self")).unwrap();
    fs::create_dir_all(f.path("run")).unwrap(); // the lock's directory
    fs::write(
        f.path("proc/self/mountinfo"),
        "1 0 0:21 / / rw - 9p /dev/root rw,trans=virtio\n2 1 254:0 / /mnt rw - ext2 /dev/vda rw\n",
    )
    .unwrap();
    let host =
        crate::vfio::host::HostInspector::with_roots(f.path("sys"), f.path("proc"), f.path("dev"))
            .with_addresses(vec![]);
    let b = Binder::with(f.sysfs(), f.path("run/previous-drivers")).with_host(host);
    (f, b)
}

#[test]
fn plan_reports_host_uses_of_the_members_it_would_move() {
    let (_f, b) = host_fixture();
    let plan = b.plan(bdf("0000:00:04.0")).unwrap();
    assert_eq!(plan.host_uses.len(), 1, "{:?}", plan.host_uses);
    assert_eq!(
        plan.host_uses[0].to_string(),
        "0000:00:04.0: vda: ext2 mounted at /mnt"
    );
    assert_eq!(b.plan(bdf("0000:00:05.0")).unwrap().host_uses, vec![]);
}

#[test]
fn refusals_for_host_use_and_bridges_change_nothing_and_force_stops_at_the_root_device() {
    let (f, b) = host_fixture();
    let before = tree(&f.root);
    let no = BindOptions::default();
    let force = BindOptions { force: true };
    let e = b.bind_with(bdf("0000:00:04.0"), no).unwrap_err();
    let VfioError::HostInUse {
        ref uses,
        forceable: true,
        group: 4,
        ..
    } = e
    else {
        panic!("{e}")
    };
    assert_eq!(uses.len(), 1);
    let msg = e.to_string();
    assert!(msg.contains("refusing to bind 0000:00:04.0: the host depends on it: 0000:00:04.0: vda: ext2 mounted at /mnt"), "{msg}");
    assert!(
        msg.contains("Nothing was changed") && msg.contains("--force"),
        "{msg}"
    );
    assert_eq!(tree(&f.root), before, "refused bind changed the tree");
    for force_it in [no, force] {
        let e = b.bind_with(bdf("0000:00:02.0"), force_it).unwrap_err();
        assert!(
            matches!(
                e,
                VfioError::HostInUse {
                    forceable: false,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("never moved, not even with --force"),
            "{e}"
        );
        assert_eq!(tree(&f.root), before);
        for bridge in ["0000:00:00.0", "0000:00:1f.0"] {
            let e = b.bind_with(bdf(bridge), force_it).unwrap_err();
            assert!(matches!(e, VfioError::NotAssignable { .. }), "{e}");
            assert!(e.to_string().contains("not assignable by nature"), "{e}");
            assert_eq!(tree(&f.root), before);
        }
    }
    // Forced, the mounted disk gets past the host check: the fake kernel then does not
    // bind vfio-pci, and the members are given back.
    let e = b.bind_with(bdf("0000:00:04.0"), force).unwrap_err();
    assert!(
        e.to_string().contains("vfio-pci did not take the device"),
        "{e}"
    );
}

#[test]
fn bridges_in_a_group_stay_whatever_their_class() {
    let members = [
        dev("0000:00:00.0", 0x060000, None),
        dev("0000:00:1f.0", 0x060100, None),
        dev("0000:00:1f.3", 0x0c0500, Some("i801_smbus")),
    ];
    let plan = plan_group(7, &members).unwrap();
    assert_eq!(plan.moved().collect::<Vec<_>>(), [bdf("0000:00:1f.3")]);
    let held = [
        dev("0000:00:1f.0", 0x060100, Some("lpc_ich")),
        dev("0000:00:1f.3", 0x0c0500, None),
    ];
    let e = plan_group(7, &held).unwrap_err();
    assert!(
        e.to_string().contains("0000:00:1f.0 is bound to lpc_ich"),
        "{e}"
    );
}
