//! rtnetlink dumps (`NETLINK_ROUTE`): the only netlink socket calls in the crate. Used to
//! list interface addresses, which the kernel reports nowhere else for IPv4.
//!
//! The message walker is pure (unit-tested on built buffers); [`dump`] does the I/O.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `RTM_NEWADDR` / `RTM_GETADDR` (linux/rtnetlink.h).
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_GETADDR: u16 = 22;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const HDR: usize = 16;

/// One netlink message: its type and the payload after the 16-byte header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub ty: u16,
    pub payload: Vec<u8>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Splits one datagram into messages (4-byte aligned). A truncated tail is an error.
pub fn split(buf: &[u8]) -> io::Result<Vec<Message>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + HDR <= buf.len() {
        let len = u32_at(buf, at) as usize;
        if len < HDR || at + len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "netlink message of {len} bytes at offset {at} in a {}-byte datagram",
                    buf.len()
                ),
            ));
        }
        out.push(Message {
            ty: u16_at(buf, at + 4),
            payload: buf[at + HDR..at + len].to_vec(),
        });
        at += (len + 3) & !3;
    }
    Ok(out)
}

/// The attributes (`struct rtattr`: len, type, data) that follow a fixed header of
/// `skip` bytes in a payload. Malformed tails are ignored.
pub fn attributes(payload: &[u8], skip: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = (skip + 3) & !3;
    while at + 4 <= payload.len() {
        let len = u16_at(payload, at) as usize;
        if len < 4 || at + len > payload.len() {
            break;
        }
        out.push((u16_at(payload, at + 2), &payload[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// Sends a dump request of type `ty` whose family header is `family_header` (e.g. an
/// 8-byte `ifaddrmsg`) and returns every answer up to `NLMSG_DONE`.
pub fn dump(ty: u16, family_header: &[u8]) -> io::Result<Vec<Message>> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just opened and own exclusively.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let seq: u32 = 1;
    let len = HDR + family_header.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&ty.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&seq.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(family_header);
    // SAFETY: `req` is a live buffer of `req.len()` bytes; an unconnected netlink socket
    // sends to the kernel.
    let n = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "netlink socket closed mid-dump",
            ));
        }
        for m in split(&buf[..n as usize])? {
            match m.ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = m.payload.get(..4).map(|b| u32_at(b, 0) as i32).unwrap_or(0);
                    if errno != 0 {
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                }
                _ => out.push(m),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16, payload: &[u8]) -> Vec<u8> {
        let len = HDR + payload.len();
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&[0; 10]);
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn splits_aligned_messages_and_rejects_truncation() {
        let mut buf = msg(RTM_NEWADDR, &[1, 2, 3, 4, 5]);
        buf.extend(msg(NLMSG_DONE, &[0; 4]));
        let m = split(&buf).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0],
            Message {
                ty: RTM_NEWADDR,
                payload: vec![1, 2, 3, 4, 5]
            }
        );
        assert_eq!(m[1].ty, NLMSG_DONE);
        assert!(split(&buf[..buf.len() - 2]).is_err());
    }

    #[test]
    fn walks_attributes_after_a_fixed_header() {
        let mut p = vec![0u8; 8];
        p.extend_from_slice(&8u16.to_ne_bytes());
        p.extend_from_slice(&2u16.to_ne_bytes());
        p.extend_from_slice(&[10, 0, 2, 15]);
        p.extend_from_slice(&5u16.to_ne_bytes());
        p.extend_from_slice(&3u16.to_ne_bytes());
        p.extend_from_slice(&[b'x', 0, 0, 0]);
        let a = attributes(&p, 8);
        assert_eq!(a, vec![(2, &[10, 0, 2, 15][..]), (3, &[b'x'][..])]);
        // A length running past the end stops the walk.
        p[8] = 200;
        assert!(attributes(&p, 8).is_empty());
    }
}
