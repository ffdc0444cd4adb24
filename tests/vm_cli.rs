//! The `vfio-gmem` binary in the test VM: probe against the real kernel, list, bind/unbind
//! round trips, selftest with the edu devices' DMA, assign driven by a scripted stdin and
//! by a signal, and the documented error cases with their exit codes.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::Value;
use support::needs::{self, Need};
use support::{pci, run_vm_tests, OrFail};

const BIN: &str = env!("CARGO_BIN_EXE_vfio-gmem");

/// What the running kernel must offer (see `support::needs`); unmet: reported skipped.
/// The `*_without_*` tests check what the tool does on Debian's own kernel.
const NEEDS: needs::Needs = &[
    (
        "probe_json_matches_the_kernel",
        &[Need::Iommufd, Need::PrivateMemory],
    ),
    ("selftest_passes", &[Need::Iommufd, Need::PrivateMemory]),
    (
        "assign_confidential_scripted",
        &[Need::Iommufd, Need::PrivateMemory],
    ),
    ("assign_gmem_human_output", &[Need::Iommufd]),
    ("probe_without_iommufd_is_legacy", &[Need::NoIommufd]),
    (
        "selftest_without_private_memory_skips_kvm_attributes",
        &[Need::NoPrivateMemory],
    ),
    ("assign_iommufd_refused_without_iommufd", &[Need::NoIommufd]),
];

// The tests of Debian's own kernel, in this target so the stock leg boots once for all.
#[path = "vm_cli/stock.rs"]
mod stock;
use stock::{
    assign_iommufd_refused_without_iommufd, probe_without_iommufd_is_legacy,
    selftest_without_private_memory_skips_kvm_attributes,
};

fn main() {
    needs::declare(NEEDS);
    run_vm_tests(&[
        (
            "probe_json_matches_the_kernel",
            probe_json_matches_the_kernel,
        ),
        (
            "list_shows_edu_devices_and_groups",
            list_shows_edu_devices_and_groups,
        ),
        ("bind_unbind_round_trip", bind_unbind_round_trip),
        ("selftest_passes", selftest_passes),
        ("assign_confidential_scripted", assign_confidential_scripted),
        ("assign_gmem_human_output", assign_gmem_human_output),
        ("assign_legacy_container", assign_legacy_container),
        ("assign_stops_on_sigterm", assign_stops_on_sigterm),
        ("documented_errors", documented_errors),
        (
            "probe_without_iommufd_is_legacy",
            probe_without_iommufd_is_legacy,
        ),
        (
            "selftest_without_private_memory_skips_kvm_attributes",
            selftest_without_private_memory_skips_kvm_attributes,
        ),
        (
            "assign_iommufd_refused_without_iommufd",
            assign_iommufd_refused_without_iommufd,
        ),
    ]);
}

fn cli(args: &[&str], stdin: Option<&str>) -> Result<Output, Failed> {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .or_fail("spawn vfio-gmem")?;
    if let Some(text) = stdin {
        let mut s = child.stdin.take().unwrap();
        s.write_all(text.as_bytes()).or_fail("write stdin")?;
    }
    child.wait_with_output().or_fail("wait for vfio-gmem")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and requires `code`. A failure's message names each cause once: no OS error
/// text (`(os error N)`) twice.
fn expect(args: &[&str], stdin: Option<&str>, code: i32) -> Result<Output, Failed> {
    let o = cli(args, stdin)?;
    check!(
        o.status.code() == Some(code),
        "vfio-gmem {args:?}: exit {:?}, expected {code}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        out(&o),
        err(&o)
    );
    let e = err(&o);
    for line in e.lines() {
        let mut seen: Vec<&str> = Vec::new();
        for (i, _) in line.match_indices("(os error ") {
            let errno = line[i..].split(')').next().unwrap_or("");
            check!(
                !seen.contains(&errno),
                "vfio-gmem {args:?}: a cause printed twice: {line}"
            );
            seen.push(errno);
        }
    }
    Ok(o)
}

fn json(o: &Output) -> Result<Value, Failed> {
    serde_json::from_slice(&o.stdout).or_fail("stdout is not one JSON document")
}

fn json_lines(o: &Output) -> Result<Vec<Value>, Failed> {
    out(o)
        .lines()
        .map(|l| serde_json::from_str(l).or_fail(&format!("not a JSON line: {l}")))
        .collect()
}

fn edus() -> Result<Vec<String>, Failed> {
    let e = pci::edu_devices();
    check!(
        e.len() >= 2,
        "the test VM should have 2 edu devices, found {e:?}"
    );
    Ok(e)
}

/// Binds through the CLI (idempotent).
fn bind(bdfs: &[&str]) -> Result<(), Failed> {
    let mut args = vec!["bind"];
    args.extend_from_slice(bdfs);
    expect(&args, None, 0).map(drop)
}

fn probe_json_matches_the_kernel() -> Result<(), Failed> {
    let e = edus()?;
    bind(&[&e[0]])?;
    let o = expect(&["probe", "--json", "--device", &e[0]], None, 0)?;
    let v = json(&o)?;
    let kind = |k: &str| v[k]["evidence"]["kind"].as_str().unwrap_or("").to_string();
    check!(v["iommufd"]["value"] == true, "iommufd: {}", v["iommufd"]);
    check!(
        v["vfio_cdev"]["value"] == true,
        "vfio cdev: {}",
        v["vfio_cdev"]
    );
    check!(
        v["iommu_present"]["value"] == true,
        "iommu: {}",
        v["iommu_present"]
    );
    check!(
        v["map_file_memfd"]["value"] == true && kind("map_file_memfd") == "verified-with-device",
        "MAP_FILE memfd must be verified true: {}",
        v["map_file_memfd"]
    );
    // Plain 7.3 refuses guest_memfd in MAP_FILE; the patched kernel accepts it.
    let gmem_ok = serde_json::Value::Bool(support::patched_kernel());
    check!(
        v["map_file_guest_memfd"]["value"] == gmem_ok
            && kind("map_file_guest_memfd") == "verified-with-device",
        "MAP_FILE guest_memfd must be verified {gmem_ok} on this kernel: {}",
        v["map_file_guest_memfd"]
    );
    check!(
        v["cut_unmap"]["value"] == true && kind("cut_unmap") == "verified-with-device",
        "cut-unmap: {}",
        v["cut_unmap"]
    );
    check!(v["device"] == e[0].as_str(), "device: {}", v["device"]);
    let summary = v["verdict"]["summary"].as_str().unwrap_or("");
    // The patched kernel maps guest_memfd by fd+offset and splits areas natively
    // (kernel/patches); the plain one falls back to VA and cuts through the compat IOAS.
    let (gmem_verdict, cut_verdict) = if support::patched_kernel() {
        (
            "guest_memfd: fd+offset",
            "native split verified (huge pages on)",
        )
    } else {
        ("guest_memfd: VA fallback", "cut-unmap verified")
    };
    check!(
        summary.contains(gmem_verdict)
            && summary.contains("memfd: fd+offset")
            && summary.contains(cut_verdict),
        "verdict: {summary}"
    );
    let types: Vec<&str> = v["vm_types"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["vm_type"].as_str()).collect())
        .unwrap_or_default();
    check!(types.contains(&"SW_PROTECTED"), "VM types: {types:?}");
    check!(
        v["kvm_private_memory"]["value"] == true && kind("kvm_private_memory") == "observed",
        "KVM private memory: {}",
        v["kvm_private_memory"]
    );
    check!(
        kind("vfio_cdev") == "observed",
        "with a device bound the cdev is seen: {}",
        v["vfio_cdev"]
    );
    // Without --device the first vfio-pci device is used, and the table says which.
    let o = expect(&["probe"], None, 0)?;
    let text = out(&o);
    check!(
        text.contains("(the first vfio-pci device)") && text.contains("verified (device)"),
        "{text}"
    );
    check!(
        text.lines()
            .last()
            .unwrap_or("")
            .starts_with("verdict: iommufd"),
        "{text}"
    );
    Ok(())
}

fn list_shows_edu_devices_and_groups() -> Result<(), Failed> {
    let e = edus()?;
    let v = json(&expect(&["list", "--json"], None, 0)?)?;
    let rows = v.as_array().ok_or("list --json is not an array")?;
    for bdf in &e {
        let r = rows
            .iter()
            .find(|r| r["bdf"] == bdf.as_str())
            .ok_or(format!("{bdf} missing from list"))?;
        check!(r["vendor"] == "1234" && r["device"] == "11e8", "{r}");
        let link = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/iommu_group"))
            .or_fail("iommu_group link")?;
        let group: u64 = link
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or("group number")?;
        check!(
            r["iommu_group"] == group,
            "{bdf}: group {} vs sysfs {group}",
            r["iommu_group"]
        );
        check!(r["group_members"].is_array(), "{r}");
        let bound = pci::driver(bdf).as_deref() == Some("vfio-pci");
        // A cdev only on a kernel with iommufd, and then one that exists.
        let cdev_expected = bound && Need::Iommufd.unmet().is_none();
        check!(
            r["vfio_cdev"].is_string() == cdev_expected,
            "{bdf}: cdev {} (expected: {cdev_expected})",
            r["vfio_cdev"]
        );
        if let Some(c) = r["vfio_cdev"].as_str() {
            check!(std::path::Path::new(c).exists(), "{c} does not exist");
        }
        check!(
            r["ready"] == bound,
            "{bdf}: ready {} but vfio-bound {bound}",
            r["ready"]
        );
        if !bound {
            let why = r["not_ready"].as_str().unwrap_or("");
            check!(why.contains(&format!("vfio-gmem bind {bdf}")), "{why}");
        }
    }
    let text = out(&expect(&["list"], None, 0)?);
    check!(
        text.starts_with("BDF") && text.contains("1234:11e8"),
        "{text}"
    );
    Ok(())
}

fn bind_unbind_round_trip() -> Result<(), Failed> {
    let e = edus()?;
    let bdf = e[1].as_str();
    if pci::driver(bdf).is_some() {
        expect(&["unbind", bdf], None, 0)?;
    }
    check!(
        pci::driver(bdf).is_none(),
        "edu has no host driver: starts unbound"
    );
    let rows = json(&expect(&["bind", "--json", bdf], None, 0)?)?;
    check!(
        pci::driver(bdf).as_deref() == Some("vfio-pci"),
        "bind did not bind"
    );
    let row = rows
        .as_array()
        .and_then(|a| a.iter().find(|r| r["bdf"] == bdf))
        .ok_or(format!("no row for {bdf}: {rows}"))?;
    check!(
        row["action"] == "moved" && row["before"].is_null() && row["now"] == "vfio-pci",
        "{row}"
    );
    // Binding again changes nothing.
    let text = out(&expect(&["bind", bdf], None, 0)?);
    check!(text.contains("already-vfio"), "{text}");
    let rows = json(&expect(&["unbind", "--json", bdf], None, 0)?)?;
    check!(
        pci::driver(bdf).is_none(),
        "unbind did not restore 'no driver'"
    );
    check!(
        rows.as_array().is_some_and(|a| a
            .iter()
            .any(|r| r["bdf"] == bdf && r["action"] == "restored")),
        "{rows}"
    );
    let text = out(&expect(&["unbind", bdf], None, 0)?);
    check!(text.contains("nothing-to-do"), "{text}");
    Ok(())
}

fn selftest_passes() -> Result<(), Failed> {
    let e = edus()?;
    bind(&[&e[0], &e[1]])?;
    let o = expect(&["selftest", "--json", &e[0], &e[1]], None, 0)?;
    let v = json(&o)?;
    let steps = v["steps"].as_array().ok_or("no steps")?;
    // Two layouts × (setup + 2 devices × 5 steps).
    check!(steps.len() == 22, "{} steps: {v}", steps.len());
    check!(v["ok"] == true, "{v}");
    for s in steps {
        check!(
            s["pass"] == true && s["result"] == "pass",
            "step failed: {s}"
        );
    }
    check!(v["passed"] == 22 && v["skipped"] == 0, "{v}");
    check!(
        steps
            .iter()
            .any(|s| s["memory"] == "confidential" && s["step"] == "private: DMA refused"),
        "{v}"
    );
    Ok(())
}

const GPA: u64 = 0x1_0000_0000;

fn assign_confidential_scripted() -> Result<(), Failed> {
    let e = edus()?;
    bind(&[&e[0]])?;
    let script = "\
shared 0x100000000 16K
private 0x100001000 4K
status
bogus 1 2
private 0x100000000
# a comment, then a blank line

status
map
shared 0x100001000 0x1000
quit
status
";
    let o = expect(
        &[
            "assign",
            &e[0],
            "--memory",
            "2M",
            "--confidential",
            "--json",
        ],
        Some(script),
        0,
    )?;
    let lines = json_lines(&o)?;
    // ready, shared, private, status, bogus, bad private, status, map, shared, quit, exit.
    check!(lines.len() == 11, "{} lines:\n{}", lines.len(), out(&o));
    let ready = &lines[0];
    check!(
        ready["event"] == "ready" && ready["backend"] == "iommufd",
        "{ready}"
    );
    check!(
        ready["memory"]["initial"] == "private",
        "starts private: {ready}"
    );
    check!(ready["cut"]["state"] == "verified", "{ready}");
    let r = &ready["regions"][0];
    check!(
        r["shared_bytes"] == 0 && r["strategy"] == "cut" && r["path"] == "file-offset",
        "{r}"
    );
    check!(
        lines[1]["ok"] == true && lines[1]["stats"]["maps"] == 1,
        "{}",
        lines[1]
    );
    check!(
        lines[2]["ok"] == true
            && lines[2]["stats"]["unmaps"] == 1
            && lines[2]["state"] == "private",
        "{}",
        lines[2]
    );
    let st = &lines[3];
    check!(
        st["shared_bytes"] == 12288
            && st["private_bytes"] == (2u64 << 20) - 12288
            && st["areas"] == 2,
        "status: {st}"
    );
    check!(
        lines[4]["ok"] == false
            && lines[4]["line"] == 4
            && lines[4]["error"]
                .as_str()
                .unwrap_or("")
                .contains("unknown command 'bogus'"),
        "{}",
        lines[4]
    );
    check!(
        lines[5]["ok"] == false && lines[5]["error"].as_str().unwrap_or("").contains("GPA LEN"),
        "{}",
        lines[5]
    );
    // The bad lines changed nothing: the same status (bytes, areas, ioctls) as before them.
    check!(
        lines[6] == lines[3],
        "status after the bad lines {} differs from before them {}",
        lines[6],
        lines[3]
    );
    check!(
        lines[7]["command"] == "map" && lines[7]["regions"][0]["gpa"] == GPA,
        "{}",
        lines[7]
    );
    check!(
        lines[8]["ok"] == true && lines[8]["state"] == "shared",
        "{}",
        lines[8]
    );
    check!(lines[9]["command"] == "quit", "{}", lines[9]);
    check!(
        lines[10]["event"] == "exit" && lines[10]["reason"] == "quit",
        "{}",
        lines[10]
    );
    Ok(())
}

fn assign_gmem_human_output() -> Result<(), Failed> {
    let e = edus()?;
    bind(&[&e[0]])?;
    let o = expect(
        &["assign", &e[0], "--memory", "4M"],
        Some("status\nprivate 0x100000000 4K\nmap\n"),
        0,
    )?;
    let text = out(&o);
    check!(
        text.contains("guest_memfd (MMAP|INIT_SHARED)") && text.contains("not convertible"),
        "{text}"
    );
    let path = if support::patched_kernel() {
        "fd+offset"
    } else {
        "VA (the kernel cannot pin this file"
    };
    check!(text.contains(path), "guest_memfd maps by {path}: {text}");
    check!(
        text.contains("status: shared 4 MiB, private 0 B, 1 areas live"),
        "{text}"
    );
    check!(
        text.contains("error: line 2: private 0x100000000 0x1000:"),
        "{text}"
    );
    check!(
        err(&o).contains("end of input: unmapped 4 MiB"),
        "{}",
        err(&o)
    );
    Ok(())
}

fn assign_legacy_container() -> Result<(), Failed> {
    let e = edus()?;
    bind(&[&e[0]])?;
    let o = expect(
        &[
            "assign",
            &e[0],
            "--memory",
            "1M",
            "--confidential",
            "--iommu",
            "legacy",
            "--json",
        ],
        Some("shared 0x100000000 8K\nprivate 0x100001000 4K\nstatus\n"),
        0,
    )?;
    let lines = json_lines(&o)?;
    check!(lines[0]["backend"] == "legacy", "{}", lines[0]);
    // With a SW_PROTECTED VM, KVM's attributes follow; without one (Debian's kernel), the
    // same conversions on the IOMMU only, and the ready event says so.
    let mem = &lines[0]["memory"];
    match Need::PrivateMemory.unmet() {
        None => check!(
            mem["kvm_private_memory"] == true
                && mem["vm_type"] == "SW_PROTECTED"
                && mem["note"].is_null(),
            "{mem}"
        ),
        Some(_) => check!(
            mem["kvm_private_memory"] == false
                && mem["vm_type"].is_null()
                && mem["note"].as_str().is_some_and(|n| n.starts_with(
                    "no KVM private memory on this kernel: conversions exercised on the IOMMU only"
                )),
            "{mem}"
        ),
    }
    check!(
        mem["convertible"] == true && mem["initial"] == "private",
        "{mem}"
    );
    check!(
        lines[0]["regions"][0]["strategy"] == "pergranule",
        "{}",
        lines[0]
    );
    check!(
        lines[1]["ok"] == true && lines[2]["ok"] == true,
        "{}",
        out(&o)
    );
    check!(lines[3]["shared_bytes"] == 4096, "{}", lines[3]);
    check!(
        lines.last().unwrap()["reason"] == "end of input",
        "{}",
        out(&o)
    );
    Ok(())
}

fn assign_stops_on_sigterm() -> Result<(), Failed> {
    let e = edus()?;
    bind(&[&e[0]])?;
    let mut child = Command::new(BIN)
        .args(["assign", &e[0], "--memory", "2M", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .or_fail("spawn")?;
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).or_fail("read ready line")?;
    check!(first.contains("\"ready\""), "first line: {first}");
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().or_fail("wait")? {
            break s;
        }
        check!(
            t0.elapsed() < Duration::from_secs(30),
            "assign ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).or_fail("read")?;
    check!(status.code() == Some(0), "exit {status:?}; {rest}");
    check!(rest.contains("\"reason\":\"signal\""), "{rest}");
    // The device is free again: a new session opens it (cdev or group) at once.
    let o = expect(&["assign", &e[0], "--memory", "2M", "--json"], Some(""), 0)?;
    check!(out(&o).contains("\"event\":\"ready\""), "{}", out(&o));
    Ok(())
}

/// Runs a command that must exit with `code` and change no driver binding, no
/// driver_override and no record of previous drivers.
fn refused(args: &[&str], code: i32) -> Result<Output, Failed> {
    let before = pci::bindings();
    let o = expect(args, None, code)?;
    let after = pci::bindings();
    check!(
        before == after,
        "vfio-gmem {args:?} changed the system: {}",
        pci::binding_diff(&before, &after)
    );
    Ok(o)
}

fn documented_errors() -> Result<(), Failed> {
    let e = edus()?;
    // Unknown device: 1, names it and says how to list.
    let o = refused(&["assign", "0000:7f:1f.7", "--memory", "2M"], 1)?;
    check!(
        err(&o).contains("no PCI device 0000:7f:1f.7") && err(&o).contains("vfio-gmem list"),
        "{}",
        err(&o)
    );
    let o = refused(&["bind", "0000:7f:1f.7"], 1)?;
    check!(
        err(&o).contains("no PCI device 0000:7f:1f.7"),
        "{}",
        err(&o)
    );
    // Malformed device: 2.
    let o = refused(&["bind", "0000:00:3"], 2)?;
    check!(err(&o).contains("is not a PCI address"), "{}", err(&o));
    refused(&["unbind", "00:03.9"], 2)?;
    // Not bound: 1, says to bind.
    if pci::driver(&e[1]).is_some() {
        expect(&["unbind", &e[1]], None, 0)?;
    }
    let o = refused(&["assign", &e[1], "--memory", "2M"], 1)?;
    check!(
        err(&o).contains(&format!("run `vfio-gmem bind {}`", e[1])),
        "{}",
        err(&o)
    );
    // A device without a DMA engine: 1.
    let other = std::fs::read_dir("/sys/bus/pci/devices")
        .or_fail("sysfs")?
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .find(|b| !e.contains(b))
        .ok_or("no non-edu device")?;
    let o = refused(&["selftest", &other], 1)?;
    check!(
        err(&o).contains("has no DMA engine") && err(&o).contains("edu (1234:11e8)"),
        "{}",
        err(&o)
    );
    // Not root: 1, says so.
    for args in [
        vec!["bind", e[1].as_str()],
        vec!["unbind", e[0].as_str()],
        vec!["assign", e[0].as_str(), "--memory", "2M"],
    ] {
        let before = pci::bindings();
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .args(&args)
            .output()
            .or_fail("setpriv")?;
        check!(
            o.status.code() == Some(1),
            "{args:?} as nobody: {:?} {}",
            o.status.code(),
            err(&o)
        );
        check!(err(&o).contains("must run as root"), "{}", err(&o));
        let after = pci::bindings();
        check!(
            before == after,
            "{args:?} as nobody changed the system: {}",
            pci::binding_diff(&before, &after)
        );
    }
    // Hugetlb with a size that is not a multiple of 2 MiB: usage error; no huge page
    // reserved or taken.
    bind(&[&e[0]])?;
    let huge = || {
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
            .unwrap_or_default()
    };
    let (huge0, free0) = (huge(), support::space::meminfo_kib("HugePages_Free"));
    let o = refused(
        &["assign", &e[0], "--memory", "4K", "--backing", "hugetlb"],
        2,
    )?;
    check!(err(&o).contains("multiple of 2 MiB"), "{}", err(&o));
    check!(
        (huge(), support::space::meminfo_kib("HugePages_Free")) == (huge0, free0),
        "the refused hugetlb assign changed the huge page pool"
    );
    // In use: unbinding a device that an assign session holds is refused, changes
    // nothing, and the session goes on.
    let mut child = Command::new(BIN)
        .args(["assign", &e[0], "--memory", "2M", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .or_fail("spawn")?;
    let mut reader = BufReader::new(child.stdout.take().ok_or("stdout")?);
    let mut first = String::new();
    reader.read_line(&mut first).or_fail("ready")?;
    let before = pci::bindings();
    let o = cli(&["unbind", &e[0]], None)?;
    let after = pci::bindings();
    let mut status = String::new();
    writeln!(child.stdin.as_mut().ok_or("stdin")?, "status").or_fail("status command")?;
    reader.read_line(&mut status).or_fail("status answer")?;
    drop(child.stdin.take());
    let exit = child.wait().or_fail("wait")?;
    check!(exit.success(), "assign ended with {exit:?}");
    check!(
        o.status.code() == Some(1) && err(&o).contains("in use"),
        "unbind while assigned: {:?} {}",
        o.status.code(),
        err(&o)
    );
    check!(
        before == after,
        "the refused unbind changed the system: {}",
        pci::binding_diff(&before, &after)
    );
    let status: Value = serde_json::from_str(&status).or_fail("status JSON")?;
    check!(
        status["ok"] == true && status["shared_bytes"] == 2u64 << 20,
        "the session after the refused unbind: {status}"
    );
    Ok(())
}
