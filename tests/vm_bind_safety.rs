//! `vfio-gmem list` and `bind` against what the test VM's host really uses (issue 19).
//!
//! scripts/vm-test boots this target with three blank virtio disks (serials
//! `vm-run-disk0..2`) and two virtio NICs (MACs `52:54:00:76:6d:01..02`): see `vm_options`
//! there. The tests put a filesystem, a partition, a device-mapper device and swap on the
//! disks and addresses and routes on the NICs with the usual tools, then check that `bind`
//! refuses what the host uses, naming it, and changes nothing (driver bindings, mounts,
//! swaps, addresses and routes compared before and after); that what is unused binds; that
//! `--force` moves an interface that carries traffic and says so; that the device the root
//! filesystem (virtme-ng's 9p/virtiofs share) lives on is refused even with `--force`; and
//! that `list` never offers bridges or devices the host uses.
//!
//! Which PCI device backs what is found here independently of the library: from sysfs
//! paths, serials, MAC addresses and mount tags.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use serde_json::Value;
use support::{pci, run_vm_tests, OrFail};

const BIN: &str = env!("CARGO_BIN_EXE_vfio-gmem");
const MNT: &str = "/tmp/vgm-bind-safety";
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn main() {
    run_vm_tests(&[
        ("the_vm_has_the_extra_devices", the_vm_has_the_extra_devices),
        (
            "bridges_are_never_offered_and_never_bound",
            bridges_are_never_offered_and_never_bound,
        ),
        (
            "root_filesystem_device_is_refused_even_with_force",
            root_filesystem_device_is_refused_even_with_force,
        ),
        (
            "mounted_disk_is_refused_and_left_alone",
            mounted_disk_is_refused_and_left_alone,
        ),
        (
            "partition_holder_and_swap_are_traced_to_the_disk",
            partition_holder_and_swap_are_traced_to_the_disk,
        ),
        (
            "unmounted_disk_binds_and_comes_back",
            unmounted_disk_binds_and_comes_back,
        ),
        (
            "interfaces_up_are_refused_down_binds_force_overrides",
            interfaces_up_are_refused_down_binds_force_overrides,
        ),
        ("list_classifies_every_device", list_classifies_every_device),
    ]);
}

// ---- the VM's devices, found without the library ----

/// The last path component that looks like a PCI address.
fn pci_of(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    real.components()
        .filter_map(|c| c.as_os_str().to_str())
        .filter(|c| {
            let b = c.as_bytes();
            b.len() == 12 && b[4] == b':' && b[7] == b':' && b[10] == b'.'
        })
        .map(str::to_string)
        .next_back()
}

fn read(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[derive(Debug)]
struct Disk {
    name: String,
    bdf: String,
}

/// The blank disk scripts/vm-run made with serial `vm-run-disk<i>`.
fn disk(i: u32) -> Result<Disk, Failed> {
    let serial = format!("vm-run-disk{i}");
    for e in std::fs::read_dir("/sys/class/block")
        .or_fail("/sys/class/block")?
        .flatten()
    {
        if read(e.path().join("serial")) == serial {
            let name = e.file_name().to_string_lossy().into_owned();
            let bdf = pci_of(&e.path()).ok_or(format!("{name}: no PCI device on its path"))?;
            return Ok(Disk { name, bdf });
        }
    }
    Err(format!(
        "no disk with serial {serial}: run this target through scripts/vm-test (it adds --disk)"
    )
    .into())
}

/// The NIC scripts/vm-run made with MAC `52:54:00:76:6d:0<i>`: (interface, PCI device).
fn nic(i: u32) -> Result<(String, String), Failed> {
    let mac = format!("52:54:00:76:6d:{i:02x}");
    for e in std::fs::read_dir("/sys/class/net")
        .or_fail("/sys/class/net")?
        .flatten()
    {
        if read(e.path().join("address")) == mac {
            let name = e.file_name().to_string_lossy().into_owned();
            let bdf = pci_of(&e.path()).ok_or(format!("{name}: no PCI device on its path"))?;
            return Ok((name, bdf));
        }
    }
    Err(
        format!("no NIC with MAC {mac}: run this target through scripts/vm-test (it adds --nic)")
            .into(),
    )
}

/// The PCI device of the virtio share the root filesystem is mounted from.
fn root_device() -> Result<(String, String, String), Failed> {
    let info = read("/proc/self/mountinfo");
    let root = info
        .lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some("/"))
        .ok_or("no / in mountinfo")?;
    let after: Vec<&str> = root
        .split(" - ")
        .nth(1)
        .ok_or("mountinfo")?
        .split_whitespace()
        .collect();
    let (fstype, source) = (after[0].to_string(), after[1].to_string());
    let candidates: Vec<(PathBuf, PathBuf)> = match fstype.as_str() {
        "9p" => std::fs::read_dir("/sys/bus/virtio/devices")
            .or_fail("virtio devices")?
            .flatten()
            .map(|e| (e.path().join("mount_tag"), e.path()))
            .collect(),
        "virtiofs" => std::fs::read_dir("/sys/fs/virtiofs")
            .or_fail("/sys/fs/virtiofs")?
            .flatten()
            .map(|e| (e.path().join("tag"), e.path().join("device")))
            .collect(),
        other => return Err(format!("root is {other} from {source}, not a virtio share").into()),
    };
    for (tag, dev) in candidates {
        if read(&tag).trim_end_matches('\0') == source {
            let bdf = pci_of(&dev).ok_or("the share's device is not on PCI")?;
            return Ok((bdf, fstype, source));
        }
    }
    Err(format!("no virtio device has tag {source}").into())
}

// ---- running things ----

fn sh(script: &str) -> Result<String, Failed> {
    let o = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("PATH", PATH)
        .output()
        .or_fail("sh")?;
    check!(
        o.status.success(),
        "`{script}` failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn cli(args: &[&str]) -> Result<Output, Failed> {
    Command::new(BIN)
        .args(args)
        .env("PATH", PATH)
        .output()
        .or_fail("vfio-gmem")
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn expect(args: &[&str], code: i32) -> Result<Output, Failed> {
    let o = cli(args)?;
    check!(
        o.status.code() == Some(code),
        "vfio-gmem {args:?}: exit {:?}, expected {code}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        out(&o),
        err(&o)
    );
    Ok(o)
}

/// Everything a refused bind must leave alone: drivers and overrides of every PCI device,
/// the binder's records, mounts, swaps, device-mapper devices, addresses, routes.
fn host_state() -> Result<(pci::BindingSnapshot, String), Failed> {
    let rest = format!(
        "{}\n--\n{}\n--\n{}--\n{}--\n{}",
        read("/proc/self/mountinfo"),
        read("/proc/swaps"),
        sh("ip -o addr show")?,
        sh("ip route show")?,
        sh("ls /sys/class/block /sys/class/net")?,
    );
    Ok((pci::bindings(), rest))
}

/// Runs a bind that must be refused (exit 1) naming each of `needles`, and change nothing.
fn refused(args: &[&str], needles: &[&str]) -> Result<Output, Failed> {
    let (b0, s0) = host_state()?;
    let o = expect(args, 1)?;
    let (b1, s1) = host_state()?;
    check!(
        b0 == b1,
        "vfio-gmem {args:?} changed bindings: {}",
        pci::binding_diff(&b0, &b1)
    );
    check!(
        s0 == s1,
        "vfio-gmem {args:?} changed the host:\n{s0}\n=> \n{s1}"
    );
    for n in needles {
        check!(
            err(&o).contains(n),
            "vfio-gmem {args:?}: stderr lacks {n:?}:\n{}",
            err(&o)
        );
    }
    Ok(o)
}

/// The JSON error object a refused `--json` command prints.
fn json_error(o: &Output) -> Result<Value, Failed> {
    let last = out(o).lines().last().unwrap_or("").to_string();
    let v: Value = serde_json::from_str(&last).or_fail(&format!("JSON error line {last:?}"))?;
    check!(v["ok"] == false && v["exit_code"] == 1, "{v}");
    Ok(v)
}

fn list() -> Result<Vec<Value>, Failed> {
    let o = expect(&["list", "--json"], 0)?;
    let v: Value = serde_json::from_slice(&o.stdout).or_fail("list --json")?;
    Ok(v.as_array().ok_or("list --json is not an array")?.clone())
}

fn row<'a>(rows: &'a [Value], bdf: &str) -> Result<&'a Value, Failed> {
    rows.iter()
        .find(|r| r["bdf"] == bdf)
        .ok_or_else(|| format!("{bdf} missing from list").into())
}

/// Undoes whatever a failed test may have left: mounts, swap, dm devices, addresses.
fn clean() {
    let _ = sh(&format!(
        "umount {MNT} 2>/dev/null; swapoff -a 2>/dev/null; dmsetup remove_all --noudevsync 2>/dev/null; \
         for n in /sys/class/net/*; do case $(cat $n/address) in 52:54:00:76:6d:*) \
         ip addr flush dev ${{n##*/}}; ip link set ${{n##*/}} down;; esac; done; true"
    ));
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Result<(), Failed> {
    let t0 = Instant::now();
    while !cond() {
        check!(
            t0.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

// ---- the tests ----

fn the_vm_has_the_extra_devices() -> Result<(), Failed> {
    let disks = [disk(0)?, disk(1)?, disk(2)?];
    let nics = [nic(1)?, nic(2)?];
    let mut bdfs: Vec<&str> = disks.iter().map(|d| d.bdf.as_str()).collect();
    bdfs.extend(nics.iter().map(|n| n.1.as_str()));
    for b in &bdfs {
        check!(
            pci::driver(b).as_deref() == Some("virtio-pci"),
            "{b}: {:?}",
            pci::driver(b)
        );
    }
    let mut unique = bdfs.clone();
    unique.sort();
    unique.dedup();
    check!(unique.len() == 5, "one PCI device each: {disks:?} {nics:?}");
    let (root, fstype, source) = root_device()?;
    check!(
        !bdfs.contains(&root.as_str()),
        "root {fstype} {source} on {root}"
    );
    Ok(())
}

fn bridges_are_never_offered_and_never_bound() -> Result<(), Failed> {
    let rows = list()?;
    for (bdf, nature) in [
        ("0000:00:00.0", "host-bridge"),
        ("0000:00:1f.0", "isa-bridge"),
    ] {
        let r = row(&rows, bdf)?;
        check!(
            r["nature"] == nature && r["status"] == "not-assignable" && r["bind_command"].is_null(),
            "{r}"
        );
    }
    // Nothing but an assignable device is ever offered a bind.
    for r in &rows {
        let offered = r["not_ready"]
            .as_str()
            .unwrap_or("")
            .contains("vfio-gmem bind")
            || !r["bind_command"].is_null();
        check!(offered == (r["status"] == "assignable"), "{r}");
    }
    let text = out(&expect(&["list"], 0)?);
    let host_line = text
        .lines()
        .find(|l| l.starts_with("0000:00:00.0"))
        .unwrap_or("");
    check!(host_line.contains("not assignable: host bridge"), "{text}");
    check!(!host_line.contains("vfio-gmem bind"), "{host_line}");
    refused(
        &["bind", "0000:00:00.0"],
        &["0000:00:00.0 is a host bridge", "not assignable by nature"],
    )?;
    let o = refused(
        &["bind", "--force", "--json", "0000:00:1f.0"],
        &["ISA/LPC bridge"],
    )?;
    let v = json_error(&o)?;
    check!(
        v["nature"] == "isa-bridge" && v["device"] == "0000:00:1f.0",
        "{v}"
    );
    Ok(())
}

fn root_filesystem_device_is_refused_even_with_force() -> Result<(), Failed> {
    let (root, fstype, source) = root_device()?;
    let needles = ["holds the root filesystem", "not even with --force", &root];
    refused(&["bind", &root], &needles)?;
    let o = refused(&["bind", "--force", "--json", &root], &needles)?;
    let v = json_error(&o)?;
    check!(v["forceable"] == false, "{v}");
    let u = &v["host_uses"][0];
    check!(
        u["kind"] == "root-filesystem"
            && u["fstype"] == fstype.as_str()
            && u["source"] == source.as_str(),
        "{v}"
    );
    let r = list()?;
    let r = row(&r, &root)?;
    check!(r["status"] == "in-use" && r["forceable"] == false, "{r}");
    check!(
        r["not_ready"]
            .as_str()
            .unwrap_or("")
            .contains("even with --force"),
        "{r}"
    );
    Ok(())
}

fn mounted_disk_is_refused_and_left_alone() -> Result<(), Failed> {
    clean();
    let d = disk(0)?;
    sh(&format!(
        "mkfs.ext2 -q -F /dev/{0} && mkdir -p {MNT} && mount /dev/{0} {MNT} && echo kept > {MNT}/f",
        d.name
    ))?;
    let result = (|| {
        let o = refused(
            &["bind", &d.bdf],
            &[
                &format!("refusing to bind {}", d.bdf),
                &format!("{}: ext2 mounted at {MNT}", d.name),
                "Nothing was changed",
                "--force",
            ],
        )?;
        check!(out(&o).is_empty(), "a refusal prints no table: {}", out(&o));
        let v = json_error(&refused(&["bind", "--json", &d.bdf], &[])?)?;
        check!(v["forceable"] == true, "{v}");
        let u = &v["host_uses"][0];
        check!(
            u["kind"] == "mounted" && u["device"] == d.bdf.as_str() && u["mount_points"][0] == MNT,
            "{v}"
        );
        check!(
            read(format!("{MNT}/f")) == "kept",
            "the filesystem is still there"
        );
        Ok(())
    })();
    sh(&format!("umount {MNT}"))?;
    result
}

/// Writes an MBR with one Linux partition from 1 MiB to the end, and has the kernel read it.
fn partition(dev: &str) -> Result<(), Failed> {
    let sectors: u32 = read(format!("/sys/class/block/{dev}/size"))
        .parse()
        .or_fail("size")?;
    let mut mbr = [0u8; 512];
    let e = &mut mbr[446..462];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&2048u32.to_le_bytes());
    e[12..16].copy_from_slice(&(sectors - 2048).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/dev/{dev}"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, &mbr))
        .or_fail("write the MBR")?;
    sh(&format!("blockdev --rereadpt /dev/{dev}"))?;
    wait_for("the partition", || {
        Path::new(&format!("/sys/class/block/{dev}1")).exists()
    })
}

fn partition_holder_and_swap_are_traced_to_the_disk() -> Result<(), Failed> {
    clean();
    let d = disk(2)?;
    let p = format!("{}1", d.name);
    partition(&d.name)?;
    let size = read(format!("/sys/class/block/{p}/size"));
    sh(&format!(
        "dmsetup create --noudevsync --noudevrules vgm-data --table '0 {size} linear /dev/{p} 0'"
    ))?;
    let result = (|| {
        let holders: Vec<String> = std::fs::read_dir(format!("/sys/class/block/{p}/holders"))
            .or_fail("holders")?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        check!(
            holders.len() == 1 && holders[0].starts_with("dm-"),
            "holders of {p}: {holders:?}"
        );
        let dm = &holders[0];
        sh(&format!(
            "mkfs.ext2 -q -F /dev/{dm} && mkdir -p {MNT} && mount /dev/{dm} {MNT}"
        ))?;
        let path = format!("{} → {p} → {dm} (device-mapper 'vgm-data')", d.name);
        let r = refused(
            &["bind", &d.bdf],
            &[&format!("{path}: ext2 mounted at {MNT}")],
        );
        sh(&format!("umount {MNT}"))?;
        r?;
        // Unmounted, the dm device still holds the partition open.
        refused(&["bind", &d.bdf], &[&format!("{path}: held open")])?;
        sh("dmsetup remove --noudevsync vgm-data")?;
        sh(&format!("mkswap -q /dev/{p} && swapon /dev/{p}"))?;
        let r = refused(
            &["bind", &d.bdf],
            &[&format!("{} → {p}: active swap (/dev/{p})", d.name)],
        );
        sh(&format!("swapoff /dev/{p}"))?;
        r?;
        // With nothing left on it, list offers it: once udev's worker, which probes the
        // partition after swapoff (a change event), has let go of it (seen open by
        // (udev-worker) in one run under virtio-iommu).
        let _ = sh("udevadm settle --timeout=10");
        let mut last = serde_json::Value::Null;
        wait_for("list to offer the disk", || {
            let r = list()
                .ok()
                .and_then(|rows| row(&rows, &d.bdf).ok().cloned());
            let ok = r.as_ref().is_some_and(|r| {
                r["status"] == "assignable" && r["host_uses"] == serde_json::json!([])
            });
            last = r.unwrap_or_default();
            ok
        })
        .map_err(|e| format!("{}; last row: {last}", e.message().unwrap_or_default()))?;
        Ok(())
    })();
    clean();
    result
}

fn unmounted_disk_binds_and_comes_back() -> Result<(), Failed> {
    let d = disk(1)?;
    // Open raw in a process (as a VM or a database would): refused, naming the process.
    let node = std::fs::File::open(format!("/dev/{}", d.name)).or_fail("open the disk")?;
    let mut holder = Command::new("sleep")
        .arg("60")
        .stdin(node)
        .spawn()
        .or_fail("sleep")?;
    let r = refused(
        &["bind", &d.bdf],
        &[&format!(
            "/dev/{} is open by pid {} (sleep)",
            d.name,
            holder.id()
        )],
    );
    let _ = holder.kill();
    let _ = holder.wait();
    r?;
    let o = expect(&["bind", "--json", &d.bdf], 0)?;
    let rows: Value = serde_json::from_slice(&o.stdout).or_fail("bind --json")?;
    let r = rows
        .as_array()
        .and_then(|a| a.iter().find(|r| r["bdf"] == d.bdf.as_str()))
        .ok_or(format!("no row for {}: {rows}", d.bdf))?;
    check!(
        r["action"] == "moved"
            && r["before"] == "virtio-pci"
            && r["now"] == "vfio-pci"
            && r["overridden"] == serde_json::json!([]),
        "{r}"
    );
    check!(
        !Path::new(&format!("/sys/class/block/{}", d.name)).exists(),
        "{} still there",
        d.name
    );
    check!(
        err(&o).is_empty(),
        "nothing overridden, nothing to warn about: {}",
        err(&o)
    );
    expect(&["unbind", &d.bdf], 0)?;
    check!(
        pci::driver(&d.bdf).as_deref() == Some("virtio-pci"),
        "{:?}",
        pci::driver(&d.bdf)
    );
    wait_for("the disk to come back", || disk(1).is_ok())
}

fn interfaces_up_are_refused_down_binds_force_overrides() -> Result<(), Failed> {
    clean();
    let (n1, b1) = nic(1)?;
    let (n2, b2) = nic(2)?;
    sh(&format!(
        "ip addr add 10.77.0.2/24 dev {n1} && ip link set {n1} up && ip route add default via 10.77.0.1 dev {n1} && \
         ip addr add 10.78.0.2/24 dev {n2} && ip link set {n2} up"
    ))?;
    let result = (|| {
        refused(
            &["bind", &b1],
            &[
                &format!("{n1} is up; {n1} has 10.77.0.2/24"),
                "it carries the default route (default via 10.77.0.1)",
            ],
        )?;
        refused(
            &["bind", &b2],
            &[
                &format!("{n2} is up; {n2} has 10.78.0.2/24"),
                "the default route does not go through it",
            ],
        )?;
        let v = json_error(&refused(&["bind", "--json", &b1], &[])?)?;
        let u = &v["host_uses"][0];
        check!(
            u["kind"] == "network" && u["interface"] == n1.as_str() && u["default_route"] == true,
            "{v}"
        );
        // Down (address still configured): nothing goes through it; it binds.
        sh(&format!("ip link set {n2} down"))?;
        let o = expect(&["bind", &b2], 0)?;
        check!(err(&o).is_empty(), "{}", err(&o));
        check!(
            pci::driver(&b2).as_deref() == Some("vfio-pci"),
            "{:?}",
            pci::driver(&b2)
        );
        expect(&["unbind", &b2], 0)?;
        wait_for("the second NIC back", || nic(2).is_ok())?;
        // Forced: moved, and it says what it overrode.
        let o = expect(&["bind", "--force", "--json", &b1], 0)?;
        let e = err(&o);
        check!(
            e.contains("--force overrode a host use")
                && e.contains(&format!("{b1}: {n1} is up"))
                && e.contains("carries the default route"),
            "{e}"
        );
        let rows: Value = serde_json::from_slice(&o.stdout).or_fail("bind --json")?;
        let r = rows
            .as_array()
            .and_then(|a| a.iter().find(|r| r["bdf"] == b1.as_str()))
            .ok_or(format!("{rows}"))?;
        check!(
            r["now"] == "vfio-pci" && r["overridden"][0]["kind"] == "network",
            "{r}"
        );
        check!(
            !Path::new(&format!("/sys/class/net/{n1}")).exists(),
            "{n1} still there"
        );
        expect(&["unbind", &b1], 0)?;
        wait_for("the first NIC back", || nic(1).is_ok())
    })();
    clean();
    result
}

fn list_classifies_every_device() -> Result<(), Failed> {
    clean();
    let (d0, d1) = (disk(0)?, disk(1)?);
    let ((n1, b1), (_, b2)) = (nic(1)?, nic(2)?);
    sh(&format!(
        "mkfs.ext2 -q -F /dev/{0} && mkdir -p {MNT} && mount /dev/{0} {MNT} && \
         ip addr add 10.77.0.2/24 dev {n1} && ip link set {n1} up",
        d0.name
    ))?;
    let result = (|| {
        let rows = list()?;
        let r = row(&rows, &d0.bdf)?;
        check!(
            r["status"] == "in-use"
                && r["forceable"] == true
                && r["host_uses"][0]["kind"] == "mounted",
            "{r}"
        );
        let r = row(&rows, &b1)?;
        check!(
            r["status"] == "in-use"
                && r["host_uses"][0]["kind"] == "network"
                && r["host_uses"][0]["default_route"] == false,
            "{r}"
        );
        for b in [&d1.bdf, &b2] {
            let r = row(&rows, b)?;
            check!(
                r["status"] == "assignable"
                    && r["bind_command"] == format!("vfio-gmem bind {b}").as_str(),
                "{r}"
            );
        }
        let (root, _, _) = root_device()?;
        check!(row(&rows, &root)?["status"] == "in-use", "root device");
        for r in &rows {
            let s = r["status"].as_str().unwrap_or("");
            check!(
                [
                    "ready",
                    "assignable",
                    "in-use",
                    "not-assignable",
                    "unavailable"
                ]
                .contains(&s),
                "{r}"
            );
            check!(r["ready"] == (s == "ready"), "{r}");
        }
        let text = out(&expect(&["list"], 0)?);
        let line = text.lines().find(|l| l.starts_with(&d0.bdf)).unwrap_or("");
        check!(
            line.contains(&format!(
                "in use by the host: {}: ext2 mounted at {MNT}",
                d0.name
            )),
            "{text}"
        );
        Ok(())
    })();
    clean();
    result
}
