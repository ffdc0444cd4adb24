//! `vfio-gmem assign BDF... --memory SIZE`: creates guest memory, assigns the devices to
//! one DMA space, prints the memory map, then applies conversion commands read from stdin
//! (`crate::control`), one answer per command. Ends on end of input, `quit`, SIGINT
//! or SIGTERM, tearing everything down.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::control::{Command, HELP};
use serde::Serialize;
use serde_json::json;
use vfio_gmem::dma::{CutSupport, DmaSpace, PageState, RegionReport, Stats};

use crate::errors::require_root;
use crate::setup::{Layout, Session};
use crate::table::{human_bytes, range, Table};
use crate::{AssignArgs, HugePageArg};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag the command loop polls.
fn install_signal_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask is well
        // formed; the handler only stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Counters of one operation, as answered to the user.
#[derive(Debug, Serialize)]
pub struct StatsOut {
    pub ioctls: u64,
    pub maps: u64,
    pub unmaps: u64,
    pub attribute_changes: u64,
    pub discards: u64,
    pub bytes_mapped: u64,
    pub bytes_unmapped: u64,
    pub areas: usize,
}

impl From<&Stats> for StatsOut {
    fn from(s: &Stats) -> Self {
        StatsOut {
            ioctls: s.ioctls,
            maps: s.maps,
            unmaps: s.unmaps,
            attribute_changes: s.attribute_changes,
            discards: s.discards,
            bytes_mapped: s.bytes_mapped,
            bytes_unmapped: s.bytes_unmapped,
            areas: s.areas_after,
        }
    }
}

/// The memory map as a table.
pub fn render_map(regions: &[RegionReport]) -> String {
    let mut t = Table::new([
        "REGION", "GPA", "IOVA", "SIZE", "STRATEGY", "SHARED", "PRIVATE", "AREAS", "PATH",
    ]);
    for r in regions {
        t.row([
            r.id.0.to_string(),
            range(r.gpa, r.len),
            format!("{:#x}", r.iova),
            human_bytes(r.len),
            r.strategy.to_string(),
            human_bytes(r.shared_bytes),
            human_bytes(r.private_bytes),
            r.areas.to_string(),
            r.path.to_string(),
        ]);
    }
    t.render()
}

fn totals(space: &DmaSpace) -> (u64, u64) {
    space.regions().iter().fold((0, 0), |(s, p), r| {
        (s + r.shared_bytes, p + r.private_bytes)
    })
}

/// One answer: `Ok((human text, JSON))` or `Err(message)`.
type Answer = Result<(String, serde_json::Value), String>;

/// Applies one command to the space. `Quit` is handled by the caller.
pub fn answer(space: &mut DmaSpace, cmd: &Command) -> Answer {
    match *cmd {
        Command::Private { gpa, len, discard } => {
            convert(space, cmd, gpa, len, PageState::Private, discard)
        }
        Command::Shared { gpa, len } => convert(space, cmd, gpa, len, PageState::Shared, false),
        Command::Status => {
            let (shared, private) = totals(space);
            let t = StatsOut::from(space.totals());
            let text = format!(
                "status: shared {}, private {}, {} areas live, {} ioctls so far ({} maps, {} unmaps, {} attribute calls)",
                human_bytes(shared),
                human_bytes(private),
                space.area_count(),
                t.ioctls,
                t.maps,
                t.unmaps,
                t.attribute_changes
            );
            // Areas the kernel took away behind our back (patched kernels revoke a
            // guest_memfd mapping before the file loses pages): reported, never hidden.
            let revoked = space.revoked().map_err(|e| e.to_string())?;
            let mut text = text;
            for r in &revoked {
                text.push_str(&format!("\nrevoked: {r}"));
            }
            let j = json!({"ok": true, "command": "status", "shared_bytes": shared,
                           "private_bytes": private, "areas": space.area_count(), "totals": t,
                           "revoked": revoked});
            Ok((text, j))
        }
        Command::Map => {
            let regions = space.regions();
            let text = render_map(&regions).trim_end().to_string();
            Ok((
                text,
                json!({"ok": true, "command": "map", "regions": regions}),
            ))
        }
        Command::Help => Ok((
            HELP.to_string(),
            json!({"ok": true, "command": "help", "help": HELP}),
        )),
        Command::Quit => Ok(("bye".into(), json!({"ok": true, "command": "quit"}))),
    }
}

fn convert(
    space: &mut DmaSpace,
    cmd: &Command,
    gpa: u64,
    len: u64,
    to: PageState,
    discard: bool,
) -> Answer {
    let stats = space
        .convert(gpa, len, to, discard)
        .map_err(|e| e.to_string())?;
    let s = StatsOut::from(&stats);
    let text = format!(
        "ok: {} is {to}: {} unmap, {} map, {} attribute, {} discard call(s); {} areas live",
        range(gpa, len),
        s.unmaps,
        s.maps,
        s.attribute_changes,
        s.discards,
        space.area_count()
    );
    let j = json!({"ok": true, "command": cmd.to_string(), "gpa": gpa, "len": len,
                   "state": to.to_string(), "stats": s, "areas": space.area_count()});
    Ok((text, j))
}

/// Where the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Eof,
    Quit,
    Signal,
}

/// Reads lines from `input` until end of input, `quit` or a signal, answering each on
/// stdout. Returns why it stopped.
pub fn command_loop(
    space: &mut DmaSpace,
    input: impl BufRead + Send + 'static,
    json: bool,
    out: &mut dyn std::io::Write,
) -> std::io::Result<End> {
    // A reader thread keeps the loop free to notice signals while stdin blocks.
    let (tx, rx) = mpsc::channel::<Option<String>>();
    std::thread::spawn(move || {
        for line in input.lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    let mut n = 0u64;
    loop {
        if STOP.load(Ordering::SeqCst) {
            return Ok(End::Signal);
        }
        let line = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(l)) => l,
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(End::Eof),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
        };
        n += 1;
        let cmd = match Command::parse(&line) {
            Ok(None) => continue,
            Ok(Some(c)) => c,
            Err(e) => {
                if json {
                    writeln!(
                        out,
                        "{}",
                        json!({"ok": false, "line": n, "input": line, "error": e.to_string()})
                    )?;
                } else {
                    writeln!(out, "error: line {n}: {e}")?;
                }
                out.flush()?;
                continue;
            }
        };
        let reply = answer(space, &cmd);
        match reply {
            Ok((text, j)) => {
                if json {
                    writeln!(out, "{j}")?;
                } else {
                    writeln!(out, "{text}")?;
                }
            }
            Err(e) => {
                if json {
                    writeln!(
                        out,
                        "{}",
                        json!({"ok": false, "line": n, "command": cmd.to_string(), "error": e})
                    )?;
                } else {
                    writeln!(out, "error: line {n}: {cmd}: {e}")?;
                }
            }
        }
        out.flush()?;
        if cmd == Command::Quit {
            return Ok(End::Quit);
        }
    }
}

pub fn run(args: &AssignArgs, json: bool) -> anyhow::Result<()> {
    require_root(
        "assign",
        "it opens VFIO devices, /dev/iommu and /dev/kvm and pins guest memory",
    )?;
    let m = &args.memory;
    let layout = Layout {
        size: m.memory,
        gpa: m.gpa,
        backing: m.backing,
        huge_page: m.huge_page_size.map(HugePageArg::size),
        confidential: m.confidential,
        convertible: None,
    };
    install_signal_handlers()?;
    let mut session = Session::open(&args.devices, m.iommu, &layout)?;
    let devices: Vec<String> = session
        .devices
        .iter()
        .map(|(d, _)| d.bdf.to_string())
        .collect();
    let regions = session.space.regions();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json {
        let j = json!({"ok": true, "event": "ready", "backend": session.backend,
                       "devices": devices, "memory": session.memory,
                       "cut": session.space.cut_support(), "regions": regions});
        writeln!(out, "{j}")?;
    } else {
        let mem = &session.memory;
        writeln!(
            out,
            "assigned {} through {}; memory: {} of {}{}{}, {}",
            devices.join(", "),
            session.backend,
            human_bytes(mem.size),
            mem.shared_backing,
            mem.private_backing
                .as_ref()
                .map(|p| format!(" (shared) + {p} (private)"))
                .unwrap_or_default(),
            mem.vm_type
                .as_ref()
                .map(|t| format!(", {t} VM"))
                .unwrap_or_default(),
            match &mem.initial {
                Some(s) => format!("convertible, initially {s}"),
                None => "not convertible".into(),
            }
        )?;
        if let Some(note) = &mem.note {
            writeln!(out, "note: {note}")?;
        }
        let cut = match session.space.cut_support() {
            CutSupport::Verified => "compat cut, verified with the device attached".to_string(),
            CutSupport::NativeSplit { huge_pages, why } => format!(
                "native split, verified with the device attached, huge pages {} ({why})",
                if *huge_pages { "on" } else { "off" }
            ),
            CutSupport::Unavailable(why) => format!("unavailable ({why}); per-granule areas"),
            CutSupport::NotProbed => "not probed".to_string(),
        };
        writeln!(out, "area cutting: {cut}")?;
        write!(out, "{}", render_map(&regions))?;
        writeln!(
            out,
            "ready: one command per line on stdin (`help` lists them)"
        )?;
    }
    out.flush()?;
    drop(out);
    let stdin = std::io::BufReader::new(std::io::stdin());
    let end = command_loop(
        &mut session.space,
        stdin,
        json,
        &mut std::io::stdout().lock(),
    )?;
    let reason = match end {
        End::Eof => "end of input",
        End::Quit => "quit",
        End::Signal => "signal",
    };
    let summary = session.teardown()?;
    if json {
        println!(
            "{}",
            json!({"ok": true, "event": "exit", "reason": reason, "teardown": summary})
        );
    } else {
        eprintln!("vfio-gmem: {reason}: {summary}");
    }
    Ok(())
}
