//! PCI addresses: `domain:bus:device.function`.

use std::fmt;
use std::str::FromStr;

/// A PCI address. Invariant: `device < 32`, `function < 8`.
///
/// ```
/// use vfio_gmem::vfio::Bdf;
/// let a: Bdf = "00:03.0".parse().unwrap();
/// let b: Bdf = "0000:00:03.0".parse().unwrap();
/// assert_eq!(a, b);
/// assert_eq!(a.to_string(), "0000:00:03.0");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

/// A string that is not a PCI address; the message shows the expected form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{input}' is not a PCI address ({why}); expected DDDD:BB:DD.F or BB:DD.F in hex, e.g. 0000:00:03.0")]
pub struct BdfParseError {
    /// The text that was parsed.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl Bdf {
    /// Builds an address; `None` if `device >= 32` or `function >= 8`.
    ///
    /// ```
    /// use vfio_gmem::vfio::Bdf;
    /// assert!(Bdf::new(0, 0, 3, 0).is_some());
    /// assert!(Bdf::new(0, 0, 32, 0).is_none());
    /// ```
    pub fn new(domain: u32, bus: u8, device: u8, function: u8) -> Option<Bdf> {
        (device < 32 && function < 8).then_some(Bdf {
            domain,
            bus,
            device,
            function,
        })
    }

    /// PCI domain (segment).
    pub fn domain(&self) -> u32 {
        self.domain
    }
    /// Bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }
    /// Device (slot) number, `< 32`.
    pub fn device(&self) -> u8 {
        self.device
    }
    /// Function number, `< 8`.
    pub fn function(&self) -> u8 {
        self.function
    }
}

impl FromStr for Bdf {
    type Err = BdfParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| BdfParseError {
            input: s.to_string(),
            why,
        };
        let hex = |part: &str, max_digits: usize| -> Option<u32> {
            if part.is_empty()
                || part.len() > max_digits
                || !part.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return None;
            }
            u32::from_str_radix(part, 16).ok()
        };
        let (head, func) = s.rsplit_once('.').ok_or_else(|| err("no '.function'"))?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, dev) = match parts.as_slice() {
            [bus, dev] => ("0", *bus, *dev),
            [domain, bus, dev] => (*domain, *bus, *dev),
            _ => return Err(err("wrong number of ':' separators")),
        };
        let domain = hex(domain, 8).ok_or_else(|| err("bad domain"))?;
        let bus = hex(bus, 2).ok_or_else(|| err("bad bus"))?;
        let device = hex(dev, 2)
            .filter(|&d| d < 32)
            .ok_or_else(|| err("device must be 00..1f"))?;
        let function = hex(func, 1)
            .filter(|&f| f < 8)
            .ok_or_else(|| err("function must be 0..7"))?;
        Ok(Bdf {
            domain,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_long_and_short_forms() {
        let b: Bdf = "0000:00:03.0".parse().unwrap();
        assert_eq!(
            (b.domain(), b.bus(), b.device(), b.function()),
            (0, 0, 3, 0)
        );
        assert_eq!("00:03.0".parse::<Bdf>().unwrap(), b);
        let c: Bdf = "10000:af:1f.7".parse().unwrap();
        assert_eq!(c.to_string(), "10000:af:1f.7");
        assert_eq!(
            "0000:AF:1F.7".parse::<Bdf>().unwrap().to_string(),
            "0000:af:1f.7"
        );
    }

    #[test]
    fn rejects_malformed_with_the_expected_form() {
        for bad in [
            "",
            "3",
            "00:03",
            "0000:00:03",
            "00:20.0",
            "00:03.8",
            "0:0:0:0.0",
            "00:03.0 ",
            "zz:03.0",
            "000:00:03.0x",
            "00:003.0",
            "0000:100:03.0",
            "-1:03.0",
        ] {
            let e = bad.parse::<Bdf>().expect_err(bad);
            assert!(e.to_string().contains("0000:00:03.0"), "{e}");
            assert!(e.to_string().contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn new_checks_ranges() {
        assert!(Bdf::new(0, 0, 31, 7).is_some());
        assert!(Bdf::new(0, 0, 31, 8).is_none());
    }
}
