//! The metatrain coordinator: the control plane. No libtorch.
//!
//! - [`sampler`]: which tasks each meta-step and evaluation uses, a pure function of (seed, step) and the
//!   [`curriculum`]'s competence (which task difficulties are allowed at each step).
//! - [`scheduler`]: who computes which task; deadlines, reassignment, membership (I/O-free state machine).
//! - [`aggregate`]: validate results, reduce in task-index order, clip by global norm; with a
//!   [`defence`], outlier quarantine and robust reductions.
//! - [`optim`]: Adam over the flat meta-parameters.
//! - [`checkpoint`]: atomic save/resume of everything that determines the rest of the run.
//! - [`server`]: the QUIC endpoint, one handler per message kind.
//! - [`run`]: the training loop that feeds server events and ticks to the cores above.
//! - [`chaos`]: `metatrain chaos`, a failure-injection run compared with an undisturbed one.
//! - [`certs`]: `metatrain certs init|issue`, the cluster CA and certificates.
//! - [`sweep`]: `metatrain sweep`, queued runs over a grid or list on one shared worker pool.
//! - [`status`]: `metatrain status ADDR`, a running coordinator's state from its /metrics.
//! - [`plot`]: loss curves (PNG, SVG) from a run's metrics.csv.
//! - [`bench`]: `metatrain bench coordinator`, the real server and training loop against simulated workers.
//! - [`train`]: `metatrain train` (set-up, loop, output); [`report`], [`progress`], [`local`], [`metrics`].
//!
//! Flow: `sampler` → `scheduler` → `server` (Params/Assign out, Result in) → `aggregate` → `optim`.

pub mod aggregate;
pub mod bench;
pub mod certs;
pub mod chaos;
pub mod checkpoint;
pub mod curriculum;
pub mod defence;
pub mod local;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod report;
pub mod run;
pub mod sampler;
pub mod scheduler;
pub mod server;
pub mod spill;
pub mod status;
pub mod sweep;
pub mod train;
