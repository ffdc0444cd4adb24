//! New kernel log records (`/dev/kmsg`), to notice a `WARNING:` the kernel prints while
//! an operation runs: the kernel saying its own state went wrong.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

pub struct Kmsg {
    file: File,
}

impl Kmsg {
    /// Opens the log positioned after its last record.
    pub fn open() -> io::Result<Kmsg> {
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        file.seek(SeekFrom::End(0))?;
        Ok(Kmsg { file })
    }

    /// The messages logged since the last call (or `open`).
    pub fn read_new(&mut self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            // One record per read: "prio,seq,usec,flags;message\n[ KEY=value\n]...".
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    if let Some((_, msg)) = rec.split_once(';') {
                        out.push(msg.lines().next().unwrap_or("").to_string());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // EPIPE: records were overwritten before we read them; go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The `WARNING:` lines logged since the last call.
    pub fn new_warnings(&mut self) -> io::Result<Vec<String>> {
        Ok(self
            .read_new()?
            .into_iter()
            .filter(|m| m.starts_with("WARNING:"))
            .collect())
    }
}
