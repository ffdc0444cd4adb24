//! `vfio-gmem`: assign PCI devices to guests whose memory lives in guest_memfd.
//! Uses only the library's public API.
//!
//! Commands: `probe`, `list`, `bind`, `unbind`, `assign`, `selftest`, `helper`; `--json`
//! on each but `helper`.
//! Exit codes: 0 ok, 1 operation failed, 2 usage error (see `errors.rs`).

mod assign;
mod bind;
mod control;
mod errors;
mod helper;
mod list;
mod probe;
mod progress;
mod selftest;
mod setup;
mod table;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vfio_gmem::vfio::Bdf;

const AFTER_HELP: &str = "\
Exit codes: 0 success, 1 operation failed, 2 usage error.
bind, unbind, assign, selftest and helper must run as root.";

/// Pass PCI devices through to guests whose memory lives in guest_memfd, keeping the
/// IOMMU in step with private/shared conversions.
#[derive(Debug, Parser)]
#[command(name = "vfio-gmem", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Print JSON (one document; `assign` prints one JSON object per line)
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report what this kernel can do (MAP_FILE per memory kind, area cutting, KVM
    /// guest_memfd flags) and how each answer is known
    Probe {
        /// Verify with this vfio-pci-bound device attached (default: the first one found)
        #[arg(long, value_name = "BDF")]
        device: Option<Bdf>,
    },
    /// List PCI devices with their driver, IOMMU group and readiness for assignment
    List,
    /// Bind devices (with their whole IOMMU group) to vfio-pci; refuses bridges and
    /// devices the host uses (mounted filesystems, swap, interfaces carrying traffic, the
    /// console)
    Bind {
        #[arg(required = true, value_name = "BDF")]
        devices: Vec<Bdf>,
        /// Move devices the host uses anyway, saying what is overridden; never the device
        /// the root filesystem lives on
        #[arg(long)]
        force: bool,
    },
    /// Give devices bound by `bind` back to their previous drivers
    Unbind {
        #[arg(required = true, value_name = "BDF")]
        devices: Vec<Bdf>,
    },
    /// Create guest memory, assign devices to it and accept conversion commands on stdin
    Assign(AssignArgs),
    /// Prove mapping, conversions and unmapping with the devices' own DMA engines
    Selftest(SelftestArgs),
    /// As root, hand devices' VFIO/iommufd fds to unprivileged VMMs over a unix socket
    /// (SCM_RIGHTS), checking each peer's uid/gid (SO_PEERCRED) and the devices it asks
    /// for; see docs/unprivileged.md
    Helper(helper::HelperArgs),
}

/// Where the guest's shared memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackingArg {
    /// guest_memfd (MMAP|INIT_SHARED on a default VM); with --confidential, a memfd
    /// holds the shared pages and guest_memfd the private ones
    Gmem,
    /// a shmem memfd
    Memfd,
    /// a memfd on huge pages of --huge-page-size (2 MiB by default; reserve them in
    /// /sys/kernel/mm/hugepages/hugepages-<N>kB/nr_hugepages)
    Hugetlb,
}

/// The huge page size of `--backing hugetlb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HugePageArg {
    /// 2 MiB pages (hugepages-2048kB pool)
    #[value(name = "2M", alias = "2MiB")]
    Size2M,
    /// 1 GiB pages (hugepages-1048576kB pool; reserve them at boot: kernel command line
    /// `hugepagesz=1G hugepages=N`)
    #[value(name = "1G", alias = "1GiB")]
    Size1G,
}

impl HugePageArg {
    /// The library's size.
    pub fn size(self) -> vfio_gmem::gmem::HugePageSize {
        match self {
            HugePageArg::Size2M => vfio_gmem::gmem::HugePageSize::Size2M,
            HugePageArg::Size1G => vfio_gmem::gmem::HugePageSize::Size1G,
        }
    }
}

/// Which kernel interface holds the IOMMU mappings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IommuArg {
    /// iommufd if /dev/iommu exists, else the legacy container
    Auto,
    /// /dev/iommu and VFIO cdevs
    Iommufd,
    /// /dev/vfio/vfio type1v2 container and VFIO groups
    Legacy,
}

#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// Guest memory size (e.g. 256M, 1G; a multiple of 4 KiB, of the huge page size for
    /// hugetlb)
    #[arg(long, value_parser = parse_size_arg)]
    pub memory: u64,
    /// Backing of the guest memory
    #[arg(long, value_enum, default_value_t = BackingArg::Gmem)]
    pub backing: BackingArg,
    /// Huge page size of --backing hugetlb [default: 2M]; --memory must be a multiple of
    /// it. Only with --backing hugetlb
    #[arg(long, value_enum, value_name = "SIZE")]
    pub huge_page_size: Option<HugePageArg>,
    /// Convertible memory, every page starting private: a SW_PROTECTED VM (the one VM type
    /// with private memory this tool creates; SEV-SNP/TDX need a launch flow it does not
    /// drive) with private pages in guest_memfd and shared pages in a memfd (or hugetlb
    /// memfd). Without such a VM type (e.g. Debian's kernels, no
    /// CONFIG_KVM_SW_PROTECTED_VM) the same layout without KVM: conversions on the IOMMU
    /// only, said so in the output (`note`, JSON `memory.kvm_private_memory: false`)
    #[arg(long)]
    pub confidential: bool,
    /// IOMMU interface
    #[arg(long, value_enum, default_value_t = IommuArg::Auto)]
    pub iommu: IommuArg,
    /// Guest physical address of the memory (IOVA = GPA)
    #[arg(long, value_parser = parse_number_arg, default_value = "0x100000000")]
    pub gpa: u64,
}

#[derive(Debug, Args)]
pub struct AssignArgs {
    #[arg(required = true, value_name = "BDF")]
    pub devices: Vec<Bdf>,
    #[command(flatten)]
    pub memory: MemoryArgs,
}

#[derive(Debug, Args)]
pub struct SelftestArgs {
    #[arg(required = true, value_name = "BDF")]
    pub devices: Vec<Bdf>,
    /// IOMMU interface
    #[arg(long, value_enum, default_value_t = IommuArg::Auto)]
    pub iommu: IommuArg,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    let n = crate::control::parse_size(s).map_err(|e| e.to_string())?;
    if n == 0 || n % 4096 != 0 {
        return Err(format!(
            "{n:#x} bytes is not a non-zero multiple of 4 KiB; e.g. 256M or 1G"
        ));
    }
    Ok(n)
}

fn parse_number_arg(s: &str) -> Result<u64, String> {
    let n = crate::control::parse_number(s).map_err(|e| e.to_string())?;
    if n % 4096 != 0 {
        return Err(format!("{n:#x} is not 4 KiB aligned"));
    }
    Ok(n)
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Probe { device } => probe::run(*device, cli.json),
        Command::List => list::run(cli.json),
        Command::Bind { devices, force } => bind::run_bind(devices, *force, cli.json),
        Command::Unbind { devices } => bind::run_unbind(devices, cli.json),
        Command::Assign(a) => assign::run(a, cli.json),
        Command::Selftest(a) => selftest::run(a, cli.json),
        Command::Helper(a) => helper::run(a),
    }
}

fn main() {
    env_logger_lite();
    // clap exits 2 on usage errors and 0 for --help/--version.
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit());
    if !matches!(cli.command, Command::Assign(_)) {
        // `vfio-gmem list | head` ends quietly, as Unix filters do. `assign` keeps
        // SIGPIPE ignored so a closed stdout still ends in a clean teardown.
        // SAFETY: restoring the default disposition of a signal has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // Whatever goes wrong, the exit code stays one of the documented ones.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("vfio-gmem: internal error: {info}");
        std::process::exit(errors::EXIT_FAILED);
    }));
    let code = match run(&cli) {
        Ok(()) => errors::EXIT_OK,
        Err(e) => {
            let code = errors::exit_code(&e);
            let message = errors::describe(&e);
            eprintln!("vfio-gmem: error: {message}");
            if cli.json {
                let mut j = serde_json::json!({"ok": false, "error": message, "exit_code": code});
                errors::add_details(&mut j, &e);
                println!("{j}");
            }
            code
        }
    };
    std::process::exit(code);
}

/// Library warnings (`log`) go to stderr when `VFIO_GMEM_LOG` is set (e.g. `info`).
fn env_logger_lite() {
    struct Stderr(log::LevelFilter);
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= self.0
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                eprintln!(
                    "vfio-gmem: {}: {}",
                    r.level().as_str().to_lowercase(),
                    r.args()
                );
            }
        }
        fn flush(&self) {}
    }
    let level = match std::env::var("VFIO_GMEM_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Error,
    };
    let logger: &'static Stderr = Box::leak(Box::new(Stderr(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vfio-gmem").chain(args.iter().copied()))
    }

    #[test]
    fn parses_every_command() {
        let c = parse(&["probe", "--device", "00:03.0", "--json"]).unwrap();
        assert!(c.json);
        assert!(
            matches!(c.command, Command::Probe { device: Some(d) } if d.to_string() == "0000:00:03.0")
        );
        assert!(matches!(
            parse(&["--json", "list"]).unwrap().command,
            Command::List
        ));
        let c = parse(&["bind", "00:03.0", "0000:00:04.0"]).unwrap();
        assert!(matches!(c.command, Command::Bind { devices, force: false } if devices.len() == 2));
        let c = parse(&["bind", "--force", "00:03.0"]).unwrap();
        assert!(matches!(c.command, Command::Bind { force: true, .. }));
        let c = parse(&[
            "assign",
            "00:03.0",
            "--memory",
            "1G",
            "--backing",
            "hugetlb",
            "--confidential",
            "--iommu",
            "legacy",
            "--gpa",
            "0x200000000",
        ])
        .unwrap();
        let Command::Assign(a) = c.command else {
            panic!()
        };
        assert_eq!(a.memory.memory, 1 << 30);
        assert_eq!(a.memory.backing, BackingArg::Hugetlb);
        assert!(a.memory.confidential);
        assert_eq!(a.memory.iommu, IommuArg::Legacy);
        assert_eq!(a.memory.gpa, 0x2_0000_0000);
        assert_eq!(a.memory.huge_page_size, None);
        for (arg, size) in [
            ("1G", HugePageArg::Size1G),
            ("1GiB", HugePageArg::Size1G),
            ("2M", HugePageArg::Size2M),
        ] {
            let c = parse(&[
                "assign",
                "00:03.0",
                "--memory",
                "2G",
                "--backing",
                "hugetlb",
                "--huge-page-size",
                arg,
            ])
            .unwrap();
            let Command::Assign(a) = c.command else {
                panic!()
            };
            assert_eq!(a.memory.huge_page_size, Some(size), "{arg}");
        }
        assert_eq!(HugePageArg::Size1G.size().bytes(), 1 << 30);
        let c = parse(&["assign", "00:03.0", "--memory", "16M"]).unwrap();
        let Command::Assign(a) = c.command else {
            panic!()
        };
        assert_eq!(
            (
                a.memory.backing,
                a.memory.iommu,
                a.memory.confidential,
                a.memory.gpa
            ),
            (BackingArg::Gmem, IommuArg::Auto, false, 1 << 32)
        );
        let c = parse(&["selftest", "00:03.0", "--iommu", "iommufd"]).unwrap();
        assert!(matches!(c.command, Command::Selftest(s) if s.iommu == IommuArg::Iommufd));
    }

    #[test]
    fn usage_errors_are_clap_errors_with_exit_code_2() {
        for args in [
            &["bind"][..],
            &["bind", "00:3.0.1"],
            &["bind", "zz:03.0"],
            &["probe", "--device", "0000:00:32.0"],
            &["assign", "00:03.0"],
            &["assign", "00:03.0", "--memory", "1000"],
            &["assign", "00:03.0", "--memory", "0"],
            &["assign", "00:03.0", "--memory", "1G", "--backing", "tmpfs"],
            &["assign", "00:03.0", "--memory", "1G", "--gpa", "0x123"],
            &[
                "assign",
                "00:03.0",
                "--memory",
                "1G",
                "--backing",
                "hugetlb",
                "--huge-page-size",
                "4M",
            ],
            &["frobnicate"],
            &[],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
        let e = parse(&["bind", "zz:03.0"]).unwrap_err().to_string();
        assert!(e.contains("is not a PCI address"), "{e}");
        assert!(
            e.contains("0000:00:03.0"),
            "the error shows the expected form: {e}"
        );
    }

    #[test]
    fn help_and_version_exit_0() {
        let e = parse(&["--help"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DisplayHelp);
        assert_eq!(e.exit_code(), 0);
        assert_eq!(parse(&["--version"]).unwrap_err().exit_code(), 0);
    }
}
