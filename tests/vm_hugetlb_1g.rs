//! 1 GiB huge pages as a shared backing, on the real kernel, in a VM booted with one 1 GiB
//! page reserved (`scripts/vm-test` boots this target with `--memory 4G --append
//! hugepagesz=1G --append hugepages=1`): a convertible region on a `MFD_HUGE_1GB` memfd
//! with the edu device attached, conversions of 4 KiB and 2 MiB ranges inside the one
//! 1 GiB page proven with edu DMA (converted pages refused, neighbours and a far page that
//! stays shared reachable), a discard inside the page (zeroes, frees nothing), the CLI's
//! `assign --backing hugetlb --huge-page-size 1G`, and, last (it empties the pool), the
//! errors without a free 1 GiB page.
//!
//! Without the reserved page the tests fail; they never skip. On the patched kernel under
//! intel-iommu the native split keeps large IOPTEs: the leaf sizes of VT-d's page table
//! (debugfs) are checked before and after a 4 KiB conversion inside the page.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use libtest_mimic::Failed;
use serde_json::Value;
use support::space::{
    confidential_on, dma_refused, dma_works, dup, first_edu, round_trip, space_with_edu,
    Confidential, GPA,
};
use support::{patched_kernel, run_vm_tests, vm_iommu, vtd, OrFail};
use vfio_gmem::dma::{
    CutSupport, GuestRegion, MapPath, PageState, SharedMemory, SpaceError, SpaceOptions, Strategy,
};
use vfio_gmem::gmem::{backing_page_size, GmemError, HugePageSize, Memfd};

const BIN: &str = env!("CARGO_BIN_EXE_vfio-gmem");
const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-1048576kB";

fn main() {
    run_vm_tests(&[
        (
            "one_gib_page_reserved_at_boot",
            one_gib_page_reserved_at_boot,
        ),
        ("conversions_inside_a_1g_page", conversions_inside_a_1g_page),
        ("cli_assign_on_1g_pages", cli_assign_on_1g_pages),
        // Last: it gives the boot-reserved page back, and run-time allocation of a
        // 1 GiB page is not guaranteed to get it again.
        (
            "without_free_1g_pages_the_error_says_what_to_do",
            without_free_1g_pages_the_error_says_what_to_do,
        ),
    ]);
}

fn pool(file: &str) -> Result<u64, Failed> {
    let path = format!("{POOL}/{file}");
    std::fs::read_to_string(&path)
        .or_fail(&path)?
        .trim()
        .parse()
        .or_fail(&path)
}

/// The VM this target needs: 1 GiB pages reserved on the kernel command line, one free.
fn one_gib_page_reserved_at_boot() -> Result<(), Failed> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").or_fail("cmdline")?;
    check!(
        cmdline.contains("hugepagesz=1G") && cmdline.contains("hugepages=1"),
        "the VM was not booted with 1 GiB pages reserved (scripts/vm-test's vm_options for \
         this target): {cmdline}"
    );
    let (total, free) = (pool("nr_hugepages")?, pool("free_hugepages")?);
    eprintln!("  1 GiB pool: {total} reserved, {free} free");
    check!(
        total >= 1 && free >= 1,
        "no free 1 GiB page ({total} reserved, {free} free)"
    );
    Ok(())
}

/// A confidential region of one 1 GiB page (`MFD_HUGE_1GB` shared backing, all shared)
/// with the edu device.
fn one_gib_region() -> Result<Confidential, Failed> {
    let shared = Memfd::hugetlb_sized("vm-hugetlb-1g", GIB, HugePageSize::Size1G)
        .or_fail("1 GiB hugetlb memfd")?;
    check!(
        shared.page_size() == GIB && backing_page_size(shared.file()).or_fail("page size")? == GIB,
        "the memfd's page size, read from the file, is {:#x}, not 1 GiB",
        shared.page_size()
    );
    confidential_on(SpaceOptions::default(), shared)
}

/// The edu device's BDF (bound by `first_edu`).
fn edu_bdf() -> Result<String, Failed> {
    support::pci::edu_devices()
        .into_iter()
        .next()
        .ok_or_else(|| "no edu device".into())
}

/// Round trips through the pages just outside `[off, off+len)` (inside the region).
fn neighbours_work(r: &mut Confidential, off: u64, len: u64, seed: u8) -> Result<(), Failed> {
    for n in [off.checked_sub(PAGE), Some(off + len).filter(|&e| e < GIB)]
        .into_iter()
        .flatten()
    {
        dma_works(&r.edu, &mut r.view, n as usize, GPA + n, seed)?;
    }
    Ok(())
}

fn conversions_inside_a_1g_page() -> Result<(), Failed> {
    let free0 = pool("free_hugepages")?;
    let mut r = one_gib_region()?;
    // The page is taken (the mapping reserved it; the first DMA below faults it in).
    check!(
        pool("free_hugepages")? == free0 - 1,
        "the region's 1 GiB page did not come from the 1 GiB pool"
    );
    let cut = r.space.cut_support().clone();
    let region = &r.space.regions()[0];
    eprintln!(
        "  {} iommu, patched={}: {cut:?}; path {}",
        vm_iommu().unwrap_or_default(),
        patched_kernel(),
        region.path
    );
    check!(
        region.path == MapPath::FileOffset && region.strategy == Strategy::Cut,
        "a 1 GiB hugetlb region must map by fd+offset and convert by cutting: {:?} {:?}",
        region.path,
        region.strategy
    );
    // A page far from every converted range: it stays shared and reachable throughout.
    let far = 900 * MIB + 5 * PAGE;
    dma_works(&r.edu, &mut r.view, far as usize, GPA + far, 1)?;

    // VT-d with the native split and huge pages on: how the 1 GiB page is mapped.
    let vtd_leaves = vm_iommu().as_deref() == Some("intel")
        && patched_kernel()
        && matches!(
            cut,
            CutSupport::NativeSplit {
                huge_pages: true,
                ..
            }
        );
    let bdf = edu_bdf()?;
    if vtd_leaves {
        let sllps = vtd::super_pages()?;
        let before = vtd::leaves(&bdf)?;
        eprintln!("  VT-d CAP.SLLPS {sllps:#b}; leaf IOPTEs [4K, 2M, 1G] before: {before:?}");
        let expect = if sllps & 2 != 0 {
            [0, 0, 1]
        } else {
            [0, GIB / HUGE, 0]
        };
        check!(
            before == expect,
            "the 1 GiB page should be {expect:?} leaf IOPTEs with SLLPS {sllps:#b}: {before:?}"
        );
    }

    // 4 KiB inside a 2 MiB block, an aligned 2 MiB, 2 MiB across a 2 MiB boundary, the
    // first and the last page, 8 KiB across a 2 MiB boundary.
    let steps = [
        (300 * MIB + 3 * PAGE, PAGE),
        (512 * MIB, HUGE),
        (700 * MIB - MIB, HUGE),
        (0, PAGE),
        (GIB - PAGE, PAGE),
        (768 * MIB - PAGE, 2 * PAGE),
    ];
    for (i, &(off, len)) in steps.iter().enumerate() {
        let seed = 10 * i as u8;
        neighbours_work(&mut r, off, len, seed)?;
        r.space
            .convert(GPA + off, len, PageState::Private, false)
            .or_fail(&format!("step {i}: [{off:#x}, +{len:#x}) to private"))?;
        if i == 0 && vtd_leaves {
            let after = vtd::leaves(&bdf)?;
            eprintln!("  leaf IOPTEs after a 4 KiB conversion inside the page: {after:?}");
            check!(
                after[2] == 0 && after[1] == GIB / HUGE - 1 && after[0] == 511,
                "the split should keep the rest of the page in 2 MiB IOPTEs (511 of them) \
                 and 511 4 KiB ones: {after:?}"
            );
        }
        dma_refused(&r.edu, &mut r.view, off as usize, GPA + off)?;
        let last = off + len - PAGE;
        dma_refused(&r.edu, &mut r.view, last as usize, GPA + last)?;
        neighbours_work(&mut r, off, len, seed + 1)?;
        dma_works(&r.edu, &mut r.view, far as usize, GPA + far, seed + 2)?;
        for &(o, _) in &steps[..i] {
            check!(
                round_trip(&r.edu, &mut r.view, o as usize, GPA + o, seed + 3)?,
                "step {i}: page {o:#x} of an earlier step is unreachable"
            );
        }
        r.space
            .convert(GPA + off, len, PageState::Shared, false)
            .or_fail(&format!("step {i}: to shared"))?;
        dma_works(&r.edu, &mut r.view, off as usize, GPA + off, seed + 4)?;
        dma_works(&r.edu, &mut r.view, last as usize, GPA + last, seed + 5)?;
        neighbours_work(&mut r, off, len, seed + 6)?;
    }

    // Discard inside the page: hugetlbfs cannot free part of a huge page, so the range
    // reads back zeros, its neighbours keep their data and the pool gets nothing back.
    let off = 100 * MIB + 7 * PAGE;
    r.view
        .fill(off as usize - PAGE as usize, 3 * PAGE as usize, 0x5a)
        .or_fail("fill")?;
    let free = pool("free_hugepages")?;
    r.space
        .convert(GPA + off, PAGE, PageState::Private, true)
        .or_fail("to private with discard")?;
    let zeros = r
        .view
        .read_vec(off as usize, PAGE as usize)
        .or_fail("read")?;
    check!(
        zeros.iter().all(|&b| b == 0),
        "the discarded 4 KiB inside the 1 GiB page does not read back as zeros"
    );
    for n in [off - PAGE, off + PAGE] {
        let v = r.view.read_vec(n as usize, PAGE as usize).or_fail("read")?;
        check!(
            v.iter().all(|&b| b == 0x5a),
            "the discard changed the neighbouring page {n:#x}"
        );
    }
    check!(
        pool("free_hugepages")? == free,
        "a discard inside a 1 GiB page cannot free it, yet the pool changed"
    );
    dma_refused(&r.edu, &mut r.view, off as usize, GPA + off)?;
    r.space
        .convert(GPA + off, PAGE, PageState::Shared, false)
        .or_fail("back to shared")?;
    dma_works(&r.edu, &mut r.view, off as usize, GPA + off, 0x77)?;
    check!(
        r.space.regions()[0].private_bytes == 0,
        "pages left private: {}",
        r.space.regions()[0].private_bytes
    );
    drop(r);
    check!(
        pool("free_hugepages")? == free0,
        "the 1 GiB page did not go back to the pool after the region and memfd were dropped"
    );
    Ok(())
}

fn json_line(line: &str) -> Result<Value, Failed> {
    serde_json::from_str(line).or_fail(&format!("not a JSON line: {line}"))
}

fn cli_assign_on_1g_pages() -> Result<(), Failed> {
    let bdf = first_edu()?;
    // Usage errors first: nothing is created, exit 2.
    for (args, says) in [
        (
            vec!["--memory", "512M", "--backing", "hugetlb", "--huge-page-size", "1G"],
            "--memory 0x20000000: hugetlb backing with 1 GiB pages needs a multiple of 1 GiB (e.g. --memory 1G)",
        ),
        (
            vec!["--memory", "1G", "--backing", "memfd", "--huge-page-size", "1G"],
            "--huge-page-size 1G applies to --backing hugetlb only",
        ),
    ] {
        let o = Command::new(BIN)
            .args(["assign", &bdf])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .or_fail("run vfio-gmem")?;
        let err = String::from_utf8_lossy(&o.stderr);
        check!(
            o.status.code() == Some(2) && err.contains(says),
            "assign {args:?}: exit {:?}, stderr: {err}",
            o.status.code()
        );
    }
    let free0 = pool("free_hugepages")?;
    let mut child = Command::new(BIN)
        .args(["assign", &bdf, "--memory", "1G", "--backing", "hugetlb"])
        .args(["--huge-page-size", "1G", "--confidential", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .or_fail("spawn vfio-gmem assign")?;
    let stdout = child.stdout.take().ok_or("stdout")?;
    let stdin = child.stdin.take().ok_or("stdin")?;
    let result = session(BufReader::new(stdout), stdin, free0);
    // On a failed check the session is still running: end it before the next test.
    let _ = child.kill();
    let exit = child.wait().or_fail("wait")?;
    let answers = result?;
    check!(exit.success(), "assign ended with {exit:?}: {answers:?}");
    check!(
        pool("free_hugepages")? == free0,
        "the 1 GiB page did not go back to the pool after the session"
    );
    Ok(())
}

/// Drives the `assign` session: checks its ready event and answers; returns the answers.
fn session(
    mut reader: BufReader<std::process::ChildStdout>,
    mut stdin: std::process::ChildStdin,
    free0: u64,
) -> Result<Vec<Value>, Failed> {
    let mut first = String::new();
    reader.read_line(&mut first).or_fail("ready event")?;
    let ready = json_line(&first)?;
    eprintln!("  ready: {}", ready["memory"]);
    check!(
        ready["ok"] == true
            && ready["memory"]["page_size"] == GIB
            && ready["memory"]["shared_backing"] == "hugetlb memfd (1 GiB pages)"
            && ready["regions"][0]["path"] == "file-offset",
        "ready event: {ready}"
    );
    check!(
        pool("free_hugepages")? == free0 - 1,
        "the session's memory did not take the 1 GiB page"
    );
    let a = GPA + 300 * MIB + 3 * PAGE;
    let b = GPA + 512 * MIB;
    let script = format!(
        "shared {GPA:#x} 1G\nprivate {a:#x} 4K\nprivate {b:#x} 2M\nstatus\n\
         shared {a:#x} 4K\nshared {b:#x} 2M\nstatus\n"
    );
    stdin
        .write_all(script.as_bytes())
        .or_fail("write commands")?;
    drop(stdin);
    let answers: Vec<Value> = reader
        .lines()
        .map(|l| json_line(&l.or_fail("read")?))
        .collect::<Result<_, _>>()?;
    check!(
        answers.len() == 8 && answers.iter().all(|a| a["ok"] == true),
        "answers: {answers:?}"
    );
    check!(
        answers[3]["private_bytes"] == PAGE + HUGE
            && answers[3]["shared_bytes"] == GIB - PAGE - HUGE,
        "status after the conversions: {}",
        answers[3]
    );
    check!(
        answers[6]["private_bytes"] == 0 && answers[6]["shared_bytes"] == GIB,
        "status after converting back: {}",
        answers[6]
    );
    check!(answers[7]["event"] == "exit", "last line: {}", answers[7]);
    Ok(answers)
}

fn without_free_1g_pages_the_error_says_what_to_do() -> Result<(), Failed> {
    let old = pool("nr_hugepages")?;
    std::fs::write(format!("{POOL}/nr_hugepages"), "0").or_fail("empty the 1 GiB pool")?;
    check!(
        pool("nr_hugepages")? == 0 && pool("free_hugepages")? == 0,
        "the 1 GiB pool did not empty"
    );
    let result = (|| {
        // Creating and sizing the file takes no page; mapping or allocating it does.
        let mem = Memfd::hugetlb_sized("vm-hugetlb-1g-none", GIB, HugePageSize::Size1G)
            .or_fail("1 GiB hugetlb memfd")?;
        let e = mem.mmap().unwrap_err();
        eprintln!("  mmap: {e}");
        check!(
            matches!(e, GmemError::NoHugePages { page_size, pages: 1, .. } if page_size == GIB),
            "{e:?}"
        );
        let m = e.to_string();
        check!(
            m.starts_with(
                "no free 1 GiB huge pages for mmap of memfd 'vm-hugetlb-1g-none' (1 needed)"
            ) && m.contains(&format!(
                "echo N > {POOL}/nr_hugepages` (N = the pages others use + 1; now 0)"
            )) && m.contains("hugepagesz=1G hugepages=1"),
            "{m}"
        );
        let e = mem.allocate(0, GIB).unwrap_err();
        eprintln!("  allocate: {e}");
        check!(
            matches!(e, GmemError::NoHugePages { page_size, .. } if page_size == GIB),
            "{e:?}"
        );
        check!(
            mem.file().metadata().or_fail("stat")?.len() == GIB && pool("nr_hugepages")? == 0,
            "the refusals changed the file or the pool"
        );

        // The space: the region is refused and nothing is left mapped.
        let (mut space, _edu) = space_with_edu(None, SpaceOptions::default())?;
        let e = space
            .add_region(
                GuestRegion::new(
                    GPA,
                    GIB,
                    SharedMemory::File {
                        fd: dup(mem.file())?,
                        offset: 0,
                    },
                )
                .convertible(PageState::Shared),
            )
            .unwrap_err();
        eprintln!("  add_region: {e}");
        check!(
            matches!(
                &e,
                SpaceError::Gmem(GmemError::NoHugePages { page_size, pages: 1, .. })
                    if *page_size == GIB
            ) && e.to_string().contains(&format!("{POOL}/nr_hugepages")),
            "add_region without a free 1 GiB page: {e:?}"
        );
        check!(
            space.regions().is_empty() && space.area_count() == 0,
            "the refused region left state behind"
        );

        // The CLI: exit 1, the library's message, the pool untouched.
        let bdf = first_edu()?;
        let before = support::pci::bindings();
        let o = Command::new(BIN)
            .args(["assign", &bdf, "--memory", "1G", "--backing", "hugetlb"])
            .args(["--huge-page-size", "1G"])
            .stdin(Stdio::null())
            .output()
            .or_fail("run vfio-gmem")?;
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!("  cli: {}", err.trim());
        check!(
            o.status.code() == Some(1)
                && err.contains("no free 1 GiB huge pages")
                && err.contains(&format!("{POOL}/nr_hugepages"))
                && err.contains("hugepagesz=1G"),
            "assign without 1 GiB pages: exit {:?}: {err}",
            o.status.code()
        );
        check!(
            support::pci::bindings() == before && pool("nr_hugepages")? == 0,
            "the refused assign changed the system"
        );
        Ok(())
    })();
    // Give the page back if the kernel can (run-time 1 GiB allocation may fail).
    let _ = std::fs::write(format!("{POOL}/nr_hugepages"), old.to_string());
    result
}
