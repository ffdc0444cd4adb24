//! What the helper grants to whom: pure decisions, no I/O.

use std::collections::HashMap;
use std::fmt;

use super::protocol::{Refusal, Request};
use crate::vfio::Bdf;

/// A connected process as the kernel identified it (`SO_PEERCRED`: the credentials at
/// `connect`, not what the process claims).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id (supplementary groups are not reported by the kernel).
    pub gid: u32,
}

impl fmt::Display for PeerCred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} (uid {}, gid {})", self.pid, self.uid, self.gid)
    }
}

/// Whom the helper serves and what it may hand out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Peers with one of these uids are allowed.
    pub uids: Vec<u32>,
    /// Peers whose (primary, effective) gid is one of these are allowed.
    pub gids: Vec<u32>,
    /// The devices that may be handed out (each to one peer at a time).
    pub devices: Vec<Bdf>,
    /// Whether a `/dev/kvm` fd may be handed out.
    pub kvm: bool,
}

impl Policy {
    /// Checks the peer, then the request: every device granted, kvm only if allowed.
    pub fn check(&self, peer: &PeerCred, req: &Request) -> Result<(), (Refusal, String)> {
        if !self.uids.contains(&peer.uid) && !self.gids.contains(&peer.gid) {
            return Err((
                Refusal::NotAllowed,
                format!(
                    "{peer} is not allowed: this helper serves {}; start it with --allow-uid \
                     {} (or --allow-gid {}) to allow this process",
                    self.allowed(),
                    peer.uid,
                    peer.gid
                ),
            ));
        }
        let refused: Vec<String> = req
            .devices
            .iter()
            .filter(|d| !self.devices.contains(d))
            .map(|d| d.to_string())
            .collect();
        if !refused.is_empty() {
            return Err((
                Refusal::NotGranted,
                format!(
                    "{} not among the devices this helper grants ({}); start it with \
                     --device for each device the VMM may use",
                    refused.join(", "),
                    list(&self.devices)
                ),
            ));
        }
        if req.kvm && !self.kvm {
            return Err((
                Refusal::NotGranted,
                "/dev/kvm is not granted by this helper (start it with --kvm, or give the \
                 VMM's user access to /dev/kvm)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn allowed(&self) -> String {
        let mut parts: Vec<String> = self.uids.iter().map(|u| format!("uid {u}")).collect();
        parts.extend(self.gids.iter().map(|g| format!("gid {g}")));
        if parts.is_empty() {
            "nobody".into()
        } else {
            parts.join(", ")
        }
    }
}

fn list(devices: &[Bdf]) -> String {
    if devices.is_empty() {
        return "none".into();
    }
    devices
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which connected peer holds which device. A VMM keeps its connection open while it
/// uses the fds; the kernel closes it when the VMM exits, however it exits.
#[derive(Debug, Default)]
pub struct Leases {
    held: HashMap<Bdf, (u64, PeerCred)>,
    next: u64,
}

/// A lease's handle, returned by [`Leases::take`], given back to [`Leases::release`].
#[derive(Debug, PartialEq, Eq)]
pub struct LeaseId(u64);

impl Leases {
    /// Leases every device of `devices` to `peer`, or none of them.
    pub fn take(&mut self, peer: PeerCred, devices: &[Bdf]) -> Result<LeaseId, (Refusal, String)> {
        let busy: Vec<String> = devices
            .iter()
            .filter_map(|d| self.held.get(d).map(|(_, p)| format!("{d} is held by {p}")))
            .collect();
        if !busy.is_empty() {
            return Err((
                Refusal::InUse,
                format!(
                    "{}; a device goes to one VMM at a time: it is free again when that VMM \
                     exits or closes its connection",
                    busy.join(", ")
                ),
            ));
        }
        self.next += 1;
        for d in devices {
            self.held.insert(*d, (self.next, peer));
        }
        Ok(LeaseId(self.next))
    }

    /// Frees the devices of a lease.
    pub fn release(&mut self, id: LeaseId) -> Vec<Bdf> {
        let mut freed: Vec<Bdf> = self
            .held
            .iter()
            .filter(|(_, (l, _))| *l == id.0)
            .map(|(d, _)| *d)
            .collect();
        freed.sort();
        for d in &freed {
            self.held.remove(d);
        }
        freed
    }

    /// The devices currently held.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bdf(s: &str) -> Bdf {
        s.parse().unwrap()
    }
    const VMM: PeerCred = PeerCred {
        pid: 10,
        uid: 4242,
        gid: 4242,
    };

    fn policy() -> Policy {
        Policy {
            uids: vec![4242],
            gids: vec![100],
            devices: vec![bdf("00:03.0")],
            kvm: true,
        }
    }

    fn req(devs: &[&str]) -> Request {
        Request {
            devices: devs.iter().map(|d| bdf(d)).collect(),
            kvm: false,
        }
    }

    #[test]
    fn peers_by_uid_or_gid() {
        let p = policy();
        assert!(p.check(&VMM, &req(&["00:03.0"])).is_ok());
        let by_gid = PeerCred {
            uid: 1,
            gid: 100,
            ..VMM
        };
        assert!(p.check(&by_gid, &req(&["00:03.0"])).is_ok());
        let other = PeerCred {
            uid: 4343,
            gid: 4343,
            ..VMM
        };
        let (r, m) = p.check(&other, &req(&["00:03.0"])).unwrap_err();
        assert_eq!(r, Refusal::NotAllowed);
        assert!(
            m.contains("uid 4343") && m.contains("--allow-uid 4343"),
            "{m}"
        );
        assert_eq!(
            Policy::default()
                .check(&VMM, &req(&["00:03.0"]))
                .unwrap_err()
                .0,
            Refusal::NotAllowed
        );
    }

    #[test]
    fn only_granted_devices_and_kvm() {
        let mut p = policy();
        let (r, m) = p.check(&VMM, &req(&["00:03.0", "00:04.0"])).unwrap_err();
        assert_eq!(r, Refusal::NotGranted);
        assert!(
            m.starts_with("0000:00:04.0 not among") && m.contains("0000:00:03.0"),
            "{m}"
        );
        p.kvm = false;
        let mut k = req(&["00:03.0"]);
        k.kvm = true;
        assert_eq!(p.check(&VMM, &k).unwrap_err().0, Refusal::NotGranted);
    }

    #[test]
    fn leases_are_all_or_nothing_and_freed() {
        let mut l = Leases::default();
        let a = l.take(VMM, &[bdf("00:03.0")]).unwrap();
        let other = PeerCred { pid: 11, ..VMM };
        let (r, m) = l
            .take(other, &[bdf("00:04.0"), bdf("00:03.0")])
            .unwrap_err();
        assert_eq!(r, Refusal::InUse);
        assert!(m.contains("0000:00:03.0 is held by pid 10"), "{m}");
        assert_eq!(l.held(), 1, "a refused lease takes nothing");
        assert_eq!(l.release(a), vec![bdf("00:03.0")]);
        assert_eq!(l.held(), 0);
        assert!(l.take(other, &[bdf("00:03.0")]).is_ok());
    }
}
