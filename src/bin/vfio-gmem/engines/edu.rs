//! QEMU's `edu` device (docs/specs/edu.rst): a 4 KiB buffer at device address 0x40000 and
//! a DMA engine programmed through BAR0 (source, destination, count, command).

use std::io;
use std::time::{Duration, Instant};

use vfio_gmem::vfio::{BarMapping, Device, PciDevice};

use super::{DmaEngine, EngineDriver};

const VENDOR: u16 = 0x1234;
const DEVICE: u16 = 0x11e8;
/// Where the device's buffer sits in the device's own address space.
const BUFFER: u64 = 0x40000;
const BUFFER_LEN: u64 = 4096;

const ID: usize = 0x00;
const SRC: usize = 0x80;
const DST: usize = 0x88;
const COUNT: usize = 0x90;
const CMD: usize = 0x98;
const CMD_RUN: u64 = 1;
const CMD_TO_RAM: u64 = 2;

pub const DRIVER: EngineDriver = EngineDriver {
    name: "edu",
    id: "1234:11e8",
    matches: |d: &PciDevice| d.vendor == VENDOR && d.device == DEVICE,
    open: |dev| Ok(Box::new(Edu::open(dev)?)),
};

struct Edu {
    name: String,
    bar0: BarMapping,
}

impl Edu {
    fn open(dev: &Device) -> io::Result<Edu> {
        let err = |what: &str, e: &dyn std::fmt::Display| {
            io::Error::other(format!("{}: {what}: {e}", dev.name()))
        };
        dev.enable_bus_master()
            .map_err(|e| err("enabling bus mastering", &e))?;
        let bar0 = dev.map_bar(0).map_err(|e| err("mapping BAR0", &e))?;
        let id = bar0.read_u32(ID);
        if id & 0xff != 0xed {
            return Err(io::Error::other(format!(
                "{}: BAR0 identification register reads {id:#x}; this is not an edu device",
                dev.name()
            )));
        }
        Ok(Edu {
            name: dev.name().to_string(),
            bar0,
        })
    }

    fn transfer(&self, src: u64, dst: u64, len: u64, to_ram: bool) -> io::Result<()> {
        if len == 0 || len > BUFFER_LEN {
            return Err(io::Error::other(format!(
                "edu transfers 1..={BUFFER_LEN} bytes, not {len}"
            )));
        }
        self.bar0.write_u64(SRC, src);
        self.bar0.write_u64(DST, dst);
        self.bar0.write_u64(COUNT, len);
        self.bar0
            .write_u64(CMD, CMD_RUN | if to_ram { CMD_TO_RAM } else { 0 });
        let start = Instant::now();
        while self.bar0.read_u64(CMD) & CMD_RUN != 0 {
            if start.elapsed() > Duration::from_secs(20) {
                return Err(io::Error::other(format!(
                    "{}: DMA still running after 20 s",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl DmaEngine for Edu {
    fn name(&self) -> &'static str {
        "edu"
    }
    fn max_transfer(&self) -> u64 {
        BUFFER_LEN
    }
    fn dma_from_ram(&self, iova: u64, len: u64) -> io::Result<()> {
        self.transfer(iova, BUFFER, len, false)
    }
    fn dma_to_ram(&self, iova: u64, len: u64) -> io::Result<()> {
        self.transfer(BUFFER, iova, len, true)
    }
}
