//! The verdict and the version/meminfo parsers, on answers of kernels the tests do not boot.

use super::*;

fn yes(e: Evidence) -> Answer<bool> {
    Answer::new(true, e)
}
fn no(e: Evidence) -> Answer<bool> {
    Answer::new(false, e)
}

#[test]
fn verdict_with_a_device_on_7_3() {
    let v = verdict(
        &Answer::observed(true),
        &Answer::observed(true),
        &yes(Evidence::VerifiedWithDevice),
        &yes(Evidence::VerifiedWithDevice),
        &no(Evidence::VerifiedWithDevice),
        &yes(Evidence::VerifiedWithDevice),
    );
    assert_eq!(v.backend, "iommufd");
    assert_eq!(
        v.guest_memfd,
        "VA fallback (MAP_FILE refused, with a device attached)"
    );
    assert_eq!(v.memfd, "fd+offset (with a device attached)");
    assert_eq!(v.conversions, "cut-unmap verified");
    assert!(v.summary.starts_with("iommufd: guest_memfd: VA fallback"));
    assert!(v.summary.ends_with("conversions: cut-unmap verified"));
}

#[test]
fn verdict_without_a_device_says_inferred() {
    let inf = || Evidence::Inferred("no device".into());
    let v = verdict(
        &Answer::observed(true),
        &Answer::observed(false),
        &yes(inf()),
        &yes(inf()),
        &no(inf()),
        &yes(inf()),
    );
    assert!(v.memfd.contains("inferred"), "{v:?}");
    assert!(v.guest_memfd.contains("inferred"), "{v:?}");
    assert_eq!(v.conversions, "cut-unmap (inferred, no device)");
}

#[test]
fn verdict_on_legacy_and_on_nothing() {
    let un = || Answer::unavailable("no /dev/iommu");
    let v = verdict(
        &Answer::observed(false),
        &Answer::observed(true),
        &un(),
        &un(),
        &un(),
        &un(),
    );
    assert_eq!(v.backend, "legacy-type1");
    assert!(v.guest_memfd.starts_with("VA"), "{v:?}");
    assert!(v.conversions.starts_with("per-granule"), "{v:?}");
    let v = verdict(
        &Answer::observed(false),
        &Answer::observed(false),
        &un(),
        &un(),
        &un(),
        &un(),
    );
    assert_eq!(v.backend, "none");
    assert!(v.summary.contains("impossible"), "{v:?}");
}

#[test]
fn answers_serialize_with_their_evidence() {
    let a = no(Evidence::VerifiedWithDevice).with_detail("EINVAL");
    let j = serde_json::to_value(&a).unwrap();
    assert_eq!(j["value"], false);
    assert_eq!(j["evidence"]["kind"], "verified-with-device");
    assert_eq!(j["detail"], "EINVAL");
    let j = serde_json::to_value(Answer::<bool>::unavailable("no KVM")).unwrap();
    assert!(j["value"].is_null());
    assert_eq!(j["evidence"]["kind"], "unavailable");
    assert_eq!(j["evidence"]["reason"], "no KVM");
    assert!(j.get("detail").is_none());
}

#[test]
fn labels_and_display() {
    assert_eq!(Evidence::VerifiedWithDevice.label(), "verified (device)");
    assert_eq!(Evidence::Inferred("x".into()).reason(), Some("x"));
    assert_eq!(Answer::observed(true).to_string(), "yes");
    assert_eq!(Answer::<bool>::unavailable("x").to_string(), "?");
}

#[test]
fn meminfo_and_versions() {
    assert_eq!(free_huge_pages_2m(""), None);
    assert_eq!(
        free_huge_pages_2m("HugePages_Free: 0\nHugepagesize: 2048 kB\n"),
        Some(0)
    );
    assert_eq!(kernel_version("6.12.0+"), Some((6, 12)));
    assert!(kernel_version("7.3.4").unwrap() >= (6, 13));
}

#[test]
fn kernel_release_is_not_empty() {
    assert!(!kernel_release().is_empty());
}
