//! Test support shared by the VM test targets: the VM gate, PCI helpers for the guest, and
//! the raw oracle (`raw`, `edu_raw`). The DMA engines the tests drive devices with are the
//! library's (`vfio_gmem::engine`).

#![allow(dead_code)]

pub mod edu_raw;
pub mod fail_nth;
pub mod kernel_areas;
pub mod kmsg;
pub mod kvm_attrs;
pub mod needs;
pub mod pci;
pub mod raw;
pub mod space;
pub mod vtd;

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
///
/// In the VM, a test whose need (declared with [`needs::declare`]) this kernel lacks is
/// reported ignored with a `skipped: NAME: REASON` line: never run, never a pass.
pub fn run_vm_trials(tests: &[(&'static str, TestFn)]) -> libtest_mimic::Conclusion {
    let needs = needs::declared();
    for (name, _) in needs {
        assert!(
            *name == "*" || tests.iter().any(|(t, _)| t == name),
            "support::needs declares '{name}', which is not a test of this target"
        );
    }
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
        .map(|&(name, f)| {
            let skip = vm.then(|| needs::skip_reason(name, needs)).flatten();
            let selected = match &args.filter {
                Some(f) if args.exact => name == f,
                Some(f) => name.contains(f.as_str()),
                None => true,
            };
            if let (Some(why), true) = (&skip, selected) {
                eprintln!("skipped: {name}: {why}");
            }
            Trial::test(name, f).with_ignored_flag(!vm || skip.is_some())
        })
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

/// Whether the running kernel is the project's patched one (`scripts/build-kernel
/// --patched`: kernel/patches, release suffix `-vfio-gmem-patched`), which maps
/// guest_memfd by fd+offset and revokes such mappings. Tests assert each kernel's path.
pub fn patched_kernel() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .is_ok_and(|r| r.contains("-vfio-gmem-patched"))
}
