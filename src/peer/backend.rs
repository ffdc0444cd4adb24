//! The backend's end of a peer connection: [`PeerBackend`] receives the memory table and
//! the release/grant requests, keeps [`BackendMemory`] (its own mapping of exactly the
//! granted pages) in step, and answers.
//!
//! Invariant: a page of a region is mapped in this process iff it was granted and not
//! released since; a release is answered only after the pages' mappings are gone (the
//! kernel has removed them from this process's page tables when `mmap` returns).

use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::error::PeerError;
use super::wire::{Message, MAX_MESSAGE};
use crate::sys::unix_socket;

const PAGE: u64 = 4096;

/// One request the backend served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Served {
    /// A region joined the memory table (nothing of it is mapped until granted).
    AddRegion {
        /// First GPA.
        gpa: u64,
        /// Length.
        size: u64,
    },
    /// A region left it (all of it unmapped).
    RemoveRegion {
        /// First GPA.
        gpa: u64,
        /// Length.
        size: u64,
    },
    /// These ranges were unmapped.
    Released(Vec<Range<u64>>),
    /// These ranges were mapped.
    Granted(Vec<Range<u64>>),
}

/// A backend process's connection to its VMM.
///
/// ```no_run
/// use vfio_gmem::peer::{PeerBackend, Served};
/// let mut backend = PeerBackend::connect("/run/vm0/fs.sock".as_ref())?;
/// while let Some(served) = backend.serve_one()? {
///     if let Served::Granted(ranges) = served {
///         for r in ranges {
///             backend.memory().write(r.start, b"hello")?; // reachable: shared now
///         }
///     }
/// }
/// # Ok::<(), vfio_gmem::peer::PeerError>(())
/// ```
pub struct PeerBackend {
    fd: OwnedFd,
    buf: Vec<u8>,
    out: Vec<u8>,
    memory: BackendMemory,
}

impl PeerBackend {
    /// Connects to a VMM listening on the `SOCK_SEQPACKET` unix socket at `path`.
    pub fn connect(path: &Path) -> Result<PeerBackend, PeerError> {
        let io = |what, source| PeerError::Io {
            name: "vmm".into(),
            what,
            source,
        };
        let fd = unix_socket::seqpacket().map_err(|e| io("creating a socket", e))?;
        unix_socket::connect(fd.as_fd(), path).map_err(|e| io("connecting", e))?;
        Ok(PeerBackend::from_fd(fd))
    }

    /// A backend on an already connected `SOCK_SEQPACKET` socket (e.g. inherited from the
    /// VMM that made it with [`Peer::pair`](crate::peer::Peer::pair)).
    pub fn from_fd(fd: OwnedFd) -> PeerBackend {
        PeerBackend {
            fd,
            buf: vec![0; MAX_MESSAGE],
            out: Vec::with_capacity(64),
            memory: BackendMemory::default(),
        }
    }

    /// The guest memory this backend reaches.
    pub fn memory(&self) -> &BackendMemory {
        &self.memory
    }

    /// Serves one request: applies it to [`memory`](Self::memory), answers, and says
    /// what it did; `None` once the VMM closed the connection.
    pub fn serve_one(&mut self) -> Result<Option<Served>, PeerError> {
        self.serve_one_checked(|_, _| Ok(()))
    }

    /// [`serve_one`](Self::serve_one), with `check` run after the request took effect
    /// and before the answer: an `Err` from it is answered as the request's failure (its
    /// errno, or `EIO`) and returned. A backend uses it to prove, before acknowledging a
    /// release, that it no longer reaches the pages.
    pub fn serve_one_checked(
        &mut self,
        check: impl FnOnce(&Served, &BackendMemory) -> std::io::Result<()>,
    ) -> Result<Option<Served>, PeerError> {
        let io = |what, source| PeerError::Io {
            name: "vmm".into(),
            what,
            source,
        };
        let got = unix_socket::recv_with_fds(self.fd.as_fd(), &mut self.buf)
            .map_err(|e| io("receiving", e))?;
        if got.len == 0 {
            return Ok(None);
        }
        let msg = Message::decode(&self.buf[..got.len]).map_err(|e| PeerError::Protocol {
            name: "vmm".into(),
            detail: "request".into(),
            source: Some(e),
        })?;
        let request = msg.request();
        let mut fds = got.fds.into_iter();
        let result = match msg {
            Message::AddRegion { gpa, size, offset } => match fds.next() {
                Some(fd) => self
                    .memory
                    .add_region(gpa, size, fd, offset)
                    .map(|()| Served::AddRegion { gpa, size }),
                None => Err(PeerError::BadRegion {
                    gpa,
                    size,
                    why: "ADD_MEM_REG came without an fd",
                }),
            },
            Message::RemoveRegion { gpa, size } => self
                .memory
                .remove_region(gpa, size)
                .map(|()| Served::RemoveRegion { gpa, size }),
            Message::Release(ranges) => self
                .memory
                .set(&ranges, false)
                .map(|()| Served::Released(ranges)),
            Message::Grant(ranges) => self
                .memory
                .set(&ranges, true)
                .map(|()| Served::Granted(ranges)),
            Message::Reply { .. } => Err(PeerError::Protocol {
                name: "vmm".into(),
                detail: "a reply where a request was expected".into(),
                source: None,
            }),
        };
        let result = result.and_then(|served| match check(&served, &self.memory) {
            Ok(()) => Ok(served),
            Err(source) => Err(PeerError::CheckFailed { source }),
        });
        let status = match &result {
            Ok(_) => 0,
            Err(PeerError::Io { source, .. }) | Err(PeerError::CheckFailed { source }) => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            Err(PeerError::NotInRegion { .. }) => libc::ENOENT,
            Err(PeerError::BadRegion { .. }) => libc::EINVAL,
            Err(_) => libc::EIO,
        } as u64;
        self.out.clear();
        Message::Reply { request, status }.encode(&mut self.out);
        unix_socket::send_with_fds(self.fd.as_fd(), &self.out, &[])
            .map_err(|e| io("answering", e))?;
        result.map(Some)
    }
}

/// The guest memory a backend reaches: per region, an address range reserved at
/// `ADD_MEM_REG` with no access, where granted pages are mapped from the region's fd and
/// released pages are replaced by no-access memory again (so an access faults).
#[derive(Default)]
pub struct BackendMemory {
    regions: Vec<BackendRegion>,
}

struct BackendRegion {
    gpa: u64,
    size: u64,
    fd: OwnedFd,
    offset: u64,
    /// Start of the reservation (`size` bytes, owned by this struct).
    base: usize,
    granted: crate::dma::planning::RangeSet,
}

impl Drop for BackendRegion {
    fn drop(&mut self) {
        // SAFETY: `base..base+size` is the reservation this struct made and owns; nothing
        // hands out references into it (reads and writes copy), so unmapping it leaves no
        // dangling reference.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size as usize) };
    }
}

impl BackendMemory {
    fn add_region(
        &mut self,
        gpa: u64,
        size: u64,
        fd: OwnedFd,
        offset: u64,
    ) -> Result<(), PeerError> {
        let bad = |why| Err(PeerError::BadRegion { gpa, size, why });
        if gpa % PAGE != 0 || size % PAGE != 0 || offset % PAGE != 0 {
            return bad("not page aligned");
        }
        if self
            .regions
            .iter()
            .any(|r| r.gpa < gpa + size && gpa < r.gpa + r.size)
        {
            return bad("overlaps a region already in the table");
        }
        // SAFETY: a new anonymous no-access mapping at an address the kernel picks: it
        // replaces nothing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(PeerError::Io {
                name: "backend".into(),
                what: "reserving address space for a region",
                source: std::io::Error::last_os_error(),
            });
        }
        self.regions.push(BackendRegion {
            gpa,
            size,
            fd,
            offset,
            base: base as usize,
            granted: Default::default(),
        });
        Ok(())
    }

    fn remove_region(&mut self, gpa: u64, size: u64) -> Result<(), PeerError> {
        match self
            .regions
            .iter()
            .position(|r| r.gpa == gpa && r.size == size)
        {
            Some(i) => {
                self.regions.remove(i); // Drop unmaps it all
                Ok(())
            }
            None => Err(PeerError::NotInRegion {
                range: gpa..gpa + size,
            }),
        }
    }

    /// Maps (`grant`) or unmaps the pages of `ranges` that lie in regions; parts outside
    /// every region are ignored (this backend does not serve them).
    fn set(&mut self, ranges: &[Range<u64>], grant: bool) -> Result<(), PeerError> {
        for want in ranges {
            if want.start % PAGE != 0 || want.end % PAGE != 0 {
                return Err(PeerError::BadRegion {
                    gpa: want.start,
                    size: want.end - want.start,
                    why: "range not page aligned",
                });
            }
            for r in self.regions.iter_mut() {
                let s = want.start.max(r.gpa);
                let e = want.end.min(r.gpa + r.size);
                if s >= e {
                    continue;
                }
                let addr = (r.base as u64 + (s - r.gpa)) as *mut libc::c_void;
                let len = (e - s) as usize;
                // SAFETY: `addr..addr+len` lies inside the region's reservation, which
                // this struct owns; MAP_FIXED replaces only pages of it. No reference into
                // it exists (accesses copy through `read`/`write`, which borrow `self`).
                let got = unsafe {
                    if grant {
                        libc::mmap(
                            addr,
                            len,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_SHARED | libc::MAP_FIXED,
                            r.fd.as_raw_fd(),
                            (r.offset + (s - r.gpa)) as libc::off_t,
                        )
                    } else {
                        libc::mmap(
                            addr,
                            len,
                            libc::PROT_NONE,
                            libc::MAP_PRIVATE
                                | libc::MAP_ANONYMOUS
                                | libc::MAP_FIXED
                                | libc::MAP_NORESERVE,
                            -1,
                            0,
                        )
                    }
                };
                if got == libc::MAP_FAILED {
                    return Err(PeerError::Io {
                        name: "backend".into(),
                        what: if grant {
                            "mapping granted pages"
                        } else {
                            "unmapping released pages"
                        },
                        source: std::io::Error::last_os_error(),
                    });
                }
                if grant {
                    r.granted.insert(s..e);
                } else {
                    r.granted.remove(s..e);
                }
            }
        }
        Ok(())
    }

    /// The granted ranges, ascending.
    pub fn granted(&self) -> Vec<Range<u64>> {
        let mut v: Vec<_> = self.regions.iter().flat_map(|r| r.granted.iter()).collect();
        v.sort_by_key(|r| r.start);
        v
    }

    /// Whether every page of `range` is granted.
    pub fn is_granted(&self, range: Range<u64>) -> bool {
        self.region_of(range.clone())
            .is_some_and(|r| r.granted.contains_range(range))
    }

    fn region_of(&self, range: Range<u64>) -> Option<&BackendRegion> {
        self.regions
            .iter()
            .find(|r| r.gpa <= range.start && range.end <= r.gpa + r.size)
    }

    /// Where `gpa` is in this process, if it is in a region (mapped or not).
    pub fn host_address(&self, gpa: u64) -> Option<usize> {
        self.region_of(gpa..gpa + 1)
            .map(|r| r.base + (gpa - r.gpa) as usize)
    }

    fn granted_ptr(&self, gpa: u64, len: usize) -> Result<*mut u8, PeerError> {
        let range = gpa..gpa.saturating_add(len as u64);
        match self.region_of(range.clone()) {
            Some(r) if r.granted.contains_range(range.clone()) => {
                Ok((r.base + (gpa - r.gpa) as usize) as *mut u8)
            }
            Some(_) => Err(PeerError::NotGranted { range }),
            None => Err(PeerError::NotInRegion { range }),
        }
    }

    /// Copies `data` into guest memory at `gpa`; refused unless every byte is granted.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), PeerError> {
        let p = self.granted_ptr(gpa, data.len())?;
        // SAFETY: `p..p+len` is mapped read-write from the region's fd (granted, checked
        // above, and `&self` keeps a release from running meanwhile). The guest may access
        // the same memory concurrently: it is plain bytes, copied without references.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Copies guest memory at `gpa` into `buf`; refused unless every byte is granted.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PeerError> {
        let p = self.granted_ptr(gpa, buf.len())?;
        // SAFETY: as in `write`, mapped and granted for the whole length.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Whether this process can read the page at `gpa` at all, asked of the kernel: one
    /// byte of it is written into a pipe, which the kernel copies from this process's
    /// memory like an access would (`EFAULT` where nothing readable is mapped), whatever
    /// this struct records. Works on any kernel (no `process_vm_readv`, which minimal
    /// kernels leave out). `Ok(false)` also for a GPA in no region.
    pub fn reachable(&self, gpa: u64) -> std::io::Result<bool> {
        let Some(addr) = self.host_address(gpa) else {
            return Ok(false);
        };
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both fds are new and owned here only; OwnedFd closes them.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: write(2) only reads the one byte at `addr`, through the kernel's checked
        // copy: an unmapped or no-access page is an EFAULT return, not a fault here.
        let n = unsafe { libc::write(w.as_raw_fd(), addr as *const libc::c_void, 1) };
        drop((r, w));
        match n {
            1 => Ok(true),
            _ => match std::io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::EFAULT) => Ok(false),
                e => Err(e),
            },
        }
    }

    /// The pages where what the kernel says this process reaches ([`reachable`]) differs
    /// from what it was granted, as ranges; empty when the invariant holds. One syscall
    /// per page of every region: for tests and audits, not for the data path.
    ///
    /// [`reachable`]: Self::reachable
    pub fn audit(&self) -> Vec<Range<u64>> {
        let mut wrong = crate::dma::planning::RangeSet::new();
        for r in &self.regions {
            for gpa in (r.gpa..r.gpa + r.size).step_by(PAGE as usize) {
                let granted = r.granted.contains_range(gpa..gpa + PAGE);
                if self.reachable(gpa).ok() != Some(granted) {
                    wrong.insert(gpa..gpa + PAGE);
                }
            }
        }
        wrong.iter().collect()
    }
}
