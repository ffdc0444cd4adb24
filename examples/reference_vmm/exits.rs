//! The VMM's answers to vCPU exits, and the story they print.

use kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE;
use vfio_gmem::dma::{DmaSpace, PageState, SpaceError, Stats};

use crate::edu::{self, PAGE};
use crate::guest::*;
use crate::{trace, vm};
use vfio_gmem::engine::edu::Edu;
use vfio_gmem::engine::DmaEngine;

/// IOVA = GPA + this: keeps device addresses away from IOVA 0 and shows that the
/// device's view need not equal the guest's.
pub const IOVA_OFFSET: u64 = 0x1_0000_0000;
/// `-KVM_EINVAL` for a refused conversion (include/uapi/linux/kvm_para.h).
const KVM_EINVAL: u64 = 22;

/// What the guest reports, in order (see `guest::program`).
pub const EXPECTED_REPORTS: [(u8, &str); 7] = [
    (0, "B equals A after the device copy"),
    (0, "hypercall A → private returned 0"),
    (
        0,
        "A still holds the guest's private data after the device's refused write",
    ),
    (0, "hypercall A → shared returned 0"),
    (0, "A holds the device's data"),
    (0, "hypercall window → private returned 0"),
    (
        0,
        "the window read completed from shared memory (discarded: zero)",
    ),
];

/// Prints the story and counts failed checks.
pub struct Story {
    pub failures: usize,
}

impl Story {
    pub fn line(&self, kind: &str, text: impl AsRef<str>) {
        println!("{kind:<8} {}", text.as_ref());
    }
    pub fn check(&mut self, ok: bool, what: impl AsRef<str>) {
        if ok {
            self.line("check", format!("ok: {}", what.as_ref()));
        } else {
            self.failures += 1;
            self.line("check", format!("FAILED: {}", what.as_ref()));
        }
    }
}

pub struct Vmm {
    pub story: Story,
    pub space: DmaSpace,
    pub edu: Edu,
    pub vm: vm::Vm,
    pub reports: usize,
    pub hypercalls: usize,
    pub memory_faults: usize,
    pub doorbells: usize,
    pub last_fault: Option<u64>,
    /// `--peer`: the backend process registered as a conversion listener.
    pub backend: Option<crate::peer::Backend>,
}

impl Vmm {
    fn iova(gpa: u64) -> u64 {
        gpa + IOVA_OFFSET
    }

    /// RAM at `iova` → the device buffer (one page). The device reports completion even
    /// when the IOMMU refused the access; callers check memory.
    fn read_ram(&self, iova: u64) -> Result<(), String> {
        self.edu.dma_from_ram(iova, PAGE).map_err(|e| e.to_string())
    }

    /// The device buffer → RAM at `iova` (one page).
    fn write_ram(&self, iova: u64) -> Result<(), String> {
        self.edu.dma_to_ram(iova, PAGE).map_err(|e| e.to_string())
    }

    pub fn io_out(&mut self, port: u16, value: u8) -> Result<(), String> {
        match port {
            DOORBELL => {
                self.doorbells += 1;
                self.story.line(
                    "exit",
                    format!("io-out port={port:#x} value={value} (doorbell)"),
                );
                self.doorbell(value)
            }
            REPORT => {
                let (want, what) = EXPECTED_REPORTS
                    .get(self.reports)
                    .copied()
                    .unwrap_or((0, "(no report expected here)"));
                self.reports += 1;
                self.story.line(
                    "exit",
                    format!("io-out port={port:#x} value={value:#x} (report)"),
                );
                self.story.check(
                    value == want && self.reports <= EXPECTED_REPORTS.len(),
                    format!("guest report {value:#x}, expected {want:#x}: {what}"),
                );
                Ok(())
            }
            _ => Err(format!(
                "the guest wrote {value:#x} to unknown port {port:#x}"
            )),
        }
    }

    /// `KVM_HC_MAP_GPA_RANGE`: convert, keeping the IOMMU in step; the return value goes
    /// to the guest's RAX.
    pub fn hypercall(&mut self, nr: u64, args: [u64; 6]) -> u64 {
        self.hypercalls += 1;
        let (gpa, pages, attrs) = (args[0], args[1], args[2]);
        // Bits 0-1 are a page-size hint; bit 4 is the only state bit.
        if nr != KVM_HC_MAP_GPA_RANGE || attrs & !(KVM_MAP_GPA_RANGE_ENCRYPTED | 3) != 0 {
            self.story.check(
                false,
                format!("unsupported hypercall nr={nr} attrs={attrs:#x}"),
            );
            return KVM_EINVAL.wrapping_neg();
        }
        let to = if attrs & KVM_MAP_GPA_RANGE_ENCRYPTED != 0 {
            PageState::Private
        } else {
            PageState::Shared
        };
        match self.convert(gpa, pages.saturating_mul(PAGE), to) {
            Ok(()) => 0,
            Err(e) => {
                self.story.check(false, format!("conversion refused: {e}"));
                KVM_EINVAL.wrapping_neg()
            }
        }
    }

    /// `KVM_EXIT_MEMORY_FAULT`: the access (private if the flag is set) cannot be served
    /// in the page's current state. On SNP/TDX the flag says what the guest wanted, and
    /// the answer is to convert to it ("implicit conversion"). A SW_PROTECTED VM has no
    /// way to say: KVM takes privateness from the attributes, so the only fault is a
    /// private access KVM cannot back (no guest_memfd in the memslot). KVM's own advice
    /// there is to make the memory shared, which is what happens here.
    pub fn memory_fault(&mut self, flags: u64, gpa: u64, size: u64) -> Result<(), String> {
        self.memory_faults += 1;
        let private = flags & u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0;
        self.story.line(
            "exit",
            format!(
                "memory-fault gpa={gpa:#x} size={size:#x} flags={flags:#x} ({} access)",
                if private { "private" } else { "shared" }
            ),
        );
        if self.last_fault == Some(gpa) {
            return Err(format!(
                "the guest faulted twice at {gpa:#x}; the conversion did not help"
            ));
        }
        self.last_fault = Some(gpa);
        let wanted = if private {
            PageState::Private
        } else {
            PageState::Shared
        };
        let to = if self.space.page_state(gpa) == Some(wanted) {
            self.story.line("note", format!("{gpa:#x} is already {wanted}: KVM has no private backing for it, so it goes back to shared"));
            PageState::Shared
        } else {
            wanted
        };
        let start = gpa & !(PAGE - 1);
        let len = (gpa + size.max(1)).next_multiple_of(PAGE) - start;
        self.convert(start, len, to)
            .map_err(|e| format!("answering the memory fault: {e}"))
    }

    /// Converts through the DMA space, then checks from the kernel-call trace that the
    /// calls came in the safe order.
    fn convert(&mut self, gpa: u64, len: u64, to: PageState) -> Result<(), SpaceError> {
        self.story
            .line("convert", format!("GPA [{gpa:#x}, +{len:#x}) to {to}"));
        trace::take();
        let s: Stats = self.space.convert(gpa, len, to, to == PageState::Private)?;
        self.story.line(
            "iommu",
            format!(
                "unmaps={} maps={} bytes_unmapped={:#x} bytes_mapped={:#x} ioctls={} areas {}→{}",
                s.unmaps,
                s.maps,
                s.bytes_unmapped,
                s.bytes_mapped,
                s.ioctls,
                s.areas_before,
                s.areas_after
            ),
        );
        self.story.line(
            "kvm",
            format!(
                "attribute_changes={} discards={}",
                s.attribute_changes, s.discards
            ),
        );
        let calls = trace::take();
        let first = |what: &str| calls.iter().position(|c| c.starts_with(what));
        let (unmap, attrs, discard, map) = (
            first("IOMMU unmap"),
            first("KVM attributes"),
            first("discard"),
            first("IOMMU map"),
        );
        match to {
            PageState::Private => self.story.check(
                unmap < attrs && attrs < discard && map.is_none() && unmap.is_some(),
                "order: IOMMU unmap, then KVM attributes, then discard",
            ),
            PageState::Shared => self.story.check(
                attrs < map && attrs.is_some() && unmap.is_none(),
                "order: KVM attributes, then IOMMU map",
            ),
        }
        if let Some(backend) = &self.backend {
            let (released, granted) = (first("backend released"), first("backend granted"));
            match to {
                PageState::Private => self.story.check(
                    released.is_some() && released < unmap && granted.is_none(),
                    "order: the backend released the pages before the IOMMU unmap (so before KVM attributes and discard)",
                ),
                PageState::Shared => self.story.check(
                    map.is_some() && map < granted && released.is_none(),
                    "order: the backend was granted the pages after the IOMMU map",
                ),
            }
            backend.check_in_step(&self.space, &mut self.story);
        }
        Ok(())
    }

    /// The host's view (the memfd) of one guest page.
    fn host_page(&self, gpa: u64) -> Vec<u8> {
        self.vm
            .view
            .read_vec(gpa as usize, PAGE as usize)
            .unwrap_or_default()
    }

    fn doorbell(&mut self, request: u8) -> Result<(), String> {
        match request {
            REQ_COPY_A_TO_B => {
                self.read_ram(Self::iova(BUF_A))?;
                self.write_ram(Self::iova(BUF_B))?;
                let (a, b) = (self.host_page(BUF_A), self.host_page(BUF_B));
                let pattern = a.iter().enumerate().all(|(i, &x)| x == i as u8);
                self.story.line(
                    "dma",
                    format!(
                        "A (iova {:#x}) → device → B (iova {:#x}): done",
                        Self::iova(BUF_A),
                        Self::iova(BUF_B)
                    ),
                );
                self.story
                    .check(pattern && a == b, "B holds the guest's pattern from A");
            }
            REQ_WRITE_A_WHILE_PRIVATE => {
                let a = self.host_page(BUF_A);
                self.story.check(a.iter().all(|&x| x == 0), "host view of A is zero: discarded at conversion, the guest's private writes went to guest_memfd");
                self.stage_device_fill()?;
                let faults = edu::iommu_fault_lines();
                self.write_ram(Self::iova(BUF_A))?;
                let new_faults = edu::iommu_fault_lines().saturating_sub(faults);
                let unchanged = self.host_page(BUF_A) == a;
                self.story.line("dma", format!(
                    "device → A (iova {:#x}) while private: {}; IOMMU fault log +{new_faults} line(s)",
                    Self::iova(BUF_A),
                    if unchanged { "refused, memory unchanged" } else { "WRITTEN" }
                ));
                self.story
                    .check(unchanged, "the device could not write private A");
            }
            REQ_WRITE_A_WHILE_SHARED => {
                self.stage_device_fill()?;
                self.write_ram(Self::iova(BUF_A))?;
                let ok = self.host_page(BUF_A).iter().all(|&x| x == DEVICE_FILL);
                self.story.line(
                    "dma",
                    format!(
                        "device → A (iova {:#x}) while shared: {}",
                        Self::iova(BUF_A),
                        if ok { "written" } else { "NOT WRITTEN" }
                    ),
                );
                self.story.check(ok, "the device wrote shared A");
            }
            r => return Err(format!("unknown doorbell request {r}")),
        }
        Ok(())
    }

    /// Loads the device buffer with [`DEVICE_FILL`] from the staging page.
    fn stage_device_fill(&mut self) -> Result<(), String> {
        self.vm
            .view
            .fill(STAGING as usize, PAGE as usize, DEVICE_FILL)
            .map_err(|e| format!("staging: {e}"))?;
        self.read_ram(Self::iova(STAGING))
    }

    pub fn finish(mut self) -> usize {
        if let Some(backend) = self.backend.take() {
            backend.finish(&mut self.space, &mut self.story);
        }
        let counts = (
            self.hypercalls,
            self.memory_faults,
            self.doorbells,
            self.reports,
        );
        self.story.check(counts == (3, 1, 3, EXPECTED_REPORTS.len()), format!(
            "exits: {} hypercalls, {} memory faults, {} doorbells, {} reports (expected 3, 1, 3, {})",
            counts.0, counts.1, counts.2, counts.3, EXPECTED_REPORTS.len()
        ));
        let t = *self.space.totals();
        self.story.line(
            "done",
            format!(
                "IOMMU totals: {} ioctls, {} unmaps, {} maps; {} area(s) live; {} check(s) failed",
                t.ioctls,
                t.unmaps,
                t.maps,
                self.space.area_count(),
                self.story.failures
            ),
        );
        self.story.failures
    }
}
