//! Exit codes and the errors that choose them.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the operation failed (device, kernel, permissions, a failed self-test step) |
//! | 2 | usage error: bad arguments (clap's own errors included) or values that make no sense together |

use std::fmt;

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

/// The command line itself is wrong; the message says how to fix it.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A shorthand: `Err(usage("..."))?`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// The exit code for an error that ended the command.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<UsageError>().is_some() || e.downcast_ref::<clap::Error>().is_some() {
        EXIT_USAGE
    } else {
        EXIT_FAILED
    }
}

/// True when running with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails unless root, naming the command and why it needs root.
pub fn require_root(command: &str, why: &str) -> anyhow::Result<()> {
    if is_root() {
        return Ok(());
    }
    anyhow::bail!(
        "`vfio-gmem {command}` must run as root ({why}); you are uid {}; rerun it with sudo",
        // SAFETY: as above.
        unsafe { libc::geteuid() }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_exit_2_and_everything_else_1() {
        assert_eq!(exit_code(&usage("bad size")), EXIT_USAGE);
        let wrapped = usage("bad size").context("assign");
        assert_eq!(exit_code(&wrapped), EXIT_USAGE);
        assert_eq!(exit_code(&anyhow::anyhow!("ioctl failed")), EXIT_FAILED);
        let io = std::io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(exit_code(&io.into()), EXIT_FAILED);
    }

    #[test]
    fn root_message_names_the_command() {
        if is_root() {
            assert!(require_root("bind", "x").is_ok());
        } else {
            let e = require_root("bind", "it writes sysfs")
                .unwrap_err()
                .to_string();
            assert!(e.contains("`vfio-gmem bind` must run as root"), "{e}");
            assert!(e.contains("sudo"), "{e}");
        }
    }
}
