//! Generators: region layouts, registrations, conversion batches and injected faults,
//! chosen by the fuzzer's bytes.

#[allow(unused_imports)]
use super::*;

/// 1–5 regions, adjacent or with gaps, at the bottom, the middle or the top of the GPA
/// space, with identity or shuffled IOVAs.
pub(crate) fn gen_layout(u: &mut Unstructured) -> Vec<RegionSpec> {
    let n = int(u, 1, 5) as usize;
    let shapes: Vec<(RegionSpec, u64)> = (0..n)
        .map(|_| {
            let gap = if chance(u, 2, 3) { 0 } else { int(u, 1, 8) * P };
            (gen_shape(u, 0), gap)
        })
        .collect();
    let span: u64 = shapes.iter().map(|(s, g)| s.len + g).sum();
    let top = (u64::MAX - span) & !(P - 1);
    let base = match int(u, 0, 5) {
        0 => 0,
        1 => 16 * P,
        2 => 1 << 32,
        3 => 1 << 52,
        4 => top,
        _ => top + P, // the last region wraps past 2^64
    };
    let mut gpa = base;
    let mut specs: Vec<RegionSpec> = shapes
        .into_iter()
        .map(|(s, gap)| {
            gpa = gpa.wrapping_add(gap);
            let spec = RegionSpec { gpa, ..s };
            gpa = gpa.wrapping_add(s.len);
            spec
        })
        .collect();
    if chance(u, 1, 2) {
        // Shuffled IOVAs: regions in another order, packed from a base of their own.
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, int(u, 0, i as u64) as usize);
        }
        let mut iova = match int(u, 0, 3) {
            0 => 0,
            1 => 1 << 30,
            2 => (u64::MAX - span) & !(P - 1),
            _ => (base / 2) & !(P - 1),
        };
        for i in order {
            if chance(u, 1, 3) {
                iova = iova.wrapping_add(int(u, 1, 8) * P);
            }
            let offset = iova as i128 - specs[i].gpa as i128;
            specs[i].iova_offset = i64::try_from(offset).unwrap_or(0);
            iova = iova.wrapping_add(specs[i].len);
        }
    }
    for s in &mut specs {
        if chance(u, 1, 32) {
            s.iova_offset = s.iova_offset.wrapping_add(int(u, 1, P - 1) as i64);
        }
    }
    specs
}

/// A region of random strategy, granule, size and initial state at `gpa`.
pub(crate) fn gen_shape(u: &mut Unstructured, gpa: u64) -> RegionSpec {
    let strategy = match int(u, 0, 19) {
        0..=8 => Strategy::Cut,
        9..=16 => Strategy::PerGranule,
        _ => Strategy::Whole,
    };
    let (granule, pages) = match strategy {
        Strategy::PerGranule => {
            let gp = pick(u, &[1u64, 2, 4, 8, 16, 64]);
            let units = int(u, 1, (MAX_REGION_PAGES / gp).min(16));
            (gp * P, units * gp)
        }
        _ => {
            let pages = match int(u, 0, 7) {
                0..=5 => int(u, 1, 32),
                6 => int(u, 33, 128),
                _ => int(u, 129, MAX_REGION_PAGES),
            };
            (pick(u, &[1u64, 1, 2, 512]) * P, pages)
        }
    };
    let initial = if strategy != Strategy::Whole && chance(u, 1, 2) {
        PageState::Private
    } else {
        PageState::Shared
    };
    RegionSpec::new(gpa, pages * P, Backing::Opaque(gpa))
        .strategy(strategy)
        .granule(granule)
        .initial(initial)
}

/// A registration: a removed region again, a new one past the others, one overlapping
/// an existing region in GPA or IOVA, or a malformed spec.
pub(crate) fn gen_register(
    u: &mut Unstructured,
    model: &Model,
    retired: &[RegionSpec],
) -> RegionSpec {
    match int(u, 0, 7) {
        0..=2 if !retired.is_empty() => {
            let mut s = retired[int(u, 0, retired.len() as u64 - 1) as usize];
            if s.convertible && chance(u, 1, 2) {
                s.initial = s.initial.flip();
            }
            s
        }
        0..=5 => {
            let gpa_end = model.regions.iter().map(|r| r.end()).max().unwrap_or(0);
            let iova_end = model
                .regions
                .iter()
                .map(|r| r.iova_range().end)
                .max()
                .unwrap_or(0);
            let gpa = gpa_end.wrapping_add(int(u, 0, 4) * P);
            let mut s = gen_shape(u, gpa);
            let iova = iova_end.max(gpa).wrapping_add(int(u, 0, 2) * P);
            s.iova_offset = i64::try_from(iova as i128 - gpa as i128).unwrap_or(0);
            s
        }
        6 if !model.regions.is_empty() => {
            let r = &model.regions[int(u, 0, model.regions.len() as u64 - 1) as usize];
            let mut s = gen_shape(u, r.gpa());
            let shift = int(u, 0, r.pages() + 1) * P;
            if chance(u, 1, 2) {
                // Overlaps in GPA.
                s.gpa = r.gpa().wrapping_add(shift).wrapping_sub(P);
                s.shared = Backing::Opaque(s.gpa);
            } else {
                // Free GPA (past everything), IOVA inside `r`'s.
                s.gpa = model.regions.iter().map(|r| r.end()).max().unwrap_or(0);
                let iova = r.iova.wrapping_add(shift).wrapping_sub(P);
                s.iova_offset = (iova as i128 - s.gpa as i128) as i64;
            }
            s
        }
        _ => {
            let mut s = gen_shape(u, 0);
            s.gpa = any_u64(u);
            if chance(u, 1, 2) {
                s.gpa &= !(P - 1);
            }
            if chance(u, 1, 2) {
                s.len = any_u64(u);
            }
            if chance(u, 1, 3) {
                s.iova_offset = u.arbitrary().unwrap_or(0);
            }
            if chance(u, 1, 3) {
                s.granule = any_u64(u);
            }
            if chance(u, 1, 4) {
                s.convertible = !s.convertible;
            }
            if chance(u, 1, 4) {
                s.initial = s.initial.flip();
            }
            s
        }
    }
}

/// Mostly valid: `[gpa, gpa+len)` aligned to the granule of the `PerGranule` region it
/// starts in and trimmed to the convertible memory from there on (regions adjacent in
/// GPA included).
pub(crate) fn tidy(model: &Model, mut gpa: u64, len: u64) -> (u64, u64) {
    let Some(r) = model.region_at(gpa) else {
        return (gpa, len);
    };
    let g = match r.spec.strategy {
        Strategy::PerGranule => r.spec.granule,
        _ => P,
    };
    gpa = r.gpa() + (gpa - r.gpa()) / g * g;
    let span = model.convertible_pages_from(gpa);
    if span == 0 {
        return (gpa, len);
    }
    let pages = 1 + (len / P).saturating_sub(1) % span;
    (gpa, (pages * P).div_ceil(g) * g)
}

/// 1–6 requests; later ones often relative to the one before (same, nested, adjacent,
/// overlapping).
pub(crate) fn gen_batch(u: &mut Unstructured, model: &Model) -> Vec<ConversionRequest> {
    let n = match int(u, 0, 7) {
        0..=3 => 1,
        4..=6 => int(u, 2, 3),
        _ => int(u, 4, 6),
    };
    let mut reqs: Vec<ConversionRequest> = Vec::new();
    for _ in 0..n {
        let q = gen_request(u, model, reqs.last());
        reqs.push(q);
    }
    reqs
}

pub(crate) fn gen_request(
    u: &mut Unstructured,
    model: &Model,
    prev: Option<&ConversionRequest>,
) -> ConversionRequest {
    let kind = int(u, 0, 127);
    let (mut gpa, mut len) = if model.regions.is_empty() || kind >= 126 {
        // Anywhere, any length.
        let mut gpa = any_u64(u);
        let mut len = any_u64(u);
        if chance(u, 1, 2) {
            gpa &= !(P - 1);
        }
        if chance(u, 1, 2) {
            len = int(u, 0, 64) * P;
        }
        if chance(u, 1, 2) {
            len &= !(P - 1);
        }
        (gpa, len)
    } else if let (80..=125, Some(p)) = (kind, prev) {
        let pages = (p.len / P).clamp(1, 4 * MAX_REGION_PAGES);
        match int(u, 0, 4) {
            // the same range
            0 => (p.gpa, p.len),
            // nested
            1 => {
                let s = int(u, 0, pages - 1);
                (p.gpa.wrapping_add(s * P), int(u, 1, pages - s) * P)
            }
            // adjacent after
            2 => (p.gpa.wrapping_add(p.len), int(u, 1, 16) * P),
            // adjacent before
            3 => {
                let l = int(u, 1, 16) * P;
                (p.gpa.wrapping_sub(l), l)
            }
            // overlapping, shifted
            _ => (p.gpa.wrapping_add(int(u, 1, pages) * P), p.len),
        }
    } else {
        // Inside a region (mostly a convertible one; or one page before it), mostly
        // granule aligned.
        let convertible: Vec<&MRegion> = model
            .regions
            .iter()
            .filter(|r| r.spec.strategy != Strategy::Whole)
            .collect();
        let r = if !convertible.is_empty() && chance(u, 7, 8) {
            convertible[int(u, 0, convertible.len() as u64 - 1) as usize]
        } else {
            &model.regions[int(u, 0, model.regions.len() as u64 - 1) as usize]
        };
        let mut gpa = r.gpa() + int(u, 0, r.pages() - 1) * P;
        if chance(u, 1, 64) {
            gpa = r.gpa().wrapping_sub(P);
        }
        let pages = match int(u, 0, 9) {
            0..=5 => int(u, 1, 8),
            6..=8 => int(u, 1, 64),
            _ => int(u, 1, 4 * MAX_REGION_PAGES),
        };
        (gpa, pages * P)
    };
    if chance(u, 31, 32) {
        (gpa, len) = tidy(model, gpa, len);
    }
    // Malformed now and then: unaligned, empty, wrapping past 2^64.
    match int(u, 0, 127) {
        0 => gpa = gpa.wrapping_add(int(u, 1, P - 1)),
        1 => len = len.wrapping_add(int(u, 1, P - 1)),
        2 => len = 0,
        3 => {
            len = (u64::MAX - gpa)
                .wrapping_add(1)
                .wrapping_add(int(u, 0, 4) * P)
        }
        _ => {}
    }
    let to = match int(u, 0, 3) {
        _ if prev.is_some() && (80..=125).contains(&kind) && chance(u, 7, 8) => {
            prev.map(|p| p.to).unwrap_or(PageState::Private)
        }
        0 => PageState::Private,
        1 => PageState::Shared,
        // the other state than the first page's
        _ => match model.region_at(gpa) {
            Some(r) if r.private[r.page(gpa)] => PageState::Shared,
            _ => PageState::Private,
        },
    };
    let discard = if to == PageState::Private {
        chance(u, 1, 4)
    } else {
        chance(u, 1, 64)
    };
    ConversionRequest {
        gpa,
        len,
        to,
        discard,
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Fault {
    /// Plan op index (mod the plan length + 1; the extra value means "after the plan").
    pub(crate) at: u64,
    pub(crate) errno: i32,
    /// Calls after the first fault at which a second one hits (during the rollback).
    pub(crate) second: Option<(u64, i32)>,
}

pub(crate) fn gen_fault(u: &mut Unstructured) -> Option<Fault> {
    if !chance(u, 1, 4) {
        return None;
    }
    let at = int(u, 0, 255);
    let errno = pick(u, &ERRNOS);
    let second = if chance(u, 1, 2) {
        Some((int(u, 0, 15), pick(u, &ERRNOS)))
    } else {
        None
    };
    Some(Fault { at, errno, second })
}
