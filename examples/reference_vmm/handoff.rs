//! `--handoff SOCKET`: the VMM as an unprivileged process. Everything privileged
//! (`/dev/kvm`, `/dev/iommu`, the device's VFIO cdev, or the legacy container and group)
//! arrives as fds from `vfio-gmem helper`; this process opens no device node itself.

use std::sync::Arc;

use kvm_ioctls::Kvm;
use vfio_gmem::dma::{DmaSpace, SpaceOptions};
use vfio_gmem::handoff::{check_memlock, Handoff, Pinned, Request};
use vfio_gmem::mapper::Backend;
use vfio_gmem::vfio::{Bdf, Device, Group};

use crate::exits::Story;
use crate::vm;

/// The grant, kept for as long as the VM runs (its connection is the device's lease).
pub struct Grant {
    pub handoff: Handoff,
    pub groups: Vec<Group>,
}

/// Asks the helper for `bdf` and `/dev/kvm`.
pub fn receive(socket: &str, bdf: Bdf, story: &Story) -> Result<(Grant, Kvm), String> {
    let mut handoff = Handoff::request(
        socket,
        &Request {
            devices: vec![bdf],
            kvm: true,
        },
    )
    .map_err(|e| e.to_string())?;
    let kvm = handoff.take_kvm().map_err(|e| e.to_string())?;
    let (uid, gid) = ids();
    story.line(
        "setup",
        format!(
            "running as uid {uid} gid {gid}; received from the helper (pid {}, uid {}): {}",
            handoff.helper().pid,
            handoff.helper().uid,
            handoff
                .roles()
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    Ok((
        Grant {
            handoff,
            groups: Vec::new(),
        },
        kvm,
    ))
}

/// The DMA space on the received fds, the device attached (iommufd) or its group in
/// the helper's container (legacy).
pub fn space(grant: &mut Grant, vm: &vm::Vm, bdf: Bdf) -> Result<(DmaSpace, Device), String> {
    let h = &mut grant.handoff;
    match h.backend() {
        Backend::Iommufd => {
            let iommufd = Arc::new(h.take_iommufd().map_err(|e| e.to_string())?);
            let mut space = DmaSpace::iommufd(&iommufd, Some(vm.kvm_vm()), SpaceOptions::default())
                .map_err(|e| format!("creating the DMA space on the received iommufd: {e}"))?;
            let dev = h.take_device(bdf).map_err(|e| e.to_string())?;
            space
                .attach(&dev)
                .map_err(|e| format!("attaching the received {bdf}: {e}"))?;
            Ok((space, dev))
        }
        Backend::LegacyType1 => {
            let container = h.take_container().map_err(|e| e.to_string())?;
            for id in h.groups() {
                grant
                    .groups
                    .push(grant.handoff.take_group(id).map_err(|e| e.to_string())?);
            }
            let dev = grant.handoff.take_device(bdf).map_err(|e| e.to_string())?;
            let space = DmaSpace::with_mapper(
                Box::new(container),
                Some(vm.kvm_vm()),
                SpaceOptions::default(),
            );
            Ok((space, dev))
        }
    }
}

/// The locked-memory check before anything is pinned; the error says which limit to
/// raise and by how much, and that nothing is pinned.
pub fn check_memlock_for(space: &DmaSpace, bytes: u64) -> Result<(), String> {
    check_memlock(bytes, space.backend()).map_err(|e| format!("{e} ({})", pinned_text()))
}

/// `pinned now: VmPin N KiB, VmLck N KiB` of this process.
pub fn pinned_text() -> String {
    let p = Pinned::current();
    format!(
        "pinned now: VmPin {} KiB, VmLck {} KiB",
        p.pinned >> 10,
        p.locked >> 10
    )
}

/// Effective uid and gid, from /proc (no libc call needed).
fn ids() -> (String, String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    (field("Uid:"), field("Gid:"))
}
