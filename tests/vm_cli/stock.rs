//! `vfio-gmem` on a kernel without iommufd and without a private-memory VM type
//! (Debian's own; `scripts/vm-test --stock`): what `probe` reports, checked line by line
//! against the system, and `selftest`'s skipped KVM step.

use libtest_mimic::Failed;
use serde_json::Value;

use super::{bind, edus, err, expect, json, out, refused};
use crate::check;
use crate::support::needs::Need;
use crate::support::OrFail;

/// Debian's kernel (no iommufd): every line of `probe` is checked against the system,
/// read here apart from the tool.
pub fn probe_without_iommufd_is_legacy() -> Result<(), Failed> {
    let e = edus()?;
    bind(&[&e[0]])?;
    let v = json(&expect(&["probe", "--json"], None, 0)?)?;
    let kind = |k: &str| v[k]["evidence"]["kind"].as_str().unwrap_or("").to_string();
    check!(
        v["iommufd"]["value"] == false && kind("iommufd") == "observed",
        "{}",
        v["iommufd"]
    );
    // vfio-pci registered vfio-dev/vfioN, without a device number or a /dev node.
    let nodes: Vec<_> = std::fs::read_dir("/sys/class/vfio-dev")
        .or_fail("/sys/class/vfio-dev")?
        .flatten()
        .map(|d| d.path())
        .collect();
    check!(!nodes.is_empty(), "no VFIO device registered after bind");
    check!(
        nodes.iter().all(|n| !n.join("dev").exists())
            && !std::path::Path::new("/dev/vfio/devices").exists(),
        "this kernel has VFIO cdevs: {nodes:?}"
    );
    check!(
        v["vfio_cdev"]["value"] == false && kind("vfio_cdev") == "observed",
        "{}",
        v["vfio_cdev"]
    );
    check!(
        v["legacy_type1"]["value"] == true && std::path::Path::new("/dev/vfio/vfio").exists(),
        "{}",
        v["legacy_type1"]
    );
    let iommus = std::fs::read_dir("/sys/class/iommu")
        .map(|d| d.count())
        .unwrap_or(0);
    check!(
        v["iommu_present"]["value"] == (iommus > 0) && iommus > 0,
        "{} with {iommus} IOMMUs in sysfs",
        v["iommu_present"]
    );
    for k in [
        "map_file_memfd",
        "map_file_hugetlb",
        "map_file_guest_memfd",
        "cut_unmap",
    ] {
        check!(
            v[k]["value"].is_null() && kind(k) == "unavailable",
            "{k}: {}",
            v[k]
        );
    }
    check!(v["kvm"]["value"] == true, "{}", v["kvm"]);
    let has_sw = Need::PrivateMemory.unmet().is_none();
    check!(
        v["kvm_private_memory"]["value"] == has_sw,
        "{}",
        v["kvm_private_memory"]
    );
    let created: Vec<&str> = v["vm_types"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|t| t["created"]["value"] == true)
                .filter_map(|t| t["vm_type"].as_str())
                .collect()
        })
        .unwrap_or_default();
    check!(created.contains(&"DEFAULT"), "{created:?}");
    check!(created.contains(&"SW_PROTECTED") == has_sw, "{created:?}");
    check!(
        v["verdict"]["backend"] == "legacy-type1",
        "{}",
        v["verdict"]
    );
    let summary = v["verdict"]["summary"].as_str().unwrap_or("");
    check!(
        summary.starts_with("legacy-type1: guest_memfd: VA")
            && summary.ends_with("conversions: per-granule areas (legacy type1 cannot cut)"),
        "{summary}"
    );
    let text = out(&expect(&["probe"], None, 0)?);
    check!(
        text.contains("VFIO cdev                 no      observed")
            && text.contains("KVM private memory"),
        "{text}"
    );
    Ok(())
}

/// Debian's kernel (no SW_PROTECTED VM): both layouts run through type1, the confidential
/// one without KVM, and its KVM half is reported skipped with the reason; exit 0.
pub fn selftest_without_private_memory_skips_kvm_attributes() -> Result<(), Failed> {
    let e = edus()?;
    bind(&[&e[0], &e[1]])?;
    let v = json(&expect(&["selftest", "--json", &e[0], &e[1]], None, 0)?)?;
    let steps = v["steps"].as_array().ok_or("no steps")?;
    // Two layouts x (setup + 2 devices x 5 steps) + the skipped KVM step.
    check!(steps.len() == 23, "{} steps: {v}", steps.len());
    check!(
        v["ok"] == true && v["passed"] == 22 && v["failed"] == 0 && v["skipped"] == 1,
        "{v}"
    );
    let skipped: Vec<&Value> = steps.iter().filter(|s| s["result"] == "skip").collect();
    check!(skipped.len() == 1, "{v}");
    let s = skipped[0];
    check!(
        s["memory"] == "confidential"
            && s["step"] == "KVM attributes"
            && s["pass"] == false
            && s["detail"]
                .as_str()
                .is_some_and(|d| d.contains("CONFIG_KVM_SW_PROTECTED_VM")
                    && d.contains("conversions exercised on the IOMMU only")),
        "{s}"
    );
    for s in steps.iter().filter(|s| s["result"] != "skip") {
        check!(
            s["pass"] == true && s["result"] == "pass",
            "step failed: {s}"
        );
    }
    check!(
        steps.iter().any(|s| s["memory"] == "confidential"
            && s["step"] == "private: DMA refused"
            && s["result"] == "pass"),
        "the confidential layout's conversions ran: {v}"
    );
    let gmem = steps
        .iter()
        .find(|s| s["memory"] == "gmem" && s["step"] == "setup")
        .ok_or("no gmem setup")?;
    check!(
        gmem["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("legacy type1 container")
                && d.contains("guest_memfd (MMAP|INIT_SHARED)")
                && d.contains("path VA")),
        "{gmem}"
    );
    let setup = steps
        .iter()
        .find(|s| s["memory"] == "confidential" && s["step"] == "setup")
        .ok_or("no confidential setup")?;
    check!(
        setup["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("legacy type1 container") && d.contains("IOMMU only")),
        "{setup}"
    );
    // The table says the same, and the last line names the skip.
    let text = out(&expect(&["selftest", &e[0]], None, 0)?);
    let last = text.lines().last().unwrap_or("");
    check!(
        last.starts_with("PASS: 12 of 12 steps passed; 1 skipped: confidential KVM attributes"),
        "{text}"
    );
    Ok(())
}

/// `--iommu iommufd` where there is none: exit 1, says what to use instead, changes
/// nothing; `auto` picks the legacy container.
pub fn assign_iommufd_refused_without_iommufd() -> Result<(), Failed> {
    let e = edus()?;
    bind(&[&e[0]])?;
    let o = refused(
        &["assign", &e[0], "--memory", "2M", "--iommu", "iommufd"],
        1,
    )?;
    let text = err(&o);
    check!(
        text.contains("/dev/iommu does not exist") && text.contains("use --iommu legacy"),
        "{text}"
    );
    let o = expect(&["assign", &e[0], "--memory", "2M", "--json"], Some(""), 0)?;
    let ready: Value =
        serde_json::from_str(out(&o).lines().next().unwrap_or("")).or_fail("ready line")?;
    check!(ready["backend"] == "legacy", "{ready}");
    Ok(())
}
