//! Binding whole IOMMU groups to vfio-pci through `driver_override`, and giving them back.
//!
//! The previous driver of every member we move is written to a small state file (default
//! `/run/vfio-gmem/previous-drivers`) *before* the member is touched, so an `unbind` in
//! another process, or after a crash, can restore it. `/run` is a tmpfs: the file vanishes
//! on reboot, exactly when the bindings it describes vanish.
//!
//! Before anything moves, the rules of [`super::host`] apply: only endpoints move (bridges
//! stay, a bridge named directly is [`VfioError::NotAssignable`]), and a group member that
//! backs something live on the host (a mounted filesystem, swap, a stacked block device,
//! an interface carrying addresses or routes, the console) makes the bind fail with
//! [`VfioError::HostInUse`], changing nothing, unless forced ([`BindOptions::force`]).
//! Force never moves the device the root filesystem lives on.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::error::{Result, VfioError};
use super::host::{decide, HostInspector, HostUse, Inventory, Verdict};
use super::sysfs::{is_vfio_driver, PciDevice, PciSysfs, BENIGN_DRIVERS, VFIO_PCI};
use super::Bdf;

/// Default location of the previous-driver records.
pub const DEFAULT_STATE_FILE: &str = "/run/vfio-gmem/previous-drivers";

/// What `bind` does with one group member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberAction {
    /// Already bound to vfio-pci (or a variant): nothing to do.
    AlreadyVfio {
        /// The member.
        bdf: Bdf,
    },
    /// Left alone: a bridge or a driver that does no DMA of its own (pcieport, pci-stub).
    Leave {
        /// The member.
        bdf: Bdf,
        /// Its driver, which it keeps (`None`: no driver).
        driver: Option<String>,
    },
    /// Moved to vfio-pci; `from` is the driver it leaves and `from_override` its
    /// `driver_override` (both restored by unbind).
    Rebind {
        /// The member.
        bdf: Bdf,
        /// The driver it leaves (`None`: it had none).
        from: Option<String>,
        /// Its `driver_override` before the bind.
        from_override: Option<String>,
    },
}

/// The members of one IOMMU group and what `bind` will do with each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindPlan {
    /// The IOMMU group number.
    pub group: u32,
    /// One action per member, in BDF order.
    pub actions: Vec<MemberAction>,
    /// What the host uses the members to be moved for. From [`Binder::plan`]: the uses
    /// that make a bind refuse unless forced; from a forced [`Binder::bind_with`]: the uses
    /// it overrode. Empty from [`plan_group`], which does not look at the host.
    pub host_uses: Vec<HostUse>,
}

/// How [`Binder::bind_with`] treats host uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindOptions {
    /// Move members even though the host uses them (mounted filesystems, swap, network
    /// interfaces carrying traffic, the console): what is overridden comes back in
    /// [`BindPlan::host_uses`]. Never overrides the root filesystem's device.
    pub force: bool,
}

/// What a member had before `bind` moved it: restored by `unbind`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Previous {
    /// The driver it was bound to (`None`: no driver).
    pub driver: Option<String>,
    /// Its `driver_override` (`None`: unset).
    pub driver_override: Option<String>,
}

/// One member given back by `unbind`, and the driver it now has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The member given back.
    pub bdf: Bdf,
    /// The driver recorded at bind time (`None`: it was unbound, or nothing was recorded).
    pub previous: Option<String>,
    /// The driver bound after the restore.
    pub now: Option<String>,
}

/// Binds and unbinds devices, group by group.
///
/// ```no_run
/// use vfio_gmem::vfio::Binder;
/// let binder = Binder::new();
/// let plan = binder.bind("0000:00:03.0".parse()?)?;
/// println!("group {}: {:?}", plan.group, plan.actions);
/// // ... use the device through VFIO ...
/// for r in binder.unbind("0000:00:03.0".parse()?)? {
///     println!("{} back to {:?}", r.bdf, r.now);
/// }
/// # Ok::<(), vfio_gmem::vfio::VfioError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Binder {
    sysfs: PciSysfs,
    state: PathBuf,
    proc_root: PathBuf,
    host: HostInspector,
}

impl Default for Binder {
    fn default() -> Self {
        Self::new()
    }
}

impl Binder {
    /// The live system, with records in [`DEFAULT_STATE_FILE`].
    pub fn new() -> Self {
        Self::with(PciSysfs::new(), DEFAULT_STATE_FILE)
    }

    /// A binder over another sysfs tree and state file (tests, or a non-root runtime dir).
    ///
    /// ```
    /// use vfio_gmem::vfio::{Binder, PciSysfs};
    /// let b = Binder::with(PciSysfs::with_roots("/tmp/s", "/tmp/d"), "/tmp/state");
    /// assert_eq!(b.state_file(), std::path::Path::new("/tmp/state"));
    /// ```
    pub fn with(sysfs: PciSysfs, state: impl Into<PathBuf>) -> Self {
        Binder {
            host: HostInspector::with_roots(sysfs.sys_root(), "/proc", "/dev"),
            sysfs,
            state: state.into(),
            proc_root: "/proc".into(),
        }
    }

    /// Reads the host's uses through `host` (fixture trees in tests).
    pub fn with_host(mut self, host: HostInspector) -> Self {
        self.host = host;
        self
    }

    /// The inspector of host uses this binder consults.
    pub fn host(&self) -> &HostInspector {
        &self.host
    }

    /// Where previous drivers are recorded.
    pub fn state_file(&self) -> &Path {
        &self.state
    }

    /// What `bind(bdf)` would do, without changing anything.
    ///
    /// ```no_run
    /// use vfio_gmem::vfio::Binder;
    /// let plan = Binder::new().plan("0000:00:03.0".parse()?)?;
    /// println!("{plan:?}");
    /// # Ok::<(), vfio_gmem::vfio::VfioError>(())
    /// ```
    pub fn plan(&self, bdf: Bdf) -> Result<BindPlan> {
        let inv = self
            .host
            .inventory()
            .map_err(|source| VfioError::HostInspection { bdf, source })?;
        self.plan_with(bdf, &inv)
    }

    /// [`plan`](Self::plan) against an inventory already read (one read for many devices).
    pub fn plan_with(&self, bdf: Bdf, inv: &Inventory) -> Result<BindPlan> {
        let dev = self.sysfs.device(bdf)?;
        if !dev.nature().is_endpoint() {
            return Err(VfioError::NotAssignable {
                bdf,
                nature: dev.nature(),
            });
        }
        let group = dev.iommu_group.ok_or(VfioError::NoIommuGroup { bdf })?;
        let mut plan = plan_group(group, &self.sysfs.group_members(group)?)?;
        plan.host_uses = plan.moved().flat_map(|m| inv.uses(m)).collect();
        Ok(plan)
    }

    /// Binds every member of `bdf`'s IOMMU group to vfio-pci (bridges and benign drivers
    /// stay). Refuses, changing nothing, if the host uses a member it would move (see
    /// [`bind_with`](Self::bind_with) to force). If any member fails to move, the members
    /// already moved go back to their drivers.
    pub fn bind(&self, bdf: Bdf) -> Result<BindPlan> {
        self.bind_with(bdf, BindOptions::default())
    }

    /// [`bind`](Self::bind) with options: `force` overrides every host use except the root
    /// filesystem's device; the plan returned lists what was overridden.
    ///
    /// ```no_run
    /// use vfio_gmem::vfio::{BindOptions, Binder, VfioError};
    /// match Binder::new().bind_with("0000:00:05.0".parse()?, BindOptions { force: false }) {
    ///     Err(VfioError::HostInUse { uses, forceable, .. }) => {
    ///         for u in uses { eprintln!("in use: {u}"); }
    ///         eprintln!("forceable: {forceable}");
    ///     }
    ///     other => { other?; }
    /// }
    /// # Ok::<(), VfioError>(())
    /// ```
    pub fn bind_with(&self, bdf: Bdf, opts: BindOptions) -> Result<BindPlan> {
        let _lock = StateLock::take(&self.state)?;
        let mut plan = self.plan(bdf)?;
        plan.host_uses = check_host_uses(bdf, &plan, opts)?;
        let ops = SysfsOps(&self.sysfs);
        let mut state = StateFile::load(&self.state)?;
        apply_bind(&ops, &plan, &mut state)?;
        Ok(plan)
    }

    /// Unbinds `bdf`'s group members from vfio-pci and restores the drivers recorded at
    /// bind time. Members bound to vfio-pci by someone else (no record) are left alone,
    /// except `bdf` itself, which is handed to the kernel's default driver. Refuses with
    /// [`VfioError::InUse`], changing nothing, if a member's VFIO node is open (the
    /// kernel's unbind would block until it is closed).
    pub fn unbind(&self, bdf: Bdf) -> Result<Vec<Restored>> {
        let _lock = StateLock::take(&self.state)?;
        let dev = self.sysfs.device(bdf)?;
        let members = match dev.iommu_group {
            Some(g) => self.sysfs.group_members(g)?,
            None => vec![dev],
        };
        let mut state = StateFile::load(&self.state)?;
        let targets: Vec<&PciDevice> = members
            .iter()
            .filter(|m| m.is_vfio_bound() && (m.bdf == bdf || state.get(m.bdf).is_some()))
            .collect();
        for m in &targets {
            self.check_not_in_use(m)?;
        }
        // Records of members that are no longer vfio-bound are stale: drop them.
        for m in &members {
            if !m.is_vfio_bound() {
                state.remove(m.bdf);
            }
        }
        let ops = SysfsOps(&self.sysfs);
        let mut out = Vec::new();
        for m in targets {
            let record = state.get(m.bdf).cloned();
            restore(&ops, m.bdf, m.driver.as_deref(), record.as_ref())?;
            let previous = record.and_then(|r| r.driver);
            state.remove(m.bdf);
            state.save()?;
            out.push(Restored {
                bdf: m.bdf,
                previous,
                now: ops.driver(m.bdf)?,
            });
        }
        state.save()?;
        Ok(out)
    }

    /// Fails with [`VfioError::InUse`] if `dev`'s VFIO cdev or group node is open.
    pub fn check_not_in_use(&self, dev: &PciDevice) -> Result<()> {
        let mut nodes: Vec<PathBuf> = dev.vfio_cdev.iter().cloned().collect();
        if let Some(g) = dev.iommu_group {
            nodes.push(self.sysfs.group_node(g));
        }
        if let Some(pid) = find_opener(&self.proc_root, &nodes) {
            return Err(VfioError::InUse {
                what: format!("{} ({})", dev.bdf, nodes[0].display()),
                pid: Some(pid),
            });
        }
        // A group node that refuses a second open is held by a legacy user or by a
        // cdev bound to iommufd (possibly in another mount namespace).
        if let Some(g) = dev.iommu_group {
            let node = self.sysfs.group_node(g);
            match fs::OpenOptions::new().read(true).write(true).open(&node) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(VfioError::InUse {
                        what: format!("{} (IOMMU group {g})", dev.bdf),
                        pid: None,
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The host-use rule on a plan: `Ok` with the uses overridden (empty when there are none),
/// or [`VfioError::HostInUse`].
pub fn check_host_uses(bdf: Bdf, plan: &BindPlan, opts: BindOptions) -> Result<Vec<HostUse>> {
    match decide(plan.host_uses.clone(), opts.force) {
        Verdict::Clear => Ok(Vec::new()),
        Verdict::Overridden(uses) => Ok(uses),
        Verdict::Refused { uses, forceable } => Err(VfioError::HostInUse {
            bdf,
            group: plan.group,
            uses,
            forceable,
        }),
    }
}

impl BindPlan {
    /// The members this plan moves to vfio-pci.
    pub fn moved(&self) -> impl Iterator<Item = Bdf> + '_ {
        self.actions.iter().filter_map(|a| match a {
            MemberAction::Rebind { bdf, .. } => Some(*bdf),
            _ => None,
        })
    }
}

/// Decides what `bind` does with each member. Only endpoints move: bridges (host, ISA/LPC,
/// PCI-to-PCI, root ports) stay, and fail the plan if bound to a driver that keeps the
/// group non-viable. Does not look at host uses ([`Binder::plan`] does).
pub fn plan_group(group: u32, members: &[PciDevice]) -> Result<BindPlan> {
    let mut actions = Vec::new();
    for m in members {
        let driver = m.driver.clone();
        let action = match driver.as_deref() {
            Some(d) if is_vfio_driver(d) => MemberAction::AlreadyVfio { bdf: m.bdf },
            Some(d) if BENIGN_DRIVERS.contains(&d) => MemberAction::Leave { bdf: m.bdf, driver },
            _ if !m.nature().is_endpoint() => match driver {
                None => MemberAction::Leave { bdf: m.bdf, driver },
                Some(d) => {
                    return Err(VfioError::BridgeKeepsGroup {
                        group,
                        member: m.bdf,
                        driver: d,
                    })
                }
            },
            _ => MemberAction::Rebind {
                bdf: m.bdf,
                from: driver,
                from_override: m.driver_override.clone(),
            },
        };
        actions.push(action);
    }
    Ok(BindPlan {
        group,
        actions,
        host_uses: Vec::new(),
    })
}

/// Kernel driver-model operations on one device. The real implementation writes sysfs;
/// tests substitute a model of the kernel.
pub(crate) trait DriverOps {
    fn driver(&self, bdf: Bdf) -> Result<Option<String>>;
    /// Sets (`Some`) or clears (`None`) `driver_override`.
    fn set_override(&self, bdf: Bdf, driver: Option<&str>) -> Result<()>;
    fn unbind(&self, bdf: Bdf) -> Result<()>;
    /// Lets the kernel pick a driver (`drivers_probe`).
    fn probe(&self, bdf: Bdf) -> Result<()>;
}

struct SysfsOps<'a>(&'a PciSysfs);

fn write_sysfs(path: PathBuf, value: &str) -> Result<()> {
    fs::write(&path, value).map_err(|e| VfioError::sysfs(path, e))
}

impl DriverOps for SysfsOps<'_> {
    fn driver(&self, bdf: Bdf) -> Result<Option<String>> {
        Ok(self.0.device(bdf)?.driver)
    }
    fn set_override(&self, bdf: Bdf, driver: Option<&str>) -> Result<()> {
        // An empty write (a lone newline) clears the override.
        let path = self.0.device_dir(bdf).join("driver_override");
        write_sysfs(path, driver.unwrap_or("\n"))
    }
    fn unbind(&self, bdf: Bdf) -> Result<()> {
        write_sysfs(
            self.0.device_dir(bdf).join("driver/unbind"),
            &bdf.to_string(),
        )
    }
    fn probe(&self, bdf: Bdf) -> Result<()> {
        write_sysfs(self.0.drivers_probe(), &bdf.to_string())
    }
}

/// Executes a bind plan; on failure, undoes the members already moved (in reverse order)
/// and returns the first error.
pub(crate) fn apply_bind(
    ops: &dyn DriverOps,
    plan: &BindPlan,
    state: &mut StateFile,
) -> Result<()> {
    let mut done: Vec<(Bdf, Previous)> = Vec::new();
    for action in &plan.actions {
        let MemberAction::Rebind {
            bdf,
            from,
            from_override,
        } = action
        else {
            continue;
        };
        let prev = Previous {
            driver: from.clone(),
            driver_override: from_override.clone(),
        };
        // Record first: if we die half-way, a later unbind still knows what to restore.
        // A member to move is not vfio-bound now, so any older record for it is stale.
        state.set(*bdf, prev.clone());
        state.save()?;
        done.push((*bdf, prev));
        if let Err(e) = move_to_vfio(ops, *bdf, from.as_deref()) {
            for (b, prev) in done.iter().rev() {
                let cur = ops.driver(*b).ok().flatten();
                // Best effort: the original error is what the caller needs to see.
                let _ = restore(ops, *b, cur.as_deref(), Some(prev));
                state.remove(*b);
            }
            let _ = state.save();
            return Err(e);
        }
    }
    Ok(())
}

fn move_to_vfio(ops: &dyn DriverOps, bdf: Bdf, from: Option<&str>) -> Result<()> {
    ops.set_override(bdf, Some(VFIO_PCI))?;
    if from.is_some() {
        ops.unbind(bdf)?;
    }
    ops.probe(bdf)?;
    match ops.driver(bdf)? {
        Some(d) if is_vfio_driver(&d) => Ok(()),
        other => Err(VfioError::Unsupported(format!(
            "{bdf}: vfio-pci did not take the device after probe (driver now {}); is vfio-pci built in or loaded (modprobe vfio-pci)?",
            other.as_deref().unwrap_or("none")
        ))),
    }
}

/// Gives `bdf` back: leave `current`, then bind the recorded driver and put back the
/// recorded `driver_override`. The recorded driver is forced through a temporary override
/// (it may have owned the device only through one); if it cannot take the device (e.g. a
/// module since unloaded), the kernel chooses. With no record, the override is cleared
/// and the kernel chooses.
fn restore(
    ops: &dyn DriverOps,
    bdf: Bdf,
    current: Option<&str>,
    previous: Option<&Previous>,
) -> Result<()> {
    if current.is_some() {
        ops.unbind(bdf)?;
    }
    let Some(prev) = previous else {
        ops.set_override(bdf, None)?;
        return ops.probe(bdf);
    };
    if let Some(d) = prev.driver.as_deref() {
        ops.set_override(bdf, Some(d))?;
        ops.probe(bdf)?;
        if ops.driver(bdf)?.as_deref() == Some(d) {
            return ops.set_override(bdf, prev.driver_override.as_deref());
        }
    }
    ops.set_override(bdf, prev.driver_override.as_deref())?;
    if prev.driver.is_some() {
        ops.probe(bdf)?;
    }
    Ok(())
}

/// An exclusive advisory lock (`flock`) on `<state>.lock`, held for a whole bind or
/// unbind so that two processes do not interleave their sysfs writes and records.
struct StateLock {
    _file: fs::File,
}

impl StateLock {
    fn take(state: &Path) -> Result<StateLock> {
        let path = state.with_extension("lock");
        let err = |e| VfioError::sysfs(&path, e);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(err)?;
        }
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(err)?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own; no memory is passed. The lock is released
        // when the file is closed (dropped).
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(StateLock { _file: f })
    }
}

/// The previous-driver records: one line per moved device,
/// `<bdf>\t<driver>\t<driver_override>`, `-` for "none" (driver names may contain spaces,
/// e.g. "i6300ESB timer", hence tabs).
#[derive(Debug)]
pub(crate) struct StateFile {
    path: PathBuf,
    entries: BTreeMap<Bdf, Previous>,
}

impl StateFile {
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(VfioError::sysfs(path, e)),
        };
        Ok(StateFile {
            path: path.to_path_buf(),
            entries: parse_state(&text),
        })
    }
    pub(crate) fn get(&self, bdf: Bdf) -> Option<&Previous> {
        self.entries.get(&bdf)
    }
    pub(crate) fn set(&mut self, bdf: Bdf, prev: Previous) {
        self.entries.insert(bdf, prev);
    }
    pub(crate) fn remove(&mut self, bdf: Bdf) {
        self.entries.remove(&bdf);
    }
    /// Writes the records atomically (temp file + rename).
    pub(crate) fn save(&self) -> Result<()> {
        let err = |e| VfioError::sysfs(&self.path, e);
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = self.path.with_extension("tmp");
        fs::write(&tmp, format_state(&self.entries)).map_err(err)?;
        fs::rename(&tmp, &self.path).map_err(err)
    }
}

fn parse_state(text: &str) -> BTreeMap<Bdf, Previous> {
    let field = |f: Option<&str>| {
        f.map(str::trim)
            .filter(|f| !f.is_empty() && *f != "-")
            .map(str::to_string)
    };
    text.lines()
        .filter_map(|l| {
            let mut it = l.split('\t');
            let bdf = it.next()?.trim().parse().ok()?;
            let driver = it.next()?;
            Some((
                bdf,
                Previous {
                    driver: field(Some(driver)),
                    driver_override: field(it.next()),
                },
            ))
        })
        .collect()
}

fn format_state(entries: &BTreeMap<Bdf, Previous>) -> String {
    entries
        .iter()
        .map(|(b, p)| {
            format!(
                "{b}\t{}\t{}\n",
                p.driver.as_deref().unwrap_or("-"),
                p.driver_override.as_deref().unwrap_or("-")
            )
        })
        .collect()
}

/// The first pid (other than none) with one of `nodes` open, by scanning `/proc/*/fd`.
/// Includes this process. Processes we may not inspect are skipped.
fn find_opener(proc_root: &Path, nodes: &[PathBuf]) -> Option<u32> {
    let nodes: Vec<PathBuf> = nodes.iter().filter(|n| n.exists()).cloned().collect();
    if nodes.is_empty() {
        return None;
    }
    for entry in fs::read_dir(proc_root).ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                if nodes.contains(&target) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
