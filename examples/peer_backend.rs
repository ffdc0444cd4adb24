//! A reference backend process: a minimal "device" in its own process that reaches
//! guest memory through its own mapping, as a vhost-user backend does, and follows
//! conversions through the peer protocol (`vfio_gmem::peer`, docs/peers.md).
//!
//! It maps exactly the pages it is granted. On each grant it writes a mark into every
//! granted page (16 bytes at the page's start: `b"peer-wr!"` and the page's GPA, little
//! endian), as a device copying data into guest memory would; on each release it unmaps
//! the pages and, before answering, proves with the kernel that it can no longer read
//! them (`BackendMemory::reachable`: the kernel copies a byte of the page into a pipe). After every request it audits every page of every
//! region (reachable iff granted). At the end it prints one JSON line of counts and exits
//! non-zero if any check failed.
//!
//! ```text
//! peer_backend --socket PATH     connect to a VMM listening there
//! peer_backend --fd N            use inherited fd N (e.g. 0: one end of Peer::pair as stdin)
//!              [--no-mark]       map and unmap only
//! ```

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use vfio_gmem::peer::{BackendMemory, PeerBackend, PeerError, Served};

const PAGE: u64 = 4096;

/// The mark written at the start of each granted page.
fn mark(gpa: u64) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..8].copy_from_slice(b"peer-wr!");
    m[8..].copy_from_slice(&gpa.to_le_bytes());
    m
}

fn pages(ranges: &[std::ops::Range<u64>]) -> impl Iterator<Item = u64> + '_ {
    ranges
        .iter()
        .flat_map(|r| (r.start..r.end).step_by(PAGE as usize))
}

#[derive(Default)]
struct Counts {
    requests: u64,
    released_pages: u64,
    granted_pages: u64,
    marks: u64,
    failures: u64,
}

/// Runs after a request took effect, before the answer.
fn check(
    served: &Served,
    mem: &BackendMemory,
    write_marks: bool,
    c: &mut Counts,
) -> std::io::Result<()> {
    let fail = |what: String| std::io::Error::other(what);
    match served {
        Served::Released(ranges) => {
            for gpa in pages(ranges) {
                if mem.host_address(gpa).is_none() {
                    continue; // not a page of ours
                }
                if mem.reachable(gpa)? {
                    return Err(fail(format!(
                        "GPA {gpa:#x} is still readable after release"
                    )));
                }
                c.released_pages += 1;
            }
        }
        Served::Granted(ranges) => {
            for gpa in pages(ranges) {
                if mem.host_address(gpa).is_none() {
                    continue;
                }
                c.granted_pages += 1;
                if write_marks {
                    mem.write(gpa, &mark(gpa))
                        .map_err(|e| fail(format!("writing the mark: {e}")))?;
                    c.marks += 1;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut write_marks = true;
    let mut backend = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--socket" => {
                let path = it.next().expect("--socket PATH");
                backend = Some(PeerBackend::connect(path.as_ref()).expect("connecting"));
            }
            "--fd" => {
                let n: i32 = it.next().and_then(|s| s.parse().ok()).expect("--fd N");
                // SAFETY: the caller hands this process fd N for the backend to own.
                backend = Some(PeerBackend::from_fd(unsafe { OwnedFd::from_raw_fd(n) }));
            }
            "--no-mark" => write_marks = false,
            other => {
                eprintln!("peer_backend: unknown argument {other:?}; see the file's doc comment");
                return ExitCode::from(2);
            }
        }
    }
    let Some(mut backend) = backend else {
        eprintln!("peer_backend: give --socket PATH or --fd N");
        return ExitCode::from(2);
    };
    let mut c = Counts::default();
    loop {
        let mut counts = std::mem::take(&mut c);
        let r = backend.serve_one_checked(|s, m| check(s, m, write_marks, &mut counts));
        c = counts;
        match r {
            Ok(None) => break,
            Ok(Some(_)) => c.requests += 1,
            Err(e) => {
                eprintln!("peer_backend: {e}");
                c.failures += 1;
                if matches!(e, PeerError::Io { .. }) {
                    break; // the connection itself failed
                }
            }
        }
        let wrong = backend.memory().audit();
        if !wrong.is_empty() {
            eprintln!("peer_backend: audit: reachable differs from granted at {wrong:x?}");
            c.failures += 1;
        }
    }
    // The VMM may be gone already: a closed stdout is not this backend's failure.
    let _ = writeln!(
        std::io::stdout(),
        "{{\"requests\":{},\"released_pages\":{},\"granted_pages\":{},\"marks\":{},\"failures\":{}}}",
        c.requests, c.released_pages, c.granted_pages, c.marks, c.failures
    );
    if c.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
