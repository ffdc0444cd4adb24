//! The VMM's end of a peer connection: [`Peer`], a [`ConversionListener`] that speaks
//! the protocol to another process.

use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::error::PeerError;
use super::wire::{Message, MAX_MESSAGE, MAX_RANGES};
use crate::dma::{ConversionListener, ListenerError};
use crate::sys::unix_socket;

/// How long a peer has to answer, unless [`Peer::set_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Another process that maps guest memory (a vhost-user-style backend), as the VMM
/// talks to it.
///
/// Cloning gives another handle to the same connection: keep one to send the memory
/// table ([`add_region`](Self::add_region)) and register a clone with
/// [`DmaSpace::add_listener`](crate::dma::DmaSpace::add_listener). Calls are serialized
/// on the connection; each waits for the peer's reply.
///
/// ```no_run
/// use std::os::fd::AsFd;
/// use vfio_gmem::dma::DmaSpace;
/// use vfio_gmem::gmem::Memfd;
/// use vfio_gmem::peer::Peer;
/// # fn f(space: &mut DmaSpace, shared: &Memfd) -> Result<(), Box<dyn std::error::Error>> {
/// let peer = Peer::connect("virtiofsd", "/run/vm0/fs.sock".as_ref())?;
/// peer.add_region(0, 1 << 30, shared.file().as_fd(), 0)?; // the memory table first
/// space.add_listener(Box::new(peer.clone()))?; // granted every shared page now
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Peer {
    name: Arc<str>,
    conn: Arc<Mutex<Conn>>,
}

struct Conn {
    fd: OwnedFd,
    timeout: Duration,
    /// Set by a timeout, a hang-up or a protocol error: the reply stream can no longer be
    /// matched to requests, so every later call fails.
    broken: bool,
    buf: Vec<u8>,
}

impl Peer {
    /// Connects to a backend listening on the `SOCK_SEQPACKET` unix socket at `path`.
    pub fn connect(name: &str, path: &Path) -> Result<Peer, PeerError> {
        let io = |what, source| PeerError::Io {
            name: name.to_string(),
            what,
            source,
        };
        let fd = unix_socket::seqpacket().map_err(|e| io("creating a socket", e))?;
        unix_socket::connect(fd.as_fd(), path).map_err(|e| io("connecting", e))?;
        Ok(Peer::from_fd(name, fd))
    }

    /// A peer on an already connected `SOCK_SEQPACKET` socket (e.g. one end of
    /// [`Peer::pair`], or an fd received from a management process).
    pub fn from_fd(name: &str, fd: OwnedFd) -> Peer {
        Peer {
            name: name.into(),
            conn: Arc::new(Mutex::new(Conn {
                fd,
                timeout: DEFAULT_TIMEOUT,
                broken: false,
                buf: Vec::with_capacity(MAX_MESSAGE),
            })),
        }
    }

    /// A connected pair: the peer, and the socket to hand the backend process (e.g. as
    /// its stdin, or inherited across `exec` after clearing close-on-exec).
    pub fn pair(name: &str) -> Result<(Peer, OwnedFd), PeerError> {
        let (a, b) = unix_socket::seqpacket_pair().map_err(|source| PeerError::Io {
            name: name.to_string(),
            what: "creating a socket pair",
            source,
        })?;
        Ok((Peer::from_fd(name, a), b))
    }

    /// The name given at creation (errors and logs use it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long each call waits for the reply ([`DEFAULT_TIMEOUT`] unless set). A peer
    /// that does not answer in time fails the call, and the connection refuses every
    /// later call (a late reply could be taken for the next one's).
    pub fn set_timeout(&self, timeout: Duration) {
        self.lock().timeout = timeout;
    }

    /// Whether an earlier failure left the connection unusable.
    pub fn is_broken(&self) -> bool {
        self.lock().broken
    }

    /// Sends a region of the memory table: `[gpa, gpa+size)` is `fd` from `offset`. The
    /// peer may map only what it is granted afterwards.
    pub fn add_region(
        &self,
        gpa: u64,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<(), PeerError> {
        self.call(
            &Message::AddRegion { gpa, size, offset },
            &[fd],
            "ADD_MEM_REG",
        )
    }

    /// Removes a region from the memory table: the peer unmaps all of it before it answers.
    pub fn remove_region(&self, gpa: u64, size: u64) -> Result<(), PeerError> {
        self.call(&Message::RemoveRegion { gpa, size }, &[], "REM_MEM_REG")
    }

    /// Asks the peer to stop reaching `ranges`; returns once it says it has.
    pub fn release(&self, ranges: &[Range<u64>]) -> Result<(), PeerError> {
        for part in ranges.chunks(MAX_RANGES) {
            self.call(&Message::Release(part.to_vec()), &[], "RELEASE")?;
        }
        Ok(())
    }

    /// Tells the peer `ranges` are shared now.
    pub fn grant(&self, ranges: &[Range<u64>]) -> Result<(), PeerError> {
        for part in ranges.chunks(MAX_RANGES) {
            self.call(&Message::Grant(part.to_vec()), &[], "GRANT")?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conn> {
        // A panic while holding the lock leaves nothing half-written that matters: the
        // `broken` flag is the only state, and a half-done call sets it first.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn call(
        &self,
        msg: &Message,
        fds: &[BorrowedFd<'_>],
        request: &'static str,
    ) -> Result<(), PeerError> {
        let name = || self.name.to_string();
        let mut c = self.lock();
        if c.broken {
            return Err(PeerError::Broken { name: name() });
        }
        // Until the reply matched, the connection counts as out of step.
        c.broken = true;
        let Conn {
            fd, timeout, buf, ..
        } = &mut *c;
        buf.clear();
        msg.encode(buf);
        if let Err(e) = unix_socket::send_with_fds(fd.as_fd(), buf, fds) {
            return Err(match e.raw_os_error() {
                Some(libc::EPIPE) | Some(libc::ECONNRESET) => PeerError::Closed { name: name() },
                _ => PeerError::Io {
                    name: name(),
                    what: "sending",
                    source: e,
                },
            });
        }
        let io = |what, source| PeerError::Io {
            name: name(),
            what,
            source,
        };
        if !unix_socket::wait_readable(fd.as_fd(), *timeout).map_err(|e| io("waiting", e))? {
            return Err(PeerError::Timeout {
                name: name(),
                request,
                ms: timeout.as_millis() as u64,
            });
        }
        buf.resize(MAX_MESSAGE, 0);
        let got = match unix_socket::recv_with_fds(fd.as_fd(), buf) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                return Err(PeerError::Closed { name: name() })
            }
            Err(e) => return Err(io("receiving", e)),
        };
        if got.len == 0 {
            return Err(PeerError::Closed { name: name() });
        }
        let protocol = |detail: String, source| PeerError::Protocol {
            name: name(),
            detail,
            source,
        };
        if got.truncated || !got.fds.is_empty() {
            return Err(protocol(
                format!("reply to {request} too long or carrying fds"),
                None,
            ));
        }
        match Message::decode(&buf[..got.len]) {
            Ok(Message::Reply { request: r, status }) if r == msg.request() => {
                c.broken = false;
                if status == 0 {
                    Ok(())
                } else {
                    Err(PeerError::Refused {
                        name: name(),
                        request,
                        source: std::io::Error::from_raw_os_error(status.min(4095) as i32),
                    })
                }
            }
            Ok(other) => Err(protocol(
                format!("expected the reply to {request}, got {other:?}"),
                None,
            )),
            Err(e) => Err(protocol(format!("reply to {request}"), Some(e))),
        }
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("name", &self.name).finish()
    }
}

impl ConversionListener for Peer {
    fn name(&self) -> &str {
        &self.name
    }
    fn release(&mut self, ranges: &[Range<u64>]) -> Result<(), ListenerError> {
        Peer::release(self, ranges).map_err(Into::into)
    }
    fn grant(&mut self, ranges: &[Range<u64>]) -> Result<(), ListenerError> {
        Peer::grant(self, ranges).map_err(Into::into)
    }
}
