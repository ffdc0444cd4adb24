//! Reference VMM: a real guest converts its own memory between private and shared, an
//! assigned device DMAs to it, and vfio-gmem keeps the IOMMU in step.
//!
//! ```sh
//! cargo build --example reference_vmm
//! scripts/vm-run -- target/debug/examples/reference_vmm [--device BDF] [--print-guest]
//! # unprivileged: every device node arrives from `vfio-gmem helper` (docs/unprivileged.md)
//! reference_vmm --device BDF --handoff /run/vfio-gmem.sock [--wait-before-run]
//! ```
//!
//! What it builds (see `vm.rs` for the memory layout, `guest.rs` for the program):
//! a `KVM_X86_SW_PROTECTED_VM` whose RAM is a guest_memfd (private pages) plus a memfd
//! (shared pages), a [`DmaSpace`] on iommufd that knows the VM, one edu device attached
//! to it, and one vCPU running a small real-mode program. The VMM answers:
//!
//! - `KVM_EXIT_HYPERCALL` (`KVM_HC_MAP_GPA_RANGE`): [`DmaSpace::convert`] to the state
//!   the guest asked for, then `hypercall.ret = 0` and resume;
//! - `KVM_EXIT_MEMORY_FAULT`: [`DmaSpace::convert`] to what KVM can serve (see
//!   [`Vmm::memory_fault`]);
//! - port I/O: doorbells (the device acts on the guest's buffers) and reports (checked).
//!
//! Every event is printed on one line; the exit status is 0 only if every check held.

mod edu;
mod exits;
mod guest;
mod handoff;
mod peer;
mod trace;
mod vm;

use std::process::ExitCode;
use std::sync::Arc;

use kvm_ioctls::VcpuExit;
use vfio_gmem::dma::{DmaSpace, GuestRegion, PageState, SharedMemory, SpaceOptions};
use vfio_gmem::iommufd::Iommufd;

use exits::{Story, Vmm, IOVA_OFFSET};
use guest::*;
use vfio_gmem::engine::edu::Edu;

/// Options beyond the device.
#[derive(Default)]
struct Opts {
    /// Receive every privileged fd from `vfio-gmem helper` at this socket.
    handoff: Option<String>,
    /// After setup, wait for a line on stdin before running the guest.
    wait: bool,
    /// Skip the locked-memory check (the kernel's own refusal is then what fails).
    no_memlock_check: bool,
    /// Start this backend binary (`examples/peer_backend`) as a conversion listener.
    peer: Option<String>,
}

fn main() -> ExitCode {
    let mut device = None;
    let mut print_guest = false;
    let mut opts = Opts::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let bdf = match arg.as_str() {
            "--print-guest" => {
                print_guest = true;
                continue;
            }
            "--handoff" => {
                opts.handoff = args.next();
                continue;
            }
            "--peer" => {
                opts.peer = args.next();
                continue;
            }
            "--wait-before-run" => {
                opts.wait = true;
                continue;
            }
            "--no-memlock-check" => {
                opts.no_memlock_check = true;
                continue;
            }
            "-h" | "--help" => {
                println!(
                    "usage: reference_vmm [--device BDF] [--print-guest] [--peer BACKEND_BINARY] \
                     [--handoff SOCKET [--wait-before-run] [--no-memlock-check]]"
                );
                return ExitCode::SUCCESS;
            }
            "--device" => args.next().unwrap_or_default(),
            a => match a.strip_prefix("--device=") {
                Some(v) => v.to_string(),
                None => {
                    eprintln!("reference_vmm: unknown argument {a:?}; try --help");
                    return ExitCode::from(2);
                }
            },
        };
        match bdf.parse() {
            Ok(b) => device = Some(b),
            Err(e) => {
                eprintln!("reference_vmm: --device: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let insn = HypercallInsn::for_this_cpu();
    let code = program(insn);
    if print_guest {
        for chunk in code.chunks(16) {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            println!("{}", hex.join(" "));
        }
        return ExitCode::SUCCESS;
    }
    match run(device, insn, &code, &opts) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("reference_vmm: {n} check(s) failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("reference_vmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    device: Option<vfio_gmem::vfio::Bdf>,
    insn: HypercallInsn,
    code: &[u8],
    opts: &Opts,
) -> Result<usize, String> {
    trace::install();
    let story = Story { failures: 0 };
    // 0. The device, found first: nothing is created if it is missing.
    let bdf = edu::find(device)?;
    // With --handoff, /dev/kvm and the device's fds come from the privileged helper.
    let (mut grant, kvm) = match &opts.handoff {
        Some(socket) => {
            let (g, k) = handoff::receive(socket, bdf, &story)?;
            (Some(g), Some(k))
        }
        None => (None, None),
    };

    // 1. The VM and its memory.
    let mut vm = vm::create(kvm.as_ref())?;
    story.line(
        "setup",
        format!(
            "SW_PROTECTED VM; guest_memfd {} KiB (private), memfd {} KiB (shared)",
            vm.gmem.size() / 1024,
            vm.shared.size() / 1024
        ),
    );
    story.line(
        "setup",
        format!(
            "memslot 0: GPA [0x0, {:#x}) private=guest_memfd shared=memfd",
            vm::RAM
        ),
    );
    story.line(
        "setup",
        format!(
            "memslot 1: GPA [{:#x}, {:#x}) shared=memfd, no private backing",
            vm::RAM,
            vm::TOTAL
        ),
    );

    let (mut space, dev) = if let Some(grant) = grant.as_mut() {
        // 2-3. The DMA space and the device on the received fds.
        let (space, dev) = handoff::space(grant, &vm, bdf)?;
        story.line(
            "setup",
            format!(
                "edu {bdf}: received fds, {} backend; area cutting: {:?}",
                space.backend(),
                space.cut_support()
            ),
        );
        (space, dev)
    } else {
        // 2. The DMA space: an IOAS on /dev/iommu that also sets the VM's attributes.
        let iommufd = Arc::new(Iommufd::open().map_err(|e| format!("opening /dev/iommu: {e}"))?);
        let mut space = DmaSpace::iommufd(&iommufd, Some(vm.kvm_vm()), SpaceOptions::default())
            .map_err(|e| format!("creating the DMA space: {e}"))?;

        // 3. The device: vfio-pci, its cdev, attached to the space.
        let dev = edu::open(bdf)?;
        space
            .attach(&dev)
            .map_err(|e| format!("attaching {bdf}: {e}"))?;
        story.line(
            "setup",
            format!(
                "edu {bdf}: bound to vfio-pci, VFIO cdev bound to iommufd and attached; area cutting: {:?}",
                space.cut_support()
            ),
        );
        (space, dev)
    };
    let edu = Edu::new(dev).map_err(|e| e.to_string())?;

    // Without CAP_IPC_LOCK every mapped page counts against RLIMIT_MEMLOCK: check first.
    if !opts.no_memlock_check {
        handoff::check_memlock_for(&space, vm::TOTAL)?;
    }

    // 4. All guest RAM, shared at first; private pages come from guest conversions.
    let fd = vm
        .shared
        .file()
        .try_clone()
        .map_err(|e| format!("dup memfd: {e}"))?;
    space
        .add_region(
            GuestRegion::new(
                0,
                vm::TOTAL,
                SharedMemory::File {
                    fd: fd.into(),
                    offset: 0,
                },
            )
            .iova_offset(IOVA_OFFSET as i64)
            .convertible(PageState::Shared),
        )
        .map_err(|e| {
            format!(
                "adding guest RAM to the DMA space: {e} ({})",
                handoff::pinned_text()
            )
        })?;
    let r = &space.regions()[0];
    story.line(
        "setup",
        format!(
            "DMA region GPA [0x0, {:#x}) at IOVA {:#x}: strategy {}, mapped {}, {} area(s)",
            vm::TOTAL,
            r.iova,
            r.strategy,
            r.path,
            r.areas
        ),
    );

    // 4b. Optionally, a backend process that maps guest memory itself.
    let backend = match &opts.peer {
        Some(bin) => Some(peer::start(bin, &mut space, &vm, &story)?),
        None => None,
    };

    // 5. The vCPU.
    let mut vcpu = vm::load_and_create_vcpu(&mut vm, code)?;
    story.line(
        "setup",
        format!(
            "guest: {} bytes of real-mode code at {CODE:#x}; hypercall instruction {insn}",
            code.len()
        ),
    );

    if opts.wait {
        story.line("waiting", "for a line on stdin before running the guest");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }

    let mut vmm = Vmm {
        story,
        space,
        edu,
        vm,
        reports: 0,
        hypercalls: 0,
        memory_faults: 0,
        doorbells: 0,
        last_fault: None,
        backend,
    };
    for _ in 0..200 {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        };
        match exit {
            VcpuExit::IoOut(port, data) => {
                let (port, value) = (port, data[0]);
                vmm.io_out(port, value)?;
            }
            VcpuExit::Hypercall(h) => {
                vmm.story.line(
                    "exit",
                    format!(
                        "hypercall nr={} gpa={:#x} pages={} attrs={:#x}{}",
                        h.nr,
                        h.args[0],
                        h.args[1],
                        h.args[2],
                        if h.nr == KVM_HC_MAP_GPA_RANGE {
                            " (KVM_HC_MAP_GPA_RANGE)"
                        } else {
                            ""
                        }
                    ),
                );
                *h.ret = vmm.hypercall(h.nr, h.args);
                vmm.story
                    .line("resume", format!("hypercall ret={}", *h.ret as i64));
            }
            VcpuExit::MemoryFault { flags, gpa, size } => {
                vmm.memory_fault(flags, gpa, size)?;
                vmm.story.line("resume", "the access is retried");
            }
            VcpuExit::Hlt => {
                vmm.story.line("exit", "hlt");
                return Ok(vmm.finish());
            }
            other => return Err(format!("unexpected vCPU exit {other:?}")),
        }
    }
    Err("the guest did not halt within 200 exits".into())
}
