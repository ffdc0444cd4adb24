//! The VMM's side: ask the helper for fds, adopt them as library objects.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::error::HandoffError;
use super::policy::PeerCred;
use super::protocol::{FdRole, Reply, Request, MAX_MESSAGE};
use crate::iommufd::Iommufd;
use crate::mapper::Backend;
use crate::sys::unix_socket as us;
use crate::vfio::{Bdf, Container, Device, Group};

/// How long the VMM waits for the helper's answer (it binds nothing at request time, but
/// opening devices can take a moment).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The fds a helper granted, until the VMM takes them, and the *lease*: the connection,
/// which tells the helper the devices are in use. Keep the `Handoff` alive for as long as
/// the VMM uses the devices; dropping it (or the VMM exiting, however it exits) frees
/// them for the next VMM. The fds themselves do not depend on the helper: a helper
/// restarted meanwhile changes nothing for this VMM.
///
/// ```no_run
/// use std::sync::Arc;
/// use vfio_gmem::dma::{DmaSpace, SpaceOptions};
/// use vfio_gmem::handoff::{Handoff, Request};
/// let bdf = "0000:00:03.0".parse()?;
/// let mut grant = Handoff::request("/run/vfio-gmem/helper.sock", &Request {
///     devices: vec![bdf],
///     kvm: true,
/// })?;
/// let iommufd = Arc::new(grant.take_iommufd()?);
/// let device = grant.take_device(bdf)?;
/// let mut space = DmaSpace::iommufd(&iommufd, None, SpaceOptions::default())?;
/// space.attach(&device)?;
/// // ... run the VM; `grant` stays alive as long as `device` is used.
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Handoff {
    backend: Backend,
    helper: PeerCred,
    fds: Vec<(FdRole, Option<OwnedFd>)>,
    /// Held, never read: closing it ends the lease.
    _lease: UnixStream,
}

fn connect_hint(errno: Option<i32>) -> &'static str {
    match errno {
        Some(libc::ENOENT) => {
            ": no such socket; start `vfio-gmem helper --socket <path> ...` as root first"
        }
        Some(libc::ECONNREFUSED) => {
            ": nothing listens there (a helper that stopped left it behind); start the \
             helper again, it replaces a stale socket"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            ": no permission to reach the socket (its directory or file mode); the helper's \
             administrator decides who may connect"
        }
        Some(libc::EPROTOTYPE) => ": something else listens there, not a vfio-gmem helper",
        _ => "",
    }
}

impl Handoff {
    /// Connects to the helper at `socket`, sends `request` and receives the grant. On a
    /// refusal, [`HandoffError::Refused`] carries the helper's explanation and nothing is
    /// held. The grant must name exactly the fds attached, one per requested device (plus
    /// the container and groups on the legacy path, iommufd on the other, and `/dev/kvm`
    /// if asked), or all are closed and [`HandoffError::Mismatch`] returned.
    pub fn request(socket: impl AsRef<Path>, request: &Request) -> Result<Handoff, HandoffError> {
        let path = socket.as_ref();
        let fd = us::seqpacket().map_err(|e| HandoffError::io("creating a unix socket", e))?;
        us::connect(fd.as_fd(), path).map_err(|e| HandoffError::Connect {
            path: path.to_path_buf(),
            hint: connect_hint(e.raw_os_error()),
            source: e,
        })?;
        let cred = us::peer_cred(fd.as_fd())
            .map_err(|e| HandoffError::io("reading the helper's credentials", e))?;
        let helper = PeerCred {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
        };
        let lease = UnixStream::from(fd);
        us::send_with_fds(lease.as_fd(), &request.encode(), &[])
            .map_err(|e| HandoffError::io("sending the request to the helper", e))?;
        lease
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| HandoffError::io("setting a reply timeout", e))?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let got = us::recv_with_fds(lease.as_fd(), &mut buf).map_err(|e| {
            HandoffError::io("waiting for the helper's reply (it may have stopped)", e)
        })?;
        lease
            .set_read_timeout(None)
            .map_err(|e| HandoffError::io("clearing the reply timeout", e))?;
        if got.len == 0 {
            return Err(HandoffError::io(
                "the helper closed the connection without answering",
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        if got.truncated {
            return Err(HandoffError::Mismatch(
                "the reply or its fds were cut short by the receive buffers".into(),
            ));
        }
        match Reply::decode(&buf[..got.len])? {
            Reply::Refused { reason, message } => {
                if !got.fds.is_empty() {
                    return Err(HandoffError::Mismatch(format!(
                        "a refusal with {} fds attached",
                        got.fds.len()
                    )));
                }
                Err(HandoffError::Refused { reason, message })
            }
            Reply::Granted { backend, fds } => {
                if fds.len() != got.fds.len() {
                    return Err(HandoffError::Mismatch(format!(
                        "{} fds named, {} attached",
                        fds.len(),
                        got.fds.len()
                    )));
                }
                let missing: Vec<String> = request
                    .devices
                    .iter()
                    .filter(|d| !fds.contains(&FdRole::Device(**d)))
                    .map(|d| d.to_string())
                    .collect();
                if !missing.is_empty() || (request.kvm && !fds.contains(&FdRole::Kvm)) {
                    let mut wanted = missing;
                    if request.kvm && !fds.contains(&FdRole::Kvm) {
                        wanted.push("kvm".into());
                    }
                    return Err(HandoffError::Mismatch(format!(
                        "asked for {} but granted {}",
                        wanted.join(", "),
                        roles_text(&fds)
                    )));
                }
                Ok(Handoff {
                    backend,
                    helper,
                    fds: fds.into_iter().zip(got.fds.into_iter().map(Some)).collect(),
                    _lease: lease,
                })
            }
        }
    }

    /// Which kernel interface the fds belong to: [`Backend::Iommufd`] (iommufd + cdevs)
    /// or [`Backend::LegacyType1`] (container + groups + device fds).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The process that answered (`SO_PEERCRED`): a VMM may insist on uid 0.
    pub fn helper(&self) -> PeerCred {
        self.helper
    }

    /// What was granted, in the order received (taken fds included).
    pub fn roles(&self) -> Vec<FdRole> {
        self.fds.iter().map(|(r, _)| *r).collect()
    }

    /// The legacy groups granted.
    pub fn groups(&self) -> Vec<u32> {
        self.fds
            .iter()
            .filter_map(|(r, _)| match r {
                FdRole::Group(id) => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// Takes the raw fd of `role` (each can be taken once).
    pub fn take_fd(&mut self, role: FdRole) -> Result<OwnedFd, HandoffError> {
        let text = roles_text(&self.roles());
        self.fds
            .iter_mut()
            .find(|(r, fd)| *r == role && fd.is_some())
            .and_then(|(_, fd)| fd.take())
            .ok_or(HandoffError::NotInGrant(role, text))
    }

    /// The iommufd (`/dev/iommu`), adopted with [`Iommufd::from_fd`].
    pub fn take_iommufd(&mut self) -> Result<Iommufd, HandoffError> {
        let fd = self.take_fd(FdRole::Iommufd)?;
        Iommufd::from_fd(fd).map_err(|e| HandoffError::Adopt {
            role: FdRole::Iommufd,
            source: Box::new(e),
        })
    }

    /// Device `bdf`: its VFIO cdev on iommufd (bind it to the iommufd, e.g. through
    /// [`DmaSpace::attach`](crate::dma::DmaSpace::attach)), or its group's device fd on
    /// the legacy path (ready to use).
    pub fn take_device(&mut self, bdf: Bdf) -> Result<Device, HandoffError> {
        let fd = self.take_fd(FdRole::Device(bdf))?;
        Ok(Device::from_fd(fd, bdf.to_string()))
    }

    /// The legacy container, type1v2 set, every granted group in it.
    pub fn take_container(&mut self) -> Result<Container, HandoffError> {
        let fd = self.take_fd(FdRole::Container)?;
        Container::from_fd(fd).map_err(|e| HandoffError::Adopt {
            role: FdRole::Container,
            source: Box::new(e),
        })
    }

    /// Legacy group `id` (keep it open while its devices are used).
    pub fn take_group(&mut self, id: u32) -> Result<Group, HandoffError> {
        let fd = self.take_fd(FdRole::Group(id))?;
        Group::from_fd(fd, id).map_err(|e| HandoffError::Adopt {
            role: FdRole::Group(id),
            source: Box::new(e),
        })
    }

    /// `/dev/kvm`, for creating the VM without access to the node.
    pub fn take_kvm(&mut self) -> Result<kvm_ioctls::Kvm, HandoffError> {
        let fd = self.take_fd(FdRole::Kvm)?;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        if link != "/dev/kvm" {
            return Err(HandoffError::Adopt {
                role: FdRole::Kvm,
                source: format!("it is {link:?}, not /dev/kvm").into(),
            });
        }
        // SAFETY: `fd` is an open /dev/kvm (checked above) that we own; its ownership
        // moves into the Kvm, which closes it.
        Ok(unsafe { kvm_ioctls::Kvm::from_raw_fd(fd.into_raw_fd()) })
    }

    /// Ends the lease now (same as dropping the `Handoff`); fds already taken stay open.
    pub fn release(self) {}
}

fn roles_text(roles: &[FdRole]) -> String {
    if roles.is_empty() {
        return "nothing".into();
    }
    roles
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
