//! Bodies of the `control_parser` and `sizes` fuzz targets: the `vfio-gmem assign` line
//! protocol ([`Command::parse`]), numbers and sizes ([`parse_number`], [`parse_size`],
//! also behind `--memory` and `--gpa`) and PCI addresses ([`Bdf`]).
//!
//! Each input is either raw text (checked for no panic, round trips and agreement with a
//! reference grammar written from the documentation) or, by its first byte, a recipe for
//! well-formed and malformed text whose meaning is known (checked for the exact result).

use crate::control::{parse_number, parse_size, Command};
use arbitrary::Unstructured;
use vfio_gmem::vfio::Bdf;

// ------------------------------------------------------------------ control lines

/// The `control_parser` target: lines of raw text, or generated lines.
pub fn control_lines(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        for line in String::from_utf8_lossy(rest).split('\n') {
            let _ = check_line(line);
        }
    } else {
        let mut u = Unstructured::new(rest);
        while !u.is_empty() {
            let (line, want) = gen_line(&mut u);
            let got = check_line(&line);
            assert_eq!(
                got.as_ref().map_err(variant),
                want.as_ref().map_err(|v| *v),
                "Command::parse({line:?})"
            );
        }
    }
}

fn variant(e: &crate::control::ParseError) -> &'static str {
    use crate::control::ParseError as E;
    match e {
        E::UnknownCommand(_) => "UnknownCommand",
        E::Arguments { .. } => "Arguments",
        E::Number { .. } => "Number",
    }
}

/// Parses one line and checks what holds for every line; returns the result.
fn check_line(line: &str) -> Result<Option<Command>, crate::control::ParseError> {
    let r = Command::parse(line);
    let code = line.split('#').next().unwrap_or("");
    let words: Vec<&str> = code.split_whitespace().collect();
    match &r {
        Ok(Some(cmd)) => {
            let shown = cmd.to_string();
            assert_eq!(
                Command::parse(&shown),
                Ok(Some(cmd.clone())),
                "{line:?} displays as {shown:?}, which parses differently"
            );
            match cmd {
                Command::Private { gpa, len, discard } => {
                    assert_eq!(parse_number(words[1]), Ok(*gpa), "{line:?}");
                    assert_eq!(parse_size(words[2]), Ok(*len), "{line:?}");
                    assert_eq!(*discard, words.len() == 4, "{line:?}");
                }
                Command::Shared { gpa, len } => {
                    assert_eq!(parse_number(words[1]), Ok(*gpa), "{line:?}");
                    assert_eq!(parse_size(words[2]), Ok(*len), "{line:?}");
                    assert_eq!(words.len(), 3, "{line:?}");
                }
                _ => assert_eq!(words.len(), 1, "{line:?}"),
            }
        }
        Ok(None) => assert!(words.is_empty(), "{line:?} ignored"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    // Surrounding whitespace and a trailing comment change nothing.
    assert_eq!(Command::parse(&format!(" \t{line} ")), r, "{line:?} padded");
    if !line.contains('#') {
        assert_eq!(
            Command::parse(&format!("{line} # note")),
            r,
            "{line:?} commented"
        );
    }
    r
}

const SPACES: [&str; 6] = [" ", "  ", "\t", " \t ", "\u{a0}", "\u{3000}"];

/// A line and what it must parse to (`Err` names the error variant).
fn gen_line(u: &mut Unstructured) -> (String, Result<Option<Command>, &'static str>) {
    const WORDS: [&str; 15] = [
        "private", "shared", "status", "map", "help", "?", "quit", "exit", "privat", "shares",
        "stat", "discard", "0x1000", "convert", "quit!",
    ];
    let word = pick(u, &WORDS);
    let cmd: String = word
        .chars()
        .map(|c| {
            if chance(u, 1, 3) {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    let mut args: Vec<String> = Vec::new();
    let mut gpa = None;
    let mut len = None;
    let mut discard = false;
    let mut well_formed = true;
    match word {
        "private" | "shared" if chance(u, 7, 8) => {
            let (g, gv) = gen_number(u);
            let (l, lv) = gen_size(u);
            args.push(g);
            args.push(l);
            gpa = Some(gv);
            len = Some(lv);
            if word == "private" && chance(u, 1, 2) {
                let d = pick(u, &["discard", "discard", "discard", "Discard", "forever"]);
                well_formed = d == "discard";
                discard = true;
                args.push(d.to_string());
            }
        }
        "private" | "shared" => {
            // A wrong number of arguments.
            for _ in 0..pick(u, &[0, 1, 4]) {
                args.push(pick(u, &["0x1000", "4K", "discard", "now"]).to_string());
            }
            well_formed = false;
        }
        _ => {
            for _ in 0..int(u, 0, 3) {
                args.push(pick(u, &["0x1000", "4K", "discard", "now", "#x"]).to_string());
            }
            if args.iter().any(|a| a.starts_with('#')) {
                args.truncate(args.iter().position(|a| a.starts_with('#')).unwrap_or(0));
            }
            well_formed = args.is_empty();
        }
    }
    let mut line = String::new();
    if chance(u, 1, 3) {
        line.push_str(pick(u, &SPACES));
    }
    line.push_str(&cmd);
    for a in &args {
        line.push_str(pick(u, &SPACES));
        line.push_str(a);
    }
    if chance(u, 1, 4) {
        line.push_str(pick(u, &["", " "]));
        line.push_str(pick(u, &["# comment", "#", "#private 0 4K"]));
    }
    let want = match word {
        "private" | "shared" if !well_formed || gpa.is_none() => Err("Arguments"),
        "private" | "shared" => match (gpa.unwrap(), len.unwrap()) {
            (None, _) | (_, None) => Err("Number"),
            (Some(gpa), Some(len)) if word == "private" => {
                Ok(Some(Command::Private { gpa, len, discard }))
            }
            (Some(gpa), Some(len)) => Ok(Some(Command::Shared { gpa, len })),
        },
        "status" | "map" | "help" | "?" | "quit" | "exit" if !well_formed => Err("Arguments"),
        "status" => Ok(Some(Command::Status)),
        "map" => Ok(Some(Command::Map)),
        "help" | "?" => Ok(Some(Command::Help)),
        "quit" | "exit" => Ok(Some(Command::Quit)),
        _ => Err("UnknownCommand"),
    };
    (line, want)
}

// ------------------------------------------------------------------ numbers and sizes

/// The `sizes` target: raw text against the reference grammar, generated numbers and
/// sizes of known value, PCI addresses.
pub fn sizes(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let text = String::from_utf8_lossy(rest);
            check_number_text(&text);
            for word in text.split_whitespace() {
                check_number_text(word);
            }
        }
        1 => {
            let mut u = Unstructured::new(rest);
            while !u.is_empty() {
                let (text, want) = gen_number(&mut u);
                assert_eq!(parse_number(&text).ok(), want, "parse_number({text:?})");
                check_number_text(&text);
                let (text, want) = gen_size(&mut u);
                assert_eq!(parse_size(&text).ok(), want, "parse_size({text:?})");
                check_number_text(&text);
            }
        }
        2 => {
            let text = String::from_utf8_lossy(rest);
            check_bdf_text(&text);
        }
        _ => {
            let mut u = Unstructured::new(rest);
            while !u.is_empty() {
                let (text, want) = gen_bdf(&mut u);
                let got = text.parse::<Bdf>().ok();
                assert_eq!(got, want, "Bdf::from_str({text:?})");
                check_bdf_text(&text);
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Bad {
    /// Not in the grammar.
    Syntax,
    /// In the grammar, but ≥ 2^64.
    Overflow,
}

/// The documented number grammar: `_` separators anywhere, then decimal digits or
/// `0x`/`0X` and hex digits; the value fits 64 bits.
fn reference_number(s: &str) -> Result<u64, Bad> {
    let clean: Vec<char> = s.chars().filter(|&c| c != '_').collect();
    let (digits, radix) = match clean.as_slice() {
        ['0', 'x' | 'X', rest @ ..] => (rest, 16),
        all => (all, 10),
    };
    if digits.is_empty() {
        return Err(Bad::Syntax);
    }
    let mut v: u128 = 0;
    let mut overflow = false;
    for c in digits {
        let d = c.to_digit(radix).ok_or(Bad::Syntax)?;
        v = v * radix as u128 + d as u128;
        if v > u64::MAX as u128 {
            overflow = true;
            v = u64::MAX as u128 + 1;
        }
    }
    if overflow {
        Err(Bad::Overflow)
    } else {
        Ok(v as u64)
    }
}

/// The documented size grammar: a number, or decimal digits (`_` allowed) with a binary
/// suffix `K`/`M`/`G`/`T` optionally followed by `iB` or `B`, in any case.
fn reference_size(s: &str) -> Result<u64, Bad> {
    let lower = s.to_ascii_lowercase();
    for tail in ["ib", "b", ""] {
        let Some(body) = lower.strip_suffix(tail) else {
            continue;
        };
        let Some(letter) = body.chars().last() else {
            continue;
        };
        let Some(shift) = [('k', 10), ('m', 20), ('g', 30), ('t', 40)]
            .iter()
            .find(|(l, _)| *l == letter)
            .map(|(_, s)| *s)
        else {
            continue;
        };
        let digits: Vec<char> = body[..body.len() - 1]
            .chars()
            .filter(|&c| c != '_')
            .collect();
        if digits.is_empty() || !digits.iter().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let n = reference_number(&body[..body.len() - 1])?;
        return n.checked_mul(1 << shift).ok_or(Bad::Overflow);
    }
    reference_number(s)
}

/// `parse_number` and `parse_size` on any text: agree with the reference grammar, and
/// errors name the text (and the overflow).
fn check_number_text(s: &str) {
    for (what, got, want) in [
        ("parse_number", parse_number(s), reference_number(s)),
        ("parse_size", parse_size(s), reference_size(s)),
    ] {
        match (&got, &want) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{what}({s:?})"),
            (Err(e), Err(bad)) => {
                let msg = e.to_string();
                assert!(msg.contains(s), "{what}({s:?}): {msg}");
                if *bad == Bad::Overflow {
                    assert!(msg.contains("larger than 64 bits"), "{what}({s:?}): {msg}");
                }
            }
            _ => panic!("{what}({s:?}) = {got:?}, the documented grammar says {want:?}"),
        }
    }
}

/// A number as text and its value (`None` if the text is malformed or too large).
fn gen_number(u: &mut Unstructured) -> (String, Option<u64>) {
    let v: u64 = match int(u, 0, 4) {
        0 => u.arbitrary().unwrap_or(0),
        1 => int(u, 0, 1 << 20),
        2 => int(u, 0, 1 << 20) << 12,
        3 => u64::MAX - int(u, 0, 2),
        _ => 0,
    };
    let (prefix, digits) = match int(u, 0, 3) {
        0 | 1 => (String::new(), v.to_string()),
        2 => (pick(u, &["0x", "0X"]).to_string(), format!("{v:x}")),
        _ => (pick(u, &["0x", "0X"]).to_string(), format!("{v:X}")),
    };
    let zeros = "0".repeat(int(u, 0, 2) as usize);
    let digits = separate(u, &format!("{zeros}{digits}"));
    let text = format!("{prefix}{digits}");
    match int(u, 0, 15) {
        0 => {
            let big = u64::MAX as u128 + 1 + int(u, 0, 1000) as u128;
            (big.to_string(), None)
        }
        1 => (format!("0x1{:016x}", v), None),
        2 => (
            pick(
                u,
                &[
                    "0x", "0X_", "_", "x10", "1x", "0xg", "12a", "-1", "0b1", "1.0",
                ],
            )
            .to_string(),
            None,
        ),
        3 => (format!("+{text}"), None),
        4 if !prefix.is_empty() => (format!("{prefix}+{digits}"), None),
        _ => (text, Some(v)),
    }
}

/// A size as text and its value (`None` if malformed or too large).
fn gen_size(u: &mut Unstructured) -> (String, Option<u64>) {
    if chance(u, 1, 2) {
        return gen_number(u);
    }
    let n: u64 = match int(u, 0, 3) {
        0 => u.arbitrary().unwrap_or(0),
        1 => int(u, 0, 4096),
        _ => int(u, 0, 1 << 24),
    };
    let (letter, shift) = pick(u, &[("K", 10), ("M", 20), ("G", 30), ("T", 40)]);
    let letter = if chance(u, 1, 2) {
        letter.to_ascii_lowercase()
    } else {
        letter.to_string()
    };
    let tail = pick(u, &["", "", "B", "b", "iB", "ib", "IB", "Ib"]);
    let digits = separate(u, &n.to_string());
    let want = n.checked_mul(1 << shift);
    match int(u, 0, 15) {
        0 => (format!("0x{n:x}{letter}{tail}"), None),
        1 => (format!("{letter}{tail}"), None),
        2 => (
            format!(
                "{digits}{letter}{tail}{}",
                pick(u, &["BB", "x", "_", "K", "i"])
            ),
            None,
        ),
        3 => (format!("_0x{n:x}{letter}"), None),
        4 => (format!("+{digits}{letter}"), None),
        _ => (format!("{digits}{letter}{tail}"), want),
    }
}

/// `digits` with `_` separators inserted at random places.
fn separate(u: &mut Unstructured, digits: &str) -> String {
    if !chance(u, 1, 4) {
        return digits.to_string();
    }
    let mut out = String::new();
    for c in digits.chars() {
        if chance(u, 1, 4) {
            out.push('_');
        }
        out.push(c);
    }
    if chance(u, 1, 4) {
        out.push('_');
    }
    out
}

// ------------------------------------------------------------------ PCI addresses

/// Any text: parsing never panics; an address displays canonically and round-trips, and
/// only texts of the documented form parse.
fn check_bdf_text(s: &str) {
    let got = s.parse::<Bdf>();
    let want = reference_bdf(s);
    assert_eq!(got.as_ref().ok(), want.as_ref(), "Bdf::from_str({s:?})");
    match got {
        Ok(b) => {
            let shown = b.to_string();
            let wide = b.domain() > 0xffff;
            assert!(wide || shown.len() == 12, "{shown:?} not DDDD:BB:DD.F");
            assert_eq!(shown.parse::<Bdf>(), Ok(b), "{s:?} displays as {shown:?}");
        }
        Err(e) => assert!(e.to_string().contains(s), "{e}"),
    }
}

/// `[DDDD:]BB:DD.F`: hex fields of at most 8, 2, 2 and 1 digits; device < 32, function < 8.
fn reference_bdf(s: &str) -> Option<Bdf> {
    fn field(t: &str, max: usize) -> Option<u32> {
        if t.is_empty() || t.len() > max || !t.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        Some(
            t.chars()
                .fold(0, |v, c| v * 16 + c.to_digit(16).unwrap_or(0)),
        )
    }
    let fields: Vec<&str> = s.split([':', '.']).collect();
    let seps: Vec<char> = s.chars().filter(|&c| c == ':' || c == '.').collect();
    let (d, b, dev, f) = match (fields.as_slice(), seps.as_slice()) {
        ([b, dev, f], [':', '.']) => ("0", *b, *dev, *f),
        ([d, b, dev, f], [':', ':', '.']) => (*d, *b, *dev, *f),
        _ => return None,
    };
    let (d, b, dev, f) = (field(d, 8)?, field(b, 2)?, field(dev, 2)?, field(f, 1)?);
    Bdf::new(d, b as u8, u8::try_from(dev).ok()?, f as u8)
}

/// An address as text (random padding and case, short form) and its value.
fn gen_bdf(u: &mut Unstructured) -> (String, Option<Bdf>) {
    let domain: u32 = if chance(u, 1, 2) {
        0
    } else {
        u.arbitrary().unwrap_or(0)
    };
    let bus = int(u, 0, 255) as u32;
    let dev = if chance(u, 7, 8) {
        int(u, 0, 31)
    } else {
        int(u, 32, 255)
    } as u32;
    let func = if chance(u, 7, 8) {
        int(u, 0, 7)
    } else {
        int(u, 8, 15)
    } as u32;
    let (dt, dok) = hex(u, domain, 8);
    let (bt, bok) = hex(u, bus, 2);
    let (vt, vok) = hex(u, dev, 2);
    let (ft, fok) = hex(u, func, 1);
    let short = domain == 0 && chance(u, 1, 2);
    let text = if short {
        format!("{bt}:{vt}.{ft}")
    } else {
        format!("{dt}:{bt}:{vt}.{ft}")
    };
    let ok = (short || dok) && bok && vok && fok;
    let want = if ok {
        Bdf::new(domain, bus as u8, dev as u8, func as u8)
    } else {
        None
    };
    (text, want)
}

/// `v` in hex with random zero padding (sometimes past `max` digits) and case; and
/// whether it fits `max` digits.
fn hex(u: &mut Unstructured, v: u32, max: usize) -> (String, bool) {
    let natural = format!("{v:x}").len();
    let width = int(u, natural as u64, max as u64 + 1) as usize;
    let t = format!("{v:0width$x}");
    let t = if chance(u, 1, 2) {
        t.to_ascii_uppercase()
    } else {
        t
    };
    (t, width <= max)
}

// ------------------------------------------------------------------ byte helpers

fn int(u: &mut Unstructured, lo: u64, hi: u64) -> u64 {
    u.int_in_range(lo..=hi).unwrap_or(lo)
}

fn chance(u: &mut Unstructured, num: u8, den: u8) -> bool {
    u.ratio(num, den).unwrap_or(false)
}

fn pick<T: Copy>(u: &mut Unstructured, items: &[T]) -> T {
    items[int(u, 0, items.len() as u64 - 1) as usize]
}

/// The peer protocol's message decoding (`vfio_gmem::peer::wire`): bytes from another
/// process never panic the decoder; whatever decodes re-encodes to a message that decodes
/// to the same value, within the size limit, with every range non-empty and not wrapping.
pub fn peer_wire(data: &[u8]) {
    use vfio_gmem::peer::wire::{Message, MAX_MESSAGE};
    let Ok(msg) = Message::decode(data) else {
        return;
    };
    if let Message::Release(r) | Message::Grant(r) = &msg {
        assert!(r.iter().all(|r| r.start < r.end), "{msg:?}");
    }
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    assert!(buf.len() <= MAX_MESSAGE, "{} bytes", buf.len());
    assert_eq!(
        Message::decode(&buf).expect("re-encoded message decodes"),
        msg
    );
    // A well-formed input is the canonical encoding except for padding and the
    // need-reply flag, so the lengths agree.
    assert_eq!(buf.len(), data.len(), "{msg:?}");
}
