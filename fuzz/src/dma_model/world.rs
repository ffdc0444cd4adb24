//! The world: tracker, fake kernel and model stepped together, and the checks after each
//! step.

#[allow(unused_imports)]
use super::*;

pub(crate) struct World {
    pub(crate) mem: Tracker,
    pub(crate) k: FakeKernel,
    pub(crate) model: Model,
    /// Specs of removed regions, for registering them again.
    pub(crate) retired: Vec<RegionSpec>,
    pub(crate) sabotage: Sabotage,
    pub(crate) sum: Summary,
}

/// A fault as injected: op index, errno, and whether a second one may hit the rollback.
pub(crate) type Injected = Option<(u64, i32, bool)>;

impl World {
    /// Runs `plan` through the watched kernel with `fault` injected.
    pub(crate) fn exec(
        &mut self,
        plan: &Plan,
        keep: RangeSet,
        extra: Option<View>,
        fault: Option<Fault>,
    ) -> (Result<Stats, ExecError>, Injected) {
        self.k.clear_faults();
        let n = plan.ops().len() as u64;
        let mut injected = None;
        if let Some(f) = fault {
            let at = f.at % (n + 1);
            if at < n {
                let base = self.k.calls();
                self.k.fail_call(base + at, f.errno);
                if let Some((j, errno)) = f.second {
                    self.k.fail_call(base + at + 1 + j, errno);
                }
                injected = Some((at, f.errno, f.second.is_some()));
            }
        }
        let mut views: Vec<View> = self.model.regions.iter().map(MRegion::view).collect();
        views.extend(extra);
        let mut watch = Watch {
            k: &mut self.k,
            views,
            keep,
            sabotage: self.sabotage,
        };
        watch.check_all("before the plan");
        let r = execute(plan, &mut watch);
        watch.check_all("after the plan");
        self.k.clear_faults();
        (r, injected)
    }

    pub(crate) fn check_success(&self, plan: &Plan, stats: &Stats, injected: Injected) {
        if let Some((at, errno, _)) = injected {
            panic!("op {at} was made to fail with errno {errno}, yet the plan succeeded");
        }
        assert_eq!(stats.ioctls, plan.ops().len() as u64, "calls != ops");
        assert_eq!(
            stats.unmap_size_mismatches, 0,
            "kernel unmapped other byte counts"
        );
        assert_eq!(plan.areas_after(), self.k.area_count(), "plan's area count");
    }

    /// Checks a failed execution against the fault injected, then reconciles.
    pub(crate) fn failed(&mut self, plan: Plan, e: &ExecError, injected: Injected) {
        let (at, errno, second) =
            injected.unwrap_or_else(|| panic!("plan failed without an injected fault: {e}"));
        assert_eq!(e.op_index as u64, at, "failed at another op: {e}");
        assert_eq!(e.error.errno, errno, "failed with another errno: {e}");
        let msg = e.to_string();
        self.sum.faults += 1;
        match &e.outcome {
            Outcome::RolledBack => {
                assert!(msg.contains("rolled back"), "{msg}");
                self.sum.rolled_back += 1;
            }
            Outcome::NotDiscarded { .. } => {
                assert!(matches!(plan.ops()[at as usize], Op::Discard(_)), "{msg}");
                assert!(msg.contains("not discarded"), "{msg}");
                self.sum.not_discarded += 1;
            }
            Outcome::RollbackFailed { state, .. } => {
                assert!(second, "a single fault left a failed rollback: {msg}");
                check_touched(&self.k, state);
                assert!(msg.contains("reconcile"), "{msg}");
                self.sum.rollback_failed += 1;
            }
        }
        self.mem.reconcile(plan, e).expect("reconcile a fresh plan");
        let ta: Vec<Area> = self.mem.areas().copied().collect();
        let ka: Vec<Area> = self.k.areas().copied().collect();
        assert_eq!(
            ta, ka,
            "tracker areas != kernel areas after reconcile: {msg}"
        );
        for r in self.mem.regions() {
            let tracker: RangeSet = r.runs(r.gpa_range(), PageState::Private).collect();
            let kernel: RangeSet = self.k.private().clipped(r.gpa_range()).collect();
            assert_eq!(
                tracker, kernel,
                "tracker attributes != KVM after reconcile: {msg}"
            );
        }
    }

    pub(crate) fn batch(&mut self, reqs: Vec<ConversionRequest>, fault: Option<Fault>) {
        self.sum.steps += 1;
        self.sum.requests += reqs.len() as u64;
        let expected = self.model.expected_batch_error(&reqs);
        let (generation, calls) = (self.mem.generation(), self.k.calls());
        let plan = match self.mem.plan_batch(&reqs) {
            Err(e) => {
                assert_eq!(
                    Some(error_key(&e)),
                    expected,
                    "planner refused {reqs:x?}: {e}"
                );
                assert!(!e.to_string().is_empty());
                assert_eq!((self.mem.generation(), self.k.calls()), (generation, calls));
                self.sum.plan_errors += 1;
                return;
            }
            Ok(p) => p,
        };
        assert_eq!(expected, None, "planner accepted {reqs:x?}");
        assert_eq!(plan.areas_before(), self.mem.area_count());
        let mut after = self.model.clone();
        after.apply(&reqs);
        let keep = intersect(&self.k.mapped(), &after.mapped_iova());
        let (r, injected) = self.exec(&plan, keep, None, fault);
        match r {
            Ok(stats) => {
                self.check_success(&plan, &stats, injected);
                self.mem.commit(plan).expect("commit a fresh plan");
                self.model = after;
                self.check_discards(&reqs, &RangeSet::new());
                self.sum.batches += 1;
            }
            Err(e) => {
                self.failed(plan, &e, injected);
                match &e.outcome {
                    Outcome::RolledBack => self.check_world("rolled back batch"),
                    Outcome::NotDiscarded { ranges } => {
                        self.model = after;
                        self.check_discards(&reqs, ranges);
                        self.sum.batches += 1;
                    }
                    Outcome::RollbackFailed { .. } => {
                        let again = self
                            .mem
                            .plan_batch(&reqs)
                            .expect("the batch plans again after a failed rollback");
                        let keep = intersect(&self.k.mapped(), &after.mapped_iova());
                        let (r, _) = self.exec(&again, keep, None, None);
                        let stats = r.unwrap_or_else(|e| panic!("repair failed: {e}"));
                        self.check_success(&again, &stats, None);
                        self.mem.commit(again).expect("commit a fresh plan");
                        self.model = after;
                        self.sum.batches += 1;
                    }
                }
            }
        }
        self.check_world("batch");
    }

    /// Every discard requested and not reported failed reached the kernel.
    pub(crate) fn check_discards(&self, reqs: &[ConversionRequest], failed: &RangeSet) {
        for q in reqs.iter().filter(|q| q.discard) {
            for r in &self.model.regions {
                let (s, e) = (q.gpa.max(r.gpa()), (q.gpa + q.len).min(r.end()));
                if s >= e {
                    continue;
                }
                let done = self.k.discarded(r.id);
                for g in failed.gaps(s..e) {
                    let off = g.start - r.gpa()..g.end - r.gpa();
                    assert!(
                        done.is_some_and(|d| d.contains_range(off.clone())),
                        "discard of {} offsets {off:x?} missing",
                        r.id
                    );
                }
            }
        }
    }

    pub(crate) fn register(&mut self, spec: RegionSpec, fault: Option<Fault>) {
        self.sum.steps += 1;
        let expected = self.model.expected_register_error(&spec);
        if expected.is_none() && spec.len / P > MAX_REGION_PAGES {
            return; // valid, but too large for the page-array model
        }
        let (generation, calls) = (self.mem.generation(), self.k.calls());
        let plan = match self.mem.plan_register(spec) {
            Err(e) => {
                assert_eq!((self.mem.generation(), self.k.calls()), (generation, calls));
                assert_eq!(
                    Some(error_key(&e)),
                    expected,
                    "planner refused {spec:x?}: {e}"
                );
                assert!(!e.to_string().is_empty());
                self.sum.plan_errors += 1;
                return;
            }
            Ok(p) => p,
        };
        assert_eq!(expected, None, "planner accepted {spec:x?}");
        let id = plan.registered_region().expect("a registration plan");
        assert!(self.mem.region(id).is_none(), "{id} reused");
        // The tracker assumes the KVM attributes already match the initial state.
        let private = spec.initial == PageState::Private;
        self.k
            .set_attributes(&AttributesOp {
                gpa: spec.gpa,
                len: spec.len,
                private,
            })
            .expect("set initial attributes");
        let new = MRegion {
            id,
            spec,
            iova: spec.iova().expect("validated"),
            private: vec![private; (spec.len / P) as usize],
        };
        let view = new.view();
        let mut after = self.model.clone();
        after.insert(new);
        let keep = self.k.mapped();
        let (r, injected) = self.exec(&plan, keep, Some(view), fault);
        match r {
            Ok(stats) => {
                self.check_success(&plan, &stats, injected);
                self.mem.commit(plan).expect("commit a fresh plan");
                self.model = after;
                self.sum.registered += 1;
            }
            Err(e) => {
                self.failed(plan, &e, injected);
                match &e.outcome {
                    Outcome::RolledBack => {
                        assert!(
                            self.mem.region(id).is_none(),
                            "rolled back {id} still registered"
                        );
                    }
                    Outcome::NotDiscarded { .. } => panic!("a registration has no discard: {e}"),
                    Outcome::RollbackFailed { .. } => {
                        // Some areas stayed: the tracker keeps the region; remove it.
                        if self.mem.region(id).is_some() {
                            let plan = self.mem.plan_deregister(id).expect("registered");
                            let keep = self.model.mapped_iova();
                            let (r, _) = self.exec(&plan, keep, Some(view), None);
                            let stats = r.unwrap_or_else(|e| panic!("cleanup failed: {e}"));
                            self.check_success(&plan, &stats, None);
                            self.mem.commit(plan).expect("commit a fresh plan");
                        }
                        assert!(self.mem.region(id).is_none());
                    }
                }
            }
        }
        self.check_world("register");
    }

    pub(crate) fn deregister_unknown(&mut self) {
        self.sum.steps += 1;
        let id = RegionId(u64::MAX);
        let e = self.mem.plan_deregister(id).expect_err("no such region");
        assert_eq!(error_key(&e), format!("UnknownRegion {id}"));
    }

    pub(crate) fn deregister(&mut self, i: usize, fault: Option<Fault>) {
        self.sum.steps += 1;
        let r = self.model.regions[i].clone();
        let plan = self.mem.plan_deregister(r.id).expect("registered");
        let mut after = self.model.clone();
        after.remove(r.id);
        let keep = intersect(&self.k.mapped(), &after.mapped_iova());
        let (res, injected) = self.exec(&plan, keep, None, fault);
        let done = match res {
            Ok(stats) => {
                self.check_success(&plan, &stats, injected);
                self.mem.commit(plan).expect("commit a fresh plan");
                true
            }
            Err(e) => {
                self.failed(plan, &e, injected);
                match &e.outcome {
                    Outcome::RolledBack => {
                        assert!(
                            self.mem.region(r.id).is_some(),
                            "rolled back, yet {} is gone",
                            r.id
                        );
                        false
                    }
                    Outcome::NotDiscarded { .. } => panic!("a removal has no discard: {e}"),
                    Outcome::RollbackFailed { .. } => {
                        if self.mem.region(r.id).is_some() {
                            let plan = self.mem.plan_deregister(r.id).expect("registered");
                            let keep = intersect(&self.k.mapped(), &after.mapped_iova());
                            let (res, _) = self.exec(&plan, keep, None, None);
                            let stats = res.unwrap_or_else(|e| panic!("cleanup failed: {e}"));
                            self.check_success(&plan, &stats, None);
                            self.mem.commit(plan).expect("commit a fresh plan");
                        }
                        true
                    }
                }
            }
        };
        if done {
            assert!(self.mem.region(r.id).is_none(), "{} still registered", r.id);
            self.model = after;
            self.retired.push(r.spec);
            self.sum.deregistered += 1;
        }
        self.check_world("deregister");
    }

    /// Kernel == tracker == model.
    pub(crate) fn check_world(&self, step: &str) {
        let ta: Vec<Area> = self.mem.areas().copied().collect();
        let ka: Vec<Area> = self.k.areas().copied().collect();
        assert_eq!(ta, ka, "{step}: tracker areas != kernel areas");
        assert_eq!(
            self.k.mapped(),
            self.model.mapped_iova(),
            "{step}: mapped IOVA != the model's shared pages"
        );
        let tracker: Vec<(RegionId, Range<u64>, Range<u64>)> = self
            .mem
            .regions()
            .map(|r| (r.id, r.gpa_range(), r.iova_range()))
            .collect();
        let model: Vec<(RegionId, Range<u64>, Range<u64>)> = self
            .model
            .regions
            .iter()
            .map(|r| (r.id, r.gpa()..r.end(), r.iova_range()))
            .collect();
        assert_eq!(tracker, model, "{step}: tracker regions != model regions");
        let model_private = self.model.private_gpa();
        let kernel_private: RangeSet = self
            .model
            .regions
            .iter()
            .flat_map(|r| {
                self.k
                    .private()
                    .clipped(r.gpa()..r.end())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            kernel_private, model_private,
            "{step}: KVM attributes != model"
        );
        let tracker_private: RangeSet = self
            .mem
            .regions()
            .flat_map(|r| {
                r.runs(r.gpa_range(), PageState::Private)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            tracker_private, model_private,
            "{step}: tracker attributes != model"
        );
        for r in &self.model.regions {
            let areas: Vec<&Area> = self.k.areas().filter(|a| a.region == r.id).collect();
            match r.spec.strategy {
                Strategy::Whole => assert!(
                    areas.len() == 1 && areas[0].len == r.spec.len,
                    "{step}: Whole {} has areas {areas:?}",
                    r.id
                ),
                Strategy::PerGranule => {
                    for a in areas {
                        assert!(
                            a.len == r.spec.granule && a.offset % r.spec.granule == 0,
                            "{step}: area {a:?} of {} is not one granule",
                            r.id
                        );
                    }
                }
                Strategy::Cut => {}
            }
        }
    }
}

/// The state a failed rollback reports is the kernel's.
pub(crate) fn check_touched(k: &FakeKernel, s: &TouchedState) {
    let mapped = k.mapped();
    for r in s.mapped.iter() {
        assert!(mapped.contains_range(r.clone()), "reported mapped {r:?}");
    }
    for r in s.unmapped.iter() {
        assert!(!mapped.intersects(r.clone()), "reported unmapped {r:?}");
    }
    for r in s.private.iter() {
        assert!(
            k.private().contains_range(r.clone()),
            "reported private {r:?}"
        );
    }
    for r in s.shared.iter() {
        assert!(!k.private().intersects(r.clone()), "reported shared {r:?}");
    }
}
