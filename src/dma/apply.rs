//! Plan-execute-record in one call, for callers that need nothing in between.

use super::driver::{execute, Stats};
use super::error::DmaError;
use super::executor::Executor;
use super::memory::GuestMemory;
use super::model::{PageState, RegionId, RegionSpec};
use super::plan::{ConversionRequest, Plan};

impl GuestMemory {
    /// Executes `plan` and records the result: commit on success, reconcile on failure.
    ///
    /// ```
    /// use vfio_gmem::dma::*;
    /// let (mut mem, mut k) = (GuestMemory::new(), FakeKernel::new());
    /// let plan = mem.plan_register(RegionSpec::new(0, 8192, Backing::Opaque(0))).unwrap();
    /// let stats = mem.run(plan, &mut k).unwrap();
    /// assert_eq!((stats.maps, stats.areas_after), (1, 1));
    /// ```
    pub fn run<E: Executor + ?Sized>(
        &mut self,
        plan: Plan,
        exec: &mut E,
    ) -> Result<Stats, DmaError> {
        match execute(&plan, exec) {
            Ok(stats) => {
                self.commit(plan)?;
                Ok(stats)
            }
            Err(e) => {
                self.reconcile(plan, &e)?;
                Err(e.into())
            }
        }
    }

    /// Registers a region and maps its shared pages.
    ///
    /// ```
    /// use vfio_gmem::dma::*;
    /// let (mut mem, mut k) = (GuestMemory::new(), FakeKernel::new());
    /// let id = mem.register(RegionSpec::new(0, 1 << 21, Backing::Opaque(0)), &mut k).unwrap();
    /// assert_eq!(mem.region(id).unwrap().gpa_range(), 0..1 << 21);
    /// ```
    pub fn register<E: Executor + ?Sized>(
        &mut self,
        spec: RegionSpec,
        exec: &mut E,
    ) -> Result<RegionId, DmaError> {
        let plan = self.plan_register(spec)?;
        let id = plan.registered_region().expect("registration plan");
        self.run(plan, exec)?;
        Ok(id)
    }

    /// Unmaps a region and forgets it.
    ///
    /// ```
    /// use vfio_gmem::dma::*;
    /// let (mut mem, mut k) = (GuestMemory::new(), FakeKernel::new());
    /// let id = mem.register(RegionSpec::new(0, 1 << 21, Backing::Opaque(0)), &mut k).unwrap();
    /// mem.deregister(id, &mut k).unwrap();
    /// assert_eq!(mem.regions().count(), 0);
    /// ```
    pub fn deregister<E: Executor + ?Sized>(
        &mut self,
        id: RegionId,
        exec: &mut E,
    ) -> Result<Stats, DmaError> {
        let plan = self.plan_deregister(id)?;
        self.run(plan, exec)
    }

    /// Converts `[gpa, gpa+len)` to `to`.
    ///
    /// ```
    /// use vfio_gmem::dma::*;
    /// let (mut mem, mut k) = (GuestMemory::new(), FakeKernel::new());
    /// mem.register(RegionSpec::new(0, 1 << 21, Backing::Opaque(0)), &mut k).unwrap();
    /// mem.convert(0x3000, 0x1000, PageState::Private, &mut k).unwrap();
    /// assert!(!k.is_mapped(0x3000) && k.is_mapped(0x4000));
    /// ```
    pub fn convert<E: Executor + ?Sized>(
        &mut self,
        gpa: u64,
        len: u64,
        to: PageState,
        exec: &mut E,
    ) -> Result<Stats, DmaError> {
        let plan = self.plan_convert(gpa, len, to)?;
        self.run(plan, exec)
    }

    /// Converts a batch of ranges as one plan.
    ///
    /// ```
    /// use vfio_gmem::dma::*;
    /// let (mut mem, mut k) = (GuestMemory::new(), FakeKernel::new());
    /// mem.register(RegionSpec::new(0, 1 << 21, Backing::Opaque(0)), &mut k).unwrap();
    /// let reqs = [ConversionRequest::new(0, 0x1000, PageState::Private),
    ///             ConversionRequest::new(0x8000, 0x1000, PageState::Private)];
    /// let stats = mem.convert_batch(&reqs, &mut k).unwrap();
    /// assert_eq!(stats.unmaps, 2);
    /// ```
    pub fn convert_batch<E: Executor + ?Sized>(
        &mut self,
        requests: &[ConversionRequest],
        exec: &mut E,
    ) -> Result<Stats, DmaError> {
        let plan = self.plan_batch(requests)?;
        self.run(plan, exec)
    }
}
