//! Test support shared by the VM test targets: the VM gate, PCI helpers for the guest and
//! DMA engines (device drivers used only by tests).

#![allow(dead_code)]

pub mod dma_engine;
pub mod edu;
pub mod edu_raw;
pub mod fail_nth;
pub mod kernel_areas;
pub mod kmsg;
pub mod kvm_attrs;
pub mod pci;
pub mod space;

use libtest_mimic::{Arguments, Failed, Trial};

/// True inside the test VM started by `scripts/vm-run`.
pub fn in_vm() -> bool {
    std::env::var("VFIO_GMEM_IN_VM").as_deref() == Ok("1")
}

/// Which emulated IOMMU the VM has ("intel" or "virtio"), if in the VM.
pub fn vm_iommu() -> Option<String> {
    in_vm().then(|| std::env::var("VFIO_GMEM_IOMMU").unwrap_or_default())
}

pub type TestFn = fn() -> Result<(), Failed>;

/// Runs VM tests. Outside the VM every test is reported as ignored and a line says why;
/// nothing is counted as passed. Inside, tests run one at a time (they share devices).
pub fn run_vm_tests(tests: &[(&'static str, TestFn)]) -> ! {
    run_vm_trials(tests).exit()
}

/// [`run_vm_tests`] that returns the conclusion instead of exiting, for targets that
/// print a summary of their own afterwards.
pub fn run_vm_trials(tests: &[(&'static str, TestFn)]) -> libtest_mimic::Conclusion {
    let mut args = Arguments::from_args();
    let vm = in_vm();
    if !vm {
        eprintln!(
            "skipped: needs the test VM ({} tests); scripts/vm-test runs them",
            tests.len()
        );
    } else {
        args.test_threads = Some(1);
    }
    let trials = tests
        .iter()
        .map(|&(name, f)| Trial::test(name, f).with_ignored_flag(!vm))
        .collect();
    libtest_mimic::run(&args, trials)
}

/// `Result` conversion for test bodies: any displayable error fails the test.
pub trait OrFail<T> {
    fn or_fail(self, what: &str) -> Result<T, Failed>;
}

impl<T, E: std::fmt::Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: &str) -> Result<T, Failed> {
        self.map_err(|e| Failed::from(format!("{what}: {e}")))
    }
}

/// Fails the test with a message unless `cond` holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(libtest_mimic::Failed::from(format!($($fmt)+)));
        }
    };
}
