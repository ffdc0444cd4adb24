//! Section `setup`: a 1 GiB non-convertible gmem guest, one area against per page.

use super::*;

// Whole-guest setup

pub fn setup(edus: &[Edu], sz: &Sizes) -> Res<Value> {
    let len = sz.setup;
    let vm = KvmVm::create(VmType::Default).map_err(err("KVM VM"))?;
    let gmem = vm
        .create_guest_memfd(len, GmemFlags::MMAP | GmemFlags::INIT_SHARED)
        .map_err(err("guest_memfd"))?;
    gmem.allocate(0, len).map_err(err("gmem allocate"))?;

    // Library: open, attach, add the region (it probes MAP_FILE, falls back to VA).
    let t0 = Instant::now();
    let iommufd = Arc::new(Iommufd::open().map_err(err("open /dev/iommu"))?);
    let options = SpaceOptions {
        conversions: false,
        force_strategy: None,
        ..Default::default()
    };
    let mut space = DmaSpace::iommufd(&iommufd, None, options).map_err(err("DmaSpace"))?;
    let dev = Device::open_cdev(&edus[0].cdev).map_err(err("opening the edu cdev"))?;
    space.attach(&dev).map_err(err("attach"))?;
    let fd = gmem.as_fd().try_clone_to_owned().map_err(err("dup"))?;
    space
        .add_region(GuestRegion::new(
            IOVA,
            len,
            SharedMemory::File { fd, offset: 0 },
        ))
        .map_err(err("add_region"))?;
    let lib_s = t0.elapsed().as_secs_f64();
    let lib_areas = space.area_count();
    let path = space
        .regions()
        .first()
        .map(|r| r.path.to_string())
        .unwrap_or_default();
    drop(dev);
    drop(space);

    // Per page, raw: open, attach, mmap, one IOMMU_IOAS_MAP per 4 KiB page.
    let t0 = Instant::now();
    let iommufd = Arc::new(Iommufd::open().map_err(err("open /dev/iommu"))?);
    let ioas = Ioas::new(&iommufd).map_err(err("IOAS"))?;
    let dev = attach_new(&edus[0], &ioas)?;
    let mapping = gmem.mmap().map_err(err("gmem mmap"))?;
    let (fdi, id, va) = (iommufd.as_fd(), ioas.id(), mapping.addr());
    for off in (0..len).step_by(PAGE_SIZE as usize) {
        raw_map_va(fdi, id, va + off, IOVA + off, PAGE_SIZE).map_err(err("per-page MAP"))?;
    }
    let raw_s = t0.elapsed().as_secs_f64();
    let raw_areas = len / PAGE_SIZE;
    drop(dev);
    let row = json!({
        "guest_bytes": len,
        "library": {"seconds": lib_s, "areas": lib_areas, "path": path, "ioctls_map": 1},
        "per_page": {"seconds": raw_s, "areas": raw_areas, "ioctls_map": raw_areas},
        "ratio_time": raw_s / lib_s,
        "ratio_areas": raw_areas as f64 / lib_areas as f64,
    });
    Ok(row)
}
