//! Answers read from the system without a mapping experiment: whether VFIO devices get a
//! character device (the cdev path), and whether any KVM VM type here has private memory.
//! Each is a pure decision over what was observed, so the wording on kernels the tests
//! do not boot is checked too.

use std::path::Path;

use super::{Answer, VmTypeCaps};

/// One VFIO device as `/sys/class/vfio-dev` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VfioDevNode {
    /// `vfio0`, ...
    pub name: String,
    /// It has a `dev` attribute: a character device (`/dev/vfio/devices/vfioN`) exists.
    pub has_cdev: bool,
}

/// Reads `/sys/class/vfio-dev`. The class is registered by the vfio module whether or not
/// the kernel has `CONFIG_VFIO_DEVICE_CDEV`; only with it do its devices carry a device
/// number. So the directory existing proves nothing; its entries' `dev` files do.
pub(crate) fn vfio_dev_nodes(class: &Path) -> Vec<VfioDevNode> {
    let Ok(dir) = std::fs::read_dir(class) else {
        return Vec::new();
    };
    let mut nodes: Vec<VfioDevNode> = dir
        .flatten()
        .map(|e| VfioDevNode {
            name: e.file_name().to_string_lossy().into_owned(),
            has_cdev: e.path().join("dev").exists(),
        })
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes
}

/// The "VFIO cdev" answer from the registered VFIO devices and whether `/dev/iommu` exists.
pub(crate) fn vfio_cdev_answer(nodes: &[VfioDevNode], dev_iommu: bool) -> Answer<bool> {
    if let Some(n) = nodes.iter().find(|n| n.has_cdev) {
        return Answer::observed(true).with_detail(format!(
            "{} has a character device (/dev/vfio/devices/{})",
            n.name, n.name
        ));
    }
    if let Some(n) = nodes.first() {
        return Answer::observed(false).with_detail(format!(
            "{} is registered without a character device: the kernel lacks \
             CONFIG_VFIO_DEVICE_CDEV; devices are reached through their group (/dev/vfio/N)",
            n.name
        ));
    }
    if !dev_iommu {
        return Answer::inferred(
            false,
            "no VFIO device is registered to look at; a cdev needs iommufd \
             (CONFIG_VFIO_DEVICE_CDEV depends on CONFIG_IOMMUFD) and there is no /dev/iommu",
        );
    }
    Answer::unavailable(
        "no device is bound to a VFIO driver, so no cdev can be seen; bind one with \
         `vfio-gmem bind BDF`",
    )
}

/// The "KVM private memory" answer: does any VM type here have the PRIVATE memory
/// attribute (`KVM_CAP_MEMORY_ATTRIBUTES` on a VM of that type)?
pub(crate) fn private_memory_answer(kvm: &Answer<bool>, types: &[VmTypeCaps]) -> Answer<bool> {
    if !kvm.is_true() {
        return Answer::unavailable("no KVM (/dev/kvm does not open)");
    }
    let private: Vec<&str> = types
        .iter()
        .filter(|t| {
            t.created.is_true()
                && t.memory_attributes
                    .value
                    .as_deref()
                    .is_some_and(|a| a.split('|').any(|w| w == "PRIVATE"))
        })
        .map(|t| t.vm_type.as_str())
        .collect();
    if !private.is_empty() {
        return Answer::observed(true).with_detail(format!(
            "{} VM: the PRIVATE memory attribute",
            private.join(", ")
        ));
    }
    let listed: Vec<&str> = types.iter().map(|t| t.vm_type.as_str()).collect();
    Answer::observed(false).with_detail(format!(
        "KVM creates {} only, without the PRIVATE memory attribute; SW_PROTECTED needs \
         CONFIG_KVM_SW_PROTECTED_VM, SEV-SNP and TDX need the hardware; conversions can \
         still be exercised on the IOMMU",
        if listed.is_empty() {
            "no VM".to_string()
        } else {
            listed.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::Evidence;

    fn node(name: &str, has_cdev: bool) -> VfioDevNode {
        VfioDevNode {
            name: name.into(),
            has_cdev,
        }
    }

    #[test]
    fn cdev_needs_a_device_number_not_just_the_class() {
        // Debian's kernel: vfio-pci bound, the class holds vfio0 without `dev`.
        let a = vfio_cdev_answer(&[node("vfio0", false)], false);
        assert_eq!(a.value, Some(false));
        assert_eq!(a.evidence, Evidence::Observed);
        assert!(a
            .detail
            .as_deref()
            .unwrap()
            .contains("CONFIG_VFIO_DEVICE_CDEV"));
        let a = vfio_cdev_answer(&[node("vfio0", false), node("vfio1", true)], true);
        assert_eq!(a.value, Some(true));
        assert!(a
            .detail
            .as_deref()
            .unwrap()
            .contains("/dev/vfio/devices/vfio1"));
        // Nothing registered: inferred without iommufd, unknown with it.
        let a = vfio_cdev_answer(&[], false);
        assert_eq!((a.value, a.evidence.label()), (Some(false), "inferred"));
        let a = vfio_cdev_answer(&[], true);
        assert_eq!((a.value, a.evidence.label()), (None, "unavailable"));
    }

    #[test]
    fn sysfs_nodes_are_read_from_the_dev_attribute() {
        let dir = std::env::temp_dir().join(format!("vfio-gmem-class-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("vfio1")).unwrap();
        std::fs::create_dir_all(dir.join("vfio0")).unwrap();
        std::fs::write(dir.join("vfio1/dev"), "511:1\n").unwrap();
        let nodes = vfio_dev_nodes(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(nodes, vec![node("vfio0", false), node("vfio1", true)]);
        assert!(vfio_dev_nodes(Path::new("/nonexistent/vfio-dev")).is_empty());
    }

    fn vm(t: &str, attrs: &str) -> VmTypeCaps {
        VmTypeCaps {
            vm_type: t.into(),
            created: Answer::observed(true),
            guest_memfd: Answer::observed(true),
            gmem_flags: Answer::observed("MMAP".into()),
            memory_attributes: Answer::observed(attrs.into()),
        }
    }

    #[test]
    fn private_memory_from_the_vm_types() {
        let kvm = Answer::observed(true);
        let a = private_memory_answer(&kvm, &[vm("DEFAULT", "none")]);
        assert_eq!(a.value, Some(false));
        let d = a.detail.unwrap();
        assert!(
            d.contains("creates DEFAULT only") && d.contains("on the IOMMU"),
            "{d}"
        );
        let a = private_memory_answer(
            &kvm,
            &[vm("DEFAULT", "none"), vm("SW_PROTECTED", "PRIVATE")],
        );
        assert_eq!(a.value, Some(true));
        assert_eq!(
            a.detail.unwrap(),
            "SW_PROTECTED VM: the PRIVATE memory attribute"
        );
        // Listed but not creatable does not count.
        let mut broken = vm("SW_PROTECTED", "PRIVATE");
        broken.created = Answer::observed(false);
        assert_eq!(private_memory_answer(&kvm, &[broken]).value, Some(false));
        let a = private_memory_answer(&Answer::observed(false), &[]);
        assert_eq!(a.value, None);
    }
}
