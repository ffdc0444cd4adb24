//! iommufd objects: the `/dev/iommu` context, IO address spaces and hardware page tables.
