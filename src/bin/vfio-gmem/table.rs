//! Plain-text tables: left-aligned columns separated by two spaces, a header row and a
//! dashed rule. Cells never wrap; the last column is not padded.

/// A table under construction.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are kept (and get a column).
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Self {
        self.rows.push(cells.into_iter().map(Into::into).collect());
        self
    }

    /// Renders the table; every line ends with a newline.
    pub fn render(&self) -> String {
        let ncols = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; ncols];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, c) in line.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let fmt_line = |cells: &[String]| {
            let mut s = String::new();
            for (i, w) in widths.iter().enumerate() {
                let c = cells.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == ncols {
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.push_str(&" ".repeat(w - c.chars().count() + 2));
                }
            }
            s.truncate(s.trim_end().len());
            s.push('\n');
            s
        };
        let mut out = fmt_line(&self.headers);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&fmt_line(&rule));
        for r in &self.rows {
            out.push_str(&fmt_line(r));
        }
        out
    }
}

/// Bytes in binary units: `4 KiB`, `2 MiB`, `1.5 GiB`, `123 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v.fract() == 0.0 {
        format!("{} {}", v as u64, UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `[start, end)` in hex.
pub fn range(start: u64, len: u64) -> String {
    format!("[{start:#x}, {:#x})", start.saturating_add(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_and_trims_the_last() {
        let mut t = Table::new(["BDF", "DRIVER", "READY"]);
        t.row(["0000:00:03.0", "vfio-pci", "yes"]);
        t.row(["0000:00:04.0", "-", "no: not bound to any driver"]);
        assert_eq!(
            t.render(),
            "BDF           DRIVER    READY\n\
             ------------  --------  ---------------------------\n\
             0000:00:03.0  vfio-pci  yes\n\
             0000:00:04.0  -         no: not bound to any driver\n"
        );
    }

    #[test]
    fn short_and_long_rows() {
        let mut t = Table::new(["A", "B"]);
        t.row(["x"]);
        t.row(["y", "z", "extra"]);
        let r = t.render();
        assert_eq!(r.lines().count(), 4);
        assert!(r.lines().nth(3).unwrap().ends_with("extra"), "{r}");
        assert!(!r.lines().any(|l| l.ends_with(' ')), "{r:?}");
        assert_eq!(Table::new(["A"]).render(), "A\n-\n");
    }

    #[test]
    fn units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(4096), "4 KiB");
        assert_eq!(human_bytes(2 << 20), "2 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(range(0x1000, 0x2000), "[0x1000, 0x3000)");
    }
}
