//! The reader on fixture trees laid out as the kernel lays out sysfs and procfs, and the
//! rules on what it reads.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::model::Use;
use super::*;
use crate::vfio::Bdf;

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// A fixture host: `sys/`, `proc/`, `dev/` under a temp directory.
struct Host {
    root: PathBuf,
    addresses: Vec<(String, std::net::IpAddr, u8)>,
}

impl Host {
    fn new(tag: &str) -> Host {
        let root = std::env::temp_dir().join(format!(
            "vfio-gmem-host-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&root);
        for d in [
            "sys/class/block",
            "sys/class/net",
            "sys/bus/pci/devices",
            "proc/self",
            "proc/net",
            "dev",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        Host {
            root,
            addresses: Vec::new(),
        }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    fn write(&self, rel: &str, text: &str) {
        let p = self.p(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    fn link(&self, target: &Path, rel: &str) {
        let p = self.p(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        symlink(target, p).unwrap();
    }
    /// A PCI device; returns its real directory.
    fn pci(&self, b: &str) -> PathBuf {
        let real = self.p("sys/devices/pci0000:00").join(b);
        if !real.exists() {
            fs::create_dir_all(&real).unwrap();
            self.link(&real, &format!("sys/bus/pci/devices/{b}"));
        }
        real
    }
    /// A virtio disk under PCI device `b`.
    fn disk(&self, name: &str, b: &str, virtio: &str, dev: &str) -> PathBuf {
        let real = self.pci(b).join(virtio).join("block").join(name);
        self.block_at(&real, name, dev);
        real
    }
    fn block_at(&self, real: &Path, name: &str, dev: &str) {
        fs::create_dir_all(real.join("holders")).unwrap();
        fs::write(real.join("dev"), format!("{dev}\n")).unwrap();
        self.link(real, &format!("sys/class/block/{name}"));
        fs::write(self.p("dev").join(name), "").unwrap();
    }
    fn partition(&self, disk: &Path, name: &str, dev: &str) -> PathBuf {
        let real = disk.join(name);
        self.block_at(&real, name, dev);
        fs::write(real.join("partition"), "1\n").unwrap();
        real
    }
    /// A device-mapper device holding `lowers` (their real dirs).
    fn dm(&self, name: &str, dm_name: &str, dev: &str, lowers: &[&Path]) -> PathBuf {
        let real = self.p("sys/devices/virtual/block").join(name);
        self.block_at(&real, name, dev);
        fs::create_dir_all(real.join("dm")).unwrap();
        fs::write(real.join("dm/name"), format!("{dm_name}\n")).unwrap();
        for l in lowers {
            symlink(&real, l.join("holders").join(name)).unwrap();
        }
        fs::create_dir_all(self.p("dev/mapper")).unwrap();
        symlink(format!("../{name}"), self.p("dev/mapper").join(dm_name)).unwrap();
        real
    }
    fn net(&self, name: &str, b: Option<&str>, up: bool, uppers: &[&str]) {
        let real = match b {
            Some(b) => self.pci(b).join("virtio9/net").join(name),
            None => self.p("sys/devices/virtual/net").join(name),
        };
        fs::create_dir_all(&real).unwrap();
        fs::write(real.join("flags"), if up { "0x1003\n" } else { "0x1002\n" }).unwrap();
        for u in uppers {
            symlink(
                self.p("sys/devices/virtual/net").join(u),
                real.join(format!("upper_{u}")),
            )
            .unwrap();
        }
        self.link(&real, &format!("sys/class/net/{name}"));
    }
    fn addr(&mut self, ifname: &str, a: &str, prefix: u8) {
        self.addresses
            .push((ifname.into(), a.parse().unwrap(), prefix));
    }
    fn inventory(&self) -> Inventory {
        HostInspector::with_roots(self.p("sys"), self.p("proc"), self.p("dev"))
            .with_addresses(self.addresses.clone())
            .inventory()
            .unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

const ROUTE_HEADER: &str =
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";

/// The guest of scripts/vm-run as its kernel shows it: root over 9p from 00:02.0 (tag
/// /dev/root), a mounted disk, a spare disk, a disk with a partition under a dm device,
/// swap, an up interface with the default route and a down one.
fn vm_like() -> Host {
    let mut h = Host::new("vm");
    let v = h.pci("0000:00:02.0").join("virtio0");
    fs::create_dir_all(&v).unwrap();
    fs::write(v.join("mount_tag"), "/dev/root\n").unwrap();
    h.link(&v, "sys/bus/virtio/devices/virtio0");
    h.disk("vda", "0000:00:04.0", "virtio1", "254:0");
    h.disk("vdb", "0000:00:05.0", "virtio2", "254:16");
    let vdc = h.disk("vdc", "0000:00:06.0", "virtio3", "254:32");
    let vdc1 = h.partition(&vdc, "vdc1", "254:33");
    h.dm("dm-0", "data", "253:0", &[&vdc1]);
    h.disk("vdd", "0000:00:07.0", "virtio4", "254:48");
    h.pci("0000:00:00.0");
    h.write(
        "proc/self/mountinfo",
        "22 1 0:21 / / rw,relatime - 9p /dev/root rw,trans=virtio\n\
         23 22 0:5 / /dev rw - devtmpfs devtmpfs rw\n\
         30 22 0:21 /usr /tmp/bind\\040mount rw - 9p /dev/root rw,trans=virtio\n\
         31 22 254:0 / /mnt/data rw - ext2 /dev/vda rw\n\
         32 22 254:0 / /srv rw - ext2 /dev/vda rw\n\
         33 22 253:0 / /var/lib/db rw - ext2 /dev/mapper/data rw\n",
    );
    h.write(
        "proc/swaps",
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/vdd                                partition\t65532\t\t0\t\t-2\n",
    );
    h.net("eth0", Some("0000:00:08.0"), true, &[]);
    h.net("eth1", Some("0000:00:09.0"), false, &[]);
    h.net("lo", None, true, &[]);
    h.addr("eth0", "10.0.2.15", 24);
    h.addr("eth1", "10.9.0.1", 24);
    h.addr("lo", "127.0.0.1", 8);
    h.write(
        "proc/net/route",
        &format!(
            "{ROUTE_HEADER}eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        ),
    );
    h
}

fn kinds(uses: &[HostUse]) -> Vec<String> {
    uses.iter().map(|u| u.what.to_string()).collect()
}

#[test]
fn the_root_filesystems_device_is_refused_even_with_force() {
    let h = vm_like();
    let inv = h.inventory();
    assert_eq!(inv.root_mount().unwrap().fstype, "9p");
    let uses = inv.uses(bdf("0000:00:02.0"));
    assert_eq!(
        kinds(&uses),
        ["virtio0 (9p tag '/dev/root'): holds the root filesystem (/, 9p from /dev/root)"],
        "the bind mount of the same share is not listed again"
    );
    assert!(!uses[0].overridable());
    assert!(matches!(
        decide(uses.clone(), true),
        Verdict::Refused {
            forceable: false,
            ..
        }
    ));
    let json = serde_json::to_value(&uses[0]).unwrap();
    assert_eq!(json["kind"], "root-filesystem");
    assert_eq!(json["device"], "0000:00:02.0");
}

#[test]
fn mounted_disks_partitions_and_holders_are_traced_to_their_pci_device() {
    let h = vm_like();
    let inv = h.inventory();
    assert_eq!(
        kinds(&inv.uses(bdf("0000:00:04.0"))),
        ["vda: ext2 mounted at /mnt/data and /srv"]
    );
    assert_eq!(
        inv.uses(bdf("0000:00:05.0")),
        [],
        "the spare disk backs nothing"
    );
    assert_eq!(
        kinds(&inv.uses(bdf("0000:00:06.0"))),
        ["vdc → vdc1 → dm-0 (device-mapper 'data'): ext2 mounted at /var/lib/db"]
    );
    assert_eq!(
        kinds(&inv.uses(bdf("0000:00:07.0"))),
        ["vdd: active swap (/dev/vdd)"]
    );
    let u = inv.uses(bdf("0000:00:06.0"));
    assert!(matches!(
        decide(u.clone(), false),
        Verdict::Refused {
            forceable: true,
            ..
        }
    ));
    assert_eq!(decide(u.clone(), true), Verdict::Overridden(u));
}

#[test]
fn a_holder_with_nothing_mounted_still_holds_its_disk() {
    let h = vm_like();
    let vde = h.disk("vde", "0000:00:0a.0", "virtio5", "254:64");
    let dm1 = h.dm("dm-1", "thin", "253:1", &[&vde]);
    // A holder of a holder: only the top one is reported, with the whole path.
    h.dm("dm-2", "top", "253:2", &[&dm1]);
    assert_eq!(
        kinds(&h.inventory().uses(bdf("0000:00:0a.0"))),
        ["vde → dm-1 (device-mapper 'thin') → dm-2 (device-mapper 'top'): held open (nothing mounted on it)"]
    );
}

#[test]
fn interfaces_up_with_addresses_are_in_use_and_say_whether_the_default_route_is_theirs() {
    let mut h = vm_like();
    let inv = h.inventory();
    let u = inv.uses(bdf("0000:00:08.0"));
    assert_eq!(
        kinds(&u),
        ["eth0 is up; eth0 has 10.0.2.15/24; 2 route(s) through it; it carries the default route (default via 10.0.2.2)"]
    );
    let Use::Network {
        default_route,
        routes,
        ..
    } = &u[0].what
    else {
        panic!()
    };
    assert!(default_route);
    assert_eq!(routes, &["default via 10.0.2.2", "10.0.2.0/24"]);
    assert_eq!(
        inv.uses(bdf("0000:00:09.0")),
        [],
        "a down interface carries nothing, addresses or not"
    );

    // Up with an address but not the default route.
    h.net("eth2", Some("0000:00:0b.0"), true, &[]);
    h.addr("eth2", "192.168.50.1", 24);
    // Up with only link-local addresses and routes: nothing of the host's.
    h.net("eth3", Some("0000:00:0c.0"), true, &[]);
    h.addr("eth3", "fe80::1", 64);
    // An IPv6 default route via a link-local router, no global address.
    h.net("eth4", Some("0000:00:0d.0"), true, &[]);
    h.addr("eth4", "fe80::4", 64);
    // A bridge port: the bridge carries the address.
    h.net("br0", None, true, &[]);
    h.net("eth5", Some("0000:00:0e.0"), true, &["br0"]);
    h.addr("br0", "172.16.0.2", 16);
    let fe80 = "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001";
    let local = "fe800000000000000000000000000004 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001";
    let dflt = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003";
    h.write(
        "proc/net/ipv6_route",
        &format!("{fe80}     eth3\n{fe80}     eth4\n{local}     eth4\n{dflt}     eth4\n"),
    );
    let inv = h.inventory();
    assert_eq!(
        kinds(&inv.uses(bdf("0000:00:0b.0"))),
        ["eth2 is up; eth2 has 192.168.50.1/24; the default route does not go through it"]
    );
    assert_eq!(inv.uses(bdf("0000:00:0c.0")), []);
    assert_eq!(
        kinds(&inv.uses(bdf("0000:00:0d.0"))),
        ["eth4 is up; 1 route(s) through it; it carries the default route (default via fe80::1)"]
    );
    assert_eq!(
        kinds(&inv.uses(bdf("0000:00:0e.0"))),
        ["eth5 is up, under br0; br0 has 172.16.0.2/16; the default route does not go through it"]
    );
}

#[test]
fn console_framebuffer_and_boot_vga() {
    let h = vm_like();
    let vga = h.pci("0000:00:01.0");
    fs::write(vga.join("boot_vga"), "1\n").unwrap();
    fs::write(h.pci("0000:00:04.0").join("boot_vga"), "0\n").unwrap();
    let fb = vga.join("graphics/fb0");
    fs::create_dir_all(&fb).unwrap();
    h.link(&fb, "sys/class/graphics/fb0");
    let inv = h.inventory();
    assert_eq!(
        kinds(&inv.uses(bdf("0000:00:01.0"))),
        [
            "fb0: a framebuffer the console may draw on",
            "the boot VGA device (the firmware's console)"
        ]
    );
    assert!(inv
        .uses(bdf("0000:00:01.0"))
        .iter()
        .all(HostUse::overridable));
    assert_eq!(
        kinds(&inv.uses(bdf("0000:00:04.0"))).len(),
        1,
        "boot_vga 0 is no use"
    );
}

#[test]
fn root_on_a_partition_found_by_device_number_and_an_overlay_root() {
    let h = Host::new("blockroot");
    let sda = h.disk("sda", "0000:03:00.0", "host0", "8:0");
    h.partition(&sda, "sda2", "8:2");
    h.disk("sdb", "0000:04:00.0", "host1", "8:16");
    h.write(
        "proc/self/mountinfo",
        "20 1 8:2 / / rw - ext4 /dev/sda2 rw\n",
    );
    let inv = h.inventory();
    let u = inv.uses(bdf("0000:03:00.0"));
    assert_eq!(
        kinds(&u),
        ["sda → sda2: holds the root filesystem (/, ext4 from /dev/sda2)"]
    );
    assert!(!u[0].overridable());

    // A container-style root: overlay whose layers live on sdb (btrfs: anonymous device
    // number, found through the source path).
    h.write(
        "proc/self/mountinfo",
        "20 1 0:40 / /layers rw - btrfs /dev/sdb rw\n\
         21 1 0:41 / / rw - overlay overlay rw,lowerdir=/layers/a:/layers/b,upperdir=/layers/up,workdir=/layers/w\n",
    );
    let inv = h.inventory();
    assert_eq!(
        kinds(&inv.uses(bdf("0000:04:00.0"))),
        ["sdb: holds the root filesystem (/, overlay from overlay)"]
    );
    assert_eq!(inv.uses(bdf("0000:03:00.0")), []);
}

#[test]
fn a_swap_file_is_charged_to_the_disk_of_its_filesystem() {
    let h = vm_like();
    h.write(
        "proc/swaps",
        "Filename\tType\tSize\tUsed\tPriority\n/mnt/data/swap\\040file\tfile\t1024\t0\t-2\n",
    );
    assert_eq!(
        kinds(&h.inventory().uses(bdf("0000:00:04.0"))),
        [
            "vda: ext2 mounted at /mnt/data and /srv",
            "vda: active swap (/mnt/data/swap file)"
        ]
    );
}

#[test]
fn proc_mounts_is_the_fallback_and_missing_optional_files_are_empty() {
    let h = Host::new("fallback");
    h.disk("vda", "0000:00:04.0", "virtio1", "254:0");
    h.write(
        "proc/mounts",
        "/dev/root / 9p rw 0 0\n/dev/vda /mnt ext2 rw 0 0\n",
    );
    let inv = h.inventory();
    assert_eq!(inv.mounts.len(), 2);
    assert_eq!(
        kinds(&inv.uses(bdf("0000:00:04.0"))),
        ["vda: ext2 mounted at /mnt"]
    );
    assert!(inv.swaps.is_empty() && inv.routes.is_empty() && inv.framebuffers.is_empty());
    // No mount table at all: an error, never "nothing is mounted".
    fs::remove_file(h.p("proc/mounts")).unwrap();
    let e = HostInspector::with_roots(h.p("sys"), h.p("proc"), h.p("dev"))
        .with_addresses(vec![])
        .inventory()
        .unwrap_err();
    assert!(matches!(e, HostError::Read { .. }), "{e}");
}

#[test]
fn a_malformed_mountinfo_line_is_a_parse_error() {
    let h = Host::new("badinfo");
    h.write("proc/self/mountinfo", "22 1 0:21 / / rw no-separator 9p\n");
    let e = HostInspector::with_roots(h.p("sys"), h.p("proc"), h.p("dev"))
        .with_addresses(vec![])
        .inventory()
        .unwrap_err();
    assert!(e.to_string().contains("line 1"), "{e}");
}

#[test]
fn mount_paths_are_unescaped() {
    assert_eq!(super::read::unescape("/a\\040b\\011c\\134d"), "/a b\tc\\d");
    assert_eq!(super::read::unescape("/trailing\\04"), "/trailing\\04");
}

#[test]
fn natures_of_bridge_classes() {
    for (class, n) in [
        (0x060000, Nature::HostBridge),
        (0x060100, Nature::IsaBridge),
        (0x060400, Nature::PciBridge),
        (0x060401, Nature::PciBridge),
        (0x060900, Nature::PciBridge),
        (0x060700, Nature::OtherBridge),
        (0x068000, Nature::Endpoint),
        (0x010000, Nature::Endpoint),
        (0x00ff00, Nature::Endpoint),
    ] {
        assert_eq!(Nature::of_class(class), n, "{class:06x}");
    }
    assert!(Nature::IsaBridge
        .with_article()
        .starts_with("an ISA/LPC bridge"));
    assert!(Nature::HostBridge
        .with_article()
        .starts_with("a host bridge"));
}

#[test]
fn the_live_host_can_be_read() {
    // Whatever this machine is, its own views parse, and its root filesystem is found.
    let inv = HostInspector::new().inventory().expect("live inventory");
    assert!(inv.root_mount().is_some(), "{:?}", inv.mounts);
}

#[test]
fn device_nodes_open_in_processes_are_uses() {
    use super::model::OpenNode;
    let mut inv = vm_like().inventory();
    let node = |path: &str, pid, comm: &str, pci| OpenNode {
        path: path.into(),
        pid,
        comm: comm.into(),
        pci: Some(bdf(pci)),
    };
    inv.open_nodes = vec![
        node("/dev/vdb", 700, "qemu-system-x86", "0000:00:05.0"),
        node("/dev/vdb", 700, "qemu-system-x86", "0000:00:05.0"),
        node("/dev/vdb", 701, "dd", "0000:00:05.0"),
        node("/dev/vport1p1", 1, "init", "0000:00:03.0"),
    ];
    let u = inv.uses(bdf("0000:00:05.0"));
    assert_eq!(
        kinds(&u),
        ["/dev/vdb is open by pid 700 (qemu-system-x86), pid 701 (dd)"]
    );
    assert!(u[0].overridable());
    assert_eq!(serde_json::to_value(&u[0]).unwrap()["kind"], "open");
    assert_eq!(
        kinds(&inv.uses(bdf("0000:00:03.0"))),
        ["/dev/vport1p1 is open by pid 1 (init)"]
    );
}

#[test]
fn this_process_holding_a_device_node_is_not_reported_but_others_are_read() {
    // Live: whatever is open, nothing belongs to this test process, and every entry maps
    // to a PCI device.
    let inv = HostInspector::new().inventory().unwrap();
    let me = std::process::id();
    assert!(
        inv.open_nodes
            .iter()
            .all(|o| o.pid != me && o.pci.is_some()),
        "{:?}",
        inv.open_nodes
    );
}

#[test]
fn a_virtiofs_root_is_traced_through_sys_fs_virtiofs() {
    let h = Host::new("virtiofs");
    let v = h.pci("0000:00:03.0").join("virtio1");
    fs::create_dir_all(&v).unwrap();
    let entry = h.p("sys/fs/virtiofs/0");
    fs::create_dir_all(&entry).unwrap();
    fs::write(entry.join("tag"), "ROOTFS\n").unwrap();
    symlink(&v, entry.join("device")).unwrap();
    h.write(
        "proc/self/mountinfo",
        "1 0 0:30 / / rw - virtiofs ROOTFS rw\n2 1 0:31 / /other rw - virtiofs OTHER rw\n",
    );
    let inv = h.inventory();
    let u = inv.uses(bdf("0000:00:03.0"));
    assert_eq!(
        kinds(&u),
        ["virtio1 (virtiofs tag 'ROOTFS'): holds the root filesystem (/, virtiofs from ROOTFS)"]
    );
    assert!(!u[0].overridable());
}

#[test]
fn a_network_root_is_charged_to_the_interface_with_the_route_to_its_server() {
    let mut h = Host::new("nfsroot");
    h.net("br0", None, true, &[]);
    h.net("eth5", Some("0000:00:0e.0"), true, &["br0"]);
    h.net("eth9", Some("0000:00:0f.0"), true, &[]);
    h.addr("br0", "10.1.0.2", 16);
    h.addr("eth9", "192.168.1.2", 24);
    h.write(
        "proc/net/route",
        &format!(
            "{ROUTE_HEADER}eth9\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
             br0\t0000010A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
             eth9\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        ),
    );
    h.write(
        "proc/self/mountinfo",
        "1 0 0:40 / / rw - nfs4 10.1.0.5:/export rw,vers=4.2,addr=10.1.0.5,clientaddr=10.1.0.2\n\
         2 1 0:41 / /home rw - nfs4 files:/home rw,vers=4.2,addr=172.20.0.9,clientaddr=192.168.1.2\n",
    );
    let inv = h.inventory();
    let u = inv.uses(bdf("0000:00:0e.0"));
    assert_eq!(
        kinds(&u)[0],
        "eth5 → br0: holds the root filesystem (/, nfs4 from 10.1.0.5:/export)"
    );
    assert!(!u[0].overridable(), "the root's interface is never moved");
    // /home's server is reached through the default route on eth9.
    let k = kinds(&inv.uses(bdf("0000:00:0f.0")));
    assert_eq!(k[0], "eth9: nfs4 mounted at /home", "{k:?}");
    assert!(k[1].contains("it carries the default route"), "{k:?}");
}

#[test]
fn an_overlay_over_its_own_lower_directory_resolves_to_the_mount_underneath() {
    // virtme-ng's way: an overlay mounted at /data with lowerdir=/data.
    let h = Host::new("overlay-self");
    h.disk("vdb", "0000:00:05.0", "virtio2", "254:16");
    h.write(
        "proc/self/mountinfo",
        "1 0 0:21 / / rw - 9p /dev/root rw\n\
         2 1 254:16 / /data rw - ext2 /dev/vdb rw\n\
         3 1 0:30 / /run rw - tmpfs tmpfs rw\n\
         4 2 0:31 / /data rw - overlay overlay rw,lowerdir=/data,upperdir=/run/up,workdir=/run/work\n",
    );
    assert_eq!(
        kinds(&h.inventory().uses(bdf("0000:00:05.0"))),
        [
            "vdb: ext2 mounted at /data",
            "vdb: overlay mounted at /data"
        ]
    );
}
