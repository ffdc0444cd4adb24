//! Errors of the handoff: typed, with their sources, each saying what to do.

use std::io;
use std::path::PathBuf;

use super::memlock::MemlockShortfall;
use super::protocol::{FdRole, Refusal};

/// A message that does not follow the protocol (see [`super::protocol`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed vfio-gmem handoff message: {0}")]
pub struct ProtocolError(String);

impl ProtocolError {
    pub(crate) fn new(why: impl Into<String>) -> Self {
        ProtocolError(why.into())
    }
}

/// What went wrong handing fds from the helper to a VMM, on either side.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The VMM could not reach the helper's socket.
    #[error("cannot connect to the vfio-gmem helper at {}: {source}{hint}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Sending or receiving a message failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The other side does not speak this protocol version (or is not a helper/VMM).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The helper said no; nothing was handed over.
    #[error("the vfio-gmem helper refused ({reason}): {message}")]
    Refused {
        /// The category.
        reason: Refusal,
        /// The helper's explanation.
        message: String,
    },
    /// The reply names fds that did not arrive (or the other way round); all received
    /// fds were closed.
    #[error("the helper's reply does not match the fds attached: {0}")]
    Mismatch(String),
    /// A received fd is not what its role says.
    #[error("the received {role} fd is not usable: {source}")]
    Adopt {
        /// What the fd was said to be.
        role: FdRole,
        /// Why the library refused it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The grant holds no fd of this role (the request did not ask for it, or the
    /// backend has none: e.g. no iommufd on the legacy path).
    #[error("the grant holds no {0} fd (granted: {1})")]
    NotInGrant(FdRole, String),
    /// Another helper is serving the socket path.
    #[error(
        "{} is in use by a running vfio-gmem helper (pid {pid}, uid {uid}); stop it first or \
         give this one another --socket path", path.display()
    )]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
        /// The running helper's pid.
        pid: i32,
        /// Its uid.
        uid: u32,
    },
    /// The socket path holds something that is not a socket.
    #[error(
        "{} exists and is not a unix socket; refusing to remove it: remove it yourself or \
         choose another --socket path", path.display()
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Creating the listening socket failed.
    #[error("cannot listen on {}: {source}{hint}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Not enough locked-memory allowance for the DMA mappings planned.
    #[error(transparent)]
    Memlock(#[from] MemlockShortfall),
}

impl HandoffError {
    pub(crate) fn io(what: &'static str, source: io::Error) -> Self {
        HandoffError::Io { what, source }
    }
}
