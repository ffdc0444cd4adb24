//! The pure half of `dma`: the tracker, the planner and the data they exchange. Nothing
//! in this folder issues a system call or imports anything outside it (checked by the
//! import-graph test in `dma/mod.rs`): a plan is computed from the tracker's state alone,
//! and the tracker changes only when told what really happened.
//!
//! | file | holds |
//! |---|---|
//! | `model` | pages, regions' specs, backings, strategies, areas: the vocabulary |
//! | `ranges`, `pages` | half-open range sets and per-page bitmaps |
//! | `areamap` | the tracker's live areas, ordered by IOVA (a two-level sorted array) |
//! | `region`, `tracker` | the tracker: registered regions and live areas; commit, reconcile |
//! | `planner` | the tracker's `plan_*` methods: request → [`ops::Plan`] |
//! | `ops` | the operations a plan is made of |
//! | `error`, `outcome` | the planner's refusals; what running a plan reports |
//! | `scratch` | where a probe may map: the lowest free IOVA |
//! | `buffers` | working memory the planner reuses across plans (no allocation per conversion) |

pub(crate) mod areamap;
pub(crate) mod buffers;
pub(crate) mod error;
pub(crate) mod model;
pub(crate) mod ops;
pub(crate) mod outcome;
pub(crate) mod pages;
mod planner;
pub(crate) mod ranges;
pub(crate) mod region;
pub(crate) mod scratch;
pub(crate) mod tracker;
