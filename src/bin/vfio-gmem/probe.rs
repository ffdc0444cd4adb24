//! `vfio-gmem probe [--device BDF]`: the library's capability report, as a table with an
//! evidence column or as JSON, ending with the verdict.

use anyhow::Context;
use vfio_gmem::probe::{Answer, Capabilities};
use vfio_gmem::vfio::{Bdf, Device, PciSysfs};

use crate::table::Table;

/// Picks the device to verify with: the one asked for, else the first vfio-pci device
/// whose cdev opens. Returns it and a sentence saying which and why.
fn choose_device(asked: Option<Bdf>) -> anyhow::Result<(Option<Device>, String)> {
    let sysfs = PciSysfs::new();
    if !std::path::Path::new("/dev/iommu").exists() {
        let note =
            "no /dev/iommu: MAP_FILE and area cutting do not apply (legacy type1 maps by address)";
        return Ok((None, note.to_string()));
    }
    if let Some(bdf) = asked {
        let dev = Device::open_pci_in(&sysfs, bdf)
            .with_context(|| format!("cannot verify with {bdf}"))?;
        return Ok((Some(dev), format!("verified with {bdf} attached")));
    }
    let devices = sysfs.devices().context("listing PCI devices")?;
    for d in devices
        .iter()
        .filter(|d| d.is_vfio_bound() && d.vfio_cdev.is_some())
    {
        match Device::open_pci_in(&sysfs, d.bdf) {
            Ok(dev) => {
                return Ok((
                    Some(dev),
                    format!(
                        "verified with {} attached (the first vfio-pci device)",
                        d.bdf
                    ),
                ))
            }
            Err(e) => log::warn!("{}: {e}", d.bdf),
        }
    }
    Ok((
        None,
        "no usable vfio-pci device: mapping answers are inferred; bind one with \
         `vfio-gmem bind BDF` (or pass --device) to verify them"
            .to_string(),
    ))
}

fn detail(a: &Answer<impl Sized>) -> String {
    match (a.evidence.reason(), a.detail.as_deref()) {
        (Some(r), Some(d)) => format!("{d}; {r}"),
        (Some(r), None) => r.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => String::new(),
    }
}

fn string_answer(a: &Answer<String>) -> String {
    a.value.clone().unwrap_or_else(|| "?".into())
}

/// The human-readable report.
pub fn render(caps: &Capabilities, note: &str) -> String {
    let mut out = format!("kernel {}; {note}\n\n", caps.kernel);
    let mut t = Table::new(["CAPABILITY", "ANSWER", "EVIDENCE", "DETAIL"]);
    for (name, a) in caps.answers() {
        t.row([
            name.to_string(),
            a.to_string(),
            a.evidence.label().to_string(),
            detail(a),
        ]);
    }
    out.push_str(&t.render());
    if !caps.vm_types.is_empty() {
        out.push('\n');
        let mut t = Table::new([
            "KVM VM TYPE",
            "CREATED",
            "GUEST_MEMFD",
            "GMEM FLAGS",
            "MEMORY ATTRIBUTES",
        ]);
        for v in &caps.vm_types {
            t.row([
                v.vm_type.clone(),
                v.created.to_string(),
                v.guest_memfd.to_string(),
                string_answer(&v.gmem_flags),
                string_answer(&v.memory_attributes),
            ]);
        }
        out.push_str(&t.render());
    }
    out.push_str(&format!("\nverdict: {}\n", caps.verdict.summary));
    out
}

pub fn run(device: Option<Bdf>, json: bool) -> anyhow::Result<()> {
    let (dev, note) = choose_device(device)?;
    let caps = Capabilities::probe(dev.as_ref());
    if json {
        let mut v = serde_json::to_value(&caps)?;
        v["note"] = note.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&caps, &note));
    }
    Ok(())
}
