//! Interface addresses from an rtnetlink `RTM_GETADDR` dump (the kernel reports IPv4
//! addresses nowhere else). The decoding is pure; [`addresses`] does the dump.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::sys::netlink::{self, Message, RTM_GETADDR, RTM_NEWADDR};

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// `struct ifaddrmsg`: family, prefixlen, flags, scope (u8 each), index (u32).
const IFADDRMSG: usize = 8;

/// Every address of every interface: `(ifindex, address, prefix length)`.
pub(crate) fn addresses() -> io::Result<Vec<(u32, IpAddr, u8)>> {
    let header = [libc::AF_UNSPEC as u8, 0, 0, 0, 0, 0, 0, 0];
    Ok(decode(&netlink::dump(RTM_GETADDR, &header)?))
}

/// Decodes `RTM_NEWADDR` messages; others and malformed ones are skipped. For IPv4 the
/// local address (`IFA_LOCAL`) wins over the peer (`IFA_ADDRESS`) of point-to-point links.
pub(crate) fn decode(msgs: &[Message]) -> Vec<(u32, IpAddr, u8)> {
    let mut out = Vec::new();
    for m in msgs.iter().filter(|m| m.ty == RTM_NEWADDR) {
        let p = &m.payload;
        if p.len() < IFADDRMSG {
            continue;
        }
        let (family, prefix) = (p[0] as i32, p[1]);
        let index = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
        let attrs = netlink::attributes(p, IFADDRMSG);
        let pick = |ty| attrs.iter().find(|(t, _)| *t == ty).map(|(_, d)| *d);
        let addr = match family {
            libc::AF_INET => pick(IFA_LOCAL)
                .or_else(|| pick(IFA_ADDRESS))
                .and_then(|d| <[u8; 4]>::try_from(d).ok())
                .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            libc::AF_INET6 => pick(IFA_ADDRESS)
                .and_then(|d| <[u8; 16]>::try_from(d).ok())
                .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
            _ => None,
        };
        if let Some(a) = addr {
            out.push((index, a, prefix));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut v = ((4 + data.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(data);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn newaddr(family: i32, prefix: u8, index: u32, attrs: &[Vec<u8>]) -> Message {
        let mut p = vec![family as u8, prefix, 0, 0];
        p.extend_from_slice(&index.to_ne_bytes());
        for a in attrs {
            p.extend_from_slice(a);
        }
        Message {
            ty: RTM_NEWADDR,
            payload: p,
        }
    }

    #[test]
    fn decodes_ipv4_local_and_ipv6_addresses() {
        let v6: [u8; 16] = "fd00::5".parse::<Ipv6Addr>().unwrap().octets();
        let msgs = [
            // Point-to-point: IFA_ADDRESS is the peer, IFA_LOCAL ours.
            newaddr(
                libc::AF_INET,
                32,
                3,
                &[
                    attr(IFA_ADDRESS, &[10, 9, 9, 9]),
                    attr(IFA_LOCAL, &[10, 0, 0, 1]),
                ],
            ),
            newaddr(
                libc::AF_INET,
                24,
                2,
                &[attr(IFA_ADDRESS, &[192, 168, 7, 2])],
            ),
            newaddr(libc::AF_INET6, 64, 2, &[attr(IFA_ADDRESS, &v6)]),
            newaddr(libc::AF_INET, 24, 4, &[attr(IFA_ADDRESS, &[1, 2, 3])]),
            Message {
                ty: 16,
                payload: vec![0; 16],
            },
        ];
        assert_eq!(
            decode(&msgs),
            vec![
                (3, "10.0.0.1".parse().unwrap(), 32),
                (2, "192.168.7.2".parse().unwrap(), 24),
                (2, "fd00::5".parse().unwrap(), 64),
            ]
        );
    }

    #[test]
    fn the_live_dump_includes_loopback() {
        // Every network namespace has lo; it has 127.0.0.1 once it is up.
        let a = addresses().expect("RTM_GETADDR dump");
        if std::fs::read_to_string("/sys/class/net/lo/operstate").is_ok() {
            let lo: u32 = std::fs::read_to_string("/sys/class/net/lo/ifindex")
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let up = u32::from_str_radix(
                std::fs::read_to_string("/sys/class/net/lo/flags")
                    .unwrap()
                    .trim()
                    .trim_start_matches("0x"),
                16,
            )
            .unwrap()
                & 1
                != 0;
            if up {
                assert!(
                    a.iter().any(|(i, ip, _)| *i == lo && ip.is_loopback()),
                    "{a:?}"
                );
            }
        }
    }
}
