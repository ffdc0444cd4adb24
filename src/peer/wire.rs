//! The wire format: pure encoding and decoding, no I/O.
//!
//! One `SOCK_SEQPACKET` message per request or reply (the socket keeps message
//! boundaries, so no message ever spans two reads). Every message starts with
//! vhost-user's 12-byte header, little-endian:
//!
//! ```text
//! u32 request | u32 flags | u32 size (payload bytes that follow)
//! ```
//!
//! `flags`: bits 0–1 the version (1), bit 2 [`FLAG_REPLY`], bit 3 [`FLAG_NEED_REPLY`]
//! (vhost-user's meanings). Requests and their payloads:
//!
//! | request | number | payload | fds |
//! |---|---|---|---|
//! | `ADD_MEM_REG` | 37 (vhost-user's) | u64 padding, then region: u64 gpa, u64 size, u64 userspace_addr, u64 mmap_offset | the region's shared memory |
//! | `REM_MEM_REG` | 38 (vhost-user's) | the same 40 bytes (`userspace_addr`, `mmap_offset` ignored) | none |
//! | `RELEASE` | 0x5601 (ours) | u32 count, u32 padding, count × (u64 gpa, u64 len) | none |
//! | `GRANT` | 0x5602 (ours) | the same | none |
//!
//! Every request carries [`FLAG_NEED_REPLY`]; the reply has the request's number,
//! [`FLAG_REPLY`] and a u64 payload: 0 for success, else a positive errno (vhost-user's
//! `REPLY_ACK`).

use std::ops::Range;

use super::error::WireError;

/// vhost-user's `VHOST_USER_ADD_MEM_REG`.
pub const ADD_MEM_REG: u32 = 37;
/// vhost-user's `VHOST_USER_REM_MEM_REG`.
pub const REM_MEM_REG: u32 = 38;
/// Ranges about to turn private: stop reaching them, then reply.
pub const RELEASE: u32 = 0x5601;
/// Ranges that are shared now: they may be reached.
pub const GRANT: u32 = 0x5602;

/// The protocol version (flags bits 0–1).
pub const VERSION: u32 = 1;
/// This message is a reply.
pub const FLAG_REPLY: u32 = 1 << 2;
/// The sender waits for a reply.
pub const FLAG_NEED_REPLY: u32 = 1 << 3;

/// Header bytes.
pub const HEADER: usize = 12;
/// The most ranges one `RELEASE` or `GRANT` carries (longer lists are sent in parts).
pub const MAX_RANGES: usize = 2048;
/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = HEADER + 8 + MAX_RANGES * 16;

/// One message, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A region of guest memory, its shared backing attached as an fd.
    AddRegion {
        /// First GPA.
        gpa: u64,
        /// Length in bytes.
        size: u64,
        /// Offset of `gpa` in the attached fd.
        offset: u64,
    },
    /// The region at `gpa` is gone: unmap all of it.
    RemoveRegion {
        /// First GPA.
        gpa: u64,
        /// Length in bytes.
        size: u64,
    },
    /// Stop reaching these ranges (they are about to turn private).
    Release(Vec<Range<u64>>),
    /// These ranges are shared now.
    Grant(Vec<Range<u64>>),
    /// The answer to request `request`: 0 or a positive errno.
    Reply {
        /// The request answered.
        request: u32,
        /// 0 for success, else an errno.
        status: u64,
    },
}

impl Message {
    /// The request number of this message (for a reply: the request answered).
    pub fn request(&self) -> u32 {
        match self {
            Message::AddRegion { .. } => ADD_MEM_REG,
            Message::RemoveRegion { .. } => REM_MEM_REG,
            Message::Release(_) => RELEASE,
            Message::Grant(_) => GRANT,
            Message::Reply { request, .. } => *request,
        }
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let flags = VERSION
            | match self {
                Message::Reply { .. } => FLAG_REPLY,
                _ => FLAG_NEED_REPLY,
            };
        out.extend_from_slice(&self.request().to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // size, filled below
        match self {
            Message::AddRegion { gpa, size, offset } => {
                for v in [0, *gpa, *size, 0, *offset] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Message::RemoveRegion { gpa, size } => {
                for v in [0, *gpa, *size, 0, 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Message::Release(ranges) | Message::Grant(ranges) => {
                out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                for r in ranges {
                    out.extend_from_slice(&r.start.to_le_bytes());
                    out.extend_from_slice(&(r.end - r.start).to_le_bytes());
                }
            }
            Message::Reply { status, .. } => out.extend_from_slice(&status.to_le_bytes()),
        }
        let size = (out.len() - start - HEADER) as u32;
        out[start + 8..start + 12].copy_from_slice(&size.to_le_bytes());
    }

    /// Decodes one whole message.
    pub fn decode(buf: &[u8]) -> Result<Message, WireError> {
        if buf.len() < HEADER {
            return Err(WireError::Short {
                len: buf.len(),
                need: HEADER,
            });
        }
        let request = u32_at(buf, 0);
        let flags = u32_at(buf, 4);
        let size = u32_at(buf, 8) as usize;
        if flags & 3 != VERSION {
            return Err(WireError::Version(flags & 3));
        }
        let payload = &buf[HEADER..];
        if payload.len() != size {
            return Err(WireError::Size {
                said: size,
                got: payload.len(),
            });
        }
        if flags & FLAG_REPLY != 0 {
            expect_len(payload, 8)?;
            return Ok(Message::Reply {
                request,
                status: u64_at(payload, 0),
            });
        }
        match request {
            ADD_MEM_REG | REM_MEM_REG => {
                expect_len(payload, 40)?;
                let (gpa, size) = (u64_at(payload, 8), u64_at(payload, 16));
                if size == 0 || gpa.checked_add(size).is_none() {
                    return Err(WireError::Range { gpa, len: size });
                }
                Ok(if request == ADD_MEM_REG {
                    Message::AddRegion {
                        gpa,
                        size,
                        offset: u64_at(payload, 32),
                    }
                } else {
                    Message::RemoveRegion { gpa, size }
                })
            }
            RELEASE | GRANT => {
                if payload.len() < 8 {
                    return Err(WireError::Short {
                        len: payload.len(),
                        need: 8,
                    });
                }
                let count = u32_at(payload, 0) as usize;
                if count > MAX_RANGES {
                    return Err(WireError::TooManyRanges(count));
                }
                expect_len(payload, 8 + count * 16)?;
                let mut ranges = Vec::with_capacity(count);
                for i in 0..count {
                    let gpa = u64_at(payload, 8 + i * 16);
                    let len = u64_at(payload, 16 + i * 16);
                    let end = gpa.checked_add(len).filter(|_| len > 0);
                    match end {
                        Some(end) => ranges.push(gpa..end),
                        None => return Err(WireError::Range { gpa, len }),
                    }
                }
                Ok(if request == RELEASE {
                    Message::Release(ranges)
                } else {
                    Message::Grant(ranges)
                })
            }
            other => Err(WireError::UnknownRequest(other)),
        }
    }
}

fn expect_len(payload: &[u8], need: usize) -> Result<(), WireError> {
    if payload.len() == need {
        Ok(())
    } else {
        Err(WireError::Size {
            said: need,
            got: payload.len(),
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn round_trip(m: Message) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        assert!(buf.len() <= MAX_MESSAGE);
        assert_eq!(Message::decode(&buf).unwrap(), m);
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(Message::AddRegion {
            gpa: 0x1_0000_0000,
            size: 1 << 30,
            offset: 0x2000,
        });
        round_trip(Message::RemoveRegion { gpa: 0, size: 4096 });
        round_trip(Message::Release(vec![0..0x1000, 0x3000..0x5000]));
        round_trip(Message::Grant(vec![]));
        round_trip(Message::Grant(
            (0..MAX_RANGES as u64)
                .map(|i| i << 13..(i << 13) + 4096)
                .collect(),
        ));
        round_trip(Message::Reply {
            request: RELEASE,
            status: libc::EBUSY as u64,
        });
    }

    #[test]
    fn the_header_is_vhost_users() {
        let mut buf = Vec::new();
        Message::RemoveRegion {
            gpa: 0x1000,
            size: 0x2000,
        }
        .encode(&mut buf);
        assert_eq!(&buf[..4], &38u32.to_le_bytes());
        assert_eq!(
            &buf[4..8],
            &(1u32 | 8).to_le_bytes(),
            "version 1, need reply"
        );
        assert_eq!(&buf[8..12], &40u32.to_le_bytes());
        assert_eq!(
            &buf[20..28],
            &0x1000u64.to_le_bytes(),
            "region.guest_phys_addr"
        );
    }

    #[test]
    fn bad_messages_are_refused() {
        let mut ok = Vec::new();
        Message::Release(vec![0..0x1000]).encode(&mut ok);
        assert!(matches!(
            Message::decode(&ok[..5]),
            Err(WireError::Short { .. })
        ));
        assert!(matches!(
            Message::decode(&ok[..ok.len() - 1]),
            Err(WireError::Size { .. })
        ));
        let mut v2 = ok.clone();
        v2[4] = 2;
        assert!(matches!(Message::decode(&v2), Err(WireError::Version(2))));
        let mut unknown = ok.clone();
        unknown[..4].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(
            Message::decode(&unknown),
            Err(WireError::UnknownRequest(99))
        ));
        let mut wrap = Vec::new();
        Message::Release(vec![u64::MAX - 10..u64::MAX]).encode(&mut wrap);
        wrap[28..36].copy_from_slice(&100u64.to_le_bytes()); // len overflows
        assert!(matches!(
            Message::decode(&wrap),
            Err(WireError::Range { .. })
        ));
        let mut many = ok.clone();
        many[12..16].copy_from_slice(&(MAX_RANGES as u32 + 1).to_le_bytes());
        assert!(matches!(
            Message::decode(&many),
            Err(WireError::TooManyRanges(_))
        ));
    }
}
