//! What the host stands on: which live uses (mounted filesystems, swap, stacked block
//! devices, network interfaces carrying addresses or routes, the console) each PCI device
//! backs, so that `bind` never takes a device the host depends on.
//!
//! Split in two: [`model`] is pure (an [`Inventory`] of the kernel's views in, uses and a
//! [`Verdict`] out); [`HostInspector`] reads the inventory from sysfs, procfs and
//! rtnetlink, under configurable roots. Nothing is guessed from names: a disk is tied to
//! its PCI device by its sysfs path, a mount by its device number (or its 9p/virtiofs tag),
//! a stacked device by `holders/`.
//!
//! ```no_run
//! use vfio_gmem::vfio::host::{decide, HostInspector, Verdict};
//! let inv = HostInspector::new().inventory()?;
//! let uses = inv.uses("0000:00:04.0".parse().unwrap());
//! match decide(uses, false) {
//!     Verdict::Clear => println!("nothing on the host depends on it"),
//!     Verdict::Refused { uses, forceable } => {
//!         for u in &uses { println!("in use: {u}"); }
//!         println!("force would {}override", if forceable { "" } else { "not " });
//!     }
//!     Verdict::Overridden(_) => unreachable!(),
//! }
//! # Ok::<(), vfio_gmem::vfio::host::HostError>(())
//! ```

use std::io;
use std::path::{Path, PathBuf};

pub mod model;
mod net;
mod read;
#[cfg(test)]
mod tests;

pub use model::{decide, HostUse, Inventory, Nature, Use, Verdict};
pub use read::HostInspector;

/// Why the host's uses could not be read. Callers that would change bindings must treat
/// this as "in use" (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A procfs or sysfs file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        #[source]
        /// The system error.
        source: io::Error,
    },
    /// A line of a procfs file has an unexpected form.
    #[error("{path}: line {line}: cannot parse {text:?}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Line number (1-based).
        line: usize,
        /// The line.
        text: String,
    },
    /// The rtnetlink address dump failed.
    #[error("listing interface addresses over rtnetlink: {0}")]
    Netlink(#[source] io::Error),
}

impl HostError {
    fn read(path: &Path, source: io::Error) -> Self {
        HostError::Read {
            path: path.to_path_buf(),
            source,
        }
    }
}
