//! What running a plan reports, as data: the counters ([`Stats`]), an executor call's
//! error ([`OpError`]), and where a failed plan left things ([`ExecError`], [`Outcome`]).
//! The tracker reads these to record the truth; nothing here runs anything.

use std::fmt;
use std::io;
use std::sync::Arc;

use super::error::PlanError;
use super::ops::Op;
use super::ranges::{fmt_ranges, RangeSet};

/// Counters of one plan execution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Executor calls issued (successful, failed and undo calls).
    pub ioctls: u64,
    /// Successful map calls.
    pub maps: u64,
    /// Successful unmap calls.
    pub unmaps: u64,
    /// Successful attribute calls.
    pub attribute_changes: u64,
    /// Successful discard calls.
    pub discards: u64,
    /// Live IOMMU areas before the plan (tracker's count).
    pub areas_before: usize,
    /// Live IOMMU areas the plan leaves when it succeeds (tracker's count).
    pub areas_after: usize,
    /// Bytes mapped by successful map calls.
    pub bytes_mapped: u64,
    /// Bytes the executor reported unmapped.
    pub bytes_unmapped: u64,
    /// Unmaps whose reported byte count differed from the plan's expectation.
    pub unmap_size_mismatches: u64,
}

impl Stats {
    /// Adds `other`'s counters to `self`, keeping `self.areas_before` and taking
    /// `other.areas_after` (for summing consecutive plans).
    ///
    /// ```
    /// use vfio_gmem::dma::Stats;
    /// let mut total = Stats { areas_before: 1, areas_after: 2, ioctls: 3, ..Stats::default() };
    /// total.accumulate(&Stats { areas_before: 2, areas_after: 5, ioctls: 4, ..Stats::default() });
    /// assert_eq!((total.ioctls, total.areas_before, total.areas_after), (7, 1, 5));
    /// ```
    pub fn accumulate(&mut self, other: &Stats) {
        self.ioctls += other.ioctls;
        self.maps += other.maps;
        self.unmaps += other.unmaps;
        self.attribute_changes += other.attribute_changes;
        self.discards += other.discards;
        self.areas_after = other.areas_after;
        self.bytes_mapped += other.bytes_mapped;
        self.bytes_unmapped += other.bytes_unmapped;
        self.unmap_size_mismatches += other.unmap_size_mismatches;
    }
}

/// An executor call failed with an OS error number; the executor's explanation, if it
/// has one, is the error's `source()` (the kernel executor's is typed: the iommufd,
/// mapper or KVM error that says what to do).
///
/// Two `OpError`s are equal if their errnos are: the explanation is for people.
///
/// ```
/// use vfio_gmem::dma::OpError;
/// let e = OpError::from_errno(libc::ENOENT);
/// assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
/// let io = std::io::Error::from_raw_os_error(libc::EBUSY);
/// let e = OpError::with_cause(libc::EBUSY, io);
/// assert!(std::error::Error::source(&e).is_some());
/// assert_eq!(e, OpError::from_errno(libc::EBUSY));
/// ```
#[derive(Debug, Clone)]
pub struct OpError {
    /// The `errno` value.
    pub errno: i32,
    cause: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        io::Error::from_raw_os_error(self.errno).fmt(f)
    }
}

impl std::error::Error for OpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The cause itself, not the `Arc` around it (so it downcasts to its type).
        let cause: &(dyn std::error::Error + 'static) = self.cause.as_deref()?;
        Some(cause)
    }
}

impl PartialEq for OpError {
    fn eq(&self, other: &Self) -> bool {
        self.errno == other.errno
    }
}

impl Eq for OpError {}

impl OpError {
    /// From a raw `errno`.
    pub fn from_errno(errno: i32) -> Self {
        OpError { errno, cause: None }
    }

    /// From a raw `errno` and the error that explains it (kept as the `source()`).
    pub fn with_cause(errno: i32, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        OpError {
            errno,
            cause: Some(Arc::new(cause)),
        }
    }

    /// The explanation of the failure, if the executor gave one.
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.cause.as_deref()
    }

    /// The `io::ErrorKind` of the errno.
    pub fn kind(&self) -> io::ErrorKind {
        io::Error::from_raw_os_error(self.errno).kind()
    }
}

impl From<io::Error> for OpError {
    fn from(e: io::Error) -> Self {
        OpError::with_cause(e.raw_os_error().unwrap_or(libc::EIO), e)
    }
}

/// State of the pages a failed plan touched, as far as its applied calls determine it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TouchedState {
    /// IOVA ranges that are mapped now.
    pub mapped: RangeSet,
    /// IOVA ranges that are unmapped now.
    pub unmapped: RangeSet,
    /// GPA ranges whose KVM attributes are private now.
    pub private: RangeSet,
    /// GPA ranges whose KVM attributes are shared now.
    pub shared: RangeSet,
}

impl fmt::Display for TouchedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IOVA mapped: {}; IOVA unmapped: {}; GPA private: {}; GPA shared: {}",
            fmt_ranges(self.mapped.iter()),
            fmt_ranges(self.unmapped.iter()),
            fmt_ranges(self.private.iter()),
            fmt_ranges(self.shared.iter())
        )
    }
}

/// Where a failed plan left the system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every applied call was undone: the touched pages are as before the plan.
    RolledBack,
    /// Undoing also failed; rollback stopped at `op` (its index in the plan) to keep every
    /// page safe, and `state` lists what the touched pages are now.
    RollbackFailed {
        /// Index in the plan of the op whose undo failed.
        op: usize,
        /// The undo call that failed.
        undo: Op,
        /// Its error.
        error: OpError,
        /// Current state of the pages the plan touched.
        state: Box<TouchedState>,
    },
    /// Everything but some discards succeeded: these GPA ranges are private (unmapped,
    /// attributes set) but their shared backing still holds memory.
    NotDiscarded {
        /// GPA ranges whose discard failed.
        ranges: RangeSet,
    },
}

/// A plan failed while executing.
///
/// Pass it to [`Tracker::reconcile`](crate::dma::planning::Tracker::reconcile) so the
/// tracker records the real state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ExecError {
    /// Index in the plan of the op that failed first.
    pub op_index: usize,
    /// That op.
    pub op: Op,
    /// Its error (also the `source()`).
    #[source]
    pub error: OpError,
    /// What the system looks like now.
    pub outcome: Outcome,
    /// Counters of the calls made, undo calls included.
    pub stats: Stats,
    /// Calls that took effect, in order (forward and undo), for the tracker to replay.
    pub(crate) applied: Vec<Op>,
}

impl ExecError {
    /// The OS error kind of the first failure.
    pub fn kind(&self) -> io::ErrorKind {
        self.error.kind()
    }

    /// Calls that took effect, in order, including undo calls.
    pub fn applied(&self) -> &[Op] {
        &self.applied
    }

    fn describe(&self) -> String {
        let head = format!("op {} ({}) failed: {}", self.op_index, self.op, self.error);
        match &self.outcome {
            Outcome::RolledBack => {
                format!("{head}; rolled back, the range is in its previous state")
            }
            Outcome::RollbackFailed {
                op,
                undo,
                error,
                state,
            } => format!(
                "{head}; undoing op {op} ({undo}) also failed: {error}; rollback stopped there, \
                 leaving no page reachable by a device while private. Now: {state}. \
                 Call Tracker::reconcile to record this state, then convert again to repair"
            ),
            Outcome::NotDiscarded { ranges } => format!(
                "{head}; GPA {} are private and unmapped but their shared backing was not \
                 discarded (still holds memory); retry the discard",
                fmt_ranges(ranges.iter())
            ),
        }
    }
}

/// Either failure of a plan-and-run helper.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// Refused before any call was made.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Failed while running; the tracker was reconciled.
    #[error(transparent)]
    Exec(Box<ExecError>),
}

impl From<ExecError> for DmaError {
    fn from(e: ExecError) -> Self {
        DmaError::Exec(Box::new(e))
    }
}
