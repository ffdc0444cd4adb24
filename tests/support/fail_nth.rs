//! Kernel fault injection with fail-nth, as tools/testing/selftests/iommu/
//! iommufd_fail_nth.c uses it: writing N to `/proc/thread-self/fail-nth` makes the N-th
//! fault-injection check of *this thread* fail (a slab or page allocation, with failslab
//! and fail_page_alloc); reading it back gives 0 once that fault has been injected, or
//! the count still to go. An operation is swept with N = 1, 2, 3, … until it runs
//! without reaching its N-th check.

use std::cell::{Cell, RefCell};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use libtest_mimic::Failed;

use super::kmsg::Kmsg;

const DEBUGFS: &str = "/sys/kernel/debug";

/// Debugfs knobs set while injecting faults, restored on drop.
///
/// As the selftest does: every allocation may fail (`ignore-gfp-wait` = N for both
/// failslab and fail_page_alloc, `ignore-gfp-highmem` = N) and the log stays quiet
/// (`verbose` = 0). Beyond the selftest, `fail_page_alloc/min-order` = 0 so single-page
/// allocations (IOMMU page tables, pinned pages) are injection points too. Probability
/// stays 0: only fail-nth injects, and only in the thread that armed it.
pub struct FaultInjection {
    saved: Vec<(PathBuf, String)>,
}

impl FaultInjection {
    /// Mounts debugfs if needed and sets the knobs; `Err` explains what is missing.
    pub fn enable() -> Result<FaultInjection, String> {
        let root = Path::new(DEBUGFS);
        if !root.join("failslab").exists() {
            let out = std::process::Command::new("mount")
                .args(["-t", "debugfs", "debugfs", DEBUGFS])
                .output()
                .map_err(|e| format!("mount debugfs: {e}"))?;
            if !root.join("failslab").exists() {
                return Err(format!(
                    "{DEBUGFS}/failslab missing after mounting debugfs ({}); the kernel needs \
                     FAULT_INJECTION_DEBUG_FS, FAILSLAB and FAIL_PAGE_ALLOC",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        if !Path::new("/proc/thread-self/fail-nth").exists() {
            return Err("/proc/thread-self/fail-nth missing (CONFIG_FAULT_INJECTION)".into());
        }
        let mut knobs = vec![
            ("failslab/ignore-gfp-wait", "N"),
            ("fail_page_alloc/ignore-gfp-wait", "N"),
            ("fail_page_alloc/ignore-gfp-highmem", "N"),
            ("fail_page_alloc/min-order", "0"),
        ];
        let verbose: Vec<String> = fs::read_dir(root)
            .map_err(|e| format!("read {DEBUGFS}: {e}"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("fail") && root.join(n).join("verbose").exists())
            .map(|n| format!("{n}/verbose"))
            .collect();
        // VM_FAULTS_VERBOSE=2 makes the kernel log a stack trace of each injected fault.
        let level = std::env::var("VM_FAULTS_VERBOSE").unwrap_or_else(|_| "0".into());
        knobs.extend(verbose.iter().map(|k| (k.as_str(), level.as_str())));
        let mut fi = FaultInjection { saved: Vec::new() };
        for (knob, value) in knobs {
            let path = root.join(knob);
            let old = fs::read_to_string(&path).map_err(|e| format!("read {knob}: {e}"))?;
            fs::write(&path, value).map_err(|e| format!("write {value} to {knob}: {e}"))?;
            fi.saved.push((path, old.trim().to_string()));
        }
        Ok(fi)
    }
}

impl Drop for FaultInjection {
    fn drop(&mut self) {
        for (path, old) in self.saved.iter().rev() {
            let _ = fs::write(path, old);
        }
    }
}

fn gettid() -> i64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// This thread's `fail-nth` file.
pub struct FailNth {
    file: File,
    tid: i64,
}

impl FailNth {
    pub fn open() -> io::Result<FailNth> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/thread-self/fail-nth")?;
        Ok(FailNth {
            file,
            tid: gettid(),
        })
    }

    fn same_thread(&self) -> io::Result<()> {
        if gettid() != self.tid {
            return Err(io::Error::other(
                "fail-nth is per thread: armed and used on different threads",
            ));
        }
        Ok(())
    }

    /// Makes the `n`-th fault-injection check of this thread fail.
    pub fn arm(&self, n: u32) -> io::Result<()> {
        self.same_thread()?;
        self.file.write_at(n.to_string().as_bytes(), 0).map(drop)
    }

    /// Disarms; true if the armed fault was injected.
    pub fn disarm(&self) -> io::Result<bool> {
        self.same_thread()?;
        let mut buf = [0u8; 32];
        let n = self.file.read_at(&mut buf, 0)?;
        self.file.write_at(b"0", 0)?;
        let left: u32 = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| io::Error::other(format!("fail-nth reads {:?}", &buf[..n])))?;
        Ok(left == 0)
    }
}

/// What one operation's sweep found.
#[derive(Clone, Debug)]
pub struct SweepReport {
    pub op: String,
    /// Values of N at which the fault was injected inside the operation.
    pub points: u32,
    /// Of those, how many made the operation return an error.
    pub errors: u32,
    /// And how many the kernel or the library absorbed (the operation succeeded).
    pub tolerated: u32,
    /// Points at which the kernel logged a `WARNING:` (its own state went wrong).
    pub kernel_warnings: u32,
    /// Error messages by kind (first one of each kind), for the log.
    pub samples: Vec<String>,
    /// Distinct kernel warnings and what the iteration observed after them.
    pub notes: Vec<String>,
    /// Wall time of the sweep.
    pub elapsed: std::time::Duration,
}

/// Every sweep of this process, for the closing summary.
pub static REPORTS: Mutex<Vec<(String, SweepReport)>> = Mutex::new(Vec::new());

/// Arms fail-nth around exactly one operation of an iteration.
pub struct Injector<'a> {
    nth: &'a FailNth,
    kmsg: &'a RefCell<Kmsg>,
    n: u32,
    consumed: Cell<Option<bool>>,
    warnings: RefCell<Vec<String>>,
    notes: RefCell<Vec<String>>,
}

impl Injector<'_> {
    /// Runs `op` with the `n`-th fault armed on this thread; disarms before returning.
    pub fn call<T>(&self, op: impl FnOnce() -> T) -> Result<T, Failed> {
        if self.consumed.get().is_some() {
            return Err("one injected call per iteration".into());
        }
        let mut kmsg = self.kmsg.borrow_mut();
        kmsg.read_new().map_err(|e| format!("/dev/kmsg: {e}"))?;
        self.nth
            .arm(self.n)
            .map_err(|e| format!("arm fail-nth {}: {e}", self.n))?;
        let r = op();
        let consumed = self
            .nth
            .disarm()
            .map_err(|e| format!("disarm fail-nth: {e}"))?;
        self.consumed.set(Some(consumed));
        *self.warnings.borrow_mut() = kmsg.new_warnings().map_err(|e| format!("/dev/kmsg: {e}"))?;
        Ok(r)
    }

    /// After [`Injector::call`]: whether the fault was injected inside it.
    pub fn injected(&self) -> bool {
        self.consumed.get() == Some(true)
    }

    /// After [`Injector::call`]: the first `WARNING:` the kernel logged during it, if
    /// any. The kernel then says its own state is broken (e.g. an IOMMU unmap that
    /// failed although iommufd cannot handle that), so what devices reach may differ
    /// from what the IOAS holds; the iteration reports it instead of asserting it, and
    /// starts over from a fresh fixture.
    pub fn kernel_warning(&self) -> Option<String> {
        self.warnings.borrow().first().cloned()
    }

    /// Adds a line to the sweep's report.
    pub fn note(&self, line: String) {
        self.notes.borrow_mut().push(line);
    }

    /// The N of this iteration.
    pub fn n(&self) -> u32 {
        self.n
    }
}

/// Outcome of one iteration's injected call, as the iteration saw it.
pub enum Called {
    Ok,
    /// The operation failed; the message is its error.
    Err(String),
}

/// Sweeps `op_name`: runs `iteration` with N = 1, 2, … until the injected call neither
/// fails nor reaches its N-th check, at most `cap` times. Every iteration sets up its
/// own starting state, makes exactly one [`Injector::call`], checks the state after it,
/// and returns whether the call succeeded.
pub fn sweep(
    nth: &FailNth,
    op_name: &str,
    cap: u32,
    mut iteration: impl FnMut(&Injector) -> Result<Called, Failed>,
) -> Result<SweepReport, Failed> {
    let mut report = SweepReport {
        op: op_name.to_string(),
        points: 0,
        errors: 0,
        tolerated: 0,
        kernel_warnings: 0,
        samples: Vec::new(),
        notes: Vec::new(),
        elapsed: Default::default(),
    };
    let kmsg = RefCell::new(Kmsg::open().map_err(|e| format!("open /dev/kmsg: {e}"))?);
    let t0 = std::time::Instant::now();
    // VM_FAULTS_TRACE=1 names each N before it runs (to find the one that hangs or oopses).
    let trace = std::env::var_os("VM_FAULTS_TRACE").is_some();
    for n in 1..=cap {
        if trace {
            eprintln!("  {op_name}: N = {n}");
        }
        let inj = Injector {
            nth,
            kmsg: &kmsg,
            n,
            consumed: Cell::new(None),
            warnings: RefCell::new(Vec::new()),
            notes: RefCell::new(Vec::new()),
        };
        let called = iteration(&inj).map_err(|e| {
            Failed::from(format!(
                "{op_name}, fault injected at check {n}: {}",
                e.message().unwrap_or("failed")
            ))
        })?;
        let consumed = inj
            .consumed
            .get()
            .ok_or_else(|| format!("{op_name}: iteration {n} made no injected call"))?;
        if let Some(w) = inj.kernel_warning() {
            if !consumed {
                return Err(
                    format!("{op_name}: kernel warning with no fault injected: {w}").into(),
                );
            }
            report.kernel_warnings += 1;
        }
        for line in inj.notes.take() {
            if report.notes.len() < 8 && !report.notes.contains(&line) {
                report.notes.push(line);
            }
        }
        match (consumed, called) {
            (false, Called::Ok) => {
                report.elapsed = t0.elapsed();
                return Ok(report);
            }
            (false, Called::Err(e)) => {
                return Err(format!(
                    "{op_name}: failed with no fault injected (N = {n} not reached): {e}"
                )
                .into())
            }
            (true, Called::Ok) => report.tolerated += 1,
            (true, Called::Err(e)) => {
                report.errors += 1;
                // Keep one sample per distinct message shape (digits stripped).
                let shape: String = e.chars().filter(|c| !c.is_ascii_digit()).collect();
                if report.samples.len() < 8
                    && !report
                        .samples
                        .iter()
                        .any(|s| s.chars().filter(|c| !c.is_ascii_digit()).eq(shape.chars()))
                {
                    report.samples.push(e);
                }
            }
        }
        report.points += 1;
    }
    Err(
        format!("{op_name}: still reaching injected faults after {cap} checks; raise the cap")
            .into(),
    )
}
