//! The built `vfio-gmem` binary on the host: usage errors exit 2, `--help` exits 0, and
//! the commands that need no device run and print what they document.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_vfio-gmem");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run vfio-gmem")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn usage_errors_exit_2_with_a_hint() {
    for (args, needle) in [
        (&["bind"][..], "required"),
        (&["bind", "zz:03.0"], "is not a PCI address"),
        (&["unbind", "0000:00:03.9"], "is not a PCI address"),
        (&["probe", "--device", "nonsense"], "is not a PCI address"),
        (&["assign", "00:03.0"], "--memory"),
        (
            &["assign", "00:03.0", "--memory", "1000"],
            "multiple of 4 KiB",
        ),
        (
            &["assign", "00:03.0", "--memory", "1G", "--iommu", "vfio"],
            "possible values",
        ),
        (&["selftest"], "required"),
        (&["frobnicate"], "unrecognized subcommand"),
        (&[], "Usage"),
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn help_and_version_exit_0() {
    let o = run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    for word in [
        "probe",
        "list",
        "bind",
        "unbind",
        "assign",
        "selftest",
        "Exit codes",
        "--json",
    ] {
        assert!(out.contains(word), "--help lacks {word}: {out}");
    }
    let o = run(&["assign", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("--confidential") && out.contains("--backing"),
        "{out}"
    );
    assert_eq!(run(&["--version"]).status.code(), Some(0));
}

#[test]
fn list_json_is_an_array() {
    let o = run(&["--json", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert!(v.is_array(), "{v}");
}

#[test]
fn probe_json_has_every_answer_and_a_verdict() {
    let o = run(&["probe", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    for key in [
        "iommufd",
        "vfio_cdev",
        "legacy_type1",
        "map_file_memfd",
        "map_file_guest_memfd",
        "cut_unmap",
    ] {
        assert!(v[key]["evidence"]["kind"].is_string(), "{key}: {v}");
    }
    assert!(v["verdict"]["summary"].is_string(), "{v}");
    assert!(v["kernel"].is_string(), "{v}");
}

#[test]
fn unknown_device_exits_1_and_says_what_to_do() {
    let o = run(&["--json", "probe", "--device", "0000:7f:1f.7"]);
    // Without /dev/iommu the device is not needed; with it, it must exist.
    if std::path::Path::new("/dev/iommu").exists() {
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("no PCI device 0000:7f:1f.7"),
            "{}",
            stderr(&o)
        );
    }
    let o = run(&["bind", "0000:7f:1f.7"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("no PCI device 0000:7f:1f.7") || e.contains("must run as root"),
        "{e}"
    );
    assert!(e.contains("vfio-gmem list") || e.contains("sudo"), "{e}");
}

/// As an unprivileged user (root drops to nobody with setpriv), root-only commands say so.
#[test]
fn root_only_commands_say_so() {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let setpriv = std::path::Path::new("/usr/bin/setpriv").exists();
    for args in [
        &["bind", "0000:00:00.0"][..],
        &["unbind", "0000:00:00.0"],
        &["assign", "0000:00:00.0", "--memory", "2M"],
        &["selftest", "0000:00:00.0"],
    ] {
        let o = if root {
            if !setpriv {
                eprintln!("skipped: no setpriv to drop privileges");
                return;
            }
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
                .args(args)
                .output()
                .unwrap()
        } else {
            run(args)
        };
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains(&format!("`vfio-gmem {}` must run as root", args[0])),
            "{args:?}: {e}"
        );
    }
}

/// `helper` refuses to start without being told whom to serve (before touching any
/// device), and its usage errors are clap's.
#[test]
fn helper_serves_nobody_by_default() {
    let o = run(&["helper", "--socket", "/tmp/x.sock", "--device", "00:03.0"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--allow-uid UID and/or --allow-gid GID"),
        "{}",
        stderr(&o)
    );
    assert!(!std::path::Path::new("/tmp/x.sock").exists());
    let o = run(&["helper", "--socket", "/tmp/x.sock", "--allow-uid", "1000"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "--device is required: {}",
        stderr(&o)
    );
    let o = run(&["helper", "--device", "00:03.0", "--allow-uid", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}
