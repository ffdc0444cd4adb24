//! `vfio-gmem helper`: the privileged half of an unprivileged VMM. As root, binds the
//! granted devices to vfio-pci once, then for each VMM that connects to `--socket`:
//! checks its credentials and request ([`Policy`]), leases the devices ([`Leases`]),
//! opens fresh fds (iommufd + cdevs, or legacy container + groups + device fds, and
//! `/dev/kvm` with `--kvm`), passes them and closes its copies, and frees the lease
//! when the VMM's connection closes. Trust model: docs/unprivileged.md.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Args;
use vfio_gmem::handoff::{
    Connection, FdRole, HandoffError, Leases, Listener, Policy, Refusal, Request,
};
use vfio_gmem::iommufd::Iommufd;
use vfio_gmem::mapper::Backend;
use vfio_gmem::vfio::{Bdf, Binder, Container, Device, Group, PciSysfs};

use crate::errors::require_root;
use crate::setup::{self, resolve_iommu};
use crate::IommuArg;

#[derive(Debug, Args)]
pub struct HelperArgs {
    /// The unix socket VMMs connect to (a stale one left by a crash is replaced; a live
    /// one is refused)
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// A device VMMs may receive (repeat); bound with its IOMMU group to vfio-pci at start
    #[arg(long = "device", value_name = "BDF", required = true)]
    pub devices: Vec<Bdf>,
    /// Serve processes of this uid (repeat)
    #[arg(long = "allow-uid", value_name = "UID")]
    pub uids: Vec<u32>,
    /// Serve processes whose primary gid is this one (repeat)
    #[arg(long = "allow-gid", value_name = "GID")]
    pub gids: Vec<u32>,
    /// Also hand out /dev/kvm to VMMs that ask
    #[arg(long)]
    pub kvm: bool,
    /// IOMMU interface of the fds handed out
    #[arg(long, value_enum, default_value_t = IommuArg::Auto)]
    pub iommu: IommuArg,
}

fn say(line: String) {
    println!("helper   {line}");
}

pub fn run(a: &HelperArgs) -> anyhow::Result<()> {
    if a.uids.is_empty() && a.gids.is_empty() {
        anyhow::bail!(
            "say whom to serve: --allow-uid UID and/or --allow-gid GID (the VMM's user); \
             the helper serves nobody by default"
        );
    }
    require_root(
        "helper",
        "it binds devices and opens /dev/iommu and VFIO nodes",
    )?;
    let backend = match resolve_iommu(a.iommu, std::path::Path::new(Iommufd::PATH).exists()) {
        setup::Backend::Iommufd => Backend::Iommufd,
        setup::Backend::Legacy => Backend::LegacyType1,
    };
    if backend == Backend::Iommufd && !std::path::Path::new(Iommufd::PATH).exists() {
        anyhow::bail!("--iommu iommufd: /dev/iommu does not exist (kernel without CONFIG_IOMMUFD); use --iommu legacy");
    }
    let binder = Binder::new();
    for &bdf in &a.devices {
        binder
            .bind(bdf)
            .with_context(|| format!("cannot bind {bdf} to vfio-pci for handing out"))?;
    }
    let listener = Listener::bind(&a.socket)?;
    if listener.removed_stale() {
        say(format!(
            "replaced a stale socket at {} (left by a helper that stopped)",
            a.socket.display()
        ));
    }
    let policy = Arc::new(Policy {
        uids: a.uids.clone(),
        gids: a.gids.clone(),
        devices: a.devices.clone(),
        kvm: a.kvm,
    });
    say(format!(
        "listening on {} ({backend}): devices {}; uids {:?}, gids {:?}; kvm {}",
        a.socket.display(),
        a.devices
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        a.uids,
        a.gids,
        if a.kvm { "yes" } else { "no" }
    ));
    let leases = Arc::new(Mutex::new(Leases::default()));
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                say(format!("accept failed: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let (policy, leases) = (policy.clone(), leases.clone());
        std::thread::spawn(move || serve(conn, &policy, &leases, backend));
    }
}

/// One VMM: check, lease, open, pass, wait for the connection to close, free.
fn serve(conn: Connection, policy: &Policy, leases: &Mutex<Leases>, backend: Backend) {
    let peer = conn.peer();
    let refuse = |reason: Refusal, message: String| {
        say(format!("refused {peer} ({reason}): {message}"));
        if let Err(e) = conn.refuse(reason, &message) {
            say(format!("{peer}: {e}"));
        }
    };
    let req = match conn.read_request() {
        Ok(r) => r,
        Err(HandoffError::Protocol(e)) => return refuse(Refusal::BadRequest, e.to_string()),
        Err(e) => return say(format!("{peer}: {e}")),
    };
    if let Err((reason, message)) = policy.check(&peer, &req) {
        return refuse(reason, message);
    }
    let lease = match leases.lock().unwrap().take(peer, &req.devices) {
        Ok(l) => l,
        Err((reason, message)) => return refuse(reason, message),
    };
    match open_fds(backend, &req) {
        Ok(fds) => {
            let roles: Vec<String> = fds.iter().map(|(r, _)| r.to_string()).collect();
            match conn.grant(backend, fds) {
                Ok(()) => {
                    say(format!("granted {peer}: {}", roles.join(", ")));
                    conn.wait_closed();
                }
                Err(e) => say(format!("{peer}: {e}")),
            }
        }
        Err(e) => refuse(Refusal::Unavailable, format!("{e:#}")),
    }
    let freed = leases.lock().unwrap().release(lease);
    say(format!(
        "released {} ({peer} closed its connection)",
        freed
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
}

fn owned(fd: impl AsFd, what: &str) -> anyhow::Result<OwnedFd> {
    fd.as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("duplicating the {what} fd"))
}

/// Fresh fds for one VMM; this process keeps none of them after the grant.
fn open_fds(backend: Backend, req: &Request) -> anyhow::Result<Vec<(FdRole, OwnedFd)>> {
    let mut fds = Vec::new();
    match backend {
        Backend::Iommufd => {
            let iommufd = Iommufd::open().context("opening /dev/iommu")?;
            fds.push((FdRole::Iommufd, OwnedFd::from(iommufd)));
            for &bdf in &req.devices {
                let dev =
                    Device::open_pci(bdf).with_context(|| format!("opening {bdf}'s VFIO cdev"))?;
                fds.push((FdRole::Device(bdf), owned(&dev, "device")?));
            }
        }
        Backend::LegacyType1 => {
            let sysfs = PciSysfs::new();
            let container = Container::open().context("opening the legacy VFIO container")?;
            let mut groups: Vec<Group> = Vec::new();
            let mut devices = Vec::new();
            for &bdf in &req.devices {
                let id = sysfs
                    .device(bdf)?
                    .iommu_group
                    .with_context(|| format!("{bdf} has no IOMMU group"))?;
                if !groups.iter().any(|g| g.id() == id) {
                    let g = Group::open(id).with_context(|| {
                        format!("opening IOMMU group {id} of {bdf} (a VMM that still holds it?)")
                    })?;
                    container
                        .add_group(&g)
                        .with_context(|| format!("adding group {id} to the container"))?;
                    groups.push(g);
                }
                let g = groups.iter().find(|g| g.id() == id).expect("just added");
                let dev = g.device(bdf)?;
                devices.push((FdRole::Device(bdf), owned(&dev, "device")?));
            }
            fds.push((FdRole::Container, owned(&container, "container")?));
            for g in &groups {
                fds.push((FdRole::Group(g.id()), owned(g, "group")?));
            }
            fds.extend(devices);
        }
    }
    if req.kvm {
        let kvm = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/kvm")
            .context("opening /dev/kvm")?;
        fds.push((FdRole::Kvm, OwnedFd::from(kvm)));
    }
    Ok(fds)
}
