//! The impure half: reads the kernel's own views into an [`Inventory`]. Every path hangs
//! off three roots (sysfs, procfs, /dev) so tests run this on fixture trees.
//!
//! | what | where |
//! |---|---|
//! | block devices, partitions, holders | `<sys>/class/block/*` (`dev`, `partition`, `holders/`, `dm/name`, `md/level`) |
//! | mounts | `<proc>/self/mountinfo` (`<proc>/mounts` if absent) |
//! | swap | `<proc>/swaps` |
//! | 9p / virtiofs shares | `<sys>/bus/virtio/devices/*/mount_tag`, `<sys>/fs/virtiofs/*/{tag,device}` |
//! | interfaces | `<sys>/class/net/*` (`flags`, `ifindex`, `upper_*`); addresses over rtnetlink |
//! | routes | `<proc>/net/route`, `<proc>/net/ipv6_route` |
//! | framebuffers, boot VGA | `<sys>/class/graphics/fb*`, `<sys>/bus/pci/devices/*/boot_vga` |

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::model::{
    BlockDev, DevNum, Framebuffer, Inventory, Mount, NetDev, OpenNode, Route, Share, SwapArea,
};
use super::HostError;
use crate::vfio::Bdf;

/// Where interface addresses come from.
#[derive(Clone, Debug)]
enum Addresses {
    /// An rtnetlink dump of this process's network namespace.
    Netlink,
    /// Given (tests): `(interface, address, prefix length)`.
    Fixed(Vec<(String, IpAddr, u8)>),
}

/// Reads what the host uses its devices for, from the kernel's own views.
///
/// ```no_run
/// use vfio_gmem::vfio::host::HostInspector;
/// let inv = HostInspector::new().inventory()?;
/// for u in inv.uses("0000:00:03.0".parse().unwrap()) {
///     println!("{u}");
/// }
/// # Ok::<(), vfio_gmem::vfio::host::HostError>(())
/// ```
#[derive(Clone, Debug)]
pub struct HostInspector {
    sys: PathBuf,
    proc_root: PathBuf,
    dev: PathBuf,
    addresses: Addresses,
}

impl Default for HostInspector {
    fn default() -> Self {
        Self::new()
    }
}

impl HostInspector {
    /// The live system: `/sys`, `/proc`, `/dev`, addresses over rtnetlink.
    pub fn new() -> Self {
        Self::with_roots("/sys", "/proc", "/dev")
    }

    /// Other roots (fixture trees). Addresses still come from rtnetlink unless
    /// [`with_addresses`](Self::with_addresses) gives them.
    pub fn with_roots(
        sys: impl Into<PathBuf>,
        proc_root: impl Into<PathBuf>,
        dev: impl Into<PathBuf>,
    ) -> Self {
        HostInspector {
            sys: sys.into(),
            proc_root: proc_root.into(),
            dev: dev.into(),
            addresses: Addresses::Netlink,
        }
    }

    /// Uses these `(interface, address, prefix length)` instead of asking the kernel.
    pub fn with_addresses(mut self, addresses: Vec<(String, IpAddr, u8)>) -> Self {
        self.addresses = Addresses::Fixed(addresses);
        self
    }

    /// Reads everything once.
    pub fn inventory(&self) -> Result<Inventory, HostError> {
        let block = self.block_devices()?;
        let mounts = self.mounts(&block)?;
        let swaps = self.swaps(&block)?;
        let netdevs = self.netdevs()?;
        Ok(Inventory {
            shares: self.shares()?,
            routes: self.routes()?,
            framebuffers: self.framebuffers()?,
            boot_vga: self.boot_vga()?,
            open_nodes: self.open_nodes(),
            block,
            mounts,
            swaps,
            netdevs,
        })
    }

    fn block_devices(&self) -> Result<Vec<BlockDev>, HostError> {
        let mut out = Vec::new();
        for (name, real) in class_entries(&self.sys.join("class/block"))? {
            let dev = read_opt(&real.join("dev"))?.and_then(|s| parse_devnum(&s));
            let partition_of = real
                .join("partition")
                .exists()
                .then(|| real.parent().and_then(file_name))
                .flatten();
            let holders = dir_names(&real.join("holders"))?;
            let label = if let Some(n) = read_opt(&real.join("dm/name"))? {
                Some(format!("device-mapper '{n}'"))
            } else {
                read_opt(&real.join("md/level"))?.map(|l| format!("md {l}"))
            };
            out.push(BlockDev {
                pci: deepest_bdf(&real),
                name,
                dev,
                partition_of,
                holders,
                label,
            });
        }
        Ok(out)
    }

    /// A `/dev/...` path to the block device it names: by device number when it is a
    /// device node, else by the name it resolves to (`/dev/mapper/x` → `../dm-0`).
    fn resolve_dev_path(&self, path: &str, block: &[BlockDev]) -> Option<String> {
        let rel = path.strip_prefix("/dev/")?;
        let p = self.dev.join(rel);
        if let Ok(meta) = fs::metadata(&p) {
            if meta.file_type().is_block_device() {
                let rdev = meta.rdev();
                let num = (libc::major(rdev), libc::minor(rdev));
                return block
                    .iter()
                    .find(|b| b.dev == Some(num))
                    .map(|b| b.name.clone());
            }
        }
        let real = fs::canonicalize(&p).unwrap_or(p);
        let name = file_name(&real)?;
        block.iter().any(|b| b.name == name).then_some(name)
    }

    fn mounts(&self, block: &[BlockDev]) -> Result<Vec<Mount>, HostError> {
        let info = self.proc_root.join("self/mountinfo");
        let (path, text) = match read_opt(&info)? {
            Some(t) => (info, t),
            None => {
                let p = self.proc_root.join("mounts");
                let t = fs::read_to_string(&p).map_err(|e| HostError::read(&p, e))?;
                (p, t)
            }
        };
        let mountinfo = path.ends_with("mountinfo");
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let bad = || HostError::Parse {
                path: path.clone(),
                line: i + 1,
                text: line.to_string(),
            };
            let (dev, mount_point, fstype, source, opts) = if mountinfo {
                let sep = f.iter().position(|w| *w == "-").ok_or_else(bad)?;
                if sep < 6 || f.len() < sep + 3 {
                    return Err(bad());
                }
                (
                    parse_devnum(f[2]),
                    f[4],
                    f[sep + 1],
                    f[sep + 2],
                    f.get(sep + 3).copied().unwrap_or(""),
                )
            } else {
                if f.len() < 4 {
                    return Err(bad());
                }
                (None, f[1], f[2], f[0], f[3])
            };
            let source = unescape(source);
            let overlay_dirs = if fstype == "overlay" {
                opts.split(',')
                    .filter_map(|o| o.split_once('='))
                    .filter(|(k, _)| {
                        matches!(
                            *k,
                            "lowerdir" | "upperdir" | "workdir" | "lowerdir+" | "datadir+"
                        )
                    })
                    .flat_map(|(_, v)| v.split(':').map(unescape).collect::<Vec<_>>())
                    .collect()
            } else {
                Vec::new()
            };
            let network_fs = matches!(
                fstype,
                "nfs" | "nfs4" | "cifs" | "smb3" | "ceph" | "9p" | "glusterfs" | "fuse.glusterfs"
            );
            let server = network_fs
                .then(|| {
                    opts.split(',')
                        .filter_map(|o| o.split_once('='))
                        .find(|(k, _)| matches!(*k, "addr" | "ip"))
                        .and_then(|(_, v)| v.trim_matches(|c| c == '[' || c == ']').parse().ok())
                })
                .flatten();
            out.push(Mount {
                server,
                mount_point: unescape(mount_point),
                fstype: fstype.to_string(),
                source_block: self.resolve_dev_path(&source, block),
                source,
                dev,
                overlay_dirs,
            });
        }
        Ok(out)
    }

    fn swaps(&self, block: &[BlockDev]) -> Result<Vec<SwapArea>, HostError> {
        let Some(text) = read_opt(&self.proc_root.join("swaps"))? else {
            return Ok(Vec::new()); // a kernel without swap support
        };
        Ok(text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(|p| {
                let path = unescape(p.trim_end_matches(" (deleted)"));
                SwapArea {
                    block: self.resolve_dev_path(&path, block),
                    path,
                }
            })
            .collect())
    }

    fn shares(&self) -> Result<Vec<Share>, HostError> {
        let mut out = Vec::new();
        for (virtio, real) in class_entries(&self.sys.join("bus/virtio/devices"))? {
            if let Some(tag) = read_opt(&real.join("mount_tag"))? {
                out.push(Share {
                    fstype: "9p".into(),
                    tag: tag.trim_end_matches('\0').to_string(),
                    virtio,
                    pci: deepest_bdf(&real),
                });
            }
        }
        for (_, real) in class_entries(&self.sys.join("fs/virtiofs"))? {
            let Some(tag) = read_opt(&real.join("tag"))? else {
                continue;
            };
            let dev = fs::canonicalize(real.join("device")).ok();
            out.push(Share {
                fstype: "virtiofs".into(),
                tag,
                virtio: dev
                    .as_deref()
                    .and_then(file_name)
                    .unwrap_or_else(|| "virtio".into()),
                pci: dev.as_deref().and_then(deepest_bdf),
            });
        }
        Ok(out)
    }

    fn netdevs(&self) -> Result<Vec<NetDev>, HostError> {
        let entries = class_entries(&self.sys.join("class/net"))?;
        let addrs = match &self.addresses {
            Addresses::Fixed(a) => a.clone(),
            Addresses::Netlink if entries.is_empty() => Vec::new(),
            Addresses::Netlink => {
                let by_index = super::net::addresses().map_err(HostError::Netlink)?;
                let mut named = Vec::new();
                for (name, real) in &entries {
                    let idx = read_opt(&real.join("ifindex"))?.and_then(|s| s.parse::<u32>().ok());
                    for (i, a, p) in &by_index {
                        if Some(*i) == idx {
                            named.push((name.clone(), *a, *p));
                        }
                    }
                }
                named
            }
        };
        let mut out = Vec::new();
        for (name, real) in entries {
            let flags = read_opt(&real.join("flags"))?
                .and_then(|s| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                .unwrap_or(0);
            let uppers = dir_names(&real)?
                .into_iter()
                .filter_map(|n| n.strip_prefix("upper_").map(str::to_string))
                .collect();
            out.push(NetDev {
                pci: deepest_bdf(&real),
                up: flags & libc::IFF_UP as u32 != 0,
                addresses: addrs
                    .iter()
                    .filter(|(n, _, _)| *n == name)
                    .map(|(_, a, p)| (*a, *p))
                    .collect(),
                uppers,
                name,
            });
        }
        Ok(out)
    }

    fn routes(&self) -> Result<Vec<Route>, HostError> {
        let mut out = Vec::new();
        let p4 = self.proc_root.join("net/route");
        if let Some(text) = read_opt(&p4)? {
            for (i, line) in text.lines().enumerate().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                let hex = |s: &str| u32::from_str_radix(s, 16).ok();
                let parsed = (f.len() >= 8)
                    .then(|| Some((hex(f[1])?, hex(f[2])?, hex(f[3])?, hex(f[7])?)))
                    .flatten();
                let Some((dest, gw, flags, mask)) = parsed else {
                    return Err(HostError::Parse {
                        path: p4,
                        line: i + 1,
                        text: line.to_string(),
                    });
                };
                // The kernel prints the network-order bytes as one native-endian u32.
                let ip = |v: u32| Ipv4Addr::from(v.to_ne_bytes());
                out.push(Route {
                    ifname: f[0].to_string(),
                    dest: IpAddr::V4(ip(dest)),
                    prefix: mask.count_ones() as u8,
                    gateway: (flags & libc::RTF_GATEWAY as u32 != 0).then(|| IpAddr::V4(ip(gw))),
                });
            }
        }
        let p6 = self.proc_root.join("net/ipv6_route");
        if let Some(text) = read_opt(&p6)? {
            for (i, line) in text.lines().enumerate() {
                let f: Vec<&str> = line.split_whitespace().collect();
                let parsed = (f.len() >= 10)
                    .then(|| {
                        Some((
                            parse_v6(f[0])?,
                            u8::from_str_radix(f[1], 16).ok()?,
                            parse_v6(f[4])?,
                            u32::from_str_radix(f[8], 16).ok()?,
                        ))
                    })
                    .flatten();
                let Some((dest, prefix, gw, flags)) = parsed else {
                    return Err(HostError::Parse {
                        path: p6,
                        line: i + 1,
                        text: line.to_string(),
                    });
                };
                // Local-table host routes (RTF_LOCAL), rejects on lo: not traffic through
                // an interface.
                const RTF_LOCAL: u32 = 0x8000_0000;
                if flags & RTF_LOCAL != 0 || f[9] == "lo" {
                    continue;
                }
                out.push(Route {
                    ifname: f[9].to_string(),
                    dest: IpAddr::V6(dest),
                    prefix,
                    gateway: (flags & libc::RTF_GATEWAY as u32 != 0).then_some(IpAddr::V6(gw)),
                });
            }
        }
        Ok(out)
    }

    fn framebuffers(&self) -> Result<Vec<Framebuffer>, HostError> {
        Ok(class_entries(&self.sys.join("class/graphics"))?
            .into_iter()
            .filter(|(n, _)| n.starts_with("fb"))
            .map(|(name, real)| Framebuffer {
                pci: deepest_bdf(&real),
                name,
            })
            .collect())
    }

    fn boot_vga(&self) -> Result<Vec<Bdf>, HostError> {
        let mut out = Vec::new();
        for (name, real) in class_entries(&self.sys.join("bus/pci/devices"))? {
            if read_opt(&real.join("boot_vga"))?.as_deref() == Some("1") {
                if let Ok(b) = name.parse() {
                    out.push(b);
                }
            }
        }
        Ok(out)
    }
}

impl HostInspector {
    /// Device nodes of PCI devices open in other processes: every `/proc/<pid>/fd` entry
    /// that is a character or block device whose `/sys/dev/{char,block}/<maj>:<min>` lies
    /// under a PCI device. Processes that vanish or may not be inspected are skipped (as
    /// non-root, other users' processes are not seen).
    fn open_nodes(&self) -> Vec<OpenNode> {
        let me = std::process::id();
        let mut out = Vec::new();
        for pid_name in dir_names(&self.proc_root).unwrap_or_default() {
            let Ok(pid) = pid_name.parse::<u32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let pdir = self.proc_root.join(&pid_name);
            let Ok(fds) = fs::read_dir(pdir.join("fd")) else {
                continue;
            };
            let mut comm = None;
            for fd in fds.flatten() {
                let Ok(meta) = fs::metadata(fd.path()) else {
                    continue;
                };
                let ft = meta.file_type();
                let kind = if ft.is_char_device() {
                    "char"
                } else if ft.is_block_device() {
                    "block"
                } else {
                    continue;
                };
                let rdev = meta.rdev();
                let link = self.sys.join("dev").join(kind).join(format!(
                    "{}:{}",
                    libc::major(rdev),
                    libc::minor(rdev)
                ));
                let Some(pci) = fs::canonicalize(link).ok().as_deref().and_then(deepest_bdf) else {
                    continue;
                };
                let comm = comm
                    .get_or_insert_with(|| {
                        read_opt(&pdir.join("comm"))
                            .ok()
                            .flatten()
                            .unwrap_or_default()
                    })
                    .clone();
                let path = fs::read_link(fd.path())
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| {
                        format!("{kind} device {}:{}", libc::major(rdev), libc::minor(rdev))
                    });
                out.push(OpenNode {
                    path,
                    pid,
                    comm,
                    pci: Some(pci),
                });
            }
        }
        out
    }
}

/// The entries of a class-like directory with their resolved paths, sorted by name. A
/// missing directory (subsystem not built) has none.
fn class_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, HostError> {
    let mut out: Vec<(String, PathBuf)> = dir_names(dir)?
        .into_iter()
        .map(|n| {
            let p = dir.join(&n);
            (n, fs::canonicalize(&p).unwrap_or(p))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn dir_names(dir: &Path) -> Result<Vec<String>, HostError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(HostError::read(dir, e)),
    };
    let mut out: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    out.sort();
    Ok(out)
}

/// A file's trimmed text, `None` if it does not exist.
fn read_opt(p: &Path) -> Result<Option<String>, HostError> {
    match fs::read_to_string(p) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(HostError::read(p, e)),
    }
}

fn file_name(p: &Path) -> Option<String> {
    p.file_name()?.to_str().map(str::to_string)
}

fn parse_devnum(s: &str) -> Option<DevNum> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The last path component that is a PCI address: the device closest to the leaf.
pub(crate) fn deepest_bdf(real: &Path) -> Option<Bdf> {
    real.components()
        .filter_map(|c| c.as_os_str().to_str())
        .filter(|c| c.len() == 12)
        .filter_map(|c| c.parse::<Bdf>().ok())
        .next_back()
}

fn parse_v6(s: &str) -> Option<Ipv6Addr> {
    (s.len() == 32).then_some(())?;
    u128::from_str_radix(s, 16).ok().map(Ipv6Addr::from)
}

/// Undoes the kernel's octal escapes in mount paths (`\040` for a space).
pub(super) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
