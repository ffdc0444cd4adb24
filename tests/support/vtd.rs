//! Intel VT-d views the tests read from the guest: leaf IOPTE sizes of a domain (debugfs)
//! and the IOMMU's large page sizes (sysfs).

use super::OrFail;
use libtest_mimic::Failed;

/// Leaf IOPTEs by size (4 KiB, 2 MiB, 1 GiB) of the domain attached to `bdf`, from VT-d's
/// debugfs page table dump: one line per leaf, its entries along the walk after `|`
/// (3 for a 1 GiB leaf of a 4-level table, 4 for 2 MiB, 5 for 4 KiB).
pub fn leaves(bdf: &str) -> Result<[u64; 3], Failed> {
    let path = format!("/sys/kernel/debug/iommu/intel/{bdf}/domain_translation_struct");
    let dump = std::fs::read_to_string(&path).or_fail(&path)?;
    let mut n = [0u64; 3];
    for line in dump.lines() {
        let Some((_, walk)) = line.split_once('|') else {
            continue;
        };
        match walk.split_whitespace().count() {
            3 => n[2] += 1,
            4 => n[1] += 1,
            5 => n[0] += 1,
            _ => {}
        }
    }
    Ok(n)
}

/// CAP.SLLPS of the first VT-d unit (bit0 = 2 MiB, bit1 = 1 GiB second-level pages), from
/// `/sys/class/iommu/dmar0/intel-iommu/cap`.
pub fn super_pages() -> Result<u8, Failed> {
    let path = "/sys/class/iommu/dmar0/intel-iommu/cap";
    let cap = std::fs::read_to_string(path).or_fail(path)?;
    let cap = u64::from_str_radix(cap.trim().trim_start_matches("0x"), 16).or_fail(path)?;
    Ok(((cap >> 34) & 0xf) as u8)
}
