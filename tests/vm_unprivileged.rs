//! An unprivileged VMM (issue 18): `vfio-gmem helper` runs as root in the test VM, the
//! reference VMM runs as a throwaway uid with only the fds it received, and proves DMA and
//! conversions on iommufd and on the legacy type1 path; the refusals (peer not allowed,
//! device not granted, device in use, socket in use / stale / not a socket), a helper
//! restarted under a running VMM, a VMM killed holding fds, and RLIMIT_MEMLOCK too low.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use support::needs::{self, Need};
use support::{run_vm_tests, OrFail};

/// The throwaway VMM user, and one the helper does not allow.
const VMM_UID: u32 = 4242;
const OTHER_UID: u32 = 4343;

/// The refusals and socket cases run everywhere (Debian's kernel too: the helper serves
/// the legacy path there); a VMM run needs a SW_PROTECTED VM.
const NEEDS: needs::Needs = &[
    (
        "unprivileged_vmm_on_iommufd",
        &[Need::Iommufd, Need::PrivateMemory],
    ),
    ("unprivileged_vmm_on_legacy", &[Need::PrivateMemory]),
    (
        "helper_restart_and_vmm_death",
        &[Need::Iommufd, Need::PrivateMemory],
    ),
    ("memlock_too_low", &[Need::PrivateMemory]),
];

/// Set in the unprivileged child of `legacy_dma_without_kvm` (this binary, re-run as
/// [`VMM_UID`]): the socket and the device.
const CHILD_ENV: &str = "VFIO_GMEM_UNPRIV_CHILD";

fn main() {
    if let Ok(arg) = std::env::var(CHILD_ENV) {
        let (sock, bdf) = arg.split_once(' ').expect("SOCKET BDF");
        match unprivileged_dma(sock, bdf) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("child: {}", e.message().unwrap_or("failed"));
                std::process::exit(1)
            }
        }
    }
    needs::declare(NEEDS);
    run_vm_tests(&[
        ("legacy_dma_without_kvm", legacy_dma_without_kvm),
        ("unprivileged_vmm_on_iommufd", unprivileged_vmm_on_iommufd),
        ("unprivileged_vmm_on_legacy", unprivileged_vmm_on_legacy),
        ("refusals", refusals),
        (
            "socket_in_use_stale_or_foreign",
            socket_in_use_stale_or_foreign,
        ),
        ("helper_restart_and_vmm_death", helper_restart_and_vmm_death),
        ("memlock_too_low", memlock_too_low),
    ]);
}

/// A scratch directory every user can traverse (the socket lives there).
fn scratch(name: &str) -> Result<PathBuf, Failed> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("vfio-gmem-unpriv-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).or_fail("creating the scratch dir")?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).or_fail("chmod")?;
    Ok(dir)
}

fn edu() -> Result<(String, String), Failed> {
    let edu = support::pci::edu_devices();
    check!(edu.len() >= 2, "two edu devices expected, found {edu:?}");
    Ok((edu[0].clone(), edu[1].clone()))
}

/// `vfio-gmem helper` as root, its stdout collected line by line.
struct Helper {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Helper {
    fn spawn(socket: &Path, args: &[&str]) -> Result<Helper, Failed> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vfio-gmem"))
            .arg("helper")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .or_fail("starting vfio-gmem helper")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("[helper] {line}");
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Ok(Helper { child, lines })
    }

    /// Started and listening.
    fn start(socket: &Path, args: &[&str]) -> Result<Helper, Failed> {
        let mut h = Helper::spawn(socket, args)?;
        h.wait_line("listening on", Duration::from_secs(60))?;
        Ok(h)
    }

    fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<String, Failed> {
        let t0 = Instant::now();
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return Ok(l.clone());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                return Err(format!(
                    "the helper exited ({status}) before printing {needle:?}: {:?}",
                    self.lines.lock().unwrap()
                )
                .into());
            }
            check!(
                t0.elapsed() < timeout,
                "no helper line {needle:?} within {timeout:?}: {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The helper's open fds.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(usize::MAX)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The reference VMM binary (built by `cargo build --examples`, as scripts/vm-test does).
fn reference_vmm() -> Result<PathBuf, Failed> {
    let exe = std::env::current_exe().or_fail("current_exe")?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("test binary is not in target/<profile>/deps")?
        .join("examples/reference_vmm");
    check!(
        bin.exists(),
        "{} missing: cargo build --examples (scripts/vm-test does)",
        bin.display()
    );
    Ok(bin)
}

/// The reference VMM as `uid` (gid = uid, no supplementary groups), behind `shell`
/// (e.g. `ulimit -l 4;`), with `args`.
fn vmm_command(uid: u32, shell: &str, args: &[&str]) -> Result<Command, Failed> {
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(format!("{shell} exec \"$0\" \"$@\""))
        .arg(reference_vmm()?)
        .args(args)
        .uid(uid)
        .gid(uid)
        .env_remove("VFIO_GMEM_LOG");
    Ok(c)
}

fn run_vmm(uid: u32, shell: &str, args: &[&str]) -> Result<(Output, String, String), Failed> {
    let out = vmm_command(uid, shell, args)?
        .output()
        .or_fail("running reference_vmm")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    print!("{stdout}");
    eprint!("{stderr}");
    Ok((out, stdout, stderr))
}

/// The story of a successful unprivileged run: received fds, conversions, DMA refused
/// while private and accepted when shared, every check held.
fn check_story(out: &Output, stdout: &str, backend: &str) -> Result<(), Failed> {
    check!(
        out.status.success(),
        "reference_vmm exited with {}",
        out.status
    );
    check!(!stdout.contains("FAILED"), "a check failed");
    for want in [
        format!("running as uid {VMM_UID} gid {VMM_UID}; received from the helper"),
        "backend; area cutting".into(),
        format!("{backend} backend"),
        "convert  GPA [0x4000, +0x1000) to private".into(),
        "check    ok: order: IOMMU unmap, then KVM attributes, then discard".into(),
        "while private: refused, memory unchanged".into(),
        "while shared: written".into(),
        "check    ok: guest report 0x0, expected 0x0: A holds the device's data".into(),
        "check    ok: exits: 3 hypercalls, 1 memory faults, 3 doorbells, 7 reports".into(),
        "done     IOMMU totals:".into(),
    ] {
        check!(stdout.contains(&want), "no {want:?} in the story");
    }
    Ok(())
}

/// Without the helper, the throwaway uid can open none of the nodes involved: the run
/// below works only through the received fds.
fn cannot_open_nodes(bdf: &str) -> Result<(), Failed> {
    // /dev/vfio/vfio is world-accessible by design: a container is useless without a
    // group, and the group node is root's.
    let mut nodes = vec!["/dev/kvm".to_string()];
    if let Ok(group) = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/iommu_group")) {
        let id = group
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        nodes.push(format!("/dev/vfio/{id}"));
    }
    if Path::new("/dev/iommu").exists() {
        nodes.push("/dev/iommu".into());
        if let Ok(cdev) = support::pci::vfio_cdev(bdf) {
            nodes.push(cdev.display().to_string());
        }
    }
    for node in nodes {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("exec 3<>{node}"))
            .uid(VMM_UID)
            .gid(VMM_UID)
            .output()
            .or_fail("sh")?;
        check!(
            !out.status.success(),
            "uid {VMM_UID} can open {node} itself; the test would prove nothing"
        );
    }
    Ok(())
}

/// The reference VMM's whole story as uid VMM_UID with fds from a helper on `backend`
/// (`--iommu` value); the story itself is checked as `space` (the space's backend name).
/// Returns the device, the VMM's stdout and the still-running helper.
fn story_with_received_fds(backend: &str, space: &str) -> Result<(String, String, Helper), Failed> {
    let (edu0, _) = edu()?;
    let dir = scratch(backend)?;
    let sock = dir.join("helper.sock");
    let uid = VMM_UID.to_string();
    let helper = Helper::start(
        &sock,
        &[
            "--allow-uid",
            &uid,
            "--device",
            &edu0,
            "--kvm",
            "--iommu",
            backend,
        ],
    )?;
    cannot_open_nodes(&edu0)?;
    let (out, stdout, _) = run_vmm(
        VMM_UID,
        "",
        &["--device", &edu0, "--handoff", sock.to_str().unwrap()],
    )?;
    check_story(&out, &stdout, space)?;
    Ok((edu0, stdout, helper))
}

fn unprivileged_vmm_on_iommufd() -> Result<(), Failed> {
    let (edu0, stdout, mut helper) = story_with_received_fds("iommufd", "iommufd")?;
    check!(
        stdout.contains(&format!(", uid 0): iommufd, device {edu0}, kvm")),
        "the VMM did not report the fds received"
    );
    check!(
        stdout.contains("strategy cut"),
        "iommufd cuts areas on a convertible region"
    );
    helper.wait_line("granted pid", Duration::from_secs(5))?;
    helper.wait_line(&format!("released {edu0}"), Duration::from_secs(10))?;
    Ok(())
}

fn unprivileged_vmm_on_legacy() -> Result<(), Failed> {
    let (edu0, stdout, mut helper) = story_with_received_fds("legacy", "legacy-type1")?;
    check!(
        stdout.contains(", uid 0): container, group ")
            && stdout.contains(&format!("device {edu0}, kvm")),
        "the VMM did not report the legacy fds received"
    );
    helper.wait_line(&format!("released {edu0}"), Duration::from_secs(10))?;
    Ok(())
}

fn refusals() -> Result<(), Failed> {
    let (edu0, edu1) = edu()?;
    let dir = scratch("refusals")?;
    let sock = dir.join("helper.sock");
    let uid = VMM_UID.to_string();
    let mut helper = Helper::start(&sock, &["--allow-uid", &uid, "--device", &edu0, "--kvm"])?;
    let s = sock.to_str().unwrap();
    // A peer the helper was not told to allow.
    let (out, _, stderr) = run_vmm(OTHER_UID, "", &["--device", &edu0, "--handoff", s])?;
    check!(!out.status.success(), "uid {OTHER_UID} must be refused");
    check!(
        stderr.contains("refused (not-allowed)")
            && stderr.contains(&format!("uid {OTHER_UID}"))
            && stderr.contains(&format!("--allow-uid {OTHER_UID}")),
        "unclear refusal: {stderr}"
    );
    // A device it was not granted.
    let (out, _, stderr) = run_vmm(VMM_UID, "", &["--device", &edu1, "--handoff", s])?;
    check!(!out.status.success(), "{edu1} must be refused");
    check!(
        stderr.contains("refused (not-granted)") && stderr.contains(&format!("{edu1} not among")),
        "unclear refusal: {stderr}"
    );
    helper.wait_line("refused pid", Duration::from_secs(5))?;
    // A helper that serves nobody does not start.
    let mut nobody = Helper::spawn(&dir.join("nobody.sock"), &["--device", &edu0])?;
    let e = nobody
        .wait_line("listening", Duration::from_secs(30))
        .unwrap_err();
    check!(
        format!("{e:?}").contains("--allow-uid"),
        "a helper serving nobody must say whom to allow: {e:?}"
    );
    // Nothing was leased by the refused peers.
    check!(
        !helper
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("granted pid")),
        "a refused peer got fds"
    );
    Ok(())
}

fn socket_in_use_stale_or_foreign() -> Result<(), Failed> {
    let (edu0, _) = edu()?;
    let dir = scratch("socket")?;
    let sock = dir.join("helper.sock");
    let uid = VMM_UID.to_string();
    let args = ["--allow-uid", uid.as_str(), "--device", edu0.as_str()];
    let mut first = Helper::start(&sock, &args)?;
    // A second helper on a live socket: refused, naming the first; the first keeps it.
    let mut second = Helper::spawn(&sock, &args)?;
    let e = format!(
        "{:?}",
        second
            .wait_line("listening", Duration::from_secs(30))
            .unwrap_err()
    );
    check!(
        e.contains("in use by a running vfio-gmem helper")
            && e.contains(&format!("pid {}", first.child.id())),
        "unclear in-use error: {e}"
    );
    check!(sock.exists(), "the refused helper removed the live socket");
    // The first one crashes: its socket file stays; a new helper replaces it.
    first.kill();
    check!(sock.exists(), "SIGKILL leaves the socket file behind");
    let mut third = Helper::start(&sock, &args)?;
    third.wait_line("replaced a stale socket", Duration::from_secs(1))?;
    drop(third);
    // Something that is not a socket is never removed.
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"precious").or_fail("write")?;
    let mut fourth = Helper::spawn(&file, &args)?;
    let e = format!(
        "{:?}",
        fourth
            .wait_line("listening", Duration::from_secs(30))
            .unwrap_err()
    );
    check!(
        e.contains("is not a unix socket; refusing to remove it"),
        "{e}"
    );
    check!(
        std::fs::read(&file).or_fail("read")? == b"precious",
        "the file was touched"
    );
    Ok(())
}

fn helper_restart_and_vmm_death() -> Result<(), Failed> {
    let (edu0, _) = edu()?;
    let dir = scratch("restart")?;
    let sock = dir.join("helper.sock");
    let s = sock.to_str().unwrap();
    let uid = VMM_UID.to_string();
    let args = [
        "--allow-uid",
        uid.as_str(),
        "--device",
        edu0.as_str(),
        "--kvm",
    ];
    let mut helper = Helper::start(&sock, &args)?;

    // VMM 1 takes the device and waits before running its guest.
    let mut vmm1 = vmm_command(
        VMM_UID,
        "",
        &["--device", &edu0, "--handoff", s, "--wait-before-run"],
    )?
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .or_fail("starting VMM 1")?;
    let mut out1 = BufReader::new(vmm1.stdout.take().unwrap());
    let mut story1 = String::new();
    wait_for(&mut out1, &mut story1, "waiting ")?;
    // While it holds the device, the helper refuses it to anyone else.
    let (out, _, stderr) = run_vmm(VMM_UID, "", &["--device", &edu0, "--handoff", s])?;
    check!(!out.status.success(), "a leased device must be refused");
    check!(
        stderr.contains("refused (in-use)")
            && stderr.contains(&format!("is held by pid {}", vmm1.id())),
        "unclear in-use refusal: {stderr}"
    );
    // The helper crashes and is restarted: VMM 1 keeps its fds and finishes its guest.
    helper.kill();
    let mut helper = Helper::start(&sock, &args)?;
    helper.wait_line("replaced a stale socket", Duration::from_secs(1))?;
    let idle_fds = helper.fds();
    // The new helper knows no lease; the kernel still refuses a second user of the
    // device, and the VMM says so.
    let (out, _, stderr) = run_vmm(VMM_UID, "", &["--device", &edu0, "--handoff", s])?;
    check!(
        !out.status.success(),
        "a device in use must not be usable twice"
    );
    check!(
        stderr.contains("already bound"),
        "unclear error for a device another VMM uses: {stderr}"
    );
    vmm1.stdin
        .take()
        .unwrap()
        .write_all(b"\n")
        .or_fail("stdin")?;
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out1, &mut rest).or_fail("VMM 1 output")?;
    story1.push_str(&rest);
    print!("{story1}");
    let status = vmm1.wait().or_fail("VMM 1")?;
    check_story(
        &Output {
            status,
            stdout: vec![],
            stderr: vec![],
        },
        &story1,
        "iommufd",
    )?;

    // VMM 3 dies holding its fds: the lease ends, the helper holds nothing more than
    // before, and the device works for the next VMM.
    let mut vmm3 = vmm_command(
        VMM_UID,
        "",
        &["--device", &edu0, "--handoff", s, "--wait-before-run"],
    )?
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .or_fail("starting VMM 3")?;
    let pid3 = vmm3.id();
    let mut out3 = BufReader::new(vmm3.stdout.take().unwrap());
    wait_for(&mut out3, &mut String::new(), "waiting ")?;
    vmm3.kill().or_fail("SIGKILL VMM 3")?;
    vmm3.wait().or_fail("VMM 3")?;
    helper.wait_line(&format!("(pid {pid3} "), Duration::from_secs(10))?;
    let t0 = Instant::now();
    while !helper
        .lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("released") && l.contains(&format!("pid {pid3} ")))
    {
        check!(
            t0.elapsed() < Duration::from_secs(10),
            "VMM 3's lease was not released"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    check!(
        helper.fds() <= idle_fds + 1,
        "the helper holds {} fds, {idle_fds} when idle: leaked",
        helper.fds()
    );
    let (out, stdout, _) = run_vmm(VMM_UID, "", &["--device", &edu0, "--handoff", s])?;
    check_story(&out, &stdout, "iommufd")?;
    Ok(())
}

/// Reads lines into `story` until one starts with `prefix`.
fn wait_for(out: &mut impl BufRead, story: &mut String, prefix: &str) -> Result<(), Failed> {
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).or_fail("VMM output")?;
        story.push_str(&line);
        check!(n > 0, "the VMM ended before {prefix:?}: {story}");
        if line.starts_with(prefix) {
            return Ok(());
        }
    }
}

fn memlock_too_low() -> Result<(), Failed> {
    let (edu0, _) = edu()?;
    let uid = VMM_UID.to_string();
    let mut backends = vec!["legacy"];
    if Path::new("/dev/iommu").exists() {
        backends.insert(0, "iommufd");
    }
    for backend in backends {
        let dir = scratch(&format!("memlock-{backend}"))?;
        let sock = dir.join("helper.sock");
        let s = sock.to_str().unwrap();
        let _helper = Helper::start(
            &sock,
            &[
                "--allow-uid",
                &uid,
                "--device",
                &edu0,
                "--kvm",
                "--iommu",
                backend,
            ],
        )?;
        // 36 KiB of guest RAM is mapped for DMA; allow 4 KiB (soft limit; the hard one stays).
        let (out, _, stderr) = run_vmm(
            VMM_UID,
            "ulimit -S -l 4 &&",
            &["--device", &edu0, "--handoff", s],
        )?;
        check!(
            !out.status.success(),
            "{backend}: 4 KiB of memlock must not do"
        );
        check!(
            stderr.contains("needs RLIMIT_MEMLOCK of at least 36 KiB")
                && stderr.contains("raise RLIMIT_MEMLOCK by 32 KiB")
                && stderr.contains("ulimit -l 36"),
            "{backend}: the error must say which limit and by how much: {stderr}"
        );
        check!(
            stderr.contains("pinned now: VmPin 0 KiB, VmLck 0 KiB"),
            "{backend}: something is pinned: {stderr}"
        );
        // Without the check, the kernel's own refusal: explained, and nothing left
        // pinned (legacy pins the first page before failing: the library unpins it).
        let (out, _, stderr) = run_vmm(
            VMM_UID,
            "ulimit -S -l 4 &&",
            &["--device", &edu0, "--handoff", s, "--no-memlock-check"],
        )?;
        check!(!out.status.success(), "{backend}: the kernel must refuse");
        check!(
            stderr.contains("RLIMIT_MEMLOCK"),
            "{backend}: the kernel's refusal is not explained: {stderr}"
        );
        check!(
            stderr.contains("pinned now: VmPin 0 KiB, VmLck 0 KiB"),
            "{backend}: pages left pinned after the refusal: {stderr}"
        );
    }
    Ok(())
}

/// The legacy type1 path without KVM (so on Debian's kernel too): a child of this binary
/// running as [`VMM_UID`] receives the container, group and device, maps a memfd, and
/// proves with edu DMA that a shared page is reached, a page converted private is not,
/// and a page shared again is.
fn legacy_dma_without_kvm() -> Result<(), Failed> {
    let (edu0, _) = edu()?;
    let dir = scratch("legacy-dma")?;
    let sock = dir.join("helper.sock");
    let uid = VMM_UID.to_string();
    let mut helper = Helper::start(
        &sock,
        &["--allow-uid", &uid, "--device", &edu0, "--iommu", "legacy"],
    )?;
    let out = Command::new(std::env::current_exe().or_fail("current_exe")?)
        .env(CHILD_ENV, format!("{} {edu0}", sock.display()))
        .uid(VMM_UID)
        .gid(VMM_UID)
        .output()
        .or_fail("running the unprivileged child")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    check!(
        out.status.success(),
        "the unprivileged child failed: {stderr}"
    );
    for want in [
        "child: uid 4242: received container, group",
        "child: shared page reached",
        "child: private page not reached",
        "child: shared again, reached",
    ] {
        check!(stdout.contains(want), "no {want:?} from the child");
    }
    helper.wait_line(&format!("released {edu0}"), Duration::from_secs(10))?;
    Ok(())
}

/// The child's body (as [`VMM_UID`]).
fn unprivileged_dma(sock: &str, bdf: &str) -> Result<(), Failed> {
    use vfio_gmem::dma::{DmaSpace, GuestRegion, PageState, SharedMemory, SpaceOptions};
    use vfio_gmem::engine::DmaEngine;
    use vfio_gmem::gmem::Memfd;
    use vfio_gmem::handoff::{Handoff, Request};
    use vfio_gmem::mapper::Backend;

    const PAGE: u64 = 4096;
    const GPA: u64 = 0x1_0000_0000;
    let bdf: vfio_gmem::vfio::Bdf = bdf.parse().or_fail("bdf")?;
    let mut grant = Handoff::request(
        sock,
        &Request {
            devices: vec![bdf],
            kvm: false,
        },
    )
    .or_fail("handoff")?;
    check!(
        grant.backend() == Backend::LegacyType1,
        "not the legacy path"
    );
    let uid = std::fs::read_to_string("/proc/self/status")
        .or_fail("status")?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(String::from))
        .unwrap_or_default();
    println!(
        "child: uid {uid}: received {}",
        grant
            .roles()
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let container = grant.take_container().or_fail("container")?;
    let _groups: Vec<_> = grant
        .groups()
        .into_iter()
        .map(|id| grant.take_group(id))
        .collect::<Result<_, _>>()
        .or_fail("groups")?;
    let dev = grant.take_device(bdf).or_fail("device")?;
    let mem = Memfd::new("unprivileged", 2 * PAGE).or_fail("memfd")?;
    let mut view = mem.mmap().or_fail("mmap")?;
    let mut space = DmaSpace::with_mapper(Box::new(container), None, SpaceOptions::default());
    let fd = mem.file().try_clone().or_fail("dup")?;
    space
        .add_region(
            GuestRegion::new(
                GPA,
                2 * PAGE,
                SharedMemory::File {
                    fd: fd.into(),
                    offset: 0,
                },
            )
            .convertible(PageState::Shared),
        )
        .or_fail("add_region")?;
    let edu = vfio_gmem::engine::edu::Edu::new(dev).or_fail("edu")?;
    let pattern: Vec<u8> = (0..PAGE).map(|i| (i * 7 + 1) as u8).collect();
    view.write(0, &pattern).or_fail("write")?;
    // Page 0 → device → page 1.
    edu.copy(GPA, GPA + PAGE, PAGE).or_fail("dma")?;
    check!(
        view.read_vec(PAGE as usize, PAGE as usize)
            .or_fail("read")?
            == pattern,
        "the device did not copy page 0 to page 1"
    );
    println!("child: shared page reached");
    // Page 1 private: the device's write must not land.
    space
        .convert(GPA + PAGE, PAGE, PageState::Private, false)
        .or_fail("to private")?;
    view.fill(PAGE as usize, PAGE as usize, 0xaa)
        .or_fail("fill")?;
    edu.dma_to_ram(GPA + PAGE, PAGE).or_fail("dma")?;
    check!(
        view.read_vec(PAGE as usize, PAGE as usize)
            .or_fail("read")?
            == vec![0xaa; PAGE as usize],
        "the device wrote a page converted to private"
    );
    println!("child: private page not reached");
    space
        .convert(GPA + PAGE, PAGE, PageState::Shared, false)
        .or_fail("to shared")?;
    edu.dma_to_ram(GPA + PAGE, PAGE).or_fail("dma")?;
    check!(
        view.read_vec(PAGE as usize, PAGE as usize)
            .or_fail("read")?
            == pattern,
        "the device could not write the page shared again"
    );
    println!("child: shared again, reached");
    Ok(())
}
