//! Small value types: guest_memfd creation flags, VM types and memory attribute masks.
//!
//! Each is a thin wrapper over the kernel's integer so unknown bits survive a round trip
//! and show up in messages instead of being dropped.

use std::fmt;
use std::str::FromStr;

use crate::sys::kvm_gmem as k;

/// Flags of `KVM_CREATE_GUEST_MEMFD` (`GUEST_MEMFD_FLAG_*`).
///
/// ```
/// use vfio_gmem::gmem::GmemFlags;
/// let f: GmemFlags = "mmap|init_shared".parse().unwrap();
/// assert_eq!(f, GmemFlags::MMAP | GmemFlags::INIT_SHARED);
/// assert_eq!(f.to_string(), "MMAP|INIT_SHARED");
/// assert_eq!(GmemFlags::empty().to_string(), "none");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GmemFlags(u64);

const GMEM_FLAG_NAMES: &[(u64, &str)] = &[
    (k::GUEST_MEMFD_FLAG_MMAP as u64, "MMAP"),
    (k::GUEST_MEMFD_FLAG_INIT_SHARED as u64, "INIT_SHARED"),
];

impl GmemFlags {
    /// The host may `mmap` the file (Linux 6.18+). Needed to read or write its shared
    /// pages from the VMM, or to map them for a device by virtual address.
    pub const MMAP: Self = GmemFlags(k::GUEST_MEMFD_FLAG_MMAP as u64);
    /// Every page starts shared rather than private. Only VM types without private
    /// memory accept it (a default VM does, a SW_PROTECTED one does not).
    pub const INIT_SHARED: Self = GmemFlags(k::GUEST_MEMFD_FLAG_INIT_SHARED as u64);

    /// No flag.
    pub const fn empty() -> Self {
        GmemFlags(0)
    }

    /// From the kernel's integer, keeping bits this crate does not know.
    pub const fn from_bits_retain(bits: u64) -> Self {
        GmemFlags(bits)
    }

    /// The kernel's integer.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// True if no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// True if every bit of `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits of `self` that are not in `other`.
    pub const fn difference(self, other: Self) -> Self {
        GmemFlags(self.0 & !other.0)
    }

    /// Bits set in both.
    pub const fn intersection(self, other: Self) -> Self {
        GmemFlags(self.0 & other.0)
    }
}

impl std::ops::BitOr for GmemFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        GmemFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for GmemFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for GmemFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_bits(f, self.0, GMEM_FLAG_NAMES)
    }
}

/// Error of parsing [`GmemFlags`], [`VmType`] or [`MemoryAttributes`] from text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{word}'; expected {expected}")]
pub struct ParseError {
    what: &'static str,
    word: String,
    expected: &'static str,
}

impl FromStr for GmemFlags {
    type Err = ParseError;

    /// Accepts names separated by `|`, `,` or `+` (case-insensitive, `-` or `_`), a number
    /// (`0x3`), `none` or the empty string.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        parse_bits(
            s,
            GMEM_FLAG_NAMES,
            "guest_memfd flag",
            "MMAP, INIT_SHARED, none or a number",
        )
        .map(GmemFlags)
    }
}

/// Writes `A|B|0x40` for a mask, or `none`.
fn fmt_bits(f: &mut fmt::Formatter<'_>, bits: u64, names: &[(u64, &str)]) -> fmt::Result {
    if bits == 0 {
        return f.write_str("none");
    }
    let mut rest = bits;
    let mut first = true;
    for &(bit, name) in names {
        if bits & bit == bit {
            if !first {
                f.write_str("|")?;
            }
            f.write_str(name)?;
            first = false;
            rest &= !bit;
        }
    }
    if rest != 0 {
        if !first {
            f.write_str("|")?;
        }
        write!(f, "{rest:#x}")?;
    }
    Ok(())
}

fn parse_number(word: &str) -> Option<u64> {
    match word.strip_prefix("0x").or_else(|| word.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => word.parse().ok(),
    }
}

fn parse_bits(
    s: &str,
    names: &[(u64, &str)],
    what: &'static str,
    expected: &'static str,
) -> Result<u64, ParseError> {
    let mut bits = 0;
    for word in s.split(['|', ',', '+']).map(str::trim) {
        if word.is_empty() || word.eq_ignore_ascii_case("none") {
            continue;
        }
        let norm = word.replace('-', "_");
        if let Some(&(bit, _)) = names.iter().find(|(_, n)| n.eq_ignore_ascii_case(&norm)) {
            bits |= bit;
        } else if let Some(n) = parse_number(word) {
            bits |= n;
        } else {
            return Err(ParseError {
                what,
                word: word.to_string(),
                expected,
            });
        }
    }
    Ok(bits)
}

/// The `type` argument of `KVM_CREATE_VM` (x86 values).
///
/// ```
/// use vfio_gmem::gmem::VmType;
/// assert_eq!("sw-protected".parse::<VmType>().unwrap(), VmType::SwProtected);
/// assert_eq!(VmType::from_raw(1), VmType::SwProtected);
/// assert_eq!(VmType::Other(4).to_string(), "SNP (type 4)");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VmType {
    /// `KVM_X86_DEFAULT_VM` (0): no private memory.
    #[default]
    Default,
    /// `KVM_X86_SW_PROTECTED_VM` (1): private memory in guest_memfd without hardware
    /// protection, for development and testing (`CONFIG_KVM_SW_PROTECTED_VM`).
    SwProtected,
    /// Any other type value (SEV, SNP, TDX ... or another architecture's encoding).
    Other(u64),
}

/// Names of the x86 VM types (`KVM_X86_*_VM`), indexed by value.
const X86_VM_TYPE_NAMES: &[&str] = &["DEFAULT", "SW_PROTECTED", "SEV", "SEV_ES", "SNP", "TDX"];

impl VmType {
    /// The kernel's value.
    pub const fn raw(self) -> u64 {
        match self {
            VmType::Default => k::KVM_X86_DEFAULT_VM as u64,
            VmType::SwProtected => k::KVM_X86_SW_PROTECTED_VM as u64,
            VmType::Other(v) => v,
        }
    }

    /// From the kernel's value.
    pub const fn from_raw(v: u64) -> Self {
        if v == k::KVM_X86_DEFAULT_VM as u64 {
            VmType::Default
        } else if v == k::KVM_X86_SW_PROTECTED_VM as u64 {
            VmType::SwProtected
        } else {
            VmType::Other(v)
        }
    }
}

impl fmt::Display for VmType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            VmType::Default => f.write_str("DEFAULT"),
            VmType::SwProtected => f.write_str("SW_PROTECTED"),
            VmType::Other(v) => match X86_VM_TYPE_NAMES.get(v as usize) {
                Some(name) => write!(f, "{name} (type {v})"),
                None => write!(f, "type {v}"),
            },
        }
    }
}

impl FromStr for VmType {
    type Err = ParseError;

    /// Accepts `default`, `sw-protected` / `sw_protected`, another x86 name (`snp`) or a
    /// number.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let norm = s.trim().replace('-', "_");
        if let Some(i) = X86_VM_TYPE_NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(&norm))
        {
            return Ok(VmType::from_raw(i as u64));
        }
        parse_number(s.trim())
            .map(VmType::from_raw)
            .ok_or(ParseError {
                what: "VM type",
                word: s.to_string(),
                expected: "default, sw-protected or a number",
            })
    }
}

/// The VM types a KVM accepts (`KVM_CAP_VM_TYPES`: bit N set = type N supported).
///
/// ```
/// use vfio_gmem::gmem::{VmType, VmTypes};
/// let t = VmTypes::from_bits_retain(0b11);
/// assert!(t.contains(VmType::SwProtected));
/// assert_eq!(t.to_string(), "DEFAULT, SW_PROTECTED");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VmTypes(u64);

impl VmTypes {
    /// From the capability's value.
    pub const fn from_bits_retain(bits: u64) -> Self {
        VmTypes(bits)
    }

    /// The capability's value.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// True if `t` is listed. A KVM that does not report types (mask 0) accepts only the
    /// default type.
    pub fn contains(self, t: VmType) -> bool {
        match t.raw() {
            0 if self.0 == 0 => true,
            v if v < 64 => self.0 & (1 << v) != 0,
            _ => false,
        }
    }

    /// The listed types, ascending.
    pub fn iter(self) -> impl Iterator<Item = VmType> {
        (0..64u64)
            .filter(move |v| self.0 & (1 << v) != 0)
            .map(VmType::from_raw)
    }
}

impl fmt::Display for VmTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("DEFAULT only (KVM_CAP_VM_TYPES not reported)");
        }
        for (i, t) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

/// KVM memory attributes (`KVM_MEMORY_ATTRIBUTE_*`), as set by `KVM_SET_MEMORY_ATTRIBUTES`
/// and reported by `KVM_CAP_MEMORY_ATTRIBUTES`.
///
/// ```
/// use vfio_gmem::gmem::MemoryAttributes;
/// assert_eq!(MemoryAttributes::PRIVATE.to_string(), "PRIVATE");
/// assert_eq!(MemoryAttributes::empty().to_string(), "none");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemoryAttributes(u64);

const ATTRIBUTE_NAMES: &[(u64, &str)] = &[(k::KVM_MEMORY_ATTRIBUTE_PRIVATE as u64, "PRIVATE")];

impl MemoryAttributes {
    /// The page is guest-private: backed by guest_memfd, not by the memslot's host VA.
    pub const PRIVATE: Self = MemoryAttributes(k::KVM_MEMORY_ATTRIBUTE_PRIVATE as u64);

    /// No attribute (shared).
    pub const fn empty() -> Self {
        MemoryAttributes(0)
    }

    /// From the kernel's integer.
    pub const fn from_bits_retain(bits: u64) -> Self {
        MemoryAttributes(bits)
    }

    /// The kernel's integer.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// True if every bit of `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl fmt::Display for MemoryAttributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_bits(f, self.0, ATTRIBUTE_NAMES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gmem_flags_format_and_parse() {
        let all = GmemFlags::MMAP | GmemFlags::INIT_SHARED;
        assert_eq!(GmemFlags::MMAP.bits(), 1);
        assert_eq!(GmemFlags::INIT_SHARED.bits(), 2);
        assert_eq!(all.to_string(), "MMAP|INIT_SHARED");
        assert_eq!(GmemFlags::from_bits_retain(0x41).to_string(), "MMAP|0x40");
        assert_eq!(GmemFlags::from_bits_retain(0x40).to_string(), "0x40");
        for text in [
            "MMAP|INIT_SHARED",
            "mmap, init-shared",
            "init_shared+mmap",
            "0x3",
        ] {
            assert_eq!(text.parse::<GmemFlags>().unwrap(), all, "{text}");
        }
        assert_eq!("".parse::<GmemFlags>().unwrap(), GmemFlags::empty());
        assert_eq!("none".parse::<GmemFlags>().unwrap(), GmemFlags::empty());
        let e = "mmap|shared".parse::<GmemFlags>().unwrap_err().to_string();
        assert!(e.contains("'shared'") && e.contains("INIT_SHARED"), "{e}");
        // Display output parses back to the same value, unknown bits included.
        for bits in [0, 1, 2, 3, 0x41, 0x80] {
            let f = GmemFlags::from_bits_retain(bits);
            assert_eq!(f.to_string().parse::<GmemFlags>().unwrap(), f);
        }
    }

    #[test]
    fn gmem_flags_set_operations() {
        let all = GmemFlags::MMAP | GmemFlags::INIT_SHARED;
        assert!(all.contains(GmemFlags::MMAP));
        assert!(!GmemFlags::MMAP.contains(all));
        assert_eq!(all.difference(GmemFlags::MMAP), GmemFlags::INIT_SHARED);
        assert_eq!(all.intersection(GmemFlags::MMAP), GmemFlags::MMAP);
        assert!(GmemFlags::empty().is_empty());
    }

    #[test]
    fn vm_types() {
        assert_eq!(VmType::Default.raw(), 0);
        assert_eq!(VmType::SwProtected.raw(), 1);
        assert_eq!(VmType::from_raw(5), VmType::Other(5));
        assert_eq!(VmType::Other(5).to_string(), "TDX (type 5)");
        assert_eq!(VmType::Other(77).to_string(), "type 77");
        assert_eq!("DEFAULT".parse::<VmType>().unwrap(), VmType::Default);
        assert_eq!("snp".parse::<VmType>().unwrap(), VmType::Other(4));
        assert_eq!("9".parse::<VmType>().unwrap(), VmType::Other(9));
        assert!("secure".parse::<VmType>().is_err());

        let t = VmTypes::from_bits_retain(0b1_0011);
        assert_eq!(t.to_string(), "DEFAULT, SW_PROTECTED, SNP (type 4)");
        assert!(t.contains(VmType::Default) && !t.contains(VmType::Other(2)));
        assert!(VmTypes::default().contains(VmType::Default));
        assert!(!VmTypes::default().contains(VmType::SwProtected));
        assert!(!t.contains(VmType::Other(100)));
    }

    #[test]
    fn attributes_format() {
        assert_eq!(MemoryAttributes::PRIVATE.bits(), 8);
        assert_eq!(
            MemoryAttributes::from_bits_retain(9).to_string(),
            "PRIVATE|0x1"
        );
        assert!(MemoryAttributes::PRIVATE.contains(MemoryAttributes::empty()));
    }
}
