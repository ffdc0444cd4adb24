//! Other processes that touch guest memory: a small protocol between a VMM and a
//! vhost-user-style backend (virtiofsd, a DPDK or SPDK process, an emulated device in its
//! own process), so that such a process follows conversions like the IOMMU does.
//!
//! Vocabulary: the **peer** is the backend process as the VMM sees it ([`Peer`], a
//! [`ConversionListener`](crate::dma::ConversionListener) registered on a
//! [`DmaSpace`](crate::dma::DmaSpace)); the **backend** is the same connection seen from
//! the backend process ([`PeerBackend`], with [`BackendMemory`], its own mapping of
//! guest memory). The **memory table** is the list of regions (fd + offset per GPA
//! range) the VMM sent; **release** and **grant** are the listener's two calls.
//!
//! | file | role |
//! |---|---|
//! | `wire.rs` | the message format, pure (vhost-user's header and memory-table messages, two requests of ours) |
//! | `vmm.rs` | [`Peer`]: sends, waits for each answer with a timeout |
//! | `backend.rs` | [`PeerBackend`], [`BackendMemory`]: serves requests, maps exactly the granted pages |
//! | `error.rs` | [`PeerError`], [`WireError`] |
//!
//! The contract, end to end: a conversion to private returns only after every peer
//! answered `RELEASE` for its pages, and a backend answers only after those pages are
//! no longer mapped in its process; so when KVM flips the attribute, no peer reaches
//! them. A peer that refuses, has gone away or does not answer within its timeout makes
//! the conversion fail with nothing changed (the error names it). `docs/peers.md` has the
//! messages and where they differ from vhost-user.

mod backend;
mod error;
mod vmm;
pub mod wire;

pub use backend::{BackendMemory, PeerBackend, Served};
pub use error::{PeerError, WireError};
pub use vmm::{Peer, DEFAULT_TIMEOUT};
