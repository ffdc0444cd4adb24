//! VFIO device assignment: PCI discovery and driver binding, cdev devices bound to
//! iommufd, and the legacy group/container (type1) path.
