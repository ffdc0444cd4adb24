//! The line protocol that drives a running assignment: one command per line, as read by
//! `vfio-gmem assign` from stdin. Pure parsing, shared by the CLI and its fuzz tests.
//!
//! ```text
//! private GPA LEN [discard]   make [GPA, GPA+LEN) private (unmap first), optionally
//!                             discarding the shared backing
//! shared GPA LEN              make [GPA, GPA+LEN) shared (map after)
//! status                      page counts, areas, ioctls so far
//! map                         the memory map: regions, mapping path, areas
//! help                        this list
//! quit                        tear down and exit (same as end of input)
//! ```
//!
//! Numbers are decimal or `0x` hex; sizes also take a binary suffix (`4K`, `2M`, `1G`).
//!
//! Part of the CLI, not of the library; the fuzz targets compile this file by path.

use std::fmt;

/// One parsed control command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Private { gpa: u64, len: u64, discard: bool },
    Shared { gpa: u64, len: u64 },
    Status,
    Map,
    Help,
    Quit,
}

/// Why a line is not a command; the message says what a correct line looks like.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("unknown command '{0}'; expected one of: private, shared, status, map, help, quit")]
    UnknownCommand(String),
    #[error("'{cmd}' takes {usage}")]
    Arguments {
        cmd: &'static str,
        usage: &'static str,
    },
    #[error("'{text}' is not a number: {why}")]
    Number { text: String, why: &'static str },
}

/// Usage text for every command, one per line.
pub const HELP: &str = "\
private GPA LEN [discard]  unmap, then make the range private (discard: drop the shared backing)
shared GPA LEN             make the range shared, then map it
status                     page counts, live IOMMU areas, ioctls issued
map                        regions, the mapping path of each, live areas
help                       this text
quit                       tear down and exit (also on end of input)
GPA and LEN: decimal or 0x hex; LEN may use K, M, G suffixes (binary)";

impl Command {
    /// Parses one line. Blank lines and `#` comments yield `Ok(None)`.
    pub fn parse(line: &str) -> Result<Option<Command>, ParseError> {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(cmd) = words.next() else {
            return Ok(None);
        };
        let rest: Vec<&str> = words.collect();
        const RANGE: &str = "GPA LEN, e.g. 'shared 0x100000 0x4000'";
        const PRIVATE: &str = "GPA LEN [discard], e.g. 'private 0x100000 16K'";
        let command = match cmd.to_ascii_lowercase().as_str() {
            "private" => match rest.as_slice() {
                [gpa, len] | [gpa, len, "discard"] => Command::Private {
                    gpa: parse_number(gpa)?,
                    len: parse_size(len)?,
                    discard: rest.len() == 3,
                },
                _ => {
                    return Err(ParseError::Arguments {
                        cmd: "private",
                        usage: PRIVATE,
                    })
                }
            },
            "shared" => match rest.as_slice() {
                [gpa, len] => Command::Shared {
                    gpa: parse_number(gpa)?,
                    len: parse_size(len)?,
                },
                _ => {
                    return Err(ParseError::Arguments {
                        cmd: "shared",
                        usage: RANGE,
                    })
                }
            },
            other => {
                let simple = match other {
                    "status" => Command::Status,
                    "map" => Command::Map,
                    "help" | "?" => Command::Help,
                    "quit" | "exit" => Command::Quit,
                    _ => return Err(ParseError::UnknownCommand(cmd.to_string())),
                };
                if !rest.is_empty() {
                    let name = match simple {
                        Command::Status => "status",
                        Command::Map => "map",
                        Command::Help => "help",
                        _ => "quit",
                    };
                    return Err(ParseError::Arguments {
                        cmd: name,
                        usage: "no arguments",
                    });
                }
                simple
            }
        };
        Ok(Some(command))
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Private { gpa, len, discard } => {
                write!(
                    f,
                    "private {gpa:#x} {len:#x}{}",
                    if *discard { " discard" } else { "" }
                )
            }
            Command::Shared { gpa, len } => write!(f, "shared {gpa:#x} {len:#x}"),
            Command::Status => f.write_str("status"),
            Command::Map => f.write_str("map"),
            Command::Help => f.write_str("help"),
            Command::Quit => f.write_str("quit"),
        }
    }
}

const TOO_LARGE: &str = "larger than 64 bits";

/// Parses a decimal or `0x` hexadecimal number (`_` separators allowed).
pub fn parse_number(text: &str) -> Result<u64, ParseError> {
    let err = |why| ParseError::Number {
        text: text.to_string(),
        why,
    };
    let clean: String = text.chars().filter(|&c| c != '_').collect();
    let (digits, radix) = match clean
        .strip_prefix("0x")
        .or_else(|| clean.strip_prefix("0X"))
    {
        Some(hex) => (hex, 16),
        None => (clean.as_str(), 10),
    };
    if digits.is_empty() {
        return Err(err("no digits"));
    }
    // Checked here, not left to from_str_radix, which also takes a leading '+'.
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(err(if radix == 16 {
            "expected hex digits after 0x"
        } else {
            "expected decimal digits or 0x hex"
        }));
    }
    u64::from_str_radix(digits, radix).map_err(|_| err(TOO_LARGE))
}

/// Parses a size: a number as [`parse_number`], or decimal with a binary suffix
/// `K`/`M`/`G`/`T` (optionally followed by `iB` or `B`).
pub fn parse_size(text: &str) -> Result<u64, ParseError> {
    let err = |why| ParseError::Number {
        text: text.to_string(),
        why,
    };
    let upper = text.to_ascii_uppercase();
    let stripped = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let shift = match stripped.chars().last() {
        Some('K') => 10,
        Some('M') => 20,
        Some('G') => 30,
        Some('T') => 40,
        _ => return parse_number(text),
    };
    let digits = &stripped[..stripped.len() - 1];
    // `_` separators go anywhere, so look for the hex prefix without them ("_0x1K").
    if digits.replace('_', "").starts_with("0X") {
        return Err(err("a suffix goes with a decimal number, e.g. 16K"));
    }
    let n = parse_number(digits).map_err(|e| match e {
        ParseError::Number { why: TOO_LARGE, .. } => err(TOO_LARGE),
        _ => err("expected e.g. 4K, 2M, 1G"),
    })?;
    n.checked_mul(1 << shift).ok_or_else(|| err(TOO_LARGE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_command() {
        let p = |s| Command::parse(s).unwrap().unwrap();
        assert_eq!(
            p("shared 4096 4K"),
            Command::Shared {
                gpa: 4096,
                len: 4096
            }
        );
        assert_eq!(
            p("  PRIVATE 0x0 0x2000 discard "),
            Command::Private {
                gpa: 0,
                len: 0x2000,
                discard: true
            }
        );
        assert_eq!(p("status"), Command::Status);
        assert_eq!(p("map # comment"), Command::Map);
        assert_eq!(p("?"), Command::Help);
        assert_eq!(p("exit"), Command::Quit);
        assert_eq!(Command::parse("   # only a comment").unwrap(), None);
        assert_eq!(Command::parse("").unwrap(), None);
    }

    #[test]
    fn errors_say_what_is_expected() {
        let e = |s| Command::parse(s).unwrap_err().to_string();
        assert!(e("convert 0 4K").contains("expected one of: private, shared"));
        assert!(e("private 0").contains("GPA LEN [discard]"));
        assert!(e("shared 0 4K extra").contains("GPA LEN"));
        assert!(e("private 0 4K forever").contains("GPA LEN [discard]"));
        assert!(e("status now").contains("no arguments"));
        assert!(e("shared zero 4K").contains("'zero' is not a number"));
        assert!(e("shared 0x 4K").contains("no digits"));
        assert!(e("shared 0 0x10K").contains("decimal number"));
        assert!(e("shared 0 99999999999T").contains("larger than 64 bits"));
        assert!(e("shared 0x1ffffffffffffffff 4K").contains("larger than 64 bits"));
    }

    /// Found by the `sizes` and `control_parser` fuzz targets: `from_str_radix` took a
    /// leading `+` (`shared +0 4K`, even `0x+10`), and a `_` before `0x` slipped a hex
    /// number past the decimal-only rule for suffixes (`_0x10K` was 16 KiB).
    #[test]
    fn no_sign_and_no_hex_with_a_suffix() {
        for text in ["+0", "+4096", "0x+10", "+0x10", "-1", "+"] {
            let e = parse_number(text).unwrap_err().to_string();
            assert!(e.contains("expected"), "{text}: {e}");
        }
        for text in ["+4K", "_0x10K", "0_x10K", "0x1_0K", "+1M"] {
            assert!(parse_size(text).is_err(), "{text}");
        }
        assert!(e_line("shared +0 4K").contains("'+0' is not a number"));
        assert!(e_line("private 0 _0x10K").contains("decimal number"));
        // Overflow is still told apart from bad digits.
        assert!(parse_number("99999999999999999999")
            .unwrap_err()
            .to_string()
            .contains("larger than 64 bits"));
        assert!(parse_number("99999999999999999999x")
            .unwrap_err()
            .to_string()
            .contains("expected decimal digits"));
        // Separators still work.
        assert_eq!(parse_size("1_0K"), Ok(10 << 10));
        assert_eq!(parse_number("0x_10"), Ok(0x10));
    }

    /// Found by the `sizes` target: digits too large for 64 bits before a suffix were
    /// reported as malformed ("expected e.g. 4K").
    #[test]
    fn too_many_digits_before_a_suffix_is_overflow() {
        let e = e_line("shared 0 184464407737095516184G");
        assert!(e.contains("larger than 64 bits"), "{e}");
        assert!(e_line("shared 0 1x8G").contains("expected e.g. 4K"));
    }

    fn e_line(s: &str) -> String {
        Command::parse(s).unwrap_err().to_string()
    }

    proptest! {
        #[test]
        fn display_round_trips(gpa in any::<u64>(), len in any::<u64>(), discard in any::<bool>(), which in 0u8..6) {
            let cmd = match which {
                0 => Command::Private { gpa, len, discard },
                1 => Command::Shared { gpa, len },
                2 => Command::Status,
                3 => Command::Map,
                4 => Command::Help,
                _ => Command::Quit,
            };
            prop_assert_eq!(Command::parse(&cmd.to_string()).unwrap(), Some(cmd));
        }

        #[test]
        fn never_panics_on_arbitrary_lines(line in "\\PC{0,64}") {
            let _ = Command::parse(&line);
            let _ = parse_size(&line);
        }

        #[test]
        fn suffixes_scale(n in 0u64..(1 << 20), s in 0usize..4) {
            let (suffix, shift) = [("K", 10), ("M", 20), ("G", 30), ("T", 40)][s];
            prop_assert_eq!(parse_size(&format!("{n}{suffix}")).unwrap(), n << shift);
        }
    }
}
