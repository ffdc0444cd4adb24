//! `vfio-gmem selftest BDF...`: assigns devices with a known DMA engine onto guest_memfd-
//! backed memory and proves each step with the devices' own DMA:
//!
//! 1. mapped: RAM → device → RAM round trip;
//! 2. converted to private: the device's write is refused and memory is unchanged;
//! 3. the neighbouring pages still work;
//! 4. converted back to shared: the round trip works again;
//! 5. region unmapped: the device's write is refused.
//!
//! Two memory layouts: `gmem` (a default VM's guest_memfd created MMAP|INIT_SHARED,
//! conversions on the IOMMU side only) and `confidential` (SW_PROTECTED VM, private pages
//! in guest_memfd, shared pages in a memfd, KVM attributes following each conversion).
//! On a kernel without a VM type with private memory (Debian's: no
//! CONFIG_KVM_SW_PROTECTED_VM) the confidential layout runs without KVM, its setup says
//! so, and a `KVM attributes` step is reported *skipped* with the reason: what the kernel
//! can do is proven, what it cannot is named, and the exit code stays 0.

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use vfio_gmem::dma::{PageState, PAGE_SIZE};
use vfio_gmem::gmem::MappedMemory;
use vfio_gmem::vfio::{Bdf, Device, PciDevice, PciSysfs};

use crate::errors::require_root;
use crate::setup::{Layout, Session};
use crate::table::Table;
use crate::{BackingArg, SelftestArgs};
use vfio_gmem::engine::{self as engines, DmaEngine};

const GPA: u64 = 0x1_0000_0000;
/// Pages of guest memory per test; each device uses its own 8-page slice.
const PAGES_PER_DEVICE: u64 = 8;

/// A step's result. A skip is not a pass: it names what could not be checked here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub memory: &'static str,
    pub device: String,
    pub step: &'static str,
    /// `result == pass` (false for failed and skipped steps).
    pub pass: bool,
    pub result: Outcome,
    pub detail: String,
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE as usize)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ 0x5a)
        .collect()
}

/// RAM → device → RAM through `iova`, with RAM cleared in between.
fn dma_works(
    e: &dyn DmaEngine,
    view: &mut MappedMemory,
    off: usize,
    iova: u64,
    seed: u8,
) -> Result<String, String> {
    let p = pattern(seed);
    view.write(off, &p).map_err(|e| e.to_string())?;
    e.dma_from_ram(iova, PAGE_SIZE)
        .map_err(|e| format!("RAM→device: {e}"))?;
    view.fill(off, PAGE_SIZE as usize, 0)
        .map_err(|e| e.to_string())?;
    e.dma_to_ram(iova, PAGE_SIZE)
        .map_err(|e| format!("device→RAM: {e}"))?;
    let back = view
        .read_vec(off, PAGE_SIZE as usize)
        .map_err(|e| e.to_string())?;
    if back != p {
        return Err(format!(
            "round trip through IOVA {iova:#x} did not bring the pattern back"
        ));
    }
    Ok(format!("round trip through IOVA {iova:#x}"))
}

/// The device (whose buffer holds an earlier, varied pattern) writes to `iova`; the page
/// must keep the fill byte.
fn dma_refused(
    e: &dyn DmaEngine,
    view: &mut MappedMemory,
    off: usize,
    iova: u64,
) -> Result<String, String> {
    view.fill(off, PAGE_SIZE as usize, 0xa5)
        .map_err(|e| e.to_string())?;
    e.dma_to_ram(iova, PAGE_SIZE)
        .map_err(|e| format!("device→RAM: {e}"))?;
    let after = view
        .read_vec(off, PAGE_SIZE as usize)
        .map_err(|e| e.to_string())?;
    if after.iter().any(|&b| b != 0xa5) {
        return Err(format!(
            "the device wrote IOVA {iova:#x}, which must not be mapped"
        ));
    }
    Ok(format!("write to IOVA {iova:#x} refused, memory unchanged"))
}

fn layouts(pages: u64) -> [(&'static str, Layout); 2] {
    let base = Layout {
        size: pages * PAGE_SIZE,
        gpa: GPA,
        backing: BackingArg::Gmem,
        huge_page: None,
        confidential: false,
        convertible: Some(PageState::Shared),
    };
    [
        ("gmem", base.clone()),
        (
            "confidential",
            Layout {
                confidential: true,
                ..base
            },
        ),
    ]
}

/// A DMA engine on each attached device (the library's driver table, checked in [`run`]).
fn open_engines(
    devices: &[(PciDevice, Device)],
) -> anyhow::Result<Vec<(Bdf, engines::BoxedEngine<'_>)>> {
    let mut out = Vec::new();
    for (pci, dev) in devices {
        let driver = engines::driver_for(pci).expect("checked before");
        let engine = driver.open_borrowed(dev)?;
        anyhow::ensure!(
            engine.max_transfer() >= PAGE_SIZE,
            "{}: the {} engine moves at most {} bytes, the steps need a page",
            pci.bdf,
            engine.name(),
            engine.max_transfer()
        );
        out.push((pci.bdf, engine));
    }
    Ok(out)
}

fn run_layout(
    memory: &'static str,
    layout: &Layout,
    devices: &[Bdf],
    iommu: crate::IommuArg,
    steps: &mut Vec<Step>,
) {
    let mut record = |device: String, step: &'static str, r: Result<String, String>| {
        let (result, detail) = match r {
            Ok(d) => (Outcome::Pass, d),
            Err(d) => (Outcome::Fail, d),
        };
        steps.push(Step {
            memory,
            device,
            step,
            pass: result == Outcome::Pass,
            result,
            detail,
        });
    };
    let all = devices
        .iter()
        .map(Bdf::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let setup = || -> anyhow::Result<_> {
        let session = Session::open(devices, iommu, layout)?;
        let view = session
            .shared
            .mmap()
            .context("mapping the shared backing")?;
        Ok((session, view))
    };
    let (mut session, mut view) = match setup() {
        Ok(x) => x,
        Err(e) => {
            record(all, "setup", Err(crate::errors::describe(&e)));
            return;
        }
    };
    let engines = match open_engines(&session.devices) {
        Ok(x) => x,
        Err(e) => {
            record(all, "setup", Err(crate::errors::describe(&e)));
            return;
        }
    };
    record(
        all.clone(),
        "setup",
        Ok(format!(
            "{}, {} of {}{}, {}",
            session.backend,
            crate::table::human_bytes(layout.size),
            session.memory.shared_backing,
            match (&session.memory.vm_type, &session.memory.private_backing) {
                (Some(t), Some(p)) => format!(" + {p}, {t} VM"),
                (None, _) if layout.confidential => " (no VM: IOMMU only)".to_string(),
                _ => String::new(),
            },
            session
                .space
                .regions()
                .first()
                .map(|r| format!("{} strategy, path {}", r.strategy, r.path))
                .unwrap_or_default()
        )),
    );
    // What this layout cannot check here; reported after its other steps.
    let skip = (layout.confidential && !session.memory.kvm_private_memory)
        .then(|| session.memory.note.clone().unwrap_or_default());
    let page = |p: u64| (p * PAGE_SIZE) as usize;
    let iova = |p: u64| GPA + p * PAGE_SIZE;
    for (i, (bdf, engine)) in engines.iter().enumerate() {
        let e = engine.as_ref();
        let name = bdf.to_string();
        let p0 = 1 + i as u64 * PAGES_PER_DEVICE;
        let (p1, p2) = (p0 + 1, p0 + 2);
        let seed = (i as u8).wrapping_mul(16);
        record(
            name.clone(),
            "mapped: DMA round trip",
            dma_works(e, &mut view, page(p0), iova(p0), seed + 1)
                .map(|d| format!("{}: {d}", e.name())),
        );
        let r = session
            .space
            .convert(iova(p1), PAGE_SIZE, PageState::Private, false)
            .map_err(|e| format!("conversion failed: {e}"))
            .and_then(|_| dma_refused(e, &mut view, page(p1), iova(p1)));
        record(name.clone(), "private: DMA refused", r);
        let r = dma_works(e, &mut view, page(p0), iova(p0), seed + 2).and_then(|a| {
            Ok(format!(
                "{a}; {}",
                dma_works(e, &mut view, page(p2), iova(p2), seed + 3)?
            ))
        });
        record(name.clone(), "neighbours still work", r);
        let r = session
            .space
            .convert(iova(p1), PAGE_SIZE, PageState::Shared, false)
            .map_err(|e| format!("conversion failed: {e}"))
            .and_then(|_| dma_works(e, &mut view, page(p1), iova(p1), seed + 4));
        record(name.clone(), "shared again: DMA works", r);
    }
    let removed = match session.region.take() {
        Some(id) => session
            .space
            .remove_region(id)
            .map(drop)
            .map_err(|e| format!("unmapping the region failed: {e}")),
        None => Err("no region".into()),
    };
    for (i, (bdf, engine)) in engines.iter().enumerate() {
        let p0 = 1 + i as u64 * PAGES_PER_DEVICE;
        let r = removed
            .clone()
            .and_then(|_| dma_refused(engine.as_ref(), &mut view, page(p0), iova(p0)));
        record(bdf.to_string(), "unmapped: DMA refused", r);
    }
    drop(engines);
    drop(view);
    if let Err(e) = session.teardown() {
        record(all.clone(), "teardown", Err(crate::errors::describe(&e)));
    }
    if let Some(why) = skip {
        steps.push(Step {
            memory,
            device: all,
            step: "KVM attributes",
            pass: false,
            result: Outcome::Skip,
            detail: format!("not checked: {why}"),
        });
    }
}

pub fn render(steps: &[Step]) -> String {
    let mut t = Table::new(["MEMORY", "DEVICE", "STEP", "RESULT", "DETAIL"]);
    for s in steps {
        t.row([
            s.memory.to_string(),
            s.device.clone(),
            s.step.to_string(),
            match s.result {
                Outcome::Pass => "pass",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "skip",
            }
            .to_string(),
            s.detail.clone(),
        ]);
    }
    t.render()
}

/// The last line: `PASS: 12 of 12 steps passed`, plus the skipped steps and why.
pub fn summary(steps: &[Step]) -> String {
    let count = |o: Outcome| steps.iter().filter(|s| s.result == o).count();
    let (passed, failed) = (count(Outcome::Pass), count(Outcome::Fail));
    let mut line = format!(
        "{}: {passed} of {} steps passed",
        if failed == 0 { "PASS" } else { "FAIL" },
        passed + failed
    );
    let skipped: Vec<String> = steps
        .iter()
        .filter(|s| s.result == Outcome::Skip)
        .map(|s| format!("{} {} ({})", s.memory, s.step, s.detail))
        .collect();
    if !skipped.is_empty() {
        line.push_str(&format!(
            "; {} skipped: {}",
            skipped.len(),
            skipped.join("; ")
        ));
    }
    line
}

pub fn run(args: &SelftestArgs, json: bool) -> anyhow::Result<()> {
    require_root(
        "selftest",
        "it opens VFIO devices, /dev/iommu and /dev/kvm and drives device DMA",
    )?;
    let sysfs = PciSysfs::new();
    for &bdf in &args.devices {
        let d = sysfs.device(bdf)?;
        if engines::driver_for(&d).is_none() {
            anyhow::bail!(
                "{bdf} ({:04x}:{:04x}) has no DMA engine vfio-gmem can drive, so its mappings \
                 cannot be proven; selftest knows: {}",
                d.vendor,
                d.device,
                engines::known()
            );
        }
    }
    let pages = 1 + args.devices.len() as u64 * PAGES_PER_DEVICE;
    let mut steps = Vec::new();
    for (memory, layout) in layouts(pages) {
        run_layout(memory, &layout, &args.devices, args.iommu, &mut steps);
    }
    let count = |o: Outcome| steps.iter().filter(|s| s.result == o).count();
    let (passed, failed, skipped) = (
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::Skip),
    );
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"ok": failed == 0, "passed": passed,
                "failed": failed, "skipped": skipped, "steps": steps}))?
        );
    } else {
        print!("{}", render(&steps));
        println!("{}", summary(&steps));
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} self-test steps failed (see the table); dmesg shows the IOMMU's view",
            passed + failed
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: &'static str, result: Outcome) -> Step {
        Step {
            memory: "confidential",
            device: "0000:00:09.0".into(),
            step,
            pass: result == Outcome::Pass,
            result,
            detail: "why".into(),
        }
    }

    #[test]
    fn skips_are_named_and_never_counted_as_passes() {
        let mut steps = vec![
            step("setup", Outcome::Pass),
            step("KVM attributes", Outcome::Skip),
        ];
        assert_eq!(
            summary(&steps),
            "PASS: 1 of 1 steps passed; 1 skipped: confidential KVM attributes (why)"
        );
        steps.push(step("mapped: DMA round trip", Outcome::Fail));
        assert!(summary(&steps).starts_with("FAIL: 1 of 2 steps passed; 1 skipped"));
        let j = serde_json::to_value(&steps[1]).unwrap();
        assert_eq!(
            (j["result"].as_str(), j["pass"].as_bool()),
            (Some("skip"), Some(false))
        );
        assert!(render(&steps).contains("  skip  "));
    }
}
