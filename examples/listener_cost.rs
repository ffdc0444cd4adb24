//! What conversion listeners cost per conversion: 0, 1 and 4 listeners, in process and
//! out of process (the peer protocol), with a raw socket round trip as the baseline.
//!
//! ```sh
//! cargo run --release --example listener_cost [-- --rounds 9 --ops 2000]
//! ```
//!
//! Method: a `DmaSpace` whose plans run on an executor that does nothing (the space's own
//! work plus the listeners', no IOMMU or KVM), one 1 GiB region; each operation converts
//! 8 KiB at one of 64 spots to private or back (alternating), so every operation names
//! pages to every listener (one `release` or one `grant` call each). In-process listeners
//! do nothing. Peers are `vfio_gmem::peer::Peer`s whose backends (`PeerBackend` with a
//! memfd region, mapping and unmapping for real) each run in their own thread. The raw
//! baseline is the same number of request/reply round trips of the same sizes over a
//! `SOCK_SEQPACKET` pair to a thread that echoes, with no library code. Scenarios run in
//! a rotated order each round; each figure is the median over rounds of the mean time
//! per operation.

use std::ops::Range;
use std::os::fd::AsFd;
use std::time::Instant;

use vfio_gmem::dma::planning::{AttributesOp, DiscardOp, MapOp, UnmapOp};
use vfio_gmem::dma::{
    ConversionListener, DmaSpace, Executor, GuestRegion, ListenerError, OpError, PageState,
    SharedMemory, SpaceOptions, UserAddress,
};
use vfio_gmem::gmem::Memfd;
use vfio_gmem::peer::{Peer, PeerBackend};

const GPA: u64 = 0x1_0000_0000;
const LEN: u64 = 1 << 30;
const SPOTS: u64 = 64;

struct Null;
impl Executor for Null {
    fn map(&mut self, _: &MapOp) -> Result<(), OpError> {
        Ok(())
    }
    fn unmap(&mut self, op: &UnmapOp) -> Result<u64, OpError> {
        Ok(op.expected_bytes())
    }
    fn set_attributes(&mut self, _: &AttributesOp) -> Result<(), OpError> {
        Ok(())
    }
    fn discard(&mut self, _: &DiscardOp) -> Result<(), OpError> {
        Ok(())
    }
}

struct Quiet;
impl ConversionListener for Quiet {
    fn name(&self) -> &str {
        "quiet"
    }
    fn release(&mut self, r: &[Range<u64>]) -> Result<(), ListenerError> {
        std::hint::black_box(r);
        Ok(())
    }
    fn grant(&mut self, r: &[Range<u64>]) -> Result<(), ListenerError> {
        std::hint::black_box(r);
        Ok(())
    }
}

/// A space with `quiet` in-process listeners and `peers` backends in threads.
fn space(
    quiet: usize,
    peers: usize,
    memfd: &Memfd,
) -> (DmaSpace, Vec<std::thread::JoinHandle<()>>) {
    let mut s = DmaSpace::with_executor(Box::new(Null), SpaceOptions::default());
    // SAFETY: the executor does nothing with the address.
    let shared = SharedMemory::Address {
        addr: unsafe { UserAddress::new(0x7f00_0000_0000) },
    };
    s.add_region(GuestRegion::new(GPA, LEN, shared).convertible(PageState::Shared))
        .expect("add_region");
    for _ in 0..quiet {
        s.add_listener(Box::new(Quiet)).expect("add_listener");
    }
    let mut threads = Vec::new();
    for i in 0..peers {
        let (peer, theirs) = Peer::pair(&format!("peer{i}")).expect("pair");
        threads.push(std::thread::spawn(move || {
            let mut b = PeerBackend::from_fd(theirs);
            while let Ok(Some(_)) = b.serve_one() {}
        }));
        peer.add_region(GPA, LEN, memfd.file().as_fd(), 0)
            .expect("add_region");
        s.add_listener(Box::new(peer)).expect("add_listener");
    }
    (s, threads)
}

/// Mean nanoseconds per conversion over `ops` operations.
fn run_space(s: &mut DmaSpace, ops: u64) -> f64 {
    let t = Instant::now();
    for i in 0..ops {
        let spot = GPA + (i / 2 % SPOTS) * (LEN / SPOTS);
        let to = if i % 2 == 0 {
            PageState::Private
        } else {
            PageState::Shared
        };
        s.convert(spot, 0x2000, to, false).expect("convert");
    }
    t.elapsed().as_nanos() as f64 / ops as f64
}

/// Mean nanoseconds per raw request/reply round trip (RELEASE-sized request).
fn run_raw(ops: u64) -> f64 {
    use std::os::unix::net::UnixDatagram;
    // A datagram pair keeps message boundaries like SOCK_SEQPACKET and is in std.
    let (a, b) = UnixDatagram::pair().expect("pair");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok(n) = b.recv(&mut buf) {
            if n == 0 || b.send(&buf[..20]).is_err() {
                break;
            }
        }
    });
    let req = [7u8; 36]; // header + count + one range
    let mut rep = [0u8; 64];
    let t = Instant::now();
    for _ in 0..ops {
        a.send(&req).expect("send");
        a.recv(&mut rep).expect("recv");
    }
    let ns = t.elapsed().as_nanos() as f64 / ops as f64;
    a.send(&[]).ok();
    drop(a);
    echo.join().ok();
    ns
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let mut rounds = 9;
    let mut ops = 2000u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds N")
            }
            "--ops" => ops = args.next().and_then(|v| v.parse().ok()).expect("--ops N"),
            other => panic!("unknown argument {other}; see the file's doc comment"),
        }
    }
    let memfd = Memfd::new("listener-cost", LEN).expect("memfd");
    let scenarios: [(&str, usize, usize); 5] = [
        ("0 listeners", 0, 0),
        ("1 in-process", 1, 0),
        ("4 in-process", 4, 0),
        ("1 peer", 0, 1),
        ("4 peers", 0, 4),
    ];
    let mut spaces: Vec<_> = scenarios
        .iter()
        .map(|(_, q, p)| space(*q, *p, &memfd))
        .collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len() + 1];
    for round in 0..rounds {
        for k in 0..=scenarios.len() {
            let i = (k + round) % (scenarios.len() + 1);
            let ns = if i == scenarios.len() {
                run_raw(ops)
            } else {
                run_space(&mut spaces[i].0, ops)
            };
            times[i].push(ns);
        }
    }
    let base = median(times[0].clone());
    let raw = median(times[scenarios.len()].clone());
    println!(
        "{:<14} {:>12} {:>10} {:>16}",
        "scenario", "ns/conv", "vs 0", "vs raw RTT × n"
    );
    for (i, (name, _, peers)) in scenarios.iter().enumerate() {
        let ns = median(times[i].clone());
        let vs_raw = if *peers > 0 {
            format!("{:.2}", (ns - base) / (raw * *peers as f64))
        } else {
            String::new()
        };
        println!("{name:<14} {ns:>12.0} {:>9.2}x {vs_raw:>16}", ns / base);
    }
    println!(
        "{:<14} {raw:>12.0}   (one raw SOCK_DGRAM request/reply round trip)",
        "raw RTT"
    );
    for (s, threads) in spaces {
        drop(s);
        for t in threads {
            t.join().ok();
        }
    }
}
