//! The storage layer of the pipeline: one contract — digital twins, raw readings, roll-ups, the
//! dead-letter archive, retention — and its backends: [`sqlite`] (embedded, the default: no
//! server needed) and [`mongo`] (production). [`StoreConfig`] picks one for every service;
//! [`Store`] holds it. The same contract tests (`tests/store_contract.rs`) run against every
//! backend.
//!
//! Layout, the same for every backend: the contract is one module per concern ([`TwinStore`],
//! [`ReadingStore`], [`RollupStore`], [`DeadLetterArchive`], [`Pruning`]) and each backend
//! implements it in a module of the same name (`sqlite/twins.rs`, `mongo/twins.rs`, …); the
//! folds both backends share are in `fold.rs`.

mod archive;
mod backend;
mod config;
mod error;
mod fold;
pub mod mongo;
mod prune;
mod readings;
mod rollups;
pub mod sqlite;
mod twins;

pub use archive::{Archived, DeadLetterArchive, LetterFilter};
pub use backend::Store;
pub use config::{Retention, StoreConfig};
pub use error::StoreError;
pub use fold::reading_before;
pub use prune::{PruneReport, Pruning};
pub use readings::{
    MessageRecord, PageCursor, ReadingStore, StoredMessage, StoredPage, WriteReport,
};
pub use rollups::{Bucket, FoldReport, RollupStore, GRANULARITIES};
pub use twins::{LastValue, LivenessCounts, Observation, Twin, TwinStore};
