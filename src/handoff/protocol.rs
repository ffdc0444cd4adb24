//! The wire format: one `SOCK_SEQPACKET` message per request or reply, UTF-8 text, one
//! item per line, first line `vfio-gmem-handoff 1`. Pure encoding and decoding.
//!
//! ```text
//! VMM → helper                      helper → VMM (fds attached, in `fd` line order)
//! vfio-gmem-handoff 1               vfio-gmem-handoff 1
//! request                           granted
//! device 0000:00:03.0               backend iommufd
//! kvm                               fd iommufd
//!                                   fd device 0000:00:03.0
//!                                   fd kvm
//!
//!                                   vfio-gmem-handoff 1
//!                                   refused not-granted
//!                                   message 0000:00:04.0 is not among the devices ...
//! ```

use std::fmt;

use super::error::ProtocolError;
use crate::mapper::Backend;
use crate::vfio::Bdf;

/// The protocol version this library speaks (first line of every message).
pub const PROTOCOL_VERSION: u32 = 1;
/// The first line of every message.
const MAGIC: &str = "vfio-gmem-handoff";
/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 16 * 1024;

/// What a VMM asks the helper for.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Request {
    /// The devices, each with its VFIO fd (and, on the legacy path, its group's fd).
    pub devices: Vec<Bdf>,
    /// Also an fd of `/dev/kvm`, for a VMM that may not open it itself.
    pub kvm: bool,
}

/// What one received fd is; the reply lists them in the order they are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FdRole {
    /// `/dev/iommu`.
    Iommufd,
    /// A legacy VFIO container (`/dev/vfio/vfio`), type1v2 already set, its groups in it.
    Container,
    /// A legacy VFIO group (`/dev/vfio/<id>`), already in the container.
    Group(u32),
    /// A VFIO device: its cdev (iommufd, not yet bound) or the group's device fd (legacy).
    Device(Bdf),
    /// `/dev/kvm`.
    Kvm,
}

impl fmt::Display for FdRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FdRole::Iommufd => f.write_str("iommufd"),
            FdRole::Container => f.write_str("container"),
            FdRole::Group(id) => write!(f, "group {id}"),
            FdRole::Device(bdf) => write!(f, "device {bdf}"),
            FdRole::Kvm => f.write_str("kvm"),
        }
    }
}

/// Why the helper said no.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The peer's uid/gid is not among those the helper was told to allow.
    NotAllowed,
    /// A device the helper was not told to grant.
    NotGranted,
    /// A device another connected VMM holds.
    InUse,
    /// The helper could not open what was asked (see the message).
    Unavailable,
    /// A malformed request or another protocol version.
    BadRequest,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::NotAllowed,
        Refusal::NotGranted,
        Refusal::InUse,
        Refusal::Unavailable,
        Refusal::BadRequest,
    ];

    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not-allowed",
            Refusal::NotGranted => "not-granted",
            Refusal::InUse => "in-use",
            Refusal::Unavailable => "unavailable",
            Refusal::BadRequest => "bad-request",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The helper's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The fds, attached to the message in this order.
    Granted {
        /// Which kernel interface the fds are for.
        backend: Backend,
        /// What each attached fd is.
        fds: Vec<FdRole>,
    },
    /// Nothing attached.
    Refused {
        /// The category.
        reason: Refusal,
        /// What happened and what to do, for a person (one line).
        message: String,
    },
}

fn backend_word(b: Backend) -> &'static str {
    match b {
        Backend::Iommufd => "iommufd",
        Backend::LegacyType1 => "legacy",
    }
}

fn header(kind: &str) -> String {
    format!("{MAGIC} {PROTOCOL_VERSION}\n{kind}\n")
}

impl Request {
    /// The message bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = header("request");
        for d in &self.devices {
            s.push_str(&format!("device {d}\n"));
        }
        if self.kvm {
            s.push_str("kvm\n");
        }
        s.into_bytes()
    }

    /// Parses a request; unknown lines, duplicates and other versions are errors.
    pub fn decode(bytes: &[u8]) -> Result<Request, ProtocolError> {
        let mut lines = body(bytes, "request")?;
        let mut req = Request::default();
        for line in lines.by_ref() {
            match line.split_once(' ') {
                Some(("device", v)) => {
                    let bdf: Bdf = v.parse().map_err(|e| ProtocolError::new(format!("{e}")))?;
                    if req.devices.contains(&bdf) {
                        return Err(ProtocolError::new(format!("device {bdf} asked twice")));
                    }
                    req.devices.push(bdf);
                }
                None if line == "kvm" && !req.kvm => req.kvm = true,
                _ => return Err(ProtocolError::new(format!("unexpected line {line:?}"))),
            }
        }
        if req.devices.is_empty() {
            return Err(ProtocolError::new("a request names at least one device"));
        }
        Ok(req)
    }
}

impl Reply {
    /// The message bytes (the fds travel beside them).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reply::Granted { backend, fds } => {
                let mut s = header("granted");
                s.push_str(&format!("backend {}\n", backend_word(*backend)));
                for f in fds {
                    s.push_str(&format!("fd {f}\n"));
                }
                s.into_bytes()
            }
            Reply::Refused { reason, message } => {
                let mut s = header(&format!("refused {reason}"));
                let one_line: String = message
                    .chars()
                    .map(|c| if c == '\n' { ' ' } else { c })
                    .collect();
                s.push_str(&format!("message {one_line}\n"));
                s.into_bytes()
            }
        }
    }

    /// Parses a reply.
    pub fn decode(bytes: &[u8]) -> Result<Reply, ProtocolError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ProtocolError::new("the message is not UTF-8"))?;
        let kind = text.lines().nth(1).unwrap_or_default();
        if let Some(word) = kind.strip_prefix("refused ") {
            let reason = Refusal::ALL
                .into_iter()
                .find(|r| r.as_str() == word)
                .ok_or_else(|| ProtocolError::new(format!("unknown refusal {word:?}")))?;
            let mut lines = body(bytes, kind)?;
            let message = lines
                .next()
                .and_then(|l| l.strip_prefix("message "))
                .ok_or_else(|| ProtocolError::new("a refusal without a message"))?
                .to_string();
            return Ok(Reply::Refused { reason, message });
        }
        let mut lines = body(bytes, "granted")?;
        let backend = match lines.next() {
            Some("backend iommufd") => Backend::Iommufd,
            Some("backend legacy") => Backend::LegacyType1,
            other => {
                return Err(ProtocolError::new(format!(
                    "expected a backend line, got {other:?}"
                )))
            }
        };
        let mut fds = Vec::new();
        for line in lines {
            let role = match line.strip_prefix("fd ") {
                Some("iommufd") => FdRole::Iommufd,
                Some("container") => FdRole::Container,
                Some("kvm") => FdRole::Kvm,
                Some(r) => match r.split_once(' ') {
                    Some(("group", id)) => FdRole::Group(
                        id.parse()
                            .map_err(|_| ProtocolError::new(format!("bad group {id:?}")))?,
                    ),
                    Some(("device", bdf)) => FdRole::Device(
                        bdf.parse()
                            .map_err(|e| ProtocolError::new(format!("{e}")))?,
                    ),
                    _ => return Err(ProtocolError::new(format!("unknown fd role {r:?}"))),
                },
                None => return Err(ProtocolError::new(format!("unexpected line {line:?}"))),
            };
            fds.push(role);
        }
        Ok(Reply::Granted { backend, fds })
    }
}

/// Checks the header and kind lines; yields the rest.
fn body<'a>(
    bytes: &'a [u8],
    kind: &str,
) -> Result<impl Iterator<Item = &'a str> + 'a, ProtocolError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(ProtocolError::new(format!(
            "a message of {} bytes (at most {MAX_MESSAGE})",
            bytes.len()
        )));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|_| ProtocolError::new("the message is not UTF-8"))?;
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    match first.split_once(' ') {
        Some((MAGIC, v)) if v == PROTOCOL_VERSION.to_string() => {}
        Some((MAGIC, v)) => {
            return Err(ProtocolError::new(format!(
                "protocol version {v}, this side speaks {PROTOCOL_VERSION}: use the same \
                 vfio-gmem version for the helper and the VMM"
            )))
        }
        _ => {
            return Err(ProtocolError::new(format!(
                "not a vfio-gmem handoff message (first line {first:?})"
            )))
        }
    }
    match lines.next() {
        Some(k) if k == kind => Ok(lines),
        other => Err(ProtocolError::new(format!(
            "expected {kind:?}, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }

    #[test]
    fn requests_round_trip() {
        let r = Request {
            devices: vec![bdf("00:03.0"), bdf("0000:00:04.0")],
            kvm: true,
        };
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        let text = String::from_utf8(r.encode()).unwrap();
        assert_eq!(
            text,
            "vfio-gmem-handoff 1\nrequest\ndevice 0000:00:03.0\ndevice 0000:00:04.0\nkvm\n"
        );
    }

    #[test]
    fn replies_round_trip() {
        let g = Reply::Granted {
            backend: Backend::LegacyType1,
            fds: vec![
                FdRole::Container,
                FdRole::Group(7),
                FdRole::Device(bdf("00:03.0")),
                FdRole::Kvm,
            ],
        };
        assert_eq!(Reply::decode(&g.encode()).unwrap(), g);
        let r = Reply::Refused {
            reason: Refusal::NotGranted,
            message: "no\nreally".into(),
        };
        assert_eq!(
            Reply::decode(&r.encode()).unwrap(),
            Reply::Refused {
                reason: Refusal::NotGranted,
                message: "no really".into()
            }
        );
    }

    #[test]
    fn bad_messages_are_refused_with_reasons() {
        let cases: &[(&str, &str)] = &[
            (
                "vfio-gmem-handoff 2\nrequest\ndevice 00:03.0\n",
                "version 2",
            ),
            ("hello\n", "not a vfio-gmem handoff message"),
            ("vfio-gmem-handoff 1\nrequest\n", "at least one device"),
            (
                "vfio-gmem-handoff 1\nrequest\ndevice 00:03.0\ndevice 00:03.0\n",
                "asked twice",
            ),
            (
                "vfio-gmem-handoff 1\nrequest\ndevice 00:99.0\n",
                "PCI address",
            ),
            (
                "vfio-gmem-handoff 1\nrequest\ndevice 00:03.0\nrm -rf\n",
                "unexpected line",
            ),
            (
                "vfio-gmem-handoff 1\ngranted\ndevice 00:03.0\n",
                "expected \"request\"",
            ),
        ];
        for (msg, want) in cases {
            let e = Request::decode(msg.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{msg:?}: {e}");
        }
        let e = Request::decode(&vec![b'x'; MAX_MESSAGE + 1]).unwrap_err();
        assert!(e.to_string().contains("at most"));
        let e = Reply::decode(b"vfio-gmem-handoff 1\ngranted\nbackend iommufd\nfd disk\n");
        assert!(e.unwrap_err().to_string().contains("unknown fd role"));
    }
}
