//! Output: the tables printed after a run, and the machine description.

use super::*;

// Output

pub fn size(b: u64) -> String {
    if b >= GIB && b % GIB == 0 {
        format!("{}GiB", b / GIB)
    } else if b >= MIB && b % MIB == 0 {
        format!("{}MiB", b / MIB)
    } else {
        format!("{}KiB", b / KIB)
    }
}

pub fn print_tables(v: &Value) {
    let iommu = v["machine"]["iommu"].as_str().unwrap_or("?");
    if let Some(rows) = v["overhead"].as_array() {
        println!("\n## Library overhead vs raw ioctl loop (IOMMU: {iommu}; median of {} rounds; ratio = library / raw, goal <= 1.05)",
            rows.first().map(|r| r["rounds"].clone()).unwrap_or_default());
        println!(
            "{:<24} {:>6} {:>7} {:>7} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8}",
            "path",
            "area",
            "total",
            "areas",
            "lib ms",
            "raw ms",
            "map x",
            "unmap x",
            "total x",
            "raw us/op"
        );
        for r in rows {
            println!(
                "{:<24} {:>6} {:>7} {:>7} {:>10.1} {:>10.1} {:>9.3} {:>9.3} {:>9.3} {:>8.1}",
                r["path"].as_str().unwrap_or(""),
                size(r["area_bytes"].as_u64().unwrap_or(0)),
                size(r["total_bytes"].as_u64().unwrap_or(0)),
                r["areas"],
                r["lib_total_s"].as_f64().unwrap_or(0.0) * 1e3,
                r["raw_total_s"].as_f64().unwrap_or(0.0) * 1e3,
                r["ratio_map"].as_f64().unwrap_or(0.0),
                r["ratio_unmap"].as_f64().unwrap_or(0.0),
                r["ratio_total"].as_f64().unwrap_or(0.0),
                r["raw_us_per_op"].as_f64().unwrap_or(0.0),
            );
        }
    }
    let p = &v["paired"];
    if p.is_object() {
        println!(
            "\n## Paired rounds (IOMMU: {iommu}; {} steps on {}, step by step, {} rounds; ratio = library / raw)",
            p["steps"],
            size(p["region_bytes"].as_u64().unwrap_or(0)),
            p["rounds"],
        );
        println!(
            "{:<40} {:>8} {:>8} {:>8} {:>9} {:>9}",
            "pair", "median", "min", "max", "lib ioctl", "raw ioctl"
        );
        if let Some(pairs) = p["pairs"].as_object() {
            for (name, x) in pairs {
                let r = &x["ratio"];
                println!(
                    "{name:<40} {:>8.3} {:>8.3} {:>8.3} {:>9} {:>9}",
                    r["median"].as_f64().unwrap_or(f64::NAN),
                    r["min"].as_f64().unwrap_or(f64::NAN),
                    r["max"].as_f64().unwrap_or(f64::NAN),
                    x["library_ioctls"],
                    x["raw_ioctls"]
                );
            }
        }
    }
    let c = &v["conversions"];
    if c.is_object() {
        println!(
            "\n## Conversions (IOMMU: {iommu}; {} region, {} pool at boot, {} steps: {} random, {} adjacent, {} nested; times: median of {} rounds)",
            size(c["region_bytes"].as_u64().unwrap_or(0)),
            size(c["pool_bytes"].as_u64().unwrap_or(0)),
            c["steps"], c["mix"]["random"], c["mix"]["adjacent"], c["mix"]["nested"], c["rounds"]
        );
        println!(
            "{:<30} {:>12} {:>8} {:>7} {:>10} {:>9} {:>9} {:>10}",
            "strategy",
            "IOMMU ioctls",
            "maps",
            "unmaps",
            "peak areas",
            "seconds",
            "planning",
            "tracker B"
        );
        for r in c["rows"].as_array().into_iter().flatten() {
            println!(
                "{:<30} {:>12} {:>8} {:>7} {:>10} {:>9.3} {:>9} {:>10}",
                r["name"].as_str().unwrap_or(""),
                r["iommu_ioctls"].to_string(),
                r["maps"].to_string(),
                r["unmaps"].to_string(),
                r["peak_areas"].to_string(),
                r["seconds"].as_f64().unwrap_or(0.0),
                r["plan_seconds"]
                    .as_f64()
                    .map(|x| format!("{x:.3}"))
                    .unwrap_or("-".into()),
                r["tracker_bytes"]
                    .as_u64()
                    .map(|b| b.to_string())
                    .unwrap_or("-".into()),
            );
        }
        let b = &c["ratios_baseline_over_cut"];
        let g = &c["ratios_pergranule_over_cut"];
        println!(
            "per-page baseline / library cut: ioctls {:.1}x (goal >= 10), peak areas {:.1}x, time {:.2}x (goal >= 5)",
            b["ioctls"].as_f64().unwrap_or(0.0), b["peak_areas"].as_f64().unwrap_or(0.0), b["time"].as_f64().unwrap_or(0.0)
        );
        println!(
            "library per-granule / library cut: ioctls {:.1}x, peak areas {:.1}x, time {:.2}x",
            g["ioctls"].as_f64().unwrap_or(0.0),
            g["peak_areas"].as_f64().unwrap_or(0.0),
            g["time"].as_f64().unwrap_or(0.0)
        );
        let k = &c["kernel_page_costs"];
        let us = |a: &str, b: &str| k[a][b].as_f64().unwrap_or(0.0);
        println!(
            "kernel cost per 4 KiB page (raw, map+unmap of {}): one area {:.2} us (huge pages on) / {:.2} us (off); \
             4 KiB areas {:.2} us (on) / {:.2} us (off); bound on time ratio per-page(on)/one-area(off): {:.1}x",
            size(k["bytes"].as_u64().unwrap_or(0)),
            us("huge_pages_on", "bulk_us_per_page"), us("huge_pages_off", "bulk_us_per_page"),
            us("huge_pages_on", "per_page_areas_us_per_page"), us("huge_pages_off", "per_page_areas_us_per_page"),
            us("huge_pages_on", "per_page_areas_us_per_page") / us("huge_pages_off", "bulk_us_per_page"),
        );
        for r in c["rows"].as_array().into_iter().flatten() {
            println!(
                "  {:<30} to-shared {:.3} s, to-private {:.3} s",
                r["name"].as_str().unwrap_or(""),
                r["to_shared_seconds"].as_f64().unwrap_or(0.0),
                r["to_private_seconds"].as_f64().unwrap_or(0.0)
            );
        }
        println!(
            "transient unmaps of shared pages: {} (checked {} unmap ops of the library's plans)",
            c["transient_unmaps"], c["unmap_ops_checked"]
        );
        let t = &c["tracker"];
        println!(
            "tracker: {} B for {} ({} B bitmap = {:.2} bit/page, {} B for {} areas + region); per GiB with these areas: {} B",
            t["bytes"], size(c["region_bytes"].as_u64().unwrap_or(0)), t["bitmap_bytes"],
            t["bits_per_page_bitmap"].as_f64().unwrap_or(0.0), t["area_and_region_bytes"],
            t["final_areas"], t["bytes_per_gib_with_these_areas"]
        );
    }
    let s = &v["setup"];
    if s.is_object() {
        println!(
            "\n## Whole-guest setup (IOMMU: {iommu}; {} non-convertible gmem MMAP|INIT_SHARED, attach + map)",
            size(s["guest_bytes"].as_u64().unwrap_or(0))
        );
        println!(
            "library: {:.3} s, {} area(s), {} | per 4 KiB page: {:.3} s, {} areas | ratio time {:.1}x, areas {:.0}x",
            s["library"]["seconds"].as_f64().unwrap_or(0.0), s["library"]["areas"],
            s["library"]["path"].as_str().unwrap_or(""),
            s["per_page"]["seconds"].as_f64().unwrap_or(0.0), s["per_page"]["areas"],
            s["ratio_time"].as_f64().unwrap_or(0.0), s["ratio_areas"].as_f64().unwrap_or(0.0)
        );
    }
}

pub fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let cpus = read("/proc/cpuinfo")
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "guest_cpu": cpu,
        "guest_cpus": cpus,
        "guest_mem_mib": mem_kib / 1024,
        "iommu": std::env::var("VFIO_GMEM_IOMMU").unwrap_or_else(|_| "unknown".into()),
    })
}
