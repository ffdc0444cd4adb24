//! The watched kernel: an executor around the fake kernel that checks the safety rules
//! after every call and injects the chosen failure.

#[allow(unused_imports)]
use super::*;

#[derive(Clone, Copy, Debug)]
pub(crate) struct View {
    pub(crate) id: RegionId,
    pub(crate) gpa: u64,
    pub(crate) iova: u64,
    pub(crate) len: u64,
}

/// The fake kernel behind an executor that checks the safety invariants after every call.
pub(crate) struct Watch<'a> {
    pub(crate) k: &'a mut FakeKernel,
    pub(crate) views: Vec<View>,
    /// IOVA that must stay mapped throughout (mapped before, shared after).
    pub(crate) keep: RangeSet,
    pub(crate) sabotage: Sabotage,
}

impl Watch<'_> {
    pub(crate) fn view(&self, id: RegionId) -> View {
        *self
            .views
            .iter()
            .find(|v| v.id == id)
            .unwrap_or_else(|| panic!("kernel area of unknown {id}"))
    }

    /// Every invariant over the whole kernel state (before and after a plan).
    pub(crate) fn check_all(&self, when: &str) {
        let mapped = self.k.mapped();
        for r in self.keep.iter() {
            assert!(
                mapped.contains_range(r.clone()),
                "{when}: IOVA {r:?}, mapped before and shared after, is unmapped"
            );
        }
        for a in self.k.areas() {
            let v = self.view(a.region);
            assert!(
                a.iova >= v.iova && a.iova + a.len <= v.iova + v.len,
                "{when}: area {a:?} outside its region {v:?}"
            );
            assert_eq!(
                a.iova - v.iova,
                a.offset,
                "{when}: area {a:?} maps the wrong offset"
            );
            let gpa = v.gpa + a.offset;
            assert!(
                !self.k.private().intersects(gpa..gpa + a.len),
                "{when}: area {a:?} maps a page private in KVM ({:?})",
                self.k.private()
            );
        }
    }

    /// True if any page of the IOVA range is mapped.
    pub(crate) fn any_mapped(&self, r: Range<u64>) -> bool {
        r.step_by(P as usize).any(|iova| self.k.is_mapped(iova))
    }
}

/// Each call is checked where it can have an effect (its own range), so a plan of many
/// calls stays cheap to watch; [`Watch::check_all`] runs before and after the plan.
impl Executor for Watch<'_> {
    fn map(&mut self, op: &MapOp) -> Result<(), OpError> {
        let r = self.k.map(op);
        if r.is_ok() {
            let v = self.view(op.region);
            assert!(
                op.iova >= v.iova
                    && op.iova + op.len <= v.iova + v.len
                    && op.iova - v.iova == op.offset,
                "{op:?} maps outside its region {v:?} or the wrong offset"
            );
            let gpa = v.gpa + op.offset;
            assert!(
                !self.k.private().intersects(gpa..gpa + op.len),
                "{op:?} maps a page private in KVM ({:?})",
                self.k.private()
            );
        }
        r
    }

    fn unmap(&mut self, op: &UnmapOp) -> Result<u64, OpError> {
        if self.sabotage == Sabotage::SkipUnmaps {
            return Ok(op.expected_bytes());
        }
        let r = self.k.unmap(op);
        for piece in self.keep.clipped(op.iova..op.iova + op.len) {
            assert!(
                piece
                    .clone()
                    .step_by(P as usize)
                    .all(|iova| self.k.is_mapped(iova)),
                "{op:?} unmaps IOVA in {piece:?}, mapped before and shared after"
            );
        }
        r
    }

    fn set_attributes(&mut self, op: &AttributesOp) -> Result<(), OpError> {
        if self.sabotage == Sabotage::SkipSharedAttributes && !op.private {
            return Ok(());
        }
        let r = self.k.set_attributes(op);
        if r.is_ok() && op.private {
            for v in &self.views {
                let (s, e) = (op.gpa.max(v.gpa), (op.gpa + op.len).min(v.gpa + v.len));
                if s < e {
                    let iova = v.iova + (s - v.gpa)..v.iova + (e - v.gpa);
                    assert!(
                        !self.any_mapped(iova.clone()),
                        "{op:?} makes GPA [{s:#x}, {e:#x}) private while IOVA {iova:x?} is mapped"
                    );
                }
            }
        }
        r
    }

    fn discard(&mut self, op: &DiscardOp) -> Result<(), OpError> {
        let v = self.view(op.region);
        let gpa = v.gpa + op.offset;
        assert_eq!(gpa, op.gpa, "discard {op:?}: GPA and offset disagree");
        assert!(
            self.k.private().contains_range(gpa..gpa + op.len),
            "discard {op:?} of pages not private in KVM"
        );
        let iova = v.iova + op.offset;
        assert!(
            !self.any_mapped(iova..iova + op.len),
            "discard {op:?} of pages still mapped"
        );
        self.k.discard(op)
    }
}
