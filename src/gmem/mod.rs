//! guest_memfd: creation through KVM, adoption of a VMM's fds, and memory attributes.
