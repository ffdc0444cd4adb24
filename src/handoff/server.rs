//! The helper's side: the listening socket (replacing a stale one, refusing a live one),
//! and one connection: the peer's credentials, its request, the grant or refusal, and
//! the lease that lasts until the peer closes.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::HandoffError;
use super::policy::PeerCred;
use super::protocol::{FdRole, Refusal, Reply, Request, MAX_MESSAGE};
use crate::mapper::Backend;
use crate::sys::unix_socket as us;

/// How long a connected peer has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The helper's listening socket. Dropping it removes the socket file, if it is still
/// the one this listener created.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
    id: (u64, u64),
    removed_stale: bool,
}

impl Listener {
    /// Listens on `path` (`SOCK_SEQPACKET`, mode 0666: who may use it is decided per
    /// connection by `SO_PEERCRED`; restrict the directory to narrow it further).
    ///
    /// A socket already at `path` is probed: if a process accepts connections there,
    /// [`HandoffError::SocketInUse`] names it; if nobody does (a helper that crashed left
    /// it), it is replaced and [`removed_stale`](Self::removed_stale) says so. Anything
    /// else at `path` is left alone ([`HandoffError::NotASocket`]).
    pub fn bind(path: impl AsRef<Path>) -> Result<Listener, HandoffError> {
        let path = path.as_ref();
        let mut removed_stale = false;
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(HandoffError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => {
                let probe =
                    us::seqpacket().map_err(|e| HandoffError::io("creating a unix socket", e))?;
                match us::connect(probe.as_fd(), path) {
                    Ok(()) => {
                        let c = us::peer_cred(probe.as_fd()).map_err(|e| {
                            HandoffError::io("reading the running helper's credentials", e)
                        })?;
                        return Err(HandoffError::SocketInUse {
                            path: path.to_path_buf(),
                            pid: c.pid,
                            uid: c.uid,
                        });
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                        std::fs::remove_file(path).map_err(|e| HandoffError::Listen {
                            path: path.to_path_buf(),
                            hint: ": could not remove the stale socket",
                            source: e,
                        })?;
                        removed_stale = true;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => {
                        return Err(HandoffError::Listen {
                            path: path.to_path_buf(),
                            hint: ": another program (not a vfio-gmem helper) listens there; \
                                   choose another --socket path",
                            source: e,
                        })
                    }
                    Err(e) => {
                        return Err(HandoffError::Listen {
                            path: path.to_path_buf(),
                            hint: ": could not tell whether the socket there is in use",
                            source: e,
                        })
                    }
                }
            }
            Err(_) => {}
        }
        let fd = us::seqpacket().map_err(|e| HandoffError::io("creating a unix socket", e))?;
        us::bind_listen(fd.as_fd(), path, 16).map_err(|e| HandoffError::Listen {
            path: path.to_path_buf(),
            hint: match e.raw_os_error() {
                Some(libc::ENOENT) => ": its directory does not exist",
                Some(libc::EACCES) => ": its directory is not writable by this user",
                Some(libc::EADDRINUSE) => ": another helper took the path meanwhile",
                _ => "",
            },
            source: e,
        })?;
        let listen_err = |hint, e| HandoffError::Listen {
            path: path.to_path_buf(),
            hint,
            source: e,
        };
        let meta =
            std::fs::metadata(path).map_err(|e| listen_err(": reading the new socket", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| listen_err(": setting the socket's mode", e))?;
        Ok(Listener {
            fd,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
            removed_stale,
        })
    }

    /// True if a stale socket (nobody listening) was replaced.
    pub fn removed_stale(&self) -> bool {
        self.removed_stale
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next VMM; its credentials are read at once.
    pub fn accept(&self) -> Result<Connection, HandoffError> {
        let fd = us::accept(self.fd.as_fd()).map_err(|e| HandoffError::io("accept", e))?;
        let c = us::peer_cred(fd.as_fd())
            .map_err(|e| HandoffError::io("reading the peer's credentials", e))?;
        Ok(Connection {
            stream: UnixStream::from(fd),
            peer: PeerCred {
                pid: c.pid,
                uid: c.uid,
                gid: c.gid,
            },
        })
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// One VMM's connection.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    peer: PeerCred,
}

impl Connection {
    /// Who connected, as the kernel recorded it.
    pub fn peer(&self) -> PeerCred {
        self.peer
    }

    /// Reads the request (the peer has a few seconds to send it). A malformed one is
    /// [`HandoffError::Protocol`]: answer it with [`refuse`](Self::refuse)
    /// ([`Refusal::BadRequest`]).
    pub fn read_request(&self) -> Result<Request, HandoffError> {
        self.stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .map_err(|e| HandoffError::io("setting a request timeout", e))?;
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let got = us::recv_with_fds(self.stream.as_fd(), &mut buf)
            .map_err(|e| HandoffError::io("reading the request", e))?;
        if got.len == 0 {
            return Err(HandoffError::io(
                "the peer closed the connection before asking",
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        // Fds a peer sends are closed here (dropped with `got`), never used.
        if !got.fds.is_empty() || got.truncated {
            return Err(super::error::ProtocolError::new(
                "a request carries no fds and fits one message",
            )
            .into());
        }
        Ok(Request::decode(&buf[..got.len])?)
    }

    /// Sends the fds; this process's copies are closed when this returns.
    pub fn grant(&self, backend: Backend, fds: Vec<(FdRole, OwnedFd)>) -> Result<(), HandoffError> {
        let reply = Reply::Granted {
            backend,
            fds: fds.iter().map(|(r, _)| *r).collect(),
        };
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|(_, f)| f.as_fd()).collect();
        us::send_with_fds(self.stream.as_fd(), &reply.encode(), &borrowed)
            .map_err(|e| HandoffError::io("sending the grant", e))
    }

    /// Sends a refusal.
    pub fn refuse(&self, reason: Refusal, message: &str) -> Result<(), HandoffError> {
        let reply = Reply::Refused {
            reason,
            message: message.to_string(),
        };
        us::send_with_fds(self.stream.as_fd(), &reply.encode(), &[])
            .map_err(|e| HandoffError::io("sending the refusal", e))
    }

    /// Blocks until the peer closes the connection (it exited, or dropped its
    /// [`Handoff`](super::Handoff)): the end of its lease. Anything it sends meanwhile is
    /// discarded.
    pub fn wait_closed(&self) {
        let _ = self.stream.set_read_timeout(None);
        let mut buf = [0u8; 256];
        loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handoff::{Handoff, HandoffError};
    use crate::vfio::Bdf;

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vfio-gmem-handoff-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("helper.sock")
    }

    #[test]
    fn live_stale_and_foreign_paths() {
        let path = tmp("paths");
        let l = Listener::bind(&path).unwrap();
        assert!(!l.removed_stale());
        match Listener::bind(&path).unwrap_err() {
            HandoffError::SocketInUse { pid, .. } => {
                assert_eq!(pid as u32, std::process::id())
            }
            e => panic!("{e}"),
        }
        // A crash leaves the file: simulate by keeping the file and closing the fd.
        let mut stale = l;
        stale.path = PathBuf::from("/nonexistent");
        drop(stale);
        assert!(path.exists());
        let l = Listener::bind(&path).unwrap();
        assert!(l.removed_stale());
        drop(l);
        assert!(!path.exists(), "dropping the listener removes its socket");
        std::fs::write(&path, b"not a socket").unwrap();
        let e = Listener::bind(&path).unwrap_err();
        assert!(matches!(e, HandoffError::NotASocket { .. }), "{e}");
        assert!(e.to_string().contains("refusing to remove it"));
    }

    #[test]
    fn grant_refusal_and_lease_end() {
        let path = tmp("grant");
        let l = Listener::bind(&path).unwrap();
        let bdf: Bdf = "00:03.0".parse().unwrap();
        let helper = std::thread::spawn(move || {
            // First: refused.
            let c = l.accept().unwrap();
            let req = c.read_request().unwrap();
            assert_eq!(req.devices, vec![bdf]);
            c.refuse(Refusal::NotAllowed, "uid 1 is not allowed")
                .unwrap();
            // Second: granted two fds standing in for device and kvm; the lease ends
            // when the client drops the Handoff.
            let c = l.accept().unwrap();
            c.read_request().unwrap();
            let f = || OwnedFd::from(std::fs::File::open("/proc/self/status").unwrap());
            c.grant(
                Backend::Iommufd,
                vec![(FdRole::Device(bdf), f()), (FdRole::Iommufd, f())],
            )
            .unwrap();
            c.wait_closed();
        });
        let req = Request {
            devices: vec![bdf],
            kvm: false,
        };
        match Handoff::request(&path, &req).unwrap_err() {
            HandoffError::Refused { reason, message } => {
                assert_eq!(reason, Refusal::NotAllowed);
                assert_eq!(message, "uid 1 is not allowed");
            }
            e => panic!("{e}"),
        }
        let mut h = Handoff::request(&path, &req).unwrap();
        assert_eq!(h.backend(), Backend::Iommufd);
        assert_eq!(h.helper().pid as u32, std::process::id());
        assert!(h.take_fd(FdRole::Device(bdf)).is_ok());
        let e = h.take_fd(FdRole::Device(bdf)).unwrap_err();
        assert!(e.to_string().contains("no device 0000:00:03.0 fd"), "{e}");
        // Not an iommufd: adoption refuses it.
        assert!(matches!(
            h.take_iommufd().unwrap_err(),
            HandoffError::Adopt { .. }
        ));
        assert!(matches!(
            h.take_kvm().unwrap_err(),
            HandoffError::NotInGrant(..)
        ));
        drop(h);
        helper.join().unwrap();
        let e = Handoff::request(&path, &req).unwrap_err();
        // The helper (its Listener) is gone, and with it the socket file.
        assert!(e.to_string().contains("no such socket; start"), "{e}");
    }
}
