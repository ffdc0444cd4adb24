//! The pure half of host-dependency inspection: what the kernel reports (an [`Inventory`])
//! goes in; what each PCI device is by nature, which live host uses it backs, and whether
//! a bind may go ahead come out. Nothing here reads a file, so every rule is unit-tested
//! on hand-built inventories.

use std::fmt;
use std::net::IpAddr;

use serde::{Serialize, Serializer};

use crate::vfio::Bdf;

/// A block device number, `(major, minor)`.
pub type DevNum = (u32, u32);

/// What a PCI device is, from its class code. Only endpoints are ever moved to vfio-pci;
/// bridges stay with the host even when they share an IOMMU group with an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nature {
    /// A function that does its own work (NIC, disk controller, GPU, edu...).
    Endpoint,
    /// Class 06/00: the CPU's path to memory and PCI.
    HostBridge,
    /// Class 06/01: ISA/LPC bridge (firmware, TPM, serial, RTC behind it).
    IsaBridge,
    /// Class 06/04 or 06/09: a PCI-to-PCI bridge or PCIe root/switch port.
    PciBridge,
    /// Any other bridge class (06/02, 06/03, 06/05..06/08, 06/0a).
    OtherBridge,
}

impl Nature {
    /// The nature of a device with this 24-bit class code.
    ///
    /// ```
    /// use vfio_gmem::vfio::host::Nature;
    /// assert_eq!(Nature::of_class(0x060000), Nature::HostBridge);
    /// assert_eq!(Nature::of_class(0x060100), Nature::IsaBridge);
    /// assert_eq!(Nature::of_class(0x060400), Nature::PciBridge);
    /// assert_eq!(Nature::of_class(0x020000), Nature::Endpoint);
    /// // "other bridge" (06/80) devices are often real functions: assignable.
    /// assert_eq!(Nature::of_class(0x068000), Nature::Endpoint);
    /// ```
    pub fn of_class(class: u32) -> Nature {
        match class >> 8 {
            0x0600 => Nature::HostBridge,
            0x0601 => Nature::IsaBridge,
            0x0604 | 0x0609 => Nature::PciBridge,
            0x0602 | 0x0603 | 0x0605..=0x0608 | 0x060a => Nature::OtherBridge,
            _ => Nature::Endpoint,
        }
    }

    /// True for the only kind `bind` ever moves.
    pub fn is_endpoint(self) -> bool {
        self == Nature::Endpoint
    }

    /// [`describe`](Self::describe) with its article ("a host bridge ...", "an ISA/LPC
    /// bridge ...").
    pub fn with_article(self) -> String {
        let d = self.describe();
        let an = matches!(d.as_bytes()[0], b'a' | b'e' | b'i' | b'o' | b'u' | b'I');
        format!("{} {d}", if an { "an" } else { "a" })
    }

    /// What it is and why it stays with the host, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Nature::Endpoint => "endpoint",
            Nature::HostBridge => "host bridge (the CPU's path to memory and PCI)",
            Nature::IsaBridge => "ISA/LPC bridge (firmware, TPM, serial and clocks sit behind it)",
            Nature::PciBridge => "PCI bridge or root port (other devices sit behind it)",
            Nature::OtherBridge => "bridge (other devices sit behind it)",
        }
    }
}

/// One block device as sysfs shows it (`/sys/class/block/<name>`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name (`vda`, `vda1`, `dm-0`, `nvme0n1`).
    pub name: String,
    /// `dev`: major:minor.
    pub dev: Option<DevNum>,
    /// The deepest PCI device on its sysfs path; `None` for virtual devices (dm, md, loop).
    pub pci: Option<Bdf>,
    /// For a partition, the disk it belongs to.
    pub partition_of: Option<String>,
    /// `holders/`: the block devices (dm, md, bcache...) that hold this one open.
    pub holders: Vec<String>,
    /// What it is beyond its name, e.g. `device-mapper 'vg-root'` or `md raid1`.
    pub label: Option<String>,
}

/// One mounted filesystem (`/proc/self/mountinfo`, in mount order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub mount_point: String,
    /// Filesystem type (`ext4`, `overlay`, `nfs4`...).
    pub fstype: String,
    /// The mount source as the kernel shows it (`/dev/vda1`, `server:/export`...).
    pub source: String,
    /// major:minor of the superblock (0:N for filesystems without one block device).
    pub dev: Option<DevNum>,
    /// The block device the source path names, if it names one (`/dev/vda1`,
    /// `/dev/mapper/x`): used when `dev` is anonymous (btrfs) or unknown.
    pub source_block: Option<String>,
    /// overlayfs: the `lowerdir`, `upperdir` and `workdir` paths.
    pub overlay_dirs: Vec<String>,
    /// Network filesystems (nfs, cifs, ceph...): the server address of the `addr=` (or
    /// `ip=`) mount option; the interface with the route to it carries the filesystem.
    pub server: Option<IpAddr>,
}

/// One active swap area (`/proc/swaps`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwapArea {
    /// The swap file or device, as `/proc/swaps` shows it.
    pub path: String,
    /// The block device it is on, when it is a device (`partition` type).
    pub block: Option<String>,
}

/// A virtio filesystem share: 9p (`mount_tag` of the virtio device) or virtiofs
/// (`/sys/fs/virtiofs/N/tag`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// `9p` or `virtiofs`.
    pub fstype: String,
    /// The share's tag, as mounts name it.
    pub tag: String,
    /// The virtio device, e.g. `virtio2`.
    pub virtio: String,
    /// The PCI device behind the virtio device, if any.
    pub pci: Option<Bdf>,
}

/// One network interface (`/sys/class/net/<name>`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetDev {
    /// Interface name.
    pub name: String,
    /// The PCI device behind it; `None` for virtual devices.
    pub pci: Option<Bdf>,
    /// Administratively up (`flags` & IFF_UP).
    pub up: bool,
    /// Addresses with their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// `upper_*`: bridges, bonds, VLANs stacked on this interface.
    pub uppers: Vec<String>,
}

/// One route of the main table (`/proc/net/route`, `/proc/net/ipv6_route`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The interface the route leaves through.
    pub ifname: String,
    /// Destination network.
    pub dest: IpAddr,
    /// Destination prefix length (0: the default route).
    pub prefix: u8,
    /// Next hop, if the destination is not on-link.
    pub gateway: Option<IpAddr>,
}

impl Route {
    /// Whether this is a default route (prefix length 0).
    pub fn is_default(&self) -> bool {
        self.prefix == 0
    }
    /// Routes every interface gets by being up (IPv6 link-local, multicast), not ones that
    /// carry the host's traffic.
    fn is_link_only(&self) -> bool {
        match self.dest {
            IpAddr::V6(a) => {
                self.prefix > 0
                    && (a.segments()[0] & 0xffc0 == 0xfe80 || a.segments()[0] >> 8 == 0xff)
            }
            IpAddr::V4(a) => self.prefix > 0 && (a.is_link_local() || a.is_multicast()),
        }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_default() {
            f.write_str("default")?;
        } else {
            write!(f, "{}/{}", self.dest, self.prefix)?;
        }
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        Ok(())
    }
}

/// A framebuffer (`/sys/class/graphics/fbN`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Framebuffer {
    /// `fb0`, ...
    pub name: String,
    /// The PCI device behind it; `None` for virtual devices.
    pub pci: Option<Bdf>,
}

/// A device node of a PCI device that a process holds open (`/proc/<pid>/fd`, matched
/// to its device through `/sys/dev/{char,block}/<major>:<minor>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenNode {
    /// The device node (`/dev/vda`, `/dev/ttyS0`...).
    pub path: String,
    /// The process holding it.
    pub pid: u32,
    /// The process's command name.
    pub comm: String,
    /// The PCI device the node belongs to.
    pub pci: Option<Bdf>,
}

/// Everything the kernel reports that a PCI device can back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Block devices.
    pub block: Vec<BlockDev>,
    /// Mounted filesystems, in mount order.
    pub mounts: Vec<Mount>,
    /// Active swap areas.
    pub swaps: Vec<SwapArea>,
    /// virtio filesystem shares.
    pub shares: Vec<Share>,
    /// Network interfaces.
    pub netdevs: Vec<NetDev>,
    /// Routes of the main table.
    pub routes: Vec<Route>,
    /// Framebuffers.
    pub framebuffers: Vec<Framebuffer>,
    /// Devices whose `boot_vga` is 1.
    pub boot_vga: Vec<Bdf>,
    /// Device nodes of PCI devices open in some process (other than this one).
    pub open_nodes: Vec<OpenNode>,
}

/// A live use of a PCI device by the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostUse {
    /// The PCI device that backs it.
    #[serde(serialize_with = "display")]
    pub device: Bdf,
    #[serde(flatten)]
    /// What it is used for.
    pub what: Use,
}

/// What the host uses a device for. `path` lists the block devices from the PCI device's
/// disk up to the one in use (`["vdc", "vdc1", "dm-0 (device-mapper 'data')"]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Use {
    /// The root filesystem lives on it: never moved, not even with force.
    RootFilesystem {
        /// Block devices from the disk to the one mounted.
        path: Vec<String>,
        /// Filesystem type.
        fstype: String,
        /// The mount source.
        source: String,
    },
    /// A mounted filesystem (every mount point of it).
    Mounted {
        /// Block devices from the disk to the one mounted.
        path: Vec<String>,
        /// Filesystem type.
        fstype: String,
        /// Where it is mounted.
        mount_points: Vec<String>,
    },
    /// An active swap area on it (a device, or a swap file on a filesystem on it).
    Swap {
        /// Block devices from the disk to the one holding the swap area.
        path: Vec<String>,
        /// The swap file or device.
        area: String,
    },
    /// Held open by a stacked block device (dm, md) with nothing mounted on top.
    Held {
        /// Block devices from the disk to the holder.
        path: Vec<String>,
    },
    /// A network interface that is up and carries addresses or routes (itself, or an
    /// upper device stacked on it: bridge, bond, VLAN).
    Network {
        /// The interface on the device.
        interface: String,
        /// Upper devices from `interface` to the one that carries the traffic.
        via: Vec<String>,
        /// Addresses of the interface that carries the traffic.
        addresses: Vec<String>,
        /// Its routes (link-only routes left out).
        routes: Vec<String>,
        /// One of them is a default route.
        default_route: bool,
    },
    /// A device node of it (a raw disk, a serial port, a GPU) open in a process.
    Open {
        /// The open device node.
        node: String,
        /// The processes holding it (`pid comm`).
        processes: Vec<String>,
    },
    /// A framebuffer the console may be drawing on.
    Framebuffer {
        /// `fb0`, ...
        name: String,
    },
    /// The firmware's boot display (`boot_vga`).
    BootVga,
}

impl HostUse {
    /// True if force may override it (everything but the root filesystem's device).
    pub fn overridable(&self) -> bool {
        !matches!(self.what, Use::RootFilesystem { .. })
    }
}

fn display<S: Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn chain(path: &[String]) -> String {
    path.join(" → ")
}

impl fmt::Display for Use {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Use::RootFilesystem {
                path,
                fstype,
                source,
            } => write!(
                f,
                "{}: holds the root filesystem (/, {fstype} from {source})",
                chain(path)
            ),
            Use::Mounted {
                path,
                fstype,
                mount_points,
            } => {
                write!(
                    f,
                    "{}: {fstype} mounted at {}",
                    chain(path),
                    mount_points[0]
                )?;
                match mount_points.len() {
                    1 => Ok(()),
                    2 => write!(f, " and {}", mount_points[1]),
                    n => write!(f, " and {} more", n - 1),
                }
            }
            Use::Swap { path, area } => write!(f, "{}: active swap ({area})", chain(path)),
            Use::Held { path } => write!(f, "{}: held open (nothing mounted on it)", chain(path)),
            Use::Network {
                interface,
                via,
                addresses,
                routes,
                default_route,
            } => {
                write!(f, "{interface} is up")?;
                let carrier = via.last().unwrap_or(interface);
                if !via.is_empty() {
                    write!(f, ", under {}", chain(via))?;
                }
                if !addresses.is_empty() {
                    write!(f, "; {carrier} has {}", addresses.join(", "))?;
                }
                if !routes.is_empty() {
                    write!(f, "; {} route(s) through it", routes.len())?;
                }
                if *default_route {
                    let r = routes
                        .iter()
                        .find(|r| r.starts_with("default"))
                        .map(String::as_str);
                    write!(
                        f,
                        "; it carries the default route ({})",
                        r.unwrap_or("default")
                    )
                } else {
                    f.write_str("; the default route does not go through it")
                }
            }
            Use::Open { node, processes } => {
                write!(
                    f,
                    "{node} is open by {}",
                    processes[..processes.len().min(3)].join(", ")
                )?;
                if processes.len() > 3 {
                    write!(f, " and {} more", processes.len() - 3)?;
                }
                Ok(())
            }
            Use::Framebuffer { name } => write!(f, "{name}: a framebuffer the console may draw on"),
            Use::BootVga => f.write_str("the boot VGA device (the firmware's console)"),
        }
    }
}

impl fmt::Display for HostUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.device, self.what)
    }
}

/// Whether a bind of devices with these uses may go ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing on the host depends on the devices.
    Clear,
    /// Forced: these uses are overridden.
    Overridden(Vec<HostUse>),
    /// Refused; `forceable` is false when a use cannot be overridden (root filesystem).
    Refused {
        /// The uses that refuse the bind.
        uses: Vec<HostUse>,
        /// False when a use cannot be overridden (the root filesystem's device).
        forceable: bool,
    },
}

/// The rule: no use → go; uses and no force → refuse; force overrides every use except the
/// root filesystem's device.
///
/// ```
/// use vfio_gmem::vfio::host::{decide, HostUse, Use, Verdict};
/// let swap = HostUse { device: "00:05.0".parse().unwrap(), what: Use::Swap { path: vec!["vdc".into()], area: "/dev/vdc".into() } };
/// assert_eq!(decide(vec![], false), Verdict::Clear);
/// assert!(matches!(decide(vec![swap.clone()], false), Verdict::Refused { forceable: true, .. }));
/// assert_eq!(decide(vec![swap.clone()], true), Verdict::Overridden(vec![swap]));
/// ```
pub fn decide(uses: Vec<HostUse>, force: bool) -> Verdict {
    if uses.is_empty() {
        return Verdict::Clear;
    }
    let forceable = uses.iter().all(HostUse::overridable);
    if force && forceable {
        Verdict::Overridden(uses)
    } else {
        Verdict::Refused { uses, forceable }
    }
}

const MAX_DEPTH: usize = 16;

impl Inventory {
    fn block(&self, name: &str) -> Option<&BlockDev> {
        self.block.iter().find(|b| b.name == name)
    }

    fn block_by_dev(&self, dev: DevNum) -> Option<&BlockDev> {
        self.block.iter().find(|b| b.dev == Some(dev))
    }

    fn label(&self, name: &str) -> String {
        match self.block(name).and_then(|b| b.label.as_deref()) {
            Some(l) => format!("{name} ({l})"),
            None => name.to_string(),
        }
    }

    /// Every PCI device under block device `name`, each with the path from its disk up to
    /// `name`: through the disk of a partition and the devices a holder holds.
    fn block_backing(&self, name: &str, depth: usize) -> Vec<(Bdf, Vec<String>)> {
        let Some(node) = self.block(name) else {
            return Vec::new();
        };
        if depth > MAX_DEPTH {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(disk) = node
            .partition_of
            .as_deref()
            .filter(|d| self.block(d).is_some())
        {
            out = self.block_backing(disk, depth + 1);
        } else if let Some(p) = node.pci {
            out.push((p, Vec::new()));
        }
        for lower in self
            .block
            .iter()
            .filter(|b| b.holders.iter().any(|h| h == name))
        {
            out.extend(self.block_backing(&lower.name, depth + 1));
        }
        for (_, path) in &mut out {
            path.push(self.label(name));
        }
        out
    }

    /// The block device a mount is on, if it is on one.
    fn mount_block(&self, m: &Mount) -> Option<&BlockDev> {
        m.dev
            .filter(|d| d.0 != 0)
            .and_then(|d| self.block_by_dev(d))
            .or_else(|| m.source_block.as_deref().and_then(|n| self.block(n)))
    }

    /// The mount holding `path` among the first `before` mounts (longest mount point
    /// prefix; the later mount wins a tie).
    fn mount_of_path(&self, path: &str, before: usize) -> Option<&Mount> {
        let within = |mp: &str| {
            mp == "/" || path == mp || path.strip_prefix(mp).is_some_and(|r| r.starts_with('/'))
        };
        self.mounts[..before.min(self.mounts.len())]
            .iter()
            .filter(|m| within(&m.mount_point))
            .max_by_key(|m| m.mount_point.len())
    }

    /// Every PCI device a mount lives on, with the path to it.
    fn mount_backing(&self, m: &Mount, depth: usize) -> Vec<(Bdf, Vec<String>)> {
        if depth > MAX_DEPTH {
            return Vec::new();
        }
        if let Some(b) = self.mount_block(m) {
            return self.block_backing(&b.name.clone(), 0);
        }
        if let Some(s) = self
            .shares
            .iter()
            .find(|s| s.fstype == m.fstype && s.tag == m.source)
        {
            let path = vec![format!("{} ({} tag '{}')", s.virtio, s.fstype, s.tag)];
            return s.pci.map(|p| (p, path)).into_iter().collect();
        }
        if let Some(server) = m.server {
            return self
                .route_to(server)
                .map(|r| self.netdev_backing(&r.ifname, 0))
                .unwrap_or_default();
        }
        let mut out = Vec::new();
        for dir in &m.overlay_dirs {
            // The layer was looked up when the overlay was mounted: among earlier mounts.
            let before = self
                .mounts
                .iter()
                .position(|x| std::ptr::eq(x, m))
                .unwrap_or(self.mounts.len());
            if let Some(under) = self.mount_of_path(dir, before) {
                out.extend(self.mount_backing(under, depth + 1));
            }
        }
        out
    }

    /// The route the kernel would pick for `dest`: the longest matching prefix (ties: the
    /// first listed, as the kernel lists by preference).
    fn route_to(&self, dest: IpAddr) -> Option<&Route> {
        let matches = |r: &&Route| match (r.dest, dest) {
            (IpAddr::V4(n), IpAddr::V4(d)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(r.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(d) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(d)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(r.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(d) & mask
            }
            _ => false,
        };
        let mut best: Option<&Route> = None;
        for r in self.routes.iter().filter(matches) {
            if best.is_none_or(|b| r.prefix > b.prefix) {
                best = Some(r);
            }
        }
        best
    }

    /// Every PCI device under interface `name`, with the path from the PCI device's
    /// interface up to `name` (through the lower devices of bridges, bonds, VLANs).
    fn netdev_backing(&self, name: &str, depth: usize) -> Vec<(Bdf, Vec<String>)> {
        let Some(nd) = self.netdevs.iter().find(|n| n.name == name) else {
            return Vec::new();
        };
        if depth > MAX_DEPTH {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(p) = nd.pci {
            out.push((p, Vec::new()));
        }
        for lower in self
            .netdevs
            .iter()
            .filter(|n| n.uppers.iter().any(|u| u == name))
        {
            out.extend(self.netdev_backing(&lower.name, depth + 1));
        }
        for (_, path) in &mut out {
            path.push(name.to_string());
        }
        out
    }

    /// The root filesystem: the last mount at `/` (a later mount over `/` hides earlier).
    pub fn root_mount(&self) -> Option<&Mount> {
        self.mounts.iter().rev().find(|m| m.mount_point == "/")
    }

    /// Every live use of the host that PCI device `bdf` backs.
    pub fn uses(&self, bdf: Bdf) -> Vec<HostUse> {
        let mut out: Vec<HostUse> = Vec::new();
        let mut push = |what: Use| {
            let u = HostUse { device: bdf, what };
            if !out.contains(&u) {
                out.push(u);
            }
        };
        let root = self.root_mount();
        let mut root_paths = Vec::new();
        if let Some(r) = root {
            for (p, path) in self.mount_backing(r, 0) {
                if p == bdf {
                    root_paths.push(path.clone());
                    push(Use::RootFilesystem {
                        path,
                        fstype: r.fstype.clone(),
                        source: r.source.clone(),
                    });
                }
            }
        }
        // Other mounts, grouped by filesystem (same path and type): one use, every mount
        // point. The root's own device is not repeated for its bind mounts.
        let mut mounted: Vec<(Vec<String>, String, Vec<String>)> = Vec::new();
        for m in &self.mounts {
            if Some(m) == root {
                continue;
            }
            for (p, path) in self.mount_backing(m, 0) {
                if p != bdf || root_paths.contains(&path) {
                    continue;
                }
                match mounted
                    .iter_mut()
                    .find(|(pp, t, _)| *pp == path && *t == m.fstype)
                {
                    Some((_, _, mps)) => {
                        if !mps.contains(&m.mount_point) {
                            mps.push(m.mount_point.clone())
                        }
                    }
                    None => mounted.push((path, m.fstype.clone(), vec![m.mount_point.clone()])),
                }
            }
        }
        for (path, fstype, mount_points) in mounted {
            push(Use::Mounted {
                path,
                fstype,
                mount_points,
            });
        }
        for s in &self.swaps {
            let backing = match &s.block {
                Some(b) => self.block_backing(b, 0),
                None => self
                    .mount_of_path(&s.path, self.mounts.len())
                    .map(|m| self.mount_backing(m, 0))
                    .unwrap_or_default(),
            };
            for (p, path) in backing {
                if p == bdf {
                    push(Use::Swap {
                        path,
                        area: s.path.clone(),
                    });
                }
            }
        }
        // Top holders (held by nothing further) with no filesystem or swap on them.
        for top in self.block.iter().filter(|b| {
            b.holders.is_empty() && self.block.iter().any(|l| l.holders.contains(&b.name))
        }) {
            let used = self.mounts.iter().any(|m| self.mount_block(m) == Some(top))
                || self
                    .swaps
                    .iter()
                    .any(|s| s.block.as_deref() == Some(top.name.as_str()));
            if used {
                continue;
            }
            for (p, path) in self.block_backing(&top.name, 0) {
                if p == bdf {
                    push(Use::Held { path });
                }
            }
        }
        for nd in self.netdevs.iter().filter(|n| n.pci == Some(bdf)) {
            for what in self.net_uses(nd, &nd.name, Vec::new(), 0) {
                push(what);
            }
        }
        let mut open: Vec<(String, Vec<String>)> = Vec::new();
        for o in self.open_nodes.iter().filter(|o| o.pci == Some(bdf)) {
            let who = format!("pid {} ({})", o.pid, o.comm);
            match open.iter_mut().find(|(n, _)| *n == o.path) {
                Some((_, ps)) if !ps.contains(&who) => ps.push(who),
                Some(_) => {}
                None => open.push((o.path.clone(), vec![who])),
            }
        }
        for (node, processes) in open {
            push(Use::Open { node, processes });
        }
        for fb in self.framebuffers.iter().filter(|f| f.pci == Some(bdf)) {
            push(Use::Framebuffer {
                name: fb.name.clone(),
            });
        }
        if self.boot_vga.contains(&bdf) {
            push(Use::BootVga);
        }
        out
    }

    /// Uses of interface `nd` (reached from `base` through the uppers in `via`): none if it
    /// is down; itself if it has addresses or routes beyond link-local ones; and its uppers.
    fn net_uses(&self, nd: &NetDev, base: &str, via: Vec<String>, depth: usize) -> Vec<Use> {
        if !nd.up || depth > MAX_DEPTH {
            return Vec::new();
        }
        let mut out = Vec::new();
        let addresses: Vec<String> = nd
            .addresses
            .iter()
            .filter(|(a, _)| !is_link_local(a))
            .map(|(a, p)| format!("{a}/{p}"))
            .collect();
        let routes: Vec<&Route> = self
            .routes
            .iter()
            .filter(|r| r.ifname == nd.name && !r.is_link_only())
            .collect();
        if !addresses.is_empty() || !routes.is_empty() {
            out.push(Use::Network {
                interface: base.to_string(),
                via: via.clone(),
                addresses,
                routes: routes.iter().map(|r| r.to_string()).collect(),
                default_route: routes.iter().any(|r| r.is_default()),
            });
        }
        for up in &nd.uppers {
            if let Some(u) = self.netdevs.iter().find(|n| &n.name == up) {
                let mut v = via.clone();
                v.push(up.clone());
                out.extend(self.net_uses(u, base, v, depth + 1));
            }
        }
        out
    }
}

fn is_link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}
