//! The reference VMM (examples/reference_vmm) in the test VM: a real guest converts its
//! memory by hypercall, touches a page KVM cannot back privately, and the edu device's
//! DMA shows the IOMMU followed every conversion. Asserts on the VMM's event lines.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use libtest_mimic::Failed;
use support::needs::{self, Need};
use support::{run_vm_tests, OrFail};

/// What the running kernel must offer (see `support::needs`); unmet: reported skipped.
const NEEDS: needs::Needs = &[("*", &[Need::Iommufd, Need::PrivateMemory])];

fn main() {
    needs::declare(NEEDS);
    run_vm_tests(&[
        (
            "guest_driven_conversions_story",
            guest_driven_conversions_story,
        ),
        (
            "a_backend_process_lets_go_before_each_conversion",
            a_backend_process_lets_go_before_each_conversion,
        ),
        (
            "not_an_edu_device_is_explained",
            not_an_edu_device_is_explained,
        ),
    ]);
}

/// The example binary next to this test binary (`target/<profile>/examples/`).
/// scripts/vm-test builds it on the host (`cargo build --examples`); the VM has no
/// usable toolchain environment, so a missing or stale binary is an error that says so.
fn reference_vmm() -> Result<PathBuf, Failed> {
    example("reference_vmm")
}

/// An example binary (`target/<profile>/examples/NAME`), checked fresh against its sources.
fn example(name: &str) -> Result<PathBuf, Failed> {
    let exe = std::env::current_exe().or_fail("current_exe")?;
    // target/<profile>/deps/vm_vmm-HASH
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("test binary is not in target/<profile>/deps")?;
    let bin = profile_dir.join("examples").join(name);
    let build = "build it on the host first: cargo build --examples (scripts/vm-test does)";
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{}: {e}; {build}", bin.display()))?;
    let sources = sources_mtime(&bin, name)?;
    check!(
        built >= sources,
        "{} is older than its sources; {build}",
        bin.display()
    );
    Ok(bin)
}

/// The newest modification time of the files the binary was built from: those cargo's
/// dep-info (`reference_vmm.d`) lists (a change elsewhere, in the CLI say, does not
/// rebuild the example), else everything the example could use.
fn sources_mtime(bin: &Path, name: &str) -> Result<SystemTime, Failed> {
    if let Ok(dep) = std::fs::read_to_string(bin.with_extension("d")) {
        let deps = dep.lines().next().and_then(|l| l.split_once(": "));
        if let Some((_, files)) = deps {
            let mut newest = SystemTime::UNIX_EPOCH;
            for f in files.split_whitespace() {
                newest = newest.max(newest_mtime(Path::new(f))?);
            }
            return Ok(newest);
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = root.join("examples").join(name);
    let example = if example.is_dir() {
        example
    } else {
        example.with_extension("rs")
    };
    Ok(newest_mtime(&example)?
        .max(newest_mtime(&root.join("src"))?)
        .max(newest_mtime(&root.join("Cargo.toml"))?))
}

/// The newest modification time of a file or of any file below a directory.
fn newest_mtime(path: &Path) -> Result<SystemTime, Failed> {
    let meta = std::fs::metadata(path).or_fail(&path.display().to_string())?;
    if !meta.is_dir() {
        return meta.modified().or_fail("mtime");
    }
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(path).or_fail(&path.display().to_string())? {
        newest = newest.max(newest_mtime(&entry.or_fail("read_dir")?.path())?);
    }
    Ok(newest)
}

fn run(args: &[&str]) -> Result<(Output, String), Failed> {
    let out = Command::new(reference_vmm()?)
        .args(args)
        .output()
        .or_fail("running reference_vmm")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok((out, stdout))
}

/// Checks that `lines` contains lines starting with each of `wanted`, in that order.
fn in_order(lines: &[&str], wanted: &[&str]) -> Result<(), Failed> {
    let mut at = 0;
    for w in wanted {
        match lines[at..].iter().position(|l| l.starts_with(w)) {
            Some(i) => at += i + 1,
            None => {
                return Err(
                    format!("no line starting with {w:?} after line {at} of the story").into(),
                )
            }
        }
    }
    Ok(())
}

fn guest_driven_conversions_story() -> Result<(), Failed> {
    let (out, stdout) = run(&[])?;
    let lines: Vec<&str> = stdout.lines().collect();
    check!(
        out.status.success(),
        "reference_vmm exited with {}",
        out.status
    );
    check!(
        !lines.iter().any(|l| l.contains("FAILED")),
        "a check failed"
    );
    in_order(
        &lines,
        &[
            "setup    DMA region GPA [0x0, 0x9000) at IOVA 0x100000000: strategy cut",
            // 1-2: the device copies the guest's shared buffer.
            "exit     io-out port=0x10 value=1 (doorbell)",
            "check    ok: B holds the guest's pattern from A",
            "check    ok: guest report 0x0, expected 0x0: B equals A",
            // 3: hypercall → private: the kernel saw the IOMMU unmap before the attribute
            // and the discard (the library's debug trace), then the guest resumes.
            "exit     hypercall nr=12 gpa=0x4000 pages=1 attrs=0x10 (KVM_HC_MAP_GPA_RANGE)",
            "convert  GPA [0x4000, +0x1000) to private",
            "kernel   IOMMU unmap (Cut) IOVA [0x100004000, +0x1000): 0x1000 bytes",
            "kernel   KVM attributes GPA [0x4000, +0x1000) private",
            "kernel   discard shared backing GPA [0x4000, +0x1000)",
            "iommu    unmaps=1 maps=0 bytes_unmapped=0x1000",
            "kvm      attribute_changes=1 discards=1",
            "check    ok: order: IOMMU unmap, then KVM attributes, then discard",
            "resume   hypercall ret=0",
            // 4: the device cannot write the private page; the guest's data survives.
            "exit     io-out port=0x10 value=2 (doorbell)",
            "check    ok: host view of A is zero",
            "dma      device → A (iova 0x100004000) while private: refused, memory unchanged",
            "check    ok: guest report 0x0, expected 0x0: A still holds the guest's private data",
            // 5-6: shared again: mapped after the attribute, and DMA works.
            "exit     hypercall nr=12 gpa=0x4000 pages=1 attrs=0x0 (KVM_HC_MAP_GPA_RANGE)",
            "convert  GPA [0x4000, +0x1000) to shared",
            "kernel   KVM attributes GPA [0x4000, +0x1000) shared",
            "kernel   IOMMU map IOVA [0x100004000, +0x1000)",
            "iommu    unmaps=0 maps=1 bytes_unmapped=0x0 bytes_mapped=0x1000",
            "check    ok: order: KVM attributes, then IOMMU map",
            "resume   hypercall ret=0",
            "dma      device → A (iova 0x100004000) while shared: written",
            "check    ok: guest report 0x0, expected 0x0: A holds the device's data",
            // 7: a private page without private backing: memory fault, back to shared.
            "exit     hypercall nr=12 gpa=0x8000 pages=1 attrs=0x10",
            "iommu    unmaps=1 maps=0",
            "exit     memory-fault gpa=0x8000 size=0x1000 flags=0x8 (private access)",
            "convert  GPA [0x8000, +0x1000) to shared",
            "kernel   KVM attributes GPA [0x8000, +0x1000) shared",
            "kernel   IOMMU map IOVA [0x100008000, +0x1000)",
            "check    ok: order: KVM attributes, then IOMMU map",
            "resume   the access is retried",
            "check    ok: guest report 0x0, expected 0x0: the window read completed",
            "exit     hlt",
            "check    ok: exits: 3 hypercalls, 1 memory faults, 3 doorbells, 7 reports",
            "done     IOMMU totals:",
        ],
    )?;
    // The refused write is also in the IOMMU's fault log under intel-iommu (DMAR lines);
    // virtio-iommu's fault events may be dropped, so there it is not required.
    if support::vm_iommu().as_deref() == Some("intel") {
        let refused = lines
            .iter()
            .find(|l| l.contains("while private: refused"))
            .ok_or("no refused-DMA line")?;
        check!(
            !refused.ends_with("+0 line(s)"),
            "no DMAR fault logged for the refused write: {refused}"
        );
    }
    Ok(())
}

/// The same guest with a backend process (examples/peer_backend) mapping guest memory
/// itself: it releases before the IOMMU unmap, is granted after the map, and after every
/// conversion its /proc/pid/maps holds exactly the shared pages; its own checks (released
/// pages unreadable before it answers, reachable iff granted after every request) pass.
fn a_backend_process_lets_go_before_each_conversion() -> Result<(), Failed> {
    let backend = example("peer_backend")?;
    let (out, stdout) = run(&["--peer", backend.to_str().ok_or("path")?])?;
    let lines: Vec<&str> = stdout.lines().collect();
    check!(
        out.status.success(),
        "reference_vmm exited with {}",
        out.status
    );
    check!(
        !lines.iter().any(|l| l.contains("FAILED")),
        "a check failed"
    );
    in_order(
        &lines,
        &[
            "setup    backend process",
            "check    ok: B holds the guest's pattern from A",
            "convert  GPA [0x4000, +0x1000) to private",
            "listener backend released GPA [0x4000, +0x1000)",
            "kernel   IOMMU unmap (Cut) IOVA [0x100004000, +0x1000)",
            "kernel   KVM attributes GPA [0x4000, +0x1000) private",
            "kernel   discard shared backing GPA [0x4000, +0x1000)",
            "check    ok: order: the backend released the pages before the IOMMU unmap",
            "check    ok: the backend maps exactly the shared pages (GPA [0x0, +0x4000) GPA [0x5000, +0x4000);",
            "dma      device → A (iova 0x100004000) while private: refused, memory unchanged",
            "convert  GPA [0x4000, +0x1000) to shared",
            "kernel   KVM attributes GPA [0x4000, +0x1000) shared",
            "kernel   IOMMU map IOVA [0x100004000, +0x1000)",
            "listener backend granted GPA [0x4000, +0x1000)",
            "check    ok: order: the backend was granted the pages after the IOMMU map",
            "check    ok: the backend maps exactly the shared pages (GPA [0x0, +0x9000);",
            "dma      device → A (iova 0x100004000) while shared: written",
            "convert  GPA [0x8000, +0x1000) to private",
            "listener backend released GPA [0x8000, +0x1000)",
            "check    ok: the backend maps exactly the shared pages (GPA [0x0, +0x8000);",
            "exit     memory-fault gpa=0x8000",
            "listener backend granted GPA [0x8000, +0x1000)",
            "exit     hlt",
            "backend  {\"requests\":",
            "check    ok: the backend exited with exit status: 0",
        ],
    )?;
    Ok(())
}

fn not_an_edu_device_is_explained() -> Result<(), Failed> {
    // 00:00.0 is q35's host bridge.
    let (out, _) = run(&["--device", "0000:00:00.0"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    check!(!out.status.success(), "a wrong device must fail");
    check!(
        stderr.contains("is not an edu device"),
        "unhelpful error: {stderr}"
    );
    Ok(())
}
