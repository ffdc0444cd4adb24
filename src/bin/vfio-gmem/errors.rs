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

/// Structured fields of a refusal for the `--json` error object: the host uses that
/// stopped a bind (`host_uses`, `forceable`) or the nature of a bridge (`nature`).
pub fn add_details(j: &mut serde_json::Value, e: &anyhow::Error) {
    use vfio_gmem::vfio::VfioError;
    for cause in e.chain() {
        match cause.downcast_ref::<VfioError>() {
            Some(VfioError::HostInUse {
                bdf,
                uses,
                forceable,
                ..
            }) => {
                j["device"] = bdf.to_string().into();
                j["host_uses"] = serde_json::to_value(uses).unwrap_or_default();
                j["forceable"] = (*forceable).into();
                return;
            }
            Some(VfioError::NotAssignable { bdf, nature }) => {
                j["device"] = bdf.to_string().into();
                j["nature"] = serde_json::to_value(nature).unwrap_or_default();
                return;
            }
            _ => {}
        }
    }
}

/// The error and its causes on one line, each cause once. The library's messages already
/// name their OS error (`... failed: Invalid argument (os error 22); what to do`) and keep
/// it as their `source()` too; `{:#}` would print it again after them. A cause whose
/// text the line already holds is left out.
pub fn describe(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
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
    fn each_cause_is_printed_once() {
        let os = || std::io::Error::from_raw_os_error(libc::EINVAL);
        #[derive(Debug)]
        struct Explained(std::io::Error);
        impl fmt::Display for Explained {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "KVM_CREATE_VM failed: {}; pick another type", self.0)
            }
        }
        impl std::error::Error for Explained {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Explained(os())).context("creating a VM");
        let line = describe(&e);
        assert_eq!(
            line,
            format!(
                "creating a VM: KVM_CREATE_VM failed: {}; pick another type",
                os()
            )
        );
        assert_eq!(line.matches("os error 22").count(), 1, "{line}");
        // `{:#}` repeats it: what this function is for.
        assert_eq!(format!("{e:#}").matches("os error 22").count(), 2);
        // A cause the message does not hold is kept.
        let e = anyhow::Error::new(os()).context("opening /dev/kvm");
        assert_eq!(describe(&e), format!("opening /dev/kvm: {}", os()));
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
