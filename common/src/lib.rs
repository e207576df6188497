//! The shared vocabulary of metatrain: what the coordinator and workers say to each other and what a run is.
//! No libtorch, and no I/O outside the optional `net` feature, [`images`]' reading of a user's folder and
//! [`lora`]'s reading of a base model.
//!
//! - [`config`]: the run configuration (TOML) with `validate()`; one struct the whole run reads.
//! - [`task`]: task specs and distributions (sinusoid, noisy-linear, Omniglot, image folders); a task's data is a pure
//!   function of (config, spec), with every random draw from [`rng`]'s keyed streams.
//! - [`datadir`]: where the data sets live when nothing says (checks that directories exist).
//! - [`omniglot`]: the Omniglot `.npz` reader and the 105→28 area resize.
//! - [`images`]: a folder of the user's PNG images as classes (any size, area-resized to 28×28), for
//!   `images` tasks and `adapt`; the one module that reads files itself (listing the folder, opening each
//!   PNG), so every binary loads a user's folder the same way.
//! - [`layout`]: models' named parameter layouts and their initialisation from (model, seed).
//! - [`lora`]: LoRA meta-learning's frozen base model, read and checked against the model (a file read).
//! - [`protocol`]: every message and the frame codec (size limits checked before allocation).
//! - [`tensor`]: flat f32 payloads, checked for length and finiteness.
//! - `net` (feature): the quinn/rustls adapters and the `/metrics` endpoint used by both binaries.
//!
//! Data flow: coordinator `config` → `layout` (initial parameters) → `task::TaskSpec`s → `protocol`
//! frames → worker `task::generate` → meta-gradient `tensor` payload → coordinator.

pub mod config;
pub mod datadir;
pub mod images;
pub mod layout;
pub mod lora;
#[cfg(feature = "net")]
pub mod net;
pub mod omniglot;
pub mod protocol;
pub mod rng;
pub mod task;
pub mod tensor;
